"""A third-party search algorithm is one class and one decorator: this file registers a toy hill climber (ask /
tell, search/interface.py) without touching `instatune_cli/`, runs it through `run_search` and through
`instatune search --algorithm climb`, and checks that an unknown name is one line listing the registered ones
(docs/architecture.md, "Search")."""

from __future__ import annotations

import importlib.metadata
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_cli_error, run_cli

import instatune_cli.search.interface as I
from instatune_cli.errors import InstatuneError
from instatune_cli.search import run_search
from instatune_cli.search.interface import (
    Evaluation,
    Proposal,
    SearchAlgorithm,
    algorithm_names,
    register_algorithm,
    unregister_algorithm,
)
from instatune_cli.space import SubNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_search_run import SPACE, Evaluator, macs_of  # noqa: E402


class Climb(SearchAlgorithm):
    """Start at the smallest member; then, while any is left, propose every unseen one-step widening (one more
    head or a wider FFN in one layer, or one more layer) of the most accurate member measured so far. Proposes
    bare SubNets (recorded with origin "climb") and stops on its own when the best member has no new neighbour."""

    def __init__(self, ctx: Any, rng: Any, *, population: int, batch: int) -> None:
        super().__init__(ctx, rng, population=population, batch=batch)
        self.best: dict[str, Any] | None = None
        self.asked: list[list[SubNet]] = []
        self.told: list[list[Evaluation]] = []

    def ask(self) -> list[Proposal | SubNet]:
        if self.best is None:
            out = [self.ctx.space.smallest()]
        else:
            out = [s for s in self.neighbours(SubNet.from_dict(self.best)) if not self.ctx.seen(s.id)]
        self.asked.append(out)
        return list(out)

    def tell(self, results: list[Evaluation]) -> None:
        self.told.append(results)
        for r in results:
            if self.best is None or r.row["acc"] > self.best["acc"]:
                self.best = dict(r.row)

    def neighbours(self, sub: SubNet) -> list[SubNet]:
        space, out = self.ctx.space, []
        for i in range(sub.layers):
            for genes, choices in ((sub.heads, space.heads[i]), (sub.ffn, space.ffn[i])):
                wider = [c for c in choices if c > genes[i]]
                if wider:
                    g = list(genes)
                    g[i] = wider[0]
                    out.append(SubNet(tuple(g), sub.ffn) if genes is sub.heads else SubNet(sub.heads, tuple(g)))
        deeper = [n for n in space.layers if n > sub.layers]
        if deeper:
            n = deeper[0]
            out.append(SubNet.make(n, [*sub.heads, *(space.heads[i][0] for i in range(sub.layers, n))],
                                   [*sub.ffn, *(space.ffn[i][0] for i in range(sub.layers, n))]))
        return out


@pytest.fixture
def climb() -> Iterator[list[Climb]]:
    """Register the toy as `climb` for one test; yields the instances the search made."""
    made: list[Climb] = []

    class Recorded(Climb):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            made.append(self)

    register_algorithm("climb")(Recorded)
    try:
        yield made
    finally:
        unregister_algorithm("climb")


def test_a_registered_algorithm_drives_the_search(tmp_path: Path, climb: list[Climb]) -> None:
    assert "climb" in algorithm_names()
    ev = Evaluator()
    res = run_search(SPACE, ["acc", "macs"], ev, exact={"macs": macs_of}, algorithm="Climb", evals=12, population=4,
                     archive_dir=tmp_path)
    (algo,) = climb
    asked = [s.id for batch in algo.asked for s in batch]
    told = [r.proposal.sub.id for batch in algo.told for r in batch]
    assert [r["id"] for r in res.rows] == ev.calls == told == asked[: len(told)]  # measured in the order asked
    assert res.rows[0]["id"] == SPACE.smallest().id and len(res.rows) == 12  # the budget, exactly
    assert {r["origin"] for r in res.rows} == {"climb"} and [r["iteration"] for r in res.rows] == [0] * 12
    assert all(r.fresh for batch in algo.told for r in batch)
    assert res.algorithm == "climb" and res.summary()["algorithm"] == "climb"
    archived = [json.loads(x)["id"] for x in (tmp_path / "archive.jsonl").read_text().splitlines()]
    assert archived == [r["id"] for r in res.rows] and (tmp_path / "front.csv").is_file()


def test_an_algorithm_may_stop_before_the_budget(tmp_path: Path, climb: list[Climb]) -> None:
    """When the smallest member stays the most accurate, the climber has nothing new after its two neighbours: the
    search ends after 3 of the 4 evaluations it may spend."""
    from instatune_cli.space import SearchSpace

    four = SearchSpace.from_dict({"layers": [1], "heads": [2, 4], "ffn": [4, 8]})
    res = run_search(four, ["acc", "macs"], lambda s: {"acc": -s.heads[0] - s.ffn[0]}, exact={"macs": macs_of},
                     algorithm="climb", evals=4, population=2, archive_dir=tmp_path)
    assert [r["name"] for r in res.rows] == ["L1-h2-f4", "L1-h4-f4", "L1-h2-f8"]
    assert climb[0].asked[-1] == [] and len(climb[0].asked) == 3  # it said it was done; the driver stopped


