"""The elastic defaults that make the super-network learn like plain tuning (issue 18, bench/convergence.py):
the super-network alone for the first `--super-warmup` of steps, and its own CE at full weight when no strong
teacher teaches it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import assert_cli_error, one_thread, run_cli, tiny_tune_args, tiny_tune_config

from instatune_cli.tune.config import TuneConfig
from instatune_cli.tune.loss import LossWeights, super_term


def test_super_ce_rule() -> None:
    cfg = TuneConfig(model="m", task="sst2")
    assert cfg.super_warmup == 0.3
    assert cfg.super_ce_for(0.0) == 1.0 and cfg.super_ce_for(1.0) == cfg.alpha
    assert TuneConfig(model="m", task="sst2", super_ce=0.3).super_ce_for(0.0) == 0.3  # the paper's Eq. 1


def test_the_default_super_ce_is_fingerprinted_by_its_value() -> None:
    """The default's weight has changed (1 -> 2 -> 1): a run fingerprinted under another default (`super_ce: None`
    or the string naming 2 in run.json) must not resume under this one, and an explicit weight is recorded as
    given."""
    d = TuneConfig(model="m", task="sst2").fingerprint_dict()
    assert d["super_ce"] == "default: 1 without a teacher, alpha with one"
    assert TuneConfig(model="m", task="sst2", super_ce=1.0).fingerprint_dict()["super_ce"] == 1.0
    assert "super_ce" not in TuneConfig(model="m", task="sst2", plain=True).fingerprint_dict()  # unused there


def test_super_term_weight() -> None:
    import torch

    logits, labels = torch.tensor([[2.0, -1.0], [0.5, 0.25]]), torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert super_term(logits, labels, LossWeights(0.3)).item() == pytest.approx(0.3 * ce.item())
    assert super_term(logits, labels, LossWeights(0.3, super_ce=1.0)).item() == pytest.approx(ce.item())


@pytest.mark.parametrize("warmup", [0.0, 0.5])
def test_no_subnetwork_before_the_warmup_ends(warmup: float, tiny_bert_dir: Path, tiny_data_dir: Path,
                                              tmp_path: Path) -> None:
    from instatune_cli.tune.loop import run_tune

    with one_thread():
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, tmp_path / "r", max_steps=12, log_every=1,
                                  super_warmup=warmup))
    train = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    train = [r for r in train if r["event"] == "train"]
    first = math.ceil(warmup * 12)
    assert [bool(r["subnets"]) for r in train] == [r["step"] > first for r in train]
    man = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert man["training"]["super_warmup_steps"] == first and man["training"]["super_ce"] == 1.0


def test_a_plain_run_is_fingerprinted_without_the_elastic_options() -> None:
    """A --plain run trains no sub-network: the elastic method's options (and their defaults) cannot change its
    weights, so they do not enter its fingerprint; its own options still do, and an elastic run keeps them all."""
    from instatune_cli.tune.config import ELASTIC_ONLY

    base = TuneConfig(model="m", task="sst2", plain=True)
    assert not ELASTIC_ONLY & base.fingerprint_dict().keys()
    for k, v in dict(num_subnets=3, sampling="sandwich", super_ce=1.0, super_warmup=0.0, sub_ramp=0.5,
                     grad_projection="super", hidden_distill=0.5).items():
        assert TuneConfig(model="m", task="sst2", plain=True, **{k: v}).fingerprint() == base.fingerprint(), k
        assert TuneConfig(model="m", task="sst2", **{k: v}).fingerprint() != TuneConfig(model="m", task="sst2") \
            .fingerprint(), k
    assert TuneConfig(model="m", task="sst2", plain=True, lr=1e-4).fingerprint() != base.fingerprint()
    assert TuneConfig(model="m", task="sst2", plain=True, alpha=0.5).fingerprint() != base.fingerprint()


def test_an_elastic_option_on_a_plain_run_is_refused(tiny_bert_dir: Path, tiny_data_dir: Path,
                                                     tmp_path: Path) -> None:
    """`--plain -M 3` would train as `--plain` alone: one line naming the moot options, nothing written."""
    out = tmp_path / "run"
    r = run_cli(*tiny_tune_args(tiny_bert_dir, tiny_data_dir, out, "--plain", "-M", "3", "--super-warmup", "0"))
    assert_cli_error(r, "--num-subnets, --super-warmup are for elastic runs", "drop them, or drop --plain")
    assert not list(tmp_path.iterdir())
    r = run_cli(*tiny_tune_args(tiny_bert_dir, tiny_data_dir, out, "--plain", "--hidden-distill", "0.5"))
    assert_cli_error(r, "--hidden-distill is for elastic runs")
    TuneConfig(model="m", task="sst2", plain=True).validate()  # the defaults are no option given


def test_sub_ramp_weights() -> None:
    from instatune_cli.tune.state import TrainPlan

    plan = TrainPlan.of(TuneConfig(model="m", task="sst2", max_steps=8, super_warmup=0.25, sub_ramp=0.5), 64, 1)
    assert [plan.sub_weight(s) for s in range(8)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert TrainPlan.of(TuneConfig(model="m", task="sst2", max_steps=8), 64, 1).sub_weight(3) == 1.0
    # at its default the option is left out of the fingerprint: runs from before it existed still resume
    assert "sub_ramp" not in TuneConfig(model="m", task="sst2").fingerprint_dict()
    base = TuneConfig(model="m", task="sst2")
    assert TuneConfig(model="m", task="sst2", sub_ramp=0.3).fingerprint() != base.fingerprint()


def test_sub_ramp_scales_the_subnetwork_terms(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    """On the first sampled step (same weights, same sub-network, same batch) the ramped run's sub-network terms
    are a quarter of the unramped run's: the ramp spans 4 steps. The super-network's term is the same."""
    from instatune_cli.tune.loop import run_tune

    first = {}
    for ramp in (0.0, 1.0):
        with one_thread():
            run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, tmp_path / f"r{ramp}", max_steps=4, log_every=1,
                                      super_warmup=0.0, sub_ramp=ramp))
        log = [json.loads(x) for x in (tmp_path / f"r{ramp}" / "log.jsonl").read_text().splitlines()]
        first[ramp] = next(r for r in log if r["event"] == "train" and r["step"] == 1)
        man = json.loads((tmp_path / f"r{ramp}" / "manifest.json").read_text())
        assert man["training"]["sub_ramp_steps"] == round(ramp * 4)
    assert first[1.0]["subnets"] == first[0.0]["subnets"] != []
    assert first[1.0]["super_loss"] == pytest.approx(first[0.0]["super_loss"], rel=1e-5)
    sub = {r: first[r]["loss"] - first[r]["super_loss"] for r in first}
    assert sub[0.0] > 0 and sub[1.0] == pytest.approx(0.25 * sub[0.0], rel=1e-4)


def test_train_records_carry_the_gradient_norm_before_clipping(tiny_bert_dir: Path, tiny_data_dir: Path,
                                                                tmp_path: Path) -> None:
    """Each `train` record has the mean and largest gradient norm of its steps, measured before clipping (so a
    clip far below it does not shrink it); with clipping off there is none."""
    from instatune_cli.tune.loop import run_tune

    recs = {}
    for clip in (1e-6, 0.0):
        with one_thread():
            run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, tmp_path / f"c{clip}", max_steps=4, log_every=2,
                                      max_grad_norm=clip))
        log = [json.loads(x) for x in (tmp_path / f"c{clip}" / "log.jsonl").read_text().splitlines()]
        recs[clip] = [r for r in log if r["event"] == "train"]
    assert len(recs[1e-6]) == 2
    for r in recs[1e-6]:
        assert 1e-3 < r["grad_norm"] <= r["grad_norm_max"] < 1e4
    assert all("grad_norm" not in r for r in recs[0.0])
