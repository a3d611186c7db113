"""Prompt scoring: each token's log-probability given the tokens before it, by one head.

``score_prompts`` runs the model's own no-cache forward (the training forward: one causal pass
over the whole prompt, no KV cache, no early-exit decisions), one prompt at a time so the logits
of a long prompt are the largest tensor held, and reads the log-softmax of the final head or of
the exit asked for. This is what log-likelihood evaluation (lm-evaluation-harness' multiple
choice) needs: with ``exit_depth`` it measures the exit as a model of its own, the quality that
early exit trades for speed. Every rank of a tensor-parallel group must call it together
(the logits are gathered over TP); pipeline parallelism is not supported (the forward of one
stage cannot score).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenScores:
    """One prompt's scores: ``logprobs[0]`` and ``top[0]`` are None (nothing precedes it)."""

    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]
    """Per token, the ``num_top`` most likely ``(token id, log-prob)`` at its position."""


def _head_logits(model, ids: Sequence[int], exit_depth: int | None) -> torch.Tensor:
    """``[s, V]`` float32 logits of one prompt from the final head or the exit at a depth."""
    device = next(model.parameters()).device
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=device)  # [1, s]
    s = tokens.shape[1]
    positions = torch.arange(s, device=device).unsqueeze(0)  # [1, s]
    mask = torch.ones(1, 1, s, s, dtype=torch.bool, device=device).triu(1)  # True: masked
    wanted = () if exit_depth is None else (exit_depth,)
    # The whole forward also for an exit: the shortcut that stops after the exits
    # (stop_after_exits) does not gather exit logits over tensor parallelism.
    final, exits = model(tokens, positions, mask, runtime_gather_output=True, exit_depths=wanted)
    logits = final if exit_depth is None else exits[exit_depth]
    return logits[0].float()  # [1, s, V] -> [s, V]


@torch.no_grad()
def score_prompts(
    model,
    prompts: Sequence[Sequence[int]],
    exit_depth: int | None = None,
    num_top: int = 0,
) -> list[TokenScores]:
    """Scores of every prompt's tokens by the final head (``exit_depth=None``) or an exit."""
    if model.config.pipeline_model_parallel_size != 1:
        raise ValueError("prompt scoring needs pipeline_model_parallel_size=1")
    if exit_depth is not None and exit_depth not in {e.depth for e in model.config.exit_heads}:
        raise ValueError(f"no exit at depth {exit_depth}")
    was_training = model.training
    model.eval()
    out = []
    try:
        for ids in prompts:
            if not ids:
                raise ValueError("cannot score an empty prompt")
            logprobs = torch.log_softmax(_head_logits(model, ids, exit_depth), dim=-1)  # [s, V]
            targets = torch.tensor(list(ids[1:]), dtype=torch.long, device=logprobs.device)
            chosen = logprobs[:-1].gather(1, targets.unsqueeze(1)).squeeze(1)  # [s - 1]
            top: list[list[tuple[int, float]] | None] = [None]
            if num_top > 0:
                values, indices = logprobs[:-1].topk(min(num_top, logprobs.shape[-1]), dim=-1)
                top += [
                    list(zip(row_ids, row_values))
                    for row_ids, row_values in zip(indices.tolist(), values.tolist())
                ]
            else:
                top += [[] for _ in range(len(ids) - 1)]
            out.append(TokenScores([None, *chosen.tolist()], top))
    finally:
        model.train(was_training)
    return out
