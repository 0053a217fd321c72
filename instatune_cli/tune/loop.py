"""The tune loop: elastic (InstaTune) or plain fine-tuning on `accelerate`, resumable and deterministic.

Determinism: the training order of epoch e is a permutation drawn from `random.Random((seed, e))` (with
`group_by_length`, regrouped into batches of similar lengths by the same generator, `data.length_grouped`); the
sub-networks of optimizer step s come from `random.Random((seed, s))` and dropout from
`torch.manual_seed(f(seed, s, process))` set at the start of the step. Every process therefore draws the
same sub-networks, and the state of a run after step s is a function of (options, data, s): a run resumed
from a checkpoint ends with the same weights as one that never stopped.

Multi-process (`torchrun` / `accelerate launch`, `instatune_cli.distributed`): `--batch-size` is the GLOBAL
batch and the data order, the steps per epoch and the checkpoints depend on it alone, never on the process
count, so N processes train the run one process would (and a checkpoint resumes with another N). Rank p takes
the p-th equal slice of each global micro-batch; its loss terms are weighted by its share of the global batch
times N (its share of the real tokens for `--hidden-distill`, a per-token mean), so the average of the ranks'
gradients is the single-process gradient, also for a short last batch where a rank may get no example. The
model is not wrapped in DDP: each network's term is back-propagated separately (see `tune.loss`) into local
gradients and, after all A x (M+1) backward passes of the step, ONE all-reduce over a flat buffer averages
every gradient and the step's loss terms (`Trainer.sync`); DDP would all-reduce after each backward pass. The
parameters are broadcast from rank 0 after loading, reordering and resuming (what DDP does at construction).
Rank 0 alone reads and writes files, logs and shows progress; the others learn its decisions
(`Group.agree`). Dropout masks are drawn per rank (`torch.manual_seed(f(seed, step, rank))`), so with dropout
runs on different process counts agree in distribution, not bit for bit; without it they agree to float
rounding.

Checkpoints (`<output>.partial/checkpoints/step-NNNNNN/`, tune/checkpoint.py; written to a `.tmp` sibling and
renamed, only the latest kept): model and optimizer tensors as safetensors, the `TrainerState` (step, samples,
data position, timings, evaluations: tune/state.py) and everything else (scheduler, optimizer
hyper-parameters, Python RNG) as JSON, torch RNG states as uint8 safetensors. Nothing is pickled. At commit
they are parked beside the output (`<output>.checkpoints/`, out of the manifest) and deleted only once the run
directory is in place; `--resume` takes them back from there (docs/architecture.md, "Faults and resume").

Structure (docs/architecture.md, "Tuning"): `run_tune` resolves the inputs and the `TrainPlan`, opens the
`RunDirectory` (tune/rundir.py: lock, partial, fingerprint, log, commit) and hands both to a `Trainer`. The
Trainer builds the model, then its loop steps it and raises events (tune/callbacks.py) that the JSONL log, the
progress display, the `--report-to` loggers and `on_step` listen to; its counters are one `TrainerState`.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instatune_cli.adapters import check_model_source, family_of, load_model, model_family
from instatune_cli.distributed import (
    end_accelerator,
    env_rank,
    env_world_size,
    forget_accelerate,
    from_accelerator,
    group_up,
    rank0_reports,
)
from instatune_cli.errors import InstatuneError
from instatune_cli.measure.metrics import check_metric_kind, default_metric
from instatune_cli.seeds import seed_int
from instatune_cli.tune import loss as L
from instatune_cli.tune import recover
from instatune_cli.tune.callbacks import (
    CallbackHandler,
    JsonlLogCallback,
    OnStepCallback,
    ProgressCallback,
    StepOutput,
    TrainerCallback,
    heartbeat,
    reporters,
)
from instatune_cli.tune.checkpoint import (  # noqa: F401 - re-exported: the names tests and benches use
    CKPT_DIR,
    PARKED,
    PARKED_KIND,
    latest_checkpoint,
    load_checkpoint,
    parked_dir,
    save_checkpoint,
    unpark_checkpoints,
    worth_resuming,
)
from instatune_cli.tune.config import DEFAULT_MAX_LENGTH, MIXED_PRECISION, TuneConfig
from instatune_cli.tune.evaluation import Evaluation
from instatune_cli.tune.order import BatchOrder
from instatune_cli.tune.projection import GradientProjection
from instatune_cli.tune.rundir import (  # noqa: F401 - re-exported
    CALIB_EXAMPLES,
    LOG_FILE,
    MODEL_DIR,
    RUN_FILE,
    JsonlLog,
    RunDirectory,
    RunIdentity,
    precheck_output,
    tune_inputs,
)
from instatune_cli.tune.state import SessionClock, TrainerControl, TrainerState, TrainPlan
from instatune_cli.tune.teacher import (
    CACHE_FILE,
    check_teacher_labels,
    resolve_model_dir,
    shared_cache_file,
    teacher_config,
    teacher_logits,
)


@dataclass
class TuneResult:
    artifact: Any
    metrics: dict[str, Any]
    teacher_cache: str | None = None  # "built", "reused" or None (no teacher)
    resumed_from: int | None = None   # checkpoint step a --resume continued from
    log: list[dict[str, Any]] = field(default_factory=list)


# The family a run records (manifest `model.family`) is the architecture's own, not the adapter's (one adapter
# serves BERT, RoBERTa and ELECTRA): `adapters.model_family`, which reads the families' alias tables.


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    def f(s: int) -> float:
        if s < warmup:
            return s / max(1, warmup)
        return max(0.0, (total - s) / max(1, total - warmup))

    return f


@dataclass
class TuneInputs:
    """What `run_tune` resolved before training: data, tokenizer, model source and family, space, teacher."""

    data: Any                 # data.TaskData (train / val / eval)
    tok: Any
    max_length: int
    model_src: str
    adapter: Any
    space: Any
    train_enc: Any
    eval_enc: Any
    val_enc: Any              # None without a validation split
    teacher_dir: str | None
    hf_config: Any
    metric: str
    source: Any = None        # tune/recover.ExtractSource when MODEL is an extract (recovery fine-tuning)


def run_tune(cfg: TuneConfig, console: Any = None, on_step: Callable[[int], None] | None = None,
             callbacks: Sequence[TrainerCallback] = ()) -> TuneResult:
    """Run (or resume) `instatune tune` and return the committed artifact. `on_step(step)` is called after
    every optimizer step (and after a checkpoint of that step), e.g. to stop a run in tests; `callbacks` listen
    to the loop's events (tune/callbacks.py)."""
    session = SessionClock.start()
    with rank0_reports(env_rank()):  # under a launcher: rank 0 prints the one line, the others exit quietly
        source = recover.from_extract(cfg)  # MODEL an extract: checked; data / --teacher parent from its run
        if cfg.max_length is None:  # not given (a recovery run took its parent's above): the default, recorded
            cfg.max_length = DEFAULT_MAX_LENGTH
        cfg.validate()
        cfg.per_process_batch(env_world_size())  # before any heavy work: the global batch must split evenly
        listeners = [*reporters(cfg.report_targets()), *callbacks]  # a missing logger package: one line, now
        if on_step is not None:
            listeners.append(OnStepCallback(on_step))
        launcher_precision(cfg)
        if env_rank() == 0:  # only rank 0 touches the output: another rank's probe of the lock would race its take
            precheck_output(cfg)
        inputs = _resolve_inputs(cfg, source)

        from datetime import timedelta

        from accelerate import Accelerator
        from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

        # No DDP wrapper and so no DistributedDataParallelKwargs: the loop averages the gradients itself, once
        # per step (module docstring). The plugin pins accelerate's accumulation to --grad-accum: its
        # `backward` divides each loss by it, whatever ACCELERATE_GRADIENT_ACCUMULATION_STEPS says. The other
        # ranks wait while rank 0 alone evaluates and writes (--eval-every, checkpoints, the final commit): an
        # hour, not NCCL's 10 minutes, so a large eval split cannot time them out (a dead rank is caught by
        # the launcher at once, not by this timeout).
        owned = not group_up()  # accelerate sets the group up below; torn down after the run (end_accelerator)
        accelerator = Accelerator(
            cpu=cfg.cpu or _launched_without_gpu(), mixed_precision=cfg.mixed_precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.grad_accum),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=1))],
        )
        if accelerator.num_processes != env_world_size():
            raise InstatuneError(f"the launcher started {env_world_size()} processes but accelerate joined "
                                 f"{accelerator.num_processes} into one group ({accelerator.distributed_type}); "
                                 "pass --cpu to train on the CPUs, or check the launcher's environment")
        single = accelerator.num_processes == 1
        try:
            result = _train(cfg, accelerator, inputs, console, listeners, session)
        finally:
            if single:
                forget_accelerate()
        if not single and owned:
            end_accelerator(accelerator)
        return result


