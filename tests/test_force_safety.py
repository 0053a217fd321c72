"""`--force` replaces only what instatune made, `-o .` is refused in one line, and a failed final rename
never leaves only `<out>.old` behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import assert_cli_error, run_cli, tiny_tune_args

from instatune_cli import artifacts
from instatune_cli.errors import InstatuneError


def write_stage(out: Path, value: str, force: bool = False) -> artifacts.Artifact:
    with artifacts.StageWriter(out, "extract", {"v": value}, force=force) as w:
        (w.path / "weights.txt").write_text(value)
        return w.commit()


def test_force_refuses_a_directory_instatune_did_not_write(tmp_path: Path) -> None:
    data = tmp_path / "my-data"
    data.mkdir()
    (data / "train.csv").write_text("precious")
    with pytest.raises(InstatuneError, match="not an instatune stage output") as e:
        write_stage(data, "new", force=True)
    assert "\n" not in str(e.value)
    assert (data / "train.csv").read_text() == "precious" and not (tmp_path / "my-data.partial").exists()


def test_force_refuses_a_file_and_an_unmarked_partial(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("a file")
    with pytest.raises(InstatuneError, match="not a directory instatune wrote"):
        write_stage(tmp_path / "out", "new", force=True)
    other = tmp_path / "notes.partial"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(InstatuneError, match="no .stage marker"):
        write_stage(tmp_path / "notes", "new", force=True)
    assert (other / "keep.txt").read_text() == "mine"


def test_force_replaces_a_stage_output_or_an_empty_directory(tmp_path: Path) -> None:
    write_stage(tmp_path / "a", "old")
    art = write_stage(tmp_path / "a", "new", force=True)
    assert (art.path / "weights.txt").read_text() == "new"
    (tmp_path / "empty").mkdir()
    assert (write_stage(tmp_path / "empty", "x", force=True).path / "weights.txt").is_file()


def test_failed_final_rename_restores_the_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "a"
    write_stage(out, "old")
    real = os.replace

    def fail_into_out(src: object, dst: object) -> None:
        if Path(str(src)).name == "a.partial":
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", fail_into_out)
    with pytest.raises(InstatuneError, match="previous .* is unchanged"):
        write_stage(out, "new", force=True)
    monkeypatch.undo()
    assert (out / "weights.txt").read_text() == "old" and artifacts.load(out, "extract").options["v"] == "old"
    assert not (tmp_path / "a.old").exists() and (tmp_path / "a.partial" / "weights.txt").read_text() == "new"


@pytest.mark.parametrize("output", [".", ".."])
def test_output_dot_is_one_line(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch, output: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    res = run_cli(*tiny_tune_args(tiny_bert_dir, tiny_data_dir, output, "--force"))
    assert_cli_error(res, "current directory")
    assert (work / "keep.txt").read_text() == "mine"


def test_tune_force_refuses_a_data_folder(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    res = run_cli(*tiny_tune_args(tiny_bert_dir, tiny_data_dir, folder, "--force"))
    assert_cli_error(res, "not an instatune stage output")
    assert (folder / "thesis.tex").read_text() == "years of work" and not (tmp_path / "home.partial").exists()


def test_every_stage_refuses_output_dot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for stage in artifacts.STAGES:
        with pytest.raises(InstatuneError, match="current directory"):
            artifacts.StageWriter(Path("."), stage, {}, force=True)


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_broken_weights_fail_in_one_line_before_any_output(tiny_bert_dir: Path, tiny_data_dir: Path,
                                                           tmp_path: Path, damage: str) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    weights = model / "model.safetensors"
    if damage == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.unlink()
    res = run_cli(*tiny_tune_args(model, tiny_data_dir, tmp_path / "run"))
    line = assert_cli_error(res, "model.safetensors")
    assert ("truncated" in line) if damage == "truncate" else ("no weights" in line)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_search_population_zero_creates_nothing(tiny_tune_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    res = run_cli("search", tiny_tune_run, "--objectives", "acc,macs", "--population", "0", "-o", out)
    assert_cli_error(res, "--population must be at least 1")
    assert not out.exists() and not (tmp_path / "s.partial").exists()


def test_resume_refuses_a_partial_instatune_did_not_make(tmp_path: Path) -> None:
    """docs/faults.md case 9: a `.partial` without the stage marker is someone's directory, never adopted."""
    out = tmp_path / "run"
    (tmp_path / "run.partial").mkdir()
    (tmp_path / "run.partial" / "notes.txt").write_text("mine")
    w = artifacts.StageWriter(out, "tune", {}, resume=True)
    with pytest.raises(InstatuneError, match="no .stage marker"):
        w.open()
    assert (tmp_path / "run.partial" / "notes.txt").read_text() == "mine" and not out.exists()


def test_force_refuses_a_foreign_old_before_the_stage_runs(tmp_path: Path) -> None:
    """docs/faults.md case 4: a `<out>.old` instatune did not write is refused at open, not after the work."""
    out = tmp_path / "x"
    write_stage(out, "a")
    (tmp_path / "x.old").mkdir()
    (tmp_path / "x.old" / "notes.txt").write_text("mine")
    w = artifacts.StageWriter(out, "extract", {"v": "b"}, force=True)
    with pytest.raises(InstatuneError, match="in the way"):
        w.open()
    assert not (tmp_path / "x.partial").exists() and (tmp_path / "x.old" / "notes.txt").is_file()
