"""DeltaEdit (Algorithm 1 of the paper): AlphaEdit plus control of superimposed noise.

At the critical layer it keeps ``Delta_hist`` (the sum of earlier updates) and an EMA mean ``m`` and
variance ``v`` of the score ``s_e = ||Delta_hist k_e||^2``. When the score is an outlier (``s_e > m + eta
sqrt(v)`` after a warm-up) the target vector is optimized inside the orthogonal complement of a set of
directions, so the new influence vector does not overlap old ones. Which directions, how the threshold is
computed and fed, and how the directions are found are options; the presets name the two published choices:

* ``paper``: Algorithm 1 word for word: every direction of ``Delta_hist``'s column space (at most 3/4 of
  d_model), squared score on the context-averaged key, one-sided test, EMA from 0 fed by untriggered edits;
* ``research``: the public code's choices: plain-norm score of the bare prompt's key, two-sided test once
  ``v != 0``, warm-up 20, EMA from the first score with a non-empty history, randomized SVD of
  ``[Delta_hist k_e, Delta_hist]`` keeping at most d/4 directions with eigenvalue above 0.1;

The class default is the paper's trigger with ``constraint="targeted"`` (below), the best variant on
counterfact-val while keys were a flat mean of their prompts; with MEMIT's grouped key the research preset's
constraint measured best, and SmolLM2's entry in defaults.yaml takes it (docs/defaults-smollm2.md).
Two choices of this project, beyond the paper:

* ``constraint="targeted"``: the cross term of eq. 16 for edit e is ``2 (k_e^T beta_e) alpha_e^T (Delta_hist
  k_e)``, so alpha_e only has to avoid the directions ``Delta_hist k`` of this edit's keys (bare prompt and
  context prefixes), and with ``neighbors=m`` those of the m past keys most similar to it (whose edits this
  one's activation vector fires on): a handful of directions instead of up to 3/4 of d_model;
* ``ema_update="clipped"``: a triggered edit folds ``min(s_e, t)`` into the EMA, so a score that grows with
  the number of edits drags the threshold along instead of locking every later edit in;
* ``orthogonality="one_sided"`` (with the targeted constraint): eq. 16's cross term only adds noise when it is
  positive, so the target vector may point against ``Delta_hist k`` (cancel noise already at this edit's keys,
  which lowers ``||Delta_total k||``), only not along it: ``r^T delta <= 0`` instead of ``r^T delta = 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..target import HalfSpaces
from ..updates import Update
from .alphaedit import AlphaEdit, AlphaEditConfig
from .base import Decision

CHOICES = {
    "threshold_on": ("squared", "norm"),
    "score_key": ("mean", "prompt"),
    "ema_init": ("zero", "first"),
    "ema_update": ("untriggered", "clipped", "all"),
    "trigger": ("threshold", "always", "never"),
    "constraint": ("history", "targeted"),
    "targeted_keys": ("contexts", "mean"),
    "orthogonality": ("exact", "one_sided"),
    "neighbors_by": ("cosine", "activation"),
    "projection": ("eigh", "lowrank"),
}


@dataclass
class DeltaEditConfig(AlphaEditConfig):
    """eta: threshold width in EMA standard deviations (paper: 3 GPT2-XL, 1.5 Llama3-8B).
    ema_delta: EMA coefficient delta (paper 0.9). warmup: edits that never trigger (paper 5, research code 20).
    threshold_on: "squared" compares ||Delta_hist k||^2 (paper), "norm" compares ||Delta_hist k|| (research).
    score_key: the key the score reads: "mean" the context-averaged key the update uses (paper), "prompt"
        the bare prompt's key (research).
    two_sided: trigger on |s - m| > eta sqrt(v), and only once v > 0 (research), instead of s > m + eta sqrt(v).
    ema_init: "zero" starts m, v at 0 (paper); "first" starts m at the first score seen with a non-empty
        history, v at 0 (research; scores of an empty history are never folded in).
    ema_update: which edits feed the EMA: "untriggered" (paper), "clipped" (triggered ones fold min(s, t):
        the threshold cannot lock in), "all".
    trigger: "threshold" (the test above), "always" (every edit after the warm-up whose history is
        non-empty), "never" (AlphaEdit with DeltaEdit's bookkeeping).
    constraint: "history": directions of Delta_hist's column space (paper, research); "targeted": the responses
        Delta_hist k of this edit's prompt and context keys, plus those of the ``neighbors`` past keys this
        edit's update will fire on most: by cosine similarity to its key (``neighbors_by="cosine"``), or by the
        activation |beta_e^T k_j| its update at the critical layer will have on them ("activation"; beta_e is the
        solve's activation vector, known before the target vector is optimized).
    targeted_keys: which of the edit's keys the targeted constraint reads (constraint="targeted" only):
        "contexts" every prompt the target vector is optimized on (bare prompt and context prefixes), "mean" only
        the context-averaged key the update is solved for, the one eq. 16's cross term names: one direction per
        request, the least it can remove.
    orthogonality: "exact" keeps the target vector orthogonal to the constraint's directions (paper); "one_sided"
        (targeted constraint, no neighbors) only forbids a positive component along each response
        ``Delta_hist k`` of the edit's own keys, so the edit may cancel the noise already at them; in a batch
        each request is bounded by its own keys' responses (the decision's "rank" counts half-spaces).
    cap_fraction: at most this share of d_model directions is removed (paper 3/4; research d/4).
    projection: "eigh" decomposes D exactly; "lowrank" takes a randomized SVD of rank cap_fraction x d_model
        (research). D is Delta_hist Delta_hist^T, with include_response also + (Delta_hist k_e)(...)^T.
    eig_cut: eigenvalues of D at or below this absolute value are not removed (research 0.1); None keeps
        every eigenvalue above rank_rtol x the largest (the paper's "non-zero").
    project_moments: also project Adam's first moment after each step, not only the vector.
    """

    # The class defaults are the paper's trigger with the targeted constraint (a model's entry in defaults.yaml
    # may choose otherwise: SmolLM2's takes the research preset's; docs/defaults-smollm2.md)
    eta: float = 3.0
    ema_delta: float = 0.9
    warmup: int = 5
    threshold_on: str = "squared"
    score_key: str = "mean"
    two_sided: bool = False
    ema_init: str = "zero"
    ema_update: str = "untriggered"
    trigger: str = "threshold"
    constraint: str = "targeted"
    targeted_keys: str = "contexts"
    orthogonality: str = "exact"
    neighbors: int = 0
    neighbors_by: str = "cosine"
    cap_fraction: float = 0.75
    projection: str = "eigh"
    include_response: bool = False
    eig_cut: float | None = None
    rank_rtol: float = 1e-10
    project_moments: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: use one of {allowed}, not {getattr(self, name)!r}")
        if not 0 <= self.ema_delta <= 1:
            raise ValueError("ema_delta: must be in [0, 1]")
        if not 0 < self.cap_fraction <= 1:
            raise ValueError("cap_fraction: must be in (0, 1]")
        if self.warmup < 0 or self.neighbors < 0:
            raise ValueError(f"{'warmup' if self.warmup < 0 else 'neighbors'}: must be >= 0")
        if not math.isfinite(self.eta):
            raise ValueError("eta: must be a finite number")
        if self.orthogonality == "one_sided":
            # the sign of a past key's cross term depends on the new update's activation on it: no fixed side
            if self.constraint != "targeted" or self.neighbors:
                raise ValueError("orthogonality: 'one_sided' needs constraint='targeted' and neighbors=0")
            if self.project_moments:
                raise ValueError("project_moments: only with orthogonality='exact' (a cone is no subspace)")


class ThresholdTracker:
    """The dynamic threshold ``t = m + eta sqrt(v)`` and the EMA statistics behind it."""

    def __init__(self, config: DeltaEditConfig):
        self.config = config
        self.mean = 0.0
        self.var = 0.0
        self.seen = 0  # edits observed so far (triggered or not)
        self.updates = 0  # scores folded into the statistics

    @property
    def threshold(self) -> float:
        return self.mean + self.config.eta * math.sqrt(max(self.var, 0.0))

    def decide(self, score: float, history_empty: bool = False) -> tuple[bool, float]:
        """Whether this edit's score triggers the constraint, and the threshold used; changes nothing."""
        config, threshold = self.config, self.threshold
        if self.seen < config.warmup or config.trigger == "never":
            return False, threshold
        if config.trigger == "always":
            return not history_empty, threshold
        if config.two_sided:
            return self.var > 0 and abs(score - self.mean) > config.eta * math.sqrt(self.var), threshold
        return score > threshold, threshold

    def record(self, score: float, triggered: bool, history_empty: bool = False) -> None:
        """Fold a committed edit's score in, as ``ema_update`` and ``ema_init`` say."""
        config = self.config
        self.seen += 1
        if config.ema_init == "first" and history_empty:
            return  # a score of an empty history says nothing about the scores to come
        if triggered:
            if config.ema_update == "untriggered":
                return
            if config.ema_update == "clipped":
                score = min(score, self.threshold)
        if self.updates == 0 and config.ema_init == "first":
            self.mean, self.var = score, 0.0
        else:
            d = config.ema_delta
            self.mean = d * self.mean + (1 - d) * score
            self.var = d * self.var + (1 - d) * (score - self.mean) ** 2
        self.updates += 1

    def state(self) -> torch.Tensor:
        return torch.tensor([self.mean, self.var, float(self.seen), float(self.updates)], dtype=torch.float64)

    def load(self, values: torch.Tensor) -> None:
        self.mean, self.var, seen, updates = (float(x) for x in values.tolist())
        self.seen, self.updates = int(seen), int(updates)


def orthonormal_columns(vectors: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis (float32) of the span of ``vectors``' columns, numerically zero directions left out."""
    if vectors.numel() == 0:
        return vectors.new_zeros(vectors.shape[0], 0)
    u, s, _ = torch.linalg.svd(vectors.double(), full_matrices=False)
    keep = s > rtol * max(s.max().item(), 0.0)
    return u[:, keep].float()


class DeltaEdit(AlphaEdit):
    name = "deltaedit"
    config_class = DeltaEditConfig
    presets: ClassVar[dict[str, dict]] = {
        "paper": {
            "threshold_on": "squared",
            "score_key": "mean",
            "two_sided": False,
            "warmup": 5,
            "ema_delta": 0.9,
            "ema_init": "zero",
            "ema_update": "untriggered",
            "trigger": "threshold",
            "constraint": "history",
            "neighbors": 0,
            "neighbors_by": "cosine",
            "targeted_keys": "contexts",
            "orthogonality": "exact",
            "cap_fraction": 0.75,
            "projection": "eigh",
            "include_response": False,
            "eig_cut": None,
            "project_moments": False,
        },
        "research": {
            "threshold_on": "norm",
            "score_key": "prompt",
            "two_sided": True,
            "warmup": 20,
            "ema_delta": 0.9,
            "ema_init": "first",
            "ema_update": "untriggered",
            "trigger": "threshold",
            "constraint": "history",
            "neighbors": 0,
            "neighbors_by": "cosine",
            "targeted_keys": "contexts",
            "orthogonality": "exact",
            "cap_fraction": 0.25,
            "projection": "lowrank",
            "include_response": True,
            "eig_cut": 0.1,
            "project_moments": False,
        },
    }

    def __init__(self, config: DeltaEditConfig):
        super().__init__(config)
        self.tracker = ThresholdTracker(config)
        self.history: torch.Tensor | None = None  # Delta_hist at the critical layer (d_model x d_ff)
        self.past_keys: list[torch.Tensor] = []  # critical-layer key columns of the edits in force (`neighbors`)

    def build(self, second_moments, devices, d_model) -> None:
        super().build(second_moments, devices, d_model)
        critical = self.config.critical_layer
        if self.history is None:
            d_ff = second_moments[critical].shape[0]
            self.history = torch.zeros(d_model, d_ff, device=devices[critical])

    def influence_projector(self, keys, context_keys=None):
        """The constraint on this edit's target vector (None when it is off) and the decision.

        ``keys``: the edit's context-averaged keys at the critical layer (d_ff x n); ``context_keys``: the same
        keys per prompt (d_ff x n*c, request-major, context 0 the bare prompt).
        """
        config = self.config
        keys = keys.to(self.history.device)
        context_keys = keys if context_keys is None else context_keys.to(self.history.device)
        per_request = context_keys.shape[1] // keys.shape[1]
        scored = context_keys[:, ::per_request] if config.score_key == "prompt" else keys
        response = self.history @ scored  # d_model x n
        score = float((response**2).sum(0).mean())
        measured = math.sqrt(score) if config.threshold_on == "norm" else score
        history_empty = not bool(self.history.any())
        triggered, threshold = self.tracker.decide(measured, history_empty)
        decision = Decision(triggered, {"score": measured, "threshold": threshold, "history_empty": history_empty})
        if not triggered:
            return None, decision
        if config.orthogonality == "one_sided":
            # one cone per request: a request's cross term involves its own keys only, so its target vector is
            # signed against its own responses (a subspace, below, may be shared: removing more is still exact)
            own_keys = zip(keys.split(1, dim=1), context_keys.split(per_request, dim=1), strict=True)
            cones = [HalfSpaces(self._targeted_responses(mean, contexts)) for mean, contexts in own_keys]
            decision.metrics["rank"] = sum(cone.count for cone in cones)  # half-spaces: a bound, none removed
            return (cones[0] if len(cones) == 1 else cones), decision
        if config.constraint == "targeted":
            basis = orthonormal_columns(self._targeted_responses(keys, context_keys))[:, : self._cap()]
        else:
            basis = self._column_basis(self.history @ keys)
        decision.metrics["rank"] = basis.shape[1]
        projector = torch.eye(self.history.shape[0], device=basis.device) - basis @ basis.T
        return projector, decision

    def _cap(self) -> int:
        return int(self.config.cap_fraction * self.history.shape[0])

    def _targeted_responses(self, keys: torch.Tensor, context_keys: torch.Tensor) -> torch.Tensor:
        """The responses Delta_hist k (columns) of the edit's own keys and of its most similar past keys."""
        chosen = [keys] if self.config.targeted_keys == "mean" else [context_keys, keys]
        if self.config.neighbors and self.past_keys:
            past = torch.cat(self.past_keys, dim=1)
            if self.config.neighbors_by == "activation":  # how strongly this edit's update will fire on each
                _, beta = self.solve(self.config.critical_layer, keys, keys.new_zeros(1, keys.shape[1]))
                similarity = (past.T @ beta).abs()
            else:
                normalize = torch.nn.functional.normalize
                similarity = normalize(past, dim=0).T @ normalize(keys, dim=0)
            top = similarity.max(dim=1).values.topk(min(self.config.neighbors, past.shape[1])).indices
            chosen.append(past[:, top])
        return self.history @ torch.cat(chosen, dim=1)

    def _column_basis(self, response: torch.Tensor) -> torch.Tensor:
        """Orthonormal directions of D's column space to remove (the largest, capped)."""
        config, history = self.config, self.history
        cap = self._cap()
        stacked = torch.cat([response, history], dim=1) if config.include_response else history
        if config.projection == "lowrank":
            vectors, values = self._randomized_eigh(stacked.double(), cap)
        else:
            gram = stacked.double() @ stacked.double().T
            values, vectors = torch.linalg.eigh(gram)  # ascending
            values, vectors = values.flip(0)[:cap], vectors.flip(1)[:, :cap]
        cut = config.eig_cut if config.eig_cut is not None else config.rank_rtol * max(values.max().item(), 0.0)
        return vectors[:, values > cut].float()

    def _randomized_eigh(self, stacked: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``rank`` leading eigenpairs of ``stacked stacked^T`` by a seeded randomized SVD (Halko et al.),
        descending; scikit-learn's implementation, with its own random state (torch's global RNG untouched)."""
        from sklearn.utils.extmath import randomized_svd

        gram = (stacked @ stacked.T).cpu().numpy()
        u, s, _ = randomized_svd(gram, n_components=max(1, rank), random_state=self.config.seed)
        return torch.from_numpy(u).to(stacked.device), torch.from_numpy(s).to(stacked.device)

    def commit(self, updates: dict[int, Update], decision: Decision) -> None:
        super().commit(updates, decision)
        metrics = decision.metrics
        self.tracker.record(metrics["score"], decision.triggered, bool(metrics.get("history_empty", False)))
        critical = self.config.critical_layer
        self.history += updates[critical].dense().to(self.history.device)
        if self.config.neighbors:
            self.past_keys.extend(updates[critical].keys.to(self.history.device).split(1, dim=1))

    def revert(self, updates: dict[int, Update]) -> None:
        """Delta_hist, Kp Kp^T and the past keys lose the edit; the threshold tracker does not (see
        EditMethod.revert): an EMA cannot un-see a value once later values were folded in on top of it."""
        super().revert(updates)
        critical = updates[self.config.critical_layer]
        self.history -= critical.dense().to(self.history.device)
        for column in critical.keys.to(self.history.device).split(1, dim=1):
            for index in range(len(self.past_keys) - 1, -1, -1):
                if torch.equal(self.past_keys[index], column):
                    del self.past_keys[index]
                    break

    def reset(self) -> None:
        super().reset()
        self.tracker = ThresholdTracker(self.config)
        self.past_keys = []
        if self.history is not None:
            self.history = torch.zeros_like(self.history)

    def summary(self, decisions) -> str:
        fired = [d for d in decisions if d.triggered]
        if not decisions:
            return ""
        ranks = [d.metrics.get("rank", 0) for d in fired]
        removed = f", {sum(ranks) / len(ranks):.0f} directions removed on average" if ranks else ""
        return f"orthogonal constraint triggered on {len(fired)} of {len(decisions)} edits{removed}"

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        if self.history is not None:  # built by setup
            state["history"] = self.history
        state["threshold"] = self.tracker.state()
        if self.past_keys:
            state["past_keys"] = torch.cat(self.past_keys, dim=1)
        return state

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        if "history" in state:
            self.history = state["history"].to(self.history.device)
        if "threshold" in state:
            self.tracker.load(state["threshold"])
        if "past_keys" in state:
            self.past_keys = list(state["past_keys"].to(self.history.device).split(1, dim=1))
