"""INT4 / weight-only INT8 per layer (issue 22): the policy format, ONNX Runtime's block-wise operators, the
emulation the joint search scores with, and the closed-form size, each checked against the graph ORT runs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_cli_error, run_cli

from instatune_cli import artifacts
from instatune_cli.errors import InstatuneError
from instatune_cli.quantize.emulate import QuantEmulator, blockwise, qdq_blockwise
from instatune_cli.quantize.policy import QuantPolicy, engine_refusal
from instatune_cli.quantize.targets import architecture_of, torch_targets

GROUP = 16  # divides the tiny model's hidden size (32) and head widths (2 or 4 heads of 8); not its FFN (25, 37)


@pytest.fixture(scope="module")
def extracted(tiny_quant_extract):
    """conftest.QUANT_SUBNET extracted from the tiny tuned run (shared with test_quantize.py)."""
    return tiny_quant_extract


@pytest.fixture(scope="module")
def fp32_onnx(tiny_quant_onnx):
    """Its plain FP32 export (`export_onnx(extracted, optimize=False)`, once per session)."""
    return tiny_quant_onnx


def _model(path):
    from instatune_cli.extract import load_extracted

    return load_extracted(path).eval()


def _calib(m, seed=3):
    from instatune_cli.extract import random_batch

    return dict(random_batch(m.config, 4, 12, seed=seed))


def _policy(arch, kind):
    """The policies the engine/emulation tests run: one precision everywhere it fits, or a mix of all four."""
    if kind == "mixed":
        pol = QuantPolicy.uniform(arch, "int8", group_size=GROUP)
        pol.layers.update({"embeddings": "int4", "layer.0.query": "fp32", "layer.0.value": "int4",
                           "layer.0.attn_out": "int8-weights", "layer.1.ffn_in": "int4", "layer.1.key": "fp32",
                           "pooler": "int4", "classifier": "fp32"})
        return pol
    return QuantPolicy.uniform(arch, kind, group_size=GROUP)


def test_blockwise_rounding_is_symmetric_per_group_and_packs_as_ort_reads_it():
    w = torch.randn(6, 32) * torch.linspace(0.1, 3, 32)
    for bits in (4, 8):
        q = qdq_blockwise(w, bits, 16)
        qmax = 2 ** (bits - 1) - 1
        blocks = w.reshape(6, 2, 16).abs().amax(-1, keepdim=True)
        assert ((q - w).reshape(6, 2, 16).abs() <= blocks / qmax / 2 + 1e-6).all()
        packed, scales = blockwise(w.numpy(), bits, 16)
        assert packed.shape == (6, 32 * bits // 8) and scales.shape == (6, 2)
        vals = np.stack([packed & 15, packed >> 4], -1).reshape(6, 32) if bits == 4 else packed
        deq = (vals.astype(np.float32) - 2 ** (bits - 1)).reshape(6, 2, 16) * scales[..., None]
        assert np.array_equal(deq.reshape(6, 32), q.numpy())


def test_policy_reads_version_1_files_the_long_form_and_refuses_what_has_no_operator(extracted, tmp_path):
    arch = architecture_of(_model(extracted))
    old = QuantPolicy.uniform(arch).to_dict()
    old["version"], old["layers"]["layer.0.key"] = 1, "fp32"
    del old["group_size"]
    (tmp_path / "v1.json").write_text(json.dumps(old))
    back = QuantPolicy.load(tmp_path / "v1.json")
    n = len(back.layers)
    assert back.fp32() == ["layer.0.key"] and back.summary() == f"{n - 1}/{n} layers INT8 (FP32: layer.0.key)"
    new = back.to_dict()
    new["layers"]["layer.1.query"] = {"weights": "int4", "activations": "fp32"}
    new["layers"]["layer.1.key"] = {"weights": "int8", "activations": "fp32"}
    new["group_size"] = GROUP
    pol = QuantPolicy.from_dict(new)
    assert pol.layers["layer.1.query"] == "int4" and pol.layers["layer.1.key"] == "int8-weights"
    assert pol.bits()[arch.names().index("layer.1.query")] == 2
    assert "1 INT4" in pol.summary() and "1 INT8 weight-only" in pol.summary()
    new["layers"]["layer.1.query"] = {"weights": "int4", "activations": "int8"}
    with pytest.raises(InstatuneError, match="INT8 activations need INT8 weights"):
        QuantPolicy.from_dict(new)
    new["layers"]["layer.1.query"] = "int4"
    new["layers"]["layer.1.ffn_out"] = "int4"
    with pytest.raises(InstatuneError, match=r"layer.1.ffn_out to int4 with group size 16, which does not divide its "
                                             r"input width 37"):
        QuantPolicy.from_dict(new)
    new["layers"]["layer.1.ffn_out"], new["group_size"] = "int8", 24
    with pytest.raises(InstatuneError, match="group size 24 is not a power of two"):
        QuantPolicy.from_dict(new)
    # the inc engine's static route has no 4-bit operator: one line naming the layer and the engine
    from instatune_cli.quantize.inc_engine import STATIC_SUPPORTS

    pol.layers["embeddings"] = "fp32"
    why = engine_refusal(pol, "inc", STATIC_SUPPORTS)
    assert why is not None and "layer.1.query to int4" in why and "inc engine" in why and "\n" not in why
    # int4 asked for a layer the group does not fit: the uniform policy keeps it INT8, genes too
    u = QuantPolicy.uniform(arch, "int4", group_size=GROUP)
    assert u.layers["layer.0.ffn_out"] == "int8" and u.layers["layer.0.ffn_in"] == "int4"
    genes = [2] * len(arch.names())
    assert QuantPolicy.from_bits(arch, genes, group_size=GROUP).layers == u.layers


@pytest.mark.parametrize("kind", ["int8", "int8-weights", "int4", "mixed"])
def test_each_precision_emulates_the_ort_graph_it_ships(extracted, fp32_onnx, tmp_path, kind):
    """The search's PyTorch arithmetic against the real ONNX Runtime operators (QDQ, MatMulNBits,
    GatherBlockQuantized) on the graph `quantize` ships (shared activation QDQ): the logits agree to within 2 % of
    the quantization's own effect (FP32 vs ORT), i.e. to accumulation-order error. The strict reading is the
    same check on the --strict-fp32 graph (whose INT8 classifier would still round the logits: kept FP32)."""
    from instatune_cli.export import ort_session
    from instatune_cli.quantize.ort_engine import blockwise_nodes, quantize_onnx

    m = _model(extracted)
    pol = _policy(architecture_of(m), kind)
    calib = [_calib(m)]
    for strict in (False, True):
        if strict and pol.layers["classifier"] == "int8":
            pol.layers["classifier"] = "fp32"
        out = tmp_path / f"q{strict}.onnx"
        info = quantize_onnx(fp32_onnx, out, pol, torch_targets(m), calib, strict=strict)
        nb = blockwise_nodes(out)
        want = [n for n in pol.quantized() if pol.layers[n] in ("int4", "int8-weights")]
        assert len(nb) == len(want) == sum(info["nodes_blockwise"].values())
        sess = ort_session(out)
        feeds = {i.name: calib[0][i.name].numpy().astype(np.int64) for i in sess.get_inputs()}
        test = _calib(m, seed=11)  # not the calibration batch
        feeds_t = {k: test[k].numpy().astype(np.int64) for k in feeds}
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with torch.no_grad():
            fp32 = m(**test).logits.numpy()
            with QuantEmulator(m, calib).applied(None, pol, shared=not strict):
                emu = m(**test).logits.numpy()
        real = sess.run(["logits"], feeds_t)[0]
        effect = np.abs(fp32 - real).max()
        assert effect > 1e-4, (kind, strict)  # the quantization did something
        assert np.abs(emu - real).max() < 0.02 * effect + 1e-5, (kind, strict, np.abs(emu - real).max(), effect)
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
        del feeds


def test_shared_emulation_rounds_the_residual_too(extracted, fp32_onnx, tmp_path):
    """The 0.9-point gap of issue 22: with INT8 linears the shipped graph's residual Add reads the rounded layer
    input; emulating only the linear's own copy (strict) misses it."""
    from instatune_cli.export import ort_session
    from instatune_cli.quantize.ort_engine import quantize_onnx

    m = _model(extracted)
    pol = QuantPolicy.uniform(architecture_of(m))
    calib = [_calib(m)]
    quantize_onnx(fp32_onnx, tmp_path / "q.onnx", pol, torch_targets(m), calib)
    sess = ort_session(tmp_path / "q.onnx")
    test = _calib(m, seed=5)
    real = sess.run(["logits"], {i.name: test[i.name].numpy().astype(np.int64) for i in sess.get_inputs()})[0]
    em = QuantEmulator(m, calib)
    with torch.no_grad():
        with em.applied(None, pol, shared=True):
            shared = m(**test).logits.numpy()
        with em.applied(None, pol, shared=False):
            strict = m(**test).logits.numpy()
    assert np.abs(shared - real).max() < 0.5 * np.abs(strict - real).max()


