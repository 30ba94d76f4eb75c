"""Resident memory against the number of edits, for a plain Editor loop and for `deltaedit run`.

Both should stay flat after a warm-up: what an edit must keep (its factors and keys, per edited layer) is
tens of kB, so the growth per edit beyond that is allocator slack or a leak. Prints figures; asserts nothing.

    DELTAEDIT_DATA=../shared/data python benchmarks/memory.py --n-edits 100              # both paths
    DELTAEDIT_DATA=../shared/data python benchmarks/memory.py --mode editor --no-trim    # without malloc_trim
    DELTAEDIT_DATA=../shared/data python benchmarks/memory.py --mode editor --method ft --ledger   # FT, mapped

The editor path also prints the bytes of live tensors (every tensor the garbage collector can see, each
storage once) and of what the Editor retains for its edits, so a leak of tensors and allocator slack can be
told apart. Records come from counterfact-val. ``--threads`` sets torch's threads (default 1).
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def live_tensor_mb() -> float:
    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except Exception:  # tensors without storage (meta, sparse) and objects that refuse isinstance
            continue
    return total / 2**20


def file_maps() -> list[tuple[int, int]]:
    """The address ranges this process maps from files (Linux; empty elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split()
        if len(fields) > 5 and fields[5].startswith("/"):
            low, high = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((low, high))
    return ranges


def retained_mb(editor) -> tuple[float, float]:
    """MiB the Editor keeps for its applied edits (each update's own tensors: factors, keys, a mask...), and
    how much of it is mapped from the ledger's files rather than held in memory."""
    maps = file_maps()
    total = mapped = 0
    for applied in editor.applied:
        for update in applied.updates.values():
            for tensor in update.tensors().values():
                total += tensor.nbytes
                if any(low <= tensor.data_ptr() < high for low, high in maps):
                    mapped += tensor.nbytes
    return total / 2**20, mapped / 2**20


def editor_loop(args: argparse.Namespace) -> None:
    import torch

    from deltaedit.data import load_records
    from deltaedit.editor import Editor
    from deltaedit.memory import resident_mb
    from deltaedit.models import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    records = load_records("counterfact-val", None, limit=args.n_edits).records
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Path(tmp) / "run" if args.ledger else None
        with Editor(
            model, tokenizer, method=args.method, ledger=ledger, progress=False, trim_memory=not args.no_trim
        ) as editor:
            editor.prepare()
            trim, kept_in = "off" if args.no_trim else "on", "ledger" if ledger else "memory only"
            print(f"editor loop, {args.method}, {kept_in}, malloc_trim {trim}, {args.threads} thread(s)")
            columns = ("edits", 6), ("RSS MiB", 9), ("live tensors MiB", 17), ("retained MiB", 13), ("mapped", 7)
            print(" ".join(f"{name:>{width}}" for name, width in columns), f"{'s/edit':>7}")
            print(f"{0:>6} {resident_mb():>9.0f} {live_tensor_mb():>17.1f} {0.0:>13.2f} {0.0:>7.2f}")
            started = time.perf_counter()
            for done, record in enumerate(records, 1):
                editor.edit([record])
                if done % args.every == 0 or done == len(records):
                    rate = (time.perf_counter() - started) / done
                    kept, mapped = retained_mb(editor)
                    figures = f"{resident_mb():>9.0f} {live_tensor_mb():>17.1f} {kept:>13.2f} {mapped:>7.2f}"
                    print(f"{done:>6} {figures} {rate:>7.2f}", flush=True)


def rss_of(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_command(args: argparse.Namespace) -> None:
    """`deltaedit run` in a child process; its RSS is read from /proc whenever the ledger gains an edit."""
    from deltaedit.ledger import Ledger

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [
            sys.executable, "-m", "deltaedit.cli", "run", "--quiet", "--threads", str(args.threads),
            "--method", args.method, "--dataset", "counterfact-val", "--n-edits", str(args.n_edits),
            "--out", str(out), "--checkpoints", ",".join(str(c) for c in (50, 100, 200, 500, 1000, 2000, 3000)),
        ]  # fmt: skip
        child = subprocess.Popen(command, env=os.environ.copy())
        print(f"deltaedit run, {args.method}, {args.threads} thread(s) (checkpoints at 50, 100, 200, ...)")
        print(f"{'edits':>6} {'RSS MiB':>9}")
        reported = -1
        index = out / Ledger.INDEX
        while child.poll() is None:
            time.sleep(0.5)
            edits = index.read_bytes().count(b'"kind":"edit"') if index.is_file() else 0
            if edits != reported and (edits % args.every == 0):
                try:
                    print(f"{edits:>6} {rss_of(child.pid):>9.0f}", flush=True)
                except OSError:
                    break
                reported = edits
        print(f"exit code {child.wait()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("editor", "run", "both"), default="both")
    parser.add_argument("--method", default="deltaedit")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-edits", type=int, default=100)
    parser.add_argument("--every", type=int, default=10, help="print every N edits")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-trim", action="store_true", help="editor loop without malloc_trim after edits")
    parser.add_argument(
        "--ledger", action="store_true", help="editor loop with a ledger (FT's and RECT's updates are then mapped)"
    )
    args = parser.parse_args()
    if args.mode in ("editor", "both"):
        editor_loop(args)
    if args.mode in ("run", "both"):
        run_command(args)


if __name__ == "__main__":
    main()
