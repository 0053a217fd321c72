"""The optional strong teacher Φ_T: checks, and its logits cached once over the training set.

The teacher is frozen, so its logits for a training example never change. They are computed in one
eval-mode pass (no dropout) over the pre-tokenized training set and stored as `teacher_logits.safetensors`
in the run's partial directory, keyed by the teacher's weights (sha256, not path or mtime) and the tokens; a
resumed run reuses them, and they end up in the finished run. Training then costs no teacher forward at all.

A copy also goes to a shared cache (`$INSTATUNE_CACHE`, default `~/.cache/instatune`, or `$XDG_CACHE_HOME/
instatune`; `INSTATUNE_CACHE=off` turns it off), by the same key and the device type: recovering several cuts
of one run with it as the teacher (`tune EXTRACT --teacher RUN`, one run per cut) pays the teacher pass once,
not once per cut. A shared cache that cannot be written is skipped, never fatal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from instatune_cli import artifacts
from instatune_cli.adapters import check_model_source, family_of
from instatune_cli.artifacts import writing
from instatune_cli.distributed import SINGLE
from instatune_cli.errors import InstatuneError
from instatune_cli.tune.recover import resolve_model_dir  # a run or extract directory stands for its model

CACHE_FILE = "teacher_logits.safetensors"
CACHE_ENV = "INSTATUNE_CACHE"
_GENERIC_LABELS = ("LABEL_",)


def _is_generic(names: list[str]) -> bool:
    return all(n.startswith(_GENERIC_LABELS) or n.lstrip("-").isdigit() for n in names)


def check_teacher(src: str, family: str, labels: list[str], vocab_size: int) -> str:
    """Validate the teacher's config against the student before anything heavy; returns its model dir."""
    path, cfg = teacher_config(src, family, vocab_size)
    check_teacher_labels(src, cfg, labels)
    return path


def teacher_config(src: str, family: str, vocab_size: int, image_size: int = 0) -> tuple[str, dict[str, Any]]:
    """(model dir, config) of a teacher whose weights are readable, family and vocabulary (or image size) the
    student's: what can be checked before the data is loaded."""
    path, _ = resolve_model_dir(src)
    path = check_model_source(path)  # weights present and readable (adapters.check_weights)
    fam = family_of(path)
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():  # a hub id (online); let transformers fetch the config
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(path).to_dict()
        except OSError as e:
            raise InstatuneError(f"cannot load teacher {src!r}: {str(e).strip().splitlines()[0]}") from None
    else:
        cfg = json.loads(cfg_file.read_text())
    if fam.family != family:
        raise InstatuneError(
            f"teacher {src} is a {fam.family} model but the student is {family}; use a teacher of the same family"
        )
    tv = int(cfg.get("vocab_size", 0) or 0)
    if tv and vocab_size and tv != vocab_size:
        raise InstatuneError(
            f"teacher {src} has a vocabulary of {tv} tokens but the student has {vocab_size}; the teacher must "
            "share the student's tokenizer"
        )
    if image_size:  # it scores the student's preprocessed images
        t_size = fam.dims(fam.load_config(path)).image_size
        if t_size != image_size:
            raise InstatuneError(f"teacher {src} takes {t_size} px images but the student takes {image_size} px; "
                                 "use a teacher at the student's image size")
    return path, cfg


def check_teacher_labels(src: str, cfg: dict[str, Any], labels: list[str]) -> None:
    """The teacher's classes are the task's (count, and names when both have real ones)."""
    id2label = cfg.get("id2label") or {}
    t_names = [str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k))] if id2label else []
    t_names = t_names or [str(x) for x in cfg.get("label_names") or []]  # timm's config.json
    n = len(t_names) or int(cfg.get("num_labels", cfg.get("num_classes", 2)))
    if n != len(labels) and 1 in (n, len(labels)):  # one output: a regressor (data.REGRESSION_LABELS)
        what = "a regressor (one output)" if n == 1 else f"a {n}-class classifier"
        task = "a regression task" if len(labels) == 1 else f"a {len(labels)}-class task"
        raise InstatuneError(f"teacher {src} is {what} but this is {task}; use a teacher tuned on this task")
    if n != len(labels):
        raise InstatuneError(
            f"teacher {src} has {n} classes but the task has {len(labels)} ({labels}); use a teacher tuned on this task"
        )
    if t_names and not _is_generic(t_names) and not _is_generic(labels) and t_names != labels:
        raise InstatuneError(
            f"teacher {src} has labels {t_names} but the task has {labels}; use a teacher tuned on this task"
        )


WEIGHT_GLOBS = ("*.safetensors", "*.bin")


