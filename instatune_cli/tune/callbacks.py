"""Events of the tune loop and what listens to them, after transformers' `TrainerCallback` / `CallbackHandler`.

The loop (`loop.Trainer.train`) calls, in this order, on every process unless noted:

    on_train_begin   the model is built and resumed, just before the first step of this session
    on_step_end      after each optimizer step (`StepOutput`); may raise `control` flags
    on_log           when `control.should_log` (every --log-every steps and the last): the `train` record
    on_evaluate      rank 0, after each evaluation (--eval-every, and the final one with `final=True`)
    on_save          after a checkpoint was written
    on_step_complete after the step's log, evaluation and checkpoint: where `run_tune(on_step=...)` is called,
                     so a hook that raises stops the run after a complete, checkpointed step
    on_train_end     rank 0, with the final metrics, before the run directory is committed

Built in: the JSONL log (`log.jsonl`), the progress display, the `--report-to` loggers (`REPORTERS`; they write
under `<run>/logs/<name>/`, rank 0 only) and the `on_step` adapter. `TrainerState` / `TrainerControl`: state.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instatune_cli.artifacts import Heartbeat, fmt_seconds, writing
from instatune_cli.errors import InstatuneError
from instatune_cli.tune.state import TrainerControl, TrainerState

if TYPE_CHECKING:
    from instatune_cli.tune.loop import Trainer


@dataclass
class StepOutput:
    """What one optimizer step did: its mean loss (the super-network's and the sub-networks' terms summed), each
    part, its learning rate, examples, seconds, and the throughput since the last log record."""

    loss: float
    super_loss: float
    sub_loss: float | None  # None: no sub-network this step (--plain, the super-network warm-up)
    lr: float
    gamma: float            # the strong teacher's weight this step (0: none)
    subs: list[Any]         # the sampled sub-networks (space.SubNet)
    samples: int
    seconds: float
    samples_per_s: float
    grad_norm: float | None = None  # the gradient's norm before clipping (None: --max-grad-norm 0)


class TrainerCallback:
    """Base class: every event is a no-op; override the ones a callback needs. `trainer` gives access to the
    run (`trainer.cfg`, `trainer.main`, `trainer.run_dir`, `trainer.evaluation`, `trainer.net`)."""

    def on_train_begin(self, trainer: Trainer, state: TrainerState, control: TrainerControl) -> None:
        """Called before the first step of this session (`state.step` > 0 when resumed)."""

    def on_step_end(self, trainer: Trainer, state: TrainerState, control: TrainerControl, out: StepOutput) -> None:
        """Called after each optimizer step; `control` says what follows and may be changed."""

    def on_log(self, trainer: Trainer, state: TrainerState, control: TrainerControl, logs: dict[str, Any]) -> None:
        """Called with the `train` record (mean loss since the last one, lr, throughput, sub-networks)."""

    def on_evaluate(self, trainer: Trainer, state: TrainerState, control: TrainerControl, metrics: dict[str, Any],
                    final: bool) -> None:
        """Called on rank 0 with the scores of the super-network and the smallest sub-network."""

    def on_save(self, trainer: Trainer, state: TrainerState, control: TrainerControl, checkpoint: Path) -> None:
        """Called after the checkpoint of `state.step` is on disk."""

    def on_step_complete(self, trainer: Trainer, state: TrainerState, control: TrainerControl) -> None:
        """Called last for each step, after its log, evaluation and checkpoint."""

    def on_train_end(self, trainer: Trainer, state: TrainerState, control: TrainerControl,
                     metrics: dict[str, Any]) -> None:
        """Called on rank 0 with the run's final metrics, before the run directory is committed."""

    def close(self) -> None:
        """Release what the callback holds (a display, an open file); also called when the run stops early."""


