"""The `search` stage: search a tune run's super-network and write a search artifact directory.

Layout of a search directory (stage "search"):

    manifest.json      options, parent tune run + digest, objectives, super-network reference, front summary;
                       metrics.metric / selection_split / warnings / collapsed (see below)
    archive.jsonl/csv  every real evaluation, one row each, written as it goes (the resume source)
    front.csv/json     the exact non-dominated set, numbered 1..K by the first objective, with its held-out scores
    hypervolume.csv    hypervolume after each evaluation
    predictors.jsonl   LINAS predictor choice and cross-validation error per iteration
    pareto.png         every evaluated point, the front numbered (its held-out scores hollow), the super-network
                       (and baseline) marked

Two splits, so that the reported scores are ones the search did not see. The `acc` objective is the tune
run's metric (accuracy; mcc for CoLA; f1 for MRPC/QQP; `--metric` overrides) on its VALIDATION split: that
is all the search ever measures, constraints (`min-acc`) and `--pick max-drop` included. After the search,
each front member and the super-network is scored once on the whole eval split (`eval_acc`, plus
`eval_accuracy` when the metric is not accuracy). Columns without a prefix are on the selection split
(`accuracy`, `collapsed`), `eval_` ones on the eval split. `collapsed` / `eval_collapsed` flag a sub-network
at or below the majority-class rate (accuracy), or predicting one class for everything (f1, mcc).
A run made before tune kept a validation split (no val.jsonl) is searched on its eval split, with a warning
(printed, in metrics.warnings and notes, and selection_split "eval").

While running, everything lives in `<output>.partial/`; a killed search continues with `--resume`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instatune_cli.errors import InstatuneError
from instatune_cli.search.archive import write_rows_csv
from instatune_cli.search.run import FRONT_CSV
from instatune_cli.space import SubNet

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
    limit_eval: int | None = None   # the older name of limit_val (it always limited the rows `acc` selects on)
    limit_val: int | None = None
    metric: str | None = None       # accuracy | f1 | mcc; None: the tune run's own
    eval_batch_size: int = 64
    latency_batch: int = 1
    latency_seq_len: int | None = None
    latency_threads: int | None = None
    baseline: str | None = None
    ref_point: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def parse_pick(rule: str | None) -> float | None:
    """`max-drop=0.5` -> 0.5 points (x 0.01) of the metric, on the selection (validation) split."""
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
    """The front member with the lowest `cost` whose `acc` is within `max_drop` points of the reference's. Both
    are selection-split (validation) scores: choosing on eval scores would leak the held-out split."""
    if "acc" not in reference:
        raise InstatuneError("--pick max-drop needs the acc objective")
    floor = reference["acc"] - max_drop / 100.0
    ok = [r for r in front if r.get("acc") is not None and r["acc"] >= floor - 1e-12]
    return min(ok, key=lambda r: (r[cost], -r["acc"])) if ok else None


def run_stage(run_dir: str | Path, output: str | Path | None, opts: SearchOptions, *, force: bool = False,
              resume: bool = False, on_eval: Any = None,
              on_warning: Callable[[str], None] | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Run the search stage end to end; returns (artifact, SearchResult, summary). `on_warning(text)` hears
    the no-validation-split fallback as soon as it is known (default: warnings.warn); it is recorded in the
    manifest either way."""
    from instatune_cli import artifacts
    from instatune_cli.measure.metrics import check_metric
    from instatune_cli.search import supernet
    from instatune_cli.search.objectives import parse_constraint, resolve_objectives
    from instatune_cli.search.run import run_search

    objs = resolve_objectives(opts.objectives)
    if not 2 <= len(objs) <= 3:
        raise InstatuneError(f"give 2 or 3 objectives (got {len(objs)}): e.g. --objectives acc,macs")
    cons = [parse_constraint(c) for c in opts.constraints]
    max_drop = parse_pick(opts.pick)
    ref_point = parse_ref_point(opts.ref_point, objs)
    if opts.metric is not None:
        opts.metric = check_metric(opts.metric)
    for flag, v in (("--limit-val", opts.limit_val), ("--limit-eval", opts.limit_eval)):
        if v is not None and v < 1:
            raise InstatuneError(f"{flag} must be at least 1, got {v}")
    for flag, v in (("--population", opts.population), ("--evals", opts.evals)):
        if v < 1:
            raise InstatuneError(f"{flag} must be at least 1, got {v}")
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
    try:
        resuming = resume and (work / "archive.jsonl").exists()

        lat = supernet.LatencySetup(opts.latency_batch, opts.latency_seq_len or 0, opts.latency_threads)
        obj = supernet.build(parent.path, [o.name for o in objs],
                             limit_val=opts.limit_val if opts.limit_val is not None else opts.limit_eval,
                             batch_size=opts.eval_batch_size, latency=lat if opts.latency_seq_len else None,
                             metric=opts.metric, on_warning=on_warning)
        baseline = _baseline(opts.baseline, obj) if opts.baseline else None

        result = run_search(obj.space, objs, obj.evaluate, exact=obj.exact, algorithm=opts.algorithm,
                            evals=opts.evals, population=opts.population, seed=opts.seed, archive_dir=work,
                            resume=resuming, constraints=cons, batch=opts.batch, on_eval=on_eval,
                            ref_point=ref_point)

        # the search is over: only now is the eval split read, once per front member and the super-network
        front = [dict(r) for r in result.front]
        held = obj.score_holdout([None, *(SubNet.from_dict(r) for r in front)])
        obj.reference.update(held[0])
        for r, h in zip(front, held[1:], strict=True):
            r.update(h)
        picked = None
        if max_drop is not None:
            cost = next((o.name for o in objs if o.direction == "min"), None)
            if cost is None:
                raise InstatuneError("--pick needs a cost objective to minimise (macs, params, latency or size)")
            picked = pick_cheapest(front, obj.reference, max_drop, cost)
            for r in front:
                r["picked"] = picked is not None and r["id"] == picked["id"]
        collapsed = [r["subnet"] for r in front if r.get("collapsed") or r.get("eval_collapsed")]
        notes = [*obj.warnings, *result.notes, *_collapse_notes(collapsed, front, obj)]
        names = [o.name for o in objs]
        extra_cols = [c for c in FRONT_EXTRA if any(c in r for r in front)]
        write_rows_csv(work / FRONT_CSV, front, first=["subnet", "id", "name", "layers", "heads", "ffn", *names,
                                                        *extra_cols])
        selection = {"metric": obj.metric, "selection_split": obj.selection_split,
                     "selection_examples": obj.selection_examples,
                     "eval_split": "eval" if obj.holdout is not None else None, "eval_examples": obj.eval_examples,
                     "warnings": list(obj.warnings), "collapsed": collapsed}
        (work / FRONT_JSON).write_text(json.dumps({"objectives": [o.to_dict() for o in objs], **selection,
                                                   "front": front, "reference": obj.reference, "picked": picked},
                                                  indent=2) + "\n")
        _plot(result.rows, front, objs, work / "pareto.png", obj, baseline)

        summary = result.summary()
        summary.update({"front": [{"subnet": r["subnet"], "id": r["id"], "name": r["name"],
                                   **{o.name: r.get(o.name) for o in objs},
                                   **{c: r[c] for c in extra_cols if c in r}} for r in front],
                        "reference": obj.reference, "picked": picked["subnet"] if picked else None,
                        "space_size": obj.space.cardinality(), **selection, "notes": notes})
        metrics = {k: summary[k] for k in ("evaluations", "front_size", "hypervolume", "evals_per_minute",
                                           "feasible", "picked", "notes", *selection)}
        metrics["supernet"] = obj.reference
        metrics["front"] = summary["front"]
        art = writer.commit(model=parent.model, metrics=metrics,
                            extra={"objectives": [o.to_dict() for o in objs], "space": obj.space.to_dict()})
        return art, result, summary
    finally:
        writer.release()  # the output's lock, also when the search stops early


