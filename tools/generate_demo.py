"""A few held-out prompts decoded with full decoding and with early exit, side by side: the
text, tokens/s of each, the speed-up and the agreement (``make demo`` ends with it).

    python tools/generate_demo.py --load runs/tiny [--num-prompts 4] [--threshold 0.8]
"""

import sys

from megatron.early_exit.bench.generation.demo import main

if __name__ == "__main__":
    sys.exit(main())
