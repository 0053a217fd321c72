"""export.optimize_graph: ORT's transformer fusions fire on our dynamo graphs (stock and per-layer heads), the
fused graph matches PyTorch at any batch/sequence, INT8 goes after it, and a fusion that changes logits is
dropped."""

from __future__ import annotations

import onnx
import pytest
import torch
from helpers import tiny_batches

from instatune_cli import export
from instatune_cli.adapters.hf import fusion
from instatune_cli.errors import InstatuneError
from instatune_cli.export import (
    LINEAR_PRESERVING_FUSIONS,
    check_parity,
    export_onnx,
    optimize_graph,
    quantize_dynamic_int8,
    read_metadata,
)
from instatune_cli.extract import load_extracted
from instatune_cli.space import SubNet

SUBS = {"stock": SubNet((4, 4, 4), (20, 20, 20)), "instatune": SubNet((3, 1, 4), (37, 5, 12))}
#: batch and sequence sizes other than the export example (2, 16), the longest the tiny model allows included
SHAPES = ((1, 1), (1, 7), (4, 23), (2, 64))


def _ops(path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path)).graph.node)


def _count(path, op: str) -> int:
    return sum(n.op_type == op for n in _ops(path))


def _left_padded(config) -> dict[str, torch.Tensor]:
    """Padding at the start of rows (the raw 2-D mask must cope; ORT's mask-index format would not)."""
    b = tiny_batches(config, ((3, 19),), seed=9)[0]
    b["attention_mask"][1, :6] = 0
    b["attention_mask"][2, :12] = 0
    return b


@pytest.fixture(scope="module")
def exported(tiny_export, tmp_path_factory):
    """{kind: (model_dir, fused onnx, plain onnx, export report)} for a stock and a per-layer extraction (the fused
    exports: conftest.tiny_export, shared with test_export_onnx.py)."""
    out = {}
    for kind, sub in SUBS.items():
        d, path, report, extracted = tiny_export("bert", 0, sub)
        assert extracted["kind"] == kind
        plain = tmp_path_factory.mktemp(kind) / "plain.onnx"
        export_onnx(d, plain, optimize=False)
        out[kind] = (d, path, plain, report)
    return out


@pytest.fixture(scope="module")
def eager_unfused(exported, tmp_path_factory):
    """The per-layer model exported with eager attention, unfused: what `export_onnx` hands `optimize_graph`."""
    d = exported["instatune"][0]
    path = tmp_path_factory.mktemp("eager") / "eager.onnx"
    export_onnx(load_extracted(d, attn_implementation="eager"), path, optimize=False)
    return path


@pytest.mark.parametrize("kind", list(SUBS))
def test_fusions_fire_on_the_dynamo_graph(exported, kind):
    _, path, _, report = exported[kind]
    opt = report["optimization"]
    assert report["exporter"] == "dynamo" and opt["applied"]
    layers = SUBS[kind].layers
    assert opt["fused"] == {"Attention": layers, "EmbedLayerNormalization": 1, "BiasGelu": layers}
    assert opt["fusions"] == list(export.DEFAULT_FUSIONS) and opt["max_abs_diff"] <= 1e-4
    assert opt["rewrites"] == {"reshape_heads": 3 * layers, "attention_masks": layers, "position_slices": 1}
    assert opt["nodes_after"] < opt["nodes_before"] / 2
    assert _count(path, "Attention") == layers and _count(path, "Softmax") == 0
    meta = read_metadata(path)
    assert meta["graph_optimization"].startswith("Attention=") and meta["vocab_size"] == "100"
    assert meta["ort_disabled_optimizers"] == "SkipLayerNormFusion"


def test_per_layer_heads_get_their_own_head_count(exported):
    """ORT's optimizer takes one num_heads; each fused Attention must carry its own layer's count."""
    _, path, _, _ = exported["instatune"]
    heads = [next(a.i for a in n.attribute if a.name == "num_heads") for n in _ops(path) if n.op_type == "Attention"]
    assert heads == list(SUBS["instatune"].heads)


@pytest.mark.parametrize("kind", list(SUBS))
def test_fused_graph_matches_pytorch_at_dynamic_shapes(exported, kind):
    d, path, _, _ = exported[kind]
    graph = onnx.load(str(path)).graph
    for inp in graph.input:
        assert [dm.dim_param for dm in inp.type.tensor_type.shape.dim] == ["batch", "sequence"], inp
    model = load_extracted(d)
    batches = tiny_batches(model.config, SHAPES, seed=5) + [_left_padded(model.config)]
    report = check_parity(path, model, batches, atol=1e-4)
    assert report["shapes"] == [list(s) for s in SHAPES] + [[3, 19]]
    assert report["max_abs_diff"] < 1e-4


