"""The edits file: every event of a run (edits with their tensors, undos) in one safetensors file, to share the
edits without the model (``Editor.save_edits``, ``Editor.from_edits``), and :func:`apply_edits`, which writes
them into a bare base model without an Editor.

The metadata holds the manifest (method, config, base fingerprint and the edited layers' sha256), the events
and a sha256 over every tensor; a file is verified whole before anything is applied.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .ledger import (
    FORMAT,
    FORMAT_VERSION,
    LedgerEntry,
    LedgerError,
    _dumps,
    active_edits,
    check_base_model,
    read_checked,
    write_checked,
)
from .models import find_parts, fingerprint, layer_digests, out_weight

EDITS_FORMAT = "deltaedit-edits"


def write_edits_file(
    path: str | os.PathLike,
    manifest: Mapping[str, Any],
    events: Iterable[tuple[dict[str, Any], dict[str, torch.Tensor]]],
) -> Path:
    """Write events (JSON record, tensors) into one safetensors file; tensors are keyed ``edit.<id>.<name>``.

    The metadata holds the manifest, the events and a sha256 over every tensor's name, dtype, shape and bytes.
    """
    path = Path(path).expanduser()
    records, tensors = [], {}
    for seq, (record, named) in enumerate(events):
        records.append({"seq": seq, **record})
        for name, tensor in named.items():
            tensors[f"edit.{record['edit_id']}.{name}"] = tensor
    fields = {
        "manifest": json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}, default=repr),
        "events": _dumps({"events": records}),
    }
    return write_checked(path, EDITS_FORMAT, tensors, fields)


def read_edits_file(path: str | os.PathLike) -> tuple[dict[str, Any], list[LedgerEntry]]:
    """The manifest and events of an edits file; every tensor is read and verified before this returns."""
    path = Path(path).expanduser()
    metadata, tensors = read_checked(path, "edits", EDITS_FORMAT)
    try:
        manifest = json.loads(metadata["manifest"])
        records = json.loads(metadata["events"])["events"]
    except (KeyError, ValueError) as err:
        raise LedgerError(f"corrupt metadata ({err})", path) from err
    entries = []
    for record in records:
        loader = None
        if record["kind"] == "edit":
            prefix = f"edit.{record['edit_id']}."
            own = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
            loader = (lambda own=own: dict(own)) if own else None
        entries.append(LedgerEntry(record["seq"], record["kind"], record, loader))
    return manifest, entries


def apply_edits(model, path: str | os.PathLike) -> list[int]:
    """Write the edits of an edits file (from ``Editor.save_edits``) into ``model``, weights only.

    Each edited layer becomes what the method composes from W0 and the edits in force (the plain sum in float32
    in the order they were made, or PRUNE's restraint of it), cast to the model's dtype: bit for bit the
    editor's weights for a float32 model. The base model and every tensor are checked first, so a wrong model
    or a corrupt file changes nothing. No method state is built; use ``Editor.from_edits`` to go on editing.
    Returns the ids of the edits in force.
    """
    from .methods import method_class

    manifest, entries = read_edits_file(path)
    check_base_model(manifest, fingerprint(model), path, layer_digests(model, manifest.get("base_layers") or {}))
    method_cls = method_class(manifest["method"])
    method = method_cls(method_cls.config_class.from_recorded(manifest["config"]))
    live = active_edits(entries)
    updates = [entry.updates() for entry in live]
    parts = find_parts(model)
    new = {}
    for layer in sorted({layer for u in updates for layer in u}):
        weight = out_weight(parts.out_projs[layer])
        in_force = [u[layer].to(weight.device) for u in updates if layer in u]
        new[layer] = method.compose(layer, weight.detach(), in_force).to(weight.dtype)
    with torch.no_grad():
        for layer, value in new.items():
            out_weight(parts.out_projs[layer]).copy_(value)
    return [entry.edit_id for entry in live]


__all__ = ["EDITS_FORMAT", "apply_edits", "read_edits_file", "write_edits_file"]
