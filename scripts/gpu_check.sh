#!/usr/bin/env bash
# The GPU checks in one prepared script (issue 15), for a machine with one or more GPUs and the
# .venv of `make setup` (pip install -e .[gpu] adds Transformer Engine). Under 8 minutes on one
# H100-class GPU:
#   1. the platform: device, torch, Transformer Engine
#   2. the GPU test tier (pytest -m gpu tests/gpu): forward/backward against the CPU result, the
#      TE layer spec, bf16 training under the collective-device harness, full recomputation with
#      exits, the HF import loaded into the training spec, greedy generation against HF
#   3. a short bf16 training run (the bundled corpus, 1.3B-style layout scaled down, recomputation
#      on, flash attention where TE is present), saved, then extended with
#      --override-opt_param-scheduler
#   4. with 2+ GPUs: the same run at DP=2 over NCCL (issue 15, defect 1)
#   5. a short generation benchmark on the trained checkpoint
# Every step has its own time limit; the script stops at the first failure. Output: $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/gpu_check}
rm -rf "$OUT" && mkdir -p "$OUT"
start=$SECONDS
stamp() { echo "[$(( SECONDS - start )) s] $*"; }

stamp "1. platform"
"$PYTHON" - <<'EOF'
import torch
from megatron.early_exit import platform
assert platform.has_cuda(), "no GPU visible to torch: nothing to check here"
print("device:", platform.device(), "| torch", torch.__version__,
      "| transformer engine:", platform.has_transformer_engine())
EOF
nvidia-smi -L || true
NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)

stamp "2. GPU test tier"
timeout 240 "$PYTHON" -m pytest -q -m gpu tests/gpu -p no:cacheprovider

TE=$("$PYTHON" -c "from megatron.early_exit import platform; print(int(platform.has_transformer_engine()))")
FLASH=()
[[ "$TE" == 1 ]] && FLASH=(--use-flash-attn)
TRAIN=(pretrain_early_exit_gpt.py --num-layers 8 --hidden-size 512 --num-attention-heads 8
  --seq-length 256 --normalization RMSNorm --swiglu --position-embedding-type rope
  --disable-bias-linear --hidden-dropout 0.0 --attention-dropout 0.0 --bf16 "${FLASH[@]}"
  --exit-layer-nums 3 5 --pre-exit --use-exit-norm --exit-layer-weight 0.25 0.5
  --recompute-granularity full --recompute-method block --recompute-num-layers 4
  --micro-batch-size 8 --global-batch-size 16 --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine
  --log-interval 10 --eval-interval 1000 --eval-iters 2 --distributed-timeout-minutes 5)

stamp "3. training: 60 iterations, then extended to 80 with --override-opt_param-scheduler"
timeout 180 "$PYTHON" "${TRAIN[@]}" --train-iters 60 --save "$OUT/ckpt" \
  --metrics-file "$OUT/train.jsonl" --log-timers-to-tracker --tensorboard-dir "$OUT/tb"
timeout 120 "$PYTHON" "${TRAIN[@]}" --train-iters 80 --load "$OUT/ckpt" \
  --override-opt_param-scheduler --save "$OUT/ckpt" --metrics-file "$OUT/extend.jsonl"
"$PYTHON" - "$OUT" <<'EOF'
import json, sys
rows = [json.loads(l) for f in ("train", "extend")
        for l in open(f"{sys.argv[1]}/{f}.jsonl") if '"lr"' in l]
first, last = rows[0], rows[-1]
print(f"loss {first['lm_loss']:.3f} -> {last['lm_loss']:.3f} (iterations {first['iteration']}"
      f"-{last['iteration']}); {last['tokens_per_second']:,.0f} tokens/s")
assert last["iteration"] == 80 and last["lm_loss"] < first["lm_loss"]
EOF

if (( NUM_GPUS >= 2 )); then
  stamp "4. DP=2 over NCCL: 20 iterations"
  timeout 180 "$PYTHON" -m torch.distributed.run --nproc-per-node 2 "${TRAIN[@]}" \
    --train-iters 20 --use-distributed-optimizer --save "$OUT/ckpt_dp2"
else
  stamp "4. skipped: one GPU (DP=2 needs two)"
fi

stamp "5. generation benchmark"
timeout 150 "$PYTHON" tools/bench_generation.py --load "$OUT/ckpt" --num-prompts 4 \
  --max-new-tokens 32 --repeats 1 --thresholds 0.9 0.5 --output-json "$OUT/bench.json" \
  --output-plot ""
stamp "done: all GPU checks passed"
