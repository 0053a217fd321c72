import math
import random

import numpy as np
import pytest

from instatune_cli.search.predictors import ObjectivePredictor, Predictors
from instatune_cli.space import SearchSpace

SPACE = SearchSpace.from_dict({"layers": [2, 3, 4], "heads": [2, 4], "ffn": [8, 16, 32]})


def _target(sub):
    return 1 - math.exp(-sum(h / 4 + f / 64 for h, f in zip(sub.heads, sub.ffn, strict=True)) / 2)


def _rows(n, seed=0):
    rng = random.Random(seed)
    subs, seen = [], set()
    while len(subs) < n:
        s = SPACE.sample(rng)
        if s.id not in seen:
            seen.add(s.id)
            subs.append(s)
    return [{**s.to_dict(), "id": s.id, "acc": _target(s), "lat": 3.0 * s.layers} for s in subs]


def test_cv_picks_a_model_that_generalises():
    train, test = _rows(40, 0), _rows(80, 1)[40:]
    p = Predictors(SPACE, ["acc", "lat"]).fit(train, seed=0)
    rep = {r["objective"]: r for r in p.report()}
    assert rep["acc"]["model"] in {"ridge", "svr"} and rep["acc"]["n_train"] == 40
    assert rep["acc"]["cv_r2"] > 0.8 and rep["acc"]["cv_mae"] < 0.05
    from instatune_cli.space import SubNet
    pred = p.predict([SubNet.from_dict(r) for r in test])
    truth = np.array([r["acc"] for r in test])
    assert np.abs(pred["acc"] - truth).mean() < 0.05
    assert np.abs(pred["lat"] - np.array([r["lat"] for r in test])).mean() < 0.5


def test_tiny_and_degenerate_samples():
    X = np.random.default_rng(0).random((3, 13))
    p = ObjectivePredictor("acc").fit(X, np.array([0.1, 0.2, 0.3]))
    assert (p.kind, p.params, p.cv_mae) == ("ridge", {"alpha": 1.0}, None)
    assert p.predict(X).shape == (3,)
    c = ObjectivePredictor("acc").fit(X, np.array([0.5, 0.5, 0.5]))
    assert c.kind == "constant" and c.predict(X[:2]).tolist() == [0.5, 0.5]
    one = ObjectivePredictor("acc").fit(X[:1], np.array([0.7]))
    assert one.predict(X).tolist() == pytest.approx([0.7] * 3)


def test_rows_with_nan_are_left_out():
    rows = _rows(8)
    rows[0]["acc"] = float("nan")
    p = Predictors(SPACE, ["acc"]).fit(rows)
    assert p.models["acc"].n_train == 7
    for r in rows:
        r["acc"] = float("nan")
    assert math.isnan(Predictors(SPACE, ["acc"]).fit(rows).models["acc"].predict(np.zeros((1, 13)))[0])
