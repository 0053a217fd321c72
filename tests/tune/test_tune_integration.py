"""The real all-MiniLM-L6-v2 on an SST-2 subset: a few dozen elastic steps beat chance clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import one_thread

from instatune_cli import artifacts
from instatune_cli.tune.config import TuneConfig
from instatune_cli.tune.loop import run_tune


@pytest.mark.integration
def test_minilm_sst2_subset(minilm_dir: Path, sst2_dir: Path, tmp_path: Path) -> None:
    cfg = TuneConfig(model=str(minilm_dir), task="sst2", data=str(sst2_dir), limit_train=960, limit_eval=200,
                     max_length=64, batch_size=16, max_steps=40, lr=2e-4, save_every=0, reorder_batches=2,
                     output=str(tmp_path / "run"), quiet=True, seed=42)
    with one_thread():  # one busy core makes two OpenMP threads slower than one
        res = run_tune(cfg)
    art = artifacts.load(tmp_path / "run", "tune")
    m = art.metrics
    # measured 0.755 (super) on this subset, 0.66 for the smallest L3 (spread) sub-network; chance is ~0.5.
    # (lr 5e-4 with length-grouped batches stayed at chance after 40 steps: 0.505)
    assert m["super_accuracy"] > 0.65, m
    assert m["eval_examples"] == 200 and m["steps"] == 40
    assert art.model["labels"] == ["negative", "positive"] and art.model["dims"]["num_heads"] == 12
    assert res.metrics["samples_per_s"] > 0