def test_closed_form_size_matches_ort_initializers_for_mixed_policies(extracted, fp32_onnx, tmp_path):
    from instatune_cli.quantize.joint import size_bytes
    from instatune_cli.quantize.ort_engine import quantize_onnx

    m = _model(extracted)
    arch = architecture_of(m)
    calib = [_calib(m)]
    sizes = {}
    for kind in ("int8", "int8-weights", "int4", "mixed", "fp32"):
        pol = _policy(arch, kind) if kind != "fp32" else QuantPolicy.uniform(arch, "fp32")
        quantize_onnx(fp32_onnx, tmp_path / "q.onnx", pol, torch_targets(m), calib)
        real = _initializer_bytes(tmp_path / "q.onnx")
        est = size_bytes(m, arch, pol)
        assert abs(est - real) / real < 0.03, (kind, est, real)
        sizes[kind] = real
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"]


def test_quantize_stage_ships_int4_and_says_so(extracted, tmp_path):
    from instatune_cli.quantize.ort_engine import blockwise_nodes

    pol = _policy(architecture_of(_model(extracted)), "mixed")
    pol.save(tmp_path / "p.json")
    out = tmp_path / "q"
    r = run_cli("quantize", extracted, "--policy", tmp_path / "p.json", "--output", out, "--calibration-samples", "16",
                "--runs", "2")
    assert r.exit_code == 0, r.output
    m = artifacts.load(out, "quantize").metrics
    assert len(blockwise_nodes(out / "model.int8.onnx")) == m["quantization"]["nodes_quantized"] - len(pol.int8())
    assert m["size_bytes"]["int8"] < m["size_bytes"]["fp32"] and "INT4" in r.output
    assert m["latency"]["fp32"].get("graph") == "fused (as export ships it)"
    assert QuantPolicy.load(out / "policy.json").layers == pol.layers


