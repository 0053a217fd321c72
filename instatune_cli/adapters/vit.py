"""timm Vision Transformers: ViT (`VisionTransformer`), DeiT (incl. distilled), BEiT / BEiT-v2 (`Beit`) and BEiT-3
(timm's `beit3_*`: a `VisionTransformer` with sub-layer norms, the vision branch of the Multiway Transformer).

Sources: a local directory in timm's own `save_for_hf` layout (config.json with `architecture`, `num_classes`,
`label_names`, `pretrained_cfg`, `model_args`; `model.safetensors`), or a timm id (`vit_base_patch16_224`,
`timm/vit_base_patch16_224.augreg_in21k`, `hf-hub:timm/...`) whose weights are in the local cache when offline.
Pretrained weights are never replaced by random ones: no cached weights is a one-line error. `model.config` is a
small `TimmVitConfig` (transformers-like `model_type`, `num_labels`, `id2label`, plus what rebuilding needs).

Elastic: the blocks list runs only the kept blocks (`ElasticSequential` for ViT's `nn.Sequential`, whose forward
is `self.blocks(x)`; `ElasticLayerList` for BEiT's loop). The fused qkv keeps rows [0:w], [D:D+w], [2D:2D+w]
(`ElasticGroupedLinear`), proj the same input columns, fc1 rows / fc2 columns the MLP width. Attention is
re-classed in place to a subclass of its own timm class: ViT's reads `num_heads`/`attn_dim` from the active
width (timm's forward then runs unchanged); BEiT's has its own forward for a partial width (q_bias/v_bias and
the relative position bias table sliced to the active heads; layer scale untouched) and runs timm's forward at
full width. Sub-layer norms (`scale_attn_norm`: `attn.norm` over the heads' output before proj;
`scale_mlp_norm`: `mlp.norm` over the hidden features before fc2; BEiT-3 has both) are `ElasticLayerNorm`s
over the active width, so a sub-network normalises its kept units only, exactly as a smaller timm model built
with that width. Same objects, same Parameters, same state_dict keys: the full configuration is timm's model.

MACs (`macs`, closed form, batch 1, multiply-accumulates of matmuls and convolutions only: no bias adds, norms,
softmax, GELU, layer scale or position/bias additions, like the text family; BEiT-3's sub-layer norms add
parameters, not MACs), with T = patches + prefix tokens:
patch embedding N_p·C·P²·D; per kept block 3·T·D·w + 2·T²·w + T·w·D + 2·T·D·f (w = heads·head_dim);
classifier D·classes per head (two heads for distilled DeiT). ViT-B/16 at 224 px, 1000 classes: 17,563,828,224.

Extraction: "stock" when every kept block keeps all heads and one MLP width that `int(D * mlp_ratio)`
reproduces — a plain timm model (`depth`, `mlp_ratio` in `model_args`) that `timm.create_model("local-dir:DIR",
pretrained=True)` loads; else "instatune": per-block heads and widths, built by `modeling_instatune_vit.py`
(copied beside the weights; imports only torch, timm, safetensors, json).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instatune_cli.adapters import offline, register_family
from instatune_cli.adapters.base import Architecture, FamilyAdapter, LayerParts, check_subnet
from instatune_cli.adapters.elastic import ElasticGroupedLinear, ElasticLayerNorm, ElasticLinear
from instatune_cli.adapters.vision import ImageFamily
from instatune_cli.artifacts import readable_files
from instatune_cli.errors import InstatuneError
from instatune_cli.images import PREPROCESSOR_FILE, ImagePreprocessor
from instatune_cli.space import ModelDims, SubNet

if TYPE_CHECKING:
    import torch
    from torch import nn

WEIGHTS = "model.safetensors"
#: config.json key holding instatune's own fields (timm's loader ignores unknown top-level keys)
OWN_KEY = "instatune"
STANDALONE_MODULE = "instatune_cli.adapters.standalone.modeling_instatune_vit"
STANDALONE_FILE = "modeling_instatune_vit.py"
#: timm module of an architecture's entry point -> our model_type
_MODULE_TYPES = {"timm.models.vision_transformer": "timm_vit", "timm.models.deit": "timm_deit",
                 "timm.models.beit": "timm_beit"}
#: architecture-name prefixes with a model_type of their own within a timm module: BEiT-3 is a VisionTransformer
_ARCH_TYPES = {"beit3_": "timm_beit3"}
#: bare names that can only mean a timm model of this family (an unknown one is an error, not a hub id)
_NAME_PREFIXES = ("vit_", "deit_", "deit3_", "beit_", "beitv2_", "beit3_")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


# ---- shapes ---------------------------------------------------------------------------------------------

@dataclass
class TimmVitConfig:
    """`model.config` of a timm model: the names stage code reads (`model_type`, `num_labels`, `id2label`,
    `label2id`) and what rebuilding needs (`architecture`, `model_args`); `dims` is the full model's shape."""

    model_type: str
    architecture: str
    num_labels: int
    id2label: dict[int, str]
    label2id: dict[str, int]
    model_args: dict[str, Any]
    dims: dict[str, Any]
    layer_heads: list[int] | None = None  # per-layer extracts only
    layer_ffn: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


# ---- timm names -----------------------------------------------------------------------------------------

def _model_type_of_arch(arch: str) -> str | None:
    """Our model_type of a timm architecture name (tag allowed), None when timm does not know it or it is not
    a ViT / DeiT / BEiT / BEiT-3."""
    import timm
    from timm.models import model_entrypoint, split_model_name_tag

    name = split_model_name_tag(arch)[0]
    if not timm.is_model(name):
        return None
    found = _MODULE_TYPES.get(model_entrypoint(name).__module__)
    if found == "timm_vit":
        found = next((t for p, t in _ARCH_TYPES.items() if name.startswith(p)), found)
    return found


