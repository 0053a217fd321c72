"""export: ONNX graphs of extracted models (stock and per-layer) with dynamic axes, ORT parity, INT8."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_batches

from instatune_cli.errors import InstatuneError
from instatune_cli.export import (
    check_parity,
    export_onnx,
    ort_session,
    quantize_dynamic_int8,
    read_metadata,
)
from instatune_cli.extract import load_extracted, save_extracted
from instatune_cli.space import SubNet

SUBS = {"stock": SubNet((4, 4, 4), (20, 20, 20)), "instatune": SubNet((3, 1, 4), (37, 5, 12))}
#: two batch sizes and two sequence lengths, both different from the export example (2, 16)
SHAPES = ((1, 7), (4, 23))


@pytest.fixture(scope="module")
def exported(tiny_export):
    """{kind: (model_dir, onnx_path, export report)} for a stock and a per-layer extraction (conftest.tiny_export:
    the same exports as test_graph_optimize.py's)."""
    out = {}
    for kind, sub in SUBS.items():
        d, path, report, extracted = tiny_export("bert", 0, sub)
        assert extracted["kind"] == kind
        out[kind] = (d, path, report)
    return out


@pytest.mark.parametrize("kind", list(SUBS))
def test_export_has_dynamic_axes_and_matches_torch(exported, kind):
    import onnx

    d, path, report = exported[kind]
    assert report["exporter"] == "dynamo" and report["fallback_reason"] is None
    assert report["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    graph = onnx.load(str(path)).graph
    for inp in graph.input:
        dims = inp.type.tensor_type.shape.dim
        assert len(dims) == 2 and all(dm.dim_param and not dm.dim_value for dm in dims), inp
    assert [o.name for o in graph.output] == ["logits"]
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param
    model = load_extracted(d)
    batches = tiny_batches(model.config, SHAPES, seed=5)
    report = check_parity(path, model, batches, atol=1e-4)
    assert report["shapes"] == [list(s) for s in SHAPES]
    assert report["max_abs_diff"] < 1e-4
    meta = read_metadata(path)
    assert meta["vocab_size"] == "100" and meta["model_type"] == model.config.model_type


def test_torchscript_exporter_handles_per_layer_models(exported, tmp_path):
    d, _, _ = exported["instatune"]
    report = export_onnx(d, tmp_path / "ts.onnx", exporter="torchscript")
    assert report["exporter"] == "torchscript"
    model = load_extracted(d)
    report = check_parity(tmp_path / "ts.onnx", model, tiny_batches(model.config, SHAPES))
    assert report["max_abs_diff"] < 1e-4


def test_parity_failure_raises_with_the_difference(exported):
    d, path, _ = exported["instatune"]
    model = load_extracted(d)
    with torch.no_grad():
        model.bert.encoder.layer[1].intermediate.dense.weight.mul_(1.5)
    with pytest.raises(InstatuneError, match=r"disagrees with PyTorch: max \|Δlogit\| [0-9.e+-]+ > 0.0001"):
        check_parity(path, model, tiny_batches(model.config, SHAPES))


def test_parity_needs_the_graph_inputs(exported):
    d, path, _ = exported["stock"]
    model = load_extracted(d)
    batch = tiny_batches(model.config, SHAPES[:1])[0]
    del batch["token_type_ids"]
    with pytest.raises(InstatuneError, match="lacks graph inputs"):
        check_parity(path, model, [batch])


def test_quantize_dynamic_int8(exported, tmp_path):
    import onnx

    d, path, _ = exported["instatune"]
    q = tmp_path / "model.int8.onnx"
    report = quantize_dynamic_int8(path, q)
    assert report["bytes_out"] > 0 and report["method"].endswith("quantize_dynamic")
    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}
    meta = read_metadata(q)
    assert meta["quantization"] == "ort-dynamic-int8" and meta["vocab_size"] == "100"
    model = load_extracted(d)
    # int8 is not bit-exact; it must still run at other shapes and stay close to fp32
    assert check_parity(q, model, tiny_batches(model.config, SHAPES), atol=0.1)["max_abs_diff"] < 0.1


def test_unknown_exporter_and_bad_graph_are_user_errors(exported, tmp_path):
    d, _, _ = exported["stock"]
    with pytest.raises(InstatuneError, match="unknown exporter"):
        export_onnx(d, tmp_path / "x.onnx", exporter="tflite")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx graph")
    with pytest.raises(InstatuneError, match="onnxruntime cannot load"):
        ort_session(bad)


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_other_families_export(family, tiny_export):
    d, path, report, _ = tiny_export(family, 2, SubNet((2, 4), (9, 37)))  # shared with test_graph_optimize.py
    assert report["inputs"] == ["input_ids", "attention_mask"]  # one token type / none: not a graph input
    small = load_extracted(d)
    report = check_parity(path, small, tiny_batches(small.config, SHAPES))
    assert report["max_abs_diff"] < 1e-4


@pytest.mark.integration
def test_minilm_per_layer_export_parity(minilm_dir, tmp_path):
    from transformers import AutoTokenizer

    from instatune_cli.adapters import adapter_of, load_classifier

    path = minilm_dir
    model = load_classifier(str(path), num_labels=2).eval()
    adapter_of(model).make_elastic(model)
    tok = AutoTokenizer.from_pretrained(path)
    save_extracted(model, SubNet((12, 6, 8, 12), (1536, 512, 1024, 768)), tok, tmp_path)
    report = export_onnx(tmp_path, tmp_path / "model.onnx")
    assert report["exporter"] == "dynamo"
    texts = ["a gripping , funny film", "the plot is thin and the acting wooden ; nothing works here", "ok"]
    batches = [dict(tok(texts, padding=True, return_tensors="pt")), dict(tok(texts[:1], return_tensors="pt"))]
    assert check_parity(tmp_path / "model.onnx", load_extracted(tmp_path), batches)["max_abs_diff"] < 1e-4
