"""The Editor: owns a model, one method, its caches and running state, and applies edits in sequence.

One edit (a request or a small batch) runs the locate-then-edit loop:

1. validate every request against the tokenizer (nothing is touched if one is bad);
2. read the pre-edit keys at all edited layers and the critical block's output in one forward pass;
3. ask the method whether to constrain the target vector (DeltaEdit's decision), then optimize it;
4. for each edited layer, lowest first: re-read keys and the critical output with the weights as they
   now are, give the layer its share of the missing residual, solve, and add the low-rank update;
5. commit the edit into the method's running state and the history.

Steps 2-4 run against a snapshot of the edited weights: any exception restores them, so an edit lands
on all its layers or on none.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .corpus import generated_texts, resolve_corpus
from .defaults import default_config
from .methods import EditMethod, LayerUpdate, MethodConfig, method_class
from .methods.base import Decision
from .models import find_parts, fingerprint, out_weight
from .predict import score_answers
from .requests import EditRequest, RequestError, check_tokenization
from .stats import second_moments
from .target import optimize_target, read_keys

log = logging.getLogger(__name__)
CONTEXT_STARTS = ("The", "Therefore", "Because", "I", "You")


@dataclass
class EditResult:
    """What one edit did; ``target_prob`` is P(target_new | prompt) after the edit landed."""

    edit_id: int
    requests: tuple[EditRequest, ...]
    steps: int
    target_prob: float
    success: bool  # target_new is now the greedy continuation of every request's prompt
    score: float | None  # DeltaEdit's s_e
    threshold: float | None
    triggered: bool
    rank: int
    seconds: float


@dataclass
class AppliedEdit:
    """An edit as it stands in the model: enough to report, diagnose and take it back."""

    edit_id: int
    requests: tuple[EditRequest, ...]
    updates: dict[int, LayerUpdate]
    decision: Decision
    critical_key: torch.Tensor  # k_e at the critical layer (d_ff x n)
    self_response: float  # ||Delta_e k_e||^2 at the critical layer
    result: EditResult
    created: float = field(default_factory=time.time)


def _as_requests(requests: EditRequest | Iterable[EditRequest | dict]) -> list[EditRequest]:
    if isinstance(requests, EditRequest | dict):
        requests = [requests]
    out = []
    for item in requests:
        out.append(item if isinstance(item, EditRequest) else EditRequest.from_dict(dict(item)))
    if not out:
        raise RequestError("requests", "is empty; give at least one EditRequest")
    return out


class Editor:
    """Sequentially edit ``model`` with one method.

    >>> model, tokenizer = load_model("smollm2-135m")
    >>> editor = Editor(model, tokenizer, method="deltaedit")
    >>> editor.edit(EditRequest("The capital of {} is", "France", "Rome"))
    """

    def __init__(
        self,
        model,
        tokenizer,
        method: str = "deltaedit",
        config: MethodConfig | dict[str, Any] | None = None,
        data_dir: str | None = None,
        progress: bool = True,
        stats_store=None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.parts = find_parts(model)
        method_cls = method_class(method)
        if isinstance(config, MethodConfig):
            if not isinstance(config, method_cls.config_class):
                raise TypeError(f"config: a {type(config).__name__} does not configure {method_cls.name}")
            self.config = config
        else:
            self.config = default_config(model, method_cls, overrides=config or {})
        bad = [i for i in self.config.layers if not 0 <= i < self.parts.n_layers]
        if bad:
            raise ValueError(f"layers: {bad} out of range for a model with {self.parts.n_layers} layers")
        self.method: EditMethod = method_cls(self.config)
        self.data_dir = data_dir
        self.progress = progress
        self.stats_store = stats_store
        self.base_fingerprint = fingerprint(model)
        self.original_weights = {i: out_weight(self.parts.out_projs[i]).detach().clone() for i in self.config.layers}
        self.applied: list[AppliedEdit] = []
        self._next_id = 0
        self._contexts: list[str] | None = None
        self._ready = False

    # ------------------------------------------------------------------ setup
    @property
    def contexts(self) -> list[str]:
        """The bare prompt plus short generated prefixes (seeded), as MEMIT averages over."""
        if self._contexts is None:
            n = self.config.n_contexts
            texts = (
                generated_texts(
                    self.model,
                    self.tokenizer,
                    n,
                    self.config.context_tokens,
                    self.config.seed,
                    CONTEXT_STARTS,
                )
                if n
                else []
            )
            self._contexts = [""] + [t.replace("\n", " ").strip() + ". " for t in texts]
        return self._contexts

    def prepare(self) -> None:
        """Compute or load the key statistics and build the method's state (done on first edit)."""
        if self._ready:
            return
        moments: dict[int, torch.Tensor] = {}
        if self.method.needs_stats:
            corpus = resolve_corpus(self.config.stats_corpus, self.data_dir)
            if corpus.generated:
                log.warning(
                    "no text corpus found: key statistics come from text the model generates "
                    "(set DELTAEDIT_DATA or stats_corpus for Wikipedia statistics)"
                )
            moments = second_moments(
                self.model,
                self.parts,
                self.tokenizer,
                self.config.layers,
                corpus,
                self.config.stats_samples,
                self.config.stats_max_length,
                self.base_fingerprint,
                seed=self.config.seed,
                progress=self.progress,
                store=self.stats_store,
            )
        devices = {i: self.parts.out_projs[i].weight.device for i in self.config.layers}
        self.method.setup(moments, devices, self.parts.d_model)
        self._ready = True

    # ------------------------------------------------------------------ editing
    def validate(self, requests: Sequence[EditRequest]) -> None:
        from .models import context_length
        from .tokens import encode

        limit = context_length(self.model)
        prefixes = tuple(self.contexts) if limit is not None else ("",)
        for request in requests:
            check_tokenization(request, self.tokenizer, limit, prefixes)
            encode(self.tokenizer, request.prompt, request.subject)

    def edit(self, requests: EditRequest | Iterable[EditRequest | dict], batch_size: int = 1) -> list[EditResult]:
        """Apply requests in order, ``batch_size`` at a time; all are validated before any is applied."""
        requests = _as_requests(requests)
        self.validate(requests)
        results = []
        for begin in range(0, len(requests), batch_size):
            results.append(self._edit_batch(requests[begin : begin + batch_size]))
        return results

    def _edit_batch(self, requests: list[EditRequest]) -> EditResult:
        self.prepare()
        started = time.perf_counter()
        config, parts = self.config, self.parts
        layers, critical = config.layers, config.critical_layer
        snapshot = {i: out_weight(parts.out_projs[i]).detach().clone() for i in layers}
        try:
            keys, _ = read_keys(self.model, parts, self.tokenizer, requests, self.contexts, [critical])
            projector, decision = self.method.influence_projector(keys[critical])
            deltas, z_init, steps = [], [], 0
            for request in requests:
                found = optimize_target(
                    self.model,
                    parts,
                    self.tokenizer,
                    request,
                    self.contexts,
                    critical,
                    config.target_settings(),
                    projector,
                    getattr(config, "project_moments", False),
                )
                deltas.append(found.delta)
                z_init.append(found.z_init)
                steps = max(steps, found.steps)
            z_star = (torch.stack(z_init, 1) + torch.stack(deltas, 1)).float()
            updates = {}
            for position, layer in enumerate(layers):
                layer_keys, z_now = read_keys(
                    self.model, parts, self.tokenizer, requests, self.contexts, [layer], z_layer=critical
                )
                weight = out_weight(parts.out_projs[layer])
                residual = (z_star.to(weight.device) - z_now.to(weight.device)) / (len(layers) - position)
                left, right = self.method.solve(layer, layer_keys[layer].to(weight.device), residual)
                if not (torch.isfinite(left).all() and torch.isfinite(right).all()):
                    raise FloatingPointError(f"the update at layer {layer} is not finite")
                updates[layer] = LayerUpdate(left, right, layer_keys[layer].to(weight.device))
                with torch.no_grad():
                    weight.add_((left @ right.T).to(weight.dtype))
            result = self._finish(requests, updates, decision, steps, started)
        except BaseException:
            with torch.no_grad():
                for i, saved in snapshot.items():
                    out_weight(parts.out_projs[i]).copy_(saved)
            raise
        return result

    def _finish(self, requests, updates, decision, steps, started) -> EditResult:
        critical = self.config.critical_layer
        scores = score_answers(
            self.model,
            self.parts,
            self.tokenizer,
            [r.text for r in requests],
            [r.target_new for r in requests],
        )
        critical_key = updates[critical].keys
        response = updates[critical].left @ (updates[critical].right.T @ critical_key)
        self.method.commit(updates, decision)
        result = EditResult(
            edit_id=self._next_id,
            requests=tuple(requests),
            steps=steps,
            target_prob=sum(s.prob for s in scores) / len(scores),
            success=all(s.greedy for s in scores),
            score=decision.score,
            threshold=decision.threshold,
            triggered=decision.triggered,
            rank=decision.rank,
            seconds=time.perf_counter() - started,
        )
        self.applied.append(
            AppliedEdit(
                self._next_id,
                tuple(requests),
                updates,
                decision,
                critical_key,
                float((response**2).sum()),
                result,
            )
        )
        self._next_id += 1
        return result

    # ------------------------------------------------------------------ state
    def weight_delta(self, layer: int) -> torch.Tensor:
        """The current total change of ``layer``'s W_out (d_model x d_ff, float32)."""
        return out_weight(self.parts.out_projs[layer]).detach().float() - self.original_weights[layer].float()

    def restore(self) -> None:
        """Put the original weights back and forget every edit and all running state."""
        with torch.no_grad():
            for i, saved in self.original_weights.items():
                out_weight(self.parts.out_projs[i]).copy_(saved)
        self.applied.clear()
        self.method = type(self.method)(self.config)
        self._ready = False
