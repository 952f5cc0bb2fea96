#!/usr/bin/env bash
# The project's test gate (what CI runs): lint, import layers, then every test tier that can run
# here. GPU tests skip without CUDA; SLURM tests start a local one-node cluster (needs root + apt)
# and skip when that is impossible.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RLP_VENV:-.venv}"
export PATH="$PWD/$VENV/bin:$PATH"
# Hermetic wandb: never touch the network or the home directory from tests.
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # tiny models: 1 thread is faster and never oversubscribes

echo "== ruff"
ruff check .
ruff format --check .
echo "== import-linter"
lint-imports
echo "== pytest"
python -m pytest "$@"
