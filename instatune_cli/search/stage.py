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
`eval_accuracy` when the metric is not accuracy, `eval_mse` for a regressor). Columns without a prefix are on
the selection split (`accuracy`, `mse`, `collapsed`), `eval_` ones on the eval split. `collapsed` /
`eval_collapsed` flag a sub-network no better than a constant predictor on the metric (measure.metrics: at or
below the best constant class prediction, MCC <= 0, a correlation <= 0); `--pick` never picks one.
A run made before tune kept a validation split (no val.jsonl) is searched on its eval split, with a warning
(printed, in metrics.warnings and notes, and selection_split "eval").

While running, everything lives in `<output>.partial/`; a killed search continues with `--resume`, which
first checks `search.json` (what the archived scores were measured on: `Measurement`) against this run.

Under `torchrun` / `accelerate launch` (instatune_cli.distributed) the VALIDATION SET is sharded, not the
candidates: rank 0 asks and tells (the search's one driver loop, `run.drive`), owns the archive, the predictors
and every file; for each real evaluation it announces the sub-network (`run_search(group=)`), every rank scores it
on its share of the selection batches (batch i on rank i mod N, `run.follow_search`) and the confusion counts are
summed, so rank 0 gets exactly the single-process score and the archive is the single-process archive with the
same seed (resume included). Why not candidates: the algorithms propose one candidate at a time where the next
depends on what they saw (the start population, NSGA-II's immigrant, the replay that makes `--resume` exact),
LINAS proposes only `--batch` (population / 2) per iteration, so candidate sharding would cap the speed-up at
that batch and change the algorithms; sharding each evaluation keeps them untouched and scales to as many ranks as
there are selection batches (`--eval-batch-size`). Latency and size (extraction, ONNX Runtime) are measured by
rank 0 alone while the others wait, so sibling processes never load the cores being timed. The eval-split
scoring of the front after the search runs on rank 0.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instatune_cli import artifacts
from instatune_cli.artifacts import StageResult, stage_options, writing
from instatune_cli.distributed import SINGLE, close, cpu_group, env_rank, rank0_reports
from instatune_cli.errors import InstatuneError
from instatune_cli.measure.latency import LatencyOptions, default_threads
from instatune_cli.measure.metrics import check_metric, check_metric_kind, is_regression
from instatune_cli.quantize.policy import QuantPolicy
from instatune_cli.search import run as search_run
from instatune_cli.search import supernet
from instatune_cli.search.archive import write_rows_csv
from instatune_cli.search.interface import algorithm_class
from instatune_cli.search.objectives import parse_constraint, parse_si, resolve_objectives
from instatune_cli.search.report import plot_pareto
from instatune_cli.search.run import FRONT_CSV, SearchResult, follow_search
from instatune_cli.space import SubNet
from instatune_cli.tune import has_split, run_metric

FRONT_JSON = "front.json"
SEARCH_FILE = "search.json"  # the Measurement a --resume must match


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
    latency_batch: int = LatencyOptions.batch  # the latency objective's: measure.latency.LatencyOptions
    latency_seq_len: int | None = LatencyOptions.seq_len  # None: the search space's seq_len
    latency_threads: int | None = LatencyOptions.threads
    baseline: str | None = None
    ref_point: str | None = None
    quant: bool = False             # joint architecture + precision search (docs/architecture.md, "Quantization")
    calibration_samples: int = 128  # --quant: training examples the QDQ emulation calibrates on
    group_size: int = 32            # --quant: inputs per INT4 scale (quantize/policy.py DEFAULT_GROUP_SIZE)
    int4: bool = True               # --quant: INT4 block-wise weights are a precision choice where they fit
    progress_every: float = 30.0    # seconds between plain progress lines when stderr is not a terminal

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# what each measurement input is called in a refusal (`Measurement.differences`)
_INPUT_NAMES = {
    "parent": "the tune run (it was remade since, e.g. by tune --force)",
    "objectives": "--objectives", "space": "the search space", "max_length": "the tune run's max length",
    "metric": "--metric", "selection_split": "the selection split",
    "selection_examples": "the number of selection examples (--limit-val)", "eval_batch_size": "--eval-batch-size",
    "latency": "--latency-batch / --latency-seq-len / --latency-threads",
    "quant": "--quant / --calibration-samples / --group-size / --no-int4",
}


@dataclass
class Measurement:
    """What the search's measured values depend on, kept in the partial directory (`search.json`) so that
    `--resume` never mixes scores measured on another super-network, split or setting with new ones
    (docs/architecture.md, "Faults and resume"). Not part of it: the budget (`--evals`, which a resume may
    raise), seed, algorithm, population and constraints: they change what is measured next, not what a
    measurement means."""

    inputs: dict[str, Any]

    @classmethod
    def of(cls, parent: Any, names: list[str], opts: SearchOptions) -> Measurement:
        space = parent.path / "space.json"
        d: dict[str, Any] = {"parent": parent.digest, "objectives": list(names),
                             "space": json.loads(space.read_text()) if space.is_file() else None,
                             "max_length": parent.model.get("max_length")}
        if "acc" in names:
            split = "val" if has_split(parent, "val") else "eval"
            limit = opts.limit_val if opts.limit_val is not None else opts.limit_eval
            rows = _count_rows(parent.path / f"{split}.jsonl")
            d.update(metric=opts.metric or run_metric(parent), selection_split=split,
                     selection_examples=min(rows, limit) if limit else rows, eval_batch_size=opts.eval_batch_size)
        if "latency" in names:
            # the thread count actually used: a resume under another $OMP_NUM_THREADS would mix two settings
            d["latency"] = {"batch": opts.latency_batch, "seq_len": opts.latency_seq_len,
                            "threads": opts.latency_threads or default_threads()}
        if opts.quant:
            d["quant"] = {"calibration_samples": opts.calibration_samples, "group_size": opts.group_size,
                          "int4": opts.int4}
        return cls(json.loads(json.dumps(d)))

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.inputs, sort_keys=True).encode()).hexdigest()[:16]

    def save(self, work: Path) -> None:
        with writing("the search's measurement fingerprint", work / SEARCH_FILE):
            (work / SEARCH_FILE).write_text(json.dumps({"fingerprint": self.fingerprint, "inputs": self.inputs},
                                                       indent=1) + "\n")

    def check(self, work: Path) -> None:
        """Refuse, in one line, to resume a search whose archived scores were measured differently."""
        try:
            old = json.loads((work / SEARCH_FILE).read_text())["inputs"]
        except FileNotFoundError:
            raise InstatuneError(f"{work} records no {SEARCH_FILE} (it was started by an older instatune), so its "
                                 "scores cannot be checked against this search; pass --force without --resume to "
                                 "start over") from None
        except (OSError, ValueError, KeyError, TypeError):
            raise InstatuneError(f"{work / SEARCH_FILE} is damaged; pass --force without --resume to start the "
                                 "search over") from None
        diff = self.differences(old if isinstance(old, dict) else {})
        if diff:
            raise InstatuneError(f"{work} holds scores measured otherwise (changed: {'; '.join(diff)}); resuming would "
                                 "mix them with new ones: rerun with the options it was started with, or pass --force "
                                 "without --resume to start over")

    def differences(self, old: dict[str, Any]) -> list[str]:
        out = []
        for k in sorted(set(old) | set(self.inputs)):
            was, now = old.get(k), self.inputs.get(k)
            if was != now:
                shown = [json.dumps(v)[:20] for v in (was, now)]
                values = f" (was {shown[0]}, now {shown[1]})" if k not in ("parent", "space", "latency") else ""
                out.append(_INPUT_NAMES.get(k, k) + values)
        return out


