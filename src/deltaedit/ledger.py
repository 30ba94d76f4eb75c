"""The edit ledger: an append-only, crash-safe record of a run, and the compact edits file.

A run directory holds

    manifest.json           what is edited and how: method, config, base-model fingerprint, version
    index.jsonl             one JSON line per event (edit, undo, restore, rejected), in order
    edits/<edit_id>.safetensors   one edit's factors, keys and k_e (float32)

The index line is the commit point. An edit's tensor file is written to a temporary name, fsynced and
renamed (and its directory fsynced) before its line is appended and fsynced, so a process killed at any
moment leaves a ledger whose every indexed entry is complete. A torn last line (no newline) is an
append that never returned: readers ignore it and the next writer cuts it off. Tensor files are checked
against the sha256 in their line when read. ``docs/ledger.md`` specifies the format.

The edits file (``deltaedit.edits_file``) holds the same events and tensors in one safetensors file, written
and verified by :func:`write_checked` / :func:`read_checked` here (the targets file uses them too); an
edit's record is written and read in ``deltaedit.applied``. The :class:`~deltaedit.editor.Editor` does the
editing side: ``Editor(..., ledger=dir)``, ``Editor.resume(dir, model, tokenizer)``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from .applied import AppliedEdit, edit_record, edit_tensors, updates_from
from .methods.base import Decision
from .requests import EditRequest
from .updates import Update

log = logging.getLogger(__name__)

FORMAT = "deltaedit-ledger"
# 2: base fingerprints from integer checksums, per-layer update kinds, decision metrics; 3: sparse updates keep
# their mask as packed bits (2 stored int64 positions; this version reads both)
FORMAT_VERSION = 3
OLDEST_READABLE = 2
KINDS = ("edit", "undo", "restore", "rejected")


class LedgerError(RuntimeError):
    """A ledger or edits file that cannot be used (missing, corrupt, or made for another run/method/config).

    The message names the file; ``path`` holds it.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(f"{path}: {message}" if path is not None else message)
        self.path = None if path is None else str(path)


class BaseModelMismatchError(LedgerError):
    """Edits recorded on another base model: the model's weight fingerprint is not the one they were made on.
    Raised before anything is written, so the model is left as it was."""


# ---------------------------------------------------------------------------------------------- entries


