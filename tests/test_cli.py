"""The CLI shell: help, version, env, lazy imports, completions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from instatune_cli.cli import completion
from instatune_cli.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_help_lists_every_stage():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("tune", "search", "extract", "quantize", "export", "env"):
        assert cmd in r.output


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("instatune ")


def test_env_reports_the_stack():
    r = runner.invoke(app, ["env", "--json"])
    assert r.exit_code == 0
    info = json.loads(r.output)
    for k in ("torch", "transformers", "timm", "onnxruntime", "neural-compressor", "cuda_available"):
        assert k in info
    assert info["torch"] != "not installed"


def test_help_is_fast_and_imports_no_heavy_library():
    code = ("import sys, time; t=time.time(); import instatune_cli.cli.app as a; "
            "heavy=[m for m in ('torch','transformers','datasets','onnxruntime','sklearn','deap') if m in sys.modules];"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    t = time.time()
    subprocess.run([sys.executable, "-m", "instatune_cli", "--help"], capture_output=True, check=True)
    assert time.time() - t < 5  # ~0.2 s here; generous for loaded CI machines


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "instatune_cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "instatune" in r.stdout


def test_shipped_completions_are_current():
    for shell, fname in completion.SHELLS.items():
        shipped = (ROOT / "completions" / fname).read_text()
        assert shipped == completion.script(shell), (
            f"completions/{fname} is stale; run: python -m instatune_cli.cli.completion completions")


def test_completion_completes_subcommands():
    env = {**os.environ, "_INSTATUNE_COMPLETE": "complete_bash", "COMP_WORDS": "instatune ex", "COMP_CWORD": "1"}
    r = subprocess.run([sys.executable, "-m", "instatune_cli"], env=env, capture_output=True, text=True)
    assert set(r.stdout.split()) == {"extract", "export"}


def test_unsupported_model_family_is_a_one_line_error(tmp_path, tiny_data_dir):
    from conftest import assert_cli_error, run_cli

    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    r = run_cli("tune", gpt, "--data", tiny_data_dir, "--output", tmp_path / "out")
    assert_cli_error(r, "gpt2", "not a supported family")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_quantize_without_a_source_is_one_line():
    r = runner.invoke(app, ["quantize", "/nonexistent/dir"])
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output


