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

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron.early_exit.checkpoint.convert import (  # noqa: E402
    add_exit_arguments,
    hf_to_megatron,
    new_exits_from_args,
    single_process,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load-dir", required=True, help="Hugging Face model directory")
    parser.add_argument("--save-dir", required=True, help="EE-LLM checkpoint directory to write")
    parser.add_argument("--target-tensor-parallel-size", type=int, default=1)
    parser.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    parser.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="recorded training sequence length (default: max positions)",
    )
    parser.add_argument("--seed", type=int, default=1234)
    add_exit_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        new_exits = new_exits_from_args(args)
        with single_process(args.seed):
            path = hf_to_megatron(
                args.load_dir, args.save_dir,
                target_tensor_parallel_size=args.target_tensor_parallel_size,
                target_pipeline_parallel_size=args.target_pipeline_parallel_size,
                new_exits=new_exits, seq_length=args.seq_length, seed=args.seed,
            )  # fmt: skip
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
