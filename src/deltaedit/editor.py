"""The Editor: owns a model, one method and its running state, and applies edits in sequence.

What every method shares lives here; what a method computes lives in the method (``deltaedit.methods``):

1. validate every request against the tokenizer (nothing is touched if one is bad);
2. ``method.compute(context, requests)``: the method reads the model and writes each layer's update through
   ``context.write``, which finalizes the update and writes the layer as the method composes it;
3. measure the edit, fold it into the method's running state (``commit``) and record it in the ledger.

Step 2 runs against a snapshot of the edited weights: any exception restores them, so an edit lands on all
its layers or on none. With a ledger (``Editor(..., ledger=dir)``) the edit is committed when its ledger line
is durable; if writing it fails, the weights and the method's state are rolled back.

The method's running state is a function of the recorded events (edits, undos, restores): replaying them
in order rebuilds it bit for bit. That is how a failed ledger write is rolled back, how ``Editor.resume``
continues a run and how ``from_edits`` / ``load_edits`` reload saved edits. ``undo`` recomputes each
edited layer from W0 and the remaining updates (``method.compose``), never by subtracting.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .applied import AppliedEdit, EditResult, applied_from, edit_record, edit_tensors
from .card import model_card
from .corpus import generated_texts, resolve_corpus
from .defaults import default_config
from .edits_file import read_edits_file, write_edits_file
from .ledger import Ledger, LedgerEntry, LedgerError, check_base_model, since_restore
from .memory import release_memory
from .methods import EditMethod, MethodConfig, method_class
from .methods.base import Computed, EditContext
from .models import find_parts, fingerprint, out_weight, weight_digest
from .predict import score_answers
from .requests import EditError, EditFailure, EditRequest, RequestError, check_tokenization
from .stats import second_moments
from .targets_file import RecordedTargets
from .updates import KINDS, Update

log = logging.getLogger(__name__)
CONTEXT_STARTS = ("The", "Therefore", "Because", "I", "You")


def _is_record(item: Any) -> bool:
    return isinstance(getattr(item, "request", None), EditRequest)  # an EditRecord from deltaedit.data


def _as_items(requests: Any) -> list[Any]:
    if isinstance(requests, EditRequest | dict) or _is_record(requests):
        requests = [requests]
    items = list(requests)
    if not items:
        raise RequestError("requests", "is empty; give at least one EditRequest")
    return items


def _to_request(item: Any) -> EditRequest:
    """An EditRequest from a request, an EditRecord or a dict of request fields (RequestError if it is none)."""
    if isinstance(item, EditRequest):
        return item
    if _is_record(item):
        return item.request
    if isinstance(item, dict):
        return EditRequest.from_dict(dict(item))
    raise RequestError("requests", f"holds a {type(item).__name__}; give EditRequests, EditRecords or dicts")


EXPORT_INFO = "deltaedit.json"
STAGING_PREFIX = "."


def check_own_export(target: Path) -> None:
    """Refuse to replace a directory that is not a deltaedit export, or that holds files its export did not
    write (they would be lost): --force replaces what deltaedit wrote and nothing else."""
    info_path = target / EXPORT_INFO
    try:
        written = set(json.loads(info_path.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise FileExistsError(
            f"{target}: is not a deltaedit export (no readable {EXPORT_INFO} listing its files); choose another "
            "directory, --force only replaces an export"
        ) from None
    others = sorted(p.name for p in target.iterdir() if p.name not in written)
    if others:
        raise FileExistsError(
            f"{target}: holds files the export did not write ({', '.join(others[:5])}); move them out or choose "
            "another directory"
        )


def remove_stale_staging(target: Path) -> None:
    """Remove the staging folders of exports to ``target`` whose process is gone (a killed export)."""
    for staging in target.parent.glob(f"{STAGING_PREFIX}{target.name}.partial-*"):
        pid = staging.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def swap_into_place(staging: Path, target: Path) -> None:
    """Make ``staging`` be ``target`` with no moment where neither exists: an atomic exchange where Linux offers
    one (renameat2 RENAME_EXCHANGE), else rename the old aside first; the old one ends up at ``staging``."""
    if not target.exists():
        os.replace(staging, target)
        return
    if _exchange(staging, target):
        return
    aside = staging.with_name(staging.name + ".old")
    os.replace(target, aside)
    os.replace(staging, target)
    os.replace(aside, staging)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where that is not available."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, bytes(a), at_fdcwd, bytes(b), rename_exchange)
    return result == 0


def _edit_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"edit_id: expected a whole number (an EditResult's edit_id), not {value!r}")
    return value


class Editor:
    """Sequentially edit ``model`` with one method.

    >>> model, tokenizer = load_model("smollm2-135m")
    >>> editor = Editor(model, tokenizer, method="deltaedit", ledger="runs/first")
    >>> editor.edit(EditRequest("The capital of {} is", "France", "Rome"))
    >>> editor.undo(0)  # or undo_to(edit_id); Editor.resume("runs/first", model, tokenizer) continues a run
    """

    def __init__(
        self,
        model,
        tokenizer,
        method: str = "deltaedit",
        config: MethodConfig | dict[str, Any] | None = None,
        data_dir: str | None = None,
        preset: str | None = None,
        progress: bool = True,
        stats_store=None,
        ledger: str | os.PathLike | Ledger | None = None,
        reuse_prefix: bool = True,
        trim_memory: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.reuse_prefix = reuse_prefix  # False: recompute everything at every optimizer step (for checking)
        self.trim_memory = trim_memory  # hand freed heap back to the system after each edit (see memory.py)
        self.parts = find_parts(model)
        method_cls = method_class(method)
        if isinstance(config, MethodConfig):
            if preset is not None:
                raise ValueError("preset: give a preset or a finished MethodConfig, not both")
            if not isinstance(config, method_cls.config_class):
                raise TypeError(f"config: a {type(config).__name__} does not configure {method_cls.name}")
            self.config = config
        else:
            self.config = default_config(model, method_cls, overrides=config or {}, preset=preset)
        bad = [i for i in self.config.layers if not 0 <= i < self.parts.n_layers]
        if bad:
            raise ValueError(f"layers: {bad} out of range for a model with {self.parts.n_layers} layers")
        offloaded = [i for i in self.config.layers if out_weight(self.parts.out_projs[i]).device.type == "meta"]
        if offloaded:
            raise ValueError(
                f"layers: the W_out of layers {offloaded} is offloaded (accelerate CPU/disk offload) and cannot be "
                "edited in place; keep the edited layers on a device in the device_map, offload others"
            )
        self.method: EditMethod = method_cls(self.config)
        self.data_dir = data_dir
        self.progress = progress
        self.stats_store = stats_store
        self.base_fingerprint = fingerprint(model)
        self.original_weights = {i: out_weight(self.parts.out_projs[i]).detach().clone() for i in self.config.layers}
        self.base_layers = {i: weight_digest(w) for i, w in self.original_weights.items()}  # exact base check
        self.applied: list[AppliedEdit] = []
        self.rejected: list[EditError] = []  # what edit() refused or failed on, oldest first
        # Since the last restore: ("edit", AppliedEdit) and ("undo", [AppliedEdit, ...]) in order. The method's
        # running state is a function of these, which is how it is rolled back and rebuilt exactly.
        self._events: list[tuple[str, Any]] = []
        self._next_id = 0
        self._prefixes: dict[tuple[int, int], list[str]] = {}
        self._ready = False
        self._weights_only = False  # Editor.resume(weights_only=True): weights replayed, no method state
        self.context = EditContext(
            model=model,
            parts=self.parts,
            tokenizer=tokenizer,
            reuse_prefix=reuse_prefix,
            write=self._write,
            base_weight=self.original_weights.__getitem__,
            key_statistics=self._key_statistics,
            prefixes=self._generated_prefixes,
            recorded_target=self._recorded_target,
        )
        # z* of an earlier run of the same stream (RecordedTargets): its edits skip the search, same results
        self.recorded_targets: RecordedTargets | None = None
        self.ledger: Ledger | None = None
        if ledger is not None:
            self._attach(ledger if isinstance(ledger, Ledger) else Ledger(ledger))

    def close(self) -> None:
        """Let go of the run directory's writer lock (another Editor or process may write it then)."""
        if self.ledger is not None:
            self.ledger.close()

    def __enter__(self) -> Editor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ services for the method
    def _generated_prefixes(self, count: int, length: int) -> list[str]:
        """The bare prompt plus ``count`` short generated prefixes (seeded), made once from the unedited model."""
        key = (count, length)
        if key not in self._prefixes:
            texts = (
                generated_texts(self.model, self.tokenizer, count, length, self.config.seed, CONTEXT_STARTS)
                if count
                else []
            )
            self._prefixes[key] = [""] + [t.replace("\n", " ").strip() + ". " for t in texts]
        return self._prefixes[key]

    def _recorded_target(self, requests) -> tuple[torch.Tensor, int] | None:
        if self.recorded_targets is None:
            return None
        return self.recorded_targets.get(self._next_id, requests)

    def use_targets(self, path: str | os.PathLike) -> RecordedTargets:
        """Reuse the target vectors of a targets file (``deltaedit export --targets-only``) for the edits it
        recorded: an edit whose id and requests match skips the optimizer and is bit for bit the recorded
        run's, at a fraction of the time. The file must come from the same method, config and base model."""
        recorded = RecordedTargets.read(path)
        recorded.check(self.manifest())
        self.recorded_targets = recorded
        return recorded

    @property
    def contexts(self) -> list[str]:
        """The prompt prefixes the method reads keys and targets over (the bare prompt first)."""
        return self.method.prefixes(self.context)

    def _key_statistics(self, layers, corpus_name, samples: int, max_length: int) -> dict[int, torch.Tensor]:
        corpus = resolve_corpus(corpus_name, self.data_dir)
        if corpus.generated:
            log.warning(
                "no text corpus found: key statistics come from text the model generates "
                "(set DELTAEDIT_DATA or stats_corpus for Wikipedia statistics)"
            )
        return second_moments(
            self.model,
            self.parts,
            self.tokenizer,
            layers,
            corpus,
            samples,
            max_length,
            self.base_fingerprint,
            seed=self.config.seed,
            progress=self.progress,
            store=self.stats_store,
        )

    def _write(self, layer: int, update: Update) -> Update:
        """``context.write``: finalize ``update`` (RECT's sparsification) and write it. Returns it as written."""
        weight = out_weight(self.parts.out_projs[layer])
        update = self.method.finalize_update(layer, update, weight.detach())
        self._put(layer, update)
        return update

    def _put(self, layer: int, update: Update) -> None:
        """Write layer ``layer`` as the method composes W0, the updates in force and ``update``: the one path of
        every live and every replayed edit. The plain sum adds the update in place; other compositions (PRUNE)
        recompute the layer from W0."""
        weight = out_weight(self.parts.out_projs[layer])
        if self.method.composes_by_sum:
            new = update.dense(weight.device).to(weight.dtype)
        else:
            in_force = [a.updates[layer] for a in self.applied if layer in a.updates]
            new = self.method.compose(layer, self.original_weights[layer], [*in_force, update]).to(weight.dtype)
        if not torch.isfinite(new).all():
            raise EditFailure(f"the update at layer {layer} is not finite in {weight.dtype}", None, "update")
        with torch.no_grad():
            if self.method.composes_by_sum:
                weight.add_(new)
            else:
                weight.copy_(new)

    # ------------------------------------------------------------------ setup
    def prepare(self) -> None:
        """Build the method's state (key statistics, projectors: computed or loaded once, on the first edit)."""
        if self._ready:
            return
        self.method.setup(self.context)
        self._ready = True

    def manifest(self) -> dict[str, Any]:
        """What a ledger or edits file records about this run, to continue it only on the same terms."""
        from . import __version__

        weight = out_weight(self.parts.out_projs[self.config.layers[0]])
        return {
            "method": self.method.name,
            "config": self.config.to_dict(),
            "config_fingerprint": self.config.fingerprint(),
            "base_fingerprint": self.base_fingerprint,
            "base_layers": {str(i): digest for i, digest in self.base_layers.items()},
            "model_name": str(getattr(self.model, "name_or_path", "") or ""),
            "model_type": getattr(self.model.config, "model_type", None),
            "dtype": str(weight.dtype).removeprefix("torch."),
            "d_model": self.parts.d_model,
            "d_ff": self.parts.d_ff,
            "deltaedit_version": __version__,
            "created": time.time(),
        }

    # ------------------------------------------------------------------ editing
    def validate(self, requests: Sequence[EditRequest]) -> None:
        """Raise RequestError (with ``.request`` set) for the first request this model cannot take."""
        from .models import context_length
        from .tokens import encode

        limit = context_length(self.model)
        prefixes = tuple(self.contexts) if limit is not None else ("",)
        for request in requests:
            try:
                check_tokenization(request, self.tokenizer, limit, prefixes)
                encode(self.tokenizer, request.prompt, request.subject)
            except RequestError as err:
                if err.request is None:
                    err.request = request
                raise

    def edit(
        self,
        requests: EditRequest | Iterable[EditRequest | dict],
        batch_size: int = 1,
        on_error: str = "stop",
    ) -> list[EditResult]:
        """Apply requests (EditRequests, EditRecords or dicts) in order, ``batch_size`` at a time.

        A request that cannot be applied changes nothing and is written to the ledger as rejected: bad input
        raises RequestError, a numerical fault EditFailure. ``on_error="stop"`` raises it; as every request
        is validated before any is applied, bad input stops the call before its first edit, while a
        numerical fault stops it after the edits before it. ``"skip"`` goes on with the next request; the
        errors are in ``self.rejected``. Returns the results of the edits that landed.
        """
        if on_error not in ("stop", "skip"):
            raise ValueError(f"on_error: use 'stop' or 'skip', not {on_error!r}")
        if batch_size < 1:
            raise ValueError("batch_size: must be >= 1")
        valid: list[tuple[EditRequest, Any]] = []
        for item in _as_items(requests):
            try:
                request = _to_request(item)
                self.validate([request])
            except RequestError as err:
                if err.request is None:
                    err.request = item
                self._reject(err, item)
                if on_error == "stop":
                    raise
                continue
            valid.append((request, item))
        results = []
        for begin in range(0, len(valid), batch_size):
            chunk = valid[begin : begin + batch_size]
            try:
                results.append(self._edit_batch([request for request, _ in chunk]))
            except EditFailure as err:
                self._reject(err, [item for _, item in chunk])
                if on_error == "stop":
                    raise
        return results

    def _reject(self, error: EditError, item: Any) -> None:
        self.rejected.append(error)
        log.warning("edit rejected: %s", error)
        if self.ledger is not None:
            self.ledger.reject(item, error.reason, error.field, error=type(error).__name__)

    def _edit_batch(self, requests: list[EditRequest]) -> EditResult:
        if self._weights_only:
            raise LedgerError("this editor replayed the weights only (weights_only=True); resume it fully to edit")
        self.prepare()
        started = time.perf_counter()
        layers = self.config.layers
        culprit = requests[0] if len(requests) == 1 else tuple(requests)
        snapshot = {i: out_weight(self.parts.out_projs[i]).detach().clone() for i in layers}
        state_touched = False
        try:
            try:
                computed = self.method.compute(self.context, requests)
            except EditFailure as err:
                if err.request is None:
                    err.request = culprit
                raise
            missing = [layer for layer in layers if layer not in computed.updates]
            if missing:
                raise EditFailure(f"{self.method.name} wrote no update for layers {missing}", culprit, "update")
            applied = self._measure(requests, computed, started)
            state_touched = True
            self.method.commit(computed.updates, computed.decision)
            entry = None if self.ledger is None else self.ledger.append(applied)  # the commit point
        except BaseException:
            with torch.no_grad():
                for i, saved in snapshot.items():
                    out_weight(self.parts.out_projs[i]).copy_(saved)
            if state_touched:
                self._rebuild_state()
            raise
        finally:
            del snapshot
            if self.trim_memory:
                release_memory()
        self.applied.append(applied)
        self._events.append(("edit", applied))
        self._next_id += 1
        if entry is not None:
            self._hold_in_file(applied, entry)
        return applied.result

    def _hold_in_file(self, applied: AppliedEdit, entry: LedgerEntry) -> None:
        """Let an edit's layer-sized tensors (FT's dense, RECT's sparse updates: 3.5-4 MB an edit on SmolLM2)
        be its ledger file's, mapped, instead of memory's, so a long run keeps only what is small. The edit is
        already recorded and tracked: if anything goes wrong here, its tensors simply stay in memory. Tensors on an
        accelerator stay where they are."""
        on_cpu = [getattr(u, name).device.type == "cpu" for u in applied.updates.values() for name in u.layer_sized]
        if not any(on_cpu):
            return
        try:
            stored = entry.tensors(mapped=True)
        except Exception as err:  # a saving of memory, never a reason to fail an edit that is already made
            log.warning("edit %d stays in memory: %s", applied.edit_id, err)
            return
        for layer, update in applied.updates.items():
            update.backed_by({name: stored[f"layer.{layer}.{name}"] for name in update.layer_sized})

    def _measure(self, requests, computed: Computed, started: float) -> AppliedEdit:
        """The edit as it landed: its result (scored with the new weights) and what diagnostics need."""
        scores = score_answers(
            self.model,
            self.parts,
            self.tokenizer,
            [r.text for r in requests],
            [r.target_new for r in requests],
        )
        critical = computed.updates[self.config.critical_layer]
        critical_key = getattr(critical, "keys", None)
        self_response = None if critical_key is None else float((critical.response(critical_key) ** 2).sum())
        decision = computed.decision
        result = EditResult(
            edit_id=self._next_id,
            requests=tuple(requests),
            steps=computed.steps,
            target_prob=sum(s.prob for s in scores) / len(scores),
            success=all(s.greedy for s in scores),
            seconds=time.perf_counter() - started,
            triggered=decision.triggered,
            metrics=decision.metrics,
        )
        return AppliedEdit(
            self._next_id,
            tuple(requests),
            computed.updates,
            decision,
            critical_key,
            self_response,
            result,
            target=None if computed.targets is None else computed.targets.detach().float().cpu().clone(),
        )

    # ------------------------------------------------------------------ undo
    def undo(self, edit_id: int) -> None:
        """Take one edit back out of the model and the method's sums; the edits after it stay as they are.

        Each edited layer becomes W0 + the remaining updates, summed in float32 in the order they were made
        and cast to the model's dtype (never a subtraction, so no rounding residue builds up). DeltaEdit's
        threshold statistics keep the edit: they are a running statistic of the stream the method saw.
        """
        self._undo([self._applied_edit(_edit_id(edit_id))], "undo")

    def undo_to(self, edit_id: int | None) -> list[int]:
        """Roll back to the point just after ``edit_id`` (``None``: before the first edit) by undoing every
        applied edit made after it, in one step. Returns the ids undone, newest last."""
        if edit_id is not None and not -1 <= _edit_id(edit_id) < self._next_id:
            raise ValueError(f"edit_id: no edit {edit_id} was made (ids run from 0 to {self._next_id - 1})")
        targets = [a for a in self.applied if edit_id is None or a.edit_id > edit_id]
        if targets:
            self._undo(targets, "undo_to")
        return [a.edit_id for a in targets]

    def _applied_edit(self, edit_id: int) -> AppliedEdit:
        for applied in self.applied:
            if applied.edit_id == edit_id:
                return applied
        live = [a.edit_id for a in self.applied]
        raise ValueError(
            f"edit_id: edit {edit_id} is not applied (applied now: {live[:20]}{' ...' if len(live) > 20 else ''})"
        )

    def _undo(self, targets: list[AppliedEdit], how: str) -> None:
        gone = {a.edit_id for a in targets}
        weights = self._weights_of([a for a in self.applied if a.edit_id not in gone])  # before anything changes
        if self.ledger is not None:
            self.ledger.record_undo([a.edit_id for a in targets], how)  # the commit point
        self._take_back(targets, weights)
        self._events.append(("undo", targets))

    def _weights_of(self, edits: Sequence[AppliedEdit]) -> dict[int, torch.Tensor]:
        """Each edited layer as the method composes W0 and the updates of ``edits`` (the plain sum: in float32,
        in order), in the model's dtype. For a float32 model this is bit for bit the weight the edits left when
        applied one after another."""
        out = {}
        for layer, base in self.original_weights.items():
            updates = [applied.updates[layer] for applied in edits if layer in applied.updates]
            out[layer] = self.method.compose(layer, base, updates).to(base.dtype)
        return out

    def _take_back(self, targets: list[AppliedEdit], weights: dict[int, torch.Tensor] | None = None) -> None:
        gone = {a.edit_id for a in targets}
        remaining = [a for a in self.applied if a.edit_id not in gone]
        weights = weights if weights is not None else self._weights_of(remaining)
        with torch.no_grad():
            for layer, value in weights.items():
                out_weight(self.parts.out_projs[layer]).copy_(value)
        if not self._weights_only:
            for applied in reversed(targets):
                self.method.revert(applied.updates)
        self.applied[:] = remaining

    # ------------------------------------------------------------------ state
    def weight_delta(self, layer: int) -> torch.Tensor:
        """The current total change of ``layer``'s W_out (d_model x d_ff, float32)."""
        return out_weight(self.parts.out_projs[layer]).detach().float() - self.original_weights[layer].float()

    def restore(self) -> None:
        """Put the original weights back and forget every edit and all running state."""
        if self.ledger is not None:
            self.ledger.record_restore()
        self._reset_to_base()
        self.method = type(self.method)(self.config)
        self._ready = False

    def _reset_to_base(self) -> None:
        with torch.no_grad():
            for i, saved in self.original_weights.items():
                out_weight(self.parts.out_projs[i]).copy_(saved)
        self.applied.clear()
        self._events.clear()
        self.method.reset()

    def _rebuild_state(self) -> None:
        """The method's running state from the events alone: the same commits and reverts, in order, from the
        state ``setup`` left, hence bit for bit what it was after the last event."""
        self.method.reset()
        for kind, payload in self._events:
            if kind == "edit":
                self.method.commit(payload.updates, payload.decision)
            else:
                for applied in reversed(payload):
                    self.method.revert(applied.updates)

    # ------------------------------------------------------------------ ledger, resume, export
    def _attach(self, ledger: Ledger) -> None:
        manifest = ledger.manifest()
        if manifest is None:
            if ledger.entries():
                raise LedgerError("has entries but no manifest.json; it cannot be continued", ledger.path)
            ledger.write_manifest(self.manifest())
        else:
            self._check_manifest(manifest, ledger.manifest_path)
            count = len(ledger.entries())
            if count:
                raise LedgerError(
                    f"already records a run ({count} entries): continue it with Editor.resume(path, model, "
                    "tokenizer), or give a new directory",
                    ledger.path,
                )
        self.ledger = ledger

    def _check_manifest(self, manifest: dict[str, Any], source) -> None:
        if manifest.get("method") != self.method.name or not self.config.matches(
            manifest.get("config") or {}, manifest.get("config_fingerprint")
        ):
            raise LedgerError(
                f"records method {manifest.get('method')!r} with config {manifest.get('config_fingerprint')}, but this "
                f"editor runs {self.method.name!r} with config {self.config.fingerprint()}; use Editor.resume / "
                "Editor.from_edits, which take both from the file",
                source,
            )
        check_base_model(manifest, self.base_fingerprint, source, self.base_layers)

    @staticmethod
    def settings_from(manifest: dict[str, Any]) -> dict[str, Any]:
        """``method`` and ``config`` as a manifest recorded them (options it lacks at what ran before them)."""
        method_cls = method_class(manifest["method"])
        return {"method": method_cls.name, "config": method_cls.config_class.from_recorded(manifest["config"])}

    @classmethod
    def resume(
        cls, path: str | os.PathLike | Ledger, model, tokenizer, weights_only: bool = False, **kwargs: Any
    ) -> Editor:
        """Continue the run recorded in ledger directory ``path``, on ``model``: its unedited base model.

        ``weights_only`` replays the weights and nothing of the method's running state: no key statistics are
        computed or read (so nothing a run directory names outside itself is read), which is all that
        exporting, undoing or generating needs; such an editor cannot make new edits.

        Method and config come from the manifest; ``kwargs`` go to ``Editor`` (data_dir, progress,
        stats_store). The recorded events since the last restore (edits and undos) are replayed in order:
        the same weight additions, commits and reverts, so weights, running state and the next edit ids are
        bit for bit those of the run that wrote the ledger, and editing on gives the results an
        uninterrupted run would have given. The ledger stays attached and new events are appended to it.
        Raises BaseModelMismatchError (model untouched) for another base model, LedgerError for a damaged ledger.
        """
        ledger = path if isinstance(path, Ledger) else Ledger(path, create=False)
        editor = cls(model, tokenizer, **cls.settings_from(ledger.require_manifest()), **kwargs)
        editor._weights_only = weights_only
        editor._resume_from(ledger)
        return editor

    def _resume_from(self, ledger: Ledger) -> None:
        manifest = ledger.require_manifest()
        if self.ledger is not None:
            raise LedgerError("this editor already writes a ledger; resume with a new Editor", ledger.path)
        self._check_manifest(manifest, ledger.manifest_path)
        entries = ledger.entries()
        ledger.check_complete(entries)
        self._replay(entries, ledger.path)
        self.ledger = ledger

    def save_edits(self, path: str | os.PathLike) -> Path:
        """Save the edits alone (per layer the update's own tensors and the keys: a few KB each for low-rank
        updates) to one safetensors file, with the base model's fingerprint, method and config.

        It holds the history since the last restore, undone edits and their undo included, because the
        running state depends on it; ``Editor.from_edits`` / ``load_edits`` replay it exactly and
        ``apply_edits`` writes the edits in force into a bare model."""
        manifest = {**self.manifest(), "next_edit_id": self._next_id}
        events = []
        for kind, payload in self._events:
            if kind == "edit":
                events.append(({"kind": "edit", **edit_record(payload, manifest)}, edit_tensors(payload)))
            else:
                events.append(({"kind": "undo", "edit_ids": [a.edit_id for a in payload]}, {}))
        return write_edits_file(path, manifest, events)

    @classmethod
    def from_edits(cls, path: str | os.PathLike, model, tokenizer, **kwargs: Any) -> Editor:
        """An editor on ``model`` (the unedited base) holding the edits saved by ``save_edits``, with the method
        and config they were made with and their running state, ready to edit on. ``kwargs`` go to Editor
        (a ``ledger=`` records the loaded edits in a new run directory)."""
        manifest, entries = read_edits_file(path)
        editor = cls(model, tokenizer, **cls.settings_from(manifest), **kwargs)
        editor._load(manifest, entries, path)
        return editor

    def load_edits(self, path: str | os.PathLike) -> list[int]:
        """Replay the edits saved by ``save_edits`` onto this editor, which must have made none: weights and
        running state become those of the saving editor. The base fingerprint (BaseModelMismatchError),
        method, config and every tensor are checked first, so a mismatch or a corrupt file changes nothing.
        Returns the ids of the edits in force."""
        manifest, entries = read_edits_file(path)
        self._load(manifest, entries, path)
        return [a.edit_id for a in self.applied]

    def _load(self, manifest: dict[str, Any], entries: list[LedgerEntry], source) -> None:
        self._check_manifest(manifest, source)
        self._replay(entries, source, record=self.ledger is not None)
        self._next_id = max(self._next_id, int(manifest.get("next_edit_id", 0)))

    def _replay(self, entries: Sequence[LedgerEntry], source, record: bool = False) -> None:
        """Re-run recorded events on the base weights. Every tensor is read and checked before the model is
        touched; if anything fails midway the editor goes back to the base model. With ``record`` the events
        are also appended to this editor's ledger, which then always matches the model."""
        if self.applied or self._events:
            raise LedgerError("recorded edits can only be replayed onto an editor that has made none", source)
        events = self._events_from(since_restore(entries), source)
        ids = [e.edit_id for e in entries if e.kind == "edit"]
        if not self._weights_only:
            _ = self.contexts  # generated from the base weights, as in the recorded run
            self.prepare()
        try:
            self._run(events)
        except BaseException:
            self._reset_to_base()
            raise
        self._next_id = max(self._next_id, max(ids, default=-1) + 1)
        if not record:
            return
        for done, (kind, payload) in enumerate(events):
            try:
                if kind == "edit":
                    self._hold_in_file(payload, self.ledger.append(payload))
                else:
                    self.ledger.record_undo([a.edit_id for a in payload], "undo")
            except BaseException:
                self._reset_to_base()  # back to what the ledger holds: the events before this one
                self._run(events[:done])
                raise

    def _events_from(self, entries: Sequence[LedgerEntry], source) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        made: dict[int, AppliedEdit] = {}
        for entry in entries:
            if entry.kind == "edit":
                made[entry.edit_id] = self._applied_from(entry, source)
                events.append(("edit", made[entry.edit_id]))
            else:
                missing = [i for i in entry.edit_ids if i not in made]
                if missing:
                    raise LedgerError(
                        f"entry {entry.seq} undoes edit {missing[0]}, which was not made before it", source
                    )
                events.append(("undo", [made[i] for i in entry.edit_ids]))
        return events

    def _applied_from(self, entry: LedgerEntry, source) -> AppliedEdit:
        data = entry.data
        if list(data["layers"]) != list(self.config.layers):
            raise LedgerError(
                f"edit {entry.edit_id} changed layers {data['layers']}, not {list(self.config.layers)}", source
            )
        devices = {layer: self.parts.out_projs[layer].weight.device for layer in self.config.layers}
        kinds = (data.get("update_kinds") or {}).values()
        # an edit with layer-sized tensors is read mapped (what applied_from leaves on the CPU stays mapped)
        mapped = any(KINDS[kind].layer_sized for kind in kinds if kind in KINDS)
        try:
            applied = applied_from(data, entry.tensors(mapped=mapped), devices)
        except ValueError as err:
            raise LedgerError(f"edit {entry.edit_id}: {err}", source) from err
        for layer, update in applied.updates.items():
            if update.matrix_shape != (self.parts.d_model, self.parts.d_ff):
                raise LedgerError(f"edit {entry.edit_id} has an update of the wrong shape at layer {layer}", source)
        return applied

    def _run(self, events: Sequence[tuple[str, Any]]) -> None:
        """Apply recorded events in memory, by the very operations the live edits and undos performed."""
        for kind, payload in events:
            if kind == "edit":
                for layer, update in payload.updates.items():
                    self._put(layer, update)
                if not self._weights_only:
                    self.method.commit(payload.updates, payload.decision)
                self.applied.append(payload)
            else:
                self._take_back(payload)
            self._events.append((kind, payload))

    def save_pretrained(
        self, directory: str | os.PathLike, overwrite: bool = False, metrics: dict[str, Any] | None = None
    ) -> Path:
        """Save the edited model and its tokenizer as an ordinary Hugging Face directory, which plain
        ``AutoModelForCausalLM.from_pretrained`` loads. ``deltaedit.json`` beside them names the base model,
        method, config, the edits in force and the files written; ``README.md`` is the model card (card.py), with
        ``metrics`` (a run's last metrics.json checkpoint) when given.

        It is written under a temporary name and swapped into place, so ``directory`` holds the old export or
        the new one at every moment. ``overwrite`` replaces only a deltaedit export holding nothing but the files
        its deltaedit.json lists; any other non-empty directory is refused. Staging folders left by a killed
        export are removed."""
        target = Path(directory).expanduser()
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            if not overwrite:
                raise FileExistsError(f"{target}: exists and is not empty; pass overwrite=True (--force) to replace it")
            check_own_export(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(target)
        staging = target.with_name(f"{STAGING_PREFIX}{target.name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            self.model.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)
            edits = [{"edit_id": a.edit_id, "requests": [r.to_dict() for r in a.requests]} for a in self.applied]
            manifest = self.manifest()
            (staging / "README.md").write_text(model_card(manifest, edits, metrics), encoding="utf-8")
            files = sorted(p.name for p in staging.iterdir()) + [EXPORT_INFO]
            info = {**manifest, "edits": edits, "files": files}
            (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=repr) + "\n")
            swap_into_place(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # the new export's staging, or the old export swapped out
        return target

    export_model = save_pretrained

    def push_to_hub(
        self,
        repo_id: str,
        token: str | None = None,
        private: bool = True,
        metrics: dict[str, Any] | None = None,
    ) -> str:
        """Upload the edited model, its tokenizer and its model card to the Hugging Face Hub (huggingface_hub).
        The Hub is asked first: offline, without a token or with a refused one, HubError is raised before anything
        is written. Returns the repository's URL."""
        import tempfile

        from .card import check_hub, push_folder

        check_hub(repo_id, token)
        with tempfile.TemporaryDirectory() as folder:
            exported = self.save_pretrained(Path(folder) / "model", metrics=metrics)
            return push_folder(exported, repo_id, token, private)
