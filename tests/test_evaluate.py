"""Rewrite metrics: exact values on a fake LM whose next-token distribution is a table indexed by the last
input token (so every probability is hand-computable, multi-token targets included), and consistency checks
on tiny real GPT-2 (Conv1D) and Llama models: batching, padding, and the unedited model agreeing with itself."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import VOCAB, VOCAB_SIZE, tiny_model
from torch import nn

import deltaedit.predict as predict_module
from deltaedit import EditRequest, find_parts
from deltaedit.data.records import EditRecord
from deltaedit.evaluate import (
    COUNTERFACT_METRICS,
    ZSRE_METRICS,
    Baseline,
    baseline,
    evaluate,
    evaluate_records,
    summarize,
)
from deltaedit.predict import greedy_continuation, greedy_tokens, score_answers, score_token_answers


class TableLM(nn.Module):
    """Next-token log-probabilities are ``table[last token]``; rows not set are uniform."""

    def __init__(self, rows: dict[str, dict[str, float]]):
        super().__init__()
        self.embed = nn.Embedding(1, 1)
        self.table = torch.zeros(VOCAB_SIZE, VOCAB_SIZE)
        for word, probs in rows.items():
            self.table[VOCAB[word]] = distribution(probs)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed


def distribution(probs: dict[str, float]) -> torch.Tensor:
    """Log-probabilities with the given words' probabilities; the rest of the mass spread evenly."""
    rest = (1.0 - sum(probs.values())) / (VOCAB_SIZE - len(probs))
    p = torch.full((VOCAB_SIZE,), rest, dtype=torch.float64)
    for word, q in probs.items():
        p[VOCAB[word]] = q
    return p.log().float()


@pytest.fixture
def table_lm(monkeypatch):
    """Route predict.py's forward passes through :class:`TableLM` tables."""

    def fake_logits_at(model, parts, inputs, rows, cols):
        return model.table[inputs["input_ids"][rows, cols]]

    monkeypatch.setattr(predict_module, "logits_at", fake_logits_at)
    return TableLM


def ids(*words: str) -> list[int]:
    return [VOCAB[w] for w in words]


# ------------------------------------------------------------------------------------------ CounterFact
CF_RECORDS = [
    EditRecord(
        EditRequest(
            "The mother tongue of {} is",
            "Danielle Darrieux",
            "Tokyo Japan",  # two tokens
            "French",
            paraphrase_prompts=("Danielle Darrieux speaks", "Danielle Darrieux lived in"),
            neighborhood_prompts=("Mozart language", "Einstein country", "Newton city"),
        ),
        neighborhood_answers=("English", "Italy Spain", "Paris"),
    ),
    EditRecord(EditRequest("The capital of {} is", "France", "Rome")),  # no target_true, no other prompts
]
UNEDITED = {
    "is": {"French": 0.6, "Tokyo": 0.2},
    "language": {"German": 0.5},
    "country": {"Italy": 0.4},
    "Italy": {"Spain": 0.3},
    "city": {"Paris": 0.5},
}
EDITED = {
    "is": {"Tokyo": 0.5, "French": 0.4},
    "Tokyo": {"Japan": 0.7},
    "speaks": {"Tokyo": 0.3, "French": 0.45},
    "in": {"Tokyo": 0.6, "French": 0.1},
    "language": {"German": 0.3, "Tokyo": 0.35},
    "country": {"Italy": 0.5, "Tokyo": 0.1},
    "Italy": {"Spain": 0.2, "London": 0.25},
    "city": {"Paris": 0.6},
}


