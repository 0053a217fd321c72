"""Cheap predictors of measured objectives (accuracy, latency, ...) from sub-network features.

Per objective, ridge regression and an RBF-SVR compete; their hyper-parameters AND the winner are chosen
by K-fold cross-validation on everything measured so far (LINAS). Features are `space.features(sub)`, where
dropped layers are masked to zero so dead genes cannot influence a prediction. The reported CV error is
that of the chosen candidate, so it is slightly optimistic (the choice was made on the same folds).
Exact objectives (MACs, params) never get a predictor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from instatune_cli.space import SearchSpace, SubNet

MIN_CV_POINTS = 5
RIDGE_ALPHAS = (0.01, 0.1, 1.0, 10.0)
SVR_C = (1.0, 10.0, 100.0)
SVR_GAMMA = ("scale", 0.3, 3.0)


LOCAL_ALPHAS = (0.1, 1.0)
LOCAL_SHRINK = (0.5, 1.0)
LOCAL_RADIUS = 3  # layer genes that may differ for a measured config to count as a neighbour


def _candidates(local: bool) -> list[tuple[str, dict[str, Any]]]:
    out = [("ridge", {"alpha": a}) for a in RIDGE_ALPHAS] + [
        ("svr", {"C": c, "gamma": g, "epsilon": 0.05}) for c in SVR_C for g in SVR_GAMMA
    ]
    if local:
        out += [("ridge-local", {"alpha": a, "shrink": k}) for a in LOCAL_ALPHAS for k in LOCAL_SHRINK]
    return out


class _LocalRidge:
    """Ridge plus the shrunk, distance-weighted mean residual of measured neighbours.

    Sub-networks share weights, so two configs that differ in one or two layer genes compute almost the same
    function and miss a global fit in the same direction (on the tuned MiniLM: residual correlation 0.45 at
    one differing gene, 0.24 at two, ~0 from four). The correction carries a measured config's luck to its
    neighbours, which a smooth model cannot. Distance = number of differing per-layer feature columns."""

    def __init__(self, cols: tuple[int, int], alpha: float, shrink: float) -> None:
        from sklearn.linear_model import Ridge

        self.cols, self.shrink = cols, shrink
        self.ridge = Ridge(alpha=alpha)

    def fit(self, X: np.ndarray, y: np.ndarray) -> _LocalRidge:
        self.ridge.fit(X, y)
        self.keys = X[:, self.cols[0]:self.cols[1]]
        self.resid = y - self.ridge.predict(X)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        out = self.ridge.predict(X)
        keys = X[:, self.cols[0]:self.cols[1]]
        for start in range(0, len(X), 512):  # bounded memory for the surrogate's thousands of calls
            d = (keys[start:start + 512, None, :] != self.keys[None, :, :]).sum(axis=2)
            w = np.where(d <= LOCAL_RADIUS, np.exp(-d.astype(float)), 0.0)
            out[start:start + 512] += (w @ self.resid) / (w.sum(axis=1) + self.shrink)
        return out


class _Scaled:
    """A regressor on standardised targets: SVR's epsilon and C assume unit scale, latency in ms is not.
    (Hand-rolled rather than TransformedTargetRegressor, which doubled the cost of the CV loop.)"""

    def __init__(self, kind: str, params: Mapping[str, Any], local: tuple[int, int] | None = None) -> None:
        from sklearn.linear_model import Ridge
        from sklearn.svm import SVR

        if kind == "ridge-local":
            assert local is not None
            self.reg: Any = _LocalRidge(local, **params)
        else:
            self.reg = Ridge(**params) if kind == "ridge" else SVR(kernel="rbf", **params)
        self.mu, self.sd = 0.0, 1.0

    def fit(self, X: np.ndarray, y: np.ndarray) -> _Scaled:
        self.mu = float(y.mean())
        self.sd = float(y.std()) or 1.0
        self.reg.fit(X, (y - self.mu) / self.sd)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.reg.predict(X), float) * self.sd + self.mu


def _make(kind: str, params: Mapping[str, Any], local: tuple[int, int] | None = None) -> _Scaled:
    return _Scaled(kind, params, local)


def _r2(y: np.ndarray, pred: np.ndarray) -> float | None:
    ss = float(((y - y.mean()) ** 2).sum())
    return None if ss <= 0 else 1.0 - float(((y - pred) ** 2).sum()) / ss


@dataclass
class ObjectivePredictor:
    """A fitted predictor for one objective plus the cross-validated error it achieved."""

    objective: str
    kind: str = "ridge"
    params: dict[str, Any] = field(default_factory=dict)
    n_train: int = 0
    cv_mae: float | None = None
    cv_r2: float | None = None
    model: Any = None
    constant: float | None = None
    local: tuple[int, int] | None = None  # per-layer feature columns, enabling the ridge-local candidate

    def fit(self, X: np.ndarray, y: np.ndarray, seed: int = 0) -> ObjectivePredictor:
        """Choose model and hyper-parameters by K-fold CV (K = min(5, n)); under 5 points, plain ridge."""
        X, y = np.asarray(X, float), np.asarray(y, float)
        self.n_train = len(y)
        if len(y) == 0:  # every evaluation failed (NaN): predict NaN, which a search treats as infeasible
            self.kind, self.params, self.constant = "none", {}, math.nan
            return self
        if len(y) < 2 or float(np.ptp(y)) == 0.0:
            self.kind, self.params, self.constant = "constant", {}, float(y.mean())
            return self
        if len(y) < MIN_CV_POINTS:
            self.kind, self.params = "ridge", {"alpha": 1.0}
        else:
            from sklearn.model_selection import KFold

            folds = list(KFold(n_splits=min(5, len(y)), shuffle=True, random_state=seed).split(X))
            best: tuple[float, str, dict[str, Any], float | None] | None = None
            for kind, params in _candidates(self.local is not None):
                pred = np.empty_like(y)
                for tr, te in folds:
                    pred[te] = _make(kind, params, self.local).fit(X[tr], y[tr]).predict(X[te])
                mae = float(np.abs(pred - y).mean())
                if best is None or mae < best[0] - 1e-12:
                    best = (mae, kind, params, _r2(y, pred))
            assert best is not None
            self.cv_mae, self.kind, self.params, self.cv_r2 = best
        self.model = _make(self.kind, self.params, self.local).fit(X, y)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, float)
        if self.constant is not None:
            return np.full(len(X), self.constant)
        return np.asarray(self.model.predict(X), float).reshape(-1)

    def report(self) -> dict[str, Any]:
        return {"objective": self.objective, "model": self.kind, "params": dict(self.params),
                "n_train": self.n_train, "cv_mae": self.cv_mae, "cv_r2": self.cv_r2}


class Predictors:
    """One predictor per measured key, trained on archive rows; `predict(subs)` gives a dict of arrays."""

    def __init__(self, space: SearchSpace, names: Sequence[str]) -> None:
        self.space = space
        self.names = list(names)
        self.models: dict[str, ObjectivePredictor] = {}

    def features(self, subs: Sequence[SubNet]) -> np.ndarray:
        return np.array([self.space.features(s) for s in subs], dtype=float)

    def fit(self, rows: Sequence[Mapping[str, Any]], seed: int = 0) -> Predictors:
        """Fit on rows with a finite value for each key (failed or NaN evaluations are left out)."""
        for name in self.names:
            use = [r for r in rows if isinstance(r.get(name), (int, float)) and math.isfinite(float(r[name]))]
            X = self.features([SubNet.from_dict(r) for r in use])
            y = np.array([float(r[name]) for r in use])
            local = (1, 1 + 3 * self.space.max_layers)  # the per-layer block of SearchSpace.features
            self.models[name] = ObjectivePredictor(name, local=local).fit(X, y, seed=seed)
        return self

    def predict(self, subs: Sequence[SubNet]) -> dict[str, np.ndarray]:
        X = self.features(subs)
        return {name: m.predict(X) for name, m in self.models.items()}

    def report(self) -> list[dict[str, Any]]:
        return [m.report() for m in self.models.values()]