def test_bad_proposals_are_one_line(tmp_path: Path) -> None:
    class Outside(SearchAlgorithm):
        def ask(self) -> list[Proposal | SubNet]:
            return [Proposal(SubNet((2, 2), (8, 999)), "mine", 1)]

        def tell(self, results: list[Evaluation]) -> None:
            raise AssertionError("nothing was measured")

    class Junk(Outside):
        def ask(self) -> list[Any]:
            return ["L2-h2-f8"]

    class Stuck(Outside):
        def ask(self) -> list[Proposal | SubNet]:
            return [self.ctx.space.smallest()]

        def tell(self, results: list[Evaluation]) -> None:
            pass

    for name, cls in (("outside", Outside), ("junk", Junk), ("stuck", Stuck)):
        register_algorithm(name)(cls)
    try:
        with pytest.raises(InstatuneError, match="FFN width 999 in layer 1 is outside the space"):
            run_search(SPACE, ["acc", "macs"], Evaluator(), exact={"macs": macs_of}, algorithm="outside", evals=8,
                       population=4, archive_dir=tmp_path / "a")
        with pytest.raises(InstatuneError, match="algorithm 'junk' proposed 'L2-h2-f8'; ask\\(\\) returns Proposal"):
            run_search(SPACE, ["acc", "macs"], Evaluator(), exact={"macs": macs_of}, algorithm="junk", evals=8,
                       population=4, archive_dir=tmp_path / "b")
        ev = Evaluator()
        with pytest.raises(InstatuneError, match="proposed only sub-networks it had already measured 1000 times"):
            run_search(SPACE, ["acc", "macs"], ev, exact={"macs": macs_of}, algorithm="stuck", evals=8,
                       population=4, archive_dir=tmp_path / "c")
        assert ev.calls == [SPACE.smallest().id]
    finally:
        for name in ("outside", "junk", "stuck"):
            unregister_algorithm(name)


def test_register_checks_what_it_decorates() -> None:
    with pytest.raises(TypeError, match="decorates a SearchAlgorithm subclass"):
        register_algorithm("x")(dict)
    with pytest.raises(ValueError, match="must be one word"):
        register_algorithm("two words")


def test_the_cli_runs_a_plugin_algorithm(tiny_tune_run: Path, tmp_path: Path, climb: list[Climb]) -> None:
    out = tmp_path / "s"
    r = run_cli("search", tiny_tune_run, "--algorithm", "climb", "--evals", "5", "--population", "4", "--output",
                out, "--json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "archive.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and {x["origin"] for x in rows} == {"climb"}
    assert rows[0]["id"] == climb[0].ctx.space.smallest().id
    assert json.loads((out / "manifest.json").read_text())["options"]["algorithm"] == "climb"
    assert (out / "front.csv").is_file() and (out / "pareto.png").is_file()


def test_an_unknown_algorithm_is_one_line_listing_the_registered_ones(tiny_tune_run: Path, tmp_path: Path,
                                                                      climb: list[Climb]) -> None:
    out = tmp_path / "s"
    r = run_cli("search", tiny_tune_run, "--algorithm", "bayes", "--evals", "5", "--population", "4", "--output", out)
    line = assert_cli_error(r, "unknown algorithm 'bayes'")
    assert line.endswith("known: climb, linas, nsga2, random")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []  # refused before any output


def test_entry_points_register_algorithms(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An `instatune.algorithms` entry point (a real `EntryPoint`: its module is imported, which registers the
    algorithm) is loaded when the registry is first read; a broken one warns and leaves the others working."""
    (tmp_path / "my_sweep.py").write_text(
        "from instatune_cli.search.interface import SearchAlgorithm, register_algorithm\n\n\n"
        "@register_algorithm('ep-sweep')\n"
        "class Sweep(SearchAlgorithm):\n"
        "    def ask(self):\n        return []\n\n"
        "    def tell(self, results):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [importlib.metadata.EntryPoint("sweep", "my_sweep", I.ENTRY_POINT_GROUP),
           importlib.metadata.EntryPoint("broken", "no_such_module_of_instatune", I.ENTRY_POINT_GROUP)]
    seen: list[str] = []
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: seen.append(group) or eps)
    monkeypatch.setattr(I, "_DISCOVERED", False)
    monkeypatch.setattr(I, "_REGISTRY", dict(I._REGISTRY))
    monkeypatch.delitem(sys.modules, "my_sweep", raising=False)
    with pytest.warns(UserWarning, match="'broken'.*failed to load"):
        names = algorithm_names()
    assert seen == [I.ENTRY_POINT_GROUP]
    assert names == ["ep-sweep", "linas", "nsga2", "random"]
    assert I.algorithm_class("EP-Sweep").__module__ == "my_sweep"
