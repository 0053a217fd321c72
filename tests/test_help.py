"""Every command's help is complete: each option says what it does and what it defaults to, flags carry no
type label, long commands group their options into panels, and nothing in a help text is eaten as markup."""

from __future__ import annotations

import re

import pytest
import typer.main
from typer.core import TyperArgument, TyperOption
from typer.testing import CliRunner

from instatune_cli.cli.app import app

COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]
#: a command with more options than this groups them into named panels (as tune does)
PANEL_THRESHOLD = 8


def _options(cmd: object) -> list[TyperOption]:
    return [p for p in cmd.params if isinstance(p, TyperOption) and not p.hidden]  # type: ignore[attr-defined]


def _rendered(name: str) -> str:
    r = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert r.exit_code == 0, r.output
    return r.output


def test_every_command_is_walked():
    assert set(COMMANDS) >= {"tune", "search", "extract", "quantize", "export", "env"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_a_description_and_a_shown_default(name):
    bad = []
    for p in _options(COMMANDS[name]):
        opt = p.opts[0]
        if not (p.help or "").strip():
            bad.append(f"{opt}: no description")
        if p.is_flag and not p.secondary_opts:
            if p.default:  # a lone flag is off unless given; one that defaults on needs a --no- form
                bad.append(f"{opt}: a flag that is on by default")
            continue
        if p.default is None and not isinstance(p.show_default, str):
            bad.append(f"{opt}: no default shown (give show_default=... saying what None means)")
        if p.show_default is False:
            bad.append(f"{opt}: default hidden")
        if "default" in (p.help or "").lower() or re.search(r"\[[^\]]*\]\.?$", p.help or ""):
            bad.append(f"{opt}: the default is written into the help text; use show_default")
    for p in COMMANDS[name].params:  # type: ignore[attr-defined]
        if isinstance(p, TyperArgument) and not p.required and p.default is None and not isinstance(
                p.show_default, str):
            bad.append(f"argument {p.name}: optional without a shown default")
    assert not bad, f"instatune {name}: " + "; ".join(bad)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_rendered_help_reads_whole(name):
    text = _rendered(name)
    assert "<bool>" not in text, "a flag takes no value; it shows no type"
    assert not re.search(r"\w \.", text), "a help text lost a bracketed part to the markup"
    shown = text.count("[default:")
    want = sum(1 for p in _options(COMMANDS[name]) if not (p.is_flag and not p.secondary_opts))
    assert shown >= want, f"{shown} defaults shown for {want} options"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_long_commands_group_options_into_panels(name):
    opts = _options(COMMANDS[name])
    if len(opts) <= PANEL_THRESHOLD:
        return
    loose = [p.opts[0] for p in opts if not getattr(p, "rich_help_panel", None)]
    assert not loose, f"instatune {name}: options outside a panel: {loose}"


def test_group_by_length_claim_matches_the_readme():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (p,) = [p for p in _options(COMMANDS["tune"]) if p.opts[0] == "--group-by-length"]
    claim = re.search(r"about (\d+)x faster", p.help).group(1)
    assert f"about {claim}x faster" in readme
