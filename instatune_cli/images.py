"""Image-classification data for the vision family (timm ViT / DeiT / BEiT): `--task imagefolder --data DIR`.

Layout: `DIR/train/<class>/<image>` and one eval folder, the first of `DIR/val/`, `DIR/validation/`,
`DIR/test/` that exists (or `--eval-data OTHER_DIR`, a folder of the same class folders). Images are files
with the suffixes in `IMAGE_EXTENSIONS` (any case), found recursively under their class folder; hidden files
and folders (`.DS_Store`, `.ipynb_checkpoints`) are ignored, other files and loose files beside the class
folders are ignored and counted. Class ids are the sorted names of the training class folders (an ImageNet
layout, `train/n01440764/...`, works the same way); the eval split must have exactly the same class folders.
Every list is in one order: by class id, then by path within the class (sorted by name).

A split is a `data.Split` whose `texts` are absolute image paths and `labels` class ids, so the text
machinery works unchanged: `write_jsonl`/`read_jsonl` store it in a run directory, `with_validation` carves
the seeded validation split, `Split.head/subset` slice it. `--limit-train/--limit-eval N` take a
class-balanced subset: round-robin over the classes, each in its sorted file order (the first N files would
all be one class), listed in the usual class-then-file order.

Unreadable images are skipped at load time, not fatal: each image's header is opened with PIL
(`Image.open` reads only the header) and `Image.verify()` is called. Measured on the 7,000 CIFAR-10 JPEGs
(2-core machine): header + verify 0.27-0.31 s in all (~40 us an image), the same as the header alone
(verify is a no-op for JPEG; for PNG it checks the chunk CRCs, ~65 us for a 224 px PNG), against 0.7 s for
a full decode (~100 us at 32 px, ~380 us for a 224 px JPEG, ~1.1 ms for a 224 px PNG). As verify does not
see a truncated JPEG (an interrupted download), a JPEG whose last KiB has no end-of-image marker is decoded
in full to decide (valid JPEGs with long trailers are kept). The count and the first skipped path are in
`TaskData.source["skipped"]`; `skipped_message` words them for the CLI. A class whose images are all
unreadable is an error. An image that still fails to decode during training (another format truncated, or
changed on disk) raises `InstatuneError` naming the file. 16-bit grayscale images (PNG of depth 16) are scaled
to 8 bits (PIL's own conversion clips them to white); floating-point images are refused from the header.

Preprocessing comes from the model: `ImagePreprocessor.for_model` reads timm's `resolve_data_config` (the
model's `pretrained_cfg`: input size, mean/std, interpolation, crop_pct, crop_mode), with the input size
taken from the built model when it was created at another `img_size` (timm keeps the pretrained 224 in
`pretrained_cfg`). It is saved beside a model as `preprocessor_config.json`. Eval uses timm's eval transform
(resize to size/crop_pct, centre crop, normalise); training uses light augmentation: random resized crop
with scale (0.8, 1.0), horizontal flip p=0.5, no colour jitter, AutoAugment or random erasing. The random
draws come from torch's global generator only (the tune loop seeds it per step; Python's `random`, which
timm's crop uses, is seeded from it and restored), so a resumed run sees the same augmentations.

Decoded images are cached per split in memory as uint8 RGB arrays, filled in first-use order until
`cache_pixels` (default 64M pixels, ~192 MB: all of CIFAR-10's 50k training images) and never evicted:
an epoch reads every image once in random order, for which LRU eviction would hit nothing, while a fixed
subset hits its share every epoch. JPEG decode dominates a CPU step at small sizes, so this is the speed-up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instatune_cli import data as D
from instatune_cli.errors import InstatuneError

if TYPE_CHECKING:
    import numpy as np
    import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".ppm", ".tif", ".tiff")
EVAL_DIRS = ("val", "validation", "test")
PREPROCESSOR_FILE = "preprocessor_config.json"
PREPROCESSOR_FORMAT = "instatune-image-preprocessor/1"
DEFAULT_CACHE_PIXELS = 64_000_000
_JPEG_TAIL = 1024
_JPEG_EOI = b"\xff\xd9"


# ---- the folder layout --------------------------------------------------------------------------------

@dataclass
class _Scan:
    """Candidate image files of one split folder, by class name (sorted), and what was ignored."""

    root: Path
    files: dict[str, list[str]]
    other_files: int = 0


@dataclass
class _Skips:
    unreadable: int = 0
    first: str | None = None

    def add(self, path: str) -> None:
        self.unreadable += 1
        self.first = self.first or path


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _raise(e: OSError) -> None:
    raise e


def _class_dirs(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if _visible(e.name) and e.is_dir())


def _scan(root: Path, what: str) -> _Scan:
    """Class folders of a split and their candidate images (by suffix), sorted; errors for a split without
    class folders and for a class folder without images."""
    classes = _class_dirs(root)
    loose = [e.name for e in os.scandir(root) if _visible(e.name) and e.is_file()]
    if not classes:
        if any(n.lower().endswith(IMAGE_EXTENSIONS) for n in loose):
            raise InstatuneError(
                f"{what} {root} holds images directly, not one folder per class (ImageNet's flat val layout?); "
                "sort them into <class>/ sub-folders named like the training ones, or pass --eval-data DIR")
        raise InstatuneError(
            f"{what} {root} has no class folders; put each class's images in its own sub-folder "
            f"({root}/<class>/*.jpg)")
    scan = _Scan(root, {}, other_files=len(loose))
    for c in classes:
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root / c, onerror=_raise, followlinks=True):
            dirnames[:] = [d for d in dirnames if _visible(d)]
            for n in filenames:
                if not _visible(n):
                    continue
                if n.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(os.path.join(dirpath, n))
                else:
                    scan.other_files += 1
        if not found:
            raise InstatuneError(
                f"{what} class folder {root / c} has no images ({', '.join(IMAGE_EXTENSIONS)}); add images or "
                "remove the folder")
        base = str(root / c)
        scan.files[c] = sorted(found, key=lambda p: Path(os.path.relpath(p, base)).as_posix())
    return scan


def _unreadable(path: str) -> bool:
    """Whether PIL cannot open the image's header or verify it (see the module docstring); reads no pixels,
    except for a JPEG without an end-of-image marker, decoded in full to tell a truncated file from a trailer."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            with Image.open(f) as im:
                fmt = im.format
                w, h = im.size
                check_image_mode(im.mode, path)  # from the header: refused when loading, not mid-training
                im.verify()
            if w < 1 or h < 1:
                return True
            if fmt == "JPEG":
                f.seek(max(0, os.fstat(f.fileno()).st_size - _JPEG_TAIL))
                if _JPEG_EOI not in f.read():
                    f.seek(0)
                    with Image.open(f) as im:
                        im.load()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return True
    return False


