"""`instatune tune`: elastic fine-tuning with the InstaTune loss (or plain fine-tuning with --plain)."""

from __future__ import annotations

import json
from typing import Optional

import typer

from instatune_cli.cli.common import console, defaults, quiet_libraries, user_errors
from instatune_cli.tune.config import SUPER_CE, TuneConfig

# ruff: noqa: UP045 - typer needs Optional[...] on Python 3.10

DATA = "Data"
METHOD = "Method"
OPTIM = "Optimisation"
RUN = "Run"


def register(app: typer.Typer) -> None:
    D = defaults(TuneConfig)  # every option's default is its TuneConfig field's (docs/architecture.md)

    @app.command("tune")
    @user_errors
    def tune(
        model: str = typer.Argument(..., help="Model directory (save_pretrained layout), a tune run directory, "
                                    "an extract directory (recovery fine-tuning of that sub-network: its data "
                                    "and validation split default to its parent run's), or a hub id when online."),
        task: Optional[str] = typer.Option(D.task, "--task", help="GLUE task (sst2, cola, mrpc, qqp, qnli, rte, "
                                           "wnli, mnli; stsb: regression): loads it from the hub, or names the "
                                           "task of --data; "
                                           "imagefolder: --data DIR with train/ and val/ (or test/) class "
                                           "folders, for image models.",
                                           show_default="none: --data's files", rich_help_panel=DATA),
        data: Optional[str] = typer.Option(D.data, "--data", help="Directory with train.* and dev.*/validation.* "
                                           "(tsv, csv, jsonl, json, parquet), or a training file.",
                                           show_default="--task's GLUE data from the hub", rich_help_panel=DATA),
        eval_data: Optional[str] = typer.Option(D.eval_data, "--eval-data", help="Evaluation file (needed when --data "
                                                "is a file).", show_default="--data's dev/validation file",
                                                rich_help_panel=DATA),
        text_column: Optional[str] = typer.Option(D.text_column, "--text-column", rich_help_panel=DATA,
                                                  show_default="guessed, e.g. sentence, text", help="Text column."),
        text_pair_column: Optional[str] = typer.Option(D.text_pair_column, "--text-pair-column", rich_help_panel=DATA,
                                                       show_default="none",
                                                       help="Second text column for sentence-pair tasks."),
        label_column: Optional[str] = typer.Option(D.label_column, "--label-column", rich_help_panel=DATA,
                                                   show_default="label", help="Label column."),
        limit_train: Optional[int] = typer.Option(D.limit_train, "--limit-train", help="Use the first N training rows.",
                                                  show_default="all", rich_help_panel=DATA),
        limit_eval: Optional[int] = typer.Option(D.limit_eval, "--limit-eval", help="Use the first N eval rows.",
                                                 show_default="all", rich_help_panel=DATA),
        val_split: Optional[str] = typer.Option(D.val_split, "--val-split", help="Validation split carved from the "
                                                "training data, what `search` selects on: a fraction (0.1) or a "
                                                "count (500); 0 = none.", show_default="5 %, at most 2000",
                                                rich_help_panel=DATA),
        val_data: Optional[str] = typer.Option(D.val_data, "--val-data", help="Validation file instead of a carved "
                                               "split (same columns and classes as training).", show_default="none",
                                               rich_help_panel=DATA),
        metric: Optional[str] = typer.Option(D.metric, "--metric", help="accuracy, f1 or mcc: what the run and its "
                                             "search are scored by; pearson or spearman train a regressor on "
                                             "real-valued labels.", show_default="mcc for CoLA, f1 for MRPC/QQP, "
                                             "pearson for STS-B, else accuracy", rich_help_panel=DATA),
        max_length: Optional[int] = typer.Option(D.max_length, "--max-length", help="Truncate to this many tokens "
                                                 "(batches are padded per batch).",
                                                 show_default="128; an extract: its parent run's",
                                                 rich_help_panel=DATA),
        tokenizer: Optional[str] = typer.Option(D.tokenizer, "--tokenizer", help="Tokenizer directory.",
                                                show_default="the model's", rich_help_panel=DATA),
        plain: bool = typer.Option(D.plain, "--plain", help="Ordinary fine-tuning (no sub-networks): a baseline, "
                                   "or a strong teacher for a later run.", rich_help_panel=METHOD),
        space: Optional[str] = typer.Option(D.space, "--space", help="Search space: preset name or YAML/JSON file.",
                                            show_default="derived from the model", rich_help_panel=METHOD),
        num_subnets: int = typer.Option(D.num_subnets, "--num-subnets", "-M", help="Sub-networks sampled per step.",
                                        rich_help_panel=METHOD),
        sampling: str = typer.Option(D.sampling, "--sampling", help="uniform, sandwich (smallest + random) or "
                                     "stratified (one width level per sub-network: sizes spread over the MAC range).",
                                     rich_help_panel=METHOD),
        alpha: float = typer.Option(D.alpha, "--alpha", help="Cross-entropy weight α of the InstaTune loss.",
                                    rich_help_panel=METHOD),
        super_ce: Optional[float] = typer.Option(D.super_ce, "--super-ce", help="Cross-entropy weight of the "
                                                 "super-network's own term (the paper's Eq. 1: α); above 1 "
                                                 "favours the super-network over its sub-networks.",
                                                 show_default=f"{SUPER_CE:g} without a teacher, α with one",
                                                 rich_help_panel=METHOD),
        super_warmup: float = typer.Option(D.super_warmup, "--super-warmup", help="Fraction of steps that train the "
                                           "super-network alone before sub-networks are sampled (the paper: 0).",
                                           rich_help_panel=METHOD),
        sub_ramp: float = typer.Option(D.sub_ramp, "--sub-ramp", help="Fraction of steps over which the "
                                       "sub-networks' loss terms grow from 0 to full weight once sampling starts "
                                       "(0 = at once, the paper).", rich_help_panel=METHOD),
        grad_projection: str = typer.Option(D.grad_projection, "--grad-projection", help="Where the super-network's "
                                            "and the sub-networks' gradients conflict, project out the part that "
                                            "opposes `super` (the full model) or `subnets` (NASViT); `none`: the "
                                            "paper's sum.", rich_help_panel=METHOD),
        temperature: float = typer.Option(D.temperature, "--temperature", help="Distillation temperature ρ.",
                                          rich_help_panel=METHOD),
        hidden_distill: float = typer.Option(D.hidden_distill, "--hidden-distill", help="β of DynaBERT's hidden-state "
                                             "distillation from the super-network to each sub-network (0 = off).",
                                             rich_help_panel=METHOD),
        teacher: Optional[str] = typer.Option(D.teacher, "--teacher", help="Strong teacher: a fine-tuned model, "
                                              "tune run or extract (same task and family), e.g. a --plain run; "
                                              "`parent`: the tune run MODEL (an extract) was cut from.",
                                              show_default="none", rich_help_panel=METHOD),
        teacher_epochs: Optional[int] = typer.Option(D.teacher_epochs, "--teacher-epochs", help="Use the teacher "
                                                     "for the first K epochs only.", show_default="all",
                                                     rich_help_panel=METHOD),
        reorder: Optional[bool] = typer.Option(D.reorder, "--reorder/--no-reorder", help="Reorder heads and FFN "
                                               "neurons by importance, so that sub-networks keep the best "
                                               "ones: elastic runs before training, --plain runs after it "
                                               "(prune after fine-tuning).", show_default="on",
                                               rich_help_panel=METHOD),
        reorder_batches: int = typer.Option(D.reorder_batches, "--reorder-batches", help="Training batches used to "
                                            "score importance.", rich_help_panel=METHOD),
        lr: float = typer.Option(D.lr, "--lr", help="Peak learning rate (AdamW, linear warm-up and decay).",
                                 rich_help_panel=OPTIM),
        weight_decay: float = typer.Option(D.weight_decay, "--weight-decay", help="AdamW weight decay.",
                                           rich_help_panel=OPTIM),
        warmup_ratio: float = typer.Option(D.warmup_ratio, "--warmup-ratio", help="Fraction of steps for warm-up.",
                                           rich_help_panel=OPTIM),
        batch_size: int = typer.Option(D.batch_size, "--batch-size", help="Examples per batch, all processes together "
                                       "(the global batch): under torchrun / accelerate launch each of N "
                                       "processes takes 1/N of it, so it must be a multiple of N.",
                                       rich_help_panel=OPTIM),
        group_by_length: bool = typer.Option(D.group_by_length, "--group-by-length/--no-group-by-length", help="Batch "
                                             "examples of similar length together (less padding: about 4x faster "
                                             "on SST-2 on a CPU; order stays random and seeded).",
                                             rich_help_panel=OPTIM),
        grad_accum: int = typer.Option(D.grad_accum, "--grad-accum", help="Gradient accumulation steps.",
                                       rich_help_panel=OPTIM),
        epochs: float = typer.Option(D.epochs, "--epochs", help="Passes over the training data.",
                                     rich_help_panel=OPTIM),
        max_steps: Optional[int] = typer.Option(D.max_steps, "--max-steps",
                                                help="Optimizer steps (overrides --epochs).",
                                                show_default="from --epochs", rich_help_panel=OPTIM),
        max_grad_norm: float = typer.Option(D.max_grad_norm, "--max-grad-norm", help="Gradient clipping (0 = off).",
                                            rich_help_panel=OPTIM),
        seed: int = typer.Option(D.seed, "--seed", help="Same seed and data give the same weights.",
                                 rich_help_panel=OPTIM),
        mixed_precision: str = typer.Option(D.mixed_precision, "--mixed-precision",
                                            help="no, fp16 or bf16 (accelerate).",
                                            rich_help_panel=OPTIM),
        cpu: bool = typer.Option(D.cpu, "--cpu", help="Train on the CPU even if a GPU is present.",
                                 rich_help_panel=OPTIM),
        output: str = typer.Option(D.output, "--output", "-o", help="Run directory to write.", rich_help_panel=RUN),
        force: bool = typer.Option(D.force, "--force", help="Replace an existing run directory.",
                                   rich_help_panel=RUN),
        resume: bool = typer.Option(D.resume, "--resume", help="Continue an interrupted run from its last "
                                    "checkpoint (same options).", rich_help_panel=RUN),
        eval_every: int = typer.Option(D.eval_every, "--eval-every", help="Evaluate super-network and smallest "
                                       "sub-network every N steps (0 = at the end only).", rich_help_panel=RUN),
        eval_batch_size: int = typer.Option(D.eval_batch_size, "--eval-batch-size", help="Batch size for scoring.",
                                            rich_help_panel=RUN),
        save_every: int = typer.Option(D.save_every, "--save-every", help="Checkpoint every N steps (0 = never).",
                                       rich_help_panel=RUN),
        log_every: int = typer.Option(D.log_every, "--log-every", help="Write a log.jsonl record every N steps.",
                                      rich_help_panel=RUN),
        quiet: bool = typer.Option(D.quiet, "--quiet", "-q", help="No progress output.", rich_help_panel=RUN),
        progress_every: float = typer.Option(D.progress_every, "--progress-every", help="Seconds between plain "
                                             "progress lines on stderr when the output is not a terminal (a log, "
                                             "nohup, CI).",
                                             rich_help_panel=RUN),
        report_to: str = typer.Option(D.report_to, "--report-to", help="Log losses (total, super-network, "
                                      "sub-networks), learning rate and the evaluation scores to these loggers "
                                      "(comma-separated): tensorboard (the tensorboard package: pip install "
                                      "tensorboard), or none; written to RUN/logs/NAME/.", rich_help_panel=RUN),
        as_json: bool = typer.Option(False, "--json", help="Print the final metrics as JSON.",
                                     rich_help_panel=RUN),
    ) -> None:
        """Fine-tune MODEL into an elastic super-network (InstaTune) and write a run directory for `search`."""
        quiet_libraries()
        from instatune_cli.tune.loop import run_tune

        cfg = TuneConfig(
            model=model, task=task, data=data, eval_data=eval_data, text_column=text_column,
            text_pair_column=text_pair_column, label_column=label_column, limit_train=limit_train,
            limit_eval=limit_eval, val_split=val_split, val_data=val_data, metric=metric, max_length=max_length,
            tokenizer=tokenizer, output=output, force=force,
            resume=resume, plain=plain, space=space, num_subnets=num_subnets, sampling=sampling, alpha=alpha,
            super_ce=super_ce, super_warmup=super_warmup, sub_ramp=sub_ramp, grad_projection=grad_projection,
            temperature=temperature, hidden_distill=hidden_distill, teacher=teacher, teacher_epochs=teacher_epochs,
            reorder=reorder,
            reorder_batches=reorder_batches, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
            batch_size=batch_size, group_by_length=group_by_length, grad_accum=grad_accum, epochs=epochs,
            max_steps=max_steps,
            max_grad_norm=max_grad_norm, seed=seed, mixed_precision=mixed_precision, cpu=cpu,
            eval_every=eval_every, eval_batch_size=eval_batch_size, save_every=save_every, log_every=log_every,
            quiet=quiet or as_json, progress_every=progress_every, report_to=report_to,
        )
        result = run_tune(cfg)
        if as_json and result.artifact is not None:
            typer.echo(json.dumps({"output": str(result.artifact.path), **result.metrics}, indent=2))
        elif result.artifact is not None and not quiet:
            art = result.artifact
            console().print(next_line(str(art.path), plain, art.model.get("source_extract"), art.metrics,
                                      art.model.get("metric")))


