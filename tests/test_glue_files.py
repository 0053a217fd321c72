"""GLUE's own TSV download (`glue_data/TASK/`) read as users have it, files that do not fit the task, and files
that are not text: every bad input is one line naming the file and what to do (docs/architecture.md, data.py).

The fixtures in tests/fixtures/glue_raw/ copy the byte layout of GLUE's download with a few rows each:
CoLA's train/dev without a header, MRPC's UTF-8 byte-order mark, unbalanced quotes, MNLI's dev_matched /
dev_mismatched files.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_cli_error, run_cli, tiny_tune_args, write_table

from instatune_cli import data as D
from instatune_cli.errors import InstatuneError

GLUE = Path(__file__).parent / "fixtures" / "glue_raw"


def err(**kw: object) -> str:
    """The one-line InstatuneError of `load_task_data(**kw)`."""
    with pytest.raises(InstatuneError) as ei:
        D.load_task_data(**kw)  # type: ignore[arg-type]
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_fixtures_have_glue_byte_layout() -> None:
    """The fixtures really carry what GLUE's files carry (a re-save by an editor would lose it)."""
    for f in ("train.tsv", "dev.tsv"):
        assert (GLUE / "MRPC" / f).read_bytes().startswith(b"\xef\xbb\xbfQuality\t#1 ID\t#2 ID\t#1 String\t")
        first = (GLUE / "CoLA" / f).read_bytes().split(b"\n")[0].split(b"\t")
        assert len(first) == 4 and first[1] in (b"0", b"1") and b"sentence" not in first
    assert (GLUE / "CoLA" / "test.tsv").read_bytes().startswith(b"index\tsentence\n")
    assert b'"hello to her.' in (GLUE / "CoLA" / "train.tsv").read_bytes()
    assert not (GLUE / "MNLI" / "dev.tsv").exists()


@pytest.mark.parametrize("task,folder,n,first", [
    ("cola", "CoLA", (8, 5), ("Our friends won't buy this analysis, let alone the next one we propose.", None, 1)),
    ("mrpc", "MRPC", (6, 5), ('Amrozi accused his brother , whom he called " the witness " , of lying .',
                              'Referring to him as only " the witness " , Amrozi accused his brother of lying .', 1)),
    ("sst2", "SST-2", (6, 5), ("hide new secretions from the parental units ", None, 0)),
    ("rte", "RTE", (6, 5), ("No Weapons of Mass Destruction Found in Iraq Yet.",
                            "Weapons of Mass Destruction Found in Iraq.", 1)),
    ("qnli", "QNLI", (5, 4), ("When did the third Digimon series begin?",
                              "Unlike the two seasons before it, the third series is darker.", 1)),
    ("qqp", "QQP", (5, 3), ("How is the life of a math student?",
                            "Which level of prepration is enough for the exam jlpt5?", 0)),
    ("mnli", "MNLI", (6, 4), ("Conceptually cream skimming has two basic dimensions.",
                              "Product and geography are what make cream skimming work.", 1)),
    ("wnli", "WNLI", (4, 2), ("I stuck a pin through a carrot. When I pulled the pin out, it had a hole.",
                              "The carrot had a hole.", 1)),
])
def test_task_reads_glue_files_as_distributed(task: str, folder: str, n: tuple[int, int],
                                              first: tuple[str, str | None, int]) -> None:
    td = D.load_task_data(task=task, data=GLUE / folder)
    assert (len(td.train), len(td.eval)) == n and td.task == task
    assert td.labels == list(D.GLUE_TASKS[task].labels)
    text, pair, label = first
    assert td.train.texts[0] == text and td.train.labels[0] == label
    assert (td.train.pairs[0] if td.train.pairs else None) == pair


def test_cola_without_header_keeps_every_row_and_its_label() -> None:
    td = D.load_task_data(task="cola", data=GLUE / "CoLA")
    assert td.train.labels == [1, 1, 0, 1, 0, 1, 0, 1] and td.eval.labels == [1, 0, 1, 0, 1]
    assert td.train.texts[-1] == 'I said "hello to her.' and td.eval.texts[-1] == 'Mary said "yes.'
    assert td.source["columns"] == {"text": "sentence", "text_pair": None, "label": "label"}
    cols, rows = D.read_records(GLUE / "CoLA" / "train.tsv", "cola")
    assert cols == ["source", "label", "original_mark", "sentence"] and rows[2]["original_mark"] == "*"


