"""The target-vector optimization: the reused-prefix path equals the straightforward one.

``optimize_target(reuse_prefix=True)`` runs the tokens before the subject's last one, and the blocks up to
the critical one, once per edit; ``reuse_prefix=False`` runs the whole batch through every block at every
step. Same operations on the same numbers in a different grouping: the vectors agree to float32 rounding
(relative 1e-4 after ten Adam steps; measured 3e-7..3e-6 here, 1.4e-6 on SmolLM2).

``search_dtype="bfloat16"`` runs the frozen blocks above the critical one and the unembedding in bfloat16:
a different, close vector, with the lower blocks and the weights untouched.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import FAMILIES, build_tokenizer, tiny_model
from tokenizers import processors

from deltaedit.models import find_parts
from deltaedit.requests import EditRequest
from deltaedit.target import LowPrecisionCopies, TargetSettings, optimize_target, read_keys

SETTINGS = TargetSettings(steps=8, lr=0.5, weight_decay=1e-3, clamp_norm_factor=4.0, kl_factor=0.0625, stop_prob=1.0)
CONTEXTS = ["", "The old city was small . ", "I lived there . "]


def both_paths(model, tokenizer, request, layer=1, projector=None, settings=SETTINGS):
    parts = find_parts(model)
    plain = optimize_target(model, parts, tokenizer, request, CONTEXTS, layer, settings, projector, reuse_prefix=False)
    reused = optimize_target(model, parts, tokenizer, request, CONTEXTS, layer, settings, projector, reuse_prefix=True)
    return plain, reused


def assert_same(plain, reused):
    assert plain.steps == reused.steps
    assert torch.allclose(plain.z_init, reused.z_init, rtol=1e-5, atol=1e-6)
    assert torch.allclose(plain.delta, reused.delta, rtol=1e-4, atol=1e-6 * plain.delta.norm().item())
    assert reused.train_prob == pytest.approx(plain.train_prob, rel=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_reused_prefix_matches_the_full_forward(family, tokenizer):
    request = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English German")  # two target tokens
    plain, reused = both_paths(tiny_model(family), tokenizer, request)
    assert plain.delta.norm() > 0
    assert_same(plain, reused)


def test_reused_prefix_with_a_subject_at_the_first_token():
    """Without a BOS token a one-token subject opens the essence prompt ("{} is a"): that row has no prefix."""
    tokenizer = build_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    assert tokenizer("Paris is a")["input_ids"][0] == tokenizer.convert_tokens_to_ids("Paris")
    request = EditRequest("{} is the capital of", "Paris", "Italy")
    plain, reused = both_paths(tiny_model("llama"), tokenizer, request)
    assert torch.isfinite(reused.delta).all()
    assert_same(plain, reused)


def test_reused_prefix_with_a_projector_and_the_last_layer(tokenizer):
    """Editing the top block (nothing above it to run) under DeltaEdit's constraint gives the same vector."""
    model = tiny_model("gpt2")
    d_model = model.config.n_embd
    basis = torch.linalg.qr(torch.randn(d_model, 4, generator=torch.Generator().manual_seed(0)))[0]
    projector = torch.eye(d_model) - basis @ basis.T
    request = EditRequest("The capital of {} is", "France", "Rome")
    plain, reused = both_paths(model, tokenizer, request, layer=2, projector=projector)
    assert basis.T @ reused.delta == pytest.approx(torch.zeros(4), abs=1e-5)
    assert_same(plain, reused)


def test_reused_prefix_leaves_the_model_as_it_was(tokenizer):
    """The blocks' forward methods are patched only for the duration of a step."""
    model = tiny_model("llama")
    before = {name: p.clone() for name, p in model.state_dict().items()}
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    both_paths(model, tokenizer, EditRequest("The capital of {} is", "France", "Rome"))
    assert all("forward" not in vars(block) for block in model.model.layers)
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


def test_the_kl_term_reads_the_essence_prompt_at_the_subjects_last_token(tokenizer):
    """MEMIT, AlphaEdit and DeltaEdit read the KL term of "{subject} is a" at the subject's last token; the
    last token of the prompt is the other option."""
    from deltaedit.target import ESSENCE_PROMPT, loss_positions
    from deltaedit.tokens import encode

    rewrite = encode(tokenizer, "The mother tongue of {} is", "Danielle Darrieux")
    essence = encode(tokenizer, ESSENCE_PROMPT, "Danielle Darrieux")
    assert essence.subject_index < len(essence.ids) - 1
    rows, cols = loss_positions([rewrite, rewrite], essence, 2, "subject", "cpu")
    assert rows.tolist() == [0, 0, 1, 1, 2]
    assert cols.tolist() == [len(rewrite.ids) - 1, len(rewrite.ids)] * 2 + [essence.subject_index]
    assert loss_positions([rewrite], essence, 1, "last", "cpu")[1].tolist()[-1] == len(essence.ids) - 1


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear, and GPT-2's Conv1D (addmm)
def test_a_bfloat16_search_runs_only_the_upper_blocks_in_bfloat16(family, tokenizer):
    model = tiny_model(family, n_layers=4)
    parts = find_parts(model)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    request = EditRequest("The capital of {} is", "France", "Rome")
    settings = dataclasses.replace(SETTINGS, steps=20, stop_prob=0.9)
    exact = optimize_target(model, parts, tokenizer, request, CONTEXTS, 1, settings)
    low = optimize_target(
        model, parts, tokenizer, request, CONTEXTS, 1, dataclasses.replace(settings, search_dtype="bfloat16")
    )
    assert torch.equal(low.z_init, exact.z_init)  # the blocks up to the critical one ran in float32
    assert not torch.equal(low.delta, exact.delta)  # the blocks above it did not
    assert torch.cosine_similarity(low.delta, exact.delta, dim=0) > 0.95
    assert low.train_prob == pytest.approx(exact.train_prob, rel=0.05) and low.delta.dtype == torch.float32
    assert all(p.dtype == torch.float32 and torch.equal(before[name], p) for name, p in model.state_dict().items())


