"""Text-classification data for tuning: load a task's train and eval splits, map labels, pre-tokenize.

Sources (one of):

- `--task NAME` alone: a GLUE task from the `datasets` hub (`nyu-mll/glue`), online or from a warm cache;
  offline without a cache it fails with a one-line message asking for `--data DIR`.
- `--data DIR`: a directory with `train.*` and `dev.*` / `dev_matched.*` / `validation.*` / ..., or
  `--data TRAIN_FILE --eval-data EVAL_FILE`. Formats by suffix: .tsv, .csv, .jsonl, .json (records or JSON
  lines), .parquet. `--task NAME` with `--data` names the task and supplies its columns and label names.

GLUE's own download (`glue_data/TASK/`) works as distributed with `--task`: CoLA's train/dev TSVs have no
header (source, label, original mark, sentence), MRPC's start with a UTF-8 byte-order mark and name their
columns `Quality`, `#1 String`, `#2 String`, QQP's label is `is_duplicate`, MNLI's `gold_label` and its dev
files are `dev_matched.tsv` / `dev_mismatched.tsv` (a directory evaluates on matched; pass `--eval-data
.../dev_mismatched.tsv` for the other). With `--task`, the files must fit the task: its text columns (the
hub's names or GLUE's file names, `GLUE_TASKS`) and labels within its classes, else one line says what was
found and what was expected (so `--task rte` on SST-2 files cannot silently relabel the classes).

Local files are read with the standard library (and pyarrow for parquet), not `datasets`: that writes no
cache, is fast, and lets every problem be reported as one line naming the file, line or row and column: an
empty or all-zero file, a NUL byte, a byte that is not UTF-8, UTF-16 text, a duplicate column name. A leading
byte-order mark is dropped. TSVs are read without quote processing (GLUE sentences contain unbalanced quotes).

Labels: integers are class ids and must be 0..C-1 (C = largest training id + 1, or the task's class count);
strings are mapped to ids in sorted order of the training labels (or the task's order). A label of the
eval split that is not a training class and a single-class training split are errors, and so are integer ids
with no training example (one row labelled 7 in binary data), a label that is a list or mapping (a JSONL
`[1, 2]`), and a missing one (`check_label_value`, `check_every_class_trained`). The eval split is never used
for training.

Regression (`--task stsb`, GLUE's STS-B with its float `score` in [0, 5], or a user's real-valued labels with a
regression metric, `--metric pearson`): every label must be a number and is kept as a float; the model gets
one output. Real-valued labels without asking for a regressor are refused in one line that says how to.

Tokenization happens once per run (no padding); batches are padded per batch.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instatune_cli.errors import InstatuneError
from instatune_cli.seeds import seed_int

if TYPE_CHECKING:
    import torch

FORMATS = (".tsv", ".csv", ".jsonl", ".json", ".parquet")
TRAIN_STEMS = ("train",)
# dev_matched: GLUE's MNLI download has no dev.tsv; its matched half is the eval split by default.
EVAL_STEMS = ("dev", "dev_matched", "validation", "validation_matched", "valid", "val", "eval")


@dataclass(frozen=True)
class GlueTask:
    """A GLUE classification task: its columns and class names on the hub, and where GLUE's own TSV download
    (`glue_data/`) differs: other column names, no header line (CoLA)."""

    text: str
    pair: str | None
    labels: tuple[str, ...]  # index = class id (the hub's ids; GLUE's files use the same ids or these names)
    eval_split: str  # on the hub
    file_columns: tuple[str, str | None, str] | None = None  # (text, pair, label) in GLUE's TSVs, if different
    headerless: tuple[str, ...] = ()  # column names of GLUE's train/dev TSVs when they have no header line
    regression: bool = False  # real-valued labels, one model output (STS-B); `labels` then names that output

    def layouts(self) -> list[tuple[str, str | None, str]]:
        """(text, pair, label) column names this task's data may come with: the hub's, then GLUE's files'."""
        hub = (self.text, self.pair, "label")
        return [hub, self.file_columns] if self.file_columns else [hub]

    def expected(self) -> str:
        return " or ".join(", ".join(repr(c) for c in lay if c) for lay in self.layouts())


GLUE_TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask("sentence", None, ("negative", "positive"), "validation"),
    "cola": GlueTask("sentence", None, ("unacceptable", "acceptable"), "validation",
                     headerless=("source", "label", "original_mark", "sentence")),
    "mrpc": GlueTask("sentence1", "sentence2", ("not_equivalent", "equivalent"), "validation",
                     ("#1 String", "#2 String", "Quality")),
    "qqp": GlueTask("question1", "question2", ("not_duplicate", "duplicate"), "validation",
                    ("question1", "question2", "is_duplicate")),
    "qnli": GlueTask("question", "sentence", ("entailment", "not_entailment"), "validation"),
    "rte": GlueTask("sentence1", "sentence2", ("entailment", "not_entailment"), "validation"),
    "wnli": GlueTask("sentence1", "sentence2", ("not_entailment", "entailment"), "validation"),
    "mnli": GlueTask("premise", "hypothesis", ("entailment", "neutral", "contradiction"), "validation_matched",
                     ("sentence1", "sentence2", "gold_label")),
    # GLUE's STS-B files: index, genre, filename, year, old_index, source1, source2, sentence1, sentence2, score
    "stsb": GlueTask("sentence1", "sentence2", ("score",), "validation", ("sentence1", "sentence2", "score"),
                     regression=True),
}
REGRESSION_LABELS = ["score"]  # a regressor's one output (TaskData.labels, the model's id2label)

_PAIR_GUESSES = (("sentence1", "sentence2"), ("question1", "question2"), ("question", "sentence"),
                 ("premise", "hypothesis"), ("#1 String", "#2 String"))
_TEXT_GUESSES = ("sentence", "text", "content", "review", "document", "sentence1", "question")
_LABEL_GUESSES = ("label", "labels", "class", "target", "y", "gold_label", "is_duplicate", "Quality")
_INT_RE = re.compile(r"^[+-]?\d+$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")


@dataclass
class Split:
    """One split as parallel columns: texts, optional second texts, labels (class ids, or floats for a
    regression task)."""

    texts: list[str]
    labels: list[Any]
    pairs: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int | None) -> Split:
        if n is None:
            return self
        return Split(self.texts[:n], self.labels[:n], self.pairs[:n] if self.pairs is not None else None)

    def subset(self, idx: Sequence[int]) -> Split:
        return Split([self.texts[i] for i in idx], [self.labels[i] for i in idx],
                     [self.pairs[i] for i in idx] if self.pairs is not None else None)


@dataclass
class TaskData:
    """Train, validation and eval splits of a classification task, with the label names (index = class id).

    `val` is what the search selects on (carved from the training data or a user file, see
    `with_validation`); `eval` is scored once, on the front only, so the reported figures are held out.
    """

    task: str
    train: Split
    eval: Split
    labels: list[str]
    source: dict[str, Any] = field(default_factory=dict)
    val: Split | None = None

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def regression(self) -> bool:
        """Real-valued labels (a regressor with one output): regression labels are always floats."""
        return any(isinstance(x, float) for x in self.train.labels[:1])

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))


# ---- reading local files ------------------------------------------------------------------------------

def read_records(path: str | Path, task: str | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """(column names, rows) of a .tsv/.csv/.jsonl/.json/.parquet file; one-line errors.

    `task` (a GLUE task name) lets a TSV without a header line be read with the task's GLUE column names.
    A file of 0 bytes gives no columns and no rows (the caller says which split is empty)."""
    p = Path(path)
    if not p.is_file():
        raise InstatuneError(f"data file {p} does not exist")
    suf = p.suffix.lower()
    if suf not in FORMATS:
        raise InstatuneError(f"{p}: unsupported data format {suf or '(no suffix)'}; use {', '.join(FORMATS)}")
    try:
        _refuse_all_zero(p)
        if suf in (".tsv", ".csv"):
            return _read_delimited(p, suf, task)
        if suf in (".jsonl", ".json"):
            return _read_json(p, suf)
        return _read_parquet(p)
    except InstatuneError:
        raise
    except (OSError, ValueError, csv.Error) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InstatuneError(f"cannot read {p}: {first}") from None


def _refuse_all_zero(p: Path) -> None:
    """A file of nothing but zero bytes (a preallocated or interrupted copy) is not data, nor 'empty'."""
    with open(p, "rb") as f:
        if f.read(1) != b"\x00":
            return
        f.seek(0)
        while chunk := f.read(1 << 20):
            if chunk.strip(b"\x00"):
                return
    raise InstatuneError(
        f"{p} is {p.stat().st_size} zero bytes, not a text file (an interrupted or preallocated copy?); "
        "copy or export it again")


def _text_lines(p: Path) -> Iterator[str]:
    """The decoded lines of a UTF-8 file, without a leading byte-order mark. A NUL byte, UTF-16 text and a
    byte that is not UTF-8 are one-line errors naming the line (`csv` and `json` would name neither)."""
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                raise InstatuneError(f"{p} is UTF-16 text; save it as UTF-8 (e.g. iconv -f utf-16 -t utf-8)")
            if b"\x00" in raw:
                raise InstatuneError(
                    f"{p} line {lineno} has a NUL byte: it is not a text file (binary or compressed?); "
                    "give UTF-8 text")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InstatuneError(
                    f"{p} line {lineno} has the byte 0x{raw[e.start]:02x} (byte {e.start + 1} of the line), which "
                    "is not UTF-8; convert the file to UTF-8 (e.g. iconv -f cp1252 -t utf-8)") from None
            yield line[1:] if lineno == 1 and line.startswith("\ufeff") else line


def _check_unique(p: Path, names: Sequence[str]) -> None:
    """Duplicate column names would silently collapse into one column; refuse them naming the column."""
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise InstatuneError(
                f"{p}: the header names column {n!r} twice (columns {seen[n] + 1} and {i + 1}){_data_hint(names)}; "
                "give every column its own name")
        seen[n] = i


def _data_hint(header: Sequence[str]) -> str:
    """A hint when a 'header' is really a data row (a file without a header line, like GLUE's CoLA)."""
    if any(_INT_RE.match(h.strip()) for h in header):
        return (" (its first line looks like data, not a header: add a header line, or pass --task cola for "
                "GLUE's CoLA files, which have none)")
    return ""


def _is_headerless(first: Sequence[str], task: str | None) -> bool:
    """Whether `first` is a data row of the task's header-less GLUE layout (CoLA: source, label, mark, text)."""
    t = GLUE_TASKS.get(task or "")
    if t is None or not t.headerless or len(first) != len(t.headerless) or t.text in first:
        return False
    lab = first[t.headerless.index("label")].strip()
    return bool(_INT_RE.match(lab)) and 0 <= int(lab) < len(t.labels)


def _read_delimited(p: Path, suf: str, task: str | None) -> tuple[list[str], list[dict[str, Any]]]:
    lines = _text_lines(p)
    reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE) if suf == ".tsv" else csv.reader(lines)
    first = next(reader, None)
    if first is None:
        return [], []
    rows_in: list[list[str]] = []
    if suf == ".tsv" and _is_headerless(first, task):
        header = list(GLUE_TASKS[str(task)].headerless)
        rows_in.append(first)
    else:
        header = [h.strip() for h in first]
    _check_unique(p, header)
    rows = []
    for r in itertools.chain(rows_in, reader):
        if not r or (len(r) == 1 and not r[0].strip()):
            continue
        if len(r) != len(header):
            raise InstatuneError(
                f"{p} line {reader.line_num} has {len(r)} fields but the header has {len(header)}")
        rows.append(dict(zip(header, r, strict=True)))
    return header, rows


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _read_json(p: Path, suf: str) -> tuple[list[str], list[dict[str, Any]]]:
    lines = list(_text_lines(p))
    whole = "".join(lines) if suf == ".json" else ""
    if whole.lstrip().startswith("["):
        try:
            recs = json.loads(whole, object_pairs_hook=_unique_keys)
        except _DuplicateKey as e:
            raise InstatuneError(f"{p}: a record names key {e.args[0]!r} twice; give every key its own name") from None
    else:
        recs = []
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                recs.append(json.loads(line, object_pairs_hook=_unique_keys))
            except _DuplicateKey as e:
                raise InstatuneError(
                    f"{p} line {lineno} names key {e.args[0]!r} twice; give every key its own name") from None
            except json.JSONDecodeError as e:
                raise InstatuneError(f"{p} line {lineno} is not valid JSON ({e.msg})") from None
    if not all(isinstance(r, dict) for r in recs):
        raise InstatuneError(f"{p} must hold JSON objects (one record per line)")
    cols: dict[str, None] = {}
    for r in recs:
        cols.update(dict.fromkeys(r))
    return list(cols), recs


