"""Fault table (issue 12): every bad input and fault tried through the real CLI, its message, exit code, and
what was left on disk.

Builds a tiny BERT model and tiny data in a temporary directory (the helpers of tests/conftest.py), makes the
tune run, search, and extract the cases need once, then runs each case as a user would: `python -m
instatune_cli ...` in a subprocess, in a directory of its own, so the exit code, stdout and stderr are real.
Disk full is simulated with RLIMIT_FSIZE (`ulimit -f`: a write past the limit fails with EFBIG) or, where a
case says so, by a patched write raising ENOSPC inside the same subprocess before the CLI's `main()` runs.
Nothing is faked: an unexpected result is recorded as it happened and marked FINDING.

    python bench/faults.py                 # 3.5-6 minutes on 2 cores shared with other jobs
    python bench/faults.py --only lock,stale-lock --keep   # a few cases; keep the directory to look at

Writes docs/faults.md and bench/results/faults.json (not with --only, unless --write).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "TRANSFORMERS_VERBOSITY": "error", "COLUMNS": "200"}
os.environ.update(ENV)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
ENV["PYTHONPATH"] = str(REPO)  # every CLI run imports this checkout, whatever is installed (bench/provenance.py)
os.environ.update(ENV)

from bench.provenance import add_arguments, start  # noqa: E402

# the quick tiny run of tests/conftest.py (`tiny_tune_args`), 2 steps; shown as [tiny] in the table
TINY = ["--batch-size", "8", "--max-steps", "2", "--lr", "3e-3", "--save-every", "0", "--eval-batch-size", "16",
        "--reorder-batches", "2", "--val-split", "16", "--seed", "7", "--quiet"]
EXTRACT_CONFIG = '{"layers": 2, "heads": [2, 4], "ffn": [25, 37]}'
FSIZE_LIMIT = 32 * 1024  # bytes per file under RLIMIT_FSIZE: the tiny weights (130 KB) do not fit, the logs do
KILLED_ROWS = 3  # evaluations the shared killed search has archived when it is SIGKILLed


def tune(model: str = "../model", data: str = "../data", out: str = "run", *extra: str, tiny: bool = True
         ) -> list[str]:
    return ["tune", model, "--data", data, "-o", out, *(TINY if tiny else []), *extra]


def shown(args: list[str]) -> str:
    """The command as the table shows it: `instatune ...` with the tiny tune flags folded into [tiny]."""
    text = shlex.join(args)
    tiny = shlex.join(TINY)
    return "instatune " + text.replace(tiny, "[tiny]")


# ---- running --------------------------------------------------------------------------------------------

@dataclass
class Case:
    key: str
    title: str  # the bad input or fault
    args: list[str]  # instatune arguments, paths relative to the case directory
    how: str = ""  # how the case was set up, when the command alone does not say
    expect: str = "error"  # error: non-zero exit and one `error:` line; ok: exit 0; signal: killed by `sig`
    fragment: str = ""  # what the error line should mention (case-insensitive)
    setup: Callable[[Path], Callable[[], None] | None] | None = None  # may return a clean-up run after the case
    reuse: str | None = None  # run in the directory of this earlier case (a follow-up)
    allow: tuple[str, ...] = ()  # top-level entries the case may create or change
    check: Callable[[Path, dict[str, Any]], str | None] | None = None  # extra expectation; returns a problem
    fsize: int | None = None  # RLIMIT_FSIZE for the CLI process (bytes)
    user: str | None = None  # run the CLI as this user (setpriv: root drops its privileges)
    patch: str | None = None  # Python run inside the CLI process before main() (an in-process fault)
    sig: tuple[int, Callable[[Path], bool]] | None = None  # send this signal once the predicate holds
    fix: str = ""  # where a fix would go, shown only if the case falls short
    result: dict[str, Any] = field(default_factory=dict)


def cli_command(case: Case) -> list[str]:
    """`python -m instatune_cli ARGS`, or the same `main()` after the case's patch; under `ulimit -f` (bash) and
    another user (setpriv) where the case says so."""
    if case.patch is None:
        cmd = [sys.executable, "-m", "instatune_cli", *case.args]
    else:
        code = (f"import sys\n{case.patch}\nfrom instatune_cli.cli.app import main\n"
                "sys.argv = ['instatune', *sys.argv[1:]]\nmain()\n")
        cmd = [sys.executable, "-c", code, *case.args]
    if case.fsize is not None:  # bash's ulimit -f counts 1024-byte blocks; Python ignores SIGXFSZ, so EFBIG
        cmd = ["bash", "-c", f'ulimit -f {case.fsize // 1024} && exec "$@"', "bash", *cmd]
    if case.user is not None:
        import grp
        import pwd

        pw = pwd.getpwnam(case.user)
        cmd = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={grp.getgrgid(pw.pw_gid).gr_gid}", "--clear-groups",
               *cmd]
    return cmd


def run_cli(case: Case, cwd: Path, timeout: float = 300) -> tuple[int, str, str, float]:
    env = {**os.environ, **ENV}
    if case.user:
        home = cwd / f".home-{case.user}"
        home.mkdir(exist_ok=True)
        shutil.chown(home, case.user)
        env.update(HOME=str(home), TMPDIR=str(home), MPLCONFIGDIR=str(home), PYTHONDONTWRITEBYTECODE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cli_command(case), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace")
    if case.sig is not None:
        signum, ready = case.sig
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not ready(cwd) and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signum)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err, time.perf_counter() - t0


# ---- what is on disk --------------------------------------------------------------------------------------

def snapshot(d: Path) -> dict[str, Any]:
    """relative path -> 'dir' or (size, sha256) for everything under d (hidden entries included)."""
    snap: dict[str, Any] = {}
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        if rel.startswith(".home-"):
            continue
        if p.is_symlink():
            snap[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            snap[rel] = "dir"
        else:
            snap[rel] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()[:12])
    return snap


def _top(snap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    tops: dict[str, dict[str, Any]] = {}
    for rel, v in snap.items():
        head, _, rest = rel.partition("/")
        tops.setdefault(head, {})
        if rest:
            tops[head][rest] = v
        else:
            tops[head][""] = v
    return tops


def describe_entry(d: Path, name: str, files: dict[str, Any]) -> str:
    """One entry of the case directory as the table shows it: a lock with its holder, a stage output by its stage,
    any other directory by its contents (.stage marker, checkpoints, archive rows)."""
    p = d / name
    if files.get("") != "dir":
        if name.endswith(".lock"):
            try:
                h = json.loads(p.read_text() or "{}")
                return f"{name} (pid {h.get('pid', '?')}, {h.get('stage', '?')})" if h else f"{name} (empty)"
            except (OSError, ValueError):
                return f"{name} (unreadable)"
        return name
    kids = sorted({k.split("/")[0] for k in files if k})
    if "manifest.json" in kids and ".stage" not in kids:
        try:
            stage = json.loads((p / "manifest.json").read_text()).get("stage", "?")
        except (OSError, ValueError):
            stage = "?"
        return f"{name}/ [{stage} output, {len(kids)} entries]"
    shown_kids = []
    for k in kids:
        if k == "checkpoints":
            steps = sorted({x.split("/")[1] for x in files if x.startswith("checkpoints/")})
            shown_kids.append(f"checkpoints/[{', '.join(steps) or 'empty'}]")
        elif k == "archive.jsonl" and (p / k).is_file():
            shown_kids.append(f"archive.jsonl ({len((p / k).read_text().splitlines())} rows)")
        else:
            shown_kids.append(k + ("/" if files.get(k) == "dir" else ""))
    inner = ", ".join(shown_kids[:7]) + (f", +{len(shown_kids) - 7} more" if len(shown_kids) > 7 else "")
    return f"{name}/ [{inner or 'empty'}]"


def disk_diff(d: Path, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    b, a = _top(before), _top(after)
    new, changed, removed, same = [], [], [], []
    for name in sorted(set(a) | set(b)):
        if name not in a:
            removed.append(name)
        elif name not in b:
            new.append(name)
        elif a[name] != b[name]:
            changed.append(name)
        else:
            same.append(name)
    parts = [f"+{describe_entry(d, n, a[n])}" for n in new]
    parts += [f"~{describe_entry(d, n, a[n])}" for n in changed]
    parts += [f"-{n}" for n in removed]
    if same:
        parts.append("unchanged: " + ", ".join(describe_entry(d, n, a[n]) if n.endswith((".partial", ".lock"))
                                                else n for n in same))
    return {"new": new, "changed": changed, "removed": removed, "unchanged": same,
            "text": "; ".join(parts) or "(nothing)", "after": sorted(after)}


# ---- judging ----------------------------------------------------------------------------------------------

def judge(case: Case, d: Path, rc: int, out: str, err: str, disk: dict[str, Any]
          ) -> tuple[str, str, list[str], str | None]:
    """(message shown, verdict, problems, note)."""
    lines = [ln.rstrip() for ln in (err + "\n" + out).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    notices = [ln for ln in lines if ln.startswith("notice:")]
    other = [ln for ln in lines if not ln.startswith(("error:", "notice:"))]
    problems: list[str] = []
    if "Traceback (most recent call last)" in err + out:
        problems.append("traceback")
    if case.expect == "error":
        if rc == 0:
            problems.append("exit 0")
        if not lines:
            problems.append("no message")
        elif len(errors) != 1 or other:
            problems.append(f"not one error line ({len(errors)} error:, {len(other)} other lines)")
        elif case.fragment and case.fragment.lower() not in errors[0].lower():
            problems.append(f"message does not mention {case.fragment!r}")
        message = "<br>".join(notices + errors) if len(errors) == 1 and not other else "\n".join(lines)
        message = message or "(no output)"
    elif case.expect == "ok":
        if rc != 0:
            problems.append(f"exit {rc}")
        if case.fragment and not any(case.fragment.lower() in ln.lower() for ln in lines):
            problems.append(f"output does not mention {case.fragment!r}")
        err_lines = [ln.rstrip() for ln in err.splitlines() if ln.strip()]
        n_out = len([ln for ln in out.splitlines() if ln.strip()])
        message = "\n".join(err_lines + ([f"(stdout: the result, {n_out} lines)"] if n_out else []))
        message = message or "(no output)"
    else:  # a signal: what the process printed, if anything
        message = "\n".join(lines) if lines else "(no output)"
    stray = [n for n in disk["new"] + disk["changed"] + disk["removed"] if n not in case.allow]
    if stray:
        problems.append("left " + ", ".join(("-" if n in disk["removed"] else "") + n for n in stray))
    ctx: dict[str, Any] = {"rc": rc, "out": out, "err": err, "disk": disk}
    if case.check is not None:
        problem = case.check(d, ctx)
        if problem:
            problems.append(problem)
    verdict = "ok" if not problems else "FINDING: " + "; ".join(problems)
    return message, verdict, problems, ctx.get("note")


def run_case(case: Case, root: Path, index: int, dirs: dict[str, Path]) -> dict[str, Any]:
    if case.reuse:
        d = dirs[case.reuse]
    else:
        d = root / f"{index:02d}-{case.key}"
        d.mkdir()
    dirs[case.key] = d
    cleanup = case.setup(d) if case.setup else None
    before = snapshot(d)
    try:
        rc, out, err, secs = run_cli(case, d)
        disk = disk_diff(d, before, snapshot(d))
    finally:
        if cleanup:
            cleanup()
    rel = {str(d) + "/": "", str(d): ".", str(root): "$TMP"}
    for a, b in rel.items():
        out, err = out.replace(a, b), err.replace(a, b)
    message, verdict, problems, note = judge(case, d, rc, out, err, disk)
    return {"n": index, "key": case.key, "case": case.title, "how": case.how, "dir": d.name,
            "command": shown(case.args), "user": case.user, "fsize_limit": case.fsize,
            "in_process_patch": case.patch, "exit": rc, "message": message, "left": disk["text"],
            "disk": disk, "expect": case.expect, "verdict": verdict, "problems": problems, "note": note,
            "likely_fix": case.fix if problems else "",
            "seconds": round(secs, 1), "stderr": err[-4000:], "stdout": out[-2000:]}


# ---- shared fixtures --------------------------------------------------------------------------------------

def sh(args: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "instatune_cli", *args], cwd=cwd, env={**os.environ, **ENV},
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"setup failed ({what}): {shlex.join(args)}\n{r.stdout}\n{r.stderr}")
    return r


def rows(p: Path) -> int:
    return len(p.read_text().splitlines()) if p.is_file() else 0


def killed_search(root: Path) -> None:
    """`search run` SIGKILLed after KILLED_ROWS evaluations: killed-s.partial and the dead holder's killed-s.lock."""
    proc = subprocess.Popen([sys.executable, "-m", "instatune_cli", "search", "run", "--evals", "400",
                             "--population", "4", "-o", "killed-s", "--json"], cwd=root, env={**os.environ, **ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    archive = root / "killed-s.partial" / "archive.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and rows(archive) < KILLED_ROWS and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is not None:
        raise SystemExit(f"setup failed: the search to kill ended by itself (exit {proc.returncode})")
    proc.kill()
    proc.wait()


def make_fixtures(root: Path) -> dict[str, float]:
    from conftest import make_tiny_bert, make_tiny_data

    from instatune_cli.cli.common import quiet_libraries

    quiet_libraries()
    times = {}
    t0 = time.perf_counter()
    make_tiny_bert(root / "model", head=False)
    make_tiny_data(root / "data")
    make_tiny_images(root)
    times["model+data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sh(tune("model", "data", "run"), root, "tune")
    times["tune"] = time.perf_counter() - t0

    def timed(what: str, fn: Callable[[], Any]) -> None:
        t = time.perf_counter()
        fn()
        times[what] = time.perf_counter() - t

    jobs = {"search": lambda: sh(["search", "run", "--evals", "6", "--population", "4", "-o", "run-search",
                                  "--json"], root, "search"),
            "extract": lambda: sh(["extract", "run", "--config", EXTRACT_CONFIG, "-o", "ext"], root, "extract"),
            "killed search": lambda: killed_search(root)}
    with ThreadPoolExecutor(len(jobs)) as pool:  # all three only read run/
        for f in [pool.submit(timed, what, fn) for what, fn in jobs.items()]:
            f.result()
    for p in root.rglob("*"):  # readable by the unprivileged user of the read-only case
        p.chmod(p.stat().st_mode | 0o044 | (0o011 if p.is_dir() else 0))
    root.chmod(0o755)
    return times


def make_tiny_images(root: Path, classes: int = 4, per_class: int = 10) -> None:
    """`vit/`: a tiny timm ViT (tests/vit_tiny.py) in timm's save_for_hf layout; `imgs/`: train/ and val/ class
    folders of small random PNGs."""
    import numpy as np
    from PIL import Image
    from vit_tiny import tiny_timm

    from instatune_cli.adapters.vit import TimmVitAdapter
    from instatune_cli.images import ImagePreprocessor

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", per_class // 2)):
        for c in range(classes):
            d = root / "imgs" / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    fam = TimmVitAdapter()
    model = fam.prepare(tiny_timm("vit_tiny_patch16_224", num_classes=classes), {c: f"c{c}" for c in range(classes)})
    fam.save(model, ImagePreprocessor.for_model(model), root / "vit")


def image_tune(model: str = "../vit", data: str = "../imgs", *extra: str) -> list[str]:
    return ["tune", model, "--task", "imagefolder", "--data", data, "-o", "run", *TINY, *extra]


# ---- case set-ups -----------------------------------------------------------------------------------------

def copy(src: str, dst: str) -> Callable[[Path], None]:
    def fn(d: Path) -> None:
        s = (d / src).resolve()
        (shutil.copytree if s.is_dir() else shutil.copy2)(s, d / dst)

    return fn


def steps(*fns: Callable[[Path], Any]) -> Callable[[Path], Callable[[], None] | None]:
    def fn(d: Path) -> Callable[[], None] | None:
        cleanup = None
        for f in fns:
            cleanup = f(d) or cleanup
        return cleanup

    return fn


def rename(src: str, dst: str) -> Callable[[Path], None]:
    def fn(d: Path) -> None:
        (d / src).rename(d / dst)

    return fn


def write(rel: str, content: str | bytes) -> Callable[[Path], None]:
    def fn(d: Path) -> None:
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)  # type: ignore[operator]

    return fn


def hold_live_writer(d: Path) -> Callable[[], None]:
    """A live `tune` writer of d/run, in this process: its OutputLock (flock on run.lock) and its run.partial."""
    from instatune_cli.artifacts import StageWriter

    w = StageWriter(d / "run", "tune", {}, cleanup_on_error=False)
    part = w.open()
    (part / "progress.txt").write_text("live\n")
    return w.release


def dead_holder(d: Path) -> None:
    """A process that takes run.lock with OutputLock, then is SIGKILLed (the OS drops its flock, the file stays)."""
    code = ("import time; from pathlib import Path; from instatune_cli.artifacts import OutputLock;"
            "OutputLock(Path('run'), 'tune').acquire(); print('held', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=d, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, **ENV})
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    p.kill()
    p.wait()


def damage_weights(d: Path, how: str) -> None:
    w = d / "model" / "model.safetensors"
    if how == "remove":
        w.unlink()
    else:
        data = w.read_bytes()
        w.write_bytes(data[: len(data) // 2])


def killed_partial(d: Path) -> None:
    """The shared killed search's partial and lock, as `s.partial` / `s.lock` of this case."""
    root = d.parent
    shutil.copytree(root / "killed-s.partial", d / "s.partial")
    if (root / "killed-s.lock").exists():
        shutil.copy2(root / "killed-s.lock", d / "s.lock")


def replace_run(d: Path) -> None:
    """`tune --force` over the search's parent, as a user re-running the tune stage."""
    sh(tune("../model", "../data", "run", "--force"), d, "tune --force")


def edit_json(rel: str, fn: Callable[[Any], Any], relist: bool = False) -> Callable[[Path], None]:
    """Rewrite d/rel; with relist, update its sha256 in the manifest beside it (as another version wrote it)."""

    def go(d: Path) -> None:
        p = d / rel
        p.write_text(json.dumps(fn(json.loads(p.read_text())), indent=1))
        if relist:
            relist_in_manifest(p)

    return go


def relist_in_manifest(p: Path) -> None:
    from instatune_cli.artifacts import sha256_file

    mpath = p.parent / "manifest.json"
    m = json.loads(mpath.read_text())
    for f in m["files"]:
        if f["path"] == p.name:
            f.update(bytes=p.stat().st_size, sha256=sha256_file(p))
    mpath.write_text(json.dumps(m, indent=2))


def bad_front(relist: bool) -> Callable[[Path], None]:
    def fn(d: Path) -> None:
        (d / "s" / "front.json").write_text("{not json")
        if relist:
            relist_in_manifest(d / "s" / "front.json")

    return fn


def data_copy(fn: Callable[[Path], None]) -> Callable[[Path], None]:
    def go(d: Path) -> None:
        shutil.copytree(d.parent / "data", d / "data")
        fn(d / "data" / "train.tsv")

    return go


def non_utf8(p: Path) -> None:
    lines = p.read_bytes().split(b"\n")
    lines[5] = lines[5].replace(b" ", b" caf\xe9 ", 1)  # cp1252 e-acute
    p.write_bytes(b"\n".join(lines))


def duplicate_header(p: Path) -> None:
    lines = p.read_text().splitlines()
    p.write_text("\n".join(["sentence\tlabel\tlabel"] + [f"{ln}\t{ln.split(chr(9))[1]}" for ln in lines[1:]]) + "\n")


def foreign_policy(d: Path) -> None:
    from instatune_cli.quantize.policy import Architecture, QuantPolicy

    # the extracted model is BERT L2, hidden 32, heads [2, 4], FFN [25, 37]; this policy is for L2 h4 f64
    QuantPolicy.uniform(Architecture("bert", 32, 8, (4, 4), (64, 64), 2)).save(d / "p.json")


def read_only_parent(d: Path) -> None:
    (d / "ro").mkdir()
    (d / "ro").chmod(0o555)


def as_nobody(d: Path) -> None:
    read_only_parent(d)
    d.chmod(0o755)


def symlink(rel: str, target: str) -> Callable[[Path], None]:
    def fn(d: Path) -> None:
        (d / rel).symlink_to(target)

    return fn


def marked_partial(rel: str, stage: str, *files: str) -> Callable[[Path], None]:
    """A `.partial` directory with its `.stage` marker, as a killed stage leaves it."""

    def fn(d: Path) -> None:
        (d / rel).mkdir(parents=True)
        (d / rel / ".stage").write_text(stage)
        for f in files:
            (d / rel / f).write_text("half-written\n")

    return fn


def lock_text(rel: str, **holder: Any) -> Callable[[Path], None]:
    """A lock file naming a holder (no process holds its flock)."""

    def fn(d: Path) -> None:
        import socket

        (d / rel).write_text(json.dumps({"pid": 999_999, "host": socket.gethostname(), "stage": "tune",
                                         "since": "2026-01-01T00:00:00Z", **holder}))

    return fn


def crafted_space(d: Path) -> None:
    """run/space.json with layers [2, 10**18], re-listed in run/manifest.json as a crafted artifact would be."""
    p = d / "run" / "space.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "layers": [2, 10**18]}))
    relist_in_manifest(p)


def manifest_escape(d: Path) -> None:
    """run/manifest.json lists ../secret.txt (a path outside the artifact) with its true size and digest."""
    from instatune_cli.artifacts import sha256_file

    (d / "secret.txt").write_text("not the run's\n")
    mpath = d / "run" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["files"].append({"path": "../secret.txt", "bytes": (d / "secret.txt").stat().st_size,
                       "sha256": sha256_file(d / "secret.txt")})
    mpath.write_text(json.dumps(m, indent=2))


def pickled_bin(d: Path) -> None:
    """model/: the tiny model with pytorch_model.bin (a pickle naming os.system) instead of model.safetensors."""
    import torch

    (d / "model" / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(2), "payload": os.system}, d / "model" / "pytorch_model.bin")


def damage_checkpoint(d: Path) -> None:
    ck = sorted((d / "run.partial" / "checkpoints").glob("step-*"))[-1] / "model.safetensors"
    ck.write_bytes(ck.read_bytes()[:100])


def stray_label(p: Path) -> None:
    lines = p.read_text().splitlines()
    text = lines[3].split("\t")[0]
    lines[3] = f"{text}\t7"
    p.write_text("\n".join(lines) + "\n")


def list_label(d: Path) -> None:
    rows = []
    for i, ln in enumerate((d.parent / "data" / "train.tsv").read_text().splitlines()[1:]):
        text, label = ln.split("\t")
        rows.append({"sentence": text, "label": [1, 2] if i == 5 else int(label)})
    (d / "data").mkdir()
    (d / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy2(d.parent / "data" / "dev.tsv", d / "data" / "dev.tsv")


def image_16bit(d: Path) -> None:
    """imgs/train/c0/deep.png: a 16-bit grayscale ramp (0..65520) that PIL's convert('RGB') clips to white."""
    import numpy as np
    from PIL import Image

    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)).save(d / "imgs/train/c0/deep.png")


def image_float(d: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).random((32, 32), dtype=np.float32)).save(d / "imgs/train/c0/f.tiff")


def second_run(d: Path) -> None:
    """run/ a copy of the shared tune run, run2/ another tune run (seed 8) to swap in while a search runs."""
    shutil.copytree(d.parent / "run", d / "run")
    sh(["tune", "../model", "--data", "../data", "-o", "run2", *TINY, "--seed", "8"], d, "second tune run")


def chained_quantize(src: str, sub: list[str]) -> Callable[[Path], None]:
    """The README's first step: quantize SRC with a sub-network (chains an extract into its default place)."""

    def fn(d: Path) -> None:
        sh(["quantize", src, *sub, "-o", "q", "--calibration-samples", "8", "--runs", "2"], d, "chained quantize")

    return fn


def image_run(d: Path) -> None:
    sh(image_tune("../vit", "../imgs"), d, "image tune")


# ---- checks -----------------------------------------------------------------------------------------------

def unchanged(*rels: str) -> Callable[[Path, dict[str, Any]], str | None]:
    """The user's files are untouched (their content is compared with the snapshot by the diff; this names them)."""

    def fn(d: Path, r: dict[str, Any]) -> str | None:
        gone = [x for x in rels if not (d / x).exists()]
        return f"{', '.join(gone)} gone" if gone else None

    return fn


def kept_or_adopted(rel: str, out: str) -> Callable[[Path, dict[str, Any]], str | None]:
    """The user's file in a foreign `.partial` stays there; say where it went if it did not."""

    def fn(d: Path, r: dict[str, Any]) -> str | None:
        if (d / rel).exists():
            return None
        name = rel.split("/", 1)[1]
        moved = d / out / name
        if moved.exists():
            listed = name in (d / out / "manifest.json").read_text() if (d / out / "manifest.json").is_file() else False
            return (f"the user's {rel} was adopted as {out}/{name}" + (f", listed in {out}/manifest.json"
                                                                        if listed else ""))
        return f"{rel} gone"

    return fn


def refused_before_work(d: Path, r: dict[str, Any]) -> str | None:
    """A refusal that comes only after the stage ran, and whose message does not say the result is kept."""
    part = d / "run.partial"
    if (part / "manifest.json").is_file():
        told = "run.partial" in r["err"]
        return ("refused only at the final rename, after the whole tune ran; the finished run is left in "
                "run.partial (with its manifest)" + ("" if told else ", which the message does not mention"))
    return None


def no_resume_advice(d: Path, r: dict[str, Any]) -> str | None:
    if "--resume" in r["err"] and ".stage" not in r["err"]:
        return "advises --resume for a .partial without the .stage marker, which is no instatune run to resume"
    return None


def lock_released(out: str) -> Callable[[Path, dict[str, Any]], str | None]:
    def fn(d: Path, r: dict[str, Any]) -> str | None:
        return f"{out}.lock left behind" if (d / f"{out}.lock").exists() else None

    return fn


def resume_note(d: Path, r: dict[str, Any]) -> str | None:
    """Say where the resumed run started (no expectation: after a fault before any checkpoint it starts at 0)."""
    log = d / "run" / "log.jsonl"
    events = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
    res = [e for e in events if e.get("event") == "resume"]
    r["note"] = f"resumed at step {res[-1].get('step')}" if res else "started from step 0 (no resume event in the log)"
    return None


def resumed(d: Path, r: dict[str, Any]) -> str | None:
    log = d / "run" / "log.jsonl"
    if not log.is_file():
        return "no run/log.jsonl"
    events = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    res = [e for e in events if e.get("event") == "resume"]
    if not res:
        return "log.jsonl has no resume event (started over)"
    r["note"] = f"resumed at step {res[-1].get('step')}"
    return None


def interrupted_at_checkpoint(d: Path) -> bool:
    ck = d / "run.partial" / "checkpoints"
    return ck.is_dir() and any(p.name.startswith("step-") and not p.name.endswith(".tmp") for p in ck.iterdir())


def no_escape(d: Path, r: dict[str, Any]) -> str | None:
    return "terminal escape sequence printed" if "\x1b" in r["err"] + r["out"] else None


def only_partial_and_lock(out: str) -> Callable[[Path, dict[str, Any]], str | None]:
    """After a kill: nothing beside the output but its .partial (scratch inside it) and .lock."""

    def fn(d: Path, r: dict[str, Any]) -> str | None:
        stray = [p.name for p in d.iterdir() if p.name not in (f"{out}.partial", f"{out}.lock", "run", "run-search",
                                                                 "run-search-subnet1", "q")
                 and not p.name.startswith(".home-")]
        return f"left {', '.join(stray)} beside the output" if stray else None

    return fn


def decoded_faithfully(d: Path, r: dict[str, Any]) -> str | None:
    import numpy as np

    from instatune_cli.images import decode_image

    got = np.asarray(decode_image(str(d / "imgs/train/c0/deep.png"))).mean()
    want = (np.arange(32 * 32) * 64 / 257).mean()
    r["note"] = f"deep.png decodes to mean {got:.1f} (16-bit ramp / 257: {want:.1f}; clipped it was ~250)"
    return None if abs(got - want) < 1 else f"16-bit image decoded to mean {got:.1f}, not {want:.1f}"


def reused_extract(d: Path, r: dict[str, Any]) -> str | None:
    from instatune_cli import artifacts

    ext = next((p for p in d.iterdir() if p.is_dir() and (p / "manifest.json").is_file()
                and json.loads((p / "manifest.json").read_text()).get("stage") == "extract"), None)
    if ext is None:
        return "no chained extract found"
    onnx = artifacts.load(d / "onnx", "export")
    if onnx.parent("extract").path.resolve() != ext.resolve():
        return "the export's parent is not the extract quantize made"
    artifacts.load(d / "q", "quantize").parent("extract")  # raises if the extract was remade
    return None


def all_of(*fns: Callable[[Path, dict[str, Any]], str | None]) -> Callable[[Path, dict[str, Any]], str | None]:
    def fn(d: Path, r: dict[str, Any]) -> str | None:
        problems = [p for f in fns if (p := f(d, r))]
        return "; ".join(problems) or None

    return fn


# ---- the cases --------------------------------------------------------------------------------------------

def cases() -> list[Case]:
    root_user = os.geteuid() == 0
    search = ["--evals", "400", "--population", "4", "-o", "s", "--json"]
    killed = f"s.partial/ + s.lock of a search SIGKILLed once it had archived {KILLED_ROWS}+ evaluations"
    quant = ["quantize", "../ext", "-o", "q"]
    long_name = "r" * 250
    swap = ("import os\nfrom instatune_cli.search.archive import Archive\n_add = Archive.add\n"
            "def add(self, *a, **k):\n    if len(self.rows) == 2 and os.path.isdir('run2'):\n"
            "        os.rename('run', 'run.prev'); os.rename('run2', 'run')\n"
            "    return _add(self, *a, **k)\nArchive.add = add")
    return [
        # --- outputs ---
        Case("exists", "output exists, no --force", tune(), "run/ is a copy of a finished tune run",
             fragment="already exists", setup=copy("../run", "run")),
        Case("force-foreign", "--force on a directory instatune did not write", tune("../model", "../data", "home",
             "--force"), "home/ holds thesis.tex", fragment="not an instatune stage output",
             setup=write("home/thesis.tex", "years of work\n"), check=unchanged("home/thesis.tex")),
        Case("output-dot", "-o . (the current directory)", tune("../model", "../data", ".", "--force"),
             "keep.txt in the current directory", fragment="current directory", setup=write("keep.txt", "mine\n")),
        Case("old-in-the-way", "--force while a run.old that instatune did not write is there",
             tune("../model", "../data", "run", "--force"), "run/ a finished tune run, run.old/ holds notes.txt",
             fragment="run.old", setup=steps(copy("../run", "run"), write("run.old/notes.txt", "mine\n")),
             allow=("run.partial",), check=all_of(unchanged("run.old/notes.txt"), refused_before_work),
             fix="artifacts: check <out>.old in check_output/open with --force, before the stage runs; _old's error "
                 "should say the finished result is kept in <out>.partial"),
        # --- locks and partials ---
        Case("lock", "second writer while a live tune holds the lock",
             tune("../model", "../data", "run", "--force"),
             "this script holds run.lock (StageWriter.open: OutputLock + run.partial) for the whole command",
             fragment="being written by another", setup=hold_live_writer, allow=()),
        Case("stale-lock", "stale lock of a dead process", tune(),
             "a process took run.lock with OutputLock and was SIGKILLed", expect="ok", fragment="took over",
             setup=dead_holder, allow=("run", "run.lock"), check=lock_released("run")),
        Case("partial-unmarked", "a run.partial instatune did not make (no .stage marker), tune", tune(),
             "run.partial/ holds notes.txt", fragment="run.partial", setup=write("run.partial/notes.txt", "mine\n"),
             check=all_of(unchanged("run.partial/notes.txt"), no_resume_advice),
             fix="artifacts.StageWriter._open_partial: without the .stage marker, say it is not instatune's "
                 "(as --force and --resume do) instead of advising --resume"),
        Case("partial-unmarked-force", "a run.partial instatune did not make, tune --force",
             tune("../model", "../data", "run", "--force"),
             "run.partial/ holds notes.txt", fragment="no .stage marker",
             setup=write("run.partial/notes.txt", "mine\n"), check=unchanged("run.partial/notes.txt")),
        Case("partial-unmarked-resume", "a run.partial instatune did not make, tune --resume",
             tune("../model", "../data", "run", "--resume"),
             "run.partial/ holds notes.txt", fragment="run.partial",
             setup=write("run.partial/notes.txt", "mine\n"), check=kept_or_adopted("run.partial/notes.txt", "run"),
             fix="artifacts.StageWriter._open_partial: refuse --resume into a .partial without the .stage marker "
                 "(tune/rundir.RunDirectory.open starts afresh when run.json is absent)"),
        Case("partial-unmarked-search", "an s.partial instatune did not make, search --resume",
             ["search", "../run", "--evals", "6", "--population", "4", "-o", "s", "--resume"],
             "s.partial/ holds notes.txt", fragment="s.partial", setup=write("s.partial/notes.txt", "mine\n"),
             check=kept_or_adopted("s.partial/notes.txt", "s"),
             fix="artifacts.StageWriter._open_partial (as above); search/stage.py accepts a partial without "
                 "search.json when it has no archive"),
        Case("sigint", "Ctrl-C during tune", tune("../model", "../data", "run", "--max-steps", "40",
             "--save-every", "2"), "SIGINT once run.partial has its first checkpoint", expect="error",
             fragment="interrupted", allow=("run.partial",),
             sig=(signal.SIGINT, interrupted_at_checkpoint), check=lock_released("run")),
        Case("sigint-resume", "tune --resume after the Ctrl-C", tune("../model", "../data", "run", "--max-steps",
             "40", "--save-every", "2", "--resume"), "same directory; only --resume added", expect="ok",
             reuse="sigint", allow=("run", "run.partial", "run.checkpoints", "run.lock"),
             check=all_of(resumed, lock_released("run"))),
        Case("sigkill", "kill -9 during tune", tune("../model", "../data", "run", "--max-steps", "40",
             "--save-every", "2"), "SIGKILL once run.partial has its first checkpoint", expect="signal",
             allow=("run.partial", "run.lock"), sig=(signal.SIGKILL, interrupted_at_checkpoint)),
        # --- model and data ---
        Case("no-weights", "model directory without weights", tune("model", "../data", "run"),
             "model/ is the tiny model less model.safetensors", fragment="no weights",
             setup=steps(copy("../model", "model"), lambda d: damage_weights(d, "remove"))),
        Case("truncated", "truncated model.safetensors", tune("model", "../data", "run"),
             "model.safetensors cut to half its bytes", fragment="truncated",
             setup=steps(copy("../model", "model"), lambda d: damage_weights(d, "truncate"))),
        Case("task-rte", "--task rte on SST-2-shaped files", tune("../model", "../data", "run", "--task", "rte"),
             fragment="does not fit --task rte"),
        Case("zero-byte", "zero-byte train.tsv", tune("../model", "data", "run"), fragment="0 bytes",
             setup=data_copy(lambda p: p.write_bytes(b""))),
        Case("non-utf8", "a byte that is not UTF-8 (cp1252 \\xe9) in train.tsv", tune("../model", "data", "run"),
             fragment="not UTF-8", setup=data_copy(non_utf8)),
        Case("dup-header", "duplicate column name in the header (sentence, label, label)",
             tune("../model", "data", "run"), fragment="label", setup=data_copy(duplicate_header)),
        Case("missing-data", "--data that does not exist", tune("../model", "nodata", "run"), fragment="nodata"),
        # --- images ---
        Case("img-no-classes", "image folder with no class folders", image_tune("../vit", "empty"),
             "empty/train/ and empty/val/ exist but hold no class folders", fragment="class",
             setup=steps(write("empty/train/README", "no classes here\n"), write("empty/val/README", "none\n"))),
        Case("img-class-mismatch", "val/ has other classes than train/", image_tune("../vit", "imgs"),
             "imgs/ is a copy of the shared image folder with val/c3 renamed val/c9", fragment="class",
             setup=steps(copy("../imgs", "imgs"), rename("imgs/val/c3", "imgs/val/c9"))),
        Case("img-unreadable", "an unreadable image among the training images", image_tune("../vit", "imgs"),
             "imgs/ is a copy of the shared image folder plus imgs/train/c0/broken.jpg (not an image)",
             expect="ok", fragment="skipped 1 unreadable image", allow=("run", "imgs"),
             setup=steps(copy("../imgs", "imgs"), write("imgs/train/c0/broken.jpg", b"\xff\xd8 not a jpeg"))),
        Case("timm-unknown", "a timm id the installed timm does not know", image_tune("vit_imaginary_patch16_224"),
             fragment="vit_imaginary_patch16_224"),
        Case("timm-no-weights", "a timm id whose pretrained weights are not cached, offline",
             image_tune("vit_base_patch16_224"), fragment="no cached weights"),
        Case("space-more-heads", "a search space with more heads than the model", image_tune(
             "../vit", "../imgs", "--space", "space.yaml"), "space.yaml: heads [4, 8] for a 4-head model",
             fragment="heads", setup=write("space.yaml", "layers: [2, 4]\nheads: [4, 8]\nffn: [96, 192]\n")),
        Case("image-task-text-model", "--task imagefolder on a text model", image_tune("../model", "../imgs"),
             fragment="image model"),
        Case("text-task-image-model", "--task sst2 on an image model", tune("../vit", "../data", "run", "--task",
             "sst2"), fragment="imagefolder"),
        # --- search ---
        Case("population-0", "search --population 0", ["search", "../run", "--population", "0", "-o", "s"],
             fragment="--population"),
        Case("evals-0", "search --evals 0", ["search", "../run", "--evals", "0", "-o", "s"], fragment="--evals"),
        Case("search-not-a-run", "search of a model directory (not a tune run)", ["search", "../model", "-o", "s"],
             fragment="manifest"),
        Case("resume-after-tune-force", "search --resume after its tune run was replaced (tune --force)",
             ["search", "run", *search, "--resume"],
             killed + "; then "
             "`tune --force` re-made run/", fragment="tune --force",
             setup=steps(copy("../run", "run"), killed_partial, replace_run), allow=("s.lock",)),
        Case("resume-limit-val", "search --resume with another --limit-val",
             ["search", "../run", *search, "--resume", "--limit-val", "8"],
             killed, fragment="--limit-val",
             setup=killed_partial, allow=("s.lock",)),
        Case("resume-ok", "search --resume, same settings, budget lowered to 6 (control)",
             ["search", "../run", "--evals", "6", "--population", "4", "-o", "s", "--json", "--resume"],
             killed, expect="ok",
             fragment="took over", setup=killed_partial, allow=("s", "s.partial", "s.lock"),
             check=lock_released("s")),
        # --- damaged artifacts ---
        Case("front-edited", "front.json replaced by `{not json` (manifest not updated)",
             ["extract", "s", "--subnet", "1", "-o", "x"], "s/ is a copy of the search", fragment="front.json",
             setup=steps(copy("../run-search", "s"), bad_front(relist=False))),
        Case("front-malformed", "malformed front.json re-listed in the manifest, then extract --subnet 1",
             ["extract", "s", "--subnet", "1", "-o", "x"], "as another instatune would have written it",
             fragment="front.json", setup=steps(copy("../run-search", "s"), bad_front(relist=True))),
        Case("schema-future", "manifest with schema_version 99", ["extract", "s", "--subnet", "1", "-o", "x"],
             "s/ is a copy of the search", fragment="upgrade instatune",
             setup=steps(copy("../run-search", "s"), edit_json("s/manifest.json",
                                                                lambda m: {**m, "schema_version": 99}))),
        # --- refused writes ---
        Case("fsize-tune", "disk full during tune (checkpoint)", tune("../model", "../data", "run", "--save-every",
             "1"), f"RLIMIT_FSIZE {FSIZE_LIMIT // 1024} KiB (ulimit -f): a larger file fails with EFBIG; the first "
             "checkpoint is the first large file, so nothing resumable exists yet", fragment="nothing was written",
             fsize=FSIZE_LIMIT, check=lock_released("run")),
        Case("fsize-tune-resume", "tune --resume once there is room again",
             tune("../model", "../data", "run", "--save-every", "1", "--resume"), "same directory, no limit",
             expect="ok", reuse="fsize-tune", allow=("run", "run.partial", "run.checkpoints"),
             check=all_of(lock_released("run"), resume_note)),
        Case("fsize-export", "disk full during export (model.onnx)", ["export", "../ext", "-o", "onnx",
             "--no-compare", "--runs", "2"], f"RLIMIT_FSIZE {FSIZE_LIMIT // 1024} KiB (ulimit -f)",
             fragment="onnx", fsize=FSIZE_LIMIT, check=lock_released("onnx")),
        Case("enospc-search", "ENOSPC while appending to the search archive",
             ["search", "../run", "--evals", "12", "--population", "6", "-o", "s", "--json"],
             "in the CLI process, Archive.add raises OSError(ENOSPC) at the 6th evaluation (patched before main())",
             fragment="no space left", allow=("s.partial",), check=lock_released("s"),
             patch=("import errno\nfrom instatune_cli.search.archive import Archive\n_add = Archive.add\n"
                    "def add(self, *a, **k):\n    if len(self.rows) == 5:\n"
                    "        raise OSError(errno.ENOSPC, 'No space left on device', str(self.path))\n"
                    "    return _add(self, *a, **k)\nArchive.add = add")),
        Case("read-only-root", "read-only output parent (chmod 555), as " + ("root" if root_user else "this user"),
             tune("../model", "../data", "ro/run"), "ro/ is mode 555" + (
                 "; root ignores file modes, so the write succeeds" if root_user else ""),
             expect="ok" if root_user else "error", fragment="" if root_user else "ro",
             setup=read_only_parent, allow=("ro",)),
        *([Case("read-only-nobody", "read-only output parent (chmod 555), as user nobody",
                tune("../model", "../data", "ro/run"), "ro/ is mode 555; the CLI runs as nobody (setuid)",
                fragment="ro/run", user="nobody", setup=as_nobody)] if root_user else []),
        # --- quantize and export ---
        Case("policy-missing", "quantize --policy that does not exist", [*quant, "--policy", "missing.json"],
             fragment="does not exist"),
        Case("policy-missing-chained", "quantize --policy that does not exist, from a search dir (chains extract)",
             ["quantize", "run-search", "--subnet", "1", "--policy", "missing.json", "-o", "q"],
             "run/ and run-search/ are copies of the shared tune run and search", fragment="does not exist",
             setup=steps(copy("../run", "run"), copy("../run-search", "run-search")),
             fix="quantize/stage.py: check that --policy exists (QuantizeOptions validation) before resolve() "
                 "chains extract and loads the model"),
        Case("policy-foreign", "quantize with a policy for another architecture", [*quant, "--policy", "p.json"],
             "p.json: QuantPolicy.uniform for BERT L2 heads [4, 4] FFN [64, 64]; the model has [2, 4] / [25, 37]",
             fragment="policy was made for", setup=foreign_policy),
        Case("calib-2", "quantize --calibration-samples 2", [*quant, "--calibration-samples", "2"],
             fragment="too few"),
        Case("engine-tflite", "quantize --engine tflite", [*quant, "--engine", "tflite"], fragment="unknown engine"),
        Case("export-99", "export --subnet 99 (the front has fewer)",
             ["export", "../run-search", "--subnet", "99", "-o", "onnx"], fragment="99"),
        # --- issue 19, class 1: only instatune's own sibling paths are removed ---
        Case("checkpoints-foreign", "a run.checkpoints/ instatune did not make", tune(),
             "run.checkpoints/ holds notes.txt", fragment="run.checkpoints is in the way",
             setup=write("run.checkpoints/notes.txt", "mine\n"), check=unchanged("run.checkpoints/notes.txt")),
        Case("lock-foreign", "-o uv beside a project's uv.lock", tune("../model", "../data", "uv"),
             "uv.lock is a uv lock file", fragment="not an instatune lock",
             setup=write("uv.lock", "version = 1\n[[package]]\nname = \"x\"\n"), check=unchanged("uv.lock")),
        Case("old-backup", "--force while run.old is the user's backup copy of a tune run",
             tune("../model", "../data", "run", "--force"), "run/ and run.old/ are copies of a finished tune run",
             fragment="instatune did not make it", setup=steps(copy("../run", "run"), copy("../run", "run.old")),
             check=unchanged("run.old/manifest.json")),
        Case("sigkill-quantize", "kill -9 during quantize", [*quant], "SIGKILL once q.partial holds the "
             "quantizer's scratch directory", expect="signal", allow=("q.partial", "q.lock"),
             sig=(signal.SIGKILL, lambda d: any((d / "q.partial").glob(".quant-*"))),
             check=only_partial_and_lock("q")),
        Case("quantize-after-kill", "quantize again after the kill", [*quant], "same directory, same command",
             expect="ok", fragment="removed q.partial", reuse="sigkill-quantize", allow=("q", "q.partial", "q.lock"),
             check=all_of(lock_released("q"), only_partial_and_lock("q"))),
        # --- class 2: no write follows a planted link; no output over its own input ---
        Case("lock-link", "run.lock is a symbolic link to a user's file", tune(), "run.lock -> precious.txt",
             fragment="symbolic link",
             setup=steps(write("precious.txt", "mine\n"), symlink("run.lock", "precious.txt")),
             check=unchanged("precious.txt")),
        Case("partial-link-resume", "run.partial is a link to another directory, tune --resume",
             tune("../model", "../data", "run", "--resume"), "run.partial -> elsewhere/ (which even has a .stage "
             "marker)", fragment="symbolic link", setup=steps(marked_partial("elsewhere", "tune", "mine.txt"),
                                                             symlink("run.partial", "elsewhere")),
             check=unchanged("elsewhere/mine.txt")),
        Case("partial-link-force", "run.partial is a link to another directory, tune --force",
             tune("../model", "../data", "run", "--force"), "run.partial -> elsewhere/",
             fragment="symbolic link", setup=steps(marked_partial("elsewhere", "tune", "mine.txt"),
                                                   symlink("run.partial", "elsewhere")),
             check=unchanged("elsewhere/mine.txt")),
        Case("output-is-input", "extract a search into the search itself (--force)",
             ["extract", "run-search", "--subnet", "1", "-o", "run-search", "--force"],
             "run/ and run-search/ are copies of the shared tune run and search", fragment="is the input",
             setup=steps(copy("../run", "run"), copy("../run-search", "run-search"))),
        Case("output-inside-input", "tune into a folder inside its own --data", tune("../model", "data", "data/run"),
             "data/ is a copy of the tiny data", fragment="is inside the input",
             setup=data_copy(lambda p: None)),
        # --- class 7: chained stages reuse what they made ---
        Case("chain-export-after-quantize", "quantize run-search --subnet 1, then export run-search --subnet 1 --int8",
             ["export", "run-search", "--subnet", "1", "--int8", "-o", "onnx", "--no-compare", "--runs", "2"],
             "copies of the run and search; `quantize run-search --subnet 1 -o q` made run-search-subnet1/ first",
             expect="ok", fragment="using the extract", allow=("onnx",),
             setup=steps(copy("../run", "run"), copy("../run-search", "run-search"),
                         chained_quantize("run-search", ["--subnet", "1"])), check=reused_extract),
        Case("chain-image", "the same for an image run: quantize run --config, then export run --config",
             ["export", "run", "--config", "L2-h4-f192", "-o", "onnx", "--no-compare", "--runs", "2"],
             "run/ a tiny ViT tune run; `quantize run --config L2-h4-f192 -o q` made run-L2-h4-f192/ first",
             expect="ok", fragment="using the extract", allow=("onnx",),
             setup=steps(image_run, chained_quantize("run", ["--config", "L2-h4-f192"])), check=reused_extract),
        # --- class 3: a child records the parent it read ---
        Case("parent-changed", "the tune run is replaced while its search runs",
             ["search", "run", "--evals", "6", "--population", "4", "-o", "s", "--json"],
             "run2/ another tune run; in the CLI process, at the 3rd evaluation run/ is renamed run.prev/ and run2/ "
             "becomes run/ (patched before main())", fragment="changed while this search read it",
             setup=second_run, patch=swap, allow=("run", "run2", "run.prev", "s.partial")),
        # --- class 4: inputs are bounded before they cost memory ---
        Case("space-huge", "a tune run's space.json with layers [2, 10**18]",
             ["search", "run", "--evals", "6", "--population", "4", "-o", "s"], "re-listed in run/manifest.json",
             fragment="above the bound", setup=steps(copy("../run", "run"), crafted_space)),
        Case("manifest-escape", "a manifest listing ../secret.txt", ["extract", "run", "--config", EXTRACT_CONFIG,
             "-o", "x"], "with its true size and sha256", fragment="outside the artifact",
             setup=steps(copy("../run", "run"), manifest_escape)),
        Case("planted-file", "a planted, unlisted tokenizer file in a tune run",
             ["extract", "run", "--config", EXTRACT_CONFIG, "-o", "x"], "run/model/added_tokens.json added",
             fragment="does not list", setup=steps(copy("../run", "run"),
                                                   write("run/model/added_tokens.json", '{"evil": 0}'))),
        # --- class 5: training data is what the user meant ---
        Case("label-stray", "one row labelled 7 in binary data", tune("../model", "data", "run"),
             "data/train.tsv row 3 relabelled 7", fragment="no training example of class 2",
             setup=data_copy(stray_label)),
        Case("label-list", "a JSONL label [1, 2]", tune("../model", "data", "run"),
             "data/train.jsonl from the tiny data, row 6 labelled [1, 2]", fragment="one class id or name",
             setup=list_label),
        Case("img-16bit", "a 16-bit grayscale PNG among the training images", image_tune("../vit", "imgs"),
             "imgs/train/c0/deep.png: a 16-bit ramp", expect="ok", allow=("run", "imgs"),
             setup=steps(copy("../imgs", "imgs"), image_16bit), check=decoded_faithfully),
        Case("img-float", "a floating-point TIFF among the training images", image_tune("../vit", "imgs"),
             "imgs/train/c0/f.tiff (PIL mode F)", fragment="floating-point pixels",
             setup=steps(copy("../imgs", "imgs"), image_float)),
        # --- class 6: every fault is one line with advice that works ---
        Case("pickled-bin", "a pickled pytorch_model.bin instead of safetensors", tune("model", "../data", "run"),
             "model/pytorch_model.bin pickles a reference to os.system", fragment="never unpickles",
             setup=steps(copy("../model", "model"), pickled_bin)),
        Case("damaged-checkpoint", "tune --resume from a damaged checkpoint",
             tune("../model", "../data", "run", "--max-steps", "40", "--save-every", "2", "--resume"),
             "after the kill -9 above, its checkpoint's model.safetensors cut to 100 bytes", fragment="cannot be read",
             reuse="sigkill", setup=damage_checkpoint, allow=("run.partial", "run.lock")),
        Case("long-name", "an output name too long once .checkpoints is appended",
             tune("../model", "../data", long_name), "a 250-character name", fragment="too long"),
        Case("sigterm", "SIGTERM during tune", tune("../model", "../data", "run", "--max-steps", "40",
             "--save-every", "2"), "SIGTERM once run.partial has its first checkpoint", fragment="terminated (SIGTERM)",
             allow=("run.partial",), sig=(signal.SIGTERM, interrupted_at_checkpoint), check=lock_released("run")),
        Case("sigint-export", "Ctrl-C during export", ["export", "../ext", "-o", "onnx", "--runs", "200"],
             "SIGINT once onnx.partial/model.onnx exists", fragment="nothing was written",
             sig=(signal.SIGINT, lambda d: (d / "onnx.partial" / "model.onnx").is_file()),
             check=lock_released("onnx")),
        Case("extract-after-kill", "extract where a killed extract left x.partial and x.lock",
             ["extract", "../run", "--config", EXTRACT_CONFIG, "-o", "x"], "x.partial/ (.stage extract) and "
             "x.lock of a dead process", expect="ok", fragment="removed x.partial", allow=("x", "x.partial", "x.lock"),
             setup=steps(marked_partial("x.partial", "extract", "model.safetensors"), lock_text("x.lock",
                                                                                                 stage="extract")),
             check=all_of(lock_released("x"), no_resume_advice)),
        Case("failed-start", "disk full before the first checkpoint", tune(),
             "in the CLI process, building the model raises OSError(ENOSPC) (patched before main())",
             fragment="nothing was written", check=lock_released("run"),
             patch=("import errno\nfrom instatune_cli.tune.loop import Trainer\n"
                    "def build(self):\n    raise OSError(errno.ENOSPC, 'No space left on device', 'run.partial')\n"
                    "Trainer.build_model = build")),
        Case("lock-other-host", "a run.lock naming a process on another host", tune(),
             "run.lock names tune pid 4242 on build-7.example", fragment="cannot check",
             setup=lock_text("run.lock", pid=4242, host="build-7.example"), check=unchanged("run.lock")),
        Case("lock-escapes", "a stale run.lock whose text holds terminal escapes and a newline", tune(),
             "run.lock: stage is ESC[2J ESC[31m plus a newline; its pid is not running", expect="ok",
             fragment="took over", allow=("run", "run.lock"),
             setup=lock_text("run.lock", stage="\x1b[2J\x1b[31mowned\nerror: fake"),
             check=all_of(no_escape, lock_released("run"))),
    ]


# ---- report -----------------------------------------------------------------------------------------------

def cell(text: str, limit: int = 700) -> str:
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|").replace("\n", "<br>")


def message_cell(text: str) -> str:
    lines = text.split("\n")
    if len(lines) > 4:
        text = "\n".join(lines[:3] + [f"… ({len(lines)} lines in all: bench/results/faults.json has them)"])
    return cell(text)


def code(text: str) -> str:
    return "`" + text.replace("`", "'") + "`"


def markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    findings = [r for r in results if r["verdict"] != "ok"]
    out = [
        "# Faults and bad input: what the CLI says and leaves",
        "",
        f"Generated by `python bench/faults.py` on {meta['date']} with instatune {meta['instatune_version']} "
        f"(commit {meta['commit']}) "
        f"on Python {meta['python']}, {meta['platform']}, uid {meta['uid']}; {len(results)} cases, "
        f"{meta['wall_seconds']:.0f} s. Do not edit by hand: re-run the script.",
        "",
        "Every case runs the real CLI (`python -m instatune_cli ...`) in a subprocess, in a directory of its own "
        "beside a tiny BERT model (`../model`, 4 layers, hidden 32), tiny SST-2-shaped data (`../data`), a 2-step "
        "tune run (`../run`), a 6-evaluation search of it (`../run-search`) and an extracted sub-network (`../ext`), "
        "so paths in commands and messages are relative to that directory. `[tiny]` stands for the flags of the "
        "quick test run: `" + shlex.join(TINY) + "`. Disk full is RLIMIT_FSIZE (`ulimit -f`, the write fails "
        "with EFBIG) unless the case says a write was patched to raise ENOSPC inside the CLI process.",
        "",
        "*Message*: the `error:` line (with any `notice:` line before it); when the output is not one line, all of "
        "it. *Left on disk*: the entries of the case directory after the command, against before it: `+` new, "
        "`~` changed, `-` removed; `.partial` directories and locks show what they hold. *Verdict*: `ok` when the "
        "exit code, the message and the disk are what docs/architecture.md (\"Faults and resume\") promises; "
        "otherwise what fell short.",
        "",
        "| # | case | command | message | exit | left on disk | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        case = f"**{cell(r['case'])}**" + (f"<br>{cell(r['how'])}" if r["how"] else "")
        verdict = r["verdict"] + (f"; {r['note']}" if r.get("note") else "")
        out.append(f"| {r['n']} | {case} | {code(r['command'])} | {message_cell(r['message'])} | {r['exit']} | "
                   f"{cell(r['left'])} | {cell(verdict)} |")
    out += ["", f"## Findings ({len(findings)})", ""]
    out += [f"- {r['n']}. {r['case']}: {r['verdict'].removeprefix('FINDING: ')}"
            + (f" (likely fix: {r['likely_fix']})" if r["likely_fix"] else "") for r in findings] or ["- none"]
    out.append("")
    return "\n".join(out)


def git_state() -> str:
    """The commit the CLI ran from, and whether instatune_cli/ differed from it (read-only git commands)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "instatune_cli"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" with uncommitted changes in instatune_cli/" if dirty else "")


def code_digest() -> str:
    """sha256 over instatune_cli/**/*.py, to notice the library changing under a run."""
    h = hashlib.sha256()
    for f in sorted((REPO / "instatune_cli").rglob("*.py")):
        h.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def run_all(todo: list[Case], root: Path, jobs: int) -> list[dict[str, Any]]:
    """Run the cases `jobs` at a time; a follow-up (`reuse`) runs after its case, in the same chain."""
    chains: dict[str, list[tuple[int, Case]]] = {}
    head: dict[str, str] = {}
    for i, case in enumerate(todo, 1):
        h = head[case.reuse] if case.reuse else case.key
        head[case.key] = h
        chains.setdefault(h, []).append((i, case))
    dirs: dict[str, Path] = {}
    results: list[dict[str, Any]] = []

    def chain(items: list[tuple[int, Case]]) -> None:
        for i, case in items:
            r = run_case(case, root, i, dirs)
            results.append(r)
            print(f"{i:2d} {case.key:24s} exit {r['exit']:4d} {r['seconds']:5.1f}s  {r['verdict'][:90]}",
                  file=sys.stderr, flush=True)

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for f in [pool.submit(chain, items) for items in chains.values()]:
            f.result()
    return sorted(results, key=lambda r: r["n"])


def summary_figures(out: dict) -> dict:
    """Cases run, findings, and each case's exit code (keyed by case key)."""
    cases = out["cases"]
    return {"cases": len(cases), "findings": sum(1 for r in cases if r["verdict"] != "ok"),
            "wall_seconds": out["meta"].get("wall_seconds"), **{f"exit.{r['key']}": r["exit"] for r in cases}}


def main() -> None:
    # A background job of a non-interactive shell (`nohup python bench/faults.py &`) starts with SIGINT ignored,
    # and its children would inherit that, so Ctrl-C cases would test nothing: give them the default again.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated case keys (plus the follow-ups they need)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory and print it")
    ap.add_argument("--jobs", type=int, default=2, help="cases run at once (follow-ups wait for their case)")
    ap.add_argument("--write", action="store_true", help="write the outputs even with --only")
    ap.add_argument("--md", default=str(REPO / "docs" / "faults.md"))
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "faults.json"))
    add_arguments(ap)
    args = ap.parse_args()
    prov = start("faults", __file__, allow_dirty=args.allow_dirty, subprocess_cli=True, out=Path(args.json))

    import instatune_cli

    t_start = time.perf_counter()
    commit, code = git_state(), code_digest()
    todo = cases()
    if args.only:
        keys = set(args.only.split(","))
        keys |= {c.reuse for c in todo if c.key in keys and c.reuse}
        todo = [c for c in todo if c.key in keys]
    root = Path(tempfile.mkdtemp(prefix="instatune-faults-"))
    try:
        print(f"fixtures in {root} ...", file=sys.stderr, flush=True)
        fixture_times = make_fixtures(root)
        print("  " + ", ".join(f"{k} {v:.0f}s" for k, v in fixture_times.items()), file=sys.stderr, flush=True)
        results = run_all(todo, root, args.jobs)
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            for p in root.rglob("*"):  # chmod 555 directories would stop rmtree
                if p.is_dir() and not p.is_symlink():
                    p.chmod(0o755)
            shutil.rmtree(root, ignore_errors=True)
    wall = time.perf_counter() - t_start
    if code_digest() != code:
        print(f"warning: instatune_cli/ changed during the run (was {commit}, now {git_state()}); re-run",
              file=sys.stderr)
        commit += f", CHANGED during the run (now {git_state()}): re-run"
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "instatune_version": instatune_cli.__version__, "commit": commit, "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.machine()}", "uid": os.geteuid(),
            "command": "python bench/faults.py" + (f" --only {args.only}" if args.only else ""),
            "wall_seconds": round(wall, 1), "fixture_seconds": {k: round(v, 1) for k, v in fixture_times.items()},
            "jobs": args.jobs, "tiny_flags": TINY, "fsize_limit_bytes": FSIZE_LIMIT}
    findings = [r for r in results if r["verdict"] != "ok"]
    print(f"{len(results)} cases, {len(findings)} findings, {wall:.0f} s", file=sys.stderr)
    if args.only and not args.write:
        for r in results:
            print(json.dumps({k: r[k] for k in ("n", "key", "command", "exit", "message", "left", "verdict")}))
        return
    Path(args.md).write_text(markdown(meta, results))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    out = {"meta": meta, "cases": results}  # every case's command, exit, message and what it left: the raw rows
    out["provenance"] = prov.finish(summary_figures(out), result_file=args.json)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.md} and {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