def test_low_precision_copies_are_kept_until_the_weight_changes(tokenizer):
    weight = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    copies = LowPrecisionCopies(torch.bfloat16)
    first = copies(weight)
    assert copies(weight) is first and torch.equal(first, weight.to(torch.bfloat16))
    with torch.no_grad():
        weight.add_(1.0)  # as an edit writes: the version counter moves
    assert torch.equal(copies(weight), weight.to(torch.bfloat16))
    # kept from one search to the next, the copies give what a fresh cast gives
    model = tiny_model("llama", n_layers=4)
    parts = find_parts(model)
    request = EditRequest("The capital of {} is", "France", "Rome")
    settings = dataclasses.replace(SETTINGS, search_dtype="bfloat16")
    kept = LowPrecisionCopies(torch.bfloat16)
    runs = [optimize_target(model, parts, tokenizer, request, CONTEXTS, 1, settings, low_precision=kept) for _ in "ab"]
    fresh = optimize_target(model, parts, tokenizer, request, CONTEXTS, 1, settings)
    assert torch.equal(runs[0].delta, fresh.delta) and torch.equal(runs[1].delta, fresh.delta)


def test_project_moments_keeps_adams_first_moment_inside_the_subspace(tokenizer, monkeypatch):
    """With ``project_moments`` the momentum cannot carry the vector back out of the subspace between steps."""
    model = tiny_model("llama")
    d_model = model.config.hidden_size
    basis = torch.linalg.qr(torch.randn(d_model, 4, generator=torch.Generator().manual_seed(1)))[0]
    projector = torch.eye(d_model) - basis @ basis.T
    request = EditRequest("The capital of {} is", "France", "Rome")
    optimizers = []
    real = torch.optim.Adam

    def kept(*args, **kwargs):
        optimizers.append(real(*args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(torch.optim, "Adam", kept)
    parts = find_parts(model)
    moments = []
    for project in (False, True):
        settings = dataclasses.replace(SETTINGS, project_moments=project)
        optimize_target(model, parts, tokenizer, request, CONTEXTS, 1, settings, projector)
        (state,) = optimizers[-1].state.values()
        moments.append((basis.T @ state["exp_avg"]).norm() / state["exp_avg"].norm())
    assert moments[0] > 1e-3 and moments[1] < 1e-5  # outside the subspace only without the option


def test_key_average_weighs_the_bare_prompt_as_memit_or_flat(tokenizer):
    """ "grouped" (MEMIT's compute_ks): the bare prompt one half, its prefixed copies the other; "flat" (ROME's
    compute_u): one mean. Both from the same per-prompt keys; an unknown name is refused naming the option."""
    model = tiny_model("llama")
    parts = find_parts(model)
    requests = [EditRequest("The capital of {} is", "France", "Rome"), EditRequest("{} plays", "Messi", "chess")]
    flat = read_keys(model, parts, tokenizer, requests, CONTEXTS, [1], key_average="flat")
    grouped = read_keys(model, parts, tokenizer, requests, CONTEXTS, [1], key_average="grouped")
    per_prompt = flat.per_context[1].T.reshape(len(requests), len(CONTEXTS), -1)  # request-major, bare first
    assert torch.allclose(flat.keys[1], per_prompt.mean(1).T, atol=1e-6)
    expected = 0.5 * per_prompt[:, 0] + 0.5 * per_prompt[:, 1:].mean(1)
    assert torch.allclose(grouped.keys[1], expected.T, atol=1e-6)
    assert not torch.allclose(grouped.keys[1], flat.keys[1], atol=1e-4)
    assert torch.equal(grouped.per_context[1], flat.per_context[1])
    bare = read_keys(model, parts, tokenizer, requests, [""], [1], key_average="grouped")  # one prompt: its key
    assert torch.allclose(bare.keys[1], per_prompt[:, 0].T, atol=1e-5)
    with pytest.raises(ValueError, match="key_average"):
        read_keys(model, parts, tokenizer, requests, CONTEXTS, [1], key_average="median")
