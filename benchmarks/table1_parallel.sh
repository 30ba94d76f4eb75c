#!/usr/bin/env bash
# Table 1 of docs/results.md in one go: the seven methods on the first N counterfact-edit records (with --health)
# and on the first N zsRE records, one `deltaedit run` process each with one CPU thread, JOBS at a time (all
# fourteen at once on a machine with a GPU and many cores, 2 on a 2-core machine). A run folder already there
# is continued with --resume, so a stopped batch picks up where it was. Each run writes OUT/NAME/metrics.json
# at every checkpoint; `deltaedit report` reads them. Exits 1 naming the runs that failed.
#
#     DELTAEDIT_DATA=../shared/data benchmarks/table1_parallel.sh ~/deltaedit-runs/table1 500
#     METHODS="rome memit" DATASETS=zsre benchmarks/table1_parallel.sh OUT 500      # a subset
#     JOBS=2 benchmarks/table1_parallel.sh OUT 500                                    # without a GPU
set -euo pipefail
OUT=${1:?usage: table1_parallel.sh OUT [N]}
N=${2:-500}
PY=${PY:-.venv/bin/python}
command -v "$PY" >/dev/null || PY=python3
METHODS=${METHODS:-"ft rome memit prune rect alphaedit deltaedit"}
DATASETS=${DATASETS:-"counterfact zsre"}
# Checkpoints: the run default (50, 100, 200, 500, 1000, ...), the same x-axis as the longer AlphaEdit and
# DeltaEdit runs that Table 1 reads at N; with --health each checkpoint costs minutes, so extra ones are opt-in.
CHECKPOINTS=${CHECKPOINTS:-}
JOBS=${JOBS:-14}
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || { echo "JOBS must be a whole number >= 1, got '$JOBS'" >&2; exit 2; }
mkdir -p "$OUT"
trap 'trap - TERM INT; kill $(jobs -p) 2>/dev/null || true; wait; exit 130' TERM INT

# The model's conversion and the shared key statistics once, before the processes would queue for them.
"$PY" -m deltaedit.cli stats compute --quiet

declare -A pids
for dataset in $DATASETS; do
  for method in $METHODS; do
    name=$method-${dataset/counterfact/cf}-$N
    if [ -f "$OUT/$name/run.json" ]; then
      args=(--out "$OUT/$name" --resume)
    else
      args=(--out "$OUT/$name" --method "$method" --dataset "$dataset" --n-edits "$N")
      [ -n "$CHECKPOINTS" ] && args+=(--checkpoints "$CHECKPOINTS")
      [ "$dataset" = counterfact ] && args+=(--health)
    fi
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done  # failures are counted below
    "$PY" -m deltaedit.cli run --quiet --threads 1 "${args[@]}" >> "$OUT/$name.log" 2>&1 &
    pids[$name]=$!
  done
done
failed=()
for name in "${!pids[@]}"; do
  wait "${pids[$name]}" || failed+=("$name")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed (see OUT/NAME.log): ${failed[*]}" >&2
  exit 1
fi
