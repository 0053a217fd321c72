"""Extraction for the transformers families: a sub-network of a super-network as a smaller model that loads with
transformers alone (what `HFAdapter.extract` / `save_extracted` / `load_extracted` call; the family-independent
checks and the stage are `instatune_cli/extract.py`).

Two kinds of result (transformers 5 has no head pruning and derives head size from the head
count):

- `stock`: the sub-network keeps every head and one FFN width in all layers. It is a plain config of the
  same family (fewer `num_hidden_layers`, smaller `intermediate_size`) and loads with
  `AutoModelForSequenceClassification.from_pretrained(dir)` anywhere. Works for BERT, RoBERTa (XLM-R,
  CamemBERT), ELECTRA and DistilBERT.
- `instatune`: anything else. The directory holds `modeling_instatune_bert.py` (imports only torch and
  transformers) with a config that adds per-layer `layer_heads` / `layer_ffn`, and `config.json` has an
  `auto_map`, so `from_pretrained(dir, trust_remote_code=True)` loads it without instatune; instatune's
  own `load_extracted(dir)` needs no remote code. Same four families.

  Its `config.json` names the family's stock `model_type` (e.g. `bert`) and keeps ours (`instatune_bert`) in
  `instatune_model_type`. transformers 5's `AutoTokenizer.from_pretrained(dir)` always loads the config first,
  and for a `model_type` it does not know with an `auto_map` it stops at a "run custom code? [y/N]" prompt, though
  the tokenizer is stock. With a known `model_type` the config loads without remote code; the `auto_map` still
  sends `trust_remote_code=True` loads to our classes, and a stock load without it fails on the weight shapes.
"""

from __future__ import annotations

import copy
import importlib
import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from instatune_cli.adapters import adapter_of
from instatune_cli.adapters.base import check_subnet
from instatune_cli.adapters.hf import ALIASES
from instatune_cli.errors import InstatuneError
from instatune_cli.space import SubNet

if TYPE_CHECKING:
    from torch import nn

STANDALONE_MODULE = "instatune_cli.adapters.standalone.modeling_instatune_bert"
STANDALONE_FILE = "modeling_instatune_bert.py"