def test_optimize_false_is_the_plain_export(exported):
    _, _, plain, _ = exported["stock"]
    assert not any(n.domain == "com.microsoft" for n in _ops(plain))
    assert "graph_optimization" not in read_metadata(plain)


def test_int8_after_fusion_and_fusion_of_an_int8_graph(exported, tmp_path):
    d, fused, plain, _ = exported["instatune"]
    model = load_extracted(d)
    batches = tiny_batches(model.config, SHAPES, seed=3)
    q = quantize_dynamic_int8(fused, tmp_path / "fused.int8.onnx")["onnx_path"]
    assert _count(q, "QAttention") == 3  # fusions first: the quantizer turns Attention into QAttention
    assert check_parity(q, model, batches, atol=0.1)["max_abs_diff"] < 0.1
    q_plain = quantize_dynamic_int8(plain, tmp_path / "plain.int8.onnx")["onnx_path"]
    rep = optimize_graph(q_plain, tmp_path / "plain.int8.opt.onnx")
    assert rep["applied"] and rep["input_quantized"] and "Attention" not in rep["fused"]
    assert rep["max_abs_diff"] <= 1e-4
    assert check_parity(tmp_path / "plain.int8.opt.onnx", model, batches, atol=0.1)["max_abs_diff"] < 0.1


def test_linear_preserving_fusions_keep_every_linear_node(exported, tmp_path):
    _, _, plain, _ = exported["stock"]
    rep = optimize_graph(plain, tmp_path / "lp.onnx", fusions=LINEAR_PRESERVING_FUSIONS)
    assert rep["applied"] and rep["fused"] == {"BiasGelu": 3}

    def linears(path) -> dict[str, list[str]]:
        return {op: sorted(n.name for n in _ops(path) if n.op_type == op) for op in ("MatMul", "Gemm", "Gather")}

    assert linears(tmp_path / "lp.onnx") == linears(plain)


def test_skip_layer_norm_fuses_when_asked(exported, tmp_path):
    """Off by default (slower on ORT's CPU kernel), but the pattern matches our graphs."""
    d, _, plain, _ = exported["stock"]
    rep = optimize_graph(plain, tmp_path / "sln.onnx", fusions=("skip_layer_norm", "gelu"))
    assert rep["applied"] and rep["fused"].get("SkipLayerNormalization") == 6
    model = load_extracted(d)
    assert check_parity(tmp_path / "sln.onnx", model, tiny_batches(model.config, SHAPES))["max_abs_diff"] < 1e-4


def test_a_fusion_that_changes_the_logits_is_dropped(exported, eager_unfused, tmp_path, monkeypatch):
    d = exported["instatune"][0]
    real = fusion._fuse

    def wrong_heads(src, fusions, num_heads, hidden):
        fused, rewrites = real(src, fusions, num_heads, hidden)
        for n in fused.model.graph.node:
            for a in n.attribute:
                if n.op_type == "Attention" and a.name == "num_heads":
                    a.i = 1  # one head of width heads * head_dim: a different function
        return fused, rewrites

    monkeypatch.setattr(fusion, "_fuse", wrong_heads)
    rep = optimize_graph(eager_unfused, tmp_path / "o.onnx")
    assert rep["applied"] and rep["fusions"] == ["gelu", "layer_norm"] and "Attention" not in rep["fused"]
    assert rep["attempts"][0]["max_abs_diff"] > 1e-4
    model = load_extracted(d)
    assert check_parity(tmp_path / "o.onnx", model, tiny_batches(model.config, SHAPES))["max_abs_diff"] < 1e-4


def test_unknown_fusion_is_a_user_error(exported, tmp_path):
    with pytest.raises(InstatuneError, match="unknown fusions"):
        optimize_graph(exported["stock"][2], tmp_path / "x.onnx", fusions=("attention", "flash"))


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_other_families_fuse_attention(family, tiny_export):
    d, path, report, _ = tiny_export(family, 2, SubNet((2, 4), (9, 37)))  # shared with test_export_onnx.py
    assert report["optimization"]["fused"].get("Attention") == 2
    small = load_extracted(d)
    batches = tiny_batches(small.config, SHAPES[:3]) + [_left_padded(small.config)]
    assert check_parity(path, small, batches)["max_abs_diff"] < 1e-4
