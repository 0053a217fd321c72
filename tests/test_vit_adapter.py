"""The timm vision family (instatune_cli/adapters/vit.py): loading and the registry, elastic ViT / DeiT / BEiT
against timm's own models, importance reordering, closed-form MACs (against ptflops) and params, extraction of
both kinds and their reload without instatune. Tiny models only, offline."""

from __future__ import annotations

import copy
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
from vit_tiny import ARCHS, HEAD_DIM, LABELS, TINY, masked_reference, pixels, save_tiny, timm_reference, tiny_timm

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
                "beitv2_base_patch16_224", "deit_tiny_distilled_patch16_224.fb_in1k"):
        assert family_for_source(src) is FAM, src
    for src in ("bert-base-uncased", "google/vit-base-patch16-224", "resnet50"):
        assert family_for_source(src) is None, src


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
        masked = masked_reference(orig, keep, list(sub.heads), list(sub.ffn))(x)
        assert (got - masked).abs().max() < 1e-5
        if "beit" not in arch or (set(sub.heads) == {FULL_H} and len(set(sub.ffn)) == 1):
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
    for arch, kw in (("vit_tiny_patch16_224", {"global_pool": "map"}),
                     ("beit_base_patch16_224", {"use_shared_rel_pos_bias": True, "use_rel_pos_bias": False})):
        m = tiny_timm(arch, **kw)
        with pytest.raises(InstatuneError, match="not support"):
            FAM.make_elastic(m)


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


@pytest.mark.parametrize("arch", ARCHS[:3])
def test_macs_match_ptflops_exactly_up_to_bias_adds(arch: str) -> None:
    """ptflops (aten backend, eager attention) counts mm/addmm/bmm/convolution: our closed form plus the bias
    adds it also counts; everything else (norms, softmax, GELU, layer scale, position bias) it counts as 0."""
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
    for model in (m, v):
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


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "beit_base_patch16_224"])
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
    if "beit" in arch:
        assert a0.relative_position_bias_table.grad[:, 1:].abs().sum() == 0
        assert a0.q_bias.grad[HEAD_DIM:].abs().sum() == 0 and a0.q_bias.grad[:HEAD_DIM].abs().sum() > 0
