"""Join the metrics.json of a run measured in parts into one (``deltaedit.report.join_checkpoints``).

A run that could not be resumed where it stopped is carried on in a new directory of the same name with the
first part's targets file (``deltaedit run ... --targets T --checkpoints POINTS_STILL_MISSING``); this writes
the whole run's metrics.json, checking that the parts describe the same run and agree where they overlap.

    python benchmarks/join_metrics.py PART_DIR_OR_FILE [PART ...] --out docs/results/NAME/metrics.json
"""

from __future__ import annotations

import argparse

from deltaedit.report import RunFileError, join_checkpoints, read_metrics, write_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="+", help="run directories or metrics.json files, in any order")
    parser.add_argument("--out", required=True, help="the joined metrics.json (its folder is created)")
    args = parser.parse_args()
    try:
        joined = join_checkpoints([read_metrics(part) for part in args.parts])
    except RunFileError as error:
        raise SystemExit(f"join_metrics: {error}") from None
    path = write_metrics(args.out.removesuffix("metrics.json") or ".", joined)
    print(f"{path}: checkpoints {[c['n_edits'] for c in joined['checkpoints']]}")


if __name__ == "__main__":
    main()
