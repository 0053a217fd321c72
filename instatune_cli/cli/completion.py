"""Shell completion scripts for bash, zsh and fish, generated from the Typer app.

The scripts call back into `instatune` at completion time, so they complete every subcommand and option of
the installed version. `python -m instatune_cli.cli.completion completions/` regenerates the shipped copies;
a test fails when they are stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

SHELLS = {"bash": "instatune.bash", "zsh": "_instatune", "fish": "instatune.fish"}
PROG = "instatune"
COMPLETE_VAR = "_INSTATUNE_COMPLETE"


def script(shell: str) -> str:
    from typer._completion_shared import get_completion_script

    return get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell).rstrip() + "\n"


def write_all(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for shell, fname in SHELLS.items():
        p = directory / fname
        p.write_text(script(shell))
        out.append(p)
    return out


if __name__ == "__main__":
    for p in write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "completions")):
        print(p)
