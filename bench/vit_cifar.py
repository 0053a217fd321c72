"""Elastic (InstaTune) vs plain fine-tuning of a small timm ViT on the CIFAR-10 subset, then a search over the
elastic super-network's sub-networks; every reported accuracy is measured on the 2,000 CIFAR test images, which
no selection ever sees (searches select on a validation split carved from the fine-tuning data).

Anchor: EA-ViT (ICCV 2025) makes a ViT elastic during downstream adaptation and searches it with NSGA-II; here
the elastic step is InstaTune's (one sampled sub-network per step, distilled from the super-network) and the
search is `instatune search --objectives acc,macs` (LINAS, predictor-guided NSGA-II).

Starting checkpoint. No pretrained ViT weights can be downloaded here. When the timm cache holds pretrained
weights for `--arch`, the bench starts from them. Otherwise (this machine) it makes its own: `--arch` built by
timm with random weights at a reduced shape (`--image-size 32 --patch-size 4 --depth 6`: 65 tokens, width 192,
3 heads), then trained plainly (`tune --plain`) on part A of the training images. That is NOT an ImageNet
model: it saw 2,250 CIFAR images, nothing else, and the output says so.

Data (`/work/shared/data/cifar10`: train/<class>/*.jpg, 500 a class; test/<class>/*.jpg, 200 a class). Each
class's training files, in a fixed seeded order (seed `vit_cifar-split`, not a run seed), are cut in two:
  part A  the first 250 a class: 225 pretrain the starting checkpoint, 25 are its monitor (eval) split
  part B  the other 250 a class: the downstream data; `tune --val-split 500` carves the validation split
          (seeded by the run seed), the rest trains; the eval split is the 2,000 CIFAR test images
as folders of symlinks under `--work` (`partA/{train,test}/<class>/`, `partB/{train,test}/<class>/`), so that
`instatune tune --task imagefolder --data PARTDIR` reads them.

Stages (each resumable: a finished run is kept, an interrupted one continues with --resume):
  parts     the symlink folders
  pretrain  the starting checkpoint (skipped when the timm cache has pretrained weights)
  plain     plain fine-tuning on part B: the baseline's lr sweep (every lr in `--lrs`) on the sweep seeds
            (`--sweep-seeds`, default the first seed); the lr with the best mean validation accuracy there (a
            failed run counts as 0) is the baseline's, run on the other seeds too; the elastic runs use that
            same lr (they are not swept themselves: a setting that favours the baseline)
  elastic   InstaTune on part B at the chosen lr, every seed (same epochs, batch, data, seeds)
  search    `instatune search --objectives acc,macs` of every elastic run and, as a control, of the plain run at
            the chosen lr; the hypervolume reference (acc = 0.1, chance; MACs = 1.05 x the full model's) is fixed
            from the model's shape before any search
  report    from the run directories only: JSON, PNG, markdown table

The reference the fronts are judged by is fixed before the runs: a front member "matches" the baseline when its
validation accuracy is within WITHIN = 1 point of the same seed's plain baseline's (validation) accuracy; of those
the cheapest is picked, and its test accuracy and MAC reduction reported. Test accuracies never pick anything.

Full run (54 min of commands measured on 2 CPU cores shared with other jobs, 20 of them the pretraining;
roughly half that on 2 free cores), and a smoke run (~5 min):

    nohup python bench/vit_cifar.py > /work/runs/vit_cifar.log 2>&1 &
    python bench/vit_cifar.py --smoke --work /tmp/vit_smoke --out /tmp/vit_smoke.json --allow-dirty

To keep working while it runs, run it from a clean checkout of the commit (`git worktree add /tmp/bench-vit HEAD`,
then `python bench/vit_cifar.py` there): the bench refuses a dirty tree and any instatune_cli other than its own
checkout's (bench/provenance.py), and every command it launches imports that same checkout.

Writes bench/results/vit_cifar.json, .png and .md; run directories, logs and the command list stay in --work.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's instatune_cli, never another copy (bench/provenance.py checks)

from bench import provenance  # noqa: E402

WITHIN = 1.0  # accuracy points below the same seed's plain baseline (validation) that still "match" it
SPLIT_SEED = "vit_cifar-split"
HV_ACC_REF = 0.1  # chance on 10 classes
HV_MACS_FACTOR = 1.05


# ---- data parts ---------------------------------------------------------------------------------------------

def build_parts(args: argparse.Namespace, work: Path) -> dict:
    """Symlink folders partA/ and partB/ (see the module docstring); idempotent. Returns their description."""
    src = args.data.resolve()
    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    per_class = args.per_class
    info: dict = {"source": str(src), "classes": classes, "split_seed": SPLIT_SEED, "per_class_limit": per_class}
    counts = {"A_train": 0, "A_monitor": 0, "B_train": 0, "B_test": 0}
    for c in classes:
        files = sorted(p.name for p in (src / "train" / c).iterdir() if p.suffix.lower() == ".jpg")
        random.Random(f"{SPLIT_SEED}/{c}").shuffle(files)
        if per_class:
            files = files[:per_class]
        half = len(files) // 2
        a, b = files[:half], files[half:]
        n_mon = max(1, round(len(a) * args.monitor_fraction))
        tests = sorted(p.name for p in (src / "test" / c).iterdir() if p.suffix.lower() == ".jpg")
        if per_class:
            tests = tests[:max(2, per_class // 2)]
        plan = {("partA", "train"): [src / "train" / c / f for f in a[n_mon:]],
                ("partA", "test"): [src / "train" / c / f for f in a[:n_mon]],
                ("partB", "train"): [src / "train" / c / f for f in b],
                ("partB", "test"): [src / "test" / c / f for f in tests]}
        for (part, split), paths in plan.items():
            d = work / part / split / c
            d.mkdir(parents=True, exist_ok=True)
            want = {p.name for p in paths}
            for old in d.iterdir():
                if old.name not in want:
                    old.unlink()
            for p in paths:
                link = d / p.name
                if not link.is_symlink():
                    link.symlink_to(p)
        counts["A_train"] += len(a) - n_mon
        counts["A_monitor"] += n_mon
        counts["B_train"] += len(b)
        counts["B_test"] += len(tests)
    info["counts"] = counts
    info["partA"], info["partB"] = str(work / "partA"), str(work / "partB")
    info["note"] = ("partA/train pretrains the starting checkpoint, partA/test (training images too) is its monitor; "
                    "partB/train is the downstream data (tune --val-split carves the validation split from it); "
                    "partB/test is the CIFAR test set: the held-out eval split")
    return info


# ---- running the CLI ----------------------------------------------------------------------------------------

class Runner:
    """Runs `python -m instatune_cli ...` from the library this process imported, logs each command, its wall
    time and exit status to <work>/commands.jsonl and its output to <work>/logs/<name>.log."""

    def __init__(self, work: Path, threads: int) -> None:
        import instatune_cli

        self.work, self.threads = work, threads
        self.lib = Path(instatune_cli.__file__).resolve().parents[1]
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONPATH": str(self.lib), "OMP_NUM_THREADS": str(threads),
                    "MKL_NUM_THREADS": str(threads)}

    def shell(self, argv: list[str]) -> str:
        return (f"PYTHONPATH={self.lib} OMP_NUM_THREADS={self.threads} python -m instatune_cli "
                + shlex.join(argv))

    def __call__(self, name: str, argv: list[str]) -> int:
        cmd = self.shell(argv)
        print(f"   $ {cmd}", flush=True)
        t = time.perf_counter()
        with open(self.work / "logs" / f"{name}.log", "a") as log:
            log.write(f"\n$ {cmd}\n")
            log.flush()
            # cwd = the work dir: `python -m` puts the cwd first on sys.path, and a checkout there would win
            rc = None
            try:
                rc = subprocess.run([sys.executable, "-m", "instatune_cli", *argv], cwd=self.work, env=self.env,
                                    stdout=log, stderr=subprocess.STDOUT).returncode
            finally:  # an interrupted command is listed too (rc "interrupted"), its time counted
                wall = time.perf_counter() - t
                with open(self.work / "commands.jsonl", "a") as f:
                    f.write(json.dumps({"name": name, "command": cmd, "rc": "interrupted" if rc is None else rc,
                                        "wall_s": round(wall, 1),
                                        "ended_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
        print(f"   {name}: rc {rc}, {wall:.0f} s", flush=True)
        if rc:
            tail = (self.work / "logs" / f"{name}.log").read_text().splitlines()[-6:]
            print("   " + "\n   ".join(tail), flush=True)
        return rc


def tune(run: Runner, name: str, model: str, part: Path, opts: list[str], plain: bool) -> None:
    out = run.work / name
    if (out / "manifest.json").exists():
        print(f"== {name}: finished, kept", flush=True)
        return
    partial = out.with_name(out.name + ".partial")
    print(f"== {name}: tune{' (resume)' if partial.exists() else ''}", flush=True)
    argv = ["tune", model, "--task", "imagefolder", "--data", str(part), *opts, "--output", str(out), "--quiet"]
    run(name, argv + (["--plain"] if plain else []) + (["--resume"] if partial.exists() else []))


def search(run: Runner, name: str, args: argparse.Namespace, seed: int, ref: str) -> None:
    src, out = run.work / name, run.work / f"{name}-search"
    if not (src / "manifest.json").exists():
        print(f"== {name}: no finished tune run, search skipped", flush=True)
        return
    if (out / "manifest.json").exists():
        print(f"== {name}-search: finished, kept", flush=True)
        return
    partial = out.with_name(out.name + ".partial")
    print(f"== {name}-search{' (resume)' if partial.exists() else ''}", flush=True)
    argv = ["search", str(src), "--objectives", "acc,macs", "--evals", str(args.evals), "--population",
            str(args.population), "--seed", str(seed), "--ref-point", ref, "--output", str(out)]
    run(f"{name}-search", argv + (["--resume"] if partial.exists() else []))


# ---- the starting checkpoint --------------------------------------------------------------------------------

def cached_pretrained(arch: str) -> str | None:
    """None when the timm cache has `arch`'s pretrained weights, else the reason it has none."""
    from instatune_cli.adapters.vit import _check_cached
    from instatune_cli.errors import InstatuneError

    try:
        _check_cached(arch)
    except InstatuneError as e:
        return str(e)
    return None


