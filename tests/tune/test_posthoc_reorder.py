"""Prune after fine-tuning: a --plain run sorts heads and neurons by importance on its fine-tuned weights, so
its search cuts the units that matter (issue 18). The full network's function must not change, and extraction
must reproduce the cut the search scored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import one_thread, tiny_tune_config
from safetensors.torch import load_file

from instatune_cli import artifacts
from instatune_cli.space import SubNet

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def plain_pair(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, tiny_data_dir: Path) -> tuple[Path, Path]:
    """The same --plain run twice: reordered after training (the default) and not (--no-reorder)."""
    from instatune_cli.tune.loop import run_tune

    root = tmp_path_factory.mktemp("posthoc")
    with one_thread():
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, root / "sorted", plain=True, max_steps=24))
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, root / "raw", plain=True, max_steps=24,
                                  reorder=False))
    return root / "sorted", root / "raw"


def _full_logits(run: Path) -> list[torch.Tensor]:
    from instatune_cli.adapters import adapter_of
    from instatune_cli.tune import load_eval_batches, load_tuned

    model, tok, _, art = load_tuned(run)
    adapter_of(model).activate(model, None)
    out = []
    with torch.inference_mode():
        for b in load_eval_batches(art, tok, batch_size=16):
            out.append(adapter_of(model).logits(model, b))
    return out


def test_reordering_after_training_keeps_the_full_network(plain_pair: tuple[Path, Path]) -> None:
    sorted_run, raw_run = plain_pair
    info = artifacts.load(sorted_run, "tune").model["reorder"]
    assert info["when"] == "after training" and info["method"] == "taylor"
    assert artifacts.load(raw_run, "tune").model["reorder"] is None
    # same training (the reordering comes after the last step), other unit order, same function
    ws = load_file(str(sorted_run / "model" / "model.safetensors"))
    wr = load_file(str(raw_run / "model" / "model.safetensors"))
    q = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(ws[q], wr[q]), "no unit was moved: the reordering did nothing"
    assert sorted(ws[q].sum(1).tolist()) == pytest.approx(sorted(wr[q].sum(1).tolist()), abs=1e-6)
    for a, b in zip(_full_logits(sorted_run), _full_logits(raw_run), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_cut_keeps_the_most_important_heads(plain_pair: tuple[Path, Path]) -> None:
    """Layer 0's recorded order is applied to the raw run's weights: its first heads are the sorted run's."""
    sorted_run, raw_run = plain_pair
    order = artifacts.load(sorted_run, "tune").model["reorder"]["head_orders"][0]
    ws = load_file(str(sorted_run / "model" / "model.safetensors"))
    wr = load_file(str(raw_run / "model" / "model.safetensors"))
    q = "bert.encoder.layer.0.attention.self.query.weight"
    dh = wr[q].shape[0] // len(order)
    first = order[0]
    assert torch.allclose(ws[q][:dh], wr[q][first * dh:(first + 1) * dh], atol=1e-6)


def test_extraction_reproduces_the_scored_cut(plain_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """What the search scores (the active prefix on the run's model) is what extraction ships."""
    from instatune_cli.adapters import adapter_of
    from instatune_cli.extract import load_extracted, save_extracted
    from instatune_cli.tune import load_eval_batches, load_tuned

    sorted_run, _ = plain_pair
    model, tok, _, art = load_tuned(sorted_run)
    fam = adapter_of(model)
    sub = SubNet.make(3, 1, 32)  # fewer heads and neurons than the full tiny model
    save_extracted(model, sub, tok, tmp_path / "cut")  # checks logits against the active sub-network itself
    small = load_extracted(tmp_path / "cut")
    batches = load_eval_batches(art, tok, batch_size=16)
    fam.activate(model, sub)
    with torch.inference_mode():
        for b in batches:
            assert torch.allclose(fam.logits(model, b), adapter_of(small).logits(small, b), atol=1e-5)


def test_search_warns_on_an_unsorted_run(plain_pair: tuple[Path, Path]) -> None:
    from instatune_cli.search import supernet

    sorted_run, raw_run = plain_pair
    said: list[str] = []
    obj = supernet.build(raw_run, ["acc", "macs"], on_warning=said.append)
    assert len(said) == 1 and "without importance reordering" in said[0] and "--plain" in said[0]
    assert said[0] in obj.warnings
    said.clear()
    supernet.build(sorted_run, ["acc", "macs"], on_warning=said.append)
    assert said == []