def test_mrpc_byte_order_mark_is_not_part_of_a_column_name() -> None:
    cols, rows = D.read_records(GLUE / "MRPC" / "train.tsv")
    assert cols == ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"] and rows[0]["Quality"] == "1"
    td = D.load_task_data(task="mrpc", data=GLUE / "MRPC")
    assert td.source["columns"] == {"text": "#1 String", "text_pair": "#2 String", "label": "Quality"}
    assert td.train.labels == [1, 0, 1, 0, 1, 0]
    # without --task the GLUE file names are recognised too (labels are then the plain ids)
    plain = D.load_task_data(data=GLUE / "MRPC")
    assert plain.train.pairs == td.train.pairs and plain.labels == ["0", "1"]


def test_unbalanced_quotes_stay_literal() -> None:
    td = D.load_task_data(task="rte", data=GLUE / "RTE")
    assert td.train.texts[2].endswith('"it will ask.') and td.train.pairs[3] == 'The company is "ProMedica.'
    assert td.train.labels == [1, 0, 0, 1, 0, 1]  # entailment = 0, not_entailment = 1 (the hub's ids)


def test_mnli_evaluates_on_matched_and_mismatched_on_request() -> None:
    td = D.load_task_data(task="mnli", data=GLUE / "MNLI")
    assert td.source["eval"].endswith("dev_matched.tsv") and len(td.eval) == 4
    assert td.source["columns"]["label"] == "gold_label" and td.train.labels == [1, 0, 0, 0, 1, 2]
    mm = D.load_task_data(task="mnli", data=GLUE / "MNLI", eval_data=GLUE / "MNLI" / "dev_mismatched.tsv")
    assert mm.source["eval"].endswith("dev_mismatched.tsv") and mm.eval.labels == [2, 0, 1]


def test_validation_file_of_a_headerless_task() -> None:
    full = D.load_task_data(task="cola", data=GLUE / "CoLA")
    td = D.with_validation(full, None, GLUE / "CoLA" / "dev.tsv")
    assert td.val is not None and td.val.labels == [1, 0, 1, 0, 1]


# ---- files that do not fit the task -------------------------------------------------------------------

@pytest.mark.parametrize("task,folder,expect", [
    ("rte", "SST-2", "does not fit --task rte: found columns ['sentence', 'label'], "
                     "expected 'sentence1', 'sentence2', 'label'; check --task"),
    ("qnli", "RTE", "does not fit --task qnli: found columns ['index', 'sentence1', 'sentence2', 'label'], "
                    "expected 'question', 'sentence', 'label'"),
    ("cola", "RTE", "does not fit --task cola: found columns ['index', 'sentence1', 'sentence2', 'label']"),
    ("mrpc", "QQP", "expected 'sentence1', 'sentence2', 'label' or '#1 String', '#2 String', 'Quality'"),
    ("sst2", "CoLA", "does not fit --task sst2: found columns ['gj04', '1', '', \"Our friends won't buy"),
])
def test_files_of_another_task_are_refused_by_their_columns(task: str, folder: str, expect: str) -> None:
    msg = err(task=task, data=GLUE / folder)
    assert msg.startswith(str(GLUE / folder / "train.tsv")) and expect in msg


@pytest.mark.parametrize("task,folder,expect", [
    ("mnli", "RTE", "RTE/train.tsv row 1 has label 'not_entailment', not one of the task's classes "
                    "(mnli: 0=entailment, 1=neutral, 2=contradiction); check --task"),
    ("rte", "MNLI", "MNLI/train.tsv row 1 has label 'neutral', not one of the task's classes "
                    "(rte: 0=entailment, 1=not_entailment)"),
])
def test_labels_outside_the_task_are_refused(task: str, folder: str, expect: str) -> None:
    assert expect in err(task=task, data=GLUE / folder)


