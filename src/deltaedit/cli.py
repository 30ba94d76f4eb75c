"""Command line: ``deltaedit edit``, ``demo``, ``config``, ``run``, ``log``, ``undo``, ``export``, ``generate``,
``report``, ``stats``, ``download``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .methods import METHODS
from .tracking import TRACKERS, flatten

log = logging.getLogger("deltaedit")


def _parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars or lists: 3, 0.5, true, [4,5,6], 1e-3 (each then converted to its
    option's type by ``coerce_overrides``, which also reads YAML 1.1's string "1e-3" as a number)."""
    return yaml.safe_load(text)


def set_values(items: list[str], config_class) -> dict[str, Any]:
    """``--set NAME=VALUE`` items as options, each converted to its option's type (also for benchmarks)."""
    from .defaults import coerce_overrides

    values: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set: expected NAME=VALUE, got {item!r}")
        name, value = item.split("=", 1)
        try:
            parsed = {name.strip(): _parse_value(value)}
        except yaml.YAMLError:
            raise SystemExit(
                f"--set {name.strip()}: cannot read {value!r}; give a number, true/false, a string or a list: [4,5,6]"
            ) from None
        values.update(coerce_overrides(parsed, config_class, where=f" in --set {item!r}"))
    return values


def _overrides(args) -> dict[str, Any]:
    """``--config`` then ``--set`` values, each converted to its option's type (a bad value fails here, before
    the model is loaded)."""
    from .defaults import preset_values, read_overrides
    from .methods import method_class

    preset_values(method_class(args.method), args.preset)  # an unknown preset fails here, before loading
    config_class = method_class(args.method).config_class
    values: dict[str, Any] = {}
    if args.config:
        values.update(read_overrides(args.config, args.method))
    values.update(set_values(args.set or [], config_class))
    options = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - options)
    if unknown:
        raise ValueError(f"{unknown[0]}: not an option of {args.method}; options: {', '.join(sorted(options))}")
    _check_layers(args.model, values.get("layers"))
    return values


def _check_layers(model: str, layers) -> None:
    """Layers beyond the model's depth are refused from its config, before the weights load."""
    if not layers:
        return
    from .models import model_config

    config = model_config(model)
    depth = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    bad = [layer for layer in layers if depth is not None and not 0 <= int(layer) < depth]
    if bad:
        raise ValueError(f"layers: {bad} out of range for {model}, which has {depth} layers (0 to {depth - 1})")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="Hugging Face id, local directory or 'smollm2-135m'")
    parser.add_argument("--method", default="deltaedit", choices=sorted(METHODS))
    parser.add_argument("--preset", help="named option set of the method (deltaedit: paper, research); default: none")
    parser.add_argument("--config", help="YAML or JSON file of method options")
    parser.add_argument("--set", action="append", metavar="NAME=VALUE", help="override one method option")
    parser.add_argument("--data", help="data folder (default $DELTAEDIT_DATA); Wikipedia there feeds key statistics")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    parser.add_argument("--dtype", help="float32, float16 or bfloat16 (solves always run in float32)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    parser.add_argument(
        "--threads",
        type=_positive_int,
        help="CPU threads for torch (default: torch's choice); 1 per process is fastest when runs share a machine",
    )


def _whole_numbers(text: str, example: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected whole numbers separated by commas, e.g. {example}; got {text!r}"
        ) from None


def _int_list(text: str) -> list[int]:
    return _whole_numbers(text, "3,4,5")