def cache_key(teacher_dir: str, data_digest: str, max_length: int) -> str:
    """Identifies the cached logits by content: the teacher's weights (their sha256) and the tokenized data.

    Moving, copying or touching the teacher keeps the cache; changing one byte of its weights invalidates it. A
    tune run's manifest already lists its weights' sha256, so a run teacher costs no hashing.
    """
    import hashlib

    h = hashlib.sha256()
    h.update(json.dumps([data_digest, max_length]).encode())
    p = Path(teacher_dir)
    weights = weight_digests(p) if p.is_dir() else {}
    h.update(json.dumps(weights or {"hub": teacher_dir}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def weight_digests(model_dir: Path) -> dict[str, str]:
    """{weight file name: sha256}: from the enclosing tune run's manifest where it lists the file at its current
    size, else hashed from the bytes."""
    recorded = _manifest_digests(model_dir)
    out = {}
    for f in sorted(x for g in WEIGHT_GLOBS for x in model_dir.glob(g)):
        rec = recorded.get(f.name)
        out[f.name] = rec["sha256"] if rec and rec["bytes"] == f.stat().st_size else artifacts.sha256_file(f)
    return out


def _manifest_digests(model_dir: Path) -> dict[str, dict[str, Any]]:
    """{file name: manifest entry} of `model_dir`'s files when it is the model of an instatune tune run."""
    man = model_dir.parent / "manifest.json"
    try:
        m = json.loads(man.read_text())
        if m.get("stage") != "tune" or m.get("model", {}).get("model_dir", "model") != model_dir.name:
            return {}
        prefix = model_dir.name + "/"
        return {f["path"][len(prefix):]: f for f in m.get("files", [])
                if f["path"].startswith(prefix) and "/" not in f["path"][len(prefix):]}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}


def shared_cache_file(key: str, device: Any) -> Path | None:
    """Where the shared cache keeps these logits (module docstring); None when it is turned off."""
    root = os.environ.get(CACHE_ENV)
    if root is not None and root.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "instatune")
    kind = getattr(device, "type", None) or "cpu"  # another device type's logits differ in the last bits
    return Path(root).expanduser() / "teacher-logits" / f"{key}-{kind}.safetensors"


def teacher_logits(partial: Path, teacher_dir: str, encoded: Any, key: str, batch_size: int = 64,
                   device: Any = None, progress: Any = None, group: Any = None,
                   on_wait: Callable[[], None] | None = None) -> tuple[Any, bool]:
    """(logits [N, C] float32 on CPU, built?) — read from the cache in `partial` when its key matches, else
from the shared cache (then copied into `partial`, for --resume), else built and written to both.

    Building holds a lock beside the shared copy (`_one_builder`): a second run that needs the same logits at the
    same time (a bench's recovery runs of several cuts, launched together) waits for the first, after
    `on_wait` says so, and reads its copy instead of paying the pass again.

    Launched on several processes (`group`, a `distributed.Group`): rank 0 alone reads or writes the cache file
    and broadcasts what it read; when building, the length-sorted batches are dealt round-robin to the ranks,
    each scores its share and the rows are gathered. Each batch holds exactly the examples it holds on one
    process, so the logits are those of a single-process pass, bit for bit on the same hardware."""
    import torch

    group = group or SINGLE
    path = Path(partial) / CACHE_FILE
    shared = shared_cache_file(key, device or torch.device("cpu"))
    found = _cached(group, path, shared, key, len(encoded), teacher_dir)
    if found is not None:
        return found, False
    with _one_builder(shared, group, on_wait):
        found = _cached(group, path, shared, key, len(encoded), teacher_dir)  # built while this run waited
        if found is not None:
            return found, False
        out = _build(teacher_dir, encoded, batch_size, device or torch.device("cpu"), progress, group)
        group.agree(lambda: _write_cache(path, out, key, len(encoded), teacher_dir))
        if shared is not None:
            group.agree(lambda: _share(shared, out, key, len(encoded), teacher_dir))
    return out, True


def _cached(group: Any, path: Path, shared: Path | None, key: str, n: int, teacher_dir: str) -> Any:
    """The logits from the run's own cache, else from the shared one (copied into the run's), else None."""
    import torch

    src = path
    shape = group.agree(lambda: _cached_shape(path, key, n))
    if shape is None and shared is not None:
        src = shared
        shape = group.agree(lambda: _cached_shape(shared, key, n))
    if shape is None:
        return None
    out = _read_cache(src) if group.main else torch.zeros(shape, dtype=torch.float32)
    if group.active:
        moved = out.to(group.device)
        group.broadcast_([moved])
        out = moved.cpu()
    if src is shared:
        group.agree(lambda: _write_cache(path, out, key, n, teacher_dir))
    return out


_LOCK_POLL_S = 2.0  # how often a waiting run asks again (each ask is one short collective under a launcher)


