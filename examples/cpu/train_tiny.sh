#!/usr/bin/env bash
# Tiny early-exit GPT on the bundled Brown corpus, one CPU process (a few minutes on 2 cores).
# Exits after layers 1 and 2 (norm + head); saves to runs/tiny and prints a per-exit loss table.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" pretrain_early_exit_gpt.py \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 \
  --normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear \
  --hidden-dropout 0.0 --attention-dropout 0.0 \
  --exit-layer-nums 1 2 --use-exit-norm --exit-layer-weight 0.3 0.5 \
  --micro-batch-size 8 --train-iters "${TRAIN_ITERS:-200}" --lr 2e-3 --min-lr 2e-4 \
  --lr-warmup-iters 10 --log-interval 10 --eval-interval 100 --eval-iters 8 \
  --save "${SAVE:-runs/tiny}" --metrics-file "${SAVE:-runs/tiny}/metrics.jsonl" "$@"
