"""Commit order (issue 12): a tune run's checkpoints leave the directory the manifest describes but are deleted
only once it is in place; the directory is flushed to disk before the rename; `--force` never leaves the previous
output only under `<out>.old`."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import Killed, assert_cli_error, run_cli, tiny_tune_args, tiny_tune_config
from safetensors.torch import load_file

from instatune_cli import artifacts
from instatune_cli.errors import InstatuneError
from instatune_cli.tune.loop import parked_dir, run_tune

pytestmark = pytest.mark.usefixtures("single_thread")

KW = dict(save_every=4, max_steps=10)


def fail_rename_of(name: str, exc: BaseException):
    """An `os.replace` that raises `exc` when it would move a path called `name`, and works otherwise."""
    real = os.replace

    def replace(src: object, dst: object) -> None:
        if Path(str(src)).name == name:
            raise exc
        real(src, dst)

    return replace


def assert_parked_then_resumed(out: Path, tiny_bert_dir: Path, tiny_data_dir: Path, reference: Path) -> None:
    parked = parked_dir(out.with_name("run.partial"))
    assert (parked / "step-000008" / "state.json").is_file(), "the checkpoints were deleted before the commit"
    assert not out.exists()
    res = run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, resume=True, **KW))
    assert res.resumed_from == 8  # not 0
    assert not parked.exists() and not out.with_name("run.partial").exists()
    names = {f["path"] for f in artifacts.load(out, "tune").manifest["files"]}
    assert not any("checkpoint" in n for n in names) and not (out / "checkpoints").exists()
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (out, reference))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, tiny_data_dir: Path) -> Path:
    from conftest import one_thread

    out = tmp_path_factory.mktemp("ref") / "run"
    with one_thread():
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, **KW))
    return out


def test_kill_while_the_manifest_is_hashed_resumes_from_the_last_checkpoint(
        reference: Path, tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    def killed(root: Path) -> None:
        raise Killed("while hashing")

    monkeypatch.setattr(artifacts, "_file_list", killed)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, **KW))
    monkeypatch.undo()
    assert (out.with_name("run.partial") / ".stage").is_file()  # still an unfinished stage: --force may clear it
    assert_parked_then_resumed(out, tiny_bert_dir, tiny_data_dir, reference)


def test_failed_final_rename_is_one_line_and_resume_continues(
        reference: Path, tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    monkeypatch.setattr(os, "replace", fail_rename_of("run.partial", OSError(errno.EACCES, "Permission denied")))
    args = tiny_tune_args(tiny_bert_dir, tiny_data_dir, out, "--save-every", "4")
    args[args.index("--max-steps") + 1] = "10"
    line = assert_cli_error(run_cli(*args), "permission denied", str(out), "--resume")
    monkeypatch.undo()
    assert str(out.with_name("run.partial")) in line
    assert_parked_then_resumed(out, tiny_bert_dir, tiny_data_dir, reference)


def test_checkpoints_parked_by_another_run_are_never_resumed(tiny_bert_dir: Path, tiny_data_dir: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "run"
    stale = parked_dir(out.with_name("run.partial")) / "step-000008"
    stale.mkdir(parents=True)
    (stale / "state.json").write_text(json.dumps({"fingerprint": "another run"}))
    artifacts.mark_own(stale.parent, "checkpoints")  # parked by instatune (an unmarked one is refused)
    res = run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, resume=True, max_steps=2))
    assert res.resumed_from is None and not stale.parent.exists()


def write_stage(out: Path, value: str, force: bool = False) -> artifacts.Artifact:
    with artifacts.StageWriter(out, "extract", {"v": value}, force=force) as w:
        (w.path / "sub").mkdir()
        (w.path / "sub" / "weights.txt").write_text(value)
        return w.commit()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced descriptors")
def test_every_file_and_directory_is_flushed_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: object, dst: object) -> None:
        events.append(("rename", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_stage(tmp_path / "a", "v")
    tmp = str((tmp_path / "a.partial").resolve())
    rename = events.index(("rename", str(tmp_path / "a.partial")))
    synced = {p for kind, p in events[:rename] if kind == "fsync"}
    for rel in ("manifest.json", "sub/weights.txt", "sub", ""):
        assert os.path.join(tmp, rel).rstrip("/") in synced, rel
    assert ("fsync", str(tmp_path.resolve())) in events[rename:]  # the rename itself, in the parent directory


def test_force_says_where_the_previous_output_is_when_it_cannot_be_put_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "a"
    write_stage(out, "old")
    real = os.replace

    def replace(src: object, dst: object) -> None:
        if Path(str(dst)) == out:  # neither the new result nor the previous output can be moved back
            raise OSError(errno.EROFS, "Read-only file system")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(InstatuneError) as e:
        write_stage(out, "new", force=True)
    monkeypatch.undo()
    msg = str(e.value)
    assert "\n" not in msg and f"previous output is in {tmp_path / 'a.old'}" in msg
    assert f"new result in {tmp_path / 'a.partial'}" in msg
    assert (tmp_path / "a.old" / "sub" / "weights.txt").read_text() == "old"
    assert (tmp_path / "a.partial" / "sub" / "weights.txt").read_text() == "new"


def test_force_never_deletes_someone_elses_old_directory(tmp_path: Path) -> None:
    out = tmp_path / "a"
    write_stage(out, "old")
    mine = tmp_path / "a.old"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(InstatuneError, match="in the way"):
        write_stage(out, "new", force=True)
    assert (mine / "notes.txt").read_text() == "mine" and (out / "sub" / "weights.txt").read_text() == "old"
