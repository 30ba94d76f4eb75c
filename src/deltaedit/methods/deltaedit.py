"""DeltaEdit (Algorithm 1 of the paper): AlphaEdit plus control of superimposed noise.

At the critical layer it keeps ``Delta_hist`` (the sum of earlier updates) and an EMA mean ``m`` and
variance ``v`` of ``s_e = ||Delta_hist k_e||^2``. When ``s_e > m + eta sqrt(v)`` (after a warm-up), the
target vector is optimized inside the orthogonal complement of ``Delta_hist``'s column space, so the new
influence vector does not overlap the old ones; otherwise the EMA statistics are updated. Research-code
variants are options (``threshold_on``, ``ema_init``, ``projection``, ``project_moments``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .alphaedit import AlphaEdit, AlphaEditConfig
from .base import Decision, LayerUpdate


@dataclass
class DeltaEditConfig(AlphaEditConfig):
    """eta: threshold width in EMA standard deviations (paper: 3 GPT2-XL, 1.5 Llama3-8B).
    ema_delta: EMA coefficient delta (paper 0.9). warmup: edits that never trigger (paper 5).
    cap_fraction: at most this share of d_model directions is removed (paper 3/4).
    rank_rtol: eigenvalues of Delta_hist Delta_hist^T below rank_rtol x the largest count as zero.
    threshold_on: "squared" compares ||Delta_hist k||^2 (paper), "norm" compares ||Delta_hist k|| (research code).
    ema_init: "zero" starts m, v at 0 (paper); "first" starts m at the first value (research code).
    projection: "eigh" decomposes Delta_hist Delta_hist^T exactly (paper); "lowrank" builds D from
        [Delta_hist k_e, Delta_hist], takes a randomized rank-d/4 SVD and keeps eigenvalues above
        lowrank_cut (research code).
    project_moments: also project Adam's first moment after each step, not only the vector.
    """

    eta: float = 3.0
    ema_delta: float = 0.9
    warmup: int = 5
    cap_fraction: float = 0.75
    rank_rtol: float = 1e-10
    threshold_on: str = "squared"
    ema_init: str = "zero"
    projection: str = "eigh"
    lowrank_cut: float = 0.1
    project_moments: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        choices = {
            "threshold_on": ("squared", "norm"),
            "ema_init": ("zero", "first"),
            "projection": ("eigh", "lowrank"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: use one of {allowed}")
        if not 0 <= self.ema_delta <= 1:
            raise ValueError("ema_delta: must be in [0, 1]")
        if not 0 < self.cap_fraction <= 1:
            raise ValueError("cap_fraction: must be in (0, 1]")


class ThresholdTracker:
    """The dynamic threshold ``t = m + eta sqrt(v)`` with EMA statistics updated on non-triggering edits."""

    def __init__(self, config: DeltaEditConfig):
        self.config = config
        self.mean = 0.0
        self.var = 0.0
        self.seen = 0  # edits observed so far (triggered or not)
        self.updates = 0  # edits that updated the statistics

    @property
    def threshold(self) -> float:
        return self.mean + self.config.eta * math.sqrt(max(self.var, 0.0))

    def decide(self, score: float) -> tuple[bool, float]:
        """Whether this edit's score triggers the constraint, and the threshold used; changes nothing."""
        threshold = self.threshold
        return self.seen >= self.config.warmup and score > threshold, threshold

    def record(self, score: float, triggered: bool) -> None:
        """Fold a committed edit in; outliers that triggered do not move the statistics."""
        if not triggered:
            d = self.config.ema_delta
            if self.updates == 0 and self.config.ema_init == "first":
                self.mean, self.var = score, 0.0
            else:
                self.mean = d * self.mean + (1 - d) * score
                self.var = d * self.var + (1 - d) * (score - self.mean) ** 2
            self.updates += 1
        self.seen += 1

    def state(self) -> torch.Tensor:
        return torch.tensor([self.mean, self.var, float(self.seen), float(self.updates)], dtype=torch.float64)

    def load(self, values: torch.Tensor) -> None:
        self.mean, self.var, seen, updates = (float(x) for x in values.tolist())
        self.seen, self.updates = int(seen), int(updates)


class DeltaEdit(AlphaEdit):
    name = "deltaedit"
    config_class = DeltaEditConfig

    def __init__(self, config: DeltaEditConfig):
        super().__init__(config)
        self.tracker = ThresholdTracker(config)
        self.history: torch.Tensor | None = None  # Delta_hist at the critical layer (d_model x d_ff)

    def setup(self, second_moments, devices, d_model) -> None:
        super().setup(second_moments, devices, d_model)
        critical = self.config.critical_layer
        if self.history is None:
            d_ff = second_moments[critical].shape[0]
            self.history = torch.zeros(d_model, d_ff, device=devices[critical])

    def influence_projector(self, critical_keys):
        keys = critical_keys.to(self.history.device)
        response = self.history @ keys  # d_model x n
        score = float((response**2).sum(0).mean())
        measured = math.sqrt(score) if self.config.threshold_on == "norm" else score
        triggered, threshold = self.tracker.decide(measured)
        decision = Decision(score=measured, threshold=threshold, triggered=triggered)
        if not triggered:
            return None, decision
        basis = self._column_basis(response)
        decision.rank = basis.shape[1]
        projector = torch.eye(self.history.shape[0], device=basis.device) - basis @ basis.T
        return projector, decision

    def _column_basis(self, response: torch.Tensor) -> torch.Tensor:
        """Orthonormal directions of Delta_hist's column space to remove (the largest, capped)."""
        d_model = self.history.shape[0]
        cap = int(self.config.cap_fraction * d_model)
        if self.config.projection == "lowrank":
            stacked = torch.cat([response, self.history], dim=1)
            gram = stacked @ stacked.T
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(self.config.seed)
            u, s, _ = torch.svd_lowrank(gram, q=max(1, d_model // 4))
            torch.random.set_rng_state(generator_state)
            return u[:, s > self.config.lowrank_cut].float()
        gram = self.history.double() @ self.history.double().T
        values, vectors = torch.linalg.eigh(gram)  # ascending
        keep = values > self.config.rank_rtol * max(values.max().item(), 0.0)
        keep[: max(0, d_model - cap)] = False  # only the `cap` largest may be removed
        return vectors[:, keep].float()

    def commit(self, updates: dict[int, LayerUpdate], decision: Decision) -> None:
        super().commit(updates, decision)
        self.tracker.record(decision.score, decision.triggered)
        critical = self.config.critical_layer
        self.history += updates[critical].dense().to(self.history.device)

    def revert(self, updates: dict[int, LayerUpdate]) -> None:
        """Delta_hist and Kp Kp^T lose the edit; the threshold tracker does not (see EditMethod.revert): an
        EMA cannot un-see a value once later values were folded in on top of it."""
        super().revert(updates)
        self.history -= updates[self.config.critical_layer].dense().to(self.history.device)

    def reset(self) -> None:
        super().reset()
        self.tracker = ThresholdTracker(self.config)
        if self.history is not None:
            self.history = torch.zeros_like(self.history)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        state["history"] = self.history
        state["threshold"] = self.tracker.state()
        return state

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        if "history" in state:
            self.history = state["history"].to(self.history.device)
        if "threshold" in state:
            self.tracker.load(state["threshold"])
