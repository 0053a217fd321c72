"""`instatune quantize`: INT8 with a per-layer policy (ONNX Runtime or Neural Compressor), accuracy, size and
latency before and after."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from instatune_cli.cli.common import THREADS_DEFAULT, accuracy_change, console, quiet_libraries, threads_of, user_errors

# ruff: noqa: UP045 - typer needs Optional[...] on Python 3.10

SOURCE = "Source"
POLICY = "Policy"
MEASURE = "Measuring"
OUT = "Output"


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    @user_errors
    def quantize(
        source: Path = typer.Argument(..., help="An extract directory, or a search dir (+ --subnet) / tune run "
                                                 "(+ --config)."),
        subnet: Optional[int] = typer.Option(None, "--subnet", "-n", rich_help_panel=SOURCE, show_default="none",
                                             help="Number of a sub-network on the front (with a search dir)."),
        config: Optional[str] = typer.Option(None, "--config", rich_help_panel=SOURCE, show_default="none",
                                             help="L10-h10-f2048, a JSON file or inline JSON (with a tune run)."),
        policy: Optional[Path] = typer.Option(None, "--policy", rich_help_panel=POLICY,
                                              show_default="the joint search's, else every layer INT8",
                                              help="policy.json: fp32/int8/int8-weights/int4 per layer."),
        all_int8: bool = typer.Option(False, "--all-int8", rich_help_panel=POLICY,
                                      help="Quantize every layer (ignore a searched policy)."),
        all_int4: bool = typer.Option(False, "--all-int4", rich_help_panel=POLICY,
                                      help="ort: INT4 block-wise weights (FP32 activations) wherever the group size "
                                      "divides the layer, INT8 elsewhere."),
        group_size: Optional[int] = typer.Option(None, "--group-size", rich_help_panel=POLICY, show_default="32",
                                                 help="Inputs per INT4 scale, with --all-int4 (16, 32, 64, 128)."),
        engine: str = typer.Option("ort", "--engine", rich_help_panel=POLICY,
                                   help="ort: INT8 ONNX (deploy with ONNX Runtime); inc: Intel Neural Compressor "
                                   "PT2E (deploy with PyTorch)."),
        calibration_samples: int = typer.Option(256, "--calibration-samples", rich_help_panel=POLICY,
                                                help="Training examples (the run's calib.jsonl) to calibrate on."),
        trim_vocab: bool = typer.Option(False, "--trim-vocab", rich_help_panel=POLICY,
                                        help="ort: keep only the embedding rows of tokens in the tune run's training "
                                        "data (others read as [UNK])."),
        strict_fp32: bool = typer.Option(False, "--strict-fp32", rich_help_panel=POLICY,
                                         help="ort: FP32 layers read unrounded activations (exact mixed precision, "
                                         "but ORT cannot fuse it: slower)."),
        compile_: bool = typer.Option(False, "--compile", rich_help_panel=MEASURE,
                                      help="inc: time FP32 and quantized under torch.compile (Neural Compressor's "
                                      "deployment) instead of eager."),
        max_drop: float = typer.Option(1.0, "--max-drop", rich_help_panel=MEASURE,
                                       help="Warn (and mark the manifest) when INT8 loses more points."),
        batch: int = typer.Option(1, "--batch", rich_help_panel=MEASURE,
                                  help="Batch size for the latency measurement."),
        seq_len: Optional[int] = typer.Option(None, "--seq-len", rich_help_panel=MEASURE,
                                              show_default="128, or the model's maximum if shorter",
                                              help="Sequence length for the latency measurement."),
        threads: Optional[int] = typer.Option(None, "--threads", rich_help_panel=MEASURE, show_default=THREADS_DEFAULT,
                                              help="Intra-op threads for every latency figure."),
        runs: int = typer.Option(20, "--runs", rich_help_panel=MEASURE, help="Timed runs per latency measurement."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", rich_help_panel=OUT, show_default="SOURCE-int8",
                                              help="Output directory."),
        force: bool = typer.Option(False, "--force", rich_help_panel=OUT, help="Replace existing output directories."),
    ) -> None:
        """Post-training quantization of an extracted sub-network under a per-layer policy (FP32, INT8, INT4)."""
        quiet_libraries()
        from instatune_cli.quantize.stage import QuantizeOptions, quantize_stage

        out = console()
        opts = QuantizeOptions(policy=str(policy) if policy else None, all_int8=all_int8, all_int4=all_int4,
                               group_size=group_size, engine=engine,
                               calibration_samples=calibration_samples, max_drop=max_drop, batch=batch,
                               seq_len=seq_len, threads=threads, runs=runs, subnet=subnet, config=config,
                               strict_fp32=strict_fp32, trim_vocab=trim_vocab, compile=compile_)
        art = quantize_stage(source, output, opts, force=force, notify=lambda msg: out.print(f"[dim]{msg}[/]"))
        m = art.metrics
        acc, size, lat = m["accuracy"], m["size_bytes"], m["latency"]
        out.print(f"wrote {art.path} ({m['quantization']['engine']}): {art.model['policy']}")
        out.print(accuracy_change(acc["fp32"], acc["int8"], -m["accuracy_drop_points"]))
        li = lat["int8"]
        where = f", {threads_of(li)}" if "threads" in li else ""
        ratio = m["size_ratio"]
        how = f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x LARGER"
        out.print(f"size {size['fp32'] / 1e6:.1f} MB -> {size['int8'] / 1e6:.1f} MB ({how}); "
                  f"latency b{li['batch']} s{li['seq_len']}{where}: {lat['fp32']['median_ms']:.2f} ms -> "
                  f"{li['median_ms']:.2f} ms")
