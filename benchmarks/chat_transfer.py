"""Do edits made on raw prompts hold when the facts are asked through the chat template, and the other way round?

Edits the first N records of counterfact-edit (``--dataset``) one after another, once with raw prompts and
once with every prompt in the tokenizer's chat template (deltaedit.chat), and after each stream asks both
forms: efficacy (the new target is the greedy answer to the edit prompt) and generalization (to the
paraphrases). Prints the 2 x 2 table; asserts nothing.

    DELTAEDIT_DATA=../shared/data python benchmarks/chat_transfer.py --n-edits 100 [--method deltaedit]
"""

from __future__ import annotations

import argparse
import time

import torch

from deltaedit import Editor, load_model
from deltaedit.chat import as_chat
from deltaedit.data import load_records
from deltaedit.models import find_parts
from deltaedit.predict import score_answers


def held(model, parts, tokenizer, requests, paraphrases: bool, answer: str = "target_new") -> float:
    """Share of the prompts (edit prompts, or paraphrases) whose greedy continuation starts with ``answer``."""
    prompts, answers = [], []
    for r in requests:
        for p in r.paraphrase_prompts if paraphrases else [r.text]:
            prompts.append(p)
            answers.append(getattr(r, answer))
    scores = score_answers(model, parts, tokenizer, prompts, answers)
    return sum(s.greedy for s in scores) / max(len(scores), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-edits", type=int, default=100)
    parser.add_argument("--method", default="deltaedit")
    parser.add_argument("--dataset", default="counterfact", help="counterfact (the reported split) or counterfact-val")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--unedited-only", action="store_true", help="only the unedited model's row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    raw = [r.request for r in load_records(args.dataset, None, limit=args.n_edits).records]
    forms = {"raw": raw, "chat": [as_chat(r, tokenizer) for r in raw]}
    parts = find_parts(model)
    print(f"unedited {args.model}, first {args.n_edits} {args.dataset} records: the true answer is greedy")
    print("| asked with | edit prompt | paraphrases |")
    print("|---|---:|---:|")
    for asked_as, queries in forms.items():
        prompt, paraphrase = (held(model, parts, tokenizer, queries, p, "target_true") for p in (False, True))
        print(f"| {asked_as} | {100 * prompt:.1f} | {100 * paraphrase:.1f} |", flush=True)
    print()
    if args.unedited_only:
        return
    rows = []
    for edited_as, requests in forms.items():
        editor = Editor(model, tokenizer, method=args.method, progress=False)
        started = time.perf_counter()
        for request in requests:
            editor.edit(request)
        seconds = (time.perf_counter() - started) / len(requests)
        for asked_as, queries in forms.items():
            efficacy = held(model, editor.parts, tokenizer, queries, paraphrases=False)
            generalization = held(model, editor.parts, tokenizer, queries, paraphrases=True)
            rows.append((edited_as, asked_as, efficacy, generalization, seconds))
        editor.undo_to(None)
    print(f"{args.method} on SmolLM2 ({args.model}), first {args.n_edits} {args.dataset} records, sequential")
    print("| edited with | asked with | efficacy (top) | generalization (top) | s/edit |")
    print("|---|---|---:|---:|---:|")
    for edited_as, asked_as, efficacy, generalization, seconds in rows:
        print(f"| {edited_as} | {asked_as} | {100 * efficacy:.1f} | {100 * generalization:.1f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
