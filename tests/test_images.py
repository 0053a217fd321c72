"""Image-folder data (`instatune_cli.images`): layout, bad input, skipped files, preprocessing, batches."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from instatune_cli import data as D
from instatune_cli import images as I
from instatune_cli.errors import InstatuneError

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128), (10, 200, 90)]


@pytest.fixture(scope="module")
def cifar() -> D.TaskData:
    if not (CIFAR / "train").is_dir():
        pytest.skip(f"CIFAR-10 subset not found at {CIFAR}")
    return I.load_imagefolder(CIFAR)


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)


def _image(path: Path, color: tuple[int, int, int] = (200, 30, 60), size: tuple[int, int] = (12, 10),
           mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, color)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path)
    return path


def _folder(root: Path, layout: dict[str, dict[str, int]], ext: str = ".png") -> Path:
    """root/<split>/<class>/<i>.ext with n images per class, each a different colour."""
    for split, classes in layout.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for c, n in classes.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _image(root / split / c / f"{i:03d}{ext}", COLORS[i % len(COLORS)])
    return root


def _two(n: int = 2) -> dict[str, int]:
    return {"cat": n, "dog": n}


def _err(fn, *args, **kw) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InstatuneError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---- CIFAR-10 -----------------------------------------------------------------------------------------

def test_cifar_layout(cifar: D.TaskData) -> None:
    assert cifar.task == "imagefolder" and cifar.labels == CIFAR_CLASSES
    assert len(cifar.train) == 5000 and len(cifar.eval) == 2000 and cifar.train.pairs is None
    assert cifar.source == {"kind": "imagefolder", "train": str(CIFAR / "train"), "eval": str(CIFAR / "test"),
                            "skipped": {"unreadable": 0, "first_unreadable": None, "other_files": 0}}
    assert all(Path(p).is_absolute() for p in cifar.train.texts)
    assert all(Path(p).parent.name == CIFAR_CLASSES[y] for p, y in zip(cifar.eval.texts, cifar.eval.labels,
                                                                         strict=True))
    assert cifar.train.labels == sorted(cifar.train.labels)  # class order, then file order
    assert cifar.train.texts[:2] == [str(CIFAR / "train" / "airplane" / n) for n in ("0000.jpg", "0001.jpg")]
    assert I.skipped_message(cifar) is None


def test_cifar_balanced_limits(cifar: D.TaskData) -> None:
    td = I.load_imagefolder(CIFAR, limit_train=25, limit_eval=7)
    assert Counter(td.train.labels) == Counter({0: 3, 1: 3, 2: 3, 3: 3, 4: 3, 5: 2, 6: 2, 7: 2, 8: 2, 9: 2})
    assert td.eval.labels == [0, 1, 2, 3, 4, 5, 6]
    assert td.train.texts[:3] == cifar.train.texts[:3]  # the first files of each class, in order
    assert td.train.texts[3] == str(CIFAR / "train" / "automobile" / "0000.jpg")
    assert I.load_imagefolder(CIFAR, limit_train=25, limit_eval=7).train.texts == td.train.texts
    assert "--limit-train" in _err(I.load_imagefolder, CIFAR, limit_train=0)


def test_cifar_batches_match_timm(cifar: D.TaskData, vit: torch.nn.Module) -> None:
    import timm

    pre = I.ImagePreprocessor.for_model(vit)
    assert pre.input_size == (3, 32, 32) and pre.mean == (0.5, 0.5, 0.5) and pre.interpolation == "bicubic"
    split = cifar.eval.subset(range(0, 2000, 100))
    enc = I.encode_images(split, pre)
    b = enc.collate([0, 5, 7])
    assert b["pixel_values"].shape == (3, 3, 32, 32) and b["pixel_values"].dtype == torch.float32
    assert b["labels"].dtype == torch.long and b["labels"].tolist() == [split.labels[i] for i in (0, 5, 7)]
    cfg = timm.data.resolve_data_config({}, model=vit)
    tf = timm.data.create_transform(**{**cfg, "input_size": (3, 32, 32)}, is_training=False)
    want = torch.stack([tf(Image.open(split.texts[i]).convert("RGB")) for i in (0, 5, 7)])
    assert torch.equal(b["pixel_values"], want)
    assert torch.equal(enc.collate([0, 5, 7])["pixel_values"], want)  # second time from the cache
    assert len(enc._cache.images) == 3  # type: ignore[union-attr]
    batches = I.image_eval_batches(enc, batch_size=8)
    assert [len(x["labels"]) for x in batches] == [8, 8, 4]
    assert torch.cat([x["labels"] for x in batches]).tolist() == split.labels
    assert enc.lengths() == [1] * 20 and len(enc) == 20
    assert vit(batches[0]["pixel_values"]).shape == (8, 10)


# ---- bad input ----------------------------------------------------------------------------------------

def test_missing_dir_and_train(tmp_path: Path) -> None:
    assert "does not exist" in _err(I.load_imagefolder, tmp_path / "nope")
    _image(tmp_path / "file.png")
    assert "is a file" in _err(I.load_imagefolder, tmp_path / "file.png")
    msg = _err(I.load_imagefolder, tmp_path)
    assert "no train/ folder" in msg and "train/<class>/" in msg
    _folder(tmp_path / "flat", {"cat": {"a": 1}, "dog": {"a": 1}})
    msg = _err(I.load_imagefolder, tmp_path / "flat")
    assert "no train/ folder" in msg and "cat, dog" in msg and "move them into" in msg


def test_eval_folder_choice(tmp_path: Path) -> None:
    d = _folder(tmp_path / "d", {"train": _two()})
    msg = _err(I.load_imagefolder, d)
    assert "no eval folder" in msg and "val/, validation/, test/" in msg and "--eval-data" in msg
    _folder(d, {"test": _two(1)})
    assert I.load_imagefolder(d).source["eval"] == str(d / "test")
    _folder(d, {"validation": _two(1)})
    assert I.load_imagefolder(d).source["eval"] == str(d / "validation")
    _folder(d, {"val": _two(3)})
    td = I.load_imagefolder(d)
    assert td.source["eval"] == str(d / "val") and len(td.eval) == 6
    other = _folder(tmp_path / "other", {"x": _two(4)}) / "x"
    assert len(I.load_imagefolder(d, eval_data=other).eval) == 8
    assert "both training and eval" in _err(I.load_imagefolder, d, eval_data=d / "train")
    assert "--eval-data" in _err(I.load_imagefolder, d, eval_data=tmp_path / "missing")


def test_split_without_classes(tmp_path: Path) -> None:
    d = _folder(tmp_path, {"train": {}, "val": _two()})
    msg = _err(I.load_imagefolder, d)
    assert "no class folders" in msg and str(d / "train") in msg
    d = _folder(tmp_path / "b", {"train": _two(), "val": {}})
    for i in range(3):
        _image(d / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    msg = _err(I.load_imagefolder, d)
    assert "holds images directly" in msg and "--eval-data" in msg
    d = _folder(tmp_path / "c", {"train": _two(), "val": _two()})
    for f in (d / "val" / "dog").iterdir():
        f.unlink()
    (d / "val" / "dog" / "readme.txt").write_text("no images here")
    msg = _err(I.load_imagefolder, d)
    assert "has no images" in msg and str(d / "val" / "dog") in msg


def test_class_mismatch_and_single_class(tmp_path: Path) -> None:
    d = _folder(tmp_path / "a", {"train": {"cat": 1, "dog": 1, "emu": 1}, "val": {"cat": 1, "dgo": 1, "emu": 1}})
    msg = _err(I.load_imagefolder, d)
    assert "lacks 1 class ('dog')" in msg and "has extra 1 class ('dgo')" in msg and "same class folders" in msg
    d = _folder(tmp_path / "b", {"train": {"cat": 2}, "val": {"cat": 1}})
    msg = _err(I.load_imagefolder, d)
    assert "single class" in msg and "at least two" in msg


def test_imagenet_style_names(tmp_path: Path) -> None:
    wnids = ["n01530575", "n01440764", "n01443537"]
    d = _folder(tmp_path, {"train": dict.fromkeys(wnids, 2), "val": dict.fromkeys(wnids, 1)}, ext=".JPEG")
    (d / "train" / ".ipynb_checkpoints").mkdir()
    (d / "train" / "n01440764" / ".DS_Store").write_bytes(b"\0\0")
    (d / "train" / "LOC_synset_mapping.txt").write_text("n01440764 tench\n")
    td = I.load_imagefolder(d)
    assert td.labels == sorted(wnids) and td.train.labels == [0, 0, 1, 1, 2, 2] and td.eval.labels == [0, 1, 2]
    assert td.source["skipped"] == {"unreadable": 0, "first_unreadable": None, "other_files": 1}


# ---- unreadable images --------------------------------------------------------------------------------

def test_unreadable_images_are_skipped(tmp_path: Path) -> None:
    d = _folder(tmp_path, {"train": {"cat": 3, "dog": 3}, "val": _two()}, ext=".jpg")
    cat = d / "train" / "cat"
    (cat / "000.jpg").write_bytes(b"this is not a jpeg")  # first in sorted order
    jpg = (cat / "001.jpg").read_bytes()
    Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3)).save(cat / "big.jpg")
    full = (cat / "big.jpg").read_bytes()
    (cat / "big.jpg").write_bytes(full[: len(full) * 2 // 3])  # an interrupted download
    with Image.open(cat / "big.jpg") as im:
        im.verify()  # passes: only the end-of-image check finds it
    (d / "train" / "dog" / "empty.png").write_bytes(b"")
    png = _image(tmp_path / "x.png", size=(64, 64)).read_bytes()
    (d / "train" / "dog" / "half.png").write_bytes(png[: len(png) // 2])
    (cat / "trailer.jpg").write_bytes(jpg + b"\x00TRAILER" * 300)  # valid JPEG, 2.4 KiB after its end marker
    _image(cat / "UPPER.PNG")
    (cat / "notes.txt").write_text("x")
    td = I.load_imagefolder(d)
    names = [Path(p).name for p in td.train.texts]
    assert names == ["001.jpg", "002.jpg", "UPPER.PNG", "trailer.jpg", "000.jpg", "001.jpg", "002.jpg"]
    assert td.train.labels == [0, 0, 0, 0, 1, 1, 1]
    assert td.source["skipped"] == {"unreadable": 4, "first_unreadable": str(cat / "000.jpg"), "other_files": 1}
    assert I.skipped_message(td) == f"skipped 4 unreadable images (first: {cat / '000.jpg'})"


def test_class_all_unreadable_is_an_error(tmp_path: Path) -> None:
    d = _folder(tmp_path, {"train": _two(), "val": _two()})
    for f in (d / "val" / "dog").iterdir():
        f.write_bytes(b"garbage")
    msg = _err(I.load_imagefolder, d)
    assert "every image of eval class 'dog'" in msg and "000.png" in msg


def test_decode_failure_in_training_names_the_file(tmp_path: Path) -> None:
    d = _folder(tmp_path, {"train": _two(), "val": _two()})
    td = I.load_imagefolder(d)
    enc = I.encode_images(td.train, I.ImagePreprocessor().with_size(16), train=True)
    enc.collate([0])
    Path(td.train.texts[3]).write_bytes(b"corrupted after loading")
    msg = _err(enc.collate, [0, 3])
    assert "cannot decode image" in msg and td.train.texts[3] in msg


# ---- encoding -----------------------------------------------------------------------------------------

def test_collate_modes_and_normalisation(tmp_path: Path) -> None:
    paths = [_image(tmp_path / "rgb.png", (255, 0, 51), (20, 20)),
             _image(tmp_path / "gray.png", (100, 100, 100), (20, 20), "L"),
             _image(tmp_path / "rgba.png", (0, 255, 0), (20, 20), "RGBA"),
             _image(tmp_path / "pal.gif", (0, 0, 255), (20, 20), "P")]
    pre = I.ImagePreprocessor(input_size=(3, 8, 8), mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0), crop_pct=1.0)
    enc = I.encode_images(D.Split([str(p) for p in paths], [0, 1, 0, 1]), pre)
    px = enc.collate([0, 1, 2, 3])["pixel_values"]
    assert px.shape == (4, 3, 8, 8)
    want = torch.tensor([[1.0, -1.0, 0.2], [(100 / 255 - 0.5) / 0.5, (100 / 255 - 0.25) / 0.25, 100 / 255],
                         [-1.0, 3.0, 0.0], [-1.0, -1.0, 1.0]])
    assert torch.allclose(px.mean(dim=(2, 3)), want, atol=1e-5)
    assert I.encode_images(D.Split([], []), pre).collate([])["pixel_values"].shape == (0, 3, 8, 8)


def test_train_augmentation_random_eval_deterministic(cifar: D.TaskData) -> None:
    split = cifar.train.subset(range(0, 5000, 250))
    pre = I.ImagePreprocessor(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    train, ev = I.encode_images(split, pre, train=True), I.encode_images(split, pre)
    idx = list(range(20))
    assert not torch.equal(train.collate(idx)["pixel_values"], train.collate(idx)["pixel_values"])
    assert torch.equal(ev.collate(idx)["pixel_values"], ev.collate(idx)["pixel_values"])
    py_state = random.getstate()
    torch.manual_seed(7)
    a = train.collate(idx)["pixel_values"]
    torch.manual_seed(7)
    assert torch.equal(a, train.collate(idx)["pixel_values"])  # a function of torch's generator alone
    assert random.getstate() == py_state
    eb = I.image_eval_batches(train, batch_size=20)  # eval transforms of a training encoding
    assert torch.equal(eb[0]["pixel_values"], ev.collate(idx)["pixel_values"])


def test_cache_is_bounded(tmp_path: Path) -> None:
    d = _folder(tmp_path, {"train": _two(3), "val": _two(1)})
    td = I.load_imagefolder(d)
    pre = I.ImagePreprocessor(input_size=(3, 8, 8))
    small = I.encode_images(td.train, pre, cache_pixels=12 * 10 * 2)
    full = I.encode_images(td.train, pre)
    assert torch.equal(small.collate(range(6))["pixel_values"], full.collate(range(6))["pixel_values"])
    assert len(small._cache.images) == 2 and small._cache.pixels == 240  # type: ignore[union-attr]
    assert torch.equal(small.collate(range(6))["pixel_values"], full.collate(range(6))["pixel_values"])


def test_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _folder(tmp_path / "a", {"train": {"cat": 3, "dog": 3}, "val": _two()})
    pre = I.ImagePreprocessor(input_size=(3, 16, 16))
    td = I.load_imagefolder(d)
    dig = I.encode_images(td.train, pre).digest()
    assert len(dig) == 16 and int(dig, 16) >= 0
    assert I.encode_images(I.load_imagefolder(d).train, pre, train=True).digest() == dig
    moved = Path(shutil.copytree(d, tmp_path / "elsewhere" / "b"))
    assert I.encode_images(I.load_imagefolder(moved).train, pre).digest() == dig  # relative paths
    relabel = D.Split(td.train.texts, [1 - y if i == 0 else y for i, y in enumerate(td.train.labels)])
    assert I.encode_images(relabel, pre).digest() != dig
    assert I.encode_images(td.train, pre.with_size(24)).digest() != dig
    assert I.encode_images(td.train, I.ImagePreprocessor(input_size=(3, 16, 16), crop_pct=1.0)).digest() != dig
    assert I.encode_images(td.train.subset(range(5)), pre).digest() != dig
    _image(Path(td.train.texts[0]), size=(30, 30))  # same name, other content and size
    assert I.encode_images(td.train, pre).digest() != dig

    def no_open(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("digest must not open images")

    monkeypatch.setattr(Image, "open", no_open)
    monkeypatch.setattr("builtins.open", no_open)
    I.encode_images(td.train, pre).digest()


def test_validation_split_and_jsonl_round_trip(tmp_path: Path) -> None:
    d = _folder(tmp_path / "d", {"train": {"cat": 10, "dog": 10}, "val": _two()})
    td = I.load_imagefolder(d)
    tv = D.with_validation(td, "0.2", seed=3)
    assert len(tv.train) == 16 and tv.val is not None and len(tv.val) == 4
    assert sorted(tv.train.texts + tv.val.texts) == sorted(td.train.texts)
    assert D.with_validation(td, "0.2", seed=3).val == tv.val
    for name, split in (("train", tv.train), ("val", tv.val), ("eval", tv.eval)):
        D.write_jsonl(tmp_path / f"{name}.jsonl", split)
        back = D.read_jsonl(tmp_path / f"{name}.jsonl")
        assert back == split
    pre = I.ImagePreprocessor(input_size=(3, 16, 16))
    assert I.encode_images(back, pre).digest() == I.encode_images(tv.eval, pre).digest()


# ---- the preprocessor ---------------------------------------------------------------------------------

def test_preprocessor_round_trip_and_errors(tmp_path: Path, vit: torch.nn.Module) -> None:
    pre = I.ImagePreprocessor.for_model(vit).with_size(48)
    assert pre.input_size == (3, 48, 48) and pre.crop_pct == 0.9 and pre.crop_mode == "center"
    assert I.ImagePreprocessor.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    path = pre.save(tmp_path)
    assert path == tmp_path / "preprocessor_config.json"
    assert I.ImagePreprocessor.load(tmp_path) == pre
    assert "does not exist" in _err(I.ImagePreprocessor.load, tmp_path / "none")
    path.write_text("{not json")
    assert "not valid JSON" in _err(I.ImagePreprocessor.load, tmp_path)
    path.write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": 224}}))
    assert "Hugging Face" in _err(I.ImagePreprocessor.load, tmp_path)
    d = {"format": I.PREPROCESSOR_FORMAT, **pre.to_dict()}
    path.write_text(json.dumps({k: v for k, v in d.items() if k != "mean"}))
    assert "no 'mean'" in _err(I.ImagePreprocessor.load, tmp_path)
    path.write_text(json.dumps({**d, "std": [0.5, 0.5]}))
    assert "inconsistent" in _err(I.ImagePreprocessor.load, tmp_path)
    path.write_text(json.dumps({**d, "input_size": "big"}))
    assert "invalid value" in _err(I.ImagePreprocessor.load, tmp_path)
    assert "positive" in _err(pre.with_size, 0)


def test_preprocessor_transforms(vit: torch.nn.Module) -> None:
    import timm

    pre = I.ImagePreprocessor.for_model(vit)
    names = [type(t).__name__ for t in pre.transform(True).transforms]
    assert names == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "MaybeToTensor", "Normalize"]
    assert pre.transform(True).transforms[0].scale == (0.8, 1.0)
    ev = pre.transform(False)
    want = timm.data.create_transform(**{**timm.data.resolve_data_config({}, model=vit), "input_size": (3, 32, 32)})
    assert repr(ev) == repr(want)
