"""Which MLP layers carry a fact? Causal tracing of MLP outputs, as a guide for choosing edited layers.

For each demo fact the model answers correctly: corrupt the subject's token embeddings with Gaussian
noise (3x the embedding std), then restore the clean output of the MLPs in a window of layers at the
subject's last token, and measure how much of P(true answer) comes back. The average indirect effect
per layer is printed as a table; the layers where it peaks are the candidates for editing.

    python benchmarks/trace_layers.py --model smollm2-135m --window 5 --noise-samples 4
"""

from __future__ import annotations

import argparse
import json
from importlib import resources

import torch

from deltaedit.models import find_parts, load_model
from deltaedit.requests import EditRequest
from deltaedit.tokens import encode


def trace(model, parts, tokenizer, request: EditRequest, window: int, samples: int, generator) -> torch.Tensor:
    """Indirect effect of restoring each layer's MLP window, averaged over noise samples (n_layers,)."""
    enc = encode(tokenizer, request.prompt, request.subject)
    answer = tokenizer(" " + request.target_true, add_special_tokens=False)["input_ids"][0]
    ids = torch.tensor([enc.ids], device=model.device)
    start = request.prompt.index("{}")
    subject_tokens = [
        i
        for i, (a, b) in enumerate(tokenizer(request.text, return_offsets_mapping=True)["offset_mapping"])
        if b > a and a < start + len(request.subject) and b > start
    ]
    n_layers = parts.n_layers
    mlps = [proj for proj in parts.out_projs]
    clean: dict[int, torch.Tensor] = {}

    def record(layer):
        def hook(_m, _a, out):
            clean[layer] = out[0, enc.subject_index].detach().clone()

        return hook

    handles = [m.register_forward_hook(record(i)) for i, m in enumerate(mlps)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    embed = model.get_input_embeddings()
    noise_scale = 3 * embed.weight.float().std().item()
    batch = ids.repeat(n_layers + 1, 1)  # row 0: corrupted only; row 1 + l: restore window around l
    effects = torch.zeros(n_layers)
    for _ in range(samples):
        noise = torch.randn(len(subject_tokens), embed.weight.shape[1], generator=generator) * noise_scale

        def corrupt(_m, _a, out, noise=noise):
            out = out.clone()
            out[:, subject_tokens] += noise.to(out.dtype)
            return out

        def restore(layer):
            rows = [1 + c for c in range(n_layers) if abs(c - layer) <= window // 2]

            def hook(_m, _a, out):
                out = out.clone()
                out[rows, enc.subject_index] = clean[layer].to(out.dtype)
                return out

            return hook

        handles = [embed.register_forward_hook(corrupt)]
        handles += [m.register_forward_hook(restore(i)) for i, m in enumerate(mlps)]
        with torch.no_grad():
            logits = model(input_ids=batch).logits[:, -1].float().softmax(-1)[:, answer]
        for h in handles:
            h.remove()
        effects += (logits[1:] - logits[0]).cpu()
    return effects / samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--noise-samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    parts = find_parts(model)
    demo = json.loads(resources.files("deltaedit").joinpath("resources/demo_edits.json").read_text())
    requests = [EditRequest.from_dict(item) for item in demo["edits"]]
    generator = torch.Generator().manual_seed(args.seed)
    total = torch.zeros(parts.n_layers)
    for request in requests:
        total += trace(model, parts, tokenizer, request, args.window, args.noise_samples, generator)
    mean = total / len(requests)
    print(f"average indirect effect of MLP outputs (window {args.window}) over {len(requests)} facts")
    print("layer  effect")
    for layer, value in enumerate(mean.tolist()):
        print(f"{layer:>5}  {value:+.4f}  {'#' * max(0, int(value * 200))}")
    best = int(mean.argmax())
    print(f"peak at layer {best}")


if __name__ == "__main__":
    main()
