"""The built-in search algorithms behind the ask / tell interface (search/interface.py): random, plain NSGA-II
and LINAS, registered as `random`, `nsga2` and `linas`.

Each starts from the same population (`StartPopulation`: the space's anchors, then random draws) and proposes
only from what the run has seen (`SearchContext`), so a seed reproduces the archive and a resume replays it. They
propose one sub-network at a time where the next proposal depends on the previous result (the start population,
random search, NSGA-II's immigrant) and a whole batch where it does not (an NSGA-II generation, a LINAS iteration).

Genetic operators: DEAP supplies NSGA-II selection (`tools.selNSGA2`, `sortLogNondominated`,
`assignCrowdingDist`); uniform crossover, uniform-int mutation and the binary crowded tournament are
written here because DEAP's versions draw from the global `random` module, which would make results
depend on (and disturb) the caller's random state.
"""

from __future__ import annotations

import itertools
import random
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from instatune_cli.search.context import SearchContext
from instatune_cli.search.interface import Evaluation, Proposal, SearchAlgorithm, register_algorithm
from instatune_cli.search.pareto import hypervolume, nondominated_mask, reference_point
from instatune_cli.search.predictors import Predictors
from instatune_cli.space import SearchSpace, SubNet

STALL_GENERATIONS = 10  # NSGA-II generations without a new config before a random immigrant is added


# ---- DEAP plumbing -------------------------------------------------------------------------------
def _classes(m: int) -> tuple[type, type]:
    """DEAP fitness/individual classes for m minimised objectives; `creator` is global, so create once."""
    from deap import base, creator

    fit, ind = f"InstatuneFitnessMin{m}", f"InstatuneIndividual{m}"
    if not hasattr(creator, fit):
        creator.create(fit, base.Fitness, weights=(-1.0,) * m)
    if not hasattr(creator, ind):
        creator.create(ind, list, fitness=getattr(creator, fit))
    return getattr(creator, fit), getattr(creator, ind)


def _individual(genes: Sequence[int], fit: Sequence[float]) -> Any:
    _, Ind = _classes(len(fit))
    ind = Ind(int(g) for g in genes)
    ind.fitness.values = tuple(fit)
    return ind


def _offspring(pop: list[Any], n: int, bounds: Sequence[int], rng: random.Random,
               cxpb: float = 0.9) -> list[list[int]]:
    """n children by binary crowded tournament, uniform crossover and uniform-int mutation (1/len genes)."""
    from deap import tools
    from deap.tools.emo import assignCrowdingDist  # not re-exported by deap.tools

    rank: dict[int, int] = {}
    for r, front in enumerate(tools.sortLogNondominated(pop, len(pop))):
        assignCrowdingDist(front)
        for ind in front:
            rank[id(ind)] = r

    def pick() -> Any:
        a, b = pop[rng.randrange(len(pop))], pop[rng.randrange(len(pop))]
        ka = (rank[id(a)], -a.fitness.crowding_dist)
        kb = (rank[id(b)], -b.fitness.crowding_dist)
        return a if ka < kb or (ka == kb and rng.random() < 0.5) else b

    pm = 1.0 / len(bounds)
    children: list[list[int]] = []
    while len(children) < n:
        c1, c2 = list(pick()), list(pick())
        if rng.random() < cxpb:
            for i in range(len(c1)):
                if rng.random() < 0.5:
                    c1[i], c2[i] = c2[i], c1[i]
        for c in (c1, c2):
            for i, b in enumerate(bounds):
                if rng.random() < pm:
                    c[i] = rng.randrange(b)
        children += [c1, c2]
    return children[:n]


def _select(pop: list[Any], k: int) -> list[Any]:
    from deap import tools

    return tools.selNSGA2(pop, k, nd="log")  # same fronts as 'standard', ~20x faster on 200 points


