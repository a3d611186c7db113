"""The early-exit decision: pure functions of exit logits and request settings.

Every function here works on a batch of logits for the *current* position of each sequence,
``logits[b, V]``, and decides per sequence (row). The original EE-LLM decided for the whole batch
from its last row; here each row exits on its own confidence.

Confidence is always computed in float32 on *untempered* logits, whatever sampling temperature the
request uses, so the decision does not change with the sampling settings.

Confidence measures (all in [0, 1], higher means more confident):

* ``"max_prob"`` (default, as EE-LLM): the largest softmax probability.
* ``"margin"``: top-1 probability minus top-2 probability (the top-1 probability when ``V == 1``).
* ``"entropy"``: ``1 - H(p) / log(V)``, where ``H`` is the Shannon entropy in nats and ``V`` is the
  full last dimension of the logits (padded vocabulary entries included). 1 for a one-hot
  distribution, 0 for the uniform one.
* ``"learned"``: the probability, predicted by the exit's small confidence head from its hidden
  state, that the exit's top-1 token is the final head's (``--exit-confidence-head``). It needs
  no vocabulary projection, so deciding not to exit costs a fraction of a layer; the engine
  computes it (``ExitView.confidence``), and :func:`exit_mask` takes the values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

CONFIDENCE_MEASURES = ("max_prob", "margin", "entropy", "learned")
LOGIT_MEASURES = ("max_prob", "margin", "entropy")
"""The measures that are functions of the exit's logits."""
DEFAULT_CONFIDENCE_MEASURE = "max_prob"
# The original server defaulted to 40.0, a threshold no probability reaches (early exit silently
# off). 0.8 is a value that does exit on confident tokens, in the middle of the 0.6-0.9 range where
# the paper's quality/speed curves trade little quality for a clear speedup.
DEFAULT_EARLY_EXIT_THRESHOLD = 0.8


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [batch, vocab], got {tuple(logits.shape)}")
    if logits.shape[-1] < 1:
        raise ValueError("logits must have a non-empty vocabulary dimension")


def max_prob_confidence(logits: torch.Tensor) -> torch.Tensor:
    """Largest softmax probability of each row: ``[b, V] -> [b]`` (float32)."""
    _check_logits(logits)
    return torch.softmax(logits.float(), dim=-1).amax(dim=-1)


def margin_confidence(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 softmax probability of each row: ``[b, V] -> [b]`` (float32)."""
    _check_logits(logits)
    probs = torch.softmax(logits.float(), dim=-1)
    if probs.shape[-1] == 1:
        return probs[:, 0]
    top2 = probs.topk(2, dim=-1).values  # [b, 2]
    return top2[:, 0] - top2[:, 1]


def entropy_confidence(logits: torch.Tensor) -> torch.Tensor:
    """``1 - H(p) / log(V)`` of each row, clamped to [0, 1]: ``[b, V] -> [b]`` (float32)."""
    _check_logits(logits)
    vocab_size = logits.shape[-1]
    if vocab_size == 1:
        return torch.ones(logits.shape[0], dtype=torch.float32, device=logits.device)
    probs = torch.softmax(logits.float(), dim=-1)
    entropy = torch.special.entr(probs).sum(dim=-1)  # entr(0) = 0, no NaN for masked entries
    return (1.0 - entropy / math.log(vocab_size)).clamp(0.0, 1.0)


_MEASURES = {
    "max_prob": max_prob_confidence,
    "margin": margin_confidence,
    "entropy": entropy_confidence,
}


def confidence(logits: torch.Tensor, measure: str = DEFAULT_CONFIDENCE_MEASURE) -> torch.Tensor:
    """Confidence ``[b]`` (float32) of each row under ``measure`` (see ``CONFIDENCE_MEASURES``)."""
    if measure not in _MEASURES:
        raise ValueError(
            f"measure must be one of {LOGIT_MEASURES} to be computed from logits, got {measure!r}"
        )
    return _MEASURES[measure](logits)


def top_prediction(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top token id and its softmax probability per row (for ``print_max_prob`` style logging)."""
    _check_logits(logits)
    probs, tokens = torch.softmax(logits.float(), dim=-1).max(dim=-1)
    return tokens, probs


def _normalise_depths(depths: Iterable[int] | None) -> frozenset[int] | None:
    if depths is None:
        return None
    depths = frozenset(depths)
    for depth in depths:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"exit depths must be positive integers, got {depth!r}")
    return depths or None


