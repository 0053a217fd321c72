"""bench/provenance.py: what makes a bench figure checkable (commit, clean tree, the code that ran, every run
kept, raw rows). Each test builds a throwaway git repository with a bench script and a stand-in package."""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_provenance", REPO / "bench" / "provenance.py")
prov = importlib.util.module_from_spec(_spec)
sys.modules["bench_provenance"] = prov  # dataclasses look their module up there
_spec.loader.exec_module(prov)

DEMO = '''"""A bench that records one figure."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.provenance import add_arguments, start  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--value", type=float, default=1.0)
add_arguments(ap)
args = ap.parse_args()
p = start("demo", __file__, allow_dirty=args.allow_dirty)
p.write_rows([{"i": i, "v": args.value} for i in range(3)])
p.finish({"figure": args.value, "nested": {"x": 2 * args.value}})
print("ran")
'''


def git(top: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=top, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    top = tmp_path / "repo"
    (top / "bench" / "results").mkdir(parents=True)
    (top / "instatune_cli").mkdir()
    (top / "instatune_cli" / "__init__.py").write_text("VERSION = 1\n")
    shutil.copy(REPO / "bench" / "provenance.py", top / "bench" / "provenance.py")
    (top / "bench" / "demo.py").write_text(DEMO)
    (top / ".gitignore").write_text("bench/results/*/\n__pycache__/\n")
    git(top, "init", "-q")
    git(top, "config", "user.email", "t@example.com")
    git(top, "config", "user.name", "t")
    git(top, "add", ".")
    git(top, "commit", "-q", "-m", "init")
    return top


def start(top: Path, **kw):
    return prov.start("demo", top / "bench" / "demo.py", package=top / "instatune_cli", argv=["bench/demo.py"], **kw)


def test_clean_tree_records_the_commit_and_every_run_is_kept(repo):
    head = git(repo, "rev-parse", "HEAD").strip()
    for v in (3.0, 1.0, 2.0, 10.0):
        p = start(repo)
        assert p.clean and p.commit == head and p.diff is None and p.dirty == []
        rec = p.finish({"figure": v}, result_file=repo / "bench" / "results" / "demo.json")
        assert rec["commit"] == head and rec["clean"] is True and rec["result"] == "bench/results/demo.json"
        assert "changed_during_run" not in rec
    hist = prov.read_history("demo", repo / "bench" / "results")
    assert [r["summary"]["figure"] for r in hist] == [3.0, 1.0, 2.0, 10.0]
    assert all(r["command"] == "python bench/demo.py" for r in hist)
    # the median of all runs, not the last one
    assert prov.median_figure("demo", "figure", repo / "bench" / "results") == 2.5
    st = prov.figure_stats("demo", "figure", repo / "bench" / "results")
    assert (st["n"], st["min"], st["max"]) == (4, 1.0, 10.0)
    assert prov.median_figure("demo", "missing", repo / "bench" / "results") is None


def test_outputs_under_bench_results_do_not_make_the_tree_dirty(repo):
    (repo / "bench" / "results" / "demo.json").write_text("{}")
    (repo / "bench" / "results" / "demo.history.jsonl").write_text("")
    assert start(repo).clean


def test_dirty_tree_is_refused_in_one_line(repo):
    (repo / "instatune_cli" / "__init__.py").write_text("VERSION = 2\n")
    with pytest.raises(SystemExit) as e:
        start(repo)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg
    assert "instatune_cli/__init__.py" in msg and "--allow-dirty" in msg
    assert not list((repo / "bench" / "results").iterdir())  # nothing written
    (repo / "instatune_cli" / "__init__.py").write_text("VERSION = 1\n")
    (repo / "instatune_cli" / "new.py").write_text("X = 1\n")  # an untracked source file counts too
    with pytest.raises(SystemExit, match="new.py"):
        start(repo)


def test_allow_dirty_stores_the_diff_beside_the_result(repo):
    (repo / "instatune_cli" / "__init__.py").write_text("VERSION = 2\n")
    (repo / "instatune_cli" / "extra.py").write_text("EXTRA = 'untracked'\n")
    p = start(repo, allow_dirty=True)
    assert not p.clean and p.diff and p.diff.startswith("bench/results/demo.") and p.diff.endswith(".diff")
    diff = (repo / p.diff).read_text()
    assert "-VERSION = 1" in diff and "+VERSION = 2" in diff and "+EXTRA = 'untracked'" in diff
    rec = p.finish({"figure": 1.0})
    assert rec["clean"] is False and rec["diff"] == p.diff and len(rec["dirty"]) == 2
    # the diff applies to the recorded commit and gives back the tree that ran
    clone = repo.parent / "clone"
    git(repo.parent, "clone", "-q", str(repo), str(clone))
    git(clone, "checkout", "-q", rec["commit"])
    git(clone, "apply", str(repo / p.diff))
    assert (clone / "instatune_cli" / "__init__.py").read_text() == "VERSION = 2\n"
    assert (clone / "instatune_cli" / "extra.py").read_text() == "EXTRA = 'untracked'\n"
    assert prov.figure_stats("demo", "figure", repo / "bench" / "results", clean_only=True)["n"] == 0


def test_a_copy_of_the_source_outside_the_repository_is_refused(repo, tmp_path):
    outside = tmp_path / "copy"
    shutil.copytree(repo / "bench", outside / "bench")
    shutil.copytree(repo / "instatune_cli", outside / "instatune_cli")
    with pytest.raises(SystemExit, match="not inside a git work tree"):
        prov.start("demo", outside / "bench" / "demo.py", package=outside / "instatune_cli")
    # the script is the repository's, the package a copy elsewhere
    with pytest.raises(SystemExit, match="not the tracked one"):
        prov.start("demo", repo / "bench" / "demo.py", package=outside / "instatune_cli")
    # a copy inside the work tree but not tracked (an ignored folder) is a copy too
    ignored = repo / "bench" / "results" / "old"
    shutil.copytree(repo / "bench", ignored / "bench", ignore=shutil.ignore_patterns("results"))
    with pytest.raises(SystemExit, match="not a tracked file"):
        prov.start("demo", ignored / "bench" / "demo.py", package=repo / "instatune_cli")


def test_raw_rows_are_compressed_when_large_and_read_back(repo):
    p = start(repo)
    small = p.write_rows([{"i": 1}])
    assert small.name == "demo.rows.jsonl" and prov.read_jsonl(small) == [{"i": 1}]
    rows = [{"i": i, "text": "x" * 100} for i in range(5000)]
    big = p.write_rows(rows)
    assert big.name == "demo.rows.jsonl.gz" and not small.exists()  # no stale uncompressed copy beside it
    assert prov.read_jsonl(repo / "bench" / "results" / "demo.rows.jsonl") == rows
    assert gzip.decompress(big.read_bytes()).count(b"\n") == 5000
    again = prov.write_jsonl(repo / "bench" / "results" / "again.jsonl", rows)[0]
    assert again.read_bytes() == big.read_bytes()  # same rows, same bytes (no timestamp in the gzip header)
    rec = p.finish({"figure": 1.0})
    assert [r["file"] for r in rec["rows"]] == ["bench/results/demo.rows.jsonl", "bench/results/demo.rows.jsonl.gz"]


def test_the_bench_script_end_to_end(repo):
    """`python bench/demo.py` from the repository root, as every bench is run."""
    run = [sys.executable, "bench/demo.py"]
    ok = subprocess.run([*run, "--value", "4"], cwd=repo, capture_output=True, text=True)
    assert ok.returncode == 0 and "ran" in ok.stdout, ok.stderr
    # its own outputs do not block the next run
    assert subprocess.run([*run, "--value", "6"], cwd=repo, capture_output=True, text=True).returncode == 0
    (repo / "bench" / "demo.py").write_text(DEMO + "# edited\n")
    bad = subprocess.run(run, cwd=repo, capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: ") and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    dirty = subprocess.run([*run, "--value", "8", "--allow-dirty"], cwd=repo, capture_output=True, text=True)
    assert dirty.returncode == 0, dirty.stderr
    hist = [json.loads(ln) for ln in (repo / "bench" / "results" / "demo.history.jsonl").read_text().splitlines()]
    assert [(r["summary"]["figure"], r["clean"]) for r in hist] == [(4.0, True), (6.0, True), (8.0, False)]
    assert hist[2]["command"] == "python bench/demo.py --value 8 --allow-dirty"
    assert "# edited" in (repo / hist[2]["diff"]).read_text()
    cli = subprocess.run([sys.executable, "bench/provenance.py", "median", "demo", "nested.x"], cwd=repo,
                         capture_output=True, text=True)
    assert cli.returncode == 0 and "median 12 over 3 run(s)" in cli.stdout, cli.stderr


def test_imported_records_count_in_the_median_and_say_so():
    hist = [prov.imported_record("demo", {"figure": 5.0}, "bench/results/demo.json", None, "abc", None, "before"),
            {"summary": {"figure": 1.0}, "clean": True}, {"summary": {"figure": 2.0}, "clean": True}]
    assert hist[0]["imported"] is True and hist[0]["clean"] is None and hist[0]["commit"] is None
    assert prov.figure_stats("demo", "figure", history=hist)["median"] == 2.0
    assert prov.figure_stats("demo", "figure", history=hist, clean_only=True)["median"] == 1.5


def test_a_figure_shared_by_two_result_files_is_not_mixed(repo):
    """convergence.py writes one result file per task and learning rate under one bench name, with the same summary
    keys: the median must be taken within one result file, and the CLI refuses to mix them."""
    hist_file = repo / "bench" / "results" / "demo.history.jsonl"
    for result, v in (("demo_sst2.json", 0.85), ("demo_stsb.json", 0.75), ("demo_stsb.json", 0.77)):
        prov.append_history(hist_file, {"summary": {"s42.super": v}, "clean": True,
                                        "result": f"bench/results/{result}"})
    st = prov.figure_stats("demo", "s42.super", repo / "bench" / "results")
    assert st["n"] == 3 and st["result_files"] == ["demo_sst2.json", "demo_stsb.json"]
    assert prov.median_figure("demo", "s42.super", repo / "bench" / "results", result="demo_stsb.json") == 0.76
    mixed = subprocess.run([sys.executable, "bench/provenance.py", "median", "demo", "s42.super"], cwd=repo,
                           capture_output=True, text=True)
    assert mixed.returncode != 0 and "--result" in mixed.stderr and "Traceback" not in mixed.stderr
    one = subprocess.run([sys.executable, "bench/provenance.py", "median", "demo", "s42.super", "--result",
                          "bench/results/demo_sst2.json"], cwd=repo, capture_output=True, text=True)
    assert one.returncode == 0 and "median 0.85 over 1 run(s)" in one.stdout, one.stderr


def test_a_result_written_elsewhere_keeps_its_history_beside_it(repo, tmp_path):
    """A smoke run (`--out /tmp/x.json`) leaves the committed history alone."""
    out = tmp_path / "smoke" / "demo.json"
    p = prov.start("demo", repo / "bench" / "demo.py", package=repo / "instatune_cli", argv=["bench/demo.py"],
                   out=out)
    rows = p.write_rows([{"i": 1}])
    rec = p.finish({"figure": 1.0}, result_file=out)
    assert rows.parent == out.parent and rec["result"] == str(out)
    assert prov.read_history("demo", out.parent)[0]["summary"] == {"figure": 1.0}
    assert not (repo / "bench" / "results" / "demo.history.jsonl").exists()


def test_a_reused_run_made_under_another_default_is_refused(tmp_path: Path) -> None:
    """A bench reuses finished runs by folder name; one whose run.json records another value for an option the
    bench leaves at its default (the super-network's weight changed 1 -> 2) must stop the bench with one line,
    while options the bench passes, and runs that match today's defaults, go through."""
    from instatune_cli.tune.config import TuneConfig

    argv = ["tune", "m", "--task", "stsb", "--lr", "1e-4", "--seed", "42"]
    run = tmp_path / "elastic-s42"
    run.mkdir()
    now = TuneConfig(model="m", task="stsb", lr=1e-4, seed=42).fingerprint_dict()
    (run / "run.json").write_text(json.dumps({"options": now}))
    assert prov.stale_defaults(run, argv) == {}
    (run / "run.json").write_text(json.dumps({"options": {**now, "super_ce": None, "lr": 5e-5}}))
    assert prov.stale_defaults(run, argv) == {"super_ce": (None, now["super_ce"])}  # --lr is the bench's own
    assert prov.stale_defaults(run, [*argv, "--super-ce", "1"]) == {}
    with pytest.raises(SystemExit, match=r"error: .*elastic-s42 was made \(at abc\) under other tune defaults "
                                         r"\(--super-ce None -> "):
        prov.refuse_stale(run, argv, "abc")
    plain = tmp_path / "plain-s42"
    plain.mkdir()
    (plain / "run.json").write_text(json.dumps({"options": {**TuneConfig(model="m", plain=True).fingerprint_dict()}}))
    assert prov.stale_defaults(plain, [*argv, "--plain"]) == {}
    # a plain run made before an elastic-only default changed (--super-warmup 0 -> 0.3) trained the same weights
    old = {**TuneConfig(model="m", plain=True).fingerprint_dict(), "num_subnets": 1, "sampling": "uniform",
           "super_ce": None, "super_warmup": 0.0, "hidden_distill": 0.0}  # as such a run's run.json records them
    (plain / "run.json").write_text(json.dumps({"options": old}))
    assert prov.stale_defaults(plain, [*argv, "--plain"]) == {}
    (plain / "run.json").write_text(json.dumps({"options": {**old, "warmup_ratio": 0.0}}))
    assert prov.stale_defaults(plain, [*argv, "--plain"]) == {"warmup_ratio": (0.0, 0.1)}
    assert prov.stale_defaults(tmp_path / "no-such-run", argv) == {}
