"""Shortlist exit decisions (SpecEE-style): decide at an exit from a few candidate tokens.

At an exit, the full decision projects the exit's state onto all ``V`` rows of the output
weight (``V * h`` multiply-adds: 28M for SmolLM2's 49152 x 576, about 3.6 layers of the
135M model) only to read off one token and one confidence. A shortlist decision projects onto
``k`` candidate rows per sequence (for example the final head's top-k tokens of the previous
step), ``k * h`` multiply-adds plus a gather of ``k`` rows, and the full projection runs only at
the exit actually taken (or not at all, if the caller trusts the shortlist's token).

Pure functions: states, weight and candidates in, logits, tokens and decisions out.

When the decision equals the full projection's (the contract the tests check):

* **Token**: the shortlist's top token is the full projection's top token whenever the latter is
  in the row's shortlist (a maximum over a subset that contains the overall maximum), up to
  exact ties.
* **Exit / no exit**:

  - ``"learned"`` (the exit's confidence head, a function of the state only): identical, always.
  - ``"max_prob"`` and ``"margin"`` over the shortlist's softmax: the shortlist's normaliser
    ``sum_{v in S} exp(z_v)`` is at most the full ``sum_v exp(z_v)``, so with the full top token
    in the shortlist the shortlist confidence is an *upper bound* of the full one. A "do not
    exit" is therefore always the full projection's decision too; an "exit" is the full one's
    unless the mass outside the shortlist pushes the full confidence below the threshold. The
    two differ by the missing mass (:func:`shortlist_confidence` reports the bound), which is
    small when the shortlist holds the distribution's head; a lower bound on the full
    confidence needs the largest logit outside the shortlist, i.e. the full projection.
  - ``"entropy"`` is not offered: the entropy of a renormalised shortlist bounds nothing.

* When the full top token is *not* in the shortlist, the shortlist returns the best candidate (a
  different token) and its max-prob confidence may still be high: shortlist decisions are only
  as good as the shortlist's recall, which the caller measures (the previous step's top-k of the
  final head is the SpecEE choice).

Tensor parallelism: the function needs the full ``[V, h]`` weight (TP=1, or a gathered weight);
under TP>1 the candidate rows live on different ranks and an all-gather of ``k`` logits per rank
would be needed. Candidate ids outside the weight's rows are refused with an error naming them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SHORTLIST_MEASURES = ("max_prob", "margin", "learned")


def _check(states: torch.Tensor, output_weight: torch.Tensor, candidates: torch.Tensor) -> None:
    if states.dim() != 2:
        raise ValueError(f"states must be [b, h], got {tuple(states.shape)}")
    if output_weight.dim() != 2 or output_weight.shape[1] != states.shape[1]:
        raise ValueError(
            f"output_weight must be [V, {states.shape[1]}], got {tuple(output_weight.shape)}"
        )
    if candidates.dim() != 2 or candidates.shape[0] != states.shape[0] or candidates.shape[1] < 1:
        raise ValueError(
            f"candidates must be [{states.shape[0]}, k >= 1] token ids, got "
            f"{tuple(candidates.shape)}"
        )
    if candidates.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"candidates must be integer token ids, got {candidates.dtype}")
    vocab_size = output_weight.shape[0]
    bad = candidates[(candidates < 0) | (candidates >= vocab_size)]
    if bad.numel():
        raise ValueError(
            f"candidate ids {bad.unique().tolist()[:8]} are outside the output weight's "
            f"{vocab_size} rows (a vocab-parallel shard? shortlist decisions need the full weight)"
        )


def shortlist_logits(
    states: torch.Tensor, output_weight: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """Logits of the candidate tokens only: ``states[b, h]``, ``output_weight[V, h]``,
    ``candidates[b, k]`` -> ``[b, k]`` (``z[i, j] = states[i] . output_weight[candidates[i, j]]``).

    The rows are gathered (``k * h`` reads) and multiplied as one batched matrix-vector product.
    """
    _check(states, output_weight, candidates)
    rows = output_weight[candidates]  # [b, k, h]
    return torch.bmm(rows, states.unsqueeze(-1)).squeeze(-1)  # [b, k]


@dataclass
class ShortlistDecision:
    """One exit's shortlist decision for a batch of rows."""

    token: torch.Tensor
    """``LongTensor[b]``: the best candidate's token id."""
    confidence: torch.Tensor
    """``[b]`` float32 confidence under the measure (an upper bound of the full one for
    ``max_prob``/``margin`` when the full top token is in the shortlist)."""
    exit_mask: torch.Tensor
    """``BoolTensor[b]``: confidence ``>= threshold``."""
    logits: torch.Tensor
    """``[b, k]`` the candidates' logits."""


def shortlist_confidence(logits: torch.Tensor, measure: str = "max_prob") -> torch.Tensor:
    """``max_prob`` or ``margin`` of the softmax over the shortlist ``[b, k] -> [b]``."""
    if measure not in ("max_prob", "margin"):
        raise ValueError(f"measure must be 'max_prob' or 'margin' on shortlist logits: {measure!r}")
    probs = torch.softmax(logits.float(), dim=-1)
    if measure == "max_prob" or probs.shape[-1] == 1:
        return probs.amax(dim=-1)
    top2 = probs.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def shortlist_decide(
    states: torch.Tensor,
    output_weight: torch.Tensor,
    candidates: torch.Tensor,
    threshold: float,
    measure: str = "max_prob",
    learned_confidence: torch.Tensor | None = None,
) -> ShortlistDecision:
    """The exit decision from a shortlist (see the module docstring for when it equals the full
    projection's).

    Args:
        states: ``[b, h]`` the exit's state after its transform (what ``ExitHead.project``
            reads), at the current position of each row.
        output_weight: ``[V, h]`` the exit's output weight (the word embedding when tied).
        candidates: ``[b, k]`` distinct candidate token ids per row.
        threshold: exit iff confidence ``>= threshold`` (``ExitPolicy`` semantics).
        measure: ``"max_prob"``, ``"margin"`` (over the shortlist) or ``"learned"``.
        learned_confidence: ``[b]`` the exit's confidence head output (``ExitHead.confidence``);
            required for ``"learned"``.
    """
    if measure not in SHORTLIST_MEASURES:
        raise ValueError(f"measure must be one of {SHORTLIST_MEASURES}, got {measure!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    logits = shortlist_logits(states, output_weight, candidates)
    token = candidates.gather(1, logits.argmax(dim=-1, keepdim=True)).squeeze(1).long()
    if measure == "learned":
        if learned_confidence is None or learned_confidence.shape != (states.shape[0],):
            raise ValueError(f"measure 'learned' needs learned_confidence [{states.shape[0]}]")
        confidence = learned_confidence.float()
    else:
        confidence = shortlist_confidence(logits, measure)
    return ShortlistDecision(token, confidence, confidence >= threshold, logits)


def previous_top_k(final_logits: torch.Tensor, k: int) -> torch.Tensor:
    """The SpecEE shortlist: the ``k`` highest-scoring tokens of the final head's logits
    ``[b, V]`` at the previous step -> ``[b, k]`` ids (distinct)."""
    if final_logits.dim() != 2:
        raise ValueError(f"final_logits must be [b, V], got {tuple(final_logits.shape)}")
    if not 1 <= k <= final_logits.shape[-1]:
        raise ValueError(f"k must be in [1, {final_logits.shape[-1]}], got {k}")
    return final_logits.topk(k, dim=-1).indices
