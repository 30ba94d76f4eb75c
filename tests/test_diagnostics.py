"""Superimposed-noise diagnostics: a hand-computed two-edit case on a stand-in editor, and real tiny editors
(Llama and GPT-2's transposed Conv1D) where one edit has no noise and the values match the spec's formulas
applied to what the editor recorded (k_e and ||Delta_e k_e||^2)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import fast_config, tiny_model
from torch import nn

from deltaedit import Editor, EditRequest
from deltaedit.data.records import EditRecord
from deltaedit.diagnostics import condition_number, diagnose, erosion, full_key_spaces
from deltaedit.evaluate import baseline, evaluate
from deltaedit.methods import Decision
from deltaedit.models import out_weight
from deltaedit.updates import LowRankUpdate


def column(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)[:, None]


def stand_in_editor(edits: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, int]], w0: torch.Tensor):
    """What diagnose reads from an Editor, for one layer (0) with W_out = ``w0`` + the edits' alpha beta^T."""
    proj = nn.Linear(w0.shape[1], w0.shape[0], bias=False)
    applied = []
    with torch.no_grad():
        proj.weight.copy_(w0)
        for alpha, beta, key, triggered, rank in edits:
            proj.weight.add_(alpha @ beta.T)
            applied.append(
                SimpleNamespace(
                    updates={0: LowRankUpdate(alpha, beta, key)},
                    decision=Decision(triggered, {"rank": rank}),
                    requests=("request",),
                )
            )
    return SimpleNamespace(
        applied=applied,
        config=SimpleNamespace(layers=(0,), critical_layer=0),
        parts=SimpleNamespace(out_projs=[proj]),
        original_weights={0: w0.clone()},
        weight_delta=lambda layer: proj.weight.detach() - w0,
        method=SimpleNamespace(key_space=lambda layer: None),
    )


def test_two_edits_by_hand():
    # alpha (d_model=2), beta and k (d_ff=3); Delta_i = alpha_i beta_i^T
    a1, b1, k1 = column(1, 0), column(1, 0.5, 0), column(1, 0, 0)
    a2, b2, k2 = column(0, 2), column(-0.2, 1, 0), column(0, 1, 0)
    w0 = torch.tensor([[1.0, 0, 0], [0, 1, 0]])
    editor = stand_in_editor([(a1, b1, k1, False, 0), (a2, b2, k2, True, 1)], w0)
    d = diagnose(editor)
    # edit 1: (D1 + D2) k1 = a1*1 + a2*(-0.2) = [1, -0.4] -> 1.16, minus ||D1 k1||^2 = 1  -> 0.16
    # edit 2: (D1 + D2) k2 = a1*0.5 + a2*1 = [0.5, 2]    -> 4.25, minus ||D2 k2||^2 = 4  -> 0.25
    assert d["noise_E"] == pytest.approx((0.16 + 0.25) / 2)
    assert d["self_E"] == pytest.approx((1 + 4) / 2)
    # k1.b2 = -0.2, k2.b1 = 0.5 over the T(T-1) = 2 ordered pairs
    assert d["ktb"] == pytest.approx(0.15)
    assert d["ktb_abs"] == pytest.approx(0.35)
    # D1 + D2 = [[1, .5, 0], [-.4, 2, 0]]
    assert d["delta_norm"] == pytest.approx(math.sqrt(1 + 0.25 + 0.16 + 4))
    singular = torch.linalg.svdvals(torch.tensor([[2.0, 0.5], [-0.4, 3.0]]))  # W's third column is zero
    assert d["cond"] == pytest.approx(float(singular[0] / singular[1]), rel=1e-5)
    assert d["layers"]["0"]["cond_original"] == pytest.approx(1.0)
    assert (d["n_edits"], d["triggered"], d["triggered_share"], d["removed_rank_mean"]) == (2, 1, 0.5, 1.0)
    assert d["critical_layer"] == 0 and list(d["layers"]) == ["0"]


