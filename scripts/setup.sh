#!/usr/bin/env bash
# Create (or reuse) ./.venv and install instatune with its test extras. Idempotent; offline-safe apart from
# the package registry. Usage: source scripts/setup.sh   (leaves the venv activated)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# pyproject.toml's digest, recorded after a successful install: unchanged means nothing to install
stamp=.venv/.instatune-setup
want="$(python -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "setup: .venv is up to date (instatune $(python -c 'import instatune_cli as m; print(m.__version__)'))"
else
  echo "setup: installing instatune (editable) with torch, transformers, onnxruntime, timm and the test tools"
  echo "setup: into $here/.venv: about 3 minutes the first time, seconds afterwards"
  t0=$SECONDS
  # pip's own chatter (build warnings) goes to .venv/setup.log and is shown only when the install fails
  if ! { python -m pip install -q --upgrade pip && python -m pip install -q -e ".[dev]"; } >.venv/setup.log 2>&1; then
    cat .venv/setup.log >&2
    echo "error: installing instatune failed (log above, also in .venv/setup.log)" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
  echo "setup: done in $((SECONDS - t0)) s"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
