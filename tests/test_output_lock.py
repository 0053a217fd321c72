"""One writer per output: an OS lock (`artifacts.OutputLock`) held for the life of a stage; a second writer
gets one line naming the holder; a dead holder's lock is taken over with a notice."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_cli_error, run_cli, tiny_tune_args

from instatune_cli import artifacts
from instatune_cli.errors import InstatuneError

fcntl = pytest.importorskip("fcntl")


def test_second_writer_is_refused_and_nothing_is_touched(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = artifacts.StageWriter(out, "search", {}, cleanup_on_error=False)
    part = first.open()
    (part / "progress.txt").write_text("live")
    for kw in ({}, {"force": True}, {"resume": True}):
        with pytest.raises(InstatuneError, match=r"being written by another instatune search \(pid \d+") as e:
            artifacts.StageWriter(out, "search", {}, **kw).open()
        assert "\n" not in str(e.value)
    assert (part / "progress.txt").read_text() == "live"
    art = first.commit()
    assert not (tmp_path / "run.lock").exists() and (art.path / "progress.txt").is_file()
    # released: the next writer may replace it
    with artifacts.StageWriter(out, "search", {}, force=True) as w:
        w.commit()


def test_tune_on_a_live_output_names_the_holder_instead_of_advising_resume(
        tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    live = artifacts.StageWriter(out, "tune", {}, cleanup_on_error=False)
    live.open()
    try:
        for extra in ((), ("--resume",), ("--force",)):
            res = run_cli(*tiny_tune_args(tiny_bert_dir, tiny_data_dir, out, *extra))
            line = assert_cli_error(res, "being written by another instatune tune")
            assert "--resume" not in line
        assert (tmp_path / "run.partial" / ".stage").is_file()
    finally:
        live.release()


def test_a_dead_holders_lock_is_taken_over_with_a_notice(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from instatune_cli import artifacts;"
        f"w = artifacts.StageWriter(Path({str(out)!r}), 'export', {{}}); w.open(); print('held', flush=True);"
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(InstatuneError, match=f"pid {child.pid}"):
            artifacts.StageWriter(out, "export", {}).open()
    finally:
        child.kill()
        child.wait()
    time.sleep(0.1)
    left = json.loads((tmp_path / "run.lock").read_text())
    assert left["pid"] == child.pid  # the killed process never released it
    w = artifacts.StageWriter(out, "export", {}, force=True)
    w.open()
    assert f"pid {child.pid}" in capsys.readouterr().err
    w.commit()
    assert not (tmp_path / "run.lock").exists()
