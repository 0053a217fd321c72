"""Issue 19, the artifact layer: instatune deletes or overwrites only the sibling paths it made (`<out>.partial`,
`.lock`, `.old`, `.checkpoints`, scratch directories), never follows a planted link, never writes over its own
input, and records the parent it read (docs/architecture.md, "Faults and resume")."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import assert_cli_error, run_cli, tiny_tune_args, tiny_tune_config

from instatune_cli import artifacts
from instatune_cli.errors import InstatuneError
from instatune_cli.tune.loop import PARKED_KIND, parked_dir, precheck_output, unpark_checkpoints

fcntl = pytest.importorskip("fcntl")


def write_stage(out: Path, value: str, force: bool = False, stage: str = "extract",
                parent: artifacts.Artifact | None = None) -> artifacts.Artifact:
    with artifacts.StageWriter(out, stage, {"v": value}, force=force, parent=parent) as w:
        (w.path / "weights.txt").write_text(value)
        return w.commit()


# ---- class 1: only instatune's own siblings are removed ----------------------------------------------------

def test_a_users_lock_file_is_refused_and_kept(tmp_path: Path) -> None:
    (tmp_path / "uv.lock").write_text("version = 1\n[[package]]\nname = 'x'\n")
    with pytest.raises(InstatuneError, match="uv.lock is in the way .* not an instatune lock"):
        write_stage(tmp_path / "uv", "a")
    with pytest.raises(InstatuneError, match="not an instatune lock"):
        artifacts.check_output(tmp_path / "uv", False)  # the pre-check of tune refuses it before any work
    assert (tmp_path / "uv.lock").read_text().startswith("version = 1")
    assert not (tmp_path / "uv").exists() and not (tmp_path / "uv.partial").exists()


def test_a_backup_copy_of_an_output_named_old_is_never_deleted(tmp_path: Path) -> None:
    """A user's `cp -r run run.old` is an instatune output, but instatune did not put it there."""
    out = tmp_path / "x"
    write_stage(out, "a")
    backup = tmp_path / "x.old"
    write_stage(backup, "my backup")
    with pytest.raises(InstatuneError, match="x.old is in the way .* instatune did not make it"):
        write_stage(out, "b", force=True)
    assert (backup / "weights.txt").read_text() == "my backup" and (out / "weights.txt").read_text() == "a"


def test_an_old_instatune_left_after_a_crash_is_cleared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "x"
    write_stage(out, "a")
    real = artifacts.shutil.rmtree
    monkeypatch.setattr(artifacts.shutil, "rmtree", lambda p, **k: None if Path(p).name == "x.old" else real(p, **k))
    write_stage(out, "b", force=True)  # "crashes" before removing x.old: it is left, marked as instatune's
    monkeypatch.undo()
    assert artifacts.own_kind(tmp_path / "x.old") == "old" and (out / "weights.txt").read_text() == "b"
    assert not (out / artifacts.OWN).exists()
    write_stage(out, "c", force=True)
    assert not (tmp_path / "x.old").exists() and (out / "weights.txt").read_text() == "c"


def test_a_users_checkpoints_folder_is_refused_before_any_work(tiny_bert_dir: Path, tiny_data_dir: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "run"
    notes = tmp_path / "run.checkpoints" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("mine")
    with pytest.raises(InstatuneError, match="run.checkpoints is in the way"):
        precheck_output(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out))
    partial = tmp_path / "run.partial"
    partial.mkdir()
    with pytest.raises(InstatuneError, match="instatune did not make it"):
        unpark_checkpoints(partial, "fp", resume=True)
    assert notes.read_text() == "mine"


def test_parked_checkpoints_carry_their_marker(tmp_path: Path) -> None:
    partial = tmp_path / "run.partial"
    step = parked_dir(partial) / "step-000002"
    step.mkdir(parents=True)
    (step / "state.json").write_text(json.dumps({"fingerprint": "fp"}))
    artifacts.mark_own(parked_dir(partial), PARKED_KIND)
    partial.mkdir()
    unpark_checkpoints(partial, "fp", resume=True)
    assert (partial / "checkpoints" / "step-000002" / "state.json").is_file() and not parked_dir(partial).exists()


