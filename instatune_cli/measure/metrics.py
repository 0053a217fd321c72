"""The metric a task is judged by, computed exactly from predictions (or from a confusion matrix).

GLUE judges CoLA by Matthews correlation, MRPC / QQP by F1 (their accuracy is reported beside it) and STS-B,
a regression task, by Pearson correlation (Spearman beside it); every other classification task here by
accuracy. A user's own data picks `--metric` at tune time; a regression metric there trains a regressor.

- accuracy: fraction of correct predictions.
- f1: binary F1 of the positive class 1 when there are two classes (GLUE's convention); with more classes
  the macro average of the per-class F1 over the classes that occur in the labels or the predictions
  (scikit-learn's `f1_score(average="macro")`). 0/0 counts as 0.
- mcc: Matthews correlation, the multi-class form (Gorodkin's R_K, what scikit-learn's `matthews_corrcoef`
  computes); 0 when undefined (a single class predicted or present).
- pearson, spearman (regression): the correlation of predictions and real-valued labels; spearman is the
  pearson of their ranks, ties given their average rank (scipy's `rankdata`). 0 when undefined (a constant).

A sub-network is *collapsed* when it is no better than a constant predictor on the task's metric, i.e. has
learned nothing about the inputs: for a classifier, a score at or below what the best constant class
prediction scores on the split (`constant_score`: the majority-class rate for accuracy, 0 for mcc, the F1 of
always answering the positive class for binary f1); for a regressor, a correlation at or below 0, or none
at all (a constant output). A front of collapsed sub-networks is not a front, so the search flags them and
never picks one.

Pure numpy, so importing it costs nothing (no sklearn, scipy or torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from instatune_cli.errors import InstatuneError

CLASSIFICATION_METRICS = ("accuracy", "f1", "mcc")
REGRESSION_METRICS = ("pearson", "spearman")
METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS
CORRELATIONS = ("mcc", "pearson", "spearman")  # printed as numbers (0.873), not as percentages
TASK_METRICS = {"cola": "mcc", "mrpc": "f1", "qqp": "f1", "stsb": "pearson"}
_EPS = 1e-12


def default_metric(task: str | None, regression: bool = False) -> str:
    """The metric a task is judged by: mcc for CoLA, f1 for MRPC and QQP, pearson for STS-B (and any
    regression), accuracy otherwise (own data too)."""
    return TASK_METRICS.get(str(task or "").strip().lower(), "pearson" if regression else "accuracy")


def is_regression(metric: str) -> bool:
    """Whether `metric` scores a regressor (pearson, spearman) rather than a classifier."""
    return check_metric(metric) in REGRESSION_METRICS


def check_metric_kind(metric: str, regression: bool, what: str = "the task", option: str = "--metric") -> str:
    """`metric` if it scores the kind of model `what` is (a regressor or a classifier); else one line naming the
    metrics that fit."""
    m = check_metric(metric, option)
    if is_regression(m) and not regression:
        raise InstatuneError(f"{option} {m} scores a regressor but {what} is a classification task; use "
                             f"{', '.join(CLASSIFICATION_METRICS)} (a regressor needs real-valued labels and a "
                             "regression metric at tune time)")
    if regression and not is_regression(m):
        raise InstatuneError(f"{option} {m} scores classes but {what} is a regression task (real-valued labels); "
                             f"use {' or '.join(REGRESSION_METRICS)}")
    return m


def format_score(metric: str, value: float | None) -> str:
    """A score as users read it: correlations (mcc, pearson, spearman) as numbers (`0.8730`), shares
    (accuracy, f1) as percentages (`87.30%`)."""
    if value is None:
        return "-"
    if str(metric).strip().lower() in CORRELATIONS:
        return f"{float(value):.4f}"
    return f"{100 * float(value):.2f}%"


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
    if metric in REGRESSION_METRICS:
        raise ValueError(f"{metric} scores real-valued predictions, not a confusion matrix")
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
    may lack some classes (f1 is binary only for a two-class task). pearson / spearman of real-valued
    predictions against real-valued labels (0 when undefined)."""
    if is_regression(metric):
        return float(regression_scores(metric, preds, labels)["score"])
    return score_confusion(metric, confusion(preds, labels, num_classes))


def majority_rate(labels: Sequence[int] | np.ndarray) -> float:
    """Share of the commonest class: the accuracy of always predicting it (0 for no labels)."""
    y = np.asarray(labels, dtype=np.int64).ravel()
    return float(np.bincount(y).max() / y.size) if y.size else 0.0