def _read_parquet(p: Path) -> tuple[list[str], list[dict[str, Any]]]:
    import pyarrow.parquet as pq

    _check_unique(p, pq.read_schema(p).names)  # read_table would fail on a duplicate without naming it
    table = pq.read_table(p)
    return list(table.column_names), table.to_pylist()


def find_split_files(directory: str | Path) -> tuple[Path, Path | None]:
    """(train file, eval file or None) in a data directory: train.* and dev.*/dev_matched.*/validation.*/..."""
    d = Path(directory)

    def first(stems: Iterable[str]) -> Path | None:
        for stem in stems:
            for suf in FORMATS:
                if (d / f"{stem}{suf}").is_file():
                    return d / f"{stem}{suf}"
        return None

    train = first(TRAIN_STEMS)
    if train is None:
        raise InstatuneError(
            f"{d} has no train file; expected train.tsv, train.csv, train.jsonl, train.json or train.parquet"
        )
    return train, first(EVAL_STEMS)


def _require_rows(p: Path, rows: list[dict[str, Any]], what: str) -> None:
    """Say which split is empty, and whether the file is 0 bytes or a header without rows."""
    if rows:
        return
    if p.stat().st_size == 0:
        raise InstatuneError(f"{what} {p} is empty (0 bytes); copy or export it again")
    raise InstatuneError(f"{what} {p} is empty: it has no data rows; give a file with a header and labelled rows")


