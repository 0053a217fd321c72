"""Recovery fine-tuning of a per-layer timm ViT extract (heads and MLP width per block, saved with
`modeling_instatune_vit.py`): tune --plain on it, the run reloads identically (instatune's loader and the class
file alone), search / extract / export work on it, a search's extract of it recovers with the parent as teacher,
and a damaged extract or a copy without its manifest is refused in one line."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_cli_error, one_thread, run_cli
from vit_tiny import tiny_timm

from instatune_cli import artifacts
from instatune_cli.space import SubNet

pytestmark = pytest.mark.usefixtures("single_thread")

#: in the parent's derived space (layers {2,3,4}, heads {2,3,4}, MLP {64,128,192}); four blocks: every one kept
PER_LAYER = "L4-h4.2.3.4-f192.64.128.192"
HEADS, FFN = [4, 2, 3, 4], [192, 64, 128, 192]


def image_folder(root: Path, n_train: int = 24, n_test: int = 8) -> Path:
    """root/{train,test}/{cat,dog}/i.png: 16 px images, reddish cats and bluish dogs with noise."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, base in (("cat", (170, 60, 60)), ("dog", (60, 60, 170))):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                px = torch.tensor(base).view(1, 1, 3) + 60 * torch.randn(16, 16, 3, generator=g)
                Image.fromarray(px.clamp(0, 255).to(torch.uint8).numpy()).save(root / split / c / f"{i}.png")
    return root


