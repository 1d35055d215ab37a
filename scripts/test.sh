#!/usr/bin/env bash
# Set up (with the Ray and Spark extras, whose tests run too), lint, then run the
# whole test suite (every test has a timeout).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh ray spark
.venv/bin/ruff check shoal tests bench examples
.venv/bin/ruff format --check shoal tests bench examples
exec .venv/bin/python -m pytest "$@"
