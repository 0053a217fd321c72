"""The teacher (issue 12): its logits cache is keyed by the weights' content, not path or mtime, and a teacher
without weights is refused in one line before the data is even loaded."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_cli_error, run_cli, tiny_tune_args
from safetensors.torch import save_file

from instatune_cli.tune import teacher as T


def weights_dir(path: Path, seed: int = 0) -> Path:
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(8, 8, generator=g)}, str(path / "model.safetensors"))
    (path / "config.json").write_text("{}")
    return path


def test_cache_key_follows_the_bytes_not_the_path_or_mtime(tmp_path: Path) -> None:
    d = weights_dir(tmp_path / "teacher")
    key = T.cache_key(str(d), "data", 64)
    st = (d / "model.safetensors").stat()
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns + 10**10, st.st_mtime_ns + 10**10))  # touch
    assert T.cache_key(str(d), "data", 64) == key
    moved = tmp_path / "elsewhere" / "teacher"
    shutil.copytree(d, moved)
    assert T.cache_key(str(moved), "data", 64) == key
    assert T.cache_key(str(d), "other data", 64) != key and T.cache_key(str(d), "data", 32) != key
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-1] ^= 0x01  # one bit of one weight, same size and (restored) mtime
    (d / "model.safetensors").write_bytes(bytes(data))
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns + 10**10, st.st_mtime_ns + 10**10))
    assert T.cache_key(str(d), "data", 64) != key


def test_a_tune_run_teacher_is_keyed_by_its_manifest_without_hashing(tiny_plain_run: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "model"
    shutil.copytree(tiny_plain_run / "model", copy)
    hashed = T.cache_key(str(copy), "data", 64)  # a plain model directory: its bytes are hashed

    def no_hashing(path: Path, chunk: int = 0) -> str:
        raise AssertionError(f"hashed {path}")

    monkeypatch.setattr("instatune_cli.artifacts.sha256_file", no_hashing)
    assert T.cache_key(str(tiny_plain_run / "model"), "data", 64) == hashed


def test_a_teacher_without_weights_fails_before_the_data_is_loaded(tiny_bert_dir: Path, tiny_data_dir: Path,
                                                                   tiny_plain_run: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def not_yet(*a: object, **k: object) -> None:
        raise AssertionError("the data was loaded before the teacher was checked")

    monkeypatch.setattr("instatune_cli.data.load_task_data", not_yet)
    model_dir = tmp_path / "teacher-model"
    shutil.copytree(tiny_plain_run / "model", model_dir)
    (model_dir / "model.safetensors").unlink()
    run_dir = tmp_path / "teacher-run"
    shutil.copytree(tiny_plain_run, run_dir)
    (run_dir / "model" / "model.safetensors").unlink()
    for teacher in (model_dir, run_dir):
        out = tmp_path / f"out-{teacher.name}"
        res = run_cli(*tiny_tune_args(tiny_bert_dir, tiny_data_dir, out, "--teacher", str(teacher)))
        assert_cli_error(res, "no weights", str(teacher))
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()
