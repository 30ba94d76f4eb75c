"""Why edits erode in a run: later edits' response to an edit's stored key against the drift of the key itself.

Replays a run directory's ledger onto its base model, splits for every edit the change of the edited layers'
summed MLP output at its subject since it was made (``deltaedit.diagnostics.erosion``: ``own``, ``later``,
``drift``), and groups the edits by the run's last evaluation (``per_record.json``): kept (held when made and
holds now), eroded (held when made, lost now), never held. Prints per group the median norms relative to the
edit's own write, the median share of it each cancels and P(target) right after the edit; then how well each
figure alone tells the eroded edits from the kept ones (ROC AUC; 0.5: not at all). Asserts nothing.

    DELTAEDIT_DATA=../shared/data python benchmarks/erosion.py RUN_DIR [RUN_DIR ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

from deltaedit import Editor
from deltaedit.diagnostics import erosion
from deltaedit.run import open_base_model, resume_data_dir

GROUPS = ("kept", "eroded", "never held")


def group_of(row: dict) -> str:
    if not row["held_when_made"]:
        return "never held"
    return "kept" if row["holds_now"] else "eroded"


def measure(run_dir: Path, data: str | None) -> dict:
    per_record = json.loads((run_dir / "per_record.json").read_text())
    model, tokenizer = open_base_model(run_dir)
    editor = Editor.resume(run_dir, model, tokenizer, data_dir=resume_data_dir(run_dir, data), progress=False)
    if len(editor.applied) != per_record["n_edits"]:
        found = f"{len(editor.applied)} edits in the ledger, per_record.json is at {per_record['n_edits']}"
        raise SystemExit(f"{run_dir}: {found}; evaluate the run at its last edit first (deltaedit run --resume)")
    result = erosion(editor)
    made = {edit.edit_id: edit.result.target_prob for edit in editor.applied}
    result["target_prob"] = [made[edit_id] for edit_id in result["edit_id"]]
    groups = {row["case_id"]: group_of(row) for row in per_record["records"]}
    result["group"] = [groups.get(case) for case in result["case_id"]]
    return result


def median(result: dict, rows: list[int], name: str, relative: bool = False) -> float:
    """The median of ``result[name]`` over ``rows``, divided by each edit's own norm when ``relative``."""
    values = [result[name][i] / result["own_norm"][i] if relative else result[name][i] for i in rows]
    return statistics.median(v for v in values if v is not None)


def summary(result: dict) -> list[str]:
    lines = ["| group | edits | later / own | drift / own | later cancels | drift cancels | P(target) when made |"]
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for group in GROUPS:
        rows = [i for i, g in enumerate(result["group"]) if g == group]
        if rows:
            later, drift = (median(result, rows, name, relative=True) for name in ("later_norm", "drift_norm"))
            cancels = [median(result, rows, name) for name in ("later_cancels", "drift_cancels")]
            figures = [later, drift, *cancels, median(result, rows, "target_prob")]
            lines.append(f"| {group} | {len(rows)} | " + " | ".join(f"{x:.3f}" for x in figures) + " |")
    rows = [i for i, g in enumerate(result["group"]) if g in ("kept", "eroded")]
    eroded = [result["group"][i] == "eroded" for i in rows]
    if 0 < sum(eroded) < len(rows):
        predictors = {
            "later / own": [result["later_norm"][i] / result["own_norm"][i] for i in rows],
            "drift / own": [result["drift_norm"][i] / result["own_norm"][i] for i in rows],
            "low P(target) when made": [-result["target_prob"][i] for i in rows],
            "age (earlier edit)": [-result["edit_id"][i] for i in rows],
        }
        aucs = ", ".join(f"{name} {roc_auc_score(eroded, values):.3f}" for name, values in predictors.items())
        lines.append(f"\nEroded against kept, ROC AUC of each figure alone: {aucs}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data", help="the data folder (default: the run's own, or DELTAEDIT_DATA)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write every edit's figures here, one key per run directory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    everything = {}
    for run_dir in args.runs:
        result = measure(run_dir, args.data)
        everything[str(run_dir)] = result
        print(f"\n{run_dir} ({len(result['group'])} edits; medians over each group)\n")
        print("\n".join(summary(result)))
    if args.json:
        args.json.write_text(json.dumps(everything))


if __name__ == "__main__":
    main()
