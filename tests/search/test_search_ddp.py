"""Sharded search (issue 13): under torchrun each evaluation's selection batches are dealt to the processes and the
confusion counts summed (search/stage.py), so a 2-process search writes the single-process archive, also when it
resumes one; and the sharded evaluator itself, including a process that gets no batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Killed, make_tiny_bert, make_tiny_data, one_thread, tiny_tune_config

from instatune_cli.search.stage import SearchOptions, run_stage

pytestmark = pytest.mark.usefixtures("single_thread")

# 40 validation rows in batches of 10: two batches per process
OPTS = dict(evals=12, population=6, eval_batch_size=10)
CLI = ["--evals", "12", "--population", "6", "--eval-batch-size", "10", "--json"]


def rows(d: Path) -> list[dict[str, Any]]:
    """The archive without its timings."""
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"}
            for x in (d / "archive.jsonl").read_text().splitlines()]


def torchrun(*args: str | Path) -> subprocess.CompletedProcess[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "instatune_cli", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=str(REPO))


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny tune run on labels with 10 % noise, so sub-networks score differently on its 40 validation rows
    (0.725 to 0.825 for 12 random ones)."""
    from instatune_cli.tune.loop import run_tune

    root = tmp_path_factory.mktemp("noisy")
    data = make_tiny_data(root / "data", n_train=200, n_dev=32, noise=0.1)
    with one_thread():
        run_tune(tiny_tune_config(make_tiny_bert(root / "model"), data, root / "run", val_split="40", batch_size=16,
                                  max_steps=48))
    return root / "run"


