"""Convert an EE-LLM checkpoint (any TP/PP layout) into a Hugging Face directory.

    python tools/checkpoint/megatron_to_hf.py --load-dir CKPT --save-dir HF_DIR \
        [--dtype float32|bfloat16|float16]

Writes ``config.json`` + ``model.safetensors`` (LlamaForCausalLM or GPT2LMHeadModel), the
tokenizer files the checkpoint records, and the exit heads as ``early_exits.safetensors`` +
``early_exits.json`` (which hf_to_megatron.py reads back). See docs/checkpoint_tools.md.
"""

from __future__ import annotations

import sys

from megatron.early_exit.checkpoint.cli import run_checkpoint_tool
from megatron.early_exit.checkpoint.convert import megatron_to_hf


def add_arguments(parser) -> None:
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="cast the weights (default: the checkpoint's dtype)",
    )


def convert(args):
    return megatron_to_hf(args.load_dir, args.save_dir, dtype=args.dtype, seed=args.seed)


def main(argv=None) -> int:
    return run_checkpoint_tool(
        __doc__, convert, argv=argv, add_arguments=add_arguments,
        load_help="EE-LLM checkpoint directory", save_help="Hugging Face directory to write",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
