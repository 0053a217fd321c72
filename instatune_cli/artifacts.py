"""The artifact contract: every stage reads the directory its parent wrote and writes its own.

A stage directory is built in a temporary sibling (`<out>.partial`) and renamed into place only when it
is complete, with `manifest.json` describing it (schema, stage, options, parent + digest, model info, metrics,
files with size and sha256). The `.partial` sibling doubles as the stage's own resume area: a killed stage
leaves its checkpoints there and `--resume` picks them up. An existing result is never replaced without
`force`. The directory is flushed to disk before the rename, and a write the file system refuses is one
`WriteError` line (docs/architecture.md, "Faults and resume").
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from dataclasses import fields as fields_of
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from instatune_cli import __version__
from instatune_cli.errors import InstatuneError, Interrupted, Terminated, interrupt_of

Opts = TypeVar("Opts")
R = TypeVar("R", bound="StageResult")

SCHEMA = "instatune.artifact"
SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST = "manifest.json"
MARKER = ".stage"  # names the stage of an unfinished `<out>.partial`; never part of a committed directory
OWN = ".instatune"  # names what a sibling directory instatune made is (`<out>.old`: "old", `<out>.checkpoints`)
STAGES = ("tune", "search", "extract", "quantize", "export")
RESUMABLE = ("tune", "search")  # the stages with --resume; the others' partials are only ever removed
LONGEST_SUFFIX = ".checkpoints"  # the longest name instatune appends to an output (docs/architecture.md)
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few KB; a larger one is damaged or crafted (read before parsing)


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
        if p.is_file() and p.relative_to(root).as_posix() not in (MANIFEST, MARKER):
            out.append({"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return out


def _fsync_path(p: Path) -> None:
    if os.name == "nt" and p.is_dir():  # Windows cannot open a directory to flush it
        return
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` (and `root`) to disk, so a rename that publishes it can never
    expose a directory whose data a power cut would lose."""
    for p in sorted(root.rglob("*"), reverse=True):  # children before the directories that name them
        if p.is_file() or p.is_dir():
            _fsync_path(p)
    _fsync_path(root)


# ---- sibling paths: `<out>.partial`, `.lock`, `.old`, `.checkpoints` (docs/architecture.md, "Faults and resume")

def lexists(p: Path) -> bool:
    """Whether anything (a dangling link included) sits at `p`; never follows a link."""
    try:
        os.lstat(p)
    except FileNotFoundError:
        return False
    return True


def refuse_link(p: Path, what: str) -> None:
    """Instatune never writes, removes or resumes through a symbolic link where it keeps its own files."""
    if p.is_symlink():
        raise InstatuneError(f"{p} is a symbolic link where instatune keeps {what}; instatune never writes through "
                             "a link: remove the link (its target is untouched) and rerun")


def own_kind(p: Path) -> str | None:
    """What a directory instatune made beside an output is (its `.instatune` marker), or None."""
    try:
        return (p / OWN).read_text().strip() if not p.is_symlink() else None
    except (OSError, UnicodeDecodeError):
        return None


def mark_own(p: Path, kind: str) -> None:
    (p / OWN).write_text(kind)


def check_own_dir(p: Path, kind: str, what: str) -> bool:
    """Whether `p` holds instatune's own `kind` directory (True) or nothing (False); anything else (a link, a
    file, a directory someone else made, an empty one aside) is refused in one line and never touched."""
    if not lexists(p):
        return False
    refuse_link(p, what)
    if p.is_dir() and own_kind(p) == kind:
        return True
    if p.is_dir() and not any(p.iterdir()):
        return False  # an empty directory holds nothing to lose; it is simply reused
    raise InstatuneError(f"{p} is in the way ({what}) and instatune did not make it; move it away and rerun")


def remove_own(p: Path, kind: str) -> None:
    """Remove `p` only if it is instatune's own `kind` directory (or an empty one)."""
    if not lexists(p) or p.is_symlink():
        return
    if p.is_dir() and own_kind(p) == kind:
        shutil.rmtree(p, ignore_errors=True)
    elif p.is_dir() and not any(p.iterdir()):
        p.rmdir()


# ---- faults: disk full, permission denied (docs/architecture.md, "Faults and resume") ---------------------

DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.EROFS: "read-only file system", errno.EFBIG: "file too large"}
_OS_ERROR = re.compile(r"os error (\d+)")  # how safetensors (Rust) reports the errno of a failed write


def disk_errno(e: BaseException) -> int | None:
    """The errno of a write the file system refused (full, quota, permission, read-only), else None."""
    if isinstance(e, OSError):
        return e.errno if e.errno in DISK_ERRNOS else None
    m = _OS_ERROR.search(str(e))
    n = int(m.group(1)) if m else None
    return n if n in DISK_ERRNOS else None


class WriteError(InstatuneError):
    """A write the file system refused, as one line: why, what was being written, where, and what to do."""

    def __init__(self, code: int, what: str, path: str | Path, hint: str = "") -> None:
        self.code, self.what, self.path, self.hint = code, what, str(path), hint
        super().__init__(str(self))

    def __str__(self) -> str:
        what = f" while writing {self.what}" if self.what else ""  # unknown where the CLI converts a stray one
        return (DISK_ERRNOS[self.code] + what + (f" ({self.path})" if self.path else "")
                + (f"; {self.hint}" if self.hint else ""))

    def with_hint(self, hint: str) -> WriteError:
        return self if self.hint else WriteError(self.code, self.what, self.path, hint)


def as_write_error(e: BaseException, what: str, path: str | Path) -> BaseException:
    """`e` as a WriteError naming what and where when the disk refused it; any other error unchanged."""
    code = disk_errno(e)
    if code is None or isinstance(e, InstatuneError):
        return e
    return WriteError(code, what, getattr(e, "filename", None) or path)


