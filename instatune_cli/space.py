"""Search space of elastic dimensions and the sub-network configurations drawn from it.

A sub-network keeps L layers (which ones: the space's depth rule, `kept_layers`), the first h heads of
each kept layer and the first f FFN neurons of each kept layer (hidden size is fixed). Per-layer genes
and per-layer choice lists are by position among the kept layers. Everything here is plain Python so the
CLI and the search can use it without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instatune_cli.errors import InstatuneError

DEFAULT_SEQ_LEN = 128
#: Which layers a depth-L sub-network of an N-layer model keeps (docs/architecture.md, "Depth rule"):
#: `first` keeps layers 0..L-1 (DyNAS-T); `spread` keeps L layers evenly spread with the last one kept
#: (DynaBERT's rule), so the layers next to the shared pooler/classifier stay in place.
DEPTH_RULES = ("first", "spread")
DEFAULT_DEPTH = "spread"


def kept_layers(n_keep: int, n_total: int, rule: str = "first") -> list[int]:
    """0-based indices of the layers kept by a depth-`n_keep` sub-network of an `n_total`-layer model.

    spread: layer floor((k+1)·N/L) − 1 for k = 0..L−1, e.g. N=6: L3 -> [1, 3, 5], L4 -> [0, 2, 3, 5],
    L5 -> [0, 1, 2, 3, 5]; the last layer is always kept and L=N keeps every layer.
    """
    if not 1 <= n_keep <= n_total:
        raise ValueError(f"cannot keep {n_keep} of {n_total} layers")
    if rule == "first":
        return list(range(n_keep))
    if rule == "spread":
        return [(k + 1) * n_total // n_keep - 1 for k in range(n_keep)]
    raise InstatuneError(f"unknown depth rule {rule!r}; use {' or '.join(DEPTH_RULES)}")


_IMAGE_FIELDS = ("image_size", "patch_size", "channels", "prefix_tokens", "head_tokens", "fixed_params",
                 "layer_params", "width_params", "head_params", "ffn_params")


@dataclass(frozen=True)
class ModelDims:
    """Shape of the full (super-)network, read from a model config by its adapter."""

    family: str
    num_layers: int
    num_heads: int
    head_dim: int
    hidden: int
    ffn: int
    vocab_size: int = 0
    max_positions: int = 0
    type_vocab_size: int = 0
    num_labels: int = 2
    embedding_size: int = 0  # ELECTRA's factorised embeddings (projected up to `hidden`); 0: same as hidden
    # image families (0 for text): input side, patch side, channels, tokens before the patches (class, distill)
    image_size: int = 0
    patch_size: int = 0
    channels: int = 0
    prefix_tokens: int = 0
    # exact params of families whose variants differ in small terms (timm ViT: qkv or q/v biases, layer scale,
    # relative position tables, extra tokens), read off the model by the family; 0 where a formula is used
    head_tokens: int = 0    # tokens with a classifier head (2 for distilled DeiT); 0: one
    fixed_params: int = 0   # everything outside the blocks
    layer_params: int = 0   # per kept block, whatever its heads and width
    width_params: int = 0   # per unit of attention width (heads x head_dim)
    head_params: int = 0    # per head
    ffn_params: int = 0     # per FFN neuron

    @property
    def image_tokens(self) -> int:
        """Sequence length an image family always runs at (patches + prefix tokens); 0 for text."""
        if not self.image_size or not self.patch_size:
            return 0
        return (self.image_size // self.patch_size) ** 2 + self.prefix_tokens

    def to_dict(self) -> dict[str, Any]:
        """Fields as a dict; the image fields only where set, so a text model's record is what it always was."""
        return {k: v for k, v in self.__dict__.items() if v or k not in _IMAGE_FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelDims:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _rle(values: Sequence[int]) -> str:
    """Run-length form used in names: (12, 12, 10) -> '12x2.10'; a uniform tuple is just its value."""
    if len(set(values)) == 1:
        return str(values[0])
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        n = j - i + 1
        parts.append(f"{values[i]}x{n}" if n > 1 else str(values[i]))
        i = j + 1
    return ".".join(parts)


#: precision genes outside the layers: the word-embedding table, the pooler and the classifier
#: (docs/architecture.md, "Quantization"; instatune_cli/quantize/policy.py names them)
QUANT_GLOBAL = 3
QUANT_PER_LAYER = 6


def quant_gene_count(layers: int) -> int:
    return QUANT_GLOBAL + QUANT_PER_LAYER * layers


@dataclass(frozen=True)
class SubNet:
    """A sub-network in canonical form: one head count and one FFN width per *kept* layer.

    Genes of dropped layers are not stored, so two configs that differ only there are the same SubNet
    (same id, same name, equal and hash-equal).
    """

    heads: tuple[int, ...]
    ffn: tuple[int, ...]
    #: joint search only: 0 = FP32, 1 = INT8, 2 = INT4 weights (quantize/policy.py GENES) per quantizable layer, in
    #: `quant_names(layers)` order; () = none
    quant: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
        object.__setattr__(self, "ffn", tuple(int(f) for f in self.ffn))
        object.__setattr__(self, "quant", tuple(int(b) for b in self.quant))
        if self.quant and len(self.quant) != quant_gene_count(len(self.heads)):
            raise InstatuneError(f"sub-network has {len(self.quant)} precision genes; {len(self.heads)} layers "
                                 f"need {quant_gene_count(len(self.heads))}")
        if len(self.heads) != len(self.ffn):
            raise InstatuneError(
                f"sub-network has {len(self.heads)} head counts but {len(self.ffn)} FFN widths; "
                "give one of each per kept layer"
            )
        if not self.heads:
            raise InstatuneError("sub-network keeps no layer; keep at least one")

    @classmethod
    def make(cls, layers: int, heads: Sequence[int] | int, ffn: Sequence[int] | int) -> SubNet:
        """Build from possibly longer per-layer lists (genes past `layers` are dropped) or scalars."""
        if isinstance(heads, int):
            heads = [heads] * layers
        if isinstance(ffn, int):
            ffn = [ffn] * layers
        if layers < 1 or layers > len(heads) or layers > len(ffn):
            raise InstatuneError(
                f"sub-network asks for {layers} layers but has {len(heads)} head and {len(ffn)} FFN genes"
            )
        return cls(tuple(heads[:layers]), tuple(ffn[:layers]))

    @property
    def layers(self) -> int:
        return len(self.heads)

    @property
    def is_uniform(self) -> bool:
        """Every layer keeps the same heads and FFN width (a stock config can express it if heads are full)."""
        return len(set(self.heads)) == 1 and len(set(self.ffn)) == 1

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"layers": self.layers, "heads": list(self.heads), "ffn": list(self.ffn)}
        if self.quant:
            d["quant"] = list(self.quant)
        return d

    @property
    def architecture(self) -> SubNet:
        """The sub-network without its precision genes (what extraction slices)."""
        return SubNet(self.heads, self.ffn) if self.quant else self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SubNet:
        try:
            sub = cls.make(int(d["layers"]), d["heads"], d["ffn"])
            q = d.get("quant") or ()
            return cls(sub.heads, sub.ffn, tuple(int(b) for b in q)) if q else sub
        except (KeyError, TypeError, ValueError) as e:
            raise InstatuneError(
                f"malformed sub-network config {d!r}: need keys layers, heads, ffn ({e})"
            ) from None

    @property
    def id(self) -> str:
        """Stable short id: first 10 hex digits of sha256 over the canonical JSON (computed once)."""
        cached = self.__dict__.get("_id")
        if cached is None:
            canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
            cached = hashlib.sha256(canon.encode()).hexdigest()[:10]
            object.__setattr__(self, "_id", cached)
        return cached

    @property
    def name(self) -> str:
        """Self-describing name, e.g. `L10-h10-f2048`, or `L3-h12x2.8-f1536.512x2` when per-layer."""
        base = f"L{self.layers}-h{_rle(self.heads)}-f{_rle(self.ffn)}"
        if not self.quant:
            return base
        n4 = sum(b == 2 for b in self.quant)
        q = f"{sum(b == 1 for b in self.quant)}+{n4}w4" if n4 else str(sum(self.quant))
        return f"{base}-q{q}of{len(self.quant)}.{self.id[:4]}"

    @classmethod
    def parse_name(cls, name: str) -> SubNet:
        """Inverse of `name` (accepts what `name` writes)."""

        def expand(s: str) -> list[int]:
            out: list[int] = []
            for part in s.split("."):
                v, _, n = part.partition("x")
                out += [int(v)] * (int(n) if n else 1)
            return out

        try:
            lpart, hpart, fpart = name.strip().split("-")
            if not (lpart[0] == "L" and hpart[0] == "h" and fpart[0] == "f"):
                raise ValueError
            layers = int(lpart[1:])
            heads, ffn = expand(hpart[1:]), expand(fpart[1:])
        except (ValueError, IndexError):
            raise InstatuneError(
                f"cannot read sub-network name {name!r}; expected e.g. L10-h10-f2048 or L3-h12x2.8-f1536x3"
            ) from None
        if len(heads) == 1:
            heads = heads * layers
        if len(ffn) == 1:
            ffn = ffn * layers
        if len(heads) != layers or len(ffn) != layers:
            raise InstatuneError(f"sub-network name {name!r} does not give one value per layer ({layers})")
        return cls(tuple(heads), tuple(ffn))