def test_quantize_refuses_what_the_inc_engine_has_no_operator_for_in_one_line(extracted, tmp_path):
    pol = QuantPolicy.uniform(architecture_of(_model(extracted)), "fp32", group_size=GROUP)
    pol.layers.update({"layer.0.value": "int4", "layer.0.key": "int8"})
    pol.save(tmp_path / "p.json")
    r = run_cli("quantize", extracted, "--engine", "inc", "--policy", tmp_path / "p.json", "--output", tmp_path / "o")
    assert_cli_error(r, "static INT8", "weight-only", "not both")
    pol.layers.update({"layer.0.key": "fp32", "embeddings": "int4"})
    pol.save(tmp_path / "p.json")
    r = run_cli("quantize", extracted, "--engine", "inc", "--policy", tmp_path / "p.json", "--output", tmp_path / "o")
    assert_cli_error(r, "sets embeddings to int4", "inc engine")
    assert not (tmp_path / "o").exists()


def _initializer_bytes(path):
    """Payload bytes of a graph's weights: every initializer but the integer index constants (shapes, axes,
    BERT's position_ids buffer), which are no parameter of any layer (a few hundred bytes)."""
    return sum(onnx.numpy_helper.to_array(i).nbytes for i in onnx.load(str(path)).graph.initializer
               if i.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.BOOL))


