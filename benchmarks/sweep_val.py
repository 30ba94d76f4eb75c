"""Choose DeltaEdit's defaults on the validation split: every variant edits the first N records of
counterfact-val one after another (never counterfact-edit, which docs/results.md reports), then a table.

    DELTAEDIT_DATA=../shared/data python benchmarks/sweep_val.py --out ~/deltaedit-runs/sweep          # run all
    DELTAEDIT_DATA=../shared/data python benchmarks/sweep_val.py --out ~/deltaedit-runs/sweep de-targeted ae
    python benchmarks/sweep_val.py --out ~/deltaedit-runs/sweep --table                        # table only

Each variant is one `deltaedit run --threads 1` into OUT/NAME, ``--jobs`` at a time (two one-thread runs use a
2-core machine best); a run already there is continued with ``--resume`` (a finished one is left alone), so
the sweep survives being stopped. The table gives, at the last checkpoint, the CounterFact metrics, noise_E,
the share of edits the constraint fired on, and the stream: the share of edits that held when they were made,
the share of those that still hold, and how many eroded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REFERENCE = "ae"  # the variant the last column compares with, edit by edit
PUBLISHED = ["clamp_norm_factor=0.75", "weight_decay=0.5"]  # MEMIT's / AlphaEdit's published values
# name -> (method, preset, --set values)
VARIANTS: dict[str, tuple[str, str | None, list[str]]] = {
    "de-targeted": ("deltaedit", "paper", ["constraint=targeted"]),
    "ae": ("alphaedit", None, []),
    "de-targeted-clipped": ("deltaedit", "paper", ["constraint=targeted", "ema_update=clipped"]),
    "de-paper": ("deltaedit", "paper", []),
    "de-research": ("deltaedit", "research", []),
    "de-targeted-nb5": ("deltaedit", "paper", ["constraint=targeted", "neighbors=5"]),
    "de-clipped": ("deltaedit", "paper", ["ema_update=clipped"]),
    "de-nbact5": ("deltaedit", "paper", ["constraint=targeted", "neighbors=5", "neighbors_by=activation"]),
    "de-nbact5-always": (
        "deltaedit",
        "paper",
        ["constraint=targeted", "neighbors=5", "neighbors_by=activation", "trigger=always"],
    ),
    "de-cap25": ("deltaedit", "paper", ["cap_fraction=0.25"]),
    "ae-published": ("alphaedit", None, PUBLISHED),
    "de-eta1.5": ("deltaedit", "paper", ["eta=1.5"]),
    "de-eta5": ("deltaedit", "paper", ["eta=5"]),
    "de-targeted-always": ("deltaedit", "paper", ["constraint=targeted", "trigger=always"]),
    "de-published": ("deltaedit", "paper", PUBLISHED),
    "ae-kl-last": ("alphaedit", None, ["kl_position=last"]),
    # levers that make an edit cheaper and may change its result, on de-targeted (--n-edits 100, read --at 100)
    "fast-lr1": ("deltaedit", "paper", ["constraint=targeted", "lr=1.0"]),
    "fast-stop90": ("deltaedit", "paper", ["constraint=targeted", "stop_prob=0.9"]),
    "fast-ctx2": ("deltaedit", "paper", ["constraint=targeted", "n_contexts=2"]),
    "fast-lr1-ctx2": ("deltaedit", "paper", ["constraint=targeted", "lr=1.0", "n_contexts=2"]),
    "ae-lr1": ("alphaedit", None, ["lr=1.0"]),  # the learning rate on AlphaEdit too: a lever of both methods
    # the target search's upper blocks in bfloat16 (faster steps, slightly different vectors), on today's defaults
    "fast-lr1-bf16": ("deltaedit", "paper", ["constraint=targeted", "lr=1.0", "search_dtype=bfloat16"]),
    "ae-lr1-bf16": ("alphaedit", None, ["lr=1.0", "search_dtype=bfloat16"]),
    # the ridge of the solve, which holds back part of every target vector (docs/defaults-smollm2.md): both methods
    "ae-l2-1": ("alphaedit", None, ["l2=1"]),
    "de-research-l2-1": ("deltaedit", "research", ["l2=1"]),
    # the paper's trigger locks in on counterfact-edit (99% of edits by 1000, docs/results.md): today's default
    # with the threshold that cannot lock in, and with the constraint on every edit
    "fast-lr1-clipped": ("deltaedit", "paper", ["constraint=targeted", "lr=1.0", "ema_update=clipped"]),
    "fast-lr1-always": ("deltaedit", "paper", ["constraint=targeted", "lr=1.0", "trigger=always"]),
    # the rest of the sweep on today's defaults (lr 1.0): the trigger's width, the paper's constraint capped at a
    # quarter of the directions, and both methods with MEMIT's / AlphaEdit's published clamp and decay
    "fast-lr1-eta1.5": ("deltaedit", "paper", ["constraint=targeted", "lr=1.0", "eta=1.5"]),
    "fast-lr1-eta5": ("deltaedit", "paper", ["constraint=targeted", "lr=1.0", "eta=5"]),
    "lr1-cap25": ("deltaedit", "paper", ["lr=1.0", "cap_fraction=0.25"]),
    "fast-lr1-published": ("deltaedit", "paper", ["constraint=targeted", "lr=1.0", *PUBLISHED]),
    "ae-lr1-published": ("alphaedit", None, ["lr=1.0", *PUBLISHED]),
    # the ridge lambda = 20 holds back a quarter of every residual and most lost edits fail when made
    # (docs/defaults-smollm2.md): lambda = 1 on both methods, with today's defaults otherwise
    "fast-lr1-l2-1": ("deltaedit", "paper", ["constraint=targeted", "lr=1.0", "l2=1"]),
    "ae-lr1-l2-1": ("alphaedit", None, ["lr=1.0", "l2=1"]),
    # late edits carry to paraphrases less than AlphaEdit's (docs/results.md): the targeted constraint on the
    # context-averaged key alone (one direction, eq. 16's cross term) instead of every prompt's (six)
    "fast-lr1-mean": ("deltaedit", "paper", ["constraint=targeted", "lr=1.0", "targeted_keys=mean"]),
    # the same on every edit, as the paper's trigger fires on counterfact-edit (99%) and not here (~15%)
    "fast-lr1-always-mean": (
        "deltaedit",
        "paper",
        ["constraint=targeted", "lr=1.0", "trigger=always", "targeted_keys=mean"],
    ),
    # DeltaEdit's constraint made more edits fail when made than AlphaEdit (zsRE 86 vs 54 of 500): it forbids the
    # target vector to cancel the noise already at its own keys. One-sided: it may point against Delta_hist k
    "fast-lr1-always-onesided": (
        "deltaedit",
        "paper",
        ["constraint=targeted", "lr=1.0", "trigger=always", "orthogonality=one_sided"],
    ),
    "fast-lr1-onesided": ("deltaedit", "paper", ["constraint=targeted", "lr=1.0", "orthogonality=one_sided"]),
    # the research preset at today's step (de-research ran at 0.5): on the reported zsRE stream it was the best
    # DeltaEdit variant (docs/results.md), so it is measured where defaults are chosen
    "research-lr1": ("deltaedit", "research", ["lr=1.0"]),
    # the baselines' target search: the published step (0.5, the locate block's) against AlphaEdit's and
    # DeltaEdit's SmolLM2 value 1.0; PRUNE and RECT are MEMIT with a hook and take MEMIT's choice
    "memit": ("memit", None, []),
    "memit-lr1": ("memit", None, ["lr=1.0"]),
    "rome": ("rome", None, []),
    "rome-lr1": ("rome", None, ["lr=1.0"]),
    # the key's weighting: MEMIT's compute_ks (AlphaEdit's and DeltaEdit's too) gives the bare prompt one half,
    # every reported run gave it one sixth (a flat mean over the six prompts); both methods, today's defaults
    "fast-lr1-grouped": ("deltaedit", "paper", ["constraint=targeted", "lr=1.0", "key_average=grouped"]),
    "ae-lr1-grouped": ("alphaedit", None, ["lr=1.0", "key_average=grouped"]),
    # DeltaEdit's variants again with the published key (it changed the ranking: AlphaEdit now leads by 1.6):
    # the research preset, the constraint on every edit, a wider trigger, the research code's warm-up, the
    # threshold that cannot lock in
    "g-research-lr1": ("deltaedit", "research", ["lr=1.0", "key_average=grouped"]),
    "g-always": ("deltaedit", "paper", ["constraint=targeted", "lr=1.0", "key_average=grouped", "trigger=always"]),
    "g-eta5": ("deltaedit", "paper", ["constraint=targeted", "lr=1.0", "key_average=grouped", "eta=5"]),
    "g-warmup20": ("deltaedit", "paper", ["constraint=targeted", "lr=1.0", "key_average=grouped", "warmup=20"]),
    "g-clipped": ("deltaedit", "paper", ["constraint=targeted", "lr=1.0", "key_average=grouped", "ema_update=clipped"]),
}

# Every variant above "fast-lr1-grouped" was measured before key_average existed, with the flat key: it keeps
# it, so a fresh folder reproduces its row of docs/defaults-smollm2.md (SmolLM2's default is now "grouped").
_MEASURED_FLAT = list(VARIANTS)[: list(VARIANTS).index("fast-lr1-grouped")]
VARIANTS.update({name: (*VARIANTS[name][:2], [*VARIANTS[name][2], "key_average=flat"]) for name in _MEASURED_FLAT})


def command(name: str, out: Path, args: argparse.Namespace) -> list[str]:
    method, preset, sets = VARIANTS[name]
    run_dir = out / name
    cmd = [sys.executable, "-m", "deltaedit.cli", "run", "--quiet", "--threads", "1", "--out", str(run_dir)]
    if (run_dir / "run.json").is_file():
        return [*cmd, "--resume"]
    cmd += ["--method", method, "--dataset", args.dataset, "--n-edits", str(args.n_edits)]
    cmd += ["--checkpoints", args.checkpoints]
    if preset:
        cmd += ["--preset", preset]
    for value in sets:
        cmd += ["--set", value]
    return cmd


def finished(run_dir: Path, n_edits: int) -> bool:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return False
    return any(c["n_edits"] >= n_edits for c in json.loads(path.read_text())["checkpoints"])


def run_one(name: str, out: Path, args: argparse.Namespace) -> str:
    run_dir = out / name
    if finished(run_dir, args.n_edits):
        return f"{name}: already finished"
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(out / f"{name}.log", "a") as log:
        code = subprocess.call(command(name, out, args), stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    return f"{name}: exit {code} after {(time.time() - started) / 60:.0f} min"


def held_against(run_dir: Path, reference: Path, at: int | None = None, metric: str = "efficacy_top") -> str:
    """Records better in only one of the two runs at the same length (for ``efficacy_top``: edits that hold in
    only one), and the exact two-sided sign test of that split (McNemar's for a 0/1 figure): how likely a split
    this uneven is if neither run is better. ``metric``: a per_record.json column, e.g. generalization_top."""
    from scipy.stats import binomtest

    paths = [d / "per_record.json" for d in (run_dir, reference)]
    if run_dir == reference or not all(p.is_file() for p in paths):
        return ""
    mine, theirs = (json.loads(p.read_text()) for p in paths)
    if mine["n_edits"] != theirs["n_edits"] or at not in (None, mine["n_edits"]):
        return ""
    reference_values = {r["case_id"]: r[metric] or 0 for r in theirs["records"]}
    only_mine = sum((r[metric] or 0) > reference_values[r["case_id"]] for r in mine["records"])
    only_theirs = sum((r[metric] or 0) < reference_values[r["case_id"]] for r in mine["records"])
    if only_mine + only_theirs == 0:
        return "0 / 0"
    p = binomtest(only_mine, only_mine + only_theirs).pvalue
    return f"{only_mine} / {only_theirs} (p {p:.2f})"


def by_decision(run_dir: Path, reference: Path) -> str:
    """The same records in two runs, split by whether ``run_dir``'s constraint fired on their edit (its
    ledger's decision): per group, edits kept / eroded / never held and mean generalization in each run. Says
    whom the constraint costs: the edits it constrains, or the others it protects. ``run_dir`` needs its
    ledger (a run folder, not the metrics under docs/results/); both need per_record.json at the same length."""
    from erosion import GROUPS, group_of  # kept / eroded / never held: one rule for both scripts

    from deltaedit.ledger import Ledger

    triggered = {
        request.case_id: edit.decision().triggered
        for edit in Ledger(run_dir, create=False).active_edits()
        for request in edit.requests()
    }
    mine, theirs = (json.loads((d / "per_record.json").read_text()) for d in (run_dir, reference))
    if mine["n_edits"] != theirs["n_edits"]:
        lengths = f"{mine['n_edits']} and {theirs['n_edits']}"
        raise SystemExit(f"per_record.json at {lengths} edits: evaluate both at one length")
    reference_rows = {r["case_id"]: r for r in theirs["records"]}

    def counts(rows: list[dict]) -> str:
        groups = [group_of(r) for r in rows]
        name = "generalization_top" if "generalization_top" in rows[0] else "generalization"  # zsRE: tokens
        general = [r[name] for r in rows if r.get(name) is not None]
        mean = 100 * sum(general) / len(general) if general else float("nan")
        return " / ".join(str(groups.count(g)) for g in GROUPS) + f" | {mean:.1f}"

    lines = [
        f"| {run_dir.name}'s constraint | edits | {run_dir.name}: kept / eroded / never held | gen. "
        f"| {reference.name}: kept / eroded / never held | gen. |",
        "|---|---:|---|---:|---|---:|",
    ]
    for fired, label in ((True, "fired"), (False, "did not fire")):
        rows = [r for r in mine["records"] if triggered.get(r["case_id"]) is fired]
        if rows:
            others = [reference_rows[r["case_id"]] for r in rows]
            lines.append(f"| {label} | {len(rows)} | {counts(rows)} | {counts(others)} |")
    return "\n".join(lines)


def edit_costs(run_dir: Path, n_edits: int) -> tuple[str, str]:
    """Mean optimizer steps and median seconds of the first ``n_edits`` edits in force, from the run's ledger:
    what a cheaper-edit lever saves, apart from the evaluation that a checkpoint's time includes. Blank for
    the metrics committed under docs/results/, which keep no ledger."""
    from deltaedit.ledger import Ledger

    if not (run_dir / Ledger.INDEX).is_file():  # committed metrics keep no ledger
        return "", ""
    results = [edit.data["result"] for edit in Ledger(run_dir, create=False).active_edits()[:n_edits]]
    if not results:
        return "", ""
    seconds = sorted(r["seconds"] for r in results)
    return f"{sum(r['steps'] for r in results) / len(results):.1f}", f"{seconds[len(seconds) // 2]:.2f}"


def row(name: str, run_dir: Path, at: int | None = None) -> str | None:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    checkpoints = json.loads(path.read_text())["checkpoints"]
    if at is not None:
        checkpoints = [c for c in checkpoints if c["n_edits"] == at]
    if not checkpoints:
        return None
    last = checkpoints[-1]
    stream, diag = last["metrics"].get("stream", {}), last["diagnostics"]
    if "counterfact" in last["metrics"]:
        cf = last["metrics"]["counterfact"]
        figures = [cf["efficacy_top"], cf["generalization_top"], cf["specificity_top"], cf["efficacy_larger"]]
    else:  # zsRE: token-level top-1 accuracy in the "top" columns, no "larger" figure
        zsre = last["metrics"]["zsre"]
        figures = [zsre["efficacy"], zsre["generalization"], zsre["specificity"], None]

    def pct(value):
        return "" if value is None else f"{100 * value:.1f}"

    steps, median_seconds = edit_costs(run_dir, last["n_edits"])
    cells = [
        name,
        str(last["n_edits"]),
        *(pct(value) for value in figures),
        pct(stream.get("held_when_made")),
        pct(stream.get("kept_of_held")),
        str(stream.get("eroded", "")),
        "" if diag.get("noise_E") is None else f"{diag['noise_E']:.0f}",
        pct(diag.get("triggered_share")),
        "" if diag.get("removed_rank_mean") is None else f"{diag['removed_rank_mean']:.0f}",
        steps,
        median_seconds,
        held_against(run_dir, run_dir.parent / REFERENCE, at),
    ]
    return "| " + " | ".join(cells) + " |"


def table(out: Path, names: list[str], at: int | None = None) -> str:
    head = (
        "| variant | edits | Eff. top | Gen. top | Spe. top | Eff. larger | held when made | still held "
        "| eroded | noise_E | triggered | dirs removed | steps/edit | s/edit (median) | held only here / only in ae |"
    )
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    lines += [r for r in (row(n, out / n, at) for n in names) if r]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", help=f"default: all, in this order: {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, required=True, help="folder of the run directories (outside the repo)")
    parser.add_argument("--dataset", default="counterfact-val")
    parser.add_argument("--n-edits", type=int, default=500)
    parser.add_argument("--checkpoints", default="50,100,200,300,400,500")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="only print the table of what is there")
    parser.add_argument("--at", type=int, help="table at this checkpoint (default: each run's last)")
    args = parser.parse_args()
    names = args.variants or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    out = args.out.expanduser()
    if not args.table:
        with ThreadPoolExecutor(args.jobs) as pool:
            for message in pool.map(lambda n: run_one(n, out, args), names):
                print(message, flush=True)
    print(table(out, names, args.at))


if __name__ == "__main__":
    main()
