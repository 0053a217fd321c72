"""`SearchContext`: a search's budget, its archive-backed evaluation and what it has seen so far.

The ask/tell driver (`run.drive`) is the only caller of `measure`, the one place a real evaluation happens. It looks
a config up first (the same config is never measured twice), so every decision depends only on the seed and on
the evaluations the run has *seen*, in order. Resuming therefore replays the algorithm from the start with the
archive as a cache: replayed decisions are identical, cost no real evaluation, and the run continues exactly where
it was killed (LINAS re-plans the interrupted batch, finds its first members already measured, and measures the
rest). Only if the replay diverges (e.g. a different seed) are the remaining archived rows handed over at once, so
they are still used and never re-measured. Algorithms read the rest (`seen`, `visible`, `remaining`, `fitness`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from instatune_cli.artifacts import writing
from instatune_cli.errors import InstatuneError
from instatune_cli.search.archive import Archive
from instatune_cli.search.objectives import Constraint, ObjectiveSpec
from instatune_cli.space import SearchSpace, SubNet

PENALTY = 1e30  # minimised value of an infeasible point: dominated by every feasible one


@dataclass
class SearchContext:
    """Budget, archive-backed evaluation and the run's view of what it has measured so far."""

    space: SearchSpace
    objectives: list[ObjectiveSpec]
    evaluate: Callable[[SubNet], Mapping[str, Any]]
    exact: dict[str, Callable[[SubNet], float]]
    archive: Archive
    evals: int
    constraints: list[Constraint] = field(default_factory=list)
    on_eval: Callable[[dict[str, Any]], None] | None = None
    ref_point: np.ndarray | None = None  # minimised; fixed by the caller, else derived per iteration
    visible: list[dict[str, Any]] = field(default_factory=list)
    predictor_log: list[dict[str, Any]] = field(default_factory=list)
    new_evaluations: int = 0

    def __post_init__(self) -> None:
        self._seen: dict[str, dict[str, Any]] = {}
        self._pending: dict[str, dict[str, Any]] = {r["id"]: r for r in self.archive.rows}
        self._exact_cache: dict[tuple[str, SubNet], float] = {}
        self._cardinality = self.space.cardinality()

    # ---- budget and bookkeeping --------------------------------------------------------------
    @property
    def remaining(self) -> int:
        return self.evals - len(self.visible)

    @property
    def done(self) -> bool:
        return self.remaining <= 0 or len(self.visible) >= self._cardinality

    def seen(self, sub_id: str) -> bool:
        return sub_id in self._seen

    def _show(self, row: dict[str, Any]) -> None:
        self.visible.append(row)
        self._seen[row["id"]] = row

    @property
    def measured_keys(self) -> list[str]:
        """Keys a predictor is needed for: measured objectives and constraint keys with no closed form."""
        keys = [o.name for o in self.objectives if not o.exact]
        keys += [c.name for c in self.constraints if c.name not in self.exact and c.name not in keys]
        return keys

    def exact_value(self, name: str, sub: SubNet) -> float:
        key = (name, sub)  # SubNet hashes by value; cheaper than its sha256 id
        if key not in self._exact_cache:
            self._exact_cache[key] = float(self.exact[name](sub))
        return self._exact_cache[key]

    # ---- the one place a real evaluation happens ---------------------------------------------
    def measure(self, sub: SubNet, origin: str, iteration: int) -> dict[str, Any] | None:
        """The row for `sub`: seen before (free), archived by an earlier session (free), or measured now.
        None when the budget is spent."""
        if sub.id in self._seen:
            return self._seen[sub.id]
        if self.remaining <= 0:
            return None
        if sub.id in self._pending:
            row = self._pending.pop(sub.id)
            self._show(row)
            return row
        if self._pending:  # the replay diverged from the archived run: use everything archived now
            for row in list(self._pending.values()):
                self._show(row)
            self._pending.clear()
            if self.remaining <= 0:
                return None
        t0 = time.perf_counter()
        raw = self.evaluate(sub)
        seconds = time.perf_counter() - t0
        values = self._check_values(sub, raw)
        for name in self.exact:
            values[name] = self.exact_value(name, sub)
        with writing("the search archive", self.archive.path):  # a full disk: one line (docs/architecture.md)
            row = self.archive.add(sub, values, iteration=iteration, origin=origin, seconds=seconds)
        self._show(row)
        self.new_evaluations += 1
        if self.on_eval is not None:
            self.on_eval(dict(row))
        return row

    def _check_values(self, sub: SubNet, raw: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(raw, Mapping):
            raise InstatuneError(
                f"evaluate({sub.name}) must return a dict of values, got {type(raw).__name__}"
            )
        values = dict(raw)
        for key in self.measured_keys:
            if key not in values:
                raise InstatuneError(
                    f"evaluate({sub.name}) returned no {key!r} (got {sorted(values)}); it must return every "
                    "measured objective and constrained value"
                )
            try:
                values[key] = float(values[key])
            except (TypeError, ValueError):
                raise InstatuneError(
                    f"evaluate({sub.name}) returned a non-number for {key!r}: {values[key]!r}"
                ) from None
        return values

    # ---- objective values for selection -------------------------------------------------------
    def feasible(self, values: Mapping[str, Any]) -> bool:
        for o in self.objectives:
            v = values.get(o.name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                return False
        return all(c.ok(values) for c in self.constraints)

    def fitness(self, values: Mapping[str, Any]) -> tuple[float, ...]:
        """Minimised objectives; an infeasible point gets PENALTY scaled by its constraint violation, so
        infeasible points rank behind all feasible ones and nearer-feasible ones first."""
        if self.feasible(values):
            return tuple(o.to_min(values[o.name]) for o in self.objectives)
        viol = sum(c.violation(values) for c in self.constraints)
        viol = min(viol, 1e6) if math.isfinite(viol) and viol > 0 else 1e6
        return (PENALTY * (1.0 + viol),) * len(self.objectives)
