#!/usr/bin/env bash
# The same tiny model as two pipeline stages in two CPU processes over gloo (PP=2): the exit after
# layer 1 lives on stage 0, the one after layer 3 on stage 1 with the final head.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
exec "${TORCHRUN:-.venv/bin/torchrun}" --nproc-per-node 2 pretrain_early_exit_gpt.py \
  --pipeline-model-parallel-size 2 \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 \
  --normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear \
  --hidden-dropout 0.0 --attention-dropout 0.0 \
  --exit-layer-nums 1 3 --use-exit-norm --exit-layer-weight 0.3 0.5 \
  --micro-batch-size 4 --global-batch-size 16 --train-iters "${TRAIN_ITERS:-100}" \
  --lr 2e-3 --min-lr 2e-4 --log-interval 10 --eval-interval 50 --eval-iters 4 \
  --save "${SAVE:-runs/tiny-pp2}" "$@"
