"""Closed-form MACs/params against the paper's figure, ptflops (eager attention) and real parameter counts."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import tiny_model

from instatune_cli.adapters import adapter_of
from instatune_cli.measure.macs import encoder_macs, head_macs, params, total_macs
from instatune_cli.space import ModelDims, SearchSpace, SubNet

BERT_BASE = ModelDims("bert", 12, 12, 64, 768, 3072, 30522, 512, 2, 2)


def test_bert_base_matches_paper():
    full = SubNet.make(12, 12, 3072)
    assert encoder_macs(BERT_BASE, full, 128) == 11_173_625_856
    assert head_macs(BERT_BASE) == 591_360
    assert total_macs(BERT_BASE, full, 128) == 11_173_625_856 + 591_360


def test_bert_base_params_match_stock_model():
    from transformers import BertConfig, BertForSequenceClassification

    with torch.device("meta"):
        m = BertForSequenceClassification(BertConfig(num_labels=2))
    assert sum(p.numel() for p in m.parameters()) == params(BERT_BASE, SubNet.make(12, 12, 3072))


def _bias_adds(dims: ModelDims, sub: SubNet, n: int) -> int:
    """ptflops' aten backend counts addmm's bias additions too; the closed form counts MACs only."""
    pairs = zip(sub.heads, sub.ffn, strict=True)
    per = sum(n * (3 * h * dims.head_dim + dims.hidden + f + dims.hidden) for h, f in pairs)
    return per + dims.hidden + dims.num_labels


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_closed_form_matches_ptflops_on_random_subnets(seed):
    from ptflops import get_model_complexity_info

    m = tiny_model("bert", elastic=False, attn_implementation="eager")
    a = adapter_of(m)
    a.make_elastic(m)
    dims = a.dims(m.config)
    space = SearchSpace.from_dict({"layers": [1, 2, 3, 4], "heads": [1, 2, 3, 4], "ffn": [5, 20, 37],
                                   "seq_len": 16})
    sub = space.sample(random.Random(seed))
    a.activate(m, sub)
    n = space.seq_len
    macs, _ = get_model_complexity_info(
        m, (n,), input_constructor=lambda _: {"input_ids": torch.ones((1, n), dtype=torch.long)},
        as_strings=False, print_per_layer_stat=False, backend="aten")
    assert macs - _bias_adds(dims, sub, n) == total_macs(dims, sub, n), sub.name


def test_only_attention_terms_grow_quadratically_with_sequence():
    dims = BERT_BASE
    a = encoder_macs(dims, SubNet.make(1, 12, 3072), 128)
    b = encoder_macs(dims, SubNet.make(1, 12, 3072), 256)
    assert b - 2 * a == 2 * 2 * (128 * 128) * 768  # only the attention terms are quadratic