def test_an_interrupted_extract_partial_is_removed_with_a_notice_not_resume_advice(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    part = tmp_path / "x.partial"
    part.mkdir()
    (part / artifacts.MARKER).write_text("extract")
    (part / "half.bin").write_bytes(b"0" * 10)
    art = write_stage(tmp_path / "x", "a")
    assert art.path.is_dir() and not part.exists()
    assert "removed" in capsys.readouterr().err
    # a tune run's partial at an extract's output is someone's resumable work: refused, not removed
    other = tmp_path / "y.partial"
    other.mkdir()
    (other / artifacts.MARKER).write_text("tune")
    with pytest.raises(InstatuneError, match=r"holds an unfinished tune run \(not extract\); pass --force") as e:
        write_stage(tmp_path / "y", "b")
    assert "--resume" not in str(e.value) and (other / artifacts.MARKER).is_file()


def test_scratch_directories_live_inside_the_partial(tmp_path: Path) -> None:
    with artifacts.StageWriter(tmp_path / "q", "quantize", {}) as w:
        with w.scratch(".quant-") as td:
            assert td.parent == w.path
            (td / "big.onnx").write_bytes(b"1")
        w.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


# ---- class 2: links and outputs that are their own input -------------------------------------------------

def test_a_lock_that_is_a_link_never_writes_its_target(tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "run.lock").symlink_to(target)
    with pytest.raises(InstatuneError, match="symbolic link"):
        write_stage(tmp_path / "run", "a")
    assert target.read_text() == "keep me" and (tmp_path / "run.lock").is_symlink()


@pytest.mark.parametrize("kw", [{}, {"resume": True}, {"force": True}])
def test_a_partial_that_is_a_link_is_refused(tmp_path: Path, kw: dict) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / artifacts.MARKER).write_text("search")  # even one that looks like instatune's
    (elsewhere / "mine.txt").write_text("mine")
    (tmp_path / "s.partial").symlink_to(elsewhere)
    w = artifacts.StageWriter(tmp_path / "s", "search", {}, cleanup_on_error=False, **kw)
    with pytest.raises(InstatuneError, match="symbolic link") as e:
        w.open()
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in elsewhere.iterdir()) == [artifacts.MARKER, "mine.txt"]
    assert not (tmp_path / "s.lock").exists()


def test_a_dangling_partial_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s.partial").symlink_to(tmp_path / "nowhere")
    with pytest.raises(InstatuneError, match="symbolic link"):
        write_stage(tmp_path / "s", "a", force=True)
    assert not (tmp_path / "nowhere").exists()


def test_old_and_checkpoints_links_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "x"
    write_stage(out, "a")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "x.old").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InstatuneError, match="symbolic link"):
        write_stage(out, "b", force=True)
    (tmp_path / "run.checkpoints").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "run.partial").mkdir()
    with pytest.raises(InstatuneError, match="symbolic link"):
        unpark_checkpoints(tmp_path / "run.partial", "fp", resume=True)
    assert (tmp_path / "elsewhere").is_dir()


def test_output_equal_to_holding_or_inside_its_input_is_refused(tmp_path: Path) -> None:
    tune = write_stage(tmp_path / "run", "t", stage="tune")
    search = write_stage(tmp_path / "run-search", "s", stage="search", parent=tune)
    for out, how in ((tmp_path / "run-search", "is"), (tmp_path / "run", "is"), (tmp_path, "holds"),
                     (tmp_path / "run-search" / "x", "is inside"), (tmp_path / "run" / "x", "is inside")):
        if out == tmp_path:
            continue  # the current directory rule covers `-o .`; a parent directory is covered below
        with pytest.raises(InstatuneError, match=f"{how} the input") as e:
            write_stage(out, "x", force=True, parent=search)
        assert "\n" not in str(e.value)
    with pytest.raises(InstatuneError, match="holds the input"):
        artifacts.check_output(tmp_path, True, inputs=artifacts.lineage(search))
    assert (search.path / "weights.txt").read_text() == "s" and (tune.path / "weights.txt").read_text() == "t"


