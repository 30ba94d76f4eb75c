"""An edit as it stands in the model, and its record: written and read back in this one place.

The ledger (a run directory) and the edits file store the same record: the JSON fields of
:func:`edit_record` and the tensors of :func:`edit_tensors` (per edited layer the update's own tensors under
``layer.<i>.<name>``, its kind in ``update_kinds``, the critical layer's key, and the target vector z* the
updates were solved for). :func:`applied_from` is the
inverse.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .methods.base import Decision
from .requests import EditRequest
from .updates import Update, update_from_tensors


@dataclass
class EditResult:
    """What one edit did; ``target_prob`` is P(target_new | prompt) after the edit landed. ``triggered`` and
    ``metrics`` are the method's decision (DeltaEdit: whether the orthogonal constraint fired, its score,
    threshold and the directions it removed)."""

    edit_id: int
    requests: tuple[EditRequest, ...]
    steps: int
    target_prob: float
    success: bool  # target_new is now the greedy continuation of every request's prompt
    seconds: float
    triggered: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class AppliedEdit:
    """An edit as it stands in the model: enough to report, diagnose and take it back."""

    edit_id: int
    requests: tuple[EditRequest, ...]
    updates: dict[int, Update]
    decision: Decision
    critical_key: torch.Tensor | None  # k_e at the critical layer (d_ff x n); None for methods without keys
    self_response: float | None  # ||Delta_e k_e||^2 at the critical layer
    result: EditResult
    created: float = field(default_factory=time.time)
    # per layer ||Delta_e k||^2 of each request, for updates without factors (diagnostics computes it once:
    # neither the update nor its keys ever change, and a layer-sized update need not be read again)
    self_terms: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    # z* the updates were solved for (d_model x n; None for FT and for edits recorded before it was kept):
    # a later run of the same stream reuses it instead of searching again (deltaedit.targets_file)
    target: torch.Tensor | None = field(default=None, repr=False)


def edit_record(applied: AppliedEdit, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON fields of an applied edit (what an index line or edits-file event holds, minus its tensors)."""
    result = applied.result
    layers = sorted(applied.updates)
    return {
        "edit_id": applied.edit_id,
        "method": manifest["method"],
        "config_fingerprint": manifest["config_fingerprint"],
        "requests": [r.to_dict() for r in applied.requests],
        "layers": layers,
        "critical_layer": layers[-1],
        "update_kinds": {str(layer): applied.updates[layer].kind for layer in layers},
        "rank": applied.updates[layers[-1]].rank,
        "self_response": applied.self_response,
        "decision": {"triggered": applied.decision.triggered, "metrics": applied.decision.metrics},
        "result": {
            "steps": result.steps,
            "target_prob": result.target_prob,
            "success": result.success,
            "seconds": result.seconds,
        },
        "created": applied.created,
    }


def edit_tensors(applied: AppliedEdit) -> dict[str, torch.Tensor]:
    """The tensors of an applied edit, as stored: float32 CPU copies (a sparse mask stays uint8), no shared storage."""
    out = {}
    for layer, update in applied.updates.items():
        for name, tensor in update.tensors().items():
            out[f"layer.{layer}.{name}"] = tensor
    if applied.critical_key is not None:
        out["critical_key"] = applied.critical_key
    if applied.target is not None:
        out["target"] = applied.target
    return {
        name: t.detach().to("cpu", t.dtype if not t.is_floating_point() else torch.float32).contiguous().clone()
        for name, t in out.items()
    }


def updates_from(data: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[int, Update]:
    """Per edited layer the update of a stored edit (ValueError naming what is missing)."""
    kinds = data.get("update_kinds") or {}
    updates = {}
    for layer in data["layers"]:
        prefix = f"layer.{layer}."
        own = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
        updates[int(layer)] = update_from_tensors(kinds.get(str(layer), "lowrank"), own)
    return updates


def applied_from(
    data: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], device_of: Mapping[int, torch.device]
) -> AppliedEdit:
    """The AppliedEdit a stored record describes, its tensors on each layer's device."""
    updates = {layer: u.to(device_of[layer]) for layer, u in updates_from(data, tensors).items()}
    decision = Decision(data["decision"]["triggered"], dict(data["decision"].get("metrics") or {}))
    requests = tuple(EditRequest.from_dict(r) for r in data["requests"])
    recorded = data["result"]
    result = EditResult(
        edit_id=data["edit_id"],
        requests=requests,
        steps=recorded["steps"],
        target_prob=recorded["target_prob"],
        success=recorded["success"],
        seconds=recorded["seconds"],
        triggered=decision.triggered,
        metrics=decision.metrics,
    )
    critical = max(updates)
    key = getattr(updates[critical], "keys", None)
    response = data["self_response"]
    target = tensors.get("target")
    return AppliedEdit(
        data["edit_id"], requests, updates, decision, key, response, result, data["created"], target=target
    )
