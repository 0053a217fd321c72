"""The search's trajectories, pinned: for each algorithm and a few settings, the exact sequence of evaluated
sub-networks (id, origin, iteration), the front and the hypervolume curve.

The expected values in tests/fixtures/search_pinned.json were recorded from the search as it was before the
algorithms moved behind the ask/tell interface (commit bc500d6: `run_random`, `run_nsga2` and `run_linas` each
drove their own loop and called `SearchContext.measure` themselves), by running this file as a script:
`python tests/search/test_search_pinned.py --write`. They must not move: the side-by-side results in bench/results
and every user's `--seed` depend on them. Rewrite them only for a deliberate change of an algorithm, and say so."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_search_run import REF, SPACE, Evaluator, acc_of, macs_of  # noqa: E402

from instatune_cli.search import ObjectiveSpec, SearchResult, run_search  # noqa: E402
from instatune_cli.space import SearchSpace  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "search_pinned.json"
ALGOS = ("random", "nsga2", "linas")
SMALL = SearchSpace.from_dict({"layers": [1, 2, 3], "heads": [2, 4], "ffn": [8, 16]})  # 84 sub-networks
SIZE = ObjectiveSpec("size", "min", "MB", exact=True)


def _go(d: Path, algorithm: str, *, space: SearchSpace = SPACE, evals: int = 24, seed: int = 0,
        evaluate: Any = None, objectives: Any = ("acc", "macs"), exact: Any = None, **kw: Any) -> SearchResult:
    kw.setdefault("population", 8)
    return run_search(space, list(objectives), evaluate or Evaluator(), exact=exact or {"macs": macs_of},
                      algorithm=algorithm, evals=evals, seed=seed, archive_dir=d, **kw)


def _killed_and_resumed(d: Path, algorithm: str) -> SearchResult:
    ev = Evaluator(kill_after=9)
    with pytest.raises(KeyboardInterrupt):
        _go(d, algorithm, evaluate=ev, seed=5)
    ev.kill_after = None
    return _go(d, algorithm, evaluate=ev, seed=5, resume=True)


def _resumed_with_other_settings(d: Path, algorithm: str) -> SearchResult:
    """A random search's archive continued by `algorithm` with another seed: the replay diverges at once."""
    _go(d, "random", evals=12, seed=1)
    return _go(d, algorithm, evals=20, seed=2, resume=True)


CASES: dict[str, Callable[[Path, str], SearchResult]] = {
    "ref": lambda d, a: _go(d, a, ref_point=REF),
    "constrained": lambda d, a: _go(d, a, seed=1, constraints={"max-macs": 2000, "min-acc": "0.5"}),
    "population-4": lambda d, a: _go(d, a, space=SMALL, evals=60, population=4, seed=2),  # NSGA-II immigrants
    "three-objectives": lambda d, a: _go(d, a, objectives=["acc", "macs", SIZE], evals=16,
                                         exact={"macs": macs_of, "size": lambda s: float(sum(s.ffn))},
                                         evaluate=lambda s: {"acc": acc_of(s)}),
    "killed-resumed": _killed_and_resumed,
    "resumed-other-settings": _resumed_with_other_settings,
}


def record(res: SearchResult) -> dict[str, Any]:
    return {"rows": [[r["id"], r["origin"], r["iteration"]] for r in res.rows],
            "front": [r["id"] for r in res.front], "hypervolume": res.hypervolume,
            "predictor_iterations": [p["iteration"] for p in res.predictors]}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("algorithm", ALGOS)
def test_trajectory_is_pinned(tmp_path: Path, algorithm: str, case: str) -> None:
    expected = json.loads(FIXTURE.read_text())[f"{algorithm}/{case}"]
    got = record(CASES[case](tmp_path / "s", algorithm))
    assert got["rows"] == expected["rows"]
    assert got["front"] == expected["front"]
    assert got["predictor_iterations"] == expected["predictor_iterations"]
    assert got["hypervolume"] == pytest.approx(expected["hypervolume"], rel=1e-12, abs=0.0)
    assert len({r[1] for r in got["rows"]}) > 1  # the origins are part of what is compared


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    out = {}
    for a in ALGOS:
        for c in sorted(CASES):
            with tempfile.TemporaryDirectory() as td:
                out[f"{a}/{c}"] = record(CASES[c](Path(td) / "s", a))
    cases = []  # one evaluated sub-network per line, so a diff shows where a trajectory moved
    for key, rec in out.items():
        rows = ",\n".join(f"   {json.dumps(r)}" for r in rec["rows"])
        rest = ",\n".join(f'  "{k}": {json.dumps(v)}' for k, v in rec.items() if k != "rows")
        cases.append(f' "{key}": {{\n  "rows": [\n{rows}\n  ],\n{rest}\n }}')
    FIXTURE.write_text("{\n" + ",\n".join(cases) + "\n}\n")
    print(f"wrote {FIXTURE} ({len(out)} cases)")
