"""`instatune search RUN_DIR`: Pareto search over the sub-networks of a tuned super-network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from instatune_cli.cli.common import console, quiet_libraries, user_errors


def _fmt(name: str, v: object) -> str:
    if v is None:
        return "-"
    if name == "acc":
        return f"{100 * float(v):.2f}%"
    if name in ("macs", "params"):
        return f"{float(v) / 1e9:.3f}G" if name == "macs" else f"{float(v) / 1e6:.2f}M"
    if name == "latency":
        return f"{float(v):.2f} ms"
    if name == "size":
        return f"{float(v):.1f} MB"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def register(app: typer.Typer) -> None:
    @app.command("search")
    @user_errors
    def search(
        run_dir: Path = typer.Argument(..., help="A tune run directory (what `instatune tune` wrote)."),
        objectives: str = typer.Option("acc,macs", "--objectives", "-O",
                                       help="2 or 3 of acc, macs, params, latency, size (comma-separated)."),
        algorithm: str = typer.Option("linas", help="linas (predictor-guided NSGA-II), nsga2 or random."),
        evals: int = typer.Option(50, help="Budget of real evaluations."),
        population: int = typer.Option(10, help="Random start size (and NSGA-II population)."),
        batch: Optional[int] = typer.Option(None, help="LINAS: proposals measured per iteration [population/2]."),  # noqa: UP045
        seed: int = typer.Option(0, help="Random seed."),
        constraint: list[str] = typer.Option([], "--constraint", "-c",
                                             help="Repeatable, e.g. max-macs=6G, min-acc=0.9, max-latency=20."),
        max_macs: Optional[str] = typer.Option(None, help="Shorthand for --constraint max-macs=VALUE (e.g. 6G)."),  # noqa: UP045
        min_acc: Optional[float] = typer.Option(None, help="Shorthand for --constraint min-acc=VALUE (0..1)."),  # noqa: UP045
        pick: Optional[str] = typer.Option(None, help="Mark the cheapest front member within N accuracy points "  # noqa: UP045
                                           "of the super-network: max-drop=0.5"),
        limit_eval: Optional[int] = typer.Option(None, help="Score accuracy on the first N eval examples."),  # noqa: UP045
        eval_batch_size: int = typer.Option(64, help="Batch size for accuracy evaluation."),
        latency_batch: int = typer.Option(1, help="Batch size the latency objective is measured at."),
        latency_seq_len: Optional[int] = typer.Option(None, help="Sequence length for latency [space's]."),  # noqa: UP045
        latency_threads: Optional[int] = typer.Option(None, help="ORT intra-op threads [all CPUs]."),  # noqa: UP045
        baseline: Optional[Path] = typer.Option(None, help="A plain tune run to mark on the plot."),  # noqa: UP045
        ref_point: Optional[str] = typer.Option(  # noqa: UP045
            None, help="Hypervolume reference, one value per objective, e.g. acc=0.5,macs=1.5G; fix it to "
            "compare searches [derived from this archive]."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Result directory [RUN_DIR-search]."),  # noqa: UP045
        resume: bool = typer.Option(False, help="Continue a killed search; nothing in its archive is re-evaluated."),
        force: bool = typer.Option(False, help="Replace an existing result directory."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of a table."),
    ) -> None:
        """Find the Pareto-optimal sub-networks (LINAS by default) and number them 1..K."""
        quiet_libraries()
        from instatune_cli.search.stage import SearchOptions, run_stage

        cons = list(constraint)
        if max_macs:
            cons.append(f"max-macs={max_macs}")
        if min_acc is not None:
            cons.append(f"min-acc={min_acc}")
        opts = SearchOptions(objectives=[o.strip() for o in objectives.split(",") if o.strip()],
                             algorithm=algorithm, evals=evals, population=population, batch=batch, seed=seed,
                             constraints=cons, pick=pick, limit_eval=limit_eval, eval_batch_size=eval_batch_size,
                             latency_batch=latency_batch, latency_seq_len=latency_seq_len,
                             latency_threads=latency_threads, baseline=str(baseline) if baseline else None,
                             ref_point=ref_point)
        err = console(stderr=True)
        names = opts.objectives

        def on_eval(row: dict) -> None:
            if not as_json:
                vals = "  ".join(f"{n}={_fmt(n, row.get(n))}" for n in names)
                n = int(row.get("index", -1)) + 1
                err.print(f"[dim]#{n}[/] {row['name']:<28} {vals}  ({row.get('origin', '')})")

        art, result, summary = run_stage(run_dir, output, opts, force=force, resume=resume, on_eval=on_eval)
        if as_json:
            typer.echo(json.dumps({"output": str(art.path), **summary}, indent=2, default=str))
            return
        from rich.table import Table

        t = Table(title=f"Pareto front ({summary['front_size']} of {summary['evaluations']} evaluated)")
        t.add_column("#", justify="right")
        t.add_column("sub-network")
        for n in names:
            t.add_column(n, justify="right")
        t.add_column("id")
        ref = summary["reference"]
        t.add_row("ref", f"super-network {ref.get('subnet_name', '')}", *[_fmt(n, ref.get(n)) for n in names], "")
        for r in summary["front"]:
            mark = " *" if summary["picked"] == r["subnet"] else ""
            t.add_row(str(r["subnet"]) + mark, r["name"], *[_fmt(n, r.get(n)) for n in names], r["id"])
        out = console()
        out.print(t)
        for note in summary["notes"]:
            out.print(f"[yellow]note:[/] {note}")
        if summary["picked"]:
            out.print(f"picked (*): sub-network {summary['picked']} ({pick})")
        elif pick:
            out.print(f"[yellow]note:[/] no front member meets {pick}")
        rate = summary.get("evals_per_minute")
        out.print(f"wrote {art.path}  (hypervolume {summary['hypervolume']:.4g}"
                  + (f", {rate:.1f} evaluations/min" if rate else "") + ")")
        out.print(f"next: instatune export {art.path} --subnet N   (N from the table)")
