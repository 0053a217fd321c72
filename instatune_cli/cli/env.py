"""`instatune env`: versions of the stack and the hardware, for bug reports."""

from __future__ import annotations

import json
import platform
from importlib import metadata

import typer

PACKAGES = ("instatune", "torch", "torchvision", "transformers", "timm", "datasets", "accelerate", "deap",
            "moocore", "scikit-learn", "ptflops", "neural-compressor", "onnx", "onnxruntime", "onnxscript",
            "typer", "rich")


def collect() -> dict[str, object]:
    info: dict[str, object] = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = "not installed"
    import os

    info["cpu_count"] = os.cpu_count()
    info["processor"] = platform.processor() or platform.machine()
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda_available"] = torch.cuda.is_available()
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as e:  # noqa: BLE001 - a broken torch is exactly what a bug report needs to show
        info["torch_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except Exception as e:  # noqa: BLE001
        info["onnxruntime_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    return info


def register(app: typer.Typer) -> None:
    @app.command("env")
    def env(as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")) -> None:
        """Print versions of the stack (torch, transformers, timm, onnxruntime, ...) and CPU/GPU for bug reports."""
        info = collect()
        if as_json:
            typer.echo(json.dumps(info, indent=2))
            return
        for k, v in info.items():
            typer.echo(f"{k + ':':24} {v}")
