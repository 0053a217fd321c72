"""transformers `ViTForImageClassification` as a model family (docs/architecture.md, "Families").

transformers 5's ViT keeps Q, K, V, the attention output and the MLP as six separate linears
(`vit.layers[i].attention.{q,k,v,o}_proj`, `.mlp.fc1/fc2`) and reshapes by head size, so the default per-layer
hooks of `FamilyAdapter` make it elastic unchanged; this file only says how the family loads, reads images, counts
MACs and params, and saves. Extraction is the transformers families' (`adapters/hf/extract.py`): a sub-network
that keeps every head and one MLP width is a stock `ViTForImageClassification` config (fewer layers, smaller
`intermediate_size`); per-layer shapes are refused in one line (the timm family `vit` extracts those).

Preprocessing: the model directory's Hugging Face image processor (`preprocessor_config.json`: size, mean, std)
becomes an `images.ImagePreprocessor` (resize to the model's size, no crop); saving writes a stock
`ViTImageProcessor` back, so `AutoImageProcessor.from_pretrained(dir)` keeps working on every directory we write.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instatune_cli.adapters import register_family
from instatune_cli.adapters.base import LayerParts
from instatune_cli.adapters.costs import encoder_macs, layer_params
from instatune_cli.adapters.hf.base import HFAdapter, first_line, label_kwargs
from instatune_cli.adapters.hf.extract import write_hf_extracted
from instatune_cli.adapters.vision import ImageFamily
from instatune_cli.artifacts import readable_files
from instatune_cli.errors import InstatuneError
from instatune_cli.images import ImagePreprocessor
from instatune_cli.space import ModelDims, SubNet

if TYPE_CHECKING:
    import torch
    from torch import nn

# Hugging Face image processors' `resample` (PIL codes) -> timm interpolation names
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


@register_family
class HFVitAdapter(ImageFamily, HFAdapter):
    """`ViTForImageClassification` (`model_type: vit` in config.json); everything not image-specific is the
    transformers families' (`HFAdapter`)."""

    family = "hf_vit"
    model_types = ("vit",)

    def dims(self, config: Any) -> ModelDims:
        heads = int(config.num_attention_heads)
        return ModelDims(
            family=self.family, num_layers=int(config.num_hidden_layers), num_heads=heads,
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            hidden=int(config.hidden_size), ffn=int(config.intermediate_size), num_labels=int(config.num_labels),
            image_size=int(config.image_size), patch_size=int(config.patch_size),
            channels=int(config.num_channels), prefix_tokens=1,
        )

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return model.vit.layers

    def parts(self, layer: nn.Module) -> LayerParts:
        a = layer.attention
        return LayerParts(a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.mlp.fc1, layer.mlp.fc2)

    # loading and data ----------------------------------------------------------------------------------

    def load(self, src: str, *, id2label: dict[int, str] | None = None, num_labels: int | None = None,
             eager: bool = False) -> nn.Module:
        from transformers import AutoConfig, AutoModelForImageClassification

        kw = label_kwargs(id2label, num_labels)
        try:
            before = AutoConfig.from_pretrained(src).num_labels
            if eager:
                kw["attn_implementation"] = "eager"
            # a task with other classes gets a fresh classifier (the checkpoint's is dropped, said in the log)
            mismatch = "num_labels" in kw and kw["num_labels"] != before
            return AutoModelForImageClassification.from_pretrained(src, ignore_mismatched_sizes=mismatch, **kw)
        except (OSError, RuntimeError, ValueError) as e:
            raise InstatuneError(f"cannot load image model {src!r}: {first_line(e)[:300]}") from None

    def load_saved(self, model_dir: str | Path, *, eager: bool = False) -> nn.Module:
        return self.load(str(model_dir), eager=eager)

    def load_preprocessor(self, src: str | Path) -> Any:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(src))
        p = Path(src) / "preprocessor_config.json"
        d: dict[str, Any] = json.loads(p.read_text()) if p.is_file() else {}
        size = d.get("size") or {}
        h = int(size.get("height", size.get("shortest_edge", cfg.image_size)) if isinstance(size, dict) else size)
        w = int(size.get("width", h) if isinstance(size, dict) else size)
        if (h, w) != (cfg.image_size, cfg.image_size):
            raise InstatuneError(f"{p} resizes to {h}x{w} but the model takes {cfg.image_size} px images")
        return ImagePreprocessor(input_size=(int(cfg.num_channels), h, w),
                                 mean=tuple(d.get("image_mean", (0.5, 0.5, 0.5))),
                                 std=tuple(d.get("image_std", (0.5, 0.5, 0.5))),
                                 interpolation=_RESAMPLE.get(int(d.get("resample", 2)), "bilinear"),
                                 crop_pct=1.0, crop_mode="center")

    def save_preprocessor(self, preprocessor: Any, out_dir: str | Path) -> None:
        from transformers import ViTImageProcessor

        code = {v: k for k, v in _RESAMPLE.items()}.get(preprocessor.interpolation, 2)
        _, h, w = preprocessor.input_size
        ViTImageProcessor(size={"height": h, "width": w}, image_mean=list(preprocessor.mean),
                          image_std=list(preprocessor.std), resample=code).save_pretrained(str(out_dir))

    def save(self, model: nn.Module, preprocessor: Any, out_dir: str | Path) -> None:
        model.save_pretrained(out_dir)
        if preprocessor is not None:
            self.save_preprocessor(preprocessor, out_dir)
        readable_files(out_dir)  # safetensors writes 0600

    def forward(self, model: nn.Module, inputs: dict[str, Any], hidden_states: bool = False
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        return model(pixel_values=inputs["pixel_values"]).logits, None

    def input_names(self, model_or_config: Any) -> list[str]:
        return ["pixel_values"]

    def random_batch(self, model_or_config: Any, batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
        import torch

        cfg = getattr(model_or_config, "config", model_or_config)
        g = torch.Generator().manual_seed(seed)
        return {"pixel_values": torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)}

    # cost ------------------------------------------------------------------------------------------------

    def macs(self, dims: ModelDims, sub: SubNet, seq: int) -> int:
        """Patch embedding + the kept layers (the text formula at the image's token count) + classifier on the
        class token; `seq` is ignored, the image fixes it."""
        t, d = dims.image_tokens, dims.hidden
        patches = (dims.image_size // dims.patch_size) ** 2
        return patches * dims.channels * dims.patch_size ** 2 * d + encoder_macs(dims, sub, t) + d * dims.num_labels

    def params(self, dims: ModelDims, sub: SubNet) -> int:
        """Patch projection, class token, position table, final LayerNorm, the kept layers, classifier."""
        d, c, p = dims.hidden, dims.channels, dims.patch_size
        fixed = c * p * p * d + d + d + dims.image_tokens * d + 2 * d + d * dims.num_labels + dims.num_labels
        return fixed + sum(layer_params(d, h, dims.head_dim, f) for h, f in zip(sub.heads, sub.ffn, strict=True))

    # extraction: the transformers families' stock path, the image processor saved by us -------------------

    def save_extracted(self, small: nn.Module, parent: nn.Module, sub: SubNet, preprocessor: Any,
                       out_dir: str | Path) -> dict[str, Any]:
        out = write_hf_extracted(small, parent, sub, None, Path(out_dir))
        if preprocessor is not None:
            self.save_preprocessor(preprocessor, out_dir)
        return {**out, "load_with": "AutoModelForImageClassification.from_pretrained(dir)"}

    def load_extracted(self, model_dir: str | Path) -> nn.Module:
        model = self.load(str(model_dir)).eval()
        model._instatune_adapter = self
        return model
