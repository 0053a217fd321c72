"""Fast accuracy (and the task's metric) of the active (sub-)network on pre-tokenized batches.

The search evaluates hundreds of sub-networks on the same split: batches are built once (padded per
length group, moved to the model's device once) and every call is one pass under `torch.inference_mode()`;
the predictions stay on the device as a confusion matrix and come back with the loss in a single host sync.

    ev = Evaluator(model, batches, metric="mcc")  # batches: input_ids, attention_mask, (token_type_ids), labels
    adapter_of(model).activate(model, sub)
    acc = ev()                          # accuracy of whatever is active
    acc = ev.accuracy(sub)              # or let the evaluator activate `sub` (None = super-network) first
    mcc = ev.score(sub)                 # the evaluator's metric (see measure.metrics)
    res = ev.evaluate()                 # EvalResult: accuracy, loss, n, score, metric, single_class, collapsed
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from instatune_cli.measure import metrics as M

_ACTIVE: Any = object()  # sentinel: measure the sub-network that is active now


@dataclass(frozen=True)
class EvalResult:
    """One pass over a split. `score` is the value of `metric` (accuracy when not given); `single_class`: every
    prediction was one class; `majority`: the split's majority-class rate; `collapsed`: see measure.metrics."""

    accuracy: float
    loss: float
    n: int
    score: float | None = None
    metric: str = "accuracy"
    single_class: bool = False
    majority: float = 0.0
    collapsed: bool = False

    def __post_init__(self) -> None:
        if self.score is None:
            object.__setattr__(self, "score", self.accuracy)

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "loss": self.loss, "n": self.n, "score": self.score,
                "metric": self.metric, "single_class": self.single_class, "majority": self.majority,
                "collapsed": self.collapsed}


class Evaluator:
    """Accuracy, `metric` (accuracy, f1 or mcc) and mean cross-entropy of the model's active sub-network on
    fixed batches."""

    def __init__(self, model: Any, batches: list[dict[str, torch.Tensor]], device: Any = None,
                 metric: str = "accuracy") -> None:
        if not batches:
            raise ValueError("Evaluator needs at least one batch")
        self.metric = M.check_metric(metric)
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.batches = [{k: v.to(self.device) for k, v in b.items()} for b in batches]
        self.n = sum(int(b["labels"].shape[0]) for b in self.batches)

    def _activate(self, sub: Any) -> None:
        if sub is not _ACTIVE:
            from instatune_cli.adapters import adapter_of

            adapter_of(self.model).activate(self.model, sub)

    def evaluate(self, sub: Any = _ACTIVE) -> EvalResult:
        """One pass: accuracy, the metric, mean CE and the collapse flags; `sub` (a SubNet, or None for the
        super-network) is activated first if given."""
        from instatune_cli.adapters import adapter_of

        self._activate(sub)
        family = adapter_of(self.model)
        was_training = self.model.training
        self.model.eval()
        cm: torch.Tensor | None = None
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        try:
            with torch.inference_mode():
                for b in self.batches:
                    logits = family.logits(self.model, b)
                    c = int(logits.shape[-1])
                    if cm is None:
                        cm = torch.zeros(c * c, dtype=torch.long, device=self.device)
                    cm += torch.bincount(b["labels"] * c + logits.argmax(-1), minlength=c * c)
                    loss += F.cross_entropy(logits.float(), b["labels"], reduction="sum").double()
        finally:
            self.model.train(was_training)
        assert cm is not None
        host = torch.cat([cm.double(), loss.view(1)]).tolist()  # the one host sync
        c = int(round(len(host[:-1]) ** 0.5))
        counts = np.asarray(host[:-1], dtype=np.float64).reshape(c, c)
        flags = M.collapse_of(self.metric, counts)
        acc = float(np.trace(counts) / self.n)
        value = acc if self.metric == "accuracy" else M.score_confusion(self.metric, counts)
        return EvalResult(acc, host[-1] / self.n, self.n, value, self.metric, flags["single_class"],
                          flags["majority"], flags["collapsed"])

    def accuracy(self, sub: Any = _ACTIVE) -> float:
        """Accuracy only (the same single pass)."""
        return self.evaluate(sub).accuracy

    def score(self, sub: Any = _ACTIVE) -> float:
        """The evaluator's metric only (the same single pass)."""
        return float(self.evaluate(sub).score)  # type: ignore[arg-type]

    __call__ = accuracy
