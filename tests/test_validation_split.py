"""The validation split the search selects on: carved from training (or a user file), disjoint from training
and eval, deterministic for a seed, stored by tune, unchanged by --resume; bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Killed, kill_at, make_tiny_data, tiny_tune_config, write_table

from instatune_cli import data as D
from instatune_cli.errors import InstatuneError


def rows(split: D.Split) -> list[tuple[str, int]]:
    return list(zip(split.texts, split.labels, strict=True))


def test_carved_split_is_disjoint_and_covers_training(tiny_data_dir: Path) -> None:
    full = D.load_task_data(data=tiny_data_dir)
    td = D.with_validation(full, None, seed=3)
    assert td.val is not None and len(td.val) == round(0.05 * 96) and len(td.train) == 96 - len(td.val)
    # every training row lands in exactly one of train / val (the tiny sentences are unique)
    assert sorted(rows(td.train) + rows(td.val)) == sorted(rows(full.train))
    assert not set(td.val.texts) & set(td.train.texts)
    assert not set(td.val.texts) & set(td.eval.texts) and td.eval.texts == full.eval.texts
    assert td.source["val"]["kind"] == "carved" and td.source["val"]["examples"] == len(td.val)


def test_carved_split_is_deterministic_for_a_seed(tiny_data_dir: Path) -> None:
    full = D.load_task_data(data=tiny_data_dir)
    a, b = D.with_validation(full, "0.25", seed=1), D.with_validation(full, "0.25", seed=1)
    c = D.with_validation(full, "0.25", seed=2)
    assert rows(a.val) == rows(b.val) and rows(a.train) == rows(b.train) and len(a.val) == 24
    assert rows(a.val) != rows(c.val)


@pytest.mark.parametrize("spec,n", [("10", 10), ("0.5", 48), ("1", 1), (None, 5)])
def test_fraction_count_and_default(tiny_data_dir: Path, spec: str | None, n: int) -> None:
    td = D.with_validation(D.load_task_data(data=tiny_data_dir), spec)
    assert len(td.val) == n and len(td.train) == 96 - n


def test_default_is_capped() -> None:
    big = D.TaskData("custom", D.Split([f"s{i}" for i in range(50_000)], [i % 2 for i in range(50_000)]),
                     D.Split(["e"], [0]), ["0", "1"])
    td = D.with_validation(big, None)
    assert len(td.val) == D.DEFAULT_VAL_CAP and len(td.train) == 48_000


def test_zero_means_no_validation_split(tiny_data_dir: Path) -> None:
    td = D.with_validation(D.load_task_data(data=tiny_data_dir), "0")
    assert td.val is None and len(td.train) == 96


@pytest.mark.parametrize("spec,msg", [("96", "leaves none to train on"), ("500", "leaves none to train on"),
                                      ("abc", "neither a fraction"), ("-1", "must be >= 0"),
                                      ("2.5", "whole number")])
def test_bad_val_split_is_one_line(tiny_data_dir: Path, spec: str, msg: str) -> None:
    with pytest.raises(InstatuneError, match=msg) as e:
        D.with_validation(D.load_task_data(data=tiny_data_dir), spec)
    assert "\n" not in str(e.value)


def test_val_file_same_columns_and_classes(tmp_path: Path, tiny_data_dir: Path) -> None:
    write_table(tmp_path / "val.csv", [{"sentence": "good fun", "label": 1}, {"sentence": "dull", "label": 0}])
    full = D.load_task_data(data=tiny_data_dir)
    td = D.with_validation(full, None, tmp_path / "val.csv")
    assert td.val.texts == ["good fun", "dull"] and td.val.labels == [1, 0]
    assert len(td.train) == 96 and td.source["val"]["kind"] == "file"


def test_val_file_with_a_label_training_lacks(tmp_path: Path, tiny_data_dir: Path) -> None:
    write_table(tmp_path / "val.csv", [{"sentence": "good fun", "label": 1}, {"sentence": "meh", "label": 2}])
    with pytest.raises(InstatuneError, match="label 2, which the training data lacks"):
        D.with_validation(D.load_task_data(data=tiny_data_dir), None, tmp_path / "val.csv")


def test_val_file_and_val_split_together_is_refused(tmp_path: Path, tiny_data_dir: Path) -> None:
    write_table(tmp_path / "val.csv", [{"sentence": "good fun", "label": 1}])
    with pytest.raises(InstatuneError, match="either --val-split or --val-data"):
        D.with_validation(D.load_task_data(data=tiny_data_dir), "5", tmp_path / "val.csv")


def test_tune_stores_the_split_and_resume_keeps_it(tiny_bert_dir: Path, tmp_path: Path, single_thread: None) -> None:
    """The run's val.jsonl is disjoint from what it trained on and from eval, and a killed run resumed with
    --resume ends with the same split (and the same weights) as one that never stopped."""
    from instatune_cli import artifacts
    from instatune_cli.tune.loop import run_tune

    data = make_tiny_data(tmp_path / "d", n_train=64, n_dev=16)
    kw = dict(val_split="12", max_steps=8, save_every=3)
    straight = run_tune(tiny_tune_config(tiny_bert_dir, data, tmp_path / "straight", **kw)).artifact
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_tune(tiny_tune_config(tiny_bert_dir, data, out, **kw), on_step=kill_at(4))
    res = run_tune(tiny_tune_config(tiny_bert_dir, data, out, resume=True, **kw))
    assert res.resumed_from == 3
    val = D.read_jsonl(out / "val.jsonl")
    assert rows(val) == rows(D.read_jsonl(straight.path / "val.jsonl")) and len(val) == 12
    full = D.load_task_data(data=data)
    assert not set(val.texts) & set(D.read_jsonl(out / "eval.jsonl").texts)
    calib = D.read_jsonl(out / "calib.jsonl")  # a sample of what it trained on
    assert not set(val.texts) & set(calib.texts) and set(val.texts) <= set(full.train.texts)
    man = artifacts.load(out, "tune").manifest
    assert man["data"]["val_file"] == "val.jsonl" and man["data"]["val_examples"] == 12
    assert man["metrics"]["train_examples"] == 52 and "super_val_accuracy" in man["metrics"]
    assert man["model"]["metric"] == "accuracy" and man["model"]["depth_rule"] == "spread"
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["val_examples"] == 12


def test_length_grouped_batches_pad_less_and_stay_a_permutation() -> None:
    import random

    rng = random.Random(0)
    lengths = [rng.randint(3, 60) for _ in range(1000)]
    order = list(range(1000))
    rng.shuffle(order)
    grouped = D.length_grouped(order, lengths, 32, random.Random(1), mega=10)
    assert sorted(grouped) == list(range(1000))
    assert grouped == D.length_grouped(order, lengths, 32, random.Random(1), mega=10)

    def padded(o: list[int]) -> int:
        return sum(max(lengths[i] for i in o[s:s + 32]) * len(o[s:s + 32]) for s in range(0, len(o), 32))

    assert padded(grouped) < 0.6 * padded(order)
    # the remainder (1000 = 31 x 32 + 8) stays last, so every other batch is full
    assert len(grouped[31 * 32:]) == 8
