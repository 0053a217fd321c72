"""`tune`'s last line after a run whose model is no better than a constant predictor (collapsed): it says so and
suggests what to try (more epochs, another --lr, --plain to compare), never a search, an export or a teacher use
of the collapsed model."""

from __future__ import annotations

import pytest
from conftest import run_cli, tiny_tune_args

from instatune_cli import artifacts
from instatune_cli.cli.tune import next_line

pytestmark = pytest.mark.usefixtures("single_thread")

FINE = {"super_accuracy": 0.8, "super_collapsed": False, "super_val_accuracy": 0.75, "super_val_collapsed": False}
SOURCE = {"subnet_name": "L3-h4-f25", "teacher": None}


def _acts_on_it(line: str) -> bool:
    return any(s in line for s in ("instatune search", "instatune export", "--teacher run", "--baseline"))


@pytest.mark.parametrize("plain, source", [(False, None), (True, None), (True, SOURCE), (False, SOURCE)])
def test_a_collapsed_model_is_never_suggested(plain, source):
    assert _acts_on_it(next_line("run", plain, source, FINE, "accuracy"))  # learned: searched, exported, taught
    for split in ("super_collapsed", "super_val_collapsed"):  # collapsed on either split
        line = next_line("run", plain, source, {**FINE, split: True}, "accuracy")
        assert not _acts_on_it(line), line
        assert "no better than a constant predictor" in line and "next: instatune tune again with more --epochs" in line
        assert "another --lr" in line and "majority-class rate" in line
        assert ("--plain to compare" in line) == (not plain and source is None)
        assert ("--teacher parent" in line) == (source is not None)
    both = next_line("run", False, None, {**FINE, "super_collapsed": True, "super_val_collapsed": True}, "accuracy")
    assert "acc 80.00% on the eval split, 75.00% on the validation split" in both
    mcc = next_line("run", False, None, {"super_mcc": -0.0312, "super_collapsed": True}, "mcc")
    assert "mcc -0.0312 on the eval split" in mcc and "MCC at or below 0" in mcc
    taught = next_line("run", True, {**SOURCE, "teacher": "parent"}, {"super_collapsed": True}, "accuracy")
    assert "--teacher" not in taught  # it already had one


@pytest.mark.parametrize("plain", [False, True])
def test_a_run_forced_to_collapse_ends_with_what_to_try(tiny_bert_dir, tiny_data_dir, tmp_path, plain):
    """One step at a learning rate of 1e-9: the model is its random initialisation, which answers one class."""
    args = [a for a in tiny_tune_args(tiny_bert_dir, tiny_data_dir, tmp_path / "run", "--max-steps", "1", "--lr",
                                      "1e-9", *(["--plain"] if plain else [])) if a != "--quiet"]
    r = run_cli(*args)
    assert r.exit_code == 0, r.output
    assert artifacts.load(tmp_path / "run", "tune").metrics["super_collapsed"] is True
    assert "no better than a constant predictor" in " ".join(r.stdout.split()), r.stdout
    words = r.stdout.split()  # rich wraps the line at the runner's width
    tail = " ".join(words[words.index("note:"):])
    assert "next: instatune tune again with more --epochs" in tail and not _acts_on_it(tail), tail
    assert ("--plain to compare" in tail) != plain