def test_cli_extract_onto_its_own_run_is_one_line(tiny_tune_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_tune_run, run)
    res = run_cli("extract", run, "--config", "L2-h2-f25", "-o", run, "--force")
    assert_cli_error(res, "is the input")
    artifacts.load(run, "tune")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_tune_output_inside_its_data_is_refused(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    res = run_cli(*tiny_tune_args(tiny_bert_dir, tiny_data_dir, tiny_data_dir / "run"))
    assert_cli_error(res, "is inside the input")
    assert not (tiny_data_dir / "run.partial").exists() and not (tiny_data_dir / "run").exists()


def test_an_output_name_too_long_for_its_siblings_is_one_line(tmp_path: Path) -> None:
    name = "r" * 250
    with pytest.raises(InstatuneError, match="too long"):
        write_stage(tmp_path / name, "a")
    assert list(tmp_path.iterdir()) == []


def test_lock_text_is_escaped_and_bounded(tmp_path: Path) -> None:
    lock = artifacts.OutputLock(tmp_path / "run", "tune")
    lock.path.write_text(json.dumps({"pid": "1\x1b[31m\nhacked", "stage": "x" * 500, "host": "h", "since": "s"}))
    fd = os.open(lock.path, os.O_RDONLY)
    try:
        msg = str(lock.holder_error(fd))
    finally:
        os.close(fd)
    assert "\x1b" not in msg and "\n" not in msg and "\\x1b" in msg and len(msg) < 400


def test_a_lock_from_another_host_is_not_called_dead(tmp_path: Path) -> None:
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "stage": "tune",
                                                   "since": "t"}))
    with pytest.raises(InstatuneError, match="on host elsewhere.example, which instatune cannot check"):
        write_stage(tmp_path / "run", "a")
    assert (tmp_path / "run.lock").is_file()


def test_a_live_pid_that_no_longer_holds_the_lock_is_not_called_dead(tmp_path: Path) -> None:
    import socket

    (tmp_path / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                   "stage": "tune", "since": "t"}))
    lock = artifacts.OutputLock(tmp_path / "run", "tune")
    lock.acquire()
    try:
        assert lock.notice is not None and "no longer holds it" in lock.notice
        assert "no longer running" not in lock.notice
    finally:
        lock.release()


# ---- class 7: chained stages reuse the extract they made ----------------------------------------------------

CHAIN = "L2-h2.4-f25.37"


def test_quantize_then_export_of_the_same_subnetwork_reuse_one_extract(tiny_tune_run: Path, tmp_path: Path) -> None:
    """The README's order: `quantize run --config C` then `export run --config C --int8` (run-search --subnet N
    goes through the same code), then a second export; one extract, made once, is the parent of all."""
    run = tmp_path / "run"
    shutil.copytree(tiny_tune_run, run)
    r = run_cli("quantize", run, "--config", CHAIN, "-o", tmp_path / "q", "--calibration-samples", "8", "--runs", "1")
    assert r.exit_code == 0, r.output
    ext = tmp_path / f"run-{CHAIN}"
    made = artifacts.load(ext, "extract")
    for out in ("e1", "e2"):
        r = run_cli("export", run, "--config", CHAIN, "-o", tmp_path / out, "--no-compare", "--runs", "1")
        assert r.exit_code == 0, r.output
        assert "using the extract" in r.output
        assert artifacts.load(tmp_path / out, "export").parent("extract").path.resolve() == ext.resolve()
    assert artifacts.load(ext, "extract").digest == made.digest  # never remade
    artifacts.load(tmp_path / "q", "quantize").parent("extract")  # still its parent: digest unchanged


