"""Objectives and constraints of a multi-objective search.

An objective is either *exact* (MACs, parameter count: a cheap closed form, so it is computed, never
predicted; DyNAS-T predicts them, which only adds error) or *measured* (accuracy, latency, size: costly,
so LINAS fits predictors for them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from instatune_cli.errors import InstatuneError

DIRECTIONS = ("max", "min")


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective: its key in the evaluation dict, whether larger or smaller is better, its unit."""

    name: str
    direction: str = "max"
    unit: str = ""
    exact: bool = False

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise InstatuneError(f"objective name must be a non-empty string, got {self.name!r}")
        if self.direction not in DIRECTIONS:
            raise InstatuneError(
                f"objective '{self.name}': direction must be 'max' or 'min', got {self.direction!r}"
            )

    @property
    def sign(self) -> float:
        """Factor turning a value into one to minimise (all internal maths minimises)."""
        return 1.0 if self.direction == "min" else -1.0

    def to_min(self, value: float) -> float:
        return self.sign * float(value)

    def label(self) -> str:
        return f"{self.name} [{self.unit}]" if self.unit else self.name

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


BUILTIN: dict[str, ObjectiveSpec] = {
    "acc": ObjectiveSpec("acc", "max", "", exact=False),
    "macs": ObjectiveSpec("macs", "min", "MACs", exact=True),
    "params": ObjectiveSpec("params", "min", "", exact=True),
    "latency": ObjectiveSpec("latency", "min", "ms", exact=False),
    "size": ObjectiveSpec("size", "min", "MB", exact=False),
}


def get_objective(obj: str | ObjectiveSpec) -> ObjectiveSpec:
    """A built-in objective by name, or a user's own ObjectiveSpec unchanged."""
    if isinstance(obj, ObjectiveSpec):
        return obj
    key = str(obj).strip().lower()
    if key not in BUILTIN:
        raise InstatuneError(
            f"unknown objective '{obj}'; known: {', '.join(BUILTIN)} (or pass an ObjectiveSpec)"
        )
    return BUILTIN[key]


def resolve_objectives(objs: Iterable[str | ObjectiveSpec]) -> list[ObjectiveSpec]:
    """Resolve and check a list: at least two objectives (a Pareto front needs two), no duplicates."""
    if isinstance(objs, str):
        objs = [o for o in objs.split(",") if o.strip()]
    out = [get_objective(o) for o in objs]
    if len(out) < 2:
        raise InstatuneError(f"a multi-objective search needs at least two objectives, got {len(out)}")
    names = [o.name for o in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InstatuneError(f"objective {dup[0]!r} is given twice; list each objective once")
    return out


_SI = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_NUM = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([kKMGT]?)\s*$")


def parse_si(text: str | float | int) -> float:
    """'6G' -> 6e9, '1.5M' -> 1.5e6, '0.9' -> 0.9 (suffixes K/M/G/T, k accepted; no units)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    m = _NUM.match(str(text))
    if not m:
        raise InstatuneError(f"cannot read number {text!r}; use e.g. 0.9, 6G, 250M, 12.5")
    return float(m.group(1)) * _SI[m.group(2)]


@dataclass(frozen=True)
class Constraint:
    """`bound` is 'max' (value must be <= limit) or 'min' (value must be >= limit) on key `name`."""

    bound: str
    name: str
    limit: float

    def ok(self, values: Mapping[str, object]) -> bool:
        """True when satisfied; a missing or non-finite value never satisfies a constraint."""
        v = values.get(self.name)
        try:
            v = float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False
        if not math.isfinite(v):
            return False
        return v <= self.limit if self.bound == "max" else v >= self.limit

    def violation(self, values: Mapping[str, float]) -> float:
        """Relative amount by which the constraint is missed (0 when met); steers a search to feasibility."""
        v = float(values.get(self.name, math.nan))
        if not math.isfinite(v):
            return math.inf
        gap = v - self.limit if self.bound == "max" else self.limit - v
        return max(0.0, gap) / (abs(self.limit) or 1.0)

    def __str__(self) -> str:
        return f"{self.bound}-{self.name}={self.limit:g}"


def parse_constraint(key: str, value: str | float | None = None) -> Constraint:
    """`parse_constraint('max-macs', '6G')` or `parse_constraint('max-macs=6G')`; `max_macs` works too."""
    if value is None:
        key, sep, rest = str(key).partition("=")
        if not sep:
            raise InstatuneError(f"constraint {key!r} has no value; write e.g. max-macs=6G or min-acc=0.9")
        value = rest
    key = str(key).strip()
    bound, name = key[:3], key[4:]
    if key[3:4] not in ("-", "_") or bound not in DIRECTIONS or not name:
        raise InstatuneError(
            f"cannot read constraint {key!r}; write max-<objective> or min-<objective>, e.g. max-macs"
        )
    return Constraint(bound, name, parse_si(value))


def feasible(values: Mapping[str, object], constraints: Iterable[Constraint]) -> bool:
    return all(c.ok(values) for c in constraints)
