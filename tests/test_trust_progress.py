"""Progress where no terminal shows a live bar (issue 12): plain lines at a steady interval on stderr; and
`quiet_libraries` silences only the known noisy warnings."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import pytest
from conftest import tiny_tune_config
from rich.console import Console

from instatune_cli.artifacts import Heartbeat, fmt_seconds

pytestmark = pytest.mark.usefixtures("single_thread")


def test_heartbeat_prints_at_a_steady_interval(capsys: pytest.CaptureFixture) -> None:
    now = [0.0]
    beat = Heartbeat(30, clock=lambda: now[0])
    printed = []
    for t in range(0, 101, 5):
        now[0] = float(t)
        if beat.tick(lambda t=t: f"at {t}"):
            printed.append(t)
    assert printed == [30, 60, 90]
    assert capsys.readouterr().err.splitlines() == ["at 30", "at 60", "at 90"]
    assert not Heartbeat(None).tick(lambda: "never") and capsys.readouterr().err == ""
    assert [fmt_seconds(s) for s in (5, 185, 7620)] == ["5s", "3m05s", "2h07m"]


def test_tune_prints_plain_progress_lines_when_not_on_a_terminal(tiny_bert_dir: Path, tiny_data_dir: Path,
                                                                 tmp_path: Path, capsys: pytest.CaptureFixture
                                                                 ) -> None:
    from instatune_cli.tune.loop import run_tune

    log = io.StringIO()
    cfg = tiny_tune_config(tiny_bert_dir, tiny_data_dir, tmp_path / "run", max_steps=6, quiet=False,
                           progress_every=0)
    run_tune(cfg, console=Console(file=log, highlight=False))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("tune: step")]
    assert len(lines) == 6
    assert re.fullmatch(r"tune: step 6/6, loss \d+\.\d{4}, \d+\.\d samples/s, ETA 0s", lines[-1]), lines[-1]
    assert "done" in log.getvalue()


def test_tune_on_a_terminal_keeps_the_live_bar(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    from instatune_cli.tune.loop import run_tune

    term = io.StringIO()
    cfg = tiny_tune_config(tiny_bert_dir, tiny_data_dir, tmp_path / "run", max_steps=3, quiet=False,
                           progress_every=0)
    run_tune(cfg, console=Console(file=term, force_terminal=True, highlight=False))
    assert "tune: step" not in capsys.readouterr().err and "3/3" in term.getvalue()


def test_search_prints_evaluations_and_hypervolume(tiny_tune_run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    from instatune_cli.search.stage import SearchOptions, run_stage

    run_stage(tiny_tune_run, tmp_path / "s", SearchOptions(evals=8, population=4, progress_every=0))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("search:")]
    assert len(lines) == 8 and lines[0] == "search: 1/8 evaluations (start population of 4; hypervolume from then on)"
    assert lines[3].startswith("search: 4/8 evaluations, hypervolume ")
    lines = lines[3:]
    assert re.fullmatch(r"search: 8/8 evaluations, hypervolume [0-9.e+-]+( \(reference point widened.*)?", lines[-1])
    # one reference for every line: the figure never falls, and it rises only when the front improved
    hv = [float(re.search(r"hypervolume ([0-9.e+-]+)", ln).group(1)) for ln in lines]
    widened = [i for i, ln in enumerate(lines) if "widened" in ln]
    for i in range(1, len(hv)):
        if i not in widened:
            assert hv[i] >= hv[i - 1]


def test_quiet_libraries_keeps_warnings_that_matter() -> None:
    from instatune_cli.cli.common import quiet_libraries

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn("instatune test: an unrelated user warning", UserWarning, stacklevel=1)
        warnings.warn("instatune test: a future warning", FutureWarning, stacklevel=1)
        warnings.warn_explicit("Anomaly Detection has been enabled. This mode will increase the runtime",
                               UserWarning, "graph_capture_wrappers.py", 1,
                               module="torch._functorch._aot_autograd.graph_capture_wrappers")
        warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, "_pytree.py", 1,
                               module="torch.utils._pytree")
    shown = [str(w.message) for w in seen]
    assert shown == ["instatune test: an unrelated user warning", "instatune test: a future warning"]