def _train(cfg: TuneConfig, accelerator: Any, inputs: TuneInputs, console: Any, callbacks: list[TrainerCallback],
           session: SessionClock) -> TuneResult:
    """Plan the run, open its directory (the output's lock is released whatever happens), train and commit."""
    plan = TrainPlan.of(cfg, len(inputs.train_enc), accelerator.num_processes)
    run_dir = RunDirectory(cfg, from_accelerator(accelerator), accelerator.is_main_process,
                           accelerator.process_index)
    try:
        with run_dir.writer.faults("the tune run"):  # a refused write: one line, the partial kept for --resume
            run_dir.open(RunIdentity.of(cfg, inputs))
            return Trainer(cfg, accelerator, inputs, plan, run_dir, console, callbacks, session).run()
    finally:
        for cb in callbacks:
            cb.close()
        run_dir.writer.release()  # the output's lock, also when the run stops early (a crash, a kill in tests)


def _launched_without_gpu() -> bool:
    """Launched on several processes where torch sees no GPU: accelerate joins CPU processes into one gloo group
    only when told `cpu=True`; without it every process would train alone and all would write one output."""
    if env_world_size() <= 1:
        return False
    import torch

    return not torch.cuda.is_available()


def launcher_precision(cfg: TuneConfig) -> None:
    """`accelerate launch --mixed_precision X` (or its config file) sets ACCELERATE_MIXED_PRECISION; instatune
    passes --mixed-precision to accelerate explicitly, which would silently override it. Adopt the launcher's
    choice when --mixed-precision was left at "no" (it is then recorded in the run like the option), refuse a
    contradiction in one line."""
    env = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if not env or env == "no" or env == cfg.mixed_precision:
        return

    if env not in MIXED_PRECISION:
        raise InstatuneError(f"accelerate launch asks for mixed precision {env}; instatune tune supports "
                             f"{', '.join(MIXED_PRECISION)}: relaunch with one of those")
    if cfg.mixed_precision == "no":
        cfg.mixed_precision = env
        return
    raise InstatuneError(f"accelerate launch asks for mixed precision {env} but --mixed-precision is "
                         f"{cfg.mixed_precision}; make them agree (or drop one)")


