"""Bad input and numerical faults: every refused or failed edit is reported with its request and reason,
written to the ledger as rejected, and leaves the weights and the method's state exactly as they were.

Property-based tests throw malformed requests (prompts with and without ``{}``, odd subjects, empty /
whitespace / zero-width / unrepresentable targets, overlong prompts) at the validator and at an Editor. The
numerical faults are real where the settings can provoke them (an infinite learning rate makes the target
optimization diverge; ``l2 = 0`` with an empty null space makes the solve singular) and injected otherwise.
"""

from __future__ import annotations

import pytest
import torch
from conftest import corpus_paragraphs, tiny_model
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import deltaedit.methods.locate as editor_module
from deltaedit import EditError, EditFailure, Editor, EditRequest, Ledger, RequestError
from deltaedit.requests import check_tokenization
from deltaedit.target import TargetResult
from deltaedit.tokens import encode

GOOD = [
    EditRequest("The capital city of {}", "France", "Tokyo"),
    EditRequest("The headquarters of {}", "Toyota", "Berlin"),
    EditRequest("The mother tongue of {}", "Mozart", "English"),
]
CONFIG = {
    "layers": [0, 1],
    "stats_samples": 64,
    "stats_max_length": 32,
    "n_contexts": 1,
    "context_tokens": 4,
    "steps": 3,
    "nullspace_threshold": 1e9,
}
FIELDS = {"prompt", "subject", "target_new"}

# --- strategies ---------------------------------------------------------------------------------------

WORDS = ["The", "capital", "of", "is", "France", "Danielle", "Darrieux", "Zorb", "city", "in", "a", "speaks"]
ODD = ["", " ", "\t", "\n", "\u200b", "\u200b\u200b", "\u00a0", "{}", "{", "}", "{{}}", "Zürich", "日本", "é", "\x00"]
phrase = st.lists(st.sampled_from(WORDS + ODD), max_size=6).map(" ".join)
free_text = st.text(max_size=12)
subjects = st.one_of(st.sampled_from(["France", "Danielle Darrieux", "Zorb"] + ODD), free_text, phrase)
targets = st.one_of(st.sampled_from(["Rome", "Paris", "Berlin"] + ODD), free_text)
prompts = st.one_of(
    phrase,
    phrase.map(lambda t: t + " {}"),
    phrase.map(lambda t: "{} " + t),
    st.tuples(phrase, phrase).map(lambda ab: f"{ab[0]} {{}} {ab[1]}"),
    st.integers(55, 200).map(lambda n: "The" + " old" * n + " capital of {}"),  # longer than the 64 positions
    free_text,
)


def as_item(prompt, subject, target):
    return {"prompt": prompt, "subject": subject, "target_new": target}


# --- the validator ------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(prompt=prompts, subject=subjects, target=targets)
def test_validator_refuses_with_request_errors_only(tokenizer, prompt, subject, target):
    try:
        request = EditRequest.from_dict(as_item(prompt, subject, target))
        check_tokenization(request, tokenizer, 64, ("", "The old city. "))
        encode(tokenizer, request.prompt, request.subject)
    except RequestError as err:  # anything else escaping is a bug
        event(f"rejected: {err.field}")
        assert err.field in FIELDS and err.reason and str(err).startswith(err.field)
        return
    assert request.prompt.count("{}") >= 1 and request.subject.strip() and request.target_new.strip()


# --- the editor ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tokenizer):
    """One editor (with a ledger) for all hypothesis examples: they only add edits or leave it untouched."""
    root = tmp_path_factory.mktemp("faults")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(corpus_paragraphs()) + "\n", encoding="utf-8")
    model = tiny_model("llama", n_layers=3, initializer_range=0.2)
    config = {**CONFIG, "stats_corpus": str(corpus), "eta": 0.0, "warmup": 1}
    return Editor(
        model, tokenizer, "deltaedit", config, progress=False, stats_store=root / "stats", ledger=root / "run"
    )


def snapshot(editor):
    weights = {n: p.detach().clone() for n, p in editor.model.named_parameters()}
    editor.prepare()
    state = {k: v.detach().clone() for k, v in editor.method.state_dict().items()}
    return weights, state, list(editor.applied)


def unchanged(editor, saved) -> bool:
    weights, state, applied = saved
    now = editor.method.state_dict()
    return (
        all(torch.equal(p, weights[n]) for n, p in editor.model.named_parameters())
        and all(torch.equal(now[k], state[k]) for k in state)
        and editor.applied == applied
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=prompts, subject=subjects, target=targets, mode=st.sampled_from(["stop", "skip"]))
def test_editor_rejects_malformed_requests_without_a_trace(shared, prompt, subject, target, mode):
    editor = shared
    saved = snapshot(editor)
    count, rejected = len(Ledger(editor.ledger.path).entries()), len(editor.rejected)
    item = as_item(prompt, subject, target)
    try:
        results = editor.edit(item, on_error=mode)
    except EditError as err:
        assert mode == "stop" and err is editor.rejected[-1]
        results = []
    entries = Ledger(editor.ledger.path).entries()
    assert len(entries) == count + 1
    if results:  # a well-formed request: it landed and was recorded as an edit
        event("landed")
        assert entries[-1].kind == "edit" and entries[-1].edit_id == results[0].edit_id
        return
    assert len(editor.rejected) == rejected + 1
    error = editor.rejected[-1]
    event(f"rejected: {error.field}")
    assert isinstance(error, RequestError) and error.field in FIELDS and error.request is not None
    assert unchanged(editor, saved)
    entry = entries[-1]
    assert entry.kind == "rejected" and entry.data["field"] == error.field and entry.data["reason"] == error.reason
    assert entry.data["requests"] == [item] and entry.data["error"] == "RequestError"