def test_integer_label_beyond_the_task_names_file_row_and_classes(tmp_path: Path) -> None:
    write_table(tmp_path / "train.tsv", [{"sentence": "a", "label": 0}, {"sentence": "b", "label": 1},
                                         {"sentence": "c", "label": 2}])
    write_table(tmp_path / "dev.tsv", [{"sentence": "d", "label": 1}])
    msg = err(task="sst2", data=tmp_path)
    assert msg == (f"{tmp_path / 'train.tsv'} row 3 has label 2, outside the task's classes 0..1 "
                   "(sst2: 0=negative, 1=positive); check --task and --label-column")


def test_single_class_training_split_is_refused_with_a_task(tmp_path: Path) -> None:
    write_table(tmp_path / "train.tsv", [{"sentence": "a", "label": 1}, {"sentence": "b", "label": 1}])
    write_table(tmp_path / "dev.tsv", [{"sentence": "d", "label": 1}])
    assert "has a single class ('positive')" in err(task="sst2", data=tmp_path)


def test_pair_task_with_only_a_named_text_column(tmp_path: Path) -> None:
    rows = [{"premise": "a", "label": 0}, {"premise": "b", "label": 1}]
    tr, dv = write_table(tmp_path / "tr.csv", rows), write_table(tmp_path / "dv.csv", rows)
    msg = err(task="rte", data=tr, eval_data=dv, text_column="premise")
    assert "--task rte classifies pairs of texts but no second text column" in msg and "--text-pair-column" in msg


def test_cola_files_without_task_say_pass_task_cola() -> None:
    msg = err(data=GLUE / "CoLA")
    assert "cannot tell the text column" in msg and "its first line looks like data, not a header" in msg
    assert "pass --task cola" in msg


def test_glue_test_file_as_eval_says_it_is_unlabelled() -> None:
    msg = err(task="cola", data=GLUE / "CoLA" / "train.tsv", eval_data=GLUE / "CoLA" / "test.tsv")
    assert "has no column 'label'" in msg and "GLUE's test files have no labels: evaluate on dev" in msg


# ---- files that are not text, or not one table --------------------------------------------------------

def _dir(tmp_path: Path, train: bytes, name: str = "train.tsv") -> Path:
    d = tmp_path / "d"
    d.mkdir()
    (d / name).write_bytes(train)
    (d / "dev.tsv").write_bytes(b"sentence\tlabel\nok\t1\n")
    return d


def test_zero_length_file_is_called_empty_with_its_size(tmp_path: Path) -> None:
    d = _dir(tmp_path, b"")
    assert err(data=d) == f"training split {d / 'train.tsv'} is empty (0 bytes); copy or export it again"


def test_header_only_file_is_empty(tmp_path: Path) -> None:
    d = _dir(tmp_path, b"sentence\tlabel\n")
    assert err(data=d) == (f"training split {d / 'train.tsv'} is empty: it has no data rows; give a file with a "
                           "header and labelled rows")


@pytest.mark.parametrize("name", ["train.tsv", "train.jsonl", "train.parquet"])
def test_all_zero_bytes_is_not_text(tmp_path: Path, name: str) -> None:
    d = _dir(tmp_path, b"\x00" * 4096, name)
    assert err(data=d) == (f"{d / name} is 4096 zero bytes, not a text file (an interrupted or preallocated "
                           "copy?); copy or export it again")


def test_nul_byte_names_its_line(tmp_path: Path) -> None:
    d = _dir(tmp_path, b"sentence\tlabel\ngood\t1\nba\x00d\t0\n")
    assert err(data=d) == (f"{d / 'train.tsv'} line 3 has a NUL byte: it is not a text file (binary or "
                           "compressed?); give UTF-8 text")


@pytest.mark.parametrize("name,body", [
    ("train.tsv", b"sentence\tlabel\ngood\t1\ncaf\xe9 noir\t0\n"),
    ("train.csv", b"sentence,label\ngood,1\ncaf\xe9 noir,0\n"),
    ("train.jsonl", b'{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": 0}\n'
                    b'{"sentence": "caf\xe9", "label": 1}\n'),
])
def test_non_utf8_byte_names_file_and_line(tmp_path: Path, name: str, body: bytes) -> None:
    d = _dir(tmp_path, body, name)
    msg = err(data=d)
    assert msg.startswith(f"{d / name} line 3 has the byte 0xe9 (byte ")
    assert msg.endswith("which is not UTF-8; convert the file to UTF-8 (e.g. iconv -f cp1252 -t utf-8)")


