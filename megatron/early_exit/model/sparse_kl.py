"""Sparse distillation KL for EE-Tuning: exit logits only on the teacher's top-k tokens.

The dense term (``losses.vocab_parallel_kl_divergence``) needs the exit's logits on the whole
vocabulary: ``N * V * h`` multiply-adds forward and twice that backward, per exit (for
SmolLM2-135M, ``V * h`` = 28M per token, 3.6 backbone layers). Here the exit projects only onto
the rows of the output weight that the loss reads:

* the teacher's (final head's) top-``k`` tokens of each position, ``ids[N, k]`` with their
  log-probabilities under the *full* teacher softmax (:func:`teacher_top_k`), and
* optionally ``m`` token ids drawn uniformly from the vocabulary, shared by the batch, that
  estimate the student's probability mass outside each row's top-k.

One projection onto the union of those rows (``states @ W[union].T``, ``N * |union| * h``), then
per row the KL between two distributions over ``k + 1`` outcomes, the top-k tokens and a "rest"
bucket::

    KL_k = sum_{v in top-k} p_v log(p_v / q_v) + p_rest log(p_rest / q_rest)

    q_v = exp(z_v) / (Z_top + Z_rest),  q_rest = Z_rest / (Z_top + Z_rest),
    Z_top = sum_{v in top-k} exp(z_v),  Z_rest ~ V / m * sum_{j in sample, j not in top-k} exp(z_j)

``Z_rest``'s estimator is unbiased (uniform sampling with replacement); ``log`` of it is not, so the
loss is an approximation whose error falls with ``k`` and ``m`` (``tests/unit/test_sparse_kl.py``
reports it). Exact cases: with the rest's mass computed exactly, ``KL_k`` is the KL of the
coarsened distributions, a lower bound of the dense KL (data processing); with ``k = V`` there is
no rest and ``KL_k`` *is* the dense KL (tested to 1e-6, gradients too). With ``m = 0`` the rest
bucket is dropped and both distributions are renormalised over the top-k (a truncated KL).

Gradients flow through autograd to the exit's states and to the gathered rows of the output weight
(a scatter-add into its gradient); the teacher gets none. The student is ``z / temperature``, as in
the dense term.

Tensor parallelism: the gather needs the full ``[V, h]`` output weight, so under TP > 1 (a
vocab-sharded weight) :func:`sparse_exit_kl` refuses with an error. A vocab-parallel version would
gather on each rank the union rows it owns and all-reduce ``Z_top``/``Z_rest`` (two ``[N]`` sums),
like the dense term's softmax normaliser.

Wiring into the training objective (``exit_kl_weight``) is not done here: the exit's cross entropy
on labels still needs the dense logits, so the sparse KL saves time only for a distillation-only
objective (``CE`` weight 0) or with cached teacher top-k (see ``docs/design/``).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state


def teacher_top_k(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids[N, k], log_probs[N, k])``: the teacher's ``k`` most probable tokens per row and
    their float32 log-probabilities under the full softmax, from ``teacher_logits[N, V]``."""
    if teacher_logits.dim() != 2:
        raise ValueError(f"teacher_logits must be [N, V], got {tuple(teacher_logits.shape)}")
    if not 1 <= k <= teacher_logits.shape[-1]:
        raise ValueError(f"k must be in [1, {teacher_logits.shape[-1]}], got {k}")
    with torch.no_grad():
        log_probs = torch.log_softmax(teacher_logits.float(), dim=-1)
        values, ids = log_probs.topk(k, dim=-1)
    return ids, values


