"""The interface every editing method implements, the core config, and the context a method computes in.

A method owns its computation (PEFT's tuners, scikit-learn's estimators): ``compute(context, requests)``
reads the model through the :class:`EditContext`, writes each layer's update through ``context.write`` and
returns the updates and its :class:`Decision`. The :class:`~deltaedit.editor.Editor` keeps what is common to
every method: validation, atomic application (an exception anywhere restores the weights), the ledger, undo,
resume and export. Between edits a method folds what it did into its running state (``commit`` / ``revert``)
and may post-process updates with two hooks, used by the one function that writes weights:

* ``finalize_update(layer, update, weight)``: change an update before it is written (RECT sparsifies it);
* ``compose(layer, base, updates)``: the layer's weight from the unedited one and the updates in force (PRUNE
  restrains the accumulated change); the plain sum by default.

Both are driven by the core config (``restrain``, ``sparsify``), so they apply to any method.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..updates import SparseUpdate, Update, summed


def _default(option: dataclasses.Field) -> Any:
    if option.default_factory is not dataclasses.MISSING:
        return option.default_factory()
    return option.default  # MISSING for a required option, which is never equal to a value


@dataclass
class MethodConfig:
    """Options every method has.

    layers: edited MLP layers (their W_out), lowest first; the last one is the critical layer.
    seed: makes context prefixes and any sampling reproducible.
    restrain: "prune" restrains the accumulated change of each layer as PRUNE does (Ma et al., 2024): singular
        values of W - W0 above W0's largest one, s_max, become s_max + log(s / s_max) ("log") or
        (s + s_max) / 2 ("linear", restrain_function); "none" keeps the plain sum. restrain_base: the log's base
        α, PRUNE's hyperparameter F(s) = s_max + log_α(s) - log_α(s_max) (e, its code's func_log; it tunes α
        per method and model, e.g. 1.2, which lets the change grow further above s_max).
    sparsify: keep only this fraction of each update's entries, those of largest relative change |dW| / |W|,
        and zero the rest, as RECT does (Gu et al., 2024: 0.2); 0 keeps the update whole.
    """

    layers: tuple[int, ...] = (4, 5, 6, 7, 8)
    seed: int = 0
    restrain: str = "none"
    restrain_function: str = "log"
    restrain_base: float = math.e
    sparsify: float = 0.0

    # Options added after ledgers were written whose published default is not what ran before them: the value a
    # recorded config without the option was made with, so an old ledger replays and continues exactly.
    recorded_before: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        self.layers = tuple(int(x) for x in self.layers)
        if not self.layers:
            raise ValueError("layers: give at least one layer index to edit")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers: {self.layers} must be distinct and increasing, e.g. 4,5,6,7,8")
        if self.restrain not in ("none", "prune"):
            raise ValueError(f"restrain: use 'none' or 'prune', not {self.restrain!r}")
        if self.restrain_function not in ("log", "linear"):
            raise ValueError(f"restrain_function: use 'log' or 'linear', not {self.restrain_function!r}")
        if not self.restrain_base > 1:
            raise ValueError(f"restrain_base: the log's base must be > 1, not {self.restrain_base}")
        if not 0 <= self.sparsify < 1:
            raise ValueError("sparsify: a fraction in [0, 1): the share of an update's entries to keep (0: all)")
        for option in dataclasses.fields(self):
            value = getattr(self, option.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{option.name}: must be a finite number, not {value}")

    @property
    def critical_layer(self) -> int:
        return self.layers[-1]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers)
        return data

    def fingerprint(self, options: Collection[str] | None = None) -> str:
        """A short hash of the option values (of ``options`` only, when given)."""
        data = self.to_dict()
        if options is not None:
            data = {name: data[name] for name in options if name in data}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]

    def matches(self, recorded: Mapping[str, Any], fingerprint: str | None) -> bool:
        """Whether this config is the one a manifest recorded as ``recorded`` (its options) and ``fingerprint``.

        Why: a ledger written by an earlier version lacks the options added since, and its fingerprint
        hashes only the options it knew. It is the same config when those options hash to that
        fingerprint and every option added since has the value that ran before it (its default, or
        ``recorded_before``).
        """
        options = dataclasses.fields(self)
        if set(recorded) - {f.name for f in options}:
            return False
        for option in options:
            before = self.recorded_before.get(option.name, _default(option))
            if option.name not in recorded and getattr(self, option.name) != before:
                return False
        return self.fingerprint(recorded) == fingerprint

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{unknown[0]}: not an option of {cls.__name__}; options: {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_recorded(cls, data: dict[str, Any]) -> MethodConfig:
        """The config a ledger or edits file recorded: an option it lacks takes the value that ran before the
        option existed (``recorded_before``), not today's default."""
        return cls.from_dict({**cls.recorded_before, **data})

    def replace(self, **changes: Any) -> MethodConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class Decision:
    """What a method decided for an edit: whether its special treatment fired (DeltaEdit's orthogonal
    constraint), and any figures it wants recorded (saved in the ledger as they are)."""

    triggered: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Computed:
    """What ``compute`` returns: the update written to each layer, the decision, the optimizer steps, and the
    target vectors the updates were solved for (z* at the critical layer, d_model x n; None for FT), recorded
    so the edit can be rebuilt without the search (``deltaedit.targets_file``)."""

    updates: dict[int, Update]
    decision: Decision
    steps: int = 0
    targets: torch.Tensor | None = None


