r"""Cost of a shortlist exit decision (SpecEE) against the full vocabulary projection.

    python tools/time_shortlist.py                      # SmolLM2-135M's shape: 576 x 49152
    python tools/time_shortlist.py --ks 8 32 --batch 4 --num-threads 1

Interleaved rounds, medians of wall and CPU time per decision; the code:
``megatron/early_exit/bench/shortlist.py``.
"""

from megatron.early_exit.bench.shortlist import main

if __name__ == "__main__":
    main()
