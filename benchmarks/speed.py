"""Speed of sequential editing: seconds per edit, optimizer steps, key statistics, evaluation, peak memory.

For each method, in a fresh process (so peak memory is the method's own): load the model, compute the key
statistics into an empty store (timed; later methods of the same command reuse them), record the unedited
baseline, apply the first N CounterFact records one after another, then evaluate all of them. Prints
figures; asserts nothing.

    DELTAEDIT_DATA=../shared/data python benchmarks/speed.py                  # both methods, N=100
    python benchmarks/speed.py --methods deltaedit --n-edits 20 --full-forward  # the unoptimized target path
    python benchmarks/speed.py --methods deltaedit --set search_dtype=bfloat16    # one option changed

``--full-forward`` runs every token through every block at every optimizer step (``reuse_prefix=False``),
the straightforward path the default is checked against. ``--threads`` sets torch's intra-op threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads; Python {platform.python_version()}"


def one_method(args: argparse.Namespace) -> dict:
    """Everything measured for one method, in this process."""
    import torch

    from deltaedit.cli import set_values
    from deltaedit.data import load_records
    from deltaedit.editor import Editor
    from deltaedit.evaluate import baseline, evaluate
    from deltaedit.memory import peak_resident_mb
    from deltaedit.methods import method_class
    from deltaedit.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    options = set_values(args.set or [], method_class(args.method).config_class)  # a typo fails before loading
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, device=args.device)
    load_seconds = time.perf_counter() - started
    records = load_records(args.dataset, args.data, limit=args.n_edits).records
    editor = Editor(
        model,
        tokenizer,
        method=args.method,
        config=options,
        data_dir=args.data,
        progress=False,
        stats_store=Path(args.stats_store),
        reuse_prefix=not args.full_forward,
    )
    started = time.perf_counter()
    editor.prepare()
    stats_seconds = time.perf_counter() - started
    base = baseline(model, editor.parts, tokenizer, records)
    seconds, steps, held = [], [], 0
    for record in records:
        result = editor.edit([record], on_error="skip")
        if result:
            seconds.append(result[0].seconds)
            steps.append(result[0].steps)
            held += result[0].success
    started = time.perf_counter()
    metrics = evaluate(model, editor.parts, tokenizer, records, base)
    eval_seconds = time.perf_counter() - started
    first, last = seconds[:10], seconds[-10:]
    # seconds per forward pass of the optimizer (steps + the final check): what edits accumulating could slow
    # down, without the noise of how many steps each record happens to need
    per_step = [s / (n + 1) for s, n in zip(seconds, steps, strict=True)]
    return {
        "method": args.method,
        "path": "full forward" if args.full_forward else "default",
        "settings": " ".join(args.set or []) or "defaults",
        "edits": len(seconds),
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "first10_median_s": statistics.median(first),
        "last10_median_s": statistics.median(last),
        "mean_steps": statistics.mean(steps),
        "first10_s_per_step": statistics.median(per_step[:10]),
        "last10_s_per_step": statistics.median(per_step[-10:]),
        "total_edit_s": sum(seconds),
        "success_right_after": held / len(seconds),
        "stats_s": stats_seconds,
        "eval_s": eval_seconds,
        "load_s": load_seconds,
        "peak_rss_mb": peak_resident_mb(),
        "efficacy_top": metrics.get("efficacy_top"),
        "specificity_top": metrics.get("specificity_top"),
        "machine": machine(),
    }


def table(rows: list[dict]) -> str:
    head = (
        "| method | settings | path | edits | s/edit median | min | max | first-10 median | last-10 median "
        "| steps/edit "
        "| s/step first-10 | s/step last-10 | key stats s | eval s | peak RSS MB | efficacy top |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r.get('settings', 'defaults')} "
            f"| {r['path']} | {r['edits']} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} "
            f"| {r['first10_median_s']:.2f} | {r['last10_median_s']:.2f} | {r['mean_steps']:.1f} "
            f"| {r['first10_s_per_step']:.3f} | {r['last10_s_per_step']:.3f} | {r['stats_s']:.1f} "
            f"| {r['eval_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['efficacy_top']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["alphaedit", "deltaedit"])
    parser.add_argument("--method", help=argparse.SUPPRESS)  # set in the per-method child process
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="counterfact")
    parser.add_argument("--data", help="data folder (default $DELTAEDIT_DATA)")
    parser.add_argument("--n-edits", type=int, default=100)
    parser.add_argument("--device")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--full-forward", action="store_true", help="the unoptimized target path, for comparison")
    parser.add_argument("--stats-store", help="key statistics folder (default: a new empty one, so the pass is timed)")
    parser.add_argument("--set", action="append", metavar="NAME=VALUE", help="change one method option (repeatable)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.method:  # child: one method, figures as one JSON line on stdout
        print(json.dumps(one_method(args)), flush=True)
        return
    rows = []
    with tempfile.TemporaryDirectory() as fresh:
        store = args.stats_store or fresh
        for method in args.methods:
            command = [sys.executable, __file__, "--method", method, "--stats-store", store]
            for flag in ("model", "dataset", "data", "n_edits", "device", "threads"):
                value = getattr(args, flag)
                if value is not None:
                    command += [f"--{flag.replace('_', '-')}", str(value)]
            if args.full_forward:
                command.append("--full-forward")
            for item in args.set or []:
                command += ["--set", item]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nmachine: {rows[0]['machine']}\n")
    print(table(rows))
    print("\n(key statistics are computed by the first method and read from the store by the others)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