# ---- sampling ------------------------------------------------------------------------------------
def unseen_sample(ctx: SearchContext, rng: random.Random, tries: int = 2000) -> SubNet | None:
    """A random config the run has not seen; falls back to enumerating small spaces; None if none left."""
    for _ in range(tries):
        sub = ctx.space.sample(rng)
        if not ctx.seen(sub.id):
            return sub
    if ctx._cardinality > 200_000:
        return None
    left = [s for s in _enumerate(ctx.space) if not ctx.seen(s.id)]
    return rng.choice(left) if left else None


def _enumerate(space: SearchSpace) -> list[SubNet]:
    out = []
    for n in space.layers:
        for hs in itertools.product(*space.heads[:n]):
            for fs in itertools.product(*space.ffn[:n]):
                out.append(SubNet(hs, fs))
    return out


class StartPopulation:
    """`population` unique configs measured for real, one at a time: the space's anchors (the widest member of each
    depth and the smallest, `SearchSpace.anchors`), then random draws (the same for every algorithm and seed). An
    anchor the run has already seen is skipped; `rows` are what the start measured."""

    def __init__(self, ctx: SearchContext, rng: random.Random, population: int) -> None:
        self.ctx, self.rng, self.population = ctx, rng, population
        self.anchors = list(ctx.space.anchors()[:population])
        self.rows: list[Mapping[str, Any]] = []
        self.finished = False

    def ask(self) -> list[Proposal]:
        """The next member of the start population; [] (and `finished`) once it is complete."""
        ctx = self.ctx
        while self.anchors:
            sub = self.anchors.pop(0)
            if not ctx.done and not ctx.seen(sub.id):
                return [Proposal(sub, "anchor", 0)]
        if len(self.rows) < self.population and not ctx.done:
            sub = unseen_sample(ctx, self.rng)
            if sub is not None:
                return [Proposal(sub, "random", 0)]
        self.finished = True
        return []

    def tell(self, results: list[Evaluation]) -> None:
        self.rows += [r.row for r in results]


class _Started(SearchAlgorithm):
    """An algorithm that first measures the start population, then asks `next_proposals`."""

    def __init__(self, ctx: SearchContext, rng: random.Random, *, population: int, batch: int) -> None:
        super().__init__(ctx, rng, population=population, batch=batch)
        self.start = StartPopulation(ctx, rng, population)

    def ask(self) -> list[Proposal | SubNet]:
        if not self.start.finished:
            first = self.start.ask()
            if first:
                return list(first)
            self.started()
        return list(self.next_proposals())

    def tell(self, results: list[Evaluation]) -> None:
        if not self.start.finished:
            self.start.tell(results)
        else:
            self.told(results)

    def started(self) -> None:
        """The start population is measured (`self.start.rows`)."""

    @abstractmethod
    def next_proposals(self) -> list[Proposal]:
        """What to measure once the start population is measured; [] ends the search."""

    def told(self, results: list[Evaluation]) -> None:
        """What `next_proposals` measured."""


@register_algorithm("random")
class RandomSearch(_Started):
    """Uniform random sampling of unique configs until the budget is spent."""

    def next_proposals(self) -> list[Proposal]:
        sub = unseen_sample(self.ctx, self.rng)
        return [] if sub is None else [Proposal(sub, "random", 0)]