def single_class(preds: Sequence[int] | np.ndarray) -> bool:
    """True when every prediction is the same class."""
    return len(np.unique(np.asarray(preds).ravel())) <= 1


def constant_score(metric: str, class_counts: Sequence[int] | np.ndarray) -> float:
    """The best score a constant predictor gets on a split with these per-class label counts: the max over
    classes k of the metric of always answering k (accuracy: the majority rate; mcc: 0; binary f1: the F1 of
    always answering the positive class, 2p / (1 + p) for a positive rate p). For a regression metric, 0 (a
    constant has no correlation)."""
    if is_regression(metric):
        return 0.0
    counts = np.asarray(class_counts, dtype=np.float64).ravel()
    c = max(len(counts), 2)
    best = 0.0
    for k in range(c):
        cm = np.zeros((c, c))
        cm[: len(counts), k] = counts
        best = max(best, score_confusion(metric, cm))
    return best


def is_collapsed(metric: str, value: float | None, constant: float, one_output: bool = False) -> bool:
    """The collapse rule of the module docstring: a score at or below the best constant predictor's
    (`constant`, see `constant_score`), an undefined score (None / NaN), or one class (or one value)
    predicted for every example."""
    check_metric(metric)
    if one_output or value is None or not np.isfinite(value):
        return True
    return bool(value <= constant + _EPS)


def collapse_of(metric: str, cm: np.ndarray) -> dict[str, Any]:
    """{"single_class", "majority", "constant", "collapsed"} of a confusion matrix: `majority` is the split's
    majority-class rate, `constant` the best constant predictor's score on `metric`."""
    cm = np.asarray(cm)
    n = cm.sum()
    one = int((cm.sum(axis=0) > 0).sum()) <= 1
    majority = float(cm.sum(axis=1).max() / n) if n else 0.0
    constant = constant_score(metric, cm.sum(axis=1))
    return {"single_class": one, "majority": majority, "constant": constant,
            "collapsed": is_collapsed(metric, score_confusion(metric, cm), constant, one)}


# ---- regression ---------------------------------------------------------------------------------------

def rankdata(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks, tied values given the average of their ranks (scipy.stats.rankdata's 'average')."""
    a = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0  # ranks starts+1 .. ends, averaged
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def pearson(preds: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray) -> float | None:
    """Pearson correlation; None when undefined (fewer than two values, or either side constant)."""
    x = np.asarray(preds, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{x.size} predictions for {y.size} labels")
    if x.size < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    den = float(np.sqrt((dx @ dx) * (dy @ dy)))
    if not den > 0 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.clip((dx @ dy) / den, -1.0, 1.0))


def spearman(preds: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray) -> float | None:
    """Spearman rank correlation: pearson of the average ranks; None when undefined."""
    return pearson(rankdata(preds), rankdata(labels))


def regression_scores(metric: str, preds: Sequence[float] | np.ndarray,
                      labels: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """{"score" (the metric, 0 when undefined), "mse", "constant_output", "collapsed"} of real-valued
    predictions; `collapsed` follows the module docstring's rule (correlation <= 0 or undefined)."""
    metric = check_metric(metric)
    if not is_regression(metric):
        raise ValueError(f"{metric} is not a regression metric")
    x = np.asarray(preds, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    value = (pearson if metric == "pearson" else spearman)(x, y)
    constant = bool(x.size == 0 or np.ptp(x) == 0)
    return {"score": 0.0 if value is None else value, "mse": float(np.mean((x - y) ** 2)) if x.size else 0.0,
            "constant_output": constant, "collapsed": is_collapsed(metric, value, 0.0, constant)}


def eval_score(batches: list[dict[str, Any]], logits_of: Any, metric: str, num_labels: int) -> dict[str, Any]:
    """The run's metric of `logits_of(batch)` over the eval split's labelled `batches` (what `quantize` and
    `export --int8` report before and after INT8)."""
    preds, labels = [], []
    for b in batches:
        out = np.asarray(logits_of(b))
        preds.append(out[:, 0] if is_regression(metric) else out.argmax(-1))  # a regressor's one output
        labels.append(b["labels"].numpy())
    p, y = np.concatenate(preds), np.concatenate(labels)
    return {"metric": metric, "score": score(metric, p, y, num_labels), "n": int(len(y)), "split": "eval"}
