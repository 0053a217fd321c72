"""Built-in objectives of a tuned super-network, on the same `evaluate`/`exact` interface a user's own
objective uses (`run_search`).

acc: the tune run's metric (accuracy, f1 or mcc: `model.metric` of its manifest, or `metric=`) of the active
sub-network of the in-memory super-network on pre-tokenized batches of the run's VALIDATION split (no
copies). The eval split is never read while searching: `score_holdout` scores chosen sub-networks (the front)
on it afterwards, once each. A run made before validation splits existed (no val.jsonl) falls back to
selecting on its eval split, with a warning (`warnings`, and `on_warning`) so its front's eval scores are
known not to be held out.
macs, params: exact closed forms. latency, size: the sub-network is extracted and exported with the very
code paths of `instatune extract` / `export`, so what the search reports is what the user gets.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instatune_cli import tune
from instatune_cli.adapters import adapter_of
from instatune_cli.errors import InstatuneError
from instatune_cli.export import export_onnx
from instatune_cli.extract import full_subnet, save_extracted
from instatune_cli.measure import macs as macs_mod
from instatune_cli.measure.latency import measure_ort_latency
from instatune_cli.measure.metrics import check_metric, check_metric_kind, is_regression
from instatune_cli.measure.size import weights_bytes
from instatune_cli.quantize.emulate import QuantEmulator
from instatune_cli.quantize.joint import int4_flags, size_from_params
from instatune_cli.quantize.policy import QuantPolicy
from instatune_cli.quantize.targets import architecture_of
from instatune_cli.space import SearchSpace, SubNet, quant_gene_count
from instatune_cli.tune import has_split, load_tuned, run_metric


@dataclass
class LatencySetup:
    batch: int = 1
    seq_len: int = 128
    threads: int | None = None
    warmup: int = 3
    runs: int = 10


@dataclass
class SupernetObjectives:
    """Everything `run_search` needs to search a tune run, plus the super-network's own figures.

    `metric`: what `acc` measures; `selection_split`: "val", or "eval" for an old run without one (then
    `warnings` says so), None without the acc objective; `selection_examples`: rows `acc` is measured on;
    `eval_examples`: rows of the eval split, once `score_holdout` ran.
    """

    space: SearchSpace
    evaluate: Callable[[SubNet], dict[str, Any]]
    exact: dict[str, Callable[[SubNet], float]]
    reference: dict[str, Any] = field(default_factory=dict)
    model: Any = None
    tokenizer: Any = None
    artifact: Any = None
    metric: str = "accuracy"
    selection_split: str | None = "val"
    selection_examples: int = 0
    eval_examples: int = 0
    warnings: list[str] = field(default_factory=list)
    holdout: Callable[[Sequence[SubNet | None]], list[dict[str, Any]]] | None = None
    policy_of: Callable[[SubNet], Any] | None = None  # joint search: the QuantPolicy of a candidate
    int8_reference: dict[str, Any] | None = None       # joint search: the all-INT8 super-network
    int4_reference: dict[str, Any] | None = None       # joint search with INT4: INT4 weights wherever a choice
    # launched search (`group`): a non-zero rank's share of `evaluate(sub)`, the collective selection pass only
    evaluate_shard: Callable[[SubNet], None] | None = None

    def score_holdout(self, subs: Sequence[SubNet | None]) -> list[dict[str, Any]]:
        """Score each of `subs` (None = the super-network) once on the run's whole eval split: `eval_acc` (the
        metric), `eval_accuracy` (when the metric is not accuracy), `eval_collapsed`. Empty dicts without acc."""
        if self.holdout is None:
            return [{} for _ in subs]
        return self.holdout(subs)


def unsorted_warning(run_dir: Path, elastic: bool) -> str:
    """A run whose heads and neurons were never sorted by importance: its prefixes are arbitrary units."""
    how = "tune it again (elastic runs sort before training)" if elastic else \
        "tune it again with --plain (plain runs now sort after training: prune after fine-tuning)"
    return (f"{run_dir} was tuned without importance reordering (--no-reorder, or an older instatune): its "
            f"sub-networks keep the first heads and neurons, not the most important; {how}")


def _warn(text: str) -> None:
    import warnings

    warnings.warn(text, UserWarning, stacklevel=3)


def fallback_warning(run_dir: Path) -> str:
    """What a search of a run without a validation split says (printed and recorded: never silent)."""
    return (f"tune run {run_dir} has no validation split (no val.jsonl: it was made before tune kept one); "
            "selecting on its eval split instead, so the front's eval scores are not held out; "
            "re-run tune for a held-out front")


def build(run_dir: str | Path, objectives: Sequence[str], *, limit_val: int | None = None,
          limit_eval: int | None = None, batch_size: int = 64, latency: LatencySetup | None = None,
          metric: str | None = None, on_warning: Callable[[str], None] | None = None,
          quant: bool = False, calibration_samples: int = 128, group: Any = None, group_size: int = 32,
          int4: bool = True) -> SupernetObjectives:
    """Load the tune run once and return the objective functions for the requested objectives.

    `metric` overrides the run's own (accuracy, f1, mcc). `limit_val` measures `acc` on the first N rows of
    the selection split (`limit_eval` is its older name, kept working; the eval split is always scored
    whole). `on_warning(text)` receives the no-validation-split fallback warning (default: warnings.warn).
    `quant`: the joint architecture + precision search (docs/architecture.md, "Quantization"): candidates carry
    precision genes, `acc` is measured through the ONNX Runtime engine's QDQ arithmetic calibrated on
    `calibration_samples` training examples, and `size` is the closed-form bytes of the quantized model. With
    `int4`, a precision gene also offers INT4 block-wise weights (blocks of `group_size` inputs) wherever the
    block divides the layer's width for every choice of the space (`quantize/joint.py` int4_flags).
    `group` (a launched `distributed.Group`; search/stage.py): the selection split is sharded across the
    processes (`Evaluator(shard=)`), every process must call `evaluate` (rank 0) or `evaluate_shard` (the
    others) for the same sub-networks in the same order, and only rank 0 extracts and measures size/latency.
    """
    from instatune_cli.measure.accuracy import Evaluator  # lazy: imports torch; the search stage loads without it

    model, tok, space, art = load_tuned(run_dir)
    if quant and not adapter_of(model).quant_search:
        raise InstatuneError(f"--quant (the joint precision search) is defined for the text families; {run_dir} "
                             f"holds a {adapter_of(model).family} model: search without --quant and use "
                             "`instatune export --int8` on the chosen sub-network")
    if quant:
        import dataclasses

        space = dataclasses.replace(space, quant=True)
    own = check_metric(run_metric(art), "metric of the run")
    metric = check_metric_kind(metric, is_regression(own), f"tune run {art.path}") if metric is not None else own
    limit = limit_val if limit_val is not None else limit_eval
    adapter = adapter_of(model)
    dims = adapter.dims_of(model)
    if quant and int4:
        import dataclasses

        flags = int4_flags(space, dims.hidden, dims.head_dim, group_size)
        if (dims.embedding_size or dims.hidden) % group_size:  # a factorised table (ELECTRA) of another width
            flags = (False, *flags[1:])
        space = dataclasses.replace(space, quant_int4=flags if any(flags) else ())
    seq = adapter.seq_len(dims, space.seq_len)
    names = set(objectives)
    notes: list[str] = []
    if not art.model.get("reorder"):
        notes.append(unsorted_warning(art.path, bool(art.model.get("elastic", True))))
        (on_warning or _warn)(notes[-1])
    split: str | None = None
    evaluator = None
    if "acc" in names:
        split = "val" if has_split(art, "val") else "eval"
        if split == "eval":
            notes.append(fallback_warning(art.path))
            (on_warning or _warn)(notes[-1])
        evaluator = Evaluator(model, tune.load_eval_batches(art, tok, batch_size=batch_size, limit=limit, which=split),
                              metric=metric, shard=group)
    lat = latency or LatencySetup(seq_len=seq)
    full = full_subnet(model)  # the super-network itself (per layer for a run recovered from a per-layer extract)

    exact: dict[str, Callable[[SubNet], float]] = {
        "macs": lambda s: float(adapter.macs(dims, s.architecture, seq)),
        "params": lambda s: float(adapter.params(dims, s.architecture)),
    }

    def shipped(sub: SubNet | None) -> dict[str, float]:
        """Extract (and export, for latency) exactly as the extract/export stages do; measure."""
        out: dict[str, float] = {}
        with tempfile.TemporaryDirectory(prefix="instatune-sub-") as td:
            mdir = Path(td) / "model"
            target = sub or full
            save_extracted(model, target, None, mdir)
            adapter.activate(model, None)
            if "size" in names:
                out["size"] = weights_bytes(mdir) / 1e6
            if "latency" in names:
                onnx = Path(td) / "model.onnx"
                export_onnx(mdir, onnx)
                r = measure_ort_latency(onnx, lat.batch, lat.seq_len, lat.threads, lat.warmup, lat.runs)
                out["latency"] = float(r["median_ms"])
                out["latency_p90"] = float(r["p90_ms"])
        return out

    joint = _Joint(model, tok, art, dims, calibration_samples, group_size) if quant else None

    def scored(ev: Any, sub: SubNet | None, prefix: str = "") -> dict[str, Any]:
        """The metric as `<prefix>acc`, plain accuracy beside it when the metric is another (a regressor: its
        mse), the collapse flag."""
        if joint is not None and sub is not None and sub.quant:
            with joint.applied(sub):
                res = ev.evaluate(sub.architecture)
        else:
            res = ev.evaluate(sub.architecture if sub is not None else None)
        out: dict[str, Any] = {f"{prefix}acc": res.score}
        if is_regression(metric):
            out[f"{prefix}mse"] = res.mse
        elif metric != "accuracy":
            out[f"{prefix}accuracy"] = res.accuracy
        out[f"{prefix}collapsed"] = res.collapsed
        return out

    def evaluate(sub: SubNet) -> dict[str, Any]:
        vals: dict[str, Any] = {}
        if evaluator is not None:
            vals.update(scored(evaluator, sub))
        if joint is not None:
            vals["size"] = joint.size_mb(sub)
        elif names & {"latency", "size"}:
            vals.update(shipped(sub))
        adapter.activate(model, None)
        return vals

    def holdout(subs: Sequence[SubNet | None]) -> list[dict[str, Any]]:
        """Loads the eval split only now, after the search; each sub-network is scored once on all of it."""
        ev = Evaluator(model, tune.load_eval_batches(art, tok, batch_size=batch_size, which="eval"), metric=metric)
        try:
            out = [scored(ev, sub, "eval_") for sub in subs]
        finally:
            adapter.activate(model, None)
        obj.eval_examples = ev.n
        return out

    reference: dict[str, Any] = {"name": "super-network", "id": full.id, "subnet_name": full.name,
                                 "macs": exact["macs"](full), "params": exact["params"](full)}
    if evaluator is not None:
        reference.update(scored(evaluator, None))
    if joint is not None:
        reference["size"] = joint.size_mb(full)
    elif names & {"latency", "size"} and (group is None or group.main):  # rank 0 measures what it ships
        reference.update(shipped(None))
    adapter.activate(model, None)
    obj = SupernetObjectives(space, evaluate, exact, reference, model, tok, art, metric=metric,
                             selection_split=split, selection_examples=evaluator.n if evaluator is not None else 0,
                             warnings=notes, holdout=holdout if evaluator is not None else None)
    if group is not None:
        def evaluate_shard(sub: SubNet) -> None:
            if evaluator is not None:
                scored(evaluator, sub)
            adapter.activate(model, None)

        obj.evaluate_shard = evaluate_shard
    if joint is not None:
        exact["size"] = joint.size_mb
        obj.policy_of = joint.policy
        int8 = joint.all_int8(full)
        obj.int8_reference = {"name": "all-INT8 super-network", "id": int8.id, "size": joint.size_mb(int8),
                              **(scored(evaluator, int8) if evaluator is not None else {})}
        if space.quant_int4:
            w4 = SubNet(full.heads, full.ffn, tuple(k - 1 for k in space.quant_choices(full.layers)))
            obj.int4_reference = {"name": "all-INT4-weights super-network", "id": w4.id, "size": joint.size_mb(w4),
                                  "policy_summary": joint.policy(w4).summary(),
                                  **(scored(evaluator, w4) if evaluator is not None else {})}
        adapter.activate(model, None)
    return obj


class _Joint:
    """The joint search's view of a candidate: its policy, its closed-form size, its QDQ emulation."""

    def __init__(self, model: Any, tok: Any, art: Any, dims: Any, calibration_samples: int,
                 group_size: int = 32) -> None:
        self.model, self.dims, self.group_size = model, dims, group_size
        which = "calib" if has_split(art, "calib") else "val"
        batches = tune.load_eval_batches(art, tok, batch_size=32, limit=calibration_samples, which=which)
        self.emulator = QuantEmulator(model, [{k: v for k, v in b.items() if k != "labels"} for b in batches])

    def policy(self, sub: SubNet) -> Any:
        return QuantPolicy.from_bits(architecture_of(self.model, sub.architecture), sub.quant,
                                     group_size=self.group_size)

    def all_int8(self, sub: SubNet) -> SubNet:
        return SubNet(sub.heads, sub.ffn, (1,) * quant_gene_count(sub.layers))

    def size_mb(self, sub: SubNet) -> float:
        arch = architecture_of(self.model, sub.architecture)
        pol = self.policy(sub) if sub.quant else None
        return size_from_params(macs_mod.params(self.dims, sub.architecture), arch, self.dims.vocab_size, pol) / 1e6

    def applied(self, sub: SubNet) -> Any:
        return self.emulator.applied(sub.architecture, self.policy(sub))
