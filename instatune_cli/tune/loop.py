"""The tune loop: elastic (InstaTune) or plain fine-tuning on `accelerate`, resumable and deterministic.

Determinism: the training order of epoch e is a permutation drawn from `random.Random((seed, e))`; the
sub-networks of optimizer step s come from `random.Random((seed, s))` and dropout from
`torch.manual_seed(f(seed, s, process))` set at the start of the step. Every process therefore draws the
same sub-networks, and the state of a run after step s is a function of (options, data, s): a run resumed
from a checkpoint ends with the same weights as one that never stopped.

Multi-process (`accelerate launch`): a global batch is `--batch-size` x processes; process p takes its slice.
Each network's loss term is back-propagated separately (see `tune.loss`), with `no_sync` on all but the
last micro-batch of a gradient-accumulation group, and `find_unused_parameters` because a sub-network
skips layers.

Checkpoints (`<output>.partial/checkpoints/step-NNNNNN/`, written to a `.tmp` sibling and renamed, only the
latest kept): model and optimizer tensors as safetensors, everything else (step, scheduler, optimizer
hyper-parameters, Python RNG, data position, timings) as JSON, torch RNG states as uint8 safetensors.
Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instatune_cli.errors import InstatuneError
from instatune_cli.seeds import seed_int
from instatune_cli.tune.config import TuneConfig

CKPT_DIR = "checkpoints"
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


_seed_int = seed_int


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ---- output directory ---------------------------------------------------------------------------------

def precheck_output(cfg: TuneConfig) -> None:
    """The StageWriter rules, checked before any heavy work so a refused run costs nothing."""
    out = Path(cfg.output)
    tmp = out.with_name(out.name + ".partial")
    if out.exists() and not cfg.force:
        raise InstatuneError(f"{out} already exists; pass --force to replace it or choose another --output")
    if tmp.exists():
        marker = tmp / ".stage"
        if cfg.resume:
            if marker.is_file() and marker.read_text().strip() != "tune":
                raise InstatuneError(
                    f"{tmp} holds a {marker.read_text().strip()!r} run, not 'tune'; cannot resume it"
                )
        elif not cfg.force:
            raise InstatuneError(
                f"an unfinished tune run is in {tmp}; pass --resume to continue it or --force to start over"
            )


# ---- checkpoints --------------------------------------------------------------------------------------

def latest_checkpoint(partial: Path) -> Path | None:
    d = partial / CKPT_DIR
    if not d.is_dir():
        return None
    done = sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and not p.name.endswith(".tmp") and (p / "state.json").is_file())
    return done[-1] if done else None


def _save_checkpoint(partial: Path, step: int, model: Any, optimizer: Any, scheduler: Any,
                     state: dict[str, Any], scaler: Any = None) -> Path:
    import torch
    from safetensors.torch import save_file, save_model

    d = partial / CKPT_DIR
    d.mkdir(exist_ok=True)
    final = d / f"step-{step:06d}"
    tmp = d / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
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
    os.replace(tmp, final)
    for old in d.iterdir():
        if old != final and old.name.startswith("step-"):
            shutil.rmtree(old, ignore_errors=True)
    return final


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
        with open(path, "w") as f:
            for rec in self.records:
                f.write(json.dumps(rec) + "\n")

    def write(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


# ---- the run ------------------------------------------------------------------------------------------

def _load_tokenizer(src: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src)
    except Exception as e:  # noqa: BLE001 - missing/garbled tokenizer files raise many types
        raise InstatuneError(f"cannot load a tokenizer from {src} ({_first_line(e)}); pass --tokenizer") from None
    if not getattr(tok, "is_fast", False):
        raise InstatuneError(f"the tokenizer of {src} is not a fast tokenizer; instatune needs tokenizer.json")
    return tok


def _effective_max_length(cfg: TuneConfig, tok: Any, config: Any, dims: Any) -> int:
    n = cfg.max_length
    tml = getattr(tok, "model_max_length", None)
    if isinstance(tml, int) and 0 < tml < 1_000_000:
        n = min(n, tml)
    offset = 2 if config.model_type in ("roberta", "xlm-roberta", "camembert") else 0
    if dims.max_positions:
        n = min(n, dims.max_positions - offset)
    return n


def _linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    def f(s: int) -> float:
        if s < warmup:
            return s / max(1, warmup)
        return max(0.0, (total - s) / max(1, total - warmup))

    return f


def run_tune(cfg: TuneConfig, console: Any = None, on_step: Callable[[int], None] | None = None) -> TuneResult:
    """Run (or resume) `instatune tune` and return the committed artifact. `on_step(step)` is called after
    every optimizer step (and after a checkpoint of that step), e.g. to stop a run in tests."""
    t_session = time.perf_counter()
    cfg.validate()
    precheck_output(cfg)

    from instatune_cli import data as D
    from instatune_cli.adapters import adapter_for, check_model_source
    from instatune_cli.tune.teacher import resolve_model_dir

    model_src, _ = resolve_model_dir(cfg.model)
    model_src = check_model_source(model_src)
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(model_src)
    except (OSError, ValueError) as e:
        raise InstatuneError(f"cannot load model {cfg.model!r}: {_first_line(e)}") from None
    adapter = adapter_for(hf_config.model_type)
    dims0 = adapter.dims(hf_config)

    data = D.load_task_data(cfg.task, cfg.data, cfg.eval_data, cfg.text_column, cfg.text_pair_column,
                            cfg.label_column, cfg.limit_train, cfg.limit_eval)
    tok_src = resolve_model_dir(cfg.tokenizer)[0] if cfg.tokenizer else model_src
    tok = _load_tokenizer(tok_src)
    max_length = _effective_max_length(cfg, tok, hf_config, dims0)

    teacher_dir = None
    if cfg.teacher:
        from instatune_cli.tune.teacher import check_teacher

        teacher_dir = check_teacher(cfg.teacher, adapter.family, data.labels, dims0.vocab_size)

    from instatune_cli.space import SearchSpace

    space = SearchSpace.resolve(cfg.space, dims0)
    space.check_model(dims0)

    train_enc = D.tokenize(tok, data.train, max_length)
    eval_enc = D.tokenize(tok, data.eval, max_length)

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    accelerator = Accelerator(
        cpu=cfg.cpu, mixed_precision=cfg.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.elastic)],
    )
    try:
        return _train(cfg, accelerator, console, on_step, t_session, data, tok, max_length, model_src,
                      adapter, space, train_enc, eval_enc, teacher_dir, hf_config)
    finally:
        if accelerator.num_processes == 1:
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(True)
            GradientState._reset_state()


def _train(cfg: TuneConfig, accelerator: Any, console: Any, on_step: Any, t_session: float, data: Any,
           tok: Any, max_length: int, model_src: str, adapter: Any, space: Any, train_enc: Any, eval_enc: Any,
           teacher_dir: str | None, hf_config: Any) -> TuneResult:
    import torch
    from accelerate.utils import set_seed

    from instatune_cli import data as D
    from instatune_cli.adapters import load_classifier
    from instatune_cli.artifacts import StageWriter
    from instatune_cli.measure.accuracy import Evaluator
    from instatune_cli.tune import loss as L
    from instatune_cli.tune.teacher import cache_key, teacher_logits

    main = accelerator.is_main_process
    nproc, rank = accelerator.num_processes, accelerator.process_index
    B, A = cfg.batch_size, cfg.grad_accum
    G = B * nproc
    n_train = len(train_enc)
    micro_per_epoch = n_train // G if nproc > 1 else math.ceil(n_train / G)
    if micro_per_epoch < 1:
        raise InstatuneError(
            f"the training split has {n_train} examples, fewer than one global batch ({G}); lower --batch-size"
        )
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro_per_epoch / A))
    warmup = math.ceil(cfg.warmup_ratio * total_steps)

    # ---- fingerprint and the partial directory ----
    train_digest = train_enc.digest()
    tkey = cache_key(teacher_dir, train_digest, max_length) if teacher_dir else None
    model_id = str(Path(model_src).resolve()) if Path(model_src).exists() else model_src
    fp_extra = {"model": model_id, "train": train_digest, "eval": eval_enc.digest(), "labels": data.labels,
                "max_length": max_length, "space": space.to_dict(), "teacher": tkey, "processes": nproc}
    fingerprint = cfg.fingerprint(fp_extra)
    writer = StageWriter(Path(cfg.output), "tune", cfg.to_dict(), force=cfg.force, resume=cfg.resume,
                         cleanup_on_error=False)
    if main:
        partial = writer.open()
    accelerator.wait_for_everyone()
    partial = writer.path
    run_file = partial / RUN_FILE
    run_info: dict[str, Any] = {}
    if run_file.is_file():
        run_info = json.loads(run_file.read_text())
        if run_info.get("fingerprint") != fingerprint:
            old = run_info.get("options", {})
            new = cfg.fingerprint_dict()
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            what = ("options " + ", ".join("--" + k.replace("_", "-") for k in diff)) if diff else \
                "model, data, labels, space or teacher"
            raise InstatuneError(
                f"{partial} belongs to another run (its {what} differ); rerun with the same options to resume, "
                "or pass --force without --resume to start over"
            )
    else:
        run_info = {"fingerprint": fingerprint, "options": cfg.fingerprint_dict(), "extra": fp_extra}
        if main:
            run_file.write_text(json.dumps(run_info, indent=1, default=str))
    ckpt = latest_checkpoint(partial) if cfg.resume else None
    if main:
        for p in (partial / CKPT_DIR).glob("*.tmp") if (partial / CKPT_DIR).is_dir() else []:
            shutil.rmtree(p, ignore_errors=True)
    log = JsonlLog(partial / LOG_FILE, keep_upto=int(ckpt.name.split("-")[1]) if ckpt else 0, enabled=main)

    say = _Say(console, main and not cfg.quiet)
    mode = "plain" if cfg.plain else f"elastic M={cfg.num_subnets} {cfg.sampling}"
    say(f"[bold]tune[/] {cfg.model} ({adapter.family}, {adapter.dims(hf_config).num_layers} layers) on "
        f"{data.task}: {n_train} train / {len(eval_enc)} eval, {len(data.labels)} classes, {mode}"
        f"{', teacher ' + cfg.teacher if cfg.teacher else ''}; {total_steps} steps -> {cfg.output}")

    # ---- teacher logits, once ----
    t_logits = None
    teacher_cache = None
    if teacher_dir:
        with accelerator.main_process_first():
            cached = (partial / "teacher_logits.safetensors").exists()
            say(f"teacher: {'checking the cached logits' if cached else 'one pass over the training set'}")
            t_logits, built = teacher_logits(partial, teacher_dir, train_enc, tkey, cfg.eval_batch_size,
                                             accelerator.device)
        teacher_cache = "built" if built else "reused"
        say(f"teacher logits {teacher_cache} ({tuple(t_logits.shape)})")

    # ---- model ----
    set_seed(cfg.seed)
    model = load_classifier(model_src, id2label=data.id2label)
    adapter.make_elastic(model, space.depth)
    dims = adapter.dims(model.config)
    model.to(accelerator.device)

    def epoch_order(e: int, _cache: dict[int, list[int]] = {}) -> list[int]:  # noqa: B006 - per-call cache
        if e not in _cache:
            _cache.clear()
            perm = list(range(n_train))
            random.Random(_seed_int("order", cfg.seed, e)).shuffle(perm)
            _cache[e] = perm
        return _cache[e]

    def micro(g: int) -> tuple[list[int], int]:
        e, k = divmod(g, micro_per_epoch)
        glob = epoch_order(e)[k * G : (k + 1) * G]
        return glob[rank * B : (rank + 1) * B] if nproc > 1 else glob, e

    reorder_info = run_info.get("reorder")
    if cfg.use_reorder and ckpt is None:
        nb = min(cfg.reorder_batches, micro_per_epoch)
        order0 = epoch_order(0)
        batches = [{k: v.to(accelerator.device) for k, v in train_enc.collate(order0[i * B:(i + 1) * B]).items()}
                   for i in range(nb)]
        info = adapter.reorder_by_importance(model, batches)
        reorder_info = {"method": info.get("method"), "batches": nb, "head_orders": info.get("head_orders")}
        run_info["reorder"] = reorder_info
        if main:
            run_file.write_text(json.dumps(run_info, indent=1, default=str))
        say(f"reordered heads and neurons by importance ({reorder_info['method']}, {nb} batches)")

    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(warmup, total_steps))
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)

    start_step, prior_wall, prior_train_time, samples = 0, 0.0, 0.0, 0
    if ckpt is not None:
        st = _load_checkpoint(ckpt, raw, optimizer, scheduler, accelerator.scaler)
        start_step, prior_wall = int(st["step"]), float(st["wall_s"])
        prior_train_time, samples = float(st["train_time_s"]), int(st["samples"])
        log.write({"event": "resume", "step": start_step})
        say(f"resumed from {ckpt.name} (step {start_step} of {total_steps})")
    elif not log.records:
        log.write({"event": "start", "step": 0, "total_steps": total_steps, "mode": mode,
                   "train_examples": n_train, "eval_examples": len(eval_enc)})

    evaluator = Evaluator(raw, D.eval_batches(eval_enc, cfg.eval_batch_size), accelerator.device) if main else None
    smallest = space.smallest()

    def evaluate() -> dict[str, Any]:
        assert evaluator is not None
        sup = evaluator.evaluate(None)
        small = evaluator.evaluate(smallest)
        adapter.activate(raw, None)
        return {"super_accuracy": sup.accuracy, "smallest_accuracy": small.accuracy, "eval_loss": sup.loss,
                "smallest_eval_loss": small.loss}

    steps_per_epoch = micro_per_epoch / A
    ckpt_step = start_step if ckpt is not None else None
    train_time = prior_train_time
    window: list[float] = []
    win_samples, win_time = 0, 0.0
    model.train()
    progress = _Progress(console, total_steps, start_step, enabled=main and not cfg.quiet)
    try:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            torch.manual_seed(_seed_int("dropout", cfg.seed, step, rank))
            epoch_now = (step * A) // micro_per_epoch
            gamma = 1.0 if teacher_dir and (cfg.teacher_epochs is None or epoch_now < cfg.teacher_epochs) else 0.0
            w = L.LossWeights(cfg.alpha, cfg.temperature, gamma)
            subs = space.sample_many(random.Random(_seed_int("subnets", cfg.seed, step)), cfg.num_subnets,
                                     cfg.sampling) if cfg.elastic else []
            step_loss = 0.0
            step_samples = 0
            for a in range(A):
                idx, _ = micro(step * A + a)
                batch = {k: v.to(accelerator.device) for k, v in train_enc.collate(idx).items()}
                labels = batch.pop("labels")
                tl = t_logits[torch.tensor(idx)].to(accelerator.device) if (gamma and t_logits is not None) else None
                sync = a == A - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    adapter.activate(raw, None)
                    with accelerator.autocast():
                        logits = model(**batch).logits
                    term = L.plain_loss(logits, labels, w, tl) if cfg.plain else L.super_term(logits, labels, w, tl)
                    accelerator.backward(term / A)
                    total = term.detach().float()
                    sup = logits.detach()
                    del logits
                    for sub in subs:
                        adapter.activate(raw, sub)
                        with accelerator.autocast():
                            s_logits = model(**batch).logits
                        s_term = L.sub_term(s_logits, labels, sup, w, tl)
                        accelerator.backward(s_term / A)
                        total = total + s_term.detach().float()
                        del s_logits
                    adapter.activate(raw, None)
                val = float(total)
                if not math.isfinite(val):
                    _nan_stop(val, step, partial, ckpt_step, cfg, log)
                step_loss += val / A
                step_samples += len(idx) * nproc
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            lr_now = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            train_time += dt
            samples += step_samples
            window.append(step_loss)
            win_samples += step_samples
            win_time += dt
            done = step + 1
            sps = win_samples / win_time if win_time > 0 else 0.0
            progress.update(done, step_loss, sps)
            if done % cfg.log_every == 0 or done == total_steps:
                log.write({"event": "train", "step": done, "epoch": round(done / steps_per_epoch, 4),
                           "loss": sum(window) / len(window), "lr": lr_now, "gamma": gamma,
                           "samples_per_s": round(sps, 2), "subnets": [s.name for s in subs]})
                window, win_samples, win_time = [], 0, 0.0
            if cfg.eval_every and done % cfg.eval_every == 0 and done < total_steps:
                if main:
                    ev = evaluate()
                    log.write({"event": "eval", "step": done, **ev})
                    progress.note(f"step {done}: super acc {ev['super_accuracy']:.4f}, smallest "
                                  f"{smallest.name} acc {ev['smallest_accuracy']:.4f}, eval loss {ev['eval_loss']:.4f}")
                model.train()
                accelerator.wait_for_everyone()
            if cfg.save_every and done % cfg.save_every == 0 and done < total_steps:
                if main:
                    _save_checkpoint(partial, done, raw, optimizer, scheduler, {
                        "step": done, "micro": done * A, "epoch": (done * A) // micro_per_epoch,
                        "batch_in_epoch": (done * A) % micro_per_epoch, "samples": samples,
                        "train_time_s": train_time, "wall_s": prior_wall + time.perf_counter() - t_session,
                        "fingerprint": fingerprint}, accelerator.scaler)
                ckpt_step = done
                accelerator.wait_for_everyone()
            if on_step is not None:
                on_step(done)
    finally:
        progress.stop()

    # ---- final evaluation and the artifact ----
    adapter.activate(raw, None)
    final = evaluate() if main else {}
    wall = prior_wall + time.perf_counter() - t_session
    metrics = {**final, "smallest_subnet": smallest.name, "steps": total_steps,
               "epochs": round(total_steps / steps_per_epoch, 4), "train_examples": n_train,
               "eval_examples": len(eval_enc), "wall_time_s": round(wall, 2), "train_time_s": round(train_time, 2),
               "samples_per_s": round(samples / train_time, 2) if train_time > 0 else None}
    artifact = None
    if main:
        log.write({"event": "final", "step": total_steps, **metrics})
        raw.save_pretrained(str(partial / MODEL_DIR))
        tok.save_pretrained(str(partial / MODEL_DIR))
        (partial / "space.json").write_text(json.dumps(space.to_dict(), indent=2) + "\n")
        D.write_jsonl(partial / "eval.jsonl", data.eval)
        calib = list(range(n_train))
        random.Random(_seed_int("calib", cfg.seed)).shuffle(calib)
        D.write_jsonl(partial / "calib.jsonl", data.train.subset(sorted(calib[:CALIB_EXAMPLES])))
        shutil.rmtree(partial / CKPT_DIR, ignore_errors=True)
        model_info = {
            "family": adapter.family, "model_type": hf_config.model_type, "base_checkpoint": cfg.model,
            "base_resolved": model_id, "task": data.task, "labels": data.labels, "num_labels": len(data.labels),
            "dims": dims.to_dict(), "max_length": max_length, "text_pair": data.eval.pairs is not None,
            "model_dir": MODEL_DIR, "elastic": cfg.elastic, "reorder": reorder_info,
        }
        extra = {
            "space": space.to_dict(),
            "data": {**data.source, "train_examples": n_train, "eval_examples": len(eval_enc),
                     "eval_file": "eval.jsonl", "calib_file": "calib.jsonl",
                     "calib_examples": min(CALIB_EXAMPLES, n_train)},
            "training": {"mode": "plain" if cfg.plain else "elastic", "num_subnets": cfg.num_subnets,
                         "sampling": cfg.sampling, "alpha": cfg.alpha, "temperature": cfg.temperature,
                         "teacher": cfg.teacher, "teacher_epochs": cfg.teacher_epochs,
                         "teacher_cache": "teacher_logits.safetensors" if teacher_dir else None,
                         "total_steps": total_steps, "warmup_steps": warmup, "processes": nproc,
                         "global_batch": G * A, "fingerprint": fingerprint},
        }
        artifact = writer.commit(model=model_info, metrics=metrics, extra=extra)
        say(f"[green]done[/] {cfg.output}: super acc {metrics['super_accuracy']:.4f}, smallest "
            f"{smallest.name} acc {metrics['smallest_accuracy']:.4f}, {metrics['samples_per_s']} samples/s, "
            f"{metrics['wall_time_s']} s")
    accelerator.wait_for_everyone()
    return TuneResult(artifact, metrics, teacher_cache, start_step if ckpt is not None else None, log.records)


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


class _Progress:
    """Rich progress bar with loss and samples/s; silent when disabled."""

    def __init__(self, console: Any, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from rich.console import Console
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
                          TimeElapsedColumn(), TimeRemainingColumn(),
                          console=console or Console(highlight=False), transient=False)
        self.task = self.p.add_task("tune", total=total, completed=start, loss=float("nan"), sps=0.0)
        self.p.start()

    def update(self, done: int, loss: float, sps: float) -> None:
        if self.enabled:
            self.p.update(self.task, completed=done, loss=loss, sps=sps)

    def note(self, msg: str) -> None:
        if self.enabled:
            self.p.console.print(msg, soft_wrap=True)

    def stop(self) -> None:
        if self.enabled:
            self.p.stop()
