"""Tune runs on the tiny model: artifacts, stock reload, determinism, resume after a kill, teacher cache."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, Killed, kill_at, one_thread, run_cli, tiny_tune_args, tiny_tune_config
from safetensors.torch import load_file

from instatune_cli import artifacts
from instatune_cli.errors import InstatuneError
from instatune_cli.space import SearchSpace
from instatune_cli.tune.loop import latest_checkpoint, run_tune

pytestmark = pytest.mark.usefixtures("single_thread")


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, tol: float = 1e-5) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= tol, f"weights differ by {worst}"


# ---- artifacts ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["tiny_tune_run", "tiny_plain_run"])
def test_artifact_layout_and_stock_reload(which: str, request: pytest.FixtureRequest) -> None:
    from transformers import AutoModelForSequenceClassification

    from instatune_cli.adapters import adapter_of
    from instatune_cli.tune import load_eval_batches, load_tuned

    run: Path = request.getfixturevalue(which)
    art = artifacts.load(run, "tune")  # verifies every file's sha256
    names = {f["path"] for f in art.manifest["files"]}
    assert {"space.json", "eval.jsonl", "calib.jsonl", "log.jsonl", "run.json", "model/config.json",
            "model/model.safetensors", "model/tokenizer.json"} <= names
    assert not any(n.startswith("checkpoints/") for n in names)
    assert not run.with_name(run.name + ".partial").exists()
    m = art.model
    assert m["family"] == "bert" and m["labels"] == ["0", "1"] and m["dims"]["num_layers"] == 4
    assert m["max_length"] == 64 and m["model_dir"] == "model"
    assert m["elastic"] is (which == "tiny_tune_run")
    # elastic runs reorder before training, --plain runs after it (prune-after-fine-tuning, issue 18)
    assert m["reorder"]["when"] == ("before training" if which == "tiny_tune_run" else "after training")
    for k in ("super_accuracy", "smallest_accuracy", "eval_loss", "steps", "wall_time_s", "samples_per_s"):
        assert k in art.metrics
    assert art.metrics["steps"] == 48
    assert json.loads((run / "space.json").read_text())["layers"] == [2, 3, 4]
    events = [json.loads(x)["event"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "final" and "train" in events

    stock, info = AutoModelForSequenceClassification.from_pretrained(str(run / "model"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    model, tok, space, art2 = load_tuned(run)
    assert type(model.bert.encoder.layer).__name__ == "ElasticLayerList"
    assert set(model.state_dict()) == set(stock.state_dict())
    batches = load_eval_batches(art2, tok, batch_size=64)
    stock.eval()
    with torch.inference_mode():
        b = {k: v for k, v in batches[0].items() if k != "labels"}
        assert torch.allclose(stock(**b).logits, model(**b).logits, atol=1e-6)

    from instatune_cli.measure.accuracy import Evaluator

    ev = Evaluator(model, batches)
    assert ev.accuracy(None) == pytest.approx(art.metrics["super_accuracy"], abs=1.5 / ev.n)
    adapter_of(model).activate(model, space.smallest())
    small = ev()
    assert small == pytest.approx(art.metrics["smallest_accuracy"], abs=1.5 / ev.n)
    assert ev.evaluate().n == 32


def test_elastic_run_learns(tiny_tune_run: Path) -> None:
    """The tiny sentiment data is learnable: the super-network beats chance clearly after 48 steps."""
    acc = artifacts.load(tiny_tune_run, "tune").metrics["super_accuracy"]
    assert acc >= 0.75, acc


# ---- determinism and resume ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, tiny_data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    with one_thread():
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, save_every=4))
    return out


def test_same_seed_same_weights(reference_run: Path, tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, tmp_path / "again", save_every=0, eval_every=5))
    wa, wb = weights(reference_run), weights(tmp_path / "again")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, tmp_path / "other", seed=8))
    wc = weights(tmp_path / "other")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_resume_after_kill_matches_uninterrupted(reference_run: Path, tiny_bert_dir: Path, tiny_data_dir: Path,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, save_every=4)
    with pytest.raises(Killed):
        run_tune(cfg, on_step=kill_at(6))
    partial = out.with_name("run.partial")
    assert latest_checkpoint(partial).name == "step-000004" and not out.exists()
    res = run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, save_every=4, resume=True))
    assert res.resumed_from == 4
    assert_same_weights(reference_run, out)
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if r["event"] == "train"]
    assert steps == sorted(set(steps)), "log has duplicated steps after resume"
    assert any(r["event"] == "resume" and r["step"] == 4 for r in log)


def test_resume_refuses_other_run(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, save_every=2), on_step=kill_at(2))
    with pytest.raises(InstatuneError, match="belongs to another run.*--lr"):
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, lr=1e-3, resume=True))
    with pytest.raises(InstatuneError, match="unfinished tune run"):
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out))
    assert latest_checkpoint(out.with_name("run.partial")) is not None  # nothing lost


def test_sigkill_subprocess_then_resume(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    """A real SIGKILL mid-run; `--resume` ends with the weights of a run that was never interrupted."""
    out = tmp_path / "killed"
    args = tiny_tune_args(tiny_bert_dir, tiny_data_dir, out, "--save-every", "3")
    args[args.index("--max-steps") + 1] = "150"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "instatune_cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = out.with_name("killed.partial")
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            ck = latest_checkpoint(partial) if partial.exists() else None
            if ck is not None and int(ck.name.split("-")[1]) >= 6:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    killed_at = int(latest_checkpoint(partial).name.split("-")[1])
    assert 6 <= killed_at < 150
    res = run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, max_steps=150, save_every=3, resume=True))
    assert res.resumed_from is not None and res.resumed_from >= killed_at
    run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, tmp_path / "straight", max_steps=150, save_every=0))
    assert_same_weights(tmp_path / "straight", out)


# ---- strong teacher -----------------------------------------------------------------------------------

def test_teacher_cache_built_once_and_reused(tiny_plain_run: Path, tiny_bert_dir: Path, tiny_data_dir: Path,
                                             tmp_path: Path) -> None:
    kw = dict(teacher=str(tiny_plain_run), teacher_epochs=1, save_every=4, max_steps=24)
    straight = run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, tmp_path / "straight", **kw))
    assert straight.teacher_cache == "built"
    gammas = [r["gamma"] for r in straight.log if r["event"] == "train"]
    assert gammas[0] == 1.0 and gammas[-1] == 0.0  # teacher for the first epoch (12 of 24 steps) only

    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, **kw), on_step=kill_at(5))
    cache = out.with_name("run.partial") / "teacher_logits.safetensors"
    stamp = cache.stat().st_mtime_ns
    import instatune_cli.tune.teacher as T

    def no_teacher(*a: object, **k: object) -> None:
        raise AssertionError("teacher model loaded again")

    mp = pytest.MonkeyPatch()
    mp.setattr("transformers.AutoModelForSequenceClassification.from_pretrained", no_teacher, raising=True)
    log0 = json.loads((out.with_name("run.partial") / "log.jsonl").read_text().splitlines()[0])
    n_train = log0["train_examples"]  # 96 rows less the default validation split
    assert n_train == 96 - 5 and log0["val_examples"] == 5
    try:
        logits, built = T.teacher_logits(out.with_name("run.partial"), "unused", _Len(n_train),
                                         json.loads((out.with_name("run.partial") / "run.json").read_text())
                                         ["extra"]["teacher"])
    finally:
        mp.undo()
    assert not built and logits.shape == (n_train, 2)
    res = run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, resume=True, **kw))
    assert res.teacher_cache == "reused" and res.resumed_from == 4
    assert (out / "teacher_logits.safetensors").stat().st_mtime_ns == stamp
    assert_same_weights(tmp_path / "straight", out)
    assert artifacts.load(out, "tune").manifest["training"]["teacher_cache"] == "teacher_logits.safetensors"


class _Len:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


# ---- NaN ----------------------------------------------------------------------------------------------

def test_nan_loss_stops_and_keeps_checkpoint(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from instatune_cli.tune import loss as L

    real = L.super_term
    calls = {"n": 0}

    def poisoned(*a: object, **k: object) -> torch.Tensor:
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] >= 6 else out

    monkeypatch.setattr(L, "super_term", poisoned)
    out = tmp_path / "run"
    r = run_cli(*tiny_tune_args(tiny_bert_dir, tiny_data_dir, out, "--save-every", "4"))
    from conftest import assert_cli_error

    assert_cli_error(r, "nan at step 6", "last good checkpoint (step 4)")
    assert latest_checkpoint(out.with_name("run.partial")).name == "step-000004" and not out.exists()


# ---- CLI end to end -----------------------------------------------------------------------------------

def test_cli_plain_json(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "plain"
    r = run_cli(*tiny_tune_args(tiny_bert_dir, tiny_data_dir, out, "--plain", "--json", "--max-length", "16"))
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)
    assert metrics["steps"] == 12 and Path(metrics["output"]) == out
    art = artifacts.load(out, "tune")
    assert art.options["plain"] is True and art.model["max_length"] == 16
    assert art.model["reorder"]["when"] == "after training"  # prune after fine-tuning (issue 18)
    # a second run into the same directory needs --force
    r2 = run_cli(*tiny_tune_args(tiny_bert_dir, tiny_data_dir, out, "--plain"))
    assert r2.exit_code != 0 and "--force" in r2.output


# ---- other options ------------------------------------------------------------------------------------

def test_sandwich_accum_multi_subnets(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    res = run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, tmp_path / "r", sampling="sandwich", num_subnets=2,
                                    grad_accum=2, batch_size=4, max_steps=4, reorder=False, log_every=1,
                                    super_warmup=0.0))  # sub-networks from step 0: what this test counts
    subs = [r["subnets"] for r in res.log if r["event"] == "train"]
    assert len(subs) == 4 and all(len(s) == 2 and s[0] == "L2-h2-f12" for s in subs)
    art = artifacts.load(tmp_path / "r", "tune")
    assert art.model["reorder"] is None and art.manifest["training"]["global_batch"] == 8


def test_stratified_sampling_trains_and_is_recorded(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    """`--sampling stratified` reaches the trainer: its steps train the draws of `sample_stratified` (seeded by
    the step), and the run records the mode."""
    from instatune_cli.seeds import seed_int

    res = run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, tmp_path / "r", sampling="stratified", max_steps=3,
                                    reorder=False, log_every=1, super_warmup=0.0))
    subs = [r["subnets"] for r in res.log if r["event"] == "train"]
    space = SearchSpace.from_file(tmp_path / "r" / "space.json")
    want = [[x.name for x in space.sample_many(random.Random(seed_int("subnets", 7, k)), 1, "stratified")]
            for k in range(3)]
    assert subs == want
    assert artifacts.load(tmp_path / "r", "tune").manifest["options"]["sampling"] == "stratified"


def test_continue_from_a_tune_run(tiny_tune_run: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    """MODEL may be a tune run directory (its model/ is used); a class-count change is a one-line error."""
    run_tune(tiny_tune_config(tiny_tune_run, tiny_data_dir, tmp_path / "again", max_steps=2, plain=True))
    assert artifacts.load(tmp_path / "again", "tune").model["labels"] == ["0", "1"]
    three = tmp_path / "three"
    three.mkdir()
    for name in ("train", "dev"):
        (three / f"{name}.tsv").write_text("sentence\tlabel\n" + "".join(f"good film\t{i % 3}\n" for i in range(12)))
    with pytest.raises(InstatuneError, match="3-class classifier"):
        run_tune(tiny_tune_config(tiny_tune_run, three, tmp_path / "bad", max_steps=2))


def test_hidden_distillation_run(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    """--hidden-distill adds DynaBERT's hidden-state term: the run trains, records β, and differs from β = 0."""
    res = run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, tmp_path / "h", max_steps=6, hidden_distill=1.0))
    man = res.artifact.manifest
    assert man["training"]["hidden_distill"] == 1.0
    assert all(math.isfinite(r["loss"]) for r in res.log if r["event"] == "train")
    run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, tmp_path / "p", max_steps=6))
    a, b = weights(tmp_path / "h"), weights(tmp_path / "p")
    assert any(not torch.equal(a[k], b[k]) for k in a)
