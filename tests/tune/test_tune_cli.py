"""`instatune tune` refuses bad input with one line and a non-zero exit, and loses nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, assert_cli_error, make_tiny_bert, make_tiny_distilbert, run_cli, tiny_tune_args

pytestmark = pytest.mark.usefixtures("single_thread")


def tune(model: Path | str, data: Path | str, out: Path, *extra: str):
    return run_cli(*tiny_tune_args(model, data, out, *extra))


def test_help_is_light() -> None:
    code = ("import sys, instatune_cli.cli.app as a; "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"
    r = run_cli("tune", "--help")
    assert r.exit_code == 0 and "--teacher" in r.output and "--resume" in r.output


def test_model_errors(tiny_data_dir: Path, tmp_path: Path) -> None:
    assert_cli_error(tune("some-org/no-such-model", tiny_data_dir, tmp_path / "o"), "offline")
    (tmp_path / "empty").mkdir()
    assert_cli_error(tune(tmp_path / "empty", tiny_data_dir, tmp_path / "o"), "not a model directory")
    assert_cli_error(tune(tmp_path / "missing", tiny_data_dir, tmp_path / "o"), "does not exist")


def test_data_errors(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert_cli_error(tune(tiny_bert_dir, tmp_path / "nodata", out), "does not exist")
    assert_cli_error(tune(tiny_bert_dir, tiny_data_dir, out, "--task", "sst3"), "unknown task")
    assert_cli_error(tune(tiny_bert_dir, tiny_data_dir, out, "--text-column", "txt"), "no column 'txt'")
    assert_cli_error(run_cli("tune", tiny_bert_dir, "--task", "sst2", "-o", out), "--data DIR")
    assert_cli_error(run_cli("tune", tiny_bert_dir, "-o", out), "no data")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.tsv").write_text("sentence\tlabel\ngood\t0\nbad\t1\n")
    (bad / "dev.tsv").write_text("sentence\tlabel\nugly\t2\n")
    assert_cli_error(tune(tiny_bert_dir, bad, out), "not a training class")
    (bad / "dev.tsv").write_text("sentence\tlabel\n")
    assert_cli_error(tune(tiny_bert_dir, bad, out), "empty")
    assert not out.exists() and not out.with_name("o.partial").exists()


def test_option_errors(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert_cli_error(tune(tiny_bert_dir, tiny_data_dir, out, "--sampling", "zigzag"), "--sampling")
    assert_cli_error(tune(tiny_bert_dir, tiny_data_dir, out, "--teacher-epochs", "1"), "--teacher")
    assert_cli_error(tune(tiny_bert_dir, tiny_data_dir, out, "--space", "bert-base-paper"), "layers")
    assert_cli_error(tune(tiny_bert_dir, tiny_data_dir, out, "--alpha", "2"), "--alpha")
    assert not out.with_name("o.partial").exists()


def test_validation_split_and_metric_errors(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert_cli_error(tune(tiny_bert_dir, tiny_data_dir, out, "--metric", "foo"), "unknown --metric 'foo'", "mcc")
    assert_cli_error(tune(tiny_bert_dir, tiny_data_dir, out, "--val-split", "abc"), "--val-split 'abc'")
    assert_cli_error(tune(tiny_bert_dir, tiny_data_dir, out, "--val-split", "-1"), "--val-split must be >= 0")
    assert_cli_error(tune(tiny_bert_dir, tiny_data_dir, out, "--val-split", "0.1", "--val-data",
                          str(tiny_data_dir / "dev.tsv")), "not both")
    assert not out.exists() and not out.with_name("o.partial").exists()
    r = run_cli("tune", "--help")
    assert r.exit_code == 0 and all(o in r.output for o in ("--val-split", "--val-data", "--metric"))


def test_teacher_errors(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    three = make_tiny_bert(tmp_path / "three", head=True, num_labels=3)
    assert_cli_error(tune(tiny_bert_dir, tiny_data_dir, out, "--teacher", str(three)), "3 classes")
    named = make_tiny_bert(tmp_path / "named", head=True, id2label={0: "neg", 1: "pos"})
    assert_cli_error(tune(tiny_bert_dir, tiny_data_dir, out, "--task", "sst2", "--teacher", str(named)),
                     "labels ['neg', 'pos']")
    distil = make_tiny_distilbert(tmp_path / "distil")
    assert_cli_error(tune(tiny_bert_dir, tiny_data_dir, out, "--teacher", str(distil)), "family")
    wide = make_tiny_bert(tmp_path / "wide", head=True, vocab_size=99)
    assert_cli_error(tune(tiny_bert_dir, tiny_data_dir, out, "--teacher", str(wide)), "tokenizer")
    empty = tmp_path / "empty"  # not tmp_path itself: the output inside a teacher is refused first
    empty.mkdir()
    assert_cli_error(tune(tiny_bert_dir, tiny_data_dir, out, "--teacher", str(empty)), "not a model directory")
    assert not out.with_name("o.partial").exists()


def test_output_and_resume_errors(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_cli_error(tune(tiny_bert_dir, tiny_data_dir, out), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "precious"

    other = tmp_path / "s"
    partial = tmp_path / "s.partial"
    partial.mkdir()
    (partial / ".stage").write_text("search")
    assert_cli_error(tune(tiny_bert_dir, tiny_data_dir, other, "--resume"), "'search'")
    assert_cli_error(tune(tiny_bert_dir, tiny_data_dir, other), "unfinished")
    assert (partial / ".stage").read_text() == "search"


def test_resume_with_other_options(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    from conftest import tiny_tune_config

    from instatune_cli.tune.loop import run_tune

    out = tmp_path / "o"

    def stop(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, save_every=2), on_step=stop)
    assert_cli_error(tune(tiny_bert_dir, tiny_data_dir, out, "--resume", "--seed", "3"), "another run", "--seed")
    assert_cli_error(tune(tiny_bert_dir, tiny_data_dir, out, "--resume", "--limit-train", "50"), "another run")
    r = tune(tiny_bert_dir, tiny_data_dir, out, "--resume", "--save-every", "2")
    assert r.exit_code == 0, r.output
    assert (out / "manifest.json").is_file()