def _count_rows(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


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
    """The front member with the lowest `cost` whose `acc` is within `max_drop` points of the reference's and
    that is not collapsed (no better than a constant predictor). Both are selection-split (validation) scores:
    choosing on eval scores would leak the held-out split."""
    if "acc" not in reference:
        raise InstatuneError("--pick max-drop needs the acc objective")
    floor = reference["acc"] - max_drop / 100.0
    ok = [r for r in front if r.get("acc") is not None and r["acc"] >= floor - 1e-12 and not r.get("collapsed")]
    return min(ok, key=lambda r: (r[cost], -r["acc"])) if ok else None


@dataclass(frozen=True)
class SearchStageResult(StageResult):
    """A committed search directory, the search itself (`search.run.SearchResult`: every row, the front) and
    its summary: what `instatune search` prints as its table, or as JSON with --json."""

    search: SearchResult | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def search_stage(run_dir: str | Path, output: str | Path | None, opts: SearchOptions | None = None, *,
                 force: bool = False, resume: bool = False, on_eval: Any = None,
                 on_warning: Callable[[str], None] | None = None, **fields: Any) -> SearchStageResult:
    """Run the search stage end to end. `on_eval(row)` hears each real evaluation; `on_warning(text)` hears
    the no-validation-split fallback as soon as it is known (default: warnings.warn); it is recorded in the
    manifest either way. Launched on several processes (module docstring) every rank but rank 0 gets
    `artifact=None`, `search=None` and an empty summary. `fields`: SearchOptions' fields instead of `opts`."""
    opts = stage_options(SearchOptions, opts, fields)
    art, result, summary = _run(run_dir, output, opts, force, resume, on_eval, on_warning)
    return SearchStageResult(art, result, summary)


def run_stage(run_dir: str | Path, output: str | Path | None, opts: SearchOptions, *, force: bool = False,
              resume: bool = False, on_eval: Any = None,
              on_warning: Callable[[str], None] | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """`search_stage` as the tuple (artifact, SearchResult, summary) that tests written before it unpack."""
    r = search_stage(run_dir, output, opts, force=force, resume=resume, on_eval=on_eval, on_warning=on_warning)
    return r.artifact, r.search, r.summary


def _run(run_dir: str | Path, output: str | Path | None, opts: SearchOptions, force: bool, resume: bool,
         on_eval: Any, on_warning: Callable[[str], None] | None) -> tuple[Any, Any, dict[str, Any]]:
    with rank0_reports(env_rank()):  # under a launcher: rank 0 prints the one line, the others exit quietly
        objs, cons, max_drop, ref_point = _check_options(opts)
        parent = artifacts.load(run_dir, "tune")
        if opts.metric is not None:  # a regressor's run takes pearson/spearman, a classifier's the others

            check_metric_kind(opts.metric, is_regression(run_metric(parent)), f"tune run {parent.path}")
        if opts.baseline:  # every input is checked before the output is opened and the model loaded
            artifacts.load(opts.baseline, "tune", verify=False)
        measurement = Measurement.of(parent, [o.name for o in objs], opts)
        out = Path(output) if output else default_output(run_dir)
        writer = artifacts.StageWriter(out, "search", opts.to_dict(), parent=parent, force=force, resume=resume,
                                       cleanup_on_error=False, keep_if=_has_evaluations, inputs=(opts.baseline,))
        group = cpu_group()
        try:
            stage = _SearchStage(parent, writer, objs, cons, max_drop, ref_point, opts, measurement, resume,
                                 on_eval, on_warning, group)
            try:
                with writer.faults("the search"):  # a refused write: one line, the partial kept for --resume
                    resuming = group.agree(stage.open)  # rank 0 alone opens the output and checks the archive
                    return stage.run(resuming)
            finally:
                writer.release()  # the output's lock, also when the search stops early
        finally:
            close(group)


def _has_evaluations(partial: Path) -> bool:
    """A search partial is worth resuming once its archive holds an evaluation (artifacts.StageWriter.keep_if)."""
    archive = partial / "archive.jsonl"
    return archive.is_file() and archive.stat().st_size > 0


def _check_options(opts: SearchOptions) -> tuple[list[Any], list[Any], float | None, dict[str, float] | None]:
    """(objectives, constraints, pick's max drop, reference point), or one line on the first bad option."""
    algorithm_class(opts.algorithm)  # a name no algorithm registered: one line listing those that did
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
    if opts.quant:
        objs = _joint_objectives(objs)
        if opts.calibration_samples < 8:
            raise InstatuneError(f"--calibration-samples {opts.calibration_samples} is too few; give at least 8")
        g = opts.group_size
        if g < 16 or g & (g - 1):
            raise InstatuneError(f"--group-size {g} is not a power of two of at least 16; use 16, 32, 64 or 128")
    if "latency" in opts.objectives:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise InstatuneError("the latency objective needs onnxruntime; pip install onnxruntime") from None
    return objs, cons, max_drop, ref_point


@dataclass
class _SearchStage:
    """One search in its opened partial directory: check or record the measurement, search, score the front on
    the eval split, write the front, commit."""

    parent: Any
    writer: Any
    objs: list[Any]
    cons: list[Any]
    max_drop: float | None
    ref_point: dict[str, float] | None
    opts: SearchOptions
    measurement: Measurement
    resume: bool
    on_eval: Any
    on_warning: Callable[[str], None] | None
    group: Any = None  # distributed.Group; a single process when not launched

    @property
    def work(self) -> Path:
        return self.writer.path

    def open(self) -> bool:
        """Rank 0: take the output, check (resume) or record the measurement; returns whether it resumes."""
        self.writer.open()
        resuming = self.resume and (self.work / "archive.jsonl").exists()
        if resuming:
            self.measurement.check(self.work)
        else:
            self.measurement.save(self.work)
        return resuming

    def run(self, resuming: bool) -> tuple[Any, Any, dict[str, Any]]:
        obj, result = self.search(resuming)
        if result is None:  # a non-zero rank: its share is done, rank 0 writes the rest
            return None, None, {}
        # the search is over: only now is the eval split read, once per front member and the super-network
        front, picked = self.score_front(obj, result)
        summary = self.write_front(obj, result, front, picked)
        return self.commit(summary), result, summary

    def search(self, resuming: bool) -> tuple[Any, Any]:
        opts, group = self.opts, self.group or SINGLE
        lat = supernet.LatencySetup(opts.latency_batch, opts.latency_seq_len or 0, opts.latency_threads)
        obj = supernet.build(self.parent.path, [o.name for o in self.objs],
                             limit_val=opts.limit_val if opts.limit_val is not None else opts.limit_eval,
                             batch_size=opts.eval_batch_size, latency=lat if opts.latency_seq_len else None,
                             metric=opts.metric, on_warning=self.on_warning if group.main else _silent,
                             quant=opts.quant, calibration_samples=opts.calibration_samples,
                             group=group if group.active else None, group_size=opts.group_size, int4=opts.int4)
        if not group.main:  # rank 0 asks and tells; this rank scores its share of each evaluation
            follow_search(group, obj.evaluate_shard)
            return obj, None
        self.baseline = _baseline(opts.baseline, obj) if opts.baseline else obj.int8_reference
        every = None if sys.stderr.isatty() else opts.progress_every  # a terminal shows the per-evaluation lines
        # through the module, where a test that traces the search's phases replaces it
        result = search_run.run_search(obj.space, self.objs, obj.evaluate, exact=obj.exact, algorithm=opts.algorithm,
                                       evals=opts.evals, population=opts.population, seed=opts.seed,
                                       archive_dir=self.work, resume=resuming, constraints=self.cons, batch=opts.batch,
                                       on_eval=self.on_eval, ref_point=self.ref_point, progress_every=every,
                                       group=group)
        return obj, result

    def score_front(self, obj: Any, result: Any) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        front = [dict(r) for r in result.front]
        held = obj.score_holdout([None, *(SubNet.from_dict(r) for r in front)])
        obj.reference.update(held[0])
        for r, h in zip(front, held[1:], strict=True):
            r.update(h)
            if r.get("quant") and obj.policy_of is not None:  # what quantize/export --int8 apply to this member
                r["policy"] = obj.policy_of(SubNet.from_dict(r)).to_dict()
        picked = None
        if self.max_drop is not None:
            cost = next((o.name for o in self.objs if o.direction == "min"), None)
            if cost is None:
                raise InstatuneError("--pick needs a cost objective to minimise (macs, params, latency or size)")
            picked = pick_cheapest(front, obj.reference, self.max_drop, cost)
            for r in front:
                r["picked"] = picked is not None and r["id"] == picked["id"]
        return front, picked

    def write_front(self, obj: Any, result: Any, front: list[dict[str, Any]],
                    picked: dict[str, Any] | None) -> dict[str, Any]:
        """front.csv, front.json and pareto.png; returns the summary."""
        objs, work = self.objs, self.work
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
                                                   "front": front, "reference": obj.reference, "picked": picked,
                                                   "int8_reference": obj.int8_reference,
                                                   **({"int4_reference": obj.int4_reference}
                                                      if obj.int4_reference else {})},
                                                  indent=2) + "\n")
        _plot(result.rows, front, objs, work / "pareto.png", obj, self.baseline)
        summary = result.summary()
        summary.update({"front": [{"subnet": r["subnet"], "id": r["id"], "name": r["name"],
                                   **{o.name: r.get(o.name) for o in objs},
                                   **{c: r[c] for c in extra_cols if c in r},
                                   **({"policy_summary": _policy_summary(r["policy"])} if r.get("policy") else {})}
                                  for r in front],
                        "reference": obj.reference, "picked": picked["subnet"] if picked else None,
                        "space_size": obj.space.cardinality(), **selection, "notes": notes})
        if obj.int8_reference is not None:
            summary["int8_reference"] = obj.int8_reference
        if obj.int4_reference is not None:
            summary["int4_reference"] = obj.int4_reference
        self.selection, self.space = selection, obj.space
        return summary

    def commit(self, summary: dict[str, Any]) -> Any:
        metrics = {k: summary[k] for k in ("evaluations", "front_size", "hypervolume", "evals_per_minute",
                                           "feasible", "picked", "notes", *self.selection)}
        metrics["supernet"] = summary["reference"]
        metrics["front"] = summary["front"]
        return self.writer.commit(model=self.parent.model, metrics=metrics,
                                  extra={"objectives": [o.to_dict() for o in self.objs],
                                         "space": self.space.to_dict(), "measurement": self.measurement.fingerprint})


