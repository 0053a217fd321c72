"""The bookkeeping of bench/search_efficiency.py: its figures are only as good as these helpers. Tiny inputs, no
training, no model."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from instatune_cli.search.objectives import resolve_objectives
from instatune_cli.search.pareto import hypervolume, hypervolume_2d_bruteforce, ref_to_min, to_min_matrix
from instatune_cli.space import SubNet

_spec = importlib.util.spec_from_file_location(
    "search_efficiency", Path(__file__).resolve().parents[1] / "bench" / "search_efficiency.py")
se = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(se)

OBJS = resolve_objectives(["acc", "macs"])
REF = {"acc": 0.5, "macs": 10.0}


def row(i, acc, macs):
    return {"id": f"id{i}", "name": f"L3-h{i}", "acc": acc, "macs": macs}


def test_cache_round_trip_keeps_other_setups_out(tmp_path):
    path = tmp_path / "cache.jsonl"
    a, b = SubNet.make(2, 4, 8), SubNet.make(3, 2, 16)
    k1 = se.cache_key("sha256:aa", "val", 500, 64)
    assert k1 != se.cache_key("sha256:aa", "eval", 500, 64) != se.cache_key("sha256:aa", "val", 400, 64)
    se.append_cache(path, k1, a, {"acc": 0.75, "collapsed": False}, seconds=1.5)
    se.append_cache(path, "other", b, {"acc": 0.5})
    with open(path, "a") as fh:
        fh.write('{"key": "' + k1 + '", "id": "cut-sh')  # a line cut short by a kill
    assert se.load_cache(path, k1) == {a.id: {"acc": 0.75, "collapsed": False}}
    assert se.load_cache(path, "other") == {b.id: {"acc": 0.5}}
    assert se.load_cache(tmp_path / "none.jsonl", k1) == {}
    assert se.cache_seconds(path, k1) == 1.5


def test_hv_curve_is_the_hypervolume_of_each_prefix():
    rng = np.random.default_rng(0)
    rows = [row(i, float(a), float(m)) for i, (a, m) in enumerate(zip(rng.uniform(0.4, 0.9, 25),
                                                                        rng.uniform(1, 12, 25), strict=True))]
    pts = to_min_matrix(rows, OBJS)
    ref = ref_to_min(REF, OBJS)
    curve = se.hv_curve(pts, ref)
    assert len(curve) == len(rows) and all(b >= a for a, b in zip(curve, curve[1:], strict=False))
    for n in (1, 7, 25):
        assert curve[n - 1] == pytest.approx(hypervolume_2d_bruteforce(pts[:n], ref))


def test_censored_runs_are_reported_as_censored_never_as_the_budget():
    curve = [0.1, 0.5, 0.95, 0.99]
    assert se.evals_to_reach(curve, 0.95) == 3 and se.evals_to_reach(curve, 0.995) is None
    s = se.reach_summary([10, None, 30], budget=100)
    assert s["censored"] == 1 and s["median"] == 30 and s["min"] == 10 and s["max"] is None
    assert se.fmt_reach(s) == "30 [10–>100] (1/3 censored)"
    worse = se.reach_summary([None, None, 5], budget=100)  # the median run never got there
    assert worse["median"] is None and se.fmt_reach(worse) == ">100 [5–>100] (2/3 censored)"
    none = se.reach_summary([None, None, None], budget=100)
    assert none["median"] is None and none["min"] is None and se.fmt_reach(none).startswith(">100 [>100–>100]")
    assert se.fmt_reach(se.reach_summary([4, 8, 6], budget=100)) == "6 [4–8]"
    # ratios only between uncensored medians: a censored one gives no number at all (not a bound from the budget)
    assert se.median_ratio(worse, s)["value"] is None and se.fmt_ratio(se.median_ratio(worse, s)) == "n/a (censored)"
    assert se.median_ratio(s, se.reach_summary([4, 8, 6], budget=100))["value"] == pytest.approx(5.0)
    assert se.reach_summary([None, 20], budget=50)["median"] is None  # even count: the mean of 20 and >50


def test_population_choice_prefers_reaching_98_then_95_then_final_hv():
    def summ(m98, m95, final):
        return {"0.98": {"median": m98}, "0.95": {"median": m95}, "final": {"median": final}}

    assert se.choose_population({10: summ(None, 80, 0.97), 20: summ(150, 90, 0.985), 50: summ(None, 60, 0.99)}) == 20
    assert se.choose_population({10: summ(None, 80, 0.97), 50: summ(None, 60, 0.96)}) == 50
    assert se.choose_population({10: summ(None, None, 0.90), 50: summ(None, None, 0.93)}) == 50
    assert se.choose_population({10: summ(100, 60, 0.99), 20: summ(100, 60, 0.99)}) == 10


def test_variants_cover_each_population_and_pin_linas_batch():
    vs = se.make_variants(["linas", "nsga2", "random"], [10, 20, 50], 10, None)
    assert [v.name for v in vs] == ["linas", "nsga2-p10", "nsga2-p20", "nsga2-p50", "random"]
    assert vs[0].batch == 5 and {v.population for v in vs if v.algorithm == "nsga2"} == {10, 20, 50}


def test_run_labels():
    assert se.parse_run("/work/runs/s42/sst2/elastic") == ("s42-sst2-elastic", Path("/work/runs/s42/sst2/elastic"))
    assert se.parse_run("big=/x/y") == ("big", Path("/x/y"))


def _measured(runs):
    """What measure_supernet returns, minimal: rows per (variant, seed)."""
    return {"runs": [{"variant": v, "seed": s, "evaluations": len(rows), "rows": rows} for v, s, rows in runs],
            "sample": []}


def test_reference_is_built_once_and_a_new_run_never_moves_it(tmp_path):
    path = tmp_path / "ref.json"
    a = [row(1, 0.8, 8.0), row(2, 0.6, 2.0)]
    b = [row(3, 0.7, 4.0), row(4, 0.55, 9.0)]
    sample = [row(5, 0.65, 5.0), row(6, 0.52, 1.0)]
    made = []

    def make(sources):
        def f():
            made.append(1)
            return se.build_reference(sources, REF, OBJS)
        return f

    with pytest.raises(SystemExit, match="--build-reference"):  # never computed silently
        se.resolve_reference(path, "net", REF, False, make({"a": a}))
    entry, built = se.resolve_reference(path, "net", REF, True, make({"a-s0": a, "b-s0": b, "sample": sample}),
                                        {"label": "net"})
    assert built and made == [1] and entry["union_size"] == 6
    want = hypervolume(to_min_matrix(a + b + sample, OBJS), ref_to_min(REF, OBJS))
    assert entry["hypervolume"] == pytest.approx(want)
    assert {r["id"] for r in entry["front"]} == {"id1", "id2", "id3", "id6"}
    # the sensitivity reference point: the front's nadir (acc 0.52, MACs 8) pushed out by 10 % of its range
    assert entry["nadir"]["ref_point"] == pytest.approx({"acc": 0.52 - 0.1 * 0.28, "macs": 8.0 + 0.1 * 7.0})

    # a later invocation with one more, better run: the stored bar is used as is, make() is not called
    better = [row(7, 0.9, 1.5)]
    again, built2 = se.resolve_reference(path, "net", REF, False, make({"a-s0": a, "new": better}))
    assert not built2 and made == [1] and again["hypervolume"] == entry["hypervolume"]
    assert json.loads(path.read_text())["supernets"]["net"]["hypervolume"] == entry["hypervolume"]
    variants = se.make_variants(["linas"], [], 2, 1)
    score = se.score_supernet(_measured([("linas", 0, a), ("linas", 1, better)]), again, variants, budget=2)
    finals = sorted(r["final_fraction"] for r in score["runs"])
    assert finals[0] < 1 < finals[1]  # the better run scores above the bar, and says so
    assert any("bar is kept" in w for w in score["warnings"])

    # another reference point would change the bar: refused, unless rebuilt on purpose
    with pytest.raises(SystemExit, match="reference point"):
        se.resolve_reference(path, "net", {"acc": 0.6, "macs": 10.0}, False, make({}))
    rebuilt, built3 = se.resolve_reference(path, "net", REF, True, make({"a": a, "new": better}))
    assert built3 and rebuilt["hypervolume"] > entry["hypervolume"]


def test_score_reports_censoring_population_choice_and_ratios(tmp_path):
    objs_ref = {"acc": 0.5, "macs": 10.0}
    top = [row(1, 0.9, 1.0)]  # alone it is the whole reference front
    filler = [row(100 + i, 0.5 + 0.001 * i, 9.5) for i in range(10)]  # adds nothing (at the reference acc)
    entry = se.build_reference({"top": top}, objs_ref, OBJS)
    runs = [
        ("linas", 0, filler[:2] + top + filler[2:6]),  # reaches 100 % at evaluation 3
        ("linas", 1, filler[:4] + top + filler[4:6]),  # at 5
        ("linas", 2, filler[:6] + top),  # at 7
        ("nsga2-p10", 0, filler[:7]), ("nsga2-p10", 1, filler[:7]), ("nsga2-p10", 2, filler[:6] + top),
        ("nsga2-p20", 0, filler[:7]), ("nsga2-p20", 1, filler[:5] + top + filler[5:6]),
        ("nsga2-p20", 2, filler[:6] + top),
        ("random", 0, filler[:7]), ("random", 1, filler[:7]), ("random", 2, filler[:7]),
    ]
    variants = se.make_variants(["linas", "nsga2", "random"], [10, 20], 2, 1)
    sc = se.score_supernet(_measured(runs), entry, variants, budget=7)
    t = sc["table"]
    assert t["linas"]["0.98"]["per_seed"] == [3, 5, 7] and t["linas"]["0.98"]["median"] == 5
    assert t["nsga2-p10"]["0.98"]["censored"] == 2 and t["nsga2-p10"]["0.98"]["median"] is None
    assert t["nsga2-p20"]["0.98"]["per_seed"] == [None, 6, 7] and t["nsga2-p20"]["0.98"]["median"] == 7
    assert sc["nsga2_best_population"] == 20 and sc["nsga2_best"] == "nsga2-p20"  # the population choice is reported
    assert t["random"]["0.95"]["censored"] == 3 and se.fmt_reach(t["random"]["0.95"]).startswith(">7 [>7–>7]")
    assert sc["ratios"]["nsga2-p20/linas"]["0.98"]["value"] == pytest.approx(7 / 5)
    assert sc["ratios"]["nsga2-p10/linas"]["0.98"]["value"] is None  # censored median: no ratio at all
    assert sc["ratios"]["random/linas"]["0.98"]["value"] is None
    assert t["random"]["final"]["median"] < 0.01 and math.isclose(t["linas"]["final"]["median"], 1.0)

    # the markdown table shows the censoring and never a number for the censored ones
    out = {"settings": {"evals": 7, "seeds": "0,1,2", "populations": "10,20", "linas_population": 2, "batch": 1,
                        "limit_val": 500, "threads": 1},
           "finished": "now", "method": se.METHOD, "commands": ["python bench/search_efficiency.py ..."],
           "wall_time_s": {"total": 1.0},
           "supernets": [{"label": "net", "run_dir": "/r", "model": "m", "task": "sst2", "space": {"depth": "spread"},
                          "tune_options": {"limit_train": 16000, "seed": 1, "epochs": 1.0},
                          "reference_net": {"acc": 0.9},
                          "sentences": 500, "split": "val", "majority": 0.52, "compute_seconds_all_invocations": 60,
                          "ref_point": {"acc": 0.52, "macs": 1.5e9},
                          "reference": {"front_size": 1, "union_size": 1, "sample_size": 0}, "score": sc}]}
    md = se.markdown(out)
    assert "| NSGA-II (pop 20) **best NSGA-II** | " in md
    assert "| random | >7 [>7–>7] (3/3 censored) | >7 [>7–>7] (3/3 censored) |" in md
    assert "- NSGA-II (pop 20) / LINAS, ratio of medians: 95 % " in md and "98 % 1.40x" in md
    assert "- random / LINAS, ratio of medians: 95 % n/a (medians >7 vs 5: censored, no ratio)" in md


def test_majority_rate(tmp_path):
    f = tmp_path / "val.jsonl"
    f.write_text("".join(json.dumps({"text": "x", "label": lab}) + "\n" for lab in [1, 1, 0, 1, 0, 0, 0]))
    assert se.majority_rate(f, 4) == 0.75 and se.majority_rate(f, None) == pytest.approx(4 / 7)
    assert se.majority_rate(tmp_path / "none.jsonl", 4) is None


def test_compact_json_round_trips():
    obj = {"curve": [0.1, 0.25, 1e-05], "per_seed": [3, None, 7], "names": ["a", "b"], "rows": [{"x": [1, 2]}]}
    text = se.compact_json(obj)
    assert json.loads(text) == obj and '"curve": [0.1, 0.25, 1e-05]' in text and '"per_seed": [3, null, 7]' in text


def test_reference_file_lives_beside_the_output():
    assert se.parse_args([]).reference == se.RESULTS / "search_efficiency_reference.json"
    assert se.parse_args(["--out", "/tmp/x/se.json"]).reference == Path("/tmp/x/se_reference.json")
    with pytest.raises(SystemExit):
        se.parse_args(["--skip-runs"])  # only beside --measure-only --build-reference


def test_the_reference_is_the_sample_alone_never_the_runs_it_judges():
    sample = [row(1, 0.70, 4.0), row(2, 0.60, 2.0), {**row(3, 0.95, 1.0), "collapsed": True}, row(4, 0.80, 9.0)]
    runs = [("linas", 0, [row(9, 0.99, 1.0)])]  # better than anything in the sample
    m = {**_measured(runs), "sample": sample, "reference_net": {"macs": 10.0}}
    entry = se.reference_entry(m, REF, OBJS, sample_seed=2024)
    alone = se.reference_entry({**m, "runs": []}, REF, OBJS, sample_seed=2024)
    assert entry == alone and "id9" not in {r["id"] for r in entry["front"]}
    assert entry["sources"] == {"random-sample-seed2024": 4} and entry["built_from"].startswith("random sample")
    # targets: best non-collapsed sample accuracy within the MACs, less 1 point
    t = {x["macs_fraction"]: x for x in entry["targets"]}
    assert t[0.75]["sample_best_acc"] == 0.70 and t[0.75]["acc_min"] == pytest.approx(0.69)
    assert t[0.5]["sample_best_acc"] == 0.70 and t[0.5]["macs_max"] == 5.0
    assert t[0.33]["sample_best_acc"] == 0.60 and t[0.33]["acc_min"] == pytest.approx(0.59)
    assert se.reference_targets(sample, 10.0, [(0.05, 1.0)])[0]["acc_min"] is None  # only a collapsed one fits


def test_evaluations_to_an_accuracy_at_macs_target():
    rows = [row(1, 0.9, 8.0), row(2, 0.6, 4.0), {**row(3, 0.8, 4.0), "collapsed": True}, row(4, 0.7, 5.0)]
    assert se.evals_to_target(rows, 5.0, 0.69) == 4  # not 1 (too many MACs), not 3 (collapsed)
    assert se.evals_to_target(rows, 5.0, 0.6) == 2
    assert se.evals_to_target(rows, 3.0, 0.5) is None and se.evals_to_target(rows, 9.0, None) is None
    sample = [row(10, 0.7, 5.0), row(11, 0.6, 3.0)]
    entry = se.reference_entry({"runs": [], "sample": sample, "reference_net": {"macs": 10.0}}, REF, OBJS, 1)
    runs = [("linas", 0, rows), ("linas", 1, rows[:2]), ("random", 0, rows[:1])]
    variants = se.make_variants(["linas", "random"], [], 2, 1)
    sc = se.score_supernet(_measured(runs), entry, variants, budget=4)
    half = se.target_key(0.5, 1.0)
    assert sc["table"]["linas"]["targets"][half]["per_seed"] == [4, None]
    assert sc["table"]["random"]["targets"][half]["censored"] == 1
    md = "\n".join(se.target_table(sc))
    assert "MACs <= 50%, acc >= 69.00 %" in md and "| random | >4 [>4–>4] (1/1 censored)" in md


def test_a_reference_built_from_the_runs_is_refused(tmp_path):
    old = tmp_path / "ref.json"
    old.write_text(json.dumps({"schema": 1, "supernets": {}}))
    with pytest.raises(SystemExit, match="built from the runs it judged"):
        se.read_references(old)
