"""Tests that need a CUDA GPU (``pytest -m cuda``; skipped elsewhere; benchmarks/gpu_check.sh runs them)."""

from __future__ import annotations

import pytest
import torch
from conftest import fast_config, tiny_model

from deltaedit import Editor, EditRequest
from deltaedit.models import out_weight

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_edit_on_the_gpu_solves_in_float32_and_writes_the_models_dtype(tokenizer, corpus_file, dtype):
    model = tiny_model("llama", n_layers=3, initializer_range=0.2).to("cuda", dtype)
    editor = Editor(model, tokenizer, "deltaedit", fast_config(corpus_file, eta=0.0, warmup=0), progress=False)
    result = editor.edit(EditRequest("The capital of {}", "France", "Tokyo"))[0]
    update = editor.applied[0].updates[1]
    assert update.left.dtype == update.right.dtype == torch.float32 and update.left.device.type == "cuda"
    assert out_weight(editor.parts.out_projs[1]).dtype == dtype and result.target_prob > 0
    editor.undo_to(None)
    assert all(torch.equal(out_weight(editor.parts.out_projs[i]), w) for i, w in editor.original_weights.items())


def test_the_fingerprint_on_the_gpu_is_the_cpus(tokenizer):
    from deltaedit.models import fingerprint

    model = tiny_model("llama", n_layers=2)
    on_cpu = fingerprint(model)
    assert fingerprint(model.to("cuda")) == on_cpu
