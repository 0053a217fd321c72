"""Provenance and history for every bench: which code made a figure, and every run of it.

A README figure is only checkable when the commit that made it is known, the tree it ran from was that
commit, the code it ran was that tree (not a copy elsewhere), every run is kept (not the last that passed),
and the rows behind it are committed. A bench script (run as `python bench/NAME.py` from the repository
root) does:

    from bench.provenance import add_arguments, start   # after putting the repository root on sys.path
    add_arguments(ap)                                    # --allow-dirty
    prov = start("NAME", __file__, allow_dirty=args.allow_dirty, out=args.out)   # refuses a dirty tree / a copy
    prov.write_rows(rows)                                # bench/results/NAME.rows.jsonl (.gz when large)
    result["provenance"] = prov.finish({"figure": 1.23}, result_file=args.out)   # appends the history

Every run appends one record (commit, clean, date, command line, summary figures) to
bench/results/NAME.history.jsonl; the README quotes `median_figure(NAME, FIGURE)` — the median of every run in
the history, never the last one (bench/readme_tables.py generates the tables so) — also printed by
`python bench/provenance.py median NAME FIGURE [--result FILE]` (a bench whose settings choose its result file
keeps one history under its name: the median is taken within one result file). A run allowed on a dirty tree
stores the tree's diff beside the result (bench/results/NAME.STAMP.diff) and its record names it. Files under
bench/results/ are the benches' own outputs, so they do not make a tree dirty.
A bench that reuses finished tune runs by folder name calls `refuse_stale(run, argv, commit)` first: a run made
under another default of an option the bench does not pass stops it, so one table never holds two methods.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import platform as _platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_REL = "bench/results"
COMPRESS_ABOVE = 256 * 1024  # bytes of JSON lines above which raw rows are gzipped


def refuse(message: str) -> SystemExit:
    """One `error:` line and a non-zero exit (raise the returned exception)."""
    return SystemExit(f"error: {message}")


def git(top: Path, *args: str, ok: Sequence[int] = (0,)) -> str:
    """stdout of a read-only git command in `top` (raises `refuse` when git fails)."""
    try:
        p = subprocess.run(["git", *args], cwd=top, capture_output=True, text=True)
    except OSError as e:
        raise refuse(f"cannot run git ({e}); benches record the commit they ran at, so git must be installed") from e
    if p.returncode not in ok:
        raise refuse(f"git {' '.join(args)} failed in {top}: {p.stderr.strip().splitlines()[-1:] or p.returncode}")
    return p.stdout


def work_tree(path: Path) -> Path:
    """The top of the git work tree that holds `path` (refuses when there is none)."""
    d = path if path.is_dir() else path.parent
    try:
        p = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=d, capture_output=True, text=True)
    except OSError as e:
        raise refuse(f"cannot run git ({e})") from e
    if p.returncode != 0:
        raise refuse(f"{path} is not inside a git work tree; run benches from a clone of the repository so the "
                     "figures name the commit they came from")
    return Path(p.stdout.strip()).resolve()


def tracked(top: Path, path: Path) -> bool:
    """Whether `path` is inside `top` and tracked by git there (a copy under an ignored folder is not)."""
    path = path.resolve()
    if not path.is_relative_to(top):
        return False
    rel = path.relative_to(top).as_posix()
    return bool(git(top, "ls-files", "--", rel).strip())


def dirty_paths(top: Path, exclude: Sequence[str] = (RESULTS_REL,)) -> list[str]:
    """`git status --porcelain` lines (tracked changes and untracked files) outside `exclude`."""
    spec = ["--", ".", *(f":(exclude){e}" for e in exclude)]
    out = git(top, "status", "--porcelain", "--untracked-files=all", *spec)
    return [ln for ln in out.splitlines() if ln.strip()]


def tree_diff(top: Path, exclude: Sequence[str] = (RESULTS_REL,)) -> str:
    """The work tree against HEAD as one patch: `git diff HEAD --binary`, then each untracked file as an added
    file (read-only commands: the index is never touched)."""
    spec = ["--", ".", *(f":(exclude){e}" for e in exclude)]
    patch = git(top, "diff", "HEAD", "--binary", *spec)
    untracked = git(top, "ls-files", "--others", "--exclude-standard", *spec).splitlines()
    for rel in untracked:
        # --no-index exits 1 when the files differ, which is the point
        patch += git(top, "diff", "--no-index", "--binary", "--", "/dev/null", rel, ok=(0, 1))
    return patch


def package_dir(module: str = "instatune_cli") -> Path:
    """The directory of the package this process imports."""
    import importlib

    mod = importlib.import_module(module)
    return Path(mod.__file__).resolve().parent  # type: ignore[arg-type]


def subprocess_package_dir(python: str = sys.executable, module: str = "instatune_cli") -> Path:
    """The package a child process (the `instatune` console script, `python -m`) imports: asked from a neutral
    working directory, as the console script sees it."""
    with tempfile.TemporaryDirectory() as tmp:
        p = subprocess.run([python, "-c", f"import {module}, os; print(os.path.dirname({module}.__file__))"],
                           cwd=tmp, capture_output=True, text=True)
    if p.returncode != 0:
        raise refuse(f"{python} cannot import {module}: {p.stderr.strip().splitlines()[-1:]}; install it with "
                     "`pip install -e .` from the repository")
    return Path(p.stdout.strip()).resolve()


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Provenance:
    """Where and from what a bench run came; `finish` appends it, with the figures, to the history."""

    bench: str
    top: Path
    commit: str
    clean: bool
    date: str
    command: str
    dirty: list[str] = field(default_factory=list)
    diff: str | None = None  # path of the stored diff, relative to `top`
    python: str = field(default_factory=_platform.python_version)
    platform: str = field(default_factory=_platform.platform)
    rows: list[dict[str, Any]] = field(default_factory=list)  # raw-row files written by this run
    out_dir: Path | None = None  # where history, rows and diff go (default: bench/results/ of `top`)

    @property
    def results(self) -> Path:
        return self.out_dir if self.out_dir is not None else self.top / RESULTS_REL

    @property
    def history_file(self) -> Path:
        return history_path(self.bench, self.results)

    def _rel(self, path: Path) -> str:
        p = path.resolve()
        return p.relative_to(self.top).as_posix() if p.is_relative_to(self.top) else str(p)

    def stamp(self) -> str:
        return self.date.replace("-", "").replace(":", "").replace("+0000", "Z").replace("+00:00", "Z")

    def write_rows(self, rows: Iterable[Mapping[str, Any]], suffix: str = "rows",
                   compress: bool | None = None) -> Path:
        """Raw rows (one JSON object a line) to bench/results/NAME.SUFFIX.jsonl, or .jsonl.gz when larger than
        COMPRESS_ABOVE (or `compress`); the other variant, if an earlier run left one, is removed. The record of
        this run names the file and its sha256, so an older run's rows can be found in git history."""
        path, digest = write_jsonl(self.results / f"{self.bench}.{suffix}.jsonl", rows, compress)
        self.rows.append({"file": self._rel(path), "sha256": digest})
        return path

    def finish(self, summary: Mapping[str, Any], result_file: Path | str | None = None,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Append this run (with its summary figures) to the history and return the record, to embed in the
        result JSON. Warns, and records it, when the tree's commit or state changed while the bench ran."""
        rec = self.record(summary, result_file, extra)  # paths relative to `top` when inside it
        now_commit = git(self.top, "rev-parse", "HEAD").strip()
        now_dirty = dirty_paths(self.top)
        if now_commit != self.commit or now_dirty != self.dirty:
            rec["changed_during_run"] = {"commit": now_commit,
                                         "dirty_since": sorted(set(now_dirty) - set(self.dirty)),
                                         "no_longer_dirty": sorted(set(self.dirty) - set(now_dirty))}
            print(f"warning: the tree changed while {self.bench} ran (started at {self.commit[:12]}, now "
                  f"{now_commit[:12]}{', dirty' if now_dirty else ''}); the record says so", file=sys.stderr)
        append_history(self.history_file, rec)
        return rec

    def record(self, summary: Mapping[str, Any], result_file: Path | str | None = None,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        rec: dict[str, Any] = {"bench": self.bench, "commit": self.commit, "clean": self.clean, "date": self.date,
                               "finished": utc_now().isoformat(timespec="seconds"), "command": self.command,
                               "python": self.python, "platform": self.platform, "summary": dict(summary)}
        if self.dirty:
            rec["dirty"] = self.dirty
        if self.diff:
            rec["diff"] = self.diff
        if result_file is not None:
            rec["result"] = self._rel(Path(result_file))
        if self.rows:
            rec["rows"] = list(self.rows)
        if extra:
            rec.update(extra)
        return rec

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["top"] = str(self.top)
        return d

    def stage(self) -> dict[str, Any]:
        """What one invocation of a multi-invocation bench (a tune stage run apart from the report) ran from."""
        return {k: v for k, v in (("commit", self.commit), ("clean", self.clean), ("date", self.date),
                                  ("command", self.command), ("diff", self.diff)) if v is not None}

    def save_stage(self, path: Path) -> None:
        """Leave this invocation's `stage()` in `path` (beside a run directory it made), for the report's record."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.stage(), indent=1) + "\n")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--allow-dirty", action="store_true",
                    help="run on a tree with uncommitted changes; the diff is stored beside the result and the "
                         "history records the run as not clean")


def start(bench: str, script: str | Path, allow_dirty: bool = False, package: Path | None = None,
          subprocess_cli: bool = False, argv: Sequence[str] | None = None, out: Path | None = None) -> Provenance:
    """Check where this bench runs from and record it; call before any work.

    Refuses (one `error:` line, non-zero exit): a script outside a git work tree or not tracked there (a copy);
    an `instatune_cli` package (`package`, default: the one this process imports; with `subprocess_cli` also the
    one a child `instatune` process imports) that is not the tracked one of the same work tree; a tree with
    uncommitted changes or untracked files outside bench/results/, unless `allow_dirty` (then the diff is stored
    as bench/results/BENCH.STAMP.diff, gzipped when large). `out`: the result file; history, rows and diff go
    beside it (a smoke run with `--out /tmp/x.json` leaves the committed history alone)."""
    script = Path(script).resolve()
    top = work_tree(script)
    if not tracked(top, script):
        raise refuse(f"{script} is not a tracked file of the work tree {top}: run the repository's own bench "
                     "script, not a copy, so the recorded commit is the code that ran")
    pkgs = [package.resolve() if package is not None else package_dir()]
    if subprocess_cli:
        pkgs.append(subprocess_package_dir())
    for pkg in pkgs:
        if not tracked(top, pkg / "__init__.py"):
            raise refuse(f"the instatune_cli package in use is {pkg}, not the tracked one of {top}: the figures "
                         f"would not come from the recorded commit; run `pip install -e {top}` (or run from that "
                         "checkout)")
    commit = git(top, "rev-parse", "HEAD").strip()
    dirty = dirty_paths(top)
    if dirty and not allow_dirty:
        shown = ", ".join(ln[3:] for ln in dirty[:3]) + (f" and {len(dirty) - 3} more" if len(dirty) > 3 else "")
        raise refuse(f"the work tree {top} has uncommitted changes ({shown}); commit them, run from a clean "
                     "checkout (`git worktree add`), or pass --allow-dirty to store the diff beside the result")
    args = list(sys.argv if argv is None else argv)
    cmd = shlex.join(["python", *([Path(args[0]).resolve().relative_to(top).as_posix()]
                                  if args and Path(args[0]).resolve().is_relative_to(top) else args[:1]), *args[1:]])
    prov = Provenance(bench=bench, top=top, commit=commit, clean=not dirty,
                      date=utc_now().isoformat(timespec="seconds"), command=cmd, dirty=dirty,
                      out_dir=Path(out).resolve().parent if out is not None else None)
    if dirty:
        path, _ = write_text(prov.results / f"{bench}.{prov.stamp()}.diff", tree_diff(top))
        prov.diff = prov._rel(path)
        print(f"warning: running on a dirty tree (--allow-dirty); its diff is stored in {prov.diff}", file=sys.stderr)
    return prov


# ---- files ---------------------------------------------------------------------------------------------------
def _gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)  # mtime 0: the same rows give the same bytes


def write_text(path: Path, text: str, compress: bool | None = None) -> tuple[Path, str]:
    """Write `text` to `path` (or `path`.gz when larger than COMPRESS_ABOVE or `compress`); remove the other
    variant. Returns (the file written, sha256 of the uncompressed text)."""
    data = text.encode()
    gz = len(data) > COMPRESS_ABOVE if compress is None else compress
    path.parent.mkdir(parents=True, exist_ok=True)
    other = path if gz else path.with_name(path.name + ".gz")
    out = path.with_name(path.name + ".gz") if gz else path
    out.write_bytes(_gzip_bytes(data) if gz else data)
    if other.exists():
        other.unlink()
    return out, hashlib.sha256(data).hexdigest()


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]], compress: bool | None = None) -> tuple[Path, str]:
    return write_text(path, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows), compress)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl or .jsonl.gz file (given either name); a line cut short by a kill is skipped."""
    if not path.exists() and path.with_name(path.name + ".gz").exists():
        path = path.with_name(path.name + ".gz")
    raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    out = []
    for line in raw.decode().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def stage_records(paths: Iterable[Path]) -> dict[str, Any]:
    """The saved `stage()` records that exist, by file name, and whether all (and this run) share one clean commit;
    a report embeds this so the figures name every invocation that made their inputs."""
    found = {p.name: json.loads(p.read_text()) for p in paths if p.exists()}
    return {"stages": found, "commits": sorted({s.get("commit", "?") for s in found.values()}),
            "all_clean": all(s.get("clean") is True for s in found.values())}


def tagged_rows(path: Path, **tags: Any) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (a search's archive.jsonl) with `tags` added to each; [] when it is absent."""
    if not path.exists() and not path.with_name(path.name + ".gz").exists():
        return []
    return [{**tags, **r} for r in read_jsonl(path)]


# ---- history -------------------------------------------------------------------------------------------------
def history_path(bench: str, results: Path | None = None) -> Path:
    return (results if results is not None else REPO / RESULTS_REL) / f"{bench}.history.jsonl"


def append_history(path: Path, record: Mapping[str, Any]) -> None:
    """Append one run; a history is never rewritten."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record, sort_keys=True, default=str) + "\n")


def read_history(bench: str, results: Path | None = None) -> list[dict[str, Any]]:
    path = history_path(bench, results)
    return read_jsonl(path) if path.exists() else []


def imported_record(bench: str, summary: Mapping[str, Any], result_file: str, commit: str | None,
                    committed_in: str | None, date: str | None, note: str) -> dict[str, Any]:
    """A history record for a result made before the history existed: `commit` is the one the result itself
    recorded (None when it recorded none), `committed_in` the commit that added the result file, `clean` unknown."""
    return {"bench": bench, "imported": True, "commit": commit, "committed_in": committed_in, "clean": None,
            "date": date, "command": None, "summary": dict(summary), "result": result_file, "note": note}


def import_result(bench: str, result_file: Path, summary: Mapping[str, Any], commit: str | None, note: str,
                  results: Path | None = None) -> dict[str, Any] | None:
    """Append an `imported_record` for a result committed before the history existed, once (a second call for
    the same file does nothing and returns None). `committed_in` and `date`: the last commit that changed it."""
    top = work_tree(result_file)
    rel = result_file.resolve().relative_to(top).as_posix()
    if any(r.get("imported") and r.get("result") == rel for r in read_history(bench, results)):
        return None
    log = git(top, "log", "-1", "--format=%H %cI", "--", rel).split()
    rec = imported_record(bench, summary, rel, commit, log[0] if log else None, log[1] if log else None, note)
    append_history(history_path(bench, results), rec)
    return rec


def lookup(summary: Mapping[str, Any], key: str) -> Any:
    """summary[key], or a dotted path into nested dicts (`a.b.c`)."""
    if key in summary:
        return summary[key]
    cur: Any = summary
    for part in key.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def figure_stats(bench: str, key: str, results: Path | None = None, clean_only: bool = False,
                 history: Sequence[Mapping[str, Any]] | None = None, result: str | None = None) -> dict[str, Any]:
    """Every run's value of one summary figure, and their median (what the README quotes), min and max.
    Runs without the figure are skipped; `clean_only` also skips runs not known to be clean; `result` keeps only
    runs that wrote that result file (a bench whose settings pick the result file, as convergence.py's task and
    learning rate do, reuses summary keys across settings: a median over all of them would mix tasks).
    `result_files` names the result files the values came from, so a caller can see such a mix."""
    runs = read_history(bench, results) if history is None else list(history)
    vals: list[float] = []
    files: list[str] = []
    for rec in runs:
        name = Path(str(rec.get("result") or "?")).name
        if (clean_only and rec.get("clean") is not True) or (result is not None and name != Path(result).name):
            continue
        v = lookup(rec.get("summary") or {}, key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            vals.append(float(v))
            if name not in files:
                files.append(name)
    return {"bench": bench, "figure": key, "n": len(vals), "values": vals, "result_files": files,
            "median": statistics.median(vals) if vals else None,
            "min": min(vals) if vals else None, "max": max(vals) if vals else None}


def median_figure(bench: str, key: str, results: Path | None = None, clean_only: bool = False,
                  result: str | None = None) -> float | None:
    """The median of every run of one figure in the history (None when no run has it)."""
    return figure_stats(bench, key, results, clean_only, result=result)["median"]


def stale_defaults(run: Path, argv: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """The tune options `argv` leaves at their defaults whose recorded value in the finished `run` (its run.json)
    is not what this checkout's defaults give: {option: (recorded, now)}. A bench that reuses finished runs by
    folder name must not mix runs made under another default with new ones (a changed default is a changed
    method); empty when the run has no run.json (not a tune run)."""
    from instatune_cli.tune.config import TuneConfig

    info = Path(run) / "run.json"
    if not info.is_file():
        return {}
    recorded = json.loads(info.read_text()).get("options", {})
    given = {a[2:].replace("-", "_") for a in argv if a.startswith("--")}
    now = TuneConfig(model="-", plain="--plain" in argv).fingerprint_dict()
    return {k: (recorded[k], v) for k, v in now.items()
            if k not in given and k != "model" and k in recorded and recorded[k] != v}


def refuse_stale(run: Path, argv: Sequence[str], commit: str) -> None:
    """`stale_defaults` as one `error:` line naming the way out (raises `refuse`)."""
    stale = stale_defaults(run, argv)
    if stale:
        what = ", ".join(f"--{k.replace('_', '-')} {old!r} -> {new!r}" for k, (old, new) in stale.items())
        raise refuse(f"{run} was made (at {commit}) under other tune defaults ({what}); reusing it would mix two "
                     "methods in one table: give the bench another --out (or move that folder aside) to rerun it "
                     "here, or run the bench at the commit that made it")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Bench histories: the figures the README quotes.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("median", help="median (and n, min, max) of one figure over every run of a bench")
    m.add_argument("bench")
    m.add_argument("figure", help="summary key (dotted for nested)")
    m.add_argument("--clean-only", action="store_true")
    m.add_argument("--result", help="only runs that wrote this result file (needed when several did)")
    s = sub.add_parser("show", help="one line per run of a bench")
    s.add_argument("bench")
    args = ap.parse_args(argv)
    if args.cmd == "median":
        st = figure_stats(args.bench, args.figure, clean_only=args.clean_only, result=args.result)
        if not st["n"]:
            raise refuse(f"no run of {args.bench} in {history_path(args.bench)} has the figure {args.figure!r}"
                         + (f" and wrote {args.result}" if args.result else ""))
        if len(st["result_files"]) > 1:
            raise refuse(f"{args.figure!r} comes from runs that wrote {len(st['result_files'])} result files "
                         f"({', '.join(st['result_files'])}), made under different settings; name one with "
                         "--result FILE")
        print(f"{args.bench} {args.figure}: median {st['median']:.6g} over {st['n']} run(s) "
              f"[{st['min']:.6g}, {st['max']:.6g}]")
        return 0
    for rec in read_history(args.bench):
        tag = "imported" if rec.get("imported") else ("clean" if rec.get("clean") else "DIRTY")
        print(f"{rec.get('date')}  {(rec.get('commit') or '-')[:12]:<12}  {tag:<8}  "
              f"{json.dumps(rec.get('summary'), sort_keys=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
