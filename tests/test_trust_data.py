"""Issue 19, class 5: training data is what the user meant — class ids with no training example, non-scalar
labels, and image modes that do not convert faithfully are one line (16-bit grayscale is scaled, not clipped)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_cli_error, run_cli, tiny_sentences, tiny_tune_args, write_table
from PIL import Image

from instatune_cli import data as D
from instatune_cli import images as I
from instatune_cli.errors import InstatuneError


def test_a_stray_class_id_is_refused_naming_the_missing_classes() -> None:
    with pytest.raises(InstatuneError, match=r"up to 7 but no training example of class 2, 3, 4, 5, 6"):
        D.map_labels([0, 1, 0, 1, 7], [0, 1])
    tr, ev, names = D.map_labels([0, 1, 2, 1], [2, 0])  # every id 0..C-1 present: unchanged
    assert names == ["0", "1", "2"] and tr == [0, 1, 2, 1]


@pytest.mark.parametrize("bad", [[1, 2], {"a": 1}, None, "", "  "])
def test_non_scalar_or_missing_labels_are_refused(bad: object) -> None:
    with pytest.raises(InstatuneError, match="row 3 has"):
        D.map_labels(["pos", "neg", bad, "pos"], ["pos"])
    with pytest.raises(InstatuneError, match="eval split row 1 has"):
        D.map_labels(["pos", "neg"], [bad])


def test_real_valued_labels_stay_possible_for_a_regressor() -> None:
    tr, ev, _ = D.map_labels([0.5, 1.5, 4.0], [2.0], regression=True)
    assert tr == [0.5, 1.5, 4.0] and ev == [2.0]


def test_cli_jsonl_list_label_is_one_line(tiny_bert_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"sentence": s, "label": y} for s, y in tiny_sentences(40)]
    rows[5]["label"] = [1, 2]
    write_table(data / "train.jsonl", rows)
    write_table(data / "dev.jsonl", [{"sentence": s, "label": y} for s, y in tiny_sentences(16, seed=1)])
    assert (data / "train.jsonl").read_text().count("[1, 2]") == 1
    res = run_cli(*tiny_tune_args(tiny_bert_dir, data, tmp_path / "run"))
    assert_cli_error(res, "row 6 has the label", "one class id or name")
    assert not (tmp_path / "run.partial").exists()


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    a = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    got = np.asarray(I.decode_image(str(tmp_path / "g16.png")))
    assert got.shape == (64, 64, 3)
    assert abs(got.mean() - (a / 257).mean()) < 1 and got.max() >= 250 and got.min() == 0  # PIL alone: ~254.5


def test_floating_point_images_are_one_line(tmp_path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).random((8, 8), dtype=np.float32)).save(tmp_path / "f.tiff")
    assert Image.open(tmp_path / "f.tiff").mode == "F"
    with pytest.raises(InstatuneError, match="floating-point pixels"):
        I.decode_image(str(tmp_path / "f.tiff"))
    with pytest.raises(InstatuneError, match="floating-point pixels"):
        I._unreadable(str(tmp_path / "f.tiff"))


def test_labels_json_roundtrip_of_a_list_label_is_not_a_class_name(tmp_path: Path) -> None:
    """The loader itself: a JSONL file whose label column holds a list stops at load time."""
    p = tmp_path / "train.jsonl"
    p.write_text("\n".join(json.dumps({"sentence": f"s {i}", "label": [1, 2] if i == 2 else i % 2})
                           for i in range(6)) + "\n")
    (tmp_path / "dev.jsonl").write_text(json.dumps({"sentence": "x", "label": 0}) + "\n"
                                        + json.dumps({"sentence": "y", "label": 1}) + "\n")
    with pytest.raises(InstatuneError, match="row 3 has the label"):
        D.load_task_data(data=tmp_path)