def _next_readable(files: Iterator[str], skips: _Skips) -> str | None:
    for p in files:
        if not _unreadable(p):
            return p
        skips.add(p)
    return None


def _select(scan: _Scan, classes: list[str], limit: int | None, skips: _Skips,
            what: str) -> tuple[list[str], list[int]]:
    """(paths, ids) of the readable images of a split, class-balanced round-robin when `limit` is given; only
    the images taken are checked, so a small limit of a large folder is quick."""
    readable: list[list[str]] = [[] for _ in classes]
    queues = [iter(scan.files[c]) for c in classes]
    active = list(range(len(classes)))
    taken = 0
    while active and (limit is None or taken < limit):
        still: list[int] = []
        for k in active:
            if limit is not None and taken >= limit:
                break
            p = _next_readable(queues[k], skips)
            if p is None:  # class exhausted
                if not readable[k]:
                    raise InstatuneError(
                        f"every image of {what} class {classes[k]!r} ({scan.root / classes[k]}) is unreadable "
                        f"(first: {scan.files[classes[k]][0]}); replace the files or remove the folder")
                continue
            readable[k].append(p)
            taken += 1
            still.append(k)
        active = still
    paths = [p for k in range(len(classes)) for p in readable[k]]
    ids = [k for k in range(len(classes)) for _ in readable[k]]
    return paths, ids