def _resolve_inputs(cfg: TuneConfig, source: Any = None) -> TuneInputs:
    """Every input check that needs no training, cheapest first, so a bad teacher, space or tokenizer fails before
    the data is loaded and tokenized: model, teacher, space, tokenizer, data and validation split, labels."""
    model_src, _ = resolve_model_dir(cfg.model)
    model_src = check_model_source(model_src)
    adapter = family_of(model_src)
    hf_config = adapter.load_config(model_src)
    dims0 = adapter.dims(hf_config)
    flag = "--hidden-distill" if cfg.hidden_distill and not adapter.hidden_states else \
        "--tokenizer" if cfg.tokenizer and not adapter.separate_preprocessor else None
    if flag:
        raise InstatuneError(f"{flag} is for text models; {cfg.model} is a {adapter.family} ({adapter.modality}) "
                             "model: drop the option")
    teacher_dir, teacher_cfg = teacher_config(cfg.teacher, adapter.family, dims0.vocab_size,
                                              dims0.image_size) if cfg.teacher \
        else (None, None)
    space = recover.space_for(cfg.space, dims0, hf_config)  # SearchSpace.resolve, or a per-layer model's own
    space.check_model(dims0)
    tok_src = resolve_model_dir(cfg.tokenizer)[0] if cfg.tokenizer else model_src
    tok = adapter.load_preprocessor(tok_src)
    max_length = adapter.max_length(cfg.max_length, tok, hf_config, dims0)
    if source:
        source.check_encoding(cfg, max_length)

    data = adapter.load_data(source.data_config(cfg) if source else cfg)
    if source:
        source.check_labels(data.labels)
    if teacher_cfg is not None:
        check_teacher_labels(str(cfg.teacher), teacher_cfg, data.labels)
    has_val = data.val is not None and len(data.val)
    metric = check_metric_kind(cfg.metric or default_metric(data.task, data.regression), data.regression,
                               f"the data of {data.task}")
    return TuneInputs(
        data=data, tok=tok, max_length=max_length, model_src=model_src, adapter=adapter, space=space,
        train_enc=adapter.encode(tok, data.train, max_length, train=True),
        eval_enc=adapter.encode(tok, data.eval, max_length),
        val_enc=adapter.encode(tok, data.val, max_length) if has_val else None,
        teacher_dir=teacher_dir, hf_config=hf_config, metric=metric, source=source,
    )


@dataclass
class Network:
    """The model a run trains and what steps it (built by `Trainer.build_model`)."""

    model: Any         # the elastic classifier, not wrapped (see `Trainer.sync`)
    optimizer: Any     # AdamW, prepared by accelerate (mixed-precision grad scaling)
    scheduler: Any     # linear warm-up and decay
    params: list[Any]  # the trainable parameters, in the order `sync` averages them
    dims: Any          # space.ModelDims of the model


@dataclass
class StepResult:
    """One optimizer step's mean loss (averaged over processes) and its parts, examples, teacher weight and
    sub-networks."""

    loss: float
    super_loss: float
    sub_loss: float | None
    samples: int
    gamma: float
    subs: list[Any]
    grad_norm: float | None = None  # the summed gradient's norm before clipping (None: --max-grad-norm 0)
    grad_cos: float | None = None   # cosine of the super-network's and sub-networks' gradients (--grad-projection)


class _Window:
    """The losses and throughput since the last `train` log record; the super-network's own term apart, so a
    log shows whether it is the super-network or its sub-networks that stall."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.supers: list[float] = []
        self.norms: list[float] = []
        self.cosines: list[float] = []
        self.samples, self.seconds = 0, 0.0

    def add(self, res: StepResult, seconds: float) -> float:
        """Count a step; returns the samples/s since the last record."""
        self.losses.append(res.loss)
        self.supers.append(res.super_loss)
        if res.grad_norm is not None and math.isfinite(res.grad_norm):  # fp16's skipped steps: an infinite norm
            self.norms.append(res.grad_norm)
        if res.grad_cos is not None and math.isfinite(res.grad_cos):
            self.cosines.append(res.grad_cos)
        self.samples += res.samples
        self.seconds += seconds
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def mean(self) -> float:
        return sum(self.losses) / len(self.losses)

    def super_mean(self) -> float:
        return sum(self.supers) / len(self.supers)

    def norm_fields(self) -> dict[str, float]:
        """The gradient norms before clipping: their mean and the largest (a spike shows where a run went
        unstable, as the loss jumps of docs/architecture.md "Tuning" did; none when clipping is off), and under
        --grad-projection the two gradients' mean cosine and the share of conflicting steps."""
        out = {}
        if self.norms:
            out = {"grad_norm": round(sum(self.norms) / len(self.norms), 4), "grad_norm_max": round(max(self.norms), 4)}
        if self.cosines:  # --grad-projection: how much the sub-networks pull against the super-network
            out["grad_cos"] = round(sum(self.cosines) / len(self.cosines), 4)
            out["grad_conflict"] = round(sum(c < 0 for c in self.cosines) / len(self.cosines), 4)
        return out


