"""A per-layer extracted directory's tokenizer loads with stock `AutoTokenizer.from_pretrained(dir)`, without
trust_remote_code and without the "run custom code? [y/N]" prompt, while `trust_remote_code=True` still loads
the per-layer model (instatune_cli/extract.py module docstring)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import make_tiny_bert
from helpers import load_without_instatune, logits, max_diff, subnet_logits, tiny_batches, tiny_model

from instatune_cli.extract import OWN_TYPE_KEY, load_extracted, save_extracted
from instatune_cli.space import SubNet

PER_LAYER = SubNet((3, 1, 4), (37, 5, 12))

# A fresh interpreter that cannot import instatune, with stdin closed (a prompt would read EOF and go on).
_STOCK = r"""
import json, sys
sys.modules["instatune_cli"] = None
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
cfg = AutoConfig.from_pretrained(d)
try:
    AutoModelForSequenceClassification.from_pretrained(d)
    stock_model = "loaded"
except Exception as e:  # the per-layer weights do not fit the stock class
    stock_model = type(e).__name__
print(json.dumps({"tokenizer": type(tok).__name__, "ids": tok("good movie , bad plot")["input_ids"],
                  "config": type(cfg).__name__, "stock_model": stock_model}))
"""


def run_stock(model_dir: Path) -> tuple[dict, str]:
    """(result, everything printed) of `_STOCK` on `model_dir`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="warning")
    with tempfile.TemporaryDirectory() as cache:
        env["HF_MODULES_CACHE"] = cache
        r = subprocess.run([sys.executable, "-I", "-c", _STOCK, str(model_dir.resolve())], cwd=cache, env=env,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stdout + r.stderr


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_stock_auto_tokenizer_needs_no_remote_code(family: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_tiny_bert(tmp_path / "tok"))
    supernet = tiny_model(family, seed=0, vocab_size=len(tok))
    out = tmp_path / "extracted"
    report = save_extracted(supernet, PER_LAYER, tok, out)
    assert report["kind"] == "instatune" and report["model_type"] == f"instatune_{family}"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == family and cfg[OWN_TYPE_KEY] == f"instatune_{family}"
    assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModelForSequenceClassification"}

    res, printed = run_stock(out)
    assert "[y/N]" not in printed and "custom code" not in printed, printed
    assert res["tokenizer"] == type(tok).__name__ and res["ids"] == tok("good movie , bad plot")["input_ids"]
    assert res["config"] == f"{'DistilBert' if family == 'distilbert' else 'Bert'}Config"
    assert res["stock_model"] == "RuntimeError"  # never a stock model with the per-layer weights dropped

    bs = tiny_batches(supernet.config)
    want = subnet_logits(supernet, PER_LAYER, bs)
    remote = load_without_instatune(out, bs)
    assert remote["model"] == f"Instatune{'DistilBert' if family == 'distilbert' else 'Bert'}ForSequenceClassification"
    assert max_diff(remote["logits"], want) < 1e-5
    ours = load_extracted(out)
    assert ours.config.model_type == f"instatune_{family}" and max_diff(logits(ours, bs), want) < 1e-5


def test_directories_extracted_before_still_load(tmp_path: Path) -> None:
    """A per-layer directory written before `instatune_model_type` (our type in `model_type`) loads as before."""
    supernet = tiny_model("bert", seed=0)
    save_extracted(supernet, PER_LAYER, None, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = cfg.pop(OWN_TYPE_KEY)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    bs = tiny_batches(supernet.config)
    assert max_diff(logits(load_extracted(tmp_path), bs), subnet_logits(supernet, PER_LAYER, bs)) < 1e-5
