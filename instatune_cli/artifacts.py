"""The artifact contract: every stage reads the directory its parent wrote and writes its own.

A stage directory is built in a temporary sibling (`<out>.partial`) and renamed into place only when it
is complete, with `manifest.json` describing it (schema, stage, options, parent + digest, model info, metrics,
files with size and sha256). The `.partial` sibling doubles as the stage's own resume area: a killed stage
leaves its checkpoints there and `--resume` picks them up. An existing result is never replaced without
`force`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from instatune_cli import __version__
from instatune_cli.errors import InstatuneError

SCHEMA = "instatune.artifact"
SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST = "manifest.json"
STAGES = ("tune", "search", "extract", "quantize", "export")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest(directory: str | Path) -> str:
    """Content digest of an artifact: sha256 of its manifest (which itself lists every file's sha256)."""
    p = Path(directory) / MANIFEST
    return "sha256:" + sha256_file(p)


def _file_list(root: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out.append({"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return out


@dataclass
class Artifact:
    """A loaded, validated stage directory."""

    path: Path
    manifest: dict[str, Any]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def options(self) -> dict[str, Any]:
        return self.manifest.get("options", {})

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest.get("model", {})

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    @property
    def digest(self) -> str:
        return digest(self.path)

    def file(self, rel: str) -> Path:
        return self.path / rel

    def parent(self, expect_stage: str | Iterable[str] | None = None) -> Artifact:
        """Load the parent artifact and check it is still the one this artifact was made from."""
        par = self.manifest.get("parent")
        if not par:
            raise InstatuneError(f"{self.path} records no parent artifact")
        ppath = (self.path / par["path"]).resolve()
        if not (ppath / MANIFEST).is_file():
            raise InstatuneError(
                f"parent of {self.path} is missing at {ppath}; restore it or rerun the {self.stage} stage"
            )
        parent = load(ppath, expect_stage)
        if par.get("digest") and parent.digest != par["digest"]:
            raise InstatuneError(
                f"parent {ppath} changed since {self.path} was made (digest mismatch); rerun the {self.stage} stage"
            )
        return parent


def load(path: str | Path, expect_stage: str | Iterable[str] | None = None, verify: bool = True) -> Artifact:
    """Read and validate a stage directory; every failure is a one-line InstatuneError naming the path."""
    p = Path(path)
    mpath = p / MANIFEST
    if not p.is_dir():
        raise InstatuneError(f"{p} is not a directory; give an instatune stage directory")
    if not mpath.is_file():
        raise InstatuneError(f"{p} has no {MANIFEST}; it is not an instatune stage directory")
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InstatuneError(f"{mpath} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(m, dict) or m.get("schema") != SCHEMA:
        schema = m.get("schema") if isinstance(m, dict) else None
        raise InstatuneError(f"{mpath} is not an instatune manifest (schema {schema!r})")
    if m.get("schema_version") not in SUPPORTED_VERSIONS:
        raise InstatuneError(
            f"{mpath} has schema version {m.get('schema_version')!r}, this instatune reads "
            f"{list(SUPPORTED_VERSIONS)}; upgrade instatune"
        )
    if expect_stage is not None:
        allowed = (expect_stage,) if isinstance(expect_stage, str) else tuple(expect_stage)
        if m.get("stage") not in allowed:
            raise InstatuneError(
                f"{p} is a {m.get('stage')!r} directory but a {' or '.join(allowed)} directory is needed here"
            )
    if verify:
        for f in m.get("files", []):
            fp = p / f["path"]
            if not fp.is_file():
                raise InstatuneError(f"{p} is incomplete: {f['path']} is missing")
            if fp.stat().st_size != f["bytes"] or sha256_file(fp) != f["sha256"]:
                raise InstatuneError(f"{fp} does not match its manifest digest; the artifact was modified")
    return Artifact(p, m)


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class OutputLock:
    """An exclusive OS lock on `<out>.lock` for the life of a stage, so two processes never write (or
    `--force`-delete, or `--resume` into) the same output.

    `fcntl.flock` is released by the OS when its holder dies, so a lock can never outlive its process; the file
    names the holder (pid, host, stage, start) for the one-line refusal a second writer gets, and is removed
    on release. A lock file that is present but not locked was left by a process that died: it is taken over
    and `notice` says so. Where `fcntl` does not exist (Windows) locking is skipped.
    """

    def __init__(self, out: Path, stage: str) -> None:
        self.path = out.with_name(out.name + ".lock")
        self.out, self.stage = out, stage
        self.fd: int | None = None
        self.notice: str | None = None

    def holder_error(self, fd: int) -> InstatuneError:
        h = _read_holder(fd)
        who = (f"instatune {h.get('stage', '?')} (pid {h.get('pid', '?')} on {h.get('host', '?')}, since "
               f"{h.get('since', '?')})") if h else "instatune process"
        return InstatuneError(f"{self.out} is being written by another {who}; wait for it to finish or choose "
                              "another --output")

    def probe(self) -> None:
        """Raise the holder's one-line error if a live process holds the lock; change nothing."""
        try:
            import fcntl
        except ImportError:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self.holder_error(fd) from None
        finally:
            os.close(fd)

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:
            return
        import socket

        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise InstatuneError(f"cannot create the lock file {self.path} ({e.strerror}); choose an --output "
                                     "in a directory you can write") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                err = self.holder_error(fd)
                os.close(fd)
                raise err from None
            try:  # the previous holder may have removed the file between our open and our lock: retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = _read_holder(fd)
        if old:
            self.notice = (f"took over {self.path}, left by {old.get('stage', '?')} pid {old.get('pid', '?')} on "
                           f"{old.get('host', '?')}, which is no longer running")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "stage": self.stage,
                                 "since": _utc_now()}).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        try:
            os.unlink(self.path)  # while still holding it, so nobody locks a file that is about to vanish
        except FileNotFoundError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_output(out: str | Path, force: bool) -> Path:
    """Refuse an output a stage must not write or replace; returns it as a Path.

    `--force` replaces only what instatune made: an existing directory whose manifest says it is an instatune
    stage output, or an empty directory. Anything else (a data folder, a home directory, a file) is refused
    with one line, and so is an output that is the current directory or one of its parents (`-o .`).
    """
    p = _named_output(out)
    OutputLock(p, "").probe()
    return _check_replaceable(p, force)


def _check_replaceable(p: Path, force: bool) -> Path:
    if not p.exists() and not p.is_symlink():
        return p
    if not force:
        raise InstatuneError(f"{p} already exists; pass --force to replace it or choose another --output")
    if not p.is_dir() or p.is_symlink():
        raise InstatuneError(f"{p} is not a directory instatune wrote; --force replaces only stage outputs; "
                             "choose another --output")
    if any(p.iterdir()) and not _is_stage_output(p):
        raise InstatuneError(f"{p} is not an instatune stage output (no instatune manifest.json); --force replaces "
                             "only those, so move it away or choose another --output")
    return p


def _named_output(out: str | Path) -> Path:
    p = Path(out).expanduser()
    if p.name in ("", ".", "..") or Path.cwd().resolve().is_relative_to(p.resolve()):
        raise InstatuneError(f"--output {out} is the current directory or above it; give a new directory name")
    return p


def check_partial(tmp: Path) -> None:
    """`--force` removes a `<out>.partial` directory only if a stage made it (its `.stage` marker)."""
    if not (tmp / ".stage").is_file():
        raise InstatuneError(f"{tmp} is not an unfinished instatune stage (no .stage marker); --force removes only "
                             "those, so move it away or choose another --output")


def _is_stage_output(p: Path) -> bool:
    try:
        m = json.loads((p / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("schema") == SCHEMA and m.get("stage") in STAGES


@dataclass
class StageWriter:
    """Builds a stage directory in `<out>.partial` and publishes it atomically on `commit()`.

    Use as a context manager: leaving the block without commit keeps the partial directory (so a resumable
    stage can continue) unless `cleanup_on_error` is set.
    """

    out: Path
    stage: str
    options: dict[str, Any]
    parent: Artifact | None = None
    force: bool = False
    resume: bool = False
    cleanup_on_error: bool = True
    manifest: dict[str, Any] = field(default_factory=dict)
    _complete: bool = field(default=False, init=False)  # a finished result that could not be moved: keep it

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage}")
        self.out = _named_output(self.out)
        self.tmp = self.out.with_name(self.out.name + ".partial")
        self.lock = OutputLock(self.out, self.stage)

    def __enter__(self) -> StageWriter:
        self.open()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and self.cleanup_on_error and self.tmp.exists() and not self._complete:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.release()

    def release(self) -> None:
        """Give up the output's lock (done by `commit` and on leaving the `with` block; idempotent)."""
        self.lock.release()

    def open(self) -> Path:
        """Check the output, take its lock (held until `commit` or `release`), create or reopen the partial."""
        check_output(self.out, self.force)
        self.lock.acquire()
        if self.lock.notice:
            print(f"notice: {self.lock.notice}", file=sys.stderr)
        try:
            return self._open_partial()
        except BaseException:
            self.release()
            raise

    def _open_partial(self) -> Path:
        if self.tmp.exists():
            if self.resume:
                marker = self.tmp / ".stage"
                if marker.is_file() and marker.read_text().strip() != self.stage:
                    raise InstatuneError(
                        f"{self.tmp} holds a {marker.read_text().strip()!r} run, not {self.stage!r}; cannot resume it"
                    )
                return self.tmp
            if not self.force:
                raise InstatuneError(f"an unfinished {self.stage} run is in {self.tmp}; "
                                     "pass --resume to continue it or --force to start over")
            check_partial(self.tmp)
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        (self.tmp / ".stage").write_text(self.stage)
        return self.tmp

    @property
    def path(self) -> Path:
        return self.tmp

    def commit(self, model: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None) -> Artifact:
        """Write the manifest and move the directory into place (replacing the old one only with force)."""
        (self.tmp / ".stage").unlink(missing_ok=True)
        m: dict[str, Any] = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "stage": self.stage,
            "instatune_version": __version__,
            "created_utc": _utc_now(),
            "options": _jsonable(self.options),
            "parent": None,
            "model": _jsonable(model or {}),
            "metrics": _jsonable(metrics or {}),
        }
        if self.parent is not None:
            rel = os.path.relpath(self.parent.path.resolve(), self.out.resolve().parent)
            # stored relative to the artifact itself, so moving both together keeps the link
            m["parent"] = {"path": os.path.join("..", rel), "stage": self.parent.stage, "digest": self.parent.digest}
        m.update(_jsonable(extra or {}))
        m["files"] = _file_list(self.tmp)
        (self.tmp / MANIFEST).write_text(json.dumps(m, indent=2) + "\n")
        if self.out.exists():
            _check_replaceable(self.out, True)  # it may have changed since open()
            old = self.out.with_name(self.out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
            try:
                os.replace(self.tmp, self.out)
            except OSError as e:  # never leave only <out>.old behind: put the previous output back
                os.replace(old, self.out)
                self._complete = True
                raise InstatuneError(f"could not move {self.tmp} to {self.out} ({e.strerror}); the previous "
                                     f"{self.out} is unchanged and the new result is kept in {self.tmp}") from None
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        self.release()
        return Artifact(self.out, m)


def _jsonable(x: Any) -> Any:
    """Options often hold Paths, tuples and dataclasses; the manifest wants plain JSON."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "to_dict"):
        return _jsonable(x.to_dict())
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
