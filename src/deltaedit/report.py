"""Run records (``metrics.json``), the checkpoint schedule, and the side-by-side report with plots.

A run directory holds one ``metrics.json`` (schema in docs/metrics.md)::

    {"schema": 1,
     "run": {"name": ..., "method": ..., "model": ..., "dataset": ..., "n_edits": ..., "seed": ..., "config": {...}},
     "checkpoints": [{"n_edits": 50, "seconds": 81.2,
                      "metrics": {"counterfact": {"efficacy_top": 0.98, ...}, "zsre": {...}},
                      "diagnostics": {...deltaedit.diagnostics.diagnose output...}}, ...]}

:func:`write_report` puts any number of runs side by side: the paper's Table 1 (final checkpoint of each run,
or each run's checkpoint ``at`` a common edit count; runs of the same model and label share a row, so a
CounterFact run and a zsRE run of one method fill one row, and ``rows="method"`` labels rows by method) and
the curves of Figures 1, 2 and 4a against the number of edits.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
METRICS_FILE = "metrics.json"
DEFAULT_POINTS = (50, 100, 200, 500, 1000, 2000, 3000)

# Table 1 columns: (group title, column title, metrics group, metric name)
TABLE_COLUMNS = (
    ("CounterFact top", "Eff.", "counterfact", "efficacy_top"),
    ("CounterFact top", "Gen.", "counterfact", "generalization_top"),
    ("CounterFact top", "Spe.", "counterfact", "specificity_top"),
    ("CounterFact larger", "Eff.", "counterfact", "efficacy_larger"),
    ("CounterFact larger", "Gen.", "counterfact", "generalization_larger"),
    ("CounterFact larger", "Spe.", "counterfact", "specificity_larger"),
    ("ZsRE", "Eff.", "zsre", "efficacy"),
    ("ZsRE", "Gen.", "zsre", "generalization"),
    ("ZsRE", "Spe.", "zsre", "specificity"),
)
TABLE_GROUPS = {group for _, _, group, _ in TABLE_COLUMNS}
GROUP_TITLES = {"counterfact": "CounterFact", "zsre": "ZsRE"}
# The companion table's columns, read from the run that gives a row its figures on one dataset, at the same
# checkpoint: (column title, reader of that checkpoint -> cell text or None)
EROSION_COLUMNS = (
    ("noise_E", lambda c: _number((c.get("diagnostics") or {}).get("noise_E"), "{:.0f}")),
    (
        "failed when made / eroded",
        lambda c: _pair(c.get("metrics", {}).get("stream", {}), "failed_when_made", "eroded"),
    ),
    (
        "WikiText-2 ppl (unedited)",
        lambda c: _with_unedited(c.get("metrics", {}).get("perplexity", {}), "wikitext2", "unedited", "{:.2f}"),
    ),
    ("mean ΔF1", lambda c: _points(c.get("metrics", {}).get("general", {}).get("mean_delta"))),
)
# plot file -> (title, y label); the value each plot reads is chosen in _curve_value
PLOTS = {
    "efficacy_top.png": ("Efficacy (top) vs number of edits (Figure 1)", "CounterFact Efficacy top"),
    "generalization_top.png": ("Generalization (top) vs number of edits", "CounterFact Generalization top"),
    "zsre_efficacy.png": ("ZsRE efficacy vs number of edits", "ZsRE Efficacy"),
    "zsre_generalization.png": ("ZsRE generalization vs number of edits", "ZsRE Generalization"),
    "noise_E.png": ("noise_E at the critical layer (Figure 4a)", "noise_E"),
    "ktb.png": ("Wrong activation k^T beta at the critical layer (Figure 2)", "k^T beta"),
    "triggered.png": ("Share of edits the method's constraint fired on", "triggered"),
}
PERCENT_PLOTS = {
    "efficacy_top.png",
    "generalization_top.png",
    "zsre_efficacy.png",
    "zsre_generalization.png",
    "triggered.png",
}


class RunFileError(ValueError):
    """A run directory whose metrics.json is missing or malformed; the message names the file."""


# ---------------------------------------------------------------------------------------------- schedule
def checkpoint_schedule(n_edits: int, points: Iterable[int] = DEFAULT_POINTS) -> list[int]:
    """The evaluation points of a run of ``n_edits`` edits: every point not beyond the end, plus the end."""
    if n_edits <= 0:
        return []
    return sorted({p for p in points if 0 < p <= n_edits} | {n_edits})


# ---------------------------------------------------------------------------------------------- metrics.json
def new_run_record(
    method: str,
    model: str,
    dataset: str,
    n_edits: int,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    name: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A fresh metrics.json document with no checkpoints yet."""
    run = {"name": name or method, "method": method, "model": model, "dataset": dataset, "n_edits": n_edits}
    run.update({"seed": seed, "config": config or {}, **extra})
    return {"schema": SCHEMA_VERSION, "run": run, "checkpoints": []}


