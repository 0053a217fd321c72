"""Per-layer precision policies: one format for both engines and for the joint search (docs/architecture.md,
"Quantization").

A policy names *logical* layers, so the same file drives PyTorch (Neural Compressor) and ONNX Runtime:

- `embeddings`: the word-embedding table (half of all-MiniLM-L6-v2's weights; INT8 Gather);
- `layer.{k}.{query,key,value,attn_out,ffn_in,ffn_out}`: the six linears of the k-th layer of the model being
  quantized (an extracted sub-network numbers its kept layers 0..L-1);
- `pooler`, `classifier`: the linears of the head (a family with one head linear has only `classifier`).

A family whose layers are shaped otherwise names its own parts (the architecture records them): timm ViT has
`layer.{k}.{qkv,attn_out,ffn_in,ffn_out}` (Q, K and V are one fused linear), no quantized embedding table, and
`classifier` (plus `classifier_dist` for a distilled DeiT).

Each layer has a weight precision (fp32, int8, or int4 block-wise: one FP32 scale per `group_size` input
values of an output row) and an activation precision (fp32 or int8). Four combinations have an operator, so
the file names them: `fp32`, `int8` (INT8 weights and UINT8 activations: static QDQ), `int8-weights` (INT8
block-wise weights, FP32 activations) and `int4` (INT4 block-wise weights, FP32 activations); the long form
`{"weights": "int4", "activations": "fp32"}` is read too. INT8 activations need INT8 weights (no runtime here
has a static INT8-activation kernel for INT4 or FP32 weights). The embedding table has no input activation,
so for it `int8-weights` is `int8`. Files written before int4 (version 1, `int8`/`fp32` only) read unchanged.

The policy also records the architecture it was made for (model type, hidden size,
heads and FFN width of every layer); applying it to another architecture is refused, because layer k of
another sub-network is a different layer. Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the architecture a policy names is the family adapter's answer (adapters/base.py); re-exported here
from instatune_cli.adapters.base import MAX_LAYERS as MAX_LAYERS
from instatune_cli.adapters.base import PARTS as PARTS
from instatune_cli.adapters.base import Architecture as Architecture
from instatune_cli.adapters.base import layer_names as layer_names
from instatune_cli.errors import InstatuneError

SCHEMA = "instatune.quant_policy"
VERSION = 2
READS = (1, 2)  # version 1: int8/fp32 only, no group size
GLOBAL = ("embeddings", "pooler", "classifier")
PRECISIONS = ("int8", "fp32", "int4", "int8-weights")
#: (weight bits, activation bits) of each precision
BITS = {"fp32": (32, 32), "int8": (8, 8), "int8-weights": (8, 32), "int4": (4, 32)}
BLOCKWISE = ("int4", "int8-weights")  # weights quantized in blocks of `group_size` along the input
DEFAULT_GROUP_SIZE = 32  # divides every width of BERT-base/MiniLM sub-networks (head size 64/32)


def precision_of(value: Any, name: str) -> str:
    """A layer's precision from a policy file: a name from PRECISIONS or {"weights": .., "activations": ..}."""
    if isinstance(value, Mapping):
        w, a = str(value.get("weights", "fp32")), str(value.get("activations", "fp32"))
        found = next((p for p, b in BITS.items() if (f"int{b[0]}" if b[0] < 32 else "fp32", f"int{b[1]}" if
                                                     b[1] < 32 else "fp32") == (w, a)), None)
        if found is None:
            raise InstatuneError(f"policy sets {name} to weights {w}, activations {a}; INT8 activations need INT8 "
                                 "weights: use weights fp32/int8/int4 with activations fp32, or int8 with int8")
        return found
    return str(value)


def input_width(arch: Architecture, name: str) -> int:
    """Input features of a logical layer's weight (the axis block-wise quantization groups; the table's
    hidden size for the embeddings)."""
    part = name.rsplit(".", 1)[-1]
    if name.startswith("layer."):
        k = int(name.split(".")[1])
        if part == "attn_out":
            return arch.heads[k] * arch.head_dim
        if part == "ffn_out":
            return arch.ffn[k]
    return arch.hidden