def _timm_name(src: str) -> str | None:
    """The timm name (with tag) a source names, or None for a name that is not timm's (a transformers hub id).
    `timm/NAME`, `hf-hub:timm/NAME` and bare `vit_...`-style names are timm's; an unknown one is an error."""
    s = src.strip()
    hub = False
    for prefix in ("hf-hub:", "hf_hub:"):
        if s.startswith(prefix):
            s, hub = s[len(prefix):], True
    if s.startswith("timm/"):
        s, hub = s[len("timm/"):], True
    elif "/" in s or "\\" in s:
        return None
    if not s:
        return None
    import timm
    from timm.models import split_model_name_tag

    if timm.is_model(split_model_name_tag(s)[0]):
        return s
    if hub or s.startswith(_NAME_PREFIXES):
        raise InstatuneError(f"unknown timm model {s!r}; list the known ones with timm.list_models('vit_*') "
                             "(or 'deit_*', 'beit*', 'beit3_*')")
    return None


def _check_cached(name: str) -> None:
    """Fail fast, in one line, when `name`'s pretrained weights cannot be had: timm has none, or the hub is
    offline and they are not in the local HF / torch-hub cache (never fall back to random weights)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise InstatuneError(f"timm has no pretrained weights for {name!r}; pass a local checkpoint directory "
                             "(timm save_for_hf layout: config.json + model.safetensors)")
    if not offline():
        return
    if cfg.file and Path(cfg.file).exists():
        return
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo = cfg.hf_hub_id.split("@")[0]
        for fn in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                   "open_clip_pytorch_model.bin"):
            if fn and isinstance(try_to_load_from_cache(repo, fn), str):
                return
    if cfg.url:
        from urllib.parse import urlparse

        import torch.hub

        if (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name).is_file():
            return
    raise InstatuneError(f"no cached weights for {name!r} and the hub is offline (HF_HUB_OFFLINE=1); pass a local "
                         "checkpoint directory (timm save_for_hf layout: config.json + model.safetensors) or go "
                         "online once to cache them")


def _create(name: str, what: str, **kw: Any) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, **kw)
    except InstatuneError:
        raise
    except Exception as e:  # noqa: BLE001 - hub, shape and config errors of any type: one line naming the source
        raise InstatuneError(f"cannot load timm model {what}: {_first_line(e)}") from None


#: weight files of a timm checkpoint directory, in timm's order of preference (`timm.models._hub`)
_WEIGHT_FILES = (WEIGHTS, "pytorch_model.bin", "pytorch_model.pth", "model.pth")
_NOTICED: set[str] = set()


def _notice(text: str) -> None:
    """A one-line notice on stderr, once per process (a model is loaded several times by one stage)."""
    import sys

    if text not in _NOTICED:
        _NOTICED.add(text)
        print(f"notice: {text}", file=sys.stderr)


def _load_weights(model: nn.Module, d: Path) -> None:
    """The weights of a timm checkpoint directory into `model`: model.safetensors, else (saying so) a pickle read
    with `torch.load(weights_only=True)` (tensors only, never arbitrary objects)."""
    from timm.models import load_checkpoint

    found = next((d / f for f in _WEIGHT_FILES if (d / f).is_file()), None)
    if found is None:
        raise InstatuneError(f"{d} has a config.json but no weights ({', '.join(_WEIGHT_FILES)}); save them with "
                             "timm.models.save_for_hf(model, DIR, safe_serialization=True)")
    if found.name != WEIGHTS:
        _notice(f"{d} has no {WEIGHTS}; loading {found.name}, a pickle, with torch.load(weights_only=True) "
                "(tensors only); save_for_hf(..., safe_serialization=True) writes safetensors")
    try:
        load_checkpoint(model, str(found), use_ema=False, strict=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a torn file, a foreign pickle, a shape mismatch: one line
        raise InstatuneError(f"cannot load the weights in {found}: {_first_line(e)[:300]}") from None


def _notice_foreign_tag(model: nn.Module, cfg: dict[str, Any], d: Path) -> None:
    """timm's save_for_hf keeps the pretrained tag of the model it was created from (e.g. augreg_in21k_ft_in1k),
    random weights or not. When the saved architecture is not that checkpoint's (another patch size, width,
    depth or head count), the weights cannot be those: say so, so nobody mistakes them for ImageNet weights."""
    pcfg = cfg.get("pretrained_cfg") or {}
    tag, arch = pcfg.get("tag"), cfg.get("architecture")
    if not tag or not arch or tag in ("random-init", "random"):
        return
    try:
        stock = _create(str(arch), repr(arch), pretrained=False, device="meta")
    except InstatuneError:
        return

    def shape(m: nn.Module) -> tuple[Any, ...]:
        return (tuple(m.patch_embed.patch_size), m.embed_dim, len(_blocks(m)), _blocks(m)[0].attn.num_heads)

    if shape(model) != shape(stock):
        _notice(f"{d / 'config.json'} names timm's pretrained tag {tag!r}, but its architecture is not that "
                f"checkpoint's (patch, width, depth, heads {shape(model)} vs {shape(stock)}): these weights are "
                "not those pretrained ones (set pretrained_cfg['tag'] to say what they are, e.g. 'random-init')")


def _read_config(d: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InstatuneError(f"{d / 'config.json'} is not readable JSON ({_first_line(e)})") from None
    if not isinstance(cfg, dict):
        raise InstatuneError(f"{d / 'config.json'} is not a JSON object")
    return cfg


def is_per_layer_dir(model_dir: str | Path) -> bool:
    """Whether `model_dir` holds our per-layer timm model (an extract, or the `model/` of a run recovered from one)."""
    p = Path(model_dir)
    try:
        return (p / "config.json").is_file() and bool(_per_layer_own(_read_config(p)))
    except InstatuneError:
        return False


def _per_layer_own(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """The `instatune` fields of a per-layer model's config.json (heads and widths per block); {} otherwise."""
    own = (cfg or {}).get(OWN_KEY) or {}
    return own if own.get("kind") == "instatune" else {}