def init_checkpoint(args: argparse.Namespace, classes: list[str], out: Path, pretrained: bool) -> dict:
    """Build `--arch` with timm, adopt it and save it in timm's save_for_hf layout into `out`."""
    import timm

    from instatune_cli.adapters.vit import TimmVitAdapter
    from instatune_cli.images import ImagePreprocessor

    kw: dict = dict(img_size=args.image_size, num_classes=len(classes))
    if pretrained:  # the pretrained shape (depth, width); the image size is resampled by timm
        model = timm.create_model(args.arch, pretrained=True, **kw)
    else:
        kw.update(patch_size=args.patch_size, depth=args.depth)
        import torch

        torch.manual_seed(args.init_seed)
        model = timm.create_model(args.arch, pretrained=False, **kw)
        # timm keeps the pretrained tag (e.g. augreg_in21k_ft_in1k) in the config it saves: say what this is
        model.pretrained_cfg = {**model.pretrained_cfg, "tag": "random-init"}
    fam = TimmVitAdapter()
    fam.prepare(model, dict(enumerate(classes)))
    if not (out / "config.json").exists():
        fam.save(model, ImagePreprocessor.for_model(model), out)
    dims = fam.dims_of(model)
    return {"arch": args.arch, "timm_kwargs": kw, "init_seed": None if pretrained else args.init_seed,
            "dims": {k: v for k, v in vars(dims).items()} if hasattr(dims, "__dict__") else str(dims),
            "params": sum(p.numel() for p in model.parameters()), "dir": str(out)}


