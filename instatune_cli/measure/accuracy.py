"""Fast accuracy of the active (sub-)network on pre-tokenized eval batches.

The search evaluates hundreds of sub-networks on the same eval split: batches are built once (padded per
length group, moved to the model's device once) and every call is one pass under `torch.inference_mode()`
with a single host sync at the end.

    ev = Evaluator(model, batches)      # batches: dicts with input_ids, attention_mask, (token_type_ids), labels
    adapter_of(model).activate(model, sub)
    acc = ev()                          # accuracy of whatever is active
    acc = ev.accuracy(sub)              # or let the evaluator activate `sub` (None = super-network) first
    res = ev.evaluate()                 # EvalResult(accuracy, loss, n)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

_ACTIVE: Any = object()  # sentinel: measure the sub-network that is active now


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    loss: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "loss": self.loss, "n": self.n}


class Evaluator:
    """Accuracy (and mean cross-entropy) of the model's active sub-network on fixed batches."""

    def __init__(self, model: Any, batches: list[dict[str, torch.Tensor]], device: Any = None) -> None:
        if not batches:
            raise ValueError("Evaluator needs at least one batch")
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.batches = [{k: v.to(self.device) for k, v in b.items()} for b in batches]
        self.n = sum(int(b["labels"].shape[0]) for b in self.batches)

    def _activate(self, sub: Any) -> None:
        if sub is not _ACTIVE:
            from instatune_cli.adapters import adapter_of

            adapter_of(self.model).activate(self.model, sub)

    def evaluate(self, sub: Any = _ACTIVE) -> EvalResult:
        """Accuracy and mean CE; `sub` (a SubNet, or None for the super-network) is activated first if given."""
        self._activate(sub)
        was_training = self.model.training
        self.model.eval()
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        try:
            with torch.inference_mode():
                for b in self.batches:
                    inputs = {k: v for k, v in b.items() if k != "labels"}
                    logits = self.model(**inputs).logits
                    correct += (logits.argmax(-1) == b["labels"]).sum()
                    loss += F.cross_entropy(logits.float(), b["labels"], reduction="sum").double()
        finally:
            self.model.train(was_training)
        return EvalResult(correct.item() / self.n, loss.item() / self.n, self.n)

    def accuracy(self, sub: Any = _ACTIVE) -> float:
        """Accuracy only (the same single pass)."""
        return self.evaluate(sub).accuracy

    __call__ = accuracy