# Bounds on a space read from a file (the user's --space or a tune run's space.json), checked before anything is
# built from it: `layers: [2, 10**18]` would otherwise make per-layer tables of 10**18 entries.
MAX_SPACE_LAYERS = 1024
MAX_SPACE_VALUE = 1 << 20  # heads, FFN width, sequence length
MAX_SPACE_CHOICES = 4096  # values in one list
MAX_SPACE_FILE_BYTES = 1 << 20


def _choices(values: Any, what: str, limit: int = MAX_SPACE_VALUE) -> tuple[int, ...]:
    if isinstance(values, int):
        values = [values]
    if isinstance(values, (list, tuple)) and len(values) > MAX_SPACE_CHOICES:
        raise InstatuneError(f"search space: {what} has {len(values)} choices; at most {MAX_SPACE_CHOICES}")
    try:
        out = tuple(sorted({int(v) for v in values}))
    except (TypeError, ValueError):
        raise InstatuneError(f"search space: {what} must be a list of integers, got {values!r}") from None
    if not out:
        raise InstatuneError(f"search space: {what} has no choices; give at least one value")
    if out[0] < 1:
        raise InstatuneError(f"search space: {what} has a value below 1 ({out[0]}); use positive sizes")
    if out[-1] > limit:
        raise InstatuneError(f"search space: {what} has a value of {out[-1]:,}, above the bound of {limit:,}; use "
                             "the model's real sizes")
    return out


