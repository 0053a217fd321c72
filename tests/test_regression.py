"""Regression (GLUE STS-B): data in GLUE's own layout, MSE loss and MSE distillation, pearson / spearman,
tune -> search -> extract -> export on a tiny model, and the one-line refusals of mismatched metrics."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FILLER, NEGATIVE, POSITIVE, assert_cli_error, one_thread, run_cli, tiny_tune_config

from instatune_cli import data as D
from instatune_cli.errors import InstatuneError
from instatune_cli.measure import metrics as M
from instatune_cli.tune import loss as L

STSB_HEADER = ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
               "score")


def _sentence(rng: random.Random, pos: int) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
    for k in range(3):
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if k < pos else NEGATIVE))
    return " ".join(words)


def make_tiny_stsb(path: Path, n_train: int = 96, n_dev: int = 32) -> Path:
    """train.tsv / dev.tsv in GLUE's STS-B layout (10 columns, float score in [0, 5] written `%.3f`); the score
    is 5 x the share of positive sentiment words across both sentences, which a tiny model learns."""
    path.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 1), ("dev", n_dev, 2)):
        rng = random.Random(seed)
        lines = ["\t".join(STSB_HEADER)]
        for i in range(n):
            a, b = rng.randint(0, 3), rng.randint(0, 3)
            lines.append("\t".join([str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none",
                                    _sentence(rng, a), _sentence(rng, b), f"{5 * (a + b) / 6:.3f}"]))
        (path / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def stsb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_stsb(tmp_path_factory.mktemp("stsb") / "STS-B")


@pytest.fixture(scope="module")
def stsb_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, stsb_dir: Path) -> Path:
    from instatune_cli.tune.loop import run_tune

    out = tmp_path_factory.mktemp("stsb-run") / "run"
    with one_thread():
        # 60 steps: at 40 the tiny regressor is still at the edge of learning (dev Pearson 0.14 with tune's
        # defaults, 0.31 with the paper's Eq. 1 loss, validation negative for both); at 60 it is 0.75
        run_tune(tiny_tune_config(tiny_bert_dir, stsb_dir, out, task="stsb", max_steps=60, batch_size=16,
                                  val_split="16", eval_every=20))
    return out


# ---- metrics against independent references -------------------------------------------------------------

def test_pearson_and_spearman_match_references() -> None:
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 5, 200).round(1)  # rounding makes ties, which spearman must average
    x = y + rng.normal(0, 1.5, 200)
    x[:20] = x[0]  # ties in the predictions too
    # pearson from its definition, spearman from ranks computed by a double argsort with ties averaged by hand
    ref_p = float(np.corrcoef(x, y)[0, 1])
    assert M.pearson(x, y) == pytest.approx(ref_p, abs=1e-12)

    def avg_ranks(v: np.ndarray) -> np.ndarray:
        out = np.empty(len(v))
        for i, a in enumerate(v):
            out[i] = (v < a).sum() + ((v == a).sum() + 1) / 2
        return out

    assert M.rankdata(y) == pytest.approx(avg_ranks(y))
    assert M.spearman(x, y) == pytest.approx(float(np.corrcoef(avg_ranks(x), avg_ranks(y))[0, 1]), abs=1e-12)
    stats = pytest.importorskip("scipy.stats")
    assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-10)
    assert M.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-10)
    assert M.rankdata(x) == pytest.approx(stats.rankdata(x))
    assert M.score("spearman", x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-10)


def test_a_constant_or_anticorrelated_regressor_is_collapsed() -> None:
    y = np.linspace(0, 5, 50)
    const = M.regression_scores("pearson", np.full(50, 2.5), y)
    assert const["collapsed"] and const["constant_output"] and const["score"] == 0.0
    assert const["mse"] == pytest.approx(float(np.mean((y - 2.5) ** 2)))
    assert M.pearson(np.full(50, 2.5), y) is None  # undefined, not 0 by accident
    assert M.regression_scores("spearman", -y, y)["collapsed"]  # correlation -1
    good = M.regression_scores("pearson", y + np.sin(y), y)
    assert not good["collapsed"] and good["score"] > 0.9
    assert M.constant_score("pearson", [3, 1]) == 0.0


def test_collapse_rule_for_classification_metrics() -> None:
    labels = [1, 1, 1, 0]  # positive rate 0.75: always answering 1 scores f1 = 2 * 0.75 / 1.75
    assert M.constant_score("f1", [1, 3]) == pytest.approx(1.5 / 1.75)
    assert M.constant_score("accuracy", [1, 3]) == 0.75 and M.constant_score("mcc", [1, 3]) == 0.0
    # varied predictions whose f1 is below always-positive's: collapsed although two classes are predicted
    varied = [1, 0, 1, 1]  # tp 2, fp 1, fn 1: f1 0.667 < 0.857
    flags = M.collapse_of("f1", M.confusion(varied, labels))
    assert not flags["single_class"] and flags["collapsed"]
    # MCC below 0 (anti-correlated) and exactly 0 are collapsed; above 0 is not
    assert M.score("mcc", [0, 1, 1, 1], [1, 0, 1, 1]) < 0
    assert M.collapse_of("mcc", M.confusion([0, 1, 1, 1], [1, 0, 1, 1]))["collapsed"]
    assert M.collapse_of("mcc", M.confusion([1, 1, 1, 1], labels))["collapsed"]
    assert not M.collapse_of("mcc", M.confusion([1, 1, 1, 0], labels))["collapsed"]
    assert not M.collapse_of("f1", M.confusion([1, 1, 1, 0], labels))["collapsed"]


def test_metric_kind_must_match_the_task() -> None:
    assert M.check_metric_kind("spearman", True) == "spearman"
    with pytest.raises(InstatuneError, match="regression task.*pearson or spearman"):
        M.check_metric_kind("accuracy", True, "--task stsb")
    with pytest.raises(InstatuneError, match="scores a regressor.*classification task"):
        M.check_metric_kind("pearson", False, "--task sst2")
    assert M.default_metric("stsb") == "pearson" and M.default_metric(None, regression=True) == "pearson"
    assert M.format_score("pearson", 0.87312) == "0.8731" and M.format_score("accuracy", 0.87312) == "87.31%"


# ---- data ------------------------------------------------------------------------------------------------

def test_glue_stsb_files_load_as_regression(stsb_dir: Path) -> None:
    td = D.load_task_data("stsb", stsb_dir)
    assert td.regression and td.labels == ["score"] and td.num_labels == 1
    assert all(isinstance(x, float) and 0 <= x <= 5 for x in td.train.labels + td.eval.labels)
    assert td.train.pairs is not None and td.source["columns"] == {"text": "sentence1", "text_pair": "sentence2",
                                                                   "label": "score"}
    carved = D.with_validation(td, "10", seed=1)
    assert carved.regression and len(carved.val) == 10 and isinstance(carved.val.labels[0], float)


def test_a_validation_file_for_a_regressor(stsb_dir: Path, tmp_path: Path) -> None:
    td = D.load_task_data("stsb", stsb_dir)
    val = tmp_path / "val.tsv"
    val.write_text((stsb_dir / "dev.tsv").read_text())
    got = D.with_validation(td, val_data=val)
    assert got.val is not None and got.val.labels == td.eval.labels and got.regression
    lines = val.read_text().splitlines()
    val.write_text("\n".join([lines[0], lines[1].rsplit("\t", 1)[0] + "\thigh", *lines[2:]]) + "\n")
    with pytest.raises(InstatuneError, match="row 1 has label 'high', not a number"):
        D.with_validation(td, val_data=val)


def test_regression_splits_round_trip_as_floats(tmp_path: Path, stsb_dir: Path) -> None:
    td = D.load_task_data("stsb", stsb_dir)
    D.write_jsonl(tmp_path / "eval.jsonl", td.eval)
    back = D.read_jsonl(tmp_path / "eval.jsonl")
    assert back.labels == td.eval.labels and all(isinstance(x, float) for x in back.labels)
    batch = D.Encoded([[1, 2], [3]], [5.0, 2.4]).collate([0, 1])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == pytest.approx([5.0, 2.4])


def test_own_real_valued_labels_need_a_regression_metric(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": 0.5 * i} for i in range(8)]
    for name in ("train", "dev"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InstatuneError, match="--metric pearson"):
        D.load_task_data(data=tmp_path)
    td = D.load_task_data(data=tmp_path, regression=True)
    assert td.regression and td.train.labels[3] == 1.5
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": "pos"}) + "\n"
                                                  for i in range(8)))
    with pytest.raises(InstatuneError, match="not a number"):
        D.load_task_data(data=tmp_path, regression=True)


# ---- loss --------------------------------------------------------------------------------------------------

def test_regression_loss_is_mse_and_distillation_is_mse_to_the_detached_teacher() -> None:
    torch.manual_seed(0)
    y = torch.rand(6) * 5
    sup = torch.randn(6, 1, requires_grad=True)
    sub = torch.randn(6, 1, requires_grad=True)
    teacher = torch.randn(6, 1)
    assert L.ce(sup, y).item() == pytest.approx(((sup.view(-1) - y) ** 2).mean().item())
    assert L.kd(sub, teacher, rho=4.0).item() == pytest.approx(((sub - teacher) ** 2).mean().item())  # no ρ
    w = L.LossWeights(alpha=0.3, rho=2.0, gamma=0.0)
    term = L.sub_term(sub, y, sup, w)
    expect = 0.3 * ((sub.view(-1) - y) ** 2).mean() + 0.7 * ((sub - sup.detach()) ** 2).mean()
    assert term.item() == pytest.approx(expect.item())
    term.backward()
    assert sup.grad is None  # the super-network is not pulled towards its sub-network
    wt = L.LossWeights(alpha=0.3, rho=2.0, gamma=1.0)
    plain = L.plain_loss(sup, y, wt, teacher)
    assert plain.item() == pytest.approx((0.3 * ((sup.view(-1) - y) ** 2).mean()
                                          + 0.7 * ((sup - teacher) ** 2).mean()).item())
    total = L.instatune_loss(sup, [sub], y, wt, teacher)
    pieces = L.super_term(sup, y, wt, teacher) + L.sub_term(sub, y, sup, wt, teacher)
    assert total.item() == pytest.approx(pieces.item())


# ---- the pipeline ----------------------------------------------------------------------------------------

def test_stsb_tunes_as_a_regressor(stsb_run: Path) -> None:
    from instatune_cli import artifacts

    art = artifacts.load(stsb_run, "tune")
    assert art.model["metric"] == "pearson" and art.model["problem_type"] == "regression"
    assert art.model["num_labels"] == 1
    m = art.metrics
    assert "super_accuracy" not in m and {"super_pearson", "super_mse", "super_val_pearson"} <= set(m)
    assert m["super_pearson"] > 0.3 and not m["super_collapsed"]  # it learned the tiny task
    cfg = json.loads((stsb_run / "model" / "config.json").read_text())
    assert cfg["num_labels"] == 1 if "num_labels" in cfg else len(cfg["id2label"]) == 1
    assert cfg["problem_type"] == "regression"
    assert isinstance(D.read_jsonl(stsb_run / "val.jsonl").labels[0], float)
    evals = [r for r in (json.loads(x) for x in (stsb_run / "log.jsonl").read_text().splitlines())
             if r["event"] == "eval"]
    assert evals and "super_pearson" in evals[0]


def test_stsb_searches_extracts_and_exports(stsb_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "search"
    with one_thread():
        r = run_cli("search", stsb_run, "-o", out, "--evals", "8", "--population", "4", "--metric", "spearman",
                    "--pick", "max-drop=50")
    assert r.exit_code == 0, r.output
    front = json.loads((out / "front.json").read_text())
    assert front["metric"] == "spearman" and front["front"]
    assert all(-1 <= x["acc"] <= 1 and "mse" in x and "eval_mse" in x and "accuracy" not in x for x in front["front"])
    assert "spearman" in r.output and "%" not in r.output.split("Pareto front")[1].split("wrote")[0]
    picked = [x for x in front["front"] if x.get("picked")]
    assert all(not x["collapsed"] for x in picked)
    with one_thread():
        r = run_cli("search", stsb_run, "-o", tmp_path / "s2", "--evals", "6", "--population", "3")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s2" / "front.json").read_text())["metric"] == "pearson"
    with one_thread():
        r = run_cli("export", out, "--subnet", "1", "--int8", "--runs", "2", "--no-compare")
    assert r.exit_code == 0, r.output
    assert "pearson on" in r.output
    from transformers import AutoModelForSequenceClassification

    small = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "search-subnet1"))
    assert small.config.num_labels == 1 and small.config.problem_type == "regression"
    man = json.loads((tmp_path / "search-subnet1-onnx" / "manifest.json").read_text())
    acc = man["metrics"]["int8"]["accuracy"]
    assert acc["fp32"]["metric"] == "pearson" and -1 <= acc["fp32"]["score"] <= 1


@pytest.mark.parametrize("args,frags", [
    (("--task", "stsb", "--metric", "accuracy"), ("--metric accuracy", "regression", "pearson or spearman")),
    (("--task", "sst2", "--metric", "pearson"), ("--metric pearson", "classification task")),
])
def test_bad_metric_for_the_task_is_one_line(tiny_bert_dir: Path, stsb_dir: Path, tmp_path: Path,
                                            args: tuple[str, ...], frags: tuple[str, ...]) -> None:
    r = run_cli("tune", tiny_bert_dir, "--data", stsb_dir, "-o", tmp_path / "run", *args)
    assert_cli_error(r, *frags)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_real_valued_labels_without_a_regression_metric_is_one_line(tiny_bert_dir: Path, tmp_path: Path) -> None:
    rows = [{"sentence": f"good film {i}", "label": 0.25 * i} for i in range(12)]
    (tmp_path / "data").mkdir()
    for name in ("train", "dev"):
        (tmp_path / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli("tune", tiny_bert_dir, "--data", tmp_path / "data", "-o", tmp_path / "run")
    assert_cli_error(r, "real-valued label", "--metric pearson")


def test_search_metric_of_the_other_kind_is_one_line(stsb_run: Path, tiny_tune_run: Path, tmp_path: Path) -> None:
    assert_cli_error(run_cli("search", stsb_run, "-o", tmp_path / "a", "--metric", "accuracy"),
                     "regression task", "pearson or spearman")
    assert_cli_error(run_cli("search", tiny_tune_run, "-o", tmp_path / "b", "--metric", "pearson"),
                     "classification task")
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()


def test_hub_stsb_loads_as_regression(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub's `stsb` (nyu-mll/glue: sentence1, sentence2, float label), with `datasets` stood in for offline."""
    datasets = pytest.importorskip("datasets")
    rows = {"sentence1": ["a b", "c d", "e f"], "sentence2": ["a c", "c e", "f g"], "label": [4.2, 0.0, 2.5],
            "idx": [0, 1, 2]}
    fake = datasets.DatasetDict({s: datasets.Dataset.from_dict(rows) for s in ("train", "validation")})
    seen = {}

    def load_dataset(name: str, config: str) -> object:
        seen["args"] = (name, config)
        return fake

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    td = D.load_task_data("stsb")
    assert seen["args"] == ("nyu-mll/glue", "stsb") and td.regression and td.train.labels == [4.2, 0.0, 2.5]
    assert td.eval.pairs == ["a c", "c e", "f g"] and td.labels == ["score"]


