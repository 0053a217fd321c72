"""A third-party model family is one file and one decorator: this test file registers a toy family (its own
torch model, tokenizer, MACs and extraction) without touching `instatune_cli/`, and runs tune -> search ->
extract -> quantize -> export on it with the stages' public entry points (docs/architecture.md, "Families")."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from instatune_cli.adapters import family_for_source, family_named, register_family
from instatune_cli.adapters.base import FamilyAdapter, LayerParts
from instatune_cli.space import ModelDims, SubNet

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


# ---- the toy model: a pre-norm encoder whose head count follows its projections' width ------------------

class ToyLayer(nn.Module):
    def __init__(self, d: int, heads: int, head_dim: int, ffn: int) -> None:
        super().__init__()
        w = heads * head_dim
        self.head_dim = head_dim
        self.q, self.k, self.v, self.o = nn.Linear(d, w), nn.Linear(d, w), nn.Linear(d, w), nn.Linear(w, d)
        self.up, self.down = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.n1(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, -1, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim) + (1 - mask[:, None, None, :].float()) * -1e9
        x = x + self.o((att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1))
        return x + self.down(F.gelu(self.up(self.n2(x))))


class ToyModel(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.config = config
        c = config
        self.emb = nn.Embedding(c.vocab_size, c.hidden)
        self.layers = nn.ModuleList(ToyLayer(c.hidden, h, c.head_dim, f) for h, f in zip(c.layer_heads, c.layer_ffn,
                                                                                        strict=True))
        self.cls = nn.Linear(c.hidden, c.num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids)
        for layer in self.layers:  # an elastic list yields only the active layers
            x = layer(x, attention_mask)
        m = attention_mask.unsqueeze(-1).float()
        return self.cls((x * m).sum(1) / m.sum(1))


def toy_config(**kw: Any) -> SimpleNamespace:
    c = {"model_type": "toy_encoder", "vocab_size": 512, "hidden": 32, "heads": 4, "head_dim": 8, "ffn": 48,
         "layers": 4, "num_labels": 2, "id2label": {0: "0", 1: "1"}, **kw}
    c.setdefault("layer_heads", [c["heads"]] * c["layers"])
    c.setdefault("layer_ffn", [c["ffn"]] * c["layers"])
    return SimpleNamespace(**c)


class HashTokenizer:
    """Words hashed into the vocabulary (0 = padding): stateless, so it saves as one small JSON file."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def ids(self, text: str, max_length: int) -> list[int]:
        words = text.lower().split()[:max_length] or [""]
        return [1 + int(hashlib.md5(w.encode()).hexdigest(), 16) % (self.vocab_size - 1) for w in words]


# ---- the family: everything instatune needs to know about the toy model, in one class ---------------------