def _checkpoint_list(text: str) -> tuple[int, ...]:
    points = tuple(_whole_numbers(text, "50,100,200"))
    if not points or min(points) < 1:
        raise argparse.ArgumentTypeError(f"expected edit counts of at least 1, e.g. 50,100,200; got {text!r}")
    return points


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text}")
    return value


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

    run = sub.add_parser("run", help="edit a dataset's records one after another into a run directory")
    _common(run)
    run.add_argument("--dataset", default="counterfact", help="counterfact, zsre, ... or a .json/.jsonl/.csv file")
    run.add_argument(
        "--n-edits",
        type=_positive_int,
        help="edit the first N records (default 100); with --resume, extend the run to N",
    )
    run.add_argument("--out", required=True, help="run directory (the ledger, metrics.json, baseline.json)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--on-error",
        choices=("stop", "skip"),
        default="stop",
        help="a record that cannot be edited stops the run (default) or is skipped and logged",
    )
    run.add_argument(
        "--checkpoints",
        type=_checkpoint_list,
        help="comma-separated edit counts to evaluate at (default 50,100,...,3000)",
    )
    run.add_argument("--eval-batch-size", type=int, default=32)
    run.add_argument(
        "--health",
        action="store_true",
        help="also measure model health at every checkpoint: general capability, fluency, perplexity, representations",
    )
    run.add_argument("--health-examples", type=_positive_int, help="examples per general-capability task (100)")
    run.add_argument("--health-known", type=_positive_int, help="factual prompts for the representations (1000)")
    run.add_argument(
        "--tracker",
        choices=TRACKERS,
        help="log per-edit figures and checkpoint metrics (needs deltaedit[tensorboard] or deltaedit[wandb])",
    )
    run.add_argument(
        "--chat", action="store_true", help="edit and evaluate every prompt through the tokenizer's chat template"
    )
    run.add_argument("--resume", action="store_true", help="continue the run in --out after a crash or kill")
    run.add_argument(
        "--targets",
        metavar="FILE",
        help="reuse the target vectors of a run of the same stream, method and config "
        "(`deltaedit export RUN --targets-only`): its edits skip the search, same results",
    )
    run.add_argument("--force", action="store_true", help="replace an existing run in --out")

    log_cmd = sub.add_parser("log", help="list the edits, undos and rejections of a run")
    log_cmd.add_argument("run_dir")
    log_cmd.add_argument("--json", action="store_true", help="the raw index lines")

    undo = sub.add_parser("undo", help="take edits of a run back (recorded in its ledger)")
    undo.add_argument("run_dir")
    target = undo.add_mutually_exclusive_group(required=True)
    target.add_argument("--edit", type=int, help="undo this one edit")
    target.add_argument("--to", type=int, help="undo every edit after this one (-1: all)")
    _runtime(undo)

    export = sub.add_parser("export", help="save a run's edited model, or only its edits")
    export.add_argument("run_dir")
    export.add_argument("--out", required=True, help="a Hugging Face model directory, or a .safetensors file")
    only = export.add_mutually_exclusive_group()
    only.add_argument("--edits-only", action="store_true", help="write the edits alone (small) to --out")
    only.add_argument(
        "--targets-only",
        action="store_true",
        help="write each edit's target vector (2 kB an edit) to --out, for `deltaedit run --targets`",
    )
    export.add_argument("--force", action="store_true", help="overwrite --out")
    export.add_argument("--push-to-hub", metavar="REPO", help="also upload the model and its card to this Hub repo")
    _runtime(export)

    generate = sub.add_parser("generate", help="continue prompts with a run's unedited and edited model, side by side")
    generate.add_argument("run_dir")
    generate.add_argument("--prompt", action="append", required=True, help="a prompt to continue (repeatable)")
    generate.add_argument("--tokens", type=_positive_int, default=40, help="tokens to generate (greedy)")
    _runtime(generate)

    report = sub.add_parser("report", help="Table 1 and plots from one or more run directories")
    report.add_argument("run_dirs", nargs="+")
    report.add_argument("--out", required=True, help="folder for report.md and the PNG plots")
    report.add_argument("--at", type=_positive_int, help="read every run at this checkpoint (default: each run's last)")
    report.add_argument(
        "--rows",
        choices=("name", "method"),
        default="name",
        help="label Table 1's rows by run name, or by method (a CounterFact and a zsRE run share a row)",
    )

    stats = sub.add_parser("stats", help="key statistics: compute, list, export and import them")
    verbs = stats.add_subparsers(dest="stats_command", required=True)
    compute = verbs.add_parser("compute", help="compute (or finish) the key statistics of a model's layers")
    compute.add_argument("--model", default="smollm2-135m")
    compute.add_argument("--layers", type=_int_list, help="layers (default: the model's deltaedit layers)")
    compute.add_argument("--corpus", help="a text/JSONL file or folder (default: Wikipedia in the data folder)")
    compute.add_argument("--samples", type=_positive_int, help="texts read (default: the model's default, 2000)")
    compute.add_argument("--max-length", type=_positive_int, help="tokens per text (default 128)")
    compute.add_argument("--batch-size", type=_positive_int, default=16, help="texts per forward pass (memory)")
    _runtime(compute)
    compute.add_argument("--dtype", help="float32, float16 or bfloat16: statistics are kept per dtype")
    compute.add_argument("--threads", type=_positive_int, help="CPU threads for torch")
    listing = verbs.add_parser("list", help="list the cached key statistics")
    listing.add_argument("--model", help="only this model's (loads it to read its fingerprint)")
    listing.add_argument("--quiet", action="store_true")
    export_stats = verbs.add_parser("export", help="write cached statistics to one safetensors file")
    export_stats.add_argument("--model", default="smollm2-135m")
    export_stats.add_argument("--layers", type=_int_list, help="layers (default: every cached layer of the model)")
    export_stats.add_argument("--samples", type=_positive_int, help="only statistics of this many texts")
    export_stats.add_argument("--out", required=True, help="the .safetensors file to write")
    import_stats = verbs.add_parser("import", help="add statistics exported elsewhere to this machine's cache")
    import_stats.add_argument("file")
    import_stats.add_argument("--model", default="smollm2-135m", help="the model they must have been computed on")
    import_stats.add_argument("--layers", type=_int_list, help="refuse a file without exactly these layers")
    for verb in (export_stats, import_stats):
        verb.add_argument("--device", help="where to load the model (its fingerprint is read from it)")
        verb.add_argument("--dtype", help="the model's dtype (statistics are kept per dtype)")
        verb.add_argument("--quiet", action="store_true")

    download = sub.add_parser("download", help="fetch a dataset from its public home into the data folder")
    download.add_argument("name", help="counterfact or zsre")
    download.add_argument("--data", help="data folder (default $DELTAEDIT_DATA)")
    return parser


