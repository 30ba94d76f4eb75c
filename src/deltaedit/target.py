"""Keys and target residuals: the two forward computations every locate-then-edit method shares.

* keys ``k`` (d_ff): the input of ``W_out`` at the subject's last token, averaged over the edit
  prompt preceded by a few short context prefixes;
* the target residual ``delta`` (d_model): a vector added to the critical block's output at the
  subject's last token, optimized so the model predicts ``target_new`` (NLL + KL on an "essence"
  prompt + weight decay, norm-clamped), optionally kept inside a subspace by a projector ``P``
  after every optimizer step (DeltaEdit's orthogonal constraint).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import capture_inputs, capture_outputs, edit_output, run_until
from .models import ModelParts
from .requests import EditRequest
from .tokens import encode, pad, pad_id, target_ids

ESSENCE_PROMPT = "{} is a"


@dataclass
class TargetSettings:
    """Optimizer settings for the target residual (shared by MEMIT, AlphaEdit, DeltaEdit)."""

    steps: int = 25
    lr: float = 0.5
    weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    stop_prob: float = 0.95


@dataclass
class TargetResult:
    delta: torch.Tensor  # (d_model,) float32
    z_init: torch.Tensor  # critical block output at the subject's last token, before the edit
    steps: int
    train_prob: float  # mean target probability over the training prompts at the last forward


def input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


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


def final_logits(model: nn.Module, parts: ModelParts, hidden: torch.Tensor) -> torch.Tensor:
    """Unembed final (already normed) hidden states, with the soft-capping some families apply."""
    logits = parts.unembed(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def logits_at(model: nn.Module, parts: ModelParts, inputs: dict, rows: torch.Tensor, cols: torch.Tensor):
    """Logits only at the (row, col) positions a loss or metric reads: the unembedding is the costliest
    matrix of a small model, so it is not applied to every position."""
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
    return final_logits(model, parts, hidden[rows, cols])


def read_keys(
    model: nn.Module,
    parts: ModelParts,
    tokenizer,
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    layers: Sequence[int],
    z_layer: int | None = None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Keys (d_ff x n, float32) at ``layers`` and, if asked, the block output at ``z_layer`` on the plain
    prompt (d_model x n). One forward pass over all prompts, stopped after the highest layer read."""
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
    keys = {}
    for i in layers:
        at_subject = keys_in[i][rows.to(keys_in[i].device), subject.to(keys_in[i].device)].float()
        keys[i] = at_subject.reshape(n, c, -1).mean(1).T.contiguous()
    z = None
    if z_layer is not None:
        h = outs[z_layer]
        plain = torch.arange(0, n * c, c, device=h.device)  # context 0 is the bare prompt
        z = h[plain, subject.to(h.device)[plain]].float().T.contiguous()
    return keys, z


def optimize_target(
    model: nn.Module,
    parts: ModelParts,
    tokenizer,
    request: EditRequest,
    contexts: Sequence[str],
    layer: int,
    settings: TargetSettings,
    projector: torch.Tensor | None = None,
    project_moments: bool = False,
) -> TargetResult:
    """Find ``delta`` so that adding it at ``layer``'s output makes the model say ``target_new``."""
    device = input_device(model)
    t_ids = target_ids(tokenizer, request)
    rewrites = [encode(tokenizer, request.prompt, request.subject, prefix=c) for c in contexts]
    essence = encode(tokenizer, ESSENCE_PROMPT, request.subject)
    batch = pad([e.ids + t_ids[:-1] for e in rewrites] + [essence.ids], pad_id(tokenizer), device)
    subject = torch.tensor([e.subject_index for e in rewrites] + [essence.subject_index], device=device)

    # Positions read by the loss: each target token on each rewrite prompt, then the essence prompt's end.
    n_t = len(t_ids)
    rows = torch.arange(len(rewrites), device=device).repeat_interleave(n_t)
    starts = torch.tensor([len(e.ids) - 1 for e in rewrites], device=device).repeat_interleave(n_t)
    cols = starts + torch.arange(n_t, device=device).repeat(len(rewrites))
    labels = torch.tensor(t_ids, device=device).repeat(len(rewrites))
    rows = torch.cat([rows, torch.tensor([len(rewrites)], device=device)])
    cols = torch.cat([cols, torch.tensor([len(essence.ids) - 1], device=device)])

    block = parts.layers[layer]
    block_device = parts.out_projs[layer].weight.device
    delta = torch.zeros(parts.d_model, device=block_device, requires_grad=True)
    all_rows = torch.arange(batch.input_ids.shape[0], device=block_device)
    subject_b = subject.to(block_device)
    z_init: list[torch.Tensor] = []

    def add_delta(hidden: torch.Tensor) -> torch.Tensor:
        if not z_init:
            z_init.append(hidden[0, subject_b[0]].detach().float().clone())
        hidden = hidden.clone()
        hidden[all_rows, subject_b] = hidden[all_rows, subject_b] + delta.to(hidden.dtype)
        return hidden

    optimizer = torch.optim.Adam([delta], lr=settings.lr)
    if projector is not None:
        projector = projector.to(block_device, torch.float32)
    kl_init = None
    steps, prob = 0, 0.0
    with frozen(model), edit_output(block, add_delta), torch.enable_grad():
        for step in range(settings.steps + 1):
            logits = logits_at(model, parts, batch.inputs(), rows, cols).float()
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
                    delta.copy_(projector @ delta)
                    if project_moments:
                        state = optimizer.state[delta]
                        state["exp_avg"].copy_(projector @ state["exp_avg"])
                max_norm = settings.clamp_norm_factor * z_init[0].norm()
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    return TargetResult(delta.detach().clone(), z_init[0], steps, prob)