# ---- columns and labels -------------------------------------------------------------------------------

@dataclass
class Columns:
    text: str
    label: str
    pair: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "text_pair": self.pair, "label": self.label}


def choose_columns(columns: Sequence[str], where: str, text: str | None = None, pair: str | None = None,
                   label: str | None = None, task: str | None = None) -> Columns:
    """Explicit columns win; then the task's (which must be there); then common names. One-line errors."""
    cols = list(columns)
    have = set(cols)
    if task is not None and task in GLUE_TASKS:
        text, pair, label = _task_columns(task, cols, where, text, pair, label)
    if text is None:
        for a, b in _PAIR_GUESSES:
            if a in have and b in have and pair is None:
                text, pair = a, b
                break
        else:
            text = next((c for c in _TEXT_GUESSES if c in have), None)
    if text is None:
        raise InstatuneError(
            f"{where}: cannot tell the text column among {_show(cols)}{_data_hint(cols)}; pass --text-column")
    if label is None:
        label = next((c for c in _LABEL_GUESSES if c in have), None)
        if label is None:
            raise InstatuneError(
                f"{where}: cannot tell the label column among {cols}{_test_hint(where)}; pass --label-column")
    for opt, c in (("--text-column", text), ("--text-pair-column", pair), ("--label-column", label)):
        if c is not None and c not in have:
            raise InstatuneError(f"{where} has no column {c!r} ({opt}); its columns are {cols}{_test_hint(where)}")
    return Columns(text, label, pair)