def _runtime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="data folder (default $DELTAEDIT_DATA)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _quiet_transformers(quiet: bool) -> None:
    """transformers' warnings off; with --quiet its progress bars ("Loading weights") too."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    if quiet:
        transformers.utils.logging.disable_progress_bar()


def _load(args):
    from .editor import Editor
    from .models import load_model

    _quiet_transformers(args.quiet)
    overrides = _overrides(args)  # before loading the model: a typo in --set fails at once
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    log.info("loaded %s in %.1f s on %s", args.model, time.perf_counter() - started, model.device)
    editor = Editor(
        model,
        tokenizer,
        method=args.method,
        config=overrides,
        preset=args.preset,
        data_dir=args.data,
        progress=not args.quiet,
    )
    return editor


def cmd_config(args) -> int:
    from .methods import method_class

    editor = _load(args)
    print(json.dumps(editor.config.to_dict(), indent=2))
    names = ", ".join(["default", *method_class(args.method).presets])
    print(f"presets of {args.method}: {names} (show one with --preset NAME)", file=sys.stderr)
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
    decisions = [editor.applied[-1].decision]
    said = editor.method.summary(decisions)
    print(
        f"{args.method}: {result.steps} steps, P(target)={result.target_prob:.3f}, {result.seconds:.1f} s"
        + (f"; {said}" if said else "")
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
    for request in tqdm(requests, desc=f"editing with {args.method}", disable=args.quiet, unit="edit"):
        editor.edit(request)
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
    said = editor.method.summary([a.decision for a in editor.applied])
    print(f"\nedits that are the greedy prediction after all {len(requests)} edits: {hits}/{len(requests)}")
    print(f"control prompts that kept their answer: {kept}/{known}")
    print(
        f"method {args.method}: {said + '; ' if said else ''}"
        f"statistics {stats_seconds:.0f} s, editing {edit_seconds:.0f} s "
        f"({edit_seconds / max(len(requests), 1):.1f} s per edit)"
    )
    ok = hits >= 0.9 * len(requests) and kept >= 0.9 * known
    return 0 if ok else 1


def cmd_run(args) -> int:
    from .run import RunError, RunSpec, run

    _quiet_transformers(args.quiet)
    spec = None
    if args.resume:
        fixed = _options_fixed_by_the_run(args)
        if fixed:
            raise RunError(
                f"--resume continues the run as its run.json describes it: drop {', '.join(fixed)} "
                "(--n-edits N extends the run to N records)"
            )
    else:
        checkpoints = RunSpec.checkpoints if args.checkpoints is None else args.checkpoints
        spec = RunSpec(
            model=args.model,
            method=args.method,
            dataset=args.dataset,
            n_edits=RunSpec.n_edits if args.n_edits is None else args.n_edits,
            overrides=_overrides(args),
            preset=args.preset,
            health=args.health,
            tracker=args.tracker,
            chat=args.chat,
            health_options={
                name: value
                for name, value in (("examples", args.health_examples), ("known", args.health_known))
                if value is not None
            },
            seed=args.seed,
            on_error=args.on_error,
            checkpoints=checkpoints,
            eval_batch_size=args.eval_batch_size,
            device=args.device,
            dtype=args.dtype,
        )
    extend = args.n_edits if args.resume else None
    document = run(
        args.out,
        spec,
        data_dir=args.data,
        resume=args.resume,
        force=args.force,
        progress=not args.quiet,
        n_edits=extend,
        targets=args.targets,
    )
    if document["checkpoints"]:
        print("\n".join(checkpoint_summary(document["checkpoints"][-1])))
    print(f"run written to {args.out}")
    return 0


def checkpoint_summary(checkpoint: dict[str, Any]) -> list[str]:
    """One line per metric group; nested groups (model health's per-task and per-layer figures) as "a/b", the
    case study's texts left out."""
    lines = []
    for kind, values in checkpoint["metrics"].items():
        if not isinstance(values, dict):
            continue
        shown = ", ".join(f"{name} {value:.4g}" for name, value in flatten(values).items())
        lines.append(f"{kind} after {checkpoint['n_edits']} edits: {shown}")
    return lines


# the options a --resume takes; every other option of `deltaedit run` is fixed by run.json
_RESUME_OPTIONS = {"command", "out", "resume", "n_edits", "data", "quiet", "threads", "targets"}


def _options_fixed_by_the_run(args) -> list[str]:
    """The options given with --resume that run.json fixes (they would otherwise be silently ignored)."""
    defaults = vars(build_parser().parse_args(["run", "--out", args.out]))
    fixed = [name for name, value in defaults.items() if name not in _RESUME_OPTIONS and getattr(args, name) != value]
    return ["--" + name.replace("_", "-") for name in fixed]


def cmd_log(args) -> int:
    from .ledger import Ledger

    ledger = Ledger(args.run_dir, create=False)
    ledger.require_manifest()
    entries = ledger.entries()
    ledger.check_complete(entries)
    for entry in entries:
        data = entry.data
        if args.json:
            print(json.dumps(data))
            continue
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.time))
        if entry.kind == "edit":
            request = data["requests"][0]
            text = request["prompt"].replace("{}", request["subject"])
            result, decision = data["result"], data["decision"]
            more = f" (+{len(data['requests']) - 1} in batch)" if len(data["requests"]) > 1 else ""
            print(
                f"{stamp}  edit {data['edit_id']:>5}  {text!r} -> {request['target_new']!r}{more}  "
                f"p={result['target_prob']:.2f} {'ok' if result['success'] else 'MISS'} "
                f"{'triggered' if decision['triggered'] else ''}"
            )
        elif entry.kind == "rejected":
            print(f"{stamp}  rejected    {data.get('field') or ''}: {data['reason']}")
        else:
            print(f"{stamp}  {entry.kind:<6} {data.get('edit_ids', '')}")
    return 0


