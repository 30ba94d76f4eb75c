"""Model health (health.py): the figures on hand-computed cases, label-word scoring on a tiny model whose logits
we set, a zero shift for an unedited model, and a run with --health end to end on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_run import make_assets, make_spec
from transformers import AutoModelForCausalLM

from deltaedit.cli import checkpoint_summary
from deltaedit.data import DATA_ENV
from deltaedit.health import (
    TASKS,
    HealthProbe,
    HealthSettings,
    cache_baseline,
    label_predictions,
    label_scores,
    load_cached_baseline,
    mean_cosine_distance,
    mmd,
    ngram_entropy,
    perplexity,
)
from deltaedit.health import f1 as task_f1
from deltaedit.models import cache_dir, find_parts
from deltaedit.report import write_report
from deltaedit.run import run
from deltaedit.tokens import first_tokens, length_batches


def test_ngram_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab -> p = 2/3, 1/3: H2 = 0.9183; trigrams aba, bab -> H3 = 1
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("the the the the the") == 0.0  # a repeated word: no information
    assert ngram_entropy("") == 0.0


def test_macro_f1_by_hand():
    task = TASKS["cola"]
    # labels 1,1,0,0; predicted 1,0,0,0: class 1 F1 = 2/3, class 0: precision 2/3, recall 1 -> 0.8
    assert task_f1(["1", "1", "0", "0"], ["1", "0", "0", "0"], task) == pytest.approx((2 / 3 + 0.8) / 2)
    assert task_f1(["1", "0"], ["0", "0"], task) == pytest.approx((0 + 2 / 3) / 2)  # one label always: not zero


def test_representation_distances_by_hand():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert mean_cosine_distance(a, a) == 0.0 and mmd(a, a, 1.0) == pytest.approx(0.0, abs=1e-12)
    b = np.array([[0.0, 1.0], [0.0, 2.0]])  # the first point turned by 90 degrees
    assert mean_cosine_distance(a, b) == pytest.approx(0.5)
    # far apart clouds: k(a, a') terms stay, the cross terms vanish: mmd = mean k(a,a) + mean k(b,b)
    within = (1 + math.exp(-5 / 2)) / 2  # points 1 and 2 of a lie sqrt(5) apart, bandwidth 1
    assert mmd(a, a + 100.0, 1.0) == pytest.approx(2 * within, rel=1e-6)
    assert mmd(a, a + 100.0, 1.0) > mmd(a, a + 0.1, 1.0) > 0


def test_label_scores_follow_logits_we_set(tokenizer):
    """The final norm is made to output ones and the unembedding rows set, so the logits after any prompt are
    ours: " positive" scores 2, " negative" 1, everything else 0."""
    model = tiny_model("llama", seed=1)
    parts = find_parts(model)
    words = [" positive", " negative"]
    pos, neg = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words)
    with torch.no_grad():
        parts.unembed.weight.zero_()
        parts.unembed.weight[pos] = 2.0 / 32
        parts.unembed.weight[neg] = 1.0 / 32
    model.model.norm.register_forward_hook(lambda _m, _a, out: torch.ones_like(out))
    queries = ["Review: The city is old\nAnswer:", "Review: Paris\nAnswer:"]
    others = parts.unembed.weight.shape[0] - 2
    expected_pos = 2 - math.log(math.exp(2) + math.exp(1) + others)
    for head in ("", "Is it positive or negative ?\n\n"):
        scores = label_scores(model, parts, tokenizer, queries, words, head)
        assert scores[:, 0].tolist() == pytest.approx([expected_pos] * 2, abs=1e-4)
        assert scores[:, 1].tolist() == pytest.approx([expected_pos - 1] * 2, abs=1e-4)
        assert label_predictions(scores) == [0, 0]
    # calibration: with the content-free row subtracted, the row that beats it by more wins
    assert label_predictions(torch.tensor([[0.0, -1.0], [0.0, -3.0]]), torch.tensor([0.0, -2.0])) == [1, 0]


def test_a_cached_head_scores_what_the_joined_prompt_scores(tokenizer):
    model = tiny_model("llama", seed=3)
    parts = find_parts(model)
    words = [" positive", " negative"]
    queries = ["Review: The city is old\nAnswer:", "Review: Paris\nAnswer:", "Review: He lived there\nAnswer:"]
    cached = label_scores(model, parts, tokenizer, queries, words, "Head . ", batch_size=2)
    head_ids = tokenizer("Head . ")["input_ids"]
    joined = []
    for q in queries:  # the same ids, one forward each
        ids = head_ids + tokenizer(q, add_special_tokens=False)["input_ids"]
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        firsts = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
        joined.append(torch.log_softmax(logits, -1)[firsts])
    assert torch.allclose(cached, torch.stack(joined).detach(), atol=1e-4)
    # a token budget that allows one row per pass: batches differ, the scores do not
    one_by_one = label_scores(model, parts, tokenizer, queries, words, "Head . ", batch_size=3, batch_tokens=1)
    assert torch.allclose(one_by_one, cached, atol=1e-5)


def test_length_batches_bound_rows_and_padded_tokens():
    lengths = [5, 1, 3, 10]  # shortest first: 1, 3, 5, 10
    assert length_batches(lengths, max_rows=2, max_tokens=8) == [[1, 2], [0], [3]]  # 2 x 3 fits, 2 x 5 does not
    assert length_batches(lengths, max_rows=2, max_tokens=8, shared=2) == [[1], [2], [0], [3]]  # 2 x (2 + 3) > 8
    assert length_batches(lengths, max_rows=4, max_tokens=100) == [[1, 2, 0, 3]]
    assert length_batches([], max_rows=4, max_tokens=100) == []


def test_first_tokens_match_the_whole_texts_tokens(tokenizer):
    text = "".join(f" The city of Paris is old . line {i}\n" for i in range(40))
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    for n in (1, 7, 50, 200, len(whole), len(whole) + 10):
        assert first_tokens(tokenizer, text, n, margin=4) == whole[:n]
    late = " Paris\n" + " The city is old ." * 60 + "\n The end"  # the first cuts hold one line: the prefix grows
    assert first_tokens(tokenizer, late, 10, margin=4) == tokenizer(late, add_special_tokens=False)["input_ids"][:10]


def health_data(root):
    """A data folder with tiny general/, wikitext-2/ and known/ files (words of the test vocabulary)."""
    (root / "general").mkdir(parents=True)
    sentences = ["The city is old", "The lake is small", "Paris is a city", "The river is large", "He lived there"]
    rows = {
        "cola": [{"sentence": s, "label": i % 2} for i, s in enumerate(sentences * 3)],
        "sst2": [{"sentence": s, "label": i % 2} for i, s in enumerate(sentences * 3)],
        "mrpc": [{"sentence1": s, "sentence2": s, "label": i % 2} for i, s in enumerate(sentences * 3)],
        "rte": [{"sentence1": s, "sentence2": s, "label": i % 2} for i, s in enumerate(sentences * 3)],
        "nli": [
            {"sentence1": s, "sentence2": s, "label": ["entailment", "not_entailment"][i % 2]}
            for i, s in enumerate(sentences * 3)
        ],
        "mmlu": [
            {"question": s, "subject": "geography", "choices": ["Paris", "Rome", "Tokyo", "Berlin"], "answer": i % 4}
            for i, s in enumerate(sentences * 3)
        ],
    }
    for name, items in rows.items():
        (root / "general" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    (root / "wikitext-2").mkdir()
    (root / "wikitext-2" / "test.txt").write_text(" The city is old . " * 60)
    (root / "known").mkdir()
    known = [{"prompt": f"{s} in", "subject": s.split()[-1]} for s in sentences * 4]
    (root / "known" / "known_1000.json").write_text(json.dumps(known))
    return root


SMALL = {"examples": 6, "shots": 2, "fluency_prompts": 3, "fluency_tokens": 5, "ppl_tokens": 64, "ppl_window": 16}


def test_perplexity_in_chunks_is_the_language_model_loss_of_each_window(tokenizer):
    """Windows of 5 tokens, the last one shorter (padded in its batch), unembedded 3 positions at a time: the
    same figure as the model's own loss on each window alone."""
    model = tiny_model("llama", seed=3)
    text = "The capital of France is Paris and the capital of Italy is Rome"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) % 5 not in (0, 1)  # a short last window that still has a target
    total = count = 0
    with torch.no_grad():
        for begin in range(0, len(ids), 5):
            window = torch.tensor([ids[begin : begin + 5]])
            n = window.shape[1] - 1
            total += model(input_ids=window, labels=window).loss.item() * n
            count += n
    found = perplexity(model, find_parts(model), tokenizer, text, len(ids), window=5, batch_size=2, chunk=3)
    assert found == pytest.approx(math.exp(total / count), rel=1e-5)


