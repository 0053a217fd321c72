"""A collapsed front member (no better than a constant predictor) is never picked by --pick nor suggested by the
`next:` line; a front of nothing but collapsed members says so and suggests nothing."""

from __future__ import annotations

from pathlib import Path

from instatune_cli.cli.search import next_lines
from instatune_cli.search.stage import collapse_rule, pick_cheapest

REF = {"acc": 0.80}


def row(n: int, acc: float, macs: float, collapsed: bool = False, eval_collapsed: bool = False) -> dict:
    return {"subnet": n, "id": f"id{n}", "acc": acc, "macs": macs, "collapsed": collapsed,
            "eval_collapsed": eval_collapsed}


def test_pick_skips_a_collapsed_member_even_when_it_is_cheapest_and_within_the_drop() -> None:
    front = [row(1, 0.79, 1.0, collapsed=True), row(2, 0.795, 2.0), row(3, 0.80, 3.0)]
    assert pick_cheapest(front, REF, max_drop=5, cost="macs")["subnet"] == 2
    assert pick_cheapest([row(1, 0.79, 1.0, collapsed=True)], REF, 5, "macs") is None
    front[0]["collapsed"] = False
    assert pick_cheapest(front, REF, max_drop=5, cost="macs")["subnet"] == 1


def test_next_line_never_points_at_a_collapsed_member() -> None:
    path = Path("run-search")
    ok = {"front": [row(1, 0.7, 1.0), row(2, 0.8, 2.0)], "picked": 2}
    assert next_lines(ok, path) == ["next: instatune export run-search --subnet 2   (the picked sub-network)"]
    mixed = {"front": [row(1, 0.5, 1.0, collapsed=True), row(2, 0.8, 2.0)], "picked": None}
    (line,) = next_lines(mixed, path)
    assert line.startswith("next:") and "not flagged collapsed" in line
    bad_pick = {"front": [row(1, 0.5, 1.0), row(2, 0.8, 2.0, eval_collapsed=True)], "picked": 2}
    (line,) = next_lines(bad_pick, path)
    assert "--subnet 2" not in line and "collapsed on the eval split" in line
    dead = {"front": [row(1, 0.5, 1.0, collapsed=True), row(2, 0.5, 2.0, eval_collapsed=True)], "picked": None}
    assert next_lines(dead, path) == []  # the stage's one note says so (below)
    assert next_lines({"front": [], "picked": None}, path) == []  # nothing to export, so no export line


def test_a_front_of_collapsed_members_is_one_note() -> None:
    from types import SimpleNamespace

    from instatune_cli.search.stage import _collapse_notes

    front = [row(1, 0.0, 1.0, collapsed=True), row(2, -0.1, 2.0, eval_collapsed=True)]
    obj = SimpleNamespace(metric="mcc", reference={"collapsed": False})
    (note,) = _collapse_notes([1, 2], front, obj)
    assert "every front member is collapsed (MCC at or below 0)" in note and "nothing on it is worth exporting" in note


def test_collapse_rule_in_words() -> None:
    assert "MCC at or below 0" in collapse_rule("mcc")
    assert "correlation at or below 0" in collapse_rule("pearson")
    assert "majority" in collapse_rule("accuracy") and "F1" in collapse_rule("f1")
