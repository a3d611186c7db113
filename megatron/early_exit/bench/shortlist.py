"""Cost of a shortlist exit decision against the full projection's (``tools/time_shortlist.py``).

One decode step at one exit, batch ``b``: the full decision is ``logits = states @ W.T`` over the
whole vocabulary then ``max_prob`` (``decide.confidence``); the shortlist decision is
``shortlist_decide`` over ``k`` candidate rows (gather + batched mat-vec + softmax over ``k``).
The default shape is SmolLM2-135M's (hidden 576, vocab 49152, float32).

Rounds are interleaved (each round times every variant once, the starting variant rotating), each
variant call is repeated ``calls`` times inside a timed block, and the table reports the median
over rounds of the per-call wall time and CPU time (``time.process_time``: all threads of the
process) and the ratio of medians against the full projection.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from megatron.early_exit.inference.decide import confidence
from megatron.early_exit.inference.shortlist import shortlist_decide


def variants(
    hidden: int, vocab: int, batch: int, ks: Sequence[int], seed: int = 0
) -> dict[str, Callable[[], object]]:
    """``{name: call}``: the full decision and one shortlist decision per ``k``."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=generator) * 0.05
    states = torch.randn(batch, hidden, generator=generator)
    calls: dict[str, Callable[[], object]] = {
        "full": lambda: confidence(states @ weight.t(), "max_prob") >= 0.8,
    }
    for k in ks:
        candidates = torch.randint(0, vocab, (batch, k), generator=generator)
        calls[f"shortlist k={k}"] = lambda c=candidates: (
            shortlist_decide(states, weight, c, 0.8).exit_mask
        )
    return calls


def time_variants(
    calls: dict[str, Callable[[], object]], rounds: int, calls_per_round: int
) -> dict[str, dict[str, float]]:
    """Median per-call wall and CPU seconds of each variant over interleaved rounds."""
    names = list(calls)
    for name in names:  # warm-up
        calls[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for round_index in range(rounds):
        start = round_index % len(names)
        for name in names[start:] + names[:start]:
            call = calls[name]
            w, c = time.perf_counter(), time.process_time()
            for _ in range(calls_per_round):
                call()
            wall[name].append((time.perf_counter() - w) / calls_per_round)
            cpu[name].append((time.process_time() - c) / calls_per_round)
    return {
        n: {"wall_s": statistics.median(wall[n]), "cpu_s": statistics.median(cpu[n])} for n in names
    }


def format_table(timings: dict[str, dict[str, float]]) -> str:
    full = timings["full"]
    lines = [f"{'decision':<16}{'wall us':>10}{'cpu us':>10}{'wall/full':>11}{'cpu/full':>10}"]
    for name, t in timings.items():
        lines.append(
            f"{name:<16}{t['wall_s'] * 1e6:>10.1f}{t['cpu_s'] * 1e6:>10.1f}"
            f"{t['wall_s'] / full['wall_s']:>11.4f}{t['cpu_s'] / full['cpu_s']:>10.4f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20, help="calls per timed block")
    parser.add_argument("--num-threads", type=int, default=None)
    args = parser.parse_args(argv)
    if min(args.hidden, args.vocab, args.batch, args.rounds, args.calls, *args.ks) < 1:
        parser.error("--hidden, --vocab, --batch, --ks, --rounds and --calls must be >= 1")
    if max(args.ks) > args.vocab:
        parser.error(f"--ks must be <= --vocab ({args.vocab})")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    calls = variants(args.hidden, args.vocab, args.batch, args.ks)
    timings = time_variants(calls, args.rounds, args.calls)
    print(
        f"hidden {args.hidden}, vocab {args.vocab}, batch {args.batch}, float32, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.calls} calls, medians"
    )
    print(format_table(timings))
    return timings


@torch.no_grad()
def shortlist_fidelity(model, windows: torch.Tensor, ks: Sequence[int], threshold: float) -> list:
    """How often a shortlist decision equals the full projection's on real text.

    For each window, one no-cache forward; at position ``t`` the shortlist is the final head's
    top-``k`` at ``t - 1`` (SpecEE's "previous step", on full decoding's trajectory). Per exit and
    ``k``: ``recall`` (the exit's full top-1 is listed), ``same_token`` and ``same_decision``
    (max-prob exit at ``threshold``) against the full projection, over all positions ``t >= 1``.
    """
    from megatron.early_exit.inference.shortlist import previous_top_k

    model.eval()
    depths = sorted(e.depth for e in model.local_exit_configs)
    captured: dict[int, torch.Tensor] = {}
    heads = {d: model.exit_heads[str(d)] for d in depths}
    hooks = [
        heads[d].output_layer.register_forward_hook(
            lambda _m, args, _o, d=d: captured.__setitem__(d, args[0])
        )
        for d in depths
    ]
    counts: dict[tuple[int, int], list[int]] = {(d, k): [0, 0, 0, 0] for d in depths for k in ks}
    try:
        for window in windows:
            s = window.shape[0]
            mask = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)
            final, exits = model(window[None], torch.arange(s)[None], mask,
                                 runtime_gather_output=True)  # fmt: skip
            for d in depths:
                head = heads[d]
                weight = head.output_layer.weight
                if weight is None:
                    weight = model.shared_embedding_or_output_weight()
                states = captured[d][1:, 0]  # [s - 1, h]
                full = exits[d][0, 1:].float()  # [s - 1, V]
                full_token = full.argmax(-1)
                full_exit = confidence(full, "max_prob") >= threshold
                for k in ks:
                    candidates = previous_top_k(final[0, :-1].float(), k)  # [s - 1, k]
                    decision = shortlist_decide(states, weight, candidates, threshold)
                    row = counts[d, k]
                    row[0] += int((candidates == full_token[:, None]).any(-1).sum())
                    row[1] += int((decision.token == full_token).sum())
                    row[2] += int((decision.exit_mask == full_exit).sum())
                    row[3] += s - 1
    finally:
        for hook in hooks:
            hook.remove()
    return [
        {"depth": d, "k": k, "recall": r[0] / r[3], "same_token": r[1] / r[3],
         "same_decision": r[2] / r[3], "positions": r[3]}
        for (d, k), r in counts.items()
    ]  # fmt: skip
