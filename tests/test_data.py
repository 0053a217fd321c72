"""Data loading: formats, column choice, label mapping, one-line errors, tokenization and batches."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_tiny_data, write_table

from instatune_cli import data as D
from instatune_cli.errors import InstatuneError


def test_glue_tsv_dir(tiny_data_dir: Path) -> None:
    td = D.load_task_data(data=tiny_data_dir)
    assert (len(td.train), len(td.eval)) == (96, 32)
    assert td.labels == ["0", "1"] and td.task == "custom"
    assert td.source["columns"] == {"text": "sentence", "text_pair": None, "label": "label"}
    assert set(td.train.labels) == {0, 1} and td.train.pairs is None


def test_limits_take_first_rows(tiny_data_dir: Path) -> None:
    full = D.load_task_data(data=tiny_data_dir)
    td = D.load_task_data(data=tiny_data_dir, limit_train=10, limit_eval=5)
    assert td.train.texts == full.train.texts[:10] and td.eval.texts == full.eval.texts[:5]


def test_task_names_label_ids(tiny_data_dir: Path) -> None:
    td = D.load_task_data(task="sst2", data=tiny_data_dir)
    assert td.task == "sst2" and td.labels == ["negative", "positive"]


def test_tsv_quotes_are_literal(tmp_path: Path) -> None:
    (tmp_path / "train.tsv").write_text('sentence\tlabel\n"a quote\t1\nit \'s " odd\t0\n')
    (tmp_path / "dev.tsv").write_text('sentence\tlabel\nfine "x" y\t1\n')
    td = D.load_task_data(data=tmp_path)
    assert td.train.texts == ['"a quote', 'it \'s " odd'] and td.eval.texts == ['fine "x" y']


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_other_formats(tmp_path: Path, fmt: str) -> None:
    d = make_tiny_data(tmp_path / fmt, 20, 6, fmt=fmt)
    td = D.load_task_data(data=d)
    ref = D.load_task_data(data=make_tiny_data(tmp_path / "ref", 20, 6))
    assert td.train.texts == ref.train.texts and td.train.labels == ref.train.labels


def test_string_labels_sorted_and_validation_dir(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "y": lab} for i, lab in enumerate(["pos", "neg", "neutral", "pos"])]
    write_table(tmp_path / "train.csv", rows)
    write_table(tmp_path / "validation.csv", [{"text": "v", "y": "neutral"}])
    td = D.load_task_data(data=tmp_path, label_column="y")
    assert td.labels == ["neg", "neutral", "pos"]
    assert td.train.labels == [2, 0, 1, 2] and td.eval.labels == [1]


def test_files_with_pair_columns(tmp_path: Path) -> None:
    rows = [{"q": f"q{i}", "a": f"a{i}", "label": i % 3} for i in range(9)]
    tr = write_table(tmp_path / "tr.jsonl", rows)
    ev = write_table(tmp_path / "ev.jsonl", rows[:3])
    td = D.load_task_data(data=tr, eval_data=ev, text_column="q", text_pair_column="a")
    assert td.train.pairs == [f"a{i}" for i in range(9)] and td.labels == ["0", "1", "2"]


def test_pair_columns_guessed(tmp_path: Path) -> None:
    rows = [{"sentence1": "x", "sentence2": "y", "label": i % 2} for i in range(4)]
    td = D.load_task_data(data=write_table(tmp_path / "a.csv", rows), eval_data=write_table(tmp_path / "b.csv", rows))
    assert td.source["columns"] == {"text": "sentence1", "text_pair": "sentence2", "label": "label"}


def _err(**kw: object) -> str:
    with pytest.raises(InstatuneError) as ei:
        D.load_task_data(**kw)  # type: ignore[arg-type]
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_errors(tmp_path: Path, tiny_data_dir: Path) -> None:
    assert "does not exist" in _err(data=tmp_path / "nope")
    assert "--eval-data" in _err(data=tiny_data_dir / "train.tsv")
    assert "no column 'txt'" in _err(data=tiny_data_dir, text_column="txt")
    assert "no column 'lab'" in _err(data=tiny_data_dir, label_column="lab")
    assert "unknown task" in _err(task="sst3", data=tiny_data_dir)
    (tmp_path / "e").mkdir()
    assert "no train file" in _err(data=tmp_path / "e")
    assert "both training and eval" in _err(data=tiny_data_dir / "train.tsv", eval_data=tiny_data_dir / "train.tsv")


def test_split_errors(tmp_path: Path) -> None:
    def pair(train_rows: list[dict], dev_rows: list[dict], name: str) -> Path:
        d = tmp_path / name
        (d / "train.tsv").parent.mkdir(parents=True)
        (d / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{r['s']}\t{r['l']}\n" for r in train_rows))
        (d / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{r['s']}\t{r['l']}\n" for r in dev_rows))
        return d

    ok = [{"s": "a", "l": 0}, {"s": "b", "l": 1}]
    assert "empty" in _err(data=pair(ok, [], "empty-dev"))
    assert "empty" in _err(data=pair([], ok, "empty-train"))
    assert "not a training class" in _err(data=pair(ok, [{"s": "c", "l": 2}], "unseen"))
    assert "0..C-1" in _err(data=pair([{"s": "a", "l": -1}, {"s": "b", "l": 1}], ok, "neg"))
    assert "single class" in _err(data=pair([{"s": "a", "l": 1}, {"s": "b", "l": 1}], ok, "one"))
    assert "real-valued" in _err(data=pair([{"s": "a", "l": 0.5}, {"s": "b", "l": 1}], ok, "reg"))
    assert "no label" in _err(data=pair([{"s": "a", "l": ""}, {"s": "b", "l": 1}], ok, "missing"))
    assert "outside the task's classes" in _err(task="sst2", data=pair([{"s": "a", "l": 2}, *ok], ok, "task"))


def test_hub_task_offline_says_use_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    msg = _err(task="sst2")
    assert "--data DIR" in msg


def test_jsonl_roundtrip_and_batches(tmp_path: Path, tiny_data_dir: Path, tiny_bert_dir: Path) -> None:
    from transformers import AutoTokenizer

    td = D.load_task_data(data=tiny_data_dir)
    D.write_jsonl(tmp_path / "e.jsonl", td.eval)
    back = D.read_jsonl(tmp_path / "e.jsonl")
    assert back.texts == td.eval.texts and back.labels == td.eval.labels and back.pairs is None
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    enc = D.tokenize(tok, td.eval, max_length=6)
    assert max(len(x) for x in enc.input_ids) <= 6 and enc.token_type_ids is not None
    b = enc.collate([0, 1, 2])
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert b["attention_mask"].sum(1).tolist() == [len(enc.input_ids[i]) for i in range(3)]
    batches = D.eval_batches(enc, batch_size=5)
    assert sum(len(x["labels"]) for x in batches) == len(td.eval)
    assert sorted(int(v) for x in batches for v in x["labels"]) == sorted(td.eval.labels)
