"""Disk full and permission denied (issue 12): a write the file system refuses anywhere in a stage is one line
naming what was being written and where, the exit is non-zero, and a resumable stage keeps its `.partial` so
that `--resume` continues once there is room again."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import typer
from conftest import assert_cli_error, run_cli, tiny_tune_args

from instatune_cli import artifacts
from instatune_cli.cli.common import user_errors
from instatune_cli.errors import InstatuneError
from instatune_cli.tune.loop import latest_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


def test_disk_full_at_a_checkpoint_keeps_the_last_one_for_resume(tiny_bert_dir: Path, tiny_data_dir: Path,
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    import safetensors.torch as st

    real, calls = st.save_model, [0]

    def save_model(*a: object, **k: object) -> None:
        calls[0] += 1
        if calls[0] == 2:  # the checkpoint of step 8, as safetensors (Rust) reports a full disk
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(*a, **k)

    monkeypatch.setattr(st, "save_model", save_model)
    out = tmp_path / "run"
    args = tiny_tune_args(tiny_bert_dir, tiny_data_dir, out, "--save-every", "4")
    line = assert_cli_error(run_cli(*args), "no space left", "checkpoint of step 8", "step-000008.tmp", "--resume")
    monkeypatch.undo()
    partial = out.with_name("run.partial")
    assert str(partial) in line and not out.exists()
    assert latest_checkpoint(partial).name == "step-000004"
    assert not (partial / "checkpoints" / "step-000008.tmp").exists()  # the torn checkpoint freed its space
    res = run_cli(*args, "--resume", "--json")
    assert res.exit_code == 0, res.output
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert any(r["event"] == "resume" and r["step"] == 4 for r in log)


def test_disk_full_in_the_search_archive_then_resume(tiny_tune_run: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from instatune_cli.search.archive import Archive

    real = Archive.add

    def add(self: Archive, *a: object, **k: object) -> dict:
        if len(self.rows) == 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real(self, *a, **k)

    monkeypatch.setattr(Archive, "add", add)
    out = tmp_path / "s"
    args = ["search", tiny_tune_run, "--evals", "12", "--population", "6", "--output", out, "--json"]
    line = assert_cli_error(run_cli(*args), "no space left", "search archive", "archive.jsonl", "--resume")
    monkeypatch.undo()
    partial = out.with_name("s.partial")
    assert str(partial) in line and not out.exists()
    assert len((partial / "archive.jsonl").read_text().splitlines()) == 5
    res = run_cli(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["new_evaluations"] == 7


@pytest.mark.parametrize("code,fix", [(errno.EACCES, "make it writable"), (errno.EROFS, "make it writable"),
                                      (errno.EDQUOT, "free some space")])
def test_stage_writer_names_the_path_and_what_was_kept(tmp_path: Path, code: int, fix: str) -> None:
    weights = tmp_path / "x.partial" / "weights.bin"
    with pytest.raises(InstatuneError) as e, artifacts.StageWriter(tmp_path / "x", "extract", {}):
        raise OSError(code, "refused", str(weights))
    msg = str(e.value)
    assert "\n" not in msg and str(weights) in msg and fix in msg and "nothing was written" in msg
    assert not (tmp_path / "x.partial").exists() and not (tmp_path / "x").exists()

    w = artifacts.StageWriter(tmp_path / "r", "search", {}, cleanup_on_error=False)
    with pytest.raises(InstatuneError, match=r"kept in .*r\.partial.*--resume"), w:
        raise OSError(code, "refused", str(w.path / "archive.jsonl"))
    assert (tmp_path / "r.partial").is_dir()


def test_disk_full_while_writing_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(root: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    w = artifacts.StageWriter(tmp_path / "t", "tune", {}, cleanup_on_error=False)
    w.open()
    (w.path / "model.bin").write_text("weights")
    monkeypatch.setattr(artifacts, "fsync_tree", full)
    try:
        with pytest.raises(InstatuneError, match="no space left on the device while writing the manifest") as e:
            w.commit()
    finally:
        w.release()
    assert "--resume" in str(e.value) and (tmp_path / "t.partial" / ".stage").is_file()
    assert not (tmp_path / "t").exists()


def test_other_errors_keep_their_traceback(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="a bug"), artifacts.StageWriter(tmp_path / "x", "export", {}):
        raise RuntimeError("a bug, not a full disk")
    with pytest.raises(OSError, match="I/O"), artifacts.StageWriter(tmp_path / "y", "export", {}):
        raise OSError(errno.EIO, "I/O error")


def test_cli_turns_any_refused_write_into_one_line(capsys: pytest.CaptureFixture) -> None:
    @user_errors
    def command() -> None:
        raise OSError(errno.EDQUOT, "Disk quota exceeded", "/data/out/model.onnx")

    with pytest.raises(typer.Exit) as e:
        command()
    assert e.value.exit_code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert "disk quota exceeded" in err and "/data/out/model.onnx" in err
