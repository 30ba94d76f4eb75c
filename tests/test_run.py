"""The experiment runner (``deltaedit.run``, ``deltaedit run``) end to end on a tiny Llama saved to disk: the run
directory (ledger, run.json, baseline.json, metrics.json), refusing and replacing existing runs, resume after
a kill (a real SIGKILL of ``deltaedit run`` in a subprocess, and a simulated kill between an edit and its
checkpoint) giving exactly the metrics and weights of an uninterrupted run, and ``--on-error`` stop / skip.

Conventions as in test_editor.py / test_ledger.py: subjects come last in their prompts, P0 = I
(``nullspace_threshold=1e9``), DeltaEdit with ``eta=0`` and a one-edit warm-up so that its orthogonal
constraint triggers and the threshold tracker is exercised by every replay. The helpers here are shared with
test_cli.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import corpus_paragraphs, fast_config, tiny_model

from deltaedit import Editor, Ledger
from deltaedit.cli import main
from deltaedit.data import DATA_ENV
from deltaedit.models import find_parts, load_model, out_weight
from deltaedit.report import write_report
from deltaedit.run import RunError, RunSpec, run

LAYERS = [0, 1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# (prompt, subject, target_new, target_true): every word is one token of the test vocabulary
FACTS = [
    ("The mother tongue of {}", "Danielle Darrieux", "German", "French"),
    ("The capital city of {}", "France", "Tokyo", "Paris"),
    ("The headquarters of {}", "Toyota", "Berlin", "Tokyo"),
    ("The mother tongue of {}", "Mozart", "English", "German"),
    ("The capital city of {}", "Canada", "Madrid", "Ottawa"),
    ("The capital city of {}", "Italy", "London", "Rome"),
    ("The headquarters of {}", "Apple", "Paris", "Canada"),
    ("The capital city of {}", "Japan", "Rome", "Tokyo"),
]
NEIGHBOURS = ["The capital city of Germany", "The mother tongue of Einstein", "The headquarters of Google"]


def record(index: int, prompt: str, subject: str, target_new: str, target_true: str | None = None) -> dict:
    """A user edit record with a paraphrase and two neighbourhood prompts, so every CounterFact metric exists."""
    return {
        "case_id": index,
        "prompt": prompt,
        "subject": subject,
        "target_new": target_new,
        "target_true": target_true,
        "paraphrase_prompts": [f"She lived in {subject}"],
        "neighborhood_prompts": [NEIGHBOURS[index % 3], NEIGHBOURS[(index + 1) % 3]],
    }


RECORDS = [record(i, *fact) for i, fact in enumerate(FACTS)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def overrides(corpus: Path, **changes) -> dict:
    """Method options that keep a tiny run fast and its edits successful."""
    return fast_config(corpus, **{"steps": 10, "eta": 0.0, "warmup": 1, **changes})


def set_args(options: dict) -> list[str]:
    """``--set NAME=VALUE`` for each option, written as a user would (``1e9``, ``[0, 1]``, ``0.0``)."""
    out = []
    for name, value in options.items():
        text = f"{value:g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, list) else value
        out += ["--set", f"{name}={text}"]
    return out


def make_assets(root: Path, tokenizer) -> SimpleNamespace:
    """A tiny Llama and its tokenizer saved as a model directory, an edit file and a stats corpus."""
    model_dir = root / "model"
    tiny_model("llama", n_layers=3, initializer_range=0.2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(corpus_paragraphs()) + "\n", encoding="utf-8")
    dataset = write_jsonl(root / "edits.jsonl", RECORDS)
    return SimpleNamespace(root=root, model=model_dir, corpus=corpus, dataset=dataset)


def run_args(assets, out: Path, n_edits: int, checkpoints="2,4", dataset=None, **changes) -> list[str]:
    """``deltaedit run`` arguments for a fast run on the tiny model."""
    args = ["run", "--model", str(assets.model), "--dataset", str(dataset or assets.dataset)]
    args += ["--n-edits", str(n_edits), "--out", str(out), "--checkpoints", checkpoints, "--device", "cpu"]
    return args + ["--quiet", *set_args(overrides(assets.corpus, **changes))]


def make_spec(assets, n_edits: int = 6, checkpoints=(2, 4), **changes) -> RunSpec:
    return RunSpec(
        model=str(assets.model),
        dataset=str(assets.dataset),
        n_edits=n_edits,
        overrides=overrides(assets.corpus, **changes),
        checkpoints=checkpoints,
        device="cpu",
    )


def base_model(assets):
    """The unedited base model as a run loads it."""
    return load_model(str(assets.model), device="cpu")


def resumed(run_dir: Path, assets) -> Editor:
    """An Editor holding the run's edits, replayed onto a fresh copy of the base model."""
    model, tokenizer = base_model(assets)
    return Editor.resume(run_dir, model, tokenizer, progress=False)


def edited_weights(editor: Editor) -> dict[int, torch.Tensor]:
    return {i: out_weight(editor.parts.out_projs[i]).detach().clone() for i in LAYERS}


def same_params(a, b) -> bool:
    mine = dict(a.named_parameters())
    return mine.keys() == dict(b.named_parameters()).keys() and all(
        torch.equal(p, mine[name]) for name, p in b.named_parameters()
    )


