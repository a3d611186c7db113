#!/usr/bin/env bash
# One node, 8 GPUs: TP=2 x PP=4 (DP=1), a 1.3B-class early-exit model with exits at 1/4 and 1/2
# depth placed at the start of stages 1 and 2 (--pre-exit at stage boundary + 1), bf16, sequence
# parallel, distributed optimizer. DATA: a Megatron indexed dataset prefix (tools/preprocess_data.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:?set DATA to an indexed dataset prefix}
torchrun --nproc-per-node 8 pretrain_early_exit_gpt.py \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 4 --sequence-parallel \
  --use-distributed-optimizer --bf16 \
  --num-layers 24 --hidden-size 2048 --num-attention-heads 32 --seq-length 2048 \
  --normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear \
  --hidden-dropout 0.0 --attention-dropout 0.0 --init-method-std 0.01 \
  --exit-layer-nums 7 13 --pre-exit --exit-layer-weight 0.25 0.5 \
  --micro-batch-size 2 --global-batch-size 256 --train-iters 100000 \
  --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 2000 --weight-decay 0.1 --clip-grad 1.0 \
  --adam-beta1 0.9 --adam-beta2 0.95 \
  --data-path "$DATA" --tokenizer-type "${TOKENIZER_TYPE:-GPT2BPETokenizer}" \
  --vocab-file "${VOCAB_FILE:-assets/gpt2-bpe-0.1.5/gpt2-vocab.json}" \
  --merge-file "${MERGE_FILE:-assets/gpt2-bpe-0.1.5/gpt2-merges.txt}" \
  --save "${SAVE:-runs/ee-1.3b}" --save-interval 1000 --eval-interval 1000 --eval-iters 10 \
  --tensorboard-dir "${SAVE:-runs/ee-1.3b}/tensorboard" "$@"
