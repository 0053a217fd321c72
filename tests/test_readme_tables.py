"""bench/readme_tables.py: the README's bench tables are the committed results, and the median of a bench's
history, not text typed by hand."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_readme_tables", REPO / "bench" / "readme_tables.py")
rt = importlib.util.module_from_spec(_spec)
sys.modules["bench_readme_tables"] = rt
_spec.loader.exec_module(rt)


def test_the_committed_readme_quotes_the_committed_results():
    assert rt.check((REPO / "README.md").read_text()) == []
    assert rt.main(["--check"]) == 0


def test_a_figure_edited_by_hand_is_caught():
    readme = (REPO / "README.md").read_text()
    edited = readme.replace("| L4 | 84.06 | 83.14 |", "| L4 | 84.06 | 83.41 |", 1)
    assert edited != readme and rt.check(edited) == ["depth_family"]


def test_a_figure_is_the_median_of_every_run_in_the_history(tmp_path):
    for name in rt.TABLES:
        shutil.copy(REPO / "bench" / "results" / f"{name}.json", tmp_path)
    before = rt.depth_family_table(tmp_path)
    assert "| L4 | 84.06 |" in before  # no history: the JSON's value
    with open(tmp_path / "depth_family.history.jsonl", "w") as fh:
        for v in (0.80, 0.90, 0.85, 0.70):  # the last run is not what the README shows
            fh.write(json.dumps({"summary": {"alone.first/L4": v}}) + "\n")
    assert "| L4 | 82.50 |" in rt.depth_family_table(tmp_path)
    assert rt.check((REPO / "README.md").read_text(), tmp_path) == ["depth_family"]
    assert rt.one_decimal(0.2905) == "29.1" and rt.one_decimal(0.2904) == "29.0"
