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

Checkpoints (`<output>.partial/checkpoints/step-NNNNNN/`, written to a `.tmp` sibling and renamed, only the
latest kept): model and optimizer tensors as safetensors, everything else (step, scheduler, optimizer
hyper-parameters, Python RNG, data position, timings) as JSON, torch RNG states as uint8 safetensors.
Nothing is pickled. At commit they are parked beside the output (`<output>.checkpoints/`, out of the manifest)
and deleted only once the run directory is in place; `--resume` takes them back from there (docs/architecture.md,
"Faults and resume").
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instatune_cli.artifacts import Heartbeat, fmt_seconds, fsync_tree, remove_own, writing
from instatune_cli.distributed import RankError, env_rank, env_world_size, from_accelerator, rank0_reports
from instatune_cli.errors import InstatuneError
from instatune_cli.seeds import seed_int
from instatune_cli.tune import recover
from instatune_cli.tune.config import TuneConfig

CKPT_DIR = "checkpoints"
PARKED = ".checkpoints"  # suffix of the sibling `<output>.checkpoints/` holding them during the commit
PARKED_KIND = "checkpoints"  # its `.instatune` marker: only a directory so marked is ever emptied or removed
RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
MODEL_DIR = "model"
CALIB_EXAMPLES = 512


@dataclass
class TuneResult:
    artifact: Any
    metrics: dict[str, Any]
    teacher_cache: str | None = None  # "built", "reused" or None (no teacher)
    resumed_from: int | None = None   # checkpoint step a --resume continued from
    log: list[dict[str, Any]] = field(default_factory=list)


# The family a run records (manifest `model.family`): the architecture's own, not the adapter's (one adapter
# serves BERT, RoBERTa and ELECTRA); model types missing here are their own family.
FAMILIES = {"xlm-roberta": "roberta", "camembert": "roberta"}


def model_family(model_type: str) -> str:
    model_type = model_type.removeprefix("instatune_")  # our per-layer classes (a recovered extract) are their family
    return FAMILIES.get(model_type, model_type)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ---- output directory ---------------------------------------------------------------------------------

def precheck_output(cfg: TuneConfig) -> None:
    """The StageWriter rules, checked before any heavy work so a refused run costs nothing."""
    from instatune_cli.artifacts import check_output, check_own_dir

    out = check_output(cfg.output, cfg.force, "tune", cfg.resume, tune_inputs(cfg))
    check_own_dir(parked_dir(out.with_name(out.name + ".partial")), PARKED_KIND, "the checkpoints of a commit")


def tune_inputs(cfg: TuneConfig) -> tuple[str | None, ...]:
    """What a tune run reads: never its output, nor inside it, nor around it (artifacts.check_not_input)."""
    return (cfg.model, cfg.data, cfg.eval_data, cfg.val_data, cfg.tokenizer, cfg.teacher, cfg.space)


# ---- checkpoints --------------------------------------------------------------------------------------

def parked_dir(partial: Path) -> Path:
    """`<output>.checkpoints`: where `Trainer.commit` keeps the checkpoints until the run directory is in place."""
    return partial.with_name(partial.name.removesuffix(".partial") + PARKED)


def unpark_checkpoints(partial: Path, fingerprint: str, resume: bool) -> None:
    """Bring back checkpoints an interrupted commit parked: those of this run when resuming, none otherwise."""
    from instatune_cli.artifacts import check_own_dir

    aside, live = parked_dir(partial), partial / CKPT_DIR
    if not check_own_dir(aside, PARKED_KIND, "the checkpoints of a commit"):
        return
    if resume:
        live.mkdir(exist_ok=True)
        for d in sorted(aside.iterdir()):
            if not (live / d.name).exists() and _checkpoint_fingerprint(d) == fingerprint:
                os.replace(d, live / d.name)
    shutil.rmtree(aside)


def worth_resuming(partial: Path) -> bool:
    """Whether a tune partial holds work `--resume` would use: a checkpoint, the teacher's logits cache, or
    checkpoints a commit parked. One without (a failed start, Ctrl-C before the first checkpoint) is removed."""
    return (latest_checkpoint(partial) is not None or (partial / "teacher_logits.safetensors").is_file()
            or parked_dir(partial).is_dir())


def _checkpoint_fingerprint(d: Path) -> str | None:
    try:
        return json.loads((d / "state.json").read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None


def latest_checkpoint(partial: Path) -> Path | None:
    d = partial / CKPT_DIR
    if not d.is_dir():
        return None
    done = sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and not p.name.endswith(".tmp") and (p / "state.json").is_file())
    return done[-1] if done else None


