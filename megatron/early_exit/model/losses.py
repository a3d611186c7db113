"""Exit loss weights and the weighted total loss.

For one microbatch with token mask ``m``::

    total = [include_final] * L_final + sum_i w_i(t) * L_i,   L = sum(m * loss) / sum(m)

where ``w_i(t)`` moves from the exit's ``loss_weight_init`` to its ``loss_weight`` over
``exit_loss_weight_warmup_iters`` iterations (``r = t / T``)::

    linear: w = init + r * (target - init)
    cosine: w = init + (target - init) * (1 - cos(pi * r)) / 2

and stays at the target for ``t >= T`` (also when a run starts past the warm-up). ``init > target``
gives a decreasing ("cool-down") schedule. ``t`` is the number of completed iterations.

Learning from the final head. Exit ``i`` can add two terms computed from the final head's logits
``z_f`` of the same tokens (detached, the teacher) to its per-token loss, both trained with the
exit's weight ``w_i``::

    L_i = mean_m[ CE(z_i / T_i) ] + W * mean_m[ KL(softmax(z_f) || softmax(z_i / T_i)) ]
          + c * mean_m[ BCE(sigmoid(g_i), [argmax z_i == argmax z_f]) ]

``W`` is ``exit_kl_weight`` (distillation), ``c`` is ``exit_confidence_loss_weight`` and ``g_i``
the exit's confidence head (on the exit's detached state, so only the head learns from the BCE).
The student is the distribution the exit's cross entropy sees (``z_i / T_i``); the teacher is the
final head at temperature 1, the distribution whose top-1 token an early exit stands in for.
``CE + W * KL`` rather than ``(1 - W) * CE + W * KL``: W = 0 is then the old objective exactly, W
is not bounded by 1, and the label term keeps its scale whatever W is. The KL and BCE terms are
attached to the per-token CE with :class:`AttachAuxiliaryLoss`, so the per-token loss an exit
reports (and its perplexity) stays its cross entropy; the model hands the terms out separately
(``PendingExit.components``). Riding on ``L_i`` they follow the exit's weight and warm-up (an
exit at weight 0 trains neither) and need nothing from the pipeline executor.

Everything is vocab-parallel: logits are ``[s, b, v/tp]`` shards and softmax normalisers, KL sums
and argmaxes are reduced over the tensor-parallel group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


def _tp_group_to_reduce(tp_group):
    """The TP group to reduce over, or None when there is nothing to reduce."""
    if tp_group is None and parallel_state.model_parallel_is_initialized():
        tp_group = parallel_state.get_tensor_model_parallel_group()
    reduce = (
        tp_group is not None
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size(tp_group) > 1
    )
    return tp_group if reduce else None


@torch.no_grad()
def vocab_parallel_max_prob(logits: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Max softmax probability per position of vocab-sharded logits ``[s, b, v/tp]``.

    Used (under stop-gradient) as the token-wise dynamic exit loss weight.
    """
    tp_group = _tp_group_to_reduce(tp_group)
    reduce = tp_group is not None
    logits = logits.float()
    max_logit = logits.max(dim=-1).values
    if reduce:
        torch.distributed.all_reduce(max_logit, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    sum_exp = torch.exp(logits - max_logit.unsqueeze(-1)).sum(dim=-1)
    if reduce:
        torch.distributed.all_reduce(sum_exp, group=tp_group)
    return 1.0 / sum_exp  # exp(max - logsumexp)


@torch.no_grad()
def vocab_parallel_log_softmax(logits: torch.Tensor, tp_group=None) -> torch.Tensor:
    """float32 log-softmax over the full vocabulary of vocab-sharded logits ``[s, b, v/tp]``
    (this rank's shard of the result). No gradient."""
    tp_group = _tp_group_to_reduce(tp_group)
    logits = logits.float()
    max_logit = logits.max(dim=-1, keepdim=True).values
    if tp_group is not None:
        torch.distributed.all_reduce(max_logit, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    shifted = logits - max_logit
    sum_exp = shifted.exp().sum(dim=-1, keepdim=True)
    if tp_group is not None:
        torch.distributed.all_reduce(sum_exp, group=tp_group)
    return shifted.sub_(sum_exp.log_())


@torch.no_grad()
def vocab_parallel_argmax(logits: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Global top-1 token ``[s, b]`` (int64) of vocab-sharded logits ``[s, b, v/tp]``.

    Ties go to the smallest vocabulary index, as ``torch.argmax`` does on the full vocabulary, so
    every TP layout picks the same token: each rank offers its first maximum, the group agrees on
    the maximum value (MAX all-reduce), then on the smallest index holding it (MIN all-reduce).
    """
    tp_group = _tp_group_to_reduce(tp_group)
    values, index = logits.float().max(dim=-1)
    if tp_group is None:
        return index
    index += torch.distributed.get_rank(tp_group) * logits.shape[-1]
    best = values.clone()
    torch.distributed.all_reduce(best, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    no_candidate = torch.full_like(index, torch.iinfo(index.dtype).max)
    index = torch.where(values == best, index, no_candidate)
    torch.distributed.all_reduce(index, op=torch.distributed.ReduceOp.MIN, group=tp_group)
    return index


@dataclass
class FinalHeadTargets:
    """What exits learn from the final head's logits of one microbatch (no gradient)."""

    log_probs: torch.Tensor | None = None
    """``[s, b, v/tp]`` float32 log-softmax of the final logits (distillation teacher)."""

    top1: torch.Tensor | None = None
    """``[s, b]`` global top-1 token of the final logits (confidence-head targets)."""


@torch.no_grad()
def final_head_targets(
    final_logits: torch.Tensor, *, log_probs: bool, top1: bool, tp_group=None
) -> FinalHeadTargets:
    """The parts of :class:`FinalHeadTargets` asked for, from vocab-sharded ``[s, b, v/tp]``
    final logits (read before megatron's cross entropy, which overwrites fp32 logits)."""
    return FinalHeadTargets(
        log_probs=vocab_parallel_log_softmax(final_logits, tp_group) if log_probs else None,
        top1=vocab_parallel_argmax(final_logits, tp_group) if top1 else None,
    )


class VocabParallelKLDivergence(torch.autograd.Function):
    """Per-token ``KL(p || q)`` of a teacher ``p`` and the softmax ``q`` of student logits, both
    vocab-sharded ``[s, b, v/tp]``; the result ``[s, b]`` is all-reduced over TP (replicated).

    ``apply(teacher_log_probs, student_logits, tp_group)``; ``teacher_log_probs`` get no
    gradient. Gradient identity: ``d KL / d z_v = q_v - p_v``. The upstream gradient of the
    replicated result is the same on every TP rank, so each rank computes exactly its vocab
    shard of the single-process gradient and backward needs no communication. Saves ``q``
    (one ``[s, b, v/tp]`` float32 tensor per exit, like megatron's vocab-parallel cross entropy)
    and references the teacher's log-probabilities, shared by every exit of the microbatch.
    """

    @staticmethod
    def forward(ctx, teacher_log_probs, student_logits, tp_group):
        assert teacher_log_probs.shape == student_logits.shape, (
            teacher_log_probs.shape,
            student_logits.shape,
        )
        log_q = vocab_parallel_log_softmax(student_logits, tp_group)
        kl = (teacher_log_probs.exp() * (teacher_log_probs - log_q)).sum(dim=-1)
        tp_group = _tp_group_to_reduce(tp_group)
        if tp_group is not None:
            torch.distributed.all_reduce(kl, group=tp_group)
        ctx.save_for_backward(log_q.exp_(), teacher_log_probs)
        ctx.logits_dtype = student_logits.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        q, teacher_log_probs = ctx.saved_tensors
        grad = q.sub_(teacher_log_probs.exp()).mul_(grad_kl.unsqueeze(-1))
        return None, grad.to(ctx.logits_dtype), None


def vocab_parallel_kl_divergence(
    teacher_log_probs: torch.Tensor, student_logits: torch.Tensor, tp_group=None
) -> torch.Tensor:
    """Per-token ``KL(teacher || softmax(student_logits))`` ``[s, b]``; see
    :class:`VocabParallelKLDivergence`."""
    return VocabParallelKLDivergence.apply(teacher_log_probs, student_logits, tp_group)


def confidence_loss(
    confidence_logits: torch.Tensor, exit_top1: torch.Tensor, final_top1: torch.Tensor
) -> torch.Tensor:
    """Per-token binary cross entropy of a confidence head: its logit against the target
    ``1[exit top-1 == final top-1]``. All ``[s, b]``; float32."""
    target = (exit_top1 == final_top1).float()
    return F.binary_cross_entropy_with_logits(confidence_logits.float(), target, reduction="none")


class AttachAuxiliaryLoss(torch.autograd.Function):
    """``y = apply(main, aux)``: ``main``'s value, bit for bit, with ``aux``'s gradient.

    Gradient identity: ``dy/dmain = dy/daux = I`` (same shapes), so for the per-token losses the
    executor reduces with a weighted masked mean, which is linear in ``y``, backpropagating
    ``y`` trains exactly like ``main + aux`` while ``main`` is what is reported. The analogue of
    megatron-core's ``MTPLossAutoScaler``, without its global scale.
    """

    @staticmethod
    def forward(ctx, main, aux):
        assert main.shape == aux.shape, (main.shape, aux.shape)
        return main.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, grad


def attach_auxiliary_loss(main: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """See :class:`AttachAuxiliaryLoss`."""
    return AttachAuxiliaryLoss.apply(main, aux)
