"""Joint architecture + INT8/FP32 search on a tuned super-network (the paper's Fig. 5): accuracy against size.

Steps, each resumable (a finished step is kept):
  search    `instatune search RUN --objectives acc,size --quant --pick max-drop=WITHIN` on the run's validation
            split: candidates are sub-networks with one INT8/FP32 gene per linear (and the embeddings), scored
            through the ONNX Runtime engine's QDQ arithmetic; `--pick` marks the smallest front member within
            WITHIN points of the FP32 super-network, on validation (selection) data only.
  quantize  `instatune quantize SEARCH --subnet PICKED` (its searched policy, ORT engine) and the baselines:
            the FP32 super-network and the all-INT8 super-network (`--all-int8` on the full configuration).
            Every accuracy reported here is measured on the run's untouched eval split (GLUE dev), with the
            real INT8 ONNX graph, never the emulation.
  report    JSON + PNG: accuracy vs size of every candidate (validation, emulated), the front, the picked
            member and both super-network baselines (eval split, real engine).

    python bench/joint_quant.py --run bench/results/sst2_minilm/elastic --threads 2
    python bench/joint_quant.py --run RUN --evals 12 --population 6 --limit-val 64 --out /tmp/jq.json   # smoke

The picked member is also quantized with `--trim-vocab` (embedding rows of tokens the training data never uses
dropped; an extra lever, reported separately).

Target (issue): the picked sub-network within 0.5 points of the FP32 super-network's dev accuracy, >= 6x
smaller than FP32 and smaller than all-INT8. Writes bench/results/joint_quant.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"

from bench.provenance import add_arguments, stage_records, start, tagged_rows  # noqa: E402


def search(run: Path, out: Path, args: argparse.Namespace) -> None:
    from instatune_cli.search.stage import SearchOptions, search_stage

    if (out / "manifest.json").exists():
        print("== search exists, kept", flush=True)
        return
    partial = out.with_name(out.name + ".partial")
    print(f"== joint search{' (resume)' if partial.exists() else ''}", flush=True)
    t = time.perf_counter()
    search_stage(run, out, SearchOptions(objectives=["acc", "size"], quant=True, evals=args.evals,
                                         population=args.population, seed=args.seed, limit_val=args.limit_val,
                                         pick=f"max-drop={args.within}", calibration_samples=args.calibration,
                                         group_size=args.group_size),
                 resume=partial.exists())
    print(f"   search {time.perf_counter() - t:.0f} s", flush=True)


def quantize(src: Path, out: Path, args: argparse.Namespace, **kw: Any) -> dict[str, Any]:
    from instatune_cli.quantize.stage import QuantizeOptions, quantize_stage

    if not (out / "manifest.json").exists():
        print(f"== quantize {out.name}", flush=True)
        opts = QuantizeOptions(calibration_samples=args.calibration_quantize, runs=args.runs,
                               threads=args.threads, **kw)
        quantize_stage(src, out, opts, force=True, notify=lambda m: print(f"   {m}", flush=True))
    return read_quantized(out)


def read_quantized(out: Path) -> dict[str, Any]:
    from instatune_cli import artifacts

    m = artifacts.load(out, "quantize", verify=False).metrics
    return {"eval_acc_fp32": m["accuracy"]["fp32"]["score"], "eval_acc_int8": m["accuracy"]["int8"]["score"],
            "eval_examples": m["accuracy"]["int8"]["n"], "bytes_fp32": m["size_bytes"]["fp32"],
            "bytes_int8": m["size_bytes"]["int8"], "latency_ms_fp32": m["latency"]["fp32"]["median_ms"],
            "latency_ms_int8": m["latency"]["int8"]["median_ms"], "policy": m["policy"]["layers"],
            "int8_layers": sum(v == "int8" for v in m["policy"]["layers"].values()),
            "int4_layers": sum(v == "int4" for v in m["policy"]["layers"].values()),
            "vocabulary": m["quantization"].get("vocabulary"),
            "layers_total": len(m["policy"]["layers"])}


def report(run: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from instatune_cli.search.stage import front_member

    sdir = work / "search"
    front_doc = json.loads((sdir / "front.json").read_text())
    ref, int8_ref, picked = front_doc["reference"], front_doc.get("int8_reference"), front_doc.get("picked")
    full = ref["subnet_name"]
    # one quantize run of the full configuration gives both baselines: its FP32 pass and its all-INT8 graph
    all_int8 = quantize(run, work / "supernet-all-int8", args, config=full, all_int8=True)
    # issue 22's second reference: INT4 block-wise weights wherever the group size fits (INT8 elsewhere)
    all_int4 = quantize(run, work / "supernet-all-int4", args, config=full, all_int4=True,
                        group_size=args.group_size)
    out: dict[str, Any] = {
        "bench": "joint_quant", "run": str(run), "command": " ".join(["python", *sys.argv]),
        "options": {k: str(v) for k, v in vars(args).items()}, "within_points": args.within,
        "selection": {"split": front_doc.get("selection_split"), "examples": front_doc.get("selection_examples")},
        "eval_split_examples": all_int8["eval_examples"],
        "supernet_fp32": {"name": full, "eval_acc": all_int8["eval_acc_fp32"], "val_acc": ref.get("acc"),
                          "bytes": all_int8["bytes_fp32"], "size_mb_closed_form": ref.get("size")},
        "supernet_all_int8": {"name": full, "eval_acc": all_int8["eval_acc_int8"], "bytes": all_int8["bytes_int8"],
                              "val_acc_emulated": (int8_ref or {}).get("acc"),
                              "size_mb_closed_form": (int8_ref or {}).get("size"),
                              "latency_ms": all_int8["latency_ms_int8"],
                              "latency_ms_fp32": all_int8["latency_ms_fp32"]},
        "supernet_all_int4": {"name": full, "eval_acc": all_int4["eval_acc_int8"], "bytes": all_int4["bytes_int8"],
                              "val_acc_emulated": (front_doc.get("int4_reference") or {}).get("acc"),
                              "size_mb_closed_form": (front_doc.get("int4_reference") or {}).get("size"),
                              "latency_ms": all_int4["latency_ms_int8"], "policy": all_int4["policy"]},
        "front": [{k: r.get(k) for k in ("subnet", "name", "acc", "size", "eval_acc", "collapsed")}
                  for r in front_doc["front"]],
    }
    if picked is None:
        out["picked"] = None
        out["verdict"] = f"no front member within {args.within} points of the super-network on validation"
    else:
        _, row = front_member(sdir, int(picked["subnet"]))
        q = quantize(sdir, work / f"subnet{picked['subnet']}-int8", args, subnet=int(picked["subnet"]))
        drop = 100 * (out["supernet_fp32"]["eval_acc"] - q["eval_acc_int8"])
        out["picked"] = {"subnet": picked["subnet"], "name": row["name"], "layers": row["layers"],
                         "heads": row["heads"], "ffn": row["ffn"], "val_acc_emulated": row["acc"],
                         "size_mb_closed_form": row["size"], **q,
                         "drop_points_vs_fp32_supernet": drop,
                         "smaller_than_fp32_x": out["supernet_fp32"]["bytes"] / q["bytes_int8"],
                         "smaller_than_all_int8_x": all_int8["bytes_int8"] / q["bytes_int8"]}
        p = out["picked"]
        out["targets"] = {"within_0.5_points": drop <= 0.5, "at_least_6x_smaller_than_fp32":
                          p["smaller_than_fp32_x"] >= 6.0, "smaller_than_all_int8": p["smaller_than_all_int8_x"] > 1,
                          # issue 22: 3x smaller than all-INT8 (11x than FP32), not slower than all-INT8
                          "at_least_3x_smaller_than_all_int8": p["smaller_than_all_int8_x"] >= 3.0,
                          "at_least_11x_smaller_than_fp32": p["smaller_than_fp32_x"] >= 11.0,
                          "latency_not_worse_than_all_int8": p["latency_ms_int8"] <= all_int8["latency_ms_int8"]}
        # the extra lever the issue allows: embedding rows of tokens the training data never uses dropped
        t = quantize(sdir, work / f"subnet{picked['subnet']}-int8-trim", args, subnet=int(picked["subnet"]),
                     trim_vocab=True)
        tdrop = 100 * (out["supernet_fp32"]["eval_acc"] - t["eval_acc_int8"])
        out["picked_trimmed_vocab"] = {**t, "drop_points_vs_fp32_supernet": tdrop,
                                       "smaller_than_fp32_x": out["supernet_fp32"]["bytes"] / t["bytes_int8"],
                                       "smaller_than_all_int8_x": all_int8["bytes_int8"] / t["bytes_int8"]}
        pt = out["picked_trimmed_vocab"]
        out["targets_trimmed_vocab"] = {"within_0.5_points": tdrop <= 0.5, "at_least_6x_smaller_than_fp32":
                                        pt["smaller_than_fp32_x"] >= 6.0,
                                        "smaller_than_all_int8": pt["smaller_than_all_int8_x"] > 1}
    out["inc"] = inc_rows(run, sdir, work, args, full, out.get("picked"))
    plot(sdir, out, args.out.with_suffix(".png"))
    return out


def inc_rows(run: Path, sdir: Path, work: Path, args: argparse.Namespace, full: str,
             picked: dict[str, Any] | None) -> dict[str, Any]:
    """The same table for the inc engine (Neural Compressor 3.x, timed compiled as it deploys): the super-network
    all-INT8 (static PT2E) and all-INT4 (weight-only RTN), and the picked architecture all-INT8. INC applies one
    route per model (static or weight-only), so the joint search's mixed policy is not one of its inputs. Each runs
    as `instatune quantize --engine inc --compile` in its own process (as a user runs it; torch.compile state
    does not carry over) under a time limit. A route the stage refuses (not smaller and faster than FP32, or no
    operator for a layer) is a row with its one line; one that did not finish is a censored row."""
    import subprocess

    common = ["--engine", "inc", "--compile", "--calibration-samples", str(args.calibration_quantize),
              "--runs", str(args.runs), "--force", *(["--threads", str(args.threads)] if args.threads else [])]
    cases = {"supernet_all_int8": [str(run), "--config", full, "--all-int8"],
             "supernet_all_int4": [str(run), "--config", full, "--all-int4", "--group-size", str(args.group_size)]}
    if picked:
        cases["picked_arch_all_int8"] = [str(sdir), "--subnet", str(picked["subnet"]), "--all-int8"]
    rows: dict[str, Any] = {}
    for name, argv in cases.items():
        out = work / f"inc-{name}"
        if not (out / "manifest.json").exists():
            print(f"== quantize {out.name} (inc, compiled, own process)", flush=True)
            cmd = [sys.executable, "-m", "instatune_cli", "quantize", *argv, "-o", str(out), *common]
            try:
                p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.inc_timeout)
            except subprocess.TimeoutExpired:
                print(f"   inc {name}: censored, did not finish in {args.inc_timeout} s", flush=True)
                rows[name] = {"censored": f"did not finish in {args.inc_timeout} s"}
                continue
            if p.returncode != 0:
                line = next((x for x in p.stderr.splitlines()[::-1] if x.startswith("error:")), p.stderr[-300:])
                print(f"   inc {name}: refused: {line}", flush=True)
                rows[name] = {"refused": line}
                continue
        rows[name] = read_quantized(out)
    return rows


def plot(sdir: Path, out: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in (sdir / "archive.jsonl").read_text().splitlines() if x.strip()]
    fig, ax = plt.subplots(figsize=(11, 5))
    ax.scatter([r["size"] for r in rows], [100 * r["acc"] for r in rows], s=10, c="0.7",
               label="candidates (validation, QDQ emulation)")
    fr = sorted(out["front"], key=lambda r: r["size"])
    ax.plot([r["size"] for r in fr], [100 * r["acc"] for r in fr], "o-", c="tab:orange", ms=4,
            label="joint front (validation)")
    s, q = out["supernet_fp32"], out["supernet_all_int8"]
    ax.scatter([s["bytes"] / 1e6], [100 * s["eval_acc"]], marker="*", s=160, c="black",
               label="FP32 super-network (dev)")
    ax.scatter([q["bytes"] / 1e6], [100 * q["eval_acc"]], marker="D", s=60, c="tab:blue",
               label="all-INT8 super-network (dev, ORT)")
    q4 = out.get("supernet_all_int4")
    if q4:
        ax.scatter([q4["bytes"] / 1e6], [100 * q4["eval_acc"]], marker="d", s=60, c="tab:green",
                   label="all-INT4-weights super-network (dev, ORT)")
    if out.get("picked"):
        p = out["picked"]
        ax.scatter([p["bytes_int8"] / 1e6], [100 * p["eval_acc_int8"]], marker="P", s=120, c="tab:red",
                   label=f"picked {p['name'].split('-q')[0]} (dev, ORT INT8)")
        t = out.get("picked_trimmed_vocab")
        if t:
            ax.scatter([t["bytes_int8"] / 1e6], [100 * t["eval_acc_int8"]], marker="X", s=100, c="tab:purple",
                       label="picked, vocabulary trimmed to the training tokens (dev, ORT INT8)")
    ax.set_xscale("log")
    ax.set_xlabel("size on disk (MB, log)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Joint architecture + FP32/INT8/INT4 search (all-MiniLM-L6-v2, SST-2)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def summary_figures(result: dict) -> dict:
    """The figures the README quotes (dev accuracy, MB on disk, x smaller), flat, for the history."""
    out: dict = {"supernet_fp32.eval_acc": result["supernet_fp32"]["eval_acc"],
                 "supernet_fp32.mb": result["supernet_fp32"]["bytes"] / 1e6,
                 "supernet_all_int8.eval_acc": result["supernet_all_int8"]["eval_acc"],
                 "supernet_all_int8.mb": result["supernet_all_int8"]["bytes"] / 1e6,
                 "supernet_all_int8.latency_ms": result["supernet_all_int8"].get("latency_ms")}
    q4 = result.get("supernet_all_int4")
    if q4:
        out |= {"supernet_all_int4.eval_acc": q4["eval_acc"], "supernet_all_int4.mb": q4["bytes"] / 1e6,
                "supernet_all_int4.latency_ms": q4.get("latency_ms")}
    for name, row in (result.get("inc") or {}).items():
        out |= ({f"inc.{name}.refused": True} if "refused" in row else
                {f"inc.{name}.eval_acc": row["eval_acc_int8"], f"inc.{name}.mb": row["bytes_int8"] / 1e6,
                 f"inc.{name}.latency_ms": row["latency_ms_int8"],
                 f"inc.{name}.latency_ms_fp32": row["latency_ms_fp32"]})
    for key in ("picked", "picked_trimmed_vocab"):
        p = result.get(key)
        if p:
            out |= {f"{key}.eval_acc_int8": p["eval_acc_int8"], f"{key}.mb_int8": p["bytes_int8"] / 1e6,
                    f"{key}.drop_points": p["drop_points_vs_fp32_supernet"],
                    f"{key}.smaller_than_fp32_x": p["smaller_than_fp32_x"],
                    f"{key}.latency_ms_int8": p.get("latency_ms_int8")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=RESULTS / "sst2_minilm" / "elastic", help="a tune run")
    ap.add_argument("--evals", type=int, default=150)
    ap.add_argument("--population", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-val", type=int, default=500)
    ap.add_argument("--calibration", type=int, default=128, help="calibration examples in the search")
    ap.add_argument("--group-size", type=int, default=32, help="inputs per INT4 scale (search and --all-int4)")
    ap.add_argument("--calibration-quantize", type=int, default=256, help="calibration examples in quantize")
    ap.add_argument("--within", type=float, default=0.5, help="points below the FP32 super-network (validation)")
    ap.add_argument("--runs", type=int, default=20, help="timed runs per latency measurement")
    ap.add_argument("--inc-timeout", type=int, default=1800, help="seconds an inc quantize may take (censored after)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "joint_quant.json")
    add_arguments(ap)
    args = ap.parse_args()
    prov = start("joint_quant", __file__, allow_dirty=args.allow_dirty, out=args.out)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not (args.run / "manifest.json").is_file():
        raise SystemExit(f"{args.run} is not a finished tune run (see bench/sst2_minilm.py --stages tune)")
    work = args.out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    search(args.run, work / "search", args)
    result = report(args.run, work, args)
    prov.write_rows(tagged_rows(work / "search" / "archive.jsonl"), suffix="archive")  # every candidate, validation
    # the tune run judged here came from another bench invocation (bench/sst2_minilm.py): name it too
    made = stage_records([args.run.parent / f"{args.run.name}.tune.provenance.json"])
    result["provenance"] = prov.finish(summary_figures(result), result_file=args.out, extra=made)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result.get(k) for k in ("supernet_fp32", "supernet_all_int8", "supernet_all_int4", "targets",
                                                  "targets_trimmed_vocab")}, indent=1))
    if result.get("picked"):
        p = result["picked"]
        print(f"picked {p['name']}: dev {100 * p['eval_acc_int8']:.2f} ({p['drop_points_vs_fp32_supernet']:+.2f} "
              f"points), {p['bytes_int8'] / 1e6:.1f} MB = {p['smaller_than_fp32_x']:.2f}x smaller than FP32, "
              f"{p['smaller_than_all_int8_x']:.2f}x smaller than all-INT8")


if __name__ == "__main__":
    main()
