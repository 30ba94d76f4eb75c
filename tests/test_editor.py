"""The Editor end to end on tiny random models: which weights change, efficacy, determinism, atomicity,
validation, restore, the key-statistics cache and DeltaEdit's orthogonal constraint.

The models are random, so prompts put the subject last: the target residual is added at the subject's
last token, and random attention barely carries it to a later position. ``initializer_range=0.2`` gives
the unembedding enough range for one token to become the greedy prediction. Unless a test is about the
null space, ``nullspace_threshold`` is set so high that P0 = I (every key direction editable): with only
a few dozen key dimensions and a corpus that spans them all, a real null space leaves the edit too little
room to be reliable on such small models.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import corpus_paragraphs, fast_config, tiny_model
from safetensors.torch import load_file

import deltaedit.methods.locate as editor_module
import deltaedit.stats as stats_module
from deltaedit import DeltaEditConfig, Editor, EditRequest, RequestError
from deltaedit.corpus import generated_texts, resolve_corpus
from deltaedit.hooks import capture_inputs, capture_outputs
from deltaedit.models import find_parts, out_weight
from deltaedit.predict import score_answers
from deltaedit.stats import second_moments

REQUESTS = [
    EditRequest("The mother tongue of {}", "Danielle Darrieux", "German"),
    EditRequest("The capital city of {}", "France", "Tokyo"),
    EditRequest("The headquarters of {}", "Toyota", "Berlin"),
    EditRequest("The mother tongue of {}", "Mozart", "English"),
]
N_LAYERS = 3
LAYERS = [0, 1]


def base_config(corpus, **changes):
    return fast_config(corpus, **changes)


def new_model(family="llama", model_seed=0):
    return tiny_model(family, seed=model_seed, n_layers=N_LAYERS, initializer_range=0.2)


def make_editor(
    tokenizer, corpus, family="llama", model_seed=0, method="alphaedit", model=None, preset=None, **changes
):
    model = model if model is not None else new_model(family, model_seed)
    config = base_config(corpus, **changes)
    return Editor(model, tokenizer, method=method, config=config, preset=preset, progress=False)


def probs(editor, requests):
    scores = score_answers(
        editor.model, editor.parts, editor.tokenizer, [r.text for r in requests], [r.target_new for r in requests]
    )
    return [s.prob for s in scores]


def params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def out_names(model):
    """Parameter names of each layer's W_out."""
    parts = find_parts(model)
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(proj.weight)] for proj in parts.out_projs]


def method_state(editor):
    return {k: v.detach().clone() for k, v in editor.method.state_dict().items()}


# --- what an edit changes ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_edit_changes_only_the_edited_out_weights_and_writes_the_fact(tokenizer, corpus_file, family):
    editor = make_editor(tokenizer, corpus_file, family=family)
    model = editor.model
    before_params = params(model)
    before = probs(editor, REQUESTS[:2])

    results = editor.edit(REQUESTS[:2])

    after = probs(editor, REQUESTS[:2])
    names = out_names(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before_params[n])}
    assert changed == {names[i] for i in LAYERS}
    for i in LAYERS:
        assert editor.weight_delta(i).abs().max() > 0
    for p0, result in zip(before, results, strict=True):
        assert result.target_prob > 10 * p0 and result.target_prob > 0.05, (p0, result.target_prob)
        assert result.success is True  # the target was the greedy continuation right after its edit
    assert results[1].target_prob == pytest.approx(after[1], rel=1e-4)  # measured after the edit landed
    # The later edit may interfere with the earlier one on a model this small, but does not undo it.
    assert after[0] > 10 * before[0]


