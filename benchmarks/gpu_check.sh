#!/usr/bin/env bash
# A ready check of pyro-nf on a CUDA machine, in under 5 minutes:
#   1. the transform contract suite with --device cuda,
#   2. the tests marked cuda (device moves, CUDA guides),
#   3. the examples' quick modes trained on the GPU (through Lightning, --devices 1),
#   4. a throughput table: samples/s of log_prob, rsample+log_prob and a training step,
#      per family, batch 256 to 65,536, CPU against GPU, float32 and bf16 autocast.
# Prints one summary table and exits non-zero on any failure. Without a CUDA device it
# prints a "no CUDA device" skip line and exits 0.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; logs in a temporary folder
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: SKIP: no CUDA device (torch.cuda.is_available() is False); nothing was run"
    exit 0
fi

logs=$(mktemp -d)
summary=()
failed=0

step() {
    # step NAME SECONDS_LIMIT COMMAND...: run it, log it, record pass/FAIL and its time.
    local name=$1 limit=$2
    shift 2
    local log="$logs/$(echo "$name" | tr -c 'a-zA-Z0-9' '_').log"
    local start=$SECONDS
    if timeout "$limit" "$@" >"$log" 2>&1; then
        summary+=("$(printf '%-40s %-6s %4ss' "$name" pass $((SECONDS - start)))")
    else
        failed=1
        summary+=("$(printf '%-40s %-6s %4ss  (log: %s)' "$name" FAIL $((SECONDS - start)) "$log")")
        echo "---- $name failed; last lines of $log:"
        tail -n 30 "$log"
    fi
}

device=$(python -c "import torch; print(torch.cuda.get_device_name(0))")
echo "gpu_check: CUDA device: $device; logs in $logs"
export NO_PROGRESS=1

step "contract suite --device cuda" 90 python -m pytest -q tests/test_contract.py --device cuda
step "tests marked cuda" 60 python -m pytest -q -m cuda tests
step "density example quick, GPU" 60 python examples/density_estimation.py --quick \
    --no-progress --devices 1 --families gaussian realnvp maf --output-dir "$logs/density"
step "VAE example quick, GPU" 60 python examples/vae.py --quick --no-progress --devices 1 \
    --posterior diag iaf --output-dir "$logs/vae"
step "throughput table" 120 python benchmarks/gpu_throughput.py

echo
echo "throughput (samples/s):"
sed -n '/^samples per second/,$p' "$logs/throughput_table.log"
echo
echo "gpu_check summary ($device):"
printf '%s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
    echo "gpu_check: FAILED"
    exit 1
fi
echo "gpu_check: all passed"
