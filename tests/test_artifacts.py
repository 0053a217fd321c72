"""Artifact contract: atomic stage directories, manifests, validation with one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from instatune_cli import artifacts
from instatune_cli.artifacts import StageWriter, load
from instatune_cli.errors import InstatuneError

FIXTURES = Path(__file__).parent / "fixtures"


def make_stage(out: Path, stage: str = "tune", parent=None, force: bool = False, payload: str = "w"):
    w = StageWriter(out, stage, {"epochs": 1, "path": Path("x")}, parent=parent, force=force)
    with w:
        (w.path / "weights.bin").write_text(payload)
        (w.path / "sub").mkdir()
        (w.path / "sub" / "log.jsonl").write_text("{}\n")
        return w.commit(model={"family": "bert"}, metrics={"acc": 0.9})


def test_manifest_contents(tmp_path):
    art = make_stage(tmp_path / "run")
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["schema"] == "instatune.artifact" and m["schema_version"] == 1 and m["stage"] == "tune"
    assert m["options"] == {"epochs": 1, "path": "x"} and m["model"]["family"] == "bert"
    assert m["created_utc"].endswith("Z") and m["instatune_version"]
    files = {f["path"]: f for f in m["files"]}
    assert set(files) == {"weights.bin", "sub/log.jsonl"}
    assert files["weights.bin"]["bytes"] == 1 and len(files["weights.bin"]["sha256"]) == 64
    assert not (tmp_path / "run.partial").exists() and art.metrics["acc"] == 0.9


def test_refuses_overwrite_without_force_and_keeps_old(tmp_path):
    make_stage(tmp_path / "run", payload="old")
    with pytest.raises(InstatuneError, match="already exists; pass --force"):
        make_stage(tmp_path / "run", payload="new")
    assert (tmp_path / "run" / "weights.bin").read_text() == "old"
    make_stage(tmp_path / "run", payload="new", force=True)
    assert (tmp_path / "run" / "weights.bin").read_text() == "new"
    assert not (tmp_path / "run.old").exists()


def test_failed_stage_leaves_nothing_half_written(tmp_path):
    w = StageWriter(tmp_path / "run", "tune", {})
    with pytest.raises(RuntimeError), w:
        (w.path / "a").write_text("x")
        raise RuntimeError("boom")
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_resumable_partial_dir(tmp_path):
    w = StageWriter(tmp_path / "run", "tune", {}, cleanup_on_error=False)
    w.open()
    (w.path / "ckpt").write_text("1")
    w.release()  # the interrupted run's process has ended (a live one holds the output's lock)
    with pytest.raises(InstatuneError, match="pass --resume"):
        StageWriter(tmp_path / "run", "tune", {}).open()
    with pytest.raises(InstatuneError, match="holds a 'tune' run"):
        StageWriter(tmp_path / "run", "search", {}, resume=True).open()
    w2 = StageWriter(tmp_path / "run", "tune", {}, resume=True)
    assert (w2.open() / "ckpt").read_text() == "1"


@pytest.mark.parametrize("mutate,msg", [
    (lambda p: (p / "weights.bin").write_text("tampered"), "does not match its manifest digest"),
    (lambda p: (p / "weights.bin").unlink(), "weights.bin is missing"),
    (lambda p: (p / "manifest.json").write_text("{not json"), "not valid JSON"),
    (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
])
def test_load_rejects_damaged_artifacts(tmp_path, mutate, msg):
    make_stage(tmp_path / "run")
    mutate(tmp_path / "run")
    with pytest.raises(InstatuneError, match=msg) as e:
        load(tmp_path / "run")
    assert "\n" not in str(e.value) and str(tmp_path / "run") in str(e.value)


def test_load_rejects_wrong_stage_and_unknown_version(tmp_path):
    make_stage(tmp_path / "run")
    with pytest.raises(InstatuneError, match="is a 'tune' directory but a search directory"):
        load(tmp_path / "run", "search")
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    m["schema_version"] = 99
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InstatuneError, match="schema version 99"):
        load(tmp_path / "run")


def test_parent_link_and_digest_mismatch(tmp_path):
    parent = make_stage(tmp_path / "run")
    child = make_stage(tmp_path / "out" / "search", "search", parent=parent)
    assert child.manifest["parent"]["digest"] == artifacts.digest(tmp_path / "run")
    assert load(child.path).parent("tune").path.resolve() == (tmp_path / "run").resolve()
    make_stage(tmp_path / "run", payload="retrained", force=True)
    with pytest.raises(InstatuneError, match="changed since"):
        load(child.path).parent("tune")
    shutil.rmtree(tmp_path / "run")
    with pytest.raises(InstatuneError, match="parent of .* is missing"):
        load(child.path).parent("tune")


def test_schema_v1_fixture_still_loads():
    """A real stage directory written by schema v1, kept so later releases keep reading it."""
    art = load(FIXTURES / "v1_tune")
    assert art.stage == "tune" and art.manifest["schema_version"] == 1
    assert art.model["family"] == "bert"