def test_counterfact_baseline_is_the_unedited_greedy_prediction(tokenizer, table_lm):
    base = baseline(table_lm(UNEDITED), None, tokenizer, CF_RECORDS, "counterfact")
    first, second = base[CF_RECORDS[0]], base[CF_RECORDS[1]]
    assert first.edit_ref == ids("French")  # as long as target_true
    # as long as each neighbour's dataset answer ("English" is one token, "Italy Spain" two), but the model's words
    assert first.neighbor_refs == [ids("German"), ids("Italy", "Spain"), ids("Paris")]
    assert second.edit_ref == ids("French")  # no target_true: as long as target_new ("Rome", one token)
    assert second.neighbor_refs == []

    dataset = baseline(table_lm(UNEDITED), None, tokenizer, CF_RECORDS[:1], "counterfact", reference="dataset")
    assert dataset[CF_RECORDS[0]].neighbor_refs == [ids("English"), ids("Italy", "Spain"), ids("Paris")]
    with pytest.raises(ValueError, match="target_true"):
        baseline(table_lm(UNEDITED), None, tokenizer, CF_RECORDS, "counterfact", reference="dataset")


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_counterfact_metrics_by_hand(tokenizer, table_lm, batch_size):
    base = baseline(table_lm(UNEDITED), None, tokenizer, CF_RECORDS, "counterfact", batch_size=batch_size)
    per_record = evaluate_records(table_lm(EDITED), None, tokenizer, CF_RECORDS, base, batch_size=batch_size)
    assert per_record == {
        # "Tokyo" is the argmax after "is" (.5) and "Japan" after "Tokyo" (.7); "Rome" is not
        "efficacy_top": [1.0, 0.0],
        # mean log-prob sqrt(.5*.7)=.59 > .4 = P(French): length-normalized (the sum .35 would lose)
        "efficacy_larger": [1.0, 0.0],
        # after "speaks" French (.45) beats Tokyo (.3); after "in" Tokyo Japan is greedy
        "generalization_top": [0.5, None],
        # sqrt(.3*.7)=.458 > .45 and sqrt(.6*.7) > .1
        "generalization_larger": [1.0, None],
        # German lost the argmax to Tokyo; "Italy Spain" lost its 2nd token to London; Paris kept it
        "specificity_top": [pytest.approx(1 / 3), None],
        # .3 < sqrt(.35*.7)=.495;  sqrt(.5*.2)=.316 > sqrt(.1*.7)=.265;  .6 > uniform
        "specificity_larger": [pytest.approx(2 / 3), None],
    }
    metrics = evaluate(table_lm(EDITED), None, tokenizer, CF_RECORDS, base, batch_size=batch_size)
    assert metrics == {
        "efficacy_top": 0.5,
        "efficacy_larger": 0.5,
        "generalization_top": 0.5,
        "generalization_larger": 1.0,
        "specificity_top": pytest.approx(1 / 3),
        "specificity_larger": pytest.approx(2 / 3),
    }
    assert list(metrics) == list(COUNTERFACT_METRICS)


def test_baseline_save_and_load(tokenizer, table_lm, tmp_path):
    base = baseline(table_lm(UNEDITED), None, tokenizer, CF_RECORDS, "counterfact")
    base.save(tmp_path / "baseline.json")
    again = Baseline.load(tmp_path / "baseline.json", CF_RECORDS)
    assert again == base
    with pytest.raises(ValueError, match="other records"):
        Baseline.load(tmp_path / "baseline.json", CF_RECORDS[::-1])
    with pytest.raises(ValueError, match="2 records, not 1"):
        Baseline.load(tmp_path / "baseline.json", CF_RECORDS[:1])


def test_a_subset_of_the_baseline_records_can_be_evaluated(tokenizer, table_lm):
    base = baseline(table_lm(UNEDITED), None, tokenizer, CF_RECORDS, "counterfact")
    metrics = evaluate(table_lm(EDITED), None, tokenizer, CF_RECORDS[1:], base)
    assert metrics["efficacy_top"] == 0.0 and metrics["generalization_top"] is None
    stranger = EditRecord(EditRequest("The capital of {} is", "Italy", "Rome"))
    with pytest.raises(KeyError, match="baseline"):
        evaluate(table_lm(EDITED), None, tokenizer, [stranger], base)
    with pytest.raises(ValueError, match="counterfact"):
        evaluate(table_lm(EDITED), None, tokenizer, CF_RECORDS, base, kind="zsre")
    with pytest.raises(ValueError, match="kind"):
        baseline(table_lm(UNEDITED), None, tokenizer, CF_RECORDS, "wikidata")


# ------------------------------------------------------------------------------------------ zsRE
ZSRE_RECORDS = [
    EditRecord(
        EditRequest(
            "Mozart lived in which country?",
            "Mozart",
            "Rome Italy",
            paraphrase_prompts=("Mozart lived in the country",),
            neighborhood_prompts=("nq question: who lived there",),
        ),
        neighborhood_answers=("Paris Berlin",),
    ),
    # no loc answer: the unedited model's own continuation (as long as target_new) is teacher-forced
    EditRecord(EditRequest("Where is Toyota?", "Toyota", "Tokyo", neighborhood_prompts=("nq question: old city",))),
]
ZSRE_UNEDITED = {"there": {"Paris": 0.5}, "Paris": {"London": 0.4, "Berlin": 0.1}, "city": {"Madrid": 0.5}}
ZSRE_EDITED = {
    "?": {"Rome": 0.5},
    "Rome": {"Spain": 0.4, "Italy": 0.3},
    "country": {"Rome": 0.2, "Paris": 0.3},
    "there": {"Paris": 0.4},
    "Paris": {"Berlin": 0.5},
    "city": {"Madrid": 0.3, "Tokyo": 0.4},
}