def test_non_utf8_in_eval_file_names_that_file(tmp_path: Path) -> None:
    d = _dir(tmp_path, b"sentence\tlabel\ngood\t1\nbad\t0\n")
    (d / "dev.tsv").write_bytes(b"sentence\tlabel\nna\xefve\t1\n")
    assert err(data=d).startswith(f"{d / 'dev.tsv'} line 2 has the byte 0xef (byte 3 of the line)")


def test_utf16_file_says_convert(tmp_path: Path) -> None:
    d = _dir(tmp_path, "sentence\tlabel\ngood\t1\n".encode("utf-16"))
    assert err(data=d) == f"{d / 'train.tsv'} is UTF-16 text; save it as UTF-8 (e.g. iconv -f utf-16 -t utf-8)"


def test_crlf_and_bom_in_a_csv(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.csv").write_bytes(b'\xef\xbb\xbftext,label\r\n"a, b",1\r\nc,0\r\n')
    (d / "dev.csv").write_bytes(b"text,label\r\nd,1\r\n")
    td = D.load_task_data(data=d)
    assert td.train.texts == ["a, b", "c"] and td.source["columns"]["text"] == "text"


@pytest.mark.parametrize("name,body,expect", [
    ("train.tsv", b"sentence\tlabel\tlabel\na\t0\t1\n",
     "the header names column 'label' twice (columns 2 and 3); give every column its own name"),
    ("train.csv", b"label,sentence, label\n0,a,1\n", "names column 'label' twice (columns 1 and 3)"),
    ("train.jsonl", b'{"sentence": "a", "label": 0}\n{"sentence": "b", "label": 1, "label": 0}\n',
     "line 2 names key 'label' twice; give every key its own name"),
])
def test_duplicate_column_is_refused_naming_it(tmp_path: Path, name: str, body: bytes, expect: str) -> None:
    d = _dir(tmp_path, body, name)
    msg = err(data=d)
    assert msg.startswith(str(d / name)) and expect in msg


def test_json_array_with_a_duplicate_key_is_refused(tmp_path: Path) -> None:
    d = _dir(tmp_path, b'\xef\xbb\xbf[{"sentence": "a", "label": 0}, {"sentence": "b", "label": 1}]', "train.json")
    assert D.load_task_data(data=d).train.texts == ["a", "b"]  # a byte-order mark before the array is dropped
    (d / "train.json").write_bytes(b'[{"sentence": "a", "label": 0}, {"sentence": "b", "label": 1, "label": 0}]')
    assert err(data=d) == f"{d / 'train.json'}: a record names key 'label' twice; give every key its own name"


def test_duplicate_parquet_column_is_refused(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "d"
    d.mkdir()
    pq.write_table(pa.table([pa.array(["a", "b"]), pa.array([0, 1]), pa.array([1, 0])],
                            names=["sentence", "label", "label"]), d / "train.parquet")
    write_table(d / "dev.parquet", [{"sentence": "c", "label": 1}])
    assert "names column 'label' twice (columns 2 and 3)" in err(data=d)


def test_headerless_file_with_repeated_values_hints_at_missing_header(tmp_path: Path) -> None:
    d = _dir(tmp_path, b"1\tgood\t1\n0\tbad\t0\n")
    msg = err(data=d)
    assert "names column '1' twice" in msg and "its first line looks like data, not a header" in msg


# ---- through the CLI: one line, non-zero exit, nothing written ----------------------------------------

def test_cli_wrong_task_is_one_line_and_writes_nothing(tmp_path: Path, tiny_bert_dir: Path) -> None:
    out = tmp_path / "run"
    r = run_cli(*tiny_tune_args(tiny_bert_dir, GLUE / "SST-2", out, "--task", "rte"))
    assert_cli_error(r, "does not fit --task rte", "found columns ['sentence', 'label']")
    assert r.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_tunes_on_headerless_cola(tmp_path: Path, tiny_bert_dir: Path, single_thread: None) -> None:
    import json

    out = tmp_path / "run"
    r = run_cli(*tiny_tune_args(tiny_bert_dir, GLUE / "CoLA", out, "--task", "cola", "--max-steps", "2",
                                "--val-split", "2"))
    assert r.exit_code == 0, r.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["model"]["metric"] == "mcc" and man["data"]["val_examples"] == 2
