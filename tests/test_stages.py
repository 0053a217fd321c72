"""search / extract / export stages on a tiny tuned super-network: contract, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import assert_cli_error, run_cli

from instatune_cli import artifacts


@pytest.fixture(scope="module")
def searched(tiny_tune_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "s"
    r = run_cli("search", tiny_tune_run, "--evals", "14", "--population", "6", "--output", out,
                "--pick", "max-drop=5", "--json")
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


def test_search_artifact_and_front(searched, tiny_tune_run):
    out, summary = searched
    art = artifacts.load(out, "search")
    assert art.parent("tune").path.resolve() == Path(tiny_tune_run).resolve()
    for f in ("archive.jsonl", "archive.csv", "front.csv", "front.json", "hypervolume.csv", "pareto.png"):
        assert (out / f).is_file(), f
    rows = [json.loads(x) for x in (out / "archive.jsonl").read_text().splitlines()]
    assert len(rows) == 14 == summary["evaluations"] and len({r["id"] for r in rows}) == 14
    front = json.loads((out / "front.json").read_text())["front"]
    assert [r["subnet"] for r in front] == list(range(1, len(front) + 1))
    # exactly the non-dominated set of the archive (acc max, macs min)
    def dominated(a):
        return any(b["acc"] >= a["acc"] and b["macs"] <= a["macs"] and (b["acc"] > a["acc"] or b["macs"] < a["macs"])
                   for b in rows)
    assert {r["id"] for r in front} == {r["id"] for r in rows if not dominated(r)}
    ref = summary["reference"]
    assert ref["macs"] >= max(r["macs"] for r in rows) and 0 <= ref["acc"] <= 1
    if summary["picked"] is not None:
        picked = next(r for r in front if r["subnet"] == summary["picked"])
        assert picked["acc"] >= ref["acc"] - 0.05 - 1e-9


def test_search_resume_after_kill_evaluates_nothing_twice(tiny_tune_run, tmp_path):
    out = tmp_path / "s"
    first = run_cli("search", tiny_tune_run, "--evals", "12", "--population", "6", "--output", out, "--json")
    assert first.exit_code == 0
    done = [json.loads(x) for x in (out / "archive.jsonl").read_text().splitlines()]
    # simulate a kill after 7 evaluations: the partial directory with a truncated archive
    partial = out.with_name(out.name + ".partial")
    shutil.copytree(out, partial)
    (partial / "manifest.json").unlink()
    (partial / ".stage").write_text("search")
    (partial / "archive.jsonl").write_text("".join(json.dumps(r) + "\n" for r in done[:7]))
    shutil.rmtree(out)
    r = run_cli("search", tiny_tune_run, "--evals", "12", "--population", "6", "--output", out, "--resume", "--json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "archive.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and len({x["id"] for x in rows}) == 12
    assert json.loads(r.stdout)["new_evaluations"] == 5
    assert [x["id"] for x in rows] == [x["id"] for x in done]  # same seed: the same archive as uninterrupted


@pytest.mark.parametrize("args,frag", [
    (["--objectives", "acc,speed"], "unknown objective"),
    (["--algorithm", "annealing"], "unknown algorithm"),
    (["--evals", "4", "--population", "6"], "smaller than the population"),
    (["--pick", "cheapest"], "unknown pick rule"),
    (["--objectives", "acc"], "two objectives"),
    (["--ref-point", "acc=0.5"], "lacks a value for macs"),
    (["--ref-point", "acc=0.5,latency=3"], "one name=value per objective"),
    (["--ref-point", "acc=0.5,macs=lots"], "cannot read number"),
])
def test_search_bad_input(tiny_tune_run, tmp_path, args, frag):
    assert_cli_error(run_cli("search", tiny_tune_run, "--output", tmp_path / "s", *args), frag)
    assert not (tmp_path / "s").exists()


def test_search_fixed_reference_point(tiny_tune_run, tmp_path):
    from instatune_cli.search.pareto import hypervolume_2d_bruteforce

    r = run_cli("search", tiny_tune_run, "--evals", "8", "--population", "6", "--output", tmp_path / "s",
                "--ref-point", "acc=0,macs=1G", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["ref_point"] == {"acc": 0.0, "macs": 1e9} and summary["hypervolume"] > 0
    rows = [json.loads(x) for x in (tmp_path / "s" / "archive.jsonl").read_text().splitlines()]
    pts = [(-x["acc"], x["macs"]) for x in rows]
    assert summary["hypervolume"] == pytest.approx(hypervolume_2d_bruteforce(pts, (0.0, 1e9)))


def test_search_refuses_non_tune_dirs_and_impossible_constraints(searched, tiny_tune_run, tmp_path):
    out, _ = searched
    assert_cli_error(run_cli("search", out, "--output", tmp_path / "x"), "'search' directory", "tune")
    assert_cli_error(run_cli("search", tmp_path, "--output", tmp_path / "x"), "no manifest.json")
    r = run_cli("search", tiny_tune_run, "--evals", "6", "--population", "6", "--output", tmp_path / "c",
                "--max-macs", "1")
    assert r.exit_code == 0 and "no evaluated sub-network meets" in r.output


def test_extract_stock_and_per_layer(searched, tiny_tune_run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    r = run_cli("extract", tiny_tune_run, "--config", "L2-h4-f25", "--output", tmp_path / "u")
    assert r.exit_code == 0, r.output
    art = artifacts.load(tmp_path / "u", "extract")
    assert art.metrics["kind"] == "stock" and art.metrics["params_match"] and art.metrics["max_abs_diff"] < 1e-5
    m = AutoModelForSequenceClassification.from_pretrained(tmp_path / "u")
    assert m.config.num_hidden_layers == 2 and m.config.intermediate_size == 25
    out, _ = searched
    r = run_cli("extract", tiny_tune_run, "--config", '{"layers": 3, "heads": [4, 2, 3], "ffn": [12, 37, 25]}',
                "--output", tmp_path / "p")
    assert r.exit_code == 0, r.output
    art = artifacts.load(tmp_path / "p", "extract")
    assert art.metrics["kind"] == "instatune" and art.metrics["max_abs_diff"] < 1e-5
    assert art.metrics["weights_bytes"] == art.metrics["weights_bytes_expected"]


@pytest.mark.parametrize("args,frag", [
    (["--config", "L9-h4-f37"], "keeps 9 layers"),
    (["--config", "L2-h4-f30"], "outside the space"),
    (["--config", "two layers"], "cannot read"),
    (["--subnet", "1"], "needs a search directory"),
    ([], "--config"),
])
def test_extract_bad_input(tiny_tune_run, tmp_path, args, frag):
    assert_cli_error(run_cli("extract", tiny_tune_run, "--output", tmp_path / "e", *args), frag)
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.partial").exists()


def test_extract_from_search_checks_subnet_and_parent(searched, tmp_path):
    out, summary = searched
    k = summary["front_size"]
    assert_cli_error(run_cli("extract", out, "--subnet", str(k + 1), "--output", tmp_path / "e"), "not on the front")
    assert_cli_error(run_cli("extract", out, "--output", tmp_path / "e"), "--subnet")
    r = run_cli("extract", out, "--subnet", "1", "--output", tmp_path / "e")
    assert r.exit_code == 0, r.output
    assert_cli_error(run_cli("extract", out, "--subnet", "1", "--output", tmp_path / "e"), "already exists", "--force")


def test_search_dir_with_changed_tune_parent_is_refused(tiny_tune_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_tune_run, run)
    assert run_cli("search", run, "--evals", "6", "--population", "6").exit_code == 0
    m = json.loads((run / "manifest.json").read_text())
    m["metrics"]["super_accuracy"] = 0.0  # a retrained or edited parent
    (run / "manifest.json").write_text(json.dumps(m))
    assert_cli_error(run_cli("extract", tmp_path / "run-search", "--subnet", "1"), "changed since")


def test_export_parity_latency_and_int8(tiny_tune_run, tmp_path):
    r = run_cli("extract", tiny_tune_run, "--config", "L3-h4.2.3-f12.37.25", "--output", tmp_path / "e")
    assert r.exit_code == 0, r.output
    r = run_cli("export", tmp_path / "e", "--int8", "--runs", "3", "--output", tmp_path / "x")
    assert r.exit_code == 0, r.output
    art = artifacts.load(tmp_path / "x", "export")
    m = art.metrics
    assert m["parity"]["max_abs_diff"] <= 1e-4 and len(m["parity"]["shapes"]) == 2
    assert m["latency"]["seq_len"] == 64 and m["latency_supernet"]["median_ms"] > 0
    assert m["int8"]["agreement"]["n"] > 0 and "dynamic" in m["int8"]["note"]
    assert art.parent("extract").path.resolve() == (tmp_path / "e").resolve()
    assert_cli_error(run_cli("export", tmp_path / "e", "--subnet", "2", "--output", tmp_path / "y"), "already")


def test_export_without_directory_needs_a_search_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_cli_error(run_cli("export", "--subnet", "3"), "run-search")


def test_search_latency_and_size_use_the_shipping_code_path(tiny_tune_run, tmp_path):
    r = run_cli("search", tiny_tune_run, "--objectives", "acc,latency,size", "--evals", "4", "--population", "4",
                "--latency-seq-len", "16", "--output", tmp_path / "s", "--json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "s" / "archive.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(x["latency"] > 0 and x["latency_p90"] >= x["latency"] for x in rows)
    # size is what `instatune extract` writes for the same sub-network
    first = rows[0]
    cfg = json.dumps({"layers": first["layers"], "heads": first["heads"], "ffn": first["ffn"]})
    assert run_cli("extract", tiny_tune_run, "--config", cfg, "--output", tmp_path / "e").exit_code == 0
    assert artifacts.load(tmp_path / "e").metrics["weights_bytes"] / 1e6 == pytest.approx(first["size"])
