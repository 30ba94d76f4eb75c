"""Edit datasets: find them, read them into ``EditRecord``s, and (only when asked) download them.

The data lives outside the package, in a folder given by ``--data DIR`` / ``data_dir`` or the
``DELTAEDIT_DATA`` environment variable; nothing is ever fetched behind the user's back.

    data = load_records("counterfact", data_dir="../shared/data", limit=100, on_error="skip")
    for record in data.records: ...
    for err in data.rejected: print(err.line, err.reason)
"""

from __future__ import annotations

import http.client
import json
import os
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

from deltaedit.data.counterfact import from_memit, from_simplified, load_counterfact
from deltaedit.data.reader import collect, json_rows, sniff_layout
from deltaedit.data.records import DataError, EditRecord, LoadedData
from deltaedit.data.userfile import from_user, load_user_file
from deltaedit.data.zsre import from_zsre, load_zsre

DATA_ENV = "DELTAEDIT_DATA"


def data_folder(given: str | os.PathLike | None = None) -> str | None:
    """The data folder: ``given`` (``--data`` / ``data_dir=``), else $DELTAEDIT_DATA, else None. The one rule
    for datasets by name, the key-statistics corpus and a run's recorded folder."""
    folder = given if given not in (None, "") else os.environ.get(DATA_ENV) or None
    return None if folder is None else str(folder)


# Dataset name -> files under the data folder, tried in order: the shared layout, then MEMIT's download.
DATASETS = MappingProxyType(
    {
        "counterfact": ("counterfact/counterfact-edit.json", "counterfact.json"),
        "counterfact-train": ("counterfact/counterfact-train.json",),
        "counterfact-val": ("counterfact/counterfact-val.json",),
        "zsre": ("zsre/zsre_mend_eval_portability_gpt4.json", "zsre_mem_eval.json"),
        "zsre-train": ("zsre/zsre_mend_train-1k.json",),
    }
)
# Name -> (URL, file name under the data folder); the file names are the fallbacks above.
DOWNLOADS = MappingProxyType(
    {
        "counterfact": ("https://rome.baulab.info/data/dsets/counterfact.json", "counterfact.json"),
        "zsre": ("https://rome.baulab.info/data/dsets/zsre_mem_eval.json", "zsre_mem_eval.json"),
    }
)
CONVERTERS: MappingProxyType[str, Callable[[dict[str, Any]], EditRecord]] = MappingProxyType(
    {
        "counterfact": from_simplified,
        "counterfact-memit": from_memit,
        "zsre": from_zsre,
        "edits": from_user,
    }
)


def load_records(
    name_or_path: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    on_error: str = "stop",
) -> LoadedData:
    """Read a dataset by name (see ``DATASETS``) or any .json/.jsonl/.csv file into edit records.

    ``limit`` keeps the first N valid records. ``on_error="stop"`` raises ``DataError`` at the first
    malformed record; ``"skip"`` leaves such records out and lists them in ``.rejected`` (errors that
    make the rest of the file unreadable, like broken JSON list syntax, are raised either way).
    Records without a ``case_id`` get their 0-based position in the file.
    """
    return load_file(find_data(name_or_path, data_dir), limit=limit, on_error=on_error)


def load_file(path: str | os.PathLike, limit: int | None = None, on_error: str = "stop") -> LoadedData:
    """Read one file, its layout sniffed from its first records (CSV is always a user edit file)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return load_user_file(path, limit, on_error)
    if suffix not in (".json", ".jsonl"):
        raise DataError("has an unknown extension; give a .json, .jsonl or .csv file", path=path)
    layout, rows = sniff_layout(json_rows(path))
    return collect(rows, CONVERTERS[layout], path, layout, limit, on_error)


def find_data(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Path:
    """The file behind a dataset name (looked up in ``data_dir`` or $DELTAEDIT_DATA), or the path itself."""
    if name_or_path not in DATASETS:
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return path
        known = ", ".join(DATASETS)
        what = "is a folder, not a file" if path.is_dir() else "no such file"
        raise DataError(f"{what}, and not a dataset name (known names: {known})", path=path)
    folder = data_folder(data_dir)
    if folder is None:
        places = " or ".join(f"DIR/{name}" for name in DATASETS[name_or_path])
        raise DataError(
            f"no data folder for {name_or_path!r}: pass --data DIR (data_dir=) or set {DATA_ENV}=DIR, "
            f"with the file at {places}{_download_hint(name_or_path)}"
        )
    folder = Path(folder).expanduser()
    candidates = [folder / name for name in DATASETS[name_or_path]]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(
        f"dataset {name_or_path!r} not found in {folder}: put the file at "
        f"{' or '.join(map(str, candidates))}, or pass --data DIR / set {DATA_ENV} to the folder "
        f"that holds it{_download_hint(name_or_path)}"
    )


def _download_hint(name: str) -> str:
    """How to fetch the file, as a command the CLI accepts (``deltaedit download``; test_data_loaders parses it)."""
    if name in DOWNLOADS:
        return f"; `deltaedit download {name} --data DIR` fetches MEMIT's copy"
    fetchable = ", ".join(DOWNLOADS)
    return f"; it comes with the shared data folder (`deltaedit download NAME --data DIR` fetches only {fetchable})"


def download(name: str, dest_dir: str | os.PathLike, timeout: float = 60.0) -> Path:
    """Fetch MEMIT's copy of a dataset into ``dest_dir``, the one place this package uses the network.

    Written to a temporary file and renamed, so an interrupted download never leaves a truncated file
    where ``load_records`` would pick it up.
    """
    if name not in DOWNLOADS:
        raise DataError(f"cannot download {name!r}; downloadable datasets: {', '.join(DOWNLOADS)}")
    url, filename = DOWNLOADS[name]
    dest_dir = Path(dest_dir).expanduser()
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / filename
    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{filename}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in _fetch(url, target, timeout):
                out.write(chunk)
        try:
            with open(tmp, encoding="utf-8") as f:
                json.load(f)
        except ValueError:
            raise DataError(
                f"what {url} sent is not JSON (a proxy or login page may have answered); download it "
                f"by hand and put it at {target}"
            ) from None
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _fetch(url: str, target: Path, timeout: float) -> Iterator[bytes]:
    """The response body in chunks; any network failure becomes a DataError saying what to do by hand."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                yield chunk
    except (OSError, http.client.HTTPException) as err:
        raise DataError(
            f"could not download {url}: the network is unreachable or the server refused ({err}); "
            f"download the file by hand and put it at {target}"
        ) from err


__all__ = [
    "CONVERTERS",
    "DATASETS",
    "DATA_ENV",
    "DOWNLOADS",
    "DataError",
    "EditRecord",
    "LoadedData",
    "download",
    "find_data",
    "load_counterfact",
    "load_file",
    "load_records",
    "load_user_file",
    "load_zsre",
]
