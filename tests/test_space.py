"""Search space and sub-network types: presets, derivation, validation, canonical form, sampling, genes."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter

import pytest

from instatune_cli.errors import InstatuneError
from instatune_cli.space import DEFAULT_DEPTH, PRESETS, ModelDims, SearchSpace, SubNet, kept_layers

MINILM = ModelDims("bert", 6, 12, 32, 384, 1536, 30522, 512, 2, 2)
BERT_BASE = ModelDims("bert", 12, 12, 64, 768, 3072, 30522, 512, 2, 2)


def test_presets_are_the_papers():
    b = SearchSpace.preset("bert-base-paper")
    assert b.layers == tuple(range(6, 13)) and b.heads[0] == (6, 8, 10, 12) and b.ffn[11] == (1024, 2048, 3072)
    assert b.seq_len == 128
    v = SearchSpace.preset("vit-base-paper")
    assert v.layers == (11, 12) and v.heads[5] == (6, 8, 10, 12) and v.ffn[0] == (2048, 2560, 3072)
    assert set(PRESETS) == {"bert-base-paper", "vit-base-paper"}


def test_derived_space_from_model():
    s = SearchSpace.from_model(MINILM)
    assert s.layers == (3, 4, 5, 6) and s.heads[0] == (6, 8, 10, 12) and s.ffn[0] == (512, 1024, 1536)
    s.check_model(MINILM)
    # bert-base derives exactly the paper's space
    assert SearchSpace.from_model(BERT_BASE) == SearchSpace.preset("bert-base-paper")


def test_yaml_and_json_files_round_trip(tmp_path):
    per_layer = {"layers": [1, 2], "heads": [[1, 2], [2, 4]], "ffn": [8, 16], "seq_len": 64}
    (tmp_path / "s.json").write_text(json.dumps(per_layer))
    (tmp_path / "s.yaml").write_text("layers: [1, 2]\nheads: [[1, 2], [2, 4]]\nffn: [8, 16]\nseq_len: 64\n")
    a = SearchSpace.from_file(tmp_path / "s.json", default_depth=DEFAULT_DEPTH)
    b = SearchSpace.resolve(str(tmp_path / "s.yaml"))
    assert a == b and a.heads == ((1, 2), (2, 4)) and a.seq_len == 64 and a.depth == DEFAULT_DEPTH
    assert SearchSpace.from_dict(a.to_dict()) == a
    # a space.json written before the depth rule existed is read as what those runs did: keep the first L
    assert SearchSpace.from_file(tmp_path / "s.json").depth == "first"


def test_kept_layers_rules():
    assert kept_layers(3, 6, "first") == [0, 1, 2]
    assert kept_layers(3, 6, "spread") == [1, 3, 5]
    assert kept_layers(4, 6, "spread") == [0, 2, 3, 5]
    assert kept_layers(6, 12, "spread") == [1, 3, 5, 7, 9, 11]
    for n in range(1, 13):
        for k in range(1, n + 1):
            idx = kept_layers(k, n, "spread")
            assert len(set(idx)) == k and idx == sorted(idx) and idx[-1] == n - 1
    assert kept_layers(6, 6, "spread") == list(range(6))
    with pytest.raises(InstatuneError, match="depth rule"):
        kept_layers(2, 4, "middle")
    with pytest.raises(InstatuneError, match="depth rule"):
        SearchSpace.from_dict({"layers": [1], "heads": [1], "ffn": [1], "depth": "last"})


@pytest.mark.parametrize("text,msg", [
    ("layers: [1, 2\nheads: [1]", "cannot parse"),
    ("- 1\n- 2\n", "must be a mapping"),
    ("layers: []\nheads: [1]\nffn: [2]", "layers has no choices"),
    ("layers: [2]\nheads: [1]", "missing ffn"),
    ("layers: [2]\nheads: [0, 1]\nffn: [4]", "below 1"),
    ("layers: [2]\nheads: [a]\nffn: [4]", "list of integers"),
    ("layers: [2]\nheads: [[1], [1], [1]]\nffn: [4]", "choices for 3 layers"),
    ("layers: [2]\nheads: [1]\nffn: [4]\nwidth: 3", "unknown keys"),
])
def test_malformed_space_files_are_one_line_errors(tmp_path, text, msg):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(InstatuneError, match=msg) as e:
        SearchSpace.from_file(p)
    assert "\n" not in str(e.value)


def test_unknown_preset_and_missing_file():
    with pytest.raises(InstatuneError, match="unknown search-space preset"):
        SearchSpace.preset("bert-huge")
    with pytest.raises(InstatuneError, match="neither a preset"):
        SearchSpace.resolve("bert-huge")
    with pytest.raises(InstatuneError, match="does not exist"):
        SearchSpace.from_file("/nonexistent/space.yaml")


@pytest.mark.parametrize("space,msg", [
    ({"layers": [7], "heads": [12], "ffn": [1536]}, "7 layers but the model has 6"),
    ({"layers": [6], "heads": [16], "ffn": [1536]}, "16 heads"),
    ({"layers": [6], "heads": [12], "ffn": [2048]}, "FFN width 2048"),
])
def test_space_inconsistent_with_model(space, msg):
    with pytest.raises(InstatuneError, match=msg):
        SearchSpace.from_dict(space).check_model(MINILM)


def test_subnet_validation_against_space():
    s = SearchSpace.preset("bert-base-paper")
    s.check(SubNet.make(6, 6, 1024))
    for bad, msg in [(SubNet.make(5, 6, 1024), "keeps 5 layers"), (SubNet.make(6, 7, 1024), "7 heads"),
                     (SubNet.make(6, 6, 1000), "FFN width 1000")]:
        with pytest.raises(InstatuneError, match=msg):
            s.check(bad)
        assert not s.contains(bad)
    with pytest.raises(InstatuneError):
        SubNet((1, 2), (3,))


def test_canonical_form_ignores_dropped_layer_genes():
    a = SubNet.make(2, [4, 2, 1, 1], [8, 8, 3, 3])
    b = SubNet.make(2, [4, 2, 4, 4], [8, 8, 16, 16])
    assert a == b and hash(a) == hash(b) and a.id == b.id and a.name == b.name
    assert SubNet.make(3, [4, 2, 1], [8, 8, 3]).id != a.id


def test_id_is_stable_and_short():
    sub = SubNet.make(10, 10, 2048)
    assert sub.id == SubNet.from_dict({"layers": 10, "heads": [10] * 10, "ffn": [2048] * 10}).id
    assert len(sub.id) == 10 and int(sub.id, 16) >= 0
    # pinned: ids are written into archives and manifests, so they must never change between releases
    assert sub.id == "5b54f443d3"


def test_names_are_self_describing_and_parse_back():
    assert SubNet.make(10, 10, 2048).name == "L10-h10-f2048"
    sub = SubNet.make(4, [12, 12, 8, 6], [1536, 512, 512, 512])
    assert sub.name == "L4-h12x2.8.6-f1536.512x3"
    assert SubNet.parse_name(sub.name) == sub
    assert SubNet.parse_name("L10-h10-f2048") == SubNet.make(10, 10, 2048)
    with pytest.raises(InstatuneError, match="cannot read"):
        SubNet.parse_name("ten-layers")
    with pytest.raises(InstatuneError, match="one value per layer"):
        SubNet.parse_name("L3-h1.2-f4")


def test_uniform_sampling_draws_depth_once_and_widths_per_layer():
    s = SearchSpace.preset("bert-base-paper")
    rng = random.Random(0)
    subs = [s.sample(rng) for _ in range(3000)]
    depth = Counter(x.layers for x in subs)
    assert set(depth) == set(s.layers)
    assert min(depth.values()) > 3000 / 7 * 0.8  # uniform over layer choices, not over configs
    assert any(len(set(x.heads)) > 1 for x in subs)  # heads vary within a sub-network
    assert all(s.contains(x) for x in subs)
    assert [s.sample(random.Random(5)) for _ in range(1)] == [s.sample(random.Random(5))]


def test_sandwich_sampling_and_extremes():
    s = SearchSpace.preset("bert-base-paper")
    assert s.largest() == SubNet.make(12, 12, 3072) and s.smallest() == SubNet.make(6, 6, 1024)
    subs = s.sample_many(random.Random(0), 3, "sandwich")
    assert subs[0] == s.smallest() and len(subs) == 3
    assert len(s.sample_many(random.Random(0), 2, "uniform")) == 2
    with pytest.raises(InstatuneError, match="unknown sampling"):
        s.sample_many(random.Random(0), 1, "greedy")


def test_stratified_sampling_trains_narrow_members_at_the_same_mean_size():
    """Uniform per-layer draws almost never give a member narrow in every layer; stratified ones do, regularly,
    while the mean width (so the step's cost) stays that of uniform sampling; every draw is in the space and a
    seed gives the same draws."""
    s = SearchSpace.preset("bert-base-paper")

    def narrow(sub: SubNet) -> bool:
        return all(h == s.heads[i][0] for i, h in enumerate(sub.heads)) and \
            all(f == s.ffn[i][0] for i, f in enumerate(sub.ffn))

    def width(sub: SubNet) -> float:
        return sum(sub.heads) / len(sub.heads) + sum(sub.ffn) / len(sub.ffn) / 256

    uni = s.sample_many(random.Random(0), 3000, "uniform")
    strat = s.sample_many(random.Random(0), 3000, "stratified")
    assert all(s.contains(x) for x in strat)
    assert sum(map(narrow, uni)) <= 3 and sum(map(narrow, strat)) >= 30
    mean_u, mean_s = (sum(map(width, xs)) / len(xs) for xs in (uni, strat))
    assert abs(mean_s - mean_u) / mean_u < 0.05
    assert s.sample_many(random.Random(7), 5, "stratified") == s.sample_many(random.Random(7), 5, "stratified")
    assert len(set(strat)) > 1000  # widths still vary layer by layer


def test_gene_encoding_round_trips_and_covers_the_space():
    s = SearchSpace.from_dict({"layers": [1, 2], "heads": [1, 2], "ffn": [3, 4, 5]})
    bounds = s.gene_bounds()
    assert bounds == [2, 2, 2, 3, 3]
    decoded = {s.decode(g) for g in itertools.product(*[range(b) for b in bounds])}
    assert len(decoded) == s.cardinality() == 2 * 3 + (2 * 3) ** 2
    for sub in decoded:
        assert s.decode(s.encode(sub)) == sub


def test_features_mask_dropped_layers():
    s = SearchSpace.from_dict({"layers": [1, 2], "heads": [1, 2], "ffn": [3, 4]})
    f = s.features(SubNet.make(1, 2, 4))
    assert len(f) == 1 + 3 * 2 + 3 * 2 and f[4:7] == [0.0, 0.0, 0.0]
    # per-depth indicator, then indicator x mean heads share, indicator x mean FFN share
    assert f[7:] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    g = s.features(SubNet((2, 1), (4, 3)))
    assert len(g) == len(f) and g[7:] == [0.0, 1.0, 0.0, 0.75, 0.0, 0.875]


def test_features_single_depth_space_has_no_depth_terms():
    s = SearchSpace.from_dict({"layers": [2], "heads": [1, 2], "ffn": [3, 4]})
    assert len(s.features(SubNet.make(2, 1, 3))) == 1 + 3 * 2
