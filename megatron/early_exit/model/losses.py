"""Exit loss weights and the weighted total loss.

For one microbatch with token mask ``m``::

    total = [include_final] * L_final + sum_i w_i(t) * L_i,   L = sum(m * loss) / sum(m)

where ``w_i(t)`` moves from the exit's ``loss_weight_init`` to its ``loss_weight`` over
``exit_loss_weight_warmup_iters`` iterations (``r = t / T``)::

    linear: w = init + r * (target - init)
    cosine: w = init + (target - init) * (1 - cos(pi * r)) / 2

and stays at the target for ``t >= T`` (also when a run starts past the warm-up). ``init > target``
gives a decreasing ("cool-down") schedule. ``t`` is the number of completed iterations.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state

from megatron.early_exit.config import EarlyExitTransformerConfig, ExitHeadConfig


def exit_loss_weight(
    exit_head: ExitHeadConfig, iteration: int, warmup_iters: int, style: str = "linear"
) -> float:
    """Weight of one exit's loss after ``iteration`` completed iterations."""
    if iteration < 0:
        raise ValueError(f"iteration: must be >= 0, got {iteration}")
    if warmup_iters <= 0 or iteration >= warmup_iters:
        return float(exit_head.loss_weight)
    progress = iteration / warmup_iters
    delta = exit_head.loss_weight - exit_head.loss_weight_init
    if style == "linear":
        return exit_head.loss_weight_init + progress * delta
    if style == "cosine":
        return exit_head.loss_weight_init + delta * (1.0 - math.cos(math.pi * progress)) / 2.0
    raise ValueError(f"exit_loss_weight_warmup_style: unknown value {style!r}")


def exit_loss_weights(config: EarlyExitTransformerConfig, iteration: int) -> dict[int, float]:
    """Every exit's weight after ``iteration`` completed iterations, keyed by exit depth."""
    return {
        exit_head.depth: exit_loss_weight(
            exit_head,
            iteration,
            config.exit_loss_weight_warmup_iters,
            config.exit_loss_weight_warmup_style,
        )
        for exit_head in config.exit_heads
    }


def masked_mean(per_token_loss: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of a ``[b, s]`` per-token loss over the tokens the mask keeps."""
    if loss_mask is None:
        return per_token_loss.float().mean()
    loss_mask = loss_mask.float()
    return (per_token_loss.float() * loss_mask).sum() / loss_mask.sum().clamp_min(1.0)


def weighted_total_loss(
    final_loss: torch.Tensor | None,
    exit_losses: dict[int, torch.Tensor],
    weights: dict[int, float],
    include_final_loss: bool = True,
) -> torch.Tensor:
    """``include_final * final + sum_i w_i * exit_i`` over the scalar losses given."""
    terms = []
    if include_final_loss and final_loss is not None:
        terms.append(final_loss)
    for depth, loss in exit_losses.items():
        terms.append(weights[depth] * loss)
    if not terms:
        raise ValueError("no loss terms: no final loss and no exit losses")
    return torch.stack([t.float() for t in terms]).sum()


@torch.no_grad()
def vocab_parallel_max_prob(logits: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Max softmax probability per position of vocab-sharded logits ``[s, b, v/tp]``.

    Used (under stop-gradient) as the token-wise dynamic exit loss weight.
    """
    if tp_group is None and parallel_state.model_parallel_is_initialized():
        tp_group = parallel_state.get_tensor_model_parallel_group()
    reduce = (
        tp_group is not None
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size(tp_group) > 1
    )
    logits = logits.float()
    max_logit = logits.max(dim=-1).values
    if reduce:
        torch.distributed.all_reduce(max_logit, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    sum_exp = torch.exp(logits - max_logit.unsqueeze(-1)).sum(dim=-1)
    if reduce:
        torch.distributed.all_reduce(sum_exp, group=tp_group)
    return 1.0 / sum_exp  # exp(max - logsumexp)
