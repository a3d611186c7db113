"""The scaffold the checkpoint tools share (``tools/checkpoint/*.py``): ``--load-dir``,
``--save-dir`` and ``--seed``, the tool's own flags, one process, errors as one line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from megatron.early_exit.checkpoint.convert import single_process


def run_checkpoint_tool(
    doc: str,
    run: Callable[[argparse.Namespace], Path],
    *,
    load_help: str,
    save_help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
) -> int:
    """Parse the flags, run ``run(args)`` in a one-process world and print what it saved.

    ``doc`` is the tool's docstring (its first paragraph is the description). A ValueError
    (bad flags, an unusable checkpoint, a conversion problem) is printed as ``error: ...`` and
    the exit status is 2; argparse's own errors exit with 2 as usual.
    """
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--load-dir", required=True, help=load_help)
    parser.add_argument("--save-dir", required=True, help=save_help)
    parser.add_argument("--seed", type=int, default=1234)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        with single_process(args.seed):
            path = run(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"saved {path}")
    return 0