def test_a_different_extract_in_the_chained_place_needs_force(tiny_tune_run: Path, tmp_path: Path) -> None:
    from instatune_cli.deliver import chained_extract, extract_stage

    run = tmp_path / "run"
    shutil.copytree(tiny_tune_run, run)
    other = "L2-h4-f37"
    extract_stage(run, tmp_path / f"run-{CHAIN}", config=other)  # another sub-network where CHAIN's would go
    art = artifacts.load(run, "tune")
    with pytest.raises(InstatuneError, match="another sub-network or parent.*pass --force to remake it"):
        chained_extract(art, None, CHAIN, False, print)
    made = chained_extract(art, None, CHAIN, True, print)
    assert made.model["subnet_name"] == artifacts.load(tmp_path / f"run-{CHAIN}").model["subnet_name"]
    assert made.model["subnet_name"] != other


# ---- class 3: a child records the parent it read ------------------------------------------------------------

def test_parent_rewritten_between_load_and_commit_is_refused(tmp_path: Path) -> None:
    write_stage(tmp_path / "run", "old weights", stage="tune")
    parent = artifacts.load(tmp_path / "run", "tune")
    with pytest.raises(InstatuneError, match="changed while this search read it") as e:
        with artifacts.StageWriter(tmp_path / "s", "search", {}, parent=parent) as w:
            (w.path / "scores.txt").write_text("measured on the old weights")
            write_stage(tmp_path / "run", "new weights", force=True, stage="tune")  # `tune --force` meanwhile
            w.commit()
    assert "\n" not in str(e.value)
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()


def test_a_parent_file_modified_in_place_is_refused_and_a_touch_is_not(tmp_path: Path) -> None:
    write_stage(tmp_path / "run", "weights", stage="tune")
    parent = artifacts.load(tmp_path / "run", "tune")
    loaded = parent.digest
    with artifacts.StageWriter(tmp_path / "s", "search", {}, parent=parent) as w:
        os.utime(tmp_path / "run" / "weights.txt")  # same bytes, new mtime: hashed once, accepted
        os.utime(tmp_path / "run" / "manifest.json")
        art = w.commit()
    assert art.manifest["parent"]["digest"] == loaded
    with pytest.raises(InstatuneError, match=r"weights.txt was replaced or modified"):
        with artifacts.StageWriter(tmp_path / "s2", "search", {}, parent=parent) as w:
            (tmp_path / "run" / "weights.txt").write_text("WEIGHTS")  # same size, other bytes
            w.commit()


def test_the_recorded_digest_is_the_one_read_not_the_one_at_commit(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    write_stage(tmp_path / "run", "w", stage="tune")
    parent = artifacts.load(tmp_path / "run", "tune")
    calls: list[Path] = []
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p, *a: calls.append(Path(p)) or real(p, *a))
    with artifacts.StageWriter(tmp_path / "s", "search", {}, parent=parent) as w:
        art = w.commit()
    assert art.manifest["parent"]["digest"] == parent.digest
    assert not [p for p in calls if p.is_relative_to(tmp_path / "run")]  # a clean commit rehashes nothing of it


