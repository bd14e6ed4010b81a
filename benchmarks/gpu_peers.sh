#!/usr/bin/env bash
# Training-step benchmark of velotune against the peers on one GPU, in one command (~9 minutes).
#
# Run from the repository root on the GPU machine, with the peers bundle carried along
# (build it first on the CPU side: `bash ../shared/tools/peers-bundle.sh`, which writes .peers/):
#     bash benchmarks/gpu_peers.sh                     # llama-3.1-8b then llama-3.2-1b, lora and qlora
#     bash benchmarks/gpu_peers.sh llama-3.2-1b        # only the shapes named
# Env: OUT (where the device tool collects returned files: the JSONL, BENCHMARKS.md, worker-logs.tgz), RUN_DIR (default benchmarks/results/gpu-run), BUDGET_S (default 540: no system
# starts after it and a running one is stopped there), BATCH/SEQ (default 2 x 2048; BATCH=2,4 measures both sizes on one load per system),
# METHODS (default "lora qlora"), SYSTEMS (comma list), BENCH_GIT_COMMIT (recorded as the commit when the tree carries no .git).
# Writes $RUN_DIR/results/train_step-<date>.jsonl (also appended to benchmarks/results/), worker logs in
# $RUN_DIR/logs, and $RUN_DIR/BENCHMARKS.md (+ charts when matplotlib is installed). Bring the JSONL back into
# benchmarks/results/ and run `python -m benchmarks.report` to regenerate BENCHMARKS.md and the charts.
set -uo pipefail
START=$(date +%s)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The device tool returns at most 8 files from $OUT: keep the run's many files in RUN_DIR and hand
# back only the JSONL, the report and one archive of the worker logs.
RUN_DIR=${RUN_DIR:-benchmarks/results/gpu-run}
RETURN_DIR=${OUT:-$RUN_DIR}
BUDGET_S=${BUDGET_S:-540}
BATCH=${BATCH:-2}
SEQ=${SEQ:-2048}
DEADLINE=$((START + BUDGET_S))
MODELS=("$@")
[ ${#MODELS[@]} -eq 0 ] && MODELS=(llama-3.1-8b llama-3.2-1b)
mkdir -p "$RUN_DIR/results" "$RUN_DIR/logs" "$RETURN_DIR" benchmarks/results

if [ -f .peers/peers.tar.xz ]; then
  mkdir -p /tmp/site && tar -xJf .peers/peers.tar.xz -C /tmp/site
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "gpu_peers: .peers/peers.tar.xz not found (carry .peers); Unsloth, Liger and bitsandbytes will fail" >&2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__)"

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
JSONL="$RUN_DIR/results/train_step-$STAMP.jsonl"
SYSTEMS=${SYSTEMS:-velotune,velotune_no_recompute,unsloth,liger,hf_peft,hf_peft_bnb}
for model in "${MODELS[@]}"; do
  # Loading dominates at 8B; fewer timed steps keep the whole run inside the GPU budget.
  if [ "$model" = "llama-3.2-1b" ]; then WARMUP=3 STEPS=10; else WARMUP=2 STEPS=5; fi
  for method in ${METHODS:-lora qlora}; do
    $PY -m benchmarks.train_step --model "$model" --method "$method" --batch "$BATCH" --seq "$SEQ" \
      --systems "$SYSTEMS" --warmup "$WARMUP" --steps "$STEPS" --deadline "$DEADLINE" --min-system-s 45 \
      --out "$JSONL" --also-out "benchmarks/results/train_step-$STAMP.jsonl" --log-dir "$RUN_DIR/logs" \
      --note "gpu_peers.sh: $WARMUP warm-up + $STEPS timed steps (budget ${BUDGET_S} s for all shapes)" \
      || echo "gpu_peers: train_step $model $method exited with $?" >&2
    echo "gpu_peers: $(( $(date +%s) - START )) s elapsed"
  done
done
$PY -m benchmarks.report --results-dir "$RUN_DIR/results" --output "$RUN_DIR/BENCHMARKS.md" \
  --charts-dir "$RUN_DIR/results" || echo "gpu_peers: report failed" >&2
if [ "$RETURN_DIR" != "$RUN_DIR" ]; then
  cp "$JSONL" "$RUN_DIR/BENCHMARKS.md" "$RETURN_DIR/" 2>/dev/null
  tar -czf "$RETURN_DIR/worker-logs.tgz" -C "$RUN_DIR" logs 2>/dev/null
fi
echo "gpu_peers: done in $(( $(date +%s) - START )) s; results in $JSONL"
