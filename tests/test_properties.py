"""Property test: any sequence of edit / undo / undo_to / save_edits + from_edits / kill and resume leaves the
weights and the method's running state bit for bit those of one uninterrupted editor doing the same edits and
undos (a reference replay)."""

from __future__ import annotations

import pytest
from conftest import fast_config, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ledger import params, same_params, same_state, state

from deltaedit import Editor, EditRequest

REQUESTS = [
    EditRequest("The mother tongue of {}", "Danielle Darrieux", "German"),
    EditRequest("The capital city of {}", "France", "Tokyo"),
    EditRequest("The headquarters of {}", "Toyota", "Berlin"),
    EditRequest("The capital city of {}", "Canada", "Madrid"),
]

operations = st.lists(
    st.one_of(
        st.tuples(st.just("edit"), st.integers(0, len(REQUESTS) - 1)),
        st.tuples(st.just("undo"), st.integers(0, 7)),
        st.tuples(st.just("undo_to"), st.integers(-1, 7)),
        st.tuples(st.just("save_load"), st.just(0)),
        st.tuples(st.just("kill_resume"), st.just(0)),
    ),
    min_size=1,
    max_size=7,
)


def new_model():
    return tiny_model("llama", n_layers=3, initializer_range=0.2)


@pytest.mark.parametrize("method", ["deltaedit", "prune"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_any_history_equals_its_reference_replay(tokenizer, corpus_file, tmp_path_factory, method, ops):
    config = fast_config(corpus_file, steps=3, **({"eta": 0.0, "warmup": 1} if method == "deltaedit" else {}))
    if method == "prune":
        config = {k: v for k, v in config.items() if k != "nullspace_threshold"}
    folder = tmp_path_factory.mktemp("history")
    subject = Editor(new_model(), tokenizer, method, config, progress=False, ledger=folder / "run0")
    reference = Editor(new_model(), tokenizer, method, config, progress=False)
    subject.prepare()  # a resumed or loaded editor is prepared: compare prepared states throughout
    reference.prepare()
    generation = 0
    for kind, value in ops:
        if kind == "edit":
            subject.edit(REQUESTS[value])
            reference.edit(REQUESTS[value])
        elif kind in ("undo", "undo_to") and subject.applied:
            target = subject.applied[value % len(subject.applied)].edit_id
            if kind == "undo":
                subject.undo(target)
                reference.undo(target)
            else:
                target = -1 if value < 0 else target
                subject.undo_to(None if target < 0 else target)
                reference.undo_to(None if target < 0 else target)
        elif kind == "save_load":
            path = subject.save_edits(folder / f"edits{generation}.safetensors")
            subject.close()
            generation += 1
            ledger = folder / f"run{generation}"
            subject = Editor.from_edits(path, new_model(), tokenizer, progress=False, ledger=ledger)
        elif kind == "kill_resume":
            subject.close()  # what a kill leaves: the run directory, and nothing in memory
            subject = Editor.resume(folder / f"run{generation}", new_model(), tokenizer, progress=False)
        assert same_params(subject.model, params(reference.model)), (kind, value)
        assert same_state(subject, state(reference)), (kind, value)
        assert [a.edit_id for a in subject.applied] == [a.edit_id for a in reference.applied]
    subject.close()
