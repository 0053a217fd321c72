"""`instatune tune`: elastic fine-tuning with the InstaTune loss (or plain fine-tuning with `--plain`).

Modules: `config` (options dataclass, validation, fingerprint), `loss` (Eq. 1), `teacher` (strong-teacher
checks and the cached teacher logits), `loop` (`run_tune` and the `Trainer`: the accelerate training loop),
`state` (`TrainerState`, `TrainerControl`, `TrainPlan`), `callbacks` (the loop's events, the JSONL log, progress,
`--report-to` loggers), `rundir` (lock, partial, fingerprint, commit), `checkpoint` (save / load / park),
`order` (the examples of each micro-batch), `evaluation` (super-network and smallest sub-network scores).

A tune run directory (stage "tune", the artifact contract of docs/architecture.md) holds:

    manifest.json              schema, options, model info (family, e.g. bert, roberta, timm_vit; model_type;
                               adapter: the registered family later stages load it with; base checkpoint,
                               task, labels, dims, max_length, model_dir, reorder), metrics (super_accuracy,
                               smallest_accuracy, super_<metric> when not accuracy, a regressor's super_mse
                               instead of accuracy, super_collapsed, eval_loss, steps, wall_time_s, cpu_s: every
                               session's, ...), space,
                               data, training info
    space.json                 the search space (SearchSpace.to_dict), checked against the model
    model/                     the super-network in its family's stock layout (transformers `save_pretrained`,
                               timm `save_for_hf`) plus the tokenizer or image preprocessor; heads/neurons are
                               stored in importance order when `reorder` was on, so prefixes are the sub-networks
    eval.jsonl                 the eval split as used: {"text", ["text_pair"], "label": class id, or a float
                               for a regressor} per line
                               (images: "text" is the image's absolute path);
                               `search` scores only the front on it, once
    val.jsonl                  the validation split (same format), carved from training or --val-data: what
                               `search` selects on; absent in runs made before it existed
    calib.jsonl                up to 512 *training* examples (same format), e.g. for quantization calibration,
                               kept apart from the eval split
    log.jsonl                  start / train / eval / resume / final records, one JSON object per line
    run.json                   the run's fingerprint (options + data + model digests) and reorder info
    logs/<name>/               only with --report-to: the logger's files (logs/tensorboard/events.out.tfevents.*)
    teacher_logits.safetensors only with --teacher: the frozen teacher's logits over the training set

Several GPUs or nodes: `accelerate launch -m instatune_cli tune ...` or `torchrun --nproc-per-node N -m
instatune_cli tune ...` (checked with 2 CPU processes, tests/tune/test_ddp.py); `--batch-size` is the global
batch, every process draws the same sub-networks, the gradients are averaged once per step, and a checkpoint
resumes with any number of processes (loop.py's module docstring).

`model/` loads with the family's stock loader (`AutoModelForSequenceClassification.from_pretrained(run / "model")`,
`timm.create_model("local-dir:" + str(run / "model"), pretrained=True)`);
`load_tuned(run)` returns it made elastic, ready for `adapter_of(model).activate(model, sub)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from instatune_cli import artifacts, data
from instatune_cli.adapters import family_named
from instatune_cli.errors import InstatuneError
from instatune_cli.space import ModelDims, SearchSpace

if TYPE_CHECKING:
    import torch

    from instatune_cli.artifacts import Artifact
    from instatune_cli.space import SearchSpace

__all__ = ["load_tuned", "load_eval_batches", "load_split", "has_split", "run_metric", "run_family"]


def load_tuned(run_dir: str | Path, eager: bool = False, device: Any = None,
               verify: bool = True) -> tuple[Any, Any, SearchSpace, Artifact]:
    """(elastic model in eval mode, tokenizer, search space, artifact) of a finished tune run.

    `eager=True` loads with eager attention (what ptflops needs to count attention MACs).
    """
    art = artifacts.load(run_dir, "tune", verify=verify)
    mdir = art.path / art.model.get("model_dir", "model")
    adapter = run_family(art)
    try:
        model = adapter.load_saved(mdir, eager=eager)
        tok = adapter.load_preprocessor(mdir)
    except (OSError, ValueError, InstatuneError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InstatuneError(f"cannot load the model of tune run {art.path}: {first}") from None
    space = SearchSpace.from_file(art.path / "space.json")
    adapter.make_elastic(model, space.depth)
    dims = adapter.dims_of(model)
    recorded = art.model.get("dims")
    if recorded and ModelDims.from_dict(recorded) != dims:
        raise InstatuneError(f"the model in {mdir} does not match the dims recorded in its manifest")
    space.check_model(dims)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tok, space, art


def run_family(art: Artifact) -> Any:
    """The model family of a tune run (its manifest's `adapter`; runs of the transformers families made before
    families were plug-ins record `bert` or `distilbert` there too)."""
    return family_named(str(art.model.get("adapter") or art.model.get("family") or "bert"))


def load_split(run_dir: str | Path | Artifact, which: str = "eval") -> Any:
    """The run's stored eval split (`which="eval"`), validation split (`"val"`) or calibration sample (`"calib"`)
    as a `data.Split`."""
    path = run_dir.path if hasattr(run_dir, "path") else Path(run_dir)
    return data.read_jsonl(Path(path) / f"{which}.jsonl")


def has_split(run_dir: str | Path | Artifact, which: str) -> bool:
    """Whether the run stores a non-empty `which` split; runs made before validation splits have no "val"."""
    path = Path(run_dir.path if hasattr(run_dir, "path") else run_dir) / f"{which}.jsonl"
    return path.is_file() and path.stat().st_size > 0


def run_metric(art: Artifact) -> str:
    """The metric the tune run is judged by (`model.metric`); runs made before metrics were recorded: accuracy."""
    return str(art.model.get("metric") or "accuracy")


def load_eval_batches(run_dir: str | Path | Artifact, tokenizer: Any, batch_size: int = 64,
                      limit: int | None = None, which: str = "eval") -> list[dict[str, torch.Tensor]]:
    """Pre-tokenized, length-grouped batches of the run's eval split, at the run's max_length; feed them
    to `measure.accuracy.Evaluator`."""
    art = run_dir if hasattr(run_dir, "manifest") else artifacts.load(run_dir, "tune", verify=False)
    fam = run_family(art)
    split = load_split(art, which).head(limit)
    enc = fam.encode(tokenizer, split, int(art.model.get("max_length", 128)))
    return fam.eval_batches(enc, batch_size)