@dataclass(frozen=True)
class ExitPolicy:
    """Request-level early-exit settings.

    ``threshold`` is compared with ``confidence(logits, measure)``; a row exits at an enabled exit
    iff its confidence is ``>= threshold``. Threshold 0 exits every row at the first enabled exit.
    Threshold 1.0 with ``"max_prob"`` exits only where the float32 softmax rounds to exactly 1.0
    (a top logit ~17 nats or more above all others), so in practice 1.0 almost never exits.
    """

    threshold: float = DEFAULT_EARLY_EXIT_THRESHOLD
    """Confidence threshold in [0, 1]."""
    measure: str = DEFAULT_CONFIDENCE_MEASURE
    """Confidence measure, one of ``CONFIDENCE_MEASURES``."""
    depths: frozenset[int] | None = None
    """Depths of the exits allowed to fire; None (or empty) allows all exits. (The API calls
    this field ``exit_layers``; ``server/protocol.py`` maps it.)"""

    def __post_init__(self) -> None:
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise ValueError(f"threshold must be a number, got {threshold!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if self.measure not in CONFIDENCE_MEASURES:
            raise ValueError(f"measure must be one of {CONFIDENCE_MEASURES}, got {self.measure!r}")
        object.__setattr__(self, "threshold", float(threshold))
        object.__setattr__(self, "depths", _normalise_depths(self.depths))

    def allows(self, depth: int) -> bool:
        """Whether the exit at ``depth`` may fire under this policy."""
        return self.depths is None or depth in self.depths

    def check_model_exits(self, model_depths: Iterable[int]) -> None:
        """Raise ``ValueError`` if the policy names exits the model does not have."""
        if self.depths is None:
            return
        unknown = sorted(self.depths - set(model_depths))
        if unknown:
            raise ValueError(
                f"exit layers {unknown} are not exits of this model "
                f"(model exits: {sorted(model_depths)})"
            )


def should_exit(
    depth: int,
    logits: torch.Tensor,
    policy: ExitPolicy,
    active_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row exit decision at the exit at ``depth``: ``BoolTensor[b]``.

    Args:
        depth: the exit's depth (backbone layers below it).
        logits: ``[b, V]`` exit logits at the current position of each row (untempered).
        policy: the request's settings.
        active_mask: ``BoolTensor[b]``; rows with False (finished, or already exited at an earlier
            exit this step) never exit. None means all rows are active.
    """
    _check_logits(logits)
    if policy.threshold <= 0.0 or not policy.allows(depth):
        values = torch.zeros(logits.shape[0])  # not needed: the mask is decided without it
    else:
        values = confidence(logits, policy.measure)
    return exit_mask(depth, values, policy, active_mask)


def exit_mask(
    depth: int,
    confidence_values: torch.Tensor,
    policy: ExitPolicy,
    active_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row exit decision from precomputed confidences ``[b]`` (any measure, e.g.
    ``"learned"``): ``BoolTensor[b]``; see :func:`should_exit` for the other arguments."""
    batch_size = confidence_values.shape[0]
    if active_mask is None:
        active_mask = torch.ones(batch_size, dtype=torch.bool)
    if active_mask.shape != (batch_size,):
        raise ValueError(f"active_mask must have shape [{batch_size}], got {active_mask.shape}")
    active_mask = active_mask.bool().cpu()
    if not policy.allows(depth):
        return torch.zeros_like(active_mask)
    if policy.threshold <= 0.0:
        return active_mask.clone()
    return (confidence_values.float().cpu() >= policy.threshold) & active_mask


class FirstExit(NamedTuple):
    """Which exit produced each row's token in one step."""

    depth: torch.Tensor
    """``LongTensor[b]``: the depth of the first exit that fired, or ``final_depth``."""
    index: torch.Tensor
    """``LongTensor[b]``: its position in the exit list; ``len(depths)`` for the final head."""


def first_exit(depths: Sequence[int], fired: Sequence[torch.Tensor], final_depth: int) -> FirstExit:
    """Apply "first qualifying exit wins" to each row, vectorised.

    Args:
        depths: depths of the exits reached this step, in increasing order.
        fired: one ``BoolTensor[b]`` per exit in ``depths`` (e.g. from ``should_exit``).
        final_depth: the model's number of layers, reported for rows that no exit took.
    """
    if len(depths) != len(fired):
        raise ValueError(f"got {len(fired)} fired masks for {len(depths)} exits")
    if list(depths) != sorted(set(depths)):
        raise ValueError(f"exit depths must be strictly increasing, got {list(depths)}")
    if not fired:
        raise ValueError("first_exit needs at least one exit; use the final head directly")
    device = fired[0].device
    always = torch.ones_like(fired[0], dtype=torch.bool)
    stacked = torch.stack([*fired, always]).to(torch.uint8)  # [num_exits + 1, b]
    index = stacked.argmax(dim=0)  # argmax returns the first maximum: the earliest exit
    all_depths = torch.tensor([*depths, final_depth], dtype=torch.long, device=device)
    return FirstExit(depth=all_depths[index], index=index)


def decide_step(
    exit_logits: Sequence[tuple[int, torch.Tensor]],
    policy: ExitPolicy,
    final_depth: int,
    active_mask: torch.Tensor | None = None,
) -> FirstExit:
    """Decide one step from all exits' logits, in order; a row exits at most once.

    ``exit_logits`` holds ``(depth, logits[b, V])`` pairs in increasing depth. Rows that
    are inactive (``active_mask`` False) are reported at ``final_depth``.
    """
    if not exit_logits:
        raise ValueError("decide_step needs at least one (depth, logits) pair")
    still_active = active_mask
    fired = []
    for depth, logits in exit_logits:
        fired_here = should_exit(depth, logits, policy, still_active)
        still_active = ~fired_here if still_active is None else still_active & ~fired_here
        fired.append(fired_here)
    return first_exit([depth for depth, _ in exit_logits], fired, final_depth)