def _show(cols: Sequence[str], width: int = 40) -> str:
    """Column names for a message, long ones cut (a header-less file's 'names' are whole sentences)."""
    return "[" + ", ".join(repr(c if len(c) <= width else c[:width] + "...") for c in cols) + "]"


def _test_hint(where: str) -> str:
    return " (GLUE's test files have no labels: evaluate on dev)" if Path(where).name.startswith("test") else ""


def _task_columns(task: str, cols: list[str], where: str, text: str | None, pair: str | None,
                  label: str | None) -> tuple[str | None, str | None, str | None]:
    """The task's columns in `cols` (hub or GLUE-file names), after any the user named; a file that has
    neither layout does not fit the task (the user's explicit --text-column is trusted)."""
    t = GLUE_TASKS[task]
    have = set(cols)
    fit = next((lay for lay in t.layouts() if lay[0] in have and (lay[1] is None or lay[1] in have)), None)
    if fit is None and text is None:
        raise InstatuneError(
            f"{where} does not fit --task {task}: found columns {_show(cols)}{_data_hint(cols)}, expected "
            f"{t.expected()}; check --task, or name the columns with --text-column/--text-pair-column/--label-column")
    if fit is not None:
        text = text or fit[0]
        pair = pair or (fit[1] if fit[0] == text else None)
        label = label or next((lay[2] for lay in (fit, *t.layouts()) if lay[2] in have), None)
    if t.pair is not None and pair is None:
        raise InstatuneError(
            f"{where}: --task {task} classifies pairs of texts but no second text column was found among {cols}; "
            "pass --text-pair-column")
    return text, pair, label


def _norm_label(v: Any) -> int | str | float | None:
    """Raw label -> int (class id), str (name), float (non-integer number) or None (missing)."""
    if v is None:
        return None
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if math.isnan(v):
            return None
        return int(v) if v.is_integer() else v
    s = str(v).strip()
    if not s:
        return None
    if _INT_RE.match(s):
        return int(s)
    if _FLOAT_RE.match(s):
        f = float(s)
        return int(f) if f.is_integer() else f
    return s


def _extract(rows: list[dict[str, Any]], cols: Columns, where: str) -> tuple[list[str], list[str] | None, list[Any]]:
    texts: list[str] = []
    pairs: list[str] | None = [] if cols.pair else None
    labels: list[Any] = []
    for i, r in enumerate(rows):
        t = r.get(cols.text)
        if t is None:
            raise InstatuneError(f"{where} row {i + 1} has no text in column {cols.text!r}")
        texts.append(str(t))
        if pairs is not None:
            tp = r.get(cols.pair)
            if tp is None:
                raise InstatuneError(f"{where} row {i + 1} has no text in column {cols.pair!r}")
            pairs.append(str(tp))
        check_label_value(r.get(cols.label), where, i + 1)
        lab = _norm_label(r.get(cols.label))
        if lab is None:
            raise InstatuneError(
                f"{where} row {i + 1} has no label in column {cols.label!r}; every training and eval row needs one"
            )
        labels.append(lab)
    return texts, pairs, labels


