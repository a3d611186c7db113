"""Convert an EE-LLM (Megatron-LM legacy) checkpoint into an EE-LLM checkpoint of ours.

    python tools/checkpoint/legacy_to_megatron.py --load-dir LEGACY --save-dir OUT \
        [--load-iteration N] [--target-tensor-parallel-size N] [--target-pipeline-parallel-size M]

Reads LEGACY/iter_NNNNNNN/mp_rank_TT[_PPP]/model_optim_rng.pt (the iteration in
latest_checkpointed_iteration.txt unless --load-iteration), builds our config from the run's
stored args (refusing what has no equivalent) and writes a TP=1/PP=1 checkpoint at iteration 0
without optimizer state, which loads at any TP/PP; the target sizes are checked and recorded.
The .pt files are pickles: convert only checkpoints you trust. See docs/checkpoint_tools.md.
"""

from __future__ import annotations

import sys

from megatron.early_exit.checkpoint.cli import run_checkpoint_tool
from megatron.early_exit.checkpoint.legacy import legacy_to_megatron


def add_arguments(parser) -> None:
    parser.add_argument(
        "--load-iteration",
        type=int,
        default=None,
        help="iteration to convert (default: the one latest_checkpointed_iteration.txt names)",
    )
    parser.add_argument("--target-tensor-parallel-size", type=int, default=1)
    parser.add_argument("--target-pipeline-parallel-size", type=int, default=1)


def convert(args):
    return legacy_to_megatron(
        args.load_dir, args.save_dir, iteration=args.load_iteration,
        target_tensor_parallel_size=args.target_tensor_parallel_size,
        target_pipeline_parallel_size=args.target_pipeline_parallel_size, seed=args.seed,
    )  # fmt: skip


def main(argv=None) -> int:
    return run_checkpoint_tool(
        __doc__, convert, argv=argv, add_arguments=add_arguments,
        load_help="EE-LLM legacy checkpoint directory (iter_*/mp_rank_*/model_optim_rng.pt)",
        save_help="checkpoint directory to write",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
