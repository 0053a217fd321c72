"""`run_search`: the one entry point of the search, used by the CLI and by users with their own objective.

Resume guarantees (see algorithms.py for the mechanism): no config is ever evaluated twice; with the same
space, objectives, algorithm, seed, population, batch and a deterministic `evaluate`, a search killed and
resumed (any number of times) ends with the same archive, in the same order, as an uninterrupted run; a
resume with a larger `evals` continues the finished run as if it had been started with that budget. With
other settings the archived rows are reused and the search simply continues from them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from instatune_cli.artifacts import Heartbeat, writing
from instatune_cli.distributed import Follower
from instatune_cli.errors import InstatuneError
from instatune_cli.search.archive import ARCHIVE_JSONL, Archive, write_rows_csv
from instatune_cli.search.context import SearchContext
from instatune_cli.search.interface import Evaluation, Proposal, SearchAlgorithm, algorithm_class
from instatune_cli.search.objectives import Constraint, ObjectiveSpec, parse_constraint, resolve_objectives
from instatune_cli.search.pareto import hypervolume, pareto_front, ref_to_min, reference_point, to_min_matrix
from instatune_cli.space import SearchSpace, SubNet

FRONT_CSV = "front.csv"
HYPERVOLUME_CSV = "hypervolume.csv"
PREDICTORS_JSONL = "predictors.jsonl"


@dataclass
class SearchResult:
    """Everything a search produced; `rows` is the whole archive (earlier sessions included)."""

    objectives: list[ObjectiveSpec]
    constraints: list[Constraint]
    algorithm: str
    seed: int
    rows: list[dict[str, Any]]
    feasible: list[bool]
    front: list[dict[str, Any]]
    hypervolume: list[float]
    ref_point: dict[str, float] | None
    predictors: list[dict[str, Any]]
    new_evaluations: int
    seconds: float
    archive_dir: Path
    notes: list[str] = field(default_factory=list)

    @property
    def evals_per_minute(self) -> float | None:
        """Real evaluations of this session per wall-clock minute (search overhead included)."""
        if not self.new_evaluations or self.seconds <= 0:
            return None
        return self.new_evaluations / (self.seconds / 60.0)

    def summary(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm, "seed": self.seed, "evaluations": len(self.rows),
            "new_evaluations": self.new_evaluations, "feasible": sum(self.feasible),
            "front_size": len(self.front),
            "hypervolume": self.hypervolume[-1] if self.hypervolume else 0.0, "ref_point": self.ref_point,
            "evals_per_minute": self.evals_per_minute, "seconds": round(self.seconds, 3),
            "objectives": [o.to_dict() for o in self.objectives],
            "constraints": [str(c) for c in self.constraints], "notes": list(self.notes),
        }


def _constraints(spec: Iterable[Any] | Mapping[str, Any]) -> list[Constraint]:
    if isinstance(spec, Mapping):
        return [parse_constraint(k, v) for k, v in spec.items()]
    if isinstance(spec, (str, Constraint)):
        spec = [spec]
    out = []
    for c in spec:
        if isinstance(c, Constraint):
            out.append(c)
        elif isinstance(c, str):
            out.append(parse_constraint(c))
        elif isinstance(c, Sequence) and len(c) == 2:
            out.append(parse_constraint(str(c[0]), c[1]))
        else:
            raise InstatuneError(f"cannot read constraint {c!r}; write e.g. 'max-macs=6G'")
    return out


def run_search(
    space: SearchSpace,
    objectives: Sequence[ObjectiveSpec | str],
    evaluate: Callable[[SubNet], Mapping[str, float]],
    *,
    exact: Mapping[str, Callable[[SubNet], float]] | None = None,
    algorithm: str = "linas",
    evals: int = 50,
    population: int = 10,
    seed: int = 0,
    archive_dir: str | Path,
    resume: bool = False,
    constraints: Iterable[Constraint | str] | Mapping[str, Any] = (),
    batch: int | None = None,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
    ref_point: Mapping[str, float] | Sequence[float] | None = None,
    progress_every: float | None = None,
    group: Any = None,
) -> SearchResult:
    """Search `space` for sub-networks Pareto-optimal in `objectives` with `evals` real evaluations.

    evaluate(sub) returns the measured objectives (extra keys are kept in the archive row); `exact`
    maps each exact objective (and any other closed-form value) to its function. `population` is the
    random start (and NSGA-II's population); LINAS measures `batch` (default population // 2) proposals
    per iteration. `ref_point` (natural units, dict by objective or a sequence) fixes the hypervolume
    reference so runs are comparable; by default it is derived from this archive. `on_eval(row)` is
    called after each real evaluation. `progress_every` (seconds) prints a plain line on stderr at that interval
    (evaluations done of the budget, hypervolume so far): for logs where no one sees per-evaluation output.
    Writes archive.jsonl (as it goes), archive.csv, front.csv, hypervolume.csv and predictors.jsonl into
    `archive_dir`. `group` (a launched `distributed.Group`, on its rank 0): `evaluate` is collective, and the other
    ranks run `follow_search(group, their_evaluate)` meanwhile (rank 0 asks and tells, every rank evaluates).
    """
    with _leading(group, evaluate) as evaluate:  # launched: the other ranks hear each evaluation
        if not isinstance(space, SearchSpace):
            raise InstatuneError(f"space must be a SearchSpace, got {type(space).__name__}")
        objs = resolve_objectives(objectives)
        exact = dict(exact or {})
        missing = [o.name for o in objs if o.exact and o.name not in exact]
        if missing:
            raise InstatuneError(
                f"objective {missing[0]!r} is exact (computed, never predicted); "
                f"pass exact={{'{missing[0]}': fn}}"
            )
        algo_cls = algorithm_class(algorithm)
        algo = algo_cls.name
        evals, population = int(evals), int(population)
        if population < 2:
            raise InstatuneError(f"population must be at least 2, got {population}")
        if evals < population:
            raise InstatuneError(
                f"budget of {evals} evaluations is smaller than the population of {population}; "
                "raise the budget or lower the population"
            )
        batch = max(1, population // 2) if batch is None else int(batch)
        if batch < 1:
            raise InstatuneError(f"batch must be at least 1, got {batch}")
        cons = _constraints(constraints)
        notes: list[str] = []
        card = space.cardinality()
        if evals > card:
            notes.append(f"the space holds only {card} sub-networks; the budget of {evals} was capped to {card}")

        archive_dir = Path(archive_dir)
        names = [o.name for o in objs]
        with writing("the search archive", archive_dir / ARCHIVE_JSONL):
            archive = (Archive.load if resume else Archive.create)(archive_dir, space, names)
        _fill_genes(archive, space)
        ref_min = None if ref_point is None else ref_to_min(ref_point, objs)  # bad input fails before any eval
        ctx = SearchContext(space, objs, evaluate, exact, archive, min(evals, card), cons, on_eval, ref_min)
        _add_heartbeat(ctx, progress_every, population)
        t0 = time.perf_counter()
        drive(ctx, algo_cls(ctx, random.Random(seed), population=population, batch=batch))
        seconds = time.perf_counter() - t0

        result = _result(ctx, algo, seed, ref_point, seconds, notes)
        with writing("the search results (archive.csv, front.csv, hypervolume.csv, predictors.jsonl)", archive_dir):
            write_outputs(result, archive)
        return result


# ---- a launched search: rank 0 asks and tells, every rank evaluates its share -----------------------------
_EVAL, _STOP, _ABORT = "eval", "stop", "abort"


@contextlib.contextmanager
def _leading(group: Any, evaluate: Callable[[SubNet], Any]) -> Iterator[Callable[[SubNet], Any]]:
    """Rank 0's `evaluate` under a launcher: each real evaluation is announced to the other ranks first (they then
    run the same collective pass on their shard). Only rank 0 knows, at each proposal's turn, whether it is a real
    evaluation (seen before, archived by an earlier session, or past the budget: the resume replay), so the message
    is per evaluation; it is also what lets rank 0 release the others when it fails between two evaluations: "stop"
    after the search, "abort" on a failure (they exit with rank 0's error). A failure inside an evaluation leaves
    them mid-collective: the launcher ends them. Not launched: `evaluate` itself, nothing is sent."""
    if group is None or not group.active:
        yield evaluate
        return
    busy = [False]

    def announced(sub: SubNet) -> Any:
        group.broadcast_object((_EVAL, sub))
        busy[0] = True
        out = evaluate(sub)
        busy[0] = False
        return out

    try:
        yield announced
    except BaseException:
        if not busy[0]:
            group.broadcast_object((_ABORT, None))
        raise
    group.broadcast_object((_STOP, None))


def follow_search(group: Any, evaluate: Callable[[SubNet], Any]) -> None:
    """A non-zero rank of a launched search: `evaluate` (its shard) each sub-network rank 0 announces, until it says
    stop; on "abort" leave quietly (`distributed.Follower`): rank 0 reports the error. Writes nothing."""
    while True:
        kind, sub = group.broadcast_object((None, None))
        if kind == _STOP:
            return
        if kind != _EVAL:
            raise Follower(2)
        evaluate(sub)


STALE_ASKS = 1000  # consecutive asks that brought nothing new before a plug-in algorithm is called stuck


def drive(ctx: SearchContext, algorithm: SearchAlgorithm) -> None:
    """The search loop: ask, measure each proposal in order (a config seen before is free; the budget stops the
    batch), tell; until the budget is spent or the algorithm proposes nothing (docs/architecture.md, "Search")."""
    stale = 0
    while not ctx.done:
        proposals = [_proposal(p, algorithm) for p in algorithm.ask()]
        if not proposals:
            return
        results: list[Evaluation] = []
        for p in proposals:
            fresh = not ctx.seen(p.sub.id)
            if fresh:
                ctx.space.check(p.sub)
            row = ctx.measure(p.sub, p.origin, p.iteration)
            if row is None:
                break
            results.append(Evaluation(p, row, fresh))
        algorithm.tell(results)
        stale = 0 if any(r.fresh for r in results) else stale + 1
        if stale >= STALE_ASKS:
            raise InstatuneError(f"algorithm {algorithm.name!r} proposed only sub-networks it had already measured "
                                 f"{STALE_ASKS} times in a row; an algorithm with nothing new to propose returns []")


def _proposal(p: Any, algorithm: SearchAlgorithm) -> Proposal:
    if isinstance(p, Proposal):
        return p
    if isinstance(p, SubNet):
        return Proposal(p, algorithm.name)
    raise InstatuneError(f"algorithm {algorithm.name!r} proposed {p!r}; ask() returns Proposal or SubNet objects")


def _fill_genes(archive: Archive, space: SearchSpace) -> None:
    """Archived rows without `genes` (written by another version) get them from their sub-network, so the
    algorithms never meet a KeyError."""
    for row in archive.rows:
        if not isinstance(row.get("genes"), list):
            row["genes"] = space.encode(SubNet.from_dict(row))


def _add_heartbeat(ctx: SearchContext, every: float | None, population: int) -> None:
    """Wrap `ctx.on_eval` so a line `search: 12/50 evaluations, hypervolume 0.4321` is printed every `every` s."""
    beat, user = Heartbeat(every), ctx.on_eval
    if not beat.enabled:
        return
    progress = _ProgressLine(ctx, population)

    def on_eval(row: dict[str, Any]) -> None:
        if user is not None:
            user(row)
        beat.tick(progress.line)

    ctx.on_eval = on_eval


class _ProgressLine:
    """The heartbeat's hypervolume, against one reference so that it rises only when the front improved: the
    user's --ref-point, else the one derived from the start population once it is measured, kept while every
    evaluation lies inside it. A reference re-derived from the archive at every line (as the final one is)
    grows with every worse point and made the figure rise when nothing improved; when a point falls outside
    the kept one, it is re-derived once and the line says so."""

    def __init__(self, ctx: SearchContext, population: int = 0) -> None:
        self.ctx, self.ref, self.fixed = ctx, ctx.ref_point, ctx.ref_point is not None
        self.start = min(population, ctx.evals)

    def line(self) -> str:
        ctx, rows = self.ctx, self.ctx.visible
        head = f"search: {len(rows)}/{ctx.evals} evaluations"
        if self.ref is None and len(rows) < self.start:
            return f"{head} (start population of {self.start}; hypervolume from then on)"
        points = to_min_matrix(rows, ctx.objectives)
        finite = np.isfinite(points).all(axis=1)
        keep = np.array([ctx.feasible(r) for r in rows], dtype=bool) & finite
        if not keep.any():
            return f"{head}, no feasible evaluation yet"
        note = ""
        if self.ref is None:
            self.ref = reference_point(points[finite])
        elif not self.fixed and (points[finite] > self.ref).any():
            self.ref = reference_point(points[finite])
            note = " (reference point widened to a worse evaluation: not comparable with the lines above)"
        return f"{head}, hypervolume {float(hypervolume(points[keep], self.ref)):.4g}{note}"


def _result(ctx: SearchContext, algo: str, seed: int, ref_point: Any, seconds: float,
            notes: list[str]) -> SearchResult:
    objs, rows = ctx.objectives, ctx.archive.rows
    feasible = [ctx.feasible(r) for r in rows]
    front = pareto_front([r for r, f in zip(rows, feasible, strict=True) if f], objs)
    points = to_min_matrix(rows, objs)
    finite = np.isfinite(points).all(axis=1) if len(rows) else np.zeros(0, dtype=bool)
    if ref_point is not None:
        ref = ref_to_min(ref_point, objs)
    elif finite.any():
        ref = reference_point(points[finite])
    else:
        ref = None
    hv: list[float] = []
    kept: list[np.ndarray] = []
    for i, ok in enumerate(feasible):
        if ok and ref is not None:
            kept.append(points[i])
            hv.append(hypervolume(np.array(kept), ref))
        else:
            hv.append(hv[-1] if hv else 0.0)
    if rows and not any(feasible):
        why = (f"the constraints ({', '.join(map(str, ctx.constraints))})" if ctx.constraints
               else "finite values")
        notes.append(f"no evaluated sub-network meets {why}; the Pareto front is empty")
    ref_nat = None if ref is None else {o.name: float(o.sign * v) for o, v in zip(objs, ref, strict=True)}
    return SearchResult(objs, list(ctx.constraints), algo, seed, rows, feasible, front, hv, ref_nat,
                        list(ctx.predictor_log), ctx.new_evaluations, seconds, ctx.archive.directory, notes)


def write_outputs(result: SearchResult, archive: Archive) -> None:
    """archive.csv, front.csv, hypervolume.csv, predictors.jsonl (each written atomically)."""
    d = result.archive_dir
    archive.write_csv(extra={"feasible": result.feasible})
    names = [o.name for o in result.objectives]
    first = ["subnet", "id", "name", "layers", "heads", "ffn", *names]
    write_rows_csv(d / FRONT_CSV, result.front, first=first)
    hv_rows = [{"evaluation": i + 1, "id": r["id"], "hypervolume": h}
               for i, (r, h) in enumerate(zip(result.rows, result.hypervolume, strict=True))]
    write_rows_csv(d / HYPERVOLUME_CSV, hv_rows, first=["evaluation", "id", "hypervolume"])
    tmp = d / (PREDICTORS_JSONL + ".tmp")
    with open(tmp, "w") as fh:
        for rec in result.predictors:
            fh.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                 for k, v in rec.items()}) + "\n")
    os.replace(tmp, d / PREDICTORS_JSONL)
