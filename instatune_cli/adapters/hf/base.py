"""`HFAdapter`: what every transformers family (text encoders in `adapters/bert.py`, `ViTForImageClassification`
in `adapters/hf_vit.py`) shares: loading keywords for the task's classes, the config without weights (ours for a
per-layer directory), and extraction through `hf/extract.py`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from instatune_cli.adapters.base import FamilyAdapter
from instatune_cli.adapters.hf.extract import extract_model, extracted_config, is_per_layer_dir
from instatune_cli.errors import InstatuneError

if TYPE_CHECKING:
    from torch import nn

    from instatune_cli.space import SubNet


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def label_kwargs(id2label: dict[int, str] | None, num_labels: int | None) -> dict[str, Any]:
    """`from_pretrained` keywords for the task's classes (names when known, else just their count)."""
    if id2label is not None:
        return {"num_labels": len(id2label), "id2label": dict(id2label),
                "label2id": {v: k for k, v in id2label.items()}}
    return {"num_labels": num_labels} if num_labels is not None else {}


class HFAdapter(FamilyAdapter):
    """A transformers model family: configs through `AutoConfig`, extraction to the family's stock class (or our
    per-layer class where the family has one: `hf/extract.py`)."""

    def is_per_layer_dir(self, model_dir: str | Path) -> bool:
        return is_per_layer_dir(model_dir)

    def load_config(self, src: str | Path) -> Any:
        from transformers import AutoConfig

        if is_per_layer_dir(src):
            return extracted_config(src)
        try:
            return AutoConfig.from_pretrained(src)
        except (OSError, ValueError) as e:
            raise InstatuneError(f"cannot load model {src!r}: {first_line(e)}") from None

    def extract(self, model: nn.Module, sub: SubNet) -> nn.Module:
        small = extract_model(model, sub)
        small._instatune_adapter = self  # its per-layer model_type is ours, the family stays this one
        return small