def _check(states, output_weight, teacher_ids, teacher_log_probs) -> None:
    if parallel_state.model_parallel_is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp > 1:
            raise ValueError(
                f"sparse_exit_kl needs the full output weight; tensor parallel size is {tp} "
                "(vocab-sharded weight): use the dense KL under TP > 1"
            )
    if states.dim() != 2 or output_weight.dim() != 2 or states.shape[1] != output_weight.shape[1]:
        raise ValueError(
            f"states [N, h] and output_weight [V, h] expected, got {tuple(states.shape)} and "
            f"{tuple(output_weight.shape)}"
        )
    if teacher_ids.shape != teacher_log_probs.shape or teacher_ids.shape[0] != states.shape[0]:
        raise ValueError(
            f"teacher ids and log_probs must both be [{states.shape[0]}, k], got "
            f"{tuple(teacher_ids.shape)} and {tuple(teacher_log_probs.shape)}"
        )
    vocab_size = output_weight.shape[0]
    if teacher_ids.numel() and (int(teacher_ids.min()) < 0 or int(teacher_ids.max()) >= vocab_size):
        raise ValueError(f"teacher ids must lie in [0, {vocab_size}) (the output weight's rows)")


def sparse_exit_kl(
    states: torch.Tensor,
    output_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    num_sampled: int = 0,
    *,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-row ``KL(teacher || softmax(exit logits / temperature))`` over the teacher's top-k
    plus a rest bucket (see the module docstring): ``[N]`` float32, differentiable in ``states``
    ``[N, h]`` and ``output_weight`` ``[V, h]``.

    Args:
        teacher_ids, teacher_log_probs: ``[N, k]`` from :func:`teacher_top_k` (distinct ids per
            row, log-probabilities under the full teacher softmax).
        num_sampled: ``m`` uniform vocabulary samples estimating the student's rest mass; 0
            drops the rest bucket (both distributions renormalised over the top-k).
    """
    _check(states, output_weight, teacher_ids, teacher_log_probs)
    if num_sampled < 0:
        raise ValueError(f"num_sampled must be >= 0, got {num_sampled}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab_size = output_weight.shape[0]
    num_rows, k = teacher_ids.shape
    sampled = torch.randint(0, vocab_size, (num_sampled,), generator=generator)
    # One projection onto every row the loss reads.
    union, inverse = torch.unique(torch.cat([teacher_ids.flatten(), sampled]), return_inverse=True)
    logits = (states @ output_weight[union].t()).float() / temperature  # [N, |union|]
    top_logits = logits.gather(1, inverse[: num_rows * k].view(num_rows, k))  # [N, k]
    p = teacher_log_probs.float().exp()
    shift = top_logits.detach().amax(dim=-1, keepdim=True)  # [N, 1]
    z_top = (top_logits - shift).exp().sum(dim=-1)  # [N]
    if num_sampled == 0:
        log_q = top_logits - shift - z_top.log().unsqueeze(-1)
        p_top = p / p.sum(dim=-1, keepdim=True)
        return (torch.xlogy(p_top, p_top) - p_top * log_q).sum(dim=-1)
    sample_logits = logits[:, inverse[num_rows * k :]]  # [N, m]
    # A sample counts for the rest of a row only if it is not among the row's top-k.
    outside = (sampled.unsqueeze(0).unsqueeze(-1) != teacher_ids.unsqueeze(1)).all(dim=-1)  # [N, m]
    z_rest = vocab_size / num_sampled * ((sample_logits - shift).exp() * outside).sum(dim=-1)  # [N]
    log_z = (z_top + z_rest).log().unsqueeze(-1)
    log_q = top_logits - shift - log_z  # [N, k]
    p_rest = (1.0 - p.double().sum(dim=-1)).clamp_min(0.0).float()  # [N]
    if k == vocab_size:
        p_rest = torch.zeros_like(p_rest)  # nothing outside the top-k: rounding, not mass
    log_q_rest = z_rest.clamp_min(torch.finfo(torch.float32).tiny).log() - log_z.squeeze(-1)
    top_term = (torch.xlogy(p, p) - p * log_q).sum(dim=-1)
    rest_term = torch.where(p_rest > 0, torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest, 0.0)
    return top_term + rest_term