def test_sharded_regression_evaluation_equals_one_process() -> None:
    """A launched search sums each process's zero-padded predictions: the correlation is the single-process one."""
    from types import SimpleNamespace

    from instatune_cli.measure.accuracy import Evaluator

    class Reg(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.linspace(-1, 3, 11).view(-1, 1))

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> object:
            return SimpleNamespace(logits=self.w[input_ids[:, 0]] + 0.1 * input_ids[:, 1:2].float())

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (23, 2), generator=g)
    y = torch.rand(23, generator=g) * 5
    batches = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones_like(ids[i:i + 4]), "labels": y[i:i + 4]}
               for i in range(0, 23, 4)]  # 6 batches, the last one short
    model = Reg()
    whole = Evaluator(model, batches, metric="spearman").evaluate()
    sent: dict[int, list[float]] = {}

    class Shard:  # two ranks run one after the other; rank 0 adds rank 1's vector as sum_floats would
        def __init__(self, rank: int) -> None:
            self.rank, self.world, self.active = rank, 2, True

        def sum_floats(self, values: list[float]) -> list[float]:
            sent[self.rank] = list(values)
            return [a + b for a, b in zip(values, sent[1], strict=True)] if self.rank == 0 else values

    Evaluator(model, batches, metric="spearman", shard=Shard(1)).evaluate()
    res = Evaluator(model, batches, metric="spearman", shard=Shard(0)).evaluate()
    assert res.score == whole.score and res.mse == whole.mse and res.n == whole.n == 23
    assert sum(1 for v in sent[1][:23] if v != 0) <= 12  # rank 1 filled only its own batches' rows


