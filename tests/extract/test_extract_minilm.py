"""extract on the real all-MiniLM-L6-v2 checkpoint (6 layers, hidden 384, 12 heads of 32, FFN 1536)."""

from __future__ import annotations

import json

import pytest
from helpers import load_without_instatune, logits, max_diff, subnet_logits

from instatune_cli.adapters import adapter_of, load_classifier
from instatune_cli.extract import load_extracted, save_extracted
from instatune_cli.measure.macs import params
from instatune_cli.space import SubNet

pytestmark = pytest.mark.integration

SENTENCES = [
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "the acting , costumes , music , cinematography and sound are all astounding given the production 's "
    "austere locales .",
    "ok",
]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    from transformers import AutoTokenizer

    path = minilm_dir
    model = load_classifier(str(path), num_labels=2).eval()
    adapter_of(model).make_elastic(model)
    tok = AutoTokenizer.from_pretrained(path)
    batches = [dict(tok(SENTENCES[:3], padding=True, return_tensors="pt")),
               dict(tok(SENTENCES[:2] + SENTENCES[3:], padding=True, return_tensors="pt"))]
    assert batches[0]["input_ids"].shape != batches[1]["input_ids"].shape
    return model, tok, batches


@pytest.mark.parametrize("sub, kind", [
    (SubNet((12,) * 4, (768,) * 4), "stock"),
    (SubNet((12, 8, 6, 12, 4), (1536, 1024, 512, 768, 1536)), "instatune"),
])
def test_minilm_extract_reload_and_closed_forms(minilm, sub, kind, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, tok, batches = minilm
    report = save_extracted(model, sub, tok, tmp_path, batches=batches)
    assert report["kind"] == kind
    assert report["max_abs_diff"] < 1e-5 and report["reload_max_abs_diff"] < 1e-5
    dims = adapter_of(model).dims(model.config)
    assert report["params"] == params(dims, sub)
    assert report["weights_bytes"] == 4 * report["params"] + report["safetensors_header_bytes"]
    want = subnet_logits(model, sub, batches)
    cfg = json.loads((tmp_path / "config.json").read_text())
    if kind == "stock":
        assert cfg["model_type"] == "bert" and "auto_map" not in cfg
        plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
        assert max_diff(logits(plain, batches), want) < 1e-5
    else:
        assert max_diff(load_without_instatune(tmp_path, batches)["logits"], want) < 1e-5
    assert max_diff(logits(load_extracted(tmp_path), batches), want) < 1e-5
    assert (tmp_path / "tokenizer.json").is_file() or (tmp_path / "vocab.txt").is_file()
