"""Benchmark early-exit pipeline training against megatron-core's own 1F1B schedule.

    python tools/bench_training.py   # both suites: 10 minutes on a shared 2-core machine
    python tools/bench_training.py --only pp2 --iters 30 --json bench.json

Spawns its own ranks (one process per pipeline stage) and prints one table per suite: ``pp2``
(megatron-core's 1F1B against our executor, with and without a stage-0 exit) and ``pp4`` (exits
on stages 0-2, bubble filling off and on). What is measured and how:
``docs/benchmarks/training.md``; the code: ``megatron/early_exit/bench/training/``.
"""

import sys

from megatron.early_exit.bench.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
