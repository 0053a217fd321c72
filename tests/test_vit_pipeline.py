"""Every stage on a tiny timm ViT and the real CIFAR-10 subset (`../shared/data/cifar10`): tune (elastic, with the
`vit-*` family's image data), search on the validation split with held-out eval scores, extract to a smaller
model that loads with timm alone, export with ONNX parity, quantize with ONNX Runtime."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from vit_tiny import LABELS, tiny_timm

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (CIFAR / "train").is_dir():
        pytest.skip("../shared/data/cifar10 is not beside the checkout")
    from instatune_cli.adapters.vit import TimmVitAdapter
    from instatune_cli.images import ImagePreprocessor
    from instatune_cli.tune.config import TuneConfig
    from instatune_cli.tune.loop import run_tune

    os.environ["HF_HUB_OFFLINE"] = "1"
    d = tmp_path_factory.mktemp("vit")
    fam = TimmVitAdapter()
    labels = {i: c for i, c in enumerate(sorted(p.name for p in (CIFAR / "train").iterdir()))}
    assert len(labels) == len(LABELS)
    model = fam.prepare(tiny_timm("vit_tiny_patch16_224"), labels)
    fam.save(model, ImagePreprocessor.for_model(model), d / "base")
    run_tune(TuneConfig(model=str(d / "base"), task="imagefolder", data=str(CIFAR), limit_train=300,
                        limit_eval=120, val_split="100", output=str(d / "run"), max_steps=12, batch_size=16,
                        lr=2e-3, quiet=True))
    return d / "run"


def test_tune_records_the_image_family(vit_run: Path) -> None:
    man = json.loads((vit_run / "manifest.json").read_text())
    assert man["model"]["adapter"] == "vit" and man["model"]["model_type"] == "timm_vit"
    dims = man["model"]["dims"]
    assert dims["image_size"] == 32 and dims["patch_size"] == 8 and dims["prefix_tokens"] == 1
    space = json.loads((vit_run / "space.json").read_text())
    assert space["seq_len"] == 17  # 16 patches + the class token: what MACs and latency are measured at
    assert (vit_run / "model" / "preprocessor_config.json").is_file()
    rows = [json.loads(x) for x in (vit_run / "eval.jsonl").read_text().splitlines()]
    assert len(rows) == 120 and all(Path(r["text"]).is_file() for r in rows)  # held-out test images


def test_search_extract_export_quantize(vit_run: Path, tmp_path: Path) -> None:
    import timm
    import torch

    from instatune_cli import artifacts
    from instatune_cli.deliver import export_stage, extract_stage
    from instatune_cli.quantize.stage import QuantizeOptions, quantize_stage
    from instatune_cli.search.stage import SearchOptions, run_stage

    run_stage(vit_run, tmp_path / "s", SearchOptions(evals=8, population=4))
    front = json.loads((tmp_path / "s" / "front.json").read_text())["front"]
    assert front and all("eval_acc" in r and r["macs"] > 0 for r in front)

    # a uniform full-head sub-network is a plain timm model: it loads with timm alone
    ext = extract_stage(vit_run, tmp_path / "e", config="L3-h4-f128")
    m = artifacts.load(ext.path, "extract").metrics
    assert m["kind"] == "stock" and m["params_match"] and m["max_abs_diff"] <= 1e-5
    stock = timm.create_model(f"local-dir:{ext.path}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    from instatune_cli.adapters.vit import TimmVitAdapter

    ours = TimmVitAdapter().load_extracted(ext.path)
    with torch.no_grad():
        assert torch.allclose(stock(x), ours(x), atol=1e-6)

    exp = export_stage(ext.path, tmp_path / "x", compare_full=False, runs=3)
    em = artifacts.load(exp.path, "export").metrics
    assert em["export"]["exporter"] == "dynamo" and em["parity"]["max_abs_diff"] <= 1e-4
    assert em["export"]["dynamic_axes"] == {"batch": 0}

    q = quantize_stage(ext.path, tmp_path / "q", QuantizeOptions(calibration_samples=32, runs=3))
    qm = artifacts.load(q.path, "quantize").metrics
    assert qm["size_bytes"]["int8"] < qm["size_bytes"]["fp32"] / 2
    assert set(qm["policy"]["layers"]) >= {"layer.0.qkv", "layer.2.ffn_out", "classifier"}


def test_vit_base_paper_preset_fits_vit_b16() -> None:
    """The paper's ViT space (L 11-12, H {6,8,10,12}, F {2048,2560,3072}, 197 tokens) against ViT-B/16's own
    shape (built on the meta device: no weights), and its MAC range."""
    import timm

    from instatune_cli.adapters.vit import TimmVitAdapter
    from instatune_cli.space import SearchSpace

    fam = TimmVitAdapter()
    dims = fam.dims_of(timm.create_model("vit_base_patch16_224", pretrained=False, device="meta"))
    space = SearchSpace.preset("vit-base-paper")
    space.check_model(dims)
    assert space.seq_len == dims.image_tokens == fam.seq_len(dims, 128) == 197
    lo, hi = fam.macs(dims, space.smallest(), 197), fam.macs(dims, space.largest(), 197)
    assert hi == 17_563_828_224 and 0.5 < lo / hi < 0.7


def test_a_strong_teacher_for_an_image_model(vit_run: Path, tmp_path: Path) -> None:
    """`--teacher RUN` works for images: the teacher (here the fixture's tuned run) scores every training image
    once, un-augmented, through its family; a teacher at another image size is refused before any work."""
    from safetensors.torch import load_file

    from instatune_cli.adapters.vit import TimmVitAdapter
    from instatune_cli.errors import InstatuneError
    from instatune_cli.images import ImagePreprocessor
    from instatune_cli.tune.config import TuneConfig
    from instatune_cli.tune.loop import run_tune

    base = vit_run.parent / "base"
    opts = dict(model=str(base), task="imagefolder", data=str(CIFAR), limit_train=120, limit_eval=40,
                val_split="20", max_steps=3, batch_size=16, quiet=True)
    res = run_tune(TuneConfig(**opts, output=str(tmp_path / "student"), teacher=str(vit_run)))
    assert res.teacher_cache == "built"
    logits = load_file(str(tmp_path / "student" / "teacher_logits.safetensors"))["logits"]
    assert tuple(logits.shape) == (100, 10) and logits.std() > 0

    fam = TimmVitAdapter()
    labels = {i: c for i, c in enumerate(sorted(p.name for p in (CIFAR / "train").iterdir()))}
    big = fam.prepare(tiny_timm("vit_tiny_patch16_224", img_size=48), labels)
    fam.save(big, ImagePreprocessor.for_model(big), tmp_path / "big-teacher")
    with pytest.raises(InstatuneError, match="48 px images but the student takes 32 px"):
        run_tune(TuneConfig(**opts, output=str(tmp_path / "refused"), teacher=str(tmp_path / "big-teacher")))
    assert not (tmp_path / "refused").exists() and not (tmp_path / "refused.partial").exists()


def test_recovery_fine_tuning_of_a_stock_vit_extract(vit_run: Path, tmp_path: Path) -> None:
    """`tune EXTRACT_DIR` for timm: a stock extract fine-tunes on its parent's image data with the parent as
    teacher and stays a plain timm model; a per-layer one recovers and stays per-layer."""
    import timm
    import torch

    from instatune_cli import artifacts
    from instatune_cli.adapters.vit import TimmVitAdapter
    from instatune_cli.deliver import extract_stage
    from instatune_cli.tune import load_tuned
    from instatune_cli.tune.config import TuneConfig
    from instatune_cli.tune.loop import run_tune

    ext = extract_stage(vit_run, tmp_path / "e", config="L3-h4-f128")
    res = run_tune(TuneConfig(model=str(ext.path), plain=True, teacher="parent", max_steps=3, batch_size=16,
                              lr=1e-3, output=str(tmp_path / "rec"), quiet=True))
    art = artifacts.load(tmp_path / "rec", "tune")
    src = art.model["source_extract"]
    assert res.teacher_cache == "built" and src["kind"] == "stock" and src["teacher"] == "parent"
    assert art.options["task"] == "imagefolder" and art.options["limit_train"] == 300  # the parent's data
    assert (tmp_path / "rec" / "val.jsonl").read_text() == (vit_run / "val.jsonl").read_text()
    stock = timm.create_model(f"local-dir:{tmp_path / 'rec' / 'model'}", pretrained=True).eval()
    ours, _, _, _ = load_tuned(tmp_path / "rec")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(stock(x), ours(x), atol=1e-6)

    per_layer = extract_stage(vit_run, tmp_path / "p", config="L3-h4.2.4-f128")
    assert artifacts.load(per_layer.path, "extract").metrics["kind"] == "instatune"
    # a per-layer one recovers too and stays per-layer (tests/tune/test_recovery_vit.py has the whole path)
    run_tune(TuneConfig(model=str(per_layer.path), plain=True, teacher="parent", max_steps=2, batch_size=16, lr=1e-3,
                        output=str(tmp_path / "rec-p"), quiet=True))
    ours, _, _, art = load_tuned(tmp_path / "rec-p")
    assert art.model["source_extract"]["kind"] == "instatune" and ours.config.layer_heads == [4, 2, 4]
    with torch.no_grad():
        assert torch.allclose(TimmVitAdapter().load_extracted(tmp_path / "rec-p" / "model")(x), ours(x), atol=1e-6)
