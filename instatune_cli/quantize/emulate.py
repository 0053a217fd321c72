"""The joint search's quantized candidates, in PyTorch, on the super-network (docs/architecture.md,
"Quantization").

A candidate is a sub-network plus a policy. Exporting and quantizing every candidate through ONNX would cost
tens of seconds each, so the search measures it with the same arithmetic the ONNX Runtime engine applies:
MinMax ranges of each INT8 linear's input on the calibration sample (per tensor, UINT8, asymmetric), weights
rounded to INT8 per output channel (symmetric) on exactly the sliced rows/columns the sub-network ships, the
word-embedding table to UINT8 per tensor, block-wise layers (int4, int8-weights) rounded per block of
`group_size` inputs, and the quantized values put back in FP32 (QDQ).

Which tensors are rounded follows the graph `quantize` ships (`shared=True`, the default): ONNX Runtime puts
one Quantize/Dequantize pair on a tensor and feeds every consumer the dequantized value, so when `query` is INT8
the layer's input is rounded for `key`, `value` and the residual Add too, whatever their precision. The
emulation finds which linears read the same tensor (by identity, on the calibration pass) and rounds that
tensor in place before its first consumer, so the residual reads it rounded as in the graph. ORT also rounds
an INT8 linear's output (the MatMul's, before the bias Add; a Gemm's, bias included) with that tensor's own
calibrated range, and the emulation does too. (Rounding only each INT8 linear's own input copy, the `strict`
arithmetic of `quantize --strict-fp32`, left the residual and the outputs FP32 and put the emulated all-INT8
super-network 0.9 points away from the shipped graph.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from instatune_cli.adapters import adapter_of
from instatune_cli.quantize.policy import BITS, QuantPolicy
from instatune_cli.quantize.targets import torch_targets

if TYPE_CHECKING:
    import torch
    from torch import nn

    from instatune_cli.space import SubNet


def qdq_uint8(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Asymmetric per-tensor UINT8 quantize-dequantize with range [lo, hi] widened to include 0."""
    import torch

    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zp = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale


def qdq_int8_rows(w: torch.Tensor) -> torch.Tensor:
    """Symmetric INT8 quantize-dequantize with one scale per output row (range [-127, 127], as ORT's
    symmetric weights)."""
    import torch

    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def qdq_blockwise(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric block-wise quantize-dequantize along the input (columns): one FP32 scale per `group`
    consecutive inputs of a row, values in [-(2^(bits-1) - 1), 2^(bits-1) - 1]; exactly `blockwise` below, which
    the ONNX Runtime engine packs for MatMulNBits / GatherBlockQuantized."""
    import torch

    rows, cols = w.shape
    qmax = (1 << (bits - 1)) - 1
    b = w.float().reshape(rows, cols // group, group)
    amax = b.abs().amax(dim=2, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return (torch.clamp(torch.round(b / scale), -qmax, qmax) * scale).reshape(rows, cols).to(w.dtype)


def blockwise(w: Any, bits: int, group: int) -> tuple[Any, Any]:
    """(packed uint8 [rows, cols * bits / 8], scales float32 [rows, cols / group]) of a [rows, cols] numpy
    weight: `qdq_blockwise`'s integers offset by 2^(bits-1) (the operators' default zero point, so none is
    stored), 4-bit values two to a byte, the lower index in the low nibble (ORT's packing)."""
    import numpy as np

    rows, cols = w.shape
    qmax = (1 << (bits - 1)) - 1
    b = np.asarray(w, dtype=np.float32).reshape(rows, cols // group, group)
    amax = np.abs(b).max(axis=2, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(qmax), np.float32(1.0)).astype(np.float32)
    q = (np.clip(np.round(b / scale), -qmax, qmax).astype(np.int32) + (1 << (bits - 1))).reshape(rows, cols)
    if bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    return q.astype(np.uint8), scale.reshape(rows, cols // group)


def _out_tensor(m: Any, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The tensor ORT rounds after an INT8 linear: a 2-D input is one Gemm (bias included), otherwise the MatMul
    before its bias Add."""
    bias = getattr(m, "bias", None)
    if x.dim() == 2 or bias is None:
        return out
    return out - bias[: out.shape[-1]]


def _round_output(lo: float, hi: float) -> Any:
    def hook(m: Any, args: tuple, out: torch.Tensor) -> torch.Tensor:
        pre = _out_tensor(m, args[0], out)
        return qdq_uint8(pre, lo, hi) + (out - pre)
    return hook


def _round_shared(lo: float, hi: float) -> Any:
    """A pre-hook rounding its input tensor in place, once: later consumers (the residual) read it rounded."""
    def hook(_m: Any, args: tuple) -> tuple | None:
        x = args[0]
        if getattr(x, "_instatune_qdq", False):
            return None
        q = qdq_uint8(x, lo, hi)
        try:
            x.copy_(q)
            x._instatune_qdq = True
        except RuntimeError:  # a tensor that cannot be written (an expanded view): this consumer only
            return (q, *args[1:])
        return None
    return hook


def _active_slice(m: nn.Module) -> tuple[int, int]:
    return (int(getattr(m, "active_out", m.weight.shape[0])), int(getattr(m, "active_in", m.weight.shape[1])))


class QuantEmulator:
    """Applies a policy's QDQ arithmetic to the active sub-network for the duration of a `with` block."""

    def __init__(self, model: nn.Module, calibration: Sequence[dict[str, torch.Tensor]]) -> None:
        self.model = model
        self.calibration = list(calibration)

    def _ranges(self, modules: dict[str, nn.Module], outputs: Sequence[str] = ()
                ) -> tuple[dict[str, tuple[float, float]], dict[str, set[str]]]:
        """Min and max of each module's input over the calibration sample (the FP32 sub-network), and which
        modules read the very same input tensor (name -> the names sharing it, itself included). For the
        `outputs` names also the range of the output as ONNX Runtime rounds it (`_out_tensor`), as `name>`."""
        import torch

        ranges: dict[str, list[float]] = {}

        def widen(key: str, x: torch.Tensor) -> None:
            r = ranges.setdefault(key, [float("inf"), float("-inf")])
            r[0], r[1] = min(r[0], float(x.min())), max(r[1], float(x.max()))

        def out_hook(name: str) -> Any:
            def record(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
                widen(name + ">", _out_tensor(m, args[0], out.detach()))
            return record

        shared: dict[str, set[str]] = {n: {n} for n in modules}
        seen: list[tuple[torch.Tensor, str]] = []  # this forward's inputs, held so identities stay unique

        def hook(name: str) -> Any:
            def record(_m: nn.Module, args: tuple) -> None:
                widen(name, args[0].detach())
                for t, other in seen:
                    if t is args[0]:
                        shared[name] |= shared[other]
                        for n in shared[name]:
                            shared[n] = shared[name]
                seen.append((args[0], name))
            return record

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
        handles += [modules[n].register_forward_hook(out_hook(n)) for n in outputs]
        try:
            with torch.no_grad():
                for b in self.calibration:
                    seen.clear()
                    self.model(**{k: v for k, v in b.items() if k != "labels"})
        finally:
            seen.clear()
            for h in handles:
                h.remove()
        return {n: (r[0], r[1]) for n, r in ranges.items()}, shared

    @contextmanager
    def applied(self, sub: SubNet | None, policy: QuantPolicy, shared: bool = True) -> Iterator[None]:
        """Inside the block the model computes as the quantized sub-network; weights are restored after.
        `shared`: an INT8 input's rounding reaches every consumer of the tensor (the shipped graph; module
        docstring); False: only the INT8 linear reads it rounded (`quantize --strict-fp32`)."""
        import torch

        adapter = adapter_of(self.model)
        from instatune_cli.adapters.elastic import ElasticLayerList  # lazy: imports torch; this module does not

        if isinstance(adapter.layer_list(self.model), ElasticLayerList):  # a super-network, not an extracted model
            adapter.activate(self.model, sub)
        targets = torch_targets(self.model, sub)
        linears = {n: m for n, (_, m) in targets.items() if n != "embeddings"}
        int8 = {n for n in linears if policy.layers[n] == "int8"}
        ranges, groups = self._ranges(linears if shared else {n: linears[n] for n in int8}, int8 if shared else ())
        rounded = {n for n in linears if groups.get(n, set()) & int8} if shared else int8
        saved: list[tuple[torch.Tensor, torch.Tensor, tuple[slice, slice]]] = []
        handles = []
        try:
            with torch.no_grad():
                for name, m in linears.items():
                    p = policy.layers[name]
                    if p != "fp32":
                        out, inp = _active_slice(m)
                        idx = (slice(0, out), slice(0, inp))
                        saved.append((m.weight, m.weight[idx].clone(), idx))
                        m.weight[idx] = (qdq_int8_rows(m.weight[idx]) if p == "int8" else
                                         qdq_blockwise(m.weight[idx], BITS[p][0], policy.group_size))
                    if name in rounded:
                        lo, hi = ranges[name]
                        handles.append(m.register_forward_pre_hook(
                            _round_shared(lo, hi) if shared else
                            lambda _m, args, lo=lo, hi=hi: (qdq_uint8(args[0], lo, hi), *args[1:])))
                    if shared and name in int8:
                        handles.append(m.register_forward_hook(_round_output(*ranges[name + ">"])))
                emb = policy.layers.get("embeddings", "fp32")
                if emb != "fp32":
                    w = targets["embeddings"][1].weight
                    idx = (slice(None), slice(None))
                    saved.append((w, w.clone(), idx))
                    w.copy_(qdq_uint8(w, float(w.min()), float(w.max())) if emb == "int8" else
                            qdq_blockwise(w, BITS[emb][0], policy.group_size))
            yield
        finally:
            for h in handles:
                h.remove()
            with torch.no_grad():
                for w, orig, idx in saved:
                    w[idx] = orig