@register_algorithm("nsga2")
class NSGA2(_Started):
    """Plain NSGA-II: every new offspring is a real evaluation; already-seen configs are free. After
    `STALL_GENERATIONS` generations that found no new config, one random immigrant joins the next selection."""

    def __init__(self, ctx: SearchContext, rng: random.Random, *, population: int, batch: int) -> None:
        super().__init__(ctx, rng, population=population, batch=batch)
        self.bounds = ctx.space.gene_bounds()
        self.pop: list[Any] = []
        self.gen, self.stall = 0, 0
        self.children: list[list[int]] = []
        self.new: list[Any] | None = None  # a generation's offspring waiting for its immigrant

    def started(self) -> None:
        self.pop = [_individual(r["genes"], self.ctx.fitness(r)) for r in self.start.rows]

    def next_proposals(self) -> list[Proposal]:
        ctx = self.ctx
        if self.new is not None:  # converged onto seen configs: an immigrant
            sub = unseen_sample(ctx, self.rng)
            return [] if sub is None else [Proposal(sub, "random", self.gen)]
        if not self.pop:
            return []
        self.gen += 1
        self.children = _offspring(self.pop, self.population, self.bounds, self.rng)
        return [Proposal(ctx.space.decode(genes), "nsga2", self.gen) for genes in self.children]

    def told(self, results: list[Evaluation]) -> None:
        ctx = self.ctx
        if self.new is not None:  # the immigrant
            if not results:  # the budget is spent: the driver stops
                return
            row = results[0].row
            new, self.new, self.stall = self.new + [_individual(row["genes"], ctx.fitness(row))], None, 0
        else:  # the children keep their own genes (a dropped layer's genes are inherited, not re-encoded)
            new = [_individual(genes, ctx.fitness(r.row)) for genes, r in zip(self.children, results, strict=False)]
            self.stall = 0 if any(r.fresh for r in results) else self.stall + 1
            if self.stall >= STALL_GENERATIONS and not ctx.done:
                self.new = new
                return
        self.pop = _select(self.pop + new, self.population)


@register_algorithm("linas")
class LINAS(_Started):
    """LINAS: random start, then per iteration fit predictors on all seen rows, run NSGA-II on predicted +
    exact objectives, and measure the `batch` unseen proposals that add the most predicted hypervolume."""

    surrogate_population = 100
    surrogate_generations = 30

    def __init__(self, ctx: SearchContext, rng: random.Random, *, population: int, batch: int) -> None:
        super().__init__(ctx, rng, population=population, batch=batch)
        self.it = 0

    def next_proposals(self) -> list[Proposal]:
        ctx, rng, batch = self.ctx, self.rng, self.batch
        self.it += 1
        preds = Predictors(ctx.space, ctx.measured_keys).fit(ctx.visible, seed=rng.randrange(2**31))
        for rep in preds.report():
            ctx.predictor_log.append({"iteration": self.it, **rep})
        final = _surrogate_nsga2(ctx, preds, rng, self.surrogate_population, self.surrogate_generations)
        proposals, seen_ids = [], set()
        for sub, values in final:
            if sub.id not in seen_ids and not ctx.seen(sub.id):
                seen_ids.add(sub.id)
                proposals.append((sub, values))
        chosen = rank_by_hv_contribution(ctx, proposals, min(batch, ctx.remaining))
        ids = {s.id for s, _ in chosen}
        for _ in range(100 * batch):  # not enough new proposals: fill the batch randomly
            if len(chosen) >= min(batch, ctx.remaining):
                break
            sub = unseen_sample(ctx, rng)
            if sub is None:
                break
            if sub.id not in ids:
                ids.add(sub.id)
                chosen.append((sub, "random"))
        return [Proposal(sub, origin, self.it) for sub, origin in chosen]


