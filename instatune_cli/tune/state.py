"""The counters of a tune run as one object (transformers' `TrainerState`), what the loop decides after each step
(`TrainerControl`) and the plan every count derives from (`TrainPlan`).

`TrainerState` is saved with every checkpoint as JSON (`to_dict`, under `trainer_state` in `state.json`) and
read back on `--resume` (`from_checkpoint`), so a resumed run continues every counter, the best scores and the
last evaluation where the checkpoint left them. Checkpoints written before it existed (format 1: the same
counters as flat keys) are still read; their evaluation history is rebuilt from the run's log
(docs/architecture.md, "Tuning").
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from instatune_cli.errors import InstatuneError

STATE_FORMAT = 2  # 1: the flat dict of checkpoints made before TrainerState (read, never written)
LEGACY_KEYS = ("step", "micro", "epoch", "batch_in_epoch", "samples", "train_time_s", "wall_s", "fingerprint",
               "global_batch", "processes")


@dataclass(frozen=True)
class TrainPlan:
    """How many steps, micro-batches and examples a run has: a function of the options and the training split's
    size only, never of the process count (loop.py's module docstring), computed before anything is written."""

    global_batch: int       # G: the global micro-batch (--batch-size)
    per_process: int        # B: this process's slice of it
    accum: int              # A: micro-batches per optimizer step (--grad-accum)
    n_train: int
    micro_per_epoch: int
    total_steps: int
    warmup: int             # learning-rate warm-up steps
    super_warmup_steps: int  # no sub-network before this step (OFA's first phase; 0 for --plain)
    sub_ramp_steps: int = 0  # steps over which the sub-network terms reach full weight after it (--sub-ramp)

    @classmethod
    def of(cls, cfg: Any, n_train: int, processes: int) -> TrainPlan:
        G, A = cfg.batch_size, cfg.grad_accum
        micro_per_epoch = math.ceil(n_train / G)
        if micro_per_epoch < 1:
            raise InstatuneError(f"the training split has {n_train} examples, fewer than one global batch ({G}); "
                                 "lower --batch-size")
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro_per_epoch / A))
        return cls(global_batch=G, per_process=cfg.per_process_batch(processes), accum=A, n_train=n_train,
                   micro_per_epoch=micro_per_epoch, total_steps=total, warmup=math.ceil(cfg.warmup_ratio * total),
                   super_warmup_steps=math.ceil(cfg.super_warmup * total) if cfg.elastic else 0,
                   sub_ramp_steps=math.ceil(cfg.sub_ramp * total) if cfg.elastic else 0)

    def sub_weight(self, step: int) -> float:
        """The weight of the sub-network terms at `step` (0-based, sampling from `super_warmup_steps`): rises
        linearly to 1 over `sub_ramp_steps`, so sampling does not start with a burst of large sub-network
        gradients against a barely tuned super-network (docs/architecture.md "Tuning")."""
        if step < self.super_warmup_steps:
            return 0.0
        if not self.sub_ramp_steps:
            return 1.0
        return min(1.0, (step - self.super_warmup_steps + 1) / self.sub_ramp_steps)

    @property
    def steps_per_epoch(self) -> float:
        return self.micro_per_epoch / self.accum


@dataclass(frozen=True)
class SessionClock:
    """When this session of a run started, on the wall clock and on this process's CPU clock: a run's time and
    compute are its earlier sessions' (from the checkpoint resumed) plus this one's, so a resumed run reports
    all the compute it took, not its last session's."""

    wall0: float
    cpu0: float

    @classmethod
    def start(cls) -> SessionClock:
        return cls(time.perf_counter(), time.process_time())

    def wall(self) -> float:
        return time.perf_counter() - self.wall0

    def cpu(self) -> float:
        return time.process_time() - self.cpu0


@dataclass
class TrainerState:
    """Everything a tune run counts, saved with each checkpoint. `step` optimizer steps are done; the next
    global micro-batch is `micro` (= step x --grad-accum), batch `batch_in_epoch` of epoch `epoch`."""

    step: int = 0
    total_steps: int = 0
    micro: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0            # training examples seen, all processes together
    train_time_s: float = 0.0   # wall seconds inside optimizer steps, every session of the run
    cpu_time_s: float = 0.0     # this process's CPU seconds inside them (format 1 did not count it)
    wall_s: float = 0.0         # wall seconds of the run, every session, when the state was last saved
    # this process's CPU seconds, every session (load, evaluation, checkpoints too), when the state was last
    # saved; None in checkpoints written before it was counted
    cpu_s: float | None = None
    fingerprint: str = ""
    global_batch: int = 0
    processes: int = 1
    last_eval: dict[str, Any] | None = None  # {"step": s, **scores} of the latest evaluation
    best: dict[str, dict[str, Any]] = field(default_factory=dict)  # "super"/"smallest": {"step", "key", "score"}

    def advance(self, plan: TrainPlan, samples: int, seconds: float, cpu_seconds: float) -> None:
        """One optimizer step done: its examples and its time."""
        self.step += 1
        self.micro = self.step * plan.accum
        self.epoch, self.batch_in_epoch = divmod(self.micro, plan.micro_per_epoch)
        self.samples += samples
        self.train_time_s += seconds
        self.cpu_time_s += cpu_seconds

    def record_eval(self, step: int, scores: dict[str, Any], metric: str, has_val: bool) -> None:
        """Keep the evaluation of `step` as the last one, and each network's best score on the split `search`
        selects on (validation if the run has one, else eval), by the run's metric (all are higher-is-better)."""
        self.last_eval = {"step": step, **scores}
        pre = "val_" if has_val else ""
        for who in ("super", "smallest"):
            key = f"{who}_{pre}{metric}"
            v = scores.get(key)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            if who not in self.best or v > self.best[who]["score"]:
                self.best[who] = {"step": step, "key": key, "score": float(v)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, d: dict[str, Any]) -> TrainerState:
        """The state in a checkpoint's `state.json`; format 1 (flat keys, before TrainerState) too. A newer
        format is refused in one line rather than half read."""
        fmt = d.get("format", 1)
        if fmt == 1:
            return cls(**{k: d[k] for k in LEGACY_KEYS})
        if fmt != STATE_FORMAT:
            raise InstatuneError(f"checkpoint format {fmt} was written by a newer instatune (this one reads "
                                 f"{STATE_FORMAT} and older): resume with that version, or pass --force to start over")
        body = d["trainer_state"]
        unknown = set(body) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown trainer_state keys {sorted(unknown)}")
        return cls(**body)


@dataclass
class TrainerControl:
    """What the loop does after a step (transformers' `TrainerControl`): set from the options by `decide`
    (what transformers' `DefaultFlowCallback` does), then callbacks' `on_step_end` may raise any flag, e.g. to
    checkpoint a step the options would not."""

    should_log: bool = False
    should_evaluate: bool = False
    should_save: bool = False

    def decide(self, cfg: Any, state: TrainerState) -> TrainerControl:
        done, last = state.step, state.step >= state.total_steps
        self.should_log = done % cfg.log_every == 0 or last
        # the last step is always evaluated (the final evaluation) and never checkpointed (the run commits)
        self.should_evaluate = bool(cfg.eval_every) and done % cfg.eval_every == 0 and not last
        self.should_save = bool(cfg.save_every) and done % cfg.save_every == 0 and not last
        return self
