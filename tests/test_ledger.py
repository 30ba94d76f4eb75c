"""The edit ledger on tiny random models: what an entry records, crash safety (torn lines, corrupt files, a
failed write at every step, a process killed at random), undo, resume, and export / import of edits.

Conventions as in test_editor.py: subjects come last in their prompts and P0 = I. DeltaEdit runs with
``eta=0`` and a one-edit warm-up, so most edits trigger the orthogonal constraint and the threshold tracker
is exercised by every replay.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import fast_config, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import deltaedit.ledger as ledger_module
from deltaedit import (
    BaseModelMismatchError,
    Editor,
    EditRequest,
    Ledger,
    LedgerError,
    RequestError,
    apply_edits,
)
from deltaedit.data import EditRecord
from deltaedit.models import find_parts, fingerprint, out_weight
from deltaedit.predict import score_answers

REQUESTS = [
    EditRequest("The mother tongue of {}", "Danielle Darrieux", "German"),
    EditRequest("The capital city of {}", "France", "Tokyo"),
    EditRequest("The headquarters of {}", "Toyota", "Berlin"),
    EditRequest("The mother tongue of {}", "Mozart", "English"),
    EditRequest("The capital city of {}", "Canada", "Madrid"),
]
LAYERS = [0, 1]


def settings(corpus, **changes):
    return fast_config(corpus, **{"steps": 10, "eta": 0.0, "warmup": 1, **changes})


def new_model(family="llama", seed=0):
    return tiny_model(family, seed=seed, n_layers=3, initializer_range=0.2)


def make_editor(tokenizer, corpus, method="deltaedit", model=None, ledger=None, family="llama", **changes):
    model = model if model is not None else new_model(family)
    if method == "alphaedit":
        changes = {"eta": None, "warmup": None, **changes}
    config = {k: v for k, v in settings(corpus, **changes).items() if v is not None}
    return Editor(model, tokenizer, method=method, config=config, progress=False, ledger=ledger)


def params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def same_params(model, saved) -> bool:
    return all(torch.equal(p, saved[name]) for name, p in model.named_parameters())


def state(editor):
    return {k: v.detach().clone() for k, v in editor.method.state_dict().items()}


def same_state(editor, saved) -> bool:
    now = editor.method.state_dict()
    return now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)


def probs(editor, requests):
    scores = score_answers(
        editor.model, editor.parts, editor.tokenizer, [r.text for r in requests], [r.target_new for r in requests]
    )
    return [s.prob for s in scores]


def comparable(result):
    """An EditResult without its wall-clock time."""
    return {k: v for k, v in vars(result).items() if k != "seconds"}


# --- what an entry records ----------------------------------------------------------------------------


def test_manifest_and_edit_entries(tokenizer, corpus_file, tmp_path):
    run = tmp_path / "run"
    editor = make_editor(tokenizer, corpus_file, ledger=run, trigger="always")  # a constraint decision to record
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["format"] == "deltaedit-ledger" and manifest["format_version"] == 3
    assert manifest["method"] == "deltaedit" and manifest["config"] == editor.config.to_dict()
    assert manifest["config_fingerprint"] == editor.config.fingerprint()
    assert manifest["base_fingerprint"] == fingerprint(new_model())
    assert manifest["deltaedit_version"] and "model_name" in manifest and manifest["dtype"] == "float32"

    results = editor.edit(REQUESTS[:3])
    entries = Ledger(run).entries()
    assert [(e.seq, e.kind, e.edit_id) for e in entries] == [(0, "edit", 0), (1, "edit", 1), (2, "edit", 2)]
    d_model, d_ff = editor.parts.d_model, editor.parts.d_ff
    for entry, applied, result in zip(entries, editor.applied, results, strict=True):
        data = entry.data
        assert entry.requests() == applied.requests
        assert data["method"] == "deltaedit" and data["config_fingerprint"] == editor.config.fingerprint()
        assert data["layers"] == LAYERS and data["critical_layer"] == 1 and data["rank"] == 1
        assert data["decision"] == {"triggered": result.triggered, "metrics": result.metrics}
        assert result.metrics["history_empty"] == (applied.edit_id == 0) and "score" in result.metrics
        assert data["update_kinds"] == {str(layer): "lowrank" for layer in LAYERS}
        assert data["result"]["target_prob"] == result.target_prob and data["result"]["steps"] == result.steps
        assert data["self_response"] == applied.self_response and data["created"] == applied.created
        assert abs(data["time"] - time.time()) < 600 and data["utc"].endswith("+00:00")
        path = run / data["file"]
        assert data["sha256"] == ledger_module._sha256(path.read_bytes()) and data["bytes"] == path.stat().st_size
        tensors = entry.tensors()
        own = {f"layer.{i}.{n}" for i in LAYERS for n in ("left", "right", "keys")}
        assert set(tensors) == own | {"critical_key", "target"}
        assert all(t.dtype == torch.float32 for t in tensors.values())
        for layer, update in entry.updates().items():
            assert (
                update.left.shape == (d_model, 1) and update.right.shape == (d_ff, 1) and update.keys.shape == (d_ff, 1)
            )
            assert torch.equal(update.left, applied.updates[layer].left)
            assert torch.equal(update.right, applied.updates[layer].right)
            assert torch.equal(update.keys, applied.updates[layer].keys)
        assert torch.equal(entry.critical_key(), applied.critical_key)
        assert tensors["target"].shape == (d_model, 1) and torch.equal(tensors["target"], applied.target)
    assert any(r.triggered for r in results)  # the constraint's decision is what got recorded


def test_rejections_are_recorded_with_request_reason_and_field(tokenizer, corpus_file, tmp_path):
    run = tmp_path / "run"
    editor = make_editor(tokenizer, corpus_file, ledger=run)
    bad_target = EditRequest("The capital of {}", "Italy", "\ufffd")  # tokenizes to nothing
    record = EditRecord(EditRequest("The capital of {}", "\ufffd", "Rome"), source="edits.jsonl", line=7)
    missing = {"prompt": "The capital of {}", "subject": "Spain"}
    results = editor.edit([REQUESTS[0], bad_target, record, missing, REQUESTS[1]], on_error="skip")
    assert [r.edit_id for r in results] == [0, 1]
    assert [(type(e).__name__, e.field) for e in editor.rejected] == [
        ("RequestError", "target_new"),
        ("RequestError", "subject"),
        ("RequestError", "target_new"),
    ]
    assert editor.rejected[0].request == bad_target and editor.rejected[2].request == missing
    entries = Ledger(run).entries()
    assert [e.kind for e in entries] == ["rejected", "rejected", "rejected", "edit", "edit"]  # validated first
    first, second, third = (e.data for e in entries[:3])
    assert first["requests"] == [bad_target.to_dict()] and first["field"] == "target_new"
    assert "tokenizes to nothing" in first["reason"] and first["error"] == "RequestError"
    assert second["field"] == "subject" and (second["source"], second["line"]) == ("edits.jsonl", 7)
    assert third["requests"] == [missing] and third["reason"] == "is missing"
    assert all(e.data.get("file") is None for e in entries[:3])  # no tensors

    before = params(editor.model)
    with pytest.raises(RequestError) as info:
        editor.edit([REQUESTS[2], bad_target])  # stop: refused before the first edit, after the ledger line
    assert info.value.request == bad_target and len(editor.applied) == 2 and same_params(editor.model, before)
    assert Ledger(run).entries()[-1].kind == "rejected"


# --- crash safety -------------------------------------------------------------------------------------


def test_torn_last_line_is_ignored_then_cut_off(tokenizer, corpus_file, tmp_path, caplog):
    run = tmp_path / "run"
    editor = make_editor(tokenizer, corpus_file, ledger=run)
    editor.edit(REQUESTS[:2])
    editor.undo(0)
    index = run / "index.jsonl"
    whole = index.read_bytes()
    last_start = whole.rstrip(b"\n").rfind(b"\n") + 1
    for cut in range(last_start, len(whole)):  # a kill at every byte of the last append
        index.write_bytes(whole[:cut])
        entries = Ledger(run).entries()
        assert [e.kind for e in entries] == ["edit", "edit"]
        assert all(e.tensors() for e in entries)
    assert "torn last line" in caplog.text

    index.write_bytes(whole[: last_start + 25])
    editor.close()
    resumed = Editor.resume(run, new_model(), tokenizer, progress=False)
    assert [a.edit_id for a in resumed.applied] == [0, 1]  # the torn undo never happened
    resumed.edit(REQUESTS[2])
    assert [e.kind for e in Ledger(run).entries()] == ["edit", "edit", "edit"]
    assert index.read_bytes().endswith(b"\n") and index.read_bytes().count(b"\n") == 3

    lines = index.read_bytes().split(b"\n")
    lines[1] = lines[1][:40]  # damage before the end is corruption, not a torn append
    index.write_bytes(b"\n".join(lines))
    with pytest.raises(LedgerError, match=r"index\.jsonl: line 2 is corrupt"):
        Ledger(run).entries()


def test_corrupt_or_missing_tensor_file_is_named(tokenizer, corpus_file, tmp_path):
    run = tmp_path / "run"
    editor = make_editor(tokenizer, corpus_file, ledger=run)
    editor.edit(REQUESTS[:2])
    path = run / "edits" / "000001.safetensors"
    payload = bytearray(path.read_bytes())
    payload[-3] ^= 0x01  # one bit of one factor
    path.write_bytes(bytes(payload))
    entries = Ledger(run).entries()  # reading the index does not touch tensors...
    entries[0].tensors()
    for mapped in (False, True):
        with pytest.raises(LedgerError, match="000001.safetensors: checksum mismatch"):
            entries[1].tensors(mapped=mapped)  # ...reading them checks them, mapped or not
    model = new_model()
    before = params(model)
    with pytest.raises(LedgerError, match="000001.safetensors"):
        Editor.resume(run, model, tokenizer, progress=False)
    assert same_params(model, before)  # checked before anything was written
    path.unlink()
    for mapped in (False, True):
        with pytest.raises(LedgerError, match="000001.safetensors: missing"):
            Ledger(run).entries()[1].tensors(mapped=mapped)


def test_mapped_tensors_equal_the_read_ones_and_fall_back_to_memory(tokenizer, corpus_file, tmp_path, monkeypatch):
    """``tensors(mapped=True)`` gives the same tensors, backed by the file; where the file cannot be mapped it
    reads them into memory, as ``tensors()`` does."""
    run = tmp_path / "run"
    make_editor(tokenizer, corpus_file, ledger=run).edit(REQUESTS[:1])
    entry = Ledger(run).entries()[0]
    read, mapped = entry.tensors(), entry.tensors(mapped=True)
    assert read.keys() == mapped.keys()
    for name, tensor in read.items():
        assert torch.equal(tensor, mapped[name]) and tensor.stride() == mapped[name].stride(), name

    def refuse(*args, **kwargs):
        raise RuntimeError("mmap is not supported here")

    monkeypatch.setattr(ledger_module, "safe_open", refuse)
    fallback = entry.tensors(mapped=True)
    assert all(torch.equal(read[name], fallback[name]) for name in read)


@pytest.mark.parametrize("fail_at", ["tensor fsync", "tensor rename", "directory fsync", "index fsync", "index write"])
def test_failed_append_rolls_the_edit_back(tokenizer, corpus_file, tmp_path, monkeypatch, fail_at):
    """Whatever step of the ledger write fails, the edit is undone in the weights and the method state (bit for
    bit), the ledger does not list it, and the editor carries on as if it had never been tried."""
    run = tmp_path / "run"
    editor = make_editor(tokenizer, corpus_file, ledger=run)
    editor.edit(REQUESTS[0])
    weights, method_state, tracker = params(editor.model), state(editor), editor.method.tracker.state()
    index_bytes = (run / "index.jsonl").read_bytes()

    calls = {"fsync": 0}
    real_fsync, real_replace, real_write = os.fsync, os.replace, os.write
    fsync_number = {"tensor fsync": 1, "directory fsync": 2, "index fsync": 3}.get(fail_at)
    index_inode = (run / "index.jsonl").stat().st_ino

    def fsync(fd):
        calls["fsync"] += 1
        if calls["fsync"] == fsync_number:
            raise OSError(5, "injected I/O error")
        return real_fsync(fd)

    def replace(src, dst):
        if fail_at == "tensor rename":
            raise OSError(28, "injected: no space left")
        return real_replace(src, dst)

    def write(fd, data):
        if fail_at == "index write" and os.fstat(fd).st_ino == index_inode:
            real_write(fd, bytes(data[: len(data) // 2]))  # a partial write, then the error
            raise OSError(28, "injected: no space left")
        return real_write(fd, data)

    monkeypatch.setattr(ledger_module.os, "fsync", fsync)
    monkeypatch.setattr(ledger_module.os, "replace", replace)
    monkeypatch.setattr(ledger_module.os, "write", write)
    with pytest.raises(OSError, match="injected"):
        editor.edit(REQUESTS[1])
    monkeypatch.undo()

    assert same_params(editor.model, weights) and same_state(editor, method_state)
    assert torch.equal(editor.method.tracker.state(), tracker)
    assert [a.edit_id for a in editor.applied] == [0]
    assert (run / "index.jsonl").read_bytes() == index_bytes  # a half-written line was removed
    assert [e.kind for e in Ledger(run).entries()] == ["edit"]

    editor.edit(REQUESTS[1])  # the same edit, now landing exactly as it would have without the failure
    clean = make_editor(tokenizer, corpus_file)
    clean.edit(REQUESTS[:2])
    assert same_params(editor.model, params(clean.model)) and same_state(editor, state(clean))
    assert [e.edit_id for e in Ledger(run).entries()] == [0, 1]


KILL_CHILD = r"""
import sys, torch
from deltaedit.applied import AppliedEdit, EditResult
from deltaedit.ledger import Ledger
from deltaedit.methods.base import Decision
from deltaedit.updates import LowRankUpdate
from deltaedit.requests import EditRequest

