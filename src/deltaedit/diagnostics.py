"""Superimposed-noise diagnostics of DESIGN.md §3 (paper §3.3, §4.1), read off an :class:`~deltaedit.Editor`.

At a checkpoint after T edits, for every edited layer l (the paper plots the critical one, the last):

* ``noise_E``: mean over edited requests e of ``||(W_T - W_0) k_e||² - ||Delta_e k_e||²`` (eq. 12-13), with
  ``k_e`` the key stored when e was made (not re-read from today's model) and ``W_T - W_0`` the total update
  of the layer as it now stands (``editor.weight_delta``), which includes ``Delta_e`` itself; zero when the
  edits do not interfere. ``self_E`` is the mean of the subtracted ``||Delta_e k_e||²``, for scale.
* ``ktb`` / ``ktb_abs``: signed and absolute mean of ``k_i^T beta_j`` over pairs of requests from different
  edits (eq. 15, normalized by the number of pairs, T(T-1) with one request per edit): how strongly one
  edit's activation vector fires on another edit's key. ``beta_j`` is the right factor of the layer update
  (``Delta = alpha beta^T`` with ``alpha`` the residual, eq. 9).
* ``delta_norm``: Frobenius norm of the total update ``W_T - W_0`` (DeltaEdit's Delta_hist at the critical layer).
* ``cond`` / ``cond_original``: condition number (largest / smallest singular value, float32) of the edited
  and of the original ``W_out``; PRUNE's argument is that editing inflates it.

plus the share of edits whose DeltaEdit decision turned the orthogonal constraint on.

:func:`erosion` splits, per edit in force, how much later edits have moved what the edited layers output at its
subject: through its key as stored (the superimposed noise above) or by moving the key itself (edits of the
layers below). It reads every edit's keys again, so it runs a forward pass per edit; it is not part of a
checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .models import out_weight
from .target import read_keys

CHUNK = 1024  # key columns per matrix product, to bound memory on large models


def _finite(value: float | torch.Tensor | None) -> float | None:
    """A JSON-safe float: NaN and infinities become None."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def condition_number(weight: torch.Tensor) -> float | None:
    """Largest over smallest singular value in float32; None when the matrix is singular."""
    values = torch.linalg.svdvals(weight.detach().float())
    smallest = values.min().item()
    return _finite(values.max().item() / smallest) if smallest > 0 else None