def _resume_run(args):
    from .editor import Editor
    from .run import open_base_model, resume_data_dir

    _quiet_transformers(args.quiet)
    data_dir = resume_data_dir(args.run_dir, args.data)  # the run's own data folder: the same key statistics
    model, tokenizer = open_base_model(args.run_dir, device=args.device)
    # undo and export need the weights, not the method's state: no key statistics are computed or read
    return Editor.resume(args.run_dir, model, tokenizer, weights_only=True, data_dir=data_dir, progress=not args.quiet)


def cmd_undo(args) -> int:
    editor = _resume_run(args)
    if args.edit is not None:
        editor.undo(args.edit)
        print(f"undid edit {args.edit}; {len(editor.applied)} edits remain in force")
    else:
        undone = editor.undo_to(None if args.to < 0 else args.to)
        print(f"undid {len(undone)} edits; {len(editor.applied)} remain in force")
    return 0


def cmd_export(args) -> int:
    if args.push_to_hub:
        from .card import check_hub

        check_hub(args.push_to_hub)  # offline, no token: refused before anything loads or is written
    out = Path(args.out)
    if args.targets_only:
        return _export_targets(args, out)
    editor = _resume_run(args)
    if args.edits_only:
        from .edits_file import read_edits_file

        _check_replaceable(out, args.force, read_edits_file, "edits")
        path = editor.save_edits(out)
        print(f"{len(editor.applied)} edits saved to {path} ({path.stat().st_size / 1e6:.2f} MB)")
    else:
        from .card import last_checkpoint

        metrics = last_checkpoint(args.run_dir)
        path = editor.save_pretrained(out, overwrite=args.force, metrics=metrics)
        print(f"edited model ({len(editor.applied)} edits) and its model card saved to {path}")
        if args.push_to_hub:
            from .card import push_folder

            print(f"uploaded to {push_folder(path, args.push_to_hub)}")
    return 0