def _save_checkpoint(partial: Path, step: int, model: Any, optimizer: Any, scheduler: Any,
                     state: dict[str, Any], scaler: Any = None) -> Path:
    d = partial / CKPT_DIR
    final = d / f"step-{step:06d}"
    tmp = d / f"step-{step:06d}.tmp"
    try:
        with writing(f"the checkpoint of step {step}", tmp):
            d.mkdir(exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            _write_checkpoint(tmp, model, optimizer, scheduler, state, scaler)
            fsync_tree(tmp)  # on disk before it replaces the previous checkpoint
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a torn checkpoint only takes the space the next one needs
        raise
    for old in d.iterdir():
        if old != final and old.name.startswith("step-"):
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(tmp: Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any],
                      scaler: Any) -> None:
    import torch
    from safetensors.torch import save_file, save_model

    save_model(model, str(tmp / "model.safetensors"))
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    pyrng = random.getstate()
    full = dict(state)
    full.update(
        optimizer_param_groups=sd["param_groups"],
        optimizer_scalars=scalars,
        scheduler=scheduler.state_dict(),
        python_random=[pyrng[0], list(pyrng[1]), pyrng[2]],
        grad_scaler=scaler.state_dict() if scaler is not None else None,
    )
    (tmp / "state.json").write_text(json.dumps(full, indent=1, default=_json_default))


def _json_default(x: Any) -> Any:
    if isinstance(x, tuple):
        return list(x)
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"cannot store {type(x).__name__} in a checkpoint")


def _load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any = None) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file, load_model

    state = json.loads((path / "state.json").read_text())
    load_model(model, str(path / "model.safetensors"), strict=True)
    tensors = load_file(str(path / "optimizer.safetensors"))
    opt_state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[k] = v
    for pid, d in state["optimizer_scalars"].items():
        opt_state.setdefault(int(pid), {}).update(d)
    groups = state["optimizer_param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    pr = state["python_random"]
    random.setstate((pr[0], tuple(pr[1]), pr[2]))
    return state


# ---- log ----------------------------------------------------------------------------------------------

class JsonlLog:
    """Append-only JSONL; on resume, records past the checkpoint's step are dropped (they will be redone)."""

    def __init__(self, path: Path, keep_upto: int | None, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        if not enabled:
            return
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill
                if keep_upto is not None and int(rec.get("step", 0)) <= keep_upto:
                    self.records.append(rec)
        with writing("the training log", path), open(path, "w") as f:
            for rec in self.records:
                f.write(json.dumps(rec) + "\n")

    def write(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        if self.enabled:
            with writing("the training log", self.path), open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


# ---- the run ------------------------------------------------------------------------------------------

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


def run_tune(cfg: TuneConfig, console: Any = None, on_step: Callable[[int], None] | None = None) -> TuneResult:
    """Run (or resume) `instatune tune` and return the committed artifact. `on_step(step)` is called after
    every optimizer step (and after a checkpoint of that step), e.g. to stop a run in tests."""
    t_session = time.perf_counter()
    with rank0_reports(env_rank()):  # under a launcher: rank 0 prints the one line, the others exit quietly
        source = recover.from_extract(cfg)  # MODEL an extract: checked; data / --teacher parent from its run
        cfg.validate()
        cfg.per_process_batch(env_world_size())  # before any heavy work: the global batch must split evenly
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
        accelerator = Accelerator(
            cpu=cfg.cpu or _launched_without_gpu(), mixed_precision=cfg.mixed_precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.grad_accum),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=1))],
        )
        if accelerator.num_processes != env_world_size():
            raise InstatuneError(f"the launcher started {env_world_size()} processes but accelerate joined "
                                 f"{accelerator.num_processes} into one group ({accelerator.distributed_type}); "
                                 "pass --cpu to train on the CPUs, or check the launcher's environment")
        try:
            return Trainer(cfg, accelerator, inputs, console, on_step, t_session).run()
        finally:
            if accelerator.num_processes == 1:
                from accelerate.state import AcceleratorState, GradientState

                AcceleratorState._reset_state(True)
                GradientState._reset_state()


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
    from instatune_cli.tune.config import MIXED_PRECISION

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
    from instatune_cli.adapters import check_model_source, family_of
    from instatune_cli.measure.metrics import check_metric_kind, default_metric
    from instatune_cli.tune.teacher import check_teacher_labels, resolve_model_dir, teacher_config

    model_src, _ = resolve_model_dir(cfg.model)
    model_src = check_model_source(model_src)
    adapter = family_of(model_src)
    hf_config = adapter.load_config(model_src)
    dims0 = adapter.dims(hf_config)
    if adapter.modality != "text" and (cfg.hidden_distill or cfg.tokenizer):
        flag = "--hidden-distill" if cfg.hidden_distill else "--tokenizer"
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


