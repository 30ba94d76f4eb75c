"""Tokenize prompts, locate the subject's last token, and pad batches.

Targets are appended in token space (prompt ids + target ids) rather than as text, so the positions
the loss reads are exact whatever the tokenizer does at the prompt/target boundary; evaluation uses
the same layout, so an edit is trained and scored on identical token sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .requests import PLACEHOLDER, EditRequest, RequestError, spaced, target_text


@dataclass
class Encoded:
    """One tokenized prompt: its ids and the index of the subject's last token (or -1 if none)."""

    ids: list[int]
    subject_index: int


def encode(tokenizer, template: str, subject: str | None, prefix: str = "") -> Encoded:
    """Tokenize ``prefix + template`` with the subject filled in and find the subject's last token."""
    if subject is None:
        text = prefix + template
        return Encoded(tokenizer(text)["input_ids"], -1)
    start = len(prefix) + template.index(PLACEHOLDER)
    text = prefix + template.replace(PLACEHOLDER, subject)
    end = start + len(subject)
    if getattr(tokenizer, "is_fast", False):
        out = tokenizer(text, return_offsets_mapping=True)
        index = -1
        for position, (tok_start, tok_end) in enumerate(out["offset_mapping"]):
            if tok_end > tok_start and tok_start < end and tok_end > start:
                index = position
        ids = out["input_ids"]
    else:  # slow tokenizers: the subject ends where the tokenized text up to it ends
        ids = tokenizer(text)["input_ids"]
        index = len(tokenizer(text[:end])["input_ids"]) - 1
    if index < 0:
        raise RequestError("subject", f"{subject!r} cannot be located in the tokenized prompt {text!r}")
    return Encoded(ids, index)


def target_ids(tokenizer, request: EditRequest, which: str = "target_new") -> list[int]:
    text = target_text(request) if which == "target_new" else spaced(request.prompt, getattr(request, which))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> Batch:
    """Right-pad id lists into a batch; positions of real tokens are unchanged by the padding."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    lengths = mask.sum(1)
    return Batch(ids.to(device), mask.to(device), lengths.to(device))


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def length_batches(lengths: Sequence[int], max_rows: int, max_tokens: int, shared: int = 0) -> list[list[int]]:
    """Indices grouped shortest first into batches of at most ``max_rows`` rows whose padded size, rows x
    (``shared`` + longest), stays within ``max_tokens`` (a longer sequence goes alone).

    Why: a batch's activations grow with rows x width, so a fixed row count that suits short prompts makes
    a batch of long ones the largest allocation of a pass (``shared`` counts a cached prefix every row
    attends to)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches:
            rows = len(batches[-1]) + 1
            if rows <= max_rows and rows * (shared + lengths[index]) <= max_tokens:
                batches[-1].append(index)
                continue
        batches.append([index])
    return batches


def first_tokens(tokenizer, text: str, n_tokens: int, margin: int = 64) -> list[int]:
    """The first ``n_tokens`` ids of ``tokenizer(text)`` (no special tokens), tokenizing only a prefix.

    Why: tokenizing a whole corpus file at once holds every id and offset of it (about 200 MB for
    WikiText-2's test split) to keep a few thousand. The prefix ends at a line break and is grown until it
    yields ``margin`` ids more than needed, so the ids kept lie far from the cut and match the whole text's."""
    chars = 8 * (n_tokens + margin)
    while True:
        after_break = text.rfind("\n", 0, chars) + 1  # 0 when no line break comes before ``chars``
        piece = text if chars >= len(text) else text[: after_break or chars]
        ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        if piece is text or len(ids) >= n_tokens + margin:
            return ids[:n_tokens]
        chars *= 2
