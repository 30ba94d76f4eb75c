#!/usr/bin/env bash
# The GPU check, ready for a machine with one (under 8 minutes on an H200): the tests marked for CUDA, then
# GPT-2-XL- and Llama-3-8B-sized models with random weights edited on the GPU (seconds per edit, peak memory,
# statistics per 1000 texts) and loaded with device_map="auto". Without a GPU it runs its CPU part: the same
# code path on shrunk shapes.
#
#     benchmarks/gpu_check.sh            # from the repository root, with .venv installed (make test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "== CUDA: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')"
  "$PY" -m pytest -q -m cuda tests
  "$PY" benchmarks/large_models.py --device cuda --stats-texts 1000 --edits 3
else
  echo "== no GPU here: the CPU part (the CUDA tests skip, shapes shrunk to 5%)"
  "$PY" -m pytest -q -m cuda tests || [ $? -eq 5 ]  # 5: every test deselected or skipped is fine here
  "$PY" benchmarks/large_models.py --device cpu --scale 0.05 --stats-texts 50 --edits 2
fi
