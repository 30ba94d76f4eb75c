"""The edits file: every event of a run (edits with their tensors, undos) in one safetensors file, to share the
edits without the model (``Editor.save_edits``, ``Editor.from_edits``), and :func:`apply_edits`, which writes
them into a bare base model without an Editor.

The metadata holds the manifest (method, config, base fingerprint and the edited layers' sha256), the events
and a sha256 over every tensor; a file is verified whole before anything is applied.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from .ledger import (
    FORMAT,
    FORMAT_VERSION,
    LedgerEntry,
    LedgerError,
    _dumps,
    active_edits,
    check_base_model,
    check_format_version,
    write_atomic,
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


def write_checked(
    path: str | os.PathLike, file_format: str, tensors: dict[str, torch.Tensor], fields: Mapping[str, str]
) -> Path:
    """One safetensors file whose metadata holds ``file_format``, the format version, ``fields`` and a sha256
    over every tensor (what :func:`read_checked` verifies), written atomically."""
    path = Path(path).expanduser()
    metadata = {
        "format": file_format,
        "format_version": str(FORMAT_VERSION),
        **fields,
        "payload_sha256": _tensors_digest(tensors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save_bytes(tensors, metadata=metadata))
    return path


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


def read_checked(
    path: Path, kind: str, file_format: str, hint: str = ""
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a file from :func:`write_checked`, read whole: LedgerError naming the ``kind``
    of file if it cannot be read, is of another format or version, or fails its checksum."""
    try:
        payload = path.read_bytes()
    except OSError as err:
        raise LedgerError(f"cannot read the {kind} file ({err.strerror})", path) from err
    try:
        header_size = int.from_bytes(payload[:8], "little")
        metadata = json.loads(payload[8 : 8 + header_size]).get("__metadata__") or {}
        tensors = load_bytes(payload)
    except Exception as err:
        raise LedgerError(f"not a readable {kind} file ({err})", path) from err
    if metadata.get("format") != file_format:
        raise LedgerError(f"not a {file_format} file (format {metadata.get('format')!r}){hint}", path)
    check_format_version(int(metadata.get("format_version", 0)), path)
    if _tensors_digest(tensors) != metadata.get("payload_sha256"):
        raise LedgerError(f"checksum mismatch: the {kind} file is corrupt", path)
    return metadata, tensors


def _tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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


__all__ = ["EDITS_FORMAT", "apply_edits", "read_checked", "read_edits_file", "write_checked", "write_edits_file"]