def load_imagefolder(data: str | Path, eval_data: str | Path | None = None, limit_train: int | None = None,
                     limit_eval: int | None = None) -> D.TaskData:
    """Train and eval splits of an image-folder dataset (see the module docstring): texts are absolute image
    paths, labels the ids of the sorted training class names."""
    for name, v in (("--limit-train", limit_train), ("--limit-eval", limit_eval)):
        if v is not None and v < 1:
            raise InstatuneError(f"{name} must be at least 1, got {v}")
    d = Path(os.path.abspath(Path(data).expanduser()))
    if not d.is_dir():
        what = "is a file, not a folder" if d.exists() else "does not exist"
        raise InstatuneError(f"--data {d} {what}; give a folder with train/<class>/ and val/<class>/ image folders")
    train_dir = d / "train"
    if not train_dir.is_dir():
        others = [c for c in _class_dirs(d) if c not in EVAL_DIRS]
        hint = f" (it has {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}: if these are class folders, " \
            f"move them into {d}/train/)" if others else ""
        raise InstatuneError(f"{d} has no train/ folder{hint}; lay the data out as {d}/train/<class>/*.jpg")
    if eval_data is not None:
        eval_dir = Path(os.path.abspath(Path(eval_data).expanduser()))
        if not eval_dir.is_dir():
            raise InstatuneError(f"--eval-data {eval_dir} is not a folder; give a folder of <class>/ image folders")
        if eval_dir.resolve() == train_dir.resolve():
            raise InstatuneError(f"{eval_dir} is given as both training and eval data; keep the eval split separate")
    else:
        found = [d / n for n in EVAL_DIRS if (d / n).is_dir()]
        if not found:
            raise InstatuneError(
                f"{d} has no eval folder (looked for {', '.join(n + '/' for n in EVAL_DIRS)}); add one with the "
                "same class folders as train/, or pass --eval-data DIR")
        eval_dir = found[0]
    try:
        train_classes, tscan, escan = _scan_both(train_dir, eval_dir)
    except OSError as e:  # a folder without read permission, a dangling link, ...
        raise InstatuneError(f"cannot read {e.filename or d} ({e.strerror or e}); fix its permissions") from None
    skips = _Skips()
    tp, tl = _select(tscan, train_classes, limit_train, skips, "training")
    ep, el = _select(escan, train_classes, limit_eval, skips, "eval")
    source = {"kind": "imagefolder", "train": str(train_dir), "eval": str(eval_dir),
              "skipped": {"unreadable": skips.unreadable, "first_unreadable": skips.first,
                          "other_files": tscan.other_files + escan.other_files}}
    data = D.TaskData("imagefolder", D.Split(tp, tl, None), D.Split(ep, el, None), list(train_classes), source)
    note = skipped_message(data)
    if note:
        source["notes"] = [note]  # printed by tune before training (TaskData.source "notes")
    return data


def load_image_task(cfg: Any, model: str = "the model") -> D.TaskData:
    """The tune options' image data (`--task imagefolder --data DIR`) with its validation split: carved from
    training (`--val-split`) or a folder of the same classes (`--val-data`). Every image family's `load_data`."""
    task = getattr(cfg, "task", None)
    if task not in (None, "imagefolder"):
        raise InstatuneError(f"{model} is an image model; train it with --task imagefolder --data DIR, not "
                             f"--task {task}")
    if not getattr(cfg, "data", None):
        raise InstatuneError("an image model needs --data DIR (DIR/train/<class>/*.jpg and DIR/val/<class>/)")
    data = load_imagefolder(cfg.data, cfg.eval_data, cfg.limit_train, cfg.limit_eval)
    if getattr(cfg, "val_data", None) is None:
        return D.with_validation(data, cfg.val_split, None, cfg.seed)
    if cfg.val_split is not None:
        raise InstatuneError("give either --val-split or --val-data, not both")
    val = load_imagefolder(cfg.data, cfg.val_data, 1, None).eval
    return D.TaskData(data.task, data.train, data.eval, data.labels,
                      {**data.source, "val": {"kind": "folder", "path": str(cfg.val_data)}}, val)


