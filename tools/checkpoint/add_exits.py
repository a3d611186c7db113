"""Add early exits to a trained EE-LLM checkpoint.

    python tools/checkpoint/add_exits.py --load-dir CKPT --save-dir OUT --exit-layer-nums 4 8 \
        [--use-exit-norm [--use-exit-mlp | --use-exit-block]] [--pre-exit] \
        [--untie-exit-output-weights] [--random-init --init-method-std 0.02] [--overwrite-exits]

New exits copy the model's own modules (final norm, output layer or embedding, the exit layer's
MLP, the last layer) unless --random-init; existing exits are kept unless --overwrite-exits. The
new checkpoint (iteration 0, no optimizer state, same model_args) loads at any TP/PP. See
docs/checkpoint_tools.md.
"""

from __future__ import annotations

import sys

from megatron.early_exit.checkpoint.add_exits import add_exits_to_checkpoint
from megatron.early_exit.checkpoint.cli import run_checkpoint_tool
from megatron.early_exit.checkpoint.convert import add_exit_arguments, new_exits_from_args


def add_exits(args):
    spec = new_exits_from_args(args)
    if not spec.layer_numbers:
        raise ValueError("--exit-layer-nums: give at least one exit layer")
    return add_exits_to_checkpoint(
        args.load_dir, args.save_dir, layer_numbers=spec.layer_numbers,
        structure=spec.structure, pre_exit=spec.pre_exit, untied=spec.untied,
        overwrite=spec.overwrite, random_init=spec.random_init,
        zero_mlp_output=spec.zero_mlp_output, temperature=spec.temperature,
        init_method_std=spec.init_method_std, seed=args.seed,
    )  # fmt: skip


def main(argv=None) -> int:
    return run_checkpoint_tool(
        __doc__, add_exits, argv=argv, add_arguments=add_exit_arguments,
        load_help="EE-LLM checkpoint directory", save_help="checkpoint directory to write",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