def add_checkpoint(
    document: dict[str, Any],
    n_edits: int,
    seconds: float,
    metrics: dict[str, dict[str, float | None]],
    diagnostics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Append (or replace, for the same ``n_edits``) one checkpoint, keeping them sorted by edits."""
    entry = {"n_edits": n_edits, "seconds": seconds, "metrics": metrics, "diagnostics": diagnostics or {}}
    kept = [c for c in document["checkpoints"] if c["n_edits"] != n_edits]
    document["checkpoints"] = sorted([*kept, entry], key=lambda c: c["n_edits"])
    return entry


def write_metrics(run_dir: str | os.PathLike, document: dict[str, Any]) -> Path:
    """Write metrics.json atomically (temporary file, then rename), so a reader never sees half a file."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / METRICS_FILE
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".metrics.", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(_json_safe(document), out, indent=1, allow_nan=False)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _json_safe(value: Any) -> Any:
    """NaN / infinity become null: strict JSON, readable by any tool."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def join_checkpoints(documents: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One metrics.json from a run measured in parts: a run carried on in a new directory (``deltaedit run
    --targets``, with ``--checkpoints`` naming only those still to measure) holds its later checkpoints only.
    The parts must describe the same run; a checkpoint found in two parts must have the same metrics."""
    if not documents:
        raise RunFileError("join: no metrics.json to join")
    first = documents[0]
    joined: dict[int, dict[str, Any]] = {}
    for document in documents:
        if document["run"] != first["run"]:
            differing = sorted(
                k for k in {*document["run"], *first["run"]} if document["run"].get(k) != first["run"].get(k)
            )
            raise RunFileError(f"join: the parts describe different runs (they differ in {', '.join(differing)})")
        for checkpoint in document["checkpoints"]:
            n = checkpoint["n_edits"]
            if n in joined and joined[n]["metrics"] != checkpoint["metrics"]:
                raise RunFileError(f"join: checkpoint {n} is in two parts with different metrics; keep one of them")
            joined.setdefault(n, checkpoint)
    return {**first, "checkpoints": [joined[n] for n in sorted(joined)]}


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check a run's metrics.json (a path to the file itself is accepted too)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise RunFileError(f"{path}: no such file; a run directory must hold {METRICS_FILE}")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise RunFileError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("run"), dict):
        raise RunFileError(f"{path}: expected an object with a 'run' object and a 'checkpoints' list")
    checkpoints = document.get("checkpoints", [])
    if not isinstance(checkpoints, list) or not all(
        isinstance(c, dict) and isinstance(c.get("n_edits"), int) for c in checkpoints
    ):
        raise RunFileError(f"{path}: 'checkpoints' must be a list of objects, each with an integer 'n_edits'")
    document["checkpoints"] = sorted(checkpoints, key=lambda c: c["n_edits"])
    document.setdefault("schema", SCHEMA_VERSION)
    return document


# ---------------------------------------------------------------------------------------------- report
def run_label(run: dict[str, Any]) -> str:
    """How a run is named in tables and legends: its name, else its method."""
    return str(run.get("name") or run.get("method") or "run")


def _row_label(run: dict[str, Any], rows_by: str) -> str:
    """How Table 1 and the legends name a run: by its name, or by its method (one row per method)."""
    return run_label(run) if rows_by == "name" else str(run.get("method") or "run")


def _metric(checkpoint: dict[str, Any], group: str, name: str) -> float | None:
    value = checkpoint.get("metrics", {}).get(group, {}).get(name)
    return value if isinstance(value, int | float) and math.isfinite(value) else None


def _final_metrics(document: dict[str, Any]) -> tuple[dict[str, dict[str, float]], int | None]:
    """Each metric's value at the last checkpoint that has it, and that checkpoint's edit count."""
    values: dict[str, dict[str, float]] = {}
    last = None
    for checkpoint in document["checkpoints"]:
        for group, metrics in checkpoint.get("metrics", {}).items():
            for name in metrics if isinstance(metrics, dict) else ():
                value = _metric(checkpoint, group, name)
                if value is not None:
                    values.setdefault(group, {})[name] = value
                    last = checkpoint["n_edits"]
    return values, last


ROW_LABELS = ("name", "method")


def table_rows(documents: Sequence[dict[str, Any]], rows_by: str = "name") -> list[dict[str, Any]]:
    """Table 1 rows: one per (model, label), merging the final metrics of the runs that share it. The label
    is the run's name ("name") or its method ("method": one row per method, as in the paper's Table 1)."""
    if rows_by not in ROW_LABELS:
        raise ValueError(f"rows: use 'name' or 'method', not {rows_by!r}")
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    sources: dict[tuple[str, str, str], str] = {}  # (model, label, metrics group) -> the run that filled it
    for document in documents:
        run = document["run"]
        label = _row_label(run, rows_by)
        key = (str(run.get("model", "")), label)
        row = rows.setdefault(key, {"model": key[0], "label": key[1], "values": {}, "edits": [], "extra": {}})
        values, last = _final_metrics(document)
        extra = _extra_cells(document)
        for group, metrics in values.items():
            if group not in TABLE_GROUPS:  # e.g. "stream", which every dataset has: not a Table 1 column
                continue
            row["extra"][group] = extra
            other = sources.setdefault((*key, group), run_label(run))
            if group in row["values"]:  # a second run with the same row's figures would hide the first
                raise ValueError(
                    f"rows: runs {other!r} and {run_label(run)!r} both give {key[1]}'s {group} figures on "
                    f"{key[0]}; report one run per method and dataset, or label rows by name"
                )
            row["values"].setdefault(group, {}).update(metrics)
        n = last if last is not None else run.get("n_edits")
        if n is not None and n not in row["edits"]:
            row["edits"].append(n)
    return list(rows.values())


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The paper's Table 1 as Markdown: percentages with two decimals, blank where a run has no value."""
    header = ["Model", "Method"] + [f"{group} {title}" for group, title, _, _ in TABLE_COLUMNS] + ["Edits"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for row in rows:
        cells = [row["model"], row["label"]]
        cells += [_percent(row["values"].get(group, {}).get(name)) for _, _, group, name in TABLE_COLUMNS]
        cells.append(" / ".join(str(n) for n in row["edits"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _extra_cells(document: dict[str, Any]) -> dict[str, str]:
    """The companion table's cells for one run: each column at the last checkpoint that has it."""
    cells = {}
    for title, read in EROSION_COLUMNS:
        for checkpoint in reversed(document["checkpoints"]):
            if text := read(checkpoint):
                cells[title] = text
                break
    return cells


def _points(fraction: Any) -> str:
    return _number(100 * fraction, "{:+.1f}") if isinstance(fraction, int | float) else ""


def _pair(values: dict[str, Any], first: str, second: str) -> str:
    a, b = values.get(first), values.get(second)
    return f"{a} / {b}" if isinstance(a, int) and isinstance(b, int) else ""


def _with_unedited(values: dict[str, Any], edited: str, unedited: str, fmt: str) -> str:
    text, base = _number(values.get(edited), fmt), _number(values.get(unedited), fmt)
    return f"{text} ({base})" if text and base else text


def erosion_table(rows: Sequence[dict[str, Any]]) -> str:
    """Table 1's companion: per dataset, the edits lost (failed when made, eroded since), noise_E at the critical
    layer and, for runs measured with --health, perplexity and the general-capability change. Columns no row
    has are left out; empty when no row has any."""
    columns = [
        (group, title)
        for group in sorted(TABLE_GROUPS, key=[g for _, _, g, _ in TABLE_COLUMNS].index)
        for title, _ in EROSION_COLUMNS
        if any(row.get("extra", {}).get(group, {}).get(title) for row in rows)
    ]
    if not columns:
        return ""
    header = ["Model", "Method"] + [f"{GROUP_TITLES.get(group, group)} {title}" for group, title in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(columns)) + "|"]
    for row in rows:
        cells = [row["model"], row["label"]]
        cells += [row.get("extra", {}).get(group, {}).get(title, "") for group, title in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _curve_value(checkpoint: dict[str, Any], plot: str) -> float | None:
    diagnostics = checkpoint.get("diagnostics") or {}
    metric = {
        "efficacy_top.png": ("counterfact", "efficacy_top"),
        "generalization_top.png": ("counterfact", "generalization_top"),
        "zsre_efficacy.png": ("zsre", "efficacy"),
        "zsre_generalization.png": ("zsre", "generalization"),
    }.get(plot)
    if metric is not None:
        return _metric(checkpoint, *metric)
    key = {"noise_E.png": "noise_E", "ktb.png": "ktb", "triggered.png": "triggered_share"}[plot]
    value = diagnostics.get(key)
    return value if isinstance(value, int | float) and math.isfinite(value) else None


def _curves(documents: Sequence[dict[str, Any]], plot: str, legend: list[str]) -> list[tuple[str, list, list]]:
    curves = []
    for document, label in zip(documents, legend, strict=True):
        points = [(c["n_edits"], _curve_value(c, plot)) for c in document["checkpoints"]]
        points = [(n, v) for n, v in points if v is not None]
        if points:
            curves.append((label, [n for n, _ in points], [v for _, v in points]))
    return curves


def _legend(documents: Sequence[dict[str, Any]], rows_by: str = "name") -> list[str]:
    """Run labels as Table 1's rows name them, with the model and dataset added only where they tell runs
    apart."""
    runs = [d["run"] for d in documents]
    labels = [_row_label(r, rows_by) for r in runs]
    for field in ("model", "dataset"):
        if len({str(r.get(field, "")) for r in runs}) > 1:
            labels = [f"{label} ({r.get(field, '?')})" for label, r in zip(labels, runs, strict=True)]
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return unique


def _plot(path: Path, title: str, ylabel: str, curves: list[tuple[str, list, list]], percent: bool) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    try:
        for label, xs, ys in curves:
            ax.plot(xs, [100 * y for y in ys] if percent else ys, marker="o", markersize=3, label=label)
        values = [y for _, _, ys in curves for y in ys]
        if not percent and values and min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")  # noise_E spans orders of magnitude (paper Table 2)
        ax.set_xlabel("number of edits")
        ax.set_ylabel(ylabel + (" (%)" if percent else ""))
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def until(document: dict[str, Any], n_edits: int, source: object = "run") -> dict[str, Any]:
    """``document`` with only its checkpoints up to ``n_edits``, which must be one of them: a run read at a
    common edit count (a 1000-edit run in a table of 500-edit runs)."""
    counts = [c["n_edits"] for c in document["checkpoints"]]
    if n_edits not in counts:
        raise ValueError(
            f"at: {source} has no checkpoint at {n_edits} edits (it has {counts}); choose one of those, or "
            "leave it out to read each run's last checkpoint"
        )
    return {**document, "checkpoints": [c for c in document["checkpoints"] if c["n_edits"] <= n_edits]}


def write_report(
    run_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    at: int | None = None,
    rows: str = "name",
) -> Path:
    """Write ``report.md`` (Table 1 side by side, per-run checkpoint tables) and the PNG plots into
    ``out_dir``; returns the report's path. Plots nobody has data for are skipped and said so.

    ``at``: read every run at that checkpoint (tables, curves and model health stop there; the t-SNE panel
    shows the hidden states the run kept, labelled with their own edit count) instead of at its last.
    ``rows``: label Table 1's rows, and the runs in legends and the health table, by run name or by method
    (:func:`table_rows`)."""
    if not run_dirs:
        raise ValueError("run_dirs: give at least one run directory")
    documents = [read_metrics(d) for d in run_dirs]
    if at is not None:
        documents = [until(d, at, Path(r) / METRICS_FILE) for d, r in zip(documents, run_dirs, strict=True)]
    table_1 = table_rows(documents, rows)
    table, erosion = markdown_table(table_1), erosion_table(table_1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    legend = _legend(documents, rows)

    lines = ["# Editing report", "", "## Table 1", ""]
    lines.append(
        ("Final checkpoint of each run" if at is None else f"Each run at {at} edits")
        + ", in %. CounterFact *top*: the target is the greedy prediction; *larger*: it is more probable than "
        "the other answer; ZsRE: token-level top-1 accuracy, Spe. = predictions on `loc` unchanged from the "
        "unedited model. Definitions: docs/metrics.md."
    )
    lines += ["", table, ""]
    if erosion:
        lines += [
            "The same rows: edits whose target was not the greedy prediction right after they were made (zsRE: not "
            "every answer token the argmax) and edits that held then and no longer hold, noise_E at the critical "
            "layer, and for runs measured with `--health` WikiText-2 perplexity and the mean change of macro F1 "
            "over the six general tasks, in points.",
            "",
            erosion,
            "",
        ]
    lines += ["## Curves", ""]
    for plot, (title, ylabel) in PLOTS.items():
        curves = _curves(documents, plot, legend)
        if curves:
            _plot(out_dir / plot, title, ylabel, curves, percent=plot in PERCENT_PLOTS)
            lines += [f"![{title}]({plot})", ""]
        else:
            (out_dir / plot).unlink(missing_ok=True)
            lines += [f"*{title}: no run has this value.*", ""]
    lines += health_section(documents, legend, run_dirs, out_dir)
    lines += ["## Checkpoints", ""]
    for document, label, run_dir in zip(documents, legend, run_dirs, strict=True):
        lines += [f"### {label}", "", _run_summary(document["run"], run_dir), "", _checkpoint_table(document), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- model health


def _health(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in document["checkpoints"] if "general" in c.get("metrics", {})]


def health_section(documents, legend, run_dirs, out_dir: Path) -> list[str]:
    """Model health of the runs measured with --health: a table at the last checkpoint, Figure 3 (general.png),
    the t-SNE of hidden states (representations.png) and the case study. Empty when no run has health."""
    runs = [(d, label, Path(r)) for d, label, r in zip(documents, legend, run_dirs, strict=True) if _health(d)]
    if not runs:
        for name in ("general.png", "representations.png"):
            (out_dir / name).unlink(missing_ok=True)
        return []
    lines = ["## Model health", ""]
    lines.append(
        "At the last checkpoint of each run measured with `--health` (health.py): general-capability macro F1 "
        "change from the unedited model averaged over the six tasks, generation entropy and perplexity edited "
        "(unedited), and the shift of the hidden states of the known facts (mean cosine distance, MMD)."
    )
    lines += [
        "",
        "| Run | Edits | mean ΔF1 | entropy | WikiText-2 ppl | representation shift |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for document, label, _ in runs:
        last = _health(document)[-1]["metrics"]
        general, fluency, ppl = last["general"], last["fluency"], last["perplexity"]
        shift = "; ".join(
            f"layer {layer}: cos {v['cosine_distance']:.4f}, MMD {v['mmd']:.4f}"
            for layer, v in last["representations"].items()
        )
        entropy = f"{_number(fluency.get('entropy'))} ({_number(fluency.get('entropy_unedited'))})"
        lines.append(
            f"| {label} | {_health(document)[-1]['n_edits']} | {100 * general['mean_delta']:+.2f} | {entropy} | "
            f"{_number(ppl['wikitext2'])} ({_number(ppl['unedited'])}) | {shift} |"
        )
    _plot_general(out_dir / "general.png", [(d, label) for d, label, _ in runs])
    lines += ["", "![General capability against the number of edits (Figure 3)](general.png)", ""]
    if _plot_representations(out_dir / "representations.png", [(label, r) for _, label, r in runs]):
        lines += ["![Hidden states of known facts, unedited and edited (Figure 4b)](representations.png)", ""]
    lines += ["### Case study", ""]
    for document, label, _ in runs:
        for case in _health(document)[-1]["metrics"].get("case_study", []):
            lines += [
                f"- **{label}**, *{case['prompt']}*",
                f"  - unedited: {' '.join(case['unedited'].split())}",
                f"  - edited: {' '.join(case['edited'].split())}",
            ]
    return [*lines, ""]


def _plot_general(path: Path, runs: list[tuple[dict[str, Any], str]]) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    tasks = sorted({t for d, _ in runs for c in _health(d) for t in c["metrics"]["general"]["f1"]})
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.0 * len(tasks), 5.6), squeeze=False)
    try:
        for column, task in enumerate(tasks):
            for document, label in runs:
                points = _health(document)
                xs = [c["n_edits"] for c in points]
                f1 = [100 * c["metrics"]["general"]["f1"][task] for c in points]
                delta = [100 * c["metrics"]["general"]["delta"][task] for c in points]
                axes[0][column].plot(xs, f1, marker="o", markersize=3, label=label)
                axes[1][column].plot(xs, delta, marker="o", markersize=3, label=label)
            unedited = 100 * _health(runs[0][0])[0]["metrics"]["general"]["unedited"][task]
            axes[0][column].axhline(unedited, color="gray", linestyle="--", linewidth=1)
            axes[1][column].axhline(0, color="gray", linestyle="--", linewidth=1)
            axes[0][column].set_title(task)
            axes[1][column].set_xlabel("number of edits")
        axes[0][0].set_ylabel("macro F1 (%)")
        axes[1][0].set_ylabel("F1 - unedited F1 (points)")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def _plot_representations(path: Path, runs: list[tuple[str, Path]]) -> bool:
    """t-SNE of the unedited and the last checkpoint's hidden states at the critical layer, per run, with marginal
    densities and 0.95 confidence ellipses (paper Figure 4b). False when no run kept the states."""
    from safetensors import safe_open

    panels = []
    for label, run_dir in runs:
        path_states = run_dir / "representations.safetensors"
        if not path_states.is_file():
            continue
        with safe_open(str(path_states), "pt") as f:
            names = set(f.keys())
            layers = sorted(int(n.split(".")[1]) for n in names if n.startswith("edited."))
            if not layers:
                continue
            n_edits = (f.metadata() or {}).get("n_edits", "?")
            layer = layers[0]  # the critical layer (the lower of the two kept)
            before, after = f.get_tensor(f"unedited.{layer}"), f.get_tensor(f"edited.{layer}")
            panels.append((label, layer, n_edits, before, after))
    if not panels:
        path.unlink(missing_ok=True)
        return False
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    fig = plt.figure(figsize=(4.6 * len(panels), 4.6))
    try:
        grid = fig.add_gridspec(2, 2 * len(panels), width_ratios=[4, 1] * len(panels), height_ratios=[1, 4])
        for index, (label, layer, n_edits, before, after) in enumerate(panels):
            _tsne_panel(fig, grid, index, f"{label}: layer {layer}, {n_edits} edits", before.numpy(), after.numpy())
        fig.savefig(path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return True


def _tsne_panel(fig, grid, index: int, title: str, before, after) -> None:
    import numpy as np
    from scipy.stats import chi2, gaussian_kde
    from sklearn.manifold import TSNE

    both = np.concatenate([before, after])
    perplexity = min(30.0, (len(both) - 1) / 3)  # scikit-learn needs fewer neighbours than points
    points = TSNE(n_components=2, random_state=0, init="pca", perplexity=perplexity).fit_transform(both)
    clouds = {"unedited": points[: len(before)], "edited": points[len(before) :]}
    main = fig.add_subplot(grid[1, 2 * index])
    top = fig.add_subplot(grid[0, 2 * index], sharex=main)
    side = fig.add_subplot(grid[1, 2 * index + 1], sharey=main)
    for (name, cloud), color in zip(clouds.items(), ("tab:blue", "tab:orange"), strict=True):
        main.scatter(cloud[:, 0], cloud[:, 1], s=4, alpha=0.5, color=color, label=name)
        mean, cov = cloud.mean(0), np.cov(cloud.T)
        values, vectors = np.linalg.eigh(cov)
        angle = np.linspace(0, 2 * np.pi, 200)
        radius = np.sqrt(chi2.ppf(0.95, 2) * np.maximum(values, 0))
        ellipse = mean[:, None] + vectors @ (radius[:, None] * np.stack([np.cos(angle), np.sin(angle)]))
        main.plot(ellipse[0], ellipse[1], color=color, linewidth=1.2)
        for axis, ax in ((0, top), (1, side)):
            grid_values = np.linspace(points[:, axis].min(), points[:, axis].max(), 200)
            density = gaussian_kde(cloud[:, axis])(grid_values)
            if axis == 0:
                ax.plot(grid_values, density, color=color)
            else:
                ax.plot(density, grid_values, color=color)
    top.set_title(title, fontsize=9)
    top.axis("off")
    side.axis("off")
    main.legend(fontsize=7, loc="lower right")


def _run_summary(run: dict[str, Any], run_dir: str | os.PathLike) -> str:
    fields = [f"{k}: `{run[k]}`" for k in ("method", "model", "dataset", "n_edits", "seed") if k in run]
    return f"`{run_dir}` - " + ", ".join(fields)


def _number(value: Any, fmt: str = "{:.4g}") -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return ""
    return fmt.format(value)


def _checkpoint_table(document: dict[str, Any]) -> str:
    header = "| Edits | Seconds | CF Eff. top | CF Eff. larger | ZsRE Eff. | noise_E | k^T beta | abs k^T beta |"
    header += " norm Delta | cond W | triggered |"
    lines = [header, "|" + "---:|" * 11]
    for c in document["checkpoints"]:
        d = c.get("diagnostics") or {}
        cells = [
            str(c["n_edits"]),
            _number(c.get("seconds")),
            _percent(_metric(c, "counterfact", "efficacy_top")),
            _percent(_metric(c, "counterfact", "efficacy_larger")),
            _percent(_metric(c, "zsre", "efficacy")),
            _number(d.get("noise_E")),
            _number(d.get("ktb")),
            _number(d.get("ktb_abs")),
            _number(d.get("delta_norm")),
            _number(d.get("cond")),
            _percent(d.get("triggered_share")) if isinstance(d.get("triggered_share"), int | float) else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "checkpoint_schedule",
    "new_run_record",
    "add_checkpoint",
    "write_metrics",
    "read_metrics",
    "write_report",
    "table_rows",
    "markdown_table",
    "erosion_table",
    "RunFileError",
]