def test_a_regression_teacher_caches_one_output(tiny_bert_dir: Path, stsb_dir: Path, tiny_plain_run: Path,
                                               tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from instatune_cli import artifacts
    from instatune_cli.tune.loop import run_tune

    with one_thread():
        run_tune(tiny_tune_config(tiny_bert_dir, stsb_dir, tmp_path / "plain", task="stsb", plain=True,
                                  max_steps=8, batch_size=16))
        run_tune(tiny_tune_config(tiny_bert_dir, stsb_dir, tmp_path / "run", task="stsb", max_steps=4,
                                  batch_size=16, teacher=str(tmp_path / "plain")))
    cache = load_file(str(tmp_path / "run" / "teacher_logits.safetensors"))["logits"]
    art = artifacts.load(tmp_path / "run", "tune")
    assert cache.shape == (art.metrics["train_examples"], 1)
    assert np.isfinite(art.metrics["super_pearson"])
    r = run_cli("tune", tiny_bert_dir, "--task", "stsb", "--data", stsb_dir, "-o", tmp_path / "bad",
                "--teacher", tiny_plain_run)  # a 2-class classifier cannot teach a regressor
    assert_cli_error(r, "2-class classifier", "regression task")
    assert not (tmp_path / "bad").exists()


def test_recovery_of_the_other_kind_is_one_line(stsb_run: Path, tiny_tune_run: Path, tiny_plain_run: Path,
                                                tiny_data_dir: Path, tmp_path: Path) -> None:
    """An extract keeps its head: a regressor's extract with classification data or metric, a classifier's with
    a regression metric or task, and a teacher of the other kind are each refused in one line, before any output."""
    for run, name in ((stsb_run, "reg"), (tiny_tune_run, "cls")):
        r = run_cli("extract", run, "--config", "L3-h4-f25", "-o", tmp_path / name)
        assert r.exit_code == 0, r.output
    reg, cls, out = tmp_path / "reg", tmp_path / "cls", tmp_path / "out"
    for args, frags in [
        ((reg, "--metric", "accuracy"), ("--metric accuracy", "regression task", "pearson or spearman")),
        ((reg, "--data", tiny_data_dir), ("regressor (one output)", "2-class task", "keeps the extract's head")),
        ((cls, "--metric", "pearson"), ("2-class classifier", "regression task", "keeps the extract's head")),
        ((reg, "--teacher", tiny_plain_run), ("2-class classifier", "regression task")),
        ((cls, "--teacher", stsb_run), ("regressor (one output)", "2-class task")),
    ]:
        assert_cli_error(run_cli("tune", *args, "--plain", "-o", out), *frags)
        assert not out.exists() and not (tmp_path / "out.partial").exists()
