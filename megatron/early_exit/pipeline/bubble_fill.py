"""Explicit bubble filling for the early-exit 1F1B schedule: pure participation math (no torch).

Notation: P = ``num_stages``, s = a stage, M = ``num_microbatches`` (real microbatches),
r = ``--backward-forward-ratio`` (time of one backward / time of one forward on one stage; every
count below uses the given r, the original EE-LLM schedule silently used 2.0), F_w / F_c = the
requested warm-up / cool-down fill counts.

Warm-up fill (extra microbatches, early exits only)
    Stage s idles for r*(P-s-1) - s forward times between its warm-up forwards and its first
    backward (counted from when a fill started on stage 0 can reach it). A fill microbatch costs
    1 + r there, so stage s takes part in the first
    ``k_s = min(F_w, max(0, floor((r*(P-s-1) - s) / (1+r))))`` fills; k_s is non-increasing in s
    and k_0 = F_w. Fill f is forwarded through stages 0..d_f, where d_f is the deepest stage with
    f < k_s that hosts exits: forwarding further would produce activations with no loss behind
    them (and a stage waiting for a gradient that never comes: the original could hang there).
    Fill f is dropped when no stage of its prefix hosts exits. Its backward starts at d_f from
    d_f's exit losses and flows back to stage 0, each stage adding its own exit losses.

Cool-down fill (truncated backward of the last real microbatches)
    Stage s skips the backward of the last ``c_s = min(F_c, floor((P-1-s) * r/(1+r)))`` real
    microbatches (c_s is non-increasing in s, and 0 on the last stage). Stage s runs backward j
    iff j < M - c_s and sends the input gradient of j to stage s-1 iff s-1 also runs backward j.
    For microbatch j this is a stop-gradient on the activation entering t_j, the first stage
    that runs backward j.

Objective of one filled iteration (what the summed gradients are the gradient of)
    J = (1/M) * sum_{j<M} [ L_final_j + sum_{exit heads i on stages >= t_j} w_i * L_{i,j} ]
      + (1/M) * sum_{fills f} sum_{exit heads i on stages <= d_f} w_i * L_{i,f}
    where, in L_{.,j}, the activation entering stage t_j is detached (t_j = 0 unless j is one of
    the last microbatches truncated by the cool-down fill). Exit losses of a truncated microbatch
    on stages before t_j are not part of J (their deferred exit losses are never run).
    Fill losses use the same normaliser M as real microbatches: one token of a fill microbatch
    weighs exactly as much as one token of a real one, and switching fills on or off does not
    rescale the real microbatches' gradients (the original carved the fills out of the global
    batch and renormalised by M - F_w, which changed the final-loss scale with the fill count).

Both fill counts default to, and are bounded by, floor((P-1) * r/(1+r)).
"""

import math
from dataclasses import dataclass
from fractions import Fraction

WARMUP_FLAG = "--num-fill-warmup-microbatches"
COOLDOWN_FLAG = "--num-fill-cooldown-microbatches"
RATIO_FLAG = "--backward-forward-ratio"

# r arrives as a float from the command line; 0.1 should behave like 1/10 in the floors below.
_MAX_RATIO_DENOMINATOR = 10**6


@dataclass(frozen=True)
class FillConfig:
    """The user's bubble-filling request; ``None`` counts mean "the maximum that fits"."""

    num_fill_warmup_microbatches: int | None = None
    """Extra early-exit-only microbatches run in the warm-up bubble (F_w)."""
    num_fill_cooldown_microbatches: int | None = None
    """Last real microbatches whose backward is truncated on the early stages (F_c)."""
    backward_forward_ratio: float = 2.0
    """Assumed time(backward) / time(forward) of one stage (r)."""

    def __post_init__(self):
        _check_count(WARMUP_FLAG, self.num_fill_warmup_microbatches)
        _check_count(COOLDOWN_FLAG, self.num_fill_cooldown_microbatches)
        ratio = self.backward_forward_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float):
            raise ValueError(f"{RATIO_FLAG} must be a number, got {ratio!r}")
        if not math.isfinite(ratio) or ratio <= 0:
            raise ValueError(f"{RATIO_FLAG} must be finite and > 0, got {ratio}")


