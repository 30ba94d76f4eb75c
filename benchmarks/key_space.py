"""How full a run's free key space gets: the room a null-space method has left for new edits.

AlphaEdit and DeltaEdit write an edit along its key projected on the null space of the preserved keys
(``P0 k``, P0 from the key statistics). That space has a fixed number of directions per layer (1052 of
SmolLM2's 1536 at layer 7); once the projected keys of the edits so far span it, a new edit's key is a
combination of earlier ones, and writing it moves their outputs too. For each edit this prints, in windows
of edits, the median share of its projected key's energy that lies outside the span of every earlier edit's
(1: a fresh direction; 0: nothing left), and the rank the edits span. Reads the ledger without its lock (a
live run may go on) and the projectors from this machine's statistics cache. Asserts nothing.

    DELTAEDIT_DATA=../shared/data python benchmarks/key_space.py RUN_DIR [--layers 3,7] [--window 250]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from deltaedit import Editor
from deltaedit.ledger import Ledger
from deltaedit.methods import method_class
from deltaedit.run import open_base_model, resume_data_dir


def prepared_method(run_dir: Path, data: str | None):
    """The run's method with its null-space projectors P0 built as the run built them (same config and
    statistics); ``method.projectors`` and ``method.preserved_dims`` are read from it."""
    manifest = Ledger(run_dir, create=False).require_manifest()
    method_cls = method_class(manifest["method"])
    config = method_cls.config_class.from_recorded(manifest["config"])
    model, tokenizer = open_base_model(run_dir)
    editor = Editor(
        model,
        tokenizer,
        method=manifest["method"],
        config=config,
        progress=False,
        data_dir=resume_data_dir(run_dir, data),
    )
    editor.prepare()
    return editor.method


def fresh_shares(keys: torch.Tensor, projector: torch.Tensor, tol: float = 1e-8) -> tuple[list[float], list[int]]:
    """Per key (columns, in edit order): the share of ``|P0 k|^2`` outside the span of the earlier projected
    keys, and the rank spanned after it (Gram-Schmidt, twice, in float64)."""
    basis = torch.empty(projector.shape[0], 0, dtype=torch.float64)
    shares, ranks = [], []
    for column in (projector @ keys.double()).T:
        energy = column.dot(column)
        residual = column - basis @ (basis.T @ column)
        residual = residual - basis @ (basis.T @ residual)
        share = (residual.dot(residual) / energy).item() if energy > 0 else 0.0
        if share > tol:
            basis = torch.cat([basis, (residual / residual.norm())[:, None]], dim=1)
        shares.append(share)
        ranks.append(basis.shape[1])
    return shares, ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--layers", help="comma-separated layers (default: every edited layer)")
    parser.add_argument("--window", type=int, default=250, help="edits per printed row")
    parser.add_argument("--data", help="data folder (default: the run's own, $DELTAEDIT_DATA)")
    args = parser.parse_args()

    with torch.no_grad():
        method = prepared_method(args.run_dir, args.data)
    p0 = {layer: projector.double() for layer, projector in method.projectors.items()}
    layers = [int(x) for x in args.layers.split(",")] if args.layers else sorted(p0)
    edits = Ledger(args.run_dir, create=False).active_edits()
    keys = {layer: [] for layer in layers}
    for entry in edits:
        tensors = entry.tensors(mapped=True)
        for layer in layers:
            keys[layer].append(tensors[f"layer.{layer}.keys"].float().clone())
    print(
        f"{args.run_dir.name}: {len(edits)} edits; free directions "
        + ", ".join(f"layer {layer} {method.preserved_dims(layer)}" for layer in layers)
    )
    columns = {layer: fresh_shares(torch.cat(keys[layer], dim=1), p0[layer]) for layer in layers}
    header = " | ".join(f"layer {layer} fresh share (rank)" for layer in layers)
    print(f"| edits | {header} |\n|---|" + "---:|" * len(layers))
    for start in range(0, len(edits), args.window):
        stop = min(start + args.window, len(edits))
        cells = []
        for layer in layers:
            shares, ranks = columns[layer]
            cells.append(f"{statistics.median(shares[start:stop]):.3f} ({ranks[stop - 1]})")
        print(f"| {start + 1}-{stop} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
