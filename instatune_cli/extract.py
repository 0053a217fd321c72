"""Physically smaller models: slice a sub-network out of the elastic super-network and save it standalone.

A sub-network keeps L layers (which ones: the super-network's depth rule, docs/architecture.md "Depth
rule"; the k-th kept layer becomes layer k of the smaller model), the first h heads of each kept layer
(Q/K/V output rows and the attention-output input columns of those heads) and the first f FFN neurons
(FFN-in rows, FFN-out columns); embeddings, pooler and classifier are copied. Weights are sliced from the
super-network's *full* parameters (an elastic model's linears are views over them), so whatever sub-network
happens to be active does not matter.
What the smaller model is, and how it is saved and loaded without instatune, the family decides
(`FamilyAdapter.extract` / `save_extracted` / `load_extracted`; the transformers families' stock and per-layer
classes: `adapters/hf/extract.py`, whose names this module re-exports). This module is family-independent.

`save_extracted` checks the result twice before returning: the extracted model's logits equal the
super-network's with `sub` active, and the reloaded directory's logits equal the extracted model's. It
returns a dict of what it measured for the stage manifest, including the depth rule and the super-network
indices of the kept layers (also written to `config.json` as the informational `instatune_kept_layers`,
which transformers keeps as a plain config attribute: stock loading is unaffected).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instatune_cli.adapters import adapter_of
from instatune_cli.adapters.base import check_subnet as check_subnet
from instatune_cli.adapters.bert import input_names as input_names
from instatune_cli.adapters.bert import random_batch as random_batch
from instatune_cli.adapters.hf.extract import OWN_TYPE_KEY as OWN_TYPE_KEY
from instatune_cli.adapters.hf.extract import extract_model as extract_model
from instatune_cli.adapters.hf.extract import extracted_config as extracted_config
from instatune_cli.adapters.hf.extract import is_per_layer_dir as is_per_layer_dir
from instatune_cli.adapters.hf.extract import load_extracted as load_extracted
from instatune_cli.adapters.hf.extract import save_per_layer as save_per_layer
from instatune_cli.adapters.hf.extract import write_hf_extracted as write_hf_extracted
from instatune_cli.artifacts import readable_files
from instatune_cli.errors import InstatuneError
from instatune_cli.measure.size import weights_bytes
from instatune_cli.space import SubNet

if TYPE_CHECKING:
    import torch
    from torch import nn

#: shapes (batch, seq) of the random inputs used when the caller gives no batches
DEFAULT_CHECK_SHAPES = ((2, 16), (3, 9))
DEFAULT_ATOL = 1e-5

def family_batches(model: Any, shapes: Sequence[tuple[int, int]] = DEFAULT_CHECK_SHAPES,
                   seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random check batches of any family (its `random_batch`; image families ignore the sequence length)."""
    fam = adapter_of(model)
    return [fam.random_batch(model, b, s, seed=seed + i) for i, (b, s) in enumerate(shapes)]


def per_layer_shape(config: Any) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(heads, FFN widths) per layer of a per-layer model (ours: `layer_heads` / `layer_ffn` in its config; also
    a stock config read from such a directory, which keeps them as plain attributes); None for a uniform one."""
    heads, ffn = getattr(config, "layer_heads", None), getattr(config, "layer_ffn", None)
    if not heads or not ffn:
        return None
    return tuple(int(h) for h in heads), tuple(int(f) for f in ffn)


def full_subnet(model: nn.Module) -> SubNet:
    """The sub-network that is the whole model: every layer, head and neuron it has (per layer for a per-layer
    model, e.g. a tune run recovered from a per-layer extract)."""
    shape = per_layer_shape(getattr(model, "config", None))
    if shape is not None:
        return SubNet(*shape)
    dims = adapter_of(model).dims_of(model)
    return SubNet.make(dims.num_layers, dims.num_heads, dims.ffn)


def sliced_state_dict(model: nn.Module, sub: SubNet) -> dict[str, torch.Tensor]:
    """The super-network's state_dict restricted to `sub` (`FamilyAdapter.sliced_state_dict`)."""
    return adapter_of(model).sliced_state_dict(model, sub)


def depth_rule(model: nn.Module) -> str:
    """The super-network's depth rule (`first` for a model not made elastic: what it would keep)."""
    return str(getattr(adapter_of(model).layer_list(model), "depth", "first"))


# ---- verification -----------------------------------------------------------------------------------

def _elastic_state(model: nn.Module) -> list[tuple[nn.Module, dict[str, int]]]:
    """Snapshot of every elastic module's active sizes, to restore after a check."""
    out = []
    for m in model.modules():
        keys = [k for k in ("active", "active_out", "active_in") if k in m.__dict__]
        if keys:
            out.append((m, {k: m.__dict__[k] for k in keys}))
    return out


