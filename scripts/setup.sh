#!/usr/bin/env bash
# Create .venv with shoal and its test tools. Safe to run again: it only
# reinstalls when pyproject.toml changed.
#
# torch: if the Python that makes the venv already has torch (a GPU build, say),
# the venv sees it and keeps it. Otherwise the pinned CPU build is installed
# first, so that the package's own range (torch>=2.4) does not pull the
# multi-GB CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_PIN=${SHOAL_TORCH_PIN:-torch==2.13.0}
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing $TORCH_PIN (CPU build)"
  pip_q "$TORCH_PIN"
fi
stamp="$VENV/.shoal-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing shoal and its dependencies"
  pip_q -e ".[test]"
  "$PY" -c "import shoal, torch, zmq"
  echo "$want" > "$stamp"
fi
"$PY" -c "import torch, shoal; print(f'setup: ready (torch {torch.__version__})')"
