"""Benchmark applications, kept out of the libraries they measure.

* ``generation``: decoding methods on one checkpoint (``tools/bench_generation.py``,
  ``docs/benchmarks/generation.md``);
* ``serving``: the REST server under concurrent mixed requests, per batching mode
  (``tools/bench_serving.py``, ``docs/benchmarks/serving.md``);
* ``training``: our pipeline executor against megatron-core's 1F1B (``tools/bench_training.py``,
  ``docs/benchmarks/training.md``).

Nothing in ``inference/``, ``training/`` or ``pipeline/`` imports this package.
"""
