"""The timm vision family (instatune_cli/adapters/vit.py): loading and the registry, elastic ViT / DeiT / BEiT /
BEiT-3 against timm's own models, importance reordering, closed-form MACs (against ptflops) and params, extraction of
both kinds and their reload without instatune. Tiny models only, offline."""

from __future__ import annotations

import copy
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
from vit_tiny import (
    ARCHS,
    BEIT3_EPS,
    HEAD_DIM,
    LABELS,
    TINY,
    has_sublayer_norms,
    is_beit,
    masked_reference,
    pixels,
    save_tiny,
    timm_reference,
    tiny_timm,
)

from instatune_cli.adapters import check_model_source, family_for_source, family_named, load_model
from instatune_cli.errors import InstatuneError
from instatune_cli.space import ModelDims, SubNet

FAM = family_named("vit")
D, FULL_H, FULL_F = TINY["embed_dim"], TINY["num_heads"], 4 * TINY["embed_dim"]

#: (depth rule, sub-network): uniform and per-layer heads/widths, first and spread depth rules
SUBS = [
    ("first", SubNet.make(4, FULL_H, FULL_F)),
    ("first", SubNet.make(2, [3, 1], [100, 7])),
    ("spread", SubNet.make(3, [2, 4, 3], [100, 192, 50])),
    ("spread", SubNet.make(2, FULL_H, 96)),
    ("spread", SubNet.make(1, [1], [1])),
]


