"""The quantize stage and its policy: exactly the FP32 layers stay FP32, both engines, one-line bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_cli_error, run_cli

from instatune_cli import artifacts
from instatune_cli.errors import InstatuneError
from instatune_cli.quantize.emulate import QuantEmulator, qdq_int8_rows, qdq_uint8
from instatune_cli.quantize.policy import Architecture, QuantPolicy, shapes
from instatune_cli.quantize.targets import architecture_of, onnx_targets, torch_targets


@pytest.fixture(scope="module")
def extracted(tiny_quant_extract):
    """conftest.QUANT_SUBNET extracted from the tiny tuned run (shared with test_lowbit.py)."""
    return tiny_quant_extract


@pytest.fixture
def m_onnx(tiny_quant_onnx, tmp_path):
    """A copy of its plain FP32 export in the test's own directory (the graph `export_onnx(extracted,
    optimize=False)` writes, exported once per session)."""
    return Path(shutil.copy(tiny_quant_onnx, tmp_path / "m.onnx"))


def _model(path):
    from instatune_cli.extract import load_extracted

    return load_extracted(path).eval()


def test_policy_round_trips_through_json_and_names_every_layer(extracted, tmp_path):
    arch = architecture_of(_model(extracted))
    assert arch.heads == (2, 4) and arch.ffn == (25, 37)
    pol = QuantPolicy.uniform(arch)
    pol.layers["layer.1.ffn_out"] = "fp32"
    pol.save(tmp_path / "p.json")
    back = QuantPolicy.load(tmp_path / "p.json")
    assert back.layers == pol.layers and back.architecture == arch
    assert len(back.layers) == 1 + 2 * 6 + 2 and back.fp32() == ["layer.1.ffn_out"]
    assert QuantPolicy.from_bits(arch, back.bits()).layers == back.layers


def test_policy_refuses_unknown_layers_foreign_architecture_and_bad_files(extracted, tmp_path):
    arch = architecture_of(_model(extracted))
    with pytest.raises(InstatuneError, match="does not have: layer.7.query"):
        QuantPolicy(arch, {"layer.7.query": "int8"})
    with pytest.raises(InstatuneError, match="use one of int8, fp32, int4, int8-weights"):
        QuantPolicy(arch, {"layer.0.query": "int2"})
    other = Architecture(arch.model_type, arch.hidden, arch.head_dim, (4, 4), (64, 64), arch.num_labels)
    with pytest.raises(InstatuneError, match="made for .* not the model"):
        QuantPolicy.uniform(other).check_for(arch)
    (tmp_path / "x.json").write_text('{"layers": {}}')
    with pytest.raises(InstatuneError, match="not an instatune quantization policy"):
        QuantPolicy.load(tmp_path / "x.json")


def test_onnx_nodes_map_to_every_logical_layer(extracted, m_onnx, tmp_path):
    m = _model(extracted)
    nodes = onnx_targets(onnx.load(str(tmp_path / "m.onnx")).graph, torch_targets(m))
    assert set(nodes) == set(architecture_of(m).names())
    assert len(set(nodes.values())) == len(nodes)


def test_mixed_policy_keeps_exactly_the_fp32_layers_fp32_ort(extracted, m_onnx, tmp_path, tiny_tune_run):
    from instatune_cli.export import ort_session
    from instatune_cli.quantize.ort_engine import quantize_onnx, quantized_nodes
    from instatune_cli.tune import load_eval_batches

    m = _model(extracted)
    t = torch_targets(m)
    pol = QuantPolicy.uniform(architecture_of(m))
    keep = ["layer.0.query", "layer.1.ffn_in", "classifier", "embeddings"]
    for n in keep:
        pol.layers[n] = "fp32"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(extracted))
    calib = [{k: v for k, v in b.items() if k != "labels"}
             for b in load_eval_batches(tiny_tune_run, tok, batch_size=8, which="calib")]
    quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", pol, t, calib)
    nodes = onnx_targets(onnx.load(str(tmp_path / "m.onnx")).graph, t)
    got = quantized_nodes(tmp_path / "q.onnx")
    assert got == {nodes[n] for n in pol.int8()}
    assert not got & {nodes[n] for n in keep}
    s0, s1 = ort_session(tmp_path / "m.onnx"), ort_session(tmp_path / "q.onnx")
    feeds = {k: calib[0][k].numpy().astype(np.int64) for k in [i.name for i in s0.get_inputs()]}
    a, b = s0.run(["logits"], feeds)[0], s1.run(["logits"], feeds)[0]
    assert 0 < np.abs(a - b).max() < 0.05 * max(1.0, np.abs(a).max())


def test_closed_form_size_matches_the_ort_file(extracted, m_onnx, tmp_path, tiny_tune_run):
    """The joint search's size objective is the weight bytes ONNX Runtime's engine actually writes (within 3 %;
    the rest of the file is the graph, a fixed few kB)."""
    from instatune_cli.measure.size import onnx_bytes
    from instatune_cli.quantize.joint import size_bytes
    from instatune_cli.quantize.ort_engine import quantize_onnx

    m = _model(extracted)
    arch = architecture_of(m)
    calib = [{k: v for k, v in b.items()} for b in [_calib(m)]]
    for pol in (QuantPolicy.uniform(arch), QuantPolicy.uniform(arch, "fp32")):
        quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", pol, torch_targets(m), calib)
        real = _initializer_bytes(tmp_path / "q.onnx")
        assert onnx_bytes(tmp_path / "q.onnx") < real + 60_000  # node metadata (stack traces) stripped
        est = size_bytes(m, arch, pol)
        assert abs(est - real) / real < 0.03, (pol.source, est, real)


def _calib(m):
    from instatune_cli.extract import random_batch

    b = random_batch(m.config, 4, 12, seed=3)
    return {k: v for k, v in b.items()}


def test_emulation_matches_the_ort_engine_and_restores_weights(extracted, m_onnx, tmp_path):
    """The search's PyTorch QDQ arithmetic gives the ORT engine's logits (to accumulation error), and the
    model is unchanged afterwards. (ORT runs the classifier's QDQ Gemm closer to FP32 than its QDQ arithmetic
    says, so it is left FP32 here; every MatMul/Gather layer matches.)"""
    from instatune_cli.export import ort_session
    from instatune_cli.quantize.ort_engine import quantize_onnx

    m = _model(extracted)
    arch = architecture_of(m)
    pol = QuantPolicy.uniform(arch)
    pol.layers["layer.1.value"] = "fp32"
    pol.layers["classifier"] = "fp32"
    calib = [_calib(m)]
    quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", pol, torch_targets(m), calib, strict=True)
    sess = ort_session(tmp_path / "q.onnx")
    names = [i.name for i in sess.get_inputs()]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        fp32 = m(**calib[0]).logits
        with QuantEmulator(m, calib).applied(None, pol, shared=False):
            emu = m(**calib[0]).logits
    real = sess.run(["logits"], {n: calib[0][n].numpy().astype(np.int64) for n in names})[0]
    assert np.abs(emu.numpy() - real).max() < 0.05 * np.abs(fp32.numpy() - real).max()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_qdq_helpers():
    x = torch.linspace(-1, 3, 101)
    y = qdq_uint8(x, -1.0, 3.0)
    assert (y - x).abs().max() <= 4 / 255 / 2 + 1e-6
    w = torch.randn(5, 7)
    assert (qdq_int8_rows(w) - w).abs().max() <= (w.abs().amax(1) * 2 / 255).max() / 2 + 1e-6


def test_size_counts_an_int8_weight_as_one_byte_plus_a_scale_per_row():
    from instatune_cli.quantize.joint import size_from_params

    arch = Architecture("bert", 8, 2, (4,), (16,), 2)
    n = sum(r * c for r, c, _ in shapes(arch, 50).values())
    fp = size_from_params(n, arch, 50, None)
    q = size_from_params(n, arch, 50, QuantPolicy.uniform(arch))
    rows = sum(r for name, (r, _, _) in shapes(arch, 50).items() if name != "embeddings")
    # per row an FP32 scale and an INT8 zero point; per layer the input's and output's scale and zero point
    assert fp == 4 * n and fp - q == 3 * n - 5 * rows - 10 * len(shapes(arch, 50))


@pytest.fixture(scope="module")
def quantized(extracted, tmp_path_factory):
    """(output directory, printed output) of the default quantize stage (all INT8, ORT engine) of `extracted`."""
    out = tmp_path_factory.mktemp("int8") / "int8"
    r = run_cli("quantize", extracted, "--output", out, "--calibration-samples", "16", "--runs", "2")
    assert r.exit_code == 0, r.output
    return out, r.output


def test_quantize_stage_ort_end_to_end(quantized):
    out, output = quantized
    art = artifacts.load(out, "quantize")
    m = art.metrics
    assert (out / "model.int8.onnx").is_file() and (out / "policy.json").is_file()
    assert m["size_bytes"]["int8"] < m["size_bytes"]["fp32"] and m["calibration_examples"] == 16
    assert set(m["accuracy"]) == {"fp32", "int8"} and m["accuracy"]["int8"]["split"] == "eval"
    assert QuantPolicy.load(out / "policy.json").fp32() == []
    assert "all-int8" in output or "every layer" in output
    assert not list(out.parent.glob("nc_workspace*"))


def test_quantize_stage_inc_engine_refuses_what_does_not_ship(extracted, tmp_path, monkeypatch):
    """On the tiny model Neural Compressor's archive (a torch.export program) outweighs the FP32 weights, so the
    stage refuses in one line with the numbers and writes nothing (the artifact itself: test_lowbit)."""
    monkeypatch.chdir(tmp_path)
    pol = QuantPolicy.uniform(architecture_of(_model(extracted)))
    pol.layers["layer.0.key"] = "fp32"
    pol.layers["embeddings"] = "fp32"  # the X86 quantizer has no embedding pattern (an INT8 table is refused)
    pol.save(tmp_path / "p.json")
    out = tmp_path / "inc"
    r = run_cli("quantize", extracted, "--engine", "inc", "--policy", tmp_path / "p.json", "--output", out,
                "--calibration-samples", "16", "--runs", "2")
    line = assert_cli_error(r, "static INT8 model is not smaller and faster than FP32", " MB -> ", " ms -> ",
                            "--engine ort")
    assert "Auto detect accelerator" not in r.output and "hw aligned" not in r.output, line
    assert not out.exists() and not (tmp_path / "nc_workspace").exists()
    pol.layers["embeddings"] = "int8"
    pol.save(tmp_path / "p.json")
    r = run_cli("quantize", extracted, "--engine", "inc", "--policy", tmp_path / "p.json", "--output", out)
    assert_cli_error(r, "sets embeddings to int8", "inc engine")
    pol.layers["embeddings"], pol.layers["layer.1.query"] = "fp32", "int8-weights"
    pol.save(tmp_path / "p.json")
    r = run_cli("quantize", extracted, "--engine", "inc", "--policy", tmp_path / "p.json", "--output", out)
    assert_cli_error(r, "not both")


@pytest.mark.parametrize("args,fragment", [
    (["--calibration-samples", "2"], "too few"),
    (["--engine", "tflite"], "unknown engine"),
    (["--policy", "missing.json"], "does not exist"),
    (["--policy", "p.json", "--all-int8"], "not several"),
    (["--all-int8", "--group-size", "32"], "--group-size is for --all-int4"),
    (["--compile"], "ONNX Runtime needs no compile step"),
])
def test_quantize_bad_input_is_one_line(extracted, tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.json").write_text(json.dumps({"x": 1}))
    r = run_cli("quantize", extracted, "--output", tmp_path / "o", *args)
    assert_cli_error(r, fragment)
    assert not (tmp_path / "o").exists()


def test_quantize_refuses_a_policy_for_another_architecture(extracted, tmp_path):
    arch = architecture_of(_model(extracted))
    other = Architecture(arch.model_type, arch.hidden, arch.head_dim, (4, 4), (64, 64), arch.num_labels)
    QuantPolicy.uniform(other).save(tmp_path / "p.json")
    r = run_cli("quantize", extracted, "--policy", tmp_path / "p.json", "--output", tmp_path / "o")
    assert_cli_error(r, "policy was made for")
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def joint(tiny_tune_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("joint") / "s"
    r = run_cli("search", tiny_tune_run, "--objectives", "acc,size", "--quant", "--evals", "12", "--population",
                "6", "--calibration-samples", "16", "--output", out, "--json")
    assert r.exit_code == 0, r.output
    return out


def test_joint_search_archives_masked_precision_genes_and_policies(joint):
    from instatune_cli.space import SearchSpace, SubNet, quant_gene_count

    rows = [json.loads(x) for x in (joint / "archive.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(len(r["quant"]) == quant_gene_count(r["layers"]) for r in rows)
    front = json.loads((joint / "front.json").read_text())
    assert front["front"] and all("policy" in r for r in front["front"])
    assert front["reference"]["size"] > max(r["size"] for r in front["front"] if sum(r["quant"]) > 0) * 0.99
    sub = SubNet.from_dict(front["front"][0])
    pol = QuantPolicy.from_dict(front["front"][0]["policy"])
    assert pol.bits() == list(sub.quant)
    space = SearchSpace.from_dict(json.loads((joint / "manifest.json").read_text())["metrics"].get("space")
                                  or {"layers": [2, 3, 4], "heads": [2, 3, 4], "ffn": [12, 25, 37], "quant": True})
    assert space.quant


def test_joint_search_refuses_latency_and_needs_size(tiny_tune_run, tmp_path):
    r = run_cli("search", tiny_tune_run, "--objectives", "acc,macs", "--quant", "--output", tmp_path / "s")
    assert_cli_error(r, "needs the size objective")
    r = run_cli("search", tiny_tune_run, "--objectives", "acc,size,latency", "--quant", "--output", tmp_path / "s")
    assert_cli_error(r, "drop latency")


def test_quantize_uses_the_searched_policy(joint, tmp_path):
    front = json.loads((joint / "front.json").read_text())["front"]
    n = next(r["subnet"] for r in front if 0 < sum(r["quant"]) < len(r["quant"])) if any(
        0 < sum(r["quant"]) < len(r["quant"]) for r in front) else front[0]["subnet"]
    r = run_cli("quantize", joint, "--subnet", str(n), "--output", tmp_path / "q", "--calibration-samples", "16",
                "--runs", "2")
    assert r.exit_code == 0, r.output
    assert "policy the joint search chose" in r.output
    want = QuantPolicy.from_dict(next(x for x in front if x["subnet"] == n)["policy"])
    assert QuantPolicy.load(tmp_path / "q" / "policy.json").layers == want.layers


def test_export_int8_uses_the_searched_policy_and_says_so(joint, tmp_path):
    from instatune_cli.quantize.ort_engine import blockwise_nodes, quantized_nodes

    front = json.loads((joint / "front.json").read_text())["front"]
    row = front[0]
    r = run_cli("export", joint, "--subnet", str(row["subnet"]), "--int8", "--no-compare", "--runs", "2", "--force",
                "--output", tmp_path / "e")
    assert r.exit_code == 0, r.output
    m = artifacts.load(tmp_path / "e", "export").metrics["int8"]
    assert "joint search's policy" in m["note"] and m["policy"]["layers"] == row["policy"]["layers"]
    assert len(quantized_nodes(tmp_path / "e" / "model.int8.onnx")) == sum(b == 1 for b in row["quant"])
    assert len(blockwise_nodes(tmp_path / "e" / "model.int8.onnx")) == sum(b == 2 for b in row["quant"])


def test_trim_vocab_keeps_training_tokens_and_the_same_predictions_on_them(extracted, quantized, tmp_path):
    from instatune_cli.export import ort_session

    full, trim = quantized[0], tmp_path / "trim"  # the same command without --trim-vocab
    r = run_cli("quantize", extracted, "--output", trim, "--calibration-samples", "16", "--runs", "2", "--trim-vocab")
    assert r.exit_code == 0, r.output
    v = artifacts.load(trim, "quantize").metrics["quantization"]["vocabulary"]
    assert 0 < v["kept"] < v["of"]
    table = next(i for i in onnx.load(str(trim / "model.int8.onnx")).graph.initializer if i.name == v["table"])
    assert table.dims[0] == v["kept"]  # (on a tiny vocabulary the id map outweighs the rows saved)
    # on text made only of training tokens the two graphs agree exactly (same rows, same scales)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(extracted))
    a, b = ort_session(full / "model.int8.onnx"), ort_session(trim / "model.int8.onnx")
    enc = tok(["good movie", "bad plot"], padding=True, return_tensors="np")
    feeds = {i.name: enc[i.name].astype(np.int64) for i in a.get_inputs()}
    assert np.allclose(a.run(["logits"], feeds)[0], b.run(["logits"], feeds)[0], atol=1e-6)


def test_trim_vocab_needs_the_ort_engine(extracted, tmp_path):
    r = run_cli("quantize", extracted, "--engine", "inc", "--trim-vocab", "--output", tmp_path / "o")
    assert_cli_error(r, "use it with --engine ort")


def _initializer_bytes(path):
    """Payload bytes of a graph's weights: every initializer but the integer index constants (shapes, axes,
    BERT's position_ids buffer), which are no parameter of any layer (a few hundred bytes)."""
    return sum(onnx.numpy_helper.to_array(i).nbytes for i in onnx.load(str(path)).graph.initializer
               if i.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.BOOL))
