"""`instatune search RUN_DIR`: Pareto search over the sub-networks of a tuned super-network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from instatune_cli.cli.common import (
    MEASURE,
    console,
    defaults,
    latency_option,
    print_table,
    quiet_libraries,
    user_errors,
)
from instatune_cli.search.stage import SearchOptions

# ruff: noqa: UP045 - typer needs Optional[...] on Python 3.10

WHAT = "What to find"
HOW = "How to search"
OUT = "Output"
LATENCY = "latency-"  # the latency options' prefix here: --batch is LINAS's


#: how a candidate came to be measured (the archive's `origin`), in words: every score on the line is measured
ORIGINS = {"predicted": "proposed by the predictor", "random": "random", "nsga2": "NSGA-II offspring",
           "anchor": "start: widest of a depth, or smallest"}


def _fmt(name: str, v: object, metric: str = "accuracy") -> str:
    if v is None or v == "":
        return "-"
    if name in ("acc", "eval_acc"):
        from instatune_cli.measure.metrics import format_score

        return format_score(metric, float(v))  # a correlation (mcc, pearson) as a number, a share as a percent
    if name in ("accuracy", "eval_accuracy"):
        return f"{100 * float(v):.2f}%"
    if name in ("mse", "eval_mse"):
        return f"{float(v):.4f}"
    if name in ("macs", "params"):
        return f"{float(v) / 1e9:.3f}G" if name == "macs" else f"{float(v) / 1e6:.2f}M"
    if name == "latency":
        return f"{float(v):.2f} ms"
    if name == "size":
        return f"{float(v):.1f} MB"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _run_metric(run_dir: Path) -> str:
    """The tune run's metric, only to format progress lines (a bad run is reported by the stage itself)."""
    from instatune_cli import artifacts
    from instatune_cli.errors import InstatuneError
    from instatune_cli.tune import run_metric

    try:
        return run_metric(artifacts.load(run_dir, "tune", verify=False))
    except InstatuneError:
        return "accuracy"


def next_lines(summary: dict, path: Path) -> list[str]:
    """What to do next, never pointing at a collapsed member: the picked one (when not collapsed on the eval
    split either), else any member not flagged; nothing when every member is collapsed (the stage's note says
    so, in one line) or the front is empty (nothing to export)."""
    front = summary.get("front") or []
    if not front:
        return []

    def ok(r: dict) -> bool:
        return not (r.get("collapsed") or r.get("eval_collapsed"))

    picked = next((r for r in front if r["subnet"] == summary.get("picked")), None)
    if picked is not None and ok(picked):
        return [f"next: instatune export {path} --subnet {picked['subnet']}   (the picked sub-network)"]
    if front and not any(ok(r) for r in front):
        return []
    if picked is not None:
        return [f"[yellow]note:[/] the picked sub-network {picked['subnet']} is collapsed on the eval split; "
                f"next: instatune export {path} --subnet N   (N from the table, one not flagged collapsed)"]
    unflagged = "" if all(ok(r) for r in front) else ", one not flagged collapsed"
    return [f"next: instatune export {path} --subnet N   (N from the table{unflagged})"]


def _flag(r: dict, split: str | None) -> str:
    """'collapsed' (on which split) when the sub-network learned nothing, else empty."""
    where = [s for s, k in ((split or "val", "collapsed"), ("eval", "eval_collapsed")) if r.get(k)]
    return f"collapsed ({', '.join(dict.fromkeys(where))})" if where else ""


