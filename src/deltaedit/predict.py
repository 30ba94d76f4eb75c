"""Batched scoring of answers under teacher forcing, shared by the demo, the CLI and the metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .models import ModelParts
from .target import input_device, logits_at
from .tokens import pad, pad_id


@dataclass
class AnswerScore:
    log_prob: float  # sum of the answer tokens' log-probabilities
    n_tokens: int
    greedy: bool  # every answer token is the argmax at its position

    @property
    def prob(self) -> float:
        return float(torch.tensor(self.log_prob).exp())


def spaced(prompt: str, answer: str) -> str:
    return answer if prompt.endswith((" ", "\n")) or answer.startswith(" ") else " " + answer


@torch.no_grad()
def score_answers(
    model, parts: ModelParts, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32
) -> list[AnswerScore]:
    """Log-probability of each answer after its prompt, and whether greedy decoding produces it."""
    scores: list[AnswerScore] = []
    device = input_device(model)
    for begin in range(0, len(prompts), batch_size):
        chunk = list(zip(prompts[begin : begin + batch_size], answers[begin : begin + batch_size], strict=True))
        prompt_ids = [tokenizer(p)["input_ids"] for p, _ in chunk]
        answer_ids = [tokenizer(spaced(p, a), add_special_tokens=False)["input_ids"] for p, a in chunk]
        batch = pad([p + a for p, a in zip(prompt_ids, answer_ids, strict=True)], pad_id(tokenizer), device)
        rows, cols, labels, owner = [], [], [], []
        for r, (p, a) in enumerate(zip(prompt_ids, answer_ids, strict=True)):
            for j, token in enumerate(a):
                rows.append(r)
                cols.append(len(p) - 1 + j)
                labels.append(token)
                owner.append(r)
        rows_t = torch.tensor(rows, device=device)
        logits = logits_at(model, parts, batch.inputs(), rows_t, torch.tensor(cols, device=device)).float()
        log_probs = torch.log_softmax(logits, -1)
        labels_t = torch.tensor(labels, device=logits.device)
        token_lp = log_probs.gather(1, labels_t[:, None]).squeeze(1)
        hits = logits.argmax(-1) == labels_t
        owner_t = torch.tensor(owner, device=logits.device)
        for r, a in enumerate(answer_ids):
            sel = owner_t == r
            scores.append(AnswerScore(float(token_lp[sel].sum()), len(a), bool(hits[sel].all())))
    return scores


@torch.no_grad()
def top_tokens(model, parts: ModelParts, tokenizer, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    """The k most likely next tokens after ``prompt`` with their probabilities."""
    ids = tokenizer(prompt)["input_ids"]
    batch = pad([ids], pad_id(tokenizer), input_device(model))
    device = batch.input_ids.device
    logits = logits_at(
        model,
        parts,
        batch.inputs(),
        torch.tensor([0], device=device),
        torch.tensor([len(ids) - 1], device=device),
    ).float()
    probs = torch.softmax(logits[0], -1)
    top = torch.topk(probs, k)
    return [(tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices, strict=True)]


@torch.no_grad()
def greedy_continuation(model, parts: ModelParts, tokenizer, prompt: str, n_tokens: int = 4) -> str:
    """A short greedy continuation, to show what the model now says."""
    ids = tokenizer(prompt)["input_ids"]
    device = input_device(model)
    for _ in range(n_tokens):
        batch = pad([ids], pad_id(tokenizer), device)
        logits = logits_at(
            model,
            parts,
            batch.inputs(),
            torch.tensor([0], device=device),
            torch.tensor([len(ids) - 1], device=device),
        )
        ids.append(int(logits[0].argmax()))
    return tokenizer.decode(ids[len(tokenizer(prompt)["input_ids"]) :])
