"""Capture and patch activations with forward hooks, as context managers that always clean up."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass early, once the layers a computation needs have run."""


def hidden_of(output):
    """The hidden-state tensor of a block's output (blocks return a tensor or a tuple led by one)."""
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def _removed_after(*handles) -> Iterator[None]:
    """Remove the given hook handles when the block ends, however it ends."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_inputs(modules: dict[int, nn.Module]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the first positional input of each module (e.g. the keys entering W_out)."""
    captured: dict[int, torch.Tensor] = {}

    def store(key):
        return lambda _module, args: captured.__setitem__(key, args[0])

    with _removed_after(*(module.register_forward_pre_hook(store(key)) for key, module in modules.items())):
        yield captured


@contextmanager
def capture_outputs(modules: dict[int, nn.Module]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the hidden-state output of each module (e.g. a block's residual stream)."""
    captured: dict[int, torch.Tensor] = {}

    def store(key):
        return lambda _module, _args, output: captured.__setitem__(key, hidden_of(output))

    with _removed_after(*(module.register_forward_hook(store(key)) for key, module in modules.items())):
        yield captured


@contextmanager
def capture_raw_output(module: nn.Module) -> Iterator[list]:
    """Record a module's output exactly as it returned it (tensor or tuple), to hand back later."""
    captured: list = []
    with _removed_after(module.register_forward_hook(lambda _m, _a, output: captured.append(output))):
        yield captured


@contextmanager
def replay_output(blocks: Sequence[nn.Module], output) -> Iterator[None]:
    """Make consecutive blocks skip their computation: each returns ``output`` (the last block's recorded
    output), so the blocks above see the stream they would see. Hooks on the blocks still run.

    A block may already carry an instance ``forward`` (accelerate installs one on modules it offloads or spreads
    over devices); it is put back afterwards, not deleted."""
    saved = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        block.forward = lambda *_args, **_kwargs: output
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


@contextmanager
def edit_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace a module's hidden-state output by ``fn(hidden)``."""
    with _removed_after(
        module.register_forward_hook(lambda _m, _a, output: _with_hidden(output, fn(hidden_of(output))))
    ):
        yield


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """End any forward pass right after ``module`` ran; catch :class:`StopForward` around the call."""

    def hook(_module, _args, _output):
        raise StopForward

    with _removed_after(module.register_forward_hook(hook)):
        yield


def run_until(model: nn.Module, last_module: nn.Module, **inputs) -> None:
    """Run ``model`` on ``inputs`` but stop once ``last_module`` has produced its output."""
    with stop_after(last_module), suppress(StopForward):
        model(**inputs, use_cache=False)


def with_cache(module: nn.Module, cache) -> dict:
    """The keyword that hands ``module`` a key-value cache: transformers renamed it (past_key_values -> cache)."""
    name = "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
    return {name: cache}


def cache_of(output):
    """The key-value cache a forward pass returned, under either name."""
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values
