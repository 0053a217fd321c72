"""The trainer's state and events: `TrainerState` in checkpoints (and the format before it), the callback
events in order, `TrainerControl` changed by a callback, and `--report-to tensorboard` read back with
TensorBoard's own reader."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Killed, assert_cli_error, kill_at, one_thread, run_cli, tiny_tune_args, tiny_tune_config
from safetensors.torch import load_file

from instatune_cli import artifacts
from instatune_cli.errors import InstatuneError
from instatune_cli.tune.callbacks import TrainerCallback
from instatune_cli.tune.checkpoint import latest_checkpoint
from instatune_cli.tune.loop import run_tune
from instatune_cli.tune.state import LEGACY_KEYS, TrainerState

pytestmark = pytest.mark.usefixtures("single_thread")

EVAL = dict(eval_every=5, val_split="16", log_every=2)  # 12 steps: evaluations at 5 and 10, the final at 12


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = (load_file(str(p / "model" / "model.safetensors")) for p in (a, b))
    return wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def log_of(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, tiny_data_dir: Path) -> Path:
    """An uninterrupted run that reports to TensorBoard, on one thread like the tests that compare with it (a
    module fixture is set up before the function-scoped `single_thread`; another thread count changes the float
    sums, so the weights would differ wherever OMP_NUM_THREADS is not 1)."""
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("straight") / "run"
    with one_thread():
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, report_to="tensorboard", **EVAL))
    return out


# ---- TrainerState -------------------------------------------------------------------------------------

def test_state_keeps_the_best_and_last_evaluation() -> None:
    st = TrainerState(total_steps=10)
    st.record_eval(5, {"super_val_accuracy": 0.7, "smallest_val_accuracy": 0.6, "super_accuracy": 0.9}, "accuracy",
                   has_val=True)
    st.record_eval(10, {"super_val_accuracy": 0.65, "smallest_val_accuracy": 0.8, "super_accuracy": 0.95},
                   "accuracy", has_val=True)
    assert st.best == {"super": {"step": 5, "key": "super_val_accuracy", "score": 0.7},
                       "smallest": {"step": 10, "key": "smallest_val_accuracy", "score": 0.8}}
    assert st.last_eval == {"step": 10, "super_val_accuracy": 0.65, "smallest_val_accuracy": 0.8,
                            "super_accuracy": 0.95}
    back = TrainerState.from_checkpoint({"format": 2, "trainer_state": json.loads(json.dumps(st.to_dict()))})
    assert back == st
    st.record_eval(12, {"super_mcc": float("nan"), "smallest_mcc": 0.1}, "mcc", has_val=False)
    assert st.best["super"]["step"] == 5 and st.best["smallest"]["step"] == 10  # NaN and another key: not better


def test_state_reads_format_1_and_refuses_a_newer_one() -> None:
    flat = {k: i for i, k in enumerate(LEGACY_KEYS)} | {"fingerprint": "fp", "optimizer_scalars": {}}
    st = TrainerState.from_checkpoint(flat)
    assert (st.step, st.samples, st.fingerprint, st.last_eval, st.best) == (0, LEGACY_KEYS.index("samples"), "fp",
                                                                            None, {})
    with pytest.raises(InstatuneError, match="checkpoint format 3 was written by a newer instatune"):
        TrainerState.from_checkpoint({"format": 3, "trainer_state": {}})
    with pytest.raises(ValueError, match="unknown trainer_state keys"):
        TrainerState.from_checkpoint({"format": 2, "trainer_state": {"step": 1, "lr": 2}})


def test_checkpoint_carries_the_state_and_a_format_1_checkpoint_resumes_identically(
        straight: Path, tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, save_every=6, **EVAL), on_step=kill_at(7))
    ckpt = latest_checkpoint(out.with_name("run.partial"))
    raw = json.loads((ckpt / "state.json").read_text())
    st = raw["trainer_state"]
    assert raw["format"] == 2 and raw["fingerprint"] == st["fingerprint"]
    assert (st["step"], st["micro"], st["samples"], st["total_steps"]) == (6, 6, 48, 12)
    assert st["last_eval"]["step"] == 5 and st["best"]["super"]["key"] == "super_val_accuracy"
    assert st["train_time_s"] > 0 and st["cpu_time_s"] > 0 and st["wall_s"] >= st["train_time_s"]
    assert st["cpu_s"] > st["cpu_time_s"]  # the whole session's CPU (load, evaluations), not only its steps'
    # rewrite it as the code before TrainerState wrote it: flat counters, no evaluations
    legacy = {k: v for k, v in raw.items() if k not in ("format", "trainer_state")} | \
        {k: st[k] for k in LEGACY_KEYS}
    (ckpt / "state.json").write_text(json.dumps(legacy))
    seen: list[TrainerState] = []

    class Peek(TrainerCallback):
        def on_train_begin(self, trainer: Any, state: TrainerState, control: Any) -> None:
            seen.append(TrainerState(**state.to_dict()))

    res = run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, save_every=6, resume=True, **EVAL),
                   callbacks=[Peek()])
    assert res.resumed_from == 6 and same_weights(straight, out)
    # format 1 counted no session CPU: its steps' CPU is carried and the total is said to be a lower bound
    assert res.metrics["cpu_s_lower_bound"] is True and res.metrics["cpu_s"] > st["cpu_time_s"]
    assert seen[0].step == 6 and seen[0].last_eval == st["last_eval"] and seen[0].best == st["best"]  # from the log


def test_a_resumed_run_reports_the_cpu_of_every_session(tiny_bert_dir: Path, tiny_data_dir: Path,
                                                         tmp_path: Path) -> None:
    """A bench's compute column reads the manifest's `cpu_s`: a run killed and resumed must count the killed
    session's CPU as well as the last one's."""
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, save_every=6, **EVAL), on_step=kill_at(7))
    first = json.loads((latest_checkpoint(out.with_name("run.partial")) / "state.json").read_text())
    first_cpu = first["trainer_state"]["cpu_s"]
    res = run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, save_every=6, resume=True, **EVAL))
    manifest = json.loads((out / "manifest.json").read_text())
    assert res.resumed_from == 6 and "cpu_s_lower_bound" not in res.metrics
    assert manifest["metrics"]["cpu_s"] == res.metrics["cpu_s"] > first_cpu > 0


def test_a_damaged_state_is_one_line(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, save_every=2), on_step=kill_at(2))
    state = latest_checkpoint(out.with_name("run.partial")) / "state.json"
    raw = json.loads(state.read_text())
    raw["format"] = 7
    state.write_text(json.dumps(raw))
    with pytest.raises(InstatuneError, match="checkpoint format 7 was written by a newer instatune"):
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, save_every=2, resume=True))
    del raw["format"]  # read as format 1, whose counters it does not have
    state.write_text(json.dumps(raw))
    with pytest.raises(InstatuneError, match=r"cannot be read \('step'\); it is damaged"):
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, save_every=2, resume=True))


# ---- events -------------------------------------------------------------------------------------------

class Recorder(TrainerCallback):
    def __init__(self, save_also: int | None = None) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.save_also = save_also

    def on_train_begin(self, trainer: Any, state: TrainerState, control: Any) -> None:
        self.events.append(("begin", state.step))

    def on_step_end(self, trainer: Any, state: TrainerState, control: Any, out: Any) -> None:
        self.events.append(("step", state.step, out.sub_loss is not None))
        if state.step == self.save_also:
            control.should_save = True

    def on_log(self, trainer: Any, state: TrainerState, control: Any, logs: dict[str, Any]) -> None:
        self.events.append(("log", state.step, logs["event"]))

    def on_evaluate(self, trainer: Any, state: TrainerState, control: Any, metrics: dict[str, Any],
                    final: bool) -> None:
        self.events.append(("evaluate", state.step, final, state.last_eval == {"step": state.step, **metrics}))

    def on_save(self, trainer: Any, state: TrainerState, control: Any, checkpoint: Path) -> None:
        self.events.append(("save", state.step, checkpoint.name, checkpoint.is_dir()))

    def on_step_complete(self, trainer: Any, state: TrainerState, control: Any) -> None:
        self.events.append(("complete", state.step))

    def on_train_end(self, trainer: Any, state: TrainerState, control: Any, metrics: dict[str, Any]) -> None:
        self.events.append(("end", state.step, metrics["steps"]))


def test_events_come_in_order_and_a_callback_can_ask_for_a_checkpoint(tiny_bert_dir: Path, tiny_data_dir: Path,
                                                                      tmp_path: Path) -> None:
    rec = Recorder(save_also=3)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, max_steps=6, super_warmup=0.5, save_every=4,
                                  eval_every=5, log_every=2), callbacks=[rec], on_step=kill_at(5))
    assert rec.events == [
        ("begin", 0),
        ("step", 1, False), ("complete", 1),
        ("step", 2, False), ("log", 2, "train"), ("complete", 2),
        ("step", 3, False), ("save", 3, "step-000003", True), ("complete", 3),  # asked for by the callback
        ("step", 4, True), ("log", 4, "train"), ("save", 4, "step-000004", True), ("complete", 4),
        ("step", 5, True), ("evaluate", 5, False, True), ("complete", 5),
    ]
    rec.events.clear()
    res = run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, max_steps=6, super_warmup=0.5, save_every=4,
                                    eval_every=5, log_every=2, resume=True), callbacks=[rec])
    assert res.resumed_from == 4
    assert rec.events == [("begin", 4), ("step", 5, True), ("evaluate", 5, False, True), ("complete", 5),
                          ("step", 6, True), ("log", 6, "train"), ("complete", 6),
                          ("evaluate", 6, True, True), ("end", 6, 6)]  # the final evaluation, at commit


# ---- --report-to tensorboard --------------------------------------------------------------------------

def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "logs" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logs_losses_lr_and_scores(straight: Path) -> None:
    sc = scalars(straight)
    log = log_of(straight)
    train = [r for r in log if r["event"] == "train"]
    assert [s for s, _ in sc["train/loss"]] == list(range(1, 13))
    assert [s for s, _ in sc["train/learning_rate"]] == list(range(1, 13))
    loss, lr = dict(sc["train/loss"]), dict(sc["train/learning_rate"])
    for r in train:  # the log's record is the mean of the steps since the last one (--log-every 2)
        assert r["loss"] == pytest.approx((loss[r["step"] - 1] + loss[r["step"]]) / 2, rel=1e-5)
        assert r["lr"] == pytest.approx(lr[r["step"]], rel=1e-6)
    assert lr[1] < lr[2] and lr[12] < lr[3]  # warm-up, then decay
    # the super-network alone for the first 30 % of the steps (4 of 12), then sub-networks too
    assert [s for s, _ in sc["train/loss_sub"]] == list(range(5, 13))
    for s, v in sc["train/loss_sub"]:
        assert loss[s] == pytest.approx(dict(sc["train/loss_super"])[s] + v, rel=1e-5)
    assert dict(sc["train/loss_super"])[1] == pytest.approx(loss[1], rel=1e-6)
    # validation (and eval) scores at each evaluation and the final one
    evals = {r["step"]: r for r in log if r["event"] == "eval"}
    final = next(r for r in log if r["event"] == "final")
    assert [s for s, _ in sc["eval/super_val_accuracy"]] == [5, 10, 12]
    for tag in ("super_val_accuracy", "smallest_val_accuracy", "super_accuracy", "eval_loss"):
        got = dict(sc[f"eval/{tag}"])
        assert got[5] == pytest.approx(evals[5][tag], rel=1e-6) and got[12] == pytest.approx(final[tag], rel=1e-6)
    assert "eval/super_collapsed" not in sc  # flags are not scalars
    art = artifacts.load(straight, "tune")  # the event file is part of the run, listed in its manifest
    assert any(f["path"].startswith("logs/tensorboard/events.out.tfevents.") for f in art.manifest["files"])
    assert art.manifest["options"]["report_to"] == "tensorboard"


def test_tensorboard_after_a_resume_has_each_step_once(straight: Path, tiny_bert_dir: Path, tiny_data_dir: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, save_every=4, report_to="tensorboard", **EVAL),
                 on_step=kill_at(7))
    # --report-to does not change the weights: the run resumes without it being fingerprinted
    run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, save_every=4, report_to="tensorboard", resume=True,
                              **EVAL))
    a, b = scalars(straight), scalars(out)
    assert same_weights(straight, out)
    for tag in ("train/loss", "train/learning_rate", "eval/super_val_accuracy"):
        assert [s for s, _ in b[tag]] == [s for s, _ in a[tag]], tag  # steps 5-7 of the killed session purged
        assert [v for _, v in b[tag]] == pytest.approx([v for _, v in a[tag]], rel=1e-6), tag


def test_report_to_errors_are_one_line_before_any_work(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    r = run_cli(*tiny_tune_args(tiny_bert_dir, tiny_data_dir, out, "--report-to", "wandb"))
    assert_cli_error(r, "unknown --report-to wandb", "tensorboard")
    r = run_cli(*tiny_tune_args(tiny_bert_dir, tiny_data_dir, out, "--report-to", "none,tensorboard"))
    assert_cli_error(r, "--report-to none with others")
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    r = run_cli(*tiny_tune_args(tiny_bert_dir, tiny_data_dir, out, "--report-to", "tensorboard"))
    assert_cli_error(r, "--report-to tensorboard needs the tensorboard package", "instatune[tensorboard]")
    assert not any(tmp_path.iterdir()), "nothing is written before the logger is known to work"


def test_report_to_none_writes_no_logs(tiny_tune_run: Path) -> None:
    """The default run (conftest) reports nowhere."""
    assert not (tiny_tune_run / "logs").exists()
    assert artifacts.load(tiny_tune_run, "tune").manifest["options"]["report_to"] == "none"
