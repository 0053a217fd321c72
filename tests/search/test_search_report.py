import subprocess
import sys

import pytest

from instatune_cli.search.objectives import ObjectiveSpec
from instatune_cli.search.report import plot_hypervolume, plot_pareto

PNG = b"\x89PNG\r\n\x1a\n"
ROWS = [{"id": str(i), "acc": 0.5 + 0.04 * i - 0.02 * (i % 3), "macs": 1e9 * (1 + i), "size": 10.0 + i}
        for i in range(10)]
FRONT = [{"subnet": 1, **ROWS[9]}, {"subnet": 2, **ROWS[8]}, {"subnet": 3, **ROWS[0]}]


def _png(path):
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 5000
    return data


@pytest.mark.parametrize("objectives", [["acc", "macs"], ["macs", "acc"], ["acc", "macs", "size"],
                                        [ObjectiveSpec("f", "max"), ObjectiveSpec("g", "max")]])
def test_pareto_png(tmp_path, objectives):
    rows = [{**r, "f": r["acc"], "g": -r["acc"]} for r in ROWS]
    out = plot_pareto(rows, FRONT, objectives, tmp_path / "pareto.png",
                      supernet={"acc": 0.9, "macs": 11e9, "size": 20.0}, baseline={"acc": 0.85, "macs": 9e9,
                                                                                   "label": "fine-tuned"})
    _png(out)


@pytest.mark.parametrize("objectives", [["acc", "macs"], ["macs", "acc"], ["acc", "macs", "size"]])
def test_pareto_png_with_held_out_scores(tmp_path, objectives):
    front = [{**r, "eval_acc": r["acc"] - 0.03} for r in FRONT]
    out = plot_pareto(ROWS, front, objectives, tmp_path / "pareto.png", holdout={"acc": "eval_acc"},
                      supernet={"acc": 0.9, "eval_acc": 0.88, "macs": 11e9, "size": 20.0},
                      baseline={"eval_acc": 0.87, "macs": 11e9, "label": "fine-tuned"},
                      labels={"acc": "acc: mcc on val (hollow: eval)", "holdout": "front on eval"})
    plain = plot_pareto(ROWS, FRONT, objectives, tmp_path / "plain.png",
                        supernet={"acc": 0.9, "macs": 11e9, "size": 20.0})
    assert _png(out) != _png(plain)


def test_pareto_png_with_nothing_to_show(tmp_path):
    _png(plot_pareto([], [], ["acc", "macs"], tmp_path / "pareto.png"))


def test_hypervolume_png_one_or_several_runs(tmp_path):
    _png(plot_hypervolume([0.0, 1.0, 1.5, 2.0], tmp_path / "one.png"))
    runs = {"linas": [[0, 1, 2, 3], [0, 1.5, 2.5, 3.1]], "random": [[0, 0.5, 1, 1.2], [0, 0.4, 0.9]],
            "nsga2": [0, 0.8, 1.3, 2.0]}
    _png(plot_hypervolume(runs, tmp_path / "hypervolume.png", title="bench"))


def test_light_imports_no_torch_no_pyplot(tmp_path):
    """The search and its plots never import torch, and never touch pyplot (no global backend switch)."""
    code = f"""
import sys
from instatune_cli.search import run_search
from instatune_cli.search.report import plot_hypervolume
from instatune_cli.space import SearchSpace
assert "sklearn" not in sys.modules and "deap" not in sys.modules and "matplotlib" not in sys.modules
space = SearchSpace.from_dict({{"layers": [1, 2], "heads": [1, 2], "ffn": [4, 8]}})
res = run_search(space, ["acc", "macs"], lambda s: {{"acc": sum(s.heads) / 4}},
                 exact={{"macs": lambda s: sum(s.ffn)}}, evals=8, population=4,
                 archive_dir={str(tmp_path / "a")!r})
plot_hypervolume(res.hypervolume, {str(tmp_path / "hv.png")!r})
bad = [m for m in ("torch", "matplotlib.pyplot") if m in sys.modules]
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True)