def test_joint_space_offers_int4_only_where_the_group_fits_every_choice():
    from instatune_cli.quantize.joint import int4_flags
    from instatune_cli.space import SearchSpace, SubNet, quant_gene_count

    space = SearchSpace.from_dict({"layers": [1, 2], "heads": [2, 4], "ffn": [32, 37], "quant": True})
    flags = int4_flags(space, hidden=32, head_dim=8, group=16)
    # embeddings; per layer q, k, v (hidden), attn_out (16 or 32: fits), ffn_in (hidden), ffn_out (37: no); head
    assert flags == (True, *([True] * 5 + [False]) * 2, True, True)
    import dataclasses
    import random

    j = dataclasses.replace(space, quant_int4=flags)
    assert SearchSpace.from_dict(j.to_dict()) == j
    assert j.gene_bounds()[-len(flags):] == [3 if f else 2 for f in flags]
    assert j.cardinality() == 4 * (2 * 3 ** 8) + 16 * (3 ** 13 * 2 ** 2)
    subs = [j.sample(random.Random(s)) for s in range(40)]
    assert any(2 in s.quant for s in subs) and all(j.contains(s) for s in subs)
    assert all(j.decode(j.encode(s)) == s for s in subs)
    assert len({len(j.features(s)) for s in subs}) == 1
    bad = SubNet((2,), (32,), (1, 1, 1, 1, 1, 1, 2, 1, 1))  # ffn_out of layer 0 at INT4
    assert len(bad.quant) == quant_gene_count(1) and not j.contains(bad)
    with pytest.raises(InstatuneError, match="precision gene 6 is 2"):
        j.check(bad)
    assert not space.contains(SubNet((2,), (32,), (2,) * 9))  # a space without INT4 genes


def test_emulation_on_the_super_network_matches_the_extracts_ort_graph(tiny_tune_run, extracted, fp32_onnx, tmp_path):
    """What the joint search scores (the super-network with the sub-network active, elastic slices) is what
    `quantize` ships for that sub-network's extract, for a mixed FP32/INT8/INT4 policy."""
    from instatune_cli.export import ort_session
    from instatune_cli.quantize.ort_engine import quantize_onnx
    from instatune_cli.space import SubNet
    from instatune_cli.tune import load_tuned

    m = _model(extracted)
    pol = _policy(architecture_of(m), "mixed")
    calib = [_calib(m)]
    quantize_onnx(fp32_onnx, tmp_path / "q.onnx", pol, torch_targets(m), calib)
    sess = ort_session(tmp_path / "q.onnx")
    test = _calib(m, seed=11)
    real = sess.run(["logits"], {i.name: test[i.name].numpy().astype(np.int64) for i in sess.get_inputs()})[0]
    sup, _, _, _ = load_tuned(tiny_tune_run)
    sub = SubNet((2, 4), (25, 37))
    with torch.no_grad(), QuantEmulator(sup, calib).applied(sub, pol):
        emu = sup(**test).logits.numpy()
    with torch.no_grad():
        fp32 = m(**test).logits.numpy()
    assert np.abs(emu - real).max() < 0.02 * np.abs(fp32 - real).max() + 1e-5