@dataclass(frozen=True)
class SearchSpace:
    """Elastic dimensions: layer-count choices, per-layer head and FFN-width choices, MAC sequence length.

    `heads[i]` / `ffn[i]` are the choices for layer i (0-based); a flat list in a file applies to every layer.
    """

    layers: tuple[int, ...]
    heads: tuple[tuple[int, ...], ...]
    ffn: tuple[tuple[int, ...], ...]
    seq_len: int = DEFAULT_SEQ_LEN
    name: str = field(default="custom", compare=False)
    depth: str = "first"
    quant: bool = False  # joint architecture + precision search (`search --quant`)
    #: with `quant`: per precision gene (the `_encode_quant` layout, max_layers deep) whether INT4 weights are a
    #: choice (the group size divides the layer's width for every choice of the space); () = FP32/INT8 only
    quant_int4: tuple[bool, ...] = ()

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], name: str = "custom", default_depth: str = "first") -> SearchSpace:
        """`default_depth` applies when `d` has no `depth` key: "first" for files written before the rule
        existed (every earlier run kept the first L layers), DEFAULT_DEPTH for a new tune's own space."""
        if not isinstance(d, dict):
            raise InstatuneError(f"search space must be a mapping with layers, heads, ffn; got {type(d).__name__}")
        missing = [k for k in ("layers", "heads", "ffn") if k not in d]
        if missing:
            raise InstatuneError(f"search space is missing {', '.join(missing)}; give layers, heads and ffn")
        unknown = set(d) - {"layers", "heads", "ffn", "seq_len", "name", "depth", "quant", "quant_int4"}
        if unknown:
            raise InstatuneError(
                f"search space has unknown keys {sorted(unknown)}; allowed: layers, heads, ffn, seq_len, depth")
        depth = str(d.get("depth", default_depth))
        if depth not in DEPTH_RULES:
            raise InstatuneError(f"search space: unknown depth rule {depth!r}; use {' or '.join(DEPTH_RULES)}")
        layers = _choices(d["layers"], "layers", MAX_SPACE_LAYERS)
        n = layers[-1]

        def per_layer(v: Any, what: str) -> tuple[tuple[int, ...], ...]:
            if isinstance(v, list) and v and all(isinstance(x, list) for x in v):
                if len(v) != n:
                    raise InstatuneError(
                        f"search space: {what} gives choices for {len(v)} layers but up to {n} layers can be kept"
                    )
                return tuple(_choices(x, f"{what}[{i}]") for i, x in enumerate(v))
            c = _choices(v, what)
            return tuple(c for _ in range(n))

        try:
            seq_len = int(d.get("seq_len", DEFAULT_SEQ_LEN))
        except (TypeError, ValueError):
            raise InstatuneError(f"search space: seq_len must be an integer, got {d.get('seq_len')!r}") from None
        if not 1 <= seq_len <= MAX_SPACE_VALUE:
            raise InstatuneError(f"search space: seq_len must be between 1 and {MAX_SPACE_VALUE:,}, got {seq_len}")
        int4 = tuple(bool(x) for x in d.get("quant_int4") or ())
        if int4 and len(int4) != quant_gene_count(n):
            raise InstatuneError(f"search space: quant_int4 has {len(int4)} flags; {n} layers need "
                                 f"{quant_gene_count(n)}")
        return cls(layers, per_layer(d["heads"], "heads"), per_layer(d["ffn"], "ffn"), seq_len,
                   str(d.get("name", name)), depth, bool(d.get("quant", False)), int4)

    def to_dict(self) -> dict[str, Any]:
        def compact(c: tuple[tuple[int, ...], ...]) -> Any:
            return list(c[0]) if len(set(c)) == 1 else [list(x) for x in c]

        d = {"name": self.name, "layers": list(self.layers), "heads": compact(self.heads),
             "ffn": compact(self.ffn), "seq_len": self.seq_len, "depth": self.depth}
        if self.quant:
            d["quant"] = True
        if self.quant_int4:
            d["quant_int4"] = list(self.quant_int4)
        return d

    @classmethod
    def from_file(cls, path: str | Path, default_depth: str = "first") -> SearchSpace:
        p = Path(path)
        if not p.is_file():
            raise InstatuneError(f"search space file {p} does not exist; give a YAML/JSON file or a preset name")
        if p.stat().st_size > MAX_SPACE_FILE_BYTES:
            raise InstatuneError(f"search space file {p} is {p.stat().st_size:,} bytes; a space is a few lines: "
                                 "give the right file")
        try:
            text = p.read_text()
        except UnicodeDecodeError:
            raise InstatuneError(f"search space file {p} is not UTF-8 text; give a YAML/JSON file") from None
        try:
            if p.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as e:  # noqa: BLE001 - any parser error is the user's file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InstatuneError(f"cannot parse search space file {p}: {first}") from None
        return cls.from_dict(data, name=p.stem, default_depth=default_depth)

    @classmethod
    def preset(cls, name: str) -> SearchSpace:
        if name not in PRESETS:
            raise InstatuneError(f"unknown search-space preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls.from_dict(PRESETS[name], name=name, default_depth=DEFAULT_DEPTH)

    @classmethod
    def resolve(cls, spec: str | None, dims: ModelDims | None = None) -> SearchSpace:
        """A preset name, a YAML/JSON path, or (None) the space derived from the model's own shape."""
        if spec is None:
            if dims is None:
                raise InstatuneError("no search space given and no model to derive one from")
            return cls.from_model(dims)
        if spec in PRESETS:
            return cls.preset(spec)
        if Path(spec).suffix.lower() in {".yaml", ".yml", ".json"} or Path(spec).exists():
            return cls.from_file(spec, default_depth=DEFAULT_DEPTH)
        raise InstatuneError(
            f"search space {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a YAML/JSON file"
        )

    @classmethod
    def from_model(cls, dims: ModelDims, seq_len: int = DEFAULT_SEQ_LEN) -> SearchSpace:
        """Paper-like space scaled to the model: depth from half to full, heads from half to all in ~sixths,
        FFN width in thirds (bert-base gives exactly the paper's L 6..12, H {6,8,10,12}, F {1024,2048,3072})."""
        lo = max(1, math.ceil(dims.num_layers / 2))
        layers = list(range(lo, dims.num_layers + 1))
        heads = sorted({max(1, round(dims.num_heads * k / 6)) for k in range(3, 7)})
        ffn = sorted({max(1, round(dims.ffn * k / 3)) for k in range(1, 4)})
        # an image model always runs at its own token count (patches + prefix tokens)
        return cls.from_dict({"layers": layers, "heads": heads, "ffn": ffn, "seq_len": dims.image_tokens or seq_len,
                              "depth": DEFAULT_DEPTH}, name=f"derived-{dims.family}")

    # ---- checks -------------------------------------------------------------------------------
    @property
    def max_layers(self) -> int:
        return self.layers[-1]

    def check_model(self, dims: ModelDims) -> None:
        """Refuse a space the model cannot realise (deeper, more heads or wider FFN than it has)."""
        if self.max_layers > dims.num_layers:
            raise InstatuneError(
                f"search space allows {self.max_layers} layers but the model has {dims.num_layers}; "
                f"lower the layer choices to at most {dims.num_layers}"
            )
        for i in range(self.max_layers):
            if self.heads[i][-1] > dims.num_heads:
                raise InstatuneError(
                    f"search space allows {self.heads[i][-1]} heads in layer {i} but the model has "
                    f"{dims.num_heads}; lower the head choices"
                )
            if self.ffn[i][-1] > dims.ffn:
                raise InstatuneError(
                    f"search space allows FFN width {self.ffn[i][-1]} in layer {i} but the model has "
                    f"{dims.ffn}; lower the FFN choices"
                )

    def check(self, sub: SubNet) -> SubNet:
        """Return `sub` if the space contains it, else raise naming the first offending gene."""
        if bool(sub.quant) != self.quant:
            raise InstatuneError(f"sub-network {sub.name} {'has' if sub.quant else 'lacks'} precision genes but the "
                                 f"space is {'a joint (--quant)' if self.quant else 'an architecture-only'} space")
        if sub.layers not in self.layers:
            raise InstatuneError(
                f"sub-network {sub.name} keeps {sub.layers} layers; the space allows {list(self.layers)}")
        for i, (h, f) in enumerate(zip(sub.heads, sub.ffn, strict=True)):
            if h not in self.heads[i]:
                raise InstatuneError(
                    f"sub-network {sub.name}: {h} heads in layer {i} is outside the space {list(self.heads[i])}"
                )
            if f not in self.ffn[i]:
                raise InstatuneError(
                    f"sub-network {sub.name}: FFN width {f} in layer {i} is outside the space {list(self.ffn[i])}"
                )
        for i, (b, k) in enumerate(zip(sub.quant, self.quant_choices(sub.layers), strict=True)):
            if not 0 <= b < k:
                raise InstatuneError(f"sub-network {sub.name}: precision gene {i} is {b}; this space allows 0.."
                                     f"{k - 1} there")
        return sub

    def quant_choices(self, layers: int) -> list[int]:
        """Choices of each precision gene of a `layers`-deep member, in SubNet.quant order (2, or 3 with INT4)."""
        if not self.quant:
            return []
        flags = self.quant_int4 or (False,) * quant_gene_count(self.max_layers)
        g = QUANT_GLOBAL - 2
        kept = [*flags[:g], *flags[g:g + QUANT_PER_LAYER * layers], *flags[g + QUANT_PER_LAYER * self.max_layers:]]
        return [3 if f else 2 for f in kept]

    def contains(self, sub: SubNet) -> bool:
        try:
            self.check(sub)
        except InstatuneError:
            return False
        return True

    def cardinality(self) -> int:
        """Number of distinct canonical sub-networks."""
        total = 0
        for n in self.layers:
            k = 1
            for i in range(n):
                k *= len(self.heads[i]) * len(self.ffn[i])
            total += k * math.prod(self.quant_choices(n))
        return total

    # ---- special members and sampling ----------------------------------------------------------
    def largest(self) -> SubNet:
        n = self.max_layers
        return SubNet.make(n, [self.heads[i][-1] for i in range(n)], [self.ffn[i][-1] for i in range(n)])

    def smallest(self) -> SubNet:
        n = self.layers[0]
        return SubNet.make(n, [self.heads[i][0] for i in range(n)], [self.ffn[i][0] for i in range(n)])

    def anchors(self) -> list[SubNet]:
        """The members a search measures first, so the family's strongest and cheapest are never left out: the
        widest sub-network of each depth, deepest first, then the smallest. In a joint (`quant`) space each comes
        all-INT8, the precision a size-driven search cares about (issue 18: a 40-evaluation search had never
        measured the widest 5-layer member, which beat its whole front)."""
        out = []
        for n in sorted(self.layers, reverse=True):
            out.append(SubNet.make(n, [self.heads[i][-1] for i in range(n)], [self.ffn[i][-1] for i in range(n)]))
        out.append(self.smallest())
        if self.quant:
            out = [SubNet(s.heads, s.ffn, (1,) * quant_gene_count(s.layers)) for s in out]
        return list(dict.fromkeys(out))

    def sample(self, rng: random.Random) -> SubNet:
        """Uniform sampling as in the paper: L drawn once, then H and D_ffn drawn per layer."""
        n = rng.choice(self.layers)
        return self._with_precision(SubNet.make(n, [rng.choice(self.heads[i]) for i in range(n)],
                                                [rng.choice(self.ffn[i]) for i in range(n)]), rng)

    def _with_precision(self, sub: SubNet, rng: random.Random) -> SubNet:
        """`sub` with a uniformly drawn precision per gene in a joint (`quant`) space; as is otherwise."""
        if not self.quant:
            return sub
        return SubNet(sub.heads, sub.ffn, tuple(rng.randint(0, k - 1) for k in self.quant_choices(sub.layers)))

    def sample_stratified(self, rng: random.Random) -> SubNet:
        """L drawn once, then one width level u ~ U(0, 1) for the whole sub-network: every layer's head and FFN
        choice sits near u of its range (jittered by a third of a choice). Uniform per-layer draws average out, so
        their sizes crowd the middle of the MAC range and the narrow members that small budgets pick (every layer
        at its smallest width) are almost never trained as a whole; here they are drawn regularly, at about the
        same mean cost (docs/architecture.md, "Tuning")."""
        n = rng.choice(self.layers)
        u = rng.random()

        def near(choices: tuple[int, ...]) -> int:
            j = round(u * (len(choices) - 1) + rng.gauss(0.0, 0.35))
            return choices[min(len(choices) - 1, max(0, j))]

        return self._with_precision(
            SubNet.make(n, [near(self.heads[i]) for i in range(n)], [near(self.ffn[i]) for i in range(n)]), rng)

    def sample_many(self, rng: random.Random, m: int, mode: str = "uniform") -> list[SubNet]:
        """`m` sub-networks for one training step.

        uniform: m random draws. sandwich: the smallest first, then m-1 random (the largest is the
        super-network itself, which the InstaTune loss always trains). stratified: m draws of
        `sample_stratified` (sizes spread over the MAC range, not crowded in its middle).
        """
        if mode == "uniform":
            return [self.sample(rng) for _ in range(m)]
        if mode == "sandwich":
            return ([self.smallest()] + [self.sample(rng) for _ in range(m - 1)])[:m]
        if mode == "stratified":
            return [self.sample_stratified(rng) for _ in range(m)]
        raise InstatuneError(f"unknown sampling {mode!r}; use uniform, sandwich or stratified")

    # ---- integer-gene encoding for search -----------------------------------------------------
    def gene_bounds(self) -> list[int]:
        """Number of choices per gene: [layers, heads_0..heads_{N-1}, ffn_0..ffn_{N-1}] with N = max_layers."""
        n = self.max_layers
        q = [3 if f else 2 for f in self.quant_int4] if self.quant_int4 else [2] * quant_gene_count(n) if self.quant \
            else []
        return [len(self.layers)] + [len(self.heads[i]) for i in range(n)] + [len(self.ffn[i]) for i in range(n)] + q

    def encode(self, sub: SubNet) -> list[int]:
        """Genes (choice indices); dropped layers get the index of their largest choice (any value decodes the same)."""
        self.check(sub)
        n = self.max_layers
        hs = [self.heads[i].index(sub.heads[i]) if i < sub.layers else len(self.heads[i]) - 1 for i in range(n)]
        fs = [self.ffn[i].index(sub.ffn[i]) if i < sub.layers else len(self.ffn[i]) - 1 for i in range(n)]
        return [self.layers.index(sub.layers)] + hs + fs + self._encode_quant(sub)

    def _encode_quant(self, sub: SubNet) -> list[int]:
        """Precision genes: global ones, then 6 per layer up to max_layers (dropped layers: 1, never read)."""
        if not self.quant:
            return []
        g, per = QUANT_GLOBAL - 2, QUANT_PER_LAYER  # embeddings first; pooler/classifier last
        q = list(sub.quant)
        layers = q[g:g + per * sub.layers] + [1] * per * (self.max_layers - sub.layers)
        return q[:g] + layers + q[g + per * sub.layers:]

    def _decode_quant(self, genes: Sequence[int], layers: int) -> tuple[int, ...]:
        if not self.quant:
            return ()
        g, per = QUANT_GLOBAL - 2, QUANT_PER_LAYER
        q = [int(b) for b in genes]
        return tuple(q[:g] + q[g:g + per * layers] + q[g + per * self.max_layers:])

    def decode(self, genes: Sequence[int]) -> SubNet:
        n = self.max_layers
        want = 1 + 2 * n + (quant_gene_count(n) if self.quant else 0)
        if len(genes) != want:
            raise InstatuneError(f"expected {want} genes, got {len(genes)}")
        layers = self.layers[int(genes[0])]
        heads = [self.heads[i][int(genes[1 + i])] for i in range(n)]
        ffn = [self.ffn[i][int(genes[1 + n + i])] for i in range(n)]
        sub = SubNet.make(layers, heads, ffn)
        q = self._decode_quant(genes[1 + 2 * n:], layers)
        return SubNet(sub.heads, sub.ffn, q) if q else sub

    def features(self, sub: SubNet) -> list[float]:
        """Fixed-width predictor features: depth, then per layer (kept, heads share, FFN share), 0 when dropped;
        then one indicator per depth choice, and those indicators times the mean heads and FFN shares.

        Masking dropped layers to zero means dead genes never influence a predictor (a DyNAS-T weakness).
        The per-depth terms let a linear model give each depth its own level and width slope: accuracy is not
        additive across depth and width (a too-shallow sub-network can collapse whatever its widths), and
        without them ridge extrapolates the gains of width at one depth to every other.
        """
        n = self.max_layers
        out = [sub.layers / n]
        h_share, f_share = [], []
        for i in range(n):
            if i < sub.layers:
                h, f = sub.heads[i] / self.heads[i][-1], sub.ffn[i] / self.ffn[i][-1]
                out += [1.0, h, f]
                h_share.append(h)
                f_share.append(f)
            else:
                out += [0.0, 0.0, 0.0]
        if len(self.layers) > 1:
            mh, mf = sum(h_share) / len(h_share), sum(f_share) / len(f_share)
            onehot = [1.0 if sub.layers == d else 0.0 for d in self.layers]
            out += onehot + [o * mh for o in onehot] + [o * mf for o in onehot]
        if self.quant:  # precision genes (quantized at all; INT4 where a choice), dropped layers' masked to 0, shares
            g = self._encode_quant(sub)
            live = [1] * (QUANT_GLOBAL - 2) + [1 if i // QUANT_PER_LAYER < sub.layers else 0
                                               for i in range(QUANT_PER_LAYER * n)] + [1, 1]
            out += [float((b >= 1) * m) for b, m in zip(g, live, strict=True)]
            out += [sum(b >= 1 for b in sub.quant) / len(sub.quant)]
            if self.quant_int4:
                out += [float((b == 2) * m) for b, m, f in zip(g, live, self.quant_int4, strict=True) if f]
                out += [sum(b == 2 for b in sub.quant) / len(sub.quant)]
        return out


PRESETS: dict[str, dict[str, Any]] = {
    "bert-base-paper": {"layers": list(range(6, 13)), "heads": [6, 8, 10, 12], "ffn": [1024, 2048, 3072]},
    "vit-base-paper": {"layers": [11, 12], "heads": [6, 8, 10, 12], "ffn": [2048, 2560, 3072], "seq_len": 197},
}
