"""The `instatune` Typer application. Subcommands live one per module and import heavy libraries lazily,
so `instatune --help` stays fast."""

from __future__ import annotations

from typing import Optional

import typer

from instatune_cli import __version__
from instatune_cli.cli import env, export, extract, quantize, search, tune
from instatune_cli.cli.common import plain_flag_labels

plain_flag_labels()

app = typer.Typer(
    name="instatune",
    help="Turn a pretrained transformer into a family of smaller, faster models while fine-tuning "
    "(InstaTune): tune -> search -> extract -> quantize -> export.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"instatune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(  # noqa: UP045 - typer needs Optional on 3.10
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """instatune: elastic fine-tuning and multi-objective sub-network search."""


for mod in (tune, search, extract, quantize, export, env):
    mod.register(app)


def main() -> None:
    app(prog_name="instatune")
