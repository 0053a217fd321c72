"""The README's bench tables, generated from the committed results (bench/results/*.json), never typed by hand.

    python bench/readme_tables.py            # print every table
    python bench/readme_tables.py --check    # exit 1 naming each table README.md does not contain verbatim

Figures that a bench's history holds (bench/results/NAME.history.jsonl, see bench/provenance.py) are the median
over every run of that bench, not the last run; the rest come from the result JSON. With one run in a history the
two are the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.provenance import figure_stats  # noqa: E402

RESULTS = REPO / "bench" / "results"


def load(name: str, results: Path = RESULTS) -> dict[str, Any]:
    return json.loads((results / f"{name}.json").read_text())


def fig(bench: str, key: str, fallback: float, results: Path = RESULTS) -> float:
    """The median of `key` over the bench's history, or `fallback` (the result JSON's value) when no run has it."""
    st = figure_stats(bench, key, results)
    return st["median"] if st["n"] else fallback


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def one_decimal(x: float) -> str:
    """A share as a percentage with one decimal, halves rounded up (0.2905 -> 29.1, not float's 29.0)."""
    return f"{round(100 * x + 1e-9, 1):.1f}"


# ---- depth family (bench/depth_cliff.py --phase family) -------------------------------------------------------
def depth_family_table(results: Path = RESULTS) -> str:
    d = load("depth_family", results)
    al, el = d["alone"], d["elastic"]
    maj = 444 / 872  # SST-2 dev: the majority class; a collapsed sub-network scores exactly this

    def acc(key: str, fallback: float) -> str:
        v = fig("depth_family", key, fallback, results)
        return f"**{pct(v)}**" if v <= maj + 1e-9 else pct(v)

    def seeds(rule: str, depth: int) -> str:
        cells = []
        for tag in ("", "@seed1", "@seed2"):
            v = f"{rule}/uniform{tag}"
            cells.append(acc(f"elastic.{v}.L{depth}", el[v]["per_depth"][f"L{depth}"]["dev_acc"]))
        return " / ".join(cells)

    lines = ["| depth | alone: first L layers | alone: spread layers | elastic, `first` (seeds 42 / 1 / 2) | "
             "elastic, `spread` (seeds 42 / 1 / 2) | `spread` + sandwich | `spread` + hidden distill |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    depths = sorted(int(k[1:]) for k in el["spread/uniform"]["per_depth"] if k.startswith("L"))
    for L in depths:
        spread = al.get(f"spread/L{L}")
        cells = [acc(f"alone.first/L{L}", al[f"first/L{L}"]["dev_acc"]),
                 acc(f"alone.spread/L{L}", spread["dev_acc"]) if spread else "(= first)",
                 seeds("first", L), seeds("spread", L)]
        for v in ("spread/sandwich", "spread/uniform/hd1"):
            cells.append(acc(f"elastic.{v}.L{L}", el[v]["per_depth"][f"L{L}"]["dev_acc"]))
        lines.append(f"| L{L} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- joint architecture + FP32/INT8/INT4 search (bench/joint_quant.py) ----------------------------------------
def joint_quant_table(results: Path = RESULTS) -> str:
    """ORT rows (FP32, all-INT8, all-INT4 super-networks, the picked member and its trimmed vocabulary), then the
    inc engine's rows. Figures from runs known clean at a recorded commit only (the history's first record was
    made before provenance, from another search space)."""
    d = load("joint_quant", results)
    fp, i8, i4, p, t = (d["supernet_fp32"], d["supernet_all_int8"], d["supernet_all_int4"], d["picked"],
                        d["picked_trimmed_vocab"])

    def f(key: str, fallback: float) -> float:
        st = figure_stats("joint_quant", key, results, clean_only=True)
        return st["median"] if st["n"] else fallback

    fp_acc, fp_mb = f("supernet_fp32.eval_acc", fp["eval_acc"]), f("supernet_fp32.mb", fp["bytes"] / 1e6)
    i8_mb = f("supernet_all_int8.mb", i8["bytes"] / 1e6)

    def row(label: str, acc: float, mb: float, ms: float | None, bold: bool = False) -> str:
        b = "**" if bold else ""
        cells = [label, f"{b}{pct(acc)} % ({100 * (acc - fp_acc):+.2f}){b}", f"{b}{mb:.1f} MB{b}",
                 f"{fp_mb / mb:.2f}x", f"{i8_mb / mb:.2f}x", "" if ms is None else f"{ms:.1f} ms"]
        return "| " + " | ".join(cells) + " |"

    heads, ffn = "/".join(map(str, p["heads"])), "/".join(map(str, p["ffn"]))
    n8, n4, n = p["int8_layers"], p.get("int4_layers", 0), p["layers_total"]
    lines = [
        "| model (ONNX Runtime) | dev accuracy | size on disk | smaller than FP32 | than all-INT8 | latency b1 s128, "
        "1 thread |", "| --- | --- | --- | --- | --- | --- |",
        row(f"FP32 super-network {fp['name']} (fused graph)", fp_acc, fp_mb, i8["latency_ms_fp32"]),
        row("all-INT8 super-network", f("supernet_all_int8.eval_acc", i8["eval_acc"]), i8_mb,
            f("supernet_all_int8.latency_ms", i8["latency_ms"])),
        row(f"all-INT4 super-network (group {d['options'].get('group_size', 32)})",
            f("supernet_all_int4.eval_acc", i4["eval_acc"]), f("supernet_all_int4.mb", i4["bytes"] / 1e6),
            f("supernet_all_int4.latency_ms", i4["latency_ms"])),
        row(f"picked: L{p['layers']}, heads {heads}, FFN {ffn}; {n4} INT4, {n8} INT8, {n - n4 - n8} FP32 of {n} "
            "layers", f("picked.eval_acc_int8", p["eval_acc_int8"]), f("picked.mb_int8", p["bytes_int8"] / 1e6),
            f("picked.latency_ms_int8", p["latency_ms_int8"]), bold=True),
        row(f"the same, vocabulary trimmed to the {t['vocabulary']['kept']:,} training tokens (`--trim-vocab`)",
            f("picked_trimmed_vocab.eval_acc_int8", t["eval_acc_int8"]),
            f("picked_trimmed_vocab.mb_int8", t["bytes_int8"] / 1e6),
            f("picked_trimmed_vocab.latency_ms_int8", t["latency_ms_int8"])),
        "", "| inc engine (Neural Compressor, PyTorch compiled) | dev accuracy | size on disk | latency (FP32 "
        "compiled) | shipped |", "| --- | --- | --- | --- | --- |"]
    names = {"supernet_all_int8": "super-network, static INT8 (PT2E)",
             "supernet_all_int4": "super-network, weight-only RTN INT4", "picked_arch_all_int8":
             "picked architecture, static INT8"}
    for key, r in (d.get("inc") or {}).items():
        if "refused" in r or "censored" in r:
            why = r.get("refused") or f"censored: {r['censored']}"
            lines.append(f"| {names.get(key, key)} | | | | no: {why.removeprefix('error: ')} |")
        else:
            lines.append(f"| {names.get(key, key)} | {pct(r['eval_acc_int8'])} % | {r['bytes_int8'] / 1e6:.1f} MB | "
                         f"{r['latency_ms_int8']:.1f} ms ({r['latency_ms_fp32']:.1f} ms) | yes |")
    return "\n".join(lines)


# ---- ViT on CIFAR-10 (bench/vit_cifar.py) ---------------------------------------------------------------------
VIT_CUTS = ("L4-h3.2x3-f256", "L4-h2-f256", "L3-h2-f256")


def vit_cifar_table(results: Path = RESULTS) -> str:
    d = load("vit_cifar", results)
    s = d["results"]["summary"]

    def mean_hr(key: str) -> str:
        m = fig("vit_cifar", f"{key}.mean", s[key]["mean"], results)
        hr = fig("vit_cifar", f"{key}.half_range", s[key]["half_range"], results)
        return f"{pct(m)} ± {pct(hr)} %"

    lines = ["| | test accuracy (mean ± half-range, 2 seeds) |", "| --- | --- |",
             f"| plain fine-tuning, full network | {mean_hr('plain_eval_acc')} |",
             f"| elastic super-network, full network | {mean_hr('elastic_super_eval_acc')} |"]
    per_seed = d["results"]["per_seed"].values()
    for i, name in enumerate(VIT_CUTS):
        el = [m for ps in per_seed for m in ps["elastic_search"]["front"] if m["name"] == name]
        pl = [m for ps in per_seed for m in ps["plain_search"]["front"] if m["name"] == name]
        if not el or not pl:
            continue
        red = el[0]["macs_reduction_pct"]
        what = "elastic / same cut of the plain model" if i == 0 else "elastic / plain"
        e = sum(m["eval_acc"] for m in el) / len(el)
        p = sum(m["eval_acc"] for m in pl) / len(pl)
        lines.append(f"| {name} (-{red:.0f} % MACs): {what} | {one_decimal(e)} / {one_decimal(p)} % |")
    return "\n".join(lines)


# ---- search efficiency (bench/search_efficiency.py) -----------------------------------------------------------
def search_efficiency_table(results: Path = RESULTS) -> str:
    d = load("search_efficiency", results)

    def reach(r: dict[str, Any], extra: str = "") -> str:
        b = r["budget"]

        def c(v: float | None) -> str:
            return f">{b}" if v is None else f"{v:.0f}"

        txt = f"{c(r['median'])}" if r["median"] is None else f"{c(r['median'])} [{c(r['min'])}-{c(r['max'])}]"
        notes = [x for x in (extra, f"{r['censored']}/{r['runs']} censored" if r["censored"] else "") if x]
        if r["median"] is None:
            return f"{txt} ({'; '.join(reversed(notes))})"
        return f"{txt} ({'; '.join(notes)})" if notes else txt

    lines = ["| super-network | LINAS | best NSGA-II | random |", "| --- | --- | --- | --- |"]
    for sn in d["supernets"]:
        o, sc = sn["tune_options"], sn["score"]
        size = "full scale" if not o.get("limit_train") else f"{o['limit_train'] / 1000:.0f}k sentences"
        t = sc["table"]
        best = sc["nsga2_best"]
        pop = f"pop {t[best]['population']}"
        lines.append(f"| {size}, seed {o.get('seed')} | {reach(t['linas']['0.98'])} | "
                     f"{reach(t[best]['0.98'], pop)} | {reach(t['random']['0.98'])} |")
    return "\n".join(lines)


# ---- InstaTune against prune-after-fine-tuning (bench/glue_value.py) -----------------------------------------
def glue_value_table(task: str) -> Callable[[Path], str]:
    """The bench's own summary of one task (mean (min..max) over seeds), without its heading line."""
    def make(results: Path = RESULTS) -> str:
        from bench.glue_value import summary

        lines = summary(load(f"glue_value_{task}", results)["rows"]).strip().splitlines()
        return "\n".join(x for x in lines if not x.startswith("###") and x.strip())
    return make


# ---- does the family learn as fast as plain tuning? (bench/convergence.py) --------------------------------------
def convergence_table(tag: str) -> Callable[[Path], str]:
    """The bench's own table of one result (each probe's dev score, mean (min..max) over seeds)."""
    def make(results: Path = RESULTS) -> str:
        from bench.convergence import table

        d = load(f"convergence{tag}", results)
        return table(d["rows"], d["options"]["metric"]).strip()
    return make


TABLES: dict[str, Callable[[Path], str]] = {
    "depth_family": depth_family_table, "joint_quant": joint_quant_table, "vit_cifar": vit_cifar_table,
    "search_efficiency": search_efficiency_table, "glue_value_sst2": glue_value_table("sst2"),
    "glue_value_stsb": glue_value_table("stsb"), "glue_value_wnli": glue_value_table("wnli"),
    "glue_value_sst2_full": glue_value_table("sst2_full"),
    "convergence_stsb": convergence_table("_stsb"),
    "convergence_sst2_n8000_lr0.0002": convergence_table("_sst2_n8000_lr0.0002")}  # named after their result files


def check(readme: str, results: Path = RESULTS) -> list[str]:
    """Names of the tables README.md does not contain verbatim."""
    return [name for name, make in TABLES.items() if make(results) not in readme]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when README.md differs from a generated table")
    ap.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = ap.parse_args(argv)
    if args.check:
        off = check(args.readme.read_text())
        for name in off:
            print(f"error: {args.readme.name}: the {name} table differs from bench/results/{name}.json; paste the "
                  f"output of `python bench/readme_tables.py` (table {name})", file=sys.stderr)
        return 1 if off else 0
    for name, make in TABLES.items():
        print(f"<!-- {name}: python bench/readme_tables.py -->\n{make(RESULTS)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
