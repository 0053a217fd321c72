"""Task metrics (accuracy, f1, mcc) on hand-computed cases, the collapse rule, and the Evaluator's one pass."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from instatune_cli.errors import InstatuneError
from instatune_cli.measure import metrics as M
from instatune_cli.measure.accuracy import EvalResult, Evaluator

# tp = 2 (rows 0, 4), fp = 1 (row 1), fn = 1 (row 3), tn = 2 (rows 2, 5)
PREDS = [1, 1, 0, 0, 1, 0]
LABELS = [1, 0, 0, 1, 1, 0]


@pytest.mark.parametrize("task,metric", [("cola", "mcc"), ("mrpc", "f1"), ("qqp", "f1"), ("QQP", "f1"),
                                         ("sst2", "accuracy"), ("mnli", "accuracy"), ("custom", "accuracy"),
                                         (None, "accuracy")])
def test_default_metric(task, metric):
    assert M.default_metric(task) == metric


def test_metric_names_match_the_tune_options():
    from instatune_cli.tune.config import METRICS

    assert M.METRICS == METRICS
    assert M.check_metric(" MCC ") == "mcc"
    with pytest.raises(InstatuneError, match=r"unknown --metric 'foo'; use accuracy, f1, mcc") as e:
        M.check_metric("foo")
    assert "\n" not in str(e.value)


def test_binary_hand_computed():
    assert M.score("accuracy", PREDS, LABELS) == pytest.approx(4 / 6)
    assert M.score("f1", PREDS, LABELS) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (4 - 1) / sqrt(3^4)
    assert M.score("mcc", PREDS, LABELS) == pytest.approx(1 / 3)
    assert M.score("mcc", LABELS, LABELS) == pytest.approx(1.0)
    assert M.score("mcc", [1 - y for y in LABELS], LABELS) == pytest.approx(-1.0)
    # f1 is of the positive class 1: the same predictions scored with the classes swapped differ
    swapped = M.score("f1", [1 - p for p in PREDS], [1 - y for y in LABELS])
    assert swapped == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # symmetric here: tn = tp
    assert M.score("f1", [1, 1, 1, 1], [1, 0, 0, 0]) == pytest.approx(2 / 5)
    assert M.score("f1", [1, 1, 1, 1], [0, 0, 0, 1]) == pytest.approx(2 / 5)
    assert M.score("f1", [0, 0], [0, 0]) == 0.0  # no positives at all: 0/0 counts as 0


def test_multiclass_hand_computed():
    preds, labels = [0, 1, 2, 2, 1, 0], [0, 1, 2, 1, 1, 2]
    # per class F1: class 0: tp 1 fp 1 fn 0 -> 2/3; class 1: tp 2 fp 0 fn 1 -> 4/5; class 2: tp 1 fp 1 fn 1 -> 1/2
    assert M.score("f1", preds, labels) == pytest.approx((2 / 3 + 4 / 5 + 1 / 2) / 3)
    # Gorodkin: c = 4, s = 6, t = (1, 3, 2), p = (2, 2, 2)
    num = 4 * 6 - (1 * 2 + 3 * 2 + 2 * 2)
    den = math.sqrt((36 - 12) * (36 - (1 + 9 + 4)))
    assert M.score("mcc", preds, labels) == pytest.approx(num / den)
    assert M.score("accuracy", preds, labels) == pytest.approx(4 / 6)
    # a split without some class of a 3-class task keeps macro F1 with num_classes
    assert M.score("f1", [0, 1, 1], [0, 1, 0], num_classes=3) == pytest.approx((2 / 3 + 2 / 3) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_scikit_learn(seed):
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    rng = np.random.default_rng(seed)
    for c in (2, 3, 5):
        y = rng.integers(0, c, 200)
        p = np.where(rng.random(200) < 0.6, y, rng.integers(0, c, 200))
        assert M.score("accuracy", p, y) == pytest.approx(accuracy_score(y, p))
        assert M.score("mcc", p, y) == pytest.approx(matthews_corrcoef(y, p))
        f1 = f1_score(y, p, average="binary" if c == 2 else "macro")
        assert M.score("f1", p, y, num_classes=c) == pytest.approx(f1)


def test_majority_rate_and_collapse_of_a_constant_predictor():
    labels = [0, 0, 0, 1]
    const = [0, 0, 0, 0]
    assert M.majority_rate(labels) == 0.75 and M.majority_rate([]) == 0.0
    assert M.single_class(const) and not M.single_class(PREDS)
    assert M.score("accuracy", const, labels) == 0.75
    assert M.score("mcc", const, labels) == 0.0 and M.score("f1", const, labels) == 0.0
    for metric in M.CLASSIFICATION_METRICS:
        flags = M.collapse_of(metric, M.confusion(const, labels))
        assert flags == {"single_class": True, "majority": 0.75, "constant": M.constant_score(metric, [3, 1]),
                         "collapsed": True}, metric
    # a varied predictor no better than a constant is collapsed under every metric (issue 18: MCC <= 0 too)
    varied = [0, 0, 1, 0]  # 2 right of 4 -> 0.5 < 0.75; MCC -1/3; F1 0 < always-1's 0.4
    for metric in M.CLASSIFICATION_METRICS:
        assert M.collapse_of(metric, M.confusion(varied, labels))["collapsed"], metric
    assert M.score("mcc", varied, labels) < 0
    better = ([1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 1, 0])  # 5/6 > 4/6, MCC > 0, F1 0.8 > always-1's 2*0.5/1.5
    for metric in M.CLASSIFICATION_METRICS:
        assert not M.collapse_of(metric, M.confusion(*better))["collapsed"], metric


class _Fixed(torch.nn.Module):
    """Logits from a lookup by the first input id: lets a test choose every prediction."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> object:
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def _batches(preds, labels, size=4):
    ids = torch.tensor(preds).view(-1, 1)
    y = torch.tensor(labels)
    return [{"input_ids": ids[i:i + size], "attention_mask": torch.ones_like(ids[i:i + size]),
             "labels": y[i:i + size]} for i in range(0, len(labels), size)]


