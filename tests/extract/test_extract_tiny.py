"""extract: physically smaller models from tiny elastic super-networks (built from configs, no download)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import (
    load_without_instatune,
    logits,
    max_diff,
    subnet_logits,
    tiny_batches,
    tiny_model,
)

from instatune_cli.adapters import adapter_of
from instatune_cli.errors import InstatuneError
from instatune_cli.extract import (
    extract_model,
    load_extracted,
    safetensors_header_bytes,
    save_extracted,
    verify_extracted,
)
from instatune_cli.measure.macs import params
from instatune_cli.space import SubNet

UNIFORM = SubNet((4, 4, 4), (20, 20, 20))  # every head, one FFN width: a stock BertConfig
PER_LAYER = SubNet((3, 1, 4), (37, 5, 12))  # needs our per-layer class


@pytest.fixture(scope="module")
def supernet():
    return tiny_model("bert", seed=0)


@pytest.fixture(scope="module")
def batches(supernet):
    return tiny_batches(supernet.config)


@pytest.fixture(scope="module")
def uniform_dir(supernet, tmp_path_factory):
    d = tmp_path_factory.mktemp("uniform")
    return d, save_extracted(supernet, UNIFORM, None, d)


@pytest.fixture(scope="module")
def per_layer_dir(supernet, tmp_path_factory):
    d = tmp_path_factory.mktemp("per_layer")
    return d, save_extracted(supernet, PER_LAYER, None, d)


def test_uniform_full_heads_is_a_stock_checkpoint(supernet, batches, uniform_dir):
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    d, report = uniform_dir
    assert report["kind"] == "stock" and report["model_type"] == "bert"
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "bert" and "auto_map" not in cfg
    assert (cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["num_attention_heads"]) == (3, 20, 4)
    assert not list(d.glob("*.py"))
    plain = BertForSequenceClassification.from_pretrained(d).eval()  # no trust_remote_code, no class of ours
    auto = AutoModelForSequenceClassification.from_pretrained(d).eval()
    assert type(auto) is BertForSequenceClassification
    want = subnet_logits(supernet, UNIFORM, batches)
    assert max_diff(logits(plain, batches), want) < 1e-5
    assert max_diff(logits(auto, batches), want) < 1e-5
    assert report["max_abs_diff"] < 1e-5 and report["reload_max_abs_diff"] < 1e-5


def test_per_layer_reloads_with_load_extracted(supernet, batches, per_layer_dir):
    d, report = per_layer_dir
    assert report["kind"] == "instatune" and report["model_type"] == "instatune_bert"
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["layer_heads"] == [3, 1, 4] and cfg["layer_ffn"] == [37, 5, 12]
    assert cfg["num_attention_heads"] == 4  # head size stays hidden / original heads
    assert cfg["auto_map"]["AutoModelForSequenceClassification"].startswith("modeling_instatune_bert.")
    model = load_extracted(d)
    layers = model.bert.encoder.layer
    assert len(layers) == 3
    assert [lyr.attention.self.query.out_features for lyr in layers] == [24, 8, 32]
    assert [lyr.attention.output.dense.in_features for lyr in layers] == [24, 8, 32]
    assert [lyr.intermediate.dense.out_features for lyr in layers] == [37, 5, 12]
    assert [lyr.output.dense.in_features for lyr in layers] == [37, 5, 12]
    want = subnet_logits(supernet, PER_LAYER, batches)
    assert max_diff(logits(model, batches), want) < 1e-5
    # the check is meaningful: the sub-network computes something else than the full network
    assert max_diff(logits(supernet, batches), want) > 1e-3


def test_per_layer_loads_with_trust_remote_code_without_instatune(supernet, batches, per_layer_dir):
    d, _ = per_layer_dir
    out = load_without_instatune(d, batches)
    assert out["model"] == "InstatuneBertForSequenceClassification"
    assert out["config"] == "InstatuneBertConfig"
    assert out["module"].startswith("transformers_modules.")  # the copy beside the weights, not ours
    assert max_diff(out["logits"], subnet_logits(supernet, PER_LAYER, batches)) < 1e-5
    # config.json names the stock model_type (for AutoTokenizer): reading it back as ours is quiet
    assert "to instantiate a model of type" not in out["stderr"], out["stderr"]


@pytest.mark.parametrize("which", ["uniform", "per_layer"])
def test_params_and_file_size_match_closed_form(supernet, which, request):
    from safetensors import safe_open

    d, report = request.getfixturevalue(f"{which}_dir")
    sub = UNIFORM if which == "uniform" else PER_LAYER
    dims = adapter_of(supernet).dims(supernet.config)
    n = params(dims, sub)
    assert report["params"] == report["params_closed_form"] == n and report["params_match"]
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert stored == n
    size = (d / "model.safetensors").stat().st_size
    header = safetensors_header_bytes(d / "model.safetensors")
    assert size == 4 * n + header == report["weights_bytes"]
    assert header < 10_000


def test_extraction_slices_full_weights_whatever_is_active(supernet, batches):
    ad = adapter_of(supernet)
    other = SubNet((1, 1), (3, 3))
    ad.activate(supernet, other)
    try:
        small = extract_model(supernet, PER_LAYER)
        report = verify_extracted(supernet, PER_LAYER, small, batches)
        assert report["max_abs_diff"] < 1e-5
        # the previously active sub-network is restored after the check
        assert ad.layer_list(supernet).active == (0, 1)
        assert ad.parts(ad.layers(supernet)[0]).query.active_out == 8
    finally:
        ad.activate(supernet, None)
    # the super-network's parameters are untouched
    assert ad.parts(ad.layers(supernet)[0]).query.weight.shape == (32, 32)


def test_full_subnet_reproduces_the_supernet(supernet, batches):
    full = SubNet((4,) * 4, (37,) * 4)
    small = extract_model(supernet, full)
    assert small._instatune_kind == "stock" and small.config.num_hidden_layers == 4
    assert max_diff(logits(small, batches), logits(supernet, batches)) < 1e-5


def test_extraction_after_importance_reordering(batches):
    model = tiny_model("bert", seed=3)
    ad = adapter_of(model)
    ad.reorder_by_importance(model)  # permutes heads / neurons in place; prefixes now keep the best units
    small = extract_model(model, PER_LAYER)
    assert max_diff(logits(small, batches), subnet_logits(model, PER_LAYER, batches)) < 1e-5


@pytest.mark.parametrize("sub, match", [
    (SubNet((4,) * 5, (37,) * 5), "keeps 5 layers"),
    (SubNet((5, 4), (37, 37)), "keeps 5 heads"),
    (SubNet((4, 0), (37, 37)), "keeps 0 heads"),
    (SubNet((4, 4), (37, 38)), "FFN width 38"),
])
def test_impossible_subnets_are_refused(supernet, sub, match):
    with pytest.raises(InstatuneError, match=match):
        extract_model(supernet, sub)


def test_verification_catches_a_wrong_weight(supernet, batches):
    small = extract_model(supernet, PER_LAYER)
    with torch.no_grad():
        small.bert.encoder.layer[1].output.dense.weight[0, 0] += 1.0
    with pytest.raises(InstatuneError, match="differs from the super-network"):
        verify_extracted(supernet, PER_LAYER, small, batches)


@pytest.mark.parametrize("family", ["roberta", "electra", "distilbert"])
@pytest.mark.parametrize("sub, kind", [(SubNet((4, 4), (20, 20)), "stock"), (PER_LAYER, "instatune")])
def test_other_families(family, sub, kind, tmp_path):
    model = tiny_model(family, seed=1)
    bs = tiny_batches(model.config)
    report = save_extracted(model, sub, None, tmp_path)
    assert report["kind"] == kind
    assert report["model_type"] == (model.config.model_type if kind == "stock" else f"instatune_{family}")
    assert report["params_match"], (report["params"], report["params_closed_form"])
    reloaded = load_extracted(tmp_path)
    assert max_diff(logits(reloaded, bs), subnet_logits(model, sub, bs)) < 1e-5


@pytest.mark.parametrize("sub", [SubNet((4, 4, 4, 4), (37,) * 4), PER_LAYER])
def test_electra_factorised_embeddings_are_counted(sub, tmp_path):
    model = tiny_model("electra", seed=2, embedding_size=16)  # hidden 32: embeddings_project 16 -> 32
    report = save_extracted(model, sub, None, tmp_path)
    assert report["params_match"], (report["params"], report["params_closed_form"])
    bs = tiny_batches(model.config)
    assert max_diff(logits(load_extracted(tmp_path), bs), subnet_logits(model, sub, bs)) < 1e-5


def test_tokenizer_is_saved_beside_the_weights(supernet, tmp_path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]))
    tok = BertTokenizerFast(vocab_file=str(vocab))
    out = tmp_path / "model"
    save_extracted(supernet, UNIFORM, tok, out)
    assert (out / "tokenizer_config.json").is_file()
    enc = BertTokenizerFast.from_pretrained(out)(["w1 w2 w3"], return_tensors="pt")
    assert load_extracted(out)(**enc).logits.shape == (1, 2)