def test_values_do_not_depend_on_the_factors_memory_layout():
    """A live edit's d_ff x 1 factors may carry the strides of a transposed row, (1, d_ff); the ledger's copies
    have (1, 1). Both are 'contiguous', but matmul picks its kernel by strides: the diagnostics must still be
    bitwise the same, or a resumed run's metrics.json differs from an uninterrupted one's (~1e-7)."""
    g = torch.Generator().manual_seed(0)
    d_model, d_ff = 32, 64
    w0 = torch.randn(d_model, d_ff, generator=g)
    edits = [
        (torch.randn(d_model, 1, generator=g), torch.randn(d_ff, 1, generator=g), torch.randn(d_ff, 1, generator=g))
        for _ in range(3)
    ]

    def as_live(t: torch.Tensor) -> torch.Tensor:
        return t.clone().as_strided(t.shape, (1, t.shape[0]))

    stored = diagnose(stand_in_editor([(a, b, k, False, 0) for a, b, k in edits], w0))
    live = diagnose(stand_in_editor([(a, as_live(b), as_live(k), False, 0) for a, b, k in edits], w0))
    assert as_live(edits[0][1]).stride() == (1, d_ff) and torch.equal(as_live(edits[0][1]), edits[0][1])
    assert live == stored


def test_no_edits_and_singular_weights():
    editor = stand_in_editor([], torch.zeros(2, 3))
    d = diagnose(editor)
    assert d["noise_E"] is None and d["ktb"] is None and d["triggered_share"] is None
    assert d["delta_norm"] == 0.0 and d["cond"] is None  # singular: no finite condition number
    json.dumps(d, allow_nan=False)
    assert condition_number(torch.eye(3)[:2] * torch.tensor([[4.0], [2.0]])) == pytest.approx(2.0)


REQUESTS = [
    EditRequest("The mother tongue of {}", "Danielle Darrieux", "German"),
    EditRequest("The capital city of {}", "France", "Tokyo"),
    EditRequest("The headquarters of {}", "Toyota", "Berlin"),
]


def real_editor(tokenizer, corpus, family):
    config = fast_config(corpus, warmup=1, eta=0.0)  # eta 0: trigger the constraint after the first edit
    model = tiny_model(family, n_layers=3, initializer_range=0.2)
    return Editor(model, tokenizer, method="deltaedit", config=config, preset="paper", progress=False)


def spec_noise(editor, layer: int) -> float:
    """DESIGN.md §3 literally, from what the editor recorded at the critical layer."""
    total = editor.weight_delta(layer)
    values = [float(((total @ a.critical_key) ** 2).sum()) - a.self_response for a in editor.applied]
    return sum(values) / len(values)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_real_editor(tokenizer, corpus_file, family):
    editor = real_editor(tokenizer, corpus_file, family)
    (first,) = editor.edit(REQUESTS[0])

    d = diagnose(editor)
    critical = editor.config.critical_layer
    assert d["self_E"] == pytest.approx(editor.applied[0].self_response, rel=1e-4)
    for layer in ("0", "1"):  # one edit interferes with nothing
        values = d["layers"][layer]
        assert abs(values["noise_E"]) < 1e-4 * values["self_E"]
        assert values["ktb"] is None and values["n_requests"] == 1
    # efficacy_top is the editor's own success test
    record = EditRecord(REQUESTS[0])
    base = baseline(editor.model, editor.parts, tokenizer, [record], "counterfact")
    assert evaluate(editor.model, editor.parts, tokenizer, [record], base)["efficacy_top"] == float(first.success)

    results = editor.edit(REQUESTS[1:])
    d = diagnose(editor)
    json.dumps(d, allow_nan=False)
    assert d["n_edits"] == 3 and list(d["layers"]) == ["0", "1"]
    assert d["triggered"] == sum(r.triggered for r in [first, *results]) >= 1
    assert d["noise_E"] == pytest.approx(spec_noise(editor, critical), rel=1e-3, abs=1e-3)
    for name in ("noise_E", "self_E", "ktb", "ktb_abs", "delta_norm", "cond"):
        assert d[name] == d["layers"][str(critical)][name]
        assert math.isfinite(d[name])
    for layer in (0, 1):
        values = d["layers"][str(layer)]
        assert values["delta_norm"] == pytest.approx(float(editor.weight_delta(layer).norm()), rel=1e-6)
        weight = out_weight(editor.parts.out_projs[layer])  # d_model x d_ff whatever the storage
        assert values["cond"] == pytest.approx(condition_number(weight), rel=1e-6)
        assert values["cond"] != pytest.approx(values["cond_original"])