#: family model_type -> our per-layer model_type in the standalone file
CUSTOM_TYPES = {t: f"instatune_{ALIASES.get(t, t)}" for t in
                ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert")}
#: config.json key naming our per-layer model_type (its `model_type` is the family's; see the module docstring)
OWN_TYPE_KEY = "instatune_model_type"

#: config keys for (number of layers, FFN width) where a family does not use the BERT names
_LAYER_FFN_KEYS = {"distilbert": ("n_layers", "hidden_dim")}


def is_stock_expressible(dims: Any, sub: SubNet) -> bool:
    """Every kept layer keeps all heads and the FFN width is the same everywhere."""
    return all(h == dims.num_heads for h in sub.heads) and len(set(sub.ffn)) == 1


def standalone_module() -> ModuleType:
    return importlib.import_module(STANDALONE_MODULE)


def _standalone_path() -> Path:
    f = standalone_module().__file__
    assert f is not None
    return Path(f)


def family_model_type(config: Any) -> str:
    """The family's stock `model_type` of a config: its own, or for our per-layer config (`instatune_bert`, a
    subclass of the stock config) that of the stock class it extends (`bert`)."""
    mt = str(config.model_type)
    if not mt.startswith("instatune_"):
        return mt
    for base in type(config).__mro__[1:]:
        t = str(getattr(base, "model_type", "") or "")
        if t and not t.startswith("instatune_"):
            return t
    return mt.removeprefix("instatune_")


def _stock_of(model: nn.Module) -> tuple[Any, type]:
    """(config, model class) of the stock family for `model`: itself, or for our per-layer model the stock
    classes it extends, with the per-layer keys dropped (a cut of it that needs no per-layer shape)."""
    src = model.config
    if not str(src.model_type).startswith("instatune_"):
        return copy.deepcopy(src), type(model)
    cfg_cls = next(b for b in type(src).__mro__[1:] if not str(getattr(b, "model_type", "")).startswith("instatune_"))
    d = src.to_dict()
    for k in ("model_type", "transformers_version", "architectures", "auto_map", "_name_or_path", "layer_heads",
              "layer_ffn", OWN_TYPE_KEY):
        d.pop(k, None)
    cfg = cfg_cls.from_dict(d)
    impl = getattr(src, "_attn_implementation", None)
    if impl:
        cfg._attn_implementation = impl
    return cfg, type(model).__mro__[1]


def _extracted_config(model: nn.Module, dims: Any, sub: SubNet) -> tuple[Any, type, str]:
    """(config, model class, kind) for `sub` (of a stock model, or of our per-layer one: a recovered run)."""
    src = model.config
    mt = family_model_type(src)
    if is_stock_expressible(dims, sub):
        layers_key, ffn_key = _LAYER_FFN_KEYS.get(mt, ("num_hidden_layers", "intermediate_size"))
        cfg, cls = _stock_of(model)
        setattr(cfg, layers_key, sub.layers)
        setattr(cfg, ffn_key, sub.ffn[0])
        if "auto_map" in cfg.__dict__:  # a stock result must not point at remote code
            del cfg.__dict__["auto_map"]
        return cfg, cls, "stock"
    if mt not in CUSTOM_TYPES:
        raise InstatuneError(
            f"cannot extract per-layer sub-network {sub.name} from a {mt!r} model; per-layer heads/FFN "
            f"widths are supported for {', '.join(sorted(CUSTOM_TYPES))} (uniform full-head sub-networks "
            "for any family)"
        )
    cfg_cls, model_cls = standalone_module().CLASSES[CUSTOM_TYPES[mt]]
    d = src.to_dict()
    for k in ("model_type", "transformers_version", "architectures", "auto_map", "_name_or_path", OWN_TYPE_KEY):
        d.pop(k, None)
    layers_key, ffn_key = _LAYER_FFN_KEYS.get(mt, ("num_hidden_layers", "intermediate_size"))
    d[layers_key] = sub.layers
    d[ffn_key] = max(sub.ffn)  # only the construction width; every layer is resized to layer_ffn[i]
    d["layer_heads"] = list(sub.heads)
    d["layer_ffn"] = list(sub.ffn)
    cfg = cfg_cls.from_dict(d)
    impl = getattr(src, "_attn_implementation", None)
    if impl:
        cfg._attn_implementation = impl
    return cfg, model_cls, "instatune"


def extract_model(model: nn.Module, sub: SubNet) -> Any:
    """A new, physically smaller model holding only `sub`'s weights (the super-network is left untouched).

    A stock class of the family when `sub` keeps every head and one FFN width, else our per-layer class
    (see module docstring). Returned in eval mode, in the super-network's dtype.
    """
    adapter = adapter_of(model)
    dims = adapter.dims(model.config)
    check_subnet(dims, sub)
    cfg, cls, kind = _extracted_config(model, dims, sub)
    dtype = next(model.parameters()).dtype
    small = cls(cfg).to(dtype)
    sd = adapter.sliced_state_dict(model, sub)
    try:
        small.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # a shape/key mismatch is our bug, not the user's; keep the detail
        raise RuntimeError(f"extracted {kind} model does not match the sliced weights of {sub.name}: {e}"
                           ) from e
    small.eval()
    small._instatune_kind = kind  # type: ignore[attr-defined]
    return small


def write_hf_extracted(small: nn.Module, parent: nn.Module, sub: SubNet, tokenizer: Any, out: Path) -> dict[str, Any]:
    """The transformers families' files: `save_pretrained` layout, plus the per-layer class file and an
    `auto_map` for an `instatune` kind (module docstring)."""
    kind = small._instatune_kind
    # Which super-network layers these are is otherwise lost in the renumbering; informational only.
    small.config.instatune_kept_layers = adapter_of(parent).kept_layers(parent, sub)
    if kind == "instatune":
        save_per_layer(small, out, family_model_type(parent.config))
    else:
        (out / STANDALONE_FILE).unlink(missing_ok=True)  # a stale copy from an earlier save into out_dir
        small.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return {
        "model_type": small.config.model_type,
        "load_with": ("AutoModelForSequenceClassification.from_pretrained(dir)" if kind == "stock" else
                      "AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True) "
                      "or instatune_cli.extract.load_extracted(dir)"),
    }


def save_per_layer(model: nn.Module, out: Path, family_type: str | None = None) -> None:
    """Write our per-layer model as a directory that loads without instatune: `save_pretrained` layout, the
    standalone class file beside it and an `auto_map` to it, the family's stock `model_type` in config.json
    (module docstring). Used for extracts and for the `model/` of a run recovered from one."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_standalone_path(), out / STANDALONE_FILE)
    cfg_cls, model_cls = standalone_module().CLASSES[model.config.model_type]
    model.config.auto_map = {
        "AutoConfig": f"{STANDALONE_FILE[:-3]}.{cfg_cls.__name__}",
        "AutoModelForSequenceClassification": f"{STANDALONE_FILE[:-3]}.{model_cls.__name__}",
    }
    model.save_pretrained(out)
    _name_family_type(out / "config.json", family_type or family_model_type(model.config))


def _name_family_type(cfg_path: Path, family_type: str) -> None:
    """Write the family's stock `model_type` into a per-layer `config.json`, ours into `OWN_TYPE_KEY`, so a
    stock `AutoTokenizer.from_pretrained(dir)` does not prompt for remote code (module docstring)."""
    cfg = json.loads(cfg_path.read_text())
    cfg[OWN_TYPE_KEY], cfg["model_type"] = cfg["model_type"], family_type
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


_REGISTERED = False


def register_custom_classes() -> None:
    """Make our per-layer model types known to the Auto classes in this process (no remote code needed)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModelForSequenceClassification

    for model_type, (cfg_cls, model_cls) in standalone_module().CLASSES.items():
        AutoConfig.register(model_type, cfg_cls, exist_ok=True)
        AutoModelForSequenceClassification.register(cfg_cls, model_cls, exist_ok=True)
    _REGISTERED = True


def _config_json(p: Path) -> dict[str, Any]:
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise InstatuneError(f"{p} is not a model directory (no config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError:
        raise InstatuneError(f"{cfg_path} is not valid JSON") from None
    if not isinstance(cfg, dict):
        raise InstatuneError(f"{cfg_path} is not a JSON object")
    return cfg


def _own_type(cfg: dict[str, Any]) -> str | None:
    own = cfg.get(OWN_TYPE_KEY) or cfg.get("model_type")  # older per-layer dirs name ours in model_type
    return own if isinstance(own, str) and own.startswith("instatune_") else None


def is_per_layer_dir(model_dir: str | Path) -> bool:
    """Whether `model_dir` holds our per-layer model (an extract, or the `model/` of a run recovered from one)."""
    p = Path(model_dir)
    if not (p / "config.json").is_file():
        return False
    try:
        return _own_type(_config_json(p)) is not None
    except InstatuneError:
        return False


def _own_classes(p: Path, cfg: dict[str, Any]) -> tuple[Any, type]:
    """(config, model class) of a per-layer directory, from its config.json without remote code."""
    own = _own_type(cfg)
    classes = standalone_module().CLASSES
    if own not in classes:
        raise InstatuneError(f"{p} has model type {own!r}, unknown to this instatune; upgrade it")
    register_custom_classes()
    cfg_cls, model_cls = classes[own]
    # from the dict without the family's model_type: the config stays ours (config.model_type == own)
    return cfg_cls.from_dict({k: v for k, v in cfg.items() if k not in ("model_type", OWN_TYPE_KEY)}), model_cls


def extracted_config(model_dir: str | Path) -> Any:
    """The config of an extracted directory (ours for a per-layer one, the stock one otherwise), no weights read."""
    from transformers import AutoConfig

    p = Path(model_dir)
    cfg = _config_json(p)
    try:
        return _own_classes(p, cfg)[0] if _own_type(cfg) else AutoConfig.from_pretrained(p)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InstatuneError(f"cannot read the config of {p}: {first}") from None


def load_extracted(model_dir: str | Path, **kwargs: Any) -> Any:
    """Load an extracted directory (stock or per-layer) in eval mode, without trust_remote_code."""
    from transformers import AutoModelForSequenceClassification

    p = Path(model_dir)
    cfg = _config_json(p)
    try:
        if _own_type(cfg):
            config, model_cls = _own_classes(p, cfg)
            model = model_cls.from_pretrained(p, config=config, **kwargs)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(p, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InstatuneError(f"cannot load extracted model {p}: {first}") from None
    model.eval()
    return model