def _restore(state: list[tuple[nn.Module, dict[str, int]]]) -> None:
    for m, vals in state:
        for k, v in vals.items():
            setattr(m, k, v)


def max_logit_diff(a: nn.Module, b: nn.Module, batches: Sequence[dict[str, Any]]) -> float:
    """Largest |logits(a) − logits(b)| over the batches, both in eval mode without grad."""
    import torch

    fa, fb = adapter_of(a), adapter_of(b)
    worst = 0.0
    modes = (a.training, b.training)
    a.eval()
    b.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                la = fa.logits(a, batch).float()
                lb = fb.logits(b, batch).float()
                if la.shape != lb.shape:
                    raise RuntimeError(f"logit shapes differ: {tuple(la.shape)} vs {tuple(lb.shape)}")
                worst = max(worst, (la - lb).abs().max().item())
    finally:
        a.train(modes[0])
        b.train(modes[1])
    return worst


def verify_extracted(model: nn.Module, sub: SubNet, extracted: nn.Module,
                     batches: Sequence[dict[str, Any]] | None = None,
                     atol: float = DEFAULT_ATOL) -> dict[str, Any]:
    """Compare the extracted model's logits with the super-network's with `sub` active.

    The super-network's active sub-network and train/eval mode are restored afterwards (a model that is
    not elastic yet is made elastic in place, which does not change what it computes). Raises
    InstatuneError when the largest difference exceeds `atol`.
    """
    adapter = adapter_of(model)
    batches = list(batches) if batches else family_batches(model)
    if not hasattr(adapter.layer_list(model), "active"):
        adapter.make_elastic(model)
    state = _elastic_state(model)
    try:
        adapter.activate(model, sub)
        diff = max_logit_diff(model, extracted, batches)
    finally:
        _restore(state)
    shapes = [list(next(iter(b.values())).shape) for b in batches]
    if not diff <= atol:
        raise InstatuneError(
            f"extracted {sub.name} differs from the super-network with it active: max |Δlogit| "
            f"{diff:.3g} > {atol:g}"
        )
    return {"max_abs_diff": diff, "atol": atol, "check_shapes": shapes}


# ---- save / load ------------------------------------------------------------------------------------

def safetensors_files(model_dir: str | Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def safetensors_header_bytes(path: str | Path) -> int:
    """Bytes of a safetensors file that are not tensor data: the 8-byte length plus the JSON header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


def save_extracted(model: nn.Module, sub: SubNet, tokenizer: Any, out_dir: str | Path,
                   batches: Sequence[dict[str, Any]] | None = None,
                   atol: float = DEFAULT_ATOL) -> dict[str, Any]:
    """Extract `sub`, check it, write a standalone model directory to `out_dir`, reload it and check again.

    Family-independent: the family's `extract`, `save_extracted` and `load_extracted` do the work
    (`tokenizer` is the family's preprocessor). `out_dir` may exist (a stage's partial directory); files of
    the same name are replaced. Returns what was measured: kind, model type, depth rule and kept layer
    indices (of the super-network), params (counted and closed form), weight bytes, logit differences.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter = adapter_of(model)
    dims = adapter.dims_of(model)
    batches = list(batches) if batches else family_batches(model)

    check_subnet(dims, sub)
    small = adapter.extract(model, sub)
    kind = small._instatune_kind
    check = verify_extracted(model, sub, small, batches, atol)
    kept = adapter.kept_layers(model, sub)
    written = adapter.save_extracted(small, model, sub, tokenizer, out)
    readable_files(out)

    reloaded = adapter.load_extracted(out)
    reload_diff = max_logit_diff(small, reloaded, batches)
    if not reload_diff <= atol:
        raise InstatuneError(
            f"{out} reloads with different logits (max |Δ| {reload_diff:.3g}); the save is broken")

    n_params = sum(p.numel() for p in small.parameters())
    expected = adapter.params(dims, sub)
    files = safetensors_files(out)
    header = sum(safetensors_header_bytes(f) for f in files)
    elem = next(small.parameters()).element_size()
    return {
        "kind": kind,
        "model_type": written.get("model_type", getattr(getattr(small, "config", None), "model_type", dims.family)),
        "architecture": type(small).__name__,
        "subnet": sub.to_dict(),
        "subnet_id": sub.id,
        "subnet_name": sub.name,
        "depth_rule": depth_rule(model),
        "kept_layers": kept,
        "params": n_params,
        "params_closed_form": expected,
        "params_match": n_params == expected,
        "weights_bytes": weights_bytes(out),
        "safetensors_header_bytes": header,
        "bytes_per_param": elem,
        "weights_bytes_expected": elem * n_params + header,
        "max_abs_diff": check["max_abs_diff"],
        "reload_max_abs_diff": reload_diff,
        "atol": atol,
        "check_shapes": check["check_shapes"],
        "load_with": written["load_with"],
    }
