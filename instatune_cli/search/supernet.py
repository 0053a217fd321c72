"""Built-in objectives of a tuned super-network, on the same `evaluate`/`exact` interface a user's own
objective uses (`run_search`).

acc: the active sub-network of the in-memory super-network on pre-tokenized eval batches (no copies).
macs, params: exact closed forms. latency, size: the sub-network is extracted and exported with the very
code paths of `instatune extract` / `export`, so what the search reports is what the user gets.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instatune_cli.space import SearchSpace, SubNet


@dataclass
class LatencySetup:
    batch: int = 1
    seq_len: int = 128
    threads: int | None = None
    warmup: int = 3
    runs: int = 10


@dataclass
class SupernetObjectives:
    """Everything `run_search` needs to search a tune run, plus the super-network's own figures."""

    space: SearchSpace
    evaluate: Callable[[SubNet], dict[str, float]]
    exact: dict[str, Callable[[SubNet], float]]
    reference: dict[str, Any] = field(default_factory=dict)
    model: Any = None
    tokenizer: Any = None
    artifact: Any = None


def build(run_dir: str | Path, objectives: Sequence[str], *, limit_eval: int | None = None,
          batch_size: int = 64, latency: LatencySetup | None = None) -> SupernetObjectives:
    """Load the tune run once and return the objective functions for the requested objectives."""
    from instatune_cli.adapters import adapter_of
    from instatune_cli.measure import macs as macs_mod
    from instatune_cli.measure.accuracy import Evaluator
    from instatune_cli.tune import load_eval_batches, load_tuned

    model, tok, space, art = load_tuned(run_dir)
    adapter = adapter_of(model)
    dims = adapter.dims(model.config)
    names = set(objectives)
    evaluator = Evaluator(model, load_eval_batches(art, tok, batch_size=batch_size, limit=limit_eval)) \
        if "acc" in names else None
    lat = latency or LatencySetup(seq_len=space.seq_len)
    full = SubNet.make(dims.num_layers, dims.num_heads, dims.ffn)  # the super-network itself

    exact: dict[str, Callable[[SubNet], float]] = {
        "macs": lambda s: float(macs_mod.total_macs(dims, s, space.seq_len)),
        "params": lambda s: float(macs_mod.params(dims, s)),
    }

    def shipped(sub: SubNet | None) -> dict[str, float]:
        """Extract (and export, for latency) exactly as the extract/export stages do; measure."""
        from instatune_cli.export import export_onnx
        from instatune_cli.extract import save_extracted
        from instatune_cli.measure.latency import measure_ort_latency
        from instatune_cli.measure.size import weights_bytes

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

    def evaluate(sub: SubNet) -> dict[str, float]:
        vals: dict[str, float] = {}
        if evaluator is not None:
            vals["acc"] = evaluator.accuracy(sub)
        if names & {"latency", "size"}:
            vals.update(shipped(sub))
        adapter.activate(model, None)
        return vals

    reference: dict[str, Any] = {"name": "super-network", "id": full.id, "subnet_name": full.name,
                                 "macs": exact["macs"](full), "params": exact["params"](full)}
    if evaluator is not None:
        reference["acc"] = evaluator.accuracy(None)
    if names & {"latency", "size"}:
        reference.update(shipped(None))
    adapter.activate(model, None)
    return SupernetObjectives(space, evaluate, exact, reference, model, tok, art)
