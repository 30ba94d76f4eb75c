"""Rewrite metrics of DESIGN.md §6 (paper appendix A.2): CounterFact top/larger and zsRE token accuracy.

Two steps, because specificity is defined against what the model said *before* any edit:

    base = baseline(model, parts, tokenizer, records, "counterfact")   # once, on the unedited model
    ... edit ...
    scores = evaluate(model, parts, tokenizer, records[:n], base)      # at every checkpoint

CounterFact (per record; a record's value is the mean over its prompts, a metric the mean over records):

* ``o*`` is ``target_new``; ``o^c`` is the unedited model's own prediction (paper A.2: recomputed from the
  model, not the dataset's answer): its greedy continuation of the edit prompt (used for efficacy and
  generalization) or of each neighbourhood prompt (specificity), as many tokens long as the dataset's true
  answer (``target_true`` / the neighbourhood answer), or as ``target_new`` when the data has none.
  ``reference="dataset"`` uses the dataset's answers instead, as MEMIT / AlphaEdit do.
* *top*: every token of the answer is the argmax under teacher forcing.
* *larger*: the answer's mean token log-probability (length-normalized, as MEMIT's code) beats the other's;
  strictly, so a tie counts as a failure.

zsRE: token-level top-1 accuracy of ``target_new`` on the question (efficacy) and its rephrasings
(generalization); specificity is the share of ``loc`` answer positions whose argmax is unchanged from the
unedited model (teacher-forced on ``loc_ans``, or on the unedited model's own continuation when the data has
no answer). ``specificity_answer`` is accuracy against ``loc_ans`` itself (MEMIT's definition, the one the
paper's zsRE "Spe." column is comparable with).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .data.records import EditRecord
from .models import ModelParts
from .predict import TokenScore, answer_ids, greedy_tokens, score_token_answers
from .tokens import pad_id

KINDS = ("counterfact", "zsre")
REFERENCES = ("model", "dataset")
COUNTERFACT_METRICS = (
    "efficacy_top",
    "generalization_top",
    "specificity_top",
    "efficacy_larger",
    "generalization_larger",
    "specificity_larger",
)
ZSRE_METRICS = ("efficacy", "generalization", "specificity", "specificity_answer")


@dataclass
class RecordBaseline:
    """What the unedited model says for one record, as token ids.

    ``edit_ref``: ``o^c`` on the edit prompt (CounterFact; empty for zsRE).
    ``neighbor_refs``: per neighbourhood prompt, CounterFact's ``o^c`` or zsRE's teacher-forced sequence.
    ``neighbor_preds``: zsRE only, the unedited argmax at each position of ``neighbor_refs``.
    ``neighbor_answers``: zsRE only, whether ``neighbor_refs`` is the dataset's ``loc_ans`` (else the model's).
    """

    edit_ref: list[int] = field(default_factory=list)
    neighbor_refs: list[list[int]] = field(default_factory=list)
    neighbor_preds: list[list[int]] = field(default_factory=list)
    neighbor_answers: list[bool] = field(default_factory=list)


@dataclass
class Baseline:
    """The unedited model's answers for a set of records; look-ups are by record, so any subset of the
    records it was built on (e.g. the first n at a checkpoint) can be evaluated."""

    kind: str
    reference: str
    entries: dict[EditRecord, RecordBaseline]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, record: EditRecord) -> RecordBaseline:
        try:
            return self.entries[record]
        except KeyError:
            raise KeyError(
                f"no baseline for the record with case_id {record.request.case_id!r}: compute the baseline on "
                "every record you will evaluate, before the first edit"
            ) from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the baseline as JSON, so a resumed run can evaluate against the model it started from."""
        entries = [
            {"case_id": record.request.case_id, "prompt": record.request.text, **asdict(entry)}
            for record, entry in self.entries.items()
        ]
        data = {"kind": self.kind, "reference": self.reference, "entries": entries}
        Path(path).write_text(json.dumps(data), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike, records: Sequence[EditRecord]) -> Baseline:
        """Read a saved baseline back for ``records``: the same records, in the same order, as it was built on."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        unique = list(dict.fromkeys(records))
        if len(unique) != len(data["entries"]):
            raise ValueError(f"{path}: a baseline of {len(data['entries'])} records, not {len(unique)}")
        entries = {}
        for record, saved in zip(unique, data["entries"], strict=True):
            if (saved.pop("case_id"), saved.pop("prompt")) != (record.request.case_id, record.request.text):
                raise ValueError(f"{path}: saved for other records (mismatch at case_id {record.request.case_id!r})")
            entries[record] = RecordBaseline(**saved)
        return cls(data["kind"], data["reference"], entries)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind: unknown {kind!r}; use one of {KINDS} (user edit files use 'counterfact')")


def _prompt_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def baseline(
    model,
    parts: ModelParts,
    tokenizer,
    records: Sequence[EditRecord],
    kind: str = "counterfact",
    reference: str = "model",
    batch_size: int = 32,
) -> Baseline:
    """Record what the *unedited* model predicts; call once at the start of a run, before any edit.

    ``reference`` (CounterFact only): ``"model"`` takes ``o^c`` from the model (the paper), ``"dataset"`` takes
    the dataset's ``target_true`` / neighbourhood answers (MEMIT, AlphaEdit).
    """
    _check_kind(kind)
    if reference not in REFERENCES:
        raise ValueError(f"reference: unknown {reference!r}; use one of {REFERENCES}")
    unique = list(dict.fromkeys(records))
    pad = pad_id(tokenizer)
    if kind == "zsre":
        return _zsre_baseline(model, parts, tokenizer, unique, batch_size, pad)

    entries = {record: RecordBaseline() for record in unique}
    slots = [slot for record in unique for slot in _counterfact_slots(record)]
    if reference == "dataset":
        for record, j, prompt, answer, from_data in slots:
            if not from_data:
                raise ValueError(
                    f"reference='dataset' needs the true answer of every prompt (case_id "
                    f"{record.request.case_id!r} has no target_true); use reference='model'"
                )
            _store_ref(entries[record], j, answer_ids(tokenizer, prompt, answer))
        return Baseline(kind, reference, entries)
    prompts = [_prompt_ids(tokenizer, prompt) for _, _, prompt, _, _ in slots]
    lengths = [len(answer_ids(tokenizer, prompt, answer)) for _, _, prompt, answer, _ in slots]
    continuations = greedy_tokens(model, parts, prompts, lengths, pad, batch_size)
    for (record, j, *_), tokens in zip(slots, continuations, strict=True):
        _store_ref(entries[record], j, tokens)
    return Baseline(kind, reference, entries)


def _counterfact_slots(record: EditRecord) -> list[tuple[EditRecord, int, str, str, bool]]:
    """(record, -1 for the edit prompt or the neighbour's index, prompt, true answer, whether the answer is
    the dataset's); without a true answer, ``target_new`` stands in (it then only sets o^c's length)."""
    request = record.request
    true = request.target_true
    slots = [(record, -1, request.text, true or request.target_new, true is not None)]
    for j, prompt in enumerate(request.neighborhood_prompts):
        answer = record.neighborhood_answers[j] if record.neighborhood_answers else true
        slots.append((record, j, prompt, answer or request.target_new, answer is not None))
    return slots


def _store_ref(entry: RecordBaseline, j: int, tokens: list[int]) -> None:
    if j < 0:
        entry.edit_ref = tokens
    else:
        entry.neighbor_refs.append(tokens)


def _zsre_baseline(model, parts, tokenizer, records, batch_size, pad) -> Baseline:
    entries = {record: RecordBaseline() for record in records}
    forced: list[tuple[EditRecord, list[int], list[int], bool]] = []  # record, prompt ids, sequence, from data
    missing: list[tuple[EditRecord, list[int], int]] = []
    for record in records:
        request = record.request
        for j, prompt in enumerate(request.neighborhood_prompts):
            ids = _prompt_ids(tokenizer, prompt)
            if record.neighborhood_answers:
                forced.append((record, ids, answer_ids(tokenizer, prompt, record.neighborhood_answers[j]), True))
            else:
                forced.append((record, ids, [], False))
                missing.append((record, ids, len(answer_ids(tokenizer, request.text, request.target_new))))
    # without a loc answer, the unedited model's own continuation is the sequence to teacher-force
    generated = iter(greedy_tokens(model, parts, [m[1] for m in missing], [m[2] for m in missing], pad, batch_size))
    forced = [(r, ids, seq if from_data else next(generated), from_data) for r, ids, seq, from_data in forced]
    scores = score_token_answers(model, parts, [f[1] for f in forced], [f[2] for f in forced], pad, batch_size)
    for (record, _, seq, from_data), score in zip(forced, scores, strict=True):
        entry = entries[record]
        entry.neighbor_refs.append(seq)
        entry.neighbor_preds.append(score.predicted if from_data else list(seq))
        entry.neighbor_answers.append(from_data)
    return Baseline("zsre", "model", entries)


def evaluate(
    model,
    parts: ModelParts,
    tokenizer,
    records: Sequence[EditRecord],
    base: Baseline,
    kind: str | None = None,
    batch_size: int = 32,
) -> dict[str, float | None]:
    """Each metric of ``kind`` (default: the baseline's) as a value in [0, 1], ``None`` where no record has
    the prompts it needs (e.g. no paraphrases)."""
    return summarize(evaluate_records(model, parts, tokenizer, records, base, kind, batch_size))


def summarize(per_record: dict[str, list[float | None]]) -> dict[str, float | None]:
    """Mean of each metric over the records that have a value for it."""
    out: dict[str, float | None] = {}
    for name, values in per_record.items():
        present = [v for v in values if v is not None]
        out[name] = sum(present) / len(present) if present else None
    return out


def evaluate_records(
    model,
    parts: ModelParts,
    tokenizer,
    records: Sequence[EditRecord],
    base: Baseline,
    kind: str | None = None,
    batch_size: int = 32,
) -> dict[str, list[float | None]]:
    """Per-record metric values (in ``records`` order): one batched scoring pass over every prompt."""
    kind = kind or base.kind
    _check_kind(kind)
    if kind != base.kind:
        raise ValueError(f"the baseline was computed for {base.kind!r}, not {kind!r}")
    queries = _Queries(tokenizer)
    plans = []
    for record in records:
        entry = base[record]
        plan = _plan_zsre(queries, record, entry) if kind == "zsre" else _plan_counterfact(queries, record, entry)
        plans.append(plan)
    scores = score_token_answers(model, parts, queries.prompts, queries.answers, pad_id(tokenizer), batch_size)
    names = ZSRE_METRICS if kind == "zsre" else COUNTERFACT_METRICS
    out: dict[str, list[float | None]] = {name: [] for name in names}
    for plan in plans:
        values = plan(scores)
        for name in names:
            out[name].append(values[name])
    return out


class _Queries:
    """Collects (prompt ids, answer ids) pairs for one scoring pass and hands back their indices."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prompts: list[list[int]] = []
        self.answers: list[list[int]] = []
        self._ids: dict[str, list[int]] = {}

    def add(self, prompt: str, answer: str | list[int]) -> int:
        if prompt not in self._ids:
            self._ids[prompt] = _prompt_ids(self.tokenizer, prompt)
        self.prompts.append(self._ids[prompt])
        self.answers.append(answer_ids(self.tokenizer, prompt, answer) if isinstance(answer, str) else list(answer))
        return len(self.prompts) - 1


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _larger(a: TokenScore, b: TokenScore) -> float:
    return float(a.mean_log_prob > b.mean_log_prob)


def _plan_counterfact(queries: _Queries, record: EditRecord, entry: RecordBaseline):
    request = record.request
    new = request.target_new
    edit = (queries.add(request.text, new), queries.add(request.text, entry.edit_ref))
    para = [(queries.add(p, new), queries.add(p, entry.edit_ref)) for p in request.paraphrase_prompts]
    _check_entry(record, entry)
    neigh = [
        (queries.add(p, ref), queries.add(p, new))
        for p, ref in zip(request.neighborhood_prompts, entry.neighbor_refs, strict=True)
    ]

    def values(scores: list[TokenScore]) -> dict[str, float | None]:
        return {
            "efficacy_top": float(scores[edit[0]].greedy),
            "efficacy_larger": _larger(scores[edit[0]], scores[edit[1]]),
            "generalization_top": _mean([float(scores[n].greedy) for n, _ in para]),
            "generalization_larger": _mean([_larger(scores[n], scores[r]) for n, r in para]),
            "specificity_top": _mean([float(scores[r].greedy) for r, _ in neigh]),
            "specificity_larger": _mean([_larger(scores[r], scores[n]) for r, n in neigh]),
        }

    return values


def _plan_zsre(queries: _Queries, record: EditRecord, entry: RecordBaseline):
    request = record.request
    src = queries.add(request.text, request.target_new)
    rephrase = [queries.add(p, request.target_new) for p in request.paraphrase_prompts]
    _check_entry(record, entry)
    loc = [queries.add(p, seq) for p, seq in zip(request.neighborhood_prompts, entry.neighbor_refs, strict=True)]

    def values(scores: list[TokenScore]) -> dict[str, float | None]:
        unchanged = [_agreement(scores[q].predicted, pred) for q, pred in zip(loc, entry.neighbor_preds, strict=True)]
        answered = [scores[q].accuracy for q, data in zip(loc, entry.neighbor_answers, strict=True) if data]
        return {
            "efficacy": scores[src].accuracy,
            "generalization": _mean([scores[q].accuracy for q in rephrase]),
            "specificity": _mean([u for u in unchanged if u is not None]),
            "specificity_answer": _mean(answered),
        }

    return values


def _check_entry(record: EditRecord, entry: RecordBaseline) -> None:
    if len(entry.neighbor_refs) != len(record.request.neighborhood_prompts):
        raise ValueError(f"the baseline of case_id {record.request.case_id!r} does not match its neighbourhood prompts")


def _agreement(predicted: list[int], reference: list[int]) -> float | None:
    if not reference:
        return None
    return sum(p == r for p, r in zip(predicted, reference, strict=True)) / len(reference)


__all__ = [
    "Baseline",
    "RecordBaseline",
    "baseline",
    "evaluate",
    "evaluate_records",
    "summarize",
    "KINDS",
    "COUNTERFACT_METRICS",
    "ZSRE_METRICS",
]