def kinds(run_dir: Path) -> list[str]:
    return [entry.kind for entry in Ledger(run_dir, create=False).entries()]


def edit_cases(run_dir: Path) -> list[str]:
    """The case_ids of the run's edit entries, in order."""
    entries = Ledger(run_dir, create=False).entries()
    return [e.data["requests"][0]["case_id"] for e in entries if e.kind == "edit"]


TIMING = ("seconds", "eval_seconds", "resident_mb", "peak_resident_mb", "machine")  # what differs run to run


def without_timing(value):
    """A metrics.json document (or part) with its wall-clock fields dropped."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def assert_same_metrics(found: dict, expected: dict) -> None:
    """The metrics.json of a resumed run against an uninterrupted one: the same run record and checkpoints, with
    exactly the same metric and diagnostic values (diagnostics of edits replayed from the ledger are computed
    from the stored copies of the factors and keys, bitwise those of the live ones)."""
    found, expected = without_timing(found), without_timing(expected)
    assert found["run"] == expected["run"]
    assert [c["n_edits"] for c in found["checkpoints"]] == [c["n_edits"] for c in expected["checkpoints"]]
    for mine, theirs in zip(found["checkpoints"], expected["checkpoints"], strict=True):
        assert mine["metrics"] == theirs["metrics"], mine["n_edits"]
        assert mine["diagnostics"] == theirs["diagnostics"], mine["n_edits"]


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer):
    return make_assets(tmp_path_factory.mktemp("run-assets"), tokenizer)


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """A finished in-process run of 6 edits with checkpoints at 2 and 4 (and 6, the end); do not modify it."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("finished") / "run"
    document = run(out, make_spec(assets), progress=False)
    return SimpleNamespace(dir=out, document=document, spec=make_spec(assets))