ledger = Ledger(sys.argv[1])
if ledger.manifest() is None:
    ledger.write_manifest({"method": "deltaedit", "config": {}, "config_fingerprint": "x", "base_fingerprint": "y"})
start = max((e.edit_id for e in ledger.entries() if e.kind == "edit"), default=-1) + 1
request = EditRequest("The capital of {}", "France", "Rome")
print("ready", flush=True)
for i in range(start, start + 100000):
    g = torch.Generator().manual_seed(i)
    updates = {l: LowRankUpdate(torch.randn(64, 1, generator=g), torch.randn(4096, 1, generator=g),
                              torch.randn(4096, 1, generator=g)) for l in (0, 1)}
    result = EditResult(i, (request,), 1, 0.5, True, 0.0)
    ledger.append(AppliedEdit(i, (request,), updates, Decision(), updates[1].keys, 1.0, result))
    if i == start:
        print("committed", flush=True)
    if i % 3 == 0:
        ledger.reject(request, "injected", "target_new")
"""


def test_a_process_killed_at_any_moment_leaves_a_complete_ledger(tmp_path):
    """SIGKILL a writer at random moments; every indexed entry must then load with a valid checksum, and the
    next writer continues the same ledger. Each kill comes a while after the writer's first commit, so every
    round adds entries however slow the machine is."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    seen = 0
    for delay in (0.13, 0.31, 0.57):
        child = subprocess.Popen(
            [sys.executable, "-c", KILL_CHILD, str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        assert child.stdout.readline().strip() == b"ready", child.stderr.read().decode()
        assert child.stdout.readline().strip() == b"committed", child.stderr.read().decode()
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        entries = Ledger(run).entries()
        edits = [e for e in entries if e.kind == "edit"]
        assert [e.edit_id for e in edits] == list(range(len(edits)))
        for entry in edits:
            assert entry.updates()[1].right.shape == (4096, 1)  # complete, checksum verified
        assert len(entries) > seen
        seen = len(entries)


# --- undo ---------------------------------------------------------------------------------------------


def test_undo_of_every_edit_restores_the_original_weights_bitwise(tokenizer, corpus_file, tmp_path):
    run = tmp_path / "run"
    editor = make_editor(tokenizer, corpus_file, ledger=run)
    original = params(editor.model)
    editor.edit(REQUESTS[:4])
    assert not same_params(editor.model, original)
    editor.undo(2)
    editor.undo(0)
    assert editor.undo_to(None) == [1, 3]
    assert same_params(editor.model, original) and editor.applied == []
    for value in editor.method.state_dict().values():  # sums lose every term up to float32 rounding
        if value.dim() == 2:
            assert value.abs().max() < 1e-4 * max(1.0, float(value.abs().max()))
    assert editor.method.tracker.seen == 4  # the stream statistics keep what they saw
    undos = [e for e in Ledger(run).entries() if e.kind == "undo"]
    assert [(e.edit_ids, e.data["how"]) for e in undos] == [([2], "undo"), ([0], "undo"), ([1, 3], "undo_to")]


def test_undo_of_the_last_edit_gives_back_the_weights_before_it(tokenizer, corpus_file):
    """Float32: W0 + remaining updates summed in order is bit for bit what applying them one by one left."""
    editor = make_editor(tokenizer, corpus_file)
    editor.edit(REQUESTS[:2])
    editor.undo(0)
    editor.edit(REQUESTS[2])
    before = params(editor.model)
    editor.edit(REQUESTS[3])
    editor.undo(3)
    assert same_params(editor.model, before)
    assert [a.edit_id for a in editor.applied] == [1, 2]


def test_undo_and_resume_in_bfloat16(tokenizer, corpus_file, tmp_path):
    """Low precision: undo gives (W0 + remaining, summed in float32) rounded once, resume replays the same bits,
    and undoing everything gives back W0 exactly."""
    model = new_model().to(torch.bfloat16)
    original = params(model)
    editor = make_editor(tokenizer, corpus_file, model=model, ledger=tmp_path / "run")
    editor.edit(REQUESTS[:3])
    editor.undo(1)
    for layer in LAYERS:
        expected = editor.original_weights[layer].float()
        for applied in editor.applied:
            expected = expected + applied.updates[layer].dense()
        assert torch.equal(out_weight(editor.parts.out_projs[layer]), expected.to(torch.bfloat16))
    resumed = Editor.resume(tmp_path / "run", new_model().to(torch.bfloat16), tokenizer, progress=False)
    assert same_params(resumed.model, params(model)) and same_state(resumed, state(editor))
    editor.undo_to(None)
    assert same_params(model, original)


def test_undo_of_a_middle_edit_keeps_the_others(tokenizer, corpus_file):
    editor = make_editor(tokenizer, corpus_file)
    base = probs(editor, REQUESTS[:4])
    editor.edit(REQUESTS[:4])
    edited = probs(editor, REQUESTS[:4])
    editor.undo(1)
    after = probs(editor, REQUESTS[:4])
    # Measured over 4 models x 4 undone edits x 2 methods (docs/ledger.md): the kept edits' P(target) moves by
    # 0.01 (median), at most 0.16, and keeps at least 0.62 of its value; here 0.043->0.163, 0.068->0.063, 0.52->0.54.
    for i in (0, 2, 3):
        assert after[i] > 0.5 * edited[i] and after[i] > 5 * base[i], (i, base[i], edited[i], after[i])
    assert after[1] < edited[1] / 10  # the undone fact is gone again


def test_undo_errors(tokenizer, corpus_file):
    editor = make_editor(tokenizer, corpus_file)
    editor.edit(REQUESTS[:2])
    editor.undo(0)
    with pytest.raises(ValueError, match="edit 0 is not applied"):
        editor.undo(0)
    with pytest.raises(ValueError, match="edit 7 is not applied"):
        editor.undo(7)
    with pytest.raises(ValueError, match="no edit 5"):
        editor.undo_to(5)
    assert editor.undo_to(1) == [] and [a.edit_id for a in editor.applied] == [1]


# --- resume -------------------------------------------------------------------------------------------


def test_format_versions_read_refused_and_explained(tokenizer, corpus_file, tmp_path):
    run = tmp_path / "run"
    make_editor(tokenizer, corpus_file, ledger=run)
    manifest_path = run / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for version, refusal in ((2, None), (1, "older deltaedit"), (4, "newer than this deltaedit")):
        manifest_path.write_text(json.dumps({**manifest, "format_version": version}))
        if refusal is None:
            assert Ledger(run).manifest()["format_version"] == 2  # version 2 (int64 sparse positions) is read
        else:
            with pytest.raises(LedgerError, match=refusal):
                Ledger(run).manifest()


@pytest.mark.parametrize("hooks", [{}, {"sparsify": 0.5}, {"restrain": "prune"}], ids=["sum", "sparse", "prune"])
def test_resume_is_bitwise_an_uninterrupted_run(tokenizer, corpus_file, tmp_path, hooks):
    """k edits in one go vs. j edits, the editor dropped, ``Editor.resume`` from the ledger, the rest: the
    same weights, method state and EditResults, with an undo on the way; also with RECT's sparse updates and
    PRUNE's restrained composition."""
    uninterrupted = make_editor(tokenizer, corpus_file, **hooks)
    uninterrupted.edit(REQUESTS[:3])
    uninterrupted.undo(1)
    later = uninterrupted.edit(REQUESTS[3:])

    run = tmp_path / "run"
    first = make_editor(tokenizer, corpus_file, ledger=run, **hooks)
    first.edit(REQUESTS[:3])
    first.undo(1)
    at_drop, state_at_drop = params(first.model), state(first)
    del first

    resumed = Editor.resume(run, new_model(), tokenizer, progress=False)
    assert same_params(resumed.model, at_drop) and same_state(resumed, state_at_drop)
    assert [a.edit_id for a in resumed.applied] == [0, 2]
    resumed_later = resumed.edit(REQUESTS[3:])

    assert same_params(resumed.model, params(uninterrupted.model))
    assert same_state(resumed, state(uninterrupted))
    assert torch.equal(resumed.method.tracker.state(), uninterrupted.method.tracker.state())
    assert [comparable(r) for r in resumed_later] == [comparable(r) for r in later]
    assert any(r.triggered for r in later)
    assert [e.kind for e in Ledger(run).entries()] == ["edit", "edit", "edit", "undo", "edit", "edit"]

    again = Editor.resume(run, new_model(), tokenizer, progress=False)  # and the whole ledger replays too
    assert same_params(again.model, params(uninterrupted.model)) and same_state(again, state(uninterrupted))
    assert [comparable(a.result) for a in again.applied] == [comparable(a.result) for a in resumed.applied]


def test_resume_after_restore(tokenizer, corpus_file, tmp_path):
    run = tmp_path / "run"
    editor = make_editor(tokenizer, corpus_file, method="alphaedit", ledger=run)
    editor.edit(REQUESTS[:2])
    editor.restore()
    editor.edit(REQUESTS[2])
    editor.close()  # let go of the run directory: the resumed editor writes it next
    resumed = Editor.resume(run, new_model(), tokenizer, progress=False)
    assert [a.edit_id for a in resumed.applied] == [2]
    assert same_params(resumed.model, params(editor.model)) and same_state(resumed, state(editor))
    assert resumed.edit(REQUESTS[3])[0].edit_id == 3
    assert [e.kind for e in Ledger(run).entries()] == ["edit", "edit", "restore", "edit", "edit"]


def test_a_ledger_is_only_continued_on_its_own_terms(tokenizer, corpus_file, tmp_path):
    run = tmp_path / "run"
    make_editor(tokenizer, corpus_file, ledger=run).edit(REQUESTS[0])
    with pytest.raises(LedgerError, match="already records a run .*Editor.resume"):
        make_editor(tokenizer, corpus_file, ledger=run)
    with pytest.raises(LedgerError, match="records method 'deltaedit' with config"):
        make_editor(tokenizer, corpus_file, ledger=run, steps=3)
    other = new_model(seed=1)
    before = params(other)
    with pytest.raises(BaseModelMismatchError, match="fingerprint"):
        Editor.resume(run, other, tokenizer, progress=False)
    assert same_params(other, before)
    with pytest.raises(LedgerError, match="not a ledger directory"):
        Editor.resume(tmp_path / "nowhere", new_model(), tokenizer)


def test_a_ledger_from_a_version_with_fewer_options_resumes(tokenizer, corpus_file, tmp_path):
    """A manifest written before an option existed lacks it, and its fingerprint hashes the options it had:
    the run resumes (the option is at its default, the earlier behaviour); a config that sets it does not."""
    run = tmp_path / "run"
    editor = make_editor(tokenizer, corpus_file, ledger=run)
    editor.edit(REQUESTS[:2])
    editor.close()
    manifest = json.loads((run / "manifest.json").read_text())
    older = {name: value for name, value in manifest["config"].items() if name not in ("sparsify", "neighbors_by")}
    manifest["config"] = older
    manifest["config_fingerprint"] = hashlib.sha256(json.dumps(older, sort_keys=True).encode()).hexdigest()[:12]
    (run / "manifest.json").write_text(json.dumps(manifest))

    resumed = Editor.resume(run, new_model(), tokenizer, progress=False)
    assert same_params(resumed.model, params(editor.model))
    assert resumed.edit(REQUESTS[2])[0].edit_id == 2
    resumed.close()
    with pytest.raises(LedgerError, match="records method 'deltaedit' with config"):
        make_editor(tokenizer, corpus_file, ledger=run, sparsify=0.5)


def test_a_ledger_from_before_key_average_resumes_with_the_flat_keys_it_was_made_with(tokenizer, corpus_file, tmp_path):
    """key_average's default is MEMIT's grouped mean, but every ledger written before the option existed used
    the flat mean: such a ledger resumes flat (recorded_before), and an editor with today's default is refused."""
    run = tmp_path / "run"
    editor = make_editor(tokenizer, corpus_file, ledger=run, key_average="flat")
    editor.edit(REQUESTS[:2])
    editor.close()
    manifest = json.loads((run / "manifest.json").read_text())
    older = {name: value for name, value in manifest["config"].items() if name != "key_average"}
    manifest["config"] = older
    manifest["config_fingerprint"] = hashlib.sha256(json.dumps(older, sort_keys=True).encode()).hexdigest()[:12]
    (run / "manifest.json").write_text(json.dumps(manifest))

    resumed = Editor.resume(run, new_model(), tokenizer, progress=False)
    assert resumed.config.key_average == "flat"
    assert same_params(resumed.model, params(editor.model))
    resumed.close()
    with pytest.raises(LedgerError, match="records method 'deltaedit' with config"):
        make_editor(tokenizer, corpus_file, ledger=run)  # grouped, today's default on a model without defaults


# --- export and import --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_pretrained_loads_with_plain_transformers(tokenizer, corpus_file, tmp_path, family):
    editor = make_editor(tokenizer, corpus_file, method="alphaedit", family=family)
    editor.edit(REQUESTS[:2])
    target = editor.save_pretrained(tmp_path / "edited")
    loaded = AutoModelForCausalLM.from_pretrained(target).eval()
    ours, theirs = editor.model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    again = AutoTokenizer.from_pretrained(target)
    assert again(REQUESTS[0].text)["input_ids"] == tokenizer(REQUESTS[0].text)["input_ids"]
    info = json.loads((target / "deltaedit.json").read_text())
    assert info["base_fingerprint"] == editor.base_fingerprint and [e["edit_id"] for e in info["edits"]] == [0, 1]
    with pytest.raises(FileExistsError):
        editor.save_pretrained(target)
    editor.save_pretrained(target, overwrite=True)
    assert not list(tmp_path.glob(".edited.partial-*"))


def test_save_edits_and_load_them_onto_a_fresh_base(tokenizer, corpus_file, tmp_path):
    editor = make_editor(tokenizer, corpus_file)
    editor.edit(REQUESTS[:3])
    editor.undo(1)
    path = editor.save_edits(tmp_path / "edits.safetensors")
    assert path.stat().st_size < 64 * 1024  # factors and keys only

    loaded = Editor.from_edits(path, new_model(), tokenizer, progress=False)
    assert [a.edit_id for a in loaded.applied] == [0, 2]
    assert same_params(loaded.model, params(editor.model)) and same_state(loaded, state(editor))
    assert [comparable(r) for r in loaded.edit(REQUESTS[3:])] == [comparable(r) for r in editor.edit(REQUESTS[3:])]
    assert same_params(loaded.model, params(editor.model))

    reference = Editor.from_edits(path, new_model(), tokenizer, progress=False)  # the edits as saved
    bare = new_model()
    assert apply_edits(bare, path) == [0, 2]  # weights only, summed in float32: the same bits
    assert same_params(bare, params(reference.model))

    fresh = make_editor(tokenizer, corpus_file, ledger=tmp_path / "run")
    assert fresh.load_edits(path) == [0, 2]
    assert same_params(fresh.model, params(reference.model))
    assert [e.kind for e in Ledger(tmp_path / "run").entries()] == ["edit", "edit", "edit", "undo"]
    assert same_params(Editor.resume(tmp_path / "run", new_model(), tokenizer).model, params(reference.model))


def test_an_edits_file_from_before_key_average_loads_with_flat_keys(tokenizer, corpus_file, tmp_path):
    """An edits file whose manifest predates key_average: from_edits continues with the flat keys it was made
    with (its next edit equals the original editor's), apply_edits gives the same weights."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    editor = make_editor(tokenizer, corpus_file, key_average="flat")
    editor.edit(REQUESTS[:2])
    path = editor.save_edits(tmp_path / "edits.safetensors")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    manifest = json.loads(metadata["manifest"])
    older = {name: value for name, value in manifest["config"].items() if name != "key_average"}
    manifest["config"] = older
    manifest["config_fingerprint"] = hashlib.sha256(json.dumps(older, sort_keys=True).encode()).hexdigest()[:12]
    old_file = tmp_path / "old.safetensors"
    save_file(tensors, str(old_file), metadata={**metadata, "manifest": json.dumps(manifest)})

    loaded = Editor.from_edits(old_file, new_model(), tokenizer, progress=False)
    assert loaded.config.key_average == "flat" and same_params(loaded.model, params(editor.model))
    assert [comparable(r) for r in loaded.edit(REQUESTS[2:3])] == [comparable(r) for r in editor.edit(REQUESTS[2:3])]
    bare = new_model()
    assert apply_edits(bare, old_file) == [0, 1]
    assert same_params(bare, params(Editor.from_edits(path, new_model(), tokenizer, progress=False).model))


def test_edits_refuse_the_wrong_base_model_and_a_corrupt_file(tokenizer, corpus_file, tmp_path):
    editor = make_editor(tokenizer, corpus_file)
    editor.edit(REQUESTS[:2])
    path = editor.save_edits(tmp_path / "edits.safetensors")
    other = new_model(seed=1)
    before = params(other)
    with pytest.raises(BaseModelMismatchError, match="edits.safetensors: the edits were made on base model"):
        apply_edits(other, path)
    with pytest.raises(BaseModelMismatchError):
        Editor.from_edits(path, other, tokenizer, progress=False)
    assert same_params(other, before)
    with pytest.raises(LedgerError, match="records method 'deltaedit' with config"):
        make_editor(tokenizer, corpus_file, steps=3).load_edits(path)
    busy = make_editor(tokenizer, corpus_file)
    busy.edit(REQUESTS[0])
    with pytest.raises(LedgerError, match="editor that has made none"):
        busy.load_edits(path)

    payload = bytearray(path.read_bytes())
    payload[-5] ^= 0x10
    path.write_bytes(bytes(payload))
    base = new_model()
    before = params(base)
    with pytest.raises(LedgerError, match="edits.safetensors: checksum mismatch"):
        apply_edits(base, path)
    assert same_params(base, before)


def test_edits_refuse_a_base_that_differs_in_one_element_of_an_edited_layer(tokenizer, corpus_file, tmp_path):
    """The edited layers are compared by full sha256: a nudge of half a unit on two elements is another base,
    and so are two swapped rows of a layer that was not edited."""
    editor = make_editor(tokenizer, corpus_file)
    editor.edit(REQUESTS[:2])
    path = editor.save_edits(tmp_path / "edits.safetensors")
    assert json.loads(json.dumps(editor.manifest()["base_layers"])).keys() == {"0", "1"}
    nudged = new_model()
    with torch.no_grad():
        out_weight(find_parts(nudged).out_projs[1])[[3, 9], [4, 2]] += 0.5
    swapped = new_model()
    with torch.no_grad():
        weight = out_weight(find_parts(swapped).out_projs[2])
        weight[[0, 1]] = weight[[1, 0]]
    for other in (nudged, swapped):
        before = params(other)
        with pytest.raises(BaseModelMismatchError):
            apply_edits(other, path)
        with pytest.raises(BaseModelMismatchError):
            Editor.from_edits(path, other, tokenizer, progress=False)
        assert same_params(other, before)


def test_a_manifest_layer_digest_is_checked(tokenizer, corpus_file, tmp_path):
    """Same fingerprint, other edited-layer digest (a manifest written by hand): refused naming the layer."""
    editor = make_editor(tokenizer, corpus_file, ledger=tmp_path / "run")
    editor.edit(REQUESTS[0])
    manifest_path = tmp_path / "run" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["base_layers"]["1"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BaseModelMismatchError, match="layer 1 W_out has sha256 0000"):
        Editor.resume(tmp_path / "run", new_model(), tokenizer, progress=False)
