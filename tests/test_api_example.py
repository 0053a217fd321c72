"""The README's Python-API example: a user-supplied objective searched on a tuned super-network."""

from __future__ import annotations

import json

from instatune_cli.search import ObjectiveSpec, run_search, supernet


def test_custom_objective_on_a_tuned_supernet(tiny_tune_run, tmp_path):
    obj = supernet.build(tiny_tune_run, ["acc"])
    phone_ms = ObjectiveSpec("phone_ms", "min", "ms")
    calls = []

    def my_device_benchmark(sub):  # stands in for a phone; deterministic in the config
        calls.append(sub.id)
        return 1.0 + 0.5 * sub.layers + 0.1 * sum(sub.heads) + 0.001 * sum(sub.ffn)

    def evaluate(sub):
        return {**obj.evaluate(sub), "phone_ms": my_device_benchmark(sub)}

    result = run_search(obj.space, ["acc", phone_ms], evaluate, exact=obj.exact, algorithm="linas",
                        evals=14, population=6, archive_dir=tmp_path / "phone-search")
    assert len(result.rows) == 14 and len(set(calls)) == 14 == len(calls)
    assert result.front and all({"subnet", "name", "acc", "phone_ms"} <= set(r) for r in result.front)
    assert any(p["objective"] == "phone_ms" for p in result.predictors)  # measured -> LINAS predicts it
    rows = [json.loads(x) for x in (tmp_path / "phone-search" / "archive.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in result.rows]
