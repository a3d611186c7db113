"""EE-LLM's exit-structure flags, declared and checked in one place for every entry point
(``pretrain_early_exit_gpt.py`` and the checkpoint tools).

The flags keep the original's names and meaning: ``--exit-layer-nums`` lists 1-based layer
numbers (the exit reads that layer's output, or its input with ``--pre-exit``);
``--use-exit-norm``, ``--use-exit-mlp`` and ``--use-exit-block`` choose the structure; and
``--untie-exit-output-weights`` gives every exit its own output layer. Inside the package an
exit is named by its *depth* (:attr:`~megatron.early_exit.config.ExitHeadConfig.depth`, the
number of backbone layers below the state it reads): the flags map onto
:class:`~megatron.early_exit.config.ExitHeadConfig` records here and nowhere else.
"""

from __future__ import annotations

STRUCTURE_FLAGS = ("--pre-exit", "--use-exit-norm", "--use-exit-mlp", "--use-exit-block",
                   "--untie-exit-output-weights")  # fmt: skip


def add_exit_structure_flags(group) -> None:
    """``--exit-layer-nums`` and the structure flags on an argparse parser or group."""
    add = group.add_argument
    add("--exit-layer-nums", type=int, nargs="+", default=[], help="1-based layers with an exit")
    add("--pre-exit", action="store_true", help="exits read their layer's input")
    add("--use-exit-norm", action="store_true", help="exits start with a norm")
    add("--use-exit-mlp", action="store_true", help="norm + MLP exits (needs --use-exit-norm)")
    add(
        "--use-exit-block",
        action="store_true",
        help="norm + transformer-layer exits (needs --use-exit-norm)",
    )
    add(
        "--untie-exit-output-weights",
        action="store_true",
        help="exits own an output layer (implied for models with untied embeddings)",
    )


def exit_structure(args) -> str:
    """The structure the flags describe: ``block``, ``mlp``, ``norm`` or ``head``."""
    if args.use_exit_block:
        return "block"
    if args.use_exit_mlp:
        return "mlp"
    return "norm" if args.use_exit_norm else "head"


def structure_flags_used(args) -> list[str]:
    """The structure flags that are set (each meaningless without ``--exit-layer-nums``)."""
    values = (args.pre_exit, args.use_exit_norm, args.use_exit_mlp, args.use_exit_block,
              args.untie_exit_output_weights)  # fmt: skip
    return [flag for flag, on in zip(STRUCTURE_FLAGS, values, strict=True) if on]


def structure_flag_problems(args) -> list[str]:
    """What is wrong with the structure flags, one message per problem (empty when fine)."""
    problems = []
    if args.use_exit_mlp and args.use_exit_block:
        problems.append(
            "--use-exit-mlp and --use-exit-block are mutually exclusive (one exit structure)"
        )
    if (args.use_exit_mlp or args.use_exit_block) and not args.use_exit_norm:
        problems.append(
            "--use-exit-mlp/--use-exit-block need --use-exit-norm (these exits end in a norm, "
            "as EE-Tuning's 'MLP' and 'Layer' architectures)"
        )
    return problems
