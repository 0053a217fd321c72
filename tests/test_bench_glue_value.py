"""The learning-rate sweep of bench/glue_value.py: which rate each side runs at decides the comparison, so the
pick is tested without training (the runs and their validation scores are faked)."""

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("glue_value", ROOT / "bench" / "glue_value.py")
gv = importlib.util.module_from_spec(_spec)
sys.modules["glue_value"] = gv  # its dataclasses look their module up
_spec.loader.exec_module(gv)

# validation score per (seed, rate): 2e-4 is best on seed 42 but leaves seed 43 at the constant predictor
VAL = {(42, 5e-5): 0.70, (43, 5e-5): 0.70, (42, 1e-4): 0.80, (43, 1e-4): 0.75, (42, 2e-4): 0.82, (43, 2e-4): 0.20}


def bench(sweep_seeds: int, tmp_path: Path) -> tuple[object, list[tuple[str, int, float]]]:
    b = gv.Bench.__new__(gv.Bench)
    b.args = argparse.Namespace(seed_list=[42, 43, 44], sweep_seeds=sweep_seeds, jobs=2)
    b.work, b.lr, b.elr = tmp_path, 0.0, 0.0
    calls: list[tuple[str, int, float]] = []
    b.tune = lambda out, seed, lr, *flags: calls.append((out.name, seed, lr)) or 0.0

    def val_score(run: Path) -> float:
        name = run.name
        return VAL[(int(name.rsplit("-s", 1)[1]), float(name.split("-lr")[1].rsplit("-s", 1)[0]))]

    b.val_score = val_score
    return b, calls


def test_the_rate_is_picked_on_the_mean_of_the_sweep_seeds(tmp_path: Path) -> None:
    b, calls = bench(2, tmp_path)
    assert b.best_lr() == 1e-4  # mean 0.775 beats 2e-4's 0.51
    assert b.lr_seed_scores["0.0002"] == {"42": 0.82, "43": 0.20}
    assert sorted({(s, lr) for _, s, lr in calls}) == sorted(VAL)  # every rate on both seeds, none on seed 44
    assert {n for n, _, _ in calls} == {f"plain-lr{lr:g}-s{s}" for s, lr in VAL}  # the rows' own run names


def test_one_sweep_seed_picks_on_the_first(tmp_path: Path) -> None:
    b, calls = bench(1, tmp_path)
    VAL[(42, 4e-4)] = 0.5  # 2e-4 at the grid's edge: the grid grows one step
    try:
        assert b.best_lr() == 2e-4
    finally:
        del VAL[(42, 4e-4)]
    assert {s for _, s, _ in calls} == {42}