def test_zsre_token_accuracy_by_hand(tokenizer, table_lm):
    base = baseline(table_lm(ZSRE_UNEDITED), None, tokenizer, ZSRE_RECORDS, "zsre")
    assert base[ZSRE_RECORDS[0]].neighbor_preds == [ids("Paris", "London")]
    assert base[ZSRE_RECORDS[1]].neighbor_refs == [ids("Madrid")] == base[ZSRE_RECORDS[1]].neighbor_preds
    per_record = evaluate_records(table_lm(ZSRE_EDITED), None, tokenizer, ZSRE_RECORDS, base, batch_size=2)
    assert per_record == {
        "efficacy": [0.5, 0.0],  # Rome yes, then Spain instead of Italy; Rome instead of Tokyo
        "generalization": [0.0, None],
        "specificity": [0.5, 0.0],  # [Paris, Berlin] vs unedited [Paris, London]; Tokyo vs Madrid
        "specificity_answer": [1.0, None],  # the edited model now gets loc_ans right
    }
    assert summarize(per_record) == {
        "efficacy": 0.25,
        "generalization": 0.0,
        "specificity": 0.25,
        "specificity_answer": 1.0,
    }
    assert list(summarize(per_record)) == list(ZSRE_METRICS)


def test_token_scores_by_hand(table_lm):
    model = table_lm(EDITED)
    prompt = [VOCAB["<s>"], VOCAB["is"]]
    (score,) = score_token_answers(model, None, [prompt], [ids("Tokyo", "Japan")], VOCAB["<pad>"])
    assert score.log_probs == pytest.approx([math.log(0.5), math.log(0.7)], abs=1e-6)
    assert score.mean_log_prob == pytest.approx(math.log(0.35) / 2, abs=1e-6)
    assert score.greedy and score.accuracy == 1.0
    assert greedy_tokens(model, None, [prompt, prompt[:1]], [3, 0], VOCAB["<pad>"]) == [
        ids("Tokyo", "Japan", "<pad>"),  # the uniform row after "Japan": ties go to the lowest id
        [],
    ]


# ------------------------------------------------------------------------------------------ real tiny models
REAL_RECORDS = [
    EditRecord(
        EditRequest(
            "The mother tongue of {} is",
            "Danielle Darrieux",
            "English German",
            "French",
            paraphrase_prompts=("Danielle Darrieux speaks", "In Paris Danielle Darrieux lived and speaks the"),
            neighborhood_prompts=("The mother tongue of Mozart is", "Einstein speaks"),
        ),
        neighborhood_answers=("German", "German Spanish"),
    ),
    EditRecord(
        EditRequest(
            "The capital of {} is",
            "France",
            "Rome",
            paraphrase_prompts=("France capital city is a",),
            neighborhood_prompts=("The capital of Italy is a city",),
        )
    ),
]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_unedited_model_agrees_with_its_baseline_whatever_the_batch(tokenizer, family):
    model = tiny_model(family, initializer_range=0.2)
    parts = find_parts(model)
    base = baseline(model, parts, tokenizer, REAL_RECORDS, "counterfact", batch_size=3)
    one = evaluate_records(model, parts, tokenizer, REAL_RECORDS, base, batch_size=1)
    many = evaluate_records(model, parts, tokenizer, REAL_RECORDS, base, batch_size=16)
    assert one == many
    metrics = summarize(one)
    assert metrics["specificity_top"] == 1.0  # nothing was edited: o^c is still the greedy prediction
    assert all(0.0 <= v <= 1.0 for v in metrics.values())

    zsre = [EditRecord(r.request, r.neighborhood_answers) for r in REAL_RECORDS]
    zbase = baseline(model, parts, tokenizer, zsre, "zsre", batch_size=2)
    assert evaluate(model, parts, tokenizer, zsre, zbase, batch_size=1)["specificity"] == 1.0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_scores_equal_one_at_a_time(tokenizer, family):
    model = tiny_model(family, initializer_range=0.2)
    parts = find_parts(model)
    prompts = ["The capital of France is", "Mozart plays the", "In", "The river in the old city of Japan is"]
    answers = ["Paris", "piano and violin", "Canada Ottawa", "Tokyo"]
    batched = score_answers(model, parts, tokenizer, prompts, answers, batch_size=4)
    for prompt, answer, score in zip(prompts, answers, batched, strict=True):
        (alone,) = score_answers(model, parts, tokenizer, [prompt], [answer], batch_size=1)
        assert score.log_prob == pytest.approx(alone.log_prob, abs=1e-4)
        assert (score.n_tokens, score.greedy) == (alone.n_tokens, alone.greedy)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    lengths = [3, 1, 2, 3]
    generated = greedy_tokens(model, parts, prompt_ids, lengths, tokenizer.pad_token_id, batch_size=4)
    for prompt, n, tokens in zip(prompts, lengths, generated, strict=True):
        assert len(tokens) == n
        assert tokenizer.decode(tokens) == greedy_continuation(model, parts, tokenizer, prompt, n)
