"""The contract every registered method keeps, whatever it computes (parametrised over ``METHODS``, so a new
method is held to it by adding its registry line):

* an edit changes only the method's layers and is recorded in the ledger; a rejected request changes nothing;
* ``undo`` and ``undo_to`` give back the weights as the method composes the remaining updates, and
  ``undo_to(None)`` the unedited weights, bit for bit;
* a reset and replay (``Editor.resume`` on a fresh base model) rebuilds weights and running state bit for bit;
* ``save_edits`` / ``from_edits`` / ``apply_edits`` round-trip bit for bit;
* a ``deltaedit run`` killed with SIGKILL and resumed ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_ledger import REQUESTS as LEDGER_REQUESTS
from test_ledger import params, same_params, same_state, state
from test_run import (
    base_model,
    child_env,  # noqa: F401  (kept importable for the kill helper)
    kill_mid_run,
    make_assets,
    overrides,
    set_args,
)

from deltaedit import Editor, Ledger, RequestError, apply_edits
from deltaedit.cli import main
from deltaedit.diagnostics import diagnose
from deltaedit.ledger import LedgerEntry
from deltaedit.methods import METHODS
from deltaedit.models import find_parts, out_weight
from deltaedit.updates import DenseUpdate

REQUESTS = LEDGER_REQUESTS[:3]
SINGLE_LAYER = {"ft", "rome"}


def options(method: str, corpus) -> dict:
    """Fast options for a tiny model, only those the method has."""
    values = overrides(corpus)
    if method in SINGLE_LAYER:
        values["layers"] = [1]
    if method == "ft":
        values.update(lr=0.05, norm_constraint=1.0, steps=8)
    fields = {f.name for f in dataclasses.fields(METHODS[method].config_class)}
    return {k: v for k, v in values.items() if k in fields}


def new_model():
    return tiny_model("llama", n_layers=3, initializer_range=0.2)


def make_editor(method, tokenizer, corpus, model=None, **kwargs):
    return Editor(model or new_model(), tokenizer, method, options(method, corpus), progress=False, **kwargs)


def layer_weights(editor) -> dict[int, torch.Tensor]:
    return {i: out_weight(p).detach().clone() for i, p in enumerate(editor.parts.out_projs)}


@pytest.fixture(params=sorted(METHODS))
def method(request):
    return request.param


def test_edit_undo_and_undo_to(method, tokenizer, corpus_file, tmp_path):
    editor = make_editor(method, tokenizer, corpus_file, ledger=tmp_path / "run")
    untouched = layer_weights(editor)
    results = editor.edit(REQUESTS)
    assert [r.edit_id for r in results] == [0, 1, 2]
    after = layer_weights(editor)
    changed = {i for i in after if not torch.equal(after[i], untouched[i])}
    assert changed == set(editor.config.layers)  # its layers and no others

    before_bad = params(editor.model)
    with pytest.raises(RequestError):
        editor.edit({"prompt": "The capital city of {}", "subject": "France"})  # no target_new
    assert same_params(editor.model, before_bad)
    assert [e.kind for e in Ledger(tmp_path / "run").entries()] == ["edit"] * 3 + ["rejected"]

    editor.undo(1)
    expected = {
        layer: editor.method.compose(layer, editor.original_weights[layer], [a.updates[layer] for a in editor.applied])
        for layer in editor.config.layers
    }
    for layer, weight in expected.items():
        assert torch.equal(out_weight(editor.parts.out_projs[layer]), weight.to(weight.dtype))
    assert editor.undo_to(None) == [0, 2]
    assert all(torch.equal(layer_weights(editor)[i], untouched[i]) for i in untouched)


def test_resume_replays_weights_and_state_bit_for_bit(method, tokenizer, corpus_file, tmp_path):
    editor = make_editor(method, tokenizer, corpus_file, ledger=tmp_path / "run")
    editor.edit(REQUESTS)
    editor.undo(0)
    saved, saved_state = params(editor.model), state(editor)
    again = Editor.resume(tmp_path / "run", new_model(), tokenizer, progress=False)
    assert same_params(again.model, saved) and same_state(again, saved_state)
    assert [a.edit_id for a in again.applied] == [1, 2]


def test_save_edits_from_edits_and_apply_edits_round_trip(method, tokenizer, corpus_file, tmp_path):
    editor = make_editor(method, tokenizer, corpus_file)
    editor.edit(REQUESTS[:2])
    path = editor.save_edits(tmp_path / "edits.safetensors")
    loaded = Editor.from_edits(path, new_model(), tokenizer, progress=False)
    assert same_params(loaded.model, params(editor.model)) and same_state(loaded, state(editor))
    bare = new_model()
    assert apply_edits(bare, path) == [0, 1]
    assert same_params(bare, params(editor.model))


def test_a_killed_run_resumes_to_the_uninterrupted_weights(method, tokenizer, tmp_path):
    assets = make_assets(tmp_path / "assets", tokenizer)
    values = {**options(method, assets.corpus), "stop_prob": 1.0} if method != "ft" else options(method, assets.corpus)
    values.pop("stats_corpus", None)

    def args(out):
        command = ["run", "--model", str(assets.model), "--dataset", str(assets.dataset), "--method", method]
        command += ["--n-edits", "5", "--out", str(out), "--checkpoints", "2", "--device", "cpu", "--quiet"]
        if "stats_corpus" in {f.name for f in dataclasses.fields(METHODS[method].config_class)}:
            command += ["--set", f"stats_corpus={assets.corpus}"]
        return command + set_args(values)

    reference, killed = tmp_path / "A" / "run", tmp_path / "B" / "run"
    assert main(args(reference)) == 0
    done = kill_mid_run(args(killed), killed, tmp_path / "child.log", at_least=1)
    assert 1 <= done <= 5
    assert main(["run", "--out", str(killed), "--resume", "--quiet"]) == 0
    first = Editor.resume(reference, base_model(assets)[0], base_model(assets)[1], progress=False)
    second = Editor.resume(killed, base_model(assets)[0], base_model(assets)[1], progress=False)
    for layer in first.config.layers:
        assert torch.equal(
            out_weight(find_parts(first.model).out_projs[layer]), out_weight(find_parts(second.model).out_projs[layer])
        ), layer


def _mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory map holds ``tensor``'s data (Linux's /proc/self/maps), None for ordinary memory."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the memory maps of Linux's /proc")
@pytest.mark.parametrize("method", ["ft", "rect"])
def test_layer_sized_updates_are_held_by_their_ledger_files(method, tokenizer, corpus_file, tmp_path):
    """FT's dense and RECT's sparse updates are as large as a layer: once an edit is in the ledger its update
    is read from its own file (mapped) instead of kept in memory, live and after a resume, with the same
    weights, undo and diagnostics as before."""
    editor = make_editor(method, tokenizer, corpus_file, ledger=tmp_path / "run")
    editor.edit(REQUESTS)
    in_memory = make_editor(method, tokenizer, corpus_file)  # no ledger: nothing to map
    in_memory.edit(REQUESTS)

    def backing(ed) -> dict[tuple[int, str], str | None]:
        return {
            (a.edit_id, name): _mapped_file(getattr(update, name))
            for a in ed.applied
            for update in a.updates.values()
            for name in update.layer_sized
        }

    for (edit_id, _), path in backing(editor).items():
        assert path is not None and path.endswith(f"edits/{edit_id:06d}.safetensors"), path
    assert set(backing(in_memory).values()) == {None}
    assert same_params(editor.model, params(in_memory.model))
    assert diagnose(editor) == diagnose(in_memory) == diagnose(editor)  # the second time from the kept self terms

    editor.undo(1)
    in_memory.undo(1)
    assert same_params(editor.model, params(in_memory.model))
    again = Editor.resume(tmp_path / "run", new_model(), tokenizer, progress=False)
    assert same_params(again.model, params(in_memory.model))
    assert all(path is not None for path in backing(again).values()) and backing(again)
    saved = in_memory.save_edits(tmp_path / "edits.safetensors")  # edits recorded into a new ledger: mapped too
    loaded = Editor.from_edits(saved, new_model(), tokenizer, ledger=tmp_path / "copy", progress=False)
    assert all(path is not None and "/copy/edits/" in path for path in backing(loaded).values()) and backing(loaded)


def test_an_edit_stays_made_when_its_file_cannot_be_held(tokenizer, corpus_file, tmp_path, monkeypatch, caplog):
    """Holding an update in its ledger file only saves memory: if reading the file back fails after the edit
    is recorded, the edit stays made and tracked, in memory, and the next edits go on."""
    editor = make_editor("ft", tokenizer, corpus_file, ledger=tmp_path / "run")
    reference = make_editor("ft", tokenizer, corpus_file)

    def fail(self, mapped=False):
        raise OSError("the disk went away")

    with monkeypatch.context() as patched:
        patched.setattr(LedgerEntry, "tensors", fail)
        editor.edit(REQUESTS[0])
    assert "edit 0 stays in memory" in caplog.text
    editor.edit(REQUESTS[1:])
    reference.edit(REQUESTS)
    assert [a.edit_id for a in editor.applied] == [0, 1, 2]
    assert same_params(editor.model, params(reference.model))
    assert _mapped_file(editor.applied[0].updates[1].delta) is None  # kept in memory
    assert _mapped_file(editor.applied[1].updates[1].delta) is not None


def test_a_dense_update_responds_the_same_from_an_unaligned_copy():
    """A tensor mapped from a file is aligned to 8 bytes only; its products must round as the allocated
    tensor's do."""
    generator = torch.Generator().manual_seed(0)
    delta, keys = torch.randn(64, 96, generator=generator), torch.randn(96, 1, generator=generator)
    buffer = torch.empty(delta.numel() + 6)
    unaligned = buffer[6:].view(64, 96)  # 24 bytes past an aligned start
    unaligned.copy_(delta)
    assert unaligned.data_ptr() % 64 != 0
    assert torch.equal(DenseUpdate(unaligned, keys).response(keys), DenseUpdate(delta, keys).response(keys))