@dataclass
class QuantPolicy:
    """A precision (PRECISIONS) for every logical layer of one architecture, and the block size of its
    block-wise layers."""

    architecture: Architecture
    layers: dict[str, str] = field(default_factory=dict)
    source: str = ""
    group_size: int = DEFAULT_GROUP_SIZE

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
        if self.layers.get("embeddings") == "int8-weights":  # a table has no input activation to keep FP32
            self.layers["embeddings"] = "int8"
        for n in names:  # complete: every layer is stated, so the file says exactly what was done
            self.layers.setdefault(n, "int8")
        self._check_groups()

    def _check_groups(self) -> None:
        """ONNX Runtime's block-wise operators take power-of-two blocks of at least 16, and a block must not
        straddle the end of a row (the emulation and the size are exact only for whole blocks)."""
        g = self.group_size
        if not any(v in BLOCKWISE for v in self.layers.values()):
            return
        if g < 16 or g & (g - 1):
            raise InstatuneError(f"policy group size {g} is not a power of two of at least 16; use 16, 32, 64 "
                                 "or 128")
        for n in self.architecture.names():
            if self.layers[n] in BLOCKWISE and input_width(self.architecture, n) % g:
                raise InstatuneError(
                    f"policy sets {n} to {self.layers[n]} with group size {g}, which does not divide its input "
                    f"width {input_width(self.architecture, n)}; use a group size that divides it, or int8/fp32 "
                    "for that layer")

    def blockwise_ok(self, name: str) -> bool:
        """Whether `name` can be block-wise (int4, int8-weights) at this policy's group size."""
        return input_width(self.architecture, name) % self.group_size == 0

    @classmethod
    def uniform(cls, arch: Architecture, precision: str = "int8", source: str = "",
                group_size: int = DEFAULT_GROUP_SIZE) -> QuantPolicy:
        """Every layer at `precision`; for a block-wise one, layers whose width the group does not divide
        (and, for int8-weights, the table) stay int8."""
        pol = cls(arch, {n: "int8" for n in arch.names()}, source or f"all-{precision}", group_size)
        for n in arch.names():
            if precision not in BLOCKWISE or pol.blockwise_ok(n):
                pol.layers[n] = precision
        pol.__post_init__()
        return pol

    @classmethod
    def from_bits(cls, arch: Architecture, bits: Sequence[int], source: str = "search",
                  group_size: int = DEFAULT_GROUP_SIZE) -> QuantPolicy:
        """From genes in `Architecture.names()` order: GENES[g] (0 = FP32, 1 = INT8, 2 = INT4 weights). A 2 where
        the group size does not divide the layer is INT8 (the search's genes are per space, widths per member)."""
        names = arch.names()
        if len(bits) != len(names):
            raise InstatuneError(f"{len(bits)} precision genes for {len(names)} layers of {arch.describe()}")
        pol = cls(arch, {n: "int8" if b else "fp32" for n, b in zip(names, bits, strict=True)}, source, group_size)
        for n, b in zip(names, bits, strict=True):
            if int(b) >= len(GENES):
                raise InstatuneError(f"precision gene {b} for {n}; genes are 0..{len(GENES) - 1}")
            if GENES[int(b)] == "int4" and pol.blockwise_ok(n):
                pol.layers[n] = "int4"
        return pol

    def bits(self) -> list[int]:
        """Genes (GENES index) in `Architecture.names()` order; int8-weights has no gene and reads as INT8."""
        return [GENES.index(self.layers[n]) if self.layers[n] in GENES else 1 for n in self.architecture.names()]

    def int8(self) -> list[str]:
        """Layers with INT8 weights and activations (static QDQ)."""
        return self.at("int8")

    def fp32(self) -> list[str]:
        return self.at("fp32")

    def at(self, precision: str) -> list[str]:
        return [n for n in self.architecture.names() if self.layers[n] == precision]

    def quantized(self) -> list[str]:
        """Layers whose weights are not FP32."""
        return [n for n in self.architecture.names() if self.layers[n] != "fp32"]

    def summary(self) -> str:
        """`39/39 layers INT8` when only INT8 and FP32 are used, else a count per precision; the FP32 layers
        when few."""
        fp = self.fp32()
        tail = f" (FP32: {', '.join(fp)})" if 0 < len(fp) <= 4 else ""
        counts = {p: len(self.at(p)) for p in ("int4", "int8-weights") if self.at(p)}
        if not counts:
            return f"{len(self.int8())}/{len(self.layers)} layers INT8{tail}"
        parts = [f"{c} {p.upper().replace('-WEIGHTS', ' weight-only')}" for p, c in
                 {"int8": len(self.int8()), **counts}.items() if c]
        return f"{', '.join(parts)} of {len(self.layers)} layers (group {self.group_size}){tail}"

    def weight_bits(self) -> dict[str, int]:
        return {n: BITS[self.layers[n]][0] for n in self.architecture.names()}

    def check_for(self, arch: Architecture, where: str = "the model") -> None:
        if not self.architecture.same_as(arch):
            raise InstatuneError(
                f"the policy was made for {self.architecture.describe()}, not {where} ({arch.describe()}); "
                "use the policy searched for this sub-network, or --all-int8")

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "version": VERSION, "architecture": self.architecture.to_dict(),
                "source": self.source, "group_size": self.group_size,
                "layers": {n: self.layers[n] for n in self.architecture.names()}}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "policy") -> QuantPolicy:
        if not isinstance(d, Mapping) or d.get("schema") != SCHEMA:
            raise InstatuneError(f"{where} is not an instatune quantization policy (no \"schema\": \"{SCHEMA}\")")
        if str(d.get("version")) not in map(str, READS):
            raise InstatuneError(f"{where} has policy version {d.get('version')}; this instatune reads "
                                 f"{' and '.join(map(str, READS))}")
        try:
            arch = Architecture.from_dict(d["architecture"])
            layers = {str(k): precision_of(v, str(k)) for k, v in dict(d["layers"]).items()}
            group = int(d.get("group_size", DEFAULT_GROUP_SIZE))
        except (KeyError, TypeError, ValueError) as e:
            raise InstatuneError(f"{where} is malformed ({type(e).__name__}: {e}); write it with instatune") from None
        return cls(arch, layers, bounded_text(d.get("source", where)), group)

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


#: the joint search's precision genes (space.py): index = gene value
GENES = ("fp32", "int8", "int4")


def engine_refusal(policy: QuantPolicy, engine: str, supports: Mapping[str, Sequence[str]]) -> str | None:
    """One line naming the first layer whose precision `engine` has no operator for (`supports`: precision ->
    "linear"/"embeddings"), or None."""
    for n in policy.architecture.names():
        kind = "embeddings" if n == "embeddings" else "linear"
        p = policy.layers[n]
        if p != "fp32" and kind not in supports.get(p, ()):
            alt = [q for q, kinds in supports.items() if kind in kinds]
            return (f"the policy sets {n} to {p}, but the {engine} engine has no {p} operator for "
                    f"{'an embedding table' if kind == 'embeddings' else 'a linear'}; set it to "
                    f"{' or '.join(['fp32', *alt])}, or use --engine ort")
    return None


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