def test_trim_vocab_trims_an_int4_table_and_its_scales(extracted, tmp_path):
    from instatune_cli.export import ort_session

    pol = QuantPolicy.uniform(architecture_of(_model(extracted)), "int4", group_size=GROUP)
    pol.save(tmp_path / "p.json")
    full, trim = tmp_path / "full", tmp_path / "trim"
    for out, extra in ((full, []), (trim, ["--trim-vocab"])):
        r = run_cli("quantize", extracted, "--policy", tmp_path / "p.json", "--output", out, "--calibration-samples",
                    "16", "--runs", "2", *extra)
        assert r.exit_code == 0, r.output
    v = artifacts.load(trim, "quantize").metrics["quantization"]["vocabulary"]
    g = onnx.load(str(trim / "model.int8.onnx")).graph
    gather = next(n for n in g.node if n.op_type == "GatherBlockQuantized")
    dims = {i.name: list(i.dims) for i in g.initializer}
    assert dims[gather.input[0]] == [v["kept"], 32 // 2] and dims[gather.input[2]] == [v["kept"], 32 // GROUP]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(extracted))
    a, b = ort_session(full / "model.int8.onnx"), ort_session(trim / "model.int8.onnx")
    enc = tok(["good movie", "bad plot"], padding=True, return_tensors="np")
    feeds = {i.name: enc[i.name].astype(np.int64) for i in a.get_inputs()}
    assert np.allclose(a.run(["logits"], feeds)[0], b.run(["logits"], feeds)[0], atol=1e-6)


def test_inc_static_artifact_holds_int8_weights_and_reloads_with_incs_loader(extracted, tmp_path):
    import torch.export

    from instatune_cli.quantize import inc_engine

    m = _model(extracted)
    arch = architecture_of(m)
    pol = QuantPolicy.uniform(arch)
    pol.layers["embeddings"] = "fp32"
    names = ["input_ids", "attention_mask", "token_type_ids"]
    calib = [_calib(m)]
    gm, info = inc_engine.quantize_torch(m, pol, torch_targets(m), calib, names, tmp_path)
    assert info["int8_linears"] == len(pol.int8())
    inc_engine.save(gm, tuple(calib[0][n] for n in names), tmp_path / "inc")
    ep = torch.export.load(str(tmp_path / "inc" / "quantized_weight.pt"))
    tensors = {**ep.state_dict, **ep.constants}
    int8 = [t for t in tensors.values() if t.dtype == torch.int8]
    assert len(int8) == len(pol.int8())  # one INT8 weight per linear ...
    assert not any(k.endswith("query.weight") or k.endswith("classifier.weight") for k in tensors)  # ... no FP32 one
    back = inc_engine.load(tmp_path / "inc")
    test = _calib(m, seed=11)
    args = tuple(test[n] for n in names)
    with torch.no_grad():
        assert torch.equal(back(*args), gm(*args))
        assert 0 < (back(*args) - m(**test).logits).abs().max() < 0.05


def test_inc_weight_only_artifact_is_packed_and_reloads_with_incs_loader(extracted, tmp_path):
    from instatune_cli.quantize import inc_engine

    m = _model(extracted)
    pol = QuantPolicy.uniform(architecture_of(m), "int4", group_size=GROUP)
    pol.layers.update({n: "int8-weights" for n in pol.int8()})
    pol.layers["embeddings"] = "fp32"
    assert inc_engine.route(pol) == "weight-only"
    q, info = inc_engine.quantize_weight_only(_model(extracted), pol, torch_targets(m))
    assert info["weight_only_linears"] == len(pol.quantized())
    files = inc_engine.save_weight_only(q, tmp_path / "inc")
    assert "qconfig.json" in files
    sd = torch.load(tmp_path / "inc" / next(f for f in files if f != "qconfig.json"), weights_only=True)
    assert not any(k.endswith("query.weight") for k in sd)  # packed, not FP32
    assert any(k.endswith("query.qweight") and v.dtype in (torch.int32, torch.int8, torch.uint8) for k, v in sd.items())
    back = inc_engine.load(tmp_path / "inc", _model(extracted))
    test = _calib(m, seed=11)
    with torch.no_grad():
        assert torch.equal(back(**test).logits, q(**test).logits)
        assert 0 < (back(**test).logits - m(**test).logits).abs().max() < 0.1


def test_joint_search_refuses_a_group_size_ort_has_no_operator_for(tiny_tune_run, tmp_path):
    r = run_cli("search", tiny_tune_run, "--objectives", "acc,size", "--quant", "--group-size", "24", "--output",
                tmp_path / "s")
    assert_cli_error(r, "--group-size 24 is not a power of two")
    assert not (tmp_path / "s").exists()