class Trainer:
    """One tune run: the partial directory and fingerprint, teacher logits, model, optimizer, the step, the
    evaluation, checkpoints and the final artifact. State lives on the object; `run()` drives it.

    Determinism and the checkpoint format are described in the module docstring.
    """

    def __init__(self, cfg: TuneConfig, accelerator: Any, inputs: TuneInputs, console: Any,
                 on_step: Callable[[int], None] | None, t_session: float) -> None:
        self.cfg, self.acc, self.inp, self.on_step, self.t_session = cfg, accelerator, inputs, on_step, t_session
        self.adapter, self.space = inputs.adapter, inputs.space
        self.group = from_accelerator(accelerator)
        self.main = accelerator.is_main_process
        self.nproc, self.rank = accelerator.num_processes, accelerator.process_index
        # G: the global micro-batch (--batch-size), B: this process's slice of it; A: micro-batches per step
        self.G, self.A = cfg.batch_size, cfg.grad_accum
        self.B = cfg.per_process_batch(self.nproc)
        self.n_train = len(inputs.train_enc)
        self.micro_per_epoch = math.ceil(self.n_train / self.G)  # the same for every process count
        if self.micro_per_epoch < 1:
            raise InstatuneError(
                f"the training split has {self.n_train} examples, fewer than one global batch ({self.G}); "
                "lower --batch-size"
            )
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.micro_per_epoch / self.A))
        self.warmup = math.ceil(cfg.warmup_ratio * self.total_steps)
        # super-network warm-up (OFA's progressive shrinking, first phase): no sub-network before this step
        self.super_warmup_steps = math.ceil(cfg.super_warmup * self.total_steps) if cfg.elastic else 0
        self.steps_per_epoch = self.micro_per_epoch / self.A
        self.say = _Say(console, self.main and not cfg.quiet)
        self.console = console
        self.mode = "plain" if cfg.plain else f"elastic M={cfg.num_subnets} {cfg.sampling}"
        self.smallest = self.space.smallest()
        self._order: dict[int, list[int]] = {}
        self.t_logits: Any = None
        self.teacher_cache: str | None = None
        self.samples, self.train_time, self.prior_wall = 0, 0.0, 0.0
        self.start_step, self.ckpt_step = 0, None
        self.artifact: Any = None
        from instatune_cli.artifacts import StageWriter

        # only the main process opens it, and so holds the output's lock (artifacts.OutputLock)
        self.writer = StageWriter(Path(cfg.output), "tune", cfg.to_dict(), force=cfg.force, resume=cfg.resume,
                                  cleanup_on_error=False, inputs=tune_inputs(cfg), keep_if=worth_resuming)

    # ---- set-up ---------------------------------------------------------------------------------------
    def open_partial(self) -> None:
        """Fingerprint the run, open (or reopen) `<output>.partial`, refuse a partial of another run."""
        from instatune_cli.tune.teacher import cache_key

        cfg, inp = self.cfg, self.inp
        train_digest = inp.train_enc.digest()
        self.tkey = cache_key(inp.teacher_dir, train_digest, inp.max_length) if inp.teacher_dir else None
        src = inp.model_src
        self.model_id = str(Path(src).resolve()) if Path(src).exists() else src
        # "processes": 1 is a constant on purpose. Runs made when --batch-size was per process recorded their
        # process count here: their single-process partials (the same global batch) stay resumable, and a
        # multi-process one (another global batch under today's meaning) is refused. The process count itself
        # is not fingerprinted: a checkpoint resumes with any number of processes.
        fp_extra = {"model": self.model_id, "train": train_digest, "eval": inp.eval_enc.digest(),
                    "labels": inp.data.labels, "max_length": inp.max_length, "space": self.space.to_dict(),
                    "teacher": self.tkey, "processes": 1}
        if inp.val_enc is not None:
            fp_extra["val"] = inp.val_enc.digest()
        if inp.source is not None:
            fp_extra["extract"] = inp.source.digest
        self.fingerprint = cfg.fingerprint(fp_extra)
        partial, self.run_info, ckpt = self.group.agree(lambda: self._open_partial_main(fp_extra))
        self.partial = Path(partial)
        self.ckpt = Path(ckpt) if ckpt else None
        if self.ckpt is not None and not (self.ckpt / "state.json").is_file():
            raise RankError(f"process {self.rank} cannot see the checkpoint {self.ckpt} that rank 0 resumes from; "
                            "put --output on storage every node can read")
        keep = int(self.ckpt.name.split("-")[1]) if self.ckpt else 0
        self.log = JsonlLog(self.partial / LOG_FILE, keep_upto=keep, enabled=self.main)

    def _open_partial_main(self, fp_extra: dict[str, Any]) -> tuple[str, dict[str, Any], str | None]:
        """Rank 0's part of `open_partial`, the only one touching the directory: take the lock, check or record
        the fingerprint, bring parked checkpoints back, pick the one to resume. Returns (partial, run info,
        checkpoint or None) for every rank."""
        cfg = self.cfg
        self.writer.open()
        self.partial = self.writer.path
        run_file = self.partial / RUN_FILE
        if run_file.is_file():
            self.run_info = json.loads(run_file.read_text())
            if self.run_info.get("fingerprint") != self.fingerprint:
                old = self.run_info.get("options", {})
                new = cfg.fingerprint_dict()
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                what = ("options " + ", ".join("--" + k.replace("_", "-") for k in diff)) if diff else \
                    "model, data, labels, space or teacher"
                raise InstatuneError(
                    f"{self.partial} belongs to another run (its {what} differ); rerun with the same options to "
                    "resume, or pass --force without --resume to start over"
                )
        else:
            self.run_info = {"fingerprint": self.fingerprint, "options": cfg.fingerprint_dict(), "extra": fp_extra}
            self._write_run_info()
        unpark_checkpoints(self.partial, self.fingerprint, cfg.resume)
        ckpt = latest_checkpoint(self.partial) if cfg.resume else None
        if (self.partial / CKPT_DIR).is_dir():
            for p in (self.partial / CKPT_DIR).glob("*.tmp"):
                shutil.rmtree(p, ignore_errors=True)
        return str(self.partial), self.run_info, str(ckpt) if ckpt else None

    def _write_run_info(self) -> None:
        if self.main:
            with writing("the run's fingerprint", self.partial / RUN_FILE):
                (self.partial / RUN_FILE).write_text(json.dumps(self.run_info, indent=1, default=str))

    def load_teacher(self) -> None:
        """The strong teacher's logits over the training set, computed once (or read from the cache)."""
        from instatune_cli.tune.teacher import teacher_logits

        if not self.inp.teacher_dir:
            return
        cached = self.main and (self.partial / "teacher_logits.safetensors").exists()
        self.say(f"teacher: {'checking the cached logits' if cached else 'one pass over the training set'}"
                 f"{f' on {self.nproc} processes' if self.nproc > 1 and not cached else ''}")
        self.t_logits, built = teacher_logits(self.partial, self.inp.teacher_dir, self.inp.train_enc, self.tkey,
                                              self.cfg.eval_batch_size, self.acc.device, self._teacher_progress(),
                                              group=self.group)
        self.teacher_cache = "built" if built else "reused"
        self.say(f"teacher logits {self.teacher_cache} ({tuple(self.t_logits.shape)})")

    def _teacher_progress(self) -> Callable[[int], None]:
        """Plain lines during the teacher pass where no terminal shows the live bar (artifacts.Heartbeat)."""
        beat, n, seen = self.heartbeat(), len(self.inp.train_enc), [0]

        def progress(k: int) -> None:
            seen[0] += k
            beat.tick(lambda: f"tune: teacher pass, {seen[0]}/{n} training examples")

        return progress

    def heartbeat(self) -> Heartbeat:
        """Lines every `--progress-every` seconds when the console is not a terminal; silent otherwise."""
        plain = self.main and not self.cfg.quiet and not _console(self.console).is_terminal
        return Heartbeat(self.cfg.progress_every if plain else None)

    def build_model(self) -> None:
        """Load the classifier, make it elastic under the space's depth rule, reorder, optimizer, resume."""
        import torch
        from accelerate.utils import set_seed

        from instatune_cli.adapters import load_model

        cfg = self.cfg
        set_seed(cfg.seed)
        model = load_model(self.inp.model_src, id2label=self.inp.data.id2label)
        if self.inp.data.regression:  # one output; stock loaders and pipelines then read it as a score
            model.config.problem_type = "regression"
        self.adapter.make_elastic(model, self.space.depth)
        self.dims = self.adapter.dims_of(model)
        model.to(self.acc.device)
        self.reorder_info = self.run_info.get("reorder")
        if cfg.use_reorder and cfg.elastic and self.ckpt is None:
            self._reorder(model, "before training")
        decay = [p for _, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for _, p in model.named_parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(self.warmup, self.total_steps))
        # Only the optimizer goes through accelerate (mixed-precision grad scaling): a prepared model would be
        # wrapped in DDP, which all-reduces after every backward pass; `sync` does it once per step instead.
        # The forward passes run under `acc.autocast()` explicitly, training and evaluation alike.
        self.optimizer = self.acc.prepare_optimizer(optimizer)
        self.model = self.raw = model
        self.params = [p for p in model.parameters() if p.requires_grad]

    def _reorder(self, model: Any, when: str) -> None:
        """Sort heads and neurons by importance (docs/architecture.md, "Activating a sub-network"). An elastic run
        does it `before training`, so that every prefix it trains is the best one; a --plain run `after training`,
        on the fine-tuned weights (prune-after-fine-tuning: its search cuts the fine-tuned model's most important
        units, as any pruning method would). Either way the full network computes the same function, and the
        saved weights are in that order, so search, extract and export need nothing else."""
        # the first global batches, whole, on every rank: the importance a single process would compute (the
        # weights are then broadcast from rank 0, so ranks need not agree to the bit)
        nb = min(self.cfg.reorder_batches, self.micro_per_epoch)
        order0 = self.epoch_order(0)
        G = self.G
        batches = [{k: v.to(self.acc.device) for k, v in self.inp.train_enc.collate(order0[i * G:(i + 1) * G]).items()}
                   for i in range(nb)]
        info = self.adapter.reorder_by_importance(model, batches)
        model.zero_grad(set_to_none=True)
        self.reorder_info = {"method": info.get("method"), "batches": nb, "when": when,
                             "head_orders": info.get("head_orders")}
        self.run_info["reorder"] = self.reorder_info
        self._write_run_info()
        self.say(f"reordered heads and neurons by importance {when} ({self.reorder_info['method']}, {nb} batches)")

    def resume(self) -> None:
        if self.ckpt is not None:
            try:
                st = _load_checkpoint(self.ckpt, self.raw, self.optimizer, self.scheduler, self.acc.scaler)
                self.start_step, self.prior_wall = int(st["step"]), float(st["wall_s"])
                self.train_time, self.samples = float(st["train_time_s"]), int(st["samples"])
            except Exception as e:  # noqa: BLE001 - any damage (torn file, edited JSON, missing key) is one line
                raise InstatuneError(f"the checkpoint {self.ckpt} cannot be read ({_first_line(e)[:200]}); it is "
                                     "damaged: pass --force instead of --resume to start over") from None
            self.ckpt_step = self.start_step
            self.log.write({"event": "resume", "step": self.start_step})
            self.say(f"resumed from {self.ckpt.name} (step {self.start_step} of {self.total_steps})")
        elif not self.log.records:
            self.log.write({"event": "start", "step": 0, "total_steps": self.total_steps, "mode": self.mode,
                            "train_examples": self.n_train, "eval_examples": len(self.inp.eval_enc),
                            "val_examples": len(self.inp.val_enc) if self.inp.val_enc is not None else 0,
                            "processes": self.nproc})
        # every rank starts from rank 0's weights (what DDP does at construction): the reordering's importance
        # pass need not agree to the bit across devices, and the classifier's initialisation need not either
        self.group.broadcast_([*self.raw.parameters(), *self.raw.buffers()])

    def make_evaluators(self) -> None:
        from instatune_cli.measure.accuracy import Evaluator

        self.evaluators: dict[str, Any] = {}
        if not self.main:
            return
        bs, dev, metric, fam = self.cfg.eval_batch_size, self.acc.device, self.inp.metric, self.adapter
        self.evaluators["eval"] = Evaluator(self.raw, fam.eval_batches(self.inp.eval_enc, bs), dev, metric=metric)
        if self.inp.val_enc is not None:
            self.evaluators["val"] = Evaluator(self.raw, fam.eval_batches(self.inp.val_enc, bs), dev, metric=metric)

    # ---- data order -----------------------------------------------------------------------------------
    def epoch_order(self, e: int) -> list[int]:
        if e not in self._order:
            from instatune_cli import data as D

            self._order.clear()
            perm = list(range(self.n_train))
            rng = random.Random(seed_int("order", self.cfg.seed, e))
            rng.shuffle(perm)
            if self.cfg.group_by_length:
                lengths = self.inp.train_enc.lengths()
                perm = D.length_grouped(perm, lengths, self.G, rng)
            self._order[e] = perm
        return self._order[e]

    def global_micro(self, g: int) -> list[int]:
        """Example indices of global micro-batch `g` (all processes together): a function of the seed, the data
        and --batch-size only."""
        e, k = divmod(g, self.micro_per_epoch)
        return self.epoch_order(e)[k * self.G : (k + 1) * self.G]

    def micro(self, g: int) -> list[int]:
        """This process's slice of global micro-batch `g` (the whole of it on one process). A short last batch
        of an epoch leaves the last ranks fewer examples, or none."""
        return self.global_micro(g)[self.rank * self.B : (self.rank + 1) * self.B]

    # ---- one optimizer step ---------------------------------------------------------------------------
    def step(self, step: int) -> tuple[float, int, float, list[Any]]:
        """Forward/backward the super-network and this step's sub-networks over A micro-batches, average the
        gradients across processes once (`sync`), then apply. Returns (loss, samples, gamma, sub-networks)."""
        import torch

        from instatune_cli.tune import loss as L

        cfg = self.cfg
        torch.manual_seed(seed_int("dropout", cfg.seed, step, self.rank))
        epoch_now = (step * self.A) // self.micro_per_epoch
        gamma = 1.0 if self.inp.teacher_dir and (cfg.teacher_epochs is None or epoch_now < cfg.teacher_epochs) else 0.0
        w = L.LossWeights(cfg.alpha, cfg.temperature, gamma, cfg.super_ce_for(gamma))
        sampling = cfg.elastic and step >= self.super_warmup_steps
        subs = self.space.sample_many(random.Random(seed_int("subnets", cfg.seed, step)), cfg.num_subnets,
                                      cfg.sampling) if sampling else []
        losses: list[Any] = []
        step_samples = 0
        for a in range(self.A):
            glob = self.global_micro(step * self.A + a)
            idx = self.micro(step * self.A + a)
            step_samples += len(glob)
            if not idx:  # a short last batch left this rank nothing: it adds zeros to the average
                losses.append(0.0)
                continue
            losses.append(self._micro_step(idx, glob, w, gamma, subs))
        values = self.sync(losses)
        val = sum(values) / self.A
        if not math.isfinite(val):
            _nan_stop(val, step, self.partial, self.ckpt_step, cfg, self.log)
        if cfg.max_grad_norm > 0:
            self.acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return val, step_samples, gamma, subs

    def sync(self, losses: list[Any]) -> list[float]:
        """Average this step's gradients and loss terms across processes with ONE all-reduce (module docstring).

        The buffer holds every parameter's gradient (zeros where this rank produced none), one has-gradient flag
        per parameter and the A loss terms. A parameter no rank produced a gradient for keeps `grad = None`, as on
        one process, so AdamW skips it there too. Returns the A (averaged) loss terms as floats."""
        import torch

        if not self.group.active:
            return [float(x) for x in losses]
        ref = self.params[0]
        flags = torch.tensor([p.grad is not None for p in self.params], dtype=ref.dtype, device=ref.device)
        terms = torch.stack([torch.as_tensor(x, dtype=torch.float32).to(ref.device) for x in losses]).to(ref.dtype)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        if any(g.dtype != ref.dtype for g in grads):  # mixed parameter dtypes: not what tune builds
            raise InstatuneError("the model's parameters have several dtypes; multi-process tune needs one")
        self.group.average_([*grads, flags, terms])
        for p, f in zip(self.params, flags.tolist(), strict=True):
            if f == 0:
                p.grad = None
        return [float(x) for x in terms.tolist()]

    def _micro_step(self, idx: list[int], glob: list[int], w: Any, gamma: float, subs: list[Any]) -> Any:
        """Back-propagate the super-network's term, then each sub-network's (tune/loss.py), one graph at a time,
        on this rank's slice `idx` of the global micro-batch `glob`. Returns the weighted loss (detached).

        Every term is a mean over examples, so it is weighted by len(idx) / len(glob) x processes: averaged over
        the processes that gives the mean over the global batch, the single-process loss. The hidden-state term
        is a mean over real tokens and is weighted by this slice's share of them."""
        import torch

        from instatune_cli.tune import loss as L

        acc, raw, model = self.acc, self.raw, self.model
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
        acc.backward(term)  # accelerate divides by --grad-accum (its GradientAccumulationPlugin)
        total = term.detach().float()
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
            del s_hidden
            acc.backward(s_term)
            total = total + s_term.detach().float()
            del s_logits
        self.adapter.activate(raw, None)
        return total

    # ---- evaluation and checkpoints ---------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        """Super-network and smallest sub-network on the eval split (and the validation split if any): accuracy,
        and the task's metric as `super_[val_]<metric>` when it is not accuracy (e.g. `super_mcc`); a regressor
        has no accuracy and reports `super_[val_]mse` beside its correlation. `super_[val_]collapsed`: no better
        than a constant predictor (measure.metrics)."""
        out: dict[str, Any] = {}
        metric = self.inp.metric
        for split, ev in self.evaluators.items():
            pre = "" if split == "eval" else "val_"
            with self.acc.autocast():  # what a prepared model's forward did (a no-op without mixed precision)
                sup = ev.evaluate(None)
                small = ev.evaluate(self.smallest)
            beside = "mse" if self.inp.data.regression else "accuracy"
            out.update({f"super_{pre}{beside}": getattr(sup, beside),
                        f"smallest_{pre}{beside}": getattr(small, beside)})
            if metric != "accuracy":
                out.update({f"super_{pre}{metric}": sup.score, f"smallest_{pre}{metric}": small.score})
            out.update({f"super_{pre}collapsed": sup.collapsed, f"smallest_{pre}collapsed": small.collapsed})
            if split == "eval":
                out.update({"eval_loss": sup.loss, "smallest_eval_loss": small.loss})
        self.adapter.activate(self.raw, None)
        return out

    def scores_line(self, ev: dict[str, Any]) -> str:
        """`super mcc 0.4120 (acc 80.13%), smallest L3-h4-f384 mcc 0.1034 (acc 71.20%)`: the task's metric first,
        accuracy (a regressor: mse) beside it, `collapsed` where no better than a constant predictor."""
        metric = self.inp.metric
        beside = "mse" if self.inp.data.regression else ("acc" if metric != "accuracy" else "")
        key = {"mse": "mse", "acc": "accuracy"}.get(beside, "")

        def fmt(name: str, v: float) -> str:  # shares as percentages, as `search` prints them; the rest as numbers
            return f"{100 * v:.2f}%" if name in ("accuracy", "f1") else f"{v:.4f}"

        def one(who: str) -> str:
            shown = "acc" if metric == "accuracy" else metric
            text = f"{shown} {fmt(metric, ev[f'{who}_{metric}'])}"
            if beside:
                text += f" ({beside} {fmt(key, ev[f'{who}_{key}'])})"
            return text + (" collapsed" if ev.get(f"{who}_collapsed") else "")

        return f"super {one('super')}, smallest {self.smallest.name} {one('smallest')}"

    def checkpoint(self, done: int) -> None:
        """Rank 0 writes it (every rank holds the same state); the others wait for it (`Group.agree`), and
        leave with rank 0 if the write fails."""
        def save() -> None:
            _save_checkpoint(self.partial, done, self.raw, self.optimizer, self.scheduler, {
                "step": done, "micro": done * self.A, "epoch": (done * self.A) // self.micro_per_epoch,
                "batch_in_epoch": (done * self.A) % self.micro_per_epoch, "samples": self.samples,
                "train_time_s": self.train_time, "wall_s": self.prior_wall + time.perf_counter() - self.t_session,
                "fingerprint": self.fingerprint, "global_batch": self.G, "processes": self.nproc}, self.acc.scaler)

        self.group.agree(save)
        self.ckpt_step = done

    # ---- the run ----------------------------------------------------------------------------------------
    def run(self) -> TuneResult:
        try:
            with self.writer.faults("the tune run"):  # a refused write: one line, the partial kept for --resume
                return self._run()
        finally:
            self.writer.release()  # the output's lock, also when the run stops early (a crash, a kill in tests)

    def _run(self) -> TuneResult:
        cfg, inp = self.cfg, self.inp
        self.open_partial()
        val_n = len(inp.val_enc) if inp.val_enc is not None else 0
        self.say(f"[bold]tune[/] {cfg.model} ({model_family(inp.hf_config.model_type)}, "
                 f"{self.adapter.dims(inp.hf_config).num_layers} layers) on {inp.data.task}: {self.n_train} train "
                 f"/ {val_n} val / {len(inp.eval_enc)} eval, "
                 f"{'regression' if inp.data.regression else f'{len(inp.data.labels)} classes'}, {self.mode}"
                 f"{', teacher ' + cfg.teacher if cfg.teacher else ''}; {self.total_steps} steps -> {cfg.output}")
        if inp.source is not None:
            self.say(inp.source.summary())
        if self.main:  # what the data loader had to say (e.g. images skipped as unreadable), even with --quiet
            for note in inp.data.source.get("notes", []):
                print(f"notice: {note}", file=sys.stderr)
        self.load_teacher()
        self.build_model()
        self.resume()
        self.make_evaluators()
        self.train_loop()
        if cfg.plain and cfg.use_reorder:
            self._reorder(self.raw, "after training")
            self.group.broadcast_([*self.raw.parameters(), *self.raw.buffers()])
        return self.commit()

    def train_loop(self) -> None:
        cfg = self.cfg
        window: list[float] = []
        win_samples, win_time = 0, 0.0
        self.model.train()
        progress = _Progress(self.console, self.total_steps, self.start_step, enabled=self.main and not cfg.quiet,
                             beat=self.heartbeat())
        try:
            for step in range(self.start_step, self.total_steps):
                t0 = time.perf_counter()
                lr_now = self.scheduler.get_last_lr()[0]
                step_loss, step_samples, gamma, subs = self.step(step)
                dt = time.perf_counter() - t0
                self.train_time += dt
                self.samples += step_samples
                window.append(step_loss)
                win_samples += step_samples
                win_time += dt
                done = step + 1
                sps = win_samples / win_time if win_time > 0 else 0.0
                progress.update(done, step_loss, sps)
                if done % cfg.log_every == 0 or done == self.total_steps:
                    self.log.write({"event": "train", "step": done, "epoch": round(done / self.steps_per_epoch, 4),
                                    "loss": sum(window) / len(window), "lr": lr_now, "gamma": gamma,
                                    "samples_per_s": round(sps, 2), "subnets": [s.name for s in subs]})
                    window, win_samples, win_time = [], 0, 0.0
                if cfg.eval_every and done % cfg.eval_every == 0 and done < self.total_steps:
                    self.group.agree(lambda done=done: self._eval_note(done, progress))  # rank 0; the others wait
                    self.model.train()
                if cfg.save_every and done % cfg.save_every == 0 and done < self.total_steps:
                    self.checkpoint(done)
                if self.on_step is not None:
                    self.on_step(done)
        finally:
            progress.stop()

    def _eval_note(self, done: int, progress: _Progress) -> None:
        ev = self.evaluate()
        self.log.write({"event": "eval", "step": done, **ev})
        progress.note(f"step {done}: {self.scores_line(ev)}, eval loss {ev['eval_loss']:.4f}")

    def commit(self) -> TuneResult:
        """Final evaluation, then the run directory (model, space, splits, calibration sample, manifest), by rank 0;
        every rank returns its metrics (`Group.agree`)."""
        self.adapter.activate(self.raw, None)
        metrics = self.group.agree(self._commit_main)
        return TuneResult(self.artifact if self.main else None, metrics, self.teacher_cache,
                          self.start_step if self.ckpt is not None else None, self.log.records)

    def _commit_main(self) -> dict[str, Any]:
        cfg, inp, partial = self.cfg, self.inp, self.partial
        final = self.evaluate()
        wall = self.prior_wall + time.perf_counter() - self.t_session
        n_val = len(inp.val_enc) if inp.val_enc is not None else 0
        metrics = {**final, "smallest_subnet": self.smallest.name, "steps": self.total_steps,
                   "epochs": round(self.total_steps / self.steps_per_epoch, 4), "train_examples": self.n_train,
                   "val_examples": n_val, "eval_examples": len(inp.eval_enc), "wall_time_s": round(wall, 2),
                   "train_time_s": round(self.train_time, 2),
                   "samples_per_s": round(self.samples / self.train_time, 2) if self.train_time > 0 else None}
        self.log.write({"event": "final", "step": self.total_steps, **metrics})
        self._write_outputs(n_val)
        self._park_checkpoints()
        self.artifact = self.writer.commit(model=self._model_info(), metrics=metrics, extra=self._extra(n_val))
        remove_own(parked_dir(partial), PARKED_KIND)  # only now: the run directory is in place
        self.say(f"[green]done[/] {cfg.output}: {self.scores_line(metrics)}, {metrics['samples_per_s']} "
                 f"samples/s, {metrics['wall_time_s']} s")
        return metrics

    def _write_outputs(self, n_val: int) -> None:
        """The super-network, tokenizer, space and the three splits into the partial directory."""
        from instatune_cli import data as D

        cfg, inp, partial = self.cfg, self.inp, self.partial
        with writing("the tuned super-network", partial / MODEL_DIR):
            self.adapter.save(self.raw, inp.tok, partial / MODEL_DIR)
        with writing("the search space and the eval, validation and calibration splits", partial):
            (partial / "space.json").write_text(json.dumps(self.space.to_dict(), indent=2) + "\n")
            D.write_jsonl(partial / "eval.jsonl", inp.data.eval)
            if n_val:
                D.write_jsonl(partial / "val.jsonl", inp.data.val)
            calib = list(range(self.n_train))
            random.Random(seed_int("calib", cfg.seed)).shuffle(calib)
            D.write_jsonl(partial / "calib.jsonl", inp.data.train.subset(sorted(calib[:CALIB_EXAMPLES])))

    def _park_checkpoints(self) -> None:
        """Move the checkpoints out of the directory the manifest describes, but keep them until it is in place:
        a kill or a full disk during the commit then resumes from the last one, not from step 0."""
        from instatune_cli.artifacts import check_own_dir, mark_own

        live, aside = self.partial / CKPT_DIR, parked_dir(self.partial)
        if live.is_dir():
            if check_own_dir(aside, PARKED_KIND, "the checkpoints of a commit"):
                shutil.rmtree(aside)
            mark_own(live, PARKED_KIND)  # before the move: a parked directory is never without its marker
            os.replace(live, aside)

    def _model_info(self) -> dict[str, Any]:
        inp = self.inp
        return {
            "family": model_family(inp.hf_config.model_type), "adapter": self.adapter.family,
            "model_type": inp.hf_config.model_type, "base_checkpoint": self.cfg.model,
            "base_resolved": self.model_id, "task": inp.data.task, "labels": inp.data.labels,
            "num_labels": len(inp.data.labels), "dims": self.dims.to_dict(), "max_length": inp.max_length,
            "problem_type": "regression" if inp.data.regression else "single_label_classification",
            "text_pair": inp.data.eval.pairs is not None, "model_dir": MODEL_DIR, "elastic": self.cfg.elastic,
            "reorder": self.reorder_info, "metric": inp.metric, "depth_rule": self.space.depth,
            **({"source_extract": inp.source.record()} if inp.source is not None else {}),
        }

    def _extra(self, n_val: int) -> dict[str, Any]:
        cfg, inp = self.cfg, self.inp
        return {
            "space": self.space.to_dict(),
            "data": {**inp.data.source, "train_examples": self.n_train, "eval_examples": len(inp.eval_enc),
                     "eval_file": "eval.jsonl", "val_file": "val.jsonl" if n_val else None, "val_examples": n_val,
                     "calib_file": "calib.jsonl", "calib_examples": min(CALIB_EXAMPLES, self.n_train)},
            "training": {"mode": "plain" if cfg.plain else "elastic", "num_subnets": cfg.num_subnets,
                         "sampling": cfg.sampling, "alpha": cfg.alpha, "temperature": cfg.temperature,
                         "super_ce": cfg.super_ce_for(0.0), "super_ce_with_teacher": cfg.super_ce_for(1.0),
                         "super_warmup_steps": self.super_warmup_steps,
                         "hidden_distill": cfg.hidden_distill,
                         "teacher": cfg.teacher, "teacher_epochs": cfg.teacher_epochs,
                         "teacher_cache": "teacher_logits.safetensors" if inp.teacher_dir else None,
                         "total_steps": self.total_steps, "warmup_steps": self.warmup, "processes": self.nproc,
                         "global_batch": self.G * self.A, "per_process_batch": self.B,
                         "mixed_precision": cfg.mixed_precision, "fingerprint": self.fingerprint},
        }


def _nan_stop(val: float, step: int, partial: Path, ckpt_step: int | None, cfg: TuneConfig, log: JsonlLog) -> None:
    log.write({"event": "nan", "step": step + 1, "loss": str(val)})
    kept = (f"the last good checkpoint (step {ckpt_step}) is kept in {partial / CKPT_DIR}" if ckpt_step
            else f"no checkpoint was written yet (--save-every {cfg.save_every})")
    raise InstatuneError(
        f"loss became {val} at step {step + 1}; stopped without applying it and {kept}; lower --lr or check "
        "the data, then start over with --force"
    )


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


def _console(console: Any) -> Any:
    if console is None:
        from rich.console import Console

        console = Console(highlight=False)
    return console


class _Progress:
    """Rich progress bar with loss and samples/s on a terminal; elsewhere (a log file, `nohup`, CI) a plain
    line every `--progress-every` seconds from `beat`; silent when disabled."""

    def __init__(self, console: Any, total: int, start: int, enabled: bool, beat: Heartbeat | None = None) -> None:
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        self.enabled = enabled
        self.beat = beat or Heartbeat(None)
        self.p: Any = None
        if not enabled:
            return
        self.console = _console(console)
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