def copy_run(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / source.name
    shutil.copytree(source, target)
    return target


# --- one run, in process ------------------------------------------------------------------------------


def test_run_writes_ledger_baseline_and_checkpointed_metrics(finished, assets):
    out = finished.dir
    assert json.loads((out / "run.json").read_text())["n_edits"] == 6
    document = metrics(out)
    assert document == json.loads(json.dumps(finished.document))  # what run() returned is what it wrote
    assert document["run"]["n_edits"] == 6 and document["run"]["kind"] == "counterfact"
    assert document["run"]["config"]["layers"] == LAYERS
    assert [c["n_edits"] for c in document["checkpoints"]] == [2, 4, 6]
    for checkpoint in document["checkpoints"]:
        values = checkpoint["metrics"]["counterfact"]
        assert set(values) == {
            f"{m}_{v}" for m in ("efficacy", "generalization", "specificity") for v in ("top", "larger")
        }
        assert all(value is not None and 0.0 <= value <= 1.0 for value in values.values()), values
        diagnostics = checkpoint["diagnostics"]
        assert diagnostics["n_edits"] == checkpoint["n_edits"]
        assert diagnostics["critical_layer"] == LAYERS[-1] and sorted(diagnostics["layers"]) == ["0", "1"]
        for name in ("noise_E", "ktb", "delta_norm", "cond", "triggered_share", "eval_seconds"):
            assert isinstance(diagnostics[name], float), name
        if sys.platform.startswith("linux"):  # memory as the OS reports it: a model is loaded, so > 100 MiB
            assert 100 < diagnostics["resident_mb"] <= diagnostics["peak_resident_mb"] + 1
        assert checkpoint["seconds"] > 0
        machine = checkpoint["machine"]  # where it ran: float32 bits depend on the processor kind and threads
        assert machine["torch"] == torch.__version__ and machine["cpu"] and machine["threads"] >= 1
        assert machine["kernels"] == torch.backends.cpu.get_cpu_capability()
    # the edits really landed: efficacy by "larger" is high on this setup
    assert document["checkpoints"][-1]["metrics"]["counterfact"]["efficacy_larger"] >= 0.5

    # one edit line per record, in the order of the file, each with its tensor file
    assert kinds(out) == ["edit"] * 6
    assert edit_cases(out) == [str(i) for i in range(6)]
    assert sorted(p.name for p in (out / "edits").iterdir()) == [f"{i:06d}.safetensors" for i in range(6)]
    baseline = json.loads((out / "baseline.json").read_text())
    assert [e["case_id"] for e in baseline["entries"]] == [str(i) for i in range(6)]


def test_each_checkpoint_says_which_edits_held_when_made_and_which_hold_now(finished):
    """The stream group separates new edits that fail from old edits that erode; per_record.json lists both
    flags for every edit at the last checkpoint, the first read from the ledger, the second from efficacy."""
    entries = [e for e in Ledger(finished.dir).entries() if e.kind == "edit"]
    made = [e.data["result"]["success"] for e in entries]
    rows = json.loads((finished.dir / "per_record.json").read_text())
    assert rows["n_edits"] == 6 and [r["held_when_made"] for r in rows["records"]] == made
    assert [r["holds_now"] for r in rows["records"]] == [r["efficacy_top"] == 1.0 for r in rows["records"]]
    last = finished.document["checkpoints"][-1]
    stream = last["metrics"]["stream"]
    now = [r["holds_now"] for r in rows["records"]]
    assert stream["held_when_made"] == pytest.approx(sum(made) / 6)
    assert stream["holds_now"] == pytest.approx(last["metrics"]["counterfact"]["efficacy_top"])
    assert stream["eroded"] == sum(m and not h for m, h in zip(made, now, strict=True))
    assert stream["recovered"] == sum(h and not m for m, h in zip(made, now, strict=True))
    assert stream["failed_when_made"] == 6 - sum(made)
    first = finished.document["checkpoints"][0]["metrics"]["stream"]
    assert first["held_when_made"] == pytest.approx(sum(made[:2]) / 2)


def test_report_of_a_run(finished, tmp_path):
    path = write_report([finished.dir], tmp_path / "report")
    text = path.read_text()
    assert path.name == "report.md" and "| Model | Method |" in text
    row = next(line for line in text.splitlines() if line.startswith(f"| {finished.spec.model} |"))
    assert row.rstrip().endswith("| 6 |")  # the Edits column: the final checkpoint
    for plot in ("efficacy_top.png", "noise_E.png", "ktb.png"):
        assert (tmp_path / "report" / plot).read_bytes()[:8] == PNG_SIGNATURE, plot
        assert f"]({plot})" in text


def test_the_record_by_record_comparisons_that_results_quote(finished, tmp_path, monkeypatch):
    """benchmarks/sweep_val's sign test, split by the constraint's decision and edit costs, read from two runs'
    per_record.json and the ledger: a record changed in one copy moves exactly that record between groups."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from sweep_val import by_decision, edit_costs, held_against

    other = copy_run(finished.dir, tmp_path)
    document = json.loads((other / "per_record.json").read_text())
    flipped = next(r for r in document["records"] if r["held_when_made"])  # kept <-> eroded
    flipped["efficacy_top"] = 1.0 - flipped["efficacy_top"]
    flipped["holds_now"] = not flipped["holds_now"]
    (other / "per_record.json").write_text(json.dumps(document))
    mine_better = flipped["efficacy_top"] == 0.0
    assert held_against(finished.dir, other) == ("1 / 0 (p 1.00)" if mine_better else "0 / 1 (p 1.00)")
    assert held_against(finished.dir, finished.dir) == ""  # a run against itself says nothing
    assert held_against(finished.dir, other, metric="specificity_top") == "0 / 0"

    entries = Ledger(finished.dir).active_edits()
    fired = sum(e.decision().triggered for e in entries)
    table = by_decision(finished.dir, other).splitlines()[2:]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table]
    sizes = {row[0]: int(row[1]) for row in cells}
    assert fired > 0 and sizes.get("fired", 0) == fired and sizes.get("did not fire", 0) == 6 - fired

    def groups(column: int) -> list[int]:  # kept, eroded, never held, summed over both rows
        return [sum(int(row[column].split(" / ")[g]) for row in cells) for g in range(3)]

    moved = 1 if mine_better else -1  # the flipped record is kept in exactly one of the two runs
    assert [a - b for a, b in zip(groups(2), groups(4), strict=True)] == [moved, -moved, 0]

    steps, median_seconds = edit_costs(finished.dir, 4)
    assert float(steps) == pytest.approx(sum(e.data["result"]["steps"] for e in entries[:4]) / 4, abs=0.05)
    assert float(median_seconds) > 0 and edit_costs(tmp_path / "no-such-run", 4) == ("", "")


def test_the_key_space_figures_that_results_quote(monkeypatch):
    """benchmarks/key_space: a key's fresh share is what the earlier projected keys leave of its projection, and
    the rank the keys span stops at the projector's free directions."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from key_space import fresh_shares

    generator = torch.Generator().manual_seed(0)
    free = torch.linalg.qr(torch.randn(8, 3, generator=generator, dtype=torch.float64)).Q
    projector = free @ free.T  # 3 free directions of 8
    keys = torch.randn(8, 6, generator=generator)
    keys[:, 1] = 2 * keys[:, 0]  # a repeat finds nothing fresh
    keys[:, 2] = keys[:, 0] + torch.randn(8, generator=generator) * 1e-3  # nearly a repeat
    shares, ranks = fresh_shares(keys, projector)
    assert shares[0] == pytest.approx(1.0) and shares[1] == pytest.approx(0.0, abs=1e-12)
    assert 0 < shares[2] < 1e-4 and shares[3] > 1e-3
    assert ranks == [1, 1, 2, 3, 3, 3] and max(shares[4:]) < 1e-12  # the free space is full from the 4th key on


def test_an_existing_run_is_refused_then_replaced_with_force(finished, assets, tmp_path):
    out = copy_run(finished.dir, tmp_path)
    before = (out / "index.jsonl").read_bytes()
    with pytest.raises(RunError, match="already holds a run.*--resume.*--force"):
        run(out, make_spec(assets, n_edits=2), progress=False)
    assert (out / "index.jsonl").read_bytes() == before and metrics(out) == metrics(finished.dir)

    document = run(out, make_spec(assets, n_edits=2, checkpoints=()), force=True, progress=False)
    assert [c["n_edits"] for c in document["checkpoints"]] == [2]
    assert kinds(out) == ["edit", "edit"]
    assert sorted(p.name for p in (out / "edits").iterdir()) == ["000000.safetensors", "000001.safetensors"]
    assert json.loads((out / "run.json").read_text())["n_edits"] == 2


def test_resume_refuses_other_settings_and_a_missing_run(finished, assets, tmp_path):
    out = copy_run(finished.dir, tmp_path)
    before = (out / "index.jsonl").read_bytes()
    for other in (replace(finished.spec, n_edits=7), make_spec(assets, steps=11)):
        with pytest.raises(RunError, match="run.json"):
            run(out, other, resume=True, progress=False)
    assert (out / "index.jsonl").read_bytes() == before
    with pytest.raises(RunError, match="no run.json, so nothing to resume"):
        run(tmp_path / "nothing", resume=True, progress=False)
    with pytest.raises(RunError, match="spec"):
        run(tmp_path / "new")  # a new run needs a spec


def test_resume_of_a_finished_run_does_nothing(finished, assets, tmp_path):
    out = copy_run(finished.dir, tmp_path)
    index, metrics_bytes = (out / "index.jsonl").read_bytes(), (out / "metrics.json").read_bytes()
    document = run(out, resume=True, progress=False)
    assert document == metrics(finished.dir)
    # the same spec again (layers given as a tuple this time, as run.json cannot tell) is accepted too
    spec = replace(finished.spec, overrides={**finished.spec.overrides, "layers": tuple(LAYERS)})
    run(out, spec, resume=True, progress=False)
    assert (out / "index.jsonl").read_bytes() == index
    assert (out / "metrics.json").read_bytes() == metrics_bytes


def test_a_resume_extends_a_run_to_more_edits(finished, assets, tmp_path, capsys):
    """A 4-edit run continued to 6 is the 6-edit run: the same edits, weights, checkpoints and run record."""
    out = tmp_path / "run"
    run(out, make_spec(assets, n_edits=4), progress=False)
    with pytest.raises(RunError, match="can extend it, not shorten it"):
        run(out, resume=True, n_edits=3, progress=False)
    assert main(["run", "--out", str(out), "--resume", "--method", "alphaedit", "--seed", "1"]) == 2
    assert "drop --method, --seed" in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["n_edits"] == 4 and kinds(out) == ["edit"] * 4

    assert main(["run", "--out", str(out), "--resume", "--n-edits", "6", "--quiet"]) == 0
    assert json.loads((out / "run.json").read_text()) == json.loads((finished.dir / "run.json").read_text())
    assert_same_metrics(metrics(out), metrics(finished.dir))
    assert edit_cases(out) == edit_cases(finished.dir)
    assert same_params(resumed(out, assets).model, resumed(finished.dir, assets).model)


def _without(document: dict, name: str) -> tuple[dict, list]:
    """The document with diagnostics ``name`` taken out of every checkpoint, and its values."""
    document = json.loads(json.dumps(document))
    return document, [c["diagnostics"].pop(name, None) for c in document["checkpoints"]]


def test_a_run_that_reuses_recorded_targets_is_the_recorded_run_without_the_search(
    finished, assets, tmp_path, capsys, monkeypatch
):
    """The targets file carries a run in a few kB an edit: a new run of the same stream and config that reuses
    it runs no target search and ends bit for bit where the recorded run did (weights, metrics, ledger)."""
    targets = tmp_path / "targets.safetensors"
    assert main(["export", str(finished.dir), "--targets-only", "--out", str(targets)]) == 0
    assert "target vectors of 6 edits saved" in capsys.readouterr().out
    assert main(["export", str(finished.dir), "--targets-only", "--out", str(targets)]) == 2  # no --force
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"not a targets file")
    assert main(["export", str(finished.dir), "--targets-only", "--out", str(other), "--force"]) == 2
    assert "not a deltaedit targets file; --force only replaces one" in capsys.readouterr().err
    assert other.read_bytes() == b"not a targets file"

    import deltaedit.methods.locate as locate

    def no_search(*args, **kwargs):
        raise AssertionError("the target search ran although a recorded z* was there")

    monkeypatch.setattr(locate, "optimize_target", no_search)
    out = tmp_path / "replay" / "run"  # the run's name is recorded: the same as the reference's
    run(out, make_spec(assets, n_edits=4), progress=False, targets=targets)
    assert main(["run", "--out", str(out), "--resume", "--n-edits", "6", "--quiet", "--targets", str(targets)]) == 0

    found, used = _without(metrics(out), "recorded_targets_used")
    assert used == [2, 4, 2]  # counted per process: the resume made edits 5 and 6
    assert_same_metrics(found, metrics(finished.dir))
    assert [e.data["result"]["steps"] for e in Ledger(out, create=False).entries()] == [
        e.data["result"]["steps"] for e in Ledger(finished.dir, create=False).entries()
    ]
    assert same_params(resumed(out, assets).model, resumed(finished.dir, assets).model)


