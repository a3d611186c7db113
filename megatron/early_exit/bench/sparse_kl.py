"""Cost of the sparse distillation KL against the dense one (``tools/time_sparse_kl.py``).

What is timed is the exit's distillation step for ``N`` tokens: the projection of the exit's
states onto the vocabulary rows the loss reads, the KL, and its backward into the states and the
output weight, at SmolLM2-135M's shape by default (hidden 576, vocab 49152, float32). Dense: all
``V`` rows, ``losses.vocab_parallel_kl_divergence``; sparse: ``sparse_kl.sparse_exit_kl`` at each
``k`` with ``m`` sampled rest rows. The teacher's log-probabilities (dense) and top-k (sparse) are
computed once outside the timed call: the final head produces its logits either way. This is the
part of an EE-Tuning step that the sparse KL changes, not a whole tuning step (the backbone
forward and the exit's transform cost the same in both).

Interleaved rounds, medians of wall and CPU time per step, tokens/s = ``N`` / median wall time.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

from megatron.early_exit.bench.shortlist import time_variants
from megatron.early_exit.model.losses import vocab_parallel_kl_divergence
from megatron.early_exit.model.sparse_kl import sparse_exit_kl, teacher_top_k


def variants(
    hidden: int, vocab: int, tokens: int, ks: Sequence[int], num_sampled: int, seed: int = 0
) -> tuple[dict[str, Callable[[], object]], dict[str, float]]:
    """``({name: step}, {name: relative KL error against dense})``."""
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(vocab, hidden, generator=generator) * 0.05).requires_grad_()
    states = torch.randn(tokens, hidden, generator=generator).requires_grad_()
    # A heavy-headed teacher near the student: the exit's logits plus a unigram-like bias.
    with torch.no_grad():
        bias = -1.2 * torch.log1p(torch.randperm(vocab, generator=generator).float())
        teacher = states @ weight.t() + bias + torch.randn(tokens, vocab, generator=generator)
        teacher_log_probs = torch.log_softmax(teacher, dim=-1)

    def dense() -> torch.Tensor:
        kl = vocab_parallel_kl_divergence(teacher_log_probs, states @ weight.t())
        kl.sum().backward()
        return kl.detach()

    steps: dict[str, Callable[[], object]] = {"dense": dense}
    errors = {"dense": 0.0}
    reference = dense().double()
    for k in ks:
        ids, log_probs = teacher_top_k(teacher, k)

        def sparse(ids=ids, log_probs=log_probs) -> torch.Tensor:
            kl = sparse_exit_kl(states, weight, ids, log_probs, num_sampled, generator=generator)
            kl.sum().backward()
            return kl.detach()

        name = f"sparse k={k} m={num_sampled}"
        steps[name] = sparse
        errors[name] = float((sparse().double() - reference).abs().mean() / reference.mean())
    return steps, errors


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per step (N)")
    parser.add_argument("--ks", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--num-sampled", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--num-threads", type=int, default=None)
    args = parser.parse_args(argv)
    if min(args.hidden, args.vocab, args.tokens, args.rounds, *args.ks) < 1 or args.num_sampled < 0:
        parser.error("sizes, --ks and --rounds must be >= 1, --num-sampled >= 0")
    if max(args.ks) > args.vocab:
        parser.error(f"--ks must be <= --vocab ({args.vocab})")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    steps, errors = variants(args.hidden, args.vocab, args.tokens, args.ks, args.num_sampled)
    timings = time_variants(steps, args.rounds, 1)
    dense = timings["dense"]
    print(
        f"hidden {args.hidden}, vocab {args.vocab}, {args.tokens} tokens per step, float32, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds, medians (forward + backward "
        "of the exit projection and KL)"
    )
    print(f"{'step':<22}{'wall ms':>10}{'cpu ms':>10}{'tokens/s':>11}{'speed-up':>10}{'KL err':>9}")
    for name, t in timings.items():
        t["tokens_per_second"] = args.tokens / t["wall_s"]
        t["relative_kl_error"] = errors[name]
        print(
            f"{name:<22}{t['wall_s'] * 1e3:>10.1f}{t['cpu_s'] * 1e3:>10.1f}"
            f"{t['tokens_per_second']:>11.0f}{dense['wall_s'] / t['wall_s']:>10.2f}"
            f"{errors[name]:>9.4f}"
        )
    return timings