@pytest.fixture(scope="module")
def single(noisy_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one") / "s"
    with one_thread():
        run_stage(noisy_run, out, SearchOptions(**OPTS))
    return out


def test_sharded_search_writes_the_single_process_archive(single: Path, noisy_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    r = torchrun("search", noisy_run, "--output", out, *CLI)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)  # one JSON document: only rank 0 printed
    assert summary["new_evaluations"] == 12
    assert rows(out) == rows(single)
    assert len({r["acc"] for r in rows(single)}) > 1  # the scores differ: the comparison means something
    front = [[{k: v for k, v in r.items() if k != "seconds"} for r in json.loads((d / "front.json").read_text())
              ["front"]] for d in (single, out)]
    assert front[0] == front[1]  # held-out scores included (rank 0 scores the front on the eval split)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # one artifact directory, nothing beside it


def test_launched_search_resumes_a_killed_one(single: Path, noisy_run: Path, tmp_path: Path) -> None:
    """Killed after 5 evaluations on one process, resumed on two: the archive of the uninterrupted search."""
    out = tmp_path / "s"
    seen = [0]

    def on_eval(row: dict[str, Any]) -> None:
        seen[0] += 1
        if seen[0] == 5:
            raise Killed(5)

    with pytest.raises(Killed):
        run_stage(noisy_run, out, SearchOptions(**OPTS), on_eval=on_eval)
    r = torchrun("search", noisy_run, "--output", out, "--resume", *CLI)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["new_evaluations"] == 7
    assert rows(out) == rows(single)


# ---- the sharded evaluator, in one process --------------------------------------------------------------

class _Peers:
    """A stand-in for a launched `distributed.Group`: `sum_floats` adds what the other ranks computed."""

    def __init__(self, rank: int, world: int, others: list[list[float]]) -> None:
        self.rank, self.world, self.active, self.others = rank, world, True, others
        self.sent: list[list[float]] = []

    def sum_floats(self, values: list[float]) -> list[float]:
        self.sent.append(list(values))
        parts = [p for p in [list(values), *self.others] if p]
        return [sum(c) for c in zip(*parts, strict=True)]


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_evaluator_sums_to_the_whole_split(noisy_run: Path, world: int) -> None:
    """3 batches over 2 processes (2 + 1) or 4 (1 + 1 + 1 + none): every rank gets the single-process result."""
    from instatune_cli.measure.accuracy import Evaluator
    from instatune_cli.tune import load_eval_batches, load_tuned

    model, tok, space, art = load_tuned(noisy_run)
    batches = load_eval_batches(art, tok, batch_size=15, which="val")  # 40 rows: 15 + 15 + 10
    assert len(batches) == 3
    sub = space.smallest()
    whole = Evaluator(model, batches, metric="mcc").evaluate(sub)
    local = []
    for rank in range(world):  # what each rank contributes (rank 0's part stands in for the rest meanwhile)
        peer = _Peers(rank, world, local[:1])
        ev = Evaluator(model, batches, metric="mcc", shard=peer)
        assert ev.n == 40 and len(ev.batches) == len(range(rank, 3, world))
        ev.evaluate(sub)
        local.append(peer.sent[0])
    assert local[3:] == [[]] * (world - 3)  # the 4th process had no batch and sent nothing
    for rank in range(world):
        peer = _Peers(rank, world, [p for i, p in enumerate(local) if i != rank])
        res = Evaluator(model, batches, metric="mcc", shard=peer).evaluate(sub)
        assert (res.accuracy, res.score, res.n, res.collapsed) == (whole.accuracy, whole.score, whole.n,
                                                                   whole.collapsed)
        assert res.loss == pytest.approx(whole.loss, rel=1e-12)


def test_launched_regression_search_writes_the_single_process_archive(tmp_path_factory: pytest.TempPathFactory
                                                                      ) -> None:
    """A regressor's selection split is sharded too: each rank's predictions, zero-padded to the whole split and
    summed, give the single-process Pearson, so the 2-process archive is the 1-process one."""
    from test_regression import make_tiny_stsb

    from instatune_cli.tune.loop import run_tune

    root = tmp_path_factory.mktemp("stsb-ddp")
    with one_thread():
        run_tune(tiny_tune_config(make_tiny_bert(root / "model"), make_tiny_stsb(root / "data"), root / "run",
                                  task="stsb", val_split="40", batch_size=16, max_steps=24))
        run_stage(root / "run", root / "one", SearchOptions(**OPTS))
    r = torchrun("search", root / "run", "--output", root / "two", *CLI)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["metric"] == "pearson"
    assert rows(root / "two") == rows(root / "one")
    assert len({x["acc"] for x in rows(root / "one")}) > 1 and all("mse" in x for x in rows(root / "one"))


# ---- the launched search's messages, in one process ------------------------------------------------------------

class _Wire:
    """A stand-in for a launched `distributed.Group` on one side of the search's messages: rank 0 records what it
    broadcasts; a follower receives `script`, one message per broadcast."""

    def __init__(self, rank: int = 0, script: list[Any] | None = None) -> None:
        self.rank, self.world, self.active, self.main = rank, 2, True, rank == 0
        self.sent: list[Any] = []
        self.script = list(script or [])

    def broadcast_object(self, obj: Any) -> Any:
        if self.main:
            self.sent.append(obj)
            return obj
        return self.script.pop(0)


def _tiny_search(tmp: Path, group: Any, evaluate: Any, **kw: Any) -> Any:
    from instatune_cli.search import run_search
    from instatune_cli.space import SearchSpace

    space = SearchSpace.from_dict({"layers": [1, 2], "heads": [1, 2], "ffn": [4, 8]})
    return run_search(space, ["acc", "macs"], evaluate, exact={"macs": lambda s: float(sum(s.ffn))}, evals=6,
                      population=3, archive_dir=tmp, group=group, **kw)


def test_rank0_announces_each_real_evaluation_then_stop(tmp_path: Path) -> None:
    """Rank 0 asks and tells; the others hear each sub-network it really evaluates, in order, then "stop". A resumed
    search announces only what its archive lacks."""
    import shutil

    from instatune_cli.space import SubNet

    wire = _Wire()
    res = _tiny_search(tmp_path / "s", wire, lambda s: {"acc": sum(s.heads) / 4})
    assert wire.sent == [("eval", SubNet.from_dict(r)) for r in res.rows] + [("stop", None)]
    shutil.copytree(tmp_path / "s", tmp_path / "r")
    archive = tmp_path / "r" / "archive.jsonl"
    archive.write_text("".join(archive.read_text().splitlines(keepends=True)[:4]))  # killed after 4 evaluations
    again = _Wire()
    resumed = _tiny_search(tmp_path / "r", again, lambda s: {"acc": sum(s.heads) / 4}, resume=True)
    assert again.sent == wire.sent[4:] and resumed.new_evaluations == 2


def test_rank0_failing_between_evaluations_releases_the_others(tmp_path: Path) -> None:
    """A failure outside an evaluation (here the on_eval hook) sends "abort"; inside one it sends nothing (the
    others are mid-collective and the launcher ends them)."""
    wire = _Wire()

    def stop_at_2(row: dict[str, Any]) -> None:
        if row["index"] == 1:
            raise Killed(2)

    with pytest.raises(Killed):
        _tiny_search(tmp_path / "a", wire, lambda s: {"acc": 0.5}, on_eval=stop_at_2)
    assert [m[0] for m in wire.sent] == ["eval", "eval", "abort"]
    inside = _Wire()

    def broken(sub: Any) -> dict[str, float]:
        raise RuntimeError("lost")

    with pytest.raises(RuntimeError, match="lost"):
        _tiny_search(tmp_path / "b", inside, broken)
    assert [m[0] for m in inside.sent] == ["eval"]


def test_a_follower_evaluates_what_rank0_announces(monkeypatch: pytest.MonkeyPatch) -> None:
    from instatune_cli.distributed import Follower
    from instatune_cli.search.run import follow_search

    monkeypatch.setattr("time.sleep", lambda s: None)  # Follower's grace period
    seen: list[str] = []
    follow_search(_Wire(1, [("eval", "a"), ("eval", "b"), ("stop", None)]), seen.append)
    assert seen == ["a", "b"]
    with pytest.raises(Follower) as e:
        follow_search(_Wire(1, [("eval", "c"), ("abort", None)]), seen.append)
    assert e.value.code == 2 and seen == ["a", "b", "c"]
