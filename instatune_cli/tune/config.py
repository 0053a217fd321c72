"""Options of a tune run as one dataclass (to/from dict), its validation and its fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from instatune_cli.data import GLUE_TASKS, parse_val_split
from instatune_cli.errors import InstatuneError
from instatune_cli.measure.metrics import METRICS, check_metric_kind
from instatune_cli.tune.projection import PROJECTION

SAMPLING = ("uniform", "sandwich", "stratified")
MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("none", "tensorboard")  # --report-to: tune/callbacks.REPORTERS
DEFAULT_MAX_LENGTH = 128  # --max-length when not given (a recovery run takes its parent run's: tune/recover.py)

# Options that do not change the trained weights: they may differ between a run and its --resume.
NOT_FINGERPRINTED = frozenset({"output", "force", "resume", "eval_every", "save_every", "log_every",
                               "eval_batch_size", "quiet", "progress_every", "report_to"})
# Options added after runs existed, left out of the fingerprint at these values (which train as before the option
# existed), so an older run still resumes and a bench still reuses it.
FINGERPRINTED_UNLESS = {"sub_ramp": 0.0, "grad_projection": "none"}
# Options of the elastic method alone: a --plain run trains no sub-network, so they cannot change its weights and
# are left out of its fingerprint (a new default for one of them must not stop a plain run from resuming, nor a
# bench from reusing it).
ELASTIC_ONLY = frozenset({"num_subnets", "sampling", "super_ce", "super_warmup", "sub_ramp", "grad_projection",
                          "hidden_distill"})
# The super-network's own CE weight when no strong teacher shares its term and `--super-ce` is unset: a sampled
# sub-network's weight, so after the warm-up each step is half the super-network's and half the sub-networks'.
# Measured against 2 (the default for a while) by bench/glue_value.py, which picks each budget's member on
# validation as a user would (README, "Is one elastic run worth it?"): at 2 the super-network gained 0.3 points on
# SST-2 and 0.010 Pearson on STS-B, and the members fell on both (SST-2 every budget, by 0.3 to 1.4 points; STS-B
# 0.042 / 0.060 at 50 / 33 % of the MACs) with a lower STS-B hypervolume. The members are what a user ships, so 1.
# A run fingerprinted under the default of 2 does not resume under this one (`fingerprint_dict`).
SUPER_CE = 1.0


@dataclass
class TuneConfig:
    model: str
    # data
    task: str | None = None
    data: str | None = None
    eval_data: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    limit_train: int | None = None
    limit_eval: int | None = None
    val_split: str | None = None   # None: 5 % of training, at most 2,000; "0.1" a fraction; "500" a count; "0" none
    val_data: str | None = None    # a validation file instead of a carved split
    metric: str | None = None      # accuracy | f1 | mcc | pearson | spearman (a regressor); None: the task's own
    max_length: int | None = None  # None: DEFAULT_MAX_LENGTH, or a recovery run's parent's; `run_tune` resolves it
    tokenizer: str | None = None
    # output
    output: str = "run"
    force: bool = False
    resume: bool = False
    # method
    plain: bool = False
    space: str | None = None
    num_subnets: int = 1
    sampling: str = "uniform"
    alpha: float = 0.3
    # The super-network's own CE weight (None: SUPER_CE without a strong teacher, α with one) and the fraction of
    # steps that train it alone before sub-networks are sampled. Defaults measured by bench/convergence.py (README,
    # "Does the family learn as fast as plain tuning?"): the paper's Eq. 1 as written (α on the super-network's CE,
    # sampling from step 0) left an STS-B super-network at Pearson 0.36 after one epoch where plain tuning reached
    # 0.80. `--super-ce 0.3 --super-warmup 0` is Eq. 1 exactly.
    super_ce: float | None = None
    super_warmup: float = 0.3
    # Fraction of steps over which the sub-networks' terms grow linearly from 0 to full weight once sampling
    # starts (0: full weight at once). Measured by bench/convergence.py; docs/architecture.md "Tuning".
    sub_ramp: float = 0.0
    # Where the super-network's and the sub-networks' gradients conflict, project out the part of one that opposes
    # the other: "super" protects the full model, "subnets" the sub-networks (NASViT); tune/projection.py.
    grad_projection: str = "none"
    temperature: float = 1.0
    hidden_distill: float = 0.0  # β of DynaBERT's hidden-state distillation super -> sub (tune/loss.py); 0 = off
    teacher: str | None = None
    teacher_epochs: int | None = None
    reorder: bool | None = None  # None: on (elastic runs before training, --plain runs after it)
    reorder_batches: int = 8
    # optimisation
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    batch_size: int = 32          # the GLOBAL batch: split evenly over the processes of a launched run
    group_by_length: bool = True  # batches of similar lengths (data.length_grouped): ~2x faster on short texts
    grad_accum: int = 1
    epochs: float = 3.0
    max_steps: int | None = None
    max_grad_norm: float = 1.0
    seed: int = 42
    mixed_precision: str = "no"
    cpu: bool = False
    # bookkeeping
    eval_every: int = 0
    eval_batch_size: int = 64
    save_every: int = 200
    log_every: int = 10
    quiet: bool = False
    progress_every: float = 30.0  # seconds between plain progress lines when the console is not a terminal
    report_to: str = "none"  # loggers of losses, lr and scores, comma-separated (REPORT_TO), into <run>/logs/

    @property
    def elastic(self) -> bool:
        return not self.plain

    def super_ce_for(self, gamma: float) -> float:
        """The CE weight of the super-network's own term: `--super-ce`, else α when a strong teacher teaches it
        (γ > 0: Eq. 1's balance of labels and teacher) and `SUPER_CE` when nothing else does (the labels are its
        only target, as in plain fine-tuning; Eq. 1's α there slows it, docs/architecture.md "Tuning")."""
        if self.super_ce is not None:
            return self.super_ce
        return self.alpha if gamma else SUPER_CE

    @property
    def use_reorder(self) -> bool:
        return True if self.reorder is None else bool(self.reorder)

    def report_targets(self) -> list[str]:
        """The `--report-to` loggers, in order, without `none`."""
        names = [n.strip().lower() for n in self.report_to.split(",") if n.strip()]
        return [n for n in dict.fromkeys(names) if n != "none"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TuneConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def fingerprint_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.to_dict().items()
             if k not in NOT_FINGERPRINTED and not (k in FINGERPRINTED_UNLESS and v == FINGERPRINTED_UNLESS[k])
             and not (self.plain and k in ELASTIC_ONLY)}
        d["reorder"] = self.use_reorder
        if self.super_ce is None and self.elastic:  # the default's value: a run made under another is not resumed
            d["super_ce"] = f"default: {SUPER_CE:g} without a teacher, alpha with one"
        return d

    def fingerprint(self, extra: dict[str, Any] | None = None) -> str:
        d = {"options": self.fingerprint_dict(), **(extra or {})}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def per_process_batch(self, processes: int) -> int:
        """`--batch-size` is the global batch, so that 1 and N processes train the same run (same data order,
        same steps, same checkpoint); each of `processes` takes an equal share of it, or this refuses in one line."""
        if processes > self.batch_size:
            raise InstatuneError(
                f"more processes ({processes}) than examples in a batch (--batch-size {self.batch_size}, the global "
                f"batch): raise --batch-size to a multiple of {processes} or launch fewer processes"
            )
        if self.batch_size % processes:
            lo = self.batch_size // processes * processes
            raise InstatuneError(
                f"--batch-size {self.batch_size} (the global batch) does not split evenly over {processes} "
                f"processes; use a multiple of {processes}, e.g. {lo} or {lo + processes}"
            )
        return self.batch_size // processes

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise InstatuneError(msg)

        need(self.task is not None or self.data is not None,
             "no data: pass --task (e.g. sst2) or --data DIR with train and dev files")
        need(self.max_length is None or self.max_length >= 8, f"--max-length must be at least 8, got {self.max_length}")
        need(self.num_subnets >= 1, f"--num-subnets must be at least 1, got {self.num_subnets}")
        need(self.sampling in SAMPLING, f"unknown --sampling {self.sampling!r}; use {' or '.join(SAMPLING)}")
        need(0.0 <= self.alpha <= 1.0, f"--alpha must be in [0, 1], got {self.alpha}")
        need(self.super_ce is None or self.super_ce > 0, f"--super-ce must be positive, got {self.super_ce}")
        need(0.0 <= self.super_warmup < 1.0, f"--super-warmup must be in [0, 1), got {self.super_warmup}")
        need(0.0 <= self.sub_ramp <= 1.0, f"--sub-ramp must be in [0, 1], got {self.sub_ramp}")
        need(self.grad_projection in PROJECTION,
             f"unknown --grad-projection {self.grad_projection!r}; use {', '.join(PROJECTION)}")
        need(self.temperature > 0, f"--temperature must be positive, got {self.temperature}")
        need(self.hidden_distill >= 0, f"--hidden-distill must be >= 0, got {self.hidden_distill}")
        need(self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(0.0 <= self.warmup_ratio < 1.0, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        need(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        need(self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}")
        need(self.epochs > 0, f"--epochs must be positive, got {self.epochs}")
        need(self.max_steps is None or self.max_steps >= 1, f"--max-steps must be at least 1, got {self.max_steps}")
        need(self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {self.max_grad_norm}")
        need(self.eval_every >= 0, f"--eval-every must be >= 0, got {self.eval_every}")
        need(self.save_every >= 0, f"--save-every must be >= 0, got {self.save_every}")
        need(self.log_every >= 1, f"--log-every must be at least 1, got {self.log_every}")
        need(self.progress_every >= 0, f"--progress-every must be >= 0, got {self.progress_every}")
        need(self.eval_batch_size >= 1, f"--eval-batch-size must be at least 1, got {self.eval_batch_size}")
        need(self.reorder_batches >= 1, f"--reorder-batches must be at least 1, got {self.reorder_batches}")
        need(self.mixed_precision in MIXED_PRECISION,
             f"unknown --mixed-precision {self.mixed_precision!r}; use {', '.join(MIXED_PRECISION)}")
        names = [n.strip().lower() for n in self.report_to.split(",") if n.strip()]
        bad = [n for n in names if n not in REPORT_TO]
        need(not bad, f"unknown --report-to {', '.join(bad)}; use {', '.join(REPORT_TO)} (comma-separated)")
        need(not ("none" in names and len(set(names)) > 1), f"--report-to none with others: {self.report_to!r}")
        need(self.val_split is None or self.val_data is None, "give either --val-split or --val-data, not both")
        need(self.metric is None or self.metric in METRICS,
             f"unknown --metric {self.metric!r}; use {', '.join(METRICS)}")

        glue = GLUE_TASKS.get(str(self.task or "").lower().replace("-", ""))
        if self.metric is not None and glue is not None:  # a task's kind is known before any data is read
            check_metric_kind(self.metric, glue.regression, f"--task {self.task}")
        if self.val_split is not None:
            parse_val_split(self.val_split)
        if self.plain:  # an elastic option on a plain run would be silently ignored (and is not fingerprinted)
            defaults = {f.name: f.default for f in fields(self)}
            moot = [f"--{k.replace('_', '-')}" for k in sorted(ELASTIC_ONLY) if getattr(self, k) != defaults[k]]
            is_, does, it = ("is", "does", "it") if len(moot) == 1 else ("are", "do", "them")
            need(not moot, f"{', '.join(moot)} {is_} for elastic runs and {does} nothing with --plain: drop {it}, "
                           "or drop --plain")
        need(self.teacher_epochs is None or self.teacher is not None, "--teacher-epochs needs --teacher")
        need(self.teacher_epochs is None or self.teacher_epochs >= 0,
             f"--teacher-epochs must be >= 0, got {self.teacher_epochs}")
