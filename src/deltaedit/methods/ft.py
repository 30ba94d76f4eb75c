"""FT: fine-tune one MLP's output projection on the new target (FT-L, the constrained baseline of ROME's and
MEMIT's comparisons; the unconstrained FT, which AlphaEdit's published FT hyperparameters use, as an option).

Adam on a change ``D`` of one layer's W_out (the model's own weight stays as it is while optimizing: ``D`` is
added to the projection's output by a hook), minimizing the target's negative log-likelihood on the edit
prompt, teacher-forced over every target token (ROME's implementation scores all target tokens at the prompt's
last position; we score each at its own position). FT-L keeps every entry of ``D`` within +-norm_constraint
after each step. The result is written as a dense update. No key statistics, no context prefixes, no KL term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..predict import final_logits, input_device
from ..requests import EditFailure
from ..target import frozen
from ..tokens import encode, pad, pad_id, target_ids
from ..updates import DenseUpdate
from .base import Computed, Decision, EditMethod, MethodConfig, require_one_layer


@dataclass
class FTConfig(MethodConfig):
    """layers: the one layer fine-tuned. steps / lr / weight_decay: Adam (ROME's FT-L hyperparameters for
    GPT2-XL: 25 steps, lr 5e-4, no decay). norm_constraint: the L-infinity bound on the change of each entry
    (ROME's FT-L: 5e-4). unbounded: fine-tune without the bound (FT). stop_loss: stop once the loss is below."""

    layers: tuple[int, ...] = (0,)
    steps: int = 25
    lr: float = 5e-4
    weight_decay: float = 0.0
    norm_constraint: float = 5e-4
    unbounded: bool = False
    stop_loss: float = 1e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        require_one_layer(self, "FT")
        if self.steps < 1 or self.lr <= 0 or self.norm_constraint <= 0:
            name = "steps" if self.steps < 1 else "lr" if self.lr <= 0 else "norm_constraint"
            raise ValueError(f"{name}: must be positive")


class FT(EditMethod):
    name = "ft"
    config_class = FTConfig
    one_layer = True

    def compute(self, context, requests) -> Computed:
        config = self.config
        model, parts, tokenizer = context.model, context.parts, context.tokenizer
        (layer,) = config.layers
        projection = parts.out_projs[layer]
        device = input_device(model)
        sequences, rows, cols, labels = [], [], [], []
        for row, request in enumerate(requests):
            prompt = encode(tokenizer, request.prompt, request.subject).ids
            target = target_ids(tokenizer, request)
            sequences.append(prompt + target[:-1])
            rows += [row] * len(target)
            cols += list(range(len(prompt) - 1, len(prompt) - 1 + len(target)))
            labels += target
        batch = pad(sequences, pad_id(tokenizer), device)
        rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
        labels_t = torch.tensor(labels, device=device)
        weight = projection.weight
        change = torch.zeros(parts.d_model, parts.d_ff, device=weight.device, requires_grad=True)
        optimizer = torch.optim.Adam([change], lr=config.lr, weight_decay=config.weight_decay)
        hook = projection.register_forward_hook(lambda _m, args, out: out + args[0] @ change.T.to(out.dtype))
        steps = 0
        try:
            with frozen(model), torch.enable_grad():
                for steps in range(1, config.steps + 1):
                    hidden = model.base_model(**batch.inputs(), use_cache=False).last_hidden_state
                    logits = final_logits(model, parts, hidden[rows_t, cols_t]).float()
                    loss = F.cross_entropy(logits, labels_t)
                    if not torch.isfinite(loss):
                        raise EditFailure(f"fine-tuning diverged (loss {loss.item()})", None, "update")
                    if loss.item() < config.stop_loss:
                        steps -= 1
                        break
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if not config.unbounded:
                        with torch.no_grad():
                            change.clamp_(-config.norm_constraint, config.norm_constraint)
        finally:
            hook.remove()
        update = context.write(layer, DenseUpdate(change.detach().clone()))
        return Computed({layer: update}, Decision(), steps)
