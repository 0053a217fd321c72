"""The `search` stage: search a tune run's super-network and write a search artifact directory.

Layout of a search directory (stage "search"):

    manifest.json      options, parent tune run + digest, objectives, super-network reference, front summary
    archive.jsonl/csv  every real evaluation, one row each, written as it goes (the resume source)
    front.csv/json     the exact non-dominated set, numbered 1..K by the first objective
    hypervolume.csv    hypervolume after each evaluation
    predictors.jsonl   LINAS predictor choice and cross-validation error per iteration
    pareto.png         every evaluated point, the front numbered, the super-network (and baseline) marked

While running, everything lives in `<output>.partial/`; a killed search continues with `--resume`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instatune_cli.errors import InstatuneError

FRONT_JSON = "front.json"


def default_output(run_dir: str | Path) -> Path:
    """`run/` -> `run-search/`, beside the tune run."""
    p = Path(run_dir)
    return p.resolve().parent / f"{p.resolve().name}-search"


@dataclass
class SearchOptions:
    objectives: list[str] = field(default_factory=lambda: ["acc", "macs"])
    algorithm: str = "linas"
    evals: int = 50
    population: int = 10
    batch: int | None = None
    seed: int = 0
    constraints: list[str] = field(default_factory=list)
    pick: str | None = None
    limit_eval: int | None = None
    eval_batch_size: int = 64
    latency_batch: int = 1
    latency_seq_len: int | None = None
    latency_threads: int | None = None
    baseline: str | None = None
    ref_point: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def parse_pick(rule: str | None) -> float | None:
    """`max-drop=0.5` -> 0.5 accuracy points."""
    if rule is None:
        return None
    key, _, val = rule.partition("=")
    if key.strip() != "max-drop" or not val:
        raise InstatuneError(f"unknown pick rule {rule!r}; use e.g. max-drop=0.5 (accuracy points)")
    try:
        return float(val)
    except ValueError:
        raise InstatuneError(f"pick rule {rule!r}: {val!r} is not a number of accuracy points") from None


def parse_ref_point(text: str | None, objectives: list[Any]) -> dict[str, float] | None:
    """`acc=0.5,macs=1.5G` -> {"acc": 0.5, "macs": 1.5e9}: one value per objective, natural units."""
    if text is None:
        return None
    from instatune_cli.search.objectives import parse_si

    names = [o.name for o in objectives]
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, eq, val = part.partition("=")
        if not eq or key.strip() not in names:
            raise InstatuneError(f"--ref-point {text!r}: write one name=value per objective, e.g. "
                                 + ",".join(f"{n}=..." for n in names))
        out[key.strip()] = parse_si(val.strip())
    missing = [n for n in names if n not in out]
    if missing:
        raise InstatuneError(f"--ref-point {text!r} lacks a value for {', '.join(missing)}; give one per objective")
    return out


def pick_cheapest(front: list[dict[str, Any]], reference: dict[str, Any], max_drop: float,
                  cost: str) -> dict[str, Any] | None:
    """The front member with the lowest `cost` whose accuracy is within `max_drop` points of the reference."""
    if "acc" not in reference:
        raise InstatuneError("--pick max-drop needs the acc objective")
    floor = reference["acc"] - max_drop / 100.0
    ok = [r for r in front if r.get("acc") is not None and r["acc"] >= floor - 1e-12]
    return min(ok, key=lambda r: (r[cost], -r["acc"])) if ok else None


def run_stage(run_dir: str | Path, output: str | Path | None, opts: SearchOptions, *, force: bool = False,
              resume: bool = False, on_eval: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """Run the search stage end to end; returns (artifact, SearchResult, summary)."""
    from instatune_cli import artifacts
    from instatune_cli.search import supernet
    from instatune_cli.search.objectives import parse_constraint, resolve_objectives
    from instatune_cli.search.report import plot_pareto
    from instatune_cli.search.run import run_search

    objs = resolve_objectives(opts.objectives)
    if not 2 <= len(objs) <= 3:
        raise InstatuneError(f"give 2 or 3 objectives (got {len(objs)}): e.g. --objectives acc,macs")
    cons = [parse_constraint(c) for c in opts.constraints]
    max_drop = parse_pick(opts.pick)
    ref_point = parse_ref_point(opts.ref_point, objs)
    if opts.evals < opts.population:
        raise InstatuneError(
            f"budget of {opts.evals} evaluations is smaller than the population of {opts.population}; "
            "raise --evals or lower --population")
    if "latency" in opts.objectives:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise InstatuneError("the latency objective needs onnxruntime; pip install onnxruntime") from None

    parent = artifacts.load(run_dir, "tune")
    out = Path(output) if output else default_output(run_dir)
    writer = artifacts.StageWriter(out, "search", opts.to_dict(), parent=parent, force=force, resume=resume,
                                   cleanup_on_error=False)
    work = writer.open()
    resuming = resume and (work / "archive.jsonl").exists()

    lat = supernet.LatencySetup(opts.latency_batch, opts.latency_seq_len or 0, opts.latency_threads)
    obj = supernet.build(parent.path, [o.name for o in objs], limit_eval=opts.limit_eval,
                         batch_size=opts.eval_batch_size,
                         latency=lat if opts.latency_seq_len else None)
    baseline = None
    if opts.baseline:
        b = artifacts.load(opts.baseline, "tune")
        baseline = {"name": f"baseline ({b.path.name})", "acc": b.metrics.get("super_accuracy"),
                    "macs": obj.reference.get("macs"), "params": obj.reference.get("params")}

    result = run_search(obj.space, objs, obj.evaluate, exact=obj.exact, algorithm=opts.algorithm,
                        evals=opts.evals, population=opts.population, seed=opts.seed, archive_dir=work,
                        resume=resuming, constraints=cons, batch=opts.batch, on_eval=on_eval,
                        ref_point=ref_point)

    front = [dict(r) for r in result.front]
    picked = None
    if max_drop is not None:
        cost = next((o.name for o in objs if o.direction == "min"), None)
        if cost is None:
            raise InstatuneError("--pick needs a cost objective to minimise (macs, params, latency or size)")
        picked = pick_cheapest(front, obj.reference, max_drop, cost)
        for r in front:
            r["picked"] = picked is not None and r["id"] == picked["id"]
    (work / FRONT_JSON).write_text(json.dumps({"objectives": [o.to_dict() for o in objs], "front": front,
                                               "reference": obj.reference, "picked": picked}, indent=2) + "\n")
    plot_pareto(result.rows, front, objs, work / "pareto.png", supernet=obj.reference, baseline=baseline)

    summary = result.summary()
    summary.update({"front": [{"subnet": r["subnet"], "id": r["id"], "name": r["name"],
                               **{o.name: r.get(o.name) for o in objs}} for r in front],
                    "reference": obj.reference, "picked": picked["subnet"] if picked else None,
                    "space_size": obj.space.cardinality()})
    metrics = {k: summary[k] for k in ("evaluations", "front_size", "hypervolume", "evals_per_minute",
                                       "feasible", "picked", "notes")}
    metrics["supernet"] = obj.reference
    art = writer.commit(model=parent.model, metrics=metrics,
                        extra={"objectives": [o.to_dict() for o in objs], "space": obj.space.to_dict()})
    return art, result, summary


def load_front(search_dir: str | Path) -> tuple[Any, list[dict[str, Any]]]:
    """(search artifact, numbered front rows) of a finished search."""
    from instatune_cli import artifacts

    art = artifacts.load(search_dir, "search")
    data = json.loads((art.path / FRONT_JSON).read_text())
    return art, data["front"]


def front_member(search_dir: str | Path, number: int) -> tuple[Any, dict[str, Any]]:
    art, front = load_front(search_dir)
    for r in front:
        if int(r["subnet"]) == number:
            return art, r
    raise InstatuneError(
        f"sub-network {number} is not on the front of {art.path} (it has {len(front)}: 1..{len(front)})")