@register_family
class ToyFamily(FamilyAdapter):
    family = "toy"
    model_types = ("toy_encoder",)

    def dims(self, config: Any) -> ModelDims:
        return ModelDims(family="toy", num_layers=config.layers, num_heads=config.heads, head_dim=config.head_dim,
                         hidden=config.hidden, ffn=config.ffn, vocab_size=config.vocab_size,
                         num_labels=config.num_labels)

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return model.layers

    def parts(self, layer: nn.Module) -> LayerParts:
        return LayerParts(layer.q, layer.k, layer.v, layer.o, layer.up, layer.down)

    def load(self, src: str, *, id2label: dict[int, str] | None = None, num_labels: int | None = None,
             eager: bool = False) -> nn.Module:
        from safetensors.torch import load_file

        cfg = json.loads((Path(src) / "config.json").read_text())
        cfg["id2label"] = {int(k): v for k, v in cfg["id2label"].items()}
        model = ToyModel(SimpleNamespace(**cfg))
        model.load_state_dict(load_file(str(Path(src) / "model.safetensors")))
        if id2label is not None and len(id2label) != model.config.num_labels:
            model.cls = nn.Linear(model.config.hidden, len(id2label))
        if id2label is not None:
            model.config.num_labels, model.config.id2label = len(id2label), dict(id2label)
        return model

    def load_preprocessor(self, src: str | Path) -> Any:
        return HashTokenizer(json.loads((Path(src) / "toy_tokenizer.json").read_text())["vocab_size"])

    def save(self, model: nn.Module, preprocessor: Any, out_dir: str | Path) -> None:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(vars(model.config)))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
        if preprocessor is not None:
            self.save_preprocessor(preprocessor, out)

    def save_preprocessor(self, preprocessor: Any, out_dir: str | Path) -> None:
        (Path(out_dir) / "toy_tokenizer.json").write_text(json.dumps({"vocab_size": preprocessor.vocab_size}))

    def encode(self, preprocessor: Any, split: Any, max_length: int, train: bool = False) -> Any:
        from instatune_cli.data import Encoded

        return Encoded([preprocessor.ids(t, max_length) for t in split.texts], list(split.labels))

    def random_batch(self, model_or_config: Any, batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        cfg = getattr(model_or_config, "config", model_or_config)
        ids = torch.randint(1, cfg.vocab_size, (batch, seq_len), generator=g)
        mask = torch.ones(batch, seq_len, dtype=torch.long)
        mask[0, seq_len // 2:] = 0
        return {"input_ids": ids, "attention_mask": mask}

    def forward(self, model: nn.Module, inputs: dict[str, Any], hidden_states: bool = False) -> tuple[Any, Any]:
        return model(inputs["input_ids"], inputs["attention_mask"]), None

    def macs(self, dims: ModelDims, sub: SubNet, seq: int) -> int:
        d = dims.hidden
        per = [4 * seq * d * h * dims.head_dim + 2 * seq * seq * h * dims.head_dim + 2 * seq * d * f
               for h, f in zip(sub.heads, sub.ffn, strict=True)]
        return sum(per) + d * dims.num_labels

    def params(self, dims: ModelDims, sub: SubNet) -> int:
        d = dims.hidden
        per = [4 * d * h * dims.head_dim + 3 * h * dims.head_dim + d + 2 * d * f + f + d + 4 * d
               for h, f in zip(sub.heads, sub.ffn, strict=True)]
        return dims.vocab_size * d + sum(per) + d * dims.num_labels + dims.num_labels

    def extract(self, model: nn.Module, sub: SubNet) -> nn.Module:
        from instatune_cli.extract import sliced_state_dict

        cfg = SimpleNamespace(**{**vars(model.config), "layers": sub.layers, "layer_heads": list(sub.heads),
                                 "layer_ffn": list(sub.ffn)})
        small = ToyModel(cfg)
        small.load_state_dict(sliced_state_dict(model, sub))
        small._instatune_kind = "instatune"
        small._instatune_adapter = self
        return small.eval()

    def save_extracted(self, small: nn.Module, parent: nn.Module, sub: SubNet, preprocessor: Any,
                       out_dir: str | Path) -> dict[str, Any]:
        self.save(small, preprocessor, out_dir)
        return {"model_type": "toy_encoder", "load_with": "ToyFamily().load(dir)"}

    def load_extracted(self, model_dir: str | Path) -> nn.Module:
        model = self.load(str(model_dir)).eval()
        model._instatune_adapter = self
        return model


# ---- the test -------------------------------------------------------------------------------------------

@pytest.fixture
def toy_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    d = tmp_path / "toy-base"
    ToyFamily().save(ToyModel(toy_config()), HashTokenizer(512), d)
    return d


def test_registry_finds_the_plugin(toy_dir: Path) -> None:
    assert isinstance(family_for_source(str(toy_dir)), ToyFamily)
    assert isinstance(family_named("toy"), ToyFamily)
    assert family_named("bert").family == "bert"  # built-ins are still there


def test_plugin_runs_all_five_stages(toy_dir: Path, tmp_path: Path) -> None:
    if not (SST2 / "train.tsv").is_file():
        pytest.skip("../shared/data/sst2 is not beside the checkout")
    from instatune_cli import artifacts
    from instatune_cli.deliver import export_stage, extract_stage
    from instatune_cli.quantize.stage import QuantizeOptions, quantize_stage
    from instatune_cli.search.stage import SearchOptions, run_stage
    from instatune_cli.tune.config import TuneConfig
    from instatune_cli.tune.loop import run_tune

    run = tmp_path / "run"
    res = run_tune(TuneConfig(model=str(toy_dir), data=str(SST2), limit_train=400, limit_eval=100,
                              val_split="80", output=str(run), max_steps=30, batch_size=16, lr=3e-3,
                              space=None, quiet=True))
    man = res.artifact.manifest
    assert man["model"]["adapter"] == "toy" and man["model"]["dims"]["family"] == "toy"
    assert (run / "model" / "toy_tokenizer.json").is_file()  # saved by the family, not by transformers

    art, result, _ = run_stage(run, tmp_path / "run-search", SearchOptions(evals=8, population=4))
    front = json.loads((tmp_path / "run-search" / "front.json").read_text())["front"]
    assert front and all(r["macs"] > 0 for r in front)

    ext = extract_stage(tmp_path / "run-search", tmp_path / "sub1", subnet=1)
    m = artifacts.load(ext.path, "extract").metrics
    assert m["params_match"] and m["max_abs_diff"] <= 1e-5 and m["reload_max_abs_diff"] == 0
    small = ToyFamily().load_extracted(ext.path)
    sub = SubNet.from_dict(m["subnet"])
    assert len(small.layers) == sub.layers
    assert sum(p.numel() for p in small.parameters()) == ToyFamily().params(ToyFamily().dims(small.config), sub)

    # quantize: the default policy names the toy's own linears (no embedding table: the toy has no
    # get_input_embeddings), static INT8 through ONNX Runtime, scored on the run's eval split
    q = quantize_stage(ext.path, tmp_path / "sub1-int8", QuantizeOptions(calibration_samples=16, runs=2))
    qm = q.metrics
    layers = qm["policy"]["layers"]
    assert set(layers) == {f"layer.{k}.{p}" for k in range(sub.layers)
                           for p in ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")} | {"classifier"}
    assert set(layers.values()) == {"int8"} and (q.path / "model.int8.onnx").is_file()
    assert qm["accuracy"]["int8"]["n"] == qm["accuracy"]["fp32"]["n"] == 100
    assert abs(qm["accuracy_drop_points"]) < 20  # INT8 of a working model, not noise

    # export: the family's forward traced to ONNX, parity with torch on real inputs, latency of both graphs
    e = export_stage(ext.path, tmp_path / "sub1-onnx", runs=2)
    em = e.metrics
    assert em["export"]["inputs"] == ["input_ids", "attention_mask"]
    assert em["export"]["dynamic_axes"] == {"batch": 0, "sequence": 1}
    assert em["export"]["optimization"]["applied"] is False  # the toy has no graph fusions
    assert em["parity"]["max_abs_diff"] <= 1e-4 and em["latency_supernet"]["median_ms"] > 0


def test_entry_point_plugins_load_and_a_broken_one_only_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    import instatune_cli.adapters as A

    class Other(ToyFamily):
        family = "toy-from-entry-point"
        model_types = ("toy_ep",)

    class EP:
        def __init__(self, name: str, fn: Any) -> None:
            self.name, self.value, self._fn = name, f"pkg.{name}", fn

        def load(self) -> Any:
            return self._fn()

    def broken() -> None:
        raise ImportError("no module named pkg.broken")

    seen: list[str] = []
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: seen.append(group) or [EP("good", lambda: register_family(Other)),
                                                             EP("broken", broken)])
    monkeypatch.setattr(A, "_DISCOVERED", False)
    monkeypatch.setattr(A, "_REGISTRY", dict(A._REGISTRY))
    with pytest.warns(UserWarning, match="'broken'.*failed to load"):
        fams = {f.family for f in A.families()}
    assert seen == [A.ENTRY_POINT_GROUP]
    assert {"toy-from-entry-point", "bert", "vit"} <= fams
    assert A.adapter_for("toy_ep").family == "toy-from-entry-point"