class Trainer:
    """One tune run on an opened `RunDirectory`: the constructor loads the teacher's logits, builds and resumes
    the model; `run()` trains (`train`: the loop, its events and `TrainerState`) and commits. Determinism and
    the checkpoint format are described in the module docstring."""

    def __init__(self, cfg: TuneConfig, accelerator: Any, inputs: TuneInputs, plan: TrainPlan, run_dir: RunDirectory,
                 console: Any = None, callbacks: Sequence[TrainerCallback] = (), session: SessionClock | None = None
                 ) -> None:
        self.cfg, self.acc, self.inp, self.plan, self.run_dir = cfg, accelerator, inputs, plan, run_dir
        self.adapter, self.space = inputs.adapter, inputs.space
        self.group = run_dir.group
        self.main = accelerator.is_main_process
        self.nproc, self.rank = accelerator.num_processes, accelerator.process_index
        # G: the global micro-batch (--batch-size), B: this process's slice of it; A: micro-batches per step
        self.G, self.A, self.B = plan.global_batch, plan.accum, plan.per_process
        self.session = SessionClock.start() if session is None else session
        self.prior_wall = 0.0  # wall seconds of the run's earlier sessions (from the checkpoint resumed)
        self.prior_cpu = 0.0   # CPU seconds of those sessions
        self.cpu_is_lower_bound = False  # resumed from a checkpoint that counted only its training steps' CPU
        self.say = _Say(console, self.main and not cfg.quiet)
        self.console = console
        self.mode = "plain" if cfg.plain else f"elastic M={cfg.num_subnets} {cfg.sampling}"
        self.smallest = self.space.smallest()
        self.order = BatchOrder(inputs.train_enc, plan, cfg.seed, cfg.group_by_length, self.rank)
        self.state = TrainerState(total_steps=plan.total_steps, fingerprint=run_dir.fingerprint,
                                  global_batch=plan.global_batch, processes=self.nproc)
        self.control = TrainerControl()
        self.progress = ProgressCallback(console)
        self.callbacks = CallbackHandler([JsonlLogCallback(), self.progress, *callbacks])
        self.saved_step: int | None = None    # the last checkpoint's step, in this session or the one resumed
        self.resumed_from: int | None = None  # the checkpoint step this session continued from
        self.artifact: Any = None
        # set-up, in this order: each part needs the one before (the reordering writes run.json, resuming
        # overwrites the weights, the evaluators hold the model)
        self.announce()
        self.t_logits, self.teacher_cache = self.load_teacher()
        self.net = self.build_model()
        self.resume()
        self.evaluation = Evaluation(self.adapter, self.net.model, inputs, self.smallest, cfg.eval_batch_size,
                                     accelerator.device, accelerator.autocast, self.main)

    # ---- set-up ---------------------------------------------------------------------------------------
    def announce(self) -> None:
        cfg, inp = self.cfg, self.inp
        val_n = len(inp.val_enc) if inp.val_enc is not None else 0
        self.say(f"[bold]tune[/] {cfg.model} ({model_family(inp.hf_config.model_type)}, "
                 f"{self.adapter.dims(inp.hf_config).num_layers} layers) on {inp.data.task}: {self.plan.n_train} "
                 f"train / {val_n} val / {len(inp.eval_enc)} eval, "
                 f"{'regression' if inp.data.regression else f'{len(inp.data.labels)} classes'}, {self.mode}"
                 f"{', teacher ' + cfg.teacher if cfg.teacher else ''}; {self.plan.total_steps} steps -> "
                 f"{cfg.output}")
        if inp.source is not None:
            self.say(inp.source.summary())
        if self.main:  # what the data loader had to say (e.g. images skipped as unreadable), even with --quiet
            for note in [*inp.data.source.get("notes", []), *(inp.source.notes if inp.source else [])]:
                print(f"notice: {note}", file=sys.stderr)

    def load_teacher(self) -> tuple[Any, str | None]:
        """The strong teacher's logits over the training set, computed once (or read from the cache), and
        whether the cache was "built" or "reused"; (None, None) without a teacher."""
        if not self.inp.teacher_dir:
            return None, None
        partial = self.run_dir.partial
        assert self.run_dir.identity is not None
        key = self.run_dir.identity.teacher_key
        shared = shared_cache_file(key, self.acc.device)
        cached = self.main and ((partial / CACHE_FILE).exists() or (shared is not None and shared.exists()))
        self.say(f"teacher: {'checking the cached logits' if cached else 'one pass over the training set'}"
                 f"{f' on {self.nproc} processes' if self.nproc > 1 and not cached else ''}")
        logits, built = teacher_logits(partial, self.inp.teacher_dir, self.inp.train_enc, key,
                                       self.cfg.eval_batch_size, self.acc.device,
                                       self._teacher_progress(), group=self.group,
                                       on_wait=lambda: self.say("teacher: another run is computing the same logits "
                                                                "into the shared cache; waiting for it"))
        cache = "built" if built else "reused"
        self.say(f"teacher logits {cache} ({tuple(logits.shape)})")
        return logits, cache

    def _teacher_progress(self) -> Callable[[int], None]:
        """Plain lines during the teacher pass where no terminal shows the live bar (artifacts.Heartbeat)."""
        beat, n, seen = heartbeat(self.console, self.cfg, self.main), len(self.inp.train_enc), [0]

        def progress(k: int) -> None:
            seen[0] += k
            beat.tick(lambda: f"tune: teacher pass, {seen[0]}/{n} training examples")

        return progress

    def build_model(self) -> Network:
        """Load the classifier, make it elastic under the space's depth rule, reorder, optimizer."""
        import torch
        from accelerate.utils import set_seed

        cfg = self.cfg
        set_seed(cfg.seed)
        model = load_model(self.inp.model_src, id2label=self.inp.data.id2label)
        if self.inp.data.regression:  # one output; stock loaders and pipelines then read it as a score
            model.config.problem_type = "regression"
        self.adapter.make_elastic(model, self.space.depth)
        dims = self.adapter.dims_of(model)
        model.to(self.acc.device)
        if cfg.use_reorder and cfg.elastic and self.run_dir.resume_from is None:
            self._reorder(model, "before training")
        decay = [p for _, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for _, p in model.named_parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                      _linear_schedule(self.plan.warmup, self.plan.total_steps))
        # Only the optimizer goes through accelerate (mixed-precision grad scaling): a prepared model would be
        # wrapped in DDP, which all-reduces after every backward pass; `sync` does it once per step instead.
        # The forward passes run under `acc.autocast()` explicitly, training and evaluation alike.
        return Network(model=model, optimizer=self.acc.prepare_optimizer(optimizer), scheduler=scheduler,
                       params=[p for p in model.parameters() if p.requires_grad], dims=dims)

    def _reorder(self, model: Any, when: str) -> None:
        """Sort heads and neurons by importance (docs/architecture.md, "Activating a sub-network"). An elastic run
        does it `before training`, so that every prefix it trains is the best one; a --plain run `after training`,
        on the fine-tuned weights (prune-after-fine-tuning: its search cuts the fine-tuned model's most important
        units, as any pruning method would). Either way the full network computes the same function, and the
        saved weights are in that order, so search, extract and export need nothing else."""
        # the first global batches, whole, on every rank: the importance a single process would compute (the
        # weights are then broadcast from rank 0, so ranks need not agree to the bit)
        nb = min(self.cfg.reorder_batches, self.plan.micro_per_epoch)
        order0 = self.order.epoch(0)
        G = self.G
        batches = [{k: v.to(self.acc.device) for k, v in self.inp.train_enc.collate(order0[i * G:(i + 1) * G]).items()}
                   for i in range(nb)]
        info = self.adapter.reorder_by_importance(model, batches)
        model.zero_grad(set_to_none=True)
        self.run_dir.record_reorder({"method": info.get("method"), "batches": nb, "when": when,
                                     "head_orders": info.get("head_orders")})
        self.say(f"reordered heads and neurons by importance {when} ({info.get('method')}, {nb} batches)")

    def resume(self) -> None:
        """Continue from the run directory's checkpoint, if any: weights, optimizer, RNGs and `TrainerState`.
        Then every rank starts from rank 0's weights."""
        ckpt = self.run_dir.resume_from
        if ckpt is not None:
            net = self.net
            try:
                state = load_checkpoint(ckpt, net.model, net.optimizer, net.scheduler, self.acc.scaler)
            except InstatuneError:
                raise
            except Exception as e:  # noqa: BLE001 - any damage (torn file, edited JSON, missing key) is one line
                raise InstatuneError(f"the checkpoint {ckpt} cannot be read ({_first_line(e)[:200]}); it is "
                                     "damaged: pass --force instead of --resume to start over") from None
            if state.last_eval is None:  # a checkpoint from before TrainerState: its evaluations are in the log
                self._replay_evaluations(state)
            state.total_steps, state.processes = self.plan.total_steps, self.nproc
            self.state, self.prior_wall = state, state.wall_s
            self.cpu_is_lower_bound = state.cpu_s is None
            self.prior_cpu = state.cpu_time_s if state.cpu_s is None else state.cpu_s
            self.saved_step = self.resumed_from = state.step
            self.say(f"resumed from {ckpt.name} (step {state.step} of {self.plan.total_steps})")
        # every rank starts from rank 0's weights (what DDP does at construction): the reordering's importance
        # pass need not agree to the bit across devices, and the classifier's initialisation need not either
        self.group.broadcast_([*self.net.model.parameters(), *self.net.model.buffers()])

    def _replay_evaluations(self, state: TrainerState) -> None:
        assert self.run_dir.log is not None
        for rec in self.run_dir.log.records:
            if rec.get("event") == "eval" and int(rec["step"]) <= state.step:
                scores = {k: v for k, v in rec.items() if k not in ("event", "step")}
                state.record_eval(int(rec["step"]), scores, self.inp.metric, self.inp.val_enc is not None)

    def wall(self) -> float:
        """Wall seconds of the run so far, every session."""
        return self.prior_wall + self.session.wall()

    def cpu(self) -> float:
        """This process's CPU seconds of the run so far, every session."""
        return self.prior_cpu + self.session.cpu()

    # ---- one optimizer step ---------------------------------------------------------------------------
    def step(self, step: int) -> StepResult:
        """Forward/backward the super-network and this step's sub-networks over A micro-batches, average the
        gradients across processes once (`sync`), then apply."""
        import torch

        cfg, net = self.cfg, self.net
        torch.manual_seed(seed_int("dropout", cfg.seed, step, self.rank))
        epoch_now = (step * self.A) // self.plan.micro_per_epoch
        gamma = 1.0 if self.inp.teacher_dir and (cfg.teacher_epochs is None or epoch_now < cfg.teacher_epochs) else 0.0
        w = L.LossWeights(cfg.alpha, cfg.temperature, gamma, cfg.super_ce_for(gamma))
        sampling = cfg.elastic and step >= self.plan.super_warmup_steps
        subs = self.space.sample_many(random.Random(seed_int("subnets", cfg.seed, step)), cfg.num_subnets,
                                      cfg.sampling) if sampling else []
        totals: list[Any] = []
        supers: list[Any] = []
        proj = GradientProjection(net.params, cfg.grad_projection) if subs and cfg.grad_projection != "none" else None
        step_samples = 0
        for a in range(self.A):
            glob = self.order.global_micro(step * self.A + a)
            idx = self.order.micro(step * self.A + a)
            step_samples += len(glob)
            if not idx:  # a short last batch left this rank nothing: it adds zeros to the average
                totals.append(0.0)
                supers.append(0.0)
                continue
            total, sup = self._micro_step(idx, glob, w, gamma, subs, self.plan.sub_weight(step), proj)
            totals.append(total)
            supers.append(sup)
        # one buffer: averaging is element-wise, the totals as before
        values = self.sync([*totals, *supers], proj.super_grads() if proj else [])
        cos = proj.combine() if proj else None
        val = sum(values[:self.A]) / self.A
        if not math.isfinite(val):
            self.run_dir.nan_stop(val, step, self.saved_step)
        norm = None
        if cfg.max_grad_norm > 0:
            norm = float(self.acc.clip_grad_norm_(net.params, cfg.max_grad_norm))
        net.optimizer.step()
        net.scheduler.step()
        net.optimizer.zero_grad(set_to_none=True)
        super_loss = sum(values[self.A:]) / self.A
        return StepResult(val, super_loss, val - super_loss if subs else None, step_samples, gamma, subs, norm, cos)

    def sync(self, losses: list[Any], extra: list[Any]) -> list[float]:
        """Average this step's gradients and loss terms across processes with ONE all-reduce (module docstring).

        The buffer holds every parameter's gradient (zeros where this rank produced none), one has-gradient flag
        per parameter, `extra` tensors (the super-network's own gradients under --grad-projection) and the step's loss
        terms. A parameter no rank produced a gradient for keeps `grad = None`, as on
        one process, so AdamW skips it there too. Returns the (averaged) loss terms as floats."""
        import torch

        if not self.group.active:
            return [float(x) for x in losses]
        ref = self.net.params[0]
        flags = torch.tensor([p.grad is not None for p in self.net.params], dtype=ref.dtype, device=ref.device)
        terms = torch.stack([torch.as_tensor(x, dtype=torch.float32).to(ref.device) for x in losses]).to(ref.dtype)
        for p in self.net.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.net.params] + list(extra)
        if any(g.dtype != ref.dtype for g in grads):  # mixed parameter dtypes: not what tune builds
            raise InstatuneError("the model's parameters have several dtypes; multi-process tune needs one")
        self.group.average_([*grads, flags, terms])
        for p, f in zip(self.net.params, flags.tolist(), strict=True):
            if f == 0:
                p.grad = None
        return [float(x) for x in terms.tolist()]

    def _micro_step(self, idx: list[int], glob: list[int], w: Any, gamma: float, subs: list[Any],
                    sub_weight: float, proj: GradientProjection | None) -> tuple[Any, Any]:
        """Back-propagate the super-network's term, then each sub-network's (tune/loss.py) times `sub_weight`
        (`--sub-ramp`), one graph at a time, on this rank's slice `idx` of the global micro-batch `glob`. Returns
        the weighted loss and the super-network's term of it (detached). With `proj` the super-network's gradient
        goes to its own accumulator (tune/projection.py).

        Every term is a mean over examples, so it is weighted by len(idx) / len(glob) x processes: averaged over
        the processes that gives the mean over the global batch, the single-process loss. The hidden-state term
        is a mean over real tokens and is weighted by this slice's share of them."""
        import torch

        acc = self.acc
        raw = model = self.net.model
        batch = self.inp.train_enc.collate(idx)
        labels = batch.pop("labels").to(acc.device)
        batch = self.adapter.model_inputs(raw, batch)
        tl = self.t_logits[torch.tensor(idx)].to(acc.device) if (gamma and self.t_logits is not None) else None
        share = len(idx) / len(glob) * self.nproc  # exactly 1.0 on one process
        beta = self.cfg.hidden_distill if subs else 0.0
        tok_share = 1.0
        if beta and self.nproc > 1:
            lengths = self.inp.train_enc.lengths()
            tok_share = sum(lengths[i] for i in idx) / sum(lengths[i] for i in glob) * self.nproc

        def weighted(t: Any, k: float) -> Any:
            return t if k == 1.0 else t * k  # multiplying by 1.0 would not change a bit; skipping is clearer

        self.adapter.activate(raw, None)
        with acc.autocast():
            logits, hidden = self.adapter.forward(model, batch, hidden_states=bool(beta))
        term = L.plain_loss(logits, labels, w, tl) if self.cfg.plain else L.super_term(logits, labels, w, tl)
        term = weighted(term, share)
        if proj is not None:
            proj.to_super()
        acc.backward(term)  # accelerate divides by --grad-accum (its GradientAccumulationPlugin)
        if proj is not None:
            proj.to_subs()
        total = sup_term = term.detach().float()
        sup = logits.detach()
        sup_hidden = tuple(h.detach() for h in hidden) if beta and hidden is not None else None
        del logits, hidden
        mask = batch["attention_mask"].float() if beta else None
        for sub in subs:
            self.adapter.activate(raw, sub)
            with acc.autocast():
                s_logits, s_hidden = self.adapter.forward(model, batch, hidden_states=bool(beta))
            s_term = weighted(L.sub_term(s_logits, labels, sup, w, tl), share)
            if beta:
                kept = self.adapter.kept_layers(raw, sub)
                s_term = s_term + weighted(beta * L.hidden_distill(s_hidden, sup_hidden, kept, mask), tok_share)
            s_term = weighted(s_term, sub_weight)
            del s_hidden
            acc.backward(s_term)
            total = total + s_term.detach().float()
            del s_logits
        self.adapter.activate(raw, None)
        return total, sup_term

    # ---- the loop ---------------------------------------------------------------------------------------
    def run(self) -> TuneResult:
        """Train, reorder a --plain run's fine-tuned weights, commit."""
        self.train()
        if self.cfg.plain and self.cfg.use_reorder:
            model = self.net.model
            self._reorder(model, "after training")
            self.group.broadcast_([*model.parameters(), *model.buffers()])
        return self.commit()

    def train(self) -> None:
        """Step from `state.step` to the last step. After each: `on_step_end`, then what `control` asks (log,
        evaluate, checkpoint, with their events), then `on_step_complete` (tune/callbacks.py)."""
        cfg, plan, state, control, events = self.cfg, self.plan, self.state, self.control, self.callbacks
        window = _Window()
        self.net.model.train()
        events.on_train_begin(self, state, control)
        try:
            while state.step < state.total_steps:
                t0, c0 = time.perf_counter(), time.process_time()
                lr = self.net.scheduler.get_last_lr()[0]
                res = self.step(state.step)
                dt = time.perf_counter() - t0
                state.advance(plan, res.samples, dt, time.process_time() - c0)
                sps = window.add(res, dt)
                control.decide(cfg, state)
                events.on_step_end(self, state, control, StepOutput(
                    loss=res.loss, super_loss=res.super_loss, sub_loss=res.sub_loss, lr=lr, gamma=res.gamma,
                    subs=res.subs, samples=res.samples, seconds=dt, samples_per_s=sps, grad_norm=res.grad_norm))
                if control.should_log:
                    events.on_log(self, state, control, {
                        "event": "train", "step": state.step, "epoch": round(state.step / plan.steps_per_epoch, 4),
                        "loss": window.mean(), "super_loss": window.super_mean(), **window.norm_fields(),
                        "lr": lr, "gamma": res.gamma,
                        "samples_per_s": round(sps, 2),
                        "subnets": [s.name for s in res.subs]})
                    window = _Window()
                if control.should_evaluate:
                    self.evaluate()
                    self.net.model.train()
                if control.should_save:
                    self.checkpoint()
                events.on_step_complete(self, state, control)
        finally:
            self.progress.close()

    def evaluate(self) -> dict[str, Any]:
        """A mid-run evaluation: rank 0 scores (`_evaluate_main`), the others wait and keep its scores too."""
        scores = self.group.agree(self._evaluate_main)
        if not self.main:
            self._record(scores)
        return scores

    def _evaluate_main(self, final: bool = False) -> dict[str, Any]:
        """Score the super-network and the smallest sub-network, keep them in the state, raise `on_evaluate`."""
        scores = self.evaluation.evaluate()
        self._record(scores)
        self.callbacks.on_evaluate(self, self.state, self.control, scores, final)
        return scores

    def _record(self, scores: dict[str, Any]) -> None:
        self.state.record_eval(self.state.step, scores, self.inp.metric, self.inp.val_enc is not None)

    def checkpoint(self) -> None:
        """Rank 0 writes it (every rank holds the same state); the others wait for it (`Group.agree`), and
        leave with rank 0 if the write fails."""
        net, state = self.net, self.state

        def save() -> str:
            state.wall_s, state.cpu_s = self.wall(), self.cpu()
            return str(save_checkpoint(self.run_dir.partial, net.model, net.optimizer, net.scheduler, state,
                                       self.acc.scaler))

        path = Path(self.group.agree(save))
        self.saved_step = state.step
        self.callbacks.on_save(self, state, self.control, path)

    # ---- the run directory ------------------------------------------------------------------------------
    def commit(self) -> TuneResult:
        """Final evaluation, then the run directory (model, space, splits, calibration sample, manifest), by rank 0;
        every rank returns its metrics (`Group.agree`)."""
        self.adapter.activate(self.net.model, None)
        metrics = self.group.agree(self._commit_main)
        assert self.run_dir.log is not None
        return TuneResult(self.artifact if self.main else None, metrics, self.teacher_cache, self.resumed_from,
                          self.run_dir.log.records)

    def _commit_main(self) -> dict[str, Any]:
        cfg, inp, plan, state = self.cfg, self.inp, self.plan, self.state
        final = self._evaluate_main(final=True)  # inside `commit`'s Group.agree already
        state.wall_s, state.cpu_s = self.wall(), self.cpu()
        n_val = len(inp.val_enc) if inp.val_enc is not None else 0
        train_time = state.train_time_s
        metrics = {**final, "smallest_subnet": self.smallest.name, "steps": plan.total_steps,
                   "epochs": round(plan.total_steps / plan.steps_per_epoch, 4), "train_examples": plan.n_train,
                   "val_examples": n_val, "eval_examples": len(inp.eval_enc), "wall_time_s": round(state.wall_s, 2),
                   "train_time_s": round(train_time, 2), "cpu_s": round(state.cpu_s, 2),
                   **({"cpu_s_lower_bound": True} if self.cpu_is_lower_bound else {}),
                   "samples_per_s": round(state.samples / train_time, 2) if train_time > 0 else None}
        self.callbacks.on_train_end(self, state, self.control, metrics)
        self.run_dir.write_outputs(self.adapter, self.net.model, inp, self.space, cfg.seed)
        self.artifact = self.run_dir.commit(model=self._model_info(), metrics=metrics, extra=self._extra(n_val))
        self.say(f"[green]done[/] {cfg.output}: {self.evaluation.scores_line(metrics)}, {metrics['samples_per_s']} "
                 f"samples/s, {metrics['wall_time_s']} s")
        return metrics

    def _model_info(self) -> dict[str, Any]:
        inp = self.inp
        assert self.run_dir.identity is not None
        return {
            "family": model_family(inp.hf_config.model_type), "adapter": self.adapter.family,
            "model_type": inp.hf_config.model_type, "base_checkpoint": self.cfg.model,
            "base_resolved": self.run_dir.identity.model_id, "task": inp.data.task, "labels": inp.data.labels,
            "num_labels": len(inp.data.labels), "dims": self.net.dims.to_dict(), "max_length": inp.max_length,
            "problem_type": "regression" if inp.data.regression else "single_label_classification",
            "text_pair": inp.data.eval.pairs is not None, "model_dir": MODEL_DIR, "elastic": self.cfg.elastic,
            "reorder": self.run_dir.reorder, "metric": inp.metric, "depth_rule": self.space.depth,
            **({"source_extract": inp.source.record()} if inp.source is not None else {}),
        }

    def _extra(self, n_val: int) -> dict[str, Any]:
        cfg, inp = self.cfg, self.inp
        return {
            "space": self.space.to_dict(),
            "data": {**inp.data.source, "train_examples": self.plan.n_train, "eval_examples": len(inp.eval_enc),
                     "eval_file": "eval.jsonl", "val_file": "val.jsonl" if n_val else None, "val_examples": n_val,
                     "calib_file": "calib.jsonl", "calib_examples": min(CALIB_EXAMPLES, self.plan.n_train)},
            "training": {"mode": "plain" if cfg.plain else "elastic", "num_subnets": cfg.num_subnets,
                         "sampling": cfg.sampling, "alpha": cfg.alpha, "temperature": cfg.temperature,
                         "super_ce": cfg.super_ce_for(0.0), "super_ce_with_teacher": cfg.super_ce_for(1.0),
                         "super_warmup_steps": self.plan.super_warmup_steps,
                         "sub_ramp_steps": self.plan.sub_ramp_steps,
                         "hidden_distill": cfg.hidden_distill,
                         "teacher": cfg.teacher, "teacher_epochs": cfg.teacher_epochs,
                         "teacher_cache": "teacher_logits.safetensors" if inp.teacher_dir else None,
                         "total_steps": self.plan.total_steps, "warmup_steps": self.plan.warmup,
                         "processes": self.nproc,
                         "global_batch": self.G * self.A, "per_process_batch": self.B,
                         "mixed_precision": cfg.mixed_precision, "fingerprint": self.run_dir.fingerprint},
        }


class _Say:
    def __init__(self, console: Any, enabled: bool) -> None:
        self.enabled = enabled
        if enabled and console is None:
            from rich.console import Console

            console = Console(highlight=False)
        self.console = console

    def __call__(self, msg: str) -> None:
        if self.enabled:
            self.console.print(msg, soft_wrap=True)
