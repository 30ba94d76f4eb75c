"""ROME (Meng et al., 2022): a rank-one update of one layer, in sequential mode.

With the edit's key k (averaged over the prompt and its context prefixes), the residual r it should add to
the layer's output, and C = E[k k^T]: ``u = C^-1 k``, ``Delta = r u^T / (u^T k)``, so ``Delta k = r`` exactly
and other keys move as little as C allows. The key that defines the update is the same averaged key the
target residual is measured for: r-ROME's correction (Gupta et al., 2024) of the original code, whose update
used one key and whose target value another, which is what made sequential ROME collapse.

Prompts: ROME's published hyperparameters average its key and target over 20 generated prefixes (ten of 5
tokens, ten of 10) and the bare prompt, one flat mean; here ROME shares MEMIT's five prefixes of 10 tokens
(``n_contexts``, ``context_tokens``) and keeps the flat mean (``key_average="flat"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..requests import EditFailure
from .base import require_one_layer
from .locate import LocateConfig
from .memit import MEMIT


@dataclass
class ROMEConfig(LocateConfig):
    """layers: exactly one layer (ROME edits a single MLP). ridge: added to C's diagonal before it is inverted
    (0, as ROME; raise it if C is singular for a model). key_average: "flat", as ROME's compute_u."""

    ridge: float = 0.0
    key_average: str = "flat"

    def __post_init__(self) -> None:
        super().__post_init__()
        require_one_layer(self, "ROME")
        if self.ridge < 0:
            raise ValueError("ridge: must be >= 0")


class ROME(MEMIT):
    """MEMIT's one-layer member: the same keys, target vector and C0, a rank-one solve with no C0 weight."""

    name = "rome"
    config_class = ROMEConfig
    one_layer = True

    def compute(self, context, requests):
        if len(requests) != 1:
            raise EditFailure("ROME writes one fact at a time; use batch_size=1 or MEMIT", tuple(requests), "update")
        return super().compute(context, requests)

    def solve(self, layer, keys, residuals):
        moment = self.second_moments[layer]
        if self.config.ridge:
            moment = moment + self.config.ridge * torch.eye(moment.shape[0], device=moment.device)
        u = torch.linalg.solve(moment, keys)  # d_ff x 1
        return residuals, u / (u.T @ keys)
