import math

import pytest

from instatune_cli.errors import InstatuneError
from instatune_cli.search.objectives import (
    BUILTIN,
    Constraint,
    ObjectiveSpec,
    get_objective,
    parse_constraint,
    parse_si,
    resolve_objectives,
)


def test_builtin_directions_and_exactness():
    assert {k: (v.direction, v.exact) for k, v in BUILTIN.items()} == {
        "acc": ("max", False), "macs": ("min", True), "params": ("min", True),
        "latency": ("min", False), "size": ("min", False),
    }
    assert get_objective("ACC").to_min(0.9) == -0.9
    assert get_objective("macs").to_min(5.0) == 5.0


def test_unknown_objective_names_the_known_ones():
    with pytest.raises(InstatuneError, match=r"unknown objective 'x'; known: acc, macs"):
        get_objective("x")


def test_custom_spec_passes_through_and_is_validated():
    spec = ObjectiveSpec("f1", "max", "", exact=False)
    assert resolve_objectives([spec, "macs"])[0] is spec
    with pytest.raises(InstatuneError, match="direction"):
        ObjectiveSpec("f1", "up")


def test_resolve_needs_two_distinct():
    assert [o.name for o in resolve_objectives("acc,macs")] == ["acc", "macs"]
    with pytest.raises(InstatuneError, match="at least two"):
        resolve_objectives(["acc"])
    with pytest.raises(InstatuneError, match="twice"):
        resolve_objectives(["acc", "acc"])


@pytest.mark.parametrize("text,value", [("6G", 6e9), ("1.5M", 1.5e6), ("250k", 250e3), ("0.9", 0.9),
                                        ("2T", 2e12), (" 12 ", 12.0), ("1e3K", 1e6), (7, 7.0)])
def test_parse_si(text, value):
    assert parse_si(text) == pytest.approx(value)


@pytest.mark.parametrize("bad", ["", "6X", "G", "6 GB", "abc"])
def test_parse_si_rejects(bad):
    with pytest.raises(InstatuneError, match="cannot read number"):
        parse_si(bad)


def test_parse_constraint_forms():
    assert parse_constraint("max-macs", "6G") == Constraint("max", "macs", 6e9)
    assert parse_constraint("min-acc=0.9") == Constraint("min", "acc", 0.9)
    assert parse_constraint("max_latency", 12) == Constraint("max", "latency", 12.0)
    assert parse_constraint("min-acc_top1", "0.5").name == "acc_top1"
    for bad in ("macs=6G", "max-", "avg-acc=1", "max-macs"):
        with pytest.raises(InstatuneError):
            parse_constraint(bad)


def test_constraint_ok_and_violation():
    c = parse_constraint("max-macs", "6G")
    assert c.ok({"macs": 6e9}) and not c.ok({"macs": 6.1e9})
    assert not c.ok({}) and not c.ok({"macs": math.nan})
    assert c.violation({"macs": 5e9}) == 0 and c.violation({"macs": 9e9}) == pytest.approx(0.5)
    m = parse_constraint("min-acc", "0.9")
    assert m.ok({"acc": 0.95}) and not m.ok({"acc": 0.85})
    assert str(c) == "max-macs=6e+09"