def _label_names(cfg: dict[str, Any], n: int) -> dict[int, str] | None:
    names = cfg.get("label_names")
    if isinstance(names, list) and len(names) == n:
        return {i: str(x) for i, x in enumerate(names)}
    if isinstance(names, dict) and len(names) == n:
        try:
            return {int(k): str(v) for k, v in names.items()}
        except ValueError:
            return None
    return None


# ---- model structure ------------------------------------------------------------------------------------

def _blocks(model: nn.Module) -> list[nn.Module]:
    b = model.blocks
    return b.all_layers() if hasattr(b, "all_layers") else list(b)


def _unsupported(model: nn.Module) -> str | None:
    """What in `model` the elastic machinery and the closed forms do not cover, or None."""
    from timm.layers import Attention, Mlp
    from timm.models import beit
    from timm.models.vision_transformer import Block, VisionTransformer
    from torch import nn

    if isinstance(model, beit.Beit):
        if model.rel_pos_bias is not None:
            return "a relative position bias shared by all blocks (use_shared_rel_pos_bias)"
        block_cls, attn_cls = beit.Block, beit.Attention
    elif isinstance(model, VisionTransformer):
        if model.attn_pool is not None:
            return f"attention pooling (global_pool={model.global_pool!r})"
        block_cls, attn_cls = Block, Attention
    else:
        return f"a {type(model).__name__}, not a VisionTransformer or Beit"
    size = model.patch_embed.img_size
    if size is None or size[0] != size[1] or model.patch_embed.patch_size[0] != model.patch_embed.patch_size[1]:
        return f"non-square images or patches ({size}, {model.patch_embed.patch_size})"
    for b in _blocks(model):
        if not isinstance(b, block_cls):
            return f"{type(b).__name__} blocks"
        if not isinstance(b.attn, attn_cls):
            return f"{type(b.attn).__name__} attention"
        if getattr(b.attn, "gate", None) is not None:
            return "gated attention outputs (gated=True)"
        if not _sliceable_norm(getattr(b.attn, "norm", None)):
            return (f"a {type(b.attn.norm).__name__} over the attention output (scale_attn_norm needs an affine "
                    "LayerNorm)")
        if not isinstance(b.mlp, Mlp) or not isinstance(b.mlp.fc1, nn.Linear):
            return f"a {type(b.mlp).__name__} MLP (only timm's Mlp is sliceable)"
        if not _sliceable_norm(b.mlp.norm):
            return f"a {type(b.mlp.norm).__name__} over the MLP features (scale_mlp_norm needs an affine LayerNorm)"
    return None


def _sliceable_norm(norm: nn.Module | None) -> bool:
    """No sub-layer norm, or one `ElasticLayerNorm` can slice: a LayerNorm over the last dimension whose forward
    is plain layer norm, with weight and bias (timm's `LayerNorm`, torch's; not the fp32-casting or channels-first
    variants)."""
    from timm.layers import LayerNorm
    from torch import nn

    if norm is None or isinstance(norm, (nn.Identity, ElasticLayerNorm)):
        return True
    return type(norm) in (nn.LayerNorm, LayerNorm) and len(norm.normalized_shape) == 1 and \
        norm.weight is not None and norm.bias is not None  # as timm builds it (the per-layer rebuild assumes so)


def _check_supported(model: nn.Module, what: str) -> None:
    why = _unsupported(model)
    if why is not None:
        raise InstatuneError(f"{what} uses {why}, which instatune's vit family does not support; use a plain "
                             "ViT / DeiT / BEiT / BEiT-3 architecture")


def _model_type(model: nn.Module) -> str:
    from timm.models import beit, deit

    arch = model.pretrained_cfg.get("architecture") or ""
    found = _model_type_of_arch(arch) if arch else None
    if found:
        return found
    if isinstance(model, beit.Beit):
        return "timm_beit"
    return "timm_deit" if isinstance(model, deit.VisionTransformerDistilled) else "timm_vit"


