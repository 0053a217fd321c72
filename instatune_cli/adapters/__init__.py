"""Registry of model-family adapters and the model loader every stage uses.

Only this package knows model internals; add a family by writing one adapter file and listing it here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instatune_cli.errors import InstatuneError

if TYPE_CHECKING:
    from instatune_cli.adapters.base import FamilyAdapter


def _adapters() -> list[FamilyAdapter]:
    from instatune_cli.adapters.bert import BertFamilyAdapter, DistilBertAdapter

    return [BertFamilyAdapter(), DistilBertAdapter()]


def supported_model_types() -> list[str]:
    return sorted(t for a in _adapters() for t in a.model_types)


def adapter_for(model_type: str) -> FamilyAdapter:
    for a in _adapters():
        if a.supports(model_type):
            return a
    raise InstatuneError(
        f"model type {model_type!r} is not a supported family; supported: {', '.join(supported_model_types())}"
    )


def adapter_of(model: Any) -> FamilyAdapter:
    return getattr(model, "_instatune_adapter", None) or adapter_for(model.config.model_type)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}


def check_model_source(src: str) -> str:
    """Validate a model argument before heavy loading: a local model directory, or a hub id when online."""
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise InstatuneError(f"{p} is not a model directory (no config.json); give a transformers model directory")
        try:
            mt = json.loads((p / "config.json").read_text()).get("model_type")
        except json.JSONDecodeError:
            raise InstatuneError(f"{p / 'config.json'} is not valid JSON") from None
        adapter_for(str(mt))
        check_weights(p)
        return str(p)
    if src.startswith((".", "/", "~")) or os.sep in src.strip("/") and src.count("/") > 1:
        raise InstatuneError(f"model directory {src} does not exist; give an existing local path or a hub id")
    if offline():
        raise InstatuneError(
            f"{src!r} is not a local directory and the hub is offline (HF_HUB_OFFLINE=1); pass a local model "
            "directory instead, e.g. one written by save_pretrained"
        )
    return src


def check_weights(model_dir: str | Path) -> None:
    """A local model directory has readable weights: its safetensors headers parse and cover their files (a
    truncated or corrupted file is one line naming it, before any stage creates its output)."""
    from safetensors import SafetensorError, safe_open

    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors"))
    if not files and not any(d.glob("*.bin")):
        raise InstatuneError(f"{d} has no weights (model.safetensors); give a directory written by save_pretrained")
    for f in files:
        try:
            with safe_open(str(f), "pt") as h:
                h.keys()
        except (SafetensorError, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InstatuneError(f"{f} is not a readable safetensors file ({first}); it may be truncated or "
                                 "corrupted: copy or save it again") from None


def load_classifier(src: str, num_labels: int | None = None, id2label: dict[int, str] | None = None,
                    eager: bool = False) -> Any:
    """Load a sequence classifier from a local directory or (online) a hub id, with a one-line error otherwise."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    src = check_model_source(src)
    kw: dict[str, Any] = {}
    if id2label is not None:
        kw.update(num_labels=len(id2label), id2label=dict(id2label), label2id={v: k for k, v in id2label.items()})
    elif num_labels is not None:
        kw["num_labels"] = num_labels
    if eager:
        kw["attn_implementation"] = "eager"
    try:
        config = AutoConfig.from_pretrained(src, **{k: v for k, v in kw.items() if k != "attn_implementation"})
        adapter_for(config.model_type)
        model = AutoModelForSequenceClassification.from_pretrained(src, **kw)
    except InstatuneError:
        raise
    except (OSError, RuntimeError, ValueError) as e:  # missing files, shape/label-count mismatches
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        n = kw.get("num_labels")
        what = f" as a {n}-class classifier" if n and not isinstance(e, OSError) else ""
        raise InstatuneError(f"cannot load model {src!r}{what}: {first[:300]}") from None
    return model
