"""Activation hooks: patching a block's forward must leave whatever was there before, including the instance
``forward`` accelerate installs on modules it offloads or dispatches."""

from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model
from conftest import tiny_model

from deltaedit.hooks import capture_raw_output, replay_output, run_until
from deltaedit.models import find_parts


def offloaded(model, folder):
    """``model`` dispatched by accelerate with block 1 offloaded to disk: every block's forward is wrapped."""
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" if i == 1 else "cpu" for i in range(len(model.model.layers))})
    return dispatch_model(model, device_map=device_map, offload_dir=str(folder))


def test_replay_output_restores_an_instance_forward_installed_by_accelerate(tmp_path):
    model = tiny_model("llama", seed=5)
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    model = offloaded(model, tmp_path)
    blocks = list(find_parts(model).layers[:2])
    wrapped = [block.__dict__["forward"] for block in blocks]
    with torch.no_grad(), capture_raw_output(blocks[-1]) as captured:
        run_until(model, blocks[-1], input_ids=ids)
    with torch.no_grad(), replay_output(blocks, captured[0]):
        replayed = model(input_ids=ids).logits
    assert [block.__dict__.get("forward") for block in blocks] == wrapped  # accelerate's wrappers are back
    with torch.no_grad():
        again = model(input_ids=ids).logits
    assert torch.allclose(replayed, reference, atol=1e-5) and torch.allclose(again, reference, atol=1e-5)


def test_replay_output_removes_its_own_patch_from_a_plain_block():
    model = tiny_model("llama", seed=5)
    block = find_parts(model).layers[0]
    assert "forward" not in block.__dict__
    with replay_output([block], torch.zeros(1)):
        assert "forward" in block.__dict__
    assert "forward" not in block.__dict__


def test_editing_a_model_whose_other_layers_are_offloaded_to_disk(tokenizer, corpus_file, tmp_path):
    """accelerate with disk offload of the layers not edited: the edit, undo and the fingerprint work as on the
    model kept whole; an edited layer that is offloaded is refused naming it."""
    from conftest import fast_config

    from deltaedit import Editor, EditRequest
    from deltaedit.models import fingerprint, out_weight

    whole = tiny_model("llama", seed=6, n_layers=4, initializer_range=0.2)
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "cpu" if i < 2 else "disk" for i in range(4)})
    model = dispatch_model(
        tiny_model("llama", seed=6, n_layers=4, initializer_range=0.2), device_map=device_map, offload_dir=str(tmp_path)
    )
    assert fingerprint(model) == fingerprint(whole)
    config = fast_config(corpus_file)  # edits layers 0 and 1, kept on the CPU
    request = EditRequest("The capital of {}", "France", "Tokyo")
    results = [Editor(m, tokenizer, "alphaedit", config, progress=False).edit(request)[0] for m in (whole, model)]
    assert results[1].success == results[0].success and results[1].target_prob == pytest.approx(
        results[0].target_prob, rel=1e-4
    )
    with pytest.raises(ValueError, match=r"layers: the W_out of layers \[2\] is offloaded"):
        Editor(model, tokenizer, "alphaedit", {**config, "layers": [1, 2]}, progress=False)
    assert out_weight(find_parts(model).out_projs[3]).device.type == "meta"
