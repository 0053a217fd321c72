"""Plots of a search: the evaluated points with their Pareto front, and hypervolume vs evaluations.

matplotlib is imported lazily and used through its object API with the Agg canvas, so plotting never
needs a display and never switches the caller's pyplot backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from instatune_cli.search.objectives import ObjectiveSpec, get_objective


def _figure(size: tuple[float, float] = (7.0, 5.0)) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f else None


def plot_pareto(rows: Sequence[Mapping[str, Any]], front: Sequence[Mapping[str, Any]],
                objectives: Sequence[ObjectiveSpec | str], path: str | Path, *,
                supernet: Mapping[str, Any] | None = None, baseline: Mapping[str, Any] | None = None,
                title: str | None = None, holdout: Mapping[str, str] | None = None,
                labels: Mapping[str, str] | None = None) -> Path:
    """`pareto.png`: every evaluated point, the front highlighted (step line for 2 objectives) and numbered
    by its 'subnet' field; y = first objective, x = second, colour = third if there is one. `supernet` /
    `baseline` are dicts with the objective values (and an optional 'label' or 'name') drawn as markers.

    `holdout` maps an objective to the key of its held-out value (e.g. {"acc": "eval_acc"}): the search
    selects on one split and scores the front on another, so the front's (and the markers') held-out values
    are drawn too, hollow, each joined to its selection value by a dotted line. `labels` overrides axis labels
    (by objective name) and, under "holdout", the legend entry of the held-out front.
    """
    objs = [get_objective(o) for o in objectives]
    y_o, x_o = objs[0], objs[1]
    c_o = objs[2] if len(objs) > 2 else None
    held = {k: v for k, v in (holdout or {}).items() if k in (x_o.name, y_o.name)}
    names = dict(labels or {})
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)

    pts = [(_num(r.get(x_o.name)), _num(r.get(y_o.name)), _num(r.get(c_o.name)) if c_o else None)
           for r in rows]
    pts = [p for p in pts if p[0] is not None and p[1] is not None]
    if pts:
        if c_o is not None and all(p[2] is not None for p in pts):
            sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=[p[2] for p in pts], s=18,
                            cmap="viridis", alpha=0.8, label="evaluated")
            fig.colorbar(sc, ax=ax, label=names.get(c_o.name, c_o.label()))
        else:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, color="0.6", alpha=0.8,
                       label="evaluated")

    def held_point(d: Mapping[str, Any]) -> tuple[float | None, float | None]:
        return _num(d.get(held.get(x_o.name, x_o.name))), _num(d.get(held.get(y_o.name, y_o.name)))

    fr = [(_num(r.get(x_o.name)), _num(r.get(y_o.name)), r.get("subnet"), *held_point(r)) for r in front]
    fr = sorted((p for p in fr if p[0] is not None and p[1] is not None), key=lambda p: (p[0], p[1]))
    if fr:
        xs, ys = [p[0] for p in fr], [p[1] for p in fr]
        if c_o is None:  # the attainment staircase; 'post' when x is minimised, 'pre' when maximised
            ax.step(xs, ys, where="post" if x_o.direction == "min" else "pre", color="tab:red", lw=1.5)
        ax.scatter(xs, ys, s=42, facecolors="none", edgecolors="tab:red", linewidths=1.5,
                   label="Pareto front")
        for x, y, k, *_ in fr:
            if k is not None:
                ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8,
                            color="tab:red")
        hp = [p for p in fr if p[3] is not None and p[4] is not None]
        if held and hp:
            for x, y, _, hx, hy in hp:
                ax.plot([x, hx], [y, hy], ls=":", lw=0.8, color="tab:purple")
            ax.scatter([p[3] for p in hp], [p[4] for p in hp], s=42, marker="s", facecolors="none",
                       edgecolors="tab:purple", linewidths=1.3,
                       label=names.get("holdout", "front, held out"))

    markers = (("*", "black", supernet, "super-network"), ("D", "tab:blue", baseline, "baseline"))
    for marker, color, d, default in markers:
        if not d:
            continue
        label = str(d.get("label") or d.get("name") or default)
        x, y = _num(d.get(x_o.name)), _num(d.get(y_o.name))
        if x is not None and y is not None:
            ax.scatter([x], [y], marker=marker, s=120, color=color, label=label, zorder=5)
        hx, hy = held_point(d) if held else (None, None)
        if hx is not None and hy is not None:
            ax.scatter([hx], [hy], marker=marker, s=120, facecolors="none", edgecolors=color, linewidths=1.3,
                       label=f"{label}, held out", zorder=5)

    ax.set_xlabel(names.get(x_o.name, x_o.label()))
    ax.set_ylabel(names.get(y_o.name, y_o.label()))
    ax.set_title(title or f"{len(pts)} evaluated, {len(fr)} on the Pareto front")
    ax.grid(alpha=0.3)
    if pts or fr or supernet or baseline:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_hypervolume(runs: Mapping[str, Sequence[float] | Sequence[Sequence[float]]] | Sequence[float],
                     path: str | Path, *, title: str | None = None) -> Path:
    """`hypervolume.png`: hypervolume vs real evaluations. `runs` maps a label to one curve or to several
    (e.g. seeds: drawn as their mean with a min-max band); a bare list is one unlabeled curve."""
    import numpy as np

    if not isinstance(runs, Mapping):
        runs = {"": runs}
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, curves in runs.items():
        seq = list(curves)
        if seq and isinstance(seq[0], (list, tuple, np.ndarray)):
            n = min(len(c) for c in seq)
            arr = np.array([list(c)[:n] for c in seq], dtype=float)
            x = np.arange(1, n + 1)
            line = ax.plot(x, arr.mean(axis=0), label=f"{label} (mean of {len(seq)})" if label else None)[0]
            if len(seq) > 1:
                ax.fill_between(x, arr.min(axis=0), arr.max(axis=0), color=line.get_color(), alpha=0.2)
        else:
            ax.plot(np.arange(1, len(seq) + 1), np.asarray(seq, dtype=float), label=label or None)
    ax.set_xlabel("real evaluations")
    ax.set_ylabel("hypervolume")
    ax.set_title(title or "hypervolume vs evaluations")
    ax.grid(alpha=0.3)
    if any(runs):
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