def _scan_both(train_dir: Path, eval_dir: Path) -> tuple[list[str], _Scan, _Scan]:
    """(training class names, train scan, eval scan), with the class checks."""
    train_classes = _class_dirs(train_dir)
    if len(train_classes) == 1:
        raise InstatuneError(
            f"{train_dir} has a single class folder ({train_classes[0]!r}); a classifier needs at least two")
    eval_classes = _class_dirs(eval_dir)
    if train_classes and eval_classes and eval_classes != train_classes:
        missing = sorted(set(train_classes) - set(eval_classes))
        extra = sorted(set(eval_classes) - set(train_classes))
        parts = ([f"lacks {_names(missing)}"] if missing else []) + ([f"has extra {_names(extra)}"] if extra else [])
        raise InstatuneError(
            f"eval folder {eval_dir} {' and '.join(parts)} compared with the training classes of {train_dir}; "
            "give both splits the same class folders")
    tscan = _scan(train_dir, "training folder")
    escan = _scan(eval_dir, "eval folder")
    return train_classes, tscan, escan


def _names(xs: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in xs[:n])
    return f"{len(xs)} class{'es' if len(xs) > 1 else ''} ({shown}{', ...' if len(xs) > n else ''})"


def skipped_message(data: D.TaskData) -> str | None:
    """The line to print about images skipped at load time ("skipped 3 unreadable images (first: PATH)"), or
    None when none was."""
    sk = data.source.get("skipped") or {}
    n = int(sk.get("unreadable") or 0)
    if not n:
        return None
    return f"skipped {n} unreadable image{'s' if n > 1 else ''} (first: {sk.get('first_unreadable')})"


