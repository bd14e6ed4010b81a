#!/usr/bin/env bash
# Generation benchmark on one GPU, in one command (under 9 minutes): correctness checks, then velotune's
# CUDA-graph decoding against Transformers' generate and Unsloth's for_inference (see benchmarks/bench_generate.py).
#
# Run from the repository root on the GPU machine, with the peers bundle carried along (.peers/, as for
# gpu_peers.sh; without it Unsloth and bitsandbytes are recorded as not importable):
#     bash benchmarks/gpu_generate.sh                          # bf16 and 4-bit, batch 1 and 8
#     PRECISIONS=bf16 bash benchmarks/gpu_generate.sh          # one precision per run leaves more time
# Env: OUT (folder the results are written to; default benchmarks/results/generate), BUDGET_S (seconds for the
# whole script, default 540),
# PRECISIONS (bf16,4bit), SYSTEMS (velotune,hf,unsloth,unsloth_graphs), BATCHES (1,8), NEW_TOKENS (512),
# PEER_NEW_TOKENS (128), EXTRA (more arguments for bench_generate, e.g. --skip-checks).
set -uo pipefail
START=$(date +%s)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/generate}
mkdir -p "$OUT"
if [ -f .peers/peers.tar.xz ]; then
  mkdir -p /tmp/site && tar -xJf .peers/peers.tar.xz -C /tmp/site
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "gpu_generate: .peers/peers.tar.xz not found (carry .peers); Unsloth and bitsandbytes will be missing" >&2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true
LEFT=$(( ${BUDGET_S:-540} - ($(date +%s) - START) ))
# shellcheck disable=SC2086
$PY -m benchmarks.bench_generate --out "$OUT" --budget-s "$LEFT" \
  --precisions "${PRECISIONS:-bf16,4bit}" --systems "${SYSTEMS:-velotune,hf,unsloth,unsloth_graphs}" \
  --batches "${BATCHES:-1,8}" --new-tokens "${NEW_TOKENS:-512}" --peer-new-tokens "${PEER_NEW_TOKENS:-128}" \
  ${EXTRA:-}
