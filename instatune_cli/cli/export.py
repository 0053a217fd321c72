"""`instatune export`: ONNX with parity and latency (chains extract when given a search or tune dir)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from instatune_cli.cli.common import THREADS_DEFAULT, accuracy_change, console, quiet_libraries, threads_of, user_errors

# ruff: noqa: UP045 - typer needs Optional[...] on Python 3.10

SOURCE = "Source"
MEASURE = "Measuring"
OUT = "Output"


def register(app: typer.Typer) -> None:
    @app.command("export")
    @user_errors
    def export(
        source: Optional[Path] = typer.Argument(
            None, help="An extract directory, or a search dir (+ --subnet) / tune run (+ --config).",
            show_default="./run-search, the search's default output"),
        subnet: Optional[int] = typer.Option(None, "--subnet", "-n", rich_help_panel=SOURCE, show_default="none",
                                             help="Number of a sub-network on the front (with a search dir)."),
        config: Optional[str] = typer.Option(None, "--config", rich_help_panel=SOURCE, show_default="none",
                                             help="L10-h10-f2048, a JSON file or inline JSON (with a tune run)."),
        int8: bool = typer.Option(False, "--int8", rich_help_panel=SOURCE,
                                  help="Also write model.int8.onnx and score it on the eval split."),
        batch: int = typer.Option(1, "--batch", rich_help_panel=MEASURE,
                                  help="Batch size for the latency measurement."),
        seq_len: Optional[int] = typer.Option(None, "--seq-len", rich_help_panel=MEASURE,
                                              show_default="128, or the model's maximum if shorter",
                                              help="Sequence length for the latency measurement."),
        threads: Optional[int] = typer.Option(None, "--threads", rich_help_panel=MEASURE, show_default=THREADS_DEFAULT,
                                              help="ONNX Runtime intra-op threads for every latency figure."),
        runs: int = typer.Option(20, "--runs", rich_help_panel=MEASURE,
                                 help="Timed runs per latency measurement (after warm-up)."),
        atol: float = typer.Option(1e-4, "--atol", rich_help_panel=MEASURE,
                                   help="Max |ONNX - PyTorch| logit difference allowed."),
        no_compare: bool = typer.Option(False, "--no-compare", rich_help_panel=MEASURE,
                                        help="Skip timing the full super-network."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", rich_help_panel=OUT, show_default="SOURCE-onnx",
                                              help="Output directory."),
        force: bool = typer.Option(False, "--force", rich_help_panel=OUT, help="Replace existing output directories."),
    ) -> None:
        """Write model.onnx (dynamic batch/sequence), check it against PyTorch, measure ORT latency."""
        quiet_libraries()
        from instatune_cli.deliver import export_stage

        out = console()
        art = export_stage(source, output, subnet=subnet, config=config, int8=int8, batch=batch,
                           seq_len=seq_len, threads=threads, runs=runs, atol=atol, force=force,
                           compare_full=not no_compare, notify=lambda msg: out.print(f"[dim]{msg}[/]"))
        m = art.metrics
        lat = m["latency"]
        out.print(f"wrote {art.path / 'model.onnx'} ({m['onnx_bytes'] / 1e6:.1f} MB); ORT parity max |Δ| "
                  f"{m['parity']['max_abs_diff']:.2g} (atol {m['parity']['atol']:g})")
        out.print(f"latency b{lat['batch']} s{lat['seq_len']}, {threads_of(lat)}: median {lat['median_ms']:.2f} ms, "
                  f"p90 {lat['p90_ms']:.2f} ms")
        if "latency_supernet" in m:
            sup = m["latency_supernet"]
            out.print(f"super-network, {threads_of(sup)}: median {sup['median_ms']:.2f} ms -> {m['speedup']:.2f}x "
                      "faster")
        if "int8" in m:
            q = m["int8"]
            out.print(f"int8: {art.path / 'model.int8.onnx'} ({q['bytes_out'] / 1e6:.1f} MB), median "
                      f"{q['latency']['median_ms']:.2f} ms ({threads_of(q['latency'])})")
            acc = q.get("accuracy")
            if acc:
                out.print(f"int8: {accuracy_change(acc['fp32'], acc['int8'], acc['change_points'])}")
