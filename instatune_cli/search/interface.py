"""The search algorithm interface (ask / tell) and its registry (docs/architecture.md, "Search").

An algorithm proposes sub-networks (`ask`) and hears what they measured (`tell`); it never evaluates anything
itself. The driver (`run.drive`) owns the loop: ask, measure each proposal in order through `SearchContext.measure`
(budget, archive, resume), tell, until the budget is spent or the algorithm has nothing left to propose. Because
evaluation happens in one place, a launched search needs no knowledge of the algorithm: rank 0 asks and tells, and
every rank evaluates its share (search/stage.py).

An algorithm registers itself with `@register_algorithm("name")` on its `SearchAlgorithm` subclass. The built-in
ones live in `search/algorithms.py`; a third-party one is a module named by an `instatune.algorithms` entry point,
or any module imported before the registry is read (tests register a toy algorithm from a test file this way).
"""

from __future__ import annotations

import importlib
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from instatune_cli.errors import InstatuneError
from instatune_cli.plugins import load_entry_points
from instatune_cli.space import SubNet

if TYPE_CHECKING:
    from instatune_cli.search.context import SearchContext

ENTRY_POINT_GROUP = "instatune.algorithms"
BUILTIN_MODULES = ("instatune_cli.search.algorithms",)
_REGISTRY: dict[str, type[SearchAlgorithm]] = {}
_DISCOVERED = False
S = TypeVar("S", bound=type)


@dataclass(frozen=True)
class Proposal:
    """A sub-network to measure, with how it was proposed: `origin` (the archive's column: anchor, random, nsga2,
    predicted, or a plug-in's own word) and the algorithm's `iteration` (0 for the start population)."""

    sub: SubNet
    origin: str
    iteration: int = 0


@dataclass(frozen=True)
class Evaluation:
    """What a proposal measured: its archive `row` (objective values, genes, index, origin) and whether it was
    `fresh`, new to this run when its turn came (a real evaluation, or one archived by an earlier session), rather
    than a config the run had already seen (those are free and cost no budget)."""

    proposal: Proposal
    row: Mapping[str, Any]
    fresh: bool


class SearchAlgorithm(ABC):
    """A multi-objective search algorithm in ask / tell form.

    `ctx` is the run's state, read-only for the algorithm: the space, objectives and constraints, `seen(id)`,
    `visible` (rows seen so far, in order), `remaining` budget, `fitness(values)` (minimised, infeasible points
    penalised) and `exact_value`. Every random decision must come from `rng` (seeded by `--seed`) so that a seed
    reproduces the archive and `--resume` replays it. `population` is the start population's size and `batch` the
    proposals per iteration an algorithm may choose to honour."""

    name: ClassVar[str] = ""

    def __init__(self, ctx: SearchContext, rng: random.Random, *, population: int, batch: int) -> None:
        self.ctx, self.rng, self.population, self.batch = ctx, rng, population, batch

    @abstractmethod
    def ask(self) -> list[Proposal | SubNet]:
        """The next sub-networks to measure, in order; an empty list ends the search. A bare SubNet is recorded
        with origin `name`, iteration 0. The driver stops measuring once the budget is spent."""

    @abstractmethod
    def tell(self, results: list[Evaluation]) -> None:
        """What the last `ask` measured, in its order (shorter when the budget ran out part-way)."""


def register_algorithm(name: str) -> Callable[[S], S]:
    """Class decorator: make a `SearchAlgorithm` subclass available as `--algorithm NAME` (a later registration of
    the same name replaces the earlier one, so a plug-in can override a built-in)."""
    key = _key(name)
    if not key or any(c.isspace() or c == "," for c in key):
        raise ValueError(f"algorithm name {name!r} must be one word")

    def deco(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, SearchAlgorithm)):
            raise TypeError(f"@register_algorithm({name!r}) decorates a SearchAlgorithm subclass, not {cls!r}")
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    return deco


def unregister_algorithm(name: str) -> None:
    """Forget a registered algorithm (tests that register a toy one clean up with it)."""
    _REGISTRY.pop(_key(name), None)


def _key(name: str) -> str:
    return str(name).strip().lower()


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)
    load_entry_points(ENTRY_POINT_GROUP, "algorithm")


def algorithm_names() -> list[str]:
    """Every registered algorithm (built-in, entry points, and any registered in this process), sorted."""
    _discover()
    return sorted(_REGISTRY)


def algorithm_class(name: str) -> type[SearchAlgorithm]:
    """The algorithm registered as `name`, or one line listing the registered ones."""
    names = algorithm_names()
    key = _key(name)
    if key not in _REGISTRY:
        raise InstatuneError(f"unknown algorithm {name!r}; known: {', '.join(names)}")
    return _REGISTRY[key]
