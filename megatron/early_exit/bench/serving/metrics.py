"""Pure arithmetic of the serving benchmark: percentiles, cross-talk, paired ratios."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from megatron.early_exit.bench.serving.workload import ServingRequest

ANSWER_FIELDS = ("text", "pieces", "exit_layers", "finish_reason")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation between the closest ranks
    (numpy's default); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must lie in [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Mismatch:
    """A load answer that differs from the same request answered alone."""

    request: ServingRequest
    fields: tuple[str, ...]
    """The answer fields that differ (``ANSWER_FIELDS``)."""
    answer: Mapping
    reference: Mapping

    def describe(self, width: int = 60) -> str:
        parts = [
            f"{name}: {_short(self.answer.get(name), width)} vs alone "
            f"{_short(self.reference.get(name), width)}"
            for name in self.fields
        ]
        return f"{self.request.label()}: " + "; ".join(parts)


def _short(value, width: int) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def cross_talk(
    answers: Sequence[tuple[ServingRequest, Mapping]],
    references: Mapping[ServingRequest, Mapping],
) -> tuple[list[Mismatch], int]:
    """``(mismatches, unchecked)``: the load answers that differ from their request's reference
    in any of ``ANSWER_FIELDS``, and how many had no reference to compare with."""
    mismatches, unchecked = [], 0
    for request, answer in answers:
        reference = references.get(request)
        if reference is None:
            unchecked += 1
            continue
        fields = tuple(f for f in ANSWER_FIELDS if answer.get(f) != reference.get(f))
        if fields:
            mismatches.append(Mismatch(request, fields, answer, reference))
    return mismatches, unchecked


def paired_ratio(
    rounds: Sequence[Mapping[str, float | None]], mode: str, baseline: str
) -> float | None:
    """Median over rounds of ``round[mode] / round[baseline]``; rounds missing either value (or
    with a zero baseline) are left out; None if none is left."""
    ratios = [
        r[mode] / r[baseline]
        for r in rounds
        if r.get(mode) is not None and r.get(baseline)  # a zero baseline has no ratio
    ]
    return statistics.median(ratios) if ratios else None