def _silent(text: str) -> None:
    """A non-zero rank's warnings: rank 0 shows (and records) the same ones."""


# front columns beyond the objectives, in this order (those present): see the module docstring
def _joint_objectives(objs: list[Any]) -> list[Any]:
    """--quant: size is the closed-form bytes of the quantized candidate (exact, not predicted); latency of a
    quantized candidate is not measured by the search (quantize/export measure the chosen one)."""
    import dataclasses

    if any(o.name == "latency" for o in objs):
        raise InstatuneError("--quant searches accuracy against size, MACs or params; drop latency (the quantize "
                             "and export stages measure the chosen sub-network's INT8 latency)")
    if not any(o.name == "size" for o in objs):
        raise InstatuneError("--quant needs the size objective (INT8 changes size, not MACs): "
                             "e.g. --objectives acc,size")
    return [dataclasses.replace(o, exact=True) if o.name == "size" else o for o in objs]


def _policy_summary(policy: dict[str, Any]) -> str:
    """`32/33 layers INT8 (FP32: embeddings)`: a joint search member's policy as the table shows it."""
    return QuantPolicy.from_dict(policy).summary()


FRONT_EXTRA = ("eval_acc", "accuracy", "eval_accuracy", "mse", "eval_mse", "collapsed", "eval_collapsed", "picked")


