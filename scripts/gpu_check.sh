#!/usr/bin/env bash
# The GPU check, on a machine with a CUDA GPU: the fused kernels' parity tests on the GPU, then their
# timings against torch eager and the copy bandwidth, written as markdown into a results folder.
#
#     scripts/gpu_check.sh                  # results in gpu_results/
#     scripts/gpu_check.sh results/gpu      # results in a folder of your choice
#
# Steps (the whole run stays under ~8 minutes; each step has its own time limit):
#   1. pick the Python: $PYTHON if set, else the repo's .venv when its torch sees CUDA, else python3
#   2. CuPy: installed if missing (cupy-cuda12x, or cupy-cuda13x when torch is built for CUDA 13)
#   3. the card, driver and CUDA version (nvidia-smi), nvcc's version
#   4. one launch of kernels/block_sum.cu through ds_lab/ops/cuda.py, checked against torch
#   5. the GPU tests of tests/test_kernels_parity.py and tests/test_kernels_adam_sign.py (marked gpu, or
#      named cuda), with DS_LAB_CUDA_SYNC=1 so a fault names the kernel that made it
#   6. benchmarks/kernels_gpu.py
# The report, kernels_gpu_<date>.md, holds the card, driver, date, test summary and the table.
set -uo pipefail
cd "$(dirname "$0")/.."
results="${1:-gpu_results}"
mkdir -p "$results"
stamp="$(date -u +%Y-%m-%dT%H%M%SZ)"
report="$results/kernels_gpu_$stamp.md"
log="$results/gpu_check_$stamp.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee "$log") 2>&1

if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    py=.venv/bin/python
else
    py=python3
fi
echo "== python: $py ($($py -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' 2>/dev/null \
    || echo 'no torch'))"
if ! $py -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "torch in $py does not see a CUDA GPU; set PYTHON to one whose torch does" >&2
    exit 1
fi

if ! $py -c "import cupy" 2>/dev/null; then
    major="$($py -c 'import torch; print(torch.version.cuda.split(".")[0])')"
    wheel="cupy-cuda${major}x"
    echo "== CuPy missing: pip install $wheel"
    if ! timeout 180 $py -m pip install -q "$wheel"; then
        echo "could not install $wheel (no network here? carry its wheel and pip install it from a folder)" >&2
        exit 1
    fi
fi

echo "== card, driver, CUDA"
card="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
cuda_driver="$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' | head -1)"
nvcc_version="$( (command -v nvcc >/dev/null && nvcc --version | tail -1) || echo 'no nvcc: NVRTC builds the kernels')"
cupy_version="$($py -c 'import cupy; print(cupy.__version__)')"
echo "$card; $cuda_driver; nvcc: $nvcc_version; CuPy $cupy_version"

echo "== one launch of block_sum through ds_lab.ops.cuda"
timeout 120 $py - <<'EOF'
import torch
from ds_lab.ops import cuda
x = torch.randn(1 << 20, device="cuda")
out = torch.empty(80, device="cuda")
module = cuda.load("block_sum")
module.launch("block_sum", 80, 256, (out, x, x.numel(), 0))
torch.cuda.synchronize()
print(f"block_sum built by {module.built_with}: {out.sum().item():.4f} vs torch {x.sum().item():.4f}")
assert torch.allclose(out.sum(), x.sum(), rtol=1e-4, atol=1e-2), "block_sum on the GPU disagrees with torch"
EOF
smoke=$?

echo "== GPU parity tests"
tests=()
for file in tests/test_kernels_parity.py tests/test_kernels_adam_sign.py; do
    [[ -f "$file" ]] && tests+=("$file")
done
if ((${#tests[@]})); then
    DS_LAB_CUDA_SYNC=1 timeout 240 $py -m pytest -q -p no:cacheprovider -k "cuda or gpu" "${tests[@]}"
    tests_rc=$?
else
    echo "no kernel test files yet"
    tests_rc=5
fi

echo "== benchmarks/kernels_gpu.py"
bench="$results/.bench_$stamp.md"
timeout 300 $py benchmarks/kernels_gpu.py | tee "$bench"
bench_rc=${PIPESTATUS[0]}

{
    echo "# kernels_gpu: $(date -u +%Y-%m-%d) on ${card:-unknown card}"
    echo
    echo "- card, driver, memory: ${card:-nvidia-smi gave nothing}; ${cuda_driver:-}"
    echo "- nvcc: $nvcc_version; CuPy $cupy_version; python: $py"
    echo "- block_sum launch check: $([[ $smoke == 0 ]] && echo passed || echo "FAILED (rc $smoke)")"
    echo "- GPU parity tests (-k 'cuda or gpu', DS_LAB_CUDA_SYNC=1): rc $tests_rc (0 = all passed, 5 = none selected);" \
         "$(grep -E '^[0-9]+ (passed|failed)|^(FAILED|ERROR) ' "$log" | tr '\n' ' ' | cut -c1-600)"
    echo "- benchmark rc $bench_rc"
    echo
    cat "$bench"
} >"$report"
rm -f "$bench"
echo "== report: $report"
((smoke == 0 && (tests_rc == 0 || tests_rc == 5) && bench_rc == 0))