def test_edit_result_and_ledger(tokenizer, corpus_file):
    editor = make_editor(tokenizer, corpus_file, steps=12)
    results = editor.edit([REQUESTS[0], REQUESTS[1]])
    assert [r.edit_id for r in results] == [0, 1]
    assert [a.edit_id for a in editor.applied] == [0, 1]
    first = results[0]
    assert first.requests == (REQUESTS[0],)
    assert 1 <= first.steps <= 12
    assert 0 < first.target_prob <= 1 and isinstance(first.success, bool)
    assert first.metrics == {} and first.triggered is False  # AlphaEdit makes no decision
    assert first.seconds > 0

    d_model, d_ff = editor.parts.d_model, editor.parts.d_ff
    total = {i: torch.zeros(d_model, d_ff) for i in LAYERS}
    for applied in editor.applied:
        assert sorted(applied.updates) == LAYERS
        for layer, update in applied.updates.items():
            assert update.left.shape == (d_model, 1) and update.right.shape == (d_ff, 1)
            assert update.keys.shape == (d_ff, 1)
            total[layer] += update.dense()
        critical = applied.updates[LAYERS[-1]]
        assert torch.equal(applied.critical_key, critical.keys)
        response = critical.dense() @ applied.critical_key
        assert applied.self_response == pytest.approx(float(response.pow(2).sum()), rel=1e-4)
    for layer in LAYERS:  # the weights moved by exactly the recorded updates
        assert torch.allclose(editor.weight_delta(layer), total[layer], atol=1e-6)


def test_batch_of_two_is_one_rank_two_edit(tokenizer, corpus_file):
    editor = make_editor(tokenizer, corpus_file)
    before = probs(editor, REQUESTS[:2])
    results = editor.edit(REQUESTS[:2], batch_size=2)
    assert len(results) == 1 and results[0].requests == tuple(REQUESTS[:2])
    update = editor.applied[0].updates[LAYERS[-1]]
    assert update.left.shape == (editor.parts.d_model, 2) and update.right.shape == (editor.parts.d_ff, 2)
    after = probs(editor, REQUESTS[:2])
    assert all(a > 5 * b for a, b in zip(after, before, strict=True))


def test_keys_are_read_at_the_subjects_last_token(tokenizer, corpus_file):
    """With one edited layer and no context prefixes, k_e is the input of W_out at the subject's last token."""
    editor = make_editor(tokenizer, corpus_file, layers=[1], n_contexts=0)
    request = REQUESTS[0]
    ids = tokenizer(request.text, return_tensors="pt")
    position = tokenizer.convert_ids_to_tokens(ids["input_ids"][0]).index("Darrieux")
    with torch.no_grad(), capture_inputs({1: editor.parts.out_projs[1]}) as seen:
        editor.model(**ids)
    expected = seen[1][0, position]
    editor.edit(request)
    assert torch.allclose(editor.applied[0].critical_key[:, 0], expected, atol=1e-5)


def test_residual_is_spread_over_the_layers(tokenizer, corpus_file, monkeypatch):
    """DESIGN §2.3: layer l_i takes (z* - h_current) / (m - i + 1), h_current read with l_1..l_{i-1} updated."""
    found = []
    real = editor_module.optimize_target
    monkeypatch.setattr(editor_module, "optimize_target", lambda *a, **k: found.append(real(*a, **k)) or found[-1])
    editor = make_editor(tokenizer, corpus_file, n_contexts=0)
    request = REQUESTS[1]
    editor.edit(request)
    (target,) = found
    z_star = target.z_init + target.delta
    first, second = editor.applied[0].updates[0], editor.applied[0].updates[1]
    tol = 1e-4 * float(target.delta.norm())
    assert torch.allclose(first.left[:, 0], target.delta / 2, atol=tol)  # z_now = z_init before any update
    # h_current for the last layer: the critical block's output with only the first layer's update applied
    weight = out_weight(editor.parts.out_projs[1])
    ids = tokenizer(request.text, return_tensors="pt")
    with torch.no_grad():
        weight.sub_(second.dense())
        with capture_outputs({1: editor.parts.layers[1]}) as outs:
            editor.model(**ids)
        weight.add_(second.dense())
    z_now = outs[1][0, -1]  # the subject is the prompt's last token
    assert torch.allclose(second.left[:, 0], z_star - z_now, atol=tol)


