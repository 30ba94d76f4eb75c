"""A sequential-editing experiment: a stream of dataset records edited one after another into a run directory.

The run directory is the edit ledger (``manifest.json``, ``index.jsonl``: one JSON line per edit or rejected
record, ``edits/``) plus three files of its own:

* ``run.json``: what was asked (model, method, overrides, dataset, number of edits, seed) and the data folder
  used (``data_dir``), so ``--resume`` needs nothing but the directory;
* ``baseline.json``: what the unedited model predicted, the reference of specificity and of ``o^c``;
* ``metrics.json``: metrics and diagnostics at checkpoints (schema in docs/metrics.md).

A checkpoint is written before the next edit starts, so after a kill the ledger's last committed edit is
either a checkpoint already in ``metrics.json`` or not a checkpoint at all (or a checkpoint the resume
computes on the spot, from the same weights): a resumed run ends with the weights and metrics of an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .data import DATA_ENV, DataError, EditRecord, load_records
from .data import data_folder as given_data_folder
from .diagnostics import diagnose, full_key_spaces
from .editor import Editor
from .evaluate import Baseline, baseline, evaluate_records, summarize
from .health import HealthSettings, save_states
from .ledger import Ledger, LedgerEntry, LedgerError, contained, write_atomic
from .memory import peak_resident_mb, release_memory, resident_mb
from .models import cache_dir, load_model
from .predict import input_device
from .report import DEFAULT_POINTS, add_checkpoint, checkpoint_schedule, new_run_record, read_metrics, write_metrics
from .targets_file import RecordedTargets
from .tracking import TRACKERS, open_tracker

log = logging.getLogger(__name__)


class RunError(ValueError):
    """A run cannot start or continue as asked (existing directory, missing run.json, changed settings)."""


@dataclass
class RunSpec:
    """Everything that defines a run; stored as run.json."""

    model: str = "smollm2-135m"
    method: str = "deltaedit"
    dataset: str = "counterfact"
    n_edits: int = 100
    overrides: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    seed: int = 0
    on_error: str = "stop"
    checkpoints: tuple[int, ...] = DEFAULT_POINTS
    eval_batch_size: int = 32
    device: str | None = None
    dtype: str | None = None
    # Model health at every checkpoint (general capability, fluency, perplexity, representations; health.py),
    # with HealthSettings overrides in health_options.
    health: bool = False
    health_options: dict[str, Any] = field(default_factory=dict)
    tracker: str | None = None  # "tensorboard" or "wandb": per-edit figures and checkpoint metrics (tracking.py)
    chat: bool = False  # edit and evaluate every prompt through the tokenizer's chat template (chat.py)
    # The data folder the run used (absolute; None: none): datasets named by name and, when stats_corpus is
    # None, the Wikipedia text of the key statistics come from it. Filled in by run(), checked on resume.
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if self.n_edits < 1:
            raise RunError("n_edits: must be at least 1")
        if self.on_error not in ("stop", "skip"):
            raise RunError(f"on_error: use 'stop' or 'skip', not {self.on_error!r}")
        if self.tracker not in (None, *TRACKERS):
            raise RunError(f"tracker: use one of {TRACKERS}, not {self.tracker!r}")
        self.checkpoints = tuple(int(c) for c in self.checkpoints)

    @classmethod
    def load(cls, run_dir: Path) -> RunSpec:
        path = contained(run_dir, "run.json")
        if not path.is_file():
            raise RunError(f"{run_dir}: no run.json, so nothing to resume; start it without --resume")
        return cls(**json.loads(path.read_text()))


def _as_json(spec: RunSpec) -> Any:
    """The spec as run.json holds it (tuples become lists), to compare a given spec with the stored one."""
    return json.loads(json.dumps(asdict(spec)))


def _settings(spec: RunSpec) -> Any:
    """What a resume must not change, data folder aside (that one has its own check and error)."""
    data = _as_json(spec)
    data.pop("data_dir")
    return data


def data_folder(given: str | os.PathLike | None) -> str | None:
    """The data folder a run uses: ``given`` (``--data`` / ``data_dir=``), else $DELTAEDIT_DATA, as an absolute
    path (None: no data folder); the same precedence as dataset lookup and the key-statistics corpus."""
    folder = given_data_folder(given)
    return None if folder is None else str(Path(folder).expanduser().resolve())


def resume_data_dir(run_dir: str | os.PathLike, given: str | os.PathLike | None) -> str | None:
    """The data folder to continue the run in ``run_dir`` with: the one its run.json records.

    Why: which dataset file and which key-statistics corpus (Wikipedia under the folder, or generated text) a
    run uses depends on the folder; a resume with another one would replay and continue the edits on other
    statistics. ``given`` (``--data``, else $DELTAEDIT_DATA) may be left out, or must name the same folder;
    anything else raises ``RunError`` and changes nothing. A run.json from before the folder was recorded (no
    ``data_dir`` key), or a ledger without run.json, takes ``given`` as before.
    """
    run_dir = Path(run_dir)
    path = contained(run_dir, "run.json")
    stored = json.loads(path.read_text()) if path.is_file() else {}
    if "data_dir" not in stored:
        if stored:
            log.warning("%s does not record the run's data folder (an older run): not checked", path)
        return None if given is None else str(given)
    recorded, folder = stored["data_dir"], data_folder(given)
    source = "--data (data_dir=)" if given else f"${DATA_ENV}"
    if folder is None or folder == recorded:
        if recorded is not None and not Path(recorded).is_dir():
            raise RunError(
                f"--data: the run used the data folder {recorded}, which does not exist now; make it available "
                f'there, or if it moved, set "data_dir" in {path} to its new place'
            )
        return recorded
    if recorded is None:
        raise RunError(
            f'{source}: the run was started without a data folder ({path} has "data_dir": null), so its key '
            f"statistics did not come from {folder}; resume without --data and with {DATA_ENV} unset"
        )
    raise RunError(
        f'{source}: the run used the data folder {recorded} ({path} "data_dir"), not {folder}; another '
        f"folder can hold another dataset file and other key statistics. Resume with --data {recorded} or "
        f"without --data (it is reused; {DATA_ENV} must then be unset or name the same folder)"
    )


def open_base_model(run_dir: str | os.PathLike, device: str | None = None):
    """The unedited base model of the run in ``run_dir``, loaded as the run loaded it: the model run.json names
    (else the manifest's), in the manifest's dtype (another dtype has another fingerprint), on ``device`` or the
    run's own. Returns (model, tokenizer)."""
    import torch

    run_dir = Path(run_dir)
    manifest = Ledger(run_dir, create=False).require_manifest()
    run_file = contained(run_dir, "run.json")
    spec = json.loads(run_file.read_text()) if run_file.is_file() else {}
    dtype = getattr(torch, str(manifest.get("dtype")), None)
    dtype = dtype if isinstance(dtype, torch.dtype) else spec.get("dtype")
    name = spec.get("model") or manifest["model_name"]
    return load_model(name, device=device or spec.get("device"), dtype=dtype)


def machine() -> dict[str, Any]:
    """Where a checkpoint was computed. Float32 results are bit for bit only on the same processor kind, torch
    build and thread count (matrix kernels round by the instructions they pick), and a resumed run may have
    moved between machines, so each checkpoint says where it ran."""
    import platform

    import torch

    found: dict[str, str] = {}
    try:  # a virtual machine may hide the model name ("AMD EPYC"); family and model still tell generations apart
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                key, _, value = line.partition(":")
                found.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break  # the first processor is enough
    except OSError:
        pass
    cpu = found.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in found and "model" in found:
        cpu += f" (family {found['cpu family']}, model {found['model']})"
    return {
        "cpu": cpu,
        "kernels": torch.backends.cpu.get_cpu_capability(),  # the instruction set torch's kernels use
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _kind(layout: str) -> str:
    return "zsre" if layout == "zsre" else "counterfact"


def _handled(ledger: Ledger) -> list[LedgerEntry]:
    """The ledger's entries for dataset records, in stream order: exactly one per record handled, its ``edit``
    or its ``rejected`` line (the data-file rejections logged at the start name no request and stand for no
    record; ``undo`` / ``restore`` lines neither)."""
    return [e for e in ledger.entries() if e.kind == "edit" or (e.kind == "rejected" and e.data.get("requests"))]


def _check_stream(handled: list[LedgerEntry], records: list[EditRecord], dataset: str, run_dir: Path) -> None:
    """The first ``len(handled)`` records must be the ones the ledger handled, in order.

    Why position and not case_id: a file may repeat a case_id or leave it out (then it is the record's
    position, which can collide with another record's explicit id), and matching by id then skips or repeats
    records. Matching by position is only right for the same stream, so each entry's request is compared with
    the record at its place: a dataset changed since the run started is refused, naming the record's line.
    """
    if len(handled) > len(records):
        raise RunError(
            f"{dataset}: yields {len(records)} records but the run in {run_dir} already handled {len(handled)}; "
            "the dataset changed since the run started: restore it, or start the run again with --force"
        )
    for position, (entry, record) in enumerate(zip(handled, records, strict=False)):
        given = json.loads(json.dumps(record.request.to_dict()))
        logged = entry.data["requests"][0]
        logged = logged if isinstance(logged, dict) else {}
        if logged == given:
            continue
        field = next((key for key in given if logged.get(key) != given[key]), None)
        change = f"field {field!r} is {given[field]!r}, was {logged.get(field)!r}" if field else "other fields"
        where = f"record {position + 1}" + ("" if record.line is None else f" (line {record.line})")
        raise RunError(
            f"{record.source or dataset}: {where} is not the record the run handled at that place "
            f"(index.jsonl line {entry.seq + 1}: {change}); the dataset changed since the run started: "
            "restore it, or start the run again with --force"
        )


PER_RECORD_FILE = "per_record.json"


def stream_summary(
    records: list[EditRecord], made: list[bool], per_record: dict[str, list[float | None]], kind: str
) -> tuple[dict[str, float | int | None], list[dict[str, Any]]]:
    """Whether new edits fail or old edits erode: for each edit in force, whether it held when it was made (its
    target was the greedy answer right after the edit) and whether it holds now (efficacy: CounterFact's
    efficacy_top, zsRE's efficacy of 1, every answer token the argmax). Returns the counts and per-record rows.
    """
    if len(made) != len(records):
        raise RunError(f"{len(made)} edits in force for {len(records)} edited records; the run cannot be scored")
    name = "efficacy_top" if kind == "counterfact" else "efficacy"
    now = [value is not None and value >= 1.0 for value in per_record[name]]
    rows = [
        {"case_id": r.request.case_id, "held_when_made": m, "holds_now": h, **{k: v[i] for k, v in per_record.items()}}
        for i, (r, m, h) in enumerate(zip(records, made, now, strict=True))
    ]
    n = len(records)
    held_then = sum(made)
    kept = sum(m and h for m, h in zip(made, now, strict=True))
    return {
        "held_when_made": held_then / n if n else None,
        "holds_now": sum(now) / n if n else None,
        "kept_of_held": kept / held_then if held_then else None,
        "failed_when_made": n - held_then,
        "eroded": held_then - kept,
        "recovered": sum(h and not m for m, h in zip(made, now, strict=True)),
    }, rows


# What a run directory holds that deltaedit wrote: --force removes these and nothing else.
OWN_FILES = (
    "run.json",
    "baseline.json",
    "metrics.json",
    PER_RECORD_FILE,
    Ledger.MANIFEST,
    Ledger.INDEX,
    "health_baseline.json",
    "representations.safetensors",
)
OWN_FOLDERS = (Ledger.EDITS, "tensorboard", "wandb")


def _health(spec: RunSpec, run_dir: Path, editor: Editor, records: list[EditRecord]):
    """The health probe of a run and the unedited model's figures: measured once, before the first edit, and kept
    in the run directory (health_baseline.json, representations.safetensors) and in the cache (health/KEY)."""
    from .health import (
        BASELINE_FILE,
        HealthProbe,
        cache_baseline,
        load_baseline,
        load_cached_baseline,
        probed_layers,
        save_baseline,
    )

    try:
        settings = HealthSettings(**spec.health_options)
    except TypeError as err:
        raise RunError(f"health_options: {err}; options: {sorted(HealthSettings.__dataclass_fields__)}") from None
    layers = probed_layers(editor.config.critical_layer, editor.parts.n_layers)
    probe = HealthProbe(editor.tokenizer, spec.data_dir, layers, settings)
    if contained(run_dir, BASELINE_FILE).is_file():
        return probe, load_baseline(run_dir)
    if editor.applied:
        raise RunError(f"{run_dir}: {BASELINE_FILE} is missing but edits were made; start the run again with --force")
    # measuring it costs minutes of CPU; runs of the same model, settings and texts share one measurement
    key = probe.baseline_key(editor.base_fingerprint, input_device(editor.model), records)
    cached = cache_dir() / "health" / key
    base = load_cached_baseline(cached)
    if base is None:
        base = probe.baseline(editor.model, editor.parts, records)
        try:
            cache_baseline(base, cached, settings)
        except Exception as err:  # any failure: a cache that cannot be written only costs the next run the measurement
            log.warning("the health baseline was not cached in %s (%s); the next run measures it again", cached, err)
    save_baseline(base, run_dir, settings)
    return probe, base


def is_run_directory(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a deltaedit run: a run.json or a deltaedit ledger manifest."""
    if (run_dir / "run.json").is_file() and not (run_dir / "run.json").is_symlink():
        return True
    try:
        return Ledger(run_dir, create=False).manifest() is not None
    except LedgerError:
        return False


def remove_run_files(run_dir: Path) -> None:
    """Remove what deltaedit wrote in ``run_dir`` (OWN_FILES, edits/, its temporary files); anything else stays."""
    for name in OWN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in OWN_FOLDERS:
        folder = run_dir / name
        if folder.is_symlink():
            folder.unlink()
        elif folder.is_dir():
            shutil.rmtree(folder)
    for stray in [*run_dir.glob(".metrics.*.json"), *run_dir.glob(".*.tmp")]:
        stray.unlink(missing_ok=True)


def prepare_directory(run_dir: Path, force: bool) -> None:
    """A new run's directory: missing or empty, or with ``force`` a run directory whose run files go (other
    files in it stay). Anything else is refused untouched."""
    if run_dir.is_symlink():
        raise RunError(f"{run_dir}: a symbolic link; give the run directory itself")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir}: exists and is not a directory; give a directory for the run")
    others = [p for p in run_dir.iterdir() if p.name != Ledger.LOCK] if run_dir.is_dir() else []
    if not others:
        run_dir.mkdir(parents=True, exist_ok=True)
        return
    if not force:
        raise RunError(f"{run_dir} already holds a run; pass --resume to continue it or --force to replace it")
    if not is_run_directory(run_dir):
        raise RunError(
            f"{run_dir} is not empty and holds no deltaedit run (no run.json or ledger manifest); --force only "
            "replaces a run. Choose a new or empty directory"
        )
    remove_run_files(run_dir)


def run(
    run_dir: str | os.PathLike,
    spec: RunSpec | None = None,
    *,
    data_dir: str | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    model_and_tokenizer: tuple[Any, Any] | None = None,
    n_edits: int | None = None,
    targets: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run (or with ``resume`` continue) an experiment into ``run_dir``; returns the metrics.json document.

    ``model_and_tokenizer`` lets a caller pass an already loaded, *unedited* base model. ``n_edits`` with
    ``resume`` extends the run to that many records (at least its own): the stream's first records are the
    ones already edited, so the longer run is the one that would have been started with it. ``targets`` (a
    targets file of a run of the same stream, method and config) lets its edits skip the target search.
    """

    run_dir = Path(run_dir)
    if not resume and spec is None:
        raise RunError("spec: a new run needs a RunSpec")
    if n_edits is not None and not resume:
        raise RunError("n_edits: only extends a resumed run; a new run takes it from its RunSpec")
    extended = False
    if resume:
        stored = RunSpec.load(run_dir)
        if spec is not None and _settings(spec) != _settings(stored):
            raise RunError(f"{run_dir}: --resume continues the run as run.json describes it; drop the other options")
        if n_edits is not None and n_edits != stored.n_edits:
            if n_edits < stored.n_edits:
                raise RunError(
                    f"n_edits: the run in {run_dir} goes to {stored.n_edits} edits; a resume can extend it, "
                    f"not shorten it (its checkpoints up to {n_edits} are in metrics.json already)"
                )
            read = HealthSettings(**stored.health_options).baseline_records if stored.health else 0
            if stored.n_edits < read:
                raise RunError(
                    f"n_edits: a --health run is extended only from {read} edits on (its unedited generations "
                    f"are those of its first {read} records); start a new run of {n_edits}"
                )
            stored, extended = replace(stored, n_edits=n_edits), True
        given = data_dir if data_dir is not None else spec.data_dir if spec is not None else None
        spec = replace(stored, data_dir=resume_data_dir(run_dir, given))
    else:
        spec = replace(spec, data_dir=data_folder(data_dir if data_dir is not None else spec.data_dir))
    data_dir = spec.data_dir
    # everything that can refuse the run is checked before the directory is touched
    loaded = load_records(spec.dataset, data_dir, limit=spec.n_edits, on_error=spec.on_error)
    reused = RecordedTargets.read(targets) if targets is not None else None
    records, kind = loaded.records, _kind(loaded.layout)
    if spec.chat:
        from .chat import chat_records
        from .models import load_tokenizer

        records = chat_records(records, load_tokenizer(spec.model))
    ledger_has_entries = resume and (run_dir / Ledger.INDEX).is_file()
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(run_dir, create=False)
    ledger.lock()  # before --force removes anything or a resume reads on: not while another process writes
    try:
        handled = _handled(ledger) if ledger_has_entries else []
        if resume:
            _check_stream(handled, records, spec.dataset, run_dir)  # before the model is loaded or anything written
            if extended:
                _extend(run_dir, spec, len(records))
        else:
            prepare_directory(run_dir, force)
        document = _run_locked(run_dir, spec, ledger, loaded, records, kind, handled, resume, progress,
                               ledger_has_entries, model_and_tokenizer, reused)  # fmt: skip
    finally:
        ledger.close()
    return document


def _extend(run_dir: Path, spec: RunSpec, n_records: int) -> None:
    """Record a resume's longer stream: run.json and metrics.json name the new length before any edit of it."""
    write_atomic(contained(run_dir, "run.json"), json.dumps(asdict(spec), indent=2).encode())
    if contained(run_dir, "metrics.json").is_file():
        document = read_metrics(run_dir)
        document["run"]["n_edits"] = n_records
        write_metrics(run_dir, document)


def _extend_baseline(run_dir: Path, model, tokenizer, records: list[EditRecord], kind: str, batch_size: int) -> None:
    """A run extended to more records needs the unedited model's answers for the new ones: computed here, on the
    base model before the edits are replayed onto it, and added to baseline.json."""
    path = contained(run_dir, "baseline.json")
    if not path.is_file():
        return  # the run's own check says what to do
    unique = list(dict.fromkeys(records))
    known = len(json.loads(path.read_text())["entries"])
    if known >= len(unique):
        return
    from .models import find_parts

    base = Baseline.load(path, unique[:known])
    added = baseline(model, find_parts(model), tokenizer, unique[known:], kind, base.reference, batch_size)
    base.entries.update(added.entries)
    base.save(path)


def _run_locked(run_dir, spec, ledger, loaded, records, kind, handled, resume, progress, ledger_has_entries,
                model_and_tokenizer, reused=None) -> dict[str, Any]:  # fmt: skip
    """The run itself, its directory's writer lock held. A start that fails before its first edit removes what
    it wrote (no stub that would make a retry look like a run to resume)."""
    from tqdm.auto import tqdm

    data_dir = spec.data_dir
    starting = not resume
    try:
        if model_and_tokenizer is not None:
            model, tokenizer = model_and_tokenizer
        elif ledger_has_entries:
            model, tokenizer = open_base_model(run_dir)
        else:
            model, tokenizer = load_model(spec.model, device=spec.device, dtype=spec.dtype)
        if ledger_has_entries:
            _extend_baseline(run_dir, model, tokenizer, records, kind, spec.eval_batch_size)  # before the replay
            editor = Editor.resume(ledger, model, tokenizer, data_dir=data_dir, progress=progress)
        else:
            # a run stopped before its first ledger line continues with the method and config its manifest
            # recorded, not with today's defaults
            recorded = ledger.manifest() if resume else None
            settings = (
                Editor.settings_from(recorded)
                if recorded
                else {"method": spec.method, "config": {"seed": spec.seed, **spec.overrides}, "preset": spec.preset}
            )
            editor = Editor(model, tokenizer, **settings, data_dir=data_dir, progress=progress, ledger=ledger)
            if starting:
                write_atomic(contained(run_dir, "run.json"), json.dumps(asdict(spec), indent=2).encode())
            for error in loaded.rejected:
                editor.ledger.reject(
                    None,
                    str(error),
                    getattr(error, "field", None),
                    error=type(error).__name__,
                    source=str(getattr(error, "path", "") or ""),
                    line=getattr(error, "line", None),
                )
        if reused is not None:
            reused.check(editor.manifest())
            editor.recorded_targets = reused
    except BaseException:
        if starting:
            remove_run_files(run_dir)
        raise

    baseline_path = contained(run_dir, "baseline.json")
    if baseline_path.is_file():
        base = Baseline.load(baseline_path, records)
    else:  # the ledger is empty here: a kill before the first edit leaves no edits to have moved the model
        if editor.applied:
            raise RunError(f"{run_dir}: baseline.json is missing but edits were made; start the run again with --force")
        base = baseline(model, editor.parts, tokenizer, records, kind, batch_size=spec.eval_batch_size)
        base.save(baseline_path)
    probe, health_base = _health(spec, run_dir, editor, records) if spec.health else (None, None)

    metrics_path = contained(run_dir, "metrics.json")
    if metrics_path.is_file():
        document = read_metrics(run_dir)
    else:
        document = new_run_record(
            spec.method,
            spec.model,
            spec.dataset,
            len(records),
            spec.seed,
            editor.config.to_dict(),
            name=run_dir.name,
            kind=kind,
        )
    schedule = set(checkpoint_schedule(len(records), spec.checkpoints))
    in_force = {applied.edit_id for applied in editor.applied}
    edited = [r for r, e in zip(records, handled, strict=False) if e.kind == "edit" and e.edit_id in in_force]
    pending = records[len(handled) :]
    spent = sum(a.result.seconds for a in editor.applied)

    def checkpoint() -> None:
        n = len(edited)
        if n not in schedule or any(c["n_edits"] == n for c in document["checkpoints"]):
            return
        started = time.perf_counter()
        memory = {"resident_mb": resident_mb()}  # between edits, before the evaluation's temporaries
        per_record = evaluate_records(model, editor.parts, tokenizer, edited, base, kind, spec.eval_batch_size)
        values = summarize(per_record)
        made = [applied.result.success for applied in editor.applied]
        stream, rows = stream_summary(edited, made, per_record, kind)
        extra = {"eval_seconds": time.perf_counter() - started}
        if reused is not None:  # these edits' seconds leave out the search: say so beside the timings
            extra["recorded_targets_used"] = reused.used
        groups = {kind: values, "stream": stream}
        if probe is not None:
            health_started = time.perf_counter()
            now = probe.measure(model, editor.parts, edited)
            groups.update(probe.compare(now, health_base, edited))
            save_states(run_dir, now["states"], n)
            extra["health_seconds"] = time.perf_counter() - health_started
        memory["peak_resident_mb"] = peak_resident_mb()  # this process's worst so far, evaluation included
        extra.update({name: mb for name, mb in memory.items() if mb is not None})
        diagnostics = {**diagnose(editor), **extra}
        if warning := full_key_spaces(diagnostics):
            log.warning(warning)
        add_checkpoint(document, n, spent, groups, diagnostics)["machine"] = machine()
        tracker.log_checkpoint(n, {**groups, "diagnostics": {k: v for k, v in diagnostics.items() if k != "layers"}})
        write_atomic(contained(run_dir, PER_RECORD_FILE), json.dumps({"n_edits": n, "records": rows}).encode())
        write_metrics(run_dir, document)
        release_memory()  # the evaluation's logits are the largest temporaries of a run
        log.info("checkpoint %d: %s", n, ", ".join(f"{k} {v:.3f}" for k, v in values.items() if v is not None))

    editor.prepare()
    tracker = open_tracker(spec.tracker, run_dir, {"method": spec.method, **editor.config.to_dict()})
    try:
        if edited:
            checkpoint()  # a kill between the last edit and its checkpoint
        with tqdm(
            total=len(records),
            initial=len(records) - len(pending),
            desc=f"{spec.method} on {spec.dataset}",
            unit="edit",
            disable=not progress,
        ) as bar:  # closed on an error too
            for record in pending:
                results = editor.edit([record], on_error=spec.on_error)
                bar.update(1)
                if results:
                    edited.append(record)
                    result = results[0]
                    spent += result.seconds
                    figures = {"target_prob": result.target_prob, "steps": result.steps, "success": result.success}
                    figures.update(seconds=result.seconds, triggered=result.triggered, **result.metrics)
                    tracker.log_edit(len(edited), figures)
                    bar.set_postfix(ok=f"{result.success}", p=f"{result.target_prob:.2f}")
                    checkpoint()
        if len(edited) not in schedule:  # every record rejected after the last checkpoint: still end with one
            schedule.add(len(edited))
            checkpoint()
    finally:
        tracker.close()
    return document


__all__ = ["RunSpec", "RunError", "run", "DataError"]