def elastic(arch: str, depth: str = "first", seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(unmodified timm model, a copy adopted by the family and made elastic)."""
    orig = tiny_timm(arch, seed)
    m = FAM.prepare(copy.deepcopy(orig), LABELS)
    FAM.make_elastic(m, depth)
    return orig, m


# ---- registry and loading -------------------------------------------------------------------------------

def test_registry_claims_dirs_and_timm_ids(tmp_path: Path) -> None:
    d = save_tiny(FAM, "vit_tiny_patch16_224", tmp_path / "vit")
    assert family_for_source(str(d)) is FAM
    assert check_model_source(str(d)) == str(d)
    for src in ("vit_base_patch16_224", "timm/vit_base_patch16_224.augreg_in21k", "hf-hub:timm/deit_tiny_patch16_224",
                "beitv2_base_patch16_224", "deit_tiny_distilled_patch16_224.fb_in1k", "beit3_base_patch16_224",
                "timm/beit3_large_patch16_224.in22k_ft_in1k"):
        assert family_for_source(src) is FAM, src
    for src in ("bert-base-uncased", "google/vit-base-patch16-224", "resnet50"):
        assert family_for_source(src) is None, src


def test_model_types_of_timm_names() -> None:
    """BEiT-3 is a timm VisionTransformer, named `timm_beit3` (by its architecture) rather than `timm_vit`."""
    from instatune_cli.adapters.vit import _model_type_of_arch

    for arch, mt in (("vit_base_patch16_224", "timm_vit"), ("deit3_small_patch16_224", "timm_deit"),
                     ("beitv2_base_patch16_224", "timm_beit"), ("beit3_base_patch16_224", "timm_beit3"),
                     ("beit3_large_patch16_224.indomain_in22k_ft_in1k", "timm_beit3"), ("resnet50", None),
                     ("beit3_nope", None)):
        assert _model_type_of_arch(arch) == mt, arch
        assert mt is None or FAM.supports(mt)
    m = FAM.prepare(tiny_timm("beit3_base_patch16_224"), LABELS)
    assert m.config.model_type == "timm_beit3" and FAM.dims(m.config) == FAM.dims_of(m)
    with pytest.raises(InstatuneError, match="unknown timm model"):
        load_model("beit3_nope")


@pytest.mark.parametrize("src", ["vit_nonexistent_patch99_224", "timm/vit_nope", "hf-hub:timm/beit_nope"])
def test_unknown_timm_id_is_one_line(src: str) -> None:
    with pytest.raises(InstatuneError) as e:
        load_model(src)
    msg = str(e.value)
    assert "\n" not in msg and "unknown timm model" in msg and "timm.list_models('vit_*')" in msg


def test_missing_weights_offline_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-torch-hub"))
    for src in ("vit_base_patch16_224", "timm/beit_base_patch16_224.in22k_ft_in22k_in1k"):
        with pytest.raises(InstatuneError) as e:
            load_model(src, num_labels=3)
        msg = str(e.value)
        assert "\n" not in msg and "no cached weights" in msg and "save_for_hf" in msg, msg


def test_timm_id_loads_from_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A timm id whose weights are in the HF cache loads offline with them (not random ones)."""
    import huggingface_hub.constants as hc
    import timm
    from safetensors.torch import save_file

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    repo = timm.models.get_pretrained_cfg("vit_tiny_patch16_224").hf_hub_id
    torch.manual_seed(3)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(snap / "model.safetensors"))
    m = load_model("vit_tiny_patch16_224")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(m(x), src(x))
    assert m.config.model_type == "timm_vit" and m.config.num_labels == 1000
    m3 = load_model("timm/vit_tiny_patch16_224", id2label={0: "a", 1: "b", 2: "c"})
    assert m3.head.out_features == 3 and m3.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert torch.equal(m3.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_save_load_round_trip_in_timm_layout(tmp_path: Path) -> None:
    import timm

    orig = tiny_timm("deit_tiny_distilled_patch16_224")
    m = FAM.prepare(copy.deepcopy(orig), LABELS)
    FAM.make_elastic(m)  # an elastic model saves stock keys
    FAM.save(m, None, tmp_path / "m")
    x = pixels()
    back = load_model(str(tmp_path / "m"), id2label=LABELS)
    plain = timm.create_model(f"local-dir:{tmp_path / 'm'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(back(x), orig(x)) and torch.equal(plain(x), orig(x))
    cfg = back.config
    assert (cfg.model_type, cfg.num_labels, cfg.id2label, cfg.architecture) == \
        ("timm_deit", 10, LABELS, "deit_tiny_distilled_patch16_224")
    assert cfg.label2id["class3"] == 3 and cfg.model_args["depth"] == 4
    fresh = load_model(str(tmp_path / "m"), id2label={0: "x", 1: "y"}, eager=True)
    assert fresh.head.out_features == fresh.head_dist.out_features == 2 and fresh.config.num_labels == 2
    assert not any(b.attn.fused_attn for b in fresh.blocks)
    assert FAM.dims(FAM.load_config(str(tmp_path / "m"))) == FAM.dims_of(back)


def test_dims_and_modeldims_record() -> None:
    _, m = elastic("deit_tiny_distilled_patch16_224")
    d = FAM.dims_of(m)
    assert (d.family, d.num_layers, d.num_heads, d.head_dim, d.hidden, d.ffn, d.num_labels) == \
        ("vit", 4, 4, HEAD_DIM, D, FULL_F, 10)
    assert (d.image_size, d.patch_size, d.channels, d.prefix_tokens, d.image_tokens, d.head_tokens) == \
        (32, 8, 3, 2, 18, 2)
    assert (d.vocab_size, d.max_positions, d.type_vocab_size) == (0, 0, 0)
    assert ModelDims.from_dict(d.to_dict()) == d and not ModelDims.from_dict(d.to_dict()) != d
    assert type(d).from_dict(d.to_dict()) == d and FAM.dims(m.config) == d
    assert FAM.random_batch(m, 2, 999)["pixel_values"].shape == (2, 3, 32, 32)


# ---- elastic: function, sub-networks, reordering ----------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_full_config_is_timms_model_and_switching_copies_nothing(arch: str) -> None:
    orig = tiny_timm(arch)
    m = FAM.prepare(copy.deepcopy(orig), LABELS)
    x = pixels()
    with torch.no_grad():
        before = m(x)
    keys, ptrs = list(m.state_dict()), [p.data_ptr() for p in m.parameters()]
    FAM.make_elastic(m, "spread")
    with torch.no_grad():
        assert torch.equal(m(x), before) and torch.equal(before, orig(x))
        for _, sub in SUBS:
            FAM.activate(m, sub)
            m(x)
        FAM.activate(m, None)
        assert torch.equal(m(x), before)
    assert list(m.state_dict()) == keys and [p.data_ptr() for p in m.parameters()] == ptrs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("depth,sub", SUBS, ids=[f"{d}-{s.name}" for d, s in SUBS])
def test_subnet_equals_independent_timm_models(arch: str, depth: str, sub: SubNet) -> None:
    orig, m = elastic(arch, depth)
    keep = FAM.kept_layers(m, sub)
    FAM.activate(m, sub)
    x = pixels()
    with torch.no_grad():
        got = m(x)
        if not has_sublayer_norms(arch):  # BEiT-3's norms see only the kept units: no masking reproduces that
            masked = masked_reference(orig, keep, list(sub.heads), list(sub.ffn))(x)
            assert (got - masked).abs().max() < 1e-5
        if not is_beit(arch) or (set(sub.heads) == {FULL_H} and len(set(sub.ffn)) == 1):
            ref = timm_reference(arch, orig, keep, list(sub.heads), list(sub.ffn))
            assert (got - ref(x)).abs().max() < 1e-5
        small = FAM.extract(m, sub)
        assert torch.equal(small(x), got)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("taylor", [False, True])
def test_importance_reordering_keeps_the_full_model(arch: str, taylor: bool) -> None:
    orig, m = elastic(arch, "spread")
    batches = [{"pixel_values": pixels(5), "labels": torch.tensor([1, 2, 3])}] if taylor else None
    info = FAM.reorder_by_importance(m, batches)
    assert any(o != sorted(o) for o in info["head_orders"])  # something moved
    x = pixels()
    with torch.no_grad():
        assert (m(x) - orig(x)).abs().max() < 1e-5
        for _, sub in SUBS[1:3]:  # the reordered super-network still extracts exactly
            FAM.activate(m, sub)
            assert torch.equal(FAM.extract(m, sub)(x), m(x))


def test_unsupported_structures_are_one_line() -> None:
    from timm.layers import Attention, LayerNormFp32, RmsNorm

    class GatedAttention(Attention):
        def __init__(self, *args, **kw) -> None:
            super().__init__(*args, gated=True, **kw)

    for arch, kw, why in (
            ("vit_tiny_patch16_224", {"global_pool": "map"}, "attention pooling"),
            ("beit_base_patch16_224", {"use_shared_rel_pos_bias": True, "use_rel_pos_bias": False}, "shared"),
            ("beit3_base_patch16_224", {"global_pool": "map"}, "attention pooling"),
            ("beit3_base_patch16_224", {"attn_layer": GatedAttention}, "gated"),
            ("vit_tiny_patch16_224", {"scale_attn_norm": True, "norm_layer": RmsNorm}, "RmsNorm over the attention"),
            ("vit_tiny_patch16_224", {"scale_mlp_norm": True, "norm_layer": LayerNormFp32},
             "LayerNormFp32 over the MLP"),
    ):
        m = tiny_timm(arch, **kw)
        with pytest.raises(InstatuneError, match="not support") as e:
            FAM.make_elastic(m)
        assert why in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("arch,kw", [("vit_tiny_patch16_224", {"scale_attn_norm": True}),
                                     ("vit_tiny_patch16_224", {"scale_mlp_norm": True}),
                                     ("beit_base_patch16_224", {"scale_mlp": True})],
                         ids=["vit-attn-norm", "vit-mlp-norm", "beit-mlp-norm"])
def test_one_sublayer_norm_is_supported(arch: str, kw: dict) -> None:
    """A plain ViT (or BEiT) with just one of BEiT-3's sub-layer norms: elastic, exact, extracts (both kinds)."""
    orig = tiny_timm(arch, **kw)
    m = FAM.prepare(copy.deepcopy(orig), LABELS)
    FAM.make_elastic(m, "spread")
    x = pixels()
    with torch.no_grad():
        assert torch.equal(m(x), orig(x))
        for sub in (SubNet.make(3, [2, 4, 1], [100, 192, 5]), SubNet.make(2, FULL_H, 96)):
            FAM.activate(m, sub)
            small = FAM.extract(m, sub)
            assert torch.equal(small(x), m(x))
            assert FAM.params(FAM.dims_of(m), sub) == sum(p.numel() for p in small.parameters())
    FAM.activate(m, None)
    FAM.reorder_by_importance(m)
    with torch.no_grad():
        assert (m(x) - orig(x)).abs().max() < 1e-5


def test_elastic_layer_norm_is_a_view_of_the_prefix() -> None:
    import pickle

    from timm.layers import LayerNorm
    from torch.nn import functional as F

    from instatune_cli.adapters.elastic import ElasticLayerNorm

    torch.manual_seed(0)
    ln = LayerNorm(8, eps=BEIT3_EPS)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    ref = copy.deepcopy(ln)
    ptrs = [p.data_ptr() for p in ln.parameters()]
    assert ElasticLayerNorm.wrap(ln) is ln and ElasticLayerNorm.wrap(ln) is ln
    assert isinstance(ln, ElasticLayerNorm) and ln.active == 8 and [p.data_ptr() for p in ln.parameters()] == ptrs
    x = torch.randn(2, 3, 8)
    assert torch.equal(ln(x), ref(x))  # full width: the original class's forward
    ln.active = 5
    y = ln(x[..., :5])
    assert y.shape == (2, 3, 5)
    assert torch.allclose(y, F.layer_norm(x[..., :5], (5,), ref.weight[:5], ref.bias[:5], BEIT3_EPS), atol=1e-6)
    small = LayerNorm(5, eps=BEIT3_EPS)
    small.load_state_dict({"weight": ref.weight[:5], "bias": ref.bias[:5]})
    assert torch.equal(y, small(x[..., :5]))  # a smaller timm LayerNorm, bit for bit
    y.sum().backward()
    assert ln.weight.grad[5:].abs().sum() == 0 and ln.weight.grad[:5].abs().sum() > 0
    back = pickle.loads(pickle.dumps(ln))
    assert back.active == 5 and torch.equal(back(x[..., :5]), y.detach())
    ln.reset()
    assert ln.active == 8 and list(ln.state_dict()) == ["weight", "bias"]
    with pytest.raises(TypeError):
        ElasticLayerNorm.wrap(torch.nn.LayerNorm((4, 8)))


# ---- MACs and params ------------------------------------------------------------------------------------

def _bias_adds(d: ModelDims, sub: SubNet) -> int:
    """What ptflops' aten backend adds to the matmul MACs: one add per bias element of the patch conv and of
    every linear (qkv or BEiT's q|k|v bias, proj, fc1, fc2, the classifier heads)."""
    t = d.image_tokens
    n = (d.image_size // d.patch_size) ** 2 * d.hidden
    n += sum(t * (3 * h * d.head_dim + d.hidden + f + d.hidden) for h, f in zip(sub.heads, sub.ffn, strict=True))
    return n + d.head_tokens * d.num_labels


def _ptflops(model: torch.nn.Module) -> int:
    from ptflops import get_model_complexity_info

    for b in model.blocks:
        b.attn.fused_attn = False  # SDPA is one aten op ptflops does not count; explicit matmuls are bmm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        macs, _ = get_model_complexity_info(model, (3, TINY["img_size"], TINY["img_size"]), as_strings=False,
                                            backend="aten", print_per_layer_stat=False, verbose=False)
    return int(macs)


@pytest.mark.parametrize("arch", [*ARCHS[:3], "beit3_base_patch16_224"])
def test_macs_match_ptflops_exactly_up_to_bias_adds(arch: str) -> None:
    """ptflops (aten backend, eager attention) counts mm/addmm/bmm/convolution: our closed form plus the bias
    adds it also counts; everything else (norms incl. BEiT-3's sub-layer norms, softmax, GELU, layer scale,
    position bias, average pooling) it counts as 0."""
    _, m = elastic(arch, "spread")
    d = FAM.dims_of(m)
    for _, sub in SUBS[:3]:
        FAM.activate(m, sub)
        ours = FAM.macs(d, sub, seq=128)
        assert _ptflops(m) == ours + _bias_adds(d, sub)  # the super-network with `sub` active
        assert _ptflops(FAM.extract(m, sub)) == ours + _bias_adds(d, sub)  # the extracted model


def test_vit_b16_macs_and_params() -> None:
    """Full ViT-B/16 at 224 px with 1000 classes: the paper's 17.6 GMACs (ours 17.56 G); timm's 86.6 M params."""
    import timm

    m = timm.create_model("vit_base_patch16_224", pretrained=False, device="meta")
    d = FAM.dims_of(m)
    full = SubNet.make(12, 12, 3072)
    macs = FAM.macs(d, full, seq=128)
    print(f"ViT-B/16 224px: {macs:,} MACs = {macs / 1e9:.2f} G")
    assert macs == 17_563_828_224 and round(macs / 1e9, 1) == 17.6
    assert FAM.params(d, full) == sum(p.numel() for p in m.parameters()) == 86_567_656


@pytest.mark.parametrize("arch", ARCHS)
def test_params_closed_form_is_exact(arch: str) -> None:
    _, m = elastic(arch, "spread")
    d = FAM.dims_of(m)
    assert FAM.params(d, SubNet.make(4, FULL_H, FULL_F)) == sum(p.numel() for p in m.parameters())
    for _, sub in SUBS:
        assert FAM.params(d, sub) == sum(p.numel() for p in FAM.extract(m, sub).parameters()), sub.name


def test_beit3_params_include_the_sublayer_norms() -> None:
    """BEiT-3 base at 224 px: timm's parameter count, with 2 norm parameters per attention unit (attn.norm over
    768) and per MLP neuron (mlp.norm over 3072) in the per-unit constants."""
    import timm

    m = timm.create_model("beit3_base_patch16_224", pretrained=False, device="meta")
    d = FAM.dims_of(m)
    full = SubNet.make(12, 12, 3072)
    assert FAM.params(d, full) == sum(p.numel() for p in m.parameters())
    assert d.width_params == 4 * 768 + 3 + 2 and d.ffn_params == 2 * 768 + 1 + 2
    vit = FAM.dims_of(timm.create_model("vit_base_patch16_224", pretrained=False, device="meta",
                                        global_pool="avg"))
    assert FAM.macs(d, full, 0) == FAM.macs(vit, full, 0)  # the norms are not MACs


# ---- extraction -----------------------------------------------------------------------------------------

def _import_standalone(d: Path):
    spec = importlib.util.spec_from_file_location(f"modeling_instatune_vit_{abs(hash(str(d)))}",
                                                  d / "modeling_instatune_vit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("arch", ARCHS)
def test_extraction_of_both_kinds_round_trips(arch: str, tmp_path: Path) -> None:
    import timm

    from instatune_cli.extract import save_extracted

    _, m = elastic(arch, "spread")
    x = pixels()
    out = tmp_path / "small"
    # stock: all heads, one width -> a plain timm model
    stock = SubNet.make(3, FULL_H, 150)
    res = save_extracted(m, stock, None, out)
    assert res["kind"] == "stock" and res["params_match"] and res["kept_layers"] == [0, 1, 3]
    assert "local-dir" in res["load_with"] and not (out / "modeling_instatune_vit.py").exists()
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert FAM.load_extracted(out).config.model_type == m.config.model_type
    FAM.activate(m, stock)
    with torch.no_grad():
        assert (plain(x) - m(x)).abs().max() < 1e-5
    assert len(plain.blocks) == 3 and plain.blocks[0].mlp.fc1.out_features == 150
    # per-layer heads and widths -> the standalone module beside the weights, into the same directory
    per = SubNet.make(3, [2, 4, 1], [100, 192, 5])
    res = save_extracted(m, per, None, out)
    assert res["kind"] == "instatune" and res["params_match"] and res["model_type"].startswith("instatune_timm_")
    mod = _import_standalone(out)
    small = mod.load(str(out))
    FAM.activate(m, per)
    with torch.no_grad():
        assert (small(x) - m(x)).abs().max() < 1e-5
    again = FAM.load_extracted(out)
    assert again.config.layer_heads == [2, 4, 1] and again._instatune_adapter is FAM and not again.training
    if has_sublayer_norms(arch):  # the sub-layer norms at each block's own width, with BEiT-3's eps
        assert [(b.attn.norm.normalized_shape[0], b.mlp.norm.normalized_shape[0]) for b in small.blocks] == \
            [(2 * HEAD_DIM, 100), (4 * HEAD_DIM, 192), (1 * HEAD_DIM, 5)]
        assert {n.eps for b in small.blocks for n in (b.attn.norm, b.mlp.norm)} == {BEIT3_EPS}
        assert again.config.model_type == "instatune_timm_beit3"
    # and back to stock: the stale standalone file goes
    save_extracted(m, stock, None, out)
    assert not (out / "modeling_instatune_vit.py").exists()


def test_standalone_imports_only_torch_timm_safetensors_json() -> None:
    import ast

    import instatune_cli.adapters.standalone.modeling_instatune_vit as sa

    tree = ast.parse(Path(sa.__file__).read_text())
    roots = {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    roots |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert roots <= {"__future__", "torch", "timm", "safetensors", "json"}, roots


def test_preprocessor_encode_and_extract_with_it(tmp_path: Path) -> None:
    from PIL import Image

    from instatune_cli import data as D
    from instatune_cli.extract import save_extracted
    from instatune_cli.images import ImagePreprocessor

    d = save_tiny(FAM, "vit_tiny_patch16_224", tmp_path / "vit")
    m = load_model(str(d), id2label=LABELS)
    pre = FAM.load_preprocessor(d)  # no preprocessor_config.json: from the model's timm data config
    assert pre.input_size == (3, 32, 32)
    FAM.save(m, pre, tmp_path / "with-pre")
    assert FAM.load_preprocessor(tmp_path / "with-pre") == pre
    paths = []
    for i in range(4):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (40, 36), (i * 60, 10, 200 - i * 40)).save(p)
        paths.append(str(p))
    enc = FAM.encode(pre, D.Split(paths, [0, 1, 0, 1], None), max_length=0)
    batches = FAM.eval_batches(enc, 3)
    assert [b["pixel_values"].shape[0] for b in batches] == [3, 1]
    FAM.make_elastic(m, "spread")
    res = save_extracted(m, SubNet.make(2, [4, 2], [64, 64]), pre, tmp_path / "small", batches=batches)
    assert res["kind"] == "instatune" and ImagePreprocessor.load(tmp_path / "small") == pre
    assert FAM.logits(m, batches[0]).shape == (3, 10)


def test_pickles_elastic_model() -> None:
    import pickle

    _, m = elastic("beit_base_patch16_224")
    _, v = elastic("vit_tiny_patch16_224")
    _, b3 = elastic("beit3_base_patch16_224")
    for model in (m, v, b3):
        back = pickle.loads(pickle.dumps(model))
        FAM.activate(back, SUBS[1][1])
        FAM.activate(model, SUBS[1][1])
        x = pixels()
        with torch.no_grad():
            assert torch.equal(back(x), model(x))
    assert "instatune_cli.adapters.vit" in sys.modules


def test_load_data_reads_an_image_folder(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from PIL import Image

    for split, n in (("train", 4), ("val", 2), ("extra-val", 1)):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(tmp_path / split / c / f"{i}.png")
    cfg = SimpleNamespace(model="m", task="imagefolder", data=str(tmp_path), eval_data=None, limit_train=None,
                          limit_eval=None, val_split=2, val_data=None, seed=0)
    data = FAM.load_data(cfg)
    assert data.labels == ["cat", "dog"] and len(data.train) == 6 and len(data.val) == 2 and len(data.eval) == 4
    data = FAM.load_data(SimpleNamespace(**{**vars(cfg), "val_split": None, "val_data": str(tmp_path / "extra-val")}))
    assert len(data.train) == 8 and len(data.val) == 2 and data.source["val"]["kind"] == "folder"
    with pytest.raises(InstatuneError, match="imagefolder"):
        FAM.load_data(SimpleNamespace(**{**vars(cfg), "task": "sst2"}))


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "beit_base_patch16_224", "beit3_base_patch16_224"])
def test_subnetwork_trains_only_its_slice(arch: str) -> None:
    _, m = elastic(arch)
    m.train()
    FAM.activate(m, SubNet.make(2, [1, 3], [10, 20]))
    FAM.logits(m, {"pixel_values": pixels()}).sum().backward()
    a0, a1, a3 = m.blocks[0].attn, m.blocks[1].attn, m.blocks[3].attn
    g = a0.qkv.weight.grad.view(3, FULL_H * HEAD_DIM, D)
    assert g[:, :HEAD_DIM].abs().sum() > 0 and g[:, HEAD_DIM:].abs().sum() == 0
    assert a1.proj.weight.grad[:, 3 * HEAD_DIM:].abs().sum() == 0 and a3.qkv.weight.grad is None
    assert m.blocks[1].mlp.fc1.weight.grad[20:].abs().sum() == 0
    if is_beit(arch):
        assert a0.relative_position_bias_table.grad[:, 1:].abs().sum() == 0
        assert a0.q_bias.grad[HEAD_DIM:].abs().sum() == 0 and a0.q_bias.grad[:HEAD_DIM].abs().sum() > 0
    if has_sublayer_norms(arch):
        for p in (a0.norm.weight, a0.norm.bias):
            assert p.grad[HEAD_DIM:].abs().sum() == 0 and p.grad[:HEAD_DIM].abs().sum() > 0
        n1 = m.blocks[1].mlp.norm
        assert n1.weight.grad[20:].abs().sum() == 0 and n1.weight.grad[:20].abs().sum() > 0
        assert m.blocks[3].mlp.norm.weight.grad is None