def test_erosion_splits_what_later_edits_did(tokenizer, corpus_file):
    editor = real_editor(tokenizer, corpus_file, "llama")
    editor.edit(REQUESTS)
    first_layer, top = editor.config.layers[0], editor.config.layers[-1]
    e = erosion(editor, batch_size=2)  # two batches: keys are read in the requests' order whatever the batching
    assert e["edit_id"] == [a.edit_id for a in editor.applied] and len(e["own_norm"]) == 3

    # the last edit: nothing came after it, and its keys read again are the ones it stored
    assert e["later_norm"][-1] == 0.0
    assert e["drift_norm"][-1] < 1e-4 * e["own_norm"][-1]
    # nothing below the lowest edited layer changed, so no key there moved
    assert max(e["layers"][str(first_layer)]["drift_norm"]) < 1e-4 * min(e["own_norm"])
    # the first edit's keys at the top layer did move: the lower layer was edited twice since
    assert e["layers"][str(top)]["drift_norm"][0] > 1e-3 * e["layers"][str(top)]["own_norm"][0]

    # by hand at the top layer, for the first edit: its own write and the two later edits' response to its key
    first, later = editor.applied[0].updates[top], [a.updates[top] for a in editor.applied[1:]]
    own = first.response(first.keys)
    by_hand = sum(u.response(first.keys) for u in later)
    assert e["layers"][str(top)]["own_norm"][0] == pytest.approx(float(own.norm()), rel=1e-4)
    assert e["layers"][str(top)]["later_norm"][0] == pytest.approx(float(by_hand.norm()), rel=1e-4)
    own_total = sum(
        a.updates[layer].response(a.updates[layer].keys) for a in editor.applied[:1] for layer in editor.config.layers
    )
    later_total = sum(
        a.updates[layer].response(editor.applied[0].updates[layer].keys)
        for a in editor.applied[1:]
        for layer in editor.config.layers
    )
    expected = -float((later_total * own_total).sum() / (own_total**2).sum())
    assert e["later_cancels"][0] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    json.dumps(e, allow_nan=False)


def test_key_space_counts_the_free_directions_the_edits_in_force_span(tokenizer, corpus_file):
    """A null-space method reports P0's rank and the rank of its edits' projected keys, which an undo lowers;
    once the keys span every free direction, the checkpoint's warning names the layers. d_ff = 4 with P0 = I:
    five edits fill it."""
    config = fast_config(corpus_file)
    model = tiny_model("llama", n_layers=2, initializer_range=0.2, d_ff=4)
    editor = Editor(model, tokenizer, method="alphaedit", config=config, progress=False)
    more = [EditRequest("The favourite food of {}", "Marie Curie", "rice"), EditRequest("{} plays", "Ada", "chess")]
    editor.edit(REQUESTS[:3])

    def independent(layer: int) -> int:  # the rank of P0 K, K the keys in force, in float64
        keys = torch.cat([applied.updates[layer].keys for applied in editor.applied], 1).double()
        return int(torch.linalg.matrix_rank(editor.method.projectors[layer].double() @ keys))

    d = diagnose(editor)
    for layer in (0, 1):
        values = d["layers"][str(layer)]
        assert values["free_key_dims"] == editor.method.preserved_dims(layer) == 4
        assert values["spanned_key_dims"] == independent(layer) == 3
    assert d["spanned_key_dims"] == 3 and full_key_spaces(d) is None
    editor.undo(editor.applied[-1].edit_id)
    assert diagnose(editor)["layers"]["0"]["spanned_key_dims"] == independent(0) == 2
    editor.edit([REQUESTS[2], *more])  # five keys in four free directions
    d = diagnose(editor)
    assert [d["layers"][str(layer)]["spanned_key_dims"] for layer in (0, 1)] == [4, 4]
    warning = full_key_spaces(d)
    assert warning.startswith("after 5 edits") and "layer 0 (4), layer 1 (4)" in warning
    # methods that do not write in a subspace of the keys report nothing
    config.pop("nullspace_threshold")
    memit = Editor(tiny_model("llama", n_layers=2, d_ff=4), tokenizer, method="memit", config=config, progress=False)
    memit.edit(REQUESTS[0])
    assert "spanned_key_dims" not in diagnose(memit)["layers"]["0"] and full_key_spaces(diagnose(memit)) is None
