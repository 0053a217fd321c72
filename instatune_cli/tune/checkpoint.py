"""Checkpoints of a tune run: model and optimizer tensors as safetensors, the `TrainerState` and everything
else (scheduler, optimizer hyper-parameters, Python RNG) as JSON, torch RNG states as uint8 safetensors. Nothing
is pickled. Written to a `.tmp` sibling, flushed and renamed, only the latest kept; parked beside the output
during the commit (loop.py's module docstring, docs/architecture.md "Faults and resume")."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

from instatune_cli.artifacts import check_own_dir, fsync_tree, mark_own, writing
from instatune_cli.tune.state import STATE_FORMAT, TrainerState

CKPT_DIR = "checkpoints"
PARKED = ".checkpoints"  # suffix of the sibling `<output>.checkpoints/` holding them during the commit
PARKED_KIND = "checkpoints"  # its `.instatune` marker: only a directory so marked is ever emptied or removed
STATE_FILE = "state.json"


def parked_dir(partial: Path) -> Path:
    """`<output>.checkpoints`: where the commit keeps the checkpoints until the run directory is in place."""
    return partial.with_name(partial.name.removesuffix(".partial") + PARKED)


def unpark_checkpoints(partial: Path, fingerprint: str, resume: bool) -> None:
    """Bring back checkpoints an interrupted commit parked: those of this run when resuming, none otherwise."""
    aside, live = parked_dir(partial), partial / CKPT_DIR
    if not check_own_dir(aside, PARKED_KIND, "the checkpoints of a commit"):
        return
    if resume:
        live.mkdir(exist_ok=True)
        for d in sorted(aside.iterdir()):
            if not (live / d.name).exists() and _checkpoint_fingerprint(d) == fingerprint:
                os.replace(d, live / d.name)
    shutil.rmtree(aside)


def park_checkpoints(partial: Path) -> None:
    """Move the checkpoints out of the directory the manifest describes, but keep them until it is in place:
    a kill or a full disk during the commit then resumes from the last one, not from step 0."""
    live, aside = partial / CKPT_DIR, parked_dir(partial)
    if live.is_dir():
        if check_own_dir(aside, PARKED_KIND, "the checkpoints of a commit"):
            shutil.rmtree(aside)
        mark_own(live, PARKED_KIND)  # before the move: a parked directory is never without its marker
        os.replace(live, aside)


def worth_resuming(partial: Path) -> bool:
    """Whether a tune partial holds work `--resume` would use: a checkpoint, the teacher's logits cache, or
    checkpoints a commit parked. One without (a failed start, Ctrl-C before the first checkpoint) is removed."""
    return (latest_checkpoint(partial) is not None or (partial / "teacher_logits.safetensors").is_file()
            or parked_dir(partial).is_dir())


def _checkpoint_fingerprint(d: Path) -> str | None:
    try:
        return json.loads((d / STATE_FILE).read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None


def latest_checkpoint(partial: Path) -> Path | None:
    d = partial / CKPT_DIR
    if not d.is_dir():
        return None
    done = sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and not p.name.endswith(".tmp") and (p / STATE_FILE).is_file())
    return done[-1] if done else None


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory (`step-NNNNNN`) holds."""
    return int(path.name.split("-")[1])


def clear_torn(partial: Path) -> None:
    """Remove the `.tmp` checkpoints a kill left half written."""
    if (partial / CKPT_DIR).is_dir():
        for p in (partial / CKPT_DIR).glob("*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(partial: Path, model: Any, optimizer: Any, scheduler: Any, state: TrainerState,
                    scaler: Any = None) -> Path:
    """`<partial>/checkpoints/step-NNNNNN` for `state.step`, replacing the previous one once it is on disk."""
    d = partial / CKPT_DIR
    final = d / f"step-{state.step:06d}"
    tmp = d / f"step-{state.step:06d}.tmp"
    try:
        with writing(f"the checkpoint of step {state.step}", tmp):
            d.mkdir(exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            _write_checkpoint(tmp, model, optimizer, scheduler, state, scaler)
            fsync_tree(tmp)  # on disk before it replaces the previous checkpoint
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a torn checkpoint only takes the space the next one needs
        raise
    for old in d.iterdir():
        if old != final and old.name.startswith("step-"):
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(tmp: Path, model: Any, optimizer: Any, scheduler: Any, state: TrainerState,
                      scaler: Any) -> None:
    import torch
    from safetensors.torch import save_file, save_model

    save_model(model, str(tmp / "model.safetensors"))
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    pyrng = random.getstate()
    full = {
        "format": STATE_FORMAT,
        "fingerprint": state.fingerprint,  # top level: read alone by unpark_checkpoints
        "trainer_state": state.to_dict(),
        "optimizer_param_groups": sd["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "python_random": [pyrng[0], list(pyrng[1]), pyrng[2]],
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
    }
    (tmp / STATE_FILE).write_text(json.dumps(full, indent=1, default=_json_default))


def _json_default(x: Any) -> Any:
    if isinstance(x, tuple):
        return list(x)
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"cannot store {type(x).__name__} in a checkpoint")


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any = None) -> TrainerState:
    """Restore model, optimizer, scheduler, grad scaler and RNGs from `path`; returns its `TrainerState`. The
    state is read first, so a checkpoint of an unknown format changes nothing."""
    import torch
    from safetensors.torch import load_file, load_model

    raw = json.loads((path / STATE_FILE).read_text())
    state = TrainerState.from_checkpoint(raw)
    load_model(model, str(path / "model.safetensors"), strict=True)
    tensors = load_file(str(path / "optimizer.safetensors"))
    opt_state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[k] = v
    for pid, d in raw["optimizer_scalars"].items():
        opt_state.setdefault(int(pid), {}).update(d)
    groups = raw["optimizer_param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict(raw["scheduler"])
    if scaler is not None and raw.get("grad_scaler"):
        scaler.load_state_dict(raw["grad_scaler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    pr = raw["python_random"]
    random.setstate((pr[0], tuple(pr[1]), pr[2]))
    return state
