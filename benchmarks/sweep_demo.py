"""Small sweep of method settings on the demo edit set: edits that hold, controls kept, time per edit.

Each variant is a set of ``NAME=VALUE`` overrides separated by semicolons; every variant starts from the
unedited model and applies the demo edits one after another, as ``deltaedit demo`` does.

    DELTAEDIT_DATA=../shared/data python benchmarks/sweep_demo.py "" "nullspace_threshold=0.005" \
        "layers=[4,5,6,7,8]"
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources

import yaml

from deltaedit.editor import Editor
from deltaedit.models import load_model
from deltaedit.predict import score_answers
from deltaedit.requests import EditRequest


def parse_variant(text: str) -> dict:
    values = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, value = item.split("=", 1)
        values[name.strip()] = yaml.safe_load(value)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+", help="overrides like 'eta=2;nullspace_threshold=0.01' ('' = defaults)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="deltaedit")
    parser.add_argument("--data")
    args = parser.parse_args()
    demo = json.loads(resources.files("deltaedit").joinpath("resources/demo_edits.json").read_text())
    requests = [EditRequest.from_dict(item) for item in demo["edits"]]
    controls = demo["controls"]
    model, tokenizer = load_model(args.model)
    columns = "variant | edits held | controls kept | s/edit | mean steps | triggered | controls lost | edits not held"
    print(columns, flush=True)
    for text in args.variants:
        editor = Editor(
            model, tokenizer, method=args.method, config=parse_variant(text), data_dir=args.data, progress=False
        )
        parts = editor.parts
        prompts, answers = [c["prompt"] for c in controls], [c["answer"] for c in controls]
        before = score_answers(model, parts, tokenizer, prompts, answers)
        editor.prepare()
        started = time.perf_counter()
        results = [r for request in requests for r in editor.edit(request)]
        seconds = (time.perf_counter() - started) / len(requests)
        final = score_answers(model, parts, tokenizer, [r.text for r in requests], [r.target_new for r in requests])
        held = sum(s.greedy for s in final)
        dropped = [f"{r.subject} -> {r.target_new}" for r, s in zip(requests, final, strict=True) if not s.greedy]
        after = score_answers(model, parts, tokenizer, prompts, answers)
        kept = sum(a.greedy and b.greedy for a, b in zip(before, after, strict=True))
        known = sum(a.greedy for a in before)
        steps = sum(r.steps for r in results) / len(results)
        lost = [c["prompt"] for c, a, b in zip(controls, before, after, strict=True) if a.greedy and not b.greedy]
        print(
            f"{text or 'defaults'} | {held}/{len(requests)} | {kept}/{known} | {seconds:.1f} | {steps:.1f} | "
            f"{sum(r.triggered for r in results)} | {'; '.join(lost)} | {'; '.join(dropped)}",
            flush=True,
        )
        editor.restore()


if __name__ == "__main__":
    main()