def test_recorded_targets_serve_only_the_same_requests_config_and_intact_file(finished, assets, tmp_path):
    from deltaedit.ledger import LedgerError
    from deltaedit.targets_file import RecordedTargets

    targets = tmp_path / "targets.safetensors"
    assert main(["export", str(finished.dir), "--targets-only", "--out", str(targets)]) == 0
    recorded = RecordedTargets.read(targets)
    assert len(recorded) == 6 and recorded.get(0, resumed(finished.dir, assets).applied[0].requests) is not None

    # another stream: the same edit id with other requests is searched anew
    model, tokenizer = base_model(assets)
    settings = Editor.settings_from(Ledger(finished.dir, create=False).manifest())
    editor = Editor(model, tokenizer, **settings, progress=False)
    editor.use_targets(targets)
    other = dict(RECORDS[1])
    result = editor.edit([other])[0]
    assert editor.recorded_targets.used == 0 and result.steps > 0

    # another config: refused, naming what differs
    model, tokenizer = base_model(assets)
    changed = Editor(model, tokenizer, method="deltaedit", config=overrides(assets.corpus, steps=11), progress=False)
    with pytest.raises(ValueError, match="targets: .* config_fingerprint"):
        changed.use_targets(targets)
    assert changed.recorded_targets is None

    # a run without target vectors has nothing to write
    from deltaedit.targets_file import write_targets_file

    with pytest.raises(ValueError, match="no edit of this run recorded a target vector"):
        write_targets_file(tmp_path / "none.safetensors", {}, [])
    assert not (tmp_path / "none.safetensors").exists()

    # a damaged or foreign file is refused whole, before any edit
    damaged = tmp_path / "damaged.safetensors"
    payload = bytearray(targets.read_bytes())
    payload[-3] ^= 0xFF
    damaged.write_bytes(bytes(payload))
    with pytest.raises(LedgerError, match="checksum mismatch"):
        RecordedTargets.read(damaged)
    edits = resumed(finished.dir, assets).save_edits(tmp_path / "edits.safetensors")
    with pytest.raises(LedgerError, match="not a deltaedit-targets file"):
        run(tmp_path / "refused", make_spec(assets), progress=False, targets=edits)
    assert not (tmp_path / "refused").exists()