def _collapse_notes(collapsed: list[int], front: list[dict[str, Any]], obj: Any) -> list[str]:
    """Say when sub-networks (or the super-network) learned nothing: they are no real trade-off."""
    rule = collapse_rule(obj.metric)
    out = []
    if obj.reference.get("collapsed") or obj.reference.get("eval_collapsed"):
        out.append(f"the super-network itself is collapsed ({rule}): the tune run did not learn the task")
    if collapsed and len(collapsed) == len(front):
        out.append(f"every front member is collapsed ({rule}): this front is no real trade-off and nothing on it "
                   "is worth exporting; tune longer or with other settings, then search again")
    elif collapsed:
        out.append(f"sub-network{'s' if len(collapsed) > 1 else ''} {', '.join(map(str, collapsed))} "
                   f"{'are' if len(collapsed) > 1 else 'is'} collapsed ({rule}); see the collapsed columns")
    return out


def collapse_rule(metric: str) -> str:
    """What `collapsed` means for `metric`, in words (measure.metrics has the rule)."""
    if is_regression(metric):
        return f"{metric} correlation at or below 0, or a constant output"
    if metric == "mcc":
        return "MCC at or below 0"
    if metric == "f1":
        return "F1 at or below always predicting one class"
    return "at or below the majority-class rate"


