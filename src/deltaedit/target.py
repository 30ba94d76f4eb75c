"""Keys and target residuals: the two forward computations every locate-then-edit method shares.

* keys ``k`` (d_ff): the input of ``W_out`` at the subject's last token, averaged over the edit
  prompt preceded by a few short context prefixes;
* the target residual ``delta`` (d_model): a vector added to the critical block's output at the
  subject's last token, optimized so the model predicts ``target_new`` (NLL + KL on an "essence"
  prompt + weight decay, norm-clamped), optionally kept inside a subspace by a projector ``P``, or inside
  a cone of half-spaces (:class:`HalfSpaces`), after every optimizer step (DeltaEdit's constraint).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .hooks import (
    StopForward,
    cache_of,
    capture_inputs,
    capture_outputs,
    capture_raw_output,
    edit_output,
    replay_output,
    run_until,
    stop_after,
    with_cache,
)
from .models import ModelParts, parse_dtype
from .predict import final_logits, input_device
from .requests import EditRequest
from .tokens import encode, pad, pad_id, target_ids

ESSENCE_PROMPT = "{} is a"


class HalfSpaces:
    """The cone ``{x : r_i^T x <= 0}`` over the columns ``r_i`` of ``normals``; calling it projects onto it.

    The projection is exact for any number of normals (Moreau's decomposition: the cone is the polar of
    ``{R lam : lam >= 0}``, so ``P(x) = x - R lam*`` with ``lam* = argmin_{lam >= 0} ||R lam - x||``, scipy's NNLS).
    """

    def __init__(self, normals: torch.Tensor):
        self.normals = normals.detach().double().cpu()
        # unit normals without the zero ones describe the same cone and keep the solver well scaled
        norms = self.normals.norm(dim=0)
        self._units = self.normals[:, norms > 0] / norms[norms > 0]

    @property
    def count(self) -> int:
        return self.normals.shape[1]

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        from scipy.optimize import nnls

        x = vector.detach().double().cpu()
        units = self._units
        if units.shape[1] == 0 or bool((units.T @ x <= 0).all()):
            return vector.clone()
        try:
            lam, _ = nnls(units.numpy(), x.numpy())
        except RuntimeError as err:  # scipy's iteration limit
            raise FloatingPointError(f"the one-sided constraint's projection did not converge ({err})") from err
        projected = x - units @ torch.from_numpy(lam)
        if not bool((units.T @ projected <= 1e-6 * x.norm()).all()):
            raise FloatingPointError("the one-sided constraint's projection left the cone (NNLS inaccurate)")
        return projected.to(vector.device, vector.dtype)


def constrain(projector: torch.Tensor | HalfSpaces, vector: torch.Tensor) -> torch.Tensor:
    """``vector`` kept inside the target vector's constraint: a subspace (projector matrix) or a cone."""
    return projector(vector) if isinstance(projector, HalfSpaces) else projector.to(vector) @ vector


@dataclass
class TargetSettings:
    """Optimizer settings for the target residual (shared by MEMIT, AlphaEdit, DeltaEdit); their defaults
    live in :class:`~deltaedit.methods.base.MethodConfig`."""

    steps: int
    lr: float
    weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    stop_prob: float
    kl_position: str = "subject"
    search_dtype: str = "float32"
    project_moments: bool = False  # DeltaEdit's option: constrain Adam's first moment too, not only the vector


@dataclass
class TargetResult:
    delta: torch.Tensor  # (d_model,) float32
    z_init: torch.Tensor  # critical block output at the subject's last token, before the edit
    steps: int
    train_prob: float  # mean target probability over the training prompts at the last forward


@contextmanager
def frozen(model: nn.Module):
    """Disable parameter gradients so backward passes only compute what the target vector needs."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


KEY_AVERAGES = ("flat", "grouped")


class KeyRead(NamedTuple):
    """What one key-reading pass returns (float32, on each layer's device)."""

    keys: dict[int, torch.Tensor]  # layer -> context-averaged keys (d_ff x n), weighted by ``key_average``
    z: torch.Tensor | None  # the block output at z_layer on the bare prompt (d_model x n), if asked
    per_context: dict[int, torch.Tensor]  # layer -> keys of every prompt (d_ff x n*c, request-major, bare first)


def read_keys(
    model: nn.Module,
    parts: ModelParts,
    tokenizer,
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    layers: Sequence[int],
    z_layer: int | None = None,
    *,
    key_average: str,
) -> KeyRead:
    """Keys at ``layers`` and, if asked, the block output at ``z_layer`` on the plain prompt. One forward pass
    over all prompts, stopped after the highest layer read.

    ``key_average`` weighs the prompts (``contexts[0]`` is the bare prompt): "flat", one mean over all of them
    (ROME's compute_u); "grouped", the bare prompt one half and the prefixed prompts together the other half
    (MEMIT's compute_ks, which AlphaEdit and DeltaEdit reuse)."""
    if key_average not in KEY_AVERAGES:
        raise ValueError(f"key_average: use one of {KEY_AVERAGES}, not {key_average!r}")
    encoded = [encode(tokenizer, r.prompt, r.subject, prefix=c) for r in requests for c in contexts]
    batch = pad([e.ids for e in encoded], pad_id(tokenizer), input_device(model))
    subject = torch.tensor([e.subject_index for e in encoded], device=batch.input_ids.device)
    rows = torch.arange(len(encoded), device=subject.device)
    last = max([*layers, z_layer if z_layer is not None else -1])
    with (
        torch.no_grad(),
        capture_inputs({i: parts.out_projs[i] for i in layers}) as keys_in,
        capture_outputs({z_layer: parts.layers[z_layer]} if z_layer is not None else {}) as outs,
    ):
        run_until(model, parts.layers[last], **batch.inputs())
    n, c = len(requests), len(contexts)
    keys, per_context = {}, {}
    for i in layers:
        at_subject = keys_in[i][rows.to(keys_in[i].device), subject.to(keys_in[i].device)].float()
        per_prompt = at_subject.reshape(n, c, -1)
        if key_average == "grouped" and c > 1:
            keys[i] = (0.5 * per_prompt[:, 0] + 0.5 * per_prompt[:, 1:].mean(1)).T.contiguous()
        else:
            keys[i] = per_prompt.mean(1).T.contiguous()
        per_context[i] = at_subject.T.contiguous()
    z = None
    if z_layer is not None:
        h = outs[z_layer]
        plain = torch.arange(0, n * c, c, device=h.device)  # context 0 is the bare prompt
        z = h[plain, subject.to(h.device)[plain]].float().T.contiguous()
    return KeyRead(keys, z, per_context)


class _FullForward:
    """The straightforward forward pass of the target optimization: the whole batch, every layer, every step."""

    def __init__(self, model, batch, rows, cols, subject):
        self.model, self.inputs, self.rows, self.cols = model, batch.inputs(), rows, cols
        self.subject_cols = subject  # where the critical block's output gets the target vector

    def __call__(self) -> torch.Tensor:
        hidden = self.model.base_model(**self.inputs, use_cache=False).last_hidden_state
        return hidden[self.rows, self.cols]


class _SuffixForward:
    """The same computation with the part that cannot change computed once per edit.

    The target vector enters at the subject's last token, so with causal attention every earlier token's
    keys and values stay as they are at every step: they run once (a key-value cache) and each step runs
    only the tokens from the subject's last one on. Each row is split at its own subject position: the
    prefixes are right-padded and cached, the suffixes right-padded after them, with the gap masked out and
    explicit positions, so every real token sees exactly the tokens and positions it sees unsplit.
    The blocks up to the critical one do not depend on the target vector either: their output on the
    suffix is computed once too, and at each step those blocks hand it back instead of running.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[nn.Module],
        sequences: list[list[int]],
        subject: list[int],
        rows: torch.Tensor,
        cols: torch.Tensor,
        fill: int,
        device: torch.device,
    ):
        split = max(max(subject), 1)
        n = len(sequences)
        prefix_ids = torch.full((n, split), fill, dtype=torch.long)
        prefix_mask = torch.zeros((n, split), dtype=torch.long)
        for row, (seq, s) in enumerate(zip(sequences, subject, strict=True)):
            prefix_ids[row, :s] = torch.tensor(seq[:s], dtype=torch.long)
            prefix_mask[row, :s] = 1
        seen_mask = prefix_mask.clone()
        # A row whose prefix is empty attends its first (padding) slot to itself while the prefix runs, so no
        # attention row is fully masked (which can give NaN keys); the suffix never sees that slot.
        prefix_mask[prefix_mask.sum(1) == 0, 0] = 1
        suffix = pad([seq[s:] for seq, s in zip(sequences, subject, strict=True)], fill, device)
        starts = torch.tensor(subject, device=device)
        self.model = model
        with torch.no_grad():
            out = model.base_model(
                input_ids=prefix_ids.to(device),
                attention_mask=prefix_mask.to(device),
                position_ids=torch.arange(split, device=device).expand(n, split),
                use_cache=True,
            )
        self.cache = cache_of(out)
        self.inputs = {
            "input_ids": suffix.input_ids,
            "attention_mask": torch.cat([seen_mask.to(device), suffix.attention_mask], dim=1),
            "position_ids": starts[:, None] + torch.arange(suffix.input_ids.shape[1], device=device),
        }
        self.rows, self.cols = rows, cols - starts[rows]
        self.subject_cols = torch.zeros(n, dtype=torch.long, device=device)
        self.blocks = blocks
        with torch.no_grad(), capture_raw_output(blocks[-1]) as captured, stop_after(blocks[-1]), suppress(StopForward):
            self._run()
        self.block_output = captured[0]

    def _run(self):
        cache = copy.deepcopy(self.cache)  # each run appends its suffix to a fresh copy of the prefix
        base = self.model.base_model
        return base(**self.inputs, **with_cache(base, cache), use_cache=True).last_hidden_state

    def __call__(self) -> torch.Tensor:
        with replay_output(self.blocks, self.block_output):
            return self._run()[self.rows, self.cols]


class LowPrecisionCopies:
    """Copies of frozen weights in a lower precision, kept from one target search to the next.

    Why kept: the blocks above the critical one never change while editing, and casting them (and the
    unembedding) anew for every edit cost about 0.7 s of a 2.8 s edit here (the cast, and the page faults of
    fresh memory). A weight changed in place since its copy was made (its version counter moved, as
    ``copy_`` / ``add_`` do) or replaced is cast again; one changed through ``.data`` is not seen.
    Weights that accelerate loads at forward time are new tensors each time and run as they are.
    """

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._copies: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        held = self._copies.get(id(weight))
        if held is None or held[0] is not weight or held[1] != weight._version:
            held = (weight, weight._version, weight.detach().to(self.dtype))
            self._copies[id(weight)] = held
        return held[2]


class LowPrecisionMatmuls(TorchFunctionMode):
    """Run the matrix multiplies by the given weights in a lower precision: inputs cast down, outputs back up.

    The blocks above the critical one and the unembedding are frozen during the target search and are most
    of its work (matrix multiplies with a few rows); in bfloat16 a step runs about 1.5x faster on a CPU with
    bfloat16 instructions, while the weights stay as they are (``copies`` holds the low-precision ones) and
    everything else (the lower blocks, the loss, the target vector, the solves) keeps its precision.
    Catches ``F.linear`` (``nn.Linear``) and ``torch.addmm`` with the weight last (GPT-2's ``Conv1D``).
    """

    def __init__(self, weights: Iterable[torch.Tensor], copies: LowPrecisionCopies):
        super().__init__()
        self.copies = copies
        self.weights = {id(w): w for w in weights}

    def _low(self, weight) -> torch.Tensor | None:
        return self.copies(weight) if self.weights.get(id(weight)) is weight else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
            low = self._low(weight)
            if low is not None:
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                bias = None if bias is None else bias.to(low.dtype)
                return F.linear(x.to(low.dtype), low, bias).to(x.dtype)
        elif func is torch.addmm and len(args) == 3 and not kwargs:
            bias, x, weight = args
            low = self._low(weight)
            if low is not None:
                return torch.addmm(bias.to(low.dtype), x.to(low.dtype), low).to(x.dtype)
        return func(*args, **kwargs)


def search_precision(parts: ModelParts, layer: int, dtype_name: str, copies: LowPrecisionCopies | None = None):
    """The context the target search runs in: the frozen blocks above ``layer`` and the unembedding in
    ``dtype_name`` (nothing changes for the weights already in it, e.g. "float32" on a float32 model).
    ``copies`` keeps the cast weights for later searches (default: cast for this search only)."""
    dtype = parse_dtype(dtype_name)
    weights = [p for block in parts.layers[layer + 1 :] for p in block.parameters() if p.dim() == 2]
    weights = [w for w in [*weights, parts.unembed.weight] if w.dtype != dtype]
    if not weights:
        return nullcontext()
    if copies is None or copies.dtype != dtype:
        copies = LowPrecisionCopies(dtype)
    return LowPrecisionMatmuls(weights, copies)


def loss_positions(rewrites, essence, n_targets: int, kl_position: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every position the loss reads: each target token on each rewrite prompt (teacher
    forced), then the essence prompt's position for the KL term, where MEMIT / AlphaEdit read it: the subject's
    last token (``kl_position="subject"``), or its last token ("last")."""
    rows = torch.arange(len(rewrites), device=device).repeat_interleave(n_targets)
    starts = torch.tensor([len(e.ids) - 1 for e in rewrites], device=device).repeat_interleave(n_targets)
    cols = starts + torch.arange(n_targets, device=device).repeat(len(rewrites))
    kl_col = essence.subject_index if kl_position == "subject" else len(essence.ids) - 1
    rows = torch.cat([rows, torch.tensor([len(rewrites)], device=device)])
    cols = torch.cat([cols, torch.tensor([kl_col], device=device)])
    return rows, cols


def optimize_target(
    model: nn.Module,
    parts: ModelParts,
    tokenizer,
    request: EditRequest,
    contexts: Sequence[str],
    layer: int,
    settings: TargetSettings,
    projector: torch.Tensor | HalfSpaces | None = None,
    reuse_prefix: bool = True,
    low_precision: LowPrecisionCopies | None = None,
) -> TargetResult:
    """Find ``delta`` so that adding it at ``layer``'s output makes the model say ``target_new``.

    ``reuse_prefix`` runs the tokens before the subject's last one once per edit instead of at every step
    (same result up to float rounding; False is the straightforward path, kept to check against).
    ``low_precision`` keeps the weights cast for ``settings.search_dtype`` from one search to the next.
    """
    device = input_device(model)
    t_ids = target_ids(tokenizer, request)
    rewrites = [encode(tokenizer, request.prompt, request.subject, prefix=c) for c in contexts]
    essence = encode(tokenizer, ESSENCE_PROMPT, request.subject)
    sequences = [e.ids + t_ids[:-1] for e in rewrites] + [essence.ids]
    subject_index = [e.subject_index for e in rewrites] + [essence.subject_index]

    n_t = len(t_ids)
    rows, cols = loss_positions(rewrites, essence, n_t, settings.kl_position, device)
    labels = torch.tensor(t_ids, device=device).repeat(len(rewrites))

    precision = search_precision(parts, layer, settings.search_dtype, low_precision)
    with precision:
        if reuse_prefix:
            blocks = parts.layers[: layer + 1]
            forward = _SuffixForward(model, blocks, sequences, subject_index, rows, cols, pad_id(tokenizer), device)
        else:
            batch = pad(sequences, pad_id(tokenizer), device)
            forward = _FullForward(model, batch, rows, cols, torch.tensor(subject_index, device=device))

    block = parts.layers[layer]
    block_device = parts.out_projs[layer].weight.device
    delta = torch.zeros(parts.d_model, device=block_device, requires_grad=True)
    all_rows = torch.arange(len(sequences), device=block_device)
    subject_b = forward.subject_cols.to(block_device)
    z_init: list[torch.Tensor] = []

    def add_delta(hidden: torch.Tensor) -> torch.Tensor:
        if not z_init:
            z_init.append(hidden[0, subject_b[0]].detach().float().clone())
        hidden = hidden.clone()
        hidden[all_rows, subject_b] = hidden[all_rows, subject_b] + delta.to(hidden.dtype)
        return hidden

    optimizer = torch.optim.Adam([delta], lr=settings.lr)
    if isinstance(projector, torch.Tensor):
        projector = projector.to(block_device, torch.float32)
    kl_init = None
    steps, prob = 0, 0.0
    with frozen(model), edit_output(block, add_delta), torch.enable_grad(), precision:
        for step in range(settings.steps + 1):
            logits = final_logits(model, parts, forward()).float()
            log_probs = F.log_softmax(logits, dim=-1)
            token_lp = log_probs[:-1].gather(1, labels[:, None]).squeeze(1).reshape(len(rewrites), n_t)
            nll_each = -token_lp.mean(1)
            essence_lp = log_probs[-1:]
            if kl_init is None:
                kl_init = essence_lp.detach()
            kl = F.kl_div(kl_init, essence_lp, log_target=True, reduction="batchmean")
            decay = delta.norm() / z_init[0].norm() ** 2
            loss = nll_each.mean() + settings.kl_factor * kl + settings.weight_decay * decay
            prob = torch.exp(-nll_each).mean().item()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"target optimization for {request.subject!r} diverged (loss {loss})")
            if prob >= settings.stop_prob or step == settings.steps:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            with torch.no_grad():
                if projector is not None:
                    delta.copy_(constrain(projector, delta))
                    if settings.project_moments:
                        state = optimizer.state[delta]
                        state["exp_avg"].copy_(constrain(projector, state["exp_avg"]))
                max_norm = settings.clamp_norm_factor * z_init[0].norm()
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    return TargetResult(delta.detach().clone(), z_init[0], steps, prob)
