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
