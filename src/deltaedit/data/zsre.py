"""zsRE question-answering edits in MEMIT's fields (``src, alt, answers, rephrase, loc, loc_ans, subject``).

The question itself is the edit prompt, so its subject has to be found in it: a record whose ``src``
does not name the subject exactly once cannot be turned into a template and is rejected.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType
from typing import Any

from deltaedit.data.reader import collect, json_rows, list_field, make_request, text_field
from deltaedit.data.records import EditRecord, LoadedData
from deltaedit.requests import PLACEHOLDER, RequestError

_NEEDS = "every zsRE record needs src, subject and alt"
_FIELDS = MappingProxyType(
    {
        "prompt": "src",
        "target_new": "alt",
        "target_true": "answers",
        "paraphrase_prompts": "rephrase",
        "neighborhood_prompts": "loc",
    }
)


def from_zsre(obj: dict[str, Any]) -> EditRecord:
    """One zsRE record; extra fields (``pred``, ``cond``, ``portability``) are ignored."""
    src = text_field(obj, "src", _NEEDS)
    subject = text_field(obj, "subject", _NEEDS)
    count = src.count(subject) if subject.strip() else 0
    if PLACEHOLDER not in src and subject.strip() and count != 1:
        raise RequestError(
            "src",
            f"names the subject {subject!r} {count} times; the question must contain it exactly once "
            "(case and spelling as in 'subject') - fix 'src' or 'subject'",
        )
    answers = list_field(obj, "answers")
    loc = list_field(obj, "loc")  # often "nq question: ...", kept as given
    loc_ans = list_field(obj, "loc_ans")
    if loc_ans and len(loc_ans) != len(loc):
        raise RequestError("loc_ans", f"has {len(loc_ans)} answers for {len(loc)} 'loc' prompts")
    request = make_request(
        _FIELDS,
        prompt=src,
        subject=subject,
        target_new=text_field(obj, "alt", _NEEDS),
        target_true=answers[0] if answers else None,
        paraphrase_prompts=list_field(obj, "rephrase"),
        neighborhood_prompts=loc,
        case_id=obj.get("case_id"),
    )
    return EditRecord(request, neighborhood_answers=loc_ans)


def load_zsre(path: str | os.PathLike, limit: int | None = None, on_error: str = "stop") -> LoadedData:
    """Load a zsRE file (JSON list or JSON Lines); see ``deltaedit.data.load_records`` for the options."""
    path = Path(path)
    return collect(json_rows(path), from_zsre, path, "zsre", limit, on_error)
