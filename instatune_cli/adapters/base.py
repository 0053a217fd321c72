"""The one interface every model family implements (docs/architecture.md, "Families").

A family adapter decides everything that differs between model families, and nothing else in instatune
does: loading a model and its preprocessor (tokenizer or image transform), encoding data, the forward that
returns logits, the inputs of an exported graph, MACs and params in closed form, where the layers and the
sliceable linears are (and how a fused or fixed-head attention runs elastic), and extraction to a smaller
model that loads without instatune. Stages call only these methods, so a new family is one file with one
`@register_family` line (or an `instatune.families` entry point) and touches no stage module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from instatune_cli import data as D
from instatune_cli.adapters import model_family
from instatune_cli.errors import InstatuneError
from instatune_cli.measure.metrics import is_regression
from instatune_cli.space import DEPTH_RULES, ModelDims, SubNet, kept_layers

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class LayerParts:
    """The six linears of one encoder layer that elasticity slices."""

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attn_out: nn.Linear
    ffn_in: nn.Linear
    ffn_out: nn.Linear

    def head_rows(self) -> list[nn.Linear]:
        """Linears whose *output* rows are grouped by head."""
        return [self.query, self.key, self.value]


#: the six linears of a layer, as a precision policy names them (docs/architecture.md, "Quantization")
PARTS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
MAX_LAYERS = 1024  # of a policy's architecture, as of a search space (space.MAX_SPACE_LAYERS)


def layer_names(num_layers: int, parts: Sequence[str] = PARTS) -> list[str]:
    """Logical names of the linears of `num_layers` layers, in gene order (layer-major, `parts` order)."""
    return [f"layer.{k}.{p}" for k in range(num_layers) for p in parts]


@dataclass(frozen=True)
class Architecture:
    """What a precision policy was made for (`quant_architecture`): layer k of another architecture is another
    layer. Recorded in every policy file (`quantize/policy.py`)."""

    model_type: str
    hidden: int
    head_dim: int
    heads: tuple[int, ...]
    ffn: tuple[int, ...]
    num_labels: int = 2
    head_linears: tuple[str, ...] = ("pooler", "classifier")
    parts: tuple[str, ...] = PARTS  # the quantizable linears of one layer (the family's; module docstring)
    embeddings: bool = True         # a word-embedding table to quantize

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    def names(self) -> list[str]:
        """Every logical name this architecture has, in gene order."""
        return [*(["embeddings"] if self.embeddings else []), *layer_names(self.num_layers, self.parts),
                *self.head_linears]

    def describe(self) -> str:
        return (f"{self.model_type} L{self.num_layers} hidden {self.hidden} heads {list(self.heads)} "
                f"ffn {list(self.ffn)}")

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "hidden": self.hidden, "head_dim": self.head_dim,
                "heads": list(self.heads), "ffn": list(self.ffn), "num_labels": self.num_labels,
                "head_linears": list(self.head_linears),
                **({"parts": list(self.parts)} if self.parts != PARTS else {}),
                **({"embeddings": False} if not self.embeddings else {})}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Architecture:
        if len(d["heads"]) > MAX_LAYERS or len(d["ffn"]) > MAX_LAYERS:
            raise ValueError(f"more than {MAX_LAYERS} layers")
        return cls(str(d["model_type"]), int(d["hidden"]), int(d["head_dim"]), tuple(int(h) for h in d["heads"]),
                   tuple(int(f) for f in d["ffn"]), int(d.get("num_labels", 2)),
                   tuple(d.get("head_linears", ("pooler", "classifier"))), tuple(d.get("parts", PARTS)),
                   bool(d.get("embeddings", True)))

    def same_as(self, other: Architecture) -> bool:
        """Equal up to our per-layer model types (`instatune_bert` is a `bert` with per-layer shapes) and the
        aliases a family declares (`model_family`)."""
        return (model_family(self.model_type) == model_family(other.model_type) and self.hidden == other.hidden
                and self.head_dim == other.head_dim and self.heads == other.heads and self.ffn == other.ffn
                and self.num_labels == other.num_labels and self.head_linears == other.head_linears
                and self.parts == other.parts and self.embeddings == other.embeddings)


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The task loss: cross-entropy for class ids, MSE of the one output for float labels (regression). What
    `importance` differentiates and `tune/loss.py` trains with."""
    from torch.nn import functional as F

    if labels.is_floating_point():
        return F.mse_loss(logits.float().view(-1), labels.float().view(-1))
    return F.cross_entropy(logits.float(), labels)