@contextmanager
def _one_builder(shared: Path | None, group: Any, on_wait: Callable[[], None] | None) -> Iterator[None]:
    """Hold an exclusive `fcntl.flock` on `<shared copy>.lock` (in instatune's own cache folder) for the block.

    Rank 0 speaks for its run: it alone opens the lock and tries it without blocking, every `_LOCK_POLL_S`
    seconds, and each answer reaches the other ranks through `group.agree`; so while another run builds, no rank
    sits in one collective for longer than a poll (a blocking wait would hold the other ranks in the next
    collective until the launcher's timeout). The OS releases the lock when its holder dies, so a killed build
    never blocks the next run; the file is left in place (removing it would race a waiter). Skipped with no
    shared cache, one that cannot be written, and where there is no `fcntl`."""
    import time

    fd = _open_lock(shared) if group.main else None
    try:
        waited = False
        while not group.agree(lambda: _try_lock(fd)):
            if not waited and on_wait is not None and group.main:
                on_wait()
            waited = True
            time.sleep(_LOCK_POLL_S)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _open_lock(shared: Path | None) -> int | None:
    """A descriptor on the lock file beside the shared copy, or None (no cache, not writable, no `fcntl`)."""
    try:
        import fcntl  # noqa: F401 - only to know the platform has it
    except ImportError:
        return None
    if shared is None:
        return None
    try:
        shared.parent.mkdir(parents=True, exist_ok=True)
        return os.open(shared.with_name(shared.name + ".lock"),
                       os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError:
        return None


def _try_lock(fd: int | None) -> bool:
    """Take the lock if it is free (True), or say it is held (False); no lock to take counts as taken."""
    if fd is None:
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _build(teacher_dir: str, encoded: Any, batch_size: int, device: Any, progress: Any, group: Any) -> Any:
    """One eval-mode pass of the teacher over the training set, its batches shared out over the ranks."""
    import torch

    fam = family_of(teacher_dir)
    try:
        model = fam.load(teacher_dir)
    except (OSError, ValueError, RuntimeError) as e:
        raise InstatuneError(f"cannot load teacher {teacher_dir}: {str(e).strip().splitlines()[0]}") from None
    model.to(device).eval()
    # images: the teacher scores each training image once, without the training augmentation
    encoded = encoded.as_eval() if hasattr(encoded, "as_eval") else encoded
    lengths = encoded.lengths()
    order = sorted(range(len(encoded)), key=lambda i: lengths[i])
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    mine: list[int] = []
    rows: list[torch.Tensor] = []
    with torch.inference_mode():
        for idx in batches[group.rank :: group.world]:
            rows.append(fam.logits(model, encoded.collate(idx)).float().cpu())
            mine += idx
            if progress is not None:
                progress(len(idx) * group.world)
    classes = rows[0].shape[-1] if rows else int(model.config.num_labels)
    del model
    local = torch.cat(rows) if rows else torch.zeros((0, classes), dtype=torch.float32)
    where = torch.tensor(mine, dtype=torch.long)
    if group.active:  # every rank needs every row: it trains on its shards of all the training set
        logit_parts = [t.cpu() for t in group.gather_rows(local.to(group.device))]
        index_parts = [t.cpu() for t in group.gather_rows(where.view(-1, 1).to(group.device))]
        local, where = torch.cat(logit_parts), torch.cat(index_parts).view(-1)
    out = torch.empty((len(encoded), classes), dtype=torch.float32)
    out[where] = local
    return out


def _share(shared: Path, out: Any, key: str, n: int, teacher_dir: str) -> None:
    """Write the shared copy; a cache that cannot be written (read-only home, full disk) is skipped."""
    try:
        shared.parent.mkdir(parents=True, exist_ok=True)
        _write_cache(shared, out, key, n, teacher_dir)
    except (OSError, InstatuneError):
        pass


def _cached_shape(path: Path, key: str, n: int) -> tuple[int, int] | None:
    """The shape of the cached logits when `path` holds those of this teacher and data, else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key or int(meta.get("n", -1)) != n:
                return None
            shape = tuple(f.get_slice("logits").get_shape())
        return (int(shape[0]), int(shape[1])) if len(shape) == 2 and shape[0] == n else None
    except Exception:  # noqa: BLE001 - a torn or foreign file is simply rebuilt
        return None


def _read_cache(path: Path) -> Any:
    from safetensors.torch import load_file

    return load_file(str(path))["logits"]


def _write_cache(path: Path, out: Any, key: str, n: int, teacher_dir: str) -> None:
    """Write a `.tmp` of this process, then rename: a kill leaves the old cache or none, never a torn one, and
    two runs filling the shared cache at once each rename a whole file."""
    from safetensors.torch import save_file

    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with writing("the teacher logits cache", tmp):
            save_file({"logits": out.contiguous()}, str(tmp), metadata={"key": key, "n": str(n),
                                                                         "teacher": str(teacher_dir)})
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
