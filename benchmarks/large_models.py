"""Editing models of GPT-2-XL's and Llama-3-8B's size with random weights built from their configs.

For each shape: key statistics (timed, per 1000 texts), a few DeltaEdit edits (seconds each), peak memory,
and the same model saved and loaded again with ``device_map="auto"`` and edited once. Weights are random (no
download): the figures are about cost, not quality. Prints figures; asserts nothing but that edits run.

    python benchmarks/large_models.py --device cuda                 # the real shapes (a GPU with ~40 GB)
    python benchmarks/large_models.py --device cpu --scale 0.05     # the same code path, shrunk, on a CPU
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

WORDS = [f"w{i}" for i in range(2000)] + ["The", "capital", "of", "is", "France", "Rome", "Paris", "city"]


def shapes(scale: float) -> dict[str, dict]:
    """The published configs (GPT-2 XL; Llama 3 8B), widths and depths times ``scale`` (kept valid)."""

    def width(n: int, multiple: int) -> int:
        return max(multiple, int(n * scale) // multiple * multiple)

    depth = lambda n: max(6, int(n * scale))  # noqa: E731 - a local rule, named
    return {
        "gpt2-xl": {
            "family": "gpt2",
            "config": dict(
                n_embd=width(1600, 64),
                n_layer=depth(48),
                n_head=max(1, width(1600, 64) // 64),
                n_inner=width(6400, 64),
                n_positions=1024,
            ),  # fmt: skip
            "layers": [13, 14, 15, 16, 17] if scale >= 1 else [1, 2, 3, 4, 5],
        },
        "llama3-8b": {
            "family": "llama",
            "config": dict(
                hidden_size=width(4096, 128),
                num_hidden_layers=depth(32),
                num_attention_heads=max(1, width(4096, 128) // 128),
                num_key_value_heads=max(1, width(4096, 128) // 512),
                intermediate_size=width(14336, 128),
                max_position_embeddings=2048,
                head_dim=128,
            ),
            "layers": [4, 5, 6, 7, 8] if scale >= 1 else [1, 2, 3, 4, 5],
        },
    }


def tokenizer_for(folder: Path):
    """A word-level tokenizer over WORDS (no download), saved beside the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.save_pretrained(folder)
    return tokenizer, len(vocab)


def build(name: str, spec: dict, vocab: int, device: str, dtype: torch.dtype):
    import transformers as tf

    config_class = tf.GPT2Config if spec["family"] == "gpt2" else tf.LlamaConfig
    config = config_class(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0, **spec["config"])
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def peak_memory_gb(device: str) -> float:
    from deltaedit.memory import peak_resident_mb

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return peak_resident_mb() * 2**20 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink widths and depths (CPU: 0.05)")
    parser.add_argument("--models", default="gpt2-xl,llama3-8b")
    parser.add_argument("--stats-texts", type=int, default=1000)
    parser.add_argument("--edits", type=int, default=3)
    args = parser.parse_args()

    from deltaedit import Editor, EditRequest, load_model

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    rng = random.Random(0)
    work = Path(tempfile.mkdtemp(prefix="deltaedit-large-"))
    corpus = work / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choices(WORDS, k=100)) for _ in range(args.stats_texts)))
    requests = [EditRequest("The capital of {} is", subject, "Rome") for subject in ("France", "w17", "w42")]
    report = {}
    for name in args.models.split(","):
        spec = shapes(args.scale)[name]
        folder = work / name
        tokenizer, vocab = tokenizer_for(folder)
        model = build(name, spec, vocab, args.device, dtype)
        n_params = sum(p.numel() for p in model.parameters()) / 1e9
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        config = {"layers": spec["layers"], "stats_corpus": str(corpus), "stats_samples": args.stats_texts,
                  "stats_max_length": 128, "nullspace_threshold": 1e9, "n_contexts": 2}  # fmt: skip
        editor = Editor(model, tokenizer, "deltaedit", config, progress=False, stats_store=work / "stats")
        started = time.perf_counter()
        editor.prepare()
        stats_seconds = time.perf_counter() - started
        seconds = []
        for request in requests[: args.edits]:
            seconds.append(editor.edit(request)[0].seconds)
        figures = {
            "parameters_billions": round(n_params, 3),
            "dtype": str(dtype),
            "stats_seconds_per_1000_texts": round(stats_seconds * 1000 / args.stats_texts, 1),
            "seconds_per_edit": [round(s, 2) for s in seconds],
            "peak_memory_gb": round(peak_memory_gb(args.device), 2),
        }
        model.save_pretrained(folder)
        del editor, model
        auto, auto_tokenizer = load_model(str(folder), device_map="auto", dtype=str(dtype).removeprefix("torch."))
        spread = sorted({str(d) for d in getattr(auto, "hf_device_map", {}).values()}) or [str(auto.device)]
        result = Editor(auto, auto_tokenizer, "deltaedit", config, progress=False, stats_store=work / "stats").edit(
            requests[0]
        )[0]
        figures["device_map_auto"] = {"devices": spread, "seconds_per_edit": round(result.seconds, 2)}
        report[name] = figures
        print(name, json.dumps(figures), flush=True)
        del auto
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(json.dumps({"device": args.device, "scale": args.scale, **report}, indent=1))


if __name__ == "__main__":
    main()
