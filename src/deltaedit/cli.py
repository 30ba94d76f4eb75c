"""Command line: ``deltaedit edit``, ``deltaedit demo``, ``deltaedit config``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from importlib import resources
from typing import Any

import yaml

from .methods import METHODS

log = logging.getLogger("deltaedit")


def _parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars or lists: 3, 0.5, true, [4,5,6]."""
    return yaml.safe_load(text)


def _overrides(args) -> dict[str, Any]:
    from .defaults import read_overrides

    values: dict[str, Any] = {}
    if args.config:
        values.update(read_overrides(args.config))
    for item in args.set or []:
        if "=" not in item:
            raise SystemExit(f"--set: expected NAME=VALUE, got {item!r}")
        name, value = item.split("=", 1)
        values[name.strip()] = _parse_value(value)
    return values


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="Hugging Face id, local directory or 'smollm2-135m'")
    parser.add_argument("--method", default="deltaedit", choices=sorted(METHODS))
    parser.add_argument("--config", help="YAML or JSON file of method options")
    parser.add_argument("--set", action="append", metavar="NAME=VALUE", help="override one method option")
    parser.add_argument("--data", help="data folder (default $DELTAEDIT_DATA); Wikipedia there feeds key statistics")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    parser.add_argument("--dtype", help="float32, float16 or bfloat16 (solves always run in float32)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaedit", description="Sequential knowledge editing of causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    edit = sub.add_parser("edit", help="apply one edit and show predictions before and after")
    _common(edit)
    edit.add_argument("--prompt", required=True, help="template with {} for the subject")
    edit.add_argument("--subject", required=True)
    edit.add_argument("--target", required=True, help="the new answer")
    edit.add_argument("--top", type=int, default=5, help="how many predictions to show")

    demo = sub.add_parser("demo", help="apply the built-in counterfactual edits one after another")
    _common(demo)
    demo.add_argument("--limit", type=int, help="only the first N demo edits")

    config = sub.add_parser("config", help="print the effective method config for a model")
    _common(config)
    return parser


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _load(args):
    import torch
    import transformers

    from .editor import Editor
    from .models import load_model

    transformers.utils.logging.set_verbosity_error()
    if args.quiet:
        transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    log.info("loaded %s in %.1f s on %s", args.model, time.perf_counter() - started, model.device)
    editor = Editor(
        model, tokenizer, method=args.method, config=_overrides(args), data_dir=args.data, progress=not args.quiet
    )
    return editor


def cmd_config(args) -> int:
    editor = _load(args)
    print(json.dumps(editor.config.to_dict(), indent=2))
    return 0


def _show_top(editor, prompt: str, k: int) -> str:
    from .predict import top_tokens

    return "  ".join(
        f"{tok!r} {p:.3f}" for tok, p in top_tokens(editor.model, editor.parts, editor.tokenizer, prompt, k)
    )


def cmd_edit(args) -> int:
    from .requests import EditRequest

    request = EditRequest(args.prompt, args.subject, args.target)
    editor = _load(args)
    editor.validate([request])
    print(f"prompt: {request.text}")
    print(f"before: {_show_top(editor, request.text, args.top)}")
    editor.prepare()
    result = editor.edit(request)[0]
    print(f"after:  {_show_top(editor, request.text, args.top)}")
    print(
        f"{args.method}: {result.steps} steps, P(target)={result.target_prob:.3f}, "
        f"{'triggered' if result.triggered else 'no'} orthogonal constraint, {result.seconds:.1f} s"
    )
    return 0 if result.success else 1


def demo_set() -> dict[str, list[dict[str, str]]]:
    return json.loads(resources.files("deltaedit").joinpath("resources/demo_edits.json").read_text())


def cmd_demo(args) -> int:
    from tqdm.auto import tqdm

    from .predict import greedy_continuation, score_answers
    from .requests import EditRequest

    data = demo_set()
    requests = [EditRequest.from_dict(item) for item in data["edits"][: args.limit]]
    controls = data["controls"]
    editor = _load(args)
    editor.validate(requests)
    model, parts, tok = editor.model, editor.parts, editor.tokenizer

    def say(prompt: str) -> str:
        return greedy_continuation(model, parts, tok, prompt, 3).strip().split("\n")[0]

    before = [say(r.text) for r in requests]
    controls_before = score_answers(model, parts, tok, [c["prompt"] for c in controls], [c["answer"] for c in controls])
    started = time.perf_counter()
    editor.prepare()
    stats_seconds = time.perf_counter() - started
    results = []
    for request in tqdm(requests, desc=f"editing with {args.method}", disable=args.quiet, unit="edit"):
        results.extend(editor.edit(request))
    edit_seconds = time.perf_counter() - started - stats_seconds

    final = score_answers(model, parts, tok, [r.text for r in requests], [r.target_new for r in requests])
    controls_after = score_answers(model, parts, tok, [c["prompt"] for c in controls], [c["answer"] for c in controls])
    width = max(len(r.text) for r in requests)
    print(f"\n{'prompt':<{width}}  {'before':<22} {'after':<22} target      ok")
    for request, old, score in zip(requests, before, final, strict=True):
        print(
            f"{request.text:<{width}}  {old[:22]:<22} {say(request.text)[:22]:<22} "
            f"{request.target_new[:11]:<11} {'yes' if score.greedy else 'NO'}"
        )
    changed = [
        c for c, a, b in zip(controls, controls_before, controls_after, strict=True) if a.greedy and not b.greedy
    ]
    for control in changed:
        print(f"control lost its answer: {control['prompt']!r} -> now {say(control['prompt'])!r}")
    hits = sum(s.greedy for s in final)
    kept = sum(a.greedy == b.greedy for a, b in zip(controls_before, controls_after, strict=True) if b.greedy)
    known = sum(b.greedy for b in controls_before)
    triggered = sum(r.triggered for r in results)
    print(f"\nedits that are the greedy prediction after all {len(requests)} edits: {hits}/{len(requests)}")
    print(f"control prompts that kept their answer: {kept}/{known}")
    print(
        f"method {args.method}: orthogonal constraint triggered on {triggered} edits; "
        f"statistics {stats_seconds:.0f} s, editing {edit_seconds:.0f} s "
        f"({edit_seconds / max(len(requests), 1):.1f} s per edit)"
    )
    ok = hits >= 0.9 * len(requests) and kept >= 0.9 * known
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    from .models import ModelLoadError
    from .requests import RequestError

    handlers = {"edit": cmd_edit, "demo": cmd_demo, "config": cmd_config}
    try:
        return handlers[args.command](args)
    except (RequestError, ModelLoadError, ValueError, FileNotFoundError) as error:
        print(f"deltaedit {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
