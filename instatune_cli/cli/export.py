"""`instatune export`: ONNX with parity and latency (chains extract when given a search or tune dir)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from instatune_cli.cli.common import (
    MEASURE,
    accuracy_change,
    console,
    defaults,
    latency_option,
    quiet_libraries,
    threads_of,
    user_errors,
)
from instatune_cli.deliver import ExportOptions

# ruff: noqa: UP045 - typer needs Optional[...] on Python 3.10

SOURCE = "Source"
OUT = "Output"


def register(app: typer.Typer) -> None:
    D = defaults(ExportOptions)  # every option's default is its ExportOptions field's (docs/architecture.md)

    @app.command("export")
    @user_errors
    def export(
        source: Optional[Path] = typer.Argument(
            None, help="An extract directory, or a search dir (+ --subnet) / tune run (+ --config).",
            show_default="./run-search, the search's default output"),
        subnet: Optional[int] = typer.Option(D.subnet, "--subnet", "-n", rich_help_panel=SOURCE, show_default="none",
                                             help="Number of a sub-network on the front (with a search dir)."),
        config: Optional[str] = typer.Option(D.config, "--config", rich_help_panel=SOURCE, show_default="none",
                                             help="L10-h10-f2048, a JSON file or inline JSON (with a tune run)."),
        int8: bool = typer.Option(D.int8, "--int8", rich_help_panel=SOURCE,
                                  help="Also write model.int8.onnx and score it on the eval split."),
        batch: int = latency_option("batch"),
        seq_len: Optional[int] = latency_option("seq_len"),
        threads: Optional[int] = latency_option("threads"),
        runs: int = latency_option("runs"),
        atol: float = typer.Option(D.atol, "--atol", rich_help_panel=MEASURE,
                                   help="Max |ONNX - PyTorch| logit difference allowed."),
        no_compare: bool = typer.Option(not D.compare_full, "--no-compare", rich_help_panel=MEASURE,
                                        help="Skip timing the full super-network."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", rich_help_panel=OUT, show_default="SOURCE-onnx",
                                              help="Output directory."),
        force: bool = typer.Option(False, "--force", rich_help_panel=OUT, help="Replace existing output directories."),
    ) -> None:
        """Write model.onnx (dynamic batch/sequence), check it against PyTorch, measure ORT latency."""
        quiet_libraries()
        from instatune_cli.deliver import export_stage

        out = console()
        opts = ExportOptions(subnet=subnet, config=config, int8=int8, batch=batch, seq_len=seq_len, threads=threads,
                             runs=runs, atol=atol, compare_full=not no_compare)
        r = export_stage(source, output, opts, force=force, notify=lambda msg: out.print(f"[dim]{msg}[/]"))
        lat, parity = r.latency, r.parity
        out.print(f"wrote {r.onnx} ({r.onnx_bytes / 1e6:.1f} MB); ORT parity max |Δ| "
                  f"{parity['max_abs_diff']:.2g} (atol {parity['atol']:g})")
        out.print(f"latency b{lat['batch']} s{lat['seq_len']}, {threads_of(lat)}: median {lat['median_ms']:.2f} ms, "
                  f"p90 {lat['p90_ms']:.2f} ms")
        sup = r.latency_supernet
        if sup is not None:
            out.print(f"super-network, {threads_of(sup)}: median {sup['median_ms']:.2f} ms -> {r.speedup:.2f}x "
                      "faster")
        q = r.int8
        if q is not None:
            out.print(f"int8: {r.int8_onnx} ({q['bytes_out'] / 1e6:.1f} MB), median "
                      f"{q['latency']['median_ms']:.2f} ms ({threads_of(q['latency'])})")
            acc = q.get("accuracy")
            if acc:
                out.print(f"int8: {accuracy_change(acc['fp32'], acc['int8'], acc['change_points'])}")