# --- determinism and atomicity ----------------------------------------------------------------------


def test_same_seed_same_deltas_bitwise(tokenizer, corpus_file):
    first = make_editor(tokenizer, corpus_file, method="deltaedit")
    second = make_editor(tokenizer, corpus_file, method="deltaedit")
    assert first.contexts == second.contexts and len(first.contexts) == 2
    first.edit(REQUESTS[:2])
    second.edit(REQUESTS[:2])
    for layer in LAYERS:
        assert torch.equal(first.weight_delta(layer), second.weight_delta(layer))
    # ... and another context seed really gives other contexts (so the comparison above can fail)
    third = make_editor(tokenizer, corpus_file, method="deltaedit", seed=1)
    assert third.contexts != first.contexts


def test_failed_edit_leaves_weights_and_state_untouched(tokenizer, corpus_file, monkeypatch):
    editor = make_editor(tokenizer, corpus_file, method="deltaedit")
    editor.edit(REQUESTS[0])
    weights = params(editor.model)
    state = method_state(editor)
    tracker = editor.method.tracker.state().clone()
    applied = list(editor.applied)

    real_solve = editor.method.solve
    calls = []

    def failing_solve(layer, keys, residuals):
        calls.append(layer)
        if len(calls) == 2:
            raise RuntimeError("solver exploded")
        return real_solve(layer, keys, residuals)

    monkeypatch.setattr(editor.method, "solve", failing_solve)
    with pytest.raises(RuntimeError, match="solver exploded"):
        editor.edit(REQUESTS[1])
    assert calls == LAYERS  # the first layer was updated before the failure
    for name, value in params(editor.model).items():
        assert torch.equal(value, weights[name]), name
    assert editor.applied == applied
    assert torch.equal(editor.method.tracker.state(), tracker)
    for key, value in method_state(editor).items():
        assert torch.equal(value, state[key]), key

    # The editor is still usable, and ends exactly where an editor that never failed ends.
    monkeypatch.setattr(editor.method, "solve", real_solve)
    result = editor.edit(REQUESTS[1])[0]
    assert result.edit_id == 1
    clean = make_editor(tokenizer, corpus_file, method="deltaedit")
    clean.edit(REQUESTS[:2])
    for layer in LAYERS:
        assert torch.equal(editor.weight_delta(layer), clean.weight_delta(layer))


def test_non_finite_update_is_rejected_and_rolled_back(tokenizer, corpus_file, monkeypatch):
    editor = make_editor(tokenizer, corpus_file)
    weights = params(editor.model)
    real_solve = editor.method.solve

    def nan_solve(layer, keys, residuals):
        left, right = real_solve(layer, keys, residuals)
        return (left * float("nan"), right) if layer == LAYERS[-1] else (left, right)

    monkeypatch.setattr(editor.method, "solve", nan_solve)
    with pytest.raises(FloatingPointError, match=f"layer {LAYERS[-1]}"):
        editor.edit(REQUESTS[0])
    assert all(torch.equal(v, weights[n]) for n, v in params(editor.model).items())
    assert editor.applied == []


def test_bad_request_in_a_batch_changes_nothing(tokenizer, corpus_file):
    editor = make_editor(tokenizer, corpus_file)
    weights = params(editor.model)
    bad = EditRequest("The capital of {}", "Italy", "\ufffd")  # the normalizer drops it: tokenizes to nothing
    with pytest.raises(RequestError) as info:
        editor.edit([REQUESTS[0], bad, REQUESTS[1]])
    assert info.value.field == "target_new"
    with pytest.raises(RequestError) as info:
        editor.edit([REQUESTS[0], {"prompt": "{} is", "subject": "Rome"}])
    assert info.value.field == "target_new"
    with pytest.raises(RequestError) as info:
        editor.edit([])
    assert info.value.field == "requests"
    assert editor.applied == []
    assert all(torch.equal(v, weights[n]) for n, v in params(editor.model).items())