def _row_major(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float32 copy with row-major strides. A live edit's d_ff x 1 factors can be views with stride (1, d_ff)
    while the ledger's copies have (1, 1): both count as contiguous, yet matmul picks its kernel by the strides
    and the dot products round differently (~1e-7 relative). Copies make a resumed run's diagnostics bitwise
    those of an uninterrupted one."""
    return torch.empty(tensor.shape, dtype=torch.float32, device=device).copy_(tensor)


def layer_diagnostics(
    editor, layer: int, condition: bool = True, key_space: bool = True
) -> dict[str, float | int | None]:
    """The §3 statistics of one edited layer (see the module docstring)."""
    delta = editor.weight_delta(layer)
    device = delta.device
    keys, rights, key_owner, right_owner, self_terms = [], [], [], [], []
    for index, applied in enumerate(editor.applied):
        update = applied.updates.get(layer)
        if update is None or getattr(update, "keys", None) is None:  # an edit that did not touch this layer
            continue
        k = _row_major(update.keys, device)
        if update.kind == "lowrank":
            left, right = _row_major(update.left, device), _row_major(update.right, device)
            self_terms.append(((left @ (right.T @ k)) ** 2).sum(0))  # ||Delta_e k||² per request
            rights.append(right)
            right_owner += [index] * right.shape[1]
        else:  # k^T beta needs activation vectors: dense and sparse updates have none
            if layer not in applied.self_terms:
                applied.self_terms[layer] = (update.response(k) ** 2).sum(0)
            self_terms.append(applied.self_terms[layer])
        keys.append(k)
        key_owner += [index] * k.shape[1]

    out: dict[str, float | int | None] = {
        "n_requests": len(key_owner),
        "noise_E": None,
        "self_E": None,
        "ktb": None,
        "ktb_abs": None,
        "delta_norm": _finite(delta.norm()),
    }
    if keys:
        all_keys = torch.cat(keys, 1)
        self_sq = torch.cat(self_terms).double()
        total_sq = torch.cat([((delta @ chunk) ** 2).sum(0) for chunk in all_keys.split(CHUNK, 1)]).double()
        out["noise_E"] = _finite((total_sq - self_sq).mean())
        out["self_E"] = _finite(self_sq.mean())
        if rights:
            out.update(_wrong_activation(all_keys, torch.cat(rights, 1), key_owner, right_owner))
    if condition:
        out["cond"] = condition_number(out_weight(editor.parts.out_projs[layer]))
        out["cond_original"] = condition_number(editor.original_weights[layer])
    if key_space:
        out.update(editor.method.key_space(layer) or {})
    return out


def _wrong_activation(keys: torch.Tensor, betas: torch.Tensor, key_owner: list[int], beta_owner: list[int]):
    """Signed and absolute mean of k_i^T beta_j over (key, beta) pairs belonging to different edits."""
    device = keys.device
    beta_edit = torch.tensor(beta_owner, device=device)
    key_edit = torch.tensor(key_owner, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    total_abs = torch.zeros((), dtype=torch.float64, device=device)
    pairs = 0
    for start in range(0, keys.shape[1], CHUNK):
        block = keys[:, start : start + CHUNK].T @ betas  # (chunk, n_betas)
        other = key_edit[start : start + CHUNK, None] != beta_edit[None, :]
        values = block[other].double()
        total += values.sum()
        total_abs += values.abs().sum()
        pairs += int(other.sum())
    if pairs == 0:
        return {"ktb": None, "ktb_abs": None}
    return {"ktb": _finite(total / pairs), "ktb_abs": _finite(total_abs / pairs)}


@torch.no_grad()
def diagnose(
    editor, layers: Sequence[int] | None = None, condition: bool = True, key_space: bool = True
) -> dict[str, Any]:
    """JSON-ready diagnostics of the edits the editor holds now: per layer (keys are layer indices as
    strings) and, at the top level, the critical layer's values and DeltaEdit's trigger statistics.

    ``condition=False`` skips the two SVDs per layer and ``key_space=False`` the eigenvalues of a null-space
    method's d_ff x d_ff key moment: the costly parts on large models.
    """
    config = editor.config
    layers = list(config.layers if layers is None else layers)
    critical = config.critical_layer
    if critical not in layers:
        layers.append(critical)
    per_layer = {str(layer): layer_diagnostics(editor, layer, condition, key_space) for layer in layers}
    decisions = [applied.decision for applied in editor.applied]
    triggered = [d for d in decisions if d.triggered]
    out: dict[str, Any] = {
        "n_edits": len(decisions),
        "n_requests": sum(len(applied.requests) for applied in editor.applied),
        "critical_layer": critical,
        "triggered": len(triggered),
        "triggered_share": len(triggered) / len(decisions) if decisions else None,
        "removed_rank_mean": (sum(d.metrics.get("rank", 0) for d in triggered) / len(triggered) if triggered else None),
    }
    at_critical = per_layer[str(critical)]
    for name in ("noise_E", "self_E", "ktb", "ktb_abs", "delta_norm", "cond"):
        out[name] = at_critical.get(name)
    out.update({name: value for name, value in at_critical.items() if name.endswith("_key_dims")})
    out["layers"] = per_layer
    return out


def full_key_spaces(diagnostics: dict[str, Any]) -> str | None:
    """A warning when the edits in force span every free key direction of an edited layer (from
    :func:`diagnose`); None while there is room."""
    full = [
        f"layer {layer} ({values['free_key_dims']})"
        for layer, values in diagnostics["layers"].items()
        if "spanned_key_dims" in values and values["spanned_key_dims"] >= values["free_key_dims"]
    ]
    if not full:
        return None
    return (
        f"after {diagnostics['n_edits']} edits the edits in force span every free key direction of "
        + ", ".join(full)
        + ": each new edit's key is a combination of earlier ones, so writing it moves their outputs and edits "
        "erode faster from here on (docs/results.md, 'The defaults to 3000 edits')"
    )


@torch.no_grad()
def erosion(editor, batch_size: int = 16) -> dict[str, Any]:
    """Why edits stop holding: for every request of every edit e in force, the change of the edited layers'
    summed MLP output at e's subject since e was made, split three ways (vectors of d_model, summed over the
    edited layers, then reduced to numbers):

    * ``own``: ``(W_e - W_{e-1}) k_e``, what e itself wrote (W_e: the layer with the edits in force up to e);
    * ``later``: ``(W_now - W_e) k_e``, later edits' response to e's key as stored: the superimposed noise
      DeltaEdit's constraint acts on;
    * ``drift``: ``W_now (k_now - k_e)``, e's key itself has moved because later edits changed the layers
      below (zero at the lowest edited layer). Not counted: changes reaching the subject through attention.

    Per request: the three norms and the share of ``own`` each of the others cancels, ``-<x, own> / |own|^2``
    (1.0: the edit's own write undone along its direction). Per layer: the three norms. Every list is in the
    order of ``editor.applied``, with ``edit_id`` and ``case_id`` to match them to evaluated records.
    """
    applied = list(editor.applied)
    requests = [request for edit in applied for request in edit.requests]
    layers = sorted({layer for edit in applied for layer, update in edit.updates.items() if update.keys is not None})
    now: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    average = getattr(editor.config, "key_average", "flat")  # the keys the edits were made with
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        read = read_keys(
            editor.model, editor.parts, editor.tokenizer, batch, editor.contexts, layers, key_average=average
        )
        for layer in layers:
            now[layer].append(read.keys[layer])
    d_model = editor.parts.d_model
    total = {name: torch.zeros(d_model, len(requests), dtype=torch.float64) for name in ("own", "later", "drift")}
    per_layer: dict[str, dict[str, list[float]]] = {}
    for layer in layers:
        weight_now = out_weight(editor.parts.out_projs[layer]).detach().float()
        keys_now = torch.cat(now[layer], 1).to(weight_now.device)
        original = editor.original_weights[layer].to(weight_now.device).float()
        before, in_force, column = original, [], 0
        parts = {name: torch.zeros(d_model, len(requests), dtype=torch.float64) for name in total}
        for edit in applied:
            update, n = edit.updates.get(layer), len(edit.requests)
            if update is not None:
                in_force.append(update)
                after = (
                    before + update.dense(weight_now.device).float()
                    if editor.method.composes_by_sum
                    else editor.method.compose(layer, editor.original_weights[layer], in_force).float()
                )
                keys = _row_major(update.keys, weight_now.device)
                moved = keys_now[:, column : column + n] - keys
                for name, value in (
                    ("own", (after - before) @ keys),
                    ("later", (weight_now - after) @ keys),
                    ("drift", weight_now @ moved),
                ):
                    parts[name][:, column : column + n] = value.double().cpu()
                before = after
            column += n
        per_layer[str(layer)] = {f"{name}_norm": value.norm(dim=0).tolist() for name, value in parts.items()}
        for name, value in parts.items():
            total[name] += value
    own_sq = (total["own"] ** 2).sum(0)
    out: dict[str, Any] = {
        "edit_id": [edit.edit_id for edit in applied for _ in edit.requests],
        "case_id": [request.case_id for request in requests],
        **{f"{name}_norm": value.norm(dim=0).tolist() for name, value in total.items()},
    }
    for name in ("later", "drift"):
        cancel = -(total[name] * total["own"]).sum(0) / own_sq.clamp_min(1e-30)
        out[f"{name}_cancels"] = [_finite(value) for value in cancel.tolist()]
    out["layers"] = per_layer
    return out


__all__ = ["diagnose", "layer_diagnostics", "condition_number", "erosion"]
