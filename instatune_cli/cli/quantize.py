"""`instatune quantize`: INT8 with a per-layer policy (ONNX Runtime or Neural Compressor), accuracy, size and
latency before and after."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from instatune_cli.cli.common import (
    MEASURE,
    accuracy_change,
    console,
    defaults,
    latency_option,
    quiet_libraries,
    threads_of,
    user_errors,
)
from instatune_cli.quantize.policy import DEFAULT_GROUP_SIZE
from instatune_cli.quantize.stage import QuantizeOptions

# ruff: noqa: UP045 - typer needs Optional[...] on Python 3.10

SOURCE = "Source"
POLICY = "Policy"
OUT = "Output"


def register(app: typer.Typer) -> None:
    D = defaults(QuantizeOptions)  # every option's default is its QuantizeOptions field's (docs/architecture.md)

    @app.command("quantize")
    @user_errors
    def quantize(
        source: Path = typer.Argument(..., help="An extract directory, or a search dir (+ --subnet) / tune run "
                                                 "(+ --config)."),
        subnet: Optional[int] = typer.Option(D.subnet, "--subnet", "-n", rich_help_panel=SOURCE, show_default="none",
                                             help="Number of a sub-network on the front (with a search dir)."),
        config: Optional[str] = typer.Option(D.config, "--config", rich_help_panel=SOURCE, show_default="none",
                                             help="L10-h10-f2048, a JSON file or inline JSON (with a tune run)."),
        policy: Optional[Path] = typer.Option(D.policy, "--policy", rich_help_panel=POLICY,
                                              show_default="the joint search's, else every layer INT8",
                                              help="policy.json: fp32/int8/int8-weights/int4 per layer."),
        all_int8: bool = typer.Option(D.all_int8, "--all-int8", rich_help_panel=POLICY,
                                      help="Quantize every layer (ignore a searched policy)."),
        all_int4: bool = typer.Option(D.all_int4, "--all-int4", rich_help_panel=POLICY,
                                      help="ort: INT4 block-wise weights (FP32 activations) wherever the group size "
                                      "divides the layer, INT8 elsewhere."),
        group_size: Optional[int] = typer.Option(D.group_size, "--group-size", rich_help_panel=POLICY,
                                                 show_default=str(DEFAULT_GROUP_SIZE),
                                                 help="Inputs per INT4 scale, with --all-int4 (16, 32, 64, 128)."),
        engine: str = typer.Option(D.engine, "--engine", rich_help_panel=POLICY,
                                   help="ort: INT8 ONNX (deploy with ONNX Runtime); inc: Intel Neural Compressor "
                                   "PT2E (deploy with PyTorch)."),
        calibration_samples: int = typer.Option(D.calibration_samples, "--calibration-samples",
                                                rich_help_panel=POLICY,
                                                help="Training examples (the run's calib.jsonl) to calibrate on."),
        trim_vocab: bool = typer.Option(D.trim_vocab, "--trim-vocab", rich_help_panel=POLICY,
                                        help="ort: keep only the embedding rows of tokens in the tune run's training "
                                        "data (others read as [UNK])."),
        strict_fp32: bool = typer.Option(D.strict_fp32, "--strict-fp32", rich_help_panel=POLICY,
                                         help="ort: FP32 layers read unrounded activations (exact mixed precision, "
                                         "but ORT cannot fuse it: slower)."),
        compile_: bool = typer.Option(D.compile, "--compile", rich_help_panel=MEASURE,
                                      help="inc: time FP32 and quantized under torch.compile (Neural Compressor's "
                                      "deployment) instead of eager."),
        max_drop: float = typer.Option(D.max_drop, "--max-drop", rich_help_panel=MEASURE,
                                       help="Warn (and mark the manifest) when INT8 loses more points."),
        batch: int = latency_option("batch"),
        seq_len: Optional[int] = latency_option("seq_len"),
        threads: Optional[int] = latency_option("threads", help="Intra-op threads for every latency figure."),
        runs: int = latency_option("runs", help="Timed runs per latency measurement."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", rich_help_panel=OUT, show_default="SOURCE-int8",
                                              help="Output directory."),
        force: bool = typer.Option(False, "--force", rich_help_panel=OUT, help="Replace existing output directories."),
    ) -> None:
        """Post-training quantization of an extracted sub-network under a per-layer policy (FP32, INT8, INT4)."""
        quiet_libraries()
        from instatune_cli.quantize.stage import quantize_stage

        out = console()
        opts = QuantizeOptions(policy=str(policy) if policy else None, all_int8=all_int8, all_int4=all_int4,
                               group_size=group_size, engine=engine,
                               calibration_samples=calibration_samples, max_drop=max_drop, batch=batch,
                               seq_len=seq_len, threads=threads, runs=runs, subnet=subnet, config=config,
                               strict_fp32=strict_fp32, trim_vocab=trim_vocab, compile=compile_)
        r = quantize_stage(source, output, opts, force=force, notify=lambda msg: out.print(f"[dim]{msg}[/]"))
        acc, size, lat = r.accuracy, r.size_bytes, r.latency
        out.print(f"wrote {r.path} ({r.engine}): {r.policy_summary}")
        out.print(accuracy_change(acc["fp32"], acc["int8"], -r.accuracy_drop_points))
        li = lat["int8"]
        where = f", {threads_of(li)}" if "threads" in li else ""
        ratio = r.size_ratio
        how = f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x LARGER"
        out.print(f"size {size['fp32'] / 1e6:.1f} MB -> {size['int8'] / 1e6:.1f} MB ({how}); "
                  f"latency b{li['batch']} s{li['seq_len']}{where}: {lat['fp32']['median_ms']:.2f} ms -> "
                  f"{li['median_ms']:.2f} ms")
