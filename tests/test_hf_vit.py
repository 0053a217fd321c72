"""transformers `ViTForImageClassification` as a family (`adapters/hf_vit.py`): the default six-linear hooks make
it elastic, a sub-network equals a smaller stock ViT loaded with weights sliced here, MACs match ptflops, and it
runs tune -> search -> extract on the CIFAR-10 subset with the extract loading in stock transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from instatune_cli.adapters import family_for_source
from instatune_cli.adapters.hf_vit import HFVitAdapter
from instatune_cli.space import SubNet

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
TINY = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=96, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_hf_vit(seed: int = 0, **kw) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    m = ViTForImageClassification(ViTConfig(**{**TINY, **kw}))
    with torch.no_grad():  # non-trivial biases and norms: a wrongly sliced bias must show
        for name, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "layernorm" in name and name.endswith("weight")
                    else 0.1 * torch.randn_like(p))
    return m.eval()


@pytest.fixture
def vit_dir(tmp_path: Path) -> Path:
    from transformers import ViTImageProcessor

    d = tmp_path / "hf-vit"
    m = tiny_hf_vit(id2label={i: f"c{i}" for i in range(10)}, label2id={f"c{i}": i for i in range(10)})
    m.save_pretrained(d)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
    return d


def test_claimed_by_its_config_and_loads_with_its_image_processor(vit_dir: Path) -> None:
    fam = family_for_source(str(vit_dir))
    assert isinstance(fam, HFVitAdapter)
    pre = fam.load_preprocessor(vit_dir)
    assert pre.input_size == (3, 32, 32) and pre.mean == (0.5, 0.5, 0.5)


def test_subnetwork_equals_a_smaller_stock_vit() -> None:
    from transformers import ViTConfig, ViTForImageClassification

    fam = HFVitAdapter()
    model = tiny_hf_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(pixel_values=x).logits
    fam.make_elastic(model, "spread")
    fam.activate(model, None)
    with torch.no_grad():
        assert torch.equal(fam.logits(model, {"pixel_values": x}), ref)
    sub = SubNet.make(2, 4, 64)  # spread keeps layers 1 and 3
    fam.activate(model, sub)
    small = ViTForImageClassification(ViTConfig(**{**TINY, "num_hidden_layers": 2, "intermediate_size": 64})).eval()
    sd = {k: v for k, v in model.state_dict().items() if ".layers." not in k}
    for new, old in ((0, 1), (1, 3)):
        for k, v in model.state_dict().items():
            pre = f"vit.layers.{old}."
            if k.startswith(pre):
                rest = k[len(pre):]
                if rest.startswith("mlp.fc1."):
                    v = v[:64]
                elif rest == "mlp.fc2.weight":
                    v = v[:, :64]
                sd[f"vit.layers.{new}.{rest}"] = v
    small.load_state_dict(sd)
    with torch.no_grad():
        assert torch.allclose(fam.logits(model, {"pixel_values": x}), small(pixel_values=x).logits, atol=1e-5)
    assert fam.params(fam.dims_of(model), sub) == sum(p.numel() for p in small.parameters())


def test_macs_match_ptflops() -> None:
    from ptflops import get_model_complexity_info

    fam = HFVitAdapter()
    model = tiny_hf_vit()
    model.set_attn_implementation("eager")

    class Pixels(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(pixel_values=x).logits

    counted, _ = get_model_complexity_info(Pixels(), (3, 32, 32), as_strings=False, backend="aten",
                                           print_per_layer_stat=False, verbose=False)
    dims = fam.dims_of(model)
    ours = fam.macs(dims, SubNet.make(4, 4, 96), 0)
    biases = 0  # ptflops' aten counts a linear's bias add as a MAC: one per output element
    t = dims.image_tokens
    biases += 4 * t * (3 * 48 + 48 + 96 + 48) + 10 + (32 // 8) ** 2 * 48
    assert counted == ours + biases, (counted, ours, biases)


@pytest.mark.skipif(not (CIFAR / "train").is_dir(), reason="../shared/data/cifar10 is not beside the checkout")
def test_tune_search_extract_on_cifar(vit_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from instatune_cli import artifacts
    from instatune_cli.deliver import extract_stage
    from instatune_cli.search.stage import SearchOptions, run_stage
    from instatune_cli.tune.config import TuneConfig
    from instatune_cli.tune.loop import run_tune

    run = tmp_path / "run"
    run_tune(TuneConfig(model=str(vit_dir), task="imagefolder", data=str(CIFAR), limit_train=200, limit_eval=80,
                        val_split="60", output=str(run), max_steps=8, batch_size=16, lr=2e-3, quiet=True))
    assert json.loads((run / "manifest.json").read_text())["model"]["adapter"] == "hf_vit"
    AutoImageProcessor.from_pretrained(run / "model")  # the run's model directory stays a stock one
    run_stage(run, tmp_path / "s", SearchOptions(evals=6, population=4))
    ext = extract_stage(run, tmp_path / "e", config="L2-h4-f64")
    m = artifacts.load(ext.path, "extract").metrics
    assert m["kind"] == "stock" and m["params_match"] and m["max_abs_diff"] <= 1e-5
    stock = AutoModelForImageClassification.from_pretrained(ext.path).eval()
    assert stock.config.num_hidden_layers == 2 and stock.config.intermediate_size == 64
    AutoImageProcessor.from_pretrained(ext.path)
