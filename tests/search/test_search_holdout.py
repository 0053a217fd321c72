"""The search selects on the tune run's validation split only; its front is scored once on the eval split.

Tune runs get `val.jsonl` from the tune loop; these tests add one to a copy of a tiny run themselves (training
rows from its calib.jsonl, recorded in the manifest as the loop records it), so they do not depend on it.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_cli_error, one_thread, run_cli

from instatune_cli import artifacts
from instatune_cli import data as D

V1_RUN = Path(__file__).resolve().parents[1] / "fixtures" / "v1_tune"
VAL_ROWS = 24


def rehash(run: Path, **model: Any) -> None:
    """Update `model` fields and the file list of a copied run's manifest, as if tune had written it so."""
    path = run / artifacts.MANIFEST
    m = json.loads(path.read_text())
    m["model"].update(model)
    if (run / "val.jsonl").is_file():
        m.setdefault("data", {}).update({"val_file": "val.jsonl", "val_examples": VAL_ROWS,
                                         "val": {"kind": "carved", "rule": "test", "seed": 0,
                                                 "examples": VAL_ROWS}})
    m["files"] = [{"path": p.relative_to(run).as_posix(), "bytes": p.stat().st_size,
                   "sha256": artifacts.sha256_file(p)}
                  for p in sorted(run.rglob("*")) if p.is_file() and p.name != artifacts.MANIFEST]
    path.write_text(json.dumps(m, indent=2) + "\n")


def with_val(src: Path, dest: Path, **model: Any) -> Path:
    """A copy of tune run `src` with a validation split of training rows (not the eval rows)."""
    shutil.copytree(src, dest)
    D.write_jsonl(dest / "val.jsonl", D.read_jsonl(dest / "calib.jsonl").head(VAL_ROWS))
    rehash(dest, **model)
    return dest


