"""ONNX Runtime sessions and feeds, and instatune's metadata in ONNX graphs: what `export`, latency
measurement and a family's graph fusions (adapters/hf/fusion.py) share. No family knowledge."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instatune_cli.errors import InstatuneError

if TYPE_CHECKING:
    import numpy as np
    import onnx

META_PREFIX = "instatune."
#: ORT session-time optimizers that slow our graphs down on the CPU (adapters/hf/fusion.py docstring)
SLOW_CPU_OPTIMIZERS = ("SkipLayerNormFusion",)


def read_metadata(onnx_path: str | Path) -> dict[str, str]:
    """instatune's metadata entries of an exported graph (without the prefix)."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key[len(META_PREFIX):]: p.value for p in m.metadata_props if p.key.startswith(META_PREFIX)}


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    """Set instatune's metadata entry `key` of a loaded graph."""
    for p in model.metadata_props:
        if p.key == META_PREFIX + key:
            p.value = value
            return
    model.metadata_props.add(key=META_PREFIX + key, value=value)


def ort_session(onnx_path: str | Path, threads: int | None = None,
                disabled_optimizers: Sequence[str] = SLOW_CPU_OPTIMIZERS) -> Any:
    """A CPU InferenceSession, full graph optimization but `disabled_optimizers` (by default the ones that slow
    our graphs down: adapters/hf/fusion.py), `threads` intra-op threads (None: ORT's default)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(disabled_optimizers))
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types for unreadable graphs
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InstatuneError(f"onnxruntime cannot load {onnx_path}: {first[:300]}") from None


def ort_feed(x: Any) -> np.ndarray:
    """A graph input as ORT takes it: token ids as int64, pixels as float32."""
    import numpy as np

    a = np.asarray(x.cpu() if hasattr(x, "cpu") else x)
    return a.astype(np.float32) if a.dtype.kind == "f" else a.astype(np.int64)

