"""Key second-moment statistics ``C0 = E[k k^T]`` per edited layer, computed once and cached on disk.

The pass captures the input of every edited layer's ``W_out`` at every non-padding token and stops
after the highest edited layer. Results are keyed by model fingerprint, layer, corpus, sample count,
max length and dtype; a cached matrix is always reused and a missing one is announced before it is
computed, never recomputed silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .corpus import Corpus, generated_texts
from .hooks import capture_inputs, run_until
from .models import ModelParts, cache_dir
from .tokens import pad, pad_id

log = logging.getLogger(__name__)
GENERATION_STARTS = ("The", "In", "A", "It", "When", "There", "This", "He", "She", "We")


def stats_key(
    fingerprint: str, layer: int, corpus: Corpus, n_samples: int, max_length: int, dtype, seed: int = 0
) -> str:
    # generated text depends on the seed; a file corpus is read in a fixed order whatever the seed
    identity = f"{corpus.identity}:seed={seed}" if corpus.generated else corpus.identity
    fields = [fingerprint, layer, identity, n_samples, max_length, str(dtype)]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:20]


def second_moments(
    model,
    parts: ModelParts,
    tokenizer,
    layers: Sequence[int],
    corpus: Corpus,
    n_samples: int,
    max_length: int,
    fingerprint: str,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    store: Path | None = None,
) -> dict[int, torch.Tensor]:
    """C0 for each layer (float32, d_ff x d_ff, on that layer's device), from cache when present."""
    store = store or cache_dir() / "stats"
    store.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    paths = {
        i: store / f"{stats_key(fingerprint, i, corpus, n_samples, max_length, dtype, seed)}.safetensors"
        for i in layers
    }
    with FileLock(str(store / f"{fingerprint}.lock")):
        missing = [i for i in layers if not _readable(paths[i])]
        if missing:
            log.info(
                "computing key statistics for layers %s on %s (%d samples): not cached yet",
                missing,
                corpus.name,
                n_samples,
            )
            computed = _compute(
                model, parts, tokenizer, missing, corpus, n_samples, max_length, seed, batch_size, progress
            )
            for i, (moment, tokens) in computed.items():
                meta = {
                    "corpus": corpus.name,
                    "samples": str(n_samples),
                    "tokens": str(tokens),
                    "max_length": str(max_length),
                    "layer": str(i),
                    "model": fingerprint,
                }
                tmp = paths[i].with_suffix(".tmp")
                save_file({"second_moment": moment.cpu().contiguous()}, str(tmp), metadata=meta)
                os.replace(tmp, paths[i])
    return {i: load_file(str(paths[i]))["second_moment"].to(parts.out_projs[i].weight.device) for i in layers}


def _readable(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        load_file(str(path))
        return True
    except Exception:  # a truncated or corrupt file is rebuilt, not trusted
        log.warning("key statistics %s unreadable; recomputing", path)
        return False


@torch.no_grad()
def _compute(model, parts, tokenizer, layers, corpus, n_samples, max_length, seed, batch_size, progress):
    if corpus.generated:
        texts = generated_texts(model, tokenizer, n_samples, max_length, seed, GENERATION_STARTS)
    else:
        texts = []
        for text in corpus.texts():
            texts.append(text)
            if len(texts) >= n_samples:
                break
    sums = {i: torch.zeros(parts.d_ff, parts.d_ff, device=parts.out_projs[i].weight.device) for i in layers}
    tokens = 0
    device = model.get_input_embeddings().weight.device
    bar = tqdm(total=len(texts), desc=f"key statistics ({corpus.name})", disable=not progress, unit="text")
    for begin in range(0, len(texts), batch_size):
        chunk = texts[begin : begin + batch_size]
        ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in chunk]
        ids = [x for x in ids if x]
        batch = pad(ids, pad_id(tokenizer), device)
        with capture_inputs({i: parts.out_projs[i] for i in layers}) as keys:
            run_until(model, parts.layers[max(layers)], **batch.inputs())
        mask = batch.attention_mask.bool()
        for i in layers:
            k = keys[i][mask.to(keys[i].device)].float()
            sums[i] += k.T @ k
        tokens += int(mask.sum())
        bar.update(len(chunk))
    bar.close()
    return {i: (sums[i] / max(tokens, 1), tokens) for i in layers}
