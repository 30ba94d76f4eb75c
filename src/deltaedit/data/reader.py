"""The file layer shared by all loaders: rows with their line numbers, layout sniffing, error policy.

Every format is read into ``Row``s (record number, starting line, decoded value) before any layout
is applied, so that every error can say where in the file it is, whatever the format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from itertools import chain, islice
from pathlib import Path
from typing import Any

from deltaedit.data.records import DataError, EditRecord, LoadedData
from deltaedit.requests import EditRequest, RequestError

ON_ERROR = ("stop", "skip")
SKIP_HINT = "; or load with on_error='skip' to leave such records out"
_WHITESPACE = re.compile(r"[ \t\n\r]*")


@dataclass(frozen=True)
class Row:
    """One record as decoded from the file; ``error`` is set instead of ``value`` for a bad JSON line."""

    record: int
    line: int
    value: Any = None
    error: str | None = None


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError("no such file; check the path", path=path) from None
    except OSError as err:
        raise DataError(f"cannot be read ({err.strerror})", path=path) from None
    except UnicodeDecodeError as err:
        reason = f"is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
        raise DataError(reason, path=path) from None


def json_rows(path: Path) -> Iterator[Row]:
    """Rows of a .json file (a list of records) or a .jsonl file (one record a line)."""
    text = read_text(path)
    if path.suffix.lower() == ".jsonl" or not text.lstrip().startswith("["):
        return _jsonl_rows(text)
    return _json_array_rows(text, path)


def _jsonl_rows(text: str) -> Iterator[Row]:
    record = 0
    for lineno, raw in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not raw.strip():
            continue
        record += 1
        try:
            yield Row(record, lineno, json.loads(raw))
        except json.JSONDecodeError as err:
            reason = f"is not valid JSON ({err.msg} at column {err.colno}); fix or delete the line"
            yield Row(record, lineno, error=reason)


def _json_array_rows(text: str, path: Path) -> Iterator[Row]:
    """Decode a JSON list one element at a time, to know the line each record starts on."""
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    record = 0
    if text.startswith("]", pos):
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        record += 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(
                f"is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); fix the file "
                "(a broken JSON list cannot be read past the error)",
                path=path,
                record=record,
                line=err.lineno,
            ) from None
        yield Row(record, line, value)
        pos = _WHITESPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _WHITESPACE.match(text, pos + 1).end()
        elif text.startswith("]", pos) and not text[pos + 1 :].strip():
            return
        else:
            raise DataError(
                f"is not valid JSON (expected ',' or the closing ']' after record {record}); fix the file",
                path=path,
                line=text.count("\n", 0, pos) + 1,
            )


# Keys that only one layout has; a file's layout is that of its first record holding any of them.
_MARKERS = (
    ("counterfact-memit", frozenset({"requested_rewrite"})),
    ("zsre", frozenset({"src", "alt", "loc", "loc_ans"})),
    ("counterfact", frozenset({"ground_truth", "rephrase_prompt", "locality_prompt"})),
    ("edits", frozenset({"target_true", "paraphrase_prompts", "neighborhood_prompts"})),
)


def sniff_layout(rows: Iterator[Row], default: str = "edits", look_at: int = 100) -> tuple[str, Iterator[Row]]:
    """Guess the layout from the first records and hand back the rows, none consumed."""
    head = list(islice(rows, look_at))
    for row in head:
        if isinstance(row.value, dict):
            for layout, markers in _MARKERS:
                if markers & row.value.keys():
                    return layout, chain(head, rows)
    return default, chain(head, rows)


def collect(
    rows: Iterable[Row],
    convert: Callable[[Any], EditRecord],
    path: Path,
    layout: str,
    limit: int | None = None,
    on_error: str = "stop",
) -> LoadedData:
    """Convert rows to records, stopping at the first bad one or setting it aside, per ``on_error``."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")
    data = LoadedData(records=[], path=path, layout=layout)
    if limit == 0:
        return data
    seen = 0
    for row in rows:
        seen += 1
        try:
            if row.error is not None:
                raise RequestError("", row.error)
            if not isinstance(row.value, dict):
                raise RequestError("", f"is not a JSON object with fields but a {type(row.value).__name__}")
            record = replace(convert(row.value), source=str(path), line=row.line)
            if record.request.case_id is None:  # number it by position, as MEMIT numbers zsRE
                record = replace(record, request=replace(record.request, case_id=str(row.record - 1)))
        except RequestError as err:
            reason = str(err).removeprefix(f"{err.field}: ")
            where = {"path": path, "record": row.record, "line": row.line, "field": err.field or None}
            if on_error == "stop":
                raise DataError(reason + SKIP_HINT, **where) from None
            data.rejected.append(DataError(reason, **where))
            continue
        data.records.append(record)
        if limit is not None and len(data.records) >= limit:
            break
    if seen == 0:
        raise DataError("holds no records; check that this is the file you meant", path=path)
    return data


# Field access that fails with the field's name as spelled in the file.


def text_field(obj: Mapping[str, Any], key: str, hint: str = "", prefix: str = "") -> str:
    """A required string; ``hint`` says what a record needs, ``prefix`` nests the name ("a.b")."""
    value = obj.get(key)
    if value is None:
        raise RequestError(prefix + key, "is missing" + (f"; {hint}" if hint else ""))
    if not isinstance(value, str):
        raise RequestError(prefix + key, f"must be a string, not {type(value).__name__}")
    return value


def optional_text(obj: Mapping[str, Any], key: str, prefix: str = "") -> str | None:
    return None if obj.get(key) is None else text_field(obj, key, prefix=prefix)


def list_field(obj: Mapping[str, Any], key: str) -> tuple[str, ...]:
    """A list of strings; a lone string counts as a list of one, absent as empty."""
    value = obj.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise RequestError(key, "must be a list of strings")
    return tuple(value)


def make_request(file_fields: Mapping[str, str], **kwargs: Any) -> EditRequest:
    """Build an EditRequest, renaming the field in any error to what the file calls it."""
    try:
        return EditRequest(**kwargs)
    except RequestError as err:
        reason = str(err).removeprefix(f"{err.field}: ")
        raise RequestError(file_fields.get(err.field, err.field), reason) from None
