"""The locate-then-edit family (ROME, MEMIT, AlphaEdit, DeltaEdit): keys, a target vector, a spread over
layers and a closed-form solve per layer (DESIGN.md §2).

For one edit of requests R:

1. read the keys at the first edited layer and the critical one, and the critical block's output, in one
   forward pass over every prompt (the bare prompt and the context prefixes);
2. ``influence_projector``: whether to constrain the target vector (DeltaEdit), then optimize it;
3. for each edited layer, lowest first: re-read keys and the critical output with the weights as they now
   are, give the layer its share of the residual still missing, ``solve`` for a low-rank update and write it.

A subclass chooses the solve (``solve``), what it keeps between edits (``commit`` / ``revert``), and
optionally the constraint on the target vector.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..models import DTYPES, parse_dtype
from ..requests import EditFailure
from ..target import KEY_AVERAGES, HalfSpaces, LowPrecisionCopies, TargetSettings, optimize_target, read_keys
from ..updates import LowRankUpdate
from .base import Computed, Decision, EditContext, EditMethod, MethodConfig


@dataclass
class LocateConfig(MethodConfig):
    """Options of the locate-then-edit methods.

    steps / lr / weight_decay / clamp_norm_factor / kl_factor / stop_prob: target-vector optimizer
        (Adam steps at most, learning rate, decay weight, max ||delta|| as a multiple of ||h||, weight of
        the KL term on the essence prompt, stop once the mean target probability reaches this). The
        defaults are MEMIT's and AlphaEdit's published ones (v_weight_decay 0.5, clamp_norm_factor 0.75,
        kl_factor 0.0625, 25 steps). ROME's Llama3-8B hyperparameters use 1e-3 and 4, but against the MLP
        output's norm, where δ is added in ROME's compute_v; here every method adds δ to the block output and
        both scale with ||h||, the larger norm, so the same numbers bound δ more loosely than in ROME.
    kl_position: where the KL term reads the essence prompt "{subject} is a": "subject" (its subject's last
        token, as MEMIT, AlphaEdit and DeltaEdit do) or "last" (its last token).
    search_dtype: the precision of the target search's matrix multiplies in the frozen blocks above the
        critical one and the unembedding: "float32" (exact), or "bfloat16" / "float16", about 1.5x faster
        steps on a CPU with bfloat16 instructions, with slightly different target vectors (measured in
        docs/performance.md); the weights, the lower blocks, the loss and the solves keep their precision.
    n_contexts / context_tokens: short generated prefixes the keys and target are averaged over.
    key_average: how the key weighs the prompts: "grouped", the bare prompt one half and its prefixed copies
        the other (MEMIT's compute_ks, which AlphaEdit and DeltaEdit reuse), or "flat", one mean over all
        (ROME's compute_u).
    stats_samples / stats_max_length / stats_corpus: key second-moment statistics (C0); corpus
        ``None`` means Wikipedia under $DELTAEDIT_DATA if present, else text the model generates.
    """

    steps: int = 25
    lr: float = 0.5
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    stop_prob: float = 0.95
    kl_position: str = "subject"
    search_dtype: str = "float32"
    n_contexts: int = 5
    context_tokens: int = 10
    key_average: str = "grouped"
    stats_samples: int = 2000
    stats_max_length: int = 128
    stats_corpus: str | None = None

    recorded_before: ClassVar[dict[str, Any]] = {"key_average": "flat"}  # every run before the option was flat

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("steps", "n_contexts", "stats_samples", "stats_max_length"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        if not 0 < self.stop_prob <= 1:
            raise ValueError("stop_prob: must be in (0, 1]")
        if self.kl_position not in ("subject", "last"):
            raise ValueError(f"kl_position: use 'subject' or 'last', not {self.kl_position!r}")
        if self.key_average not in KEY_AVERAGES:
            raise ValueError(f"key_average: use one of {KEY_AVERAGES}, not {self.key_average!r}")
        if self.search_dtype not in DTYPES:
            raise ValueError(f"search_dtype: unknown {self.search_dtype!r}; use one of {sorted(DTYPES)}")

    def target_settings(self) -> TargetSettings:
        """The optimizer settings, from the options of the same names (those a config lacks keep their default)."""
        names = [f.name for f in dataclasses.fields(TargetSettings)]
        return TargetSettings(**{name: getattr(self, name) for name in names if hasattr(self, name)})


class LocateThenEdit(EditMethod):
    """Keys, target vector, spread over layers, per-layer solve; subclasses implement :meth:`solve`."""

    name = "locate"  # not a method of its own: the name of its block of defaults in defaults.yaml
    config_class = LocateConfig
    needs_statistics = True  # C0 per edited layer, for the solve

    def __init__(self, config: LocateConfig):
        super().__init__(config)
        # the frozen upper blocks cast once for every target search (search_dtype); derived, never saved
        self.low_precision = LowPrecisionCopies(parse_dtype(config.search_dtype))

    def setup(self, context: EditContext) -> None:
        config = self.config
        moments: dict[int, torch.Tensor] = {}
        if self.needs_statistics:
            moments = context.key_statistics(
                config.layers, config.stats_corpus, config.stats_samples, config.stats_max_length
            )
        devices = {i: context.parts.out_projs[i].weight.device for i in config.layers}
        self.build(moments, devices, context.parts.d_model)

    def build(self, second_moments: dict[int, torch.Tensor], devices: dict[int, torch.device], d_model: int) -> None:
        """Build the solve's state from the key statistics (one d_ff x d_ff float32 matrix per edited layer)."""

    def prefixes(self, context: EditContext) -> list[str]:
        """The bare prompt plus short generated prefixes (seeded), as MEMIT averages over."""
        return context.prefixes(self.config.n_contexts, self.config.context_tokens)

    def influence_projector(
        self, keys: torch.Tensor, context_keys: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | HalfSpaces | list[HalfSpaces] | None, Decision]:
        """The target vector's constraint (a projector matrix, a cone of half-spaces, one cone per request, or
        None), and the decision behind it, from the edit's keys at the critical layer: context-averaged
        (d_ff x n) and per prompt (d_ff x n*c, request-major, bare first)."""
        return None, Decision()

    def solve(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(left, right) with ``Delta = left @ right.T`` mapping ``keys`` (d_ff x n) to ``residuals`` (d_model x n)."""
        raise NotImplementedError

    def compute(self, context: EditContext, requests) -> Computed:
        config = self.config
        model, parts, tokenizer = context.model, context.parts, context.tokenizer
        layers, critical = config.layers, config.critical_layer
        culprit = requests[0] if len(requests) == 1 else tuple(requests)
        prefixes = self.prefixes(context)
        # the first layer's keys and the critical output, read before any weight changes, serve its solve too
        average = config.key_average
        first_read = read_keys(
            model, parts, tokenizer, requests, prefixes, sorted({layers[0], critical}), critical, key_average=average
        )
        try:
            projector, decision = self.influence_projector(first_read.keys[critical], first_read.per_context[critical])
        except torch.linalg.LinAlgError as err:
            raise EditFailure(f"the target vector's constraint could not be built ({err})", culprit, "target") from err
        recorded = context.recorded_target(requests)
        if recorded is not None:  # an earlier run of this stream searched this very edit: same z*, same updates
            z_star, steps = recorded[0].float(), recorded[1]
        else:
            z_star, steps = self._search_targets(context, requests, prefixes, projector)
        updates = {}
        for position, layer in enumerate(layers):
            layer_keys, z_now, _ = (
                first_read
                if position == 0
                else read_keys(model, parts, tokenizer, requests, prefixes, [layer], critical, key_average=average)
            )
            device = parts.out_projs[layer].weight.device
            # MEMIT's spread: each layer takes an equal share of what is still missing at the critical layer
            residual = (z_star.to(device) - z_now.to(device)) / (len(layers) - position)
            try:
                left, right = self.solve(layer, layer_keys[layer].to(device), residual)
            except torch.linalg.LinAlgError as err:
                raise EditFailure(f"the solve at layer {layer} is singular ({err})", culprit, "update") from err
            if not (torch.isfinite(left).all() and torch.isfinite(right).all()):
                raise EditFailure(f"the update at layer {layer} is not finite", culprit, "update")
            # contiguous factors: a replay from the stored copies then multiplies exactly the same layout
            update = LowRankUpdate(left.contiguous(), right.contiguous(), layer_keys[layer].to(device))
            updates[layer] = context.write(layer, update)
        return Computed(updates, decision, steps, targets=z_star)

    def _search_targets(
        self, context: EditContext, requests, prefixes: list[str], projector
    ) -> tuple[torch.Tensor, int]:
        """z* = z_init + delta per request (d_model x n), by the optimizer, and the most steps it took."""
        model, parts, tokenizer = context.model, context.parts, context.tokenizer
        deltas, z_init, steps = [], [], 0
        settings = self.config.target_settings()
        for index, request in enumerate(requests):
            try:
                found = optimize_target(
                    model,
                    parts,
                    tokenizer,
                    request,
                    prefixes,
                    self.config.critical_layer,
                    settings,
                    projector[index] if isinstance(projector, list) else projector,
                    reuse_prefix=context.reuse_prefix,
                    low_precision=self.low_precision,
                )
            except FloatingPointError as err:
                raise EditFailure(str(err), request, "target") from err
            if not (torch.isfinite(found.delta).all() and torch.isfinite(found.z_init).all()):
                raise EditFailure(f"the target vector for {request.subject!r} is not finite", request, "target")
            deltas.append(found.delta)
            z_init.append(found.z_init)
            steps = max(steps, found.steps)
        return (torch.stack(z_init, 1) + torch.stack(deltas, 1)).float(), steps
