"""Interactive client of an EE-LLM generation server: colours each token by the exit that made it.

    python tools/text_generation_cli.py                      # REPL; ":help" lists commands
    python tools/text_generation_cli.py --prompt "Hello" --threshold 0.5 --no-color

Each answer is printed token by token, coloured by the exit layer that produced the token (the
final layer in the terminal's default colour), with a legend and a per-exit token count. With
``--no-color`` early-exited tokens are marked ``token{layer}`` instead.
"""

import sys

from megatron.early_exit.server.interactive import main

if __name__ == "__main__":
    sys.exit(main())
