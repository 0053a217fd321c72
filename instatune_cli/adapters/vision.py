"""What every image family's adapter shares (`ImageFamily`, mixed in before `FamilyAdapter`); not a family itself
(`adapters/__init__.py` skips it). The image data and preprocessing it uses are `instatune_cli/images.py`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from instatune_cli import data as D
from instatune_cli.images import ImageEncoded, encode_images, image_eval_batches, load_image_task

if TYPE_CHECKING:
    import torch


class ImageFamily:
    """What every image family's adapter shares (mixed in before `FamilyAdapter`): `pixel_values` input, image
    folders as data, this module's encoding and batches, and a sequence length fixed by the model."""

    modality = "image"
    inputs: tuple[str, ...] = ("pixel_values",)
    # capabilities (adapters/base.py): no hidden states, tokenizer, vocabulary, inc engine or joint search
    hidden_states = False
    separate_preprocessor = False
    quant_engines: tuple[str, ...] = ("ort",)
    vocab_trim = False
    quant_search = False

    def max_sequence_length(self, config: Any) -> int:
        return 0  # the model fixes its input size: the exported graph has no sequence axis

    def optimize_onnx(self, onnx_path: Path) -> dict[str, Any] | None:
        return {"applied": False, "reason": "the fusion rewrites are written for the text encoders' graphs"}

    def load_data(self, cfg: Any) -> D.TaskData:
        return load_image_task(cfg, getattr(cfg, "model", "the model"))

    def max_length(self, requested: int, preprocessor: Any, config: Any, dims: Any) -> int:
        return int(dims.image_tokens)

    def encode(self, preprocessor: Any, split: D.Split, max_length: int, train: bool = False) -> ImageEncoded:
        return encode_images(split, preprocessor, train)

    def eval_batches(self, encoded: ImageEncoded, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
        return image_eval_batches(encoded, batch_size)