class CallbackHandler(TrainerCallback):
    """Calls each event on every callback in order (transformers' `CallbackHandler`)."""

    def __init__(self, callbacks: list[TrainerCallback]) -> None:
        self.callbacks = list(callbacks)

    def _call(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(*args)

    def on_train_begin(self, trainer: Trainer, state: TrainerState, control: TrainerControl) -> None:
        self._call("on_train_begin", trainer, state, control)

    def on_step_end(self, trainer: Trainer, state: TrainerState, control: TrainerControl, out: StepOutput) -> None:
        self._call("on_step_end", trainer, state, control, out)

    def on_log(self, trainer: Trainer, state: TrainerState, control: TrainerControl, logs: dict[str, Any]) -> None:
        self._call("on_log", trainer, state, control, logs)

    def on_evaluate(self, trainer: Trainer, state: TrainerState, control: TrainerControl, metrics: dict[str, Any],
                    final: bool) -> None:
        self._call("on_evaluate", trainer, state, control, metrics, final)

    def on_save(self, trainer: Trainer, state: TrainerState, control: TrainerControl, checkpoint: Path) -> None:
        self._call("on_save", trainer, state, control, checkpoint)

    def on_step_complete(self, trainer: Trainer, state: TrainerState, control: TrainerControl) -> None:
        self._call("on_step_complete", trainer, state, control)

    def on_train_end(self, trainer: Trainer, state: TrainerState, control: TrainerControl,
                     metrics: dict[str, Any]) -> None:
        self._call("on_train_end", trainer, state, control, metrics)

    def close(self) -> None:
        for cb in self.callbacks:
            cb.close()


# ---- built-in callbacks -------------------------------------------------------------------------------

class JsonlLogCallback(TrainerCallback):
    """`log.jsonl` (the run directory's log, rank 0): start / resume, train, eval and final records."""

    def on_train_begin(self, trainer: Trainer, state: TrainerState, control: TrainerControl) -> None:
        log = trainer.run_dir.log
        if trainer.resumed_from is not None:
            log.write({"event": "resume", "step": state.step})
        elif not log.records:
            inp = trainer.inp
            log.write({"event": "start", "step": 0, "total_steps": state.total_steps, "mode": trainer.mode,
                       "train_examples": trainer.plan.n_train, "eval_examples": len(inp.eval_enc),
                       "val_examples": len(inp.val_enc) if inp.val_enc is not None else 0,
                       "processes": trainer.nproc})

    def on_log(self, trainer: Trainer, state: TrainerState, control: TrainerControl, logs: dict[str, Any]) -> None:
        trainer.run_dir.log.write(logs)

    def on_evaluate(self, trainer: Trainer, state: TrainerState, control: TrainerControl, metrics: dict[str, Any],
                    final: bool) -> None:
        if not final:  # the final scores go into the `final` record with the run's other metrics
            trainer.run_dir.log.write({"event": "eval", "step": state.step, **metrics})

    def on_train_end(self, trainer: Trainer, state: TrainerState, control: TrainerControl,
                     metrics: dict[str, Any]) -> None:
        trainer.run_dir.log.write({"event": "final", "step": state.total_steps, **metrics})


def console_of(console: Any) -> Any:
    if console is None:
        from rich.console import Console

        console = Console(highlight=False)
    return console


def heartbeat(console: Any, cfg: Any, main: bool) -> Heartbeat:
    """Lines every `--progress-every` seconds when the console is not a terminal; silent otherwise."""
    plain = main and not cfg.quiet and not console_of(console).is_terminal
    return Heartbeat(cfg.progress_every if plain else None)


class ProgressCallback(TrainerCallback):
    """The live bar (or plain lines where no terminal shows it) and a line per evaluation (rank 0)."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.progress: Progress | None = None

    def on_train_begin(self, trainer: Trainer, state: TrainerState, control: TrainerControl) -> None:
        cfg = trainer.cfg
        self.progress = Progress(self.console, state.total_steps, state.step, enabled=trainer.main and not cfg.quiet,
                                 beat=heartbeat(self.console, cfg, trainer.main))

    def on_step_end(self, trainer: Trainer, state: TrainerState, control: TrainerControl, out: StepOutput) -> None:
        if self.progress is not None:
            self.progress.update(state.step, out.loss, out.samples_per_s)

    def on_evaluate(self, trainer: Trainer, state: TrainerState, control: TrainerControl, metrics: dict[str, Any],
                    final: bool) -> None:
        if self.progress is not None and not final:
            self.progress.note(f"step {state.step}: {trainer.evaluation.scores_line(metrics)}, "
                               f"eval loss {metrics['eval_loss']:.4f}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class OnStepCallback(TrainerCallback):
    """`run_tune(on_step=f)`: `f(step)` after every complete step (and its checkpoint)."""

    def __init__(self, fn: Callable[[int], None]) -> None:
        self.fn = fn

    def on_step_complete(self, trainer: Trainer, state: TrainerState, control: TrainerControl) -> None:
        self.fn(state.step)


class Progress:
    """Rich progress bar with loss and samples/s on a terminal; elsewhere (a log file, `nohup`, CI) a plain
    line every `--progress-every` seconds from `beat`; silent when disabled."""

    def __init__(self, console: Any, total: int, start: int, enabled: bool, beat: Heartbeat | None = None) -> None:
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        self.enabled = enabled
        self.beat = beat or Heartbeat(None)
        self.p: Any = None
        if not enabled:
            return
        self.console = console_of(console)
        if self.console.is_terminal:
            self._start_bar()

    def _start_bar(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.p = Progress(TextColumn("tune"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[sps]:.1f} samples/s"),
                          TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False)
        self.task = self.p.add_task("tune", total=self.total, completed=self.start, loss=float("nan"), sps=0.0)
        self.p.start()

    def update(self, done: int, loss: float, sps: float) -> None:
        if self.p is not None:
            self.p.update(self.task, completed=done, loss=loss, sps=sps)
        self.beat.tick(lambda: self.line(done, loss, sps))

    def line(self, done: int, loss: float, sps: float) -> str:
        """`tune: step 120/900, loss 0.4321, 85.3 samples/s, ETA 3m12s` (ETA from this session's pace)."""
        elapsed = time.perf_counter() - self.t0
        eta = fmt_seconds(elapsed / (done - self.start) * (self.total - done)) if done > self.start else "?"
        return f"tune: step {done}/{self.total}, loss {loss:.4f}, {sps:.1f} samples/s, ETA {eta}"

    def note(self, msg: str) -> None:
        if self.enabled:
            self.console.print(msg, soft_wrap=True)

    def stop(self) -> None:
        if self.p is not None:
            self.p.stop()


# ---- --report-to ----------------------------------------------------------------------------------------

class TensorBoardCallback(TrainerCallback):
    """`--report-to tensorboard`: per step `train/loss` (the step's loss), `train/loss_super`, `train/loss_sub`
    (steps with sub-networks), `train/learning_rate`; per evaluation every score as `eval/<name>` (e.g.
    `eval/super_val_accuracy`, `eval/smallest_accuracy`, `eval/eval_loss`), the final one at the last step.
    Event files go to `<run>/logs/tensorboard/`; a resumed session purges what the killed one logged past its
    checkpoint (`SummaryWriter(purge_step=...)`)."""

    name = "tensorboard"
    package = "tensorboard"

    def __init__(self) -> None:
        self.writer: Any = None

    @staticmethod
    def check() -> None:
        try:
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise InstatuneError("--report-to tensorboard needs the tensorboard package: "
                                 "pip install 'instatune[tensorboard]' (or drop --report-to)") from None

    def on_train_begin(self, trainer: Trainer, state: TrainerState, control: TrainerControl) -> None:
        if not trainer.main:
            return
        from torch.utils.tensorboard import SummaryWriter

        d = trainer.run_dir.logs_dir(self.name)
        with writing("the TensorBoard log", d):
            d.mkdir(parents=True, exist_ok=True)
            # resumed: what the previous session logged past the checkpoint (steps > state.step) is redone
            self.writer = SummaryWriter(str(d), purge_step=state.step + 1 if state.step else None)

    def on_step_end(self, trainer: Trainer, state: TrainerState, control: TrainerControl, out: StepOutput) -> None:
        if self.writer is None:
            return
        scalars = {"train/loss": out.loss, "train/loss_super": out.super_loss, "train/learning_rate": out.lr}
        if out.sub_loss is not None:
            scalars["train/loss_sub"] = out.sub_loss
        if out.grad_norm is not None:
            scalars["train/grad_norm"] = out.grad_norm
        for tag, v in scalars.items():
            self.writer.add_scalar(tag, v, state.step)

    def on_evaluate(self, trainer: Trainer, state: TrainerState, control: TrainerControl, metrics: dict[str, Any],
                    final: bool) -> None:
        if self.writer is None:
            return
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"eval/{k}", v, state.step)
        self.writer.flush()

    def on_train_end(self, trainer: Trainer, state: TrainerState, control: TrainerControl,
                     metrics: dict[str, Any]) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


REPORTERS: dict[str, type[Any]] = {"tensorboard": TensorBoardCallback}


def reporters(names: list[str]) -> list[TrainerCallback]:
    """The `--report-to` loggers, each checked importable first: a missing package is one line before any work."""
    for name in names:
        REPORTERS[name].check()
    return [REPORTERS[name]() for name in names]