def _surrogate_nsga2(ctx: SearchContext, preds: Predictors, rng: random.Random, pop_size: int,
                     generations: int) -> list[tuple[SubNet, dict[str, float]]]:
    """NSGA-II on predictions (zero real evaluations). Returns the final population best-first
    (non-domination rank, then crowding) with the predicted values of each member."""
    from deap import tools
    from deap.tools.emo import assignCrowdingDist

    cache: dict[SubNet, dict[str, float]] = {}
    decoded: dict[tuple[int, ...], SubNet] = {}

    def values_of(subs: list[SubNet]) -> list[dict[str, float]]:
        todo = list(dict.fromkeys(s for s in subs if s not in cache))
        if todo:
            p = preds.predict(todo)
            for i, s in enumerate(todo):
                v = {k: float(a[i]) for k, a in p.items()}
                for name in ctx.exact:
                    v[name] = ctx.exact_value(name, s)
                cache[s] = v
        return [cache[s] for s in subs]

    def decode(genes: Sequence[int]) -> SubNet:
        key = tuple(genes)
        if key not in decoded:
            decoded[key] = ctx.space.decode(key)
        return decoded[key]

    def individuals(genes_list: list[list[int]]) -> list[Any]:
        subs = [decode(g) for g in genes_list]
        return [_individual(g, ctx.fitness(v)) for g, v in zip(genes_list, values_of(subs), strict=True)]

    front_rows = _front_rows(ctx, ctx.visible)
    seeds = [list(r["genes"]) for r in front_rows][: pop_size // 2]
    while len(seeds) < pop_size:
        seeds.append(ctx.space.encode(ctx.space.sample(rng)))
    pop = _select(individuals(seeds), pop_size)
    bounds = ctx.space.gene_bounds()
    for _ in range(generations):
        pop = _select(pop + individuals(_offspring(pop, pop_size, bounds, rng)), pop_size)
    ordered: list[Any] = []
    for front in tools.sortLogNondominated(pop, len(pop)):
        assignCrowdingDist(front)
        ordered += sorted(front, key=lambda ind: -ind.fitness.crowding_dist)
    subs = [decode(ind) for ind in ordered]
    return list(zip(subs, values_of(subs), strict=True))


def _front_rows(ctx: SearchContext, rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    feas = [r for r in rows if ctx.feasible(r)]
    if not feas:
        return []
    mask = nondominated_mask(np.array([ctx.fitness(r) for r in feas]))
    return [r for r, keep in zip(feas, mask, strict=True) if keep]


def rank_by_hv_contribution(ctx: SearchContext, proposals: list[tuple[SubNet, dict[str, float]]],
                            k: int) -> list[tuple[SubNet, str]]:
    """Greedily pick k proposals, each time the one adding the most predicted hypervolume to the seen
    front plus those already picked. Ties (e.g. no gain left) keep the surrogate's order; predicted-
    infeasible proposals come last, nearest-to-feasible first."""
    if k <= 0 or not proposals:
        return []
    feas = [(s, v) for s, v in proposals if ctx.feasible(v)]
    infeas = sorted((p for p in proposals if not ctx.feasible(p[1])), key=lambda p: ctx.fitness(p[1])[0])
    base = [ctx.fitness(r) for r in _front_rows(ctx, ctx.visible)]
    pts = {id(s): np.array(ctx.fitness(v)) for s, v in feas}
    every = [ctx.fitness(r) for r in ctx.visible if ctx.feasible(r)] + [tuple(p) for p in pts.values()]
    if ctx.ref_point is not None:  # the caller's yardstick: gains are measured where they will be scored
        ref = np.asarray(ctx.ref_point, dtype=float)
    else:
        ref = reference_point(np.array(every)) if every else None
    picked: list[tuple[SubNet, str]] = []
    current = np.array(base, dtype=float).reshape(-1, len(ctx.objectives))
    left = list(feas)
    while left and len(picked) < k and ref is not None:
        hv0 = hypervolume(current, ref)
        cand = np.array([pts[id(s)] for s, _ in left])
        useful = ~_dominated_by(cand, current) & (cand < ref).all(axis=1)  # the rest add exactly 0
        gains = np.zeros(len(left))
        for i in np.flatnonzero(useful):
            gains[i] = hypervolume(np.vstack([current, cand[i]]), ref) - hv0
        j = int(np.argmax(gains))  # first maximum: ties keep the surrogate's order
        s, _ = left.pop(j)
        picked.append((s, "predicted"))
        current = np.vstack([current, pts[id(s)]])
    picked += [(s, "predicted") for s, _ in infeas][: k - len(picked)]
    return picked


def _dominated_by(cand: np.ndarray, front: np.ndarray) -> np.ndarray:
    """Row i: is cand[i] weakly dominated by some row of `front` (minimisation)?"""
    if len(front) == 0 or len(cand) == 0:
        return np.zeros(len(cand), dtype=bool)
    le = (front[None, :, :] <= cand[:, None, :]).all(axis=2)
    return le.any(axis=1)
