#!/usr/bin/env bash
# Set up, lint, then run the whole test suite (every test has a timeout).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check shoal tests bench examples
.venv/bin/ruff format --check shoal tests bench examples
exec .venv/bin/python -m pytest "$@"
