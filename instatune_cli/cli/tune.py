"""`instatune tune` (not built yet)."""

from __future__ import annotations

import typer

from instatune_cli.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command("tune", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def tune() -> None:
        """Not built yet: exits non-zero with a one-line message."""
        not_built("tune")
