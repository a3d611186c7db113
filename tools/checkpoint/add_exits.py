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

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron.early_exit.checkpoint.add_exits import add_exits_to_checkpoint  # noqa: E402
from megatron.early_exit.checkpoint.convert import (  # noqa: E402
    add_exit_arguments,
    new_exits_from_args,
    single_process,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load-dir", required=True, help="EE-LLM checkpoint directory")
    parser.add_argument("--save-dir", required=True, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=1234)
    add_exit_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        spec = new_exits_from_args(args)
        if not spec.layer_numbers:
            raise ValueError("--exit-layer-nums: give at least one exit layer")
        with single_process(args.seed):
            path = add_exits_to_checkpoint(
                args.load_dir, args.save_dir, layer_numbers=spec.layer_numbers,
                structure=spec.structure, pre_exit=spec.pre_exit, untied=spec.untied,
                overwrite=spec.overwrite, random_init=spec.random_init,
                zero_mlp_output=spec.zero_mlp_output, temperature=spec.temperature,
                init_method_std=spec.init_method_std,
                seed=args.seed,
            )  # fmt: skip
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
