"""`tune --grad-projection`: the super-network's and sub-networks' gradients kept apart, projected where they
conflict, summed (tune/projection.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import one_thread, tiny_tune_config

from instatune_cli.errors import InstatuneError
from instatune_cli.tune.config import TuneConfig
from instatune_cli.tune.projection import GradientProjection

pytestmark = pytest.mark.usefixtures("single_thread")


def _params(sup: list[torch.Tensor], sub: list[torch.Tensor | None], protect: str) -> tuple[GradientProjection, list]:
    ps = [torch.nn.Parameter(torch.zeros_like(s)) for s in sup]
    proj = GradientProjection(ps, protect)
    proj.sup = [s.clone() for s in sup]
    for p, b in zip(ps, sub, strict=True):
        p.grad = None if b is None else b.clone()
    return proj, ps


def _flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize("protect", ["super", "subnets"])
def test_conflicting_gradients_lose_the_part_against_the_protected_side(protect: str) -> None:
    sup = [torch.tensor([1.0, 0.0]), torch.tensor([[2.0]])]
    sub = [torch.tensor([-3.0, 1.0]), torch.tensor([[-1.0]])]
    s, b = _flat(sup), _flat(sub)
    proj, ps = _params(sup, sub, protect)
    cos = proj.combine()
    assert cos == pytest.approx(float(s @ b / (s.norm() * b.norm())))
    assert cos < 0
    out = _flat([p.grad for p in ps])
    kept, other = (s, out - s) if protect == "super" else (b, out - b)
    # the unprotected side's part is now orthogonal to the protected gradient: it no longer undoes its progress
    assert float(other @ kept) == pytest.approx(0.0, abs=1e-5)
    want = s + b - (s @ b) / (kept @ kept) * kept
    assert torch.allclose(out, want, atol=1e-6)


def test_agreeing_gradients_are_summed_unchanged_and_missing_ones_are_kept() -> None:
    sup = [torch.tensor([1.0, 2.0]), torch.tensor([0.5])]
    sub = [torch.tensor([1.0, 0.0]), None]  # the sub-network did not reach the second parameter
    proj, ps = _params(sup, sub, "super")
    assert proj.combine() > 0
    assert torch.equal(ps[0].grad, torch.tensor([2.0, 2.0])) and torch.equal(ps[1].grad, torch.tensor([0.5]))
    assert proj.sup == [None, None]  # ready for the next step


def test_the_swap_keeps_each_sides_gradients_apart_over_micro_batches() -> None:
    """Two micro-batches: the super-network's passes accumulate in its own buffer, the sub-networks' in .grad."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    proj = GradientProjection([w], "super")
    for k in (1.0, 2.0):
        proj.to_super()
        (k * w.sum()).backward()  # d/dw = k
        proj.to_subs()
        (k * (w ** 2).sum()).backward()  # d/dw = 2 k w
    assert torch.equal(proj.super_grads()[0], torch.tensor([3.0, 3.0]))
    assert torch.equal(w.grad, torch.tensor([6.0, 12.0]))


def test_option_is_validated_and_fingerprinted_only_when_on() -> None:
    base = TuneConfig(model="m", task="sst2")
    assert "grad_projection" not in base.fingerprint_dict()  # runs from before the option still resume
    assert TuneConfig(model="m", task="sst2", grad_projection="super").fingerprint() != base.fingerprint()
    with pytest.raises(InstatuneError, match="unknown --grad-projection 'both'; use none, super, subnets"):
        TuneConfig(model="m", task="sst2", grad_projection="both").validate()


def test_a_projected_run_trains_and_logs_the_conflict(tiny_bert_dir: Path, tiny_data_dir: Path,
                                                      tmp_path: Path) -> None:
    """Train records of sampled steps carry the cosine of the two gradients and the share of conflicting steps;
    the step before any sub-network trains exactly as without projection."""
    from safetensors.torch import load_file

    from instatune_cli.tune.loop import run_tune

    logs = {}
    for mode in ("none", "super"):
        with one_thread():
            run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, tmp_path / mode, max_steps=6, log_every=1,
                                      super_warmup=0.3, grad_projection=mode))
        logs[mode] = [json.loads(x) for x in (tmp_path / mode / "log.jsonl").read_text().splitlines()
                      if '"event": "train"' in x]
    sampled = [r for r in logs["super"] if r["subnets"]]
    assert len(sampled) == 4 and all("grad_cos" not in r for r in logs["super"] if not r["subnets"])
    for r in sampled:
        assert -1.0 <= r["grad_cos"] <= 1.0 and r["grad_conflict"] in (0.0, 1.0)
        assert (r["grad_conflict"] == 1.0) == (r["grad_cos"] < 0)
    assert all("grad_cos" not in r for r in logs["none"])
    # the first two steps have no sub-network: identical losses; after sampling the runs part (when they conflict)
    assert [r["loss"] for r in logs["none"][:3]] == [r["loss"] for r in logs["super"][:3]]
    w = [load_file(str(tmp_path / m / "model" / "model.safetensors")) for m in ("none", "super")]
    if any(r["grad_cos"] < 0 for r in sampled):
        assert any(not torch.equal(w[0][k], w[1][k]) for k in w[0])
