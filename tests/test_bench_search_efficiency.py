"""The bookkeeping of bench/search_efficiency.py: its figures are only as good as these helpers."""

import importlib.util
from pathlib import Path

import pytest

from instatune_cli.space import SubNet

_spec = importlib.util.spec_from_file_location(
    "search_efficiency", Path(__file__).resolve().parents[1] / "bench" / "search_efficiency.py")
se = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(se)


def test_cache_round_trip_keeps_other_setups_out(tmp_path):
    path = tmp_path / "cache.jsonl"
    a, b = SubNet.make(2, 4, 8), SubNet.make(3, 2, 16)
    se.append_cache(path, "run1:300", a, {"acc": 0.75})
    se.append_cache(path, "run2:300", b, {"acc": 0.5})
    with open(path, "a") as fh:
        fh.write('{"key": "run1:300", "id": "cut-sh')  # a line cut short by a kill
    assert se.load_cache(path, "run1:300") == {a.id: {"acc": 0.75}}
    assert se.load_cache(path, "run2:300") == {b.id: {"acc": 0.5}}
    assert se.load_cache(tmp_path / "none.jsonl", "run1:300") == {}


def test_evals_to_reach_and_censored_ratios():
    curve = [0.1, 0.5, 0.95, 0.99]
    assert se.evals_to_reach(curve, 0.95) == 3 and se.evals_to_reach(curve, 0.995) is None
    m = se.mean_reach([10, None], budget=100)
    assert m["mean"] == 55 and m["lower_bound"] and m["censored"] == 1
    exact = se.ratio(60.0, False, 20.0, False)
    assert exact == {"value": 3.0, "kind": "exact"} and se.target_met(exact, 3.0) is True
    lower = se.ratio(100.0, True, 25.0, False)  # the other algorithm never got there within 100
    assert lower["kind"] == "lower_bound" and se.target_met(lower, 3.0) is True
    assert se.target_met(se.ratio(100.0, True, 50.0, False), 3.0) is None  # >= 2x says nothing about 3x
    assert se.ratio(100.0, True, 100.0, True)["kind"] == "unknown"
    assert se.fmt_ratio(lower) == ">=4.00x"


@pytest.mark.parametrize("n", [300, 872])
def test_one_tune_run_per_eval_split(n):
    assert se.default_run(n).name == f"minilm-sst2-run-e{n}"