def test_an_unedited_model_has_no_shift_and_no_f1_change(tokenizer, tmp_path):
    model = tiny_model("llama", seed=2)
    parts = find_parts(model)
    probe = HealthProbe(tokenizer, str(health_data(tmp_path / "data")), [1, 2], HealthSettings(**SMALL, known=12))
    from test_run import RECORDS

    from deltaedit.data import load_file

    records = load_file(write_records(tmp_path, RECORDS)).records
    base = probe.baseline(model, parts, records)
    groups = probe.compare(probe.measure(model, parts, records[:4]), base, records[:4])
    assert groups["general"]["mean_delta"] == 0.0 and set(groups["general"]["f1"]) == set(TASKS)
    for layer in ("1", "2"):
        assert groups["representations"][layer]["cosine_distance"] == pytest.approx(0.0, abs=1e-6)
        assert groups["representations"][layer]["mmd"] == pytest.approx(0.0, abs=1e-6)
    assert groups["perplexity"]["wikitext2"] == groups["perplexity"]["unedited"] > 1
    assert groups["fluency"]["entropy"] == groups["fluency"]["entropy_unedited"]
    assert groups["fluency"]["n_prompts"] == 3 and len(groups["case_study"]) == 3


def write_records(tmp_path, rows):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_run_with_health_writes_the_four_groups_and_the_report_draws_them(tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)  # the resume below reuses the run's own data folder
    assets = make_assets(tmp_path / "assets", tokenizer)
    data = health_data(tmp_path / "data")
    spec = make_spec(assets, n_edits=4, checkpoints=(2, 4))
    spec.health, spec.health_options = True, {**SMALL, "known": 12}
    out = tmp_path / "run"
    document = run(out, spec, data_dir=str(data), progress=False)
    for checkpoint in document["checkpoints"]:
        assert {"general", "fluency", "perplexity", "representations"} <= set(checkpoint["metrics"])
        assert checkpoint["diagnostics"]["health_seconds"] > 0
    last = document["checkpoints"][-1]["metrics"]
    assert last["representations"]["1"]["cosine_distance"] > 0  # the edited layers moved the states
    assert (out / "health_baseline.json").is_file() and (out / "representations.safetensors").is_file()
    summary = "\n".join(checkpoint_summary(document["checkpoints"][-1]))  # what `deltaedit run` prints at the end
    assert "general after 4 edits: f1/" in summary and "representations after 4 edits: 1/cosine_distance" in summary
    report = write_report([out], tmp_path / "report")
    text = report.read_text()
    assert "## Model health" in text and "### Case study" in text
    for name in ("general.png", "representations.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    resumed = run(out, resume=True, progress=False)  # the health baseline is read back, not recomputed
    assert resumed["checkpoints"] == document["checkpoints"]

    # a second run of the same model, settings and texts takes the unedited figures from the cache
    def measured_again(*args, **kwargs):
        raise AssertionError("the cached baseline was measured again")

    monkeypatch.setattr(HealthProbe, "baseline", measured_again)
    again = run(tmp_path / "again", spec, data_dir=str(data), progress=False)
    assert again["checkpoints"][-1]["metrics"]["general"] == last["general"]
    assert (tmp_path / "again" / "health_baseline.json").read_text() == (out / "health_baseline.json").read_text()
    assert len(list((cache_dir() / "health").iterdir())) == 1
    spec.health_options = {**spec.health_options, "fluency_tokens": SMALL["fluency_tokens"] + 1}
    with pytest.raises(AssertionError, match="measured again"):  # other settings: another key, measured
        run(tmp_path / "other", spec, data_dir=str(data), progress=False)
    spec.health_options = {**SMALL, "known": 12}
    model = AutoModelForCausalLM.from_pretrained(assets.model)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    model.save_pretrained(tmp_path / "other-model")
    tokenizer.save_pretrained(tmp_path / "other-model")
    spec.model = str(tmp_path / "other-model")
    with pytest.raises(AssertionError, match="measured again"):  # other weights: another key, measured
        run(tmp_path / "other-weights", spec, data_dir=str(data), progress=False)


def test_a_cached_baseline_is_written_whole_once_and_read_back(tmp_path):
    """Two runs caching one key: the first copy stays, the second leaves nothing behind, a reader gets it whole."""
    settings = HealthSettings()
    first = {"general": {"f1": 0.5}, "bandwidths": {1: 2.0}, "states": {1: torch.arange(6.0).reshape(2, 3)}}
    second = {**first, "general": {"f1": 0.25}}
    folder = tmp_path / "health" / "KEY"
    cache_baseline(first, folder, settings)
    cache_baseline(second, folder, settings)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["KEY"]
    read = load_cached_baseline(folder)
    assert read["general"] == {"f1": 0.5} and read["bandwidths"] == {1: 2.0}
    assert torch.equal(read["states"][1], first["states"][1])
    assert load_cached_baseline(tmp_path / "health" / "missing") is None
