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

A regression metric (pearson, spearman: a model with one output) collects the predictions instead of a
confusion matrix, so the correlation is exact; `accuracy` is then None, `mse` the mean squared error and `loss`
the same MSE, `constant` the score of a constant predictor (0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from instatune_cli.adapters import adapter_of
from instatune_cli.measure import metrics as M

_ACTIVE: Any = object()  # sentinel: measure the sub-network that is active now


@dataclass(frozen=True)
class EvalResult:
    """One pass over a split. `score` is the value of `metric` (accuracy when not given); `single_class`: every
    prediction was one class (a regressor: one value); `majority`: the split's majority-class rate; `constant`:
    the best constant predictor's score on `metric`; `collapsed`: see measure.metrics. A regressor has no
    `accuracy` (None) and reports `mse`."""

    accuracy: float | None
    loss: float
    n: int
    score: float | None = None
    metric: str = "accuracy"
    single_class: bool = False
    majority: float = 0.0
    collapsed: bool = False
    constant: float = 0.0
    mse: float | None = None

    def __post_init__(self) -> None:
        if self.score is None:
            object.__setattr__(self, "score", self.accuracy)

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "loss": self.loss, "n": self.n, "score": self.score,
                "metric": self.metric, "single_class": self.single_class, "majority": self.majority,
                "constant": self.constant, "mse": self.mse, "collapsed": self.collapsed}


class Evaluator:
    """Accuracy, `metric` (accuracy, f1 or mcc) and mean cross-entropy of the model's active sub-network on
    fixed batches."""

    def __init__(self, model: Any, batches: list[dict[str, torch.Tensor]], device: Any = None,
                 metric: str = "accuracy", shard: Any = None) -> None:
        """`shard` (a launched `distributed.Group`): this process passes over batches rank, rank + N, ... only and
        the confusion counts are summed across processes, so every process gets the whole split's result, the
        one a single process computes (counts are integers: the sum is exact). Every process must then call
        `evaluate` for the same sub-networks in the same order."""
        if not batches:
            raise ValueError("Evaluator needs at least one batch")
        self.metric = M.check_metric(metric)
        self.regression = M.is_regression(self.metric)
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        sizes = [int(b["labels"].shape[0]) for b in batches]
        self.n = sum(sizes)
        self.shard = shard if shard is not None and shard.active else None
        starts = [sum(sizes[:i]) for i in range(len(sizes))]  # where each batch's rows go in the whole split
        if self.shard is not None:
            batches, starts = batches[self.shard.rank :: self.shard.world], starts[self.shard.rank :: self.shard.world]
        self.batches = [{k: v.to(self.device) for k, v in b.items()} for b in batches]
        self.starts = starts

    def _activate(self, sub: Any) -> None:
        if sub is not _ACTIVE:
            adapter_of(self.model).activate(self.model, sub)

    def evaluate(self, sub: Any = _ACTIVE) -> EvalResult:
        """One pass: accuracy, the metric, mean CE and the collapse flags; `sub` (a SubNet, or None for the
        super-network) is activated first if given."""
        self._activate(sub)
        logits_of = _logits_fn(self.model)
        if self.regression:
            return self._evaluate_regression(logits_of)
        was_training = self.model.training
        self.model.eval()
        cm: torch.Tensor | None = None
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        try:
            with torch.inference_mode():
                for b in self.batches:
                    logits = logits_of(b)
                    c = int(logits.shape[-1])
                    if cm is None:
                        cm = torch.zeros(c * c, dtype=torch.long, device=self.device)
                    cm += torch.bincount(b["labels"] * c + logits.argmax(-1), minlength=c * c)
                    loss += F.cross_entropy(logits.float(), b["labels"], reduction="sum").double()
        finally:
            self.model.train(was_training)
        host = torch.cat([cm.double(), loss.view(1)]).tolist() if cm is not None else []  # the one host sync
        if self.shard is not None:  # a process with no batch adds nothing
            host = self.shard.sum_floats(host)
        assert host, "no batch was evaluated"
        c = int(round(len(host[:-1]) ** 0.5))
        counts = np.asarray(host[:-1], dtype=np.float64).reshape(c, c)
        flags = M.collapse_of(self.metric, counts)
        acc = float(np.trace(counts) / self.n)
        value = acc if self.metric == "accuracy" else M.score_confusion(self.metric, counts)
        return EvalResult(acc, host[-1] / self.n, self.n, value, self.metric, flags["single_class"],
                          flags["majority"], flags["collapsed"], flags["constant"])

    def _evaluate_regression(self, logits_of: Any) -> EvalResult:
        """One pass of a one-output regressor: every prediction and label in split order, so pearson and
        spearman are exact. Launched, each process writes its batches' rows into a zero vector of the whole
        split and the vectors are summed (adding zeros is exact): every process gets the single-process result."""
        was_training = self.model.training
        self.model.eval()
        preds = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        labels = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        try:
            with torch.inference_mode():
                for start, b in zip(self.starts, self.batches, strict=True):
                    out = logits_of(b)
                    if out.shape[-1] != 1:
                        raise ValueError(f"{self.metric} scores a regressor (one output); this model has "
                                         f"{out.shape[-1]}")
                    k = int(out.shape[0])
                    preds[start : start + k] = out[:, 0].double()
                    labels[start : start + k] = b["labels"].double()
        finally:
            self.model.train(was_training)
        host = torch.cat([preds, labels]).tolist()  # the one host sync
        if self.shard is not None:
            host = self.shard.sum_floats(host)
        p, y = np.asarray(host[: self.n]), np.asarray(host[self.n :])
        r = M.regression_scores(self.metric, p, y)
        return EvalResult(None, r["mse"], self.n, r["score"], self.metric, r["constant_output"], 0.0, r["collapsed"],
                          M.constant_score(self.metric, []), r["mse"])

    def accuracy(self, sub: Any = _ACTIVE) -> float | None:
        """Accuracy only (the same single pass); None for a regressor."""
        return self.evaluate(sub).accuracy

    def score(self, sub: Any = _ACTIVE) -> float:
        """The evaluator's metric only (the same single pass)."""
        return float(self.evaluate(sub).score)  # type: ignore[arg-type]

    __call__ = accuracy


def _logits_fn(model: Any) -> Any:
    """batch -> logits: through the model's family when it has one, else any module returning logits (or an
    object with `.logits`) from the batch's inputs."""
    family = getattr(model, "_instatune_adapter", None) or (adapter_of(model) if hasattr(model, "config") else None)
    if family is not None:
        return lambda b: family.logits(model, b)

    def plain(b: dict[str, Any]) -> Any:
        out = model(**{k: v for k, v in b.items() if k != "labels"})
        return getattr(out, "logits", out)

    return plain
