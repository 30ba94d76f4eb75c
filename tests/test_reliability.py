"""Reliability and security of run directories: --force removes only what deltaedit wrote, one writer at a
time, files that cannot reach outside the directory, a truncated index is detected, failed starts leave nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_run import child_env, copy_run, make_assets, make_spec, run_args

from deltaedit import Editor, Ledger, LedgerError
from deltaedit.cli import main
from deltaedit.run import run


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer):
    return make_assets(tmp_path_factory.mktemp("reliability-assets"), tokenizer)


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("reliability") / "run"
    run(out, make_spec(assets, n_edits=3, checkpoints=(3,)), progress=False)
    return out


# --- --force ------------------------------------------------------------------------------------------------


def test_force_refuses_a_folder_that_holds_no_run_and_touches_nothing(assets, tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "thesis.txt").write_text("x")
    assert main([*run_args(assets, folder, 2), "--force"]) == 2
    err = capsys.readouterr().err
    assert "holds no deltaedit run" in err and "--force only replaces a run" in err
    assert (folder / "thesis.txt").read_text() == "x" and sorted(p.name for p in folder.iterdir()) == [
        ".deltaedit.lock",
        "thesis.txt",
    ]


def test_force_replaces_a_run_and_keeps_the_users_files_beside_it(assets, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    (out / "notes.md").write_text("mine")
    (out / "plots").mkdir()
    (out / "plots" / "a.png").write_bytes(b"png")
    assert main([*run_args(assets, out, 2), "--force"]) == 0
    assert (out / "notes.md").read_text() == "mine" and (out / "plots" / "a.png").read_bytes() == b"png"
    assert len([e for e in Ledger(out).entries() if e.kind == "edit"]) == 2


def test_a_failed_start_leaves_no_stub(assets, tmp_path, capsys):
    out = tmp_path / "run"
    missing = str(tmp_path / "no-model")
    assert main(["run", "--model", missing, "--dataset", str(assets.dataset), "--out", str(out)]) == 2
    assert not (out / "run.json").exists() and not (out / "manifest.json").exists()
    assert main(run_args(assets, out, 2)) == 0  # the retry needs no --force


# --- one writer -------------------------------------------------------------------------------------------


HOLD = (
    "import sys, time; from deltaedit import Ledger; ledger = Ledger(sys.argv[1]); ledger.lock(); "
    "print('ready', flush=True); time.sleep(60)"
)


def test_a_second_writer_is_refused_naming_the_holder(assets, finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, env=child_env())
    try:
        assert holder.stdout.readline().strip() == b"ready"
        before = (out / "index.jsonl").read_bytes()
        assert main(["undo", str(out), "--edit", "0", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"is being written by process {holder.pid}" in err and "one writer per run directory" in err
        assert main(["run", "--out", str(out), "--resume", "--quiet"]) == 2
        assert f"process {holder.pid}" in capsys.readouterr().err
        assert (out / "index.jsonl").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    assert main(["undo", str(out), "--edit", "0", "--quiet"]) == 0  # the lock went with its process


def test_two_editors_in_one_process_cannot_write_one_run(assets, finished, tmp_path, tokenizer):
    from test_run import base_model

    out = copy_run(finished, tmp_path)
    first = Editor.resume(out, *base_model(assets), progress=False)
    first.undo(0)
    second = Editor.resume(out, *base_model(assets), progress=False)
    with pytest.raises(LedgerError, match="is being written by process"):
        second.undo(1)
    first.close()
    second.undo(1)


# --- nothing outside the directory ------------------------------------------------------------------------


def rewrite_line(run_dir, index, **changes):
    lines = (run_dir / "index.jsonl").read_text().splitlines()
    data = json.loads(lines[index])
    data.update(changes)
    lines[index] = json.dumps(data)
    (run_dir / "index.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("name", ["../../other/edits/000000.safetensors", "/etc/passwd", "edits/000001.safetensors"])
def test_a_line_naming_another_file_is_refused_before_it_is_read(assets, finished, tmp_path, name, capsys):
    out = copy_run(finished, tmp_path)
    rewrite_line(out, 0, file=name)
    with pytest.raises(LedgerError, match="names the file .* the index was edited"):
        Ledger(out).entries()[0].tensors()
    assert main(["export", str(out), "--out", str(tmp_path / "x.safetensors"), "--edits-only", "--quiet"]) == 2
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("name", ["index.jsonl", "baseline.json", "edits", "manifest.json"])
def test_a_symlinked_file_of_a_run_is_refused(assets, finished, tmp_path, name, capsys):
    out = copy_run(finished, tmp_path)
    outside = tmp_path / f"outside-{name}"
    shutil.move(out / name, outside)
    os.symlink(outside, out / name)
    before = outside.read_bytes() if outside.is_file() else sorted(p.name for p in outside.iterdir())
    assert main(["run", "--out", str(out), "--resume", "--quiet"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    after = outside.read_bytes() if outside.is_file() else sorted(p.name for p in outside.iterdir())
    assert after == before


# --- silent loss ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 1])
def test_a_truncated_or_emptied_index_is_detected(assets, finished, tmp_path, keep, capsys):
    out = copy_run(finished, tmp_path)
    lines = (out / "index.jsonl").read_bytes().splitlines(keepends=True)
    (out / "index.jsonl").write_bytes(b"".join(lines[:keep]))
    assert main(["export", str(out), "--out", str(tmp_path / "e.safetensors"), "--edits-only", "--quiet"]) == 2
    assert "index.jsonl lists" in capsys.readouterr().err and not (tmp_path / "e.safetensors").exists()


def test_log_of_a_folder_that_is_no_run_says_so(tmp_path, capsys):
    assert main(["log", str(tmp_path)]) == 2
    assert "not a deltaedit run directory" in capsys.readouterr().err


def test_the_one_file_a_kill_leaves_is_not_a_truncation(assets, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    lines = (out / "index.jsonl").read_bytes().splitlines(keepends=True)
    (out / "index.jsonl").write_bytes(b"".join(lines[:2]))  # edit 2's file stays, as a kill before its line
    for stray in (out / "edits").glob("*.safetensors"):
        if int(stray.stem) > 2:
            stray.unlink()
    Ledger(out).check_complete()


# --- clear errors, before anything heavy loads ------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--device", "cuda"], "--device cuda: this machine's torch"),
        (["--device", "warp"], "--device 'warp': not a device"),
        (["--set", "foo=1"], "foo: not an option of deltaedit"),
        (["--set", "layers=[0,7]"], "layers: [7] out of range"),
        (["--set", "lr=nan"], "lr: must be a finite number"),
    ],
)
def test_a_bad_option_is_named_before_the_model_loads(assets, tmp_path, capsys, monkeypatch, extra, words):
    import deltaedit.models as models

    loads = []
    monkeypatch.setattr(models, "embedded_model_dir", lambda *a: loads.append(a) or None)
    out = tmp_path / "run"
    args = ["run", "--model", str(assets.model), "--dataset", str(assets.dataset), "--out", str(out), *extra]
    assert main(args) == 2
    assert words in capsys.readouterr().err
    assert not (out / "run.json").exists()


def test_a_bad_checkpoint_list_is_named(assets, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["run", "--dataset", str(assets.dataset), "--out", str(tmp_path / "r"), "--checkpoints", "a,b"])
    assert "expected whole numbers separated by commas" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model", "words"),
    [("/no/such/path", "no such directory"), ("__file__", "is a file"), ("__dir__", "not a model directory")],
)
def test_a_model_that_is_not_there_is_named(assets, tmp_path, capsys, model, words):
    (tmp_path / "empty").mkdir()
    model = {"__file__": str(assets.dataset), "__dir__": str(tmp_path / "empty")}.get(model, model)
    assert main(["config", "--model", model, "--quiet"]) == 2
    assert f"--model {model}: {words}" in capsys.readouterr().err


def test_an_edit_id_that_is_not_a_number_is_named(assets, finished, tmp_path):
    from test_run import base_model

    editor = Editor.resume(copy_run(finished, tmp_path), *base_model(assets), progress=False)
    with pytest.raises(ValueError, match="edit_id: expected a whole number"):
        editor.undo("1")
    with pytest.raises(ValueError, match="edit_id: expected a whole number"):
        editor.undo_to("0")


# --- exports: staging, --force, atomic replacement ----------------------------------------------------------


def test_export_force_replaces_only_a_deltaedit_export(assets, finished, tmp_path, capsys):
    target = tmp_path / "model"
    assert main(["export", str(finished), "--out", str(target), "--quiet"]) == 0
    assert "model.safetensors" in json.loads((target / "deltaedit.json").read_text())["files"]
    assert main(["export", str(finished), "--out", str(target), "--force", "--quiet"]) == 0  # its own: replaced
    (target / "notes.txt").write_text("mine")
    assert main(["export", str(finished), "--out", str(target), "--force", "--quiet"]) == 2
    assert "holds files the export did not write (notes.txt)" in capsys.readouterr().err
    assert (target / "notes.txt").read_text() == "mine"
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("x")
    assert main(["export", str(finished), "--out", str(other), "--force", "--quiet"]) == 2
    assert "is not a deltaedit export" in capsys.readouterr().err and (other / "chapter1.tex").read_text() == "x"
    text = tmp_path / "notes.safetensors"
    text.write_text("not an edits file")
    assert main(["export", str(finished), "--out", str(text), "--edits-only", "--force", "--quiet"]) == 2
    assert "not a deltaedit edits file" in capsys.readouterr().err and text.read_text() == "not an edits file"


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export(assets, finished, tmp_path):
    target = tmp_path / "model"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".model.partial-{dead.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".model.partial-{os.getpid()}"  # this process is alive: not touched (it is not ours)
    assert main(["export", str(finished), "--out", str(target), "--quiet"]) == 0
    assert not stale.exists() and not alive.exists() and (target / "deltaedit.json").is_file()


@pytest.mark.parametrize("exchange", [True, False])
def test_swap_into_place_never_leaves_the_target_missing(tmp_path, monkeypatch, exchange):
    import deltaedit.editor as editor_module

    if not exchange:
        monkeypatch.setattr(editor_module, "_exchange", lambda a, b: False)
    target, staging = tmp_path / "model", tmp_path / ".model.partial-1"
    target.mkdir()
    (target / "old").write_text("old")
    staging.mkdir()
    (staging / "new").write_text("new")
    real_replace = os.replace
    seen = []

    def watched(a, b):
        seen.append(target.exists())
        real_replace(a, b)
        seen.append(target.exists())

    monkeypatch.setattr(editor_module.os, "replace", watched)
    editor_module.swap_into_place(staging, target)
    assert (target / "new").read_text() == "new" and (staging / "old").read_text() == "old"
    if exchange:
        assert seen == []  # one atomic exchange


# --- model cards and the Hub ----------------------------------------------------------------------------


def test_an_export_carries_a_model_card(assets, finished, tmp_path):
    target = tmp_path / "model"
    assert main(["export", str(finished), "--out", str(target), "--quiet"]) == 0
    card = (target / "README.md").read_text()
    manifest = json.loads((finished / "manifest.json").read_text())
    info = json.loads((target / "deltaedit.json").read_text())
    assert card.startswith("---\n") and "library_name: transformers" in card
    assert manifest["base_fingerprint"] in card and "## Method and config" in card and "nullspace_threshold" in card
    for edit in info["edits"]:
        request = edit["requests"][0]
        row = f"| {edit['edit_id']} | {request['subject']} | {request['prompt'].replace('{}', request['subject'])} |"
        assert row in card and f"| {request['target_new']} |" in card
    assert "## Metrics after 3 edits" in card and "efficacy_top" in card


def test_push_to_hub_offline_fails_before_anything_is_written(assets, finished, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target = tmp_path / "model"
    assert main(["export", str(finished), "--out", str(target), "--push-to-hub", "me/edited", "--quiet"]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err and not target.exists()
    from test_run import base_model

    from deltaedit.card import HubError

    editor = Editor.resume(copy_run(finished, tmp_path / "copy"), *base_model(assets), progress=False)
    with pytest.raises(HubError, match="me/edited"):
        editor.push_to_hub("me/edited")


# --- run tracking --------------------------------------------------------------------------------------------


def test_a_run_logs_to_tensorboard(assets, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main([*run_args(assets, out, 4, checkpoints="2,4"), "--tracker", "tensorboard"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("edit/target_prob")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("checkpoint/counterfact/efficacy_top")] == [2, 4]
    metrics = json.loads((out / "metrics.json").read_text())
    logged = events.Scalars("checkpoint/counterfact/efficacy_top")[-1].value
    assert logged == pytest.approx(metrics["checkpoints"][-1]["metrics"]["counterfact"]["efficacy_top"])
    assert "checkpoint/diagnostics/noise_E" in tags and "edit/score" in tags  # DeltaEdit's decision too


def test_a_run_logs_to_wandb_offline(assets, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert main([*run_args(assets, out, 2, checkpoints="2"), "--tracker", "wandb"]) == 0
    # W&B's service process writes its record in the background and completes it when it shuts down, which
    # for the command line is the process's exit; here, inside pytest, shut it down as that exit would
    wandb.teardown()
    runs = list((out / "wandb").glob("offline-run-*"))
    (record,) = runs[0].glob("*.wandb")  # W&B's own record of the run (protobuf): the logged keys are in it
    data = record.read_bytes()
    assert len(runs) == 1 and b"checkpoint/counterfact/efficacy_top" in data and b"edit/target_prob" in data


def test_export_and_undo_read_nothing_a_manifest_names_outside_the_run(assets, finished, tmp_path, capsys):
    """A crafted manifest's stats_corpus could point anywhere; export and undo replay the weights only and never
    compute key statistics, so they read no corpus at all."""
    from deltaedit.methods import DeltaEditConfig

    out = copy_run(finished, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["config"]["stats_corpus"] = str(tmp_path / "outside" / "secret")
    manifest["config_fingerprint"] = DeltaEditConfig.from_dict(manifest["config"]).fingerprint()
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["export", str(out), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    assert main(["undo", str(out), "--edit", "0", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", "--out", str(out), "--resume", "--quiet"]) == 2  # continuing it needs them: named
    assert "stats_corpus" in capsys.readouterr().err