def test_a_health_run_is_extended_only_past_the_records_its_baseline_read(finished, tmp_path):
    """Its unedited generations are those of its first 40 records: a 6-edit --health run would need others."""
    out = copy_run(finished.dir, tmp_path)
    spec = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**spec, "health": True}))
    with pytest.raises(RunError, match="extended only from 40 edits on"):
        run(out, resume=True, n_edits=8, progress=False)
    assert kinds(out) == ["edit"] * 6


def test_a_run_stopped_before_its_first_edit_resumes_with_the_config_its_manifest_recorded(finished, assets, tmp_path):
    """Killed before its first ledger line, a run has its manifest and run.json only. The resume takes method and
    config from the manifest, so one written before key_average existed goes on with the flat keys it recorded
    (today's default would be refused as another config)."""
    out = copy_run(finished.dir, tmp_path)
    (out / "index.jsonl").unlink()
    (out / "metrics.json").unlink()
    shutil.rmtree(out / "edits", ignore_errors=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["key_average"] == "grouped"
    older = {name: value for name, value in manifest["config"].items() if name != "key_average"}
    manifest["config"] = older
    manifest["config_fingerprint"] = hashlib.sha256(json.dumps(older, sort_keys=True).encode()).hexdigest()[:12]
    (out / "manifest.json").write_text(json.dumps(manifest))

    run(out, resume=True, progress=False)
    editor = resumed(out, assets)
    assert editor.config.key_average == "flat" and len(editor.applied) == finished.spec.n_edits


def test_resume_after_a_kill_between_an_edit_and_its_checkpoint(finished, assets, tmp_path):
    """The ledger holds 4 edits but metrics.json only checkpoint 2: the state a kill leaves when it lands after
    edit 4's index line and before checkpoint 4 was written. The resume evaluates checkpoint 4 on the spot,
    then edits 5 and 6: metrics and weights are those of the uninterrupted run."""
    out = copy_run(finished.dir, tmp_path)
    cut_after(out, 4)
    document = metrics(out)
    document["checkpoints"] = document["checkpoints"][:1]
    (out / "metrics.json").write_text(json.dumps(document))

    run(out, resume=True, progress=False)

    assert_same_metrics(metrics(out), metrics(finished.dir))
    assert edit_cases(out) == edit_cases(finished.dir)
    assert same_params(resumed(out, assets).model, resumed(finished.dir, assets).model)


# --- kill and resume: the CLI in a subprocess, SIGKILLed mid-run ------------------------------------------

N_KILL = 8


def child_env() -> dict[str, str]:
    """The subprocess's environment: offline, this test's cache, one thread (as conftest gives this process,
    so that both compute the same bits)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DELTAEDIT_CACHE": os.environ["DELTAEDIT_CACHE"],
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def committed_edits(run_dir: Path) -> int:
    """Edit lines in the index that are complete (newline-terminated)."""
    try:
        raw = (run_dir / "index.jsonl").read_bytes()
    except FileNotFoundError:
        return 0
    return sum(b'"kind":"edit"' in line for line in raw.split(b"\n")[:-1])


def kill_mid_run(args: list[str], run_dir: Path, log_path: Path, at_least: int = 2, timeout: float = 120.0) -> int:
    """Start ``deltaedit <args>``, SIGKILL it as soon as ``at_least`` edits are committed; returns how many were."""
    with open(log_path, "wb") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "deltaedit.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(),
        )
        try:
            deadline = time.monotonic() + timeout
            while committed_edits(run_dir) < at_least:
                if child.poll() is not None:
                    pytest.fail(f"deltaedit run ended ({child.returncode}) before the kill:\n{log_path.read_text()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no {at_least} edits after {timeout} s:\n{log_path.read_text()}")
                time.sleep(0.005)
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    return committed_edits(run_dir)


def test_a_run_killed_mid_way_and_resumed_equals_an_uninterrupted_run(assets, tmp_path, capsys):
    # More optimization steps than elsewhere (stop_prob=1: all of them) make each edit take long enough
    # that the kill lands well before the last one.
    slow = {"steps": 25, "stop_prob": 1.0}
    reference, killed = tmp_path / "A" / "run", tmp_path / "B" / "run"  # one name: metrics.json records it
    assert main(run_args(assets, reference, N_KILL, **slow)) == 0
    assert f"counterfact after {N_KILL} edits: efficacy_top" in capsys.readouterr().out

    done = kill_mid_run(run_args(assets, killed, N_KILL, **slow), killed, tmp_path / "child.log")
    assert 2 <= done < N_KILL, f"the kill landed after {done} of {N_KILL} edits; make the edits slower"
    assert edit_cases(killed) == [str(i) for i in range(done)]
    if (killed / "metrics.json").exists():  # else the kill came before checkpoint 2 was written
        assert all(c["n_edits"] <= done for c in metrics(killed)["checkpoints"])

    assert main(["run", "--out", str(killed), "--resume", "--quiet"]) == 0
    assert f"run written to {killed}" in capsys.readouterr().out

    a, b = metrics(reference), metrics(killed)
    assert [c["n_edits"] for c in b["checkpoints"]] == [c["n_edits"] for c in a["checkpoints"]] == [2, 4, 8]
    assert_same_metrics(b, a)
    assert kinds(killed) == ["edit"] * N_KILL and edit_cases(killed) == edit_cases(reference)
    assert (killed / "baseline.json").read_text() == (reference / "baseline.json").read_text()

    first, second = resumed(reference, assets), resumed(killed, assets)
    for layer, weight in edited_weights(first).items():
        assert torch.equal(weight, edited_weights(second)[layer]), layer
    assert same_params(first.model, second.model)
    base, _ = base_model(assets)
    assert not torch.equal(out_weight(find_parts(base).out_projs[LAYERS[-1]]), edited_weights(first)[LAYERS[-1]])


# --- the data folder: recorded in run.json, reused or checked on resume ---------------------------------


def wikipedia_folder(root: Path, paragraphs: list[str]) -> Path:
    """A data folder whose ``wikipedia/`` text feeds the key statistics when ``stats_corpus`` is not set."""
    (root / "wikipedia").mkdir(parents=True)
    (root / "wikipedia" / "wiki_00").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return root


def cut_after(run_dir: Path, n: int) -> None:
    """The state a kill leaves after edit ``n`` and the checkpoints up to it (the tensor file of the next edit,
    written just before its index line would have been, stays)."""
    lines = (run_dir / "index.jsonl").read_bytes().splitlines(keepends=True)
    (run_dir / "index.jsonl").write_bytes(b"".join(lines[:n]))
    for path in (run_dir / "edits").glob("*.safetensors"):
        if int(path.stem) > n:
            path.unlink()
    document = metrics(run_dir)
    document["checkpoints"] = [c for c in document["checkpoints"] if c["n_edits"] <= n]
    (run_dir / "metrics.json").write_text(json.dumps(document))


def test_resume_reuses_the_recorded_data_folder_and_refuses_another(assets, tmp_path, monkeypatch):
    """Statistics from Wikipedia under the data folder: a resume given no folder takes the recorded one (and ends
    exactly as the uninterrupted run); another folder, by data_dir or $DELTAEDIT_DATA, is refused untouched."""
    monkeypatch.delenv(DATA_ENV, raising=False)
    folder = wikipedia_folder(tmp_path / "data-a", corpus_paragraphs())
    other = wikipedia_folder(tmp_path / "data-b", corpus_paragraphs()[::-1][:40])
    # a real null space (P0 = I elsewhere in these tests): the edits depend on the statistics
    spec = make_spec(
        assets, n_edits=4, checkpoints=(2,), stats_corpus=None, nullspace_threshold=1e-2, nullspace_mode="relative"
    )
    reference = tmp_path / "A" / "run"
    run(reference, spec, data_dir=str(folder), progress=False)
    assert json.loads((reference / "run.json").read_text())["data_dir"] == str(folder.resolve())

    out = copy_run(reference, tmp_path / "B")
    cut_after(out, 2)
    before = {name: (out / name).read_bytes() for name in ("index.jsonl", "metrics.json", "run.json")}
    with pytest.raises(RunError) as info:
        run(out, resume=True, data_dir=str(other), progress=False)
    message = str(info.value)
    assert message.startswith(f"--data (data_dir=): the run used the data folder {folder.resolve()}")
    assert f"not {other.resolve()}" in message and f"Resume with --data {folder.resolve()} or without --data" in message
    monkeypatch.setenv(DATA_ENV, str(other))
    with pytest.raises(RunError, match=rf"^\${DATA_ENV}: the run used the data folder "):
        run(out, resume=True, progress=False)
    assert {name: (out / name).read_bytes() for name in before} == before

    monkeypatch.setenv(DATA_ENV, str(folder))  # the same folder is fine; so is none at all
    run(out, spec, resume=True, data_dir=str(tmp_path / "data-a" / ".." / "data-a"), progress=False)
    cut_after(out, 2)
    monkeypatch.delenv(DATA_ENV)
    run(out, resume=True, progress=False)
    assert_same_metrics(metrics(out), metrics(reference))
    assert same_params(resumed(out, assets).model, resumed(reference, assets).model)

    folder.rename(tmp_path / "moved")
    missing = re.escape(f"data folder {folder.resolve()}, which does not exist now")
    with pytest.raises(RunError, match=f'{missing}.*set "data_dir" in '):
        run(out, resume=True, progress=False)


def test_a_run_without_a_data_folder_is_not_resumed_with_one(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(DATA_ENV, raising=False)
    out = tmp_path / "run"
    assert main(run_args(assets, out, 2, checkpoints="2")) == 0
    assert json.loads((out / "run.json").read_text())["data_dir"] is None
    index = (out / "index.jsonl").read_bytes()
    other = wikipedia_folder(tmp_path / "data", corpus_paragraphs())

    monkeypatch.setenv(DATA_ENV, str(other))
    assert main(["run", "--out", str(out), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"deltaedit run: error: ${DATA_ENV}: the run was started without a data folder")
    assert f"resume without --data and with {DATA_ENV} unset" in err
    monkeypatch.delenv(DATA_ENV)
    assert main(["export", str(out), "--out", str(tmp_path / "model"), "--data", str(other), "--quiet"]) == 2
    assert "deltaedit export: error: --data (data_dir=): the run was started without" in capsys.readouterr().err
    assert (out / "index.jsonl").read_bytes() == index and not (tmp_path / "model").exists()

    assert main(["run", "--out", str(out), "--resume", "--quiet"]) == 0
    # a run.json written before the folder was recorded is not checked
    spec = json.loads((out / "run.json").read_text())
    del spec["data_dir"]
    (out / "run.json").write_text(json.dumps(spec))
    monkeypatch.setenv(DATA_ENV, str(other))
    assert main(["run", "--out", str(out), "--resume", "--quiet"]) == 0
    assert (out / "index.jsonl").read_bytes() == index


# --- records matched to the ledger by position: repeated or missing case_ids, a changed dataset ----------

# case_ids of the records: 5 twice; the third has none, so it is numbered by position, "2", which the fourth
# also has; the fifth has none ("4")
DUPLICATE_IDS = [5, 5, None, 2, None, 0]


def duplicate_rows() -> list[dict]:
    rows = []
    for row, case_id in zip((dict(r) for r in RECORDS[:6]), DUPLICATE_IDS, strict=True):
        row.pop("case_id")
        rows.append(row if case_id is None else {"case_id": case_id, **row})
    return rows


@pytest.fixture(scope="module")
def duplicates(assets, tmp_path_factory):
    """An uninterrupted run over a file whose case_ids repeat and collide; do not modify it."""
    root = tmp_path_factory.mktemp("duplicates")
    dataset = write_jsonl(root / "repeated.jsonl", duplicate_rows())
    spec = replace(make_spec(assets, checkpoints=(2, 4)), dataset=str(dataset))
    run(root / "A" / "run", spec, progress=False)
    return SimpleNamespace(dir=root / "A" / "run", spec=spec, dataset=dataset)


@pytest.mark.parametrize("done", [1, 3])
def test_resume_with_repeated_case_ids_edits_every_record_once(duplicates, tmp_path, assets, done):
    """Cut after the first of the two records with case_id 5 (1), or after the position-numbered "2" whose id the
    next record repeats (3): matching by case_id would skip that record and count it as edited."""
    assert edit_cases(duplicates.dir) == ["5", "5", "2", "2", "4", "0"]
    out = copy_run(duplicates.dir, tmp_path)
    cut_after(out, done)
    run(out, resume=True, progress=False)
    assert kinds(out) == ["edit"] * 6 and edit_cases(out) == edit_cases(duplicates.dir)
    assert_same_metrics(metrics(out), metrics(duplicates.dir))
    assert same_params(resumed(out, assets).model, resumed(duplicates.dir, assets).model)


def test_resume_refuses_a_dataset_that_changed(duplicates, tmp_path):
    out = copy_run(duplicates.dir, tmp_path)
    cut_after(out, 3)
    before = {name: (out / name).read_bytes() for name in ("index.jsonl", "metrics.json", "baseline.json")}
    rows = duplicate_rows()
    original = duplicates.dataset.read_text()
    try:
        write_jsonl(duplicates.dataset, [rows[0], {**rows[1], "target_new": "Rome"}, *rows[2:]])
        with pytest.raises(RunError) as info:
            run(out, resume=True, progress=False)
        message = str(info.value)
        assert message.startswith(f"{duplicates.dataset}: record 2 (line 2) is not the record the run handled")
        assert "field 'target_new' is 'Rome', was 'Tokyo'" in message and "restore it" in message
        assert "--force" in message

        write_jsonl(duplicates.dataset, rows[:2])
        with pytest.raises(RunError, match="yields 2 records but the run in .* already handled 3; the dataset changed"):
            run(out, resume=True, progress=False)
    finally:
        duplicates.dataset.write_text(original)
    assert {name: (out / name).read_bytes() for name in before} == before


# --- on_error: bad records in the data file and records the model cannot take -----------------------------

MALFORMED_LINE = 3  # the prompt names neither {} nor the subject
ZERO_WIDTH = 3  # case_id of the record whose target tokenizes to nothing


def bad_rows() -> list[dict]:
    rows = [dict(r) for r in RECORDS[:6]]
    malformed = {**rows[2], "prompt": "The capital city of somewhere"}
    zero_width = {**rows[3], "target_new": "\ufffd"}  # the tokenizer drops it
    return rows[:2] + [malformed, zero_width] + rows[4:]


def test_on_error_skip_logs_rejections_and_edits_the_rest(assets, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "bad.jsonl", bad_rows())
    out = tmp_path / "run"
    assert main([*run_args(assets, out, 6, checkpoints="2", dataset=dataset), "--on-error", "skip"]) == 0
    capsys.readouterr()

    entries = Ledger(out, create=False).entries()
    rejected = [e.data for e in entries if e.kind == "rejected"]
    data_error, request_error = rejected
    assert data_error["error"] == "DataError" and data_error["field"] == "prompt"
    assert data_error["line"] == MALFORMED_LINE and data_error["source"] == str(dataset)
    assert "subject" in data_error["reason"] and f"line {MALFORMED_LINE}" in data_error["reason"]
    assert request_error["error"] == "RequestError" and request_error["field"] == "target_new"
    assert request_error["requests"][0]["case_id"] == str(ZERO_WIDTH)
    assert "nothing" in request_error["reason"]
    # the other records are edited, in order; the data error is logged before any edit
    assert [e.kind for e in entries] == ["rejected", "edit", "edit", "rejected", "edit", "edit"]
    assert edit_cases(out) == ["0", "1", "4", "5"]
    assert [c["n_edits"] for c in metrics(out)["checkpoints"]] == [2, 4]  # 5 loaded, 4 edited: ends at 4
    assert main(["log", str(out)]) == 0
    shown = [line for line in capsys.readouterr().out.splitlines() if "  rejected  " in line]
    assert len(shown) == 2 and "rejected    prompt: " in shown[0] and "rejected    target_new: " in shown[1]

    # resuming the finished run redoes nothing, rejected records included
    index = (out / "index.jsonl").read_bytes()
    assert main(["run", "--out", str(out), "--resume", "--quiet"]) == 0
    assert (out / "index.jsonl").read_bytes() == index


def test_on_error_stop_on_a_malformed_record_names_it_and_edits_nothing(assets, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "bad.jsonl", bad_rows())
    out = tmp_path / "run"
    assert main(run_args(assets, out, 6, dataset=dataset)) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltaedit run: error: ")
    assert str(dataset) in err and f"line {MALFORMED_LINE}" in err and "field 'prompt'" in err
    assert "on_error" in err  # says how to skip such records
    assert committed_edits(out) == 0 and not (out / "edits").exists()
    assert not (out / "run.json").exists() and not (out / "manifest.json").exists()  # a failed start leaves no stub

    # with the record fixed, the same command starts the run: no --force needed
    write_jsonl(dataset, [r for i, r in enumerate(bad_rows()) if i not in (2, 3)])
    assert main(run_args(assets, out, 6, dataset=dataset)) == 0
    assert edit_cases(out) == ["0", "1", "4", "5"]


def test_on_error_stop_on_a_record_the_model_cannot_take(assets, tmp_path, capsys):
    rows = [r for i, r in enumerate(bad_rows()) if i != 2]  # only the zero-width target is left, 3rd record
    dataset = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "run"
    assert main(run_args(assets, out, 5, dataset=dataset)) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltaedit run: error: target_new: ") and "tokenizes to nothing" in err

    entries = Ledger(out, create=False).entries()
    assert [e.kind for e in entries] == ["edit", "edit", "rejected"]
    assert entries[-1].data["field"] == "target_new" and entries[-1].data["requests"][0]["case_id"] == "3"
    # no trace of a half-applied edit: only the two committed edits' tensor files, no temporary files
    assert sorted(p.name for p in (out / "edits").iterdir()) == ["000000.safetensors", "000001.safetensors"]
    assert [c["n_edits"] for c in metrics(out)["checkpoints"]] == [2]
    editor = resumed(out, assets)
    assert [a.edit_id for a in editor.applied] == [0, 1]


def test_a_checkpoint_warns_once_the_edits_span_a_layers_free_key_directions(assets, tmp_path, caplog):
    # a null-space threshold that leaves the tiny model 7 and 4 free key directions at layers 0 and 1: four edits fill
    # layer 1
    spec = make_spec(assets, n_edits=4, checkpoints=(1, 4), nullspace_threshold=0.04)
    with caplog.at_level(logging.WARNING, logger="deltaedit"):
        document = run(tmp_path / "run", spec, progress=False)
    first, last = (checkpoint["diagnostics"]["layers"] for checkpoint in document["checkpoints"])
    assert all(values["spanned_key_dims"] == 1 < values["free_key_dims"] for values in first.values())
    full = [layer for layer, values in last.items() if values["spanned_key_dims"] == values["free_key_dims"]]
    warnings = [r.getMessage() for r in caplog.records if "free key direction" in r.getMessage()]
    assert full and len(warnings) == 1 and warnings[0].startswith("after 4 edits")
    assert all(f"layer {layer} (" in warnings[0] for layer in full)
