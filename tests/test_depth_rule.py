"""Depth rule (docs/architecture.md, "Depth rule"): under `spread` a depth-L sub-network runs exactly the
layers `space.kept_layers` names, gene k drives the k-th kept layer, and extraction / reload / stock loading
/ ONNX reproduce the super-network with it active; tune runs record the rule, and a run made before the
rule existed (`tests/fixtures/v1_tune`, space.json without `depth`) still reads as `first` and extracts
exactly the first layers, as before."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import one_thread, tiny_tune_config
from helpers import load_without_instatune, logits, max_diff, subnet_logits, tiny_batches, tiny_model
from tiny import batch, reference_bert_logits

from instatune_cli.adapters import adapter_of
from instatune_cli.extract import extract_model, load_extracted, save_extracted, verify_extracted
from instatune_cli.space import SubNet

FIXTURES = Path(__file__).parent / "fixtures"
N = 6
KEEP = [1, 3, 5]  # spread, L3 of 6 layers
PER_LAYER = SubNet((3, 1, 4), (37, 5, 12))  # mixed heads / FFN: our per-layer class
UNIFORM = SubNet((4, 4, 4), (20, 20, 20))  # every head, one FFN width: a stock config


def spread_model(family: str = "bert", seed: int = 0) -> Any:
    """A 6-layer tiny classifier (hidden 32, 4 heads, FFN 37) made elastic with the `spread` rule."""
    m = tiny_model(family, seed=seed, elastic=False, num_hidden_layers=N)
    adapter_of(m).make_elastic(m, "spread")
    return m


def reference_logits(model: Any, keep: list[int], sub: SubNet, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """The independent plain-torch BERT forward of tests/tiny.py, run over the layers `keep` only."""
    bert = model.bert
    view = SimpleNamespace(
        bert=SimpleNamespace(embeddings=bert.embeddings, pooler=bert.pooler,
                             encoder=SimpleNamespace(layer=[bert.encoder.layer[i] for i in keep])),
        config=model.config, classifier=model.classifier)
    with torch.no_grad():
        return reference_bert_logits(view, sub.heads, sub.ffn, b["input_ids"], b["attention_mask"])


def layer_prefixes(model: Any) -> list[str]:
    """State-dict prefix of each encoder layer, in order (`bert.encoder.layer.3.`)."""
    ad = adapter_of(model)
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(lay)] + "." for lay in ad.layers(model)]


def assert_layers_taken_from(supernet: Any, small_sd: dict[str, torch.Tensor], keep: list[int]) -> None:
    """Layer k of the small state dict is the super-network's layer keep[k], sliced to a prefix; no other
    super-network layer is present."""
    prefixes = layer_prefixes(supernet)
    big = supernet.state_dict()
    seen = set()
    for k, li in enumerate(keep):
        for key, v in big.items():
            if not key.startswith(prefixes[li]):
                continue
            new = prefixes[k] + key[len(prefixes[li]):]
            got = small_sd[new]
            assert torch.equal(got, v[tuple(slice(0, s) for s in got.shape)]), new
            seen.add(new)
    in_layers = {key for key in small_sd if any(key.startswith(p) for p in prefixes)}
    assert in_layers == seen


# ---- (a) which layers run, and which layer each gene drives -----------------------------------------

@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_spread_runs_exactly_the_kept_layers(family):
    m = spread_model(family)
    ad = adapter_of(m)
    ran: list[int] = []
    hooks = [lay.register_forward_hook(lambda *_a, i=i: ran.append(i)) for i, lay in enumerate(ad.layers(m))]
    b = tiny_batches(m.config)[:1]
    try:
        cases = [(PER_LAYER, KEEP), (SubNet((4,) * 4, (37,) * 4), [0, 2, 3, 5]), (SubNet((4,), (37,)), [5]),
                 (SubNet((4,) * 6, (37,) * 6), list(range(N))), (None, list(range(N)))]
        for sub, want in cases:
            ad.activate(m, sub)
            ran.clear()
            logits(m, b)
            assert ran == want, sub
            assert ad.kept_layers(m, sub) == want and ad.layer_list(m).active == tuple(want)
    finally:
        for h in hooks:
            h.remove()
        ad.activate(m, None)


def test_gene_k_drives_the_kth_kept_layer():
    m = spread_model("bert", seed=1)
    ad = adapter_of(m)
    dh = 8
    ad.activate(m, SubNet.make(2, 4, 37))  # leave other sizes behind: activate must reset them
    ad.activate(m, PER_LAYER)
    try:
        for li, lay in enumerate(ad.layers(m)):
            p = ad.parts(lay)
            h, f = (PER_LAYER.heads[KEEP.index(li)] * dh, PER_LAYER.ffn[KEEP.index(li)]) if li in KEEP else (32, 37)
            assert [p.query.active_out, p.key.active_out, p.value.active_out, p.attn_out.active_in] == [h] * 4, li
            assert [p.ffn_in.active_out, p.ffn_out.active_in] == [f] * 2, li
    finally:
        ad.activate(m, None)


def test_spread_subnet_equals_independent_reference_and_differs_from_first():
    m = spread_model("bert", seed=2)
    ad = adapter_of(m)
    b = batch()  # ragged padding, one token type (what the reference assumes)
    got = subnet_logits(m, PER_LAYER, [b])[0]
    assert (got - reference_logits(m, KEEP, PER_LAYER, b)).abs().max() < 1e-5
    ad.make_elastic(m, "first")  # idempotent re-wrap only switches the rule
    try:
        first = subnet_logits(m, PER_LAYER, [b])[0]
        assert (first - reference_logits(m, [0, 1, 2], PER_LAYER, b)).abs().max() < 1e-5
    finally:
        ad.make_elastic(m, "spread")
    assert (got - first).abs().max() > 1e-3  # the rule matters, so the checks above mean something


def test_unknown_depth_rule_is_refused():
    m = tiny_model("bert", elastic=False)
    with pytest.raises(ValueError, match="depth rule"):
        adapter_of(m).make_elastic(m, "middle")


# ---- (b) extraction renumbers the kept layers -------------------------------------------------------

@pytest.fixture(scope="module", params=["bert", "distilbert"])
def spread_supernet(request):
    return spread_model(request.param, seed=3)


@pytest.mark.parametrize("sub, kind", [(UNIFORM, "stock"), (PER_LAYER, "instatune")])
def test_spread_extraction_equals_the_active_subnet(spread_supernet, sub, kind, tmp_path):
    from transformers import AutoModelForSequenceClassification

    m = spread_supernet
    bs = tiny_batches(m.config)
    want = subnet_logits(m, sub, bs)
    small = extract_model(m, sub)
    assert small._instatune_kind == kind
    assert verify_extracted(m, sub, small, bs)["max_abs_diff"] < 1e-5
    assert_layers_taken_from(m, small.state_dict(), KEEP)

    report = save_extracted(m, sub, None, tmp_path, batches=bs)
    assert report["kind"] == kind and report["params_match"]
    assert report["depth_rule"] == "spread" and report["kept_layers"] == KEEP
    assert report["max_abs_diff"] < 1e-5 and report["reload_max_abs_diff"] < 1e-5
    assert json.loads((tmp_path / "config.json").read_text())["instatune_kept_layers"] == KEEP
    reloaded = load_extracted(tmp_path)
    assert max_diff(logits(reloaded, bs), want) < 1e-5
    assert_layers_taken_from(m, reloaded.state_dict(), KEEP)
    if kind == "stock":  # the informational config entry does not get in the way of stock loading
        auto = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
        assert type(auto) is type(m) and auto.config.instatune_kept_layers == KEEP
        assert max_diff(logits(auto, bs), want) < 1e-5
    assert max_diff(logits(m, bs), want) > 1e-3  # the sub-network is not the full network


def test_spread_per_layer_loads_with_trust_remote_code_without_instatune(tmp_path):
    m = spread_model("bert", seed=4)
    bs = tiny_batches(m.config)
    save_extracted(m, PER_LAYER, None, tmp_path, batches=bs)
    out = load_without_instatune(tmp_path, bs)
    assert out["model"] == "InstatuneBertForSequenceClassification"
    assert max_diff(out["logits"], subnet_logits(m, PER_LAYER, bs)) < 1e-5


# ---- (c) ONNX ------------------------------------------------------------------------------------------

def test_spread_subnet_onnx_matches_the_supernet(tmp_path):
    from instatune_cli.export import check_parity, export_onnx, ort_session

    m = spread_model("bert", seed=5)
    save_extracted(m, PER_LAYER, None, tmp_path)
    export_onnx(tmp_path, tmp_path / "model.onnx")
    bs = tiny_batches(m.config, ((1, 7), (4, 23)), seed=5)
    assert check_parity(tmp_path / "model.onnx", load_extracted(tmp_path), bs, atol=1e-4)["max_abs_diff"] < 1e-4
    sess = ort_session(tmp_path / "model.onnx")
    names = [i.name for i in sess.get_inputs()]
    for b, want in zip(bs, subnet_logits(m, PER_LAYER, bs), strict=True):
        (got,) = sess.run(["logits"], {k: b[k].numpy() for k in names})
        assert float(abs(torch.from_numpy(got) - want).max()) < 1e-4


# ---- (d) the real checkpoint ----------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("sub, kind", [(SubNet.make(3, 12, 1536), "stock"),
                                       (SubNet((12, 6, 8), (1536, 512, 1024)), "instatune")])
def test_minilm_l3_spread_extraction(minilm_dir, sub, kind, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from instatune_cli.adapters import load_classifier

    m = load_classifier(str(minilm_dir), num_labels=2).eval()
    adapter_of(m).make_elastic(m, "spread")
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    sents = ["it 's a charming and often affecting journey .", "unflinchingly bleak and desperate", "ok"]
    bs = [dict(tok(sents, padding=True, return_tensors="pt")), dict(tok(sents[:2], padding=True, return_tensors="pt"))]
    want = subnet_logits(m, sub, bs)
    assert (want[0] - reference_logits(m, KEEP, sub, bs[0])).abs().max() < 1e-5
    report = save_extracted(m, sub, tok, tmp_path, batches=bs)
    assert report["kind"] == kind and report["kept_layers"] == KEEP and report["depth_rule"] == "spread"
    assert report["max_abs_diff"] < 1e-5 and report["reload_max_abs_diff"] < 1e-5
    assert max_diff(logits(load_extracted(tmp_path), bs), want) < 1e-5
    if kind == "stock":
        plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
        assert max_diff(logits(plain, bs), want) < 1e-5


# ---- (e) tune runs record the rule; runs made before it read as `first` -------------------------------

@pytest.fixture(scope="module")
def spread_tune_run(tmp_path_factory, tiny_bert_dir, tiny_data_dir):
    """A 2-step tune run of the 4-layer tiny BERT with the derived space (depth `spread` by default)."""
    from instatune_cli.tune.loop import run_tune

    out = tmp_path_factory.mktemp("spread-run") / "run"
    with one_thread():
        run_tune(tiny_tune_config(tiny_bert_dir, tiny_data_dir, out, max_steps=2, reorder_batches=1))
    return out


def test_tune_run_records_spread_and_loads_with_it(spread_tune_run, tmp_path):
    from instatune_cli import artifacts
    from instatune_cli.deliver import export_stage, extract_stage
    from instatune_cli.tune import load_tuned

    assert json.loads((spread_tune_run / "space.json").read_text())["depth"] == "spread"
    assert artifacts.load(spread_tune_run, "tune").manifest["space"]["depth"] == "spread"
    model, _, space, _ = load_tuned(spread_tune_run)
    assert space.depth == "spread" and adapter_of(model).layer_list(model).depth == "spread"
    with one_thread():
        art = extract_stage(spread_tune_run, tmp_path / "e", config="L2-h4-f37")
    assert art.metrics["kept_layers"] == art.model["kept_layers"] == [1, 3]
    assert art.metrics["depth_rule"] == art.model["depth_rule"] == "spread"
    assert_layers_taken_from(model, load_extracted(art.path).state_dict(), [1, 3])
    with one_thread():  # the export manifest copies the extract's model section
        onnx = export_stage(art.path, tmp_path / "o", runs=2, compare_full=False)
    assert onnx.model["kept_layers"] == [1, 3] and onnx.model["depth_rule"] == "spread"


def test_run_made_before_the_rule_reads_as_first_and_extracts_as_before(tmp_path):
    from safetensors.torch import load_file

    from instatune_cli.deliver import extract_stage
    from instatune_cli.tune import load_tuned

    run = FIXTURES / "v1_tune"
    assert "depth" not in json.loads((run / "space.json").read_text())
    model, _, space, _ = load_tuned(run)
    assert space.depth == "first" and adapter_of(model).layer_list(model).depth == "first"
    big = model.state_dict()
    with one_thread():
        stock = extract_stage(run, tmp_path / "stock", config="L1-h2-f24")
        per_layer = extract_stage(run, tmp_path / "per-layer", config="L1-h1-f16")
    for art in (stock, per_layer):
        assert art.metrics["depth_rule"] == "first" and art.metrics["kept_layers"] == [0]
    # before the rule, L1 of this 2-layer model was the super-network's state dict without layer 1
    sd = load_file(str(stock.path / "model.safetensors"))
    want = {k: v for k, v in big.items() if not k.startswith("bert.encoder.layer.1.")}
    assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in want)
    assert_layers_taken_from(model, load_extracted(per_layer.path).state_dict(), [0])
