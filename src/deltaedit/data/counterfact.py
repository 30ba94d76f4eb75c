"""CounterFact, in MEMIT's original layout or the simplified one most editing frameworks ship.

MEMIT's ``counterfact.json`` nests the edit under ``requested_rewrite`` with a ``{}`` template and
carries several paraphrases and ten neighbourhood prompts; the simplified layout flattens one of each
and writes the subject into the prompt. Which one a file holds is decided from its first records.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType
from typing import Any

from deltaedit.data.reader import (
    collect,
    json_rows,
    list_field,
    make_request,
    optional_text,
    sniff_layout,
    text_field,
)
from deltaedit.data.records import DataError, EditRecord, LoadedData
from deltaedit.requests import PLACEHOLDER, RequestError

_NEEDS = "every CounterFact record needs prompt, subject and target_new"
# EditRequest field -> the field it comes from, so errors name what the user has to fix.
_SIMPLE_FIELDS = MappingProxyType(
    {
        "target_true": "ground_truth",
        "paraphrase_prompts": "rephrase_prompt",
        "neighborhood_prompts": "locality_prompt",
    }
)
_MEMIT_FIELDS = MappingProxyType(
    {
        "prompt": "requested_rewrite.prompt",
        "subject": "requested_rewrite.subject",
        "target_new": "requested_rewrite.target_new.str",
        "target_true": "requested_rewrite.target_true.str",
    }
)


def from_simplified(obj: dict[str, Any]) -> EditRecord:
    """``{case_id, prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt, ...}``."""
    prompt = text_field(obj, "prompt", _NEEDS)
    subject = text_field(obj, "subject", _NEEDS)
    if subject.strip() and PLACEHOLDER not in prompt and prompt.count(subject) > 1:
        prompt = prompt.replace(subject, PLACEHOLDER, 1)  # the data's subject is its first mention
    locality = list_field(obj, "locality_prompt")
    answers = list_field(obj, "locality_ground_truth")
    if answers and len(answers) != len(locality):
        raise RequestError("locality_ground_truth", f"has {len(answers)} answers for {len(locality)} locality prompts")
    request = make_request(
        _SIMPLE_FIELDS,
        prompt=prompt,
        subject=subject,
        target_new=text_field(obj, "target_new", _NEEDS),
        target_true=optional_text(obj, "ground_truth"),
        paraphrase_prompts=list_field(obj, "rephrase_prompt"),
        neighborhood_prompts=locality,
        case_id=obj.get("case_id"),
    )
    return EditRecord(request, neighborhood_answers=answers)


def from_memit(obj: dict[str, Any]) -> EditRecord:
    """``{case_id, requested_rewrite: {prompt, subject, target_new: {str}, target_true: {str}}, ...}``.

    MEMIT's neighbourhood prompts are other subjects sharing the true object, so each one's expected
    answer is ``target_true``.
    """
    rewrite = obj.get("requested_rewrite")
    if not isinstance(rewrite, dict):
        raise RequestError("requested_rewrite", f"is missing or not an object; {_NEEDS} inside it")
    neighborhood = list_field(obj, "neighborhood_prompts")
    target_true = _target(rewrite, "target_true", required=False)
    request = make_request(
        _MEMIT_FIELDS,
        prompt=text_field(rewrite, "prompt", prefix="requested_rewrite."),
        subject=text_field(rewrite, "subject", prefix="requested_rewrite."),
        target_new=_target(rewrite, "target_new", required=True),
        target_true=target_true,
        paraphrase_prompts=list_field(obj, "paraphrase_prompts"),
        neighborhood_prompts=neighborhood,
        case_id=obj.get("case_id"),
    )
    answers = (target_true,) * len(neighborhood) if target_true else ()
    return EditRecord(request, neighborhood_answers=answers)


def _target(rewrite: dict[str, Any], key: str, required: bool) -> str | None:
    """MEMIT writes targets as ``{"str": ..., "id": ...}``; a bare string is accepted too."""
    value = rewrite.get(key)
    if value is None and not required:
        return None
    if isinstance(value, dict):
        return text_field(value, "str", prefix=f"requested_rewrite.{key}.")
    return text_field(rewrite, key, prefix="requested_rewrite.")


def load_counterfact(path: str | os.PathLike, limit: int | None = None, on_error: str = "stop") -> LoadedData:
    """Load a CounterFact file in either layout; see ``deltaedit.data.load_records`` for the options."""
    path = Path(path)
    layout, rows = sniff_layout(json_rows(path), default="counterfact")
    if layout not in ("counterfact", "counterfact-memit"):
        raise DataError(f"holds {layout} records, not CounterFact; load it with load_records", path=path)
    convert = from_memit if layout == "counterfact-memit" else from_simplified
    return collect(rows, convert, path, layout, limit, on_error)