def test_validation_accounts_for_the_context_prefixes(tokenizer, corpus_file):
    editor = make_editor(tokenizer, corpus_file, family="gpt2", n_contexts=1, steps=2)  # n_positions = 64
    request = EditRequest("The" + " old" * 58 + " capital of {}", "France", "Rome")  # 63 tokens with its target
    weights = params(editor.model)
    try:
        with pytest.raises(RequestError):
            editor.edit(request)
    finally:  # whatever the outcome, the failed edit was rolled back
        assert all(torch.equal(v, weights[n]) for n, v in params(editor.model).items())


def test_restore_gives_back_the_exact_original_weights(tokenizer, corpus_file):
    editor = make_editor(tokenizer, corpus_file, method="deltaedit")
    original = params(editor.model)
    editor.edit(REQUESTS[0])
    first_delta = {i: editor.weight_delta(i) for i in LAYERS}
    editor.edit(REQUESTS[1])
    editor.restore()
    assert all(torch.equal(v, original[n]) for n, v in params(editor.model).items())
    assert editor.applied == []
    assert all(editor.weight_delta(i).abs().max() == 0 for i in LAYERS)
    # running state is gone too: the same edit again lands exactly as it did the first time
    editor.edit(REQUESTS[0])
    assert editor.method.tracker.seen == 1
    for i in LAYERS:
        assert torch.equal(editor.weight_delta(i), first_delta[i])


# --- configuration errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [[1, 3], [-1], [5]])
def test_bad_layer_index(tokenizer, corpus_file, layers):
    with pytest.raises(ValueError, match="^layers: .* out of range for a model with 3 layers"):
        make_editor(tokenizer, corpus_file, layers=layers)


def test_config_of_another_method_is_refused(tokenizer):
    from deltaedit import AlphaEditConfig

    with pytest.raises(TypeError, match="deltaedit"):
        Editor(new_model(), tokenizer, method="deltaedit", config=AlphaEditConfig(layers=(0,)))
    with pytest.raises(ValueError, match="^etta"):
        Editor(new_model(), tokenizer, method="deltaedit", config={"layers": [0], "etta": 1})
    editor = Editor(new_model(), tokenizer, method="deltaedit", config=DeltaEditConfig(layers=(0, 1), eta=0.5))
    assert editor.config.eta == 0.5 and editor.method.name == "deltaedit"


def test_default_layers_come_from_the_depth_heuristic(tokenizer):
    model = tiny_model("llama", n_layers=8)
    editor = Editor(model, tokenizer, method="alphaedit")
    assert editor.config.layers == (1, 2)  # two layers ending a quarter of the way up


# --- key statistics ---------------------------------------------------------------------------------


def test_stats_are_cached_and_a_corrupt_cache_is_rebuilt(tokenizer, corpus_file, isolated_cache, monkeypatch, caplog):
    calls = []
    real_compute = stats_module._compute

    def counting(model, parts, tokenizer_, layers, *args):
        calls.append(list(layers))
        return real_compute(model, parts, tokenizer_, layers, *args)

    monkeypatch.setattr(stats_module, "_compute", counting)
    model = new_model()
    caplog.set_level(logging.INFO, logger="deltaedit.stats")

    first = make_editor(tokenizer, corpus_file, model=model)
    first.prepare()
    assert calls == [LAYERS]
    assert "computing key statistics" in caplog.text  # announced, never silent
    files = sorted((isolated_cache / "stats").glob("*.safetensors"))
    assert len(files) == len(LAYERS)
    p0 = {i: first.method.projectors[i].clone() for i in LAYERS}

    second = make_editor(tokenizer, corpus_file, model=model)
    second.prepare()
    assert calls == [LAYERS]  # loaded from the cache
    assert all(torch.equal(second.method.projectors[i], p0[i]) for i in LAYERS)

    target = files[0]
    target.write_bytes(b"this is not a safetensors file")
    caplog.clear()
    third = make_editor(tokenizer, corpus_file, model=model)
    third.prepare()
    assert len(calls) == 2 and len(calls[1]) == 1  # only the unreadable layer is recomputed
    assert "unreadable" in caplog.text
    assert len(sorted((isolated_cache / "stats").glob("*.safetensors"))) == len(LAYERS)
    assert all(torch.allclose(third.method.projectors[i], p0[i], atol=1e-6) for i in LAYERS)

    fourth = make_editor(tokenizer, corpus_file, model=model, stats_samples=32)  # other settings: other entry
    fourth.prepare()
    assert calls[-1] == LAYERS and len(calls) == 3