def test_extract_checks_the_tune_run_it_read_too(tiny_tune_run: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights an extract of a search comes from are the tune run's, a grandparent: checked as well."""
    from instatune_cli import deliver

    run = tmp_path / "run"
    shutil.copytree(tiny_tune_run, run)
    orig = deliver.save_extracted

    def and_then_retouch(*a: object, **k: object) -> object:
        info = orig(*a, **k)
        w = run / "model" / "model.safetensors"
        data = bytearray(w.read_bytes())
        data[-1] ^= 1
        w.write_bytes(bytes(data))  # the tune run's weights changed while the extract read them
        return info

    monkeypatch.setattr(deliver, "save_extracted", and_then_retouch)
    with pytest.raises(InstatuneError, match="changed while this extract read it"):
        deliver.extract_stage(run, tmp_path / "e", config=CHAIN)
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.partial").exists()


# ---- class 4: inputs are bounded before they cost memory ---------------------------------------------------

def relist(p: Path) -> None:
    """Update p's entry in the manifest beside it, as a crafted artifact would."""
    mpath = p.parent / "manifest.json"
    m = json.loads(mpath.read_text())
    for f in m["files"]:
        if f["path"] == p.name:
            f.update(bytes=p.stat().st_size, sha256=artifacts.sha256_file(p))
    mpath.write_text(json.dumps(m, indent=2))


def test_a_crafted_space_json_is_refused_like_a_users_space(tiny_tune_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_tune_run, run)
    space = json.loads((run / "space.json").read_text())
    (run / "space.json").write_text(json.dumps({**space, "layers": [2, 10**18]}))
    relist(run / "space.json")
    res = run_cli("search", run, "--evals", "4", "--population", "4", "-o", tmp_path / "s")
    assert_cli_error(res, "layers has a value of", "above the bound")
    (run / "space.json").write_text(json.dumps({**space, "layers": [2, 8]}))  # bounded, but deeper than the model
    relist(run / "space.json")
    assert_cli_error(run_cli("search", run, "--evals", "4", "--population", "4", "-o", tmp_path / "s"),
                     "allows 8 layers but the model has 4")
    assert not (tmp_path / "s.partial").exists()


@pytest.mark.parametrize("rel", ["../outside.txt", "/etc/passwd", "a/../../x", "model\\..\\x", "./manifest.json"])
def test_manifest_paths_stay_inside_the_artifact(tmp_path: Path, rel: str) -> None:
    art = write_stage(tmp_path / "x", "a")
    m = json.loads((art.path / "manifest.json").read_text())
    m["files"].append({"path": rel, "bytes": 1, "sha256": "0" * 64})
    (art.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InstatuneError, match="outside the artifact"):
        artifacts.load(art.path, verify=False)


def test_a_planted_unlisted_file_is_refused(tmp_path: Path) -> None:
    art = write_stage(tmp_path / "x", "a")
    (art.path / "added_tokens.json").write_text('{"evil": 0}')
    for verify in (True, False):  # also where contents are not hashed (a teacher run, a baseline)
        with pytest.raises(InstatuneError, match="holds added_tokens.json, which its manifest does not list"):
            artifacts.load(art.path, verify=verify)
    (art.path / "added_tokens.json").unlink()
    (art.path / "weights.txt").unlink()
    (art.path / "weights.txt").symlink_to(tmp_path / "x" / "manifest.json")
    with pytest.raises(InstatuneError, match="a link"):
        artifacts.load(art.path)


def test_policy_free_text_is_bounded_and_escaped(tmp_path: Path) -> None:
    from instatune_cli.quantize.policy import Architecture, QuantPolicy

    pol = QuantPolicy.uniform(Architecture("bert", 32, 8, (4, 4), (64, 64), 2))
    d = pol.to_dict()
    d["source"] = "\x1b[2J" + "x" * 1_000_000  # within the file bound, far over the text bound
    (tmp_path / "p.json").write_text(json.dumps(d))
    got = QuantPolicy.load(tmp_path / "p.json")
    assert len(got.source) <= 200 and "\x1b" not in got.source
    d["source"] = "x" * 5_000_000
    (tmp_path / "p.json").write_text(json.dumps(d))
    with pytest.raises(InstatuneError, match="a policy is a few KB"):
        QuantPolicy.load(tmp_path / "p.json")
    d["source"] = "s"
    d["architecture"]["heads"] = [4] * 100_000
    (tmp_path / "p.json").write_text(json.dumps(d))
    with pytest.raises(InstatuneError, match="malformed"):
        QuantPolicy.load(tmp_path / "p.json")
