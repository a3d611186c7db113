"""Convert a Hugging Face Llama / GPT-2 directory into an EE-LLM checkpoint.

    python tools/checkpoint/hf_to_megatron.py --load-dir HF_DIR --save-dir OUT \
        [--target-tensor-parallel-size N] [--target-pipeline-parallel-size M] \
        [--exit-layer-nums 4 8 --use-exit-norm [--use-exit-mlp | --use-exit-block] --pre-exit \
         --random-init]

Runs in one process and writes a TP=1/PP=1 checkpoint, which loads at any TP/PP (dist
checkpointing reshards); the target sizes are checked and recorded. Exit heads saved beside the
HF model (``early_exits.json``) are put back. See docs/checkpoint_tools.md.
"""

from __future__ import annotations

import sys

from megatron.early_exit.checkpoint.cli import run_checkpoint_tool
from megatron.early_exit.checkpoint.convert import (
    add_exit_arguments,
    hf_to_megatron,
    new_exits_from_args,
)


def add_arguments(parser) -> None:
    parser.add_argument("--target-tensor-parallel-size", type=int, default=1)
    parser.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    parser.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="recorded training sequence length (default: max positions)",
    )
    add_exit_arguments(parser)


def convert(args):
    return hf_to_megatron(
        args.load_dir, args.save_dir,
        target_tensor_parallel_size=args.target_tensor_parallel_size,
        target_pipeline_parallel_size=args.target_pipeline_parallel_size,
        new_exits=new_exits_from_args(args), seq_length=args.seq_length, seed=args.seed,
    )  # fmt: skip


def main(argv=None) -> int:
    return run_checkpoint_tool(
        __doc__, convert, argv=argv, add_arguments=add_arguments,
        load_help="Hugging Face model directory", save_help="EE-LLM checkpoint directory to write",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