@contextlib.contextmanager
def writing(what: str, path: str | Path) -> Iterator[None]:
    """Turn a refused write inside the block into a WriteError naming `what` and `path`."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only disk errors are converted; the rest is re-raised as is
        err = as_write_error(e, what, path)
        if err is e:
            raise
        raise err from None


class Heartbeat:
    """Plain progress lines on stderr at a steady interval, for logs, `nohup` and CI where a live progress bar
    shows nothing until it ends; `every=None` is silent, `every=0` prints at every tick."""

    def __init__(self, every: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.every, self.clock = every, clock
        self.last = clock()

    @property
    def enabled(self) -> bool:
        return self.every is not None

    def tick(self, line: Callable[[], str]) -> bool:
        """Print `line()` if the interval has passed since the last line; returns whether it printed."""
        if self.every is None or self.clock() - self.last < self.every:
            return False
        self.last = self.clock()
        print(line(), file=sys.stderr, flush=True)
        return True


def fmt_seconds(s: float) -> str:
    """12s, 3m05s, 2h07m: an ETA for a log line."""
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def stage_options(cls: type[Opts], opts: Opts | None, fields: dict[str, Any]) -> Opts:
    """A stage's options object: `opts` as given, or one made from its `fields` by keyword (the shape callers
    used before stages took one object; docs/architecture.md, "Options and stages"), never both."""
    if opts is not None and fields:
        raise TypeError(f"give a {cls.__name__} or its fields by keyword, not both ({', '.join(sorted(fields))})")
    return cls(**fields) if opts is None else opts


@dataclass
class Artifact:
    """A loaded, validated stage directory."""

    path: Path
    manifest: dict[str, Any]
    _digest: str | None = field(default=None, repr=False, compare=False)
    # (size, mtime_ns, inode) of the manifest and every listed file when loaded: what `check_unchanged` compares
    _stamps: dict[str, tuple[int, int, int]] = field(default_factory=dict, repr=False, compare=False)

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
        """The digest of the manifest as it was read (`load`), not as it is now: a child records the parent it
        actually read (docs/architecture.md, "Faults and resume")."""
        if self._digest is None:
            self._digest = digest(self.path)
        return self._digest

    def check_unchanged(self, stage: str, rerun: str = "") -> None:
        """Refuse (one line) when this artifact changed since it was loaded, e.g. re-made by `tune --force` while a
        `search` of it ran. File metadata only (size, mtime_ns, inode); a file whose metadata moved is hashed
        to tell a `touch` from a change, so a clean run never rehashes weights."""
        listed = {f["path"]: f["sha256"] for f in self.manifest.get("files", [])}
        for rel, stamp in self._stamps.items():
            p = self.path / rel
            try:
                now = _stamp(p)
            except OSError:
                now = None
            if now == stamp:
                continue
            if now is not None and (("sha256:" + sha256_file(p)) == self.digest if rel == MANIFEST
                                    else sha256_file(p) == listed.get(rel)):
                continue
            raise InstatuneError(f"{self.path} changed while this {stage} read it ({rel} was replaced or modified), "
                                 f"so its result would not match the parent it records; nothing was published: rerun "
                                 f"the {stage} stage{rerun}")

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


@dataclass(frozen=True)
class StageResult:
    """What a stage returns (docs/architecture.md, "Options and stages"): the directory it committed, with the
    manifest's `path`, `model` and `metrics` at hand; each stage's subclass names, typed, the figures its command
    prints. A launched stage returns `artifact=None` on every rank but rank 0, which alone writes."""

    artifact: Artifact | None

    @classmethod
    def of(cls: type[R], art: Artifact, **given: Any) -> R:
        """The result of the committed `art`: each field not `given` is the manifest metric of its name (None when
        the stage did not record it, e.g. export's `int8` without --int8)."""
        names = [f.name for f in fields_of(cls) if f.name != "artifact" and f.name not in given]
        return cls(art, **given, **{n: art.metrics.get(n) for n in names})

    @property
    def path(self) -> Path:
        return self._committed.path

    @property
    def model(self) -> dict[str, Any]:
        return self._committed.model

    @property
    def metrics(self) -> dict[str, Any]:
        return self._committed.metrics

    @property
    def _committed(self) -> Artifact:
        if self.artifact is None:
            raise AttributeError("this process wrote no artifact (a launched stage's rank other than 0)")
        return self.artifact


def load(path: str | Path, expect_stage: str | Iterable[str] | None = None, verify: bool = True) -> Artifact:
    """Read and validate a stage directory; every failure is a one-line InstatuneError naming the path."""
    p = Path(path)
    mpath = p / MANIFEST
    if not p.is_dir():
        raise InstatuneError(f"{p} is not a directory; give an instatune stage directory")
    if not mpath.is_file():
        raise InstatuneError(f"{p} has no {MANIFEST}; it is not an instatune stage directory")
    stamps = {MANIFEST: _stamp(mpath)}
    if stamps[MANIFEST][0] > MAX_MANIFEST_BYTES:
        raise InstatuneError(f"{mpath} is {stamps[MANIFEST][0]:,} bytes, far more than an instatune manifest (a few "
                             "KB); it is damaged or not from instatune")
    raw = mpath.read_bytes()  # hashed and parsed from the same bytes: the digest is of what was read
    try:
        m = json.loads(raw.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InstatuneError(f"{mpath} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(m, dict) or m.get("schema") != SCHEMA:
        schema = m.get("schema") if isinstance(m, dict) else None
        raise InstatuneError(f"{mpath} is not an instatune manifest (schema {schema!r})")
    _check_version(m, mpath)
    _check_fields(m, mpath)
    if expect_stage is not None:
        allowed = (expect_stage,) if isinstance(expect_stage, str) else tuple(expect_stage)
        if m.get("stage") not in allowed:
            raise InstatuneError(
                f"{p} is a {m.get('stage')!r} directory but a {' or '.join(allowed)} directory is needed here"
            )
    _check_unlisted(p, m)  # a directory walk, cheap: also where the contents are not hashed (verify=False)
    for f in m.get("files", []):
        fp = p / f["path"]
        if not fp.is_file() or fp.is_symlink():
            if verify:
                raise InstatuneError(f"{p} is incomplete: {f['path']} is missing")
            continue
        stamps[f["path"]] = _stamp(fp)
        if verify and (fp.stat().st_size != f["bytes"] or sha256_file(fp) != f["sha256"]):
            raise InstatuneError(f"{fp} does not match its manifest digest; the artifact was modified")
    return Artifact(p, m, "sha256:" + hashlib.sha256(raw).hexdigest(), stamps)


def _check_unlisted(p: Path, m: dict[str, Any]) -> None:
    """Every file in an artifact is one its manifest lists (and so is verified): a stage never reads a planted
    file (a tokenizer's added_tokens.json, a second weights file) nor follows a link inside it."""
    listed = {f["path"] for f in m.get("files", [])} | {MANIFEST, MARKER, OWN}
    for root, dirs, files in os.walk(p):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = Path(root, name).relative_to(p).as_posix()
            if rel not in listed or os.path.islink(os.path.join(root, name)):
                raise InstatuneError(f"{p} holds {rel}, which its manifest does not list (or a link); a stage reads "
                                     "only what the manifest verifies: move it out, or re-run the "
                                     f"{m.get('stage', 'stage')} stage")


def _inside(rel: Any) -> bool:
    """A path a manifest names stays inside its artifact: relative, no `..`, no backslash or NUL."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel or rel.startswith("/"):
        return False
    parts = rel.split("/")
    return all(x not in ("", ".", "..") for x in parts) and not Path(rel).is_absolute()


def _stamp(p: Path) -> tuple[int, int, int]:
    st = p.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _check_version(m: dict[str, Any], mpath: Path) -> None:
    """Older artifacts are remade by re-running their stage, newer ones need a newer instatune: say which."""
    v, made = m.get("schema_version"), m.get("instatune_version") or "?"
    stage = m.get("stage") if m.get("stage") in STAGES else "stage that made it"
    if not isinstance(v, int) or isinstance(v, bool):
        raise InstatuneError(f"{mpath} has no valid schema_version ({v!r}); it is damaged: re-run the {stage} stage")
    if v < min(SUPPORTED_VERSIONS):
        raise InstatuneError(f"{mpath} was made by instatune {made} (schema version {v}), which instatune "
                             f"{__version__} no longer reads; re-run the {stage} stage to remake it")
    if v not in SUPPORTED_VERSIONS:
        raise InstatuneError(f"{mpath} was made by instatune {made} (schema version {v}); instatune {__version__} "
                             f"reads schema version {', '.join(map(str, SUPPORTED_VERSIONS))}: upgrade instatune")


def _check_fields(m: dict[str, Any], mpath: Path) -> None:
    """Every field a reader indexes has the right shape, so a damaged manifest is one line, not a KeyError."""
    stage = m.get("stage")
    if stage not in STAGES:
        raise InstatuneError(f"{mpath} names no known stage ({stage!r}); it is damaged or not from instatune")

    def bad(key: str) -> InstatuneError:
        return InstatuneError(f"{mpath} has a malformed {key!r} entry; the manifest is damaged: re-run the {stage} "
                              "stage")

    for key, typ in (("options", dict), ("model", dict), ("metrics", dict), ("files", list)):
        if key in m and not isinstance(m[key], typ):
            raise bad(key)
    for f in m.get("files", []):
        if not (isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("bytes"), int)
                and isinstance(f.get("sha256"), str)):
            raise bad("files")
        if not _inside(f["path"]):
            raise InstatuneError(f"{mpath} lists {_shown(f['path'])!r}, a path outside the artifact; the manifest is "
                                 f"damaged or crafted: re-run the {stage} stage")
    model_dir = m.get("model", {}).get("model_dir")
    if model_dir is not None and not _inside(model_dir):
        raise bad("model_dir")
    par = m.get("parent")
    if par is not None and not (isinstance(par, dict) and isinstance(par.get("path"), str)):
        raise bad("parent")


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class OutputLock:
    """An exclusive OS lock on `<out>.lock` for the life of a stage, so two processes never write (or
    `--force`-delete, or `--resume` into) the same output.

    `fcntl.flock` is released by the OS when its holder dies, so a lock can never outlive its process; the file
    names the holder (pid, host, stage, start) for the one-line refusal a second writer gets, and is removed
    on release (only if it is still the file this process locked). A lock file that is present but not locked
    was left by a process that died: it is taken over and `notice` says so; one written on another host is
    refused instead (its holder may be alive there). A `<out>.lock` that is not an instatune lock (a project's
    `uv.lock`, any other file) or that is a link is refused and never opened for writing (O_NOFOLLOW). Where
    `fcntl` does not exist (Windows) locking is skipped.
    """

    def __init__(self, out: Path, stage: str) -> None:
        self.path = out.with_name(out.name + ".lock")
        self.out, self.stage = out, stage
        self.fd: int | None = None
        self.notice: str | None = None

    def holder_error(self, fd: int) -> InstatuneError:
        h = _read_holder(fd)
        who = (f"instatune {_shown(h.get('stage'))} (pid {_shown(h.get('pid'))} on {_shown(h.get('host'))}, since "
               f"{_shown(h.get('since'))})") if h else "instatune process"
        return InstatuneError(f"{self.out} is being written by another {who}; wait for it to finish or choose "
                              "another --output")

    def foreign_error(self) -> InstatuneError:
        return InstatuneError(f"{self.path} is in the way (instatune's lock for {self.out}) and is not an instatune "
                              "lock; move it away or choose another --output")

    def _open(self, flags: int) -> int:
        """Open the lock file without following a link or blocking on a FIFO; refuse anything but a file."""
        refuse_link(self.path, f"the lock of {self.out}")
        try:
            fd = os.open(self.path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0), 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                refuse_link(self.path, f"the lock of {self.out}")
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self.foreign_error()
        return fd

    def probe(self) -> None:
        """Raise the holder's one-line error if a live process holds the lock, or refuse a lock path instatune
        cannot use (a link, someone's file); change nothing."""
        try:
            import fcntl
        except ImportError:
            return
        if not lexists(self.path):
            return
        try:
            fd = self._open(os.O_RDONLY)
        except FileNotFoundError:
            return
        except OSError:
            return  # unreadable here: acquire() says why
        try:
            if _read_holder(fd, raw=True) is None:
                raise self.foreign_error()
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
                fd = self._open(os.O_RDWR | os.O_CREAT)
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
                same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = _read_holder(fd, raw=True)
        host = socket.gethostname()
        if old is None or (old and str(old.get("host", host)) != host):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            if old is None:
                raise self.foreign_error()
            raise InstatuneError(
                f"{self.path} names instatune {_shown(old.get('stage'))} pid {_shown(old.get('pid'))} on host "
                f"{_shown(old.get('host'))}, which instatune cannot check from {host}: if it is no longer running "
                f"there, delete {self.path} and rerun")
        if old:
            self.notice = f"took over {self.path}, left by {_shown(old.get('stage'))} pid {_shown(old.get('pid'))}"
            self.notice += (", which is no longer running" if not _pid_alive(old.get("pid")) else
                            ", which no longer holds it (that pid is now another process)")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": host, "stage": self.stage,
                                 "since": _utc_now()}).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        try:  # while still holding it, so nobody locks a file that is about to vanish; never someone else's file
            if os.lstat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _read_holder(fd: int, raw: bool = False) -> dict[str, Any] | None:
    """The holder a lock file names ({} when empty or unreadable). With `raw`, None when the file holds
    something else than an instatune lock (someone's file of that name)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode()
    except (OSError, UnicodeDecodeError):
        return None if raw else {}
    if not text.strip():
        return {}  # an instatune process that died between creating and writing it, or ours just created
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and {"pid", "stage"} <= set(data):
        return data
    return None if raw else {}


def _shown(v: Any, limit: int = 60) -> str:
    """A value read from a lock file, safe for a terminal: escape sequences and newlines escaped, bounded."""
    text = "?" if v is None else str(v)
    text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, TypeError, OverflowError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def check_output(out: str | Path, force: bool, stage: str | None = None, resume: bool = False,
                 inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse an output a stage must not write or replace; returns it as a Path.

    `--force` replaces only what instatune made: an existing directory whose manifest says it is an instatune
    stage output, or an empty directory. Anything else (a data folder, a home directory, a file) is refused
    with one line, and so is an output that is the current directory or one of its parents (`-o .`), one that
    is, holds or lies inside one of the stage's `inputs`, and one whose sibling paths (`.lock`, `.partial`,
    `.old`) hold something instatune did not make. With `stage`, the `.partial` rules are checked too.
    """
    p = _named_output(out)
    check_not_input(p, inputs)
    OutputLock(p, "").probe()
    _check_replaceable(p, force)
    if force and p.is_dir():
        check_own_dir(p.with_name(p.name + ".old"), "old", f"the previous {p} while it is replaced")
    tmp = p.with_name(p.name + ".partial")
    if stage is not None and lexists(tmp):
        check_existing_partial(tmp, stage, resume, force)
    return p


def check_not_input(out: Path, inputs: Iterable[str | Path | None]) -> None:
    """A stage never writes over what it reads: refuse an output that is an input, holds one or lies inside one
    (`extract run-search -o run-search --force` would delete the search and record itself as its parent)."""
    o = Path(out).expanduser().resolve()
    for i in inputs:
        if i is None or not lexists(Path(i).expanduser()):
            continue  # a hub id, an option left out
        r = Path(i).expanduser().resolve()
        how = ("is" if o == r else "holds" if r.is_relative_to(o) else "is inside" if o.is_relative_to(r) else "")
        if how:
            raise InstatuneError(f"--output {out} {how} the input {i}; a stage never writes over what it reads: "
                                 "choose an --output outside it")


def lineage(art: Artifact | None, depth: int = 8) -> list[Path]:
    """An artifact and the ancestors its manifest names (paths only, nothing loaded): everything a child reads."""
    out: list[Path] = []
    while art is not None and len(out) < depth:
        out.append(art.path)
        par = art.manifest.get("parent")
        if not isinstance(par, dict) or not isinstance(par.get("path"), str):
            break
        ppath = (art.path / par["path"]).resolve()
        try:
            art = Artifact(ppath, json.loads((ppath / MANIFEST).read_text()))
        except (OSError, ValueError):
            out.append(ppath)
            break
    return out


def _check_replaceable(p: Path, force: bool) -> Path:
    if not lexists(p):
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
    try:
        limit = os.pathconf(p.parent if p.parent.is_dir() else ".", "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    if len(os.fsencode(p.name)) + len(LONGEST_SUFFIX) > limit:
        raise InstatuneError(f"--output name {p.name[:40]}... is too long ({len(os.fsencode(p.name))} bytes): "
                             f"instatune adds {LONGEST_SUFFIX} beside it and the file system allows {limit}; give a "
                             f"name of at most {limit - len(LONGEST_SUFFIX)} bytes")
    return p


def _marker_stage(tmp: Path) -> str:
    try:
        return _shown((tmp / MARKER).read_text(errors="replace").strip(), 20)
    except OSError:
        return "?"


def check_existing_partial(tmp: Path, stage: str, resume: bool, force: bool) -> None:
    """What an existing `<out>.partial` allows: `--resume` continues a `stage` partial, `--force` removes one
    instatune made (its `.stage` marker); a directory without the marker, or a link, is someone's and is never
    touched. A partial that an interrupted extract, quantize or export left (no `--resume` there) is removed
    by the next run of that stage (`StageWriter.open` says so)."""
    refuse_link(tmp, "an unfinished stage")
    marker = tmp / MARKER
    if not marker.is_file():
        if resume:
            raise InstatuneError(f"{tmp} is not an unfinished instatune stage (no .stage marker), so there is "
                                 "nothing to resume; move it away or choose another --output")
        if not force:
            raise InstatuneError(f"{tmp} is in the way and is not an unfinished instatune stage (no .stage marker); "
                                 "move it away or choose another --output")
        check_partial(tmp)
    held = _marker_stage(tmp)
    if resume and held != stage:
        raise InstatuneError(f"{tmp} holds a {held!r} run, not {stage!r}; cannot resume it")
    if resume or force or (held == stage and stage not in RESUMABLE):
        return
    if held != stage:
        raise InstatuneError(f"{tmp} holds an unfinished {held} run (not {stage}); pass --force to remove it or "
                             "choose another --output")
    raise InstatuneError(f"an unfinished {stage} run is in {tmp}; pass --resume to continue it or --force to "
                         "start over")


def check_partial(tmp: Path) -> None:
    """`--force` removes a `<out>.partial` directory only if a stage made it (its `.stage` marker)."""
    refuse_link(tmp, "an unfinished stage")
    if not (tmp / MARKER).is_file():
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
    stage can continue) unless `cleanup_on_error` is set. A write the file system refuses (disk full, quota,
    permission, read-only) inside the block or `faults()` becomes one `WriteError` line that says what was
    being written, where, and what was kept (docs/architecture.md, "Faults and resume").
    """

    out: Path
    stage: str
    options: dict[str, Any]
    parent: Artifact | None = None
    force: bool = False
    resume: bool = False
    cleanup_on_error: bool = True
    manifest: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[Any, ...] = ()  # paths the stage reads besides the parent's lineage: never its output
    reads: tuple[Artifact, ...] = ()  # artifacts read besides the parent, checked unchanged at commit
    # a resumable stage's test of whether its partial holds work worth resuming: a partial this run made that
    # holds none when the stage fails (a bad teacher, Ctrl-C before the first checkpoint) is removed, so the next
    # run does not call it unfinished
    keep_if: Callable[[Path], bool] | None = None
    _complete: bool = field(default=False, init=False)  # a finished result that could not be moved: keep it
    _fresh: bool = field(default=False, init=False)  # this run created the partial (not resumed)

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
        try:
            if exc_type is not None and self.cleanup_on_error and self.tmp.exists() and not self._complete:
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            self.release()
        if interrupt_of(exc) is not None:
            raise self.interrupted(interrupt_of(exc)) from None
        if exc is not None:
            err = self.fault(exc)
            if err is not exc:
                raise err from None

    def release(self) -> None:
        """Give up the output's lock (done by `commit` and on leaving the `with` block; idempotent)."""
        self.lock.release()

    # ---- faults -----------------------------------------------------------------------------------------
    def fault(self, e: BaseException, what: str | None = None) -> BaseException:
        """`e` as a one-line WriteError with the next step when the file system refused a write; else `e`."""
        err = e if isinstance(e, WriteError) else as_write_error(e, what or f"the {self.stage} output", self.tmp)
        return err.with_hint(self._next_step(err.code)) if isinstance(err, WriteError) else e

    @contextlib.contextmanager
    def faults(self, what: str | None = None) -> Iterator[None]:
        """Convert a refused write in the block (`fault`); other errors pass unchanged."""
        try:
            yield
        except BaseException as e:  # noqa: BLE001 - re-raised unless it is a refused write or an interrupt
            self._drop_unstarted()
            if interrupt_of(e) is not None:
                raise self.interrupted(interrupt_of(e)) from None
            err = self.fault(e, what) if isinstance(e, Exception) else e
            if err is e:
                raise
            raise err from None

    def _drop_unstarted(self) -> None:
        """Remove a partial this run made that holds nothing worth resuming (`keep_if`)."""
        if (self.keep_if is not None and self._fresh and not self._complete and lexists(self.tmp)
                and not self.tmp.is_symlink() and not self.keep_if(self.tmp)):
            shutil.rmtree(self.tmp, ignore_errors=True)

    def interrupted(self, e: BaseException) -> Interrupted:
        """Ctrl-C or SIGTERM as one true line: where the resumable work is, or that nothing was written."""
        term = isinstance(e, Terminated) or getattr(e, "exit_code", None) == 143
        why, code = ("terminated (SIGTERM)", 143) if term else ("interrupted", 130)
        if lexists(self.tmp) and not self.cleanup_on_error and not self._complete:
            return Interrupted(f"{why}; the unfinished {self.stage} is kept in {self.tmp}: rerun the same command "
                               "with --resume to continue it", code)
        if lexists(self.tmp) and self._complete:
            return Interrupted(f"{why}; the finished {self.stage} is kept in {self.tmp}: {self._retry()}", code)
        return Interrupted(f"{why}; nothing was written to {self.out}", code)

    def _next_step(self, code: int) -> str:
        fix = "free some space" if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "make it writable"
        if self.tmp.exists() and (self._complete or not self.cleanup_on_error):
            state = "finished" if self._complete else "unfinished"
            return f"the {state} {self.stage} is kept in {self.tmp}: {fix}, then {self._retry()}"
        return f"nothing was written to {self.out}: {fix}, then rerun"

    def _retry(self) -> str:
        return "rerun with --resume" if not self.cleanup_on_error else f"move it to {self.out} or rerun with --force"

    # ---- open ---------------------------------------------------------------------------------------------
    def open(self) -> Path:
        """Check the output, take its lock (held until `commit` or `release`), create or reopen the partial."""
        check_output(self.out, self.force, inputs=(*self.inputs, *lineage(self.parent)))
        if self.force and self.out.exists():
            self._old(clear=False)  # refuse now, not after the whole stage ran
        self.lock.acquire()
        if self.lock.notice:
            print(f"notice: {self.lock.notice}", file=sys.stderr)
        try:
            with self.faults(f"the {self.stage} work directory"):
                return self._open_partial()
        except BaseException:
            if self.cleanup_on_error and self._fresh:  # Ctrl-C before `__enter__` returned: __exit__ never runs
                shutil.rmtree(self.tmp, ignore_errors=True)
            self.release()
            raise

    def _open_partial(self) -> Path:
        if lexists(self.tmp):
            check_existing_partial(self.tmp, self.stage, self.resume, self.force)
            if self.resume:
                return self.tmp
            if not self.force:  # check_existing_partial let it pass: an interrupted run of this stage left it
                print(f"notice: removed {self.tmp}, left by an interrupted {self.stage}", file=sys.stderr)
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self._fresh = True
        (self.tmp / MARKER).write_text(self.stage)
        return self.tmp

    @contextlib.contextmanager
    def scratch(self, prefix: str) -> Iterator[Path]:
        """A temporary directory inside `<out>.partial`, removed on leaving the block: a kill leaves it only in
        the partial, which the next run of the stage removes (never a stray directory beside the output)."""
        with tempfile.TemporaryDirectory(prefix=prefix, dir=self.tmp) as td:
            yield Path(td)

    @property
    def path(self) -> Path:
        return self.tmp

    # ---- commit -------------------------------------------------------------------------------------------
    def commit(self, model: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None) -> Artifact:
        """Write the manifest, flush the directory to disk, move it into place (replacing the old one only with
        force). The `.stage` marker stays until the rename, so an interrupted commit is still a partial that
        `--resume` continues and `--force` may remove."""
        for art in (self.parent, *self.reads):
            if art is not None:
                # before anything is published (issue 19, class 3); a kept partial was measured on the old parent
                art.check_unchanged(self.stage, "" if self.cleanup_on_error else " with --force")
        m = self._manifest(model, metrics, extra)
        with self.faults("the manifest"):
            m["files"] = _file_list(self.tmp)
            (self.tmp / MANIFEST).write_text(json.dumps(m, indent=2) + "\n")
            fsync_tree(self.tmp)
        self._complete = True
        with self.faults(f"{self.out} (moving the finished directory into place)"):
            self._publish()
        self.release()
        return Artifact(self.out, m)

    def _manifest(self, model: dict[str, Any] | None, metrics: dict[str, Any] | None,
                  extra: dict[str, Any] | None) -> dict[str, Any]:
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
        return m

    def _publish(self) -> None:
        """Rename the partial into place. With force the previous output moves to `<out>.old` first and is put
        back if the rename fails, so it is never left only under that name (else the error says where it is)."""
        if lexists(self.out):
            _check_replaceable(self.out, True)  # it may have changed since open()
            old = self._old()
            mark_own(self.out, "old")  # so a `<out>.old` a crash leaves is known as instatune's (a user's is not)
            os.replace(self.out, old)
            try:
                os.replace(self.tmp, self.out)
            except OSError as e:
                raise self._restore(old, e) from None
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        (self.out / MARKER).unlink(missing_ok=True)
        _fsync_path(self.out.parent)

    def _old(self, clear: bool = True) -> Path:
        """`<out>.old`, cleared first (with `clear`) only if instatune left it there (its `.instatune` marker says
        "old"): never someone's backup, not even a copy of an instatune output."""
        old = self.out.with_name(self.out.name + ".old")
        if check_own_dir(old, "old", f"the previous {self.out} while it is replaced") and clear:
            shutil.rmtree(old)
        elif clear and lexists(old):
            old.rmdir()  # empty
        return old

    def _restore(self, old: Path, e: OSError) -> InstatuneError:
        why = e.strerror or str(e)
        try:
            os.replace(old, self.out)
            (self.out / OWN).unlink(missing_ok=True)
        except OSError:
            return InstatuneError(f"could not move {self.tmp} to {self.out} ({why}) nor put the previous output back: "
                                  f"the previous output is in {old} and the new result in {self.tmp}; move one of "
                                  f"them to {self.out}")
        return InstatuneError(f"could not move {self.tmp} to {self.out} ({why}); the previous {self.out} is "
                              f"unchanged and the new result is kept in {self.tmp}: {self._retry()}")


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


def readable_files(root: str | Path) -> None:
    """Give the files under `root` the mode the user's umask gives any new file. safetensors writes its files
    0600 (owner only) while everything else beside them gets 0644: a model directory meant to be shared or
    served would otherwise be unreadable for the group and the server's user."""
    mask = os.umask(0)
    os.umask(mask)
    want = 0o666 & ~mask
    for p in Path(root).rglob("*"):
        if p.is_file() and not p.is_symlink() and (p.stat().st_mode & 0o777) == 0o600 and want != 0o600:
            p.chmod(want)
