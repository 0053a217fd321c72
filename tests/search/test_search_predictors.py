import math
import random

import numpy as np
import pytest

from instatune_cli.search.predictors import LOCAL_RADIUS, ObjectivePredictor, Predictors, _LocalRidge, _make
from instatune_cli.space import SearchSpace, SubNet

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
    assert rep["acc"]["model"] in {"ridge", "svr", "ridge-local"} and rep["acc"]["n_train"] == 40
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


WIDE = SearchSpace.from_dict({"layers": [3, 4], "heads": [2, 4, 6, 8], "ffn": [8, 16, 32, 64]})


def _mutant(sub, rng):
    """`sub` with one layer gene changed (a neighbour at distance 1 in the per-layer features)."""
    heads, ffn = list(sub.heads), list(sub.ffn)
    i = rng.randrange(sub.layers)
    if rng.random() < 0.5:
        heads[i] = rng.choice([h for h in WIDE.heads[i] if h != heads[i]])
    else:
        ffn[i] = rng.choice([f for f in WIDE.ffn[i] if f != ffn[i]])
    return SubNet(tuple(heads), tuple(ffn))


def _clustered_rows(seed):
    """Configs in clusters of near neighbours whose values share a per-cluster offset that no smooth
    function of the features explains: what weight sharing does to sub-network accuracies."""
    rng = random.Random(seed)
    rows, seen = [], set()
    for cluster in range(20):
        centre, luck = WIDE.sample(rng), rng.gauss(0.0, 0.05)
        for sub in [centre] + [_mutant(centre, rng) for _ in range(5)]:
            if sub.id not in seen:
                seen.add(sub.id)
                smooth = sum(h / 8 + f / 64 for h, f in zip(sub.heads, sub.ffn, strict=True)) / 10
                rows.append({**sub.to_dict(), "id": sub.id, "acc": smooth + luck, "cluster": cluster})
    return rows


def test_ridge_local_carries_measured_neighbours_errors():
    rows = _clustered_rows(0)
    last = {r["cluster"]: i for i, r in enumerate(rows)}  # one member of each cluster held out
    train = [r for i, r in enumerate(rows) if i not in last.values()]
    test = [rows[i] for i in last.values()]
    p = Predictors(WIDE, ["acc"]).fit(train, seed=0)
    assert p.models["acc"].kind == "ridge-local"
    Xtr = p.features([SubNet.from_dict(r) for r in train])
    ytr = np.array([r["acc"] for r in train])
    X = p.features([SubNet.from_dict(r) for r in test])
    y = np.array([r["acc"] for r in test])
    local = _make("ridge-local", {"alpha": 0.1, "shrink": 0.5}, (1, 1 + 3 * WIDE.max_layers)).fit(Xtr, ytr)
    ridge = _make("ridge", {"alpha": 0.1}).fit(Xtr, ytr)
    assert np.abs(local.predict(X) - y).mean() < 0.7 * np.abs(ridge.predict(X) - y).mean()
    assert ObjectivePredictor("acc").fit(Xtr, ytr).local is None  # no per-layer columns, no local candidate


def test_local_ridge_corrects_only_near_neighbours():
    rng = np.random.default_rng(0)
    cols = (1, 7)
    X = rng.integers(0, 3, size=(30, 8)).astype(float)
    y = X @ rng.random(8)
    y[0] += 1.0  # one measured config far above the linear trend
    m = _LocalRidge(cols, alpha=0.1, shrink=0.5).fit(X, y)
    near, far = X[:1].copy(), X[:1].copy()
    near[0, 1] += 7.0  # one per-layer column differs
    far[0, cols[0]:cols[1]] += 7.0  # every per-layer column differs: beyond the radius of any row
    assert LOCAL_RADIUS < cols[1] - cols[0]
    assert m.predict(far)[0] == pytest.approx(m.ridge.predict(far)[0])
    assert m.predict(near)[0] > m.ridge.predict(near)[0] + 0.2
