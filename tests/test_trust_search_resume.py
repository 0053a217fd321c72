"""`search --resume` (issue 12) reuses archived scores only if they were measured the way this search would
measure them: same tune run (digest), objectives, metric, selection split and size, space and evaluation batch
size. Anything else is one line saying what differs; the budget (`--evals`) may change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import Killed, assert_cli_error, run_cli

from instatune_cli.search.stage import SEARCH_FILE, SearchOptions, run_stage

pytestmark = pytest.mark.usefixtures("single_thread")


def killed_search(run: Path, out: Path, after: int = 5) -> Path:
    """A search of 12 evaluations 'killed' after `after` of them; returns its partial directory."""
    seen = [0]

    def on_eval(row: dict) -> None:
        seen[0] += 1
        if seen[0] == after:
            raise Killed(after)

    with pytest.raises(Killed):
        run_stage(run, out, SearchOptions(evals=12, population=6), on_eval=on_eval)
    partial = out.with_name(out.name + ".partial")
    assert len((partial / "archive.jsonl").read_text().splitlines()) == after
    return partial


def resume(run: Path, out: Path, *extra: str):
    return run_cli("search", run, "--evals", "12", "--population", "6", "--output", out, "--resume", "--json",
                   *extra)


@pytest.fixture(scope="module")
def killed(tiny_tune_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import one_thread

    out = tmp_path_factory.mktemp("killed") / "s"
    with one_thread():
        killed_search(tiny_tune_run, out)
    return out


@pytest.mark.parametrize("extra,what", [
    (["--limit-val", "8"], "--limit-val"),
    (["--eval-batch-size", "8"], "--eval-batch-size"),
    (["--objectives", "acc,params"], "--objectives"),
    (["--metric", "f1"], "--metric"),
])
def test_resume_refuses_scores_measured_otherwise(killed: Path, tiny_tune_run: Path, extra: list[str],
                                                  what: str) -> None:
    partial = killed.with_name("s.partial")
    before = (partial / "archive.jsonl").read_text()
    line = assert_cli_error(resume(tiny_tune_run, killed, *extra), what, "--force")
    assert str(partial) in line
    assert (partial / "archive.jsonl").read_text() == before and not killed.exists()


def test_resume_refuses_after_the_tune_run_was_replaced(tiny_tune_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_tune_run, run)
    out = tmp_path / "s"
    killed_search(run, out)
    manifest = json.loads((run / "manifest.json").read_text())  # what `tune --force` leaves: a new manifest
    manifest["created_utc"] = "2000-01-01T00:00:00Z"
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2))
    assert_cli_error(resume(run, out), "the tune run", "tune --force", "--force without --resume")
    res = run_cli("search", run, "--evals", "12", "--population", "6", "--output", out, "--force", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["new_evaluations"] == 12  # started over


def test_resume_may_raise_the_budget(killed: Path, tiny_tune_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    shutil.copytree(killed.with_name("s.partial"), tmp_path / "s.partial")
    res = run_cli("search", tiny_tune_run, "--evals", "14", "--population", "6", "--output", out, "--resume",
                  "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["new_evaluations"] == 9
    recorded = json.loads((out / SEARCH_FILE).read_text())
    assert "evals" not in recorded["inputs"] and recorded["inputs"]["selection_split"] == "val"


def test_resume_refuses_a_partial_without_a_fingerprint(killed: Path, tiny_tune_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    shutil.copytree(killed.with_name("s.partial"), tmp_path / "s.partial")
    (tmp_path / "s.partial" / SEARCH_FILE).unlink()
    assert_cli_error(resume(tiny_tune_run, out), "older instatune", "--force")
