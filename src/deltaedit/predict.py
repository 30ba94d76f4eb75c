"""Batched scoring of answers under teacher forcing, shared by the demo, the CLI and the metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .models import ModelParts
from .requests import spaced
from .tokens import pad, pad_id


def input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def final_logits(model: nn.Module, parts: ModelParts, hidden: torch.Tensor) -> torch.Tensor:
    """Unembed final (already normed) hidden states, with the soft-capping some families apply."""
    logits = parts.unembed(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def logits_at(model: nn.Module, parts: ModelParts, inputs: dict, rows: torch.Tensor, cols: torch.Tensor):
    """Logits only at the (row, col) positions a loss or metric reads: the unembedding is the costliest
    matrix of a small model, so it is not applied to every position."""
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
    return final_logits(model, parts, hidden[rows, cols])


@dataclass
class AnswerScore:
    log_prob: float  # sum of the answer tokens' log-probabilities
    n_tokens: int
    greedy: bool  # every answer token is the argmax at its position

    @property
    def prob(self) -> float:
        return float(torch.tensor(self.log_prob).exp())


@dataclass
class TokenScore:
    """Teacher-forced scores of one answer: per answer token, its log-probability and the argmax there.

    Metrics need both views of the same forward pass: probabilities (the *larger* comparisons) and the
    argmax at every position (the *top* / token-accuracy metrics).
    """

    targets: list[int]
    log_probs: list[float]
    predicted: list[int]  # argmax token at each answer position, given the true earlier answer tokens

    @property
    def log_prob(self) -> float:
        return float(sum(self.log_probs))

    @property
    def mean_log_prob(self) -> float:
        """Length-normalized log-probability (mean over the answer's tokens)."""
        return self.log_prob / len(self.targets) if self.targets else 0.0

    @property
    def greedy(self) -> bool:
        """Every answer token is the argmax at its position (vacuously true for an empty answer)."""
        return self.predicted == self.targets

    @property
    def accuracy(self) -> float:
        """Share of answer tokens that are the argmax at their position."""
        if not self.targets:
            return 1.0
        return sum(p == t for p, t in zip(self.predicted, self.targets, strict=True)) / len(self.targets)


@torch.no_grad()
def score_token_answers(
    model,
    parts: ModelParts,
    prompt_ids: Sequence[Sequence[int]],
    answer_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 32,
) -> list[TokenScore]:
    """Teacher-forced scores of answers given as token ids, appended to prompts given as token ids.

    Working in token space lets a metric score exactly the sequence another model produced (the unedited
    model's own prediction), with no decode/re-encode round trip. Queries are batched by length (right
    padding, attention mask) and returned in input order.
    """
    if len(prompt_ids) != len(answer_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(answer_ids)} answers")
    if batch_size < 1:
        raise ValueError("batch_size: must be >= 1")
    results: list[TokenScore | None] = [None] * len(prompt_ids)
    todo = []
    for i, answer in enumerate(answer_ids):
        if len(answer) == 0:
            results[i] = TokenScore([], [], [])
        else:
            todo.append(i)
    todo.sort(key=lambda i: len(prompt_ids[i]) + len(answer_ids[i]))
    device = input_device(model)
    for begin in range(0, len(todo), batch_size):
        chunk = todo[begin : begin + batch_size]
        # the last answer token is only ever a label, never an input
        batch = pad([list(prompt_ids[i]) + list(answer_ids[i][:-1]) for i in chunk], pad_token_id, device)
        rows, cols, labels = [], [], []
        for r, i in enumerate(chunk):
            start = len(prompt_ids[i]) - 1
            for j, token in enumerate(answer_ids[i]):
                rows.append(r)
                cols.append(start + j)
                labels.append(int(token))
        logits = logits_at(
            model,
            parts,
            batch.inputs(),
            torch.tensor(rows, device=device),
            torch.tensor(cols, device=device),
        ).float()
        labels_t = torch.tensor(labels, device=logits.device)
        token_lp = torch.log_softmax(logits, -1).gather(1, labels_t[:, None]).squeeze(1).tolist()
        predicted = logits.argmax(-1).tolist()
        at = 0
        for i in chunk:
            n = len(answer_ids[i])
            results[i] = TokenScore(labels[at : at + n], token_lp[at : at + n], predicted[at : at + n])
            at += n
    return results  # type: ignore[return-value]


@torch.no_grad()
def greedy_tokens(
    model,
    parts: ModelParts,
    prompt_ids: Sequence[Sequence[int]],
    n_tokens: Sequence[int],
    pad_token_id: int,
    batch_size: int = 32,
) -> list[list[int]]:
    """Greedy continuations (token ids) of many prompts, ``n_tokens[i]`` tokens for prompt ``i``, batched.

    No KV cache: the continuations metrics need are a few tokens long, and a full forward per step keeps
    this independent of each architecture's cache format.
    """
    if len(prompt_ids) != len(n_tokens):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(n_tokens)} lengths")
    out: list[list[int]] = [[] for _ in prompt_ids]
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    device = input_device(model)
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        while True:
            active = [i for i in chunk if len(out[i]) < n_tokens[i]]
            if not active:
                break
            seqs = [list(prompt_ids[i]) + out[i] for i in active]
            batch = pad(seqs, pad_token_id, device)
            logits = logits_at(
                model,
                parts,
                batch.inputs(),
                torch.arange(len(active), device=device),
                torch.tensor([len(s) - 1 for s in seqs], device=device),
            )
            for i, token in zip(active, logits.argmax(-1).tolist(), strict=True):
                out[i].append(int(token))
    return out


def answer_ids(tokenizer, prompt: str, answer: str) -> list[int]:
    """The answer's token ids as they follow ``prompt`` (with a separating space, as edits are trained)."""
    return tokenizer(spaced(prompt, answer), add_special_tokens=False)["input_ids"]


def score_answers(
    model, parts: ModelParts, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32
) -> list[AnswerScore]:
    """Log-probability of each answer after its prompt, and whether greedy decoding produces it."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    answer_tokens = [answer_ids(tokenizer, p, a) for p, a in zip(prompts, answers, strict=True)]
    scores = score_token_answers(model, parts, prompt_ids, answer_tokens, pad_id(tokenizer), batch_size)
    return [AnswerScore(s.log_prob, len(s.targets), s.greedy) for s in scores]


def next_token_logits(model, parts: ModelParts, tokenizer, ids: list[int]) -> torch.Tensor:
    """The logits after the last of ``ids`` (one unpadded sequence), read at that position only."""
    batch = pad([ids], pad_id(tokenizer), input_device(model))
    device = batch.input_ids.device
    last = torch.tensor([len(ids) - 1], device=device)
    return logits_at(model, parts, batch.inputs(), torch.tensor([0], device=device), last)[0]


@torch.no_grad()
def top_tokens(model, parts: ModelParts, tokenizer, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    """The k most likely next tokens after ``prompt`` with their probabilities."""
    logits = next_token_logits(model, parts, tokenizer, tokenizer(prompt)["input_ids"]).float()
    probs = torch.softmax(logits, -1)
    top = torch.topk(probs, k)
    return [(tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices, strict=True)]


@torch.no_grad()
def greedy_continuation(model, parts: ModelParts, tokenizer, prompt: str, n_tokens: int = 4) -> str:
    """A short greedy continuation, to show what the model now says."""
    ids = list(tokenizer(prompt)["input_ids"])
    start = len(ids)
    for _ in range(n_tokens):
        ids.append(int(next_token_logits(model, parts, tokenizer, ids).argmax()))
    return tokenizer.decode(ids[start:])
