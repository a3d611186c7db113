r"""Generation benchmark: full decoding, early exit (KV recomputation) at several thresholds,
self-speculative decoding and Hugging Face ``generate`` on one checkpoint and one prompt set.

    python tools/bench_generation.py --load runs/tiny     # the `make demo` checkpoint
    python tools/bench_generation.py --load CKPT --prompts-file prompts.jsonl --num-prompts 16 \
        --max-new-tokens 64 --thresholds 1.0 0.8 0.6 --batch-size 1 \
        --output-json bench.json --output-plot bench.png
    torchrun --nproc-per-node 2 tools/bench_generation.py --load CKPT --pipeline-parallel-size 2

Prints a table (tokens/s, measured and ideal speed-up over full decoding, agreement with full
decoding, ROUGE-L, mean exit depth, tokens per exit) and writes the rows as JSON and a PNG of
speed-up against agreement. What is measured and how: ``docs/benchmarks/generation.md``; the
code: ``megatron/early_exit/bench/generation/``.
"""

from megatron.early_exit.bench.generation.cli import main

if __name__ == "__main__":
    main()