def map_labels(train: list[Any], evals: list[Any], names: Sequence[str] | None = None,
               where: tuple[str, str] = ("train split", "eval split"),
               task: str | None = None, regression: bool = False) -> tuple[list[Any], list[Any], list[str]]:
    """Raw labels -> (train ids, eval ids, names), or (train floats, eval floats, REGRESSION_LABELS) for a
    regression task. See the module docstring for the rules."""
    wt, we = where
    if regression:
        tr = regression_labels(train, wt)
        if len(set(tr)) < 2:
            raise InstatuneError(f"{wt} has one label value ({tr[0] if tr else 'none'}) for every row; a regressor "
                                 "needs labels that vary")
        return tr, regression_labels(evals, we), list(REGRESSION_LABELS)
    check_class_labels(train, wt)
    check_class_labels(evals, we)
    for lst, w in ((train, wt), (evals, we)):
        bad = next((x for x in lst if isinstance(x, float)), None)
        if bad is not None:
            raise InstatuneError(
                f"{w} has the real-valued label {bad}; to train a regressor pass --metric pearson (or spearman; "
                "--task stsb for GLUE's STS-B), for a classifier give class ids or names")
    if names is not None:
        return _task_labels(train, evals, list(names), where, task or "the task")

    if not train:
        raise InstatuneError(f"{wt} is empty")
    kinds = {type(x) for x in train}
    if kinds == {int}:
        lo, hi = min(train), max(train)
        if lo < 0:
            raise InstatuneError(
                f"{wt} has label {lo}; integer labels must be class ids 0..C-1 "
                "(an unlabelled test split cannot be used)"
            )
        c = hi + 1
        for x in evals:
            if not isinstance(x, int) or not 0 <= x < c:
                raise InstatuneError(f"{we} has label {x!r}, which is not a training class (0..{c - 1})")
        if len(set(train)) < 2:
            raise InstatuneError(f"{wt} has a single class ({lo}); a classifier needs at least two")
        check_every_class_trained(train, c, wt)
        return list(train), list(evals), [str(i) for i in range(c)]
    strs = sorted({str(x) for x in train})
    if len(strs) < 2:
        raise InstatuneError(f"{wt} has a single class ({strs[0]!r}); a classifier needs at least two")
    ix = {n: i for i, n in enumerate(strs)}
    ev = []
    for x in evals:
        if str(x) not in ix:
            raise InstatuneError(f"{we} has label {x!r}, which is not a training class {strs}")
        ev.append(ix[str(x)])
    return [ix[str(x)] for x in train], ev, strs


def check_class_labels(raw: list[Any], where: str) -> None:
    """A class label is one scalar: a JSONL `[1, 2]` or `{"a": 1}` would otherwise become a class named "[1, 2]",
    and a missing label (null, empty) a class named "None" or ""."""
    for row, x in enumerate(raw, start=1):
        check_label_value(x, where, row)
        if x is None or (isinstance(x, str) and not x.strip()):
            raise InstatuneError(f"{where} row {row} has no label; every training and eval row needs one (an "
                                 "unlabelled test split cannot be used)")


def check_label_value(x: Any, where: str, row: int) -> None:
    """One raw label (as read from a JSONL/JSON/parquet cell) is a scalar, not a list or a mapping."""
    if isinstance(x, (list, tuple, dict, set)) or (hasattr(x, "shape") and getattr(x, "ndim", 0) > 0):
        raise InstatuneError(f"{where} row {row} has the label {str(x)[:60]!r} ({type(x).__name__}); a label is "
                             "one class id or name per row: fix the label column (or --label-column)")


def check_every_class_trained(train: list[int], classes: int, where: str) -> None:
    """Integer labels are class ids 0..C-1: a C-class model whose classes have no training example (one row
    labelled 7 in binary data makes classes 2-6) is refused, naming them."""
    missing = sorted(set(range(classes)) - set(train))
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise InstatuneError(f"{where} has class ids up to {classes - 1} but no training example of class {shown}; "
                             "integer labels must be the ids 0..C-1 of classes that all occur in training: fix the "
                             "stray labels (or raise --limit-train if a subset missed a class)")


def regression_labels(raw: list[Any], where: str) -> list[float]:
    """Real-valued labels as floats; a label that is not a number is one line naming its row."""
    out = []
    for row, x in enumerate(raw, start=1):
        if isinstance(x, str) or not isinstance(x, (int, float)):
            raise InstatuneError(f"{where} row {row} has label {x!r}, not a number; a regression task needs "
                                 "real-valued labels (drop --metric pearson/spearman to train a classifier)")
        out.append(float(x))
    return out


def _task_labels(train: list[Any], evals: list[Any], names: list[str], where: tuple[str, str],
                 task: str) -> tuple[list[int], list[int], list[str]]:
    """Labels of a named task: its class ids 0..C-1 or its class names, nothing else (a file of another task
    whose labels happen to be 0/1 is caught by its columns, see `_task_columns`)."""
    name_ix = {n: i for i, n in enumerate(names)}
    classes = f"{task}: " + ", ".join(f"{i}={n}" for i, n in enumerate(names))

    def ids(lst: list[Any], w: str) -> list[int]:
        out = []
        for row, x in enumerate(lst, start=1):
            if isinstance(x, int) and not 0 <= x < len(names):
                raise InstatuneError(f"{w} row {row} has label {x}, outside the task's classes 0..{len(names) - 1} "
                                     f"({classes}); check --task and --label-column")
            if not isinstance(x, int) and x not in name_ix:
                raise InstatuneError(f"{w} row {row} has label {x!r}, not one of the task's classes ({classes}); "
                                     "check --task and --label-column")
            out.append(x if isinstance(x, int) else name_ix[x])
        return out

    tr = ids(train, where[0])
    if len(set(tr)) < 2:
        raise InstatuneError(f"{where[0]} has a single class ({names[tr[0]]!r}); a classifier needs at least two")
    return tr, ids(evals, where[1]), names