def _check_count(flag: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{flag} must be an integer >= 0, got {value!r}")


def _ratio(backward_forward_ratio: float) -> Fraction:
    return Fraction(backward_forward_ratio).limit_denominator(_MAX_RATIO_DENOMINATOR)


def _check_num_stages(num_stages: int) -> None:
    if num_stages < 2:
        raise ValueError(f"bubble filling needs num_stages >= 2, got num_stages={num_stages}")


def max_fill_microbatches(num_stages: int, backward_forward_ratio: float) -> int:
    """floor((P-1) * r/(1+r)): the default and the maximum of both fill counts."""
    _check_num_stages(num_stages)
    ratio = _ratio(backward_forward_ratio)
    return math.floor((num_stages - 1) * ratio / (1 + ratio))


def resolve_fill_counts(num_stages: int, fill: FillConfig) -> tuple[int, int]:
    """Return (F_w, F_c): defaults filled in; ValueError naming the flag when above the maximum."""
    maximum = max_fill_microbatches(num_stages, fill.backward_forward_ratio)
    counts = []
    for flag, requested in (
        (WARMUP_FLAG, fill.num_fill_warmup_microbatches),
        (COOLDOWN_FLAG, fill.num_fill_cooldown_microbatches),
    ):
        if requested is not None and requested > maximum:
            raise ValueError(
                f"{flag}={requested} exceeds the maximum {maximum} = floor((P-1)*r/(1+r)) "
                f"for P={num_stages}, {RATIO_FLAG}={fill.backward_forward_ratio}"
            )
        counts.append(maximum if requested is None else requested)
    return counts[0], counts[1]


def warmup_fill_budgets(
    num_stages: int, num_fill_warmup: int, backward_forward_ratio: float
) -> tuple[int, ...]:
    """k_s for every stage: how many of the first warm-up fills fit stage s's warm-up bubble."""
    ratio = _ratio(backward_forward_ratio)
    budgets = []
    for stage in range(num_stages):
        bubble = ratio * (num_stages - stage - 1) - stage
        budgets.append(min(num_fill_warmup, max(0, math.floor(bubble / (1 + ratio)))))
    return tuple(budgets)


def cooldown_skip_counts(
    num_stages: int, num_fill_cooldown: int, backward_forward_ratio: float
) -> tuple[int, ...]:
    """c_s for every stage: how many of the last real microbatches skip their backward there."""
    ratio = _ratio(backward_forward_ratio)
    return tuple(
        min(num_fill_cooldown, math.floor((num_stages - 1 - stage) * ratio / (1 + ratio)))
        for stage in range(num_stages)
    )


def fill_depths(budgets: tuple[int, ...], stages_with_exits: frozenset[int]) -> tuple[int, ...]:
    """d_f for every fill that is kept: the deepest stage with f < k_s that hosts exits.

    Fills whose prefix of stages hosts no exits are dropped; since the prefixes shrink with f,
    the kept fills are always 0..len(result)-1.
    """
    depths = []
    for fill_index in range(budgets[0] if budgets else 0):
        prefix = [stage for stage, budget in enumerate(budgets) if fill_index < budget]
        exit_stages = [stage for stage in prefix if stage in stages_with_exits]
        if not exit_stages:
            break
        depths.append(max(exit_stages))
    return tuple(depths)


@dataclass(frozen=True)
class FillSchedule:
    """Who takes part in which fill, for one (P, M, exit placement, FillConfig)."""

    num_stages: int
    num_microbatches: int
    num_requested_warmup: int
    """F_w after defaults; ``len(fill_depths)`` of them survive (see ``fill_depths``)."""
    warmup_budgets: tuple[int, ...]
    """k_s per stage."""
    fill_depths: tuple[int, ...]
    """d_f per kept warm-up fill f (non-increasing in f)."""
    cooldown_skips: tuple[int, ...]
    """c_s per stage."""

    @property
    def num_effective_warmup(self) -> int:
        """How many warm-up fills actually run (the others had no exit head to train)."""
        return len(self.fill_depths)

    def fills_on_stage(self, stage: int) -> tuple[int, ...]:
        """Indices of the warm-up fills that run forward and backward on ``stage``."""
        return tuple(f for f, depth in enumerate(self.fill_depths) if stage <= depth)

    def runs_backward(self, stage: int, microbatch: int) -> bool:
        """Whether ``stage`` runs the backward of real microbatch ``microbatch``."""
        return microbatch < self.num_microbatches - self.cooldown_skips[stage]

    def first_backward_stage(self, microbatch: int) -> int:
        """t_j: the first stage that runs backward j (its input activation is detached)."""
        for stage in range(self.num_stages):
            if self.runs_backward(stage, microbatch):
                return stage
        raise AssertionError("the last stage always runs every backward")


def build_fill_schedule(
    num_stages: int,
    num_microbatches: int,
    stages_with_exits: frozenset[int],
    fill: FillConfig,
) -> FillSchedule:
    """Resolve ``fill`` into per-stage participation; ValueError on P < 2, M < P or bad counts."""
    _check_num_stages(num_stages)
    if num_microbatches < num_stages:
        raise ValueError(
            f"bubble filling needs num_microbatches >= num_stages, got "
            f"num_microbatches={num_microbatches} < num_stages={num_stages}"
        )
    num_warmup, num_cooldown = resolve_fill_counts(num_stages, fill)
    ratio = fill.backward_forward_ratio
    budgets = warmup_fill_budgets(num_stages, num_warmup, ratio)
    return FillSchedule(
        num_stages=num_stages,
        num_microbatches=num_microbatches,
        num_requested_warmup=num_warmup,
        warmup_budgets=budgets,
        fill_depths=fill_depths(budgets, stages_with_exits),
        cooldown_skips=cooldown_skip_counts(num_stages, num_cooldown, ratio),
    )