def tune_args(model: Path, out: Path, *extra: str) -> list[str]:
    """A quick tiny run; no --data: a recovery run takes its data from the extract's parent run."""
    return ["tune", str(model), "-o", str(out), "--batch-size", "8", "--max-steps", "6", "--lr", "2e-3",
            "--save-every", "0", "--reorder-batches", "2", "--quiet", *extra]


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An elastic run of a tiny ViT on the tiny image folder and a per-layer extract of it."""
    from instatune_cli.adapters.vit import TimmVitAdapter
    from instatune_cli.images import ImagePreprocessor
    from instatune_cli.tune.config import TuneConfig
    from instatune_cli.tune.loop import run_tune

    d = tmp_path_factory.mktemp("vit-recovery")
    fam = TimmVitAdapter()
    model = fam.prepare(tiny_timm("vit_tiny_patch16_224", num_classes=2), {0: "cat", 1: "dog"})
    fam.save(model, ImagePreprocessor.for_model(model), d / "base")
    with one_thread():
        run_tune(TuneConfig(model=str(d / "base"), task="imagefolder", data=str(image_folder(d / "img")),
                            val_split="8", output=str(d / "run"), max_steps=6, batch_size=8, lr=2e-3, save_every=0,
                            reorder_batches=2, quiet=True, seed=7))
        r = run_cli("extract", d / "run", "--config", PER_LAYER, "-o", d / "ext")
    assert r.exit_code == 0, r.output
    assert artifacts.load(d / "ext", "extract").metrics["kind"] == "instatune"
    return {"run": d / "run", "ext": d / "ext", "img": d / "img"}


@pytest.fixture(scope="module")
def recovered(parent: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vit-recovered") / "run"
    with one_thread():
        r = run_cli(*tune_args(parent["ext"], out, "--plain", "--seed", "3"))
    assert r.exit_code == 0, r.output
    return out


def _import_standalone(d: Path):  # the class file copied beside the weights, imported from there
    spec = importlib.util.spec_from_file_location(f"modeling_instatune_vit_{abs(hash(str(d)))}",
                                                  d / "modeling_instatune_vit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_per_layer_vit_extract_recovers_with_the_parents_data(recovered, parent):
    art = artifacts.load(recovered, "tune")
    run = artifacts.load(parent["run"], "tune")
    src = art.model["source_extract"]
    assert src["kind"] == "instatune" and src["subnet_name"] == PER_LAYER
    assert src["digest"] == artifacts.load(parent["ext"], "extract").digest
    assert src["data_from_parent"] and src["val_seed"] == 7 and src["parents"][0]["digest"] == run.digest
    assert art.options["task"] == "imagefolder" and art.options["data"] == run.options["data"]
    assert (recovered / "val.jsonl").read_text() == (parent["run"] / "val.jsonl").read_text()
    assert art.model["adapter"] == "vit" and art.model["model_type"] == "instatune_timm_vit"
    assert art.model["family"] == "timm_vit" and art.model["elastic"] is False
    assert [len(h) for h in art.model["reorder"]["head_orders"]] == HEADS  # sorted per block, each its own count
    # the model is written like the extract: timm's layout, per-block shape, the class file beside it
    cfg = json.loads((recovered / "model" / "config.json").read_text())
    assert cfg["instatune"]["kind"] == "instatune" and cfg["instatune"]["layer_heads"] == HEADS
    assert cfg["instatune"]["layer_ffn"] == FFN and cfg["instatune"]["head_dim"] == 12
    assert (recovered / "model" / "modeling_instatune_vit.py").read_bytes() == \
        (parent["ext"] / "modeling_instatune_vit.py").read_bytes()
    # the preprocessing (input size, crop, mean/std) is the parent's: it travels in the extract
    assert (recovered / "model" / "preprocessor_config.json").read_text() == \
        (parent["run"] / "model" / "preprocessor_config.json").read_text()
    assert art.model["max_length"] == run.model["max_length"] == 17  # patches + class token
    space = json.loads((recovered / "space.json").read_text())
    assert space["layers"] == [4] and space["heads"] == [[2, 3, 4], [2], [2, 3], [2, 3, 4]]
    assert space["ffn"] == [[64, 128, 192], [64], [64, 128], [64, 128, 192]]
    from safetensors.torch import load_file

    a, b = load_file(str(recovered / "model" / "model.safetensors")), load_file(str(parent["ext"] /
                                                                                    "model.safetensors"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-3  # it trained


def test_recovered_vit_reloads_with_identical_outputs(recovered):
    from instatune_cli.adapters.vit import TimmVitAdapter
    from instatune_cli.measure.accuracy import Evaluator
    from instatune_cli.tune import load_eval_batches, load_tuned

    model, pre, _, art = load_tuned(recovered)
    assert model.config.layer_heads == HEADS and [b.mlp.fc1.out_features for b in model.blocks] == FFN
    batches = load_eval_batches(art, pre, batch_size=8)
    x = torch.cat([b["pixel_values"] for b in batches])
    alone = _import_standalone(recovered / "model").load(str(recovered / "model"))  # no instatune code
    with torch.no_grad():
        y = model(x)
        assert (y - TimmVitAdapter().load_extracted(recovered / "model")(x)).abs().max() < 1e-6
        assert (y - alone(x)).abs().max() < 1e-6
    assert Evaluator(model, batches).accuracy(None) == pytest.approx(art.metrics["super_accuracy"], abs=1e-9)


def test_recovered_vit_searches_extracts_and_exports(recovered, tmp_path):
    from instatune_cli.adapters.vit import TimmVitAdapter

    r = run_cli("search", recovered, "--objectives", "acc,macs", "--evals", "6", "--population", "3",
                "--algorithm", "random", "-o", tmp_path / "search")
    assert r.exit_code == 0, r.output
    front = json.loads((tmp_path / "search" / "front.json").read_text())
    src = artifacts.load(recovered, "tune").model["source_extract"]
    assert front["reference"]["subnet_name"] == PER_LAYER and front["reference"]["macs"] == src["macs"]
    for row in front["front"]:  # every member a cut of the per-layer model, within each block's width
        sub = SubNet.from_dict(row)
        assert sub.layers == 4 and all(h <= m for h, m in zip(sub.heads, HEADS, strict=True))
        assert all(f <= m for f, m in zip(sub.ffn, FFN, strict=True))

    # the full network extracts back to a per-layer model equal to the recovered one
    r = run_cli("extract", recovered, "--config", PER_LAYER, "-o", tmp_path / "full")
    assert r.exit_code == 0, r.output
    ext = artifacts.load(tmp_path / "full", "extract")
    assert ext.metrics["kind"] == "instatune" and ext.metrics["params_match"]
    assert ext.metrics["macs"] == ext.metrics["macs_supernet"] == src["macs"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fam = TimmVitAdapter()
    with torch.no_grad():
        assert (fam.load_extracted(tmp_path / "full")(x) - fam.load_extracted(recovered / "model")(x)).abs().max() \
            < 1e-5
    # a cut of it (block 1 has 2 of the 4 heads: no cut is a stock timm model); one beyond a block is one line
    r = run_cli("extract", recovered, "--config", "L4-h2-f64", "-o", tmp_path / "cut")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["instatune"]["layer_heads"] == [2] * 4
    assert_cli_error(run_cli("extract", recovered, "--config", "L4-h4-f192", "-o", tmp_path / "bad"),
                     "L4-h4-f192", "layer 1")

    # a front member through export (ONNX parity)
    r = run_cli("export", tmp_path / "search", "--subnet", "1", "--runs", "2", "-o", tmp_path / "onnx")
    assert r.exit_code == 0, r.output
    man = artifacts.load(tmp_path / "onnx", "export")
    assert man.metrics["parity"]["max_abs_diff"] <= 1e-4

    # the search's extract recovers too, the run behind it as teacher (chain extract -> search -> tune)
    r = run_cli("extract", tmp_path / "search", "--subnet", "1", "-o", tmp_path / "sub1")
    assert r.exit_code == 0, r.output
    r = run_cli(*tune_args(tmp_path / "sub1", tmp_path / "again", "--plain", "--teacher", "parent",
                           "--max-steps", "2"))
    assert r.exit_code == 0, r.output
    again = artifacts.load(tmp_path / "again", "tune")
    assert [c["stage"] for c in again.model["source_extract"]["parents"]] == ["search", "tune"]
    assert again.options["teacher"] == str(recovered.resolve())
    assert again.manifest["training"]["teacher_cache"] == "teacher_logits.safetensors"


@pytest.mark.parametrize("damage, fragment", [
    ("edit", "modeling_instatune_vit.py does not match its manifest digest"),
    ("remove", "modeling_instatune_vit.py is missing"),
    ("manifest", "no manifest.json"),
])
def test_damaged_vit_extract_is_refused_in_one_line(parent, tmp_path, damage, fragment):
    ext = tmp_path / "ext"
    shutil.copytree(parent["ext"], ext)
    f = ext / "modeling_instatune_vit.py"
    if damage == "edit":
        f.write_text(f.read_text() + "\nimport os  # injected\n")
    elif damage == "remove":
        f.unlink()
    else:
        (ext / "manifest.json").unlink()
    r = run_cli(*tune_args(ext, tmp_path / "out", "--plain", "--data", str(parent["img"]), "--task",
                           "imagefolder"))
    assert_cli_error(r, fragment)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_vit_teacher_with_another_label_set_is_refused(parent, tmp_path):
    from instatune_cli.adapters.vit import TimmVitAdapter

    fam = TimmVitAdapter()
    for name, labels, frags in (("three", {0: "cat", 1: "dog", 2: "fox"}, ("3 classes", "2")),
                                ("named", {0: "ant", 1: "bee"}, ("['ant', 'bee']", "['cat', 'dog']"))):
        fam.save(fam.prepare(tiny_timm("vit_tiny_patch16_224", num_classes=len(labels)), labels), None,
                 tmp_path / name)
        r = run_cli(*tune_args(parent["ext"], tmp_path / "out", "--plain", "--teacher", str(tmp_path / name)))
        assert_cli_error(r, "teacher", *frags)
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
