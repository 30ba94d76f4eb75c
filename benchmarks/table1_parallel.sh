#!/usr/bin/env bash
# Table 1 of docs/results.md in one go, for a machine with a GPU and many cores: the seven methods on the first N
# counterfact-edit records (with --health) and on the first N zsRE records, fourteen `deltaedit run` processes at
# once (JOBS at a time: 2 on a 2-core machine), one CPU thread each, sharing the GPU. A run folder already there is continued with --resume, so a stopped
# batch picks up where it was. Each run writes OUT/NAME/metrics.json at every checkpoint; `deltaedit report` and
# `deltaedit plot` read them.
#
#     DELTAEDIT_DATA=../shared/data benchmarks/table1_parallel.sh ~/deltaedit-runs/table1 500
#     METHODS="rome memit" DATASETS=zsre benchmarks/table1_parallel.sh OUT 500      # a subset
#     JOBS=2 benchmarks/table1_parallel.sh OUT 500                                    # without a GPU
set -euo pipefail
OUT=${1:?usage: table1_parallel.sh OUT [N]}
N=${2:-500}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
METHODS=${METHODS:-"ft rome memit prune rect alphaedit deltaedit"}
DATASETS=${DATASETS:-"counterfact zsre"}
CHECKPOINTS=${CHECKPOINTS:-50,100,200,300,400,500}
JOBS=${JOBS:-14}
mkdir -p "$OUT"
trap 'kill $(jobs -p) 2>/dev/null; wait' TERM INT

# The model's conversion and the shared key statistics once, before fourteen processes would queue for them.
"$PY" -m deltaedit.cli stats compute --quiet

for dataset in $DATASETS; do
  for method in $METHODS; do
    name=$method-${dataset/counterfact/cf}-$N
    if [ -f "$OUT/$name/run.json" ]; then
      args=(--out "$OUT/$name" --resume)
    else
      args=(--out "$OUT/$name" --method "$method" --dataset "$dataset" --n-edits "$N" --checkpoints "$CHECKPOINTS")
      [ "$dataset" = counterfact ] && args+=(--health)
    fi
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    "$PY" -m deltaedit.cli run --quiet --threads 1 "${args[@]}" > "$OUT/$name.log" 2>&1 &
  done
done
wait
