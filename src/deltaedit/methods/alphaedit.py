"""AlphaEdit (Fang et al., 2025): MEMIT's solve projected onto the null space of the preserved keys.

``P0`` projects onto the eigenvectors of ``C0 = E[k k^T]`` whose eigenvalues are below a threshold, so
``Delta k ~ 0`` for keys the model already uses. Per layer, with the keys of all earlier edits summed in
``Kp Kp^T``:  ``Delta = R (M^-1 P0 K)^T`` with ``M = P0 (Kp Kp^T + K K^T) + l2 I``.
For one request that is ``alpha beta^T`` with ``alpha = R`` and ``beta = M^-1 P0 k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..updates import Update
from .base import Decision
from .locate import LocateConfig
from .memit import MEMIT

# An eigenvalue of P0 Kp Kp^T P0 above this share of the largest counts as a spanned direction: ten times the
# float32 rounding of the summed moments. On SmolLM2's 3000-edit run (layer 7) it gives Gram-Schmidt's float64
# rank at 250, 500, 1000, 1200, 2000 and 3000 edits, and 1048 of 1052 at the edge, edit 1052.
SPANNED_TOLERANCE = 1e-6


@dataclass
class AlphaEditConfig(LocateConfig):
    """l2: the ridge weight lambda of the solve (AlphaEdit's L2 times the identity).
    nullspace_threshold: eigenvalues of C0 below it span the preserved null space.
    nullspace_mode: "absolute" compares eigenvalues with the threshold as is (AlphaEdit's 2e-2);
        "relative" compares them with threshold x the largest eigenvalue, for models whose key scale
        differs from GPT-2's.
    """

    l2: float = 1.0
    nullspace_threshold: float = 2e-2
    nullspace_mode: str = "absolute"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nullspace_mode not in ("absolute", "relative"):
            raise ValueError("nullspace_mode: use 'absolute' or 'relative'")


def nullspace_projector(second_moment: torch.Tensor, threshold: float, mode: str) -> torch.Tensor:
    """Projector on the eigenvectors of a symmetric PSD matrix with eigenvalues below the threshold."""
    values, vectors = torch.linalg.eigh(second_moment.double())
    cut = threshold * values.max() if mode == "relative" else threshold
    small = vectors[:, values < cut]
    return (small @ small.T).float()


class AlphaEdit(MEMIT):
    name = "alphaedit"
    config_class = AlphaEditConfig

    def __init__(self, config: AlphaEditConfig):
        super().__init__(config)
        self.projectors: dict[int, torch.Tensor] = {}
        self.key_moments: dict[int, torch.Tensor] = {}  # Kp Kp^T per layer
        self.projected_moments: dict[int, torch.Tensor] = {}  # P0 Kp Kp^T, kept to avoid a d_ff^3 product

    def build(self, second_moments, devices, d_model) -> None:
        for layer, moment in second_moments.items():
            device = devices[layer]
            self.projectors[layer] = nullspace_projector(
                moment, self.config.nullspace_threshold, self.config.nullspace_mode
            ).to(device)
            d_ff = moment.shape[0]
            self.key_moments.setdefault(layer, torch.zeros(d_ff, d_ff, device=device))
            self.projected_moments[layer] = self.projectors[layer] @ self.key_moments[layer]

    def preserved_dims(self, layer: int) -> int:
        """How many key directions the null space leaves free to edit."""
        return int(round(torch.trace(self.projectors[layer]).item()))

    def key_space(self, layer: int) -> dict[str, int]:
        """The free key directions (the null space's) and how many of them the edits in force span: the rank of
        P0 Kp Kp^T P0. Once it reaches the free count, every new edit's key is a combination of earlier edits'
        keys, so writing it moves their outputs too (on SmolLM2 from about edit 1050 on: docs/results.md)."""
        # from Kp Kp^T, not the running P0 Kp Kp^T: a resumed run rebuilds that one with other rounding, and the
        # count must come out the same
        projector = self.projectors[layer].double()
        moment = projector @ self.key_moments[layer].double() @ projector
        values = torch.linalg.eigvalsh((moment + moment.T) / 2)
        largest = values[-1].item()
        spanned = int((values > largest * SPANNED_TOLERANCE).sum()) if largest > 0 else 0
        return {"free_key_dims": self.preserved_dims(layer), "spanned_key_dims": spanned}

    def solve(self, layer, keys, residuals):
        projector = self.projectors[layer]
        projected_keys = projector @ keys
        system = self.projected_moments[layer] + projected_keys @ keys.T
        system.diagonal().add_(self.config.l2)
        right = torch.linalg.solve(system, projected_keys)
        return residuals, right

    def commit(self, updates: dict[int, Update], decision: Decision) -> None:
        for layer, update in updates.items():
            self.key_moments[layer] += update.keys @ update.keys.T
            self.projected_moments[layer] += (self.projectors[layer] @ update.keys) @ update.keys.T

    def revert(self, updates: dict[int, Update]) -> None:
        # the mirror of commit: O(d_ff^2) per edit, where recomputing P0 Kp Kp^T would be O(d_ff^3)
        for layer, update in updates.items():
            self.key_moments[layer] -= update.keys @ update.keys.T
            self.projected_moments[layer] -= (self.projectors[layer] @ update.keys) @ update.keys.T

    def reset(self) -> None:
        for layer, moment in self.key_moments.items():
            self.key_moments[layer] = torch.zeros_like(moment)  # new tensors: a state_dict handed out stays intact
            self.projected_moments[layer] = self.projectors[layer] @ self.key_moments[layer]  # as setup computes it

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"key_moments.{layer}": m for layer, m in self.key_moments.items()}

    def load_state_dict(self, state) -> None:
        for name, value in state.items():
            if name.startswith("key_moments."):
                layer = int(name.split(".")[1])
                self.key_moments[layer] = value.to(self.key_moments[layer].device)
                self.projected_moments[layer] = self.projectors[layer] @ self.key_moments[layer]