@pytest.mark.parametrize("metric", M.CLASSIFICATION_METRICS)
def test_evaluator_scores_the_metric_in_one_pass(metric):
    model = _Fixed(torch.tensor([[2.0, -1.0], [-1.0, 2.0]]))  # id k -> predicts class k
    ev = Evaluator(model, _batches(PREDS, LABELS), metric=metric)
    res = ev.evaluate()
    assert res.metric == metric and res.n == 6
    assert res.accuracy == pytest.approx(4 / 6) == ev.accuracy() == ev()
    assert res.score == pytest.approx(M.score(metric, PREDS, LABELS)) == ev.score()
    assert not res.single_class and res.majority == 0.5
    # F1 2/3 is exactly what always answering 1 scores on a balanced split: no better than a constant
    assert res.collapsed == (metric == "f1") and res.constant == M.constant_score(metric, [3, 3])
    assert res.loss > 0 and set(res.to_dict()) >= {"accuracy", "loss", "n", "score", "metric", "collapsed"}


def test_evaluator_flags_a_constant_predictor():
    model = _Fixed(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))  # always class 0
    labels = [0, 0, 0, 1, 0, 1, 0, 0]
    for metric in M.CLASSIFICATION_METRICS:
        res = Evaluator(model, _batches([0, 1] * 4, labels), metric=metric).evaluate()
        assert res.single_class and res.collapsed and res.majority == 0.75, metric
        assert res.accuracy == 0.75
    assert Evaluator(model, _batches([0, 1] * 4, labels), metric="mcc").evaluate().score == 0.0
    with pytest.raises(InstatuneError, match="unknown --metric"):
        Evaluator(model, _batches([0], [0]), metric="auc")


def test_eval_result_keeps_its_old_constructor():
    r = EvalResult(0.8, 0.4, 10)
    assert r.score == 0.8 and r.metric == "accuracy" and not r.collapsed


def test_evaluator_scores_a_regressor_exactly():
    from types import SimpleNamespace

    class Reg(torch.nn.Module):
        def __init__(self, values):
            super().__init__()
            self.values = torch.nn.Parameter(torch.tensor(values).view(-1, 1))

        def forward(self, input_ids, attention_mask=None):
            return SimpleNamespace(logits=self.values[input_ids[:, 0]])

    y = [0.5, 1.0, 4.0, 2.5, 3.0, 5.0, 0.0]
    preds = [0.7, 1.5, 3.0, 2.0, 3.5, 4.0, 1.0]
    ids = torch.arange(7).view(-1, 1)
    batches = [{"input_ids": ids[i:i + 3], "attention_mask": torch.ones_like(ids[i:i + 3]),
                "labels": torch.tensor(y[i:i + 3])} for i in range(0, 7, 3)]
    for metric in M.REGRESSION_METRICS:
        res = Evaluator(Reg(preds), batches, metric=metric).evaluate()
        assert res.score == pytest.approx(M.score(metric, preds, y)) and res.accuracy is None
        assert res.mse == pytest.approx(np.mean((np.array(preds) - np.array(y)) ** 2)) == res.loss
        assert not res.collapsed and res.constant == 0.0
    flat = Evaluator(Reg([2.0] * 7), batches, metric="pearson").evaluate()
    assert flat.collapsed and flat.single_class and flat.score == 0.0