# front columns beyond the objectives, in this order (those present): see the module docstring
FRONT_EXTRA = ("eval_acc", "accuracy", "eval_accuracy", "collapsed", "eval_collapsed", "picked")


def _collapse_notes(collapsed: list[int], front: list[dict[str, Any]], obj: Any) -> list[str]:
    """Say when sub-networks (or the super-network) learned nothing: they are no real trade-off."""
    rule = ("at or below the majority-class rate" if obj.metric == "accuracy"
            else "predicting one class for every example")
    out = []
    if obj.reference.get("collapsed") or obj.reference.get("eval_collapsed"):
        out.append(f"the super-network itself is collapsed ({rule}): the tune run did not learn the task")
    if collapsed and len(collapsed) == len(front):
        out.append(f"every front member is collapsed ({rule}): this front is no real trade-off")
    elif collapsed:
        out.append(f"sub-network{'s' if len(collapsed) > 1 else ''} {', '.join(map(str, collapsed))} "
                   f"{'are' if len(collapsed) > 1 else 'is'} collapsed ({rule}); see the collapsed columns")
    return out


def _baseline(path: str, obj: Any) -> dict[str, Any]:
    """A plain tune run's super-network marker: its recorded eval-split score (it has no search of its own)."""
    from instatune_cli import artifacts

    b = artifacts.load(path, "tune")
    return {"name": f"baseline ({b.path.name})", "eval_acc": b.metrics.get(f"super_{obj.metric}"),
            "macs": obj.reference.get("macs"), "params": obj.reference.get("params")}


def _plot(rows: list[dict[str, Any]], front: list[dict[str, Any]], objs: list[Any], path: Path, obj: Any,
          baseline: dict[str, Any] | None) -> None:
    from instatune_cli.search.report import plot_pareto

    labels = {"acc": f"acc: {obj.metric} on {obj.selection_split} (hollow: eval)",
              "holdout": f"front, {obj.metric} on eval (scored once)"} if obj.selection_split else {}
    plot_pareto(rows, front, objs, path, supernet=obj.reference, baseline=baseline,
                holdout={"acc": "eval_acc"}, labels=labels)


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
