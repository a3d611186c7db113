r"""Cost of the sparse distillation KL (teacher top-k + sampled rest) against the dense KL.

    python tools/time_sparse_kl.py                      # SmolLM2-135M's shape: 576 x 49152
    python tools/time_sparse_kl.py --tokens 256 --ks 32 128 --num-sampled 512 --num-threads 2

Interleaved rounds, medians; the code: ``megatron/early_exit/bench/sparse_kl.py``.
"""

from megatron.early_exit.bench.sparse_kl import main

if __name__ == "__main__":
    main()
