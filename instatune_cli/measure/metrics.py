"""The metric a task is judged by, computed exactly from predictions (or from a confusion matrix).

GLUE judges CoLA by Matthews correlation and MRPC / QQP by F1 (their accuracy is reported beside it);
every other classification task here by accuracy. A user's own data picks `--metric` at tune time.

- accuracy: fraction of correct predictions.
- f1: binary F1 of the positive class 1 when there are two classes (GLUE's convention); with more classes
  the macro average of the per-class F1 over the classes that occur in the labels or the predictions
  (scikit-learn's `f1_score(average="macro")`). 0/0 counts as 0.
- mcc: Matthews correlation, the multi-class form (Gorodkin's R_K, what scikit-learn's `matthews_corrcoef`
  computes); 0 when undefined (a single class predicted or present).

A sub-network is *collapsed* when it has learned nothing about the inputs: for accuracy, a score at or below
the majority-class rate of the split (what always answering the commonest class scores); for f1 and mcc, one
class predicted for every example. A front of collapsed sub-networks is not a front, so the search flags them.

Pure numpy, so importing it costs nothing (no sklearn, no torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from instatune_cli.errors import InstatuneError

METRICS = ("accuracy", "f1", "mcc")
TASK_METRICS = {"cola": "mcc", "mrpc": "f1", "qqp": "f1"}
_EPS = 1e-12


def default_metric(task: str | None) -> str:
    """The metric a task is judged by: mcc for CoLA, f1 for MRPC and QQP, accuracy otherwise (own data too)."""
    return TASK_METRICS.get(str(task or "").strip().lower(), "accuracy")


def check_metric(name: str | None, option: str = "--metric") -> str:
    """`name` lower-cased if it is a known metric; else a one-line InstatuneError naming the choices."""
    key = str(name or "").strip().lower()
    if key not in METRICS:
        raise InstatuneError(f"unknown {option} {name!r}; use {', '.join(METRICS)}")
    return key


def confusion(preds: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray,
              num_classes: int | None = None) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    p = np.asarray(preds, dtype=np.int64).ravel()
    y = np.asarray(labels, dtype=np.int64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions for {y.size} labels")
    if (p < 0).any() or (y < 0).any():
        raise ValueError("class ids must be >= 0")
    c = max(int(num_classes or 0), int(p.max(initial=-1)) + 1, int(y.max(initial=-1)) + 1, 2)
    return np.bincount(y * c + p, minlength=c * c).reshape(c, c)


def score_confusion(metric: str, cm: np.ndarray) -> float:
    """The metric's value from a confusion matrix (rows true, columns predicted); see the module docstring."""
    metric = check_metric(metric)
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.sum()
    if n <= 0:
        return 0.0
    if metric == "accuracy":
        return float(np.trace(cm) / n)
    if metric == "mcc":
        t, p = cm.sum(axis=1), cm.sum(axis=0)
        cov = np.trace(cm) * n - float(t @ p)
        den = (n * n - float(p @ p)) * (n * n - float(t @ t))
        return float(cov / np.sqrt(den)) if den > 0 else 0.0
    tp = np.diag(cm)
    fp, fn = cm.sum(axis=0) - tp, cm.sum(axis=1) - tp
    if len(cm) == 2:
        d = 2 * tp[1] + fp[1] + fn[1]
        return float(2 * tp[1] / d) if d > 0 else 0.0
    seen = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    d = 2 * tp + fp + fn
    per = np.divide(2 * tp, d, out=np.zeros_like(tp), where=d > 0)
    return float(per[seen].mean()) if seen.any() else 0.0


def score(metric: str, preds: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray,
          num_classes: int | None = None) -> float:
    """accuracy, f1 or mcc of class-id predictions against class-id labels; pass `num_classes` when a split
    may lack some classes (f1 is binary only for a two-class task)."""
    return score_confusion(metric, confusion(preds, labels, num_classes))


def majority_rate(labels: Sequence[int] | np.ndarray) -> float:
    """Share of the commonest class: the accuracy of always predicting it (0 for no labels)."""
    y = np.asarray(labels, dtype=np.int64).ravel()
    return float(np.bincount(y).max() / y.size) if y.size else 0.0


def single_class(preds: Sequence[int] | np.ndarray) -> bool:
    """True when every prediction is the same class."""
    return len(np.unique(np.asarray(preds).ravel())) <= 1


def is_collapsed(metric: str, value: float, majority: float, one_class: bool) -> bool:
    """The collapse rule of the module docstring: accuracy at or below the majority rate, or (f1, mcc) one
    class predicted for everything."""
    if check_metric(metric) == "accuracy":
        return one_class or value <= majority + _EPS
    return one_class


def collapse_of(metric: str, cm: np.ndarray) -> dict[str, Any]:
    """{"single_class", "majority", "collapsed"} of a confusion matrix."""
    cm = np.asarray(cm)
    n = cm.sum()
    one = int((cm.sum(axis=0) > 0).sum()) <= 1
    majority = float(cm.sum(axis=1).max() / n) if n else 0.0
    return {"single_class": one, "majority": majority,
            "collapsed": is_collapsed(metric, score_confusion(metric, cm), majority, one)}