def check_subnet(dims: ModelDims, sub: SubNet) -> None:
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


def _renumbered(layer_name: str, k: int) -> str:
    """`bert.encoder.layer.3` -> `bert.encoder.layer.<k>` (a ModuleList child's name ends in its index)."""
    head, _, _ = layer_name.rpartition(".")
    return f"{head}.{k}"


class FamilyAdapter(ABC):
    """Load, make elastic, activate, reorder by importance, extract, count MACs for one model family."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    #: "text" (token ids; `--task` GLUE names or text files) or "image" (`--task imagefolder`)
    modality: str = "text"
    #: input names of the family's classifier and exported graphs (a family may refine per model)
    inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    #: model types that are another one's architecture under another name (manifest `model.family`,
    #: policy architectures; `adapters.model_family`)
    aliases: ClassVar[dict[str, str]] = {}

    # Capabilities: what stages ask instead of testing `modality` ---------------------------------
    #: `forward(..., hidden_states=True)` returns per-layer hidden states (`tune --hidden-distill`)
    hidden_states: bool = False
    #: the preprocessor may come from another directory (`tune --tokenizer`)
    separate_preprocessor: bool = True
    #: `quantize --engine` values that work on this family's models
    quant_engines: tuple[str, ...] = ("ort",)
    #: `quantize --trim-vocab` (the preprocessor has a vocabulary and `unk_token_id`)
    vocab_trim: bool = False
    #: `search --quant`: the joint precision search (`quantize/emulate.py` on the six `parts` of each layer)
    quant_search: bool = False

    def supports(self, model_type: str) -> bool:
        return model_type in self.model_types

    # What a family decides (docs/architecture.md, "Families") -------------------------------

    def claims(self, src: str, config: dict[str, Any] | None) -> bool:
        """Whether this family loads `src`: a local directory whose `config.json` is `config`, or (config
        None) a name such as a hub or registry id. The registry asks every family in turn."""
        return config is not None and str(config.get("model_type")) in self.model_types

    @abstractmethod
    def load(self, src: str, *, id2label: dict[int, str] | None = None, num_labels: int | None = None,
             eager: bool = False) -> nn.Module:
        """A classifier from a checked source (local directory or id), with `id2label`'s classes when given
        (a fresh head where the source has other classes). `model.config` carries `model_type`,
        `num_labels`, `id2label`. `eager`: attention as explicit matmuls (for MAC counters)."""

    def load_config(self, src: str) -> Any:
        """The model's config (what `dims` reads) without building it where the family can; by default the
        model is loaded and its config returned."""
        return self.load(src).config

    def load_data(self, cfg: Any) -> Any:
        """The task's train / validation / eval splits (`data.TaskData`) from the tune options `cfg` (`task`,
        `data`, `eval_data`, `val_split`, `val_data`, `seed`, column names, `limit_train`, `limit_eval`)."""
        if cfg.task == "imagefolder":
            raise InstatuneError(f"--task imagefolder needs an image model (a timm ViT, DeiT or BEiT); {cfg.model} is "
                                 f"a {self.family} text model")
        data = D.load_task_data(cfg.task, cfg.data, cfg.eval_data, cfg.text_column, cfg.text_pair_column,
                                cfg.label_column, cfg.limit_train, cfg.limit_eval,
                                regression=bool(cfg.metric) and is_regression(cfg.metric))
        c = data.source.get("columns") or {}
        columns = D.Columns(c["text"], c["label"], c.get("text_pair")) if c else None
        return D.with_validation(data, cfg.val_split, cfg.val_data, cfg.seed, columns)

    def max_length(self, requested: int, preprocessor: Any, config: Any, dims: ModelDims) -> int:
        """The sequence length the run trains at: `requested`, capped by the tokenizer and the position table
        (text), or fixed by the model (images)."""
        return dims.image_tokens or requested

    def is_per_layer_dir(self, model_dir: str | Path) -> bool:
        """Whether `model_dir` holds this family's per-layer model (an extract, or the `model/` of a run recovered
        from one), which instatune loads itself, never by running the file copied beside it."""
        return False

    def load_saved(self, model_dir: str | Path, *, eager: bool = False) -> nn.Module:
        """A model this family saved with `save` (a tune run's super-network)."""
        return self.load(str(model_dir), eager=eager)

    @abstractmethod
    def load_preprocessor(self, src: str | Path) -> Any:
        """The tokenizer (text) or image preprocessing (image) that goes with `src`."""

    @abstractmethod
    def save(self, model: nn.Module, preprocessor: Any, out_dir: str | Path) -> None:
        """Write `model` and its preprocessor to `out_dir` in the family's stock layout."""

    def save_preprocessor(self, preprocessor: Any, out_dir: str | Path) -> None:
        """Write the preprocessor alone (beside an exported graph)."""
        save = getattr(preprocessor, "save_pretrained", None) or preprocessor.save
        save(str(out_dir))

    @abstractmethod
    def encode(self, preprocessor: Any, split: Any, max_length: int, train: bool = False) -> Any:
        """A `data.Split` made ready for batching (`collate(idx)`, `lengths()`, `digest()`, `labels`);
        `train=True` may add augmentation."""

    def eval_batches(self, encoded: Any, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
        """Batches for scoring (order does not matter)."""
        return [encoded.collate(range(s, min(s + batch_size, len(encoded)))) for s in range(0, len(encoded),
                                                                                           batch_size)]

    def model_inputs(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """The keys of `batch` the model's forward takes (labels and extras dropped), on the model's device."""
        keep = set(self.input_names(model))
        device = next(model.parameters()).device
        return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items() if k in keep}

    def logits(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The classifier's logits for a batch (extra keys such as labels are ignored)."""
        return self.forward(model, self.model_inputs(model, batch))[0]

    def forward(self, model: nn.Module, inputs: dict[str, Any], hidden_states: bool = False
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """(logits, per-layer hidden states when asked) for inputs already filtered by `model_inputs`;
        `model` may be wrapped (DDP). A family without hidden states returns None for them."""
        out = model(**inputs)
        return (out if not hasattr(out, "logits") else out.logits), None

    def input_names(self, model_or_config: Any) -> list[str]:
        """Names of the classifier's inputs, in the order of exported graphs."""
        return list(self.inputs)

    @abstractmethod
    def random_batch(self, model_or_config: Any, batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Valid random inputs (for equivalence checks, ONNX export and latency); `seq_len` is ignored by
        families whose sequence length is fixed by the model (images)."""

    def dims_of(self, model: nn.Module) -> ModelDims:
        return self.dims(model.config)

    def seq_len(self, dims: ModelDims, default: int) -> int:
        """The sequence length MACs and latency are measured at: fixed by an image model, else `default`."""
        return dims.image_tokens or default

    @abstractmethod
    def macs(self, dims: ModelDims, sub: SubNet, seq: int) -> int:
        """Exact multiply-accumulates of `sub` at batch 1 (closed form)."""

    @abstractmethod
    def params(self, dims: ModelDims, sub: SubNet) -> int:
        """Exact parameters of the model `extract` makes for `sub`."""

    @abstractmethod
    def extract(self, model: nn.Module, sub: SubNet) -> nn.Module:
        """A new, physically smaller model holding only `sub`'s weights, in eval mode; sets `_instatune_kind`
        ("stock": loads with the family's stock loader; "instatune": needs the file saved beside it)."""

    def sliced_state_dict(self, model: nn.Module, sub: SubNet) -> dict[str, torch.Tensor]:
        """The super-network's state_dict restricted to `sub` (stock keys; kept layers sliced from the full
        parameters, the k-th kept layer renumbered k; other layers dropped): what `extract` loads."""
        dims = self.dims(model.config)
        names = {id(m): n for n, m in model.named_modules()}
        layers = self.layers(model)
        keep = self.kept_layers(model, sub)
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
            p = self.parts(layers[li])
            width = sub.heads[i] * dims.head_dim
            for lin in p.head_rows():
                put(lin, width, None)
            put(p.attn_out, None, width)
            put(p.ffn_in, sub.ffn[i], None)
            put(p.ffn_out, None, sub.ffn[i])
        # The k-th kept layer becomes layer k of the smaller model (e.g. `spread` keeps 1, 3, 5 -> 0, 1, 2).
        rename = {names[id(layers[li])] + ".": _renumbered(names[id(layers[li])], k) + "."
                  for k, li in enumerate(keep)}
        out: dict[str, torch.Tensor] = {}
        for key, v in sd.items():
            prefix = next((old for old in rename if key.startswith(old)), None)
            out[rename[prefix] + key[len(prefix):] if prefix else key] = v.clone()
        return out

    @abstractmethod
    def save_extracted(self, small: nn.Module, parent: nn.Module, sub: SubNet, preprocessor: Any,
                       out_dir: str | Path) -> dict[str, Any]:
        """Write `extract`'s result to `out_dir` so it loads without instatune; returns {"load_with": ...}."""

    # Export and quantization (docs/architecture.md, "Quantization") --------------------------------

    def graph_module(self, model: nn.Module, names: Sequence[str]) -> nn.Module:
        """A module taking exactly the graph inputs `names` positionally, in that order, and returning the
        logits alone: what ONNX export and torch.export trace (`forward` on a dict of them)."""
        from torch import nn

        family, keys = self, list(names)

        class LogitsOnly(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def logits(self, *xs: Any) -> Any:
                return family.forward(self.model, dict(zip(keys, xs, strict=True)))[0]

        # one positional parameter per input: torch.export matches dynamic shapes to the signature
        forwards: dict[int, Any] = {
            1: lambda self, a: self.logits(a),
            2: lambda self, a, b: self.logits(a, b),
            3: lambda self, a, b, c: self.logits(a, b, c),
            4: lambda self, a, b, c, d: self.logits(a, b, c, d),
        }
        if len(keys) not in forwards:
            raise ValueError(f"unsupported graph inputs {keys}")
        return type("LogitsOnly", (LogitsOnly,), {"forward": forwards[len(keys)]})().eval()

    def max_sequence_length(self, config: Any) -> int:
        """Longest sequence the model takes (the exported graph's sequence axis); 0 where the model fixes its
        input size (images: the graph has no sequence axis)."""
        return int(getattr(config, "max_position_embeddings", 512))

    def optimize_onnx(self, onnx_path: Path) -> dict[str, Any] | None:
        """Fuse an exported graph in place for ONNX Runtime and say what fired; None where the family has no
        graph rewrites (the graph ships as exported)."""
        return None

    def embedding_table(self, model: nn.Module) -> nn.Module | None:
        """The token-embedding table a policy may quantize (`embeddings`), or None: transformers'
        `get_input_embeddings()` where the model has it."""
        get = getattr(model, "get_input_embeddings", None)
        return get() if callable(get) else None

    def head_linears(self, model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
        """The linears outside the encoder layers, by logical name: `pooler` (if two) and `classifier`."""
        from torch import nn

        inside = {id(m) for layer in self.layers(model) for m in layer.modules()}
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in inside]
        if not 1 <= len(found) <= 2:
            raise InstatuneError(f"expected one or two head linears outside the layers, found {[n for n, _ in found]}")
        names = ("pooler", "classifier") if len(found) == 2 else ("classifier",)
        return dict(zip(names, found, strict=True))

    def quant_targets(self, model: nn.Module, sub: SubNet | None = None) -> dict[str, tuple[str, nn.Module]]:
        """Logical quantization target -> (module path, module): the embedding table, the six `parts` of each
        layer, the head linears. With `sub`, layer k is the sub-network's k-th kept layer of a super-network
        (the depth rule); without, the model's own layers (an extracted model)."""
        paths = {id(m): n for n, m in model.named_modules()}
        layers = self.layers(model)
        kept = self.kept_layers(model, sub) if sub is not None else list(range(len(layers)))
        emb = self.embedding_table(model)
        out: dict[str, tuple[str, nn.Module]] = {"embeddings": (paths[id(emb)], emb)} if emb is not None else {}
        for k, li in enumerate(kept):
            p = self.parts(layers[li])
            for part in PARTS:
                m = getattr(p, part)
                out[f"layer.{k}.{part}"] = (paths[id(m)], m)
        out.update(self.head_linears(model))
        return out

    def quant_architecture(self, model: nn.Module, sub: SubNet | None = None) -> Architecture:
        """The architecture a policy for this model (or this sub-network of a super-network) is made for."""
        dims = self.dims_of(model)
        if sub is not None:
            heads, ffn = tuple(sub.heads), tuple(sub.ffn)
        else:
            parts = [self.parts(layer) for layer in self.layers(model)]
            heads = tuple(p.query.out_features // dims.head_dim for p in parts)
            ffn = tuple(p.ffn_in.out_features for p in parts)
        return Architecture(str(getattr(model.config, "model_type", self.family)), dims.hidden, dims.head_dim, heads,
                            ffn, dims.num_labels, tuple(self.head_linears(model)),
                            embeddings=self.embedding_table(model) is not None)

    @abstractmethod
    def load_extracted(self, model_dir: str | Path) -> nn.Module:
        """Load what `save_extracted` wrote, in eval mode."""

    @abstractmethod
    def dims(self, config: Any) -> ModelDims:
        """Shape of the full model from its (transformers) config."""

    @abstractmethod
    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        """The encoder's ModuleList of layers."""

    @abstractmethod
    def parts(self, layer: nn.Module) -> LayerParts:
        """The sliceable linears of one layer."""

    # Generic behaviour, written once against layer_list/parts --------------------------------

    def layers(self, model: nn.Module) -> list[nn.Module]:
        ll = self.layer_list(model)
        return ll.all_layers() if hasattr(ll, "all_layers") else list(ll)

    def make_elastic(self, model: nn.Module, depth: str = "first") -> nn.Module:
        """Make `model` elastic in place (idempotent); adds no layer and no parameter.

        `depth` is the space's depth rule: which layers a depth-L sub-network keeps (`space.kept_layers`).
        """
        from instatune_cli.adapters.elastic import ElasticLayerList  # lazy: imports torch; this module does not

        if depth not in DEPTH_RULES:
            raise ValueError(f"unknown depth rule {depth!r}; use one of {DEPTH_RULES}")
        ElasticLayerList.wrap(self.layer_list(model), depth)
        for layer in self.layers(model):
            self.elastic_layer(layer)
        model._instatune_adapter = self  # type: ignore[attr-defined]
        return model

    def kept_layers(self, model: nn.Module, sub: SubNet | None) -> list[int]:
        """Indices of the layers `sub` keeps under the model's depth rule (None: every layer)."""
        n = len(self.layers(model))
        if sub is None:
            return list(range(n))
        if sub.layers > n:
            raise ValueError(f"{sub.name} keeps {sub.layers} layers, model has {n}")
        return kept_layers(sub.layers, n, getattr(self.layer_list(model), "depth", "first"))

    def activate(self, model: nn.Module, sub: SubNet | None) -> None:
        """Run `sub` (None = the full super-network): the layers its depth rule keeps (`kept_layers`), the
        first h heads and the first f FFN neurons of each; gene k of `sub` belongs to the k-th kept layer."""
        dims = self.dims_of(model)
        ll = self.layer_list(model)
        if not hasattr(ll, "active"):
            raise RuntimeError("model is not elastic; call make_elastic first")
        layers = self.layers(model)
        keep = self.kept_layers(model, sub)
        ll.active = tuple(keep)
        for layer in layers:
            self.reset_layer(layer)
        if sub is None:
            return
        for i, li in enumerate(keep):
            self.set_layer(layers[li], sub.heads[i], sub.ffn[i], dims.head_dim)

    # Per-layer hooks: the default is six separate linears (`parts`); a family whose attention is fused or
    # reshapes with a fixed head count overrides these four (e.g. adapters/vit.py).

    def elastic_layer(self, layer: nn.Module) -> None:
        """Make one layer's sliceable modules elastic, in place."""
        from instatune_cli.adapters.elastic import ElasticLinear  # lazy: imports torch; this module does not

        p = self.parts(layer)
        for lin in (p.query, p.key, p.value, p.attn_out, p.ffn_in, p.ffn_out):
            ElasticLinear.wrap(lin)

    def reset_layer(self, layer: nn.Module) -> None:
        """Every head and neuron of the layer active."""
        p = self.parts(layer)
        for lin in (p.query, p.key, p.value, p.attn_out, p.ffn_in, p.ffn_out):
            lin.reset()

    def set_layer(self, layer: nn.Module, heads: int, ffn: int, head_dim: int) -> None:
        """Keep the first `heads` heads and the first `ffn` FFN neurons of the layer."""
        p = self.parts(layer)
        width = heads * head_dim
        for lin in p.head_rows():
            lin.active_out = width
        p.attn_out.active_in = width
        p.ffn_in.active_out = ffn
        p.ffn_out.active_in = ffn

    def permute_layer(self, layer: nn.Module, rows: torch.Tensor, neurons: torch.Tensor) -> None:
        """Reorder the layer's head rows (`rows`: every row index of the new head order) and FFN neurons."""
        p = self.parts(layer)
        for lin in p.head_rows():
            lin.weight.copy_(lin.weight[rows])
            if lin.bias is not None:
                lin.bias.copy_(lin.bias[rows])
        p.attn_out.weight.copy_(p.attn_out.weight[:, rows])
        p.ffn_in.weight.copy_(p.ffn_in.weight[neurons])
        if p.ffn_in.bias is not None:
            p.ffn_in.bias.copy_(p.ffn_in.bias[neurons])
        p.ffn_out.weight.copy_(p.ffn_out.weight[:, neurons])

    def layer_scores(self, layer: nn.Module, score: Any, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-head, per-neuron) importance of one layer: `score(weight)` summed over each unit's weights."""
        p = self.parts(layer)
        hs = sum(score(lin.weight).sum(1) for lin in p.head_rows()) + score(p.attn_out.weight).sum(0)
        ns = score(p.ffn_in.weight).sum(1) + score(p.ffn_out.weight).sum(0)
        return hs.view(-1, head_dim).sum(1), ns

    # Importance reordering -------------------------------------------------------------------

    def permute(self, model: nn.Module, head_orders: list[list[int]], neuron_orders: list[list[int]]) -> None:
        """Reorder heads and FFN neurons of every layer so prefixes keep the chosen units.

        A consistent permutation of Q/K/V output rows (by whole heads) with attention-output input columns,
        and of FFN-in rows with FFN-out columns, leaves the full model's function unchanged.
        """
        import torch

        dh = self.dims_of(model).head_dim
        with torch.no_grad():
            for layer, horder, norder in zip(self.layers(model), head_orders, neuron_orders, strict=True):
                rows = torch.tensor([h * dh + j for h in horder for j in range(dh)])
                self.permute_layer(layer, rows, torch.tensor(norder))

    def importance(self, model: nn.Module, batches: list[dict[str, torch.Tensor]] | None = None
                   ) -> tuple[list[list[float]], list[list[float]]]:
        """Per-layer head and FFN-neuron importance.

        With batches: first-order Taylor |w · dL/dw| summed over each unit's weights (the criterion
        DynaBERT's head/neuron masks approximate, without needing mask hooks in the family's code).
        Without: L2 norm of each unit's weights (data-free fallback).
        """
        import torch

        dh = self.dims_of(model).head_dim
        self.activate(model, None)
        if batches:
            was_training = model.training
            model.eval()
            model.zero_grad(set_to_none=True)
            for b in batches:
                task_loss(self.logits(model, b), b["labels"].to(next(model.parameters()).device)).backward()
            model.train(was_training)
        heads_out: list[list[float]] = []
        neurons_out: list[list[float]] = []

        def score(w: torch.Tensor) -> torch.Tensor:
            if batches and w.grad is not None:
                return (w * w.grad).abs()
            return w.pow(2)

        for layer in self.layers(model):
            with torch.no_grad():
                hs, ns = self.layer_scores(layer, score, dh)
            heads_out.append(hs.tolist())
            neurons_out.append(ns.tolist())
        if batches:
            model.zero_grad(set_to_none=True)
        return heads_out, neurons_out

    def reorder_by_importance(self, model: nn.Module, batches: list[dict[str, torch.Tensor]] | None = None
                              ) -> dict[str, Any]:
        """Sort heads and neurons by descending importance; returns the orders applied (for the manifest)."""
        hs, ns = self.importance(model, batches)
        horders = [sorted(range(len(s)), key=lambda i, s=s: -s[i]) for s in hs]
        norders = [sorted(range(len(s)), key=lambda i, s=s: -s[i]) for s in ns]
        self.permute(model, horders, norders)
        return {"method": "taylor" if batches else "magnitude", "head_orders": horders}