# ---- preprocessing ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImagePreprocessor:
    """How images become model inputs: timm's data config of the model (size, normalisation, resize/crop)."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"

    @classmethod
    def for_model(cls, model: Any) -> ImagePreprocessor:
        """From `timm.data.resolve_data_config({}, model=model)`; the input size is the built model's
        (`patch_embed.img_size`) when it was created at another size than its pretrained config's."""
        from timm.data import resolve_data_config

        owner, vit = _find_attr(model, "pretrained_cfg"), _find_attr(model, "patch_embed")
        cfg = resolve_data_config({}, model=owner if owner is not None else model)
        size = tuple(int(x) for x in cfg["input_size"])
        built = getattr(vit.patch_embed, "img_size", None) if vit is not None else None
        if built is not None:
            h, w = (built, built) if isinstance(built, int) else built
            size = (size[0], int(h), int(w))
        return cls.from_dict({**cfg, "input_size": size})

    def with_size(self, height: int, width: int | None = None) -> ImagePreprocessor:
        """The same preprocessing at another input size (CPU benches train ViTs at 32-64 px)."""
        if height < 1 or (width is not None and width < 1):
            raise InstatuneError(f"image size must be positive, got {height}x{width or height}")
        return replace(self, input_size=(self.input_size[0], int(height), int(width or height)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"], d["mean"], d["std"] = list(self.input_size), list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "image preprocessor") -> ImagePreprocessor:
        """Inverse of `to_dict`; one-line error for missing or ill-typed fields (unknown keys are ignored)."""
        try:
            size = tuple(int(x) for x in d["input_size"])
            mean = tuple(float(x) for x in d["mean"])
            std = tuple(float(x) for x in d["std"])
            pre = cls(size, mean, std, str(d.get("interpolation") or cls.interpolation),
                      float(d.get("crop_pct") or cls.crop_pct), str(d.get("crop_mode") or cls.crop_mode))
        except KeyError as e:
            raise InstatuneError(f"{where} has no {e.args[0]!r}; save it again with ImagePreprocessor.save") from None
        except (TypeError, ValueError) as e:
            raise InstatuneError(f"{where} has an invalid value ({e}); save it again") from None
        ok = (len(size) == 3 and min(size) >= 1 and len(mean) == len(std) == size[0] and all(s > 0 for s in std)
              and 0 < pre.crop_pct <= 1 and all(math.isfinite(x) for x in mean + std))
        if not ok:
            raise InstatuneError(
                f"{where} is inconsistent (input_size {list(size)}, {len(mean)} means, {len(std)} stds, crop_pct "
                f"{pre.crop_pct}); save it again")
        return pre

    def save(self, directory: str | Path) -> Path:
        """Write `preprocessor_config.json` into `directory`; returns its path."""
        p = Path(directory) / PREPROCESSOR_FILE
        p.write_text(json.dumps({"format": PREPROCESSOR_FORMAT, **self.to_dict()}, indent=1) + "\n")
        return p

    @classmethod
    def load(cls, directory: str | Path) -> ImagePreprocessor:
        """Read `preprocessor_config.json` from `directory` (one-line errors for a missing or garbled file)."""
        p = Path(directory) / PREPROCESSOR_FILE
        if not p.is_file():
            raise InstatuneError(f"{p} does not exist; the model directory is incomplete (tune it again or copy "
                                 "the whole directory)")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InstatuneError(f"{p} is not valid JSON ({e}); restore it or tune again") from None
        if not isinstance(d, dict) or d.get("format") != PREPROCESSOR_FORMAT:
            got = d.get("format") or ("a Hugging Face image-processor file" if "image_mean" in d else "no format") \
                if isinstance(d, dict) else type(d).__name__
            raise InstatuneError(f"{p} is not an instatune image preprocessor ({got}); restore it or tune again")
        return cls.from_dict(d, str(p))

    def transform(self, train: bool) -> Any:
        """timm's transform: eval (resize, centre crop, normalise) or light training augmentation."""
        from timm.data import create_transform

        cfg: dict[str, Any] = {"input_size": self.input_size, "interpolation": self.interpolation,
                               "mean": self.mean, "std": self.std}
        if not train:
            return create_transform(**cfg, crop_pct=self.crop_pct, crop_mode=self.crop_mode, is_training=False)
        return create_transform(**cfg, is_training=True, scale=(0.8, 1.0), hflip=0.5, auto_augment=None,
                                re_prob=0.0, color_jitter=None)


def _find_attr(model: Any, name: str) -> Any:
    """`model` or its first sub-module with attribute `name` (a timm model inside a wrapper), or None."""
    if hasattr(model, name):
        return model
    for m in model.modules() if hasattr(model, "modules") else ():
        if hasattr(m, name):
            return m
    return None


# ---- encoded splits and batches -----------------------------------------------------------------------

@dataclass
class _Cache:
    """Decoded RGB images by path, filled until `max_pixels` and then left as is (see the module docstring)."""

    max_pixels: int
    images: dict[str, np.ndarray] = field(default_factory=dict)
    pixels: int = 0

    def get(self, path: str) -> Any:
        from PIL import Image

        arr = self.images.get(path)
        if arr is not None:
            return Image.fromarray(arr)
        im = decode_image(path)
        n = im.size[0] * im.size[1]
        if self.pixels + n <= self.max_pixels:
            import numpy as np

            arr = np.asarray(im, dtype=np.uint8)
            arr.flags.writeable = False
            self.images[path] = arr
            self.pixels += n
        return im


# 16-bit grayscale (a PNG of depth 16 opens as one of these): PIL's convert("RGB") clips every value above 255,
# so such an image would decode almost pure white; it is scaled to 8 bits instead (value / 257, rounded).
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
UNFAITHFUL_MODES = ("F",)  # floating-point pixels: no scale to assume


def check_image_mode(mode: str, path: str) -> None:
    """Refuse a pixel format that has no faithful 8-bit RGB form (checked from the header when loading)."""
    if mode in UNFAITHFUL_MODES:
        raise InstatuneError(f"image {path} has floating-point pixels (PIL mode {mode}), which have no faithful 8-bit "
                             "RGB form; convert the images to 8- or 16-bit PNG or JPEG")


def _from_16bit(im: Any, path: str) -> Any:
    """A 16-bit (or 32-bit integer holding 16-bit values) grayscale image as 8-bit RGB, scaled, not clipped."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(im, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise InstatuneError(f"image {path} has 32-bit pixel values outside 0..65535 (PIL mode {im.mode}), which have "
                             "no faithful 8-bit form; convert it to an 8- or 16-bit PNG or JPEG")
    if im.mode == "I" and arr.size and arr.max() <= 255:  # 32-bit integers holding 8-bit values (some TIFFs)
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    return Image.fromarray(((arr + 128) // 257).astype(np.uint8), mode="L").convert("RGB")


def decode_image(path: str) -> Any:
    """The image at `path` as a loaded RGB PIL image; `InstatuneError` naming the file if it cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            check_image_mode(im.mode, path)
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            out = _from_16bit(im, path) if im.mode in WIDE_MODES else im.convert("RGB")
            out.load()
            return out
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise InstatuneError(
            f"cannot decode image {path} ({first}); replace or delete it and rerun (loading skips unreadable "
            "images)") from None


@contextlib.contextmanager
def _python_random_from_torch() -> Iterator[None]:
    """Seed Python's `random` (timm's random crop draws from it) from torch's generator for the block, then
    restore it: augmentation then depends on torch's state alone, which the tune loop seeds per step."""
    import torch

    state = random.getstate()
    random.seed(int(torch.randint(0, 2**62, (1,)).item()))
    try:
        yield
    finally:
        random.setstate(state)


@dataclass
class ImageEncoded:
    """An image split ready for batching, duck-typed like `data.Encoded`: `labels`, `len`, `collate`,
    `lengths`, `digest`. Images are decoded when collated (cached, see the module docstring)."""

    paths: list[str]
    labels: list[int]
    pre: ImagePreprocessor
    train: bool = False
    cache_pixels: int = DEFAULT_CACHE_PIXELS
    _cache: _Cache | None = field(default=None, repr=False, compare=False)
    _tf: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        if self._cache is None:
            self._cache = _Cache(self.cache_pixels)

    def __len__(self) -> int:
        return len(self.paths)

    def lengths(self) -> list[int]:
        """All 1: images have no length to group batches by."""
        return [1] * len(self.paths)

    def as_eval(self) -> ImageEncoded:
        """The same split with eval transforms, sharing the decoded-image cache."""
        if not self.train:
            return self
        return ImageEncoded(self.paths, self.labels, self.pre, False, self.cache_pixels, self._cache)

    def collate(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        """{"pixel_values": float [B, 3, H, W], "labels": long [B]} of the examples `idx`."""
        import torch

        if self._tf is None:
            self._tf = self.pre.transform(self.train)
        assert self._cache is not None
        images = [self._cache.get(self.paths[i]) for i in idx]
        with _python_random_from_torch() if self.train else contextlib.nullcontext():
            px = torch.stack([self._tf(im) for im in images]) if images else \
                torch.empty((0, *self.pre.input_size), dtype=torch.float32)
        return {"pixel_values": px.float(), "labels": torch.tensor([self.labels[i] for i in idx], dtype=torch.long)}

    def digest(self) -> str:
        """Content hash (16 hex chars) of the paths relative to their common folder, labels, file sizes and
        the preprocessor: part of a run's fingerprint. Reads file sizes, not image bytes."""
        h = hashlib.sha256(json.dumps(self.pre.to_dict(), sort_keys=True).encode())
        root = os.path.commonpath([os.path.dirname(p) for p in self.paths]) if self.paths else ""
        for p, y in zip(self.paths, self.labels, strict=True):
            try:
                size = os.stat(p).st_size
            except OSError:
                raise InstatuneError(f"image {p} no longer exists or cannot be read; restore it or load the data "
                                     "again") from None
            rel = Path(os.path.relpath(p, root)).as_posix()
            h.update(json.dumps([rel, y, size], separators=(",", ":")).encode())
        return h.hexdigest()[:16]


def encode_images(split: D.Split, pre: ImagePreprocessor, train: bool = False,
                  cache_pixels: int = DEFAULT_CACHE_PIXELS) -> ImageEncoded:
    """An image split (texts = image paths) for batching with `pre`'s train or eval transforms."""
    return ImageEncoded(list(split.texts), list(split.labels), pre, train, cache_pixels)


def image_eval_batches(enc: ImageEncoded, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
    """All of `enc` in batches with eval transforms, in order (like `data.eval_batches`; they are held in
    memory, N x 3 x H x W floats)."""
    ev = enc.as_eval()
    return [ev.collate(range(s, min(s + batch_size, len(ev)))) for s in range(0, len(ev), batch_size)]