def _head_dim(attn: nn.Module) -> int:
    if hasattr(attn, "head_dim"):
        return int(attn.head_dim)
    return int(attn.qkv.out_features // 3 // attn.__dict__.get("num_heads", attn.num_heads))  # BEiT


def _param_count(*ps: Any) -> int:
    return sum(int(p.numel()) for p in ps if p is not None)


# ---- elastic attention classes ----------------------------------------------------------------------------
# Subclasses of timm's own attention classes, made on first use (timm is imported lazily) and kept in this
# module's namespace under a fixed name, so an elastic model still pickles by reference.

_ELASTIC: dict[type, type] = {}


def _elastic_vit_class(base: type) -> type:
    class ElasticVitAttention(base):  # type: ignore[misc, valid-type]
        """timm's Attention whose head count and width follow the active qkv/proj width: timm's forward reshapes
        with `num_heads` / `attn_dim`, so it runs unchanged on any number of kept heads."""

        @property
        def num_heads(self) -> int:  # type: ignore[override]
            return self.proj.active_in // self.head_dim

        @property
        def attn_dim(self) -> int:  # type: ignore[override]
            return self.proj.active_in

    return ElasticVitAttention


def _elastic_beit_class(base: type) -> type:
    import torch
    import torch.nn.functional as F

    class ElasticBeitAttention(base):  # type: ignore[misc, valid-type]
        """timm's BEiT Attention; with heads dropped, the fused qkv rows, q/v biases and relative position bias
        columns of the kept heads, and the heads' output at its own width (timm assumes the input width)."""

        def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
            w = self.proj.active_in
            if w == self.proj.in_features:
                return super().forward(x, shared_rel_pos_bias=shared_rel_pos_bias)
            B, N, _ = x.shape
            h = w // (self.qkv.out_features // 3 // self.num_heads)
            weight = self.qkv.active_weight()
            if self.q_bias is None:
                qkv = F.linear(x, weight)
            else:
                bias = torch.cat((self.q_bias[:w], self.k_bias[:w], self.v_bias[:w]))
                qkv = F.linear(x, weight) + bias if self.qkv_bias_separate else F.linear(x, weight, bias)
            q, k, v = qkv.reshape(B, N, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)
            rel = None
            if self.relative_position_bias_table is not None:
                n = self.window_size[0] * self.window_size[1] + 1
                rel = self.relative_position_bias_table[:, :h][self.relative_position_index.view(-1)]
                rel = rel.view(n, n, h).permute(2, 0, 1).contiguous().unsqueeze(0)
            if shared_rel_pos_bias is not None:
                shared = shared_rel_pos_bias[..., :h, :, :]
                rel = shared if rel is None else rel + shared
            if self.fused_attn:
                x = F.scaled_dot_product_attention(q, k, v, attn_mask=rel,
                                                   dropout_p=self.attn_drop.p if self.training else 0.0)
            else:
                attn = (q * self.scale) @ k.transpose(-2, -1)
                if rel is not None:
                    attn = attn + rel
                x = self.attn_drop(attn.softmax(dim=-1)) @ v
            x = x.transpose(1, 2).reshape(B, N, w)
            return self.proj_drop(self.proj(x))

    return ElasticBeitAttention


def _elastic_attention_class(base: type) -> type:
    cls = _ELASTIC.get(base)
    if cls is None:
        from timm.models import beit

        cls = _elastic_beit_class(base) if issubclass(base, beit.Attention) else _elastic_vit_class(base)
        name = cls.__name__  # a further subclass of timm's classes gets a name of its own
        if name in globals():
            name = f"{name}_{base.__module__.replace('.', '_')}_{base.__name__}"
        cls.__name__ = cls.__qualname__ = name
        cls.__module__ = __name__
        globals()[name] = cls
        _ELASTIC[base] = cls
    return cls


def __getattr__(name: str) -> Any:
    """Unpickling an elastic model in a fresh process asks for its attention class by name: make it."""
    if name in ("ElasticVitAttention", "ElasticBeitAttention"):
        from timm.layers import Attention
        from timm.models import beit

        _elastic_attention_class(beit.Attention if name == "ElasticBeitAttention" else Attention)
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _slice_block_tensor(rest: str, v: torch.Tensor, heads: int, head_dim: int, ffn: int) -> torch.Tensor:
    """A block's state_dict entry (`rest` = key inside the block) restricted to the first heads / neurons."""
    w = heads * head_dim
    if rest == "attn.qkv.weight":
        return v.view(3, -1, v.shape[-1])[:, :w].reshape(3 * w, v.shape[-1])
    if rest == "attn.qkv.bias":
        return v.view(3, -1)[:, :w].reshape(-1)
    if rest in ("attn.q_bias", "attn.v_bias"):
        return v[:w]
    if rest == "attn.relative_position_bias_table":
        return v[:, :heads]
    if rest == "attn.proj.weight":
        return v[:, :w]
    if rest in ("attn.norm.weight", "attn.norm.bias"):  # scale_attn_norm (BEiT-3): over the heads' output
        return v[:w]
    if rest in ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.norm.weight", "mlp.norm.bias"):
        return v[:ffn]
    if rest == "mlp.fc2.weight":
        return v[:, :ffn]
    return v


# ---- the family -----------------------------------------------------------------------------------------

@register_family
class TimmVitAdapter(ImageFamily, FamilyAdapter):
    """timm ViT / DeiT / BEiT / BEiT-3 image classifiers (see the module docstring)."""

    family = "vit"
    model_types = ("timm_vit", "timm_deit", "timm_beit", "timm_beit3")

    # ---- loading --------------------------------------------------------------------------------------

    def claims(self, src: str, config: dict[str, Any] | None) -> bool:
        if config is not None:
            arch = config.get("architecture")
            return isinstance(arch, str) and _model_type_of_arch(arch) is not None
        name = _timm_name(src)
        return name is not None and _model_type_of_arch(name) is not None

    def _build(self, src: str, *, pretrained: bool, **kw: Any) -> tuple[nn.Module, dict[str, Any] | None]:
        """(timm model, its directory's config.json or None for a timm id); no config attached yet."""
        p = Path(src).expanduser()
        if (p / "config.json").is_file():
            cfg = _read_config(p)
            if (cfg.get(OWN_KEY) or {}).get("kind") == "instatune":
                model = self._standalone().load(str(p)) if pretrained else \
                    self._standalone().build(cfg).to(kw.get("device", "cpu"))
                return model, cfg
            if not pretrained:
                return _create(f"local-dir:{p}", str(p), pretrained=False, **kw), cfg
            model = _create(f"local-dir:{p}", str(p), pretrained=False, **kw)
            _load_weights(model, p)
            _notice_foreign_tag(model, cfg, p)
            return model, cfg
        name = _timm_name(src)
        if name is None or _model_type_of_arch(name) is None:
            raise InstatuneError(f"{src!r} is not a timm ViT / DeiT / BEiT / BEiT-3 id or a timm model directory")
        if pretrained:
            _check_cached(name)
        return _create(name, repr(name), pretrained=pretrained, **kw), None

    def prepare(self, model: nn.Module, id2label: dict[int, str] | None = None, eager: bool = False,
                what: str = "the model") -> nn.Module:
        """Adopt a timm model built elsewhere: check it, attach `model.config` (and the family), eval mode."""
        _check_supported(model, what)
        if eager:
            for b in _blocks(model):
                b.attn.fused_attn = False
        self._attach(model, id2label)
        model._instatune_adapter = self  # type: ignore[assignment]
        return model.eval()

    def load(self, src: str, *, id2label: dict[int, str] | None = None, num_labels: int | None = None,
             eager: bool = False) -> nn.Module:
        p = Path(src).expanduser()
        if (p / "config.json").is_file() and (_read_config(p).get(OWN_KEY) or {}).get("kind") == "instatune":
            model = self.load_extracted(p)  # one of our per-layer extracts: its config names the layers
            cfg = model.config
            if (id2label is None and num_labels is None) or \
                    (len(id2label) if id2label is not None else num_labels) == model.num_classes:
                if eager:
                    for b in _blocks(model):
                        b.attn.fused_attn = False
                if id2label is not None:
                    self._attach(model, dict(id2label), cfg.layer_heads, cfg.layer_ffn)
                return model
            raise InstatuneError(f"{p} is a per-layer extracted model with {model.num_classes} classes; it cannot "
                                 "take a new head, fine-tune its parent super-network instead")
        model, saved = self._build(src, pretrained=True)
        _check_supported(model, src)
        n = len(id2label) if id2label is not None else num_labels
        if n is not None and n != model.num_classes:
            model.reset_classifier(n)  # a fresh head for the task's classes
        labels = dict(id2label) if id2label is not None else _label_names(saved or model.pretrained_cfg,
                                                                           model.num_classes)
        return self.prepare(model, labels, eager, src)

    def is_per_layer_dir(self, model_dir: str | Path) -> bool:
        return is_per_layer_dir(model_dir)

    def load_config(self, src: str) -> Any:
        """The config of `src` from a model built on the meta device (no weights read, nothing allocated); a timm
        id whose weights cannot be had fails here, before a stage creates anything."""
        name = _timm_name(src)
        if name is not None and not (Path(src).expanduser() / "config.json").is_file():
            _check_cached(name)
        model, cfg = self._build(src, pretrained=False, device="meta")
        _check_supported(model, src)
        own = _per_layer_own(cfg)  # a per-layer model's config says so, as `load_extracted`'s does
        self._attach(model, _label_names(cfg or model.pretrained_cfg, model.num_classes), own.get("layer_heads"),
                     own.get("layer_ffn"))
        return model.config

    def load_preprocessor(self, src: str | Path) -> Any:
        p = Path(src).expanduser()
        if (p / PREPROCESSOR_FILE).is_file():
            return ImagePreprocessor.load(p)
        model, _ = self._build(str(src), pretrained=False, device="meta")
        return ImagePreprocessor.for_model(model)

    def save(self, model: nn.Module, preprocessor: Any, out_dir: str | Path) -> None:
        """timm's layout; a per-layer model (a run recovered from a per-layer extract) in its extract's layout,
        the class file beside it, so it reloads like one (`load_extracted`, or without instatune)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        own: dict[str, Any] = {"model_type": model.config.model_type}
        if getattr(model.config, "layer_heads", None) is not None:
            own.update(self._per_layer_fields(model, model.config.layer_heads, model.config.layer_ffn))
        self._write(model, out, own)
        if preprocessor is not None:
            preprocessor.save(out)
        readable_files(out)  # safetensors writes 0600

    def _write(self, model: nn.Module, out: Path, own: dict[str, Any]) -> None:
        """timm's `save_for_hf` layout: config.json (timm's own writer, plus our `instatune` key) and
        model.safetensors of the state_dict (stock keys: elasticity adds none); a per-layer model's class file
        beside them."""
        from safetensors.torch import save_file
        from timm.models._hub import save_config_for_hf

        if not isinstance(getattr(model, "config", None), TimmVitConfig):
            self._attach(model)  # a timm model built elsewhere: generic labels
        sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(out / WEIGHTS), metadata={"format": "pt"})
        id2label = model.config.id2label
        names = [id2label.get(i, f"LABEL_{i}") for i in range(model.num_classes)]
        save_config_for_hf(model, str(out / "config.json"), model_config={"label_names": names, OWN_KEY: own})
        if own.get("kind") == "instatune":
            shutil.copyfile(Path(self._standalone().__file__), out / STANDALONE_FILE)
        else:
            (out / STANDALONE_FILE).unlink(missing_ok=True)  # a stale copy from an earlier save into `out`

    # ---- data and forward -----------------------------------------------------------------------------

    def forward(self, model: nn.Module, inputs: dict[str, Any], hidden_states: bool = False
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        return model(inputs["pixel_values"]), None

    def logits(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return model(batch["pixel_values"].to(next(model.parameters()).device))

    def random_batch(self, model_or_config: Any, batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Normal pixels at the model's input size (`seq_len` is ignored: the image fixes the sequence)."""
        import torch

        d = self.dims_of(model_or_config) if hasattr(model_or_config, "blocks") else self.dims(model_or_config)
        g = torch.Generator().manual_seed(seed)
        return {"pixel_values": torch.randn(batch, d.channels, d.image_size, d.image_size, generator=g)}

    # ---- shape, MACs, params --------------------------------------------------------------------------

    def dims(self, config: Any) -> ModelDims:
        d = config.dims if hasattr(config, "dims") else config["dims"]
        return ModelDims.from_dict(d)

    def dims_of(self, model: nn.Module) -> ModelDims:
        """Shape of the full model (whatever sub-network is active), read off its modules."""
        blocks = _blocks(model)
        dh = _head_dim(blocks[0].attn)
        width = max(b.attn.qkv.out_features // 3 for b in blocks)
        pe = model.patch_embed
        total = _param_count(*model.parameters())
        inside = 0
        per: tuple[int, int, int, int] | None = None
        for b in blocks:
            a, m = b.attn, b.mlp
            w, f = a.qkv.out_features // 3, m.fc1.out_features
            table = getattr(a, "relative_position_bias_table", None)
            an, mn = getattr(a, "norm", None), m.norm  # BEiT-3's sub-layer norms: a weight and bias per unit
            wp = _param_count(a.qkv.weight, a.qkv.bias, getattr(a, "q_bias", None), getattr(a, "v_bias", None),
                              a.proj.weight, getattr(an, "weight", None), getattr(an, "bias", None))
            hp = _param_count(table)
            fp = _param_count(m.fc1.weight, m.fc1.bias, m.fc2.weight, getattr(mn, "weight", None),
                              getattr(mn, "bias", None))
            n = _param_count(*b.parameters())
            inside += n
            this = (n - wp - hp - fp, wp // w, hp // (w // dh), fp // f)
            if per is None:
                per = this
            elif this != per:  # every block of a timm model has the same layout
                raise InstatuneError(f"the blocks of {type(model).__name__} differ in layout; cannot count params")
        assert per is not None
        return ModelDims(
            family=self.family, num_layers=len(blocks), num_heads=width // dh, head_dim=dh,
            hidden=int(model.embed_dim), ffn=max(b.mlp.fc1.out_features for b in blocks),
            num_labels=int(model.num_classes), image_size=int(pe.img_size[0]), patch_size=int(pe.patch_size[0]),
            channels=int(pe.proj.in_channels), prefix_tokens=int(model.num_prefix_tokens),
            head_tokens=2 if hasattr(model, "head_dist") and hasattr(model.head_dist, "weight") else 1,
            fixed_params=total - inside, layer_params=per[0], width_params=per[1], head_params=per[2],
            ffn_params=per[3],
        )

    def macs(self, dims: ModelDims, sub: SubNet, seq: int) -> int:
        """Closed form at batch 1 (module docstring); `seq` is ignored: the image fixes T."""
        t, d = dims.image_tokens, dims.hidden
        patches = (dims.image_size // dims.patch_size) ** 2
        total = patches * dims.channels * dims.patch_size ** 2 * d
        for h, f in zip(sub.heads, sub.ffn, strict=True):
            w = h * dims.head_dim
            total += 3 * t * d * w + 2 * t * t * w + t * w * d + 2 * t * d * f
        return total + (dims.head_tokens or 1) * d * dims.num_labels

    def params(self, dims: ModelDims, sub: SubNet) -> int:
        """Exactly `sum(p.numel())` of `extract(model, sub)`: the fixed part plus each kept block's."""
        if not dims.layer_params:
            raise InstatuneError("params of a vit sub-network need the model's own dims (adapter.dims_of(model))")
        return dims.fixed_params + sum(
            dims.layer_params + dims.width_params * h * dims.head_dim + dims.head_params * h + dims.ffn_params * f
            for h, f in zip(sub.heads, sub.ffn, strict=True))

    # ---- quantization targets (quantize/targets.py) ----------------------------------------------------

    QUANT_PARTS = ("qkv", "attn_out", "ffn_in", "ffn_out")

    def _heads(self, model: nn.Module) -> dict[str, nn.Linear]:
        from torch import nn

        heads = {"classifier": model.head}
        dist = getattr(model, "head_dist", None)
        if isinstance(dist, nn.Linear):
            heads["classifier_dist"] = dist
        return heads

    def quant_targets(self, model: nn.Module, sub: SubNet | None = None) -> dict[str, tuple[str, nn.Module]]:
        """`layer.K.{qkv,attn_out,ffn_in,ffn_out}` of the kept blocks and the classifier head(s): Q, K and V are
        one fused linear, so one policy entry (docs/architecture.md, "Quantization")."""
        paths = {id(m): n for n, m in model.named_modules()}
        blocks = self.layers(model)
        kept = self.kept_layers(model, sub) if sub is not None else list(range(len(blocks)))
        out: dict[str, tuple[str, nn.Module]] = {}
        for k, li in enumerate(kept):
            b = blocks[li]
            for part, m in zip(self.QUANT_PARTS, (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2), strict=True):
                out[f"layer.{k}.{part}"] = (paths[id(m)], m)
        out.update({name: (paths[id(m)], m) for name, m in self._heads(model).items()})
        return out

    def quant_architecture(self, model: nn.Module, sub: SubNet | None = None) -> Architecture:
        blocks = self.layers(model)
        dh = _head_dim(blocks[0].attn)
        if sub is not None:
            heads, ffn = tuple(sub.heads), tuple(sub.ffn)
        else:
            heads = tuple(b.attn.qkv.out_features // 3 // dh for b in blocks)
            ffn = tuple(b.mlp.fc1.out_features for b in blocks)
        return Architecture(str(model.config.model_type), int(model.embed_dim), dh, heads, ffn,
                            int(model.num_classes), tuple(self._heads(model)), self.QUANT_PARTS, embeddings=False)

    # ---- elastic hooks --------------------------------------------------------------------------------

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return model.blocks

    def parts(self, layer: nn.Module) -> LayerParts:
        raise InstatuneError("timm ViT blocks have a fused qkv projection, not six separate linears; this "
                             "operation (per-linear quantization) is not available for the vit family")

    def make_elastic(self, model: nn.Module, depth: str = "first") -> nn.Module:
        _check_supported(model, type(model).__name__)
        return super().make_elastic(model, depth)

    @staticmethod
    def _norms(layer: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
        """(attn.norm, mlp.norm) where the block has them as LayerNorms (BEiT-3), else None."""
        from torch import nn

        an, mn = getattr(layer.attn, "norm", None), layer.mlp.norm
        return (an if isinstance(an, nn.LayerNorm) else None, mn if isinstance(mn, nn.LayerNorm) else None)

    def elastic_layer(self, layer: nn.Module) -> None:
        a = layer.attn
        ElasticGroupedLinear.wrap(a.qkv, 3)
        for lin in (a.proj, layer.mlp.fc1, layer.mlp.fc2):
            ElasticLinear.wrap(lin)
        for norm in self._norms(layer):
            if norm is not None:
                ElasticLayerNorm.wrap(norm)
        if type(a) not in _ELASTIC.values():  # after proj: the ViT class reads its head count from proj
            a.__class__ = _elastic_attention_class(type(a))

    def reset_layer(self, layer: nn.Module) -> None:
        for m in (layer.attn.qkv, layer.attn.proj, layer.mlp.fc1, layer.mlp.fc2, *self._norms(layer)):
            if m is not None:
                m.reset()

    def set_layer(self, layer: nn.Module, heads: int, ffn: int, head_dim: int) -> None:
        w = heads * head_dim
        layer.attn.qkv.active_out = 3 * w
        layer.attn.proj.active_in = w
        layer.mlp.fc1.active_out = ffn
        layer.mlp.fc2.active_in = ffn
        an, mn = self._norms(layer)
        if an is not None:
            an.active = w
        if mn is not None:
            mn.active = ffn

    def permute_layer(self, layer: nn.Module, rows: torch.Tensor, neurons: torch.Tensor) -> None:
        """Heads: qkv rows within each third (and its bias, BEiT's q/v biases), proj columns, the relative
        position bias table's head columns, BEiT-3's attn.norm weight and bias; neurons: fc1 rows and bias,
        fc2 columns, BEiT-3's mlp.norm weight and bias. A LayerNorm's statistics do not depend on the order of
        its features, so the full model's function is unchanged."""
        import torch

        a, m = layer.attn, layer.mlp
        d = a.qkv.out_features // 3
        rows = rows.to(a.qkv.weight.device)
        neurons = neurons.to(m.fc1.weight.device)
        qkv_rows = torch.cat([rows, rows + d, rows + 2 * d])
        a.qkv.weight.copy_(a.qkv.weight[qkv_rows])
        if a.qkv.bias is not None:
            a.qkv.bias.copy_(a.qkv.bias[qkv_rows])
        for name in ("q_bias", "k_bias", "v_bias"):
            t = getattr(a, name, None)
            if t is not None:
                t.copy_(t[rows])
        table = getattr(a, "relative_position_bias_table", None)
        if table is not None:
            dh = d // table.shape[1]
            order = rows.view(-1, dh)[:, 0] // dh
            table.copy_(table[:, order.to(table.device)])
        a.proj.weight.copy_(a.proj.weight[:, rows])
        m.fc1.weight.copy_(m.fc1.weight[neurons])
        if m.fc1.bias is not None:
            m.fc1.bias.copy_(m.fc1.bias[neurons])
        m.fc2.weight.copy_(m.fc2.weight[:, neurons])
        for norm, order in zip(self._norms(layer), (rows, neurons), strict=True):
            for p in (getattr(norm, "weight", None), getattr(norm, "bias", None)):
                if p is not None:
                    p.copy_(p[order.to(p.device)])

    def layer_scores(self, layer: nn.Module, score: Any, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per head: its qkv rows and proj columns (and its attn.norm gains); per neuron: its fc1 row, fc2
        column (and mlp.norm gain). A sub-layer norm's gain scales the unit's output like a weight does."""
        a, m = layer.attn, layer.mlp
        d = a.qkv.out_features // 3
        hs = score(a.qkv.weight).sum(1).view(3, d).sum(0) + score(a.proj.weight).sum(0)
        ns = score(m.fc1.weight).sum(1) + score(m.fc2.weight).sum(0)
        an, mn = self._norms(layer)
        if an is not None and an.weight is not None:
            hs = hs + score(an.weight)
        if mn is not None and mn.weight is not None:
            ns = ns + score(mn.weight)
        return hs.view(-1, head_dim).sum(1), ns

    # ---- extraction -----------------------------------------------------------------------------------

    @staticmethod
    def _standalone() -> Any:
        import importlib

        return importlib.import_module(STANDALONE_MODULE)

    @staticmethod
    def _stock_ratio(dims: ModelDims, sub: SubNet) -> float | None:
        """An `mlp_ratio` timm turns back into the sub-network's one MLP width (`int(D * ratio)`), when every
        kept block keeps all heads; None otherwise (a per-layer model)."""
        if any(h != dims.num_heads for h in sub.heads) or len(set(sub.ffn)) != 1:
            return None
        f, d = sub.ffn[0], dims.hidden
        for r in (f / d, (f + 0.5) / d):  # the second absorbs a float product that lands just below f
            if int(d * r) == f:
                return r
        return None

    def extract(self, model: nn.Module, sub: SubNet) -> nn.Module:
        from timm.models import get_model_args

        dims = self.dims_of(model)
        check_subnet(dims, sub)
        keep = self.kept_layers(model, sub)
        arch = model.pretrained_cfg["architecture"]
        args = {k: v for k, v in get_model_args(model).items() if k not in ("pretrained_model_args",)}
        args["depth"] = sub.layers
        pcfg = {k: v for k, v in model.pretrained_cfg.items() if k not in ("file", "source", "state_dict")}
        ratio = self._stock_ratio(dims, sub)
        if ratio is not None:
            import timm

            small = timm.create_model(arch, pretrained=False, pretrained_cfg=pcfg, **{**args, "mlp_ratio": ratio})
            kind, layer_heads, layer_ffn = "stock", None, None
        else:
            own = {"layer_heads": list(sub.heads), "layer_ffn": list(sub.ffn), "head_dim": dims.head_dim}
            small = self._standalone().build({"architecture": arch, "num_classes": model.num_classes,
                                              "model_args": args, "pretrained_cfg": pcfg, OWN_KEY: own})
            kind, layer_heads, layer_ffn = "instatune", list(sub.heads), list(sub.ffn)
        small.to(next(model.parameters()).dtype)
        try:
            small.load_state_dict(self._sliced_state_dict(model, sub, keep, dims.head_dim), strict=True)
        except RuntimeError as e:  # a key/shape mismatch is our bug, not the user's; keep the detail
            raise RuntimeError(f"extracted {kind} model does not match the sliced weights of {sub.name}: {e}") from e
        fused = [b.attn.fused_attn for b in _blocks(model)]
        for k, b in enumerate(_blocks(small)):
            b.attn.fused_attn = fused[keep[k]]
        small.eval()
        small._instatune_kind = kind
        self._attach(small, model.config.id2label, layer_heads, layer_ffn)
        small._instatune_adapter = self
        return small

    def _sliced_state_dict(self, model: nn.Module, sub: SubNet, keep: list[int], head_dim: int
                           ) -> dict[str, torch.Tensor]:
        """The super-network's state_dict restricted to `sub`: kept blocks renumbered 0..L-1 and sliced to
        their heads and MLP width, everything else copied (from the full Parameters: the active sub-network
        does not matter)."""
        names = {id(m): n for n, m in model.named_modules()}
        prefix = names[id(self.layer_list(model))] + "."
        out: dict[str, torch.Tensor] = {}
        for key, v in model.state_dict().items():
            if key.startswith(prefix):
                idx, rest = key[len(prefix):].split(".", 1)
                if int(idx) not in keep:
                    continue
                k = keep.index(int(idx))
                v = _slice_block_tensor(rest, v, sub.heads[k], head_dim, sub.ffn[k])
                key = f"{prefix}{k}.{rest}"
            out[key] = v.detach().clone()
        return out

    def save_extracted(self, small: nn.Module, parent: nn.Module, sub: SubNet, preprocessor: Any,
                       out_dir: str | Path) -> dict[str, Any]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        kind = small._instatune_kind
        own: dict[str, Any] = {"model_type": small.config.model_type, "kind": kind,
                               "kept_layers": self.kept_layers(parent, sub),
                               "depth_rule": str(getattr(self.layer_list(parent), "depth", "first"))}
        if kind == "instatune":
            own.update(self._per_layer_fields(parent, sub.heads, sub.ffn))
            load_with = (f"import sys; sys.path.insert(0, DIR); import {STANDALONE_FILE[:-3]}; "
                         f"model = {STANDALONE_FILE[:-3]}.load(DIR)")
        else:
            load_with = 'model = timm.create_model("local-dir:" + DIR, pretrained=True)'
        self._write(small, out, own)
        if preprocessor is not None:
            preprocessor.save(out)
        return {"model_type": small.config.model_type, "load_with": load_with}

    def _per_layer_fields(self, model: nn.Module, heads: Any, ffn: Any) -> dict[str, Any]:
        """config.json's `instatune` fields of a per-layer model with `model`'s head size (`_write` puts the class
        file beside it)."""
        return {"kind": "instatune", "format": self._standalone().FORMAT, "layer_heads": [int(h) for h in heads],
                "layer_ffn": [int(f) for f in ffn], "head_dim": self.dims_of(model).head_dim}

    def load_extracted(self, model_dir: str | Path) -> nn.Module:
        p = Path(model_dir)
        if not (p / "config.json").is_file():
            raise InstatuneError(f"{p} is not a model directory (no config.json)")
        cfg = _read_config(p)
        own = cfg.get(OWN_KEY) or {}
        kind = own.get("kind", "stock")
        if kind == "instatune":
            try:
                model = self._standalone().load(str(p))
            except (OSError, KeyError, ValueError, RuntimeError) as e:
                raise InstatuneError(f"cannot load extracted model {p}: {_first_line(e)}") from None
        else:
            model = _create(f"local-dir:{p}", str(p), pretrained=True)
        _check_supported(model, str(p))
        model.eval()
        model._instatune_kind = kind
        ext = own if kind == "instatune" else {}
        self._attach(model, _label_names(cfg, model.num_classes), ext.get("layer_heads"), ext.get("layer_ffn"))
        model._instatune_adapter = self
        return model

    # ---- config ---------------------------------------------------------------------------------------

    def _attach(self, model: nn.Module, id2label: dict[int, str] | None = None,
                layer_heads: list[int] | None = None, layer_ffn: list[int] | None = None) -> None:
        from timm.models import get_model_args

        n = int(model.num_classes)
        labels = {int(k): str(v) for k, v in id2label.items()} if id2label and len(id2label) == n else \
            {i: f"LABEL_{i}" for i in range(n)}
        mt = _model_type(model)
        model.config = TimmVitConfig(
            model_type=f"instatune_{mt}" if layer_heads is not None else mt,
            architecture=str(model.pretrained_cfg.get("architecture")),
            num_labels=n, id2label=labels, label2id={v: k for k, v in labels.items()},
            model_args=_jsonable(get_model_args(model)), dims=self.dims_of(model).to_dict(),
            layer_heads=layer_heads, layer_ffn=layer_ffn,
        )
