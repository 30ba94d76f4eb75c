"""Text for key statistics and context prefixes: files on disk, or text the model writes itself.

Wikipedia in WikiExtractor form (``<doc ...> ... </doc>``), plain text (paragraphs split by blank
lines) and JSONL with a ``text`` field are read in a fixed order, so a corpus and a sample count name
the same samples on every machine. When no corpus exists at all, :func:`generated_texts` samples text
from the model under a seed so that statistics can still be computed anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import data_folder
from .hooks import cache_of, with_cache

_DOC = re.compile(r"<doc[^>]*>(.*?)</doc>", re.S)


@dataclass(frozen=True)
class Corpus:
    """A named text source; ``identity`` goes into cache keys (content hash for files)."""

    name: str
    identity: str
    files: tuple[Path, ...] = ()

    @property
    def generated(self) -> bool:
        return not self.files

    def texts(self) -> Iterator[str]:
        for path in self.files:
            yield from _read_texts(path)


def _read_texts(path: Path) -> Iterator[str]:
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        for line in raw.splitlines():
            if line.strip():
                text = json.loads(line).get("text", "")
                if text.strip():
                    yield text
        return
    docs = _DOC.findall(raw)
    if docs:
        for doc in docs:
            body = doc.strip().split("\n", 1)  # first line repeats the title
            text = body[1].strip() if len(body) > 1 else body[0]
            if text:
                yield text
        return
    for paragraph in re.split(r"\n\s*\n", raw):
        if paragraph.strip():
            yield paragraph.strip()


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def resolve_corpus(spec: str | os.PathLike | None, data_dir: str | os.PathLike | None = None) -> Corpus:
    """A file or folder given by the user, else Wikipedia under the data dir, else generated text."""
    if spec in ("generated", "model"):
        return Corpus("generated", "generated")
    if spec is not None:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"stats_corpus: {path} does not exist; give a text/JSONL file or folder")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        if not files:
            raise FileNotFoundError(f"stats_corpus: {path} holds no files")
        return Corpus(str(path), _hash_files(files), tuple(files))
    root = data_folder(data_dir)
    if root and (Path(root) / "wikipedia").is_dir():
        files = sorted(p for p in (Path(root) / "wikipedia").iterdir() if p.is_file())
        if files:
            return Corpus("wikipedia", _hash_files(files), tuple(files))
    return Corpus("generated", "generated")


@torch.no_grad()
def generated_texts(
    model,
    tokenizer,
    count: int,
    length: int,
    seed: int,
    starts: tuple[str, ...],
    batch_size: int = 32,
    top_k: int = 40,
) -> list[str]:
    """Sample ``count`` continuations of ``length`` tokens (top-k, seeded); deterministic for a seed."""
    device = model.get_input_embeddings().weight.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    texts: list[str] = []
    for begin in range(0, count, batch_size):
        prompts = [starts[(begin + i) % len(starts)] for i in range(min(batch_size, count - begin))]
        texts.extend(_sample(model, tokenizer, prompts, length, generator, top_k, device))
    return texts


def _sample(model, tokenizer, prompts, length, generator, top_k, device) -> list[str]:
    """Batched top-k sampling with a KV cache; prompts are single words so they share one length."""
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    width = min(len(e) for e in encoded)
    ids = torch.tensor([e[:width] for e in encoded], device=device)
    out = model(input_ids=ids, use_cache=True)
    past, logits = cache_of(out), out.logits[:, -1]
    pieces = [ids]
    for _ in range(length):
        top = torch.topk(logits.float().cpu(), min(top_k, logits.shape[-1]), dim=-1)  # a vocabulary may be smaller
        probs = torch.softmax(top.values, dim=-1)
        choice = torch.multinomial(probs, 1, generator=generator)
        next_ids = top.indices.gather(1, choice).to(device)
        pieces.append(next_ids)
        out = model(input_ids=next_ids, use_cache=True, **with_cache(model, past))
        past, logits = cache_of(out), out.logits[:, -1]
    full = torch.cat(pieces, dim=1)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in full]