@pytest.mark.parametrize(
    "request_, field, words",
    [
        (EditRequest("The capital of {}", "\ufffd", "Rome"), "subject", "cannot be located"),
        (EditRequest("The capital of {}", "France", "Zürich"), "target_new", "cannot represent"),
        (EditRequest("The capital of {}", "France", "\ufffd"), "target_new", "tokenizes to nothing"),
        (EditRequest("The" + " old" * 60 + " capital of {}", "France", "Rome"), "prompt", "longer than"),
    ],
)
def test_each_input_fault_is_named(tokenizer, corpus_file, tmp_path, request_, field, words):
    editor = make_editor(tokenizer, corpus_file, ledger=tmp_path / "run")
    with pytest.raises(RequestError, match=words) as info:
        editor.edit(request_)
    assert info.value.field == field and info.value.request == request_
    (entry,) = Ledger(tmp_path / "run").entries()
    assert entry.kind == "rejected" and entry.data["field"] == field and entry.data["requests"] == [request_.to_dict()]


def make_editor(tokenizer, corpus, ledger=None, **changes):
    model = tiny_model("llama", n_layers=3, initializer_range=0.2)
    config = {**CONFIG, "stats_corpus": str(corpus), **changes}
    return Editor(model, tokenizer, "deltaedit", config, progress=False, ledger=ledger)


# --- numerical faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, field, words",
    [
        # Adam with an enormous step and no clamp: the residual stream overflows and the loss turns NaN
        ({"lr": 1e37, "clamp_norm_factor": 3e38}, "target", "diverged"),
        ({"l2": 0.0, "nullspace_threshold": -1.0}, "update", "singular"),  # P0 = 0 and no ridge: a zero system
    ],
)
def test_numerical_faults_are_rejected_and_change_nothing(tokenizer, corpus_file, tmp_path, changes, field, words):
    editor = make_editor(tokenizer, corpus_file, ledger=tmp_path / "run", **changes)
    saved = snapshot(editor)
    with pytest.raises(EditFailure, match=words) as info:
        editor.edit(GOOD[0])
    assert info.value.field == field and info.value.request == GOOD[0]
    assert isinstance(info.value, FloatingPointError) and unchanged(editor, saved)
    assert editor.edit(GOOD[1:], on_error="skip") == [] and len(editor.rejected) == 3  # skip: each one recorded
    assert unchanged(editor, saved)
    entries = Ledger(tmp_path / "run").entries()
    assert [(e.kind, e.data["field"], e.data["error"]) for e in entries] == [("rejected", field, "EditFailure")] * 3
    assert entries[1].data["requests"] == [GOOD[1].to_dict()] and words in entries[1].data["reason"]


@pytest.mark.parametrize("option", ["lr", "eta", "l2"])
def test_a_non_finite_option_is_refused_when_the_config_is_made(tokenizer, corpus_file, option):
    with pytest.raises(ValueError, match=f"^{option}: must be a finite number, not nan"):
        make_editor(tokenizer, corpus_file, **{option: float("nan")})


def test_a_non_finite_target_vector_stops_or_is_skipped(tokenizer, corpus_file, tmp_path, monkeypatch):
    """The second request's target vector comes out NaN: stop keeps the first edit and raises; skip goes on."""
    real = editor_module.optimize_target

    def poisoned(model, parts, tokenizer_, request, *args, **kwargs):
        found = real(model, parts, tokenizer_, request, *args, **kwargs)
        if request.subject == "Toyota":
            return TargetResult(found.delta * float("nan"), found.z_init, found.steps, found.train_prob)
        return found

    monkeypatch.setattr(editor_module, "optimize_target", poisoned)
    stopper = make_editor(tokenizer, corpus_file, ledger=tmp_path / "stop")
    with pytest.raises(EditFailure, match="target vector for 'Toyota' is not finite") as info:
        stopper.edit(GOOD)
    assert info.value.field == "target" and [a.requests[0] for a in stopper.applied] == [GOOD[0]]
    assert [e.kind for e in Ledger(tmp_path / "stop").entries()] == ["edit", "rejected"]

    skipper = make_editor(tokenizer, corpus_file, ledger=tmp_path / "skip")
    results = skipper.edit(GOOD, on_error="skip")
    assert [r.requests[0] for r in results] == [GOOD[0], GOOD[2]] and [r.edit_id for r in results] == [0, 1]
    assert [e.kind for e in Ledger(tmp_path / "skip").entries()] == ["edit", "rejected", "edit"]
    assert skipper.rejected[0].request == GOOD[1]


def test_a_batch_failure_rejects_the_whole_batch(tokenizer, corpus_file, tmp_path, monkeypatch):
    editor = make_editor(tokenizer, corpus_file, ledger=tmp_path / "run")
    saved = snapshot(editor)
    real_solve = editor.method.solve

    def overflowing(layer, keys, residuals):
        left, right = real_solve(layer, keys, residuals)
        return left * float("inf"), right

    monkeypatch.setattr(editor.method, "solve", overflowing)
    assert editor.edit(GOOD[:2], batch_size=2, on_error="skip") == []
    error = editor.rejected[-1]
    assert error.field == "update" and "layer 0 is not finite" in error.reason and error.request == tuple(GOOD[:2])
    assert unchanged(editor, saved)
    (entry,) = Ledger(tmp_path / "run").entries()
    assert entry.data["requests"] == [r.to_dict() for r in GOOD[:2]]


def test_bad_on_error_value(tokenizer, corpus_file):
    editor = make_editor(tokenizer, corpus_file)
    with pytest.raises(ValueError, match="on_error"):
        editor.edit(GOOD[0], on_error="ignore")
