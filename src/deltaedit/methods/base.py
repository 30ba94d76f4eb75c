"""The small interface every editing method implements, and the config they share.

The :class:`~deltaedit.editor.Editor` runs the locate-then-edit loop (keys, target residual, spread
over layers) and asks the method three things: whether to constrain the target vector
(:meth:`EditMethod.influence_projector`), how to turn keys and residuals into a low-rank update
(:meth:`EditMethod.solve`), and how to fold a finished edit into its running state
(:meth:`EditMethod.commit` / :meth:`EditMethod.revert` for undo). Each method has a config dataclass
with documented defaults; the registry in ``methods/__init__.py`` maps names to (method, config).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..target import TargetSettings


@dataclass
class MethodConfig:
    """Settings shared by the locate-then-edit methods.

    layers: edited MLP layers, lowest first; the last one is the critical layer.
    steps / lr / weight_decay / clamp_norm_factor / kl_factor / stop_prob: target-vector optimizer
        (Adam steps at most, learning rate, decay weight, max ||delta|| as a multiple of ||h||, weight of
        the KL term on the essence prompt, stop once the mean target probability reaches this). The
        defaults are MEMIT's and AlphaEdit's published ones (v_weight_decay 0.5, clamp_norm_factor 0.75,
        kl_factor 0.0625, 25 steps); ROME's Llama3-8B hyperparameters use 1e-3 and 4.
    kl_position: where the KL term reads the essence prompt "{subject} is a": "subject" (its subject's last
        token, as MEMIT, AlphaEdit and DeltaEdit do) or "last" (its last token).
    n_contexts / context_tokens: short generated prefixes the keys and target are averaged over.
    l2: ridge weight lambda in the solve (AlphaEdit's ``I`` term, MEMIT's C0 weight).
    stats_samples / stats_max_length / stats_corpus: key second-moment statistics (C0); corpus
        ``None`` means Wikipedia under $DELTAEDIT_DATA if present, else text the model generates.
    seed: makes context prefixes and any sampling reproducible.
    """

    layers: tuple[int, ...] = (4, 5, 6, 7, 8)
    steps: int = 25
    lr: float = 0.5
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    stop_prob: float = 0.95
    kl_position: str = "subject"
    n_contexts: int = 5
    context_tokens: int = 10
    l2: float = 1.0
    stats_samples: int = 2000
    stats_max_length: int = 128
    stats_corpus: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.layers = tuple(int(x) for x in self.layers)
        if not self.layers:
            raise ValueError("layers: give at least one layer index to edit")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers: {self.layers} must be distinct and increasing, e.g. 4,5,6,7,8")
        for name in ("steps", "n_contexts", "stats_samples", "stats_max_length"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        if not 0 < self.stop_prob <= 1:
            raise ValueError("stop_prob: must be in (0, 1]")
        if self.kl_position not in ("subject", "last"):
            raise ValueError(f"kl_position: use 'subject' or 'last', not {self.kl_position!r}")

    @property
    def critical_layer(self) -> int:
        return self.layers[-1]

    def target_settings(self) -> TargetSettings:
        names = [f.name for f in dataclasses.fields(TargetSettings)]
        return TargetSettings(**{name: getattr(self, name) for name in names})

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers)
        return data

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{unknown[0]}: not an option of {cls.__name__}; options: {sorted(names)}")
        return cls(**data)

    def replace(self, **changes: Any) -> MethodConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class Decision:
    """What a method decided before optimizing the target (DeltaEdit's orthogonal constraint)."""

    score: float | None = None  # s_e
    threshold: float | None = None
    triggered: bool = False
    rank: int = 0  # directions removed from the target vector's space
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerUpdate:
    """One layer's update in factored form: ``Delta = left @ right.T`` (d_model x r, d_ff x r)."""

    left: torch.Tensor
    right: torch.Tensor
    keys: torch.Tensor  # d_ff x n, the keys the solve used (AlphaEdit adds their outer products to Kp Kp^T)

    def dense(self) -> torch.Tensor:
        return self.left @ self.right.T


class EditMethod:
    """Base class: holds the config and per-layer running state; subclasses override the hooks."""

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    needs_stats: ClassVar[bool] = False
    # Named sets of option values (e.g. DeltaEdit's "paper" and "research"), applied over the model's defaults
    # and under the user's overrides; "default" (no change) is always available.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, config: MethodConfig):
        self.config = config

    def setup(self, second_moments: dict[int, torch.Tensor], devices: dict[int, torch.device], d_model: int) -> None:
        """Build state from the key statistics (one d_ff x d_ff float32 matrix per edited layer)."""

    def influence_projector(
        self, keys: torch.Tensor, context_keys: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, Decision]:
        """A projector for the target vector (or None), and the decision behind it, from the edit's keys at the
        critical layer: context-averaged (d_ff x n) and per prompt (d_ff x n*c, request-major, bare first)."""
        return None, Decision()

    def solve(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def commit(self, updates: dict[int, LayerUpdate], decision: Decision) -> None:
        """Fold a finished edit into the running state."""

    def revert(self, updates: dict[int, LayerUpdate]) -> None:
        """Take a committed edit back out of the running state (for undo).

        Sums over edits (Kp Kp^T, Delta_hist) lose the edit's term; statistics of the stream of edits
        (DeltaEdit's threshold EMA) keep it: they describe what the method saw, and later decisions were
        made with it.
        """

    def reset(self) -> None:
        """Forget every committed edit, keeping what :meth:`setup` built from the key statistics.

        Afterwards the state equals, bit for bit, the state right after ``setup``, so replaying the same
        commits and reverts rebuilds it exactly (how the Editor rolls back and resumes).
        """

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore running state saved by :meth:`state_dict`."""
