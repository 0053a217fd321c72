import random

import numpy as np
import pytest

from instatune_cli.search.objectives import ObjectiveSpec
from instatune_cli.search.pareto import (
    front_order,
    hypervolume,
    hypervolume_2d_bruteforce,
    nondominated_mask,
    pareto_front,
    ref_to_min,
    reference_point,
)

ACC = ObjectiveSpec("acc", "max")
MACS = ObjectiveSpec("macs", "min", exact=True)


def brute_front(points):
    def dom(a, b):
        pairs = list(zip(a, b, strict=True))
        return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)
    return [not any(dom(q, p) for q in points) for p in points]


@pytest.mark.parametrize("seed", range(5))
def test_nondominated_equals_brute_force(seed):
    rng = random.Random(seed)
    # small integer grid: many ties and duplicates
    m = rng.choice([2, 3])
    pts = [[rng.randint(0, 6) for _ in range(m)] for _ in range(40)]
    assert nondominated_mask(np.array(pts, float)).tolist() == brute_front(pts)


def test_front_is_not_a_convex_hull():
    # (2, 2) lies above the hull of (0, 3) and (3, 0) but is non-dominated
    mask = nondominated_mask(np.array([[0, 3], [2, 2], [3, 0], [3, 3]], float))
    assert mask.tolist() == [True, True, True, False]


def test_nan_rows_are_never_on_the_front():
    assert nondominated_mask(np.array([[np.nan, 0], [1, 1]])).tolist() == [False, True]
    assert nondominated_mask(np.zeros((0, 2))).tolist() == []


@pytest.mark.parametrize("seed", range(5))
def test_hypervolume_equals_brute_force_2d(seed):
    rng = random.Random(seed)
    pts = [(rng.uniform(0, 10), rng.uniform(0, 10)) for _ in range(rng.randint(1, 25))]
    ref = (9.0, 9.5)  # some points lie beyond it and must add nothing
    assert hypervolume(np.array(pts), ref) == pytest.approx(hypervolume_2d_bruteforce(pts, ref), rel=1e-12)


def test_hypervolume_known_values():
    assert hypervolume(np.array([[1.0, 2.0], [2.0, 1.0]]), [3, 3]) == pytest.approx(3.0)
    assert hypervolume(np.zeros((0, 2)), [1, 1]) == 0.0
    assert hypervolume(np.array([[1.0, 5.0]]), [4, 4]) == 0.0
    assert hypervolume_2d_bruteforce([(1.0, 2.0), (2.0, 1.0)], (3, 3)) == pytest.approx(3.0)
    assert hypervolume(np.array([[0.0, 0.0, 0.0]]), [1, 2, 3]) == pytest.approx(6.0)


def test_reference_point_worst_plus_margin():
    ref = reference_point(np.array([[0.0, 10.0], [2.0, 0.0]]), margin=0.1)
    assert ref.tolist() == pytest.approx([2.2, 11.0])
    assert reference_point(np.array([[5.0, 0.0]])).tolist() == pytest.approx([5.5, 0.1])


def test_ref_to_min_mixed_directions():
    assert ref_to_min({"acc": 0.5, "macs": 10}, [ACC, MACS]).tolist() == [-0.5, 10]
    assert ref_to_min([0.5, 10], [ACC, MACS]).tolist() == [-0.5, 10]


def test_front_order_numbers_best_first_ties_by_id():
    rows = [{"id": "b", "acc": 0.8, "macs": 5}, {"id": "a", "acc": 0.8, "macs": 5},
            {"id": "c", "acc": 0.9, "macs": 9}, {"id": "d", "acc": 0.7, "macs": 8}]
    front = pareto_front(rows, [ACC, MACS])
    assert [(r["subnet"], r["id"]) for r in front] == [(1, "c"), (2, "a"), (3, "b")]
    # first objective minimised: smallest first
    assert [r["id"] for r in front_order(front, [MACS, ACC])] == ["a", "b", "c"]
