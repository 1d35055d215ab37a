#!/usr/bin/env bash
# Set up (with the Ray and Spark extras, whose tests run too), lint, then run the
# whole test suite (every test has a timeout), two tests at a time: many wait on
# peers, timeouts and sleeps, so two share two cores well (22 minutes of pytest
# one at a time, 14.5 two at a time, on a 2-core machine, before the workers were forked from
# preloaded processes, the command stopped tearing torch down and the tests' commands were
# forked from a preloaded server (tests/forkserve.py); about 11 minutes for 485 tests now;
# three at a time fails tests that wait on real timeouts). loadgroup keeps the
# tests of one Spark or Ray session on one worker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh ray spark
.venv/bin/ruff check shoal tests bench examples
.venv/bin/ruff format --check shoal tests bench examples
exec .venv/bin/python -m pytest -n 2 --dist loadgroup "$@"
