"""Convert an EE-LLM checkpoint (any TP/PP layout) into a Hugging Face directory.

    python tools/checkpoint/megatron_to_hf.py --load-dir CKPT --save-dir HF_DIR \
        [--dtype float32|bfloat16|float16]

Writes ``config.json`` + ``model.safetensors`` (LlamaForCausalLM or GPT2LMHeadModel), the
tokenizer files the checkpoint records, and the exit heads as ``early_exits.safetensors`` +
``early_exits.json`` (which hf_to_megatron.py reads back). See docs/checkpoint_tools.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron.early_exit.checkpoint.convert import megatron_to_hf, single_process  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load-dir", required=True, help="EE-LLM checkpoint directory")
    parser.add_argument("--save-dir", required=True, help="Hugging Face directory to write")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="cast the weights (default: the checkpoint's dtype)",
    )
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with single_process(args.seed):
            path = megatron_to_hf(args.load_dir, args.save_dir, dtype=args.dtype, seed=args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
