"""`instatune extract`: a searched or named sub-network as a physically smaller model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from instatune_cli.cli.common import console, defaults, quiet_libraries, user_errors
from instatune_cli.deliver import ExtractOptions

# ruff: noqa: UP045 - typer needs Optional[...] on Python 3.10


def register(app: typer.Typer) -> None:
    D = defaults(ExtractOptions)  # every option's default is its ExtractOptions field's (docs/architecture.md)

    @app.command("extract")
    @user_errors
    def extract(
        source: Path = typer.Argument(..., help="A search directory (with --subnet) or a tune run (with --config)."),
        subnet: Optional[int] = typer.Option(D.subnet, "--subnet", "-n", show_default="none",
                                             help="Number of a sub-network on the front (with a search dir)."),
        config: Optional[str] = typer.Option(D.config, "--config", show_default="none",
                                             help="L10-h10-f2048, a JSON file or inline JSON (with a tune run)."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", show_default="SOURCE-subnetN",
                                              help="Output directory."),
        force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    ) -> None:
        """Write only the sliced weights (+ tokenizer) as a model that loads back with stock transformers."""
        quiet_libraries()
        from instatune_cli.deliver import extract_stage

        r = extract_stage(source, output, ExtractOptions(subnet=subnet, config=config), force=force)
        out = console()
        out.print(f"extracted {r.subnet_name} ({r.kind} {r.architecture}) to {r.path}")
        out.print(f"params {r.params:,} (closed form {r.params_closed_form:,}), weights "
                  f"{r.weights_bytes / 1e6:.1f} MB, MACs {r.macs / 1e9:.3f}G "
                  f"({100 * r.macs_reduction:.1f}% fewer), max |Δlogit| vs super-network {r.max_abs_diff:.2g}")
        out.print(f"load with: {r.load_with}")