def test_second_moments_match_a_per_text_computation(tokenizer, corpus_file):
    """C0 = mean over all non-padding tokens of k k^T, whatever the batching and padding."""
    model = new_model("gpt2")
    parts = find_parts(model)
    corpus = resolve_corpus(str(corpus_file))
    moments = second_moments(model, parts, tokenizer, [0, 2], corpus, 20, 24, "fp", batch_size=7, progress=False)
    texts = corpus_paragraphs()[:20]
    lengths = {len(tokenizer(t, truncation=True, max_length=24)["input_ids"]) for t in texts}
    assert len(lengths) > 3 and max(lengths) == 24  # batches are padded, and some texts are truncated
    total = {0: torch.zeros(64, 64, dtype=torch.float64), 2: torch.zeros(64, 64, dtype=torch.float64)}
    count = 0
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=24, return_tensors="pt")
        with torch.no_grad(), capture_inputs({i: parts.out_projs[i] for i in total}) as keys:
            model(**ids)
        for i in total:
            k = keys[i][0].double()
            total[i] += k.T @ k
        count += ids["input_ids"].shape[1]
    for i in total:
        assert torch.allclose(moments[i].double(), total[i] / count, rtol=1e-4, atol=1e-7)


def test_stats_from_generated_text(tokenizer, isolated_cache, monkeypatch):
    calls = []
    real_compute = stats_module._compute
    monkeypatch.setattr(stats_module, "_compute", lambda *a: calls.append(1) or real_compute(*a))
    model = new_model()
    config = {"layers": [0], "stats_corpus": "generated", "stats_samples": 4, "stats_max_length": 6, "n_contexts": 0}
    editor = Editor(model, tokenizer, method="alphaedit", config=config, progress=False)
    editor.prepare()
    (path,) = (isolated_cache / "stats").glob("*.safetensors")
    moment = load_file(str(path))["second_moment"]
    assert moment.shape == (64, 64) and torch.allclose(moment, moment.T, atol=1e-6)
    assert torch.linalg.eigvalsh(moment.double()).min() > -1e-6 and moment.diagonal().sum() > 0
    again = Editor(model, tokenizer, method="alphaedit", config=config, progress=False)
    again.prepare()
    assert calls == [1]


def test_generated_text_is_seeded(tokenizer):
    model = new_model()
    starts = ("The", "In")
    first = generated_texts(model, tokenizer, 3, 5, seed=0, starts=starts)
    assert first == generated_texts(model, tokenizer, 3, 5, seed=0, starts=starts)
    assert first != generated_texts(model, tokenizer, 3, 5, seed=1, starts=starts)
    assert len(first) == 3 and all(t.startswith(s) for t, s in zip(first, ["The", "In", "The"], strict=True))


def test_alphaedit_update_spares_the_preserved_keys(tokenizer, corpus_file, monkeypatch):
    """With a real null space (relative threshold), Delta v ~ 0 for the top eigenvectors v of C0."""
    editor = make_editor(tokenizer, corpus_file, nullspace_mode="relative", nullspace_threshold=0.02)
    editor.edit(REQUESTS[0])
    monkeypatch.setattr(stats_module, "_compute", None)  # C0 below must be the cached, pre-edit one
    for layer in LAYERS:
        assert 0 < editor.method.preserved_dims(layer) < editor.parts.d_ff
        moment = second_moments(
            editor.model,
            editor.parts,
            tokenizer,
            [layer],
            resolve_corpus(str(corpus_file)),
            64,
            32,
            editor.base_fingerprint,
            progress=False,
        )[layer]
        values, vectors = torch.linalg.eigh(moment.double())
        preserved = vectors[:, values >= 0.02 * values.max()].float()
        delta = editor.weight_delta(layer)
        assert delta.norm() > 0
        assert (delta @ preserved).norm() < 1e-4 * delta.norm()


