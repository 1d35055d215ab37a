#!/usr/bin/env bash
# Create .venv with shoal and its test tools. Safe to run again: it only
# reinstalls when pyproject.toml (or the extras asked for) changed.
#
#   bash scripts/setup.sh              shoal and its test tools
#   bash scripts/setup.sh ray spark    and the engines' extras (what the tests use);
#                                      spark also installs Java where it is missing
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
extras="test"
for extra in "$@"; do extras="$extras,$extra"; done
if [[ ",$extras," == *",spark,"* ]] && ! command -v java >/dev/null 2>&1 && [ -z "${JAVA_HOME:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Java for Spark (openjdk-17-jre-headless)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      openjdk-17-jre-headless >/dev/null) || echo "setup: could not install Java; Spark's tests will skip"
  else
    echo "setup: Spark needs Java 17+ (not found); install it, or Spark's tests will skip"
  fi
fi
stamp="$VENV/.shoal-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing shoal and its dependencies ($extras)"
  pip_q -e ".[$extras]"
  # private set intersection for vertical jobs; its wheel pins one protobuf
  # (==6.30.2) older than tensorboard's range, and runs with the newer one
  pip_q --no-deps "openmined.psi>=2.0.6"
  "$PY" -c "import shoal, torch, zmq, private_set_intersection.python"
  echo "$want" > "$stamp"
fi
"$PY" -c "import torch, shoal; print(f'setup: ready (torch {torch.__version__})')"