# ---- loading a task -----------------------------------------------------------------------------------

def load_task_data(task: str | None = None, data: str | Path | None = None, eval_data: str | Path | None = None,
                   text_column: str | None = None, text_pair_column: str | None = None,
                   label_column: str | None = None, limit_train: int | None = None,
                   limit_eval: int | None = None, regression: bool = False) -> TaskData:
    """Train and eval splits from a GLUE task name and/or local files (see the module docstring).
    `regression`: real-valued labels (a regression task such as stsb is one whatever this says)."""
    if task is not None:
        task = task.lower().replace("-", "")
        if task not in GLUE_TASKS:
            raise InstatuneError(
                f"unknown task {task!r}; known: {', '.join(sorted(GLUE_TASKS))} (or pass --data with your own files)"
            )
    for name, v in (("--limit-train", limit_train), ("--limit-eval", limit_eval)):
        if v is not None and v < 1:
            raise InstatuneError(f"{name} must be at least 1, got {v}")
    if data is None:
        if eval_data is not None:
            raise InstatuneError("--eval-data needs --data for the training split")
        if task is None:
            raise InstatuneError("no data: pass --task (e.g. sst2) or --data DIR with train and dev files")
        return _load_hub_glue(task, text_column, text_pair_column, label_column, limit_train, limit_eval)
    regression = regression or (task is not None and GLUE_TASKS[task].regression)
    train_f, eval_f = _split_files(Path(data).expanduser(), eval_data)
    tcols, trows = read_records(train_f, task)
    ecols, erows = read_records(eval_f, task)
    _require_rows(train_f, trows, "training split")
    _require_rows(eval_f, erows, "eval split")
    cols = choose_columns(tcols, str(train_f), text_column, text_pair_column, label_column, task)
    choose_columns(ecols, str(eval_f), cols.text, cols.pair, cols.label)
    if limit_train:
        trows = trows[:limit_train]
    if limit_eval:
        erows = erows[:limit_eval]
    tt, tp, tl = _extract(trows, cols, str(train_f))
    et, ep, el = _extract(erows, cols, str(eval_f))
    names = GLUE_TASKS[task].labels if task is not None else None
    tl_ids, el_ids, labels = map_labels(tl, el, names, (str(train_f), str(eval_f)), task, regression)
    source = {"kind": "files", "train": str(train_f.resolve()), "eval": str(eval_f.resolve()),
              "columns": cols.to_dict()}
    return TaskData(task or "custom", Split(tt, tl_ids, tp), Split(et, el_ids, ep), labels, source)


def _split_files(d: Path, eval_data: str | Path | None) -> tuple[Path, Path]:
    """(train file, eval file) from `--data` (a directory or a file) and `--eval-data`."""
    if d.is_dir():
        train_f, eval_f = find_split_files(d)
        if eval_data is not None:
            eval_f = Path(eval_data).expanduser()
        elif eval_f is None:
            raise InstatuneError(
                f"{d} has no dev/validation file (dev.tsv, dev_matched.tsv, validation.csv, ...); add one or pass "
                "--eval-data FILE")
    elif d.exists() or d.suffix.lower() in FORMATS:
        train_f = d
        if eval_data is None:
            raise InstatuneError(
                f"--data {d} is a single file; pass --eval-data FILE for the evaluation split "
                "(training data is never used for evaluation)"
            )
        eval_f = Path(eval_data).expanduser()
    else:
        raise InstatuneError(f"--data {d} does not exist; give a directory with train/dev files or a data file")
    if train_f.resolve() == eval_f.resolve():
        raise InstatuneError(f"{train_f} is given as both training and eval data; keep the eval split separate")
    return train_f, eval_f