# --- DeltaEdit's orthogonal constraint --------------------------------------------------------------


def test_deltaedit_scores_and_thresholds_follow_the_ema(tokenizer, corpus_file):
    editor = make_editor(tokenizer, corpus_file, method="deltaedit", preset="paper", eta=2.0, warmup=10, n_contexts=0)
    critical = LAYERS[-1]
    m = v = 0.0
    for request in REQUESTS[:3]:
        history = editor.weight_delta(critical)
        ids = tokenizer(request.text, return_tensors="pt")
        with torch.no_grad(), capture_inputs({0: editor.parts.out_projs[critical]}) as seen:
            editor.model(**ids)
        key = seen[0][0, -1]  # the subject is the prompt's last token
        result = editor.edit(request)[0]
        assert result.metrics["score"] == pytest.approx(float((history @ key).pow(2).sum()), rel=1e-3, abs=1e-9)
        assert result.metrics["threshold"] == pytest.approx(m + 2.0 * v**0.5, rel=1e-6, abs=1e-12)
        assert result.triggered is False  # still warming up
        m = 0.9 * m + 0.1 * result.metrics["score"]
        v = 0.9 * v + 0.1 * (result.metrics["score"] - m) ** 2
    assert REQUESTS[0].text.endswith("Darrieux")
    assert editor.applied[1].result.metrics["score"] > 0  # the history responds to later keys
    assert torch.allclose(editor.method.history, editor.weight_delta(critical), atol=1e-6)


def test_deltaedit_triggered_edit_is_orthogonal_to_the_history(tokenizer, corpus_file, monkeypatch):
    """eta 0 and a one-edit warm-up: every later edit the history responds to triggers; its optimized
    target residual then has no component in the column space of Delta_hist (paper Algorithm 1, line 27)."""
    found = []
    real = editor_module.optimize_target

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        found.append(result.delta.clone())
        return result

    monkeypatch.setattr(editor_module, "optimize_target", spy)
    editor = make_editor(tokenizer, corpus_file, method="deltaedit", preset="paper", eta=0.0, warmup=1)
    critical = LAYERS[-1]
    histories = []
    for request in REQUESTS[:3]:
        histories.append(editor.weight_delta(critical))
        editor.edit(request)
    results = [a.result for a in editor.applied]
    assert results[0].triggered is False and results[0].metrics["score"] == 0.0  # empty history, warm-up
    for e in (1, 2):
        result, history, delta = results[e], histories[e], found[e]
        assert result.triggered is True and result.metrics["score"] > result.metrics["threshold"]
        rank = result.metrics.get("rank", 0)
        assert rank == e == torch.linalg.matrix_rank(history).item()  # one direction per earlier edit
        u, s, _ = torch.linalg.svd(history.double())
        basis = u[:, : result.metrics.get("rank", 0)]
        assert (basis.T @ delta.double()).norm() < 1e-5 * delta.norm()
        assert delta.norm() > 0
        assert editor.applied[e].decision.triggered is True
    # the untriggered first edit was free, and its residual lies largely inside the later history's columns:
    # the orthogonality above is the constraint at work, not an accident of random directions
    earlier = torch.linalg.svd(histories[2].double())[0][:, :2]
    assert (earlier.T @ found[0].double()).norm() > 0.5 * found[0].norm()