def _baseline(path: str, obj: Any) -> dict[str, Any]:
    """A plain tune run's super-network marker: its recorded eval-split score (it has no search of its own)."""
    b = artifacts.load(path, "tune")
    return {"name": f"baseline ({b.path.name})", "eval_acc": b.metrics.get(f"super_{obj.metric}"),
            "macs": obj.reference.get("macs"), "params": obj.reference.get("params")}


def _plot(rows: list[dict[str, Any]], front: list[dict[str, Any]], objs: list[Any], path: Path, obj: Any,
          baseline: dict[str, Any] | None) -> None:
    labels = {"acc": f"acc: {obj.metric} on {obj.selection_split} (hollow: eval)",
              "holdout": f"front, {obj.metric} on eval (scored once)"} if obj.selection_split else {}
    plot_pareto(rows, front, objs, path, supernet=obj.reference, baseline=baseline,
                holdout={"acc": "eval_acc"}, labels=labels)


def load_front(search_dir: str | Path) -> tuple[Any, list[dict[str, Any]]]:
    """(search artifact, numbered front rows) of a finished search."""
    art = artifacts.load(search_dir, "search")
    path = art.path / FRONT_JSON
    redo = f"re-run the search stage (this one was made by instatune {art.manifest.get('instatune_version', '?')})"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InstatuneError(f"{path} cannot be read as JSON ({getattr(e, 'msg', e)}); {redo}") from None
    front = data.get("front") if isinstance(data, dict) else None
    if not isinstance(front, list) or not all(_front_row_ok(r) for r in front):
        raise InstatuneError(f"{path} holds no front of numbered sub-networks (subnet, layers, heads, ffn); it is "
                             f"damaged or from another version: {redo}")
    return art, front


def _front_row_ok(r: Any) -> bool:
    return isinstance(r, dict) and isinstance(r.get("subnet"), int) and all(k in r for k in ("layers", "heads", "ffn"))


def front_member(search_dir: str | Path, number: int) -> tuple[Any, dict[str, Any]]:
    art, front = load_front(search_dir)
    for r in front:
        if int(r["subnet"]) == number:
            return art, r
    raise InstatuneError(
        f"sub-network {number} is not on the front of {art.path} (it has {len(front)}: 1..{len(front)})")


def searched_policy(art: artifacts.Artifact) -> QuantPolicy | None:
    """The policy a joint search chose for the sub-network an extract directory came from, if any."""
    src = art.options.get("subnet")
    try:
        parent = art.parent(("search", "tune"))
    except InstatuneError:
        return None
    if parent.stage != "search" or src is None:
        return None
    _, row = front_member(parent.path, int(src))
    if not row.get("policy"):
        return None
    return QuantPolicy.from_dict(row["policy"], where=f"{parent.path} front member {src}")
