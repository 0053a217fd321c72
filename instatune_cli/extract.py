"""Physically smaller models: slice a sub-network out of the elastic super-network and save it standalone.

A sub-network keeps L layers (which ones: the super-network's depth rule, docs/architecture.md "Depth
rule"; the k-th kept layer becomes layer k of the smaller model), the first h heads of each kept layer
(Q/K/V output rows and the attention-output input columns of those heads) and the first f FFN neurons
(FFN-in rows, FFN-out columns); embeddings, pooler and classifier are copied. Weights are sliced from the
super-network's *full* parameters (an elastic model's linears are views over them), so whatever sub-network
happens to be active does not matter.

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

`save_extracted` checks the result twice before returning: the extracted model's logits equal the
super-network's with `sub` active, and the reloaded directory's logits equal the extracted model's. It
returns a dict of what it measured for the stage manifest, including the depth rule and the super-network
indices of the kept layers (also written to `config.json` as the informational `instatune_kept_layers`,
which transformers keeps as a plain config attribute: stock loading is unaffected).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from instatune_cli.errors import InstatuneError
from instatune_cli.space import SubNet

if TYPE_CHECKING:
    import torch
    from torch import nn

STANDALONE_MODULE = "instatune_cli.adapters.standalone.modeling_instatune_bert"
STANDALONE_FILE = "modeling_instatune_bert.py"

#: family model_type -> our per-layer model_type in the standalone file
CUSTOM_TYPES = {
    "bert": "instatune_bert",
    "roberta": "instatune_roberta",
    "xlm-roberta": "instatune_roberta",
    "camembert": "instatune_roberta",
    "electra": "instatune_electra",
    "distilbert": "instatune_distilbert",
}

#: config.json key naming our per-layer model_type (its `model_type` is the family's; see the module docstring)
OWN_TYPE_KEY = "instatune_model_type"

#: config keys for (number of layers, FFN width) where a family does not use the BERT names
_LAYER_FFN_KEYS = {"distilbert": ("n_layers", "hidden_dim")}

#: shapes (batch, seq) of the random inputs used when the caller gives no batches
DEFAULT_CHECK_SHAPES = ((2, 16), (3, 9))
DEFAULT_ATOL = 1e-5


# ---- inputs -----------------------------------------------------------------------------------------

def input_names(model_or_config: Any) -> list[str]:
    """Inputs a classifier of this config takes in instatune's checks and ONNX graphs.

    `token_type_ids` only where the model has more than one token type (BERT, ELECTRA): RoBERTa's single
    type and DistilBERT's missing embedding would make it an input nobody's tokenizer fills.
    """
    config = getattr(model_or_config, "config", model_or_config)
    names = ["input_ids", "attention_mask"]
    if (getattr(config, "type_vocab_size", 0) or 0) > 1:
        names.append("token_type_ids")
    return names


def random_batch(config: Any, batch: int, seq_len: int, seed: int = 0,
                 pad: bool = True) -> dict[str, torch.Tensor]:
    """Token ids below the vocabulary size; with `pad`, the first row's tail is padding (mask 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(0, int(config.vocab_size), (batch, seq_len), generator=g)}
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    if pad and seq_len > 2:
        mask[0, seq_len - seq_len // 3:] = 0
    out["attention_mask"] = mask
    if "token_type_ids" in input_names(config):
        tt = torch.zeros(batch, seq_len, dtype=torch.long)
        tt[:, seq_len // 2:] = 1
        out["token_type_ids"] = tt
    return out


def family_batches(model: Any, shapes: Sequence[tuple[int, int]] = DEFAULT_CHECK_SHAPES,
                   seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random check batches of any family (its `random_batch`; image families ignore the sequence length)."""
    from instatune_cli.adapters import adapter_of

    fam = adapter_of(model)
    return [fam.random_batch(model, b, s, seed=seed + i) for i, (b, s) in enumerate(shapes)]


# ---- checks on the sub-network ----------------------------------------------------------------------

def check_subnet(dims: Any, sub: SubNet) -> None:
    """Refuse a sub-network the super-network cannot realise, naming the first offending gene."""
    if sub.layers > dims.num_layers:
        raise InstatuneError(
            f"sub-network {sub.name} keeps {sub.layers} layers but the model has {dims.num_layers}")
    for i, (h, f) in enumerate(zip(sub.heads, sub.ffn, strict=True)):
        if not 1 <= h <= dims.num_heads:
            raise InstatuneError(
                f"sub-network {sub.name}: layer {i} keeps {h} heads; the model has 1..{dims.num_heads}")
        if not 1 <= f <= dims.ffn:
            raise InstatuneError(
                f"sub-network {sub.name}: layer {i} keeps FFN width {f}; the model has 1..{dims.ffn}")


def is_stock_expressible(dims: Any, sub: SubNet) -> bool:
    """Every kept layer keeps all heads and the FFN width is the same everywhere."""
    return all(h == dims.num_heads for h in sub.heads) and len(set(sub.ffn)) == 1


# ---- extraction -------------------------------------------------------------------------------------

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


def per_layer_shape(config: Any) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(heads, FFN widths) per layer of a per-layer model (ours: `layer_heads` / `layer_ffn` in its config; also
    a stock config read from such a directory, which keeps them as plain attributes); None for a uniform one."""
    heads, ffn = getattr(config, "layer_heads", None), getattr(config, "layer_ffn", None)
    if not heads or not ffn:
        return None
    return tuple(int(h) for h in heads), tuple(int(f) for f in ffn)


def full_subnet(model: nn.Module) -> SubNet:
    """The sub-network that is the whole model: every layer, head and neuron it has (per layer for a per-layer
    model, e.g. a tune run recovered from a per-layer extract)."""
    from instatune_cli.adapters import adapter_of

    shape = per_layer_shape(getattr(model, "config", None))
    if shape is not None:
        return SubNet(*shape)
    dims = adapter_of(model).dims_of(model)
    return SubNet.make(dims.num_layers, dims.num_heads, dims.ffn)


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


def sliced_state_dict(model: nn.Module, sub: SubNet) -> dict[str, torch.Tensor]:
    """The super-network's state_dict restricted to `sub` (stock keys; kept layers sliced; others dropped)."""
    from instatune_cli.adapters import adapter_of

    adapter = adapter_of(model)
    dims = adapter.dims(model.config)
    names = {id(m): n for n, m in model.named_modules()}
    layers = adapter.layers(model)
    keep = adapter.kept_layers(model, sub)
    sd = dict(model.state_dict())
    dropped = tuple(names[id(layer)] + "." for i, layer in enumerate(layers) if i not in keep)
    if dropped:
        sd = {k: v for k, v in sd.items() if not k.startswith(dropped)}

    def put(lin: nn.Module, rows: int | None, cols: int | None) -> None:
        name = names[id(lin)]
        w = lin.weight.detach()
        r = w.shape[0] if rows is None else rows
        c = w.shape[1] if cols is None else cols
        sd[f"{name}.weight"] = w[:r, :c]
        if lin.bias is not None and rows is not None:
            sd[f"{name}.bias"] = lin.bias.detach()[:rows]

    for i, li in enumerate(keep):
        p = adapter.parts(layers[li])
        width = sub.heads[i] * dims.head_dim
        for lin in p.head_rows():
            put(lin, width, None)
        put(p.attn_out, None, width)
        put(p.ffn_in, sub.ffn[i], None)
        put(p.ffn_out, None, sub.ffn[i])
    # The k-th kept layer becomes layer k of the smaller model (e.g. `spread` keeps 1, 3, 5 -> 0, 1, 2).
    rename = {names[id(layers[li])] + ".": _renumbered(names[id(layers[li])], k) + "." for k, li in enumerate(keep)}
    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        prefix = next((old for old in rename if key.startswith(old)), None)
        out[rename[prefix] + key[len(prefix):] if prefix else key] = v.clone()
    return out


def _renumbered(layer_name: str, k: int) -> str:
    """`bert.encoder.layer.3` -> `bert.encoder.layer.<k>` (a ModuleList child's name ends in its index)."""
    head, _, _ = layer_name.rpartition(".")
    return f"{head}.{k}"


def depth_rule(model: nn.Module) -> str:
    """The super-network's depth rule (`first` for a model not made elastic: what it would keep)."""
    from instatune_cli.adapters import adapter_of

    return str(getattr(adapter_of(model).layer_list(model), "depth", "first"))


def extract_model(model: nn.Module, sub: SubNet) -> Any:
    """A new, physically smaller model holding only `sub`'s weights (the super-network is left untouched).

    A stock class of the family when `sub` keeps every head and one FFN width, else our per-layer class
    (see module docstring). Returned in eval mode, in the super-network's dtype.
    """
    from instatune_cli.adapters import adapter_of

    adapter = adapter_of(model)
    dims = adapter.dims(model.config)
    check_subnet(dims, sub)
    cfg, cls, kind = _extracted_config(model, dims, sub)
    dtype = next(model.parameters()).dtype
    small = cls(cfg).to(dtype)
    sd = sliced_state_dict(model, sub)
    try:
        small.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # a shape/key mismatch is our bug, not the user's; keep the detail
        raise RuntimeError(f"extracted {kind} model does not match the sliced weights of {sub.name}: {e}"
                           ) from e
    small.eval()
    small._instatune_kind = kind  # type: ignore[attr-defined]
    return small


# ---- verification -----------------------------------------------------------------------------------

def _elastic_state(model: nn.Module) -> list[tuple[nn.Module, dict[str, int]]]:
    """Snapshot of every elastic module's active sizes, to restore after a check."""
    out = []
    for m in model.modules():
        keys = [k for k in ("active", "active_out", "active_in") if k in m.__dict__]
        if keys:
            out.append((m, {k: m.__dict__[k] for k in keys}))
    return out


def _restore(state: list[tuple[nn.Module, dict[str, int]]]) -> None:
    for m, vals in state:
        for k, v in vals.items():
            setattr(m, k, v)


def max_logit_diff(a: nn.Module, b: nn.Module, batches: Sequence[dict[str, Any]]) -> float:
    """Largest |logits(a) − logits(b)| over the batches, both in eval mode without grad."""
    import torch

    from instatune_cli.adapters import adapter_of

    fa, fb = adapter_of(a), adapter_of(b)
    worst = 0.0
    modes = (a.training, b.training)
    a.eval()
    b.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                la = fa.logits(a, batch).float()
                lb = fb.logits(b, batch).float()
                if la.shape != lb.shape:
                    raise RuntimeError(f"logit shapes differ: {tuple(la.shape)} vs {tuple(lb.shape)}")
                worst = max(worst, (la - lb).abs().max().item())
    finally:
        a.train(modes[0])
        b.train(modes[1])
    return worst


def verify_extracted(model: nn.Module, sub: SubNet, extracted: nn.Module,
                     batches: Sequence[dict[str, Any]] | None = None,
                     atol: float = DEFAULT_ATOL) -> dict[str, Any]:
    """Compare the extracted model's logits with the super-network's with `sub` active.

    The super-network's active sub-network and train/eval mode are restored afterwards (a model that is
    not elastic yet is made elastic in place, which does not change what it computes). Raises
    InstatuneError when the largest difference exceeds `atol`.
    """
    from instatune_cli.adapters import adapter_of

    adapter = adapter_of(model)
    batches = list(batches) if batches else family_batches(model)
    if not hasattr(adapter.layer_list(model), "active"):
        adapter.make_elastic(model)
    state = _elastic_state(model)
    try:
        adapter.activate(model, sub)
        diff = max_logit_diff(model, extracted, batches)
    finally:
        _restore(state)
    shapes = [list(next(iter(b.values())).shape) for b in batches]
    if not diff <= atol:
        raise InstatuneError(
            f"extracted {sub.name} differs from the super-network with it active: max |Δlogit| "
            f"{diff:.3g} > {atol:g}"
        )
    return {"max_abs_diff": diff, "atol": atol, "check_shapes": shapes}


# ---- save / load ------------------------------------------------------------------------------------

def safetensors_files(model_dir: str | Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def safetensors_header_bytes(path: str | Path) -> int:
    """Bytes of a safetensors file that are not tensor data: the 8-byte length plus the JSON header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


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


def save_extracted(model: nn.Module, sub: SubNet, tokenizer: Any, out_dir: str | Path,
                   batches: Sequence[dict[str, Any]] | None = None,
                   atol: float = DEFAULT_ATOL) -> dict[str, Any]:
    """Extract `sub`, check it, write a standalone model directory to `out_dir`, reload it and check again.

    Family-independent: the family's `extract`, `save_extracted` and `load_extracted` do the work
    (`tokenizer` is the family's preprocessor). `out_dir` may exist (a stage's partial directory); files of
    the same name are replaced. Returns what was measured: kind, model type, depth rule and kept layer
    indices (of the super-network), params (counted and closed form), weight bytes, logit differences.
    """
    from instatune_cli.adapters import adapter_of
    from instatune_cli.measure.size import weights_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter = adapter_of(model)
    dims = adapter.dims_of(model)
    batches = list(batches) if batches else family_batches(model)

    check_subnet(dims, sub)
    small = adapter.extract(model, sub)
    kind = small._instatune_kind
    check = verify_extracted(model, sub, small, batches, atol)
    kept = adapter.kept_layers(model, sub)
    written = adapter.save_extracted(small, model, sub, tokenizer, out)
    readable_files(out)

    reloaded = adapter.load_extracted(out)
    reload_diff = max_logit_diff(small, reloaded, batches)
    if not reload_diff <= atol:
        raise InstatuneError(
            f"{out} reloads with different logits (max |Δ| {reload_diff:.3g}); the save is broken")

    n_params = sum(p.numel() for p in small.parameters())
    expected = adapter.params(dims, sub)
    files = safetensors_files(out)
    header = sum(safetensors_header_bytes(f) for f in files)
    elem = next(small.parameters()).element_size()
    return {
        "kind": kind,
        "model_type": written.get("model_type", getattr(getattr(small, "config", None), "model_type", dims.family)),
        "architecture": type(small).__name__,
        "subnet": sub.to_dict(),
        "subnet_id": sub.id,
        "subnet_name": sub.name,
        "depth_rule": depth_rule(model),
        "kept_layers": kept,
        "params": n_params,
        "params_closed_form": expected,
        "params_match": n_params == expected,
        "weights_bytes": weights_bytes(out),
        "safetensors_header_bytes": header,
        "bytes_per_param": elem,
        "weights_bytes_expected": elem * n_params + header,
        "max_abs_diff": check["max_abs_diff"],
        "reload_max_abs_diff": reload_diff,
        "atol": atol,
        "check_shapes": check["check_shapes"],
        "load_with": written["load_with"],
    }


def write_hf_extracted(small: nn.Module, parent: nn.Module, sub: SubNet, tokenizer: Any, out: Path) -> dict[str, Any]:
    """The transformers families' files: `save_pretrained` layout, plus the per-layer class file and an
    `auto_map` for an `instatune` kind (module docstring)."""
    from instatune_cli.adapters import adapter_of

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
