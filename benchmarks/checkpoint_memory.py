"""Peak resident memory of each phase of a run's checkpoint: evaluation, then each part of model health.

A long run sits near 1.3 GB between checkpoints and peaks during them (docs/performance.md); this says which
phase makes the peak. Each phase runs on the unedited model (what a phase allocates depends on batch shapes,
not on the edits), with the peak counter reset before it (Linux: /proc/self/clear_refs), and prints the
resident memory before it, its peak and its time. Prints figures; asserts nothing.

    DELTAEDIT_DATA=../shared/data python benchmarks/checkpoint_memory.py --records 500 --threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def peak_mb() -> float:
    """VmHWM: the highest resident memory since the last reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="counterfact")
    parser.add_argument("--records", type=int, default=500, help="records evaluated, as at that checkpoint")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from deltaedit.data import load_records
    from deltaedit.defaults import default_config
    from deltaedit.evaluate import baseline, evaluate_records
    from deltaedit.health import HealthProbe, probed_layers
    from deltaedit.memory import release_memory, resident_mb
    from deltaedit.methods import METHODS
    from deltaedit.models import find_parts, load_model
    from deltaedit.run import _kind

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    parts = find_parts(model)
    loaded = load_records(args.dataset, limit=args.records)
    records, kind = loaded.records, _kind(loaded.layout)
    critical = default_config(model, METHODS["deltaedit"]).critical_layer
    probe = HealthProbe(tokenizer, None, probed_layers(critical, parts.n_layers))  # the layers a run's probe reads
    base = baseline(model, parts, tokenizer, records, kind, batch_size=args.eval_batch_size)

    phases = {  # the parts of HealthProbe.measure, one at a time
        "evaluate records": lambda: evaluate_records(
            model, parts, tokenizer, records, base, kind, args.eval_batch_size
        ),
        "health: general capability": lambda: probe.general(model, parts),
        "health: fluency generations": lambda: probe.generations(model, records),
        "health: perplexity": lambda: probe.wikitext_perplexity(model, parts),
        "health: representations": lambda: probe.states(model),
    }
    batch = probe.settings.batch_size
    print(f"{args.model}, {len(records)} {kind} records, eval batch {args.eval_batch_size}, health batch {batch}")
    print("| phase | RSS before MiB | peak MiB | peak - before | seconds |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for name, run in phases.items():
            release_memory()
            before = resident_mb()
            reset_peak()
            started = time.perf_counter()
            run()
            seconds = time.perf_counter() - started
            peak = peak_mb()
            print(f"| {name} | {before:.0f} | {peak:.0f} | {peak - before:.0f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