def next_line(run: str, plain: bool, source_extract: dict | None = None, metrics: dict | None = None,
              metric: str | None = None) -> str:
    """What a finished run is for, as `search` ends with its own `next:`; for a model no better than a constant
    predictor (`super_[val_]collapsed`), what to try instead, never a search, export or teacher use of it."""
    collapsed = collapsed_line(plain, source_extract, metrics or {}, metric or "accuracy")
    if collapsed:
        return collapsed
    if source_extract:  # a recovered sub-network: ship it, or search its cuts
        return (f"next: instatune export {run} --config {source_extract.get('subnet_name')}   (the recovered "
                f"sub-network), or instatune search {run} --objectives acc,macs   (it and its cuts)")
    if plain:
        return (f"next: instatune tune MODEL ... --teacher {run}   (a strong teacher), or "
                f"instatune search ELASTIC_RUN --baseline {run}   (marked on the plot)")
    return f"next: instatune search {run} --objectives acc,macs   (the Pareto front of sub-networks)"


def collapsed_line(plain: bool, source_extract: dict | None, metrics: dict, metric: str) -> str | None:
    """The `note: ... next: ...` of a run whose model is collapsed on the eval or validation split; None if not."""
    from instatune_cli.measure.metrics import format_score
    from instatune_cli.search.stage import collapse_rule

    splits = [(name, pre) for name, pre in (("eval", ""), ("validation", "val_"))
              if metrics.get(f"super_{pre}collapsed")]
    if not splits:
        return None
    scores = ", ".join(f"{format_score(metric, metrics.get(f'super_{pre}{metric}'))} on the {name} split"
                       for name, pre in splits)
    shown = "acc" if metric == "accuracy" else metric
    if source_extract:
        what, use = "recovered sub-network", "so there is nothing to export or search"
        tries = "more --epochs, another --lr" + ("" if source_extract.get("teacher") else ", or --teacher parent")
    elif plain:
        what, use = "fine-tuned model", "so it is no teacher or baseline"
        tries = "more --epochs or another --lr"
    else:
        what, use = "super-network", "so neither it nor its sub-networks are worth searching or exporting"
        tries = "more --epochs, another --lr, or --plain to compare with ordinary fine-tuning"
    return (f"[yellow]note:[/] the {what} is no better than a constant predictor ({shown} {scores}; collapsed: "
            f"{collapse_rule(metric)}): it did not learn the task, {use}. next: instatune tune again with {tries}")