def full_macs(model_dir: Path) -> tuple[int, str]:
    """(MACs of the full model at batch 1, its sub-network name), from the model's shape alone."""
    from instatune_cli.adapters.vit import TimmVitAdapter
    from instatune_cli.space import SubNet

    fam = TimmVitAdapter()
    model = fam.load(str(model_dir))
    d = fam.dims_of(model)
    sub = SubNet.make(d.num_layers, d.num_heads, d.ffn)
    seq = (d.image_size // d.patch_size) ** 2 + d.prefix_tokens
    return int(fam.macs(d, sub, seq)), sub.name


# ---- report -------------------------------------------------------------------------------------------------

def _json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def spread(xs: list[float | None]) -> dict | None:
    v = [x for x in xs if x is not None]
    if not v:
        return None
    return {"mean": statistics.fmean(v), "min": min(v), "max": max(v), "half_range": (max(v) - min(v)) / 2,
            "n": len(v), "of": len(xs)}


def run_status(work: Path, name: str, commands: list[dict]) -> dict:
    mine = [c for c in commands if c["name"] == name]
    out = {"commands": [c["command"] for c in mine], "wall_s": round(sum(c["wall_s"] for c in mine), 1)}
    man = _json(work / name / "manifest.json")
    if man is not None:
        return {"status": "finished", **out, "metrics": man.get("metrics", {}), "options": man.get("options", {})}
    if not mine:
        return {"status": "not run", **out}
    partial = (work / f"{name}.partial").exists()
    last = mine[-1]
    tail = (work / "logs" / f"{name}.log").read_text().splitlines()[-3:] if (work / "logs" / f"{name}.log").exists() \
        else []
    return {"status": "failed" if last["rc"] else "unfinished", "rc": last["rc"], "partial_kept": partial,
            "log_tail": tail, **out}


def search_summary(work: Path, name: str, commands: list[dict], baseline_val: float | None) -> dict:
    sdir = work / f"{name}-search"
    st = run_status(work, f"{name}-search", commands)
    st.pop("options", None)
    if st["status"] != "finished":
        return st
    fr = _json(sdir / "front.json") or {}
    ref = fr.get("reference") or {}
    full = float(ref.get("macs") or 0)
    rows = []
    for r in fr.get("front", []):
        rows.append({"subnet": r["subnet"], "name": r["name"], "layers": r["layers"], "macs": r["macs"],
                     "macs_reduction_pct": round(100 * (1 - r["macs"] / full), 2) if full else None,
                     "val_acc": r.get("acc"), "eval_acc": r.get("eval_acc"), "val_collapsed": r.get("collapsed"),
                     "eval_collapsed": r.get("eval_collapsed")})
    archive = [json.loads(line) for line in (sdir / "archive.jsonl").read_text().splitlines() if line.strip()]
    measured = [a for a in archive if a.get("acc") is not None]
    collapsed = [a for a in measured if a.get("collapsed")]
    by_depth: dict[str, dict] = {}
    for a in measured:
        d = by_depth.setdefault(str(a["layers"]), {"measured": 0, "collapsed": 0, "best_val_acc": None})
        d["measured"] += 1
        d["collapsed"] += bool(a.get("collapsed"))
        if d["best_val_acc"] is None or a["acc"] > d["best_val_acc"]:
            d["best_val_acc"], d["best_name"] = a["acc"], a["name"]
    on_front = {r["name"]: r for r in rows}
    for d in by_depth.values():  # test scores exist for front members only (the search scores nothing else)
        d["best_eval_acc"] = (on_front.get(d["best_name"]) or {}).get("eval_acc")
    st["metrics"] = {k: v for k, v in st.get("metrics", {}).items() if k not in ("front", "supernet")}
    out = {**st, "reference": ref, "front": rows, "selection_examples": fr.get("selection_examples"),
           "eval_examples": fr.get("eval_examples"),
           "archive": {"measured": len(measured), "collapsed_val": len(collapsed),
                       "collapsed_names": [a["name"] for a in collapsed], "by_depth": dict(sorted(by_depth.items()))}}
    if baseline_val is not None:
        ok = [r for r in rows if r["val_acc"] is not None and not r["val_collapsed"]
              and r["val_acc"] >= baseline_val - WITHIN / 100 - 1e-12]
        out["match_baseline_by_val"] = max(ok, key=lambda r: r["macs_reduction_pct"]) if ok else None
    return out


def report(args: argparse.Namespace, work: Path, meta: dict) -> dict:
    commands = [json.loads(x) for x in (work / "commands.jsonl").read_text().splitlines() if x.strip()] \
        if (work / "commands.jsonl").exists() else []
    seeds, lrs, sweep_seeds = meta["seeds"], meta["lrs"], meta["sweep_seeds"]
    chosen = choose_lr(work, lrs, sweep_seeds)
    sweep = {lr: {s: run_status(work, plain_name(lr, s), commands) for s in seeds
                  if s in sweep_seeds or lr == chosen} for lr in lrs}
    per_seed: dict[str, dict] = {}
    for s in seeds:
        base = sweep[chosen][s] if chosen is not None else {"status": "not run"}
        bm = base.get("metrics", {})
        el = run_status(work, elastic_name(chosen, s), commands) if chosen is not None else {"status": "not run"}
        em = el.get("metrics", {})
        row: dict = {"seed": s, "lr": chosen,
                     "plain": {"status": base["status"], "eval_acc": bm.get("super_accuracy"),
                               "val_acc": bm.get("super_val_accuracy"),
                               "smallest_subnet": bm.get("smallest_subnet"),
                               "smallest_eval_acc": bm.get("smallest_accuracy"), "wall_s": base.get("wall_s"),
                               "train_time_s": bm.get("train_time_s"), "samples_per_s": bm.get("samples_per_s"),
                               "commands": base.get("commands")},
                     "elastic": {"status": el["status"], "eval_acc": em.get("super_accuracy"),
                                 "val_acc": em.get("super_val_accuracy"), "smallest_subnet": em.get("smallest_subnet"),
                                 "smallest_eval_acc": em.get("smallest_accuracy"),
                                 "smallest_val_acc": em.get("smallest_val_accuracy"), "wall_s": el.get("wall_s"),
                                 "train_time_s": em.get("train_time_s"), "samples_per_s": em.get("samples_per_s"),
                                 "steps": em.get("steps"), "commands": el.get("commands")}}
        for k in ("rc", "log_tail", "partial_kept"):
            if k in el:
                row["elastic"][k] = el[k]
        if row["plain"]["eval_acc"] is not None and row["elastic"]["eval_acc"] is not None:
            row["elastic_minus_plain_eval_pts"] = round(100 * (row["elastic"]["eval_acc"] - row["plain"]["eval_acc"]),
                                                        2)
        if chosen is not None:
            row["elastic_search"] = search_summary(work, elastic_name(chosen, s), commands, row["plain"]["val_acc"])
            row["plain_search"] = search_summary(work, plain_name(chosen, s), commands, row["plain"]["val_acc"])
        per_seed[str(s)] = row

    def pick(search: str, field: str) -> list:
        """`field` of each seed's cheapest front member within WITHIN of the baseline (None: no such member)."""
        out = []
        for r in per_seed.values():
            m = (r.get(search) or {}).get("match_baseline_by_val")
            out.append(m.get(field) if m else None)
        return out

    summary = {
        "plain_eval_acc": spread([r["plain"]["eval_acc"] for r in per_seed.values()]),
        "plain_val_acc": spread([r["plain"]["val_acc"] for r in per_seed.values()]),
        "elastic_super_eval_acc": spread([r["elastic"]["eval_acc"] for r in per_seed.values()]),
        "elastic_super_val_acc": spread([r["elastic"]["val_acc"] for r in per_seed.values()]),
        "elastic_minus_plain_eval_pts": spread([r.get("elastic_minus_plain_eval_pts") for r in per_seed.values()]),
        "elastic_smallest_eval_acc": spread([r["elastic"]["smallest_eval_acc"] for r in per_seed.values()]),
        "plain_smallest_eval_acc": spread([r["plain"]["smallest_eval_acc"] for r in per_seed.values()]),
        "match_eval_acc": spread(pick("elastic_search", "eval_acc")),
        "match_macs_reduction_pct": spread(pick("elastic_search", "macs_reduction_pct")),
        "plain_search_match_eval_acc": spread(pick("plain_search", "eval_acc")),
        "plain_search_match_macs_reduction_pct": spread(pick("plain_search", "macs_reduction_pct")),
        "spread_is": "mean, min, max and half the range over the seeds (n = seeds with a finished run, of = seeds)",
    }
    return {"sweep": {str(lr): {str(s): {k: v for k, v in r.items() if k not in ("options",)}
                                for s, r in runs.items()} for lr, runs in sweep.items()},
            "sweep_seeds": sweep_seeds,
            "sweep_val_acc": {str(lr): [(sweep[lr][s].get("metrics") or {}).get("super_val_accuracy")
                                        for s in sweep_seeds] for lr in lrs},
            "chosen_lr": chosen, "per_seed": per_seed, "summary": summary}


def plain_name(lr: float, seed: int) -> str:
    return f"plain-lr{lr:g}-s{seed}"


def elastic_name(lr: float, seed: int) -> str:
    return f"elastic-lr{lr:g}-s{seed}"


def choose_lr(work: Path, lrs: list[float], seeds: list[int]) -> float | None:
    """The lr of the best mean validation accuracy over the seeds (failed or missing runs count as 0); ties go to
    the smaller lr. None when no plain run has finished."""
    best, best_v = None, -1.0
    any_done = False
    for lr in sorted(lrs):
        vals = []
        for s in seeds:
            m = _json(work / plain_name(lr, s) / "manifest.json")
            v = (m or {}).get("metrics", {}).get("super_val_accuracy")
            any_done |= v is not None
            vals.append(v if v is not None else 0.0)
        if statistics.fmean(vals) > best_v + 1e-12:
            best, best_v = lr, statistics.fmean(vals)
    return best if any_done else None


def plot(res: dict, path: Path, title: str, n_eval: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6))
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
    full = None
    for (s, r), color in zip(res["per_seed"].items(), colors, strict=False):
        es, ps = r.get("elastic_search") or {}, r.get("plain_search") or {}
        full = (es.get("reference") or ps.get("reference") or {}).get("macs") or full
        if ps.get("front"):
            fr = sorted(ps["front"], key=lambda x: x["macs"])
            ax.plot([x["macs"] / 1e6 for x in fr], [100 * x["eval_acc"] for x in fr], "x:", color=color, alpha=0.5,
                    ms=5, label=f"seed {s}: front of the plain run (control)")
            m = ps.get("match_baseline_by_val")
            if m:
                ax.scatter([m["macs"] / 1e6], [100 * m["eval_acc"]], marker="s", s=110, facecolors="none",
                           edgecolors=color, lw=1.0, alpha=0.7, label=f"seed {s}: same pick on the plain front")
        if es.get("front"):
            fr = sorted(es["front"], key=lambda x: x["macs"])
            ax.plot([x["macs"] / 1e6 for x in fr], [100 * x["eval_acc"] for x in fr], "o-", color=color, ms=4,
                    label=f"seed {s}: elastic front")
            m = es.get("match_baseline_by_val")
            if m:
                ax.scatter([m["macs"] / 1e6], [100 * m["eval_acc"]], s=120, facecolors="none", edgecolors=color,
                           lw=1.5, label=f"seed {s}: cheapest within {WITHIN:g} pt of plain (val)")
        if full and r["elastic"]["eval_acc"] is not None:
            ax.scatter([full / 1e6], [100 * r["elastic"]["eval_acc"]], marker="*", s=170, color=color,
                       edgecolors="k", lw=0.5, label=f"seed {s}: elastic super-network", zorder=5)
        if r["plain"]["eval_acc"] is not None:
            ax.axhline(100 * r["plain"]["eval_acc"], color=color, lw=0.9, ls="--")
            if full:
                ax.scatter([full / 1e6], [100 * r["plain"]["eval_acc"]], marker="D", s=55, color=color,
                           edgecolors="k", lw=0.5, label=f"seed {s}: plain baseline (dashed line)", zorder=5)
    ax.set_xlabel("MACs (millions, batch 1)")
    ax.set_ylabel(f"CIFAR-10 test accuracy (%), {n_eval:,} images")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def _ms(d: dict | None, scale: float = 100, unit: str = "") -> str:
    if not d:
        return "—"
    extra = f" (n={d['n']} of {d['of']})" if d["n"] != d["of"] else ""
    return f"{scale * d['mean']:.2f} ± {scale * d['half_range']:.2f}{unit}{extra}"


