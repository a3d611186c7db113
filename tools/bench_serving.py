r"""Serving load benchmark: N concurrent clients x M mixed requests against the REST server
(``tools/run_text_generation_server.py``, started here on 127.0.0.1 for each mode).

    python tools/bench_serving.py --load runs/tiny        # the `make demo` checkpoint
    python tools/bench_serving.py --load CKPT --modes serial continuous --clients 8 \
        --requests-per-client 25 --rounds 3 --out runs/bench_serving.json
    python tools/bench_serving.py --load CKPT --modes default   # a server without --batching

Prints requests/s, p50/p99 latency, errors, cross-talk (answers that differ from the same
request sent alone) and the server's CPU time per mode, and the ratio of each mode's requests/s
to serial serving. What is measured and how: ``docs/benchmarks/serving.md``; the code:
``megatron/early_exit/bench/serving/``.
"""

from megatron.early_exit.bench.serving.cli import main

if __name__ == "__main__":
    main()
