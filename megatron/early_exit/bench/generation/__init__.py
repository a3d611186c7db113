"""The generation benchmark behind ``tools/bench_generation.py``.

* ``metrics``: pure functions: agreement with full decoding (token, prefix, ROUGE-L), exit
  statistics and the cost model of the ideal speed-up;
* ``methods``: the benchmark's rows (:class:`~.methods.MethodSpec`) and the runners that decode
  them (our ``generate``; transformers' ``generate`` on the converted weights);
* ``measure``: warm-up, profiling of every module call, rotating timed rounds;
* ``report``: rows, unit costs, the printed table and the plot;
* ``cli``: flags, prompts, loading and the whole run (:func:`~.cli.main`).

What is measured and how: ``docs/benchmarks/generation.md``.
"""
