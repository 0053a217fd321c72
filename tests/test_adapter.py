"""Elastic BERT-family adapter: full config is the unmodified model, sub-networks equal sliced references,
switching costs no copies, importance reordering keeps the full function."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import tiny_model
from tiny import batch, reference_bert_logits

from instatune_cli.adapters import adapter_for, adapter_of
from instatune_cli.errors import InstatuneError
from instatune_cli.space import SearchSpace, SubNet


def logits(model, b):
    with torch.no_grad():
        return model(**b).logits


@pytest.mark.parametrize("family", ["bert", "roberta", "electra", "distilbert"])
def test_full_config_reproduces_unmodified_model(family):
    m = tiny_model(family, elastic=False)
    b = batch()
    ref = logits(m, b)
    a = adapter_of(m)
    keys = list(m.state_dict())
    a.make_elastic(m)
    a.activate(m, None)
    assert (logits(m, b) - ref).abs().max() < 1e-5
    assert list(m.state_dict()) == keys  # still a stock checkpoint layout
    # after visiting a sub-network, the full config is restored exactly
    a.activate(m, SubNet.make(2, [1, 3], [5, 20]))
    a.activate(m, None)
    assert (logits(m, b) - ref).abs().max() < 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subnetwork_equals_independent_sliced_reference(seed):
    m = tiny_model("bert", seed=seed, elastic=False)
    a = adapter_of(m)
    a.make_elastic(m)
    space = SearchSpace.from_dict({"layers": [1, 2, 3, 4], "heads": [1, 2, 3, 4], "ffn": [5, 20, 37]})
    rng = random.Random(seed)
    b = batch(seed)
    for _ in range(4):
        sub = space.sample(rng)
        a.activate(m, sub)
        got = logits(m, b)
        with torch.no_grad():
            ref = reference_bert_logits(m, sub.heads, sub.ffn, b["input_ids"], b["attention_mask"])
        assert (got - ref).abs().max() < 1e-5, sub.name


def test_uniform_full_heads_subnet_equals_stock_smaller_bert():
    from transformers import BertConfig, BertForSequenceClassification

    m = tiny_model("bert", elastic=False)
    a = adapter_of(m)
    a.make_elastic(m)
    sub = SubNet.make(3, 4, 20)
    a.activate(m, sub)
    cfg = BertConfig(**{**m.config.to_dict(), "num_hidden_layers": 3, "intermediate_size": 20})
    small = BertForSequenceClassification(cfg).eval()
    sd = {}
    for k, v in m.state_dict().items():
        if ".layer." in k and int(k.split(".layer.")[1].split(".")[0]) >= 3:
            continue
        if "intermediate.dense.weight" in k or "intermediate.dense.bias" in k:
            v = v[:20]
        elif k.endswith("output.dense.weight") and "attention" not in k:
            v = v[:, :20]
        sd[k] = v
    small.load_state_dict(sd)
    b = batch()
    assert (logits(m, b) - logits(small, b)).abs().max() < 1e-5


def test_switching_configs_copies_no_weights():
    m = tiny_model("bert", elastic=False)
    a = adapter_of(m)
    a.make_elastic(m)
    ptrs = {k: p.data_ptr() for k, p in m.named_parameters()}
    n = sum(p.numel() for p in m.parameters())
    for sub in (SubNet.make(2, [1, 2], [5, 5]), SubNet.make(4, 4, 37), None):
        a.activate(m, sub)
        logits(m, batch())
    assert {k: p.data_ptr() for k, p in m.named_parameters()} == ptrs
    assert sum(p.numel() for p in m.parameters()) == n


def test_subnetwork_trains_only_its_slice():
    m = tiny_model("bert", elastic=False).train()
    a = adapter_of(m)
    a.make_elastic(m)
    a.activate(m, SubNet.make(2, [2, 2], [5, 5]))
    b = batch()
    out = m(**b, labels=torch.tensor([0, 1, 0]))
    out.loss.backward()
    q = m.bert.encoder.layer[0].attention.self.query.weight.grad
    dh = 8
    assert q[: 2 * dh].abs().sum() > 0 and q[2 * dh:].abs().sum() == 0
    assert m.bert.encoder.layer[3].attention.self.query.weight.grad is None


@pytest.mark.parametrize("with_data", [False, True])
def test_importance_reordering_keeps_full_function(with_data):
    m = tiny_model("bert", elastic=False)
    a = adapter_of(m)
    a.make_elastic(m)
    b = batch()
    ref = logits(m, b)
    batches = [{**b, "labels": torch.tensor([0, 1, 1])}] if with_data else None
    info = a.reorder_by_importance(m, batches)
    assert info["method"] == ("taylor" if with_data else "magnitude")
    assert (logits(m, b) - ref).abs().max() < 1e-5
    # the kept prefix is now the most important units
    hs, _ = a.importance(m, None if not with_data else batches)
    if not with_data:
        for s in hs:
            assert s == sorted(s, reverse=True)


def test_unsupported_family_is_a_clear_error():
    with pytest.raises(InstatuneError, match="not a supported family"):
        adapter_for("gpt2")


@pytest.mark.integration
def test_real_minilm_full_config_and_subnet(minilm_dir):
    from instatune_cli.adapters import load_classifier

    m = load_classifier(str(minilm_dir), num_labels=2).eval()
    b = batch(vocab=30000, n=16)
    ref = logits(m, b)
    a = adapter_of(m)
    a.make_elastic(m)
    a.activate(m, None)
    assert (logits(m, b) - ref).abs().max() < 1e-5
    sub = SubNet.make(4, [12, 8, 6, 10], [1536, 512, 1024, 1536])
    a.activate(m, sub)
    with torch.no_grad():
        want = reference_bert_logits(m, sub.heads, sub.ffn, b["input_ids"], b["attention_mask"])
    assert (logits(m, b) - want).abs().max() < 1e-5
