"""The serving load benchmark behind ``tools/bench_serving.py``.

* ``workload``: pure: the requests (kinds, prompts, lengths, early exit), the seeded mix, what
  part of an answer is compared;
* ``metrics``: pure: percentiles, cross-talk against each request answered alone, paired ratios;
* ``server``: the server under test as a child process (start, ``/health``, CPU time, stop);
* ``load``: concurrent client threads, and each request sent alone;
* ``report``: rows, per-mode summary, the printed table;
* ``cli``: flags and the whole run (:func:`~.cli.main`).

Only a client: no torch. What is measured and how: ``docs/benchmarks/serving.md``.
"""