def _nothing_recorded(requests: Sequence) -> None:
    return None


@dataclass
class EditContext:
    """What a method computes with: the model and its parts, the tokenizer, and the Editor's services.

    ``write(layer, update)`` finalizes an update, writes the layer's new weight (as the method composes it) and
    returns the update as written; ``base_weight(layer)`` is W0; ``key_statistics(layers, corpus, samples,
    max_length)`` gives cached C0 = E[k k^T] per layer; ``prefixes(count, length)`` the bare prompt ("") and
    ``count`` short seeded generations of the unedited model to put before prompts; ``recorded_target(requests)``
    the (z*, steps) recorded for this edit by an earlier run of the same stream, or None: the search is skipped."""

    model: Any
    parts: Any
    tokenizer: Any
    reuse_prefix: bool
    write: Callable[[int, Update], Update]
    base_weight: Callable[[int], torch.Tensor]
    key_statistics: Callable[..., dict[int, torch.Tensor]]
    prefixes: Callable[[int, int], list[str]]
    recorded_target: Callable[[Sequence], tuple[torch.Tensor, int] | None] = _nothing_recorded


class EditMethod:
    """Base class: holds the config and running state; subclasses implement ``compute`` and the state hooks."""

    name: ClassVar[str] = "base"
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # Named sets of option values (e.g. DeltaEdit's "paper" and "research"), applied over the model's defaults
    # and under the user's overrides; "default" (no change) is always available.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    one_layer: ClassVar[bool] = False  # edits exactly one layer (ROME, FT)

    def __init__(self, config: MethodConfig):
        self.config = config
        # W0's largest singular value per layer, for restrain="prune": W0 is fixed for a run, and its SVD costs
        # as much as the restraint's own on every write (derived, never saved)
        self._base_norms: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}
        # the last restrained composition's plain sum per layer (W0, its version, the updates, their sum)
        self._sums: dict[int, tuple[torch.Tensor, int, list[Update], torch.Tensor]] = {}

    @classmethod
    def default_layers(cls, n_layers: int) -> tuple[int, ...]:
        """The layers edited in a model of ``n_layers`` blocks that has no measured defaults (a one-layer method:
        the critical layer of the others)."""
        layers = heuristic_layers(n_layers)
        return layers[-1:] if cls.one_layer else layers

    def setup(self, context: EditContext) -> None:
        """Build state that does not depend on the edits (key statistics, projectors); called once."""

    def prefixes(self, context: EditContext) -> list[str]:
        """The prefixes this method puts before each prompt (the bare prompt first); the Editor checks that
        every request fits the model's context with each of them."""
        return [""]

    def compute(self, context: EditContext, requests: Sequence) -> Computed:
        """Compute one edit of ``requests`` (validated EditRequests), writing each layer through
        ``context.write``. Raise EditFailure for a numerical fault; the Editor restores the weights."""
        raise NotImplementedError

    # ---------------------------------------------------------------- running state
    def commit(self, updates: dict[int, Update], decision: Decision) -> None:
        """Fold a finished edit into the running state."""

    def revert(self, updates: dict[int, Update]) -> None:
        """Take a committed edit back out of the running state (for undo).

        Sums over edits (Kp Kp^T, Delta_hist) lose the edit's term; statistics of the stream of edits
        (DeltaEdit's threshold EMA) keep it: they describe what the method saw, and later decisions were
        made with it.
        """

    def reset(self) -> None:
        """Forget every committed edit, keeping what :meth:`setup` built.

        Afterwards the state equals, bit for bit, the state right after ``setup``, so replaying the same
        commits and reverts rebuilds it exactly (how the Editor rolls back and resumes).
        """

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore running state saved by :meth:`state_dict`."""

    def key_space(self, layer: int) -> dict[str, int] | None:
        """How much room for new edits the layer's key space has left: None for a method that does not confine
        its writes to a subspace of the keys."""
        return None

    def summary(self, decisions: Sequence[Decision]) -> str:
        """One line about this method's decisions over a run, for people (empty: nothing to say)."""
        return ""

    # ---------------------------------------------------------------- post-processing hooks
    def finalize_update(self, layer: int, update: Update, weight: torch.Tensor) -> Update:
        """The update as it will be written, given the layer's current weight. With ``sparsify`` (RECT): only
        the given fraction of entries with the largest relative change |dW| / |W| is kept."""
        keep = self.config.sparsify
        if not keep:
            return update
        delta = update.dense(weight.device)
        relative = delta.abs() / weight.detach().float().abs().clamp_min(1e-12)
        count = max(1, int(round(keep * relative.numel())))
        threshold = relative.reshape(-1).kthvalue(relative.numel() - count + 1).values
        return SparseUpdate.keep(delta, relative >= threshold, getattr(update, "keys", None))

    def compose(self, layer: int, base: torch.Tensor, updates: Sequence[Update]) -> torch.Tensor:
        """Layer ``layer``'s weight (float32) from its unedited weight and the updates in force, in order. The
        plain sum, or with ``restrain="prune"`` the sum's change restrained as PRUNE does."""
        if self.config.restrain == "none" or not updates:
            return summed(base, list(updates))
        total = self._running_sum(layer, base, list(updates))
        return base.float() + restrain_change(
            total - base.float(), self._base_norm(layer, base), self.config.restrain_function, self.config.restrain_base
        )

    def _running_sum(self, layer: int, base: torch.Tensor, updates: list[Update]) -> torch.Tensor:
        """``summed(base, updates)``, continuing the layer's previous sum where its updates begin these (the
        next edit's write adds one update, not all of them again). The same additions in the same order, so
        the same bits as a sum from scratch; anything else (an undo, another W0) sums from scratch."""
        cached = self._sums.get(layer)
        if (
            cached is not None
            and cached[0] is base
            and cached[1] == base._version
            and len(cached[2]) <= len(updates)
            and all(old is new for old, new in zip(cached[2], updates[: len(cached[2])], strict=True))
        ):
            total = cached[3].clone()
            for update in updates[len(cached[2]) :]:
                total += update.dense(total.device)
        else:
            total = summed(base, updates)
        self._sums[layer] = (base, base._version, updates, total)
        return total

    def _base_norm(self, layer: int, base: torch.Tensor) -> torch.Tensor:
        cached = self._base_norms.get(layer)
        if cached is None or cached[0] is not base or cached[1] != base._version:  # another or a changed W0
            cached = (base, base._version, torch.linalg.matrix_norm(base.double(), ord=2))
            self._base_norms[layer] = cached
        return cached[2]

    @property
    def composes_by_sum(self) -> bool:
        """Whether ``compose`` is the plain sum, so a new update can be added to the weight in place."""
        return self.config.restrain == "none"