def _load_hub_glue(task: str, text_column: str | None, pair_column: str | None, label_column: str | None,
                   limit_train: int | None, limit_eval: int | None) -> TaskData:
    t = GLUE_TASKS[task]
    names, eval_split = t.labels, t.eval_split
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        ds = datasets.load_dataset("nyu-mll/glue", task)
    except Exception as e:  # noqa: BLE001 - offline, missing cache, hub errors: all the same advice
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise InstatuneError(
            f"cannot load GLUE {task} from the datasets hub ({first}); offline, pass --data DIR with "
            "train.tsv and dev.tsv instead"
        ) from None
    cols = Columns(text_column or t.text, label_column or "label", pair_column or t.pair)

    def split(name: str, limit: int | None) -> tuple[list[str], list[str] | None, list[Any]]:
        part = ds[name]
        if limit:
            part = part.select(range(min(limit, len(part))))
        rows = part.to_list()
        choose_columns(part.column_names, f"GLUE {task} {name}", cols.text, cols.pair, cols.label)
        return _extract(rows, cols, f"GLUE {task} {name}")

    tt, tp, tl = split("train", limit_train)
    et, ep, el = split(eval_split, limit_eval)
    tl_ids, el_ids, labels = map_labels(tl, el, names, (f"GLUE {task} train", f"GLUE {task} {eval_split}"), task,
                                        t.regression)
    source = {"kind": "hub", "dataset": "nyu-mll/glue", "config": task, "eval_split": eval_split,
              "columns": cols.to_dict()}
    return TaskData(task, Split(tt, tl_ids, tp), Split(et, el_ids, ep), labels, source)


# ---- examples stored in a run directory ---------------------------------------------------------------