def register(app: typer.Typer) -> None:
    D = defaults(SearchOptions)  # every option's default is its SearchOptions field's (docs/architecture.md)

    @app.command("search")
    @user_errors
    def search(
        run_dir: Path = typer.Argument(..., help="A tune run directory (what `instatune tune` wrote)."),
        objectives: str = typer.Option(",".join(D.objectives), "--objectives", "-O", rich_help_panel=WHAT,
                                       help="2 or 3 of acc, macs, params, latency, size (comma-separated)."),
        constraint: list[str] = typer.Option(D.constraints, "--constraint", "-c", rich_help_panel=WHAT,
                                             show_default="none", help="Repeatable, e.g. max-macs=6G, "
                                             "min-acc=0.9, max-latency=20 (acc: the metric on the validation "
                                             "split)."),
        max_macs: Optional[str] = typer.Option(None, "--max-macs", rich_help_panel=WHAT, show_default="none",
                                               help="Shorthand for --constraint max-macs=VALUE (e.g. 6G)."),
        min_acc: Optional[float] = typer.Option(None, "--min-acc", rich_help_panel=WHAT, show_default="none",
                                                help="Shorthand for --constraint min-acc=VALUE (0..1)."),
        metric: Optional[str] = typer.Option(D.metric, "--metric", rich_help_panel=WHAT,
                                             show_default="the tune run's: mcc for CoLA, f1 for MRPC/QQP, "
                                             "pearson for STS-B, else accuracy",
                                             help="What acc measures: accuracy, f1 or mcc; pearson or spearman for "
                                             "a regressor."),
        quant: bool = typer.Option(D.quant, "--quant", rich_help_panel=WHAT,
                                   help="Joint search: a precision gene (FP32, INT8, INT4 weights where the group "
                                   "size fits) per linear layer and the embeddings (needs the size objective)."),
        group_size: int = typer.Option(D.group_size, "--group-size", rich_help_panel=WHAT,
                                       help="--quant: inputs per INT4 weight scale (16, 32, 64, 128)."),
        no_int4: bool = typer.Option(not D.int4, "--no-int4", rich_help_panel=WHAT,
                                     help="--quant: FP32/INT8 genes only (the search before INT4)."),
        pick: Optional[str] = typer.Option(D.pick, "--pick", rich_help_panel=WHAT, show_default="none",
                                           help="Mark the cheapest front member within N points of the "
                                           "super-network's score, both on the validation split: max-drop=0.5"),
        algorithm: str = typer.Option(D.algorithm, "--algorithm", rich_help_panel=HOW,
                                      help="linas (predictor-guided NSGA-II), nsga2, random, or a "
                                      "registered plug-in."),
        evals: int = typer.Option(D.evals, "--evals", rich_help_panel=HOW, help="Budget of real evaluations."),
        population: int = typer.Option(D.population, "--population", rich_help_panel=HOW,
                                       help="Random start size (and NSGA-II population)."),
        batch: Optional[int] = typer.Option(D.batch, "--batch", rich_help_panel=HOW,
                                            show_default="population / 2",
                                            help="LINAS: proposals measured per iteration."),
        seed: int = typer.Option(D.seed, "--seed", rich_help_panel=HOW, help="Random seed."),
        ref_point: Optional[str] = typer.Option(D.ref_point, "--ref-point", rich_help_panel=HOW,
                                                show_default="derived from this archive",
                                                help="Hypervolume reference, one value per objective, e.g. "
                                                "acc=0.5,macs=1.5G; fix it to compare searches."),
        limit_val: Optional[int] = typer.Option(D.limit_val, "--limit-val", rich_help_panel=MEASURE,
                                                show_default="all", help="Select on the first N validation "
                                                "examples (the front is scored on the whole eval split)."),
        limit_eval: Optional[int] = typer.Option(D.limit_eval, hidden=True, help="Old name of --limit-val."),
        calibration_samples: int = typer.Option(D.calibration_samples, "--calibration-samples",
                                                rich_help_panel=MEASURE,
                                                help="--quant: training examples to calibrate INT8 on."),
        eval_batch_size: int = typer.Option(D.eval_batch_size, "--eval-batch-size", rich_help_panel=MEASURE,
                                            help="Batch size for scoring (validation and eval splits)."),
        latency_batch: int = latency_option("batch", prefix=LATENCY,
                                            help="Batch size the latency objective is measured at."),
        latency_seq_len: Optional[int] = latency_option("seq_len", prefix=LATENCY,
                                                        show_default="the space's seq_len",
                                                        help="Sequence length the latency objective is measured at."),
        latency_threads: Optional[int] = latency_option("threads", prefix=LATENCY,
                                                        help="ONNX Runtime intra-op threads for the latency "
                                                        "objective."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", rich_help_panel=OUT,
                                              show_default="RUN_DIR-search", help="Result directory."),
        resume: bool = typer.Option(False, "--resume", rich_help_panel=OUT,
                                    help="Continue a killed search; nothing in its archive is re-evaluated."),
        force: bool = typer.Option(False, "--force", rich_help_panel=OUT, help="Replace an existing result directory."),
        baseline: Optional[Path] = typer.Option(D.baseline, "--baseline", rich_help_panel=OUT, show_default="none",
                                                help="A plain tune run to mark on the plot."),
        as_json: bool = typer.Option(False, "--json", rich_help_panel=OUT,
                                     help="Print the result as JSON instead of a table."),
        progress_every: float = typer.Option(D.progress_every, "--progress-every", rich_help_panel=OUT,
                                             help="Seconds between plain progress lines on stderr when it is not a "
                                             "terminal (a log, nohup, CI)."),
    ) -> None:
        """Find the Pareto-optimal sub-networks (LINAS by default) and number them 1..K.

        Selects on the tune run's validation split only; the front is then scored once on the eval split.
        """
        quiet_libraries()
        from instatune_cli.search.stage import search_stage

        cons = list(constraint)
        if max_macs:
            cons.append(f"max-macs={max_macs}")
        if min_acc is not None:
            cons.append(f"min-acc={min_acc}")
        opts = SearchOptions(objectives=[o.strip() for o in objectives.split(",") if o.strip()],
                             algorithm=algorithm, evals=evals, population=population, batch=batch, seed=seed,
                             constraints=cons, pick=pick, limit_eval=limit_eval, limit_val=limit_val,
                             metric=metric, eval_batch_size=eval_batch_size,
                             latency_batch=latency_batch, latency_seq_len=latency_seq_len,
                             latency_threads=latency_threads, baseline=str(baseline) if baseline else None,
                             ref_point=ref_point, progress_every=progress_every, quant=quant,
                             calibration_samples=calibration_samples, group_size=group_size, int4=not no_int4)
        err = console(stderr=True)
        names = opts.objectives
        shown: list[str] = []

        def on_warning(text: str) -> None:
            from rich.markup import escape

            shown.append(text)
            err.print(f"[yellow]warning:[/] {escape(text)}")

        shown_metric = (metric or _run_metric(run_dir)).strip().lower()

        def on_eval(row: dict) -> None:
            if not as_json:
                vals = "  ".join(f"{n}={_fmt(n, row.get(n), shown_metric)}" for n in names)
                n = int(row.get("index", -1)) + 1
                how = ORIGINS.get(row.get("origin"), row.get("origin"))
                # values first, so they line up whatever the name's length; the name and how it was proposed last
                err.print(f"[dim]{'#' + str(n):>4}[/]  {vals}  {row['name']}  ({how})")

        r = search_stage(run_dir, output, opts, force=force, resume=resume, on_eval=on_eval, on_warning=on_warning)
        art, summary = r.artifact, r.summary
        if art is None:  # a non-zero rank of a launched search (torchrun, accelerate launch): rank 0 reports
            return
        if as_json:
            typer.echo(json.dumps({"output": str(art.path), **summary}, indent=2, default=str))
            return
        from rich.markup import escape
        from rich.table import Table

        m, split = summary["metric"], summary["selection_split"]
        held = split is not None and summary.get("eval_split") is not None
        sel = f"{m} {split}" if split == "val" else f"{m} {split} (search)"
        heads = {n: sel if n == "acc" and split else n for n in names}
        beside = "mse" if m in ("pearson", "spearman") else "accuracy"  # a regressor has no accuracy
        extra = ([("eval_acc", f"{m} eval")] if held else []) + \
                ([(f"eval_{beside}", f"{beside} eval")] if held and m != "accuracy" else [])
        t = Table(title=f"Pareto front ({summary['front_size']} of {summary['evaluations']} evaluated)")
        t.add_column("#", justify="right", no_wrap=True)
        t.add_column("sub-network", overflow="fold")
        for n in names:
            t.add_column(heads[n], justify="right")
        for _, h in extra:
            t.add_column(h, justify="right")
        int8_ref = summary.get("int8_reference")  # the joint search: the all-INT8 super-network its plot marks
        policies = int8_ref is not None or any("policy_summary" in r for r in summary["front"])
        if policies:
            t.add_column("INT8 policy")
        t.add_column("id")
        t.add_column("flag")
        ref = summary["reference"]

        def cells(r: dict, policy: str = "") -> list[str]:
            return ([_fmt(n, r.get(n), m) for n in names] + [_fmt(k, r.get(k), m) for k, _ in extra]
                    + ([policy or r.get("policy_summary", "FP32")] if policies else []))

        t.add_row("ref", f"super-network {ref.get('subnet_name', '')}", *cells(ref, "all FP32"), "", _flag(ref, split))
        if int8_ref is not None:
            t.add_row("int8", f"super-network {ref.get('subnet_name', '')}", *cells(int8_ref, "all INT8"),
                      str(int8_ref.get("id", "")), _flag(int8_ref, split))
        int4_ref = summary.get("int4_reference")
        if int4_ref is not None:
            t.add_row("int4", f"super-network {ref.get('subnet_name', '')}", *cells(int4_ref),
                      str(int4_ref.get("id", "")), _flag(int4_ref, split))
        for r in summary["front"]:
            mark = " *" if summary["picked"] == r["subnet"] else ""
            t.add_row(str(r["subnet"]) + mark, r["name"], *cells(r), r["id"], _flag(r, split))
        out = console()
        print_table(out, t)
        if held:
            out.print(f"selected by {m} on the {split} split ({summary['selection_examples']} examples); "
                      f"eval columns: scored once after the search on the eval split ({summary['eval_examples']} "
                      "examples)")
        for note in summary["notes"]:
            if note not in shown:
                out.print(f"[yellow]note:[/] {escape(note)}")
        if summary["picked"]:
            out.print(f"picked (*): sub-network {summary['picked']} ({pick}, on the {split} split)")
        elif pick:
            out.print(f"[yellow]note:[/] no front member meets {pick}")
        rate = summary.get("evals_per_minute")
        out.print(f"wrote {art.path}  (hypervolume {summary['hypervolume']:.4g}"
                  + (f", {rate:.1f} evaluations/min" if rate else "") + ")")
        for line in next_lines(summary, art.path):
            out.print(line)
