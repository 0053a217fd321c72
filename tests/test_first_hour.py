"""What a new user sees (issue 20): the export's INT8 accuracy, thread counts and manifest paths, the file modes
of what instatune writes, tables that keep names whole when output is not a terminal."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_cli

from instatune_cli import artifacts
from instatune_cli.measure.latency import default_threads


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mode & 0o777 for p in root.rglob("*") if p.is_file()}


def _strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_default_threads_honours_omp_num_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpus = default_threads()
    assert cpus == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    for junk in ("", "0", "two"):
        monkeypatch.setenv("OMP_NUM_THREADS", junk)
        assert default_threads() == cpus


def test_written_weights_have_the_umask_mode(tiny_tune_run, tmp_path):
    want = _umask_mode()
    run_modes = _modes(Path(tiny_tune_run) / "model")
    assert any(k.endswith(".safetensors") for k in run_modes)
    assert set(run_modes.values()) == {want}, run_modes
    r = run_cli("extract", tiny_tune_run, "--config", "L3-h4.2.3-f12.37.25", "--output", tmp_path / "e")
    assert r.exit_code == 0, r.output
    modes = _modes(tmp_path / "e")
    assert "model.safetensors" in modes and set(modes.values()) == {want}, modes


def test_export_int8_reports_accuracy_threads_and_existing_paths(tiny_tune_run, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    r = run_cli("extract", tiny_tune_run, "--config", "L3-h4.2.3-f12.37.25", "--output", tmp_path / "e")
    assert r.exit_code == 0, r.output
    r = run_cli("export", tmp_path / "e", "--int8", "--runs", "2", "--output", tmp_path / "x")
    assert r.exit_code == 0, r.output
    m = artifacts.load(tmp_path / "x", "export").metrics
    # one default thread count, from the environment, on every figure, and said with every figure
    figures = [m["latency"], m["latency_supernet"], m["int8"]["latency"]]
    assert [f["threads"] for f in figures] == [1, 1, 1]
    timing_lines = [ln for ln in r.stdout.splitlines() if " ms" in ln]
    assert len(timing_lines) == 3 and all("1 thread" in ln for ln in timing_lines), r.stdout
    # INT8 accuracy on the whole eval split, as quantize reports it
    acc = m["int8"]["accuracy"]
    n_eval = len((Path(tiny_tune_run) / "eval.jsonl").read_text().splitlines())
    assert acc["fp32"]["n"] == acc["int8"]["n"] == n_eval and acc["int8"]["split"] == "eval"
    assert 0 <= acc["int8"]["score"] <= 1 and acc["fp32"]["metric"] == "accuracy"
    assert acc["change_points"] == pytest.approx(100 * (acc["int8"]["score"] - acc["fp32"]["score"]))
    line = next(ln for ln in r.stdout.splitlines() if "-> INT8" in ln)
    assert f"{n_eval} eval examples" in line and f"({round(acc['change_points'], 2) + 0.0:+.2f} points)" in line
    assert "-0.00" not in line
    # every path the manifest names exists after the rename; none names the work directory
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    strings = _strings(manifest)
    assert not [s for s in strings if ".partial" in s]
    named = [s for s in strings if s.endswith(".onnx")]
    assert {"model.onnx", "model.int8.onnx"} <= set(named)
    assert all((tmp_path / "x" / s).is_file() for s in named), named


def test_search_table_keeps_numbers_and_full_names_without_a_terminal(tiny_tune_run, tmp_path):
    from typer.testing import CliRunner

    from instatune_cli.cli.app import app

    # a narrow COLUMNS and no TTY (CliRunner): what a log, a pipe or CI gets
    r = CliRunner().invoke(app, ["search", str(tiny_tune_run), "--evals", "8", "--population", "6", "--output",
                                 str(tmp_path / "s")], env={"COLUMNS": "50"})
    assert r.exit_code == 0, r.output
    front = json.loads((tmp_path / "s" / "front.json").read_text())["front"]
    assert front
    lines = r.stdout.splitlines()
    for row in front:  # the subnet number and its whole name on one line of the table
        assert any(ln.split("│")[1:3] and ln.split("│")[1].strip().rstrip(" *") == str(row["subnet"])
                   and ln.split("│")[2].strip() == row["name"] for ln in lines), (row["name"], r.stdout)
    assert "…" not in r.stdout
    # each evaluation line says how its candidate was proposed, never "(predicted)" for a measured score
    evals = [ln for ln in r.stderr.splitlines() if ln.lstrip().startswith("#")]
    assert len(evals) == 8 and not any("(predicted)" in ln for ln in evals)
    from instatune_cli.cli.search import ORIGINS

    assert all(ln.endswith(tuple(f"({v})" for v in ORIGINS.values())) for ln in evals), evals
    assert any(ln.startswith("next: instatune export") for ln in lines)


def test_tune_ends_with_next_line_and_percentages(tiny_bert_dir, tiny_data_dir, tmp_path):
    from conftest import tiny_tune_args

    # the settings of the tiny_tune_run fixture, which learn: a collapsed run ends otherwise (tests/tune/
    # test_collapsed_next.py)
    args = [a for a in tiny_tune_args(tiny_bert_dir, tiny_data_dir, tmp_path / "run", "--max-steps", "48",
                                      "--batch-size", "16", "--val-split", "16") if a != "--quiet"]
    r = run_cli(*args)
    assert r.exit_code == 0, r.output
    assert not artifacts.load(tmp_path / "run", "tune").metrics["super_collapsed"]
    done = next(ln for ln in r.stdout.splitlines() if ln.startswith("done"))
    assert "%" in done and " acc 0." not in done, done  # as search prints scores: 81.25%, not 0.8125
    assert r.stdout.strip().splitlines()[-1].startswith(f"next: instatune search {tmp_path / 'run'}")


def test_search_progress_hypervolume_rises_only_when_the_front_improves():
    from types import SimpleNamespace

    from instatune_cli.search.objectives import get_objective
    from instatune_cli.search.run import _ProgressLine

    rows: list[dict] = []
    ctx = SimpleNamespace(visible=rows, evals=10, objectives=[get_objective("acc"), get_objective("macs")],
                          ref_point=None, feasible=lambda r: True)
    line = _ProgressLine(ctx).line

    def hv(text: str) -> float:
        return float(text.split("hypervolume ")[1].split()[0])

    rows += [{"acc": 0.9, "macs": 10e6}, {"acc": 0.5, "macs": 20e6}]
    first = line()
    rows.append({"acc": 0.6, "macs": 15e6})  # dominated, inside the reference: nothing improved
    assert hv(line()) == hv(first)
    rows.append({"acc": 0.95, "macs": 12e6})  # a better front
    better = line()
    assert hv(better) > hv(first) and "widened" not in better
    rows.append({"acc": 0.2, "macs": 40e6})  # dominated, outside: the line says the reference moved
    assert "reference point widened" in line()


def test_joint_search_table_shows_policies_and_the_all_int8_row(tiny_tune_run, tmp_path):
    from instatune_cli.quantize.policy import QuantPolicy

    r = run_cli("search", tiny_tune_run, "--objectives", "acc,size", "--quant", "--evals", "8", "--population",
                "6", "--calibration-samples", "16", "--output", tmp_path / "s")
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "s" / "front.json").read_text())
    rows = {ln.split("│")[1].strip().rstrip(" *"): [c.strip() for c in ln.split("│")[1:-1]]
            for ln in r.stdout.splitlines() if ln.startswith("│")}
    head = next(ln for ln in r.stdout.splitlines() if ln.startswith("┃"))
    assert "INT8 policy" in head
    assert "all FP32" in rows["ref"] and "all INT8" in rows["int8"]
    size = f"{data['int8_reference']['size']:.1f} MB"
    assert size in rows["int8"], (size, rows["int8"])  # the plot's all-INT8 marker, in the table too
    for member in data["front"]:
        assert QuantPolicy.from_dict(member["policy"]).summary() in rows[str(member["subnet"])]


def _save_for_hf(model, d: Path, **kw) -> Path:
    from timm.models import save_for_hf

    save_for_hf(model, str(d), model_args={k: v for k, v in __import__("vit_tiny").TINY.items()}, **kw)
    return d


def test_vit_pickle_checkpoint_is_read_tensors_only_and_said(tmp_path, capsys):
    import torch
    from vit_tiny import pixels, tiny_timm

    from instatune_cli.adapters.vit import TimmVitAdapter

    ref = tiny_timm("vit_tiny_patch16_224", seed=3)
    d = _save_for_hf(ref, tmp_path / "bin")  # timm's default: pytorch_model.bin, no safetensors
    assert (d / "pytorch_model.bin").is_file() and not (d / "model.safetensors").exists()
    model = TimmVitAdapter().load(str(d))
    err = capsys.readouterr().err
    assert "loading pytorch_model.bin" in err and "weights_only=True" in err
    with torch.no_grad():
        assert torch.equal(model(pixels()), ref(pixels()))
    # a pickle that holds more than tensors is refused in one line, never unpickled
    torch.save({"state_dict": ref.state_dict(), "hook": print}, d / "pytorch_model.bin")
    from instatune_cli.errors import InstatuneError

    with pytest.raises(InstatuneError, match="cannot load the weights"):
        TimmVitAdapter().load(str(d))
    # safetensors is read without a word about pickles
    _save_for_hf(ref, tmp_path / "st", safe_serialization=True)
    capsys.readouterr()
    TimmVitAdapter().load(str(tmp_path / "st"))
    assert "weights_only" not in capsys.readouterr().err


def test_vit_pretrained_tag_on_another_architecture_is_noticed(tmp_path, capsys):
    from vit_tiny import tiny_timm

    from instatune_cli.adapters.vit import TimmVitAdapter

    m = tiny_timm("vit_tiny_patch16_224")  # patch 8, width 48, depth 4: not vit_tiny's augreg checkpoint
    assert m.pretrained_cfg.get("tag")  # what timm keeps on random weights
    TimmVitAdapter().load(str(_save_for_hf(m, tmp_path / "tagged", safe_serialization=True)))
    err = capsys.readouterr().err
    assert f"pretrained tag {m.pretrained_cfg['tag']!r}" in err and "not those pretrained ones" in err
    m.pretrained_cfg = {**m.pretrained_cfg, "tag": "random-init"}  # what the README's recipe does
    TimmVitAdapter().load(str(_save_for_hf(m, tmp_path / "honest", safe_serialization=True)))
    assert "pretrained tag" not in capsys.readouterr().err


def test_search_resume_fingerprint_records_the_latency_threads_used(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from instatune_cli.search.stage import Measurement, SearchOptions

    parent = SimpleNamespace(path=tmp_path, digest="d", model={"max_length": 64})
    opts = SearchOptions(objectives=["latency", "macs"])

    def fingerprint(threads: str) -> str:
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        return Measurement.of(parent, ["latency", "macs"], opts).fingerprint

    assert fingerprint("1") == fingerprint("1") != fingerprint("2")
