"""What a loader hands back: edit records, the errors that reject them, and the two together."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from deltaedit.requests import EditRequest


@dataclass(frozen=True)
class EditRecord:
    """An edit request plus what evaluation needs beyond it, and where it came from.

    ``neighborhood_answers`` are the expected answers to ``request.neighborhood_prompts`` (zsRE's
    ``loc_ans``, CounterFact's true object); empty when the file has none, else one per prompt.
    ``source`` is the file and ``line`` the 1-based line the record starts on, so a bad result can be
    traced back to the data.
    """

    request: EditRequest
    neighborhood_answers: tuple[str, ...] = ()
    source: str = ""
    line: int | None = None

    def __post_init__(self) -> None:
        answers = tuple(self.neighborhood_answers)
        object.__setattr__(self, "neighborhood_answers", answers)
        if answers and len(answers) != len(self.request.neighborhood_prompts):
            raise ValueError(
                f"{len(answers)} neighborhood answers for {len(self.request.neighborhood_prompts)} "
                "neighborhood prompts; give one answer per prompt or none"
            )


class DataError(ValueError):
    """A data file that cannot be read as edits; the message names the file, record, line and field.

    The parts are kept as attributes (``path``, ``record``: 1-based position in the file, ``line``,
    ``field`` as spelled in the file, ``reason``) so callers can list rejected records themselves.
    """

    def __init__(
        self,
        reason: str,
        *,
        path: str | Path | None = None,
        record: int | None = None,
        line: int | None = None,
        field: str | None = None,
    ):
        self.reason = reason
        self.path = None if path is None else str(path)
        self.record = record
        self.line = line
        self.field = field
        where = [part for part in (self.path, _position(record, line)) if part]
        if field:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {reason}" if where else reason)


def _position(record: int | None, line: int | None) -> str:
    if record is not None and line is not None:
        return f"record {record} (line {line})"
    if record is not None:
        return f"record {record}"
    return "" if line is None else f"line {line}"


@dataclass
class LoadedData:
    """The records a file yielded and, with ``on_error="skip"``, the ones it refused and why.

    Iterating or taking ``len`` goes over ``records``; check ``rejected`` (a list of ``DataError`` with
    ``.line``, ``.record``, ``.field`` and ``.reason``) before trusting that the file was read whole.
    """

    records: list[EditRecord]
    rejected: list[DataError] = field(default_factory=list)
    path: Path | None = None
    layout: str = ""

    def __iter__(self) -> Iterator[EditRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


__all__ = ["DataError", "EditRecord", "LoadedData"]