def _front_cell(search: dict) -> str:
    return ", ".join(f"{_pct(f['eval_acc'])}@{f['macs'] / 1e6:.0f}" + ("†" if f["eval_collapsed"] or f["val_collapsed"]
                                                                       else "")
                     for f in sorted(search.get("front", []), key=lambda x: -x["macs"])) or search.get("status", "—")


def _match_cell(search: dict) -> str:
    m = search.get("match_baseline_by_val")
    if m:
        return (f"{m['name']}: val {_pct(m['val_acc'])}, test {_pct(m['eval_acc'])}, "
                f"−{m['macs_reduction_pct']:.1f} % MACs")
    return "none" if search.get("status") == "finished" else search.get("status", "—")


def markdown(out: dict) -> str:
    r = out["results"]
    ck = out["starting_checkpoint"]
    lines = [
        "# ViT on the CIFAR-10 subset: elastic (InstaTune) vs plain fine-tuning",
        "",
        f"Command: `{out['command']}` (library: `{out['library']['path']}` at {out['library']['commit']}"
        f"{', with local changes' if out['library']['dirty'] else ''}).",
        "",
        f"Starting checkpoint: **{ck['source']}**. Model: {ck['model']['arch']} "
        f"{json.dumps(ck['model']['timm_kwargs'])}, {ck['model']['params']:,} parameters, "
        f"{out['full_macs'] / 1e6:.1f} M MACs.",
        f"Downstream: part B ({out['data']['counts']['B_train']} training images, of which the run-seeded "
        f"validation split takes {out['options']['val_split']}), "
        + (f"{out['options']['max_steps']} steps" if out["options"]["max_steps"] != "None"
           else f"{out['options']['epochs']} epochs") + f", batch "
        f"{out['options']['batch_size']}; scores on the {out['data']['counts']['B_test']} CIFAR test images. "
        f"Plain lr sweep {out['lrs']} on seed(s) {r['sweep_seeds']}, chosen on validation: **lr {r['chosen_lr']}**; "
        "the other seeds' plain runs and all elastic runs use that lr (elastic is not swept).",
        "",
        "Plain lr sweep, validation accuracy (%): " + "; ".join(
            f"lr {lr}: " + ", ".join(_pct(v) for v in vals) for lr, vals in r["sweep_val_acc"].items()),
        "",
        "| seed | plain (test) | elastic super-net (test) | Δ pt | elastic smallest sub-net (test) | front "
        "(test % @ M MACs) | cheapest within 1 pt of plain (val) → test %, MAC reduction |",
        "|---|---|---|---|---|---|---|",
    ]
    for s, row in r["per_seed"].items():
        es = row.get("elastic_search") or {}
        front, match = _front_cell(es), _match_cell(es)
        d = row.get("elastic_minus_plain_eval_pts")
        el = row["elastic"]
        lines.append(f"| {s} | {_pct(row['plain']['eval_acc'])} | "
                     f"{_pct(el['eval_acc']) if el['status'] == 'finished' else el['status'].upper()} | "
                     f"{'—' if d is None else f'{d:+.2f}'} | {_pct(el['smallest_eval_acc'])} "
                     f"({el.get('smallest_subnet') or '—'}) | {front} | {match} |")
    sm = r["summary"]
    lines += [
        f"| mean ± half-range | {_ms(sm['plain_eval_acc'])} | {_ms(sm['elastic_super_eval_acc'])} | "
        f"{_ms(sm['elastic_minus_plain_eval_pts'], 1)} | {_ms(sm['elastic_smallest_eval_acc'])} | | "
        + (f"{_ms(sm['match_eval_acc'])}, −{_ms(sm['match_macs_reduction_pct'], 1, ' %')} |"
           if sm["match_eval_acc"] else "none |"),
        "",
        "† collapsed (at or below the majority-class rate) on validation or test.",
        "",
        "Collapse (searched sub-networks at or below the majority-class rate on validation): " + "; ".join(
            f"seed {s}: elastic {(row.get('elastic_search') or {}).get('archive', {}).get('collapsed_val', '—')}"
            f"/{(row.get('elastic_search') or {}).get('archive', {}).get('measured', '—')}, plain-run control "
            f"{(row.get('plain_search') or {}).get('archive', {}).get('collapsed_val', '—')}"
            f"/{(row.get('plain_search') or {}).get('archive', {}).get('measured', '—')}"
            for s, row in r["per_seed"].items()) + ".",
        "",
        f"Plain runs' smallest sub-network (no elastic training), test: {_ms(sm['plain_smallest_eval_acc'])} %.",
        "",
        "Control, the same search of the plain run (no elastic training), front (test % @ M MACs) and cheapest "
        f"member within {WITHIN:g} pt of the baseline (val):",
        *[f"- seed {s}: " + _front_cell(row.get("plain_search") or {}) + "; " + _match_cell(row.get("plain_search")
                                                                                            or {})
          for s, row in r["per_seed"].items()],
        "",
        "Best searched sub-network of each depth, validation % (test % when it is on the front):",
        *[f"- seed {s} {kind}: " + ", ".join(
            f"L{d} {_pct(x['best_val_acc'])}"
            + (f" ({_pct(x['best_eval_acc'])})" if x.get("best_eval_acc") is not None else "")
            for d, x in (row.get(f"{kind}_search") or {}).get("archive", {}).get("by_depth", {}).items())
          for s, row in r["per_seed"].items() for kind in ("elastic", "plain")],
        "",
        f"Wall time: {out['timing']['total_wall_s'] / 60:.1f} min of commands on {out['threads']} threads "
        "(" + ", ".join(f"{k} {v / 60:.1f} min" for k, v in out["timing"]["by_stage_s"].items()) + ").",
    ]
    return "\n".join(lines) + "\n"


