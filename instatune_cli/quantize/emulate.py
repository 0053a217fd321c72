"""The joint search's quantized candidates, in PyTorch, on the super-network (docs/architecture.md,
"Quantization").

A candidate is a sub-network plus a policy. Exporting and quantizing every candidate through ONNX would cost
tens of seconds each, so the search measures it with the same arithmetic the ONNX Runtime engine applies:
MinMax ranges of each INT8 linear's input on the calibration sample (per tensor, UINT8, asymmetric), weights
rounded to INT8 per output channel (symmetric) on exactly the sliced rows/columns the sub-network ships, the
word-embedding table to UINT8 per tensor, and the quantized values put back in FP32 (QDQ). This is the engine's
`strict` arithmetic (an FP32 layer reads FP32 activations); the graph `quantize` ships by default shares each
activation's rounding with FP32 neighbours so that ONNX Runtime can fuse it, which shifts accuracy slightly:
`quantize` and the joint-quant bench measure the shipped graph on the eval split.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from instatune_cli.quantize.policy import QuantPolicy

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


def _active_slice(m: nn.Module) -> tuple[int, int]:
    return (int(getattr(m, "active_out", m.weight.shape[0])), int(getattr(m, "active_in", m.weight.shape[1])))


class QuantEmulator:
    """Applies a policy's QDQ arithmetic to the active sub-network for the duration of a `with` block."""

    def __init__(self, model: nn.Module, calibration: Sequence[dict[str, torch.Tensor]]) -> None:
        self.model = model
        self.calibration = list(calibration)

    def _ranges(self, modules: dict[str, nn.Module]) -> dict[str, tuple[float, float]]:
        """Min and max of each module's input over the calibration sample (the FP32 sub-network)."""
        import torch

        ranges: dict[str, list[float]] = {}

        def hook(name: str) -> Any:
            def record(_m: nn.Module, args: tuple) -> None:
                x = args[0].detach()
                r = ranges.setdefault(name, [float("inf"), float("-inf")])
                r[0], r[1] = min(r[0], float(x.min())), max(r[1], float(x.max()))
            return record

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
        try:
            with torch.no_grad():
                for b in self.calibration:
                    self.model(**{k: v for k, v in b.items() if k != "labels"})
        finally:
            for h in handles:
                h.remove()
        return {n: (r[0], r[1]) for n, r in ranges.items()}

    @contextmanager
    def applied(self, sub: SubNet | None, policy: QuantPolicy) -> Iterator[None]:
        """Inside the block the model computes as the quantized sub-network; weights are restored after."""
        import torch

        from instatune_cli.adapters.elastic import ElasticLayerList
        from instatune_cli.quantize.targets import family_adapter, torch_targets

        adapter = family_adapter(self.model)
        if isinstance(adapter.layer_list(self.model), ElasticLayerList):  # a super-network, not an extracted model
            adapter.activate(self.model, sub)
        targets = torch_targets(self.model, sub)
        linears = {n: m for n, (_, m) in targets.items() if n != "embeddings" and policy.layers[n] == "int8"}
        ranges = self._ranges(linears)
        saved: list[tuple[torch.Tensor, torch.Tensor, tuple[slice, slice]]] = []
        handles = []
        try:
            with torch.no_grad():
                for name, m in linears.items():
                    out, inp = _active_slice(m)
                    idx = (slice(0, out), slice(0, inp))
                    saved.append((m.weight, m.weight[idx].clone(), idx))
                    m.weight[idx] = qdq_int8_rows(m.weight[idx])
                    lo, hi = ranges[name]
                    handles.append(m.register_forward_pre_hook(
                        lambda _m, args, lo=lo, hi=hi: (qdq_uint8(args[0], lo, hi), *args[1:])))
                if policy.layers["embeddings"] == "int8":
                    w = targets["embeddings"][1].weight
                    idx = (slice(None), slice(None))
                    saved.append((w, w.clone(), idx))
                    w.copy_(qdq_uint8(w, float(w.min()), float(w.max())))
            yield
        finally:
            for h in handles:
                h.remove()
            with torch.no_grad():
                for w, orig, idx in saved:
                    w[idx] = orig
