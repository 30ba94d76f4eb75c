"""How much of each edit's target residual the written update realizes, for edits that hold and those that don't.

A locate-then-edit method first finds the residual ``delta`` that, added to the critical block's output at
the subject's last token, makes the model say the new target; then it spreads it over the edited layers and
solves for the weight updates. An edit that does not hold right after it is made either had no good
``delta`` (the optimizer ran out of steps) or lost it in the spread and solve. This script edits the first N
records of counterfact-val one after another and, after each, reads the critical block's output on the bare
prompt again: ``realized`` is ``(z_after - z_before) . delta / |delta|^2`` (1: all of it), ``miss`` is
``|z_before + delta - z_after| / |delta|``. Prints per-edit rows and the medians; asserts nothing.

    DELTAEDIT_DATA=../shared/data python benchmarks/realized.py --n-edits 50 [--method alphaedit] [--set l2=1]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import yaml

import deltaedit.methods.locate as locate
from deltaedit import Editor, load_model
from deltaedit.data import load_records
from deltaedit.target import read_keys


def parse(item: str) -> tuple[str, object]:
    name, value = item.split("=", 1)
    return name.strip(), yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-edits", type=int, default=50)
    parser.add_argument("--method", default="alphaedit")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="counterfact-val")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    editor = Editor(model, tokenizer, method=args.method, config=dict(parse(item) for item in args.set), progress=False)
    critical = editor.config.critical_layer
    found = []
    optimize = locate.optimize_target

    def recording(*positional, **named):
        result = optimize(*positional, **named)
        found.append(result)
        return result

    locate.optimize_target = recording  # this process only: the residual each edit was built from
    rows = []
    for record in load_records(args.dataset, None, limit=args.n_edits).records:
        request = record.request
        found.clear()
        result = editor.edit(request)[0]
        delta, z_before = found[0].delta.float(), found[0].z_init.float()
        z_after = (
            read_keys(model, editor.parts, tokenizer, [request], [""], [], critical, key_average="flat").z[:, 0].float()
        )
        realized = float((z_after - z_before) @ delta / delta.dot(delta))
        miss = float((z_before + delta - z_after).norm() / delta.norm())
        rows.append((result.success, result.steps, found[0].train_prob, result.target_prob, realized, miss))
        print(
            f"{len(rows):4d} held={result.success!s:5} steps={result.steps:2d} "
            f"P_train={found[0].train_prob:.2f} P_after={result.target_prob:.2f} "
            f"realized={realized:.2f} miss={miss:.2f}",
            flush=True,
        )
    print(f"\n{args.method} {' '.join(args.set)}: first {len(rows)} {args.dataset} records, one after another")
    print("| edits | n | median steps | median P(target) trained | after | median realized | median miss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, held in (("held when made", True), ("not held", False)):
        group = [r for r in rows if r[0] is held]
        if group:
            medians = [statistics.median(r[i] for r in group) for i in range(1, 6)]
            print(f"| {name} | {len(group)} | " + " | ".join(f"{m:.2f}" for m in medians) + " |")


if __name__ == "__main__":
    main()