def write_jsonl(path: str | Path, split: Split) -> None:
    """One JSON object per example: text, (text_pair), label (class id, or a float for regression: written
    with its decimal point, which is how `read_jsonl` tells the kinds apart)."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(len(split)):
            rec: dict[str, Any] = {"text": split.texts[i]}
            if split.pairs is not None:
                rec["text_pair"] = split.pairs[i]
            rec["label"] = split.labels[i]
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> Split:
    """Inverse of `write_jsonl`."""
    _, rows = read_records(Path(path))
    if not rows:
        return Split([], [], None)
    pair = Columns("text", "label", "text_pair" if "text_pair" in rows[0] else None)
    texts, pairs, labels = _extract(rows, pair, str(path))
    if any(isinstance(r.get("label"), float) for r in rows):  # a regression split (see write_jsonl)
        return Split(texts, [float(x) for x in labels], pairs)
    return Split(texts, [int(x) for x in labels], pairs)


# ---- tokenization and batches -------------------------------------------------------------------------

@dataclass
class Encoded:
    """A pre-tokenized split: unpadded token ids per example (and token types when the model uses them)."""

    input_ids: list[list[int]]
    labels: list[Any]  # class ids, or floats (regression)
    token_type_ids: list[list[int]] | None = None
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list[int]:
        """Tokens per example (for length-grouped batches)."""
        return [len(x) for x in self.input_ids]

    def collate(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        """Pad the examples `idx` to the longest of them: input_ids, attention_mask, (token_type_ids), labels."""
        import torch

        n = max(len(self.input_ids[i]) for i in idx)
        ids = torch.full((len(idx), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), n), dtype=torch.long)
        tt = torch.zeros((len(idx), n), dtype=torch.long) if self.token_type_ids is not None else None
        for row, i in enumerate(idx):
            seq = self.input_ids[i]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
            if tt is not None:
                tt[row, : len(seq)] = torch.tensor(self.token_type_ids[i], dtype=torch.long)  # type: ignore[index]
        out = {"input_ids": ids, "attention_mask": mask}
        if tt is not None:
            out["token_type_ids"] = tt
        real = any(isinstance(x, float) for x in self.labels[:1])  # regression: float targets
        out["labels"] = torch.tensor([self.labels[i] for i in idx], dtype=torch.float32 if real else torch.long)
        return out

    def digest(self) -> str:
        """Content hash of the tokens and labels (part of a run's fingerprint)."""
        import hashlib

        h = hashlib.sha256()
        for i, seq in enumerate(self.input_ids):
            h.update(json.dumps([seq, self.labels[i]], separators=(",", ":")).encode())
        return h.hexdigest()[:16]


def tokenize(tokenizer: Any, split: Split, max_length: int, chunk: int = 2048) -> Encoded:
    """Tokenize once, truncated to `max_length`, unpadded."""
    ids: list[list[int]] = []
    types: list[list[int]] | None = None
    for s in range(0, len(split), chunk):
        texts = split.texts[s : s + chunk]
        pairs = split.pairs[s : s + chunk] if split.pairs is not None else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=False)
        ids.extend(enc["input_ids"])
        if "token_type_ids" in enc:
            types = (types or []) + list(enc["token_type_ids"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(ids, list(split.labels), types, pad)


def length_grouped(order: Sequence[int], lengths: Sequence[int], batch: int, rng: Any, mega: int = 50) -> list[int]:
    """`order` regrouped so that each run of `batch` indices has similar lengths (less padding), still random.

    Within each chunk of `mega` batches the examples are sorted by length and cut into batches; the full
    batches of the whole epoch are then shuffled with `rng` and any short remainder stays last (so batch k
    of the result is always `result[k*batch:(k+1)*batch]`). This is the length-grouped sampling of HF
    Trainer's `group_by_length`: on SST-2 a random batch of 32 pads to 3.0x its real tokens, a grouped one to
    1.05x, which makes a training step about twice as fast on a CPU.
    """
    batches: list[list[int]] = []
    for s in range(0, len(order), batch * mega):
        chunk = sorted(order[s : s + batch * mega], key=lambda i: -lengths[i])
        batches += [chunk[j : j + batch] for j in range(0, len(chunk), batch)]
    full = [b for b in batches if len(b) == batch]
    rest = [i for b in batches if len(b) < batch for i in b]
    rng.shuffle(full)
    return [i for b in full for i in b] + rest


def eval_batches(enc: Encoded, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
    """Batches for evaluation, grouped by length (little padding); order does not matter for accuracy."""
    order = sorted(range(len(enc)), key=lambda i: len(enc.input_ids[i]))
    return [enc.collate(order[s : s + batch_size]) for s in range(0, len(order), batch_size)]


# ---- the validation split -----------------------------------------------------------------------------

DEFAULT_VAL_FRACTION = 0.05
DEFAULT_VAL_CAP = 2000


def parse_val_split(spec: str | float | int | None) -> float | int | None:
    """`--val-split`: None -> the default (5 % capped at 2,000); "0.1" -> a fraction; "500" -> a count;
    "0" -> no validation split."""
    if spec is None:
        return None
    text = str(spec).strip()
    try:
        v = float(text)
    except ValueError:
        raise InstatuneError(f"--val-split {text!r} is neither a fraction (e.g. 0.05) nor a count (e.g. 500)") from None
    if v < 0 or math.isnan(v):
        raise InstatuneError(f"--val-split must be >= 0, got {text}")
    if v < 1 and "." in text or 0 < v < 1:
        return v
    if not v.is_integer():
        raise InstatuneError(f"--val-split {text}: a count must be a whole number, a fraction below 1")
    return int(v)


def with_validation(data: TaskData, val_split: str | float | int | None = None, val_data: str | Path | None = None,
                    seed: int = 42, columns: Columns | None = None) -> TaskData:
    """`data` with a validation split: rows of `val_data` (same columns and classes as training), or a seeded
    random sample carved out of the training split (which loses those rows). Deterministic for a seed."""
    if val_data is not None:
        if val_split is not None:
            raise InstatuneError("give either --val-split or --val-data, not both")
        return _val_from_file(data, Path(val_data).expanduser(), columns)
    n_train = len(data.train)
    v = parse_val_split(val_split)
    if v == 0:
        return data
    if v is None:
        n = min(DEFAULT_VAL_CAP, max(1, round(DEFAULT_VAL_FRACTION * n_train)))
        how = f"default {DEFAULT_VAL_FRACTION:g} of training, at most {DEFAULT_VAL_CAP}"
    elif isinstance(v, float):
        n = max(1, round(v * n_train))
        how = f"fraction {v:g} of training"
    else:
        n = v
        how = f"{v} training examples"
    if n >= n_train:
        raise InstatuneError(
            f"--val-split {val_split if val_split is not None else 'default'} takes {n} of the {n_train} training "
            "examples and leaves none to train on; give a smaller fraction or count")
    import random

    order = list(range(n_train))
    random.Random(seed_int("val-split", seed)).shuffle(order)
    val_idx = sorted(order[:n])
    taken = set(val_idx)
    train_idx = [i for i in range(n_train) if i not in taken]
    source = {**data.source, "val": {"kind": "carved", "rule": how, "seed": seed, "examples": n}}
    return TaskData(data.task, data.train.subset(train_idx), data.eval, data.labels, source,
                    data.train.subset(val_idx))


def _val_from_file(data: TaskData, path: Path, columns: Columns | None) -> TaskData:
    cols_in, rows = read_records(path, data.task if data.task in GLUE_TASKS else None)
    _require_rows(path, rows, "validation file")
    cols = columns or choose_columns(cols_in, str(path), task=data.task)
    choose_columns(cols_in, str(path), cols.text, cols.pair, cols.label)
    texts, pairs, raw = _extract(rows, cols, str(path))
    if data.regression:
        source = {**data.source, "val": {"kind": "file", "path": str(path.resolve()), "examples": len(rows)}}
        return TaskData(data.task, data.train, data.eval, data.labels, source,
                        Split(texts, regression_labels(raw, f"validation file {path}"), pairs))
    ix = {n: i for i, n in enumerate(data.labels)}
    labels: list[int] = []
    for r, x in enumerate(raw):
        key = str(x)
        if key in ix:
            labels.append(ix[key])
        elif isinstance(x, int) and data.task in GLUE_TASKS and 0 <= x < len(data.labels):
            labels.append(x)  # a GLUE task's class id
        else:
            raise InstatuneError(
                f"validation file {path} row {r + 1} has label {x!r}, which the training data lacks "
                f"(classes: {data.labels})")
    source = {**data.source, "val": {"kind": "file", "path": str(path.resolve()), "examples": len(rows)}}
    return TaskData(data.task, data.train, data.eval, data.labels, source, Split(texts, labels, pairs))