@dataclass
class LedgerEntry:
    """One event as recorded: ``data`` is its index line (or edits-file event); tensors load on demand."""

    seq: int
    kind: str
    data: dict[str, Any]
    _loader: Callable[[], dict[str, torch.Tensor]] | None = field(default=None, repr=False)
    _mapper: Callable[[], dict[str, torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def edit_id(self) -> int | None:
        return self.data.get("edit_id")

    @property
    def edit_ids(self) -> list[int]:
        """The edits an undo took back."""
        return list(self.data.get("edit_ids", []))

    @property
    def time(self) -> float:
        return float(self.data.get("time", 0.0))

    def requests(self) -> tuple[EditRequest, ...]:
        """The edit's requests (for rejected entries the raw items are in ``data["requests"]``)."""
        return tuple(EditRequest.from_dict(r) for r in self.data["requests"])

    def decision(self) -> Decision:
        recorded = self.data["decision"]
        return Decision(recorded["triggered"], dict(recorded.get("metrics") or {}))

    def tensors(self, mapped: bool = False) -> dict[str, torch.Tensor]:
        """The edit's tensors, checked against the recorded checksum and read now; with ``mapped``, a ledger
        entry's tensors are instead backed by its file (a private memory map: pages the system can drop and
        read again, never written back), so edits the size of a layer need not stay in memory."""
        if self._loader is None:
            raise LedgerError(f"entry {self.seq} ({self.kind}) has no tensors")
        return self._mapper() if mapped and self._mapper is not None else self._loader()

    def updates(self) -> dict[int, Update]:
        """Per edited layer the edit's update, on the CPU."""
        return updates_from(self.data, self.tensors())

    def critical_key(self) -> torch.Tensor:
        """k_e at the critical layer (d_ff x n)."""
        return self.tensors()["critical_key"]


def active_edits(entries: Sequence[LedgerEntry]) -> list[LedgerEntry]:
    """The edit entries in force at the end: after the last restore, not undone since."""
    live: dict[int, LedgerEntry] = {}
    for entry in entries:
        if entry.kind == "edit":
            live[entry.edit_id] = entry
        elif entry.kind == "undo":
            for edit_id in entry.edit_ids:
                live.pop(edit_id, None)
        elif entry.kind == "restore":
            live.clear()
    return list(live.values())


def since_restore(entries: Sequence[LedgerEntry]) -> list[LedgerEntry]:
    """Edit and undo entries after the last restore: the history that decides the current state."""
    start = 0
    for i, entry in enumerate(entries):
        if entry.kind == "restore":
            start = i + 1
    return [e for e in entries[start:] if e.kind in ("edit", "undo")]


# ---------------------------------------------------------------------------------------------- records


def _request_json(item: Any) -> Any:
    """A rejected item as JSON: requests and records by their fields, anything else as given (or repr)."""
    if isinstance(item, EditRequest):
        return item.to_dict()
    request = getattr(item, "request", None)
    if isinstance(request, EditRequest):  # an EditRecord
        return request.to_dict()
    if isinstance(item, Mapping):
        return {str(k): v for k, v in item.items()}
    return item


def _dumps(data: Mapping[str, Any]) -> str:
    # ASCII only (lone surrogates and all are escaped): a line is exactly its bytes, whatever the input
    return json.dumps(data, ensure_ascii=True, separators=(",", ":"), default=repr)


def _stamp() -> dict[str, Any]:
    now = time.time()
    utc = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="milliseconds")
    return {"time": now, "utc": utc}


# ---------------------------------------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (POSIX; elsewhere the rename is all there is)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that the path holds either nothing/the old file or all of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_checked(
    path: str | os.PathLike, file_format: str, tensors: dict[str, torch.Tensor], fields: Mapping[str, str]
) -> Path:
    """One safetensors file whose metadata holds ``file_format``, the format version, ``fields`` and a sha256
    over every tensor (what :func:`read_checked` verifies), written atomically."""
    path = Path(path).expanduser()
    metadata = {
        "format": file_format,
        "format_version": str(FORMAT_VERSION),
        **fields,
        "payload_sha256": _tensors_digest(tensors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save_bytes(tensors, metadata=metadata))
    return path


def read_checked(
    path: Path, kind: str, file_format: str, hint: str = ""
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a file from :func:`write_checked`, read whole: LedgerError naming the ``kind``
    of file if it cannot be read, is of another format or version, or fails its checksum."""
    try:
        payload = path.read_bytes()
    except OSError as err:
        raise LedgerError(f"cannot read the {kind} file ({err.strerror})", path) from err
    try:
        header_size = int.from_bytes(payload[:8], "little")
        metadata = json.loads(payload[8 : 8 + header_size]).get("__metadata__") or {}
        tensors = load_bytes(payload)
    except Exception as err:
        raise LedgerError(f"not a readable {kind} file ({err})", path) from err
    if metadata.get("format") != file_format:
        raise LedgerError(f"not a {file_format} file (format {metadata.get('format')!r}){hint}", path)
    check_format_version(int(metadata.get("format_version", 0)), path)
    if _tensors_digest(tensors) != metadata.get("payload_sha256"):
        raise LedgerError(f"checksum mismatch: the {kind} file is corrupt", path)
    return metadata, tensors


def _tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _stream_sha256(stream: BinaryIO, chunk: int = 1 << 20) -> str:
    """``_sha256`` of a file's bytes, read a chunk at a time (the file is never held in memory whole)."""
    digest = hashlib.sha256()
    while block := stream.read(chunk):
        digest.update(block)
    return digest.hexdigest()


def _drop_cached(fd: int) -> None:
    """Let the system drop a file's pages from its cache, where it can, so that a map of the file starts
    empty: a file just written sits in large page-cache folios, and a map takes a whole folio (2 MB) in at
    its first touch, which would count in the process's resident memory."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):  # advice only: a refusal changes nothing that is read
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


# ---------------------------------------------------------------------------------------------- ledger


class Ledger:
    """A run directory: ``manifest.json``, ``index.jsonl`` and ``edits/``. Created if missing.

    Reading (``entries``) needs nothing else; appending needs the manifest, which the Editor writes when
    it is given the ledger. One writer at a time: the first write (or :meth:`lock`) takes an exclusive lock on
    ``.deltaedit.lock``, held until :meth:`close` or the process ends; a second writer gets LedgerError naming
    the holder's process. Every file the directory names is resolved inside it; symbolic links are refused.
    """

    MANIFEST = "manifest.json"
    INDEX = "index.jsonl"
    EDITS = "edits"
    LOCK = ".deltaedit.lock"

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path).expanduser()
        if self.path.is_symlink():
            raise LedgerError("is a symbolic link; give the run directory itself", self.path)
        if not self.path.is_dir():
            if not create or self.path.exists():
                raise LedgerError("is not a ledger directory", self.path)
            self.path.mkdir(parents=True)
        self._next_seq: int | None = None  # set by the first write, after repairing a torn tail
        self._edit_ids: set[int] = set()
        self._lock_fd: int | None = None

    # ---------------------------------------------------------------- one writer, files inside
    def inside(self, name: str) -> Path:
        """The path of ``name`` (relative, e.g. "edits/000007.safetensors") inside this directory; LedgerError if
        it is absolute, climbs out, or passes through a symbolic link (a crafted directory reaches nothing)."""
        return contained(self.path, name)

    def lock(self) -> None:
        """Take this directory's writer lock (idempotent for this Ledger); LedgerError naming the holder."""
        if self._lock_fd is not None:
            return
        try:
            self._lock_fd = take_lock(self.inside(self.LOCK))
        except LedgerError as err:
            if f"process {os.getpid()} " not in str(err):
                raise
            # held in this very process: by an Editor that was dropped but not yet collected? collect, try again
            import gc

            gc.collect()
            self._lock_fd = take_lock(self.inside(self.LOCK))

    def close(self) -> None:
        """Release the writer lock (the next writer may go on)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __del__(self) -> None:
        if hasattr(self, "_lock_fd"):  # not when __init__ failed before taking the lock
            self.close()

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r})"

    @property
    def manifest_path(self) -> Path:
        return self.inside(self.MANIFEST)

    @property
    def index_path(self) -> Path:
        return self.inside(self.INDEX)

    # ---------------------------------------------------------------- manifest
    def manifest(self) -> dict[str, Any] | None:
        """The manifest, or None before one was written."""
        if not self.manifest_path.is_file():
            return None
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise LedgerError(f"unreadable ({err})", self.manifest_path) from err
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LedgerError(f"not a {FORMAT} manifest", self.manifest_path)
        check_format_version(data.get("format_version", 0), self.manifest_path)
        return data

    def require_manifest(self) -> dict[str, Any]:
        """The manifest of a run directory; LedgerError when there is none (not a deltaedit run directory)."""
        manifest = self.manifest()
        if manifest is None:
            raise LedgerError("has no manifest.json: not a deltaedit run directory", self.path)
        return manifest

    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        data = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
        write_atomic(self.manifest_path, (json.dumps(data, indent=2, default=repr) + "\n").encode())

    # ---------------------------------------------------------------- reading
    def entries(self) -> list[LedgerEntry]:
        """Every complete entry, in order; a torn last line is ignored, any other damage raises LedgerError."""
        entries = []
        for seq, data in enumerate(self._lines()):
            kind = data.get("kind")
            if data.get("seq") != seq or kind not in KINDS:
                raise LedgerError(f"line {seq + 1} is not entry {seq} of a known kind", self.index_path)
            readers = self._tensor_readers(data) if kind == "edit" else (None, None)
            entries.append(LedgerEntry(seq, kind, data, *readers))
        return entries

    def active_edits(self) -> list[LedgerEntry]:
        """The edits in force at the end of the ledger, oldest first."""
        return active_edits(self.entries())

    def _lines(self) -> list[dict[str, Any]]:
        try:
            raw = self.index_path.read_bytes()
        except FileNotFoundError:
            return []
        lines = raw.split(b"\n")
        if lines[-1]:
            log.warning(
                "%s: ignoring a torn last line (%d bytes): an append that never completed",
                self.index_path,
                len(lines[-1]),
            )
        out = []
        for number, line in enumerate(lines[:-1], 1):
            try:
                data = json.loads(line)
            except ValueError:
                raise LedgerError(f"line {number} is corrupt (not JSON)", self.index_path) from None
            if not isinstance(data, dict):
                raise LedgerError(f"line {number} is not a JSON object", self.index_path)
            out.append(data)
        return out

    def _tensor_readers(self, data: dict[str, Any]) -> tuple[Callable[[], dict], Callable[[], dict]]:
        """The edit file's two readers: into memory, and mapped (the checksum read through the file first)."""
        name = self._edit_file(data.get("edit_id"))
        if data.get("file") != name:
            raise LedgerError(
                f"entry {data.get('seq')} names the file {data.get('file')!r}, not {name!r}: the index was edited",
                self.index_path,
            )
        path = self.inside(name)
        edit_id, expected = data["edit_id"], data["sha256"]

        def unreadable(err: OSError) -> LedgerError:
            return LedgerError(f"missing or unreadable ({err.strerror}); listed as edit {edit_id}", path)

        def check(digest: str) -> None:
            if digest != expected:
                raise LedgerError(f"checksum mismatch: the file is corrupt (edit {edit_id})", path)

        def load() -> dict[str, torch.Tensor]:
            try:
                payload = path.read_bytes()
            except OSError as err:
                raise unreadable(err) from err
            check(_sha256(payload))
            try:
                return load_bytes(payload)
            except Exception as err:  # the checksum matched, so this is a writer bug, still name the file
                raise LedgerError(f"not a readable safetensors file ({err})", path) from err

        def mapped() -> dict[str, torch.Tensor]:
            try:
                with path.open("rb") as stream:
                    check(_stream_sha256(stream))
                    _drop_cached(stream.fileno())
            except OSError as err:
                raise unreadable(err) from err
            try:
                with safe_open(path, framework="pt") as opened:
                    return {name: opened.get_tensor(name) for name in opened.keys()}  # noqa: SIM118 (not a dict)
            except Exception as err:  # e.g. a file system that cannot map files: read it into memory instead
                log.warning("%s: cannot be mapped (%s); read into memory", path, err)
                return load()

        return load, mapped

    # ---------------------------------------------------------------- writing
    def append(self, applied: AppliedEdit) -> LedgerEntry:
        """Record an applied edit: its tensor file first (durably), then its index line (the commit point).

        If this raises, the ledger does not list the edit (a stray tensor file may remain; it is ignored).
        """
        manifest = self.manifest()
        if manifest is None:
            raise LedgerError("has no manifest; give the ledger to an Editor before appending", self.path)
        self._open_for_writing()
        if applied.edit_id in self._edit_ids:
            raise LedgerError(f"already lists edit {applied.edit_id}", self.index_path)
        tensors = edit_tensors(applied)
        payload = save_bytes(tensors, metadata={"format": FORMAT, "edit_id": str(applied.edit_id)})
        name = self._edit_file(applied.edit_id)
        self.inside(self.EDITS).mkdir(exist_ok=True)
        write_atomic(self.inside(name), payload)
        data = {"kind": "edit", **edit_record(applied, manifest)}
        data.update(file=name, sha256=_sha256(payload), bytes=len(payload))
        entry = self._write_line(data, self._tensor_readers)
        self._edit_ids.add(applied.edit_id)
        return entry

    def record_undo(self, edit_ids: Sequence[int], how: str = "undo") -> LedgerEntry:
        """Record that ``edit_ids`` were taken back (``how``: "undo" or "undo_to")."""
        return self._write_line({"kind": "undo", "edit_ids": [int(i) for i in edit_ids], "how": how})

    def record_restore(self) -> LedgerEntry:
        """Record that every edit and all running state were dropped (``Editor.restore``)."""
        return self._write_line({"kind": "restore"})

    def reject(
        self,
        item: Any,
        reason: str,
        field: str | None = None,
        *,
        error: str | None = None,
        source: str | None = None,
        line: int | None = None,
    ) -> LedgerEntry:
        """Record a request (or EditRecord, raw dict, or a list of them for a batch) that was refused or
        failed; no tensors. ``source`` / ``line`` default to those of an EditRecord; for a data-file error
        with no request, pass ``None`` and the DataError's ``path`` / ``line``.
        """
        items = [] if item is None else list(item) if isinstance(item, list | tuple) else [item]
        first = items[0] if items else None
        source = source if source is not None else getattr(first, "source", None) or None
        line = line if line is not None else getattr(first, "line", None)
        data = {
            "kind": "rejected",
            "requests": [_request_json(i) for i in items],
            "reason": reason,
            "field": field,
            "error": error,
            "source": source,
            "line": line,
        }
        return self._write_line(data)

    def _edit_file(self, edit_id: Any) -> str:
        if not isinstance(edit_id, int) or isinstance(edit_id, bool) or edit_id < 0:
            raise LedgerError(f"an edit line has edit_id {edit_id!r}, not a whole number", self.index_path)
        return f"{self.EDITS}/{edit_id:06d}.safetensors"

    def check_complete(self, entries: Sequence[LedgerEntry] | None = None) -> None:
        """LedgerError when ``edits/`` holds tensor files the index does not list, beyond the one an append
        killed before its line leaves (the next edit id): the index was truncated or emptied, and reading it
        as it is would silently drop edits."""
        entries = self.entries() if entries is None else entries
        listed = {e.edit_id for e in entries if e.kind == "edit"}
        folder = self.inside(self.EDITS)
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        stray = [int(p.stem) for p in files if p.stem.isdigit() and int(p.stem) not in listed]
        allowed = max(listed, default=-1) + 1
        extra = [i for i in stray if i != allowed]
        if extra or len(stray) > 1:
            raise LedgerError(
                f"index.jsonl lists {len(listed)} edits but edits/ also holds files of edits "
                f"{sorted(stray)[:10]}: the index was truncated or edited; restore it (or remove those files if "
                "the edits were meant to go)",
                self.path,
            )

    def _open_for_writing(self) -> None:
        """On the first write: take the lock, cut off a torn last line (an append that never returned) and
        count entries."""
        if self._next_seq is not None:
            return
        self.lock()
        entries = self.entries()
        self.check_complete(entries)
        if self.index_path.is_file():
            raw = self.index_path.read_bytes()
            keep = raw.rfind(b"\n") + 1
            if keep < len(raw):
                log.warning("%s: removing a torn last line left by an interrupted append", self.index_path)
                with open(self.index_path, "r+b") as f:
                    f.truncate(keep)
                    f.flush()
                    os.fsync(f.fileno())
        self._next_seq = len(entries)
        self._edit_ids = {e.edit_id for e in entries if e.kind == "edit"}

    def _write_line(self, data: dict[str, Any], readers_for=None) -> LedgerEntry:
        self._open_for_writing()
        seq = self._next_seq
        data = {"seq": seq, **data, **_stamp()}
        line = (_dumps(data) + "\n").encode("ascii")
        if not self.index_path.exists():  # make the new file's name durable before any line counts on it
            self.index_path.touch()
            _fsync_dir(self.path)
        fd = os.open(self.index_path, os.O_WRONLY | os.O_APPEND)  # unbuffered: nothing is left to flush later
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                try:  # leave no trace of the line: the caller treats this event as not having happened
                    os.ftruncate(fd, start)
                    os.fsync(fd)
                except OSError:
                    log.exception("%s: could not remove a failed append", self.index_path)
                raise
        finally:
            os.close(fd)
        self._next_seq = seq + 1
        return LedgerEntry(seq, data["kind"], data, *(readers_for(data) if readers_for else (None, None)))


def check_base_model(
    manifest: Mapping[str, Any], found: str, source: str | os.PathLike, layers: Mapping[int, str] | None = None
) -> None:
    """Raise BaseModelMismatchError unless the model is the base the edits were made on: ``found`` (its
    models.fingerprint) must match, and ``layers`` (edited layer -> models.weight_digest of its W_out) must match
    the sha256 the manifest recorded for each edited layer."""
    name = manifest.get("model_name") or "?"
    if found != manifest.get("base_fingerprint"):
        raise BaseModelMismatchError(
            f"the edits were made on base model {name!r} with weight fingerprint "
            f"{manifest.get('base_fingerprint')}, but this model's fingerprint is {found}; load that base model "
            "(unedited) and apply them to it",
            source,
        )
    for layer, recorded in (manifest.get("base_layers") or {}).items():
        if layers is not None and layers.get(int(layer)) != recorded:
            raise BaseModelMismatchError(
                f"the edits were made on base model {name!r} whose layer {layer} W_out has sha256 {recorded[:16]}…, "
                f"but this model's is {str(layers.get(int(layer)))[:16]}…; load that base model (unedited)",
                source,
            )


def contained(root: Path, name: str) -> Path:
    """``root / name`` when it stays inside ``root`` without passing through a symbolic link; LedgerError else."""
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise LedgerError(f"names {name!r}, which is not a path inside the run directory", root)
    path = root
    for part in relative.parts:
        path = path / part
        if path.is_symlink():
            raise LedgerError(f"{name} is a symbolic link; a run directory's files must be its own", root)
    return path


def take_lock(path: Path) -> int:
    """An exclusive, non-blocking lock on ``path`` (flock, POSIX), its file then naming this process.

    Returns the open descriptor (closing it releases the lock). LedgerError naming the holder when taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock to take (documented)
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise LedgerError(
            f"is being written by {holder}; wait for it to finish or stop it (one writer per run directory)",
            path.parent,
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} ({' '.join(sys.argv[:3])[:120]})".encode(), 0)
    return fd


def check_format_version(version: int, source: str | os.PathLike) -> None:
    """Refuse a ledger or edits file this version of deltaedit does not read, saying why."""
    if version > FORMAT_VERSION:
        raise LedgerError(f"format version {version} is newer than this deltaedit reads ({FORMAT_VERSION})", source)
    if version < OLDEST_READABLE:
        raise LedgerError(
            f"format version {version} was written by an older deltaedit, whose base-model fingerprint and records "
            "this one does not read; redo the run (or export it with the deltaedit that made it)",
            source,
        )


__all__ = [
    "Ledger",
    "LedgerEntry",
    "LedgerError",
    "BaseModelMismatchError",
    "active_edits",
    "since_restore",
    "check_base_model",
]
