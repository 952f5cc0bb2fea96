#!/usr/bin/env bash
# The GPU measurements that docs/status.md records, in one run of about 8 minutes on one H100 or
# H200: the `gpu` test tier, the rollout engines at the Qwen3-1.7B shape (cascade vs reference,
# tokens/s and HBM roofline fraction), and one RLP step of the full-depth Qwen3-1.7B shape in bf16
# (peak memory per phase and MFU). Every part has its own time limit, so one hang costs only its
# share; logs and JSON results go to OUT_DIR (default: benchmarks/results/gpu).
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]            # run it
#   bash benchmarks/gpu_suite.sh --dry-run [OUT_DIR]  # print the plan, run nothing
#
# Uses the python of the machine (GPU images ship their own torch; this never installs one).
# Packages the image lacks (megatron-core, webdataset, braceexpand) can be brought as wheels in
# .whl/ at the repository root: they are installed with --no-deps into /tmp/rlp-site.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry=1
    shift
fi
out="${1:-benchmarks/results/gpu}"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# name, time limit (s), command
steps=(
    "env|60|$py -c 'import torch, megatron.core as m; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), \"megatron-core\", m.__version__)'"
    "gpu_tests|200|$py -m pytest -q -m gpu tests/gpu -p no:cacheprovider"
    "rollout_qwen3_1p7b|200|$py benchmarks/rollout_throughput.py --preset qwen3_1p7b --repeats 2 --out $out/rollout_qwen3_1p7b.json"
    "step_memory_qwen3_1p7b|150|$py benchmarks/step_memory.py --layers 28 --dtype bfloat16 --recompute full --label qwen3_1p7b --out $out/step_memory_qwen3_1p7b.json"
)

if ((dry)); then
    echo "out: $out"
    for step in "${steps[@]}"; do
        IFS='|' read -r name limit cmd <<<"$step"
        echo "[$name, <= ${limit}s] $cmd"
    done
    exit 0
fi

mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/rlp-site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/rlp-site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/nvidia_smi.txt" 2>&1

failed=0
for step in "${steps[@]}"; do
    IFS='|' read -r name limit cmd <<<"$step"
    start=$(date +%s)
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" bash -c "$cmd" >"$out/$name.log" 2>&1
    rc=$?
    echo "   rc=$rc in $(($(date +%s) - start)) s; last lines:"
    tail -n 6 "$out/$name.log" | sed 's/^/   /'
    ((rc == 0)) || failed=1
done
exit "$failed"
