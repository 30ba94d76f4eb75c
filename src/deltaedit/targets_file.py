"""The targets file: each edit's target vector z* and its optimizer steps, with the terms it was searched on.

The target search is nearly all of an edit's time (about 90% on SmolLM2); everything else an edit does (keys,
constraint, solves, writes) is recomputed from the model in a fraction of it. So an Editor that reuses a
recorded z* for the same edit of the same stream, method, config and base model (``Editor.use_targets``,
``deltaedit run --targets``) makes the recorded run's edits bit for bit on the same machine, several times
faster. At 2.3 kB an edit on SmolLM2 against the ledger's 73 kB, the file is what carries a long run to
another machine when the run directory cannot come along.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .ledger import LedgerEntry, LedgerError, _dumps, read_checked, write_checked
from .requests import EditRequest

log = logging.getLogger(__name__)
TARGETS_FORMAT = "deltaedit-targets"
# what z* depends on besides the model's state: the same values are required of an Editor that reuses it
SEARCHED_WITH = ("method", "config_fingerprint", "base_fingerprint", "dtype")


@dataclass(frozen=True)
class RecordedTarget:
    requests: tuple[EditRequest, ...]
    z_star: torch.Tensor  # d_model x n, float32
    steps: int


def write_targets_file(path: str | os.PathLike, manifest: Mapping[str, Any], entries: Iterable[LedgerEntry]) -> int:
    """Write the target vectors of the edit entries that recorded one (every edit made, undone ones included:
    ids are never reused) into one safetensors file; returns how many. ValueError if none did."""
    tensors, edits = {}, []
    for entry in entries:
        if entry.kind != "edit":
            continue
        target = entry.tensors().get("target")
        if target is None:
            continue
        tensors[f"edit.{entry.edit_id}"] = target
        edits.append(
            {"edit_id": entry.edit_id, "requests": entry.data["requests"], "steps": entry.data["result"]["steps"]}
        )
    if not edits:
        raise ValueError(
            "targets: no edit of this run recorded a target vector (FT searches none; ledgers written before "
            "targets were kept hold none)"
        )
    fields = {
        "searched_with": json.dumps({name: manifest.get(name) for name in SEARCHED_WITH}),
        "edits": _dumps({"edits": edits}),
    }
    write_checked(path, TARGETS_FORMAT, tensors, fields)
    return len(edits)


class RecordedTargets:
    """The z* of a targets file by edit id, read and verified whole; ``get`` hands one out only for the same
    requests, so a different stream falls back to the search instead of writing someone else's fact."""

    def __init__(self, searched_with: Mapping[str, Any], targets: Mapping[int, RecordedTarget], source: Path):
        self.searched_with = dict(searched_with)
        self.targets = dict(targets)
        self.source = source
        self.used = 0
        self._warned = False

    def __len__(self) -> int:
        return len(self.targets)

    @classmethod
    def read(cls, path: str | os.PathLike) -> RecordedTargets:
        path = Path(path).expanduser()
        hint = "; write one with `deltaedit export RUN --targets-only --out FILE`"
        metadata, tensors = read_checked(path, "targets", TARGETS_FORMAT, hint)
        try:
            searched_with = json.loads(metadata["searched_with"])
            edits = json.loads(metadata["edits"])["edits"]
            targets = {
                int(e["edit_id"]): RecordedTarget(
                    tuple(EditRequest.from_dict(r) for r in e["requests"]),
                    tensors[f"edit.{e['edit_id']}"],
                    int(e["steps"]),
                )
                for e in edits
            }
        except (KeyError, ValueError, TypeError) as err:
            raise LedgerError(f"corrupt metadata ({err})", path) from err
        return cls(searched_with, targets, path)

    def check(self, manifest: Mapping[str, Any]) -> None:
        """Raise ValueError unless this Editor's method, config, base model and dtype are the ones searched with."""
        for name in SEARCHED_WITH:
            if self.searched_with.get(name) != manifest.get(name):
                raise ValueError(
                    f"targets: {self.source} was searched with {name} {self.searched_with.get(name)!r}, this editor "
                    f"has {manifest.get(name)!r}; reuse targets only with the run's own method, config and base model"
                )

    def get(self, edit_id: int, requests: Sequence[EditRequest]) -> tuple[torch.Tensor, int] | None:
        """(z*, steps) recorded for edit ``edit_id`` if it was made of the same requests, else None."""
        recorded = self.targets.get(edit_id)
        if recorded is None:
            return None
        if recorded.requests != tuple(requests):
            if not self._warned:
                log.warning("edit %d of %s recorded other requests: searching targets anew", edit_id, self.source)
                self._warned = True
            return None
        self.used += 1
        return recorded.z_star, recorded.steps


__all__ = ["TARGETS_FORMAT", "RecordedTargets", "write_targets_file"]
