"""Key second-moment statistics ``C0 = E[k k^T]`` per edited layer: computed once, cached, listed, shared.

The pass captures the input of every edited layer's ``W_out`` at every non-padding token and stops after the
highest edited layer; memory is bounded by the batch size (plus one d_ff x d_ff sum per layer). The running
sums are saved every few batches, so a killed pass continues where it stopped and ends with the same bits.
Results are keyed by model fingerprint, layer, corpus, sample count, max length and dtype; a cached matrix
is always reused and a missing one is announced before it is computed, never recomputed silently.

Each cached file carries its identity in its metadata, which is what ``deltaedit stats list / export /
import`` read: statistics move between machines as one safetensors file, and an import onto another model or
layer set is refused naming what differs. Only C0 travels; the projectors AlphaEdit and DeltaEdit derive
from it are always rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .corpus import Corpus, generated_texts
from .hooks import capture_inputs, run_until
from .models import ModelParts, cache_dir
from .tokens import pad, pad_id

log = logging.getLogger(__name__)
GENERATION_STARTS = ("The", "In", "A", "It", "When", "There", "This", "He", "She", "We")
SAVE_EVERY = 25  # batches between saves of the running sums (a killed pass resumes from the last one)
BUNDLE_FORMAT = "deltaedit-stats"


class StatsError(ValueError):
    """Statistics that cannot be used here (another model or layer set, a damaged file); nothing was written."""


def stats_key(
    fingerprint: str, layer: int, corpus: Corpus, n_samples: int, max_length: int, dtype, seed: int = 0
) -> str:
    return _key(fingerprint, layer, _identity(corpus, seed), n_samples, max_length, str(dtype))


def _identity(corpus: Corpus, seed: int) -> str:
    # generated text depends on the seed; a file corpus is read in a fixed order whatever the seed
    return f"{corpus.identity}:seed={seed}" if corpus.generated else corpus.identity


def _key(fingerprint: str, layer: int, identity: str, n_samples: int, max_length: int, dtype: str) -> str:
    fields = [fingerprint, layer, identity, n_samples, max_length, dtype]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class StatsEntry:
    """One cached C0: where it is and what it is of."""

    path: Path
    model: str
    layer: int
    corpus: str
    identity: str
    samples: int
    tokens: int
    max_length: int
    dtype: str

    @property
    def key(self) -> str:
        return _key(self.model, self.layer, self.identity, self.samples, self.max_length, self.dtype)

    def metadata(self) -> dict[str, str]:
        return {
            "model": self.model,
            "layer": str(self.layer),
            "corpus": self.corpus,
            "identity": self.identity,
            "samples": str(self.samples),
            "tokens": str(self.tokens),
            "max_length": str(self.max_length),
            "dtype": self.dtype,
        }

    @classmethod
    def from_metadata(cls, path: Path, meta: dict[str, str]) -> StatsEntry:
        return cls(
            path,
            meta["model"],
            int(meta["layer"]),
            meta.get("corpus", "?"),
            meta["identity"],
            int(meta["samples"]),
            int(meta.get("tokens", 0)),
            int(meta["max_length"]),
            meta["dtype"],
        )


def default_store() -> Path:
    return cache_dir() / "stats"


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
    store = Path(store or default_store())
    store.mkdir(parents=True, exist_ok=True)
    dtype = str(next(model.parameters()).dtype)
    identity = _identity(corpus, seed)
    paths = {i: store / f"{_key(fingerprint, i, identity, n_samples, max_length, dtype)}.safetensors" for i in layers}
    cached = _complete(paths, layers)
    if cached is not None:  # files are only ever renamed into place: reading them needs no lock
        return {i: cached[i].to(parts.out_projs[i].weight.device) for i in layers}
    # the lock is the model's: a reader of cached layers must not wait while another process computes others
    with FileLock(str(store / f"{fingerprint}.lock")):
        missing = [i for i in layers if not _readable(paths[i])]
        if missing:
            log.info(
                "computing key statistics for layers %s on %s (%d samples): not cached yet",
                missing,
                corpus.name,
                n_samples,
            )
            layers_tag = "-".join(str(i) for i in missing)
            partial = store / f".{_key(fingerprint, -1, identity, n_samples, max_length, dtype)}-{layers_tag}.partial"
            computed = _compute(
                model, parts, tokenizer, missing, corpus, n_samples, max_length, seed, batch_size, progress, partial
            )
            for i, (moment, tokens) in computed.items():
                entry = StatsEntry(
                    paths[i], fingerprint, i, corpus.name, identity, n_samples, tokens, max_length, dtype
                )
                _write(paths[i], moment, entry.metadata())
            partial.unlink(missing_ok=True)
        for i in set(layers) - set(missing):  # a file from before its identity was recorded: record it now
            entry = StatsEntry(paths[i], fingerprint, i, corpus.name, identity, n_samples, 0, max_length, dtype)
            _add_identity(paths[i], entry)
    return {i: load_file(str(paths[i]))["second_moment"].to(parts.out_projs[i].weight.device) for i in layers}


def _write(path: Path, moment: torch.Tensor, metadata: dict[str, str]) -> None:
    _save_atomic(path, {"second_moment": moment.detach().cpu().contiguous()}, metadata)


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written under a temporary name and renamed into place: never seen half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _add_identity(path: Path, entry: StatsEntry) -> None:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "identity" not in meta:
        tokens = int(meta.get("tokens", 0))
        _write(path, load_file(str(path))["second_moment"], {**entry.metadata(), "tokens": str(tokens)})


def _complete(paths: dict[int, Path], layers: Sequence[int]) -> dict[int, torch.Tensor] | None:
    """Every layer's C0 when each file is there, readable and records its identity; else None (the locked path
    computes, repairs or completes them)."""
    moments = {}
    for i in layers:
        try:
            with safe_open(str(paths[i]), "pt") as f:
                if "identity" not in (f.metadata() or {}):
                    return None
                moments[i] = f.get_tensor("second_moment")
        except Exception:
            return None
    return moments


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
def _compute(model, parts, tokenizer, layers, corpus, n_samples, max_length, seed, batch_size, progress, partial):
    if corpus.generated:
        texts = generated_texts(model, tokenizer, n_samples, max_length, seed, GENERATION_STARTS)
    else:
        texts = []
        for text in corpus.texts():
            texts.append(text)
            if len(texts) >= n_samples:
                break
    devices = {i: parts.out_projs[i].weight.device for i in layers}
    sums = {i: torch.zeros(parts.d_ff, parts.d_ff, device=devices[i]) for i in layers}
    tokens, done = 0, 0
    if partial.is_file():  # a pass that was killed: continue from its last save, the same sums in the same order
        try:
            saved = load_file(str(partial))
            sums = {i: saved[f"sum.{i}"].to(devices[i]) for i in layers}
            tokens, done = (int(x) for x in saved["progress"].tolist())
            log.info("key statistics: continuing a pass that stopped after %d of %d texts", done, len(texts))
        except Exception:
            log.warning("key statistics: %s unreadable; starting the pass again", partial)
            sums = {i: torch.zeros(parts.d_ff, parts.d_ff, device=devices[i]) for i in layers}
            tokens, done = 0, 0
    device = model.get_input_embeddings().weight.device
    bar = tqdm(
        total=len(texts), initial=done, desc=f"key statistics ({corpus.name})", disable=not progress, unit="text"
    )
    for batch_index, begin in enumerate(range(done, len(texts), batch_size), 1):
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
        done = begin + len(chunk)
        bar.update(len(chunk))
        if batch_index % SAVE_EVERY == 0 and done < len(texts):
            state = {f"sum.{i}": s.cpu().contiguous() for i, s in sums.items()}
            state["progress"] = torch.tensor([tokens, done], dtype=torch.int64)
            _save_atomic(partial, state)
    bar.close()
    return {i: (sums[i] / max(tokens, 1), tokens) for i in layers}


# ---------------------------------------------------------------------------------------------- list, share


def list_entries(store: Path | None = None, fingerprint: str | None = None) -> list[StatsEntry]:
    """Every cached C0 in ``store`` (of one model when ``fingerprint`` is given), by model, layer, corpus."""
    store = Path(store or default_store())
    entries = []
    for path in sorted(store.glob("*.safetensors")) if store.is_dir() else []:
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            entry = StatsEntry.from_metadata(path, meta)
        except Exception:  # an older file without identity metadata, or a damaged one: not shareable
            continue
        if fingerprint is None or entry.model == fingerprint:
            entries.append(entry)
    return sorted(entries, key=lambda e: (e.model, e.layer, e.corpus, e.samples))


def export_bundle(entries: Sequence[StatsEntry], out: str | os.PathLike) -> Path:
    """One safetensors file holding the given entries' C0 and each one's identity."""
    if not entries:
        raise StatsError("nothing to export: no cached statistics match (deltaedit stats list shows them)")
    tensors, described = {}, []
    for entry in entries:
        tensors[f"layer.{entry.layer}.{entry.key}"] = load_file(str(entry.path))["second_moment"]
        described.append(entry.metadata())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(out, tensors, {"format": BUNDLE_FORMAT, "entries": json.dumps(described)})
    return out


def import_bundle(path: str | os.PathLike, fingerprint: str, d_ff: int, layers: Sequence[int] | None = None,
                  store: Path | None = None) -> list[StatsEntry]:  # fmt: skip
    """Put a bundle's statistics into the cache of the model with ``fingerprint``. Every entry is checked first
    (the same model, the layers asked for, a finite symmetric d_ff x d_ff matrix); anything else is refused
    naming what differs, and then nothing is written."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as err:
        raise StatsError(f"{path}: not a readable safetensors file ({err})") from None
    if meta.get("format") != BUNDLE_FORMAT:
        raise StatsError(f"{path}: not a deltaedit statistics file (written by `deltaedit stats export`)")
    described = [StatsEntry.from_metadata(Path(), m) for m in json.loads(meta["entries"])]
    store = Path(store or default_store())
    checked = []
    for entry in described:
        if entry.model != fingerprint:
            raise StatsError(
                f"{path}: made for the model with fingerprint {entry.model}, but this model's is {fingerprint}; "
                "statistics only fit the model they were computed on"
            )
        if layers is not None and entry.layer not in layers:
            raise StatsError(f"{path}: holds layer {entry.layer}, not one of the layers asked for {list(layers)}")
        moment = tensors.get(f"layer.{entry.layer}.{entry.key}")
        if moment is None:
            raise StatsError(f"{path}: lists layer {entry.layer} but holds no matrix for it")
        if tuple(moment.shape) != (d_ff, d_ff) or not torch.isfinite(moment).all():
            raise StatsError(f"{path}: layer {entry.layer} is not a finite {d_ff} x {d_ff} matrix")
        if not torch.allclose(moment, moment.T, atol=1e-5 * float(moment.abs().max()) + 1e-12):
            raise StatsError(f"{path}: layer {entry.layer} is not symmetric, so it is no second moment")
        checked.append((entry, moment))
    if layers is not None:
        absent = sorted(set(layers) - {e.layer for e, _ in checked})
        if absent:
            raise StatsError(f"{path}: has no statistics for layers {absent}")
    store.mkdir(parents=True, exist_ok=True)
    written = []
    for entry, moment in checked:
        target = store / f"{entry.key}.safetensors"
        _write(target, moment, entry.metadata())
        written.append(StatsEntry.from_metadata(target, entry.metadata()))
    return written
