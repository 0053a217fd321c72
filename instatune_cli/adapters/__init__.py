"""Registry of model families and the model-source checks every stage uses (docs/architecture.md, "Families").

A family registers itself with `@register_family` on its `FamilyAdapter` subclass. Built-in families are the
modules of this package (found by listing it, not by a list in the code); a third-party family is a module
named by an `instatune.families` entry point, or any module imported before the registry is read (tests
register a toy family from a test file this way).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from instatune_cli.errors import InstatuneError
from instatune_cli.plugins import load_entry_points

if TYPE_CHECKING:
    from instatune_cli.adapters.base import FamilyAdapter

ENTRY_POINT_GROUP = "instatune.families"
_NOT_FAMILIES = {"base", "costs", "elastic", "hf", "standalone", "vision"}  # shared pieces, not families
_REGISTRY: dict[str, FamilyAdapter] = {}
_DISCOVERED = False
A = TypeVar("A", bound=type)


def register_family(cls: A) -> A:
    """Class decorator: make a `FamilyAdapter` subclass a family of instatune (later registrations of the same
    `family` name replace earlier ones, so a plug-in can override a built-in)."""
    _REGISTRY[cls.family] = cls()  # type: ignore[attr-defined]
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for m in pkgutil.iter_modules(__path__):
        if m.name not in _NOT_FAMILIES and not m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{m.name}")
    load_entry_points(ENTRY_POINT_GROUP, "family")


def families() -> list[FamilyAdapter]:
    """Every registered family (built-in, entry points, and any registered in this process)."""
    _discover()
    return list(_REGISTRY.values())


def supported_model_types() -> list[str]:
    return sorted(t for a in families() for t in a.model_types)


def adapter_for(model_type: str) -> FamilyAdapter:
    for a in families():
        if a.supports(model_type):
            return a
    raise InstatuneError(
        f"model type {model_type!r} is not a supported family; supported: {', '.join(supported_model_types())}"
    )


def model_family(model_type: str) -> str:
    """The architecture a model type is (manifest `model.family`, policy architectures): our per-layer classes
    (`instatune_bert`) are their stock type, and a family's `aliases` resolve (XLM-R and CamemBERT are
    RoBERTa); any other type is its own."""
    t = str(model_type).removeprefix("instatune_")
    return next((a.aliases[t] for a in families() if t in a.aliases), t)


def per_layer_dir(model_dir: str | Path) -> bool:
    """Whether any family holds `model_dir` to be its per-layer model (`FamilyAdapter.is_per_layer_dir`)."""
    return any(a.is_per_layer_dir(model_dir) for a in families())


def family_named(name: str) -> FamilyAdapter:
    """The family called `name` (what `ModelDims.family` and manifests record)."""
    fams = {a.family: a for a in families()}
    if name in fams:
        return fams[name]
    return adapter_for(name)


def adapter_of(model: Any) -> FamilyAdapter:
    """The family of a loaded model; our per-layer extracts (`instatune_bert`, ...) belong to their family."""
    fam = getattr(model, "_instatune_adapter", None)
    return fam or adapter_for(str(model.config.model_type).removeprefix("instatune_"))


def _read_config(p: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError:
        raise InstatuneError(f"{p / 'config.json'} is not valid JSON") from None
    if not isinstance(cfg, dict):
        raise InstatuneError(f"{p / 'config.json'} is not a JSON object")
    return cfg


def family_for_source(src: str) -> FamilyAdapter | None:
    """The family that claims a model source: a local directory by its `config.json`, else a name a family
    recognises (e.g. a timm id). None for a name no family claims (a hub id, resolved when loaded)."""
    p = Path(src).expanduser()
    cfg = _read_config(p) if (p / "config.json").is_file() else None
    for a in families():
        if a.claims(str(p) if cfg is not None else src, cfg):
            return a
    if cfg is not None:
        what = cfg.get("model_type") or cfg.get("architecture") or "unknown"
        raise InstatuneError(f"{p} holds a {what!r} model, not a supported family; supported model types: "
                             f"{', '.join(supported_model_types())}")
    return None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}


def check_model_source(src: str) -> str:
    """Validate a model argument before heavy loading: a local model directory of a registered family, a name
    a family recognises (e.g. a timm id), or a hub id when online."""
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise InstatuneError(f"{p} is not a model directory (no config.json); give a model directory "
                                 "(transformers save_pretrained or timm save_for_hf layout)")
        family_for_source(str(p))
        check_weights(p)
        return str(p)
    if src.startswith((".", "/", "~")) or os.sep in src.strip("/") and src.count("/") > 1:
        raise InstatuneError(f"model directory {src} does not exist; give an existing local path or a hub id")
    if family_for_source(src) is not None:
        return src
    if offline():
        raise InstatuneError(
            f"{src!r} is not a local directory and the hub is offline (HF_HUB_OFFLINE=1); pass a local model "
            "directory instead, e.g. one written by save_pretrained"
        )
    return src


def family_of(src: str) -> FamilyAdapter:
    """The family of a checked model source: the one that claims it, else (a hub id no family recognises by
    name) the one of the `model_type` in its hub config."""
    fam = family_for_source(src)
    if fam is not None:
        return fam
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(src).model_type
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InstatuneError(f"cannot load model {src!r}: {first}") from None
    return adapter_for(model_type)


def load_model(src: str, *, id2label: dict[int, str] | None = None, num_labels: int | None = None,
               eager: bool = False) -> Any:
    """Load a classifier of any registered family from a checked source (see `check_model_source`)."""
    src = check_model_source(src)
    return family_of(src).load(src, id2label=id2label, num_labels=num_labels, eager=eager)


def check_weights(model_dir: str | Path) -> None:
    """A local model directory has readable weights: its safetensors headers parse and cover their files (a
    truncated or corrupted file is one line naming it, before any stage creates its output)."""
    from safetensors import SafetensorError, safe_open

    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors"))
    if not files and not any(d.glob("*.bin")):
        raise InstatuneError(f"{d} has no weights (model.safetensors); give a directory written by save_pretrained "
                             "(or timm save_for_hf)")
    for f in files:
        try:
            with safe_open(str(f), "pt") as h:
                h.keys()
        except (SafetensorError, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InstatuneError(f"{f} is not a readable safetensors file ({first}); it may be truncated or "
                                 "corrupted: copy or save it again") from None
    if not files:
        for f in sorted(d.glob("*.bin")):
            check_pickled_weights(f)


def check_pickled_weights(f: Path) -> None:
    """A `pytorch_model.bin` (only read where no safetensors exist) must hold tensors alone: loaded with
    `weights_only=True` (memory-mapped, so only its small pickle is read), else one line instead of the
    unpickler's traceback. Nothing is ever unpickled beyond what `weights_only` allows."""
    import pickle

    import torch

    try:
        try:
            torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            torch.load(str(f), map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        why = "it holds Python objects besides tensors" if isinstance(e, pickle.UnpicklingError) else \
            "it is not a readable PyTorch weights file"
        raise InstatuneError(f"{f}: {why}, which instatune never unpickles; give a directory with "
                             "model.safetensors (save_pretrained(..., safe_serialization=True))") from None


def load_classifier(src: str, num_labels: int | None = None, id2label: dict[int, str] | None = None,
                    eager: bool = False) -> Any:
    """Load a sequence classifier from a local directory or (online) a hub id, with a one-line error otherwise."""
    return load_model(src, id2label=id2label, num_labels=num_labels, eager=eager)
