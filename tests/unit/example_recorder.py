"""Stand-in for ``python``, ``torchrun``, ``srun`` and ``scontrol`` when ``test_examples.py``
runs an example script: appends the command line to ``$EXAMPLE_LOG`` (one JSON list per line)
and prints what the scripts read from a command's output (a directory for ``prepare_smollm2.py``
and for ``python -c ...``, a host name for ``scontrol``)."""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    name, args = os.path.basename(argv[0]), argv[1:]
    if name == "srun":  # srun runs its command: record that command instead
        name, args = os.path.basename(args[0]), args[1:]
    with open(os.environ["EXAMPLE_LOG"], "a") as log:
        log.write(json.dumps([name, *args]) + "\n")
    if name == "scontrol":
        print("node0")
    elif "-c" in args or any(a.endswith("prepare_smollm2.py") for a in args):
        print(os.environ["EXAMPLE_WORK"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))  # sys.argv[1]: the launcher it stands in for