@pytest.fixture(scope="module")
def traced(tiny_tune_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One search through the API with every split load and every evaluator pass recorded, by phase."""
    import instatune_cli.search.run as search_run
    import instatune_cli.tune as tune_pkg
    from instatune_cli.measure import accuracy as A
    from instatune_cli.search.stage import SearchOptions, run_stage

    tmp = tmp_path_factory.mktemp("holdout")
    run = with_val(tiny_tune_run, tmp / "run")
    phase = {"now": "build"}
    loads: list[tuple[str, str]] = []
    passes: list[tuple[str, str, str | None]] = []
    warned: list[str] = []

    class Tagged(list):
        which = "?"

    real_load, real_init = tune_pkg.load_eval_batches, A.Evaluator.__init__
    real_eval, real_search = A.Evaluator.evaluate, search_run.run_search

    def load(art: Any, tok: Any, batch_size: int = 64, limit: int | None = None, which: str = "eval") -> Any:
        loads.append((which, phase["now"]))
        out = Tagged(real_load(art, tok, batch_size=batch_size, limit=limit, which=which))
        out.which = which
        return out

    def init(self: Any, model: Any, batches: Any, *a: Any, **k: Any) -> None:
        real_init(self, model, batches, *a, **k)
        self.which = getattr(batches, "which", "?")

    def evaluate(self: Any, sub: Any = A._ACTIVE) -> Any:
        passes.append((self.which, phase["now"], None if sub is None else getattr(sub, "id", "active")))
        return real_eval(self, sub)

    def search(*a: Any, **k: Any) -> Any:
        phase["now"] = "search"
        try:
            return real_search(*a, **k)
        finally:
            phase["now"] = "after"

    with pytest.MonkeyPatch.context() as mp, one_thread():
        mp.setattr(tune_pkg, "load_eval_batches", load)
        mp.setattr(A.Evaluator, "__init__", init)
        mp.setattr(A.Evaluator, "evaluate", evaluate)
        mp.setattr(search_run, "run_search", search)
        art, result, summary = run_stage(run, tmp / "s", SearchOptions(evals=10, population=6, pick="max-drop=50"),
                                         on_warning=warned.append)
    return {"run": run, "out": tmp / "s", "art": art, "result": result, "summary": summary, "loads": loads,
            "passes": passes, "warned": warned}


def test_selection_never_reads_the_eval_split(traced: dict[str, Any]) -> None:
    loads, passes, result = traced["loads"], traced["passes"], traced["result"]
    assert loads == [("val", "build"), ("eval", "after")]  # eval batches are built only after the search
    val = [p for p in passes if p[0] == "val"]
    held = [p for p in passes if p[0] == "eval"]
    assert [p[1] for p in val] == ["build"] + ["search"] * len(result.rows)  # reference, then each evaluation
    assert {p[1] for p in held} == {"after"}
    front_ids = [r["id"] for r in result.front]
    assert [p[2] for p in held] == [None, *front_ids]  # super-network + each front member, once each
    assert traced["warned"] == []


def test_front_rows_carry_both_scores(traced: dict[str, Any]) -> None:
    out, summary = traced["out"], traced["summary"]
    n_eval = len(D.read_jsonl(traced["run"] / "eval.jsonl"))
    front = json.loads((out / "front.json").read_text())
    assert front["metric"] == "accuracy" and front["selection_split"] == "val" and front["eval_split"] == "eval"
    assert front["selection_examples"] == VAL_ROWS and front["eval_examples"] == n_eval
    assert front["warnings"] == [] and front["front"]
    for r in front["front"]:
        assert 0 <= r["acc"] <= 1 and 0 <= r["eval_acc"] <= 1
        assert isinstance(r["collapsed"], bool) and isinstance(r["eval_collapsed"], bool)
        assert "eval_accuracy" not in r  # the metric is accuracy: eval_acc is it
    ref = front["reference"]
    assert {"acc", "eval_acc", "collapsed", "eval_collapsed"} <= set(ref)
    with open(out / "front.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:10] == ["subnet", "id", "name", "layers", "heads", "ffn", "acc", "macs", "eval_acc",
                                  "collapsed"]
    assert [float(r["eval_acc"]) for r in rows] == pytest.approx([r["eval_acc"] for r in front["front"]])
    man = artifacts.load(out, "search").metrics
    assert man["metric"] == "accuracy" and man["selection_split"] == "val" and man["warnings"] == []
    assert man["supernet"]["eval_acc"] == ref["eval_acc"] and man["supernet"]["acc"] == ref["acc"]
    assert [r["eval_acc"] for r in man["front"]] == [r["eval_acc"] for r in front["front"]]
    assert man["collapsed"] == [r["subnet"] for r in front["front"] if r["collapsed"] or r["eval_collapsed"]]
    assert [r["eval_acc"] for r in summary["front"]] == [r["eval_acc"] for r in front["front"]]
    # --pick max-drop compares selection (validation) scores
    picked = next(r for r in front["front"] if r["subnet"] == summary["picked"])
    assert picked["acc"] >= ref["acc"] - 0.5 - 1e-9
    assert (out / "pareto.png").stat().st_size > 5000


def test_run_metric_and_override(tiny_tune_run: Path, tmp_path: Path, single_thread: None) -> None:
    run = with_val(tiny_tune_run, tmp_path / "run", metric="f1")
    n_eval = len(D.read_jsonl(run / "eval.jsonl"))
    r = run_cli("search", run, "--evals", "6", "--population", "6", "--limit-eval", "8", "--output",
                tmp_path / "f1")
    assert r.exit_code == 0, r.output
    assert "selected by f1 on the val split (8 examples)" in r.stdout
    assert "warning" not in r.output
    f1 = json.loads((tmp_path / "f1" / "front.json").read_text())
    assert f1["metric"] == "f1" and f1["selection_examples"] == 8 and f1["eval_examples"] == n_eval
    assert all({"accuracy", "eval_accuracy", "eval_acc"} <= set(x) for x in f1["front"])

    r = run_cli("search", run, "--evals", "6", "--population", "6", "--metric", "mcc", "--limit-val", "12",
                "--output", tmp_path / "mcc", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["metric"] == "mcc" and s["selection_split"] == "val" and s["selection_examples"] == 12
    assert all(-1 <= x["acc"] <= 1 and -1 <= x["eval_acc"] <= 1 and 0 <= x["eval_accuracy"] <= 1
               for x in s["front"])
    assert {"acc", "eval_acc", "eval_accuracy"} <= set(s["reference"])
    assert artifacts.load(tmp_path / "mcc", "search").metrics["metric"] == "mcc"


@pytest.mark.parametrize("args,frag", [
    (["--metric", "foo"], "unknown --metric 'foo'"),
    (["--limit-val", "0"], "--limit-val must be at least 1"),
])
def test_search_bad_metric_options(args: list[str], frag: str, tmp_path: Path) -> None:
    assert_cli_error(run_cli("search", V1_RUN, "--output", tmp_path / "s", *args), frag)
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()


def test_run_without_val_falls_back_with_a_recorded_warning(tmp_path: Path, single_thread: None) -> None:
    """A run made before validation splits (the schema-v1 fixture) is searched on its eval split, loudly; its
    classifier is zeroed here so every sub-network predicts one class: the front is flagged collapsed."""
    import torch
    from safetensors.torch import load_file, save_file

    run = tmp_path / "v1"
    shutil.copytree(V1_RUN, run)
    weights = run / "model" / "model.safetensors"
    state = load_file(str(weights))
    state = {k: torch.zeros_like(v) if k.startswith("classifier.") else v for k, v in state.items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    rehash(run)
    assert not (run / "val.jsonl").exists()

    r = run_cli("search", run, "--evals", "6", "--population", "6", "--output", tmp_path / "s")
    assert r.exit_code == 0, r.output
    warning = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and "no validation split" in warning[0] and "eval split" in warning[0]
    assert "collapsed" in r.stdout and "selected by accuracy on the eval split" in r.stdout

    m = artifacts.load(tmp_path / "s", "search").metrics
    assert m["selection_split"] == "eval" and len(m["warnings"]) == 1
    assert "no validation split" in m["warnings"][0] and m["warnings"][0] in m["notes"]
    front = json.loads((tmp_path / "s" / "front.json").read_text())
    assert front["selection_split"] == "eval" and front["warnings"] == m["warnings"]
    assert front["front"] and all(x["collapsed"] and x["eval_collapsed"] for x in front["front"])
    assert m["collapsed"] == [x["subnet"] for x in front["front"]]
    assert any("every front member is collapsed" in n for n in m["notes"])
    assert front["reference"]["eval_collapsed"]