def _check_replaceable(out: Path, force: bool, read, kind: str) -> None:
    """An existing ``out`` is overwritten only with --force, and only if it is a file of this ``kind``."""
    from .ledger import LedgerError

    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    if out.exists():
        try:
            read(out)
        except LedgerError:
            raise FileExistsError(f"{out}: not a deltaedit {kind} file; --force only replaces one") from None


def _export_targets(args, out: Path) -> int:
    """The run's target vectors, read from its ledger: no model is loaded."""
    from .ledger import Ledger
    from .targets_file import RecordedTargets, write_targets_file

    if args.push_to_hub:
        raise ValueError("--push-to-hub: a targets file is not a model; drop --targets-only to push the model")
    _check_replaceable(out, args.force, RecordedTargets.read, "targets")
    ledger = Ledger(args.run_dir, create=False)
    count = write_targets_file(out, ledger.require_manifest(), ledger.entries())
    print(f"target vectors of {count} edits saved to {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


def cmd_generate(args) -> int:
    """The case study of a run: each prompt's greedy continuation by the unedited and by the edited model."""
    from .editor import Editor
    from .health import generate
    from .run import open_base_model, resume_data_dir

    _quiet_transformers(args.quiet)
    data_dir = resume_data_dir(args.run_dir, args.data)
    model, tokenizer = open_base_model(args.run_dir, device=args.device)
    before = generate(model, tokenizer, args.prompt, args.tokens)
    editor = Editor.resume(args.run_dir, model, tokenizer, weights_only=True, data_dir=data_dir, progress=False)
    editor.close()  # reads the run, writes nothing
    after = generate(editor.model, tokenizer, args.prompt, args.tokens)
    for prompt, old, new in zip(args.prompt, before, after, strict=True):
        print(f"prompt:   {prompt}")
        print(f"unedited: {' '.join(old.split())}")
        print(f"edited:   {' '.join(new.split())}  ({len(editor.applied)} edits)\n")
    return 0


def cmd_stats(args) -> int:
    """deltaedit stats compute / list / export / import (stats.py)."""
    from . import stats as stats_module
    from .models import find_parts, fingerprint, load_model

    if args.stats_command == "list":
        wanted = None
        if args.model:
            _quiet_transformers(True)
            wanted = fingerprint(load_model(args.model, device="cpu")[0])
        entries = stats_module.list_entries(fingerprint=wanted)
        print(
            f"{'model':<17} {'layer':>5} {'corpus':<12} {'samples':>7} {'tokens':>8} {'length':>6} {'dtype':<14} file"
        )
        for e in entries:
            print(
                f"{e.model:<17} {e.layer:>5} {Path(e.corpus).name[:12]:<12} {e.samples:>7} {e.tokens:>8} "
                f"{e.max_length:>6} {e.dtype:<14} {e.path.name}"
            )
        print(f"{len(entries)} cached in {stats_module.default_store()}")
        return 0
    _quiet_transformers(args.quiet)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    parts = find_parts(model)
    mark = fingerprint(model)
    if args.stats_command == "compute":
        from .corpus import resolve_corpus
        from .defaults import default_config
        from .methods import method_class

        config = default_config(model, method_class("deltaedit"))
        layers = args.layers or list(config.layers)
        _check_layers(args.model, layers)
        corpus = resolve_corpus(args.corpus, args.data)
        samples, length = args.samples or config.stats_samples, args.max_length or config.stats_max_length
        stats_module.second_moments(
            model, parts, tokenizer, layers, corpus, samples, length, mark, config.seed, args.batch_size, not args.quiet
        )
        print(f"key statistics of layers {layers} ({corpus.name}, {samples} texts of {length} tokens) are cached")
        return 0
    if args.stats_command == "export":
        entries = [e for e in stats_module.list_entries(fingerprint=mark) if args.samples in (None, e.samples)]
        if args.layers:
            entries = [e for e in entries if e.layer in args.layers]
        per_layer: dict[int, list] = {}
        for entry in entries:
            per_layer.setdefault(entry.layer, []).append(entry)
        several = {layer: found for layer, found in per_layer.items() if len(found) > 1}
        if several:
            layer, found = next(iter(several.items()))
            kinds = ", ".join(f"{e.corpus} {e.samples} texts of {e.max_length}" for e in found)
            raise ValueError(
                f"--samples: layer {layer} has several cached statistics ({kinds}); name one with --samples"
            )
        path = stats_module.export_bundle(entries, args.out)
        print(f"statistics of layers {sorted(per_layer)} written to {path}")
        return 0
    written = stats_module.import_bundle(args.file, mark, parts.d_ff, args.layers)
    print(f"imported the statistics of layers {[e.layer for e in written]} for this model into the cache")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    path = write_report(args.run_dirs, args.out, at=args.at, rows=args.rows)
    print(f"report written to {path}")
    return 0


def cmd_download(args) -> int:
    from .data import DATA_ENV, data_folder, download

    folder = data_folder(args.data)
    if not folder:
        raise ValueError(f"--data: name the data folder to download into (or set {DATA_ENV})")
    path = download(args.name, folder)
    print(f"{args.name} saved to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "quiet", False))
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    from .card import HubError
    from .editor import EditError
    from .ledger import LedgerError
    from .models import ModelLoadError
    from .requests import RequestError

    handlers = {
        "edit": cmd_edit,
        "demo": cmd_demo,
        "config": cmd_config,
        "run": cmd_run,
        "log": cmd_log,
        "undo": cmd_undo,
        "export": cmd_export,
        "generate": cmd_generate,
        "stats": cmd_stats,
        "report": cmd_report,
        "download": cmd_download,
    }
    try:
        return handlers[args.command](args)
    except (EditError, RequestError, ModelLoadError, LedgerError, HubError, ValueError, OSError, ImportError) as error:
        print(f"deltaedit {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
