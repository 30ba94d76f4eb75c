"""A user's own edits: JSON Lines (or a JSON list) or CSV, with ``EditRequest``'s field names.

CSV has no lists, so list fields are written with ``|`` between items ("Who leads {}?|{} is led by");
an empty optional cell means the field is absent. Columns and keys are checked strictly: a typo such
as ``target`` would otherwise silently drop the target.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deltaedit.data.reader import Row, collect, json_rows, list_field, make_request, read_text, text_field
from deltaedit.data.records import DataError, EditRecord, LoadedData
from deltaedit.requests import EditRequest, RequestError

FIELDS = tuple(EditRequest.__dataclass_fields__)
REQUIRED = ("prompt", "subject", "target_new")
LIST_FIELDS = ("paraphrase_prompts", "neighborhood_prompts")
LIST_SEPARATOR = "|"
_NEEDS = "every edit needs prompt, subject and target_new"


def from_user(obj: dict[str, Any]) -> EditRecord:
    """One edit given with ``EditRequest``'s field names; any other key is an error."""
    unknown = sorted(key for key in obj if key not in FIELDS)
    if unknown:
        raise RequestError(unknown[0], f"is not an edit field; use only {', '.join(FIELDS)}")
    for key in REQUIRED:
        text_field(obj, key, _NEEDS)
    values = dict(obj)
    for key in LIST_FIELDS:
        values[key] = list_field(obj, key)
    return EditRecord(make_request({}, **values))


def csv_rows(path: Path) -> Iterator[Row]:
    """CSV rows as the dicts a JSON file would hold: lists split on ``|``, empty cells left out."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    header = reader.fieldnames
    if not header:
        reason = "is empty; the first row must name the columns, e.g. prompt,subject,target_new"
        raise DataError(reason, path=path)
    for column in header:
        if column not in FIELDS:
            raise DataError(f"is not an edit column; use only {', '.join(FIELDS)}", path=path, line=1, field=column)
    for column in REQUIRED:
        if column not in header:
            raise DataError(f"column is missing from the header; {_NEEDS}", path=path, line=1, field=column)
    start = reader.line_num + 1
    for record, cells in enumerate(reader, 1):
        if None in cells:
            yield Row(record, start, error=f"has more cells than the header's {len(header)} columns")
        else:
            yield Row(record, start, _from_cells(cells))
        start = reader.line_num + 1


def _from_cells(cells: dict[str, str | None]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for column, cell in cells.items():
        if cell is None or (not cell.strip() and column not in REQUIRED):
            continue  # a short row or an empty optional cell: absent
        if column in LIST_FIELDS:
            values[column] = [item.strip() for item in cell.split(LIST_SEPARATOR)]
        else:
            values[column] = cell
    return values


def load_user_file(path: str | os.PathLike, limit: int | None = None, on_error: str = "stop") -> LoadedData:
    """Load edits from .csv, .jsonl or .json; see ``deltaedit.data.load_records`` for the options."""
    path = Path(path)
    rows = csv_rows(path) if path.suffix.lower() == ".csv" else json_rows(path)
    return collect(rows, from_user, path, "edits", limit, on_error)
