"""Issue 19, class 6: every fault a user can cause is one line with advice that works (pickled weights, a
damaged checkpoint, a lost torchrun peer, Ctrl-C and SIGTERM told truthfully, no partial left by a failed
start)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Killed, assert_cli_error, kill_at, run_cli, tiny_tune_args, tiny_tune_config

from instatune_cli import artifacts
from instatune_cli.errors import InstatuneError, Interrupted, Terminated


def test_pickled_pytorch_model_bin_is_one_line(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    import torch

    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    (model / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(2), "payload": os.system}, model / "pytorch_model.bin")  # a global: not weights
    res = run_cli(*tiny_tune_args(model, tiny_data_dir, tmp_path / "run"))
    assert_cli_error(res, "pytorch_model.bin", "never unpickles", "model.safetensors")
    assert not (tmp_path / "run.partial").exists()


def test_plain_tensor_pytorch_model_bin_passes_the_check(tiny_bert_dir: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from instatune_cli.adapters import check_weights

    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    check_weights(model)


def test_damaged_checkpoint_on_resume_is_one_line(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    from instatune_cli.tune.loop import run_tune

    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, max_steps=4, save_every=2),
                 on_step=kill_at(2))
    ckpt = tmp_path / "run.partial" / "checkpoints" / "step-000002"
    w = ckpt / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    res = run_cli(*tiny_tune_args(tiny_bert_dir, tiny_data_dir, out, "--max-steps", "4", "--save-every", "2",
                                  "--resume"))
    assert_cli_error(res, "step-000002 cannot be read", "--force instead of --resume")
    assert ckpt.is_dir()


def test_a_lost_torchrun_peer_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from instatune_cli.distributed import RankError, peer_lost, rank0_reports

    monkeypatch.setenv("WORLD_SIZE", "2")
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                        "[127.0.0.1]:29500")
    assert peer_lost(gloo) and not peer_lost(RuntimeError("shape mismatch"))
    with pytest.raises(RankError, match="lost another process.*--resume") as e:
        with rank0_reports(0):
            raise gloo
    assert "\n" not in str(e.value)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # a bug keeps its traceback
        with rank0_reports(0):
            raise RuntimeError("shape mismatch")


def test_ctrl_c_in_a_non_resumable_stage_says_nothing_was_written(tmp_path: Path) -> None:
    with pytest.raises(Interrupted, match=r"^interrupted; nothing was written to .*onnx$") as e:
        with artifacts.StageWriter(tmp_path / "onnx", "export", {}) as w:
            (w.path / "model.onnx").write_bytes(b"half")
            raise KeyboardInterrupt
    assert e.value.exit_code == 130
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_in_a_resumable_stage_says_where_the_work_is(tmp_path: Path) -> None:
    w = artifacts.StageWriter(tmp_path / "s", "search", {}, cleanup_on_error=False, keep_if=lambda p: True)
    w.open()
    with pytest.raises(Interrupted, match=r"kept in .*s\.partial: rerun the same command with --resume"):
        with w.faults("the search"):
            raise Terminated
    w.release()
    assert (tmp_path / "s.partial" / artifacts.MARKER).is_file()


def test_a_failed_start_leaves_no_partial_called_unfinished(tmp_path: Path) -> None:
    for worth, kept in ((False, False), (True, True)):
        out = tmp_path / f"run{worth}"
        w = artifacts.StageWriter(out, "tune", {}, cleanup_on_error=False, keep_if=lambda p, v=worth: v)
        with pytest.raises(InstatuneError, match="bad teacher"):
            with w.faults("the tune run"):
                w.open()
                raise InstatuneError("bad teacher")
        w.release()
        assert (tmp_path / f"run{worth}.partial").exists() == kept
    # a partial that was there before (a resume) is never dropped, even with nothing in it
    w = artifacts.StageWriter(tmp_path / "runTrue", "tune", {}, cleanup_on_error=False, resume=True,
                              keep_if=lambda p: False)
    with pytest.raises(InstatuneError):
        with w.faults("the tune run"):
            w.open()
            raise InstatuneError("bad teacher")
    w.release()
    assert (tmp_path / "runTrue.partial").is_dir()


def test_tune_that_fails_before_its_first_checkpoint_leaves_nothing(tiny_bert_dir: Path, tiny_data_dir: Path,
                                                                    tmp_path: Path) -> None:
    from instatune_cli.tune.loop import run_tune

    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, max_steps=4, save_every=3), on_step=kill_at(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    res = run_cli(*tiny_tune_args(tiny_bert_dir, tiny_data_dir, out, "--max-steps", "2"))
    assert res.exit_code == 0, res.output


SCRIPT = """
import sys, time
from pathlib import Path
from instatune_cli import artifacts
from instatune_cli.cli.common import user_errors

@user_errors
def stage():
    if sys.argv[2] == "export":  # as extract, quantize and export run
        with artifacts.StageWriter(Path(sys.argv[1]), "export", {}) as w:
            print("ready", flush=True)
            time.sleep(60)
    w = artifacts.StageWriter(Path(sys.argv[1]), sys.argv[2], {}, cleanup_on_error=False, keep_if=lambda p: True)
    try:
        with w.faults("the stage"):  # as tune and search run, with the lock released at the end
            w.open()
            print("ready", flush=True)
            time.sleep(60)
    finally:
        w.release()

try:
    stage()
except BaseException as e:  # typer.Exit (click's Exit) outside a typer app carries the exit code
    sys.exit(getattr(e, "exit_code", 99))
"""


@pytest.mark.parametrize("stage,kept", [("search", True), ("export", False)])
def test_sigterm_exits_with_one_line(tmp_path: Path, stage: str, kept: bool) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path / "out"), stage], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 143, (out, err)
    assert len(lines) == 1 and lines[0].startswith("error: terminated (SIGTERM)"), err
    assert (tmp_path / "out.partial").exists() == kept and not (tmp_path / "out.lock").exists()


def test_ctrl_c_that_a_library_reraised_is_still_ctrl_c(tmp_path: Path) -> None:
    """onnxruntime's import turns a Ctrl-C into `ImportError: initialization failed` (docs/faults.md, Ctrl-C
    during export): the stage still ends with the interrupt's one line and removes its partial."""
    with pytest.raises(Interrupted, match=r"^interrupted; nothing was written to .*onnx$"):
        with artifacts.StageWriter(tmp_path / "onnx", "export", {}):
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as e:
                raise ImportError("initialization failed") from e
    assert list(tmp_path.iterdir()) == []
    from instatune_cli.errors import interrupt_of

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise InstatuneError("a refusal while stopping") from None
    except InstatuneError as e:
        assert interrupt_of(e) is None  # a suppressed context is not followed
