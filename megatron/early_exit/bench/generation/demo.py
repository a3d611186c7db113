"""A few held-out prompts decoded with full decoding and with early exit, side by side.

    python tools/generate_demo.py --load runs/tiny [--num-prompts 4] [--max-new-tokens 32] \\
        [--threshold 0.8] [--rounds 3]

``make demo`` ends with it. Prompts are the first words of Brown held-out documents (never
trained on). Both methods decode the same prompts greedily in one process; they are timed in
interleaved rounds (full, early exit, full, ...), and the speed-up is the median of the
per-round ratios, printed beside CPU time. Agreement is the share of generated tokens that equal
full decoding's token at the same position (the first divergence changes the prefix, so
positions after it are compared as generated, not re-aligned).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from megatron.early_exit import platform
from megatron.early_exit.checkpoint.loading import load_for_inference
from megatron.early_exit.inference.decide import ExitPolicy
from megatron.early_exit.inference.generate import GenerationParams, generate


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True, help="checkpoint directory")
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--prompt-words", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.8, help="early-exit threshold")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each method")
    parser.add_argument("--text-jsonl", default=None, help="default: Brown held-out files")
    args = parser.parse_args(argv)
    for flag in ("num_prompts", "prompt_words", "max_new_tokens", "rounds"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold must be in [0, 1], got {args.threshold}")
    return args


def held_out_prompts(path: Path | None, num_prompts: int, num_words: int) -> list[str]:
    """The first ``num_words`` words of the first ``num_prompts`` documents of ``path``."""
    if path is None:
        from megatron.early_exit.data.corpus import prepare_brown

        path = prepare_brown().heldout
    prompts = []
    with open(path) as handle:
        for line in handle:
            words = json.loads(line)["text"].split()
            if len(words) >= num_words:
                prompts.append(" ".join(words[:num_words]))
            if len(prompts) == num_prompts:
                break
    return prompts


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Share of positions where ``tokens`` equals ``reference`` (over the reference's length)."""
    same = sum(a == b for row, ref in zip(tokens, reference, strict=True) for a, b in zip(row, ref))
    return same / max(1, sum(len(ref) for ref in reference))


def _timed(model, prompts, params):
    wall, cpu = time.perf_counter(), time.process_time()
    results = generate(model, prompts, params)
    return results, time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> int:
    args = parse_args(argv)
    loaded = load_for_inference(args.load)
    try:
        result = run(loaded.model, loaded.tokenizer, args)
    finally:
        platform.destroy()
    for text, full, early in zip(result["prompts"], result["full"], result["early exit"],
                                 strict=True):  # fmt: skip
        print(f"\nprompt:     {text}")
        print(f"full:       {loaded.tokenizer.detokenize(full.tokens)!r}")
        print(f"early exit: {loaded.tokenizer.detokenize(early.tokens)!r}")
        print(f"exit depths {early.exit_depths}")
    print(result["table"])
    return 0


def run(model, tokenizer, args) -> dict:
    """Decode the prompts with both methods; ``{"prompts", "full", "early exit", "table"}``
    (the last round's results of each method and the printed summary)."""
    if not model.config.exit_heads:
        raise SystemExit(f"{args.load} has no exits: nothing to compare with full decoding")
    texts = held_out_prompts(
        Path(args.text_jsonl) if args.text_jsonl else None, args.num_prompts, args.prompt_words
    )
    prompts = [tokenizer.tokenize(t) for t in texts]
    common = dict(max_new_tokens=args.max_new_tokens, eos_token_ids=(tokenizer.eod,))
    methods = {
        "full": GenerationParams(early_exit=False, **common),
        "early exit": GenerationParams(exit_policy=ExitPolicy(threshold=args.threshold), **common),
    }
    for params in methods.values():  # warm-up (first-call allocations)
        generate(model, prompts[:1], params)
    runs = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, params in methods.items():
            runs[name].append(_timed(model, prompts, params))
    full_tokens = [r.tokens for r in runs["full"][-1][0]]
    return {
        "prompts": texts,
        **{name: runs[name][-1][0] for name in methods},
        "table": _summary(runs, methods, full_tokens, args),
    }


def _summary(runs, methods, full_tokens, args) -> str:
    """The table: tokens/s (median round), and the medians of the per-round ratios of tokens/s
    (wall and CPU time) to full decoding's in the same round."""

    def rate(run, index):  # tokens per second of wall (index 1) or CPU (index 2) time
        return sum(len(r.tokens) for r in run[0]) / run[index]

    lines = [f"\n{len(full_tokens)} prompts x {args.max_new_tokens} tokens, greedy, "
             f"{args.rounds} interleaved rounds, threshold {args.threshold}, "
             f"{torch.get_num_threads()} threads"]  # fmt: skip
    lines.append(f"{'method':<12}{'tokens/s':>10}{'speed-up':>10}{'cpu speed-up':>14}{'agree':>8}")
    for name in methods:
        pairs = list(zip(runs["full"], runs[name], strict=True))
        speedup = statistics.median(rate(e, 1) / rate(f, 1) for f, e in pairs)
        cpu_speedup = statistics.median(rate(e, 2) / rate(f, 2) for f, e in pairs)
        tokens = [r.tokens for r in runs[name][-1][0]]
        lines.append(
            f"{name:<12}{statistics.median(rate(r, 1) for r in runs[name]):>10.1f}"
            f"{speedup:>10.2f}{cpu_speedup:>14.2f}{agreement(tokens, full_tokens):>8.3f}"
        )
    return "\n".join(lines)
