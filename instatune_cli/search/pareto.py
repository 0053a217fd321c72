"""Pareto fronts and hypervolume for mixed max/min objectives.

Everything is converted to minimisation first (value * sign). The front is the exact non-dominated set
(not a convex hull, which drops good points in concave parts of the front as DyNAS-T does). Points with
equal objective values are all kept (they are different sub-networks).

Reference point: hypervolume only compares runs measured against the SAME reference point, so it is a
parameter everywhere. `reference_point` gives the usual default: the worst value of each objective over a
set of points, pushed out by `margin` times that objective's range (so the extreme front points still
contribute). Benchmarks that compare runs should compute one such point over all runs, or fix it by hand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from instatune_cli.errors import InstatuneError
from instatune_cli.search.objectives import ObjectiveSpec


def to_min_matrix(rows: Sequence[Mapping[str, object]], objectives: Sequence[ObjectiveSpec]) -> np.ndarray:
    """(n, m) array of minimised objective values; missing values become NaN."""
    out = np.full((len(rows), len(objectives)), np.nan)
    for i, r in enumerate(rows):
        for j, o in enumerate(objectives):
            v = r.get(o.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[i, j] = o.to_min(v)
    return out


def nondominated_mask(points: np.ndarray) -> np.ndarray:
    """Exact non-dominated filter for minimisation: True where no other point is <= everywhere and < once.

    O(n^2 m) with numpy, fine for archives of thousands. Rows with a NaN are never on the front.
    """
    p = np.asarray(points, dtype=float)
    if p.ndim != 2:
        raise ValueError("points must be a 2-D array")
    n = len(p)
    finite = np.isfinite(p).all(axis=1)
    mask = finite.copy()
    q = p[finite]
    for i in np.flatnonzero(finite):
        le = (q <= p[i]).all(axis=1)
        lt = (q < p[i]).any(axis=1)
        if (le & lt).any():
            mask[i] = False
    return mask if n else np.zeros(0, dtype=bool)


def reference_point(points: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """Worst (largest, minimised) value per objective plus `margin` x range (or x |worst|, or 1, if flat)."""
    p = np.asarray(points, dtype=float)
    p = p[np.isfinite(p).all(axis=1)] if p.size else p
    if p.size == 0:
        raise InstatuneError(
            "cannot derive a hypervolume reference point: no evaluated point has all objectives"
        )
    worst, best = p.max(axis=0), p.min(axis=0)
    span = worst - best
    span = np.where(span > 0, span, np.where(np.abs(worst) > 0, np.abs(worst), 1.0))
    return worst + margin * span


def ref_to_min(ref: Mapping[str, float] | Sequence[float], objectives: Sequence[ObjectiveSpec]) -> np.ndarray:
    """A user reference point in natural units (dict by name or sequence in objective order), minimised."""
    if isinstance(ref, Mapping):
        missing = [o.name for o in objectives if o.name not in ref]
        if missing:
            raise InstatuneError(f"reference point lacks a value for {', '.join(missing)}")
        vals = [float(ref[o.name]) for o in objectives]
    else:
        vals = [float(v) for v in ref]
        if len(vals) != len(objectives):
            raise InstatuneError(f"reference point has {len(vals)} values for {len(objectives)} objectives")
    return np.array([o.to_min(v) for o, v in zip(objectives, vals, strict=True)])


def hypervolume(points: np.ndarray, ref: Sequence[float]) -> float:
    """Exact hypervolume (minimisation) of `points` w.r.t. `ref` via moocore; points not better than `ref`
    in every objective add nothing; rows with NaN are ignored."""
    import moocore

    p = np.asarray(points, dtype=float).reshape(-1, len(ref))
    p = p[np.isfinite(p).all(axis=1)]
    r = np.asarray(ref, dtype=float)
    p = p[(p < r).all(axis=1)]
    if len(p) == 0:
        return 0.0
    return float(moocore.hypervolume(p, ref=r))


def hypervolume_2d_bruteforce(points: Sequence[Sequence[float]], ref: Sequence[float]) -> float:
    """Pure-python 2-D hypervolume by summing grid cells (for tests): a cell [x_i, x_i+1] x [y_j, y_j+1]
    of the grid spanned by all coordinates counts when some point weakly dominates its lower-left corner."""
    rx, ry = float(ref[0]), float(ref[1])
    pts = [(float(x), float(y)) for x, y in points
           if math.isfinite(x) and math.isfinite(y) and x < rx and y < ry]
    xs = sorted({x for x, _ in pts} | {rx})
    ys = sorted({y for _, y in pts} | {ry})
    total = 0.0
    for i in range(len(xs) - 1):
        for j in range(len(ys) - 1):
            if any(x <= xs[i] and y <= ys[j] for x, y in pts):
                total += (xs[i + 1] - xs[i]) * (ys[j + 1] - ys[j])
    return total


def front_order(rows: Sequence[Mapping[str, object]], objectives: Sequence[ObjectiveSpec]) -> list[dict]:
    """Copies of `rows` numbered 1..K in field 'subnet': best value of the first objective first (for
    [acc, macs] subnet 1 is the most accurate, as in the paper's Table 1), ties by id."""
    first = objectives[0]
    ordered = sorted(rows, key=lambda r: (first.to_min(r[first.name]), str(r.get("id", ""))))  # type: ignore[arg-type]
    return [{"subnet": k, **r} for k, r in enumerate(ordered, start=1)]


def pareto_front(rows: Sequence[Mapping[str, object]], objectives: Sequence[ObjectiveSpec]) -> list[dict]:
    """The non-dominated rows (all rows given are candidates), numbered by `front_order`."""
    if not rows:
        return []
    mask = nondominated_mask(to_min_matrix(rows, objectives))
    return front_order([r for r, keep in zip(rows, mask, strict=True) if keep], objectives)