def test_deltaedit_one_sided_edit_never_adds_to_the_noise_at_its_keys(tokenizer, corpus_file, monkeypatch):
    """orthogonality="one_sided": every triggered edit's target residual has r^T delta <= 0 for the response
    r = Delta_hist k of each of its keys, read at the critical layer before the edit."""
    found = []
    real = editor_module.optimize_target

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        found.append((args[7], result.delta.clone()))  # (cone, delta)
        return result

    monkeypatch.setattr(editor_module, "optimize_target", spy)
    options = {"constraint": "targeted", "orthogonality": "one_sided", "trigger": "always", "warmup": 1}
    editor = make_editor(tokenizer, corpus_file, method="deltaedit", preset="paper", **options)
    editor.edit(REQUESTS[:4])
    results = [a.result for a in editor.applied]
    assert results[0].triggered is False and all(r.triggered for r in results[1:])

    def cosines(cone, delta):  # of the target vector with each half-space's normal: <= 0 inside the cone
        return cone.normals.T @ delta.double() / (delta.norm() * cone.normals.norm(dim=0))

    closest, found_counts = [], [cone.count for cone, _ in found[1:]]
    for (cone, delta), result in zip(found[1:], results[1:], strict=True):
        assert cone.count == result.metrics["rank"] > 0
        inside = cosines(cone, delta)
        assert (inside <= 1e-5).all() and delta.norm() > 0
        closest.append(inside.max().item())
    assert max(closest) > -1e-4  # the bound was reached on some edit: the cone was at work, not idle

    found.clear()
    batch = [EditRequest("The capital city of {}", "Germany", "Paris"), EditRequest("The CEO of {}", "Sony", "Oslo")]
    editor.edit(batch, batch_size=2)  # a batch: each request's target vector against its own cone
    (first_cone, _), (second_cone, _) = found
    assert first_cone is not second_cone and first_cone.count == second_cone.count == found_counts[0]
    for cone, delta in found:
        assert (cosines(cone, delta) <= 1e-5).all() and delta.norm() > 0


def test_ft_l_keeps_every_entry_of_the_change_within_its_bound(tokenizer, corpus_file):
    model = tiny_model("llama", n_layers=3, initializer_range=0.2)
    editor = Editor(model, tokenizer, "ft", {"layers": [1], "lr": 0.05, "norm_constraint": 0.01}, progress=False)
    editor.edit(REQUESTS[0])
    change = editor.weight_delta(1)
    assert change.abs().max() <= 0.01 + 1e-7 and change.abs().max() > 0.009  # it reached the bound
    free = Editor(
        tiny_model("llama", n_layers=3, initializer_range=0.2),
        tokenizer,
        "ft",
        {"layers": [1], "lr": 0.05, "norm_constraint": 0.01, "unbounded": True},
        progress=False,
    )
    free.edit(REQUESTS[0])
    assert free.weight_delta(1).abs().max() > 0.02  # FT without the bound goes further


def _live_tensor_bytes() -> int:
    """Bytes of every tensor storage the garbage collector can reach, each storage once."""
    import gc

    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def _kept_bytes(editor) -> int:
    updates = sum(t.nbytes for a in editor.applied for u in a.updates.values() for t in u.tensors().values())
    return updates + sum(a.target.nbytes for a in editor.applied if a.target is not None)


@pytest.mark.parametrize("method", ["alphaedit", "deltaedit"])
def test_an_editor_retains_only_each_edits_factors_and_keys(tokenizer, corpus_file, method):
    """What an edit must keep is its factors, keys and target vector (and DeltaEdit's fixed-size sums): the tensor
    bytes held after more edits grow by exactly that, not by temporaries of the solves or the optimizer."""
    editor = make_editor(tokenizer, corpus_file, method=method)
    editor.edit([*REQUESTS[:2]])  # warm-up: statistics, projectors, prefixes
    before = _live_tensor_bytes()
    kept_before = _kept_bytes(editor)
    editor.edit(REQUESTS[2:6])
    kept_after = _kept_bytes(editor)
    growth = _live_tensor_bytes() - before
    assert kept_after > kept_before
    assert growth <= (kept_after - kept_before) + 4096, (growth, kept_after - kept_before)
