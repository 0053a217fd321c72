"""`python -m instatune_cli` runs the same Typer app as the `instatune` console script."""

from instatune_cli.cli.app import main

main()
