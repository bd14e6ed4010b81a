#!/usr/bin/env bash
# Kernel benchmark (issue 3) on the GPU machine, in one command: correctness first, then timings of
# velotune vs PyTorch eager, torch.compile and Liger-Kernel at Llama-3.1-8B sizes.
# Run from the repository root with .peers/ carried along (Liger comes from the peers bundle):
#     bash benchmarks/gpu_kernels.sh [extra args for benchmarks.kernels, e.g. --ops rms_norm,rope]
# Writes kernels-<device>.md/.json into $OUT (and benchmarks/results/).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
if [ -f .peers/peers.tar.xz ]; then
  mkdir -p /tmp/site && tar -xJf .peers/peers.tar.xz -C /tmp/site
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "gpu_kernels: .peers/peers.tar.xz not found (carry .peers); Liger's ops will be missing" >&2
fi
$PY -m benchmarks.kernels --out-dir "$OUT" --out-dir benchmarks/results "$@"