# ---- main ---------------------------------------------------------------------------------------------------

def summary_figures(out: dict) -> dict:
    """The README's figures: the summary's means (and spreads) over seeds, the chosen lr, wall time."""
    summ = out["results"]["summary"]
    fig: dict = {"chosen_lr": out["results"].get("chosen_lr"), "total_wall_s": out["timing"]["total_wall_s"]}
    for k, v in summ.items():
        if isinstance(v, dict) and "mean" in v:
            fig |= {f"{k}.mean": v["mean"], f"{k}.half_range": v["half_range"], f"{k}.n": v["n"]}
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data/cifar10"))
    ap.add_argument("--work", type=Path, default=Path("/work/runs/vit_cifar"), help="parts, runs, logs")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "vit_cifar.json")
    ap.add_argument("--arch", default="vit_tiny_patch16_224")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--patch-size", type=int, default=4, help="scratch checkpoint only")
    ap.add_argument("--depth", type=int, default=6, help="scratch checkpoint only")
    ap.add_argument("--init-seed", type=int, default=0, help="torch seed of the random initialisation")
    ap.add_argument("--monitor-fraction", type=float, default=0.1, help="of part A: the pretraining's eval split")
    ap.add_argument("--pretrain-epochs", type=float, default=20)
    ap.add_argument("--pretrain-max-steps", type=int, default=None)
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--pretrain-batch-size", type=int, default=64)
    ap.add_argument("--pretrain-weight-decay", type=float, default=0.05)
    ap.add_argument("--lrs", default="3e-5,1e-4,3e-4,1e-3", help="plain baseline's lr sweep")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--sweep-seeds", default=None,
                    help="seeds the plain lr sweep runs on (default: the first seed); the others run the chosen lr")
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--val-split", default="500", help="as `tune --val-split`, carved from part B's training images")
    ap.add_argument("--limit-eval", type=int, default=None)
    ap.add_argument("--per-class", type=int, default=None, help="smoke: training images a class before the split")
    ap.add_argument("--evals", type=int, default=40, help="search budget (real evaluations on validation) per run")
    ap.add_argument("--population", type=int, default=10)
    ap.add_argument("--no-plain-search", action="store_true", help="skip the control search of the plain runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stages", default="parts,pretrain,plain,elastic,search,report")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny everything: --per-class 40 --pretrain-max-steps 6 --max-steps 5 --val-split 40 "
                         "--evals 12 --population 6 --lrs 3e-4,1e-3")
    provenance.add_arguments(ap)
    args = ap.parse_args()
    prov = provenance.start("vit_cifar", __file__, allow_dirty=args.allow_dirty, out=args.out)
    if args.smoke:
        args.per_class, args.pretrain_max_steps, args.max_steps = 40, 6, 5
        args.val_split, args.evals, args.population, args.lrs = "40", 12, 6, "3e-4,1e-3"

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    provenance.append_history(work / "invocations.jsonl", prov.stage())  # the report names every invocation
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    sweep_seeds = [int(s) for s in args.sweep_seeds.split(",") if s.strip()] if args.sweep_seeds else seeds[:1]
    lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    run = Runner(work, args.threads)

    parts = build_parts(args, work)
    print(f"== parts: {parts['counts']} under {work}", flush=True)
    classes = parts["classes"]
    partA, partB = work / "partA", work / "partB"

    # the starting checkpoint
    why_not = cached_pretrained(args.arch)
    init_dir = work / "init"
    if why_not is None:
        source = f"timm's cached pretrained weights of {args.arch} (not trained here)"
        model_info = init_checkpoint(args, classes, init_dir, pretrained=True)
        start = init_dir
        print(f"== starting checkpoint: {source}", flush=True)
    else:
        source = (f"made here: {args.arch} with random weights, plain training on part A "
                  f"({parts['counts']['A_train']} CIFAR training images) - NOT ImageNet weights")
        print(f"== starting checkpoint: the timm cache has no pretrained {args.arch} ({why_not}); {source}",
              flush=True)
        model_info = init_checkpoint(args, classes, init_dir, pretrained=False)
        start = work / "pretrain" / "model"
        if "pretrain" in stages:
            steps = ["--max-steps", str(args.pretrain_max_steps)] if args.pretrain_max_steps else \
                ["--epochs", str(args.pretrain_epochs)]
            tune(run, "pretrain", str(init_dir), partA,
                 ["--lr", str(args.pretrain_lr), "--batch-size", str(args.pretrain_batch_size), "--weight-decay",
                  str(args.pretrain_weight_decay), "--val-split", "0", "--seed", str(args.init_seed), *steps],
                 plain=True)
        if not (start / "config.json").exists():
            print("== no starting checkpoint yet (pretrain not finished): stop", flush=True)
            if "report" not in stages:
                return
    macs, full_name = full_macs(init_dir)
    ref = f"acc={HV_ACC_REF},macs={int(round(HV_MACS_FACTOR * macs))}"
    print(f"== full model {full_name}: {macs / 1e6:.1f} M MACs; hypervolume reference fixed at {ref}", flush=True)

    def opts(lr: float, seed: int) -> list[str]:
        steps = ["--max-steps", str(args.max_steps)] if args.max_steps else ["--epochs", str(args.epochs)]
        lim = ["--limit-eval", str(args.limit_eval)] if args.limit_eval else []
        return ["--lr", str(lr), "--batch-size", str(args.batch_size), "--val-split", str(args.val_split),
                "--seed", str(seed), *steps, *lim]

    have_start = (start / "config.json").exists()
    if "plain" in stages and have_start:
        for s in sweep_seeds:
            for lr in lrs:
                tune(run, plain_name(lr, s), str(start), partB, opts(lr, s), plain=True)
    chosen = choose_lr(work, lrs, sweep_seeds)
    print(f"== plain lr chosen on validation (seeds {sweep_seeds}): {chosen}", flush=True)
    if chosen is not None and have_start:
        if "plain" in stages:
            for s in seeds:
                if s not in sweep_seeds:
                    tune(run, plain_name(chosen, s), str(start), partB, opts(chosen, s), plain=True)
        if "elastic" in stages:
            for s in seeds:
                tune(run, elastic_name(chosen, s), str(start), partB, opts(chosen, s), plain=False)
        if "search" in stages:
            for s in seeds:
                search(run, elastic_name(chosen, s), args, s, ref)
            if not args.no_plain_search:
                for s in seeds:
                    search(run, plain_name(chosen, s), args, s, ref)
    if "report" not in stages:
        print(f"== done in {time.perf_counter() - t0:.0f} s", flush=True)
        return

    res = report(args, work, {"seeds": seeds, "lrs": lrs, "sweep_seeds": sweep_seeds})
    commands = [json.loads(x) for x in (work / "commands.jsonl").read_text().splitlines() if x.strip()] \
        if (work / "commands.jsonl").exists() else []
    by_stage: dict[str, float] = {}
    for c in commands:
        k = "pretrain" if c["name"] == "pretrain" else ("search" if c["name"].endswith("-search") else
                                                        c["name"].split("-")[0])
        by_stage[k] = round(by_stage.get(k, 0.0) + c["wall_s"], 1)
    pre = run_status(work, "pretrain", commands) if why_not is not None else None
    lib = run.lib
    git = ["git", "-C", str(lib)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True).stdout.strip())
    out = {
        "bench": "vit_cifar",
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "library": {"path": str(lib), "commit": commit or None, "dirty": dirty},
        "anchor": "EA-ViT (ICCV 2025): elastic ViT during downstream adaptation, NSGA-II search",
        "starting_checkpoint": {
            "source": source, "made_here": why_not is not None, "timm_cache": why_not or "pretrained weights cached",
            "model": model_info, "dir": str(start),
            "pretrain": None if pre is None else {
                "status": pre["status"], "commands": pre["commands"], "wall_s": pre["wall_s"],
                "monitor_acc": pre.get("metrics", {}).get("super_accuracy"),
                "monitor_examples": pre.get("metrics", {}).get("eval_examples"),
                "train_examples": pre.get("metrics", {}).get("train_examples"),
                "steps": pre.get("metrics", {}).get("steps"),
                "samples_per_s": pre.get("metrics", {}).get("samples_per_s"),
                "options": {k: pre.get("options", {}).get(k) for k in ("lr", "batch_size", "epochs", "max_steps",
                                                                        "weight_decay", "seed")}}},
        "image_size": args.image_size, "full_macs": macs, "full_subnet": full_name,
        "hv_ref_point": ref, "within_pts": WITHIN,
        "selection": ("plain lr: best mean validation accuracy over the sweep seeds (a failed run counts 0), used "
                      "for every seed; elastic: the same lr, not swept; front member "
                      f"matching the baseline: cheapest with validation accuracy >= the same seed's plain validation "
                      f"accuracy - {WITHIN:g} pt (collapsed members excluded); test accuracies select nothing"),
        "data": parts, "seeds": seeds, "sweep_seeds": sweep_seeds, "lrs": lrs, "threads": args.threads,
        "options": {k: str(v) for k, v in vars(args).items() if k not in ("out",)},
        "timing": {"total_wall_s": round(sum(c["wall_s"] for c in commands), 1), "by_stage_s": by_stage,
                   "commands": len(commands), "failed_commands": sum(1 for c in commands if c["rc"])},
        "results": res,
    }
    # raw rows: every command (wall time, exit status) and every search's archive (validation, per sub-network)
    prov.write_rows(commands, suffix="commands")
    prov.write_rows([r for a in sorted(work.glob("*-search/archive.jsonl"))
                     for r in provenance.tagged_rows(a, search=a.parent.name)], suffix="archive")
    invocations = provenance.read_jsonl(work / "invocations.jsonl")
    out["provenance"] = prov.finish(summary_figures(out), result_file=args.out, extra={
        "invocations": invocations, "commits": sorted({i.get("commit") for i in invocations}),
        "all_clean": all(i.get("clean") is True for i in invocations)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")
    kw = model_info["timm_kwargs"]
    title = (f"{args.arch} at {kw['img_size']} px, patch {kw.get('patch_size', 16)}, depth {kw.get('depth', '-')} on "
             f"CIFAR-10 part B; start: {'made here on part A, not ImageNet' if why_not else 'timm pretrained'}\n"
             f"fronts selected on validation, scored on the {parts['counts']['B_test']:,} test images")
    plot(res, args.out.with_suffix(".png"), title, parts["counts"]["B_test"])
    md = markdown(out)
    args.out.with_suffix(".md").write_text(md)
    print("\n" + md)
    print(f"wrote {args.out}, {args.out.with_suffix('.png')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
