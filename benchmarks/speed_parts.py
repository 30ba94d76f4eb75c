"""Before/after timing of each optimization of the editing loop, on the real model, one at a time.

Each line times the straightforward computation and the one deltaedit runs, on the same inputs, and prints
both (median of several repeats, milliseconds). Prints figures; asserts nothing.

    DELTAEDIT_DATA=../shared/data python benchmarks/speed_parts.py [--model smollm2-135m] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from contextlib import suppress

import torch

from deltaedit.corpus import resolve_corpus
from deltaedit.data import load_records
from deltaedit.editor import Editor
from deltaedit.evaluate import baseline, evaluate
from deltaedit.hooks import capture_inputs, run_until
from deltaedit.models import find_parts, load_model
from deltaedit.predict import final_logits
from deltaedit.requests import EditRequest
from deltaedit.target import optimize_target, read_keys
from deltaedit.tokens import pad, pad_id


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def report(name: str, before: float, after: float) -> None:
    print(f"| {name} | {before:.1f} | {after:.1f} | {before / after:.1f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", help="data folder (default $DELTAEDIT_DATA)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    parts = find_parts(model)
    editor = Editor(model, tokenizer, method="deltaedit", data_dir=args.data, progress=False)
    config, contexts = editor.config, editor.contexts
    request = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
    n = args.repeats
    print(f"torch threads: {torch.get_num_threads()}; model {args.model}; median of {n} runs after a warm-up\n")
    print("| computation | straightforward ms | deltaedit ms | speed-up |")
    print("|---|---|---|---|")

    # 1. target optimization: 10 Adam steps, full forward at every step vs prefix and lower blocks run once
    ten = dataclasses.replace(config.target_settings(), steps=10, stop_prob=1.0)  # always 10 steps
    full = timed(
        lambda: optimize_target(
            model, parts, tokenizer, request, contexts, config.critical_layer, ten, reuse_prefix=False
        ),
        n,
    )
    reused = timed(lambda: optimize_target(model, parts, tokenizer, request, contexts, config.critical_layer, ten), n)
    report("target vector, 10 optimizer steps (prefix + lower blocks once per edit)", full, reused)

    # 2. logits at every position vs only where the loss reads (one forward + backward of the target batch)
    texts = [c + request.text + " English" for c in contexts]
    batch = pad([tokenizer(t)["input_ids"] for t in texts], pad_id(tokenizer), parts.unembed.weight.device)
    last = batch.attention_mask.sum(1) - 1
    rows = torch.arange(len(texts))

    def step(every_position: bool) -> None:
        embeds = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
        hidden = model.base_model(inputs_embeds=embeds, attention_mask=batch.attention_mask).last_hidden_state
        if every_position:
            logits = final_logits(model, parts, hidden)[rows, last]
        else:
            logits = final_logits(model, parts, hidden[rows, last])
        torch.log_softmax(logits.float(), -1)[:, 0].sum().backward()

    report(
        "logits: every position vs the positions read (forward + backward)",
        timed(lambda: step(True), n),
        timed(lambda: step(False), n),
    )

    # 3. key statistics: the whole model vs stopping after the last edited layer (16 Wikipedia texts)
    corpus = resolve_corpus(config.stats_corpus, args.data)
    texts = []
    for text in corpus.texts():
        texts.append(text)
        if len(texts) == 16:
            break
    if texts:
        ids = [tokenizer(t, truncation=True, max_length=config.stats_max_length)["input_ids"] for t in texts]
        stats_batch = pad(ids, pad_id(tokenizer), parts.unembed.weight.device)
        outs = {i: parts.out_projs[i] for i in config.layers}

        @torch.no_grad()
        def stats_pass(stop: bool) -> None:
            with capture_inputs(outs):
                if stop:
                    run_until(model, parts.layers[max(config.layers)], **stats_batch.inputs())
                else:
                    model(**stats_batch.inputs(), use_cache=False)

        report(
            "key statistics batch: full model vs stop after the last edited layer",
            timed(lambda: stats_pass(False), n),
            timed(lambda: stats_pass(True), n),
        )

        # 4. keys: the first edited layer's keys read in the pass that reads the critical layer's
        def keys(layers, z_layer=None) -> None:
            read_keys(model, parts, tokenizer, [request], contexts, layers, z_layer, key_average=config.key_average)

        def separate() -> None:
            keys([config.critical_layer])
            keys([config.layers[0]], config.critical_layer)

        def merged() -> None:
            keys([config.layers[0], config.critical_layer], config.critical_layer)

        report("keys before the solve: two passes vs one shared pass", timed(separate, n), timed(merged, n))

    # 5. evaluation: one prompt at a time vs batches of 32 (20 CounterFact records, ~260 prompts)
    with suppress(Exception):
        records = load_records("counterfact", args.data, limit=20).records
        base = baseline(model, parts, tokenizer, records)
        report(
            "evaluate 20 CounterFact records: batch 1 vs batch 32",
            timed(lambda: evaluate(model, parts, tokenizer, records, base, batch_size=1), 1),
            timed(lambda: evaluate(model, parts, tokenizer, records, base, batch_size=32), 1),
        )

    # 6. symmetric matrices: general eigendecomposition vs eigh (C0 is d_ff^2, Delta_hist Delta_hist^T d_model^2)
    generator = torch.Generator().manual_seed(0)
    for name, size in (("C0 null space", parts.d_ff), ("Delta_hist Delta_hist^T", parts.d_model)):
        a = torch.randn(size, size // 2, generator=generator, dtype=torch.float64)
        sym = a @ a.T
        report(
            f"{name} ({size}x{size}): torch.linalg.eig vs eigh",
            timed(lambda m=sym: torch.linalg.eig(m), n),
            timed(lambda m=sym: torch.linalg.eigh(m), n),
        )

    # 7. AlphaEdit's P0 Kp Kp^T: recomputed at every solve (d_ff^3) vs kept up to date per commit (d_ff^2)
    d_ff = parts.d_ff
    projector = torch.randn(d_ff, d_ff, generator=generator)
    moments = torch.randn(d_ff, d_ff, generator=generator)
    key = torch.randn(d_ff, 1, generator=generator)
    report(
        "P0 Kp Kp^T per edit: recompute vs rank-one update",
        timed(lambda: projector @ (moments + key @ key.T), n),
        timed(lambda: (projector @ key) @ key.T, n),
    )


if __name__ == "__main__":
    main()
