"""Check the built-in demo edit set against the model it was written for.

Every ``target_true`` and control ``answer`` must be the model's greedy answer: under teacher forcing each
token of ``" " + answer`` is the argmax at its position. Every ``target_new`` must differ from the true
answer, be at most two tokens, and not already be the model's greedy answer. Control prompts must not
mention any edited subject.

    python benchmarks/check_demo_edits.py [MODEL_PATH]

Prints one row per item (the model's top-1 next token and its probability, the answer's probability)
and exits non-zero if any check fails.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_MODEL = "/root/.cache/smoltest"
EDITS_FILE = Path(__file__).resolve().parents[1] / "src/deltaedit/resources/demo_edits.json"
MAX_NEW_TOKENS = 2


@torch.no_grad()
def score(model, tokenizer, prompt: str, answer: str) -> dict:
    """Teacher-force ``prompt + " " + answer``; report whether every answer token is the argmax."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt + " " + answer, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(f"{prompt!r} does not tokenize as a prefix of its answer {answer!r}")
    answer_ids = full_ids[len(prompt_ids) :]
    probs = model(torch.tensor([full_ids])).logits[0].float().softmax(-1)
    steps = probs[len(prompt_ids) - 1 : len(full_ids) - 1]
    first = steps[0]
    return {
        "greedy": all(int(step.argmax()) == tok for step, tok in zip(steps, answer_ids, strict=True)),
        "n_tokens": len(answer_ids),
        "top1": tokenizer.decode([int(first.argmax())]),
        "p_top1": float(first.max()),
        "p_answer": float(first[answer_ids[0]]),
    }


def main(model_path: str = DEFAULT_MODEL) -> int:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    data = json.loads(EDITS_FILE.read_text())
    edits, controls = data["edits"], data["controls"]
    subjects = [e["subject"] for e in edits]

    rows, failures = [], []
    for e in edits:
        text = e["prompt"].replace("{}", e["subject"])
        true = score(model, tokenizer, text, e["target_true"])
        new = score(model, tokenizer, text, e["target_new"])
        problems = [
            "prompt needs exactly one {}" if e["prompt"].count("{}") != 1 else "",
            "target_true is not the greedy answer" if not true["greedy"] else "",
            "target_new equals target_true" if e["target_new"] == e["target_true"] else "",
            f"target_new is over {MAX_NEW_TOKENS} tokens" if new["n_tokens"] > MAX_NEW_TOKENS else "",
            "target_new is already the greedy answer" if new["greedy"] else "",
        ]
        note = f"new {e['target_new']!r} p={new['p_answer']:.3f}"
        rows.append(("edit", text, e["target_true"], true, note))
        failures += [f"edit {text!r}: {p}" for p in problems if p]
    if len(set(subjects)) != len(subjects):
        failures.append("edit subjects are not distinct")

    for c in controls:
        result = score(model, tokenizer, c["prompt"], c["answer"])
        touched = [s for s in subjects if s in c["prompt"]]
        problems = [
            "prompt holds a {} placeholder" if "{}" in c["prompt"] else "",
            "answer is not the greedy answer" if not result["greedy"] else "",
            f"mentions edited subject(s) {touched}" if touched else "",
        ]
        rows.append(("control", c["prompt"], c["answer"], result, ""))
        failures += [f"control {c['prompt']!r}: {p}" for p in problems if p]

    print(f"{'kind':8} {'prompt':52} {'answer':22} {'ok':3} {'top-1':14} {'p_top1':>6} {'p_ans':>6}  note")
    for kind, text, answer, r, note in rows:
        ok = "yes" if r["greedy"] else "NO"
        probs = f"{r['p_top1']:6.3f} {r['p_answer']:6.3f}"
        print(f"{kind:8} {text:52} {answer:22} {ok:3} {r['top1']!r:14} {probs}  {note}")
    print(f"\n{len(edits)} edits, {len(controls)} controls, {len(failures)} problem(s)")
    for failure in failures:
        print("  FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
