"""Capture and patch activations with forward hooks, as context managers that always clean up."""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
def capture_inputs(modules: dict[int, nn.Module]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the first positional input of each module (e.g. the keys entering W_out)."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for key, module in modules.items():

        def hook(_module, args, key=key):
            captured[key] = args[0]

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_outputs(modules: dict[int, nn.Module]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the hidden-state output of each module (e.g. a block's residual stream)."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for key, module in modules.items():

        def hook(_module, _args, output, key=key):
            captured[key] = hidden_of(output)

        handles.append(module.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def edit_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace a module's hidden-state output by ``fn(hidden)``."""
    handle = module.register_forward_hook(lambda _m, _a, output: _with_hidden(output, fn(hidden_of(output))))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """End any forward pass right after ``module`` ran; catch :class:`StopForward` around the call."""

    def hook(_module, _args, _output):
        raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def run_until(model: nn.Module, last_module: nn.Module, **inputs) -> None:
    """Run ``model`` on ``inputs`` but stop once ``last_module`` has produced its output."""
    with stop_after(last_module), suppress(StopForward):
        model(**inputs, use_cache=False)
