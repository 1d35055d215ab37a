#!/usr/bin/env bash
# Set up, then train an MLP on the digits data with 4 workers (synchronous
# all-reduce), print the summary and write the report. About a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
exec .venv/bin/shoal train --model mlp --hidden 256 --workers 4 --strategy allreduce \
  --optimizer adam --lr 0.002 --batch-size 64 --epochs 40 --eval-every 200 \
  --checkpoint-every 500 --out "$out" "$@"
