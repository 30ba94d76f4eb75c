"""Key statistics as an artefact: a killed pass resumes to the same bits, and statistics are listed, exported
and imported only onto the model and layers they were computed for (stats.py, `deltaedit stats`)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from test_run import make_assets

import deltaedit.stats as stats
from deltaedit.cli import main
from deltaedit.corpus import resolve_corpus
from deltaedit.models import find_parts, fingerprint, load_model


def compute(model, tokenizer, corpus_file, store, layers=(0, 1), **kwargs):
    parts = find_parts(model)
    corpus = resolve_corpus(str(corpus_file))
    return stats.second_moments(
        model, parts, tokenizer, layers, corpus, 64, 32, fingerprint(model), batch_size=4, progress=False,
        store=store, **kwargs,
    )  # fmt: skip


def test_a_killed_pass_resumes_to_the_same_bits(tokenizer, corpus_file, tmp_path, monkeypatch):
    model = tiny_model("llama", n_layers=3)
    whole = compute(model, tokenizer, corpus_file, tmp_path / "a")
    monkeypatch.setattr(stats, "SAVE_EVERY", 2)
    real = stats.capture_inputs
    calls = {"n": 0}

    def dies_after_five(modules):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt  # a kill after five batches (saved after two and four)
        return real(modules)

    monkeypatch.setattr(stats, "capture_inputs", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        compute(model, tokenizer, corpus_file, tmp_path / "b")
    assert list((tmp_path / "b").glob(".*.partial")) and not list((tmp_path / "b").glob("*.safetensors"))
    monkeypatch.setattr(stats, "capture_inputs", real)
    calls["n"] = 0
    resumed = compute(model, tokenizer, corpus_file, tmp_path / "b")
    assert all(torch.equal(resumed[i], whole[i]) for i in whole)
    assert not list((tmp_path / "b").glob(".*.partial"))


def test_cached_statistics_are_read_while_another_process_computes(tokenizer, corpus_file, tmp_path):
    """The store's lock is the model's: a run whose layers are cached reads them at once instead of waiting
    for another process's pass over other layers; a missing layer still waits for the lock."""
    import subprocess
    import sys
    import threading

    model = tiny_model("llama", n_layers=3)
    store = tmp_path / "store"
    first = compute(model, tokenizer, corpus_file, store, layers=(0,))
    lock = store / f"{fingerprint(model)}.lock"
    holder = subprocess.Popen(  # another process inside its computation: it holds the lock
        [sys.executable, "-c", f"from filelock import FileLock; l = FileLock({str(lock)!r}); l.acquire(); "
         "print('held', flush=True); import time; time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        found: dict = {}
        for name, layers in (("cached", (0,)), ("missing", (1,))):
            worker = threading.Thread(
                target=lambda name=name, layers=layers: found.update(
                    {name: compute(model, tokenizer, corpus_file, store, layers=layers)}
                ),
                daemon=True,
            )
            worker.start()
            worker.join(timeout=30 if name == "cached" else 3)
        assert torch.equal(found["cached"][0], first[0])  # read without the lock
        assert "missing" not in found  # layer 1 must be computed: that waits for the holder
    finally:
        holder.kill()
        holder.wait()
    worker.join(timeout=60)
    assert set(found["missing"]) == {1}


def test_export_and_import_onto_the_same_model_only(tokenizer, corpus_file, tmp_path):
    model = tiny_model("llama", n_layers=3)
    moments = compute(model, tokenizer, corpus_file, tmp_path / "a")
    entries = stats.list_entries(tmp_path / "a", fingerprint(model))
    assert [(e.layer, e.samples, e.max_length, e.dtype) for e in entries] == [
        (0, 64, 32, "torch.float32"),
        (1, 64, 32, "torch.float32"),
    ]
    assert entries[0].tokens > 0 and entries[0].corpus.endswith("corpus.txt")
    bundle = stats.export_bundle(entries, tmp_path / "stats.safetensors")

    written = stats.import_bundle(bundle, fingerprint(model), find_parts(model).d_ff, [0, 1], tmp_path / "b")
    assert [e.path.name for e in written] == [e.path.name for e in entries]  # the same cache keys
    again = compute(model, tokenizer, corpus_file, tmp_path / "b")  # read from the import, not recomputed
    assert all(torch.equal(again[i], moments[i]) for i in moments)

    other = tiny_model("llama", n_layers=3, seed=9)
    with pytest.raises(stats.StatsError, match="fingerprint .* but this model's is"):
        stats.import_bundle(bundle, fingerprint(other), 64, None, tmp_path / "c")
    with pytest.raises(stats.StatsError, match="holds layer 1, not one of the layers asked for"):
        stats.import_bundle(bundle, fingerprint(model), 64, [0], tmp_path / "c")
    with pytest.raises(stats.StatsError, match="no statistics for layers \\[2\\]"):
        stats.import_bundle(bundle, fingerprint(model), 64, [0, 1, 2], tmp_path / "c")
    assert not (tmp_path / "c").exists()  # refused: nothing written

    tensors = load_file(str(bundle))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + torch.triu(torch.ones_like(tensors[name]), 1)  # no longer symmetric
    from safetensors import safe_open

    with safe_open(str(bundle), "pt") as f:
        meta = f.metadata()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(stats.StatsError, match="not symmetric"):
        stats.import_bundle(tmp_path / "bad.safetensors", fingerprint(model), 64, None, tmp_path / "c")


def test_stats_commands(tokenizer, tmp_path, capsys, monkeypatch):
    assets = make_assets(tmp_path / "assets", tokenizer)
    monkeypatch.setenv("DELTAEDIT_CACHE", str(tmp_path / "cache"))
    base = ["--model", str(assets.model), "--quiet"]
    compute_args = ["stats", "compute", *base, "--layers", "0,1", "--corpus", str(assets.corpus)]
    assert main([*compute_args, "--samples", "40", "--max-length", "16", "--device", "cpu"]) == 0
    assert "are cached" in capsys.readouterr().out
    assert main(["stats", "list"]) == 0
    listing = capsys.readouterr().out
    assert listing.count("corpus.txt") == 2 and "2 cached in" in listing
    out = tmp_path / "shared.safetensors"
    assert main(["stats", "export", *base, "--out", str(out)]) == 0
    monkeypatch.setenv("DELTAEDIT_CACHE", str(tmp_path / "elsewhere"))
    assert main(["stats", "import", str(out), *base, "--layers", "0,1"]) == 0
    assert "imported the statistics of layers [0, 1]" in capsys.readouterr().out
    assert main(["stats", "list"]) == 0 and "2 cached in" in capsys.readouterr().out
    other = tmp_path / "other"
    tiny_model("llama", n_layers=3, seed=5).save_pretrained(other)
    tokenizer.save_pretrained(other)
    assert main(["stats", "import", str(out), "--model", str(other), "--quiet"]) == 2
    assert "statistics only fit the model they were computed on" in capsys.readouterr().err
    assert load_model(str(other), device="cpu")  # untouched
