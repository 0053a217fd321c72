"""Per-layer INT8/FP32 policies: one format for both engines and for the joint search (docs/architecture.md,
"Quantization").

A policy names *logical* layers, so the same file drives PyTorch (Neural Compressor) and ONNX Runtime:

- `embeddings`: the word-embedding table (half of all-MiniLM-L6-v2's weights; INT8 Gather);
- `layer.{k}.{query,key,value,attn_out,ffn_in,ffn_out}`: the six linears of the k-th layer of the model being
  quantized (an extracted sub-network numbers its kept layers 0..L-1);
- `pooler`, `classifier`: the linears of the head (a family with one head linear has only `classifier`).

A family whose layers are shaped otherwise names its own parts (the architecture records them): timm ViT has
`layer.{k}.{qkv,attn_out,ffn_in,ffn_out}` (Q, K and V are one fused linear), no quantized embedding table, and
`classifier` (plus `classifier_dist` for a distilled DeiT).

Each is `int8` or `fp32`. The policy also records the architecture it was made for (model type, hidden size,
heads and FFN width of every layer); applying it to another architecture is refused, because layer k of
another sub-network is a different layer. Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instatune_cli.errors import InstatuneError

SCHEMA = "instatune.quant_policy"
VERSION = 1
PARTS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
GLOBAL = ("embeddings", "pooler", "classifier")
PRECISIONS = ("int8", "fp32")


def layer_names(num_layers: int, parts: Sequence[str] = PARTS) -> list[str]:
    """Logical names of the linears of `num_layers` layers, in gene order (layer-major, `parts` order)."""
    return [f"layer.{k}.{p}" for k in range(num_layers) for p in parts]


@dataclass(frozen=True)
class Architecture:
    """What a policy was made for: layer k of another architecture is another layer."""

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
        """Equal up to our per-layer model types (`instatune_bert` is a `bert` with per-layer shapes)."""
        def base(t: str) -> str:
            return t.removeprefix("instatune_").replace("xlm-roberta", "roberta").replace("camembert", "roberta")

        return (base(self.model_type) == base(other.model_type) and self.hidden == other.hidden
                and self.head_dim == other.head_dim and self.heads == other.heads and self.ffn == other.ffn
                and self.num_labels == other.num_labels and self.head_linears == other.head_linears
                and self.parts == other.parts and self.embeddings == other.embeddings)


@dataclass
class QuantPolicy:
    """INT8 or FP32 for every logical layer of one architecture."""

    architecture: Architecture
    layers: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        names = set(self.architecture.names())
        unknown = [n for n in self.layers if n not in names]
        if unknown:
            raise InstatuneError(
                f"policy names layers this model does not have: {', '.join(unknown[:4])}"
                f"{' ...' if len(unknown) > 4 else ''} (it has {self.architecture.num_layers} layers; "
                f"names are {'embeddings, ' if self.architecture.embeddings else ''}"
                f"layer.K.{{{','.join(self.architecture.parts)}}}, {', '.join(self.architecture.head_linears)})")
        bad = {n: v for n, v in self.layers.items() if v not in PRECISIONS}
        if bad:
            n, v = next(iter(bad.items()))
            raise InstatuneError(f"policy sets {n} to {v!r}; use one of {', '.join(PRECISIONS)}")
        for n in names:  # complete: every layer is stated, so the file says exactly what was done
            self.layers.setdefault(n, "int8")

    @classmethod
    def uniform(cls, arch: Architecture, precision: str = "int8", source: str = "") -> QuantPolicy:
        return cls(arch, {n: precision for n in arch.names()}, source or f"all-{precision}")

    @classmethod
    def from_bits(cls, arch: Architecture, bits: Sequence[int], source: str = "search") -> QuantPolicy:
        """From genes in `Architecture.names()` order: 1 = INT8, 0 = FP32."""
        names = arch.names()
        if len(bits) != len(names):
            raise InstatuneError(f"{len(bits)} precision genes for {len(names)} layers of {arch.describe()}")
        return cls(arch, {n: "int8" if b else "fp32" for n, b in zip(names, bits, strict=True)}, source)

    def bits(self) -> list[int]:
        return [1 if self.layers[n] == "int8" else 0 for n in self.architecture.names()]

    def int8(self) -> list[str]:
        return [n for n in self.architecture.names() if self.layers[n] == "int8"]

    def fp32(self) -> list[str]:
        return [n for n in self.architecture.names() if self.layers[n] == "fp32"]

    def summary(self) -> str:
        """`41/39 INT8` style count plus the FP32 layers when few."""
        fp = self.fp32()
        tail = f" (FP32: {', '.join(fp)})" if 0 < len(fp) <= 4 else ""
        return f"{len(self.int8())}/{len(self.layers)} layers INT8{tail}"

    def check_for(self, arch: Architecture, where: str = "the model") -> None:
        if not self.architecture.same_as(arch):
            raise InstatuneError(
                f"the policy was made for {self.architecture.describe()}, not {where} ({arch.describe()}); "
                "use the policy searched for this sub-network, or --all-int8")

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "version": VERSION, "architecture": self.architecture.to_dict(),
                "source": self.source, "layers": {n: self.layers[n] for n in self.architecture.names()}}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "policy") -> QuantPolicy:
        if not isinstance(d, Mapping) or d.get("schema") != SCHEMA:
            raise InstatuneError(f"{where} is not an instatune quantization policy (no \"schema\": \"{SCHEMA}\")")
        if int(d.get("version", 0)) != VERSION:
            raise InstatuneError(f"{where} has policy version {d.get('version')}; this instatune reads {VERSION}")
        try:
            arch = Architecture.from_dict(d["architecture"])
            layers = {str(k): str(v) for k, v in dict(d["layers"]).items()}
        except (KeyError, TypeError, ValueError) as e:
            raise InstatuneError(f"{where} is malformed ({type(e).__name__}: {e}); write it with instatune") from None
        return cls(arch, layers, bounded_text(d.get("source", where)))

    @classmethod
    def load(cls, path: str | Path) -> QuantPolicy:
        p = Path(path)
        if not p.is_file():
            raise InstatuneError(f"policy file {p} does not exist")
        if p.stat().st_size > MAX_POLICY_BYTES:
            raise InstatuneError(f"policy file {p} is {p.stat().st_size:,} bytes; a policy is a few KB: give the right "
                                 "file")
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InstatuneError(f"policy file {p} is not valid JSON ({e})") from None
        return cls.from_dict(d, where=str(p))


MAX_LAYERS = 1024  # as a search space (space.MAX_SPACE_LAYERS)
MAX_POLICY_BYTES = 4 << 20  # one entry per logical layer: a few KB even for the largest models
MAX_SOURCE_CHARS = 200  # the free-text `source` is copied into policy.json and manifests: bounded, printable


def bounded_text(x: Any, limit: int = MAX_SOURCE_CHARS) -> str:
    """Free text from a file, safe to copy into outputs and print: control characters escaped, at most `limit`."""
    text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in str(x)[: 4 * limit])
    return text if len(text) <= limit else text[: limit - 1] + "…"


def shapes(arch: Architecture, vocab: int) -> dict[str, tuple[int, int, bool]]:
    """(rows, cols, has bias) of every logical layer's weight, rows = output features."""
    h = arch.hidden
    out: dict[str, tuple[int, int, bool]] = {"embeddings": (vocab, h, False)}
    for k, (heads, ffn) in enumerate(zip(arch.heads, arch.ffn, strict=True)):
        a = heads * arch.head_dim
        out.update({f"layer.{k}.query": (a, h, True), f"layer.{k}.key": (a, h, True),
                    f"layer.{k}.value": (a, h, True), f"layer.{k}.attn_out": (h, a, True),
                    f"layer.{k}.ffn_in": (ffn, h, True), f"layer.{k}.ffn_out": (h, ffn, True)})
    if "pooler" in arch.head_linears:
        out["pooler"] = (h, h, True)
    out["classifier"] = (arch.num_labels, h, True)
    return out
