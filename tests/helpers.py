"""Tiny-model helpers for the extract/export tests (`from helpers import ...`; tests/ is on pythonpath).

Models are built from config objects (no download) and get random weights *and biases/LayerNorm
parameters*: stock init leaves biases at zero, which would hide a bias that is sliced wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, num_labels=2)


def tiny_model(family: str = "bert", seed: int = 0, elastic: bool = True, **overrides: Any) -> Any:
    """A 4-layer, hidden-32, 4-head, FFN-37 classifier of `family` (bert, roberta, electra, distilbert)."""
    import transformers as tf

    kw = {**TINY, **overrides}
    if family == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(**kw))
    elif family == "roberta":
        model = tf.RobertaForSequenceClassification(tf.RobertaConfig(**kw, pad_token_id=1, type_vocab_size=1))
    elif family == "electra":
        kw.setdefault("embedding_size", kw["hidden_size"])
        model = tf.ElectraForSequenceClassification(tf.ElectraConfig(**kw))
    elif family == "distilbert":
        model = tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            vocab_size=kw["vocab_size"], dim=kw["hidden_size"], n_layers=kw["num_hidden_layers"],
            n_heads=kw["num_attention_heads"], hidden_dim=kw["intermediate_size"],
            max_position_embeddings=kw["max_position_embeddings"], num_labels=kw["num_labels"]))
    else:
        raise ValueError(family)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = name.endswith("weight") and ("LayerNorm" in name or "layer_norm" in name)
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if is_norm_scale else 0.0))
    model.eval()
    if elastic:
        from instatune_cli.adapters import adapter_of

        adapter_of(model).make_elastic(model)
    return model


def tiny_batches(config: Any, shapes: tuple[tuple[int, int], ...] = ((2, 16), (3, 9)), seed: int = 1) -> list:
    from instatune_cli.extract import random_batch

    return [random_batch(config, b, s, seed=seed + i) for i, (b, s) in enumerate(shapes)]


def subnet_logits(model: Any, sub: Any, batches: list) -> list[torch.Tensor]:
    """Logits of the elastic `model` with `sub` active (the full network afterwards)."""
    from instatune_cli.adapters import adapter_of
    from instatune_cli.extract import input_names

    ad = adapter_of(model)
    ad.activate(model, sub)
    names = input_names(model.config)
    try:
        with torch.no_grad():
            return [model(**{k: v for k, v in b.items() if k in names}).logits for b in batches]
    finally:
        ad.activate(model, None)


def logits(model: Any, batches: list) -> list[torch.Tensor]:
    from instatune_cli.extract import input_names

    names = input_names(model.config)
    with torch.no_grad():
        return [model(**{k: v for k, v in b.items() if k in names}).logits for b in batches]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


_REMOTE_CODE = r"""
import json, sys
sys.modules["instatune_cli"] = None  # instatune must not be importable: the directory has to stand alone
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification
d, batches = sys.argv[1], json.loads(sys.argv[2])
cfg = AutoConfig.from_pretrained(d, trust_remote_code=True)
model = AutoModelForSequenceClassification.from_pretrained(d, trust_remote_code=True).eval()
out = []
with torch.no_grad():
    for b in batches:
        out.append(model(**{k: torch.tensor(v) for k, v in b.items()}).logits.tolist())
print(json.dumps({"config": type(cfg).__name__, "model": type(model).__name__,
                  "module": type(model).__module__, "logits": out}))
"""


def load_without_instatune(model_dir: str | Path, batches: list) -> dict[str, Any]:
    """Load `model_dir` with trust_remote_code in a fresh interpreter that cannot import instatune_cli."""
    payload = json.dumps([{k: v.tolist() for k, v in b.items()} for b in batches])
    # a user's environment: transformers at its default verbosity (instatune's CLI quiets it in-process)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "TRANSFORMERS_VERBOSITY")}
    env["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory() as cache:
        env["HF_MODULES_CACHE"] = cache
        cmd = [sys.executable, "-I", "-c", _REMOTE_CODE, str(Path(model_dir).resolve()), payload]
        r = subprocess.run(cmd, cwd=cache, env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise AssertionError(f"loading without instatune failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["logits"] = [torch.tensor(x) for x in out["logits"]]
    out["stderr"] = r.stderr
    return out
