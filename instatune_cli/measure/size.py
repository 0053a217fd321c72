"""Model size on disk: the bytes a deployment ships (weights only, no tokenizer or config)."""

from __future__ import annotations

from pathlib import Path


def weights_bytes(model_dir: str | Path) -> int:
    """Bytes of the safetensors weight files in a model directory (all shards)."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def onnx_bytes(onnx_path: str | Path) -> int:
    """Bytes of an ONNX model plus its external-data files, if any (read from the graph, not guessed)."""
    import onnx

    p = Path(onnx_path)
    total = p.stat().st_size
    m = onnx.load(str(p), load_external_data=False)
    seen: set[str] = set()
    for init in m.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                ext = p.parent / entry.value
                if ext.is_file():
                    total += ext.stat().st_size
    return total
