"""What share of the CPU's matrix-multiply peak one optimizer step of the target vector reaches.

One step (forward of the suffix tokens through the blocks above the critical one, the unembedding of the
positions read, backward) is timed as (T(10 steps) - T(0 steps)) / 10 of ``optimize_target``, so the
once-per-edit work cancels. Its floating-point operations are counted the same way with torch's
``FlopCounterMode``, and every matrix multiply it runs is recorded by shape; the same multiplies are then
timed alone on random tensors (plain ``torch.mm`` / ``bmm`` / ``addmm``). The ratio of the two times is the share of
the step that is matrix-multiply work at the speed the library reaches on those shapes. Timed alone, each
multiply reuses its tensors, which then sit in the cache; in a step every weight matrix is read from memory
(the blocks' and the unembedding's weights are far larger than the cache), once forward and once backward.
So the same multiplies are also timed once through, in one pass with a tensor of their own each
("streamed"): what the multiplies cost when their operands come from memory as in the step. Last, a
profile of 10 steps on one thread gives the time of the multiplies inside the step by shape, with the
layouts the step really uses. Prints figures; asserts nothing.

    DELTAEDIT_DATA=../shared/data python benchmarks/step_peak.py [--threads 1 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from speed_parts import timed  # noqa: E402

from deltaedit.editor import Editor  # noqa: E402
from deltaedit.models import find_parts, load_model  # noqa: E402
from deltaedit.requests import EditRequest  # noqa: E402
from deltaedit.target import optimize_target  # noqa: E402

MATMULS = {"mm", "bmm", "addmm", "baddbmm"}


class MatmulShapes(TorchDispatchMode):
    """Records (op, input shapes) of every matrix multiply dispatched."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATMULS:
            self.calls[(name, tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))] += 1
        return func(*args, **(kwargs or {}))


def matmul_flops(name: str, shapes: tuple) -> int:
    if name in ("mm", "addmm"):
        (m, k), (_, n) = shapes[-2], shapes[-1]
        return 2 * m * k * n
    (b, m, k), (_, _, n) = shapes[-2], shapes[-1]
    return 2 * b * m * k * n


def plain_matmul_ms(name: str, shapes: tuple) -> float:
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=generator) for s in shapes]
    op = getattr(torch, name)
    return timed(lambda: op(*tensors), 20)


def streamed_matmul_ms(per_step: dict, repeats: int = 3) -> tuple[float, float]:
    """One pass over every multiply of a step, each with tensors of its own (so none is in the cache when it
    runs): the median time of ``repeats`` passes in ms, and the megabytes the pass reads."""
    generator = torch.Generator().manual_seed(0)
    calls = []
    for (name, shapes), count in per_step.items():
        for _ in range(round(count)):
            calls.append((getattr(torch, name), [torch.randn(s, generator=generator) for s in shapes]))
    megabytes = sum(t.numel() * t.element_size() for _, tensors in calls for t in tensors) / 1e6

    def one_pass():
        for op, tensors in calls:
            op(*tensors)

    return timed(one_pass, repeats), megabytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", help="data folder (default $DELTAEDIT_DATA)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    parts = find_parts(model)
    editor = Editor(model, tokenizer, method="deltaedit", data_dir=args.data, progress=False)
    config, contexts = editor.config, editor.contexts
    request = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
    settings = {n: dataclasses.replace(config.target_settings(), steps=n, stop_prob=1.0) for n in (0, 10)}

    def run(n: int):
        return optimize_target(model, parts, tokenizer, request, contexts, config.critical_layer, settings[n])

    counted = {}
    for n in (0, 10):
        with FlopCounterMode(display=False) as flops, MatmulShapes() as shapes:
            run(n)
        counted[n] = (flops.get_total_flops(), shapes.calls)
    step_flops = (counted[10][0] - counted[0][0]) / 10
    per_step = {key: (count - counted[0][1].get(key, 0)) / 10 for key, count in counted[10][1].items()}
    per_step = {key: c for key, c in per_step.items() if c > 0}
    mm_flops = sum(c * matmul_flops(*key) for key, c in per_step.items())
    print(f"model {args.model}; {len(contexts)} context prefixes; one step: {step_flops / 1e9:.2f} GFLOP counted, ")
    print(f"of which matrix multiplies {mm_flops / 1e9:.2f} GFLOP in {sum(per_step.values()):.0f} calls\n")
    print(
        "| threads | step ms | step GFLOP/s | same matmuls alone ms | matmul GFLOP/s | step / matmul-only "
        "| streamed ms | streamed MB | streamed GB/s | streamed / step |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        step_ms = (timed(lambda: run(10), args.repeats) - timed(lambda: run(0), args.repeats)) / 10
        alone_ms = sum(c * plain_matmul_ms(*key) for key, c in per_step.items())
        streamed_ms, megabytes = streamed_matmul_ms(per_step, args.repeats)
        print(
            f"| {threads} | {step_ms:.0f} | {step_flops / step_ms / 1e6:.1f} | {alone_ms:.0f} | "
            f"{mm_flops / alone_ms / 1e6:.1f} | {alone_ms / step_ms:.0%} | {streamed_ms:.0f} | {megabytes:.0f} | "
            f"{megabytes / streamed_ms:.1f} | {streamed_ms / step_ms:.0%} |",
            flush=True,
        )
    torch.set_num_threads(1)
    print("\nMatrix multiplies inside 10 steps and the once-per-edit work, one thread, by shape (torch.profiler):\n")
    print("| shapes | calls | ms | GFLOP/s |")
    print("|---|---:|---:|---:|")
    for shapes, calls, ms in profiled_matmuls(lambda: run(10)):
        gflops = matmul_flops("mm", shapes) * calls / ms / 1e6
        print(f"| {shapes[0]} x {shapes[1]} | {calls} | {ms:.1f} | {gflops:.1f} |")


def profiled_matmuls(fn) -> list[tuple[list, int, float]]:
    """(input shapes, calls, self ms) of every ``mm`` shape ``fn`` runs, most time first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    rows = [
        (event.input_shapes, event.count, event.self_cpu_time_total / 1000)
        for event in prof.key_averages(group_by_input_shape=True)
        if event.key == "aten::mm"
    ]
    return sorted(rows, key=lambda row: -row[2])


if __name__ == "__main__":
    main()