def require_one_layer(config: MethodConfig, method: str) -> None:
    """The config check of a one-layer method."""
    if len(config.layers) != 1:
        raise ValueError(f"layers: {method} edits exactly one layer, got {list(config.layers)}; e.g. layers=[7]")


def heuristic_layers(n_layers: int) -> tuple[int, ...]:
    """Up to five consecutive layers ending a quarter of the way up (GPT2-XL 13-17 of 48, Llama3-8B 4-8
    of 32 both sit in the lower third): where MLPs store factual associations."""
    count = min(5, max(1, n_layers // 4))
    last = max(count - 1, round(0.25 * n_layers))
    return tuple(range(last - count + 1, last + 1))


def restrain_change(
    change: torch.Tensor, s_max: torch.Tensor, function: str = "log", base: float = math.e
) -> torch.Tensor:
    """PRUNE's restraint: singular values of ``change`` above ``s_max`` (the unedited weight's largest) are
    mapped to s_max + log_base(s / s_max) ("log") or (s + s_max) / 2 ("linear"); the singular vectors stay. Bounds
    the growth of the edited matrix's condition number however many edits accumulate."""
    # Only the few singular values above s_max change, so the change is corrected on their triplets alone,
    # found from the eigenvalues of the smaller Gram matrix (in float64 the large singular values come out
    # to full precision): about a third of a full SVD's time on a 1536 x 576 layer.
    c = change.double()
    wide = c.shape[0] < c.shape[1]
    eigenvalues, vectors = torch.linalg.eigh(c @ c.T if wide else c.T @ c)
    s = eigenvalues.clamp_min(0).sqrt()
    big = s > s_max
    if not bool(big.any()):
        return change
    s, vectors = s[big], vectors[:, big]
    if function == "log":
        log = torch.log(s / s_max)
        restrained = s_max + (log if base == math.e else log / math.log(base))
    else:
        restrained = (s + s_max) / 2
    left, right = (vectors, c.T @ vectors / s) if wide else (c @ vectors / s, vectors)
    return (c + (left * (restrained - s)) @ right.T).to(change.dtype)
