"""The early-exit pipeline schedule as data: one list of ``Action`` per stage (pure, no torch).

An executor walks its stage's list in order; every action says explicitly what to receive before
it runs and what to send after it, so the executor never re-derives the schedule. The lists of
all stages together are checked by ``simulate.simulate`` (matched FIFO sends/receives, no
deadlock) and by tests/unit/test_pipeline_plan.py. See docs/pipeline_schedule.md.

Modes
    ``"train"``: non-interleaved 1F1B exactly as megatron-core's
    ``forward_backward_pipelining_without_interleaving`` (warm-up of min(P-s-1, M) forwards,
    steady forward-then-backward, cool-down backwards). Exit losses are deferred: a backward
    on a stage with exits first runs that stage's exit forward + losses, then one backward
    through exits and backbone. Optional explicit bubble filling (``bubble_fill.FillConfig``).
    ``"eval"``: forwards only; every stage reports its exit losses, the last stage its final loss.
    ``"tune"`` (EE-Tuning, frozen backbone): per microbatch a no-grad backbone forward, sent on
    only while a later stage has exits (stages after the deepest exit stage get no actions), then
    a local exit-loss backward on stages with exits; no gradient ever crosses stages.

Invariants of a train plan without fills (asserted by the tests): each stage runs every forward
before its backward; exactly min(P-s-1, M) forwards precede the first steady forward; a stage
holds at most min(P-s, M) microbatches' activations at once.

Warm-up fills ("FF", "FB") are placed so that every stage sees messages in one global order:
fill f's forward comes right after real forward F_{P-d_f-1} (the last forward stage d_f runs
before its bubble) on every stage 0..d_f, and the fill backwards come, shallowest fill first,
between the stage's first steady forward and its first real backward.
"""

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from megatron.early_exit.pipeline.bubble_fill import FillConfig, FillSchedule, build_fill_schedule

MODES = ("train", "tune", "eval")


class ActionKind(enum.Enum):
    """What an action computes; the value is its short label ("F3", "FB0", ...)."""

    FORWARD = "F"
    """Backbone forward of a real microbatch, keeping activations for its backward."""
    BACKWARD = "B"
    """Backward of a real microbatch, preceded by the stage's deferred exit losses."""
    FILL_FORWARD = "FF"
    """Forward of an extra warm-up fill microbatch (trains early exits only)."""
    FILL_BACKWARD = "FB"
    """Backward of a warm-up fill microbatch from the exit losses of stages <= its depth."""
    EVAL_FORWARD = "EF"
    """Forward-only evaluation: final loss on the last stage, exit losses where exits live."""
    TUNE_FORWARD = "TF"
    """EE-Tuning: no-grad backbone forward."""
    TUNE_BACKWARD = "TB"
    """EE-Tuning: exit-head forward, losses and backward, local to the stage."""


_FORWARD_KINDS = frozenset(
    {
        ActionKind.FORWARD,
        ActionKind.FILL_FORWARD,
        ActionKind.EVAL_FORWARD,
        ActionKind.TUNE_FORWARD,
    }
)
BACKWARD_OF = {
    ActionKind.FORWARD: ActionKind.BACKWARD,
    ActionKind.FILL_FORWARD: ActionKind.FILL_BACKWARD,
    ActionKind.TUNE_FORWARD: ActionKind.TUNE_BACKWARD,
}
"""The backward kind that consumes what a forward kind stored (eval forwards store nothing)."""
FORWARD_OF = {backward: forward for forward, backward in BACKWARD_OF.items()}


@dataclass(frozen=True)
class Action:
    """One step of one stage. ``microbatch`` indexes real microbatches, or fills for FF/FB."""

    kind: ActionKind
    microbatch: int
    recv_input_from_prev: bool = False
    """Forward kinds: receive the input activation from stage - 1 first."""
    send_output_to_next: bool = False
    """Forward kinds: send the output activation to stage + 1 afterwards."""
    recv_grad_from_next: bool = False
    """Backward kinds: receive the output gradient from stage + 1 first."""
    send_grad_to_prev: bool = False
    """Backward kinds: send the input gradient to stage - 1 afterwards."""
    runs_exit_losses: bool = False
    """Compute this stage's exit losses in this action (deferred to backward in training)."""

    def __post_init__(self):
        if self.microbatch < 0:
            raise ValueError(f"Action microbatch must be >= 0, got {self.microbatch}")
        if self.is_forward and (self.recv_grad_from_next or self.send_grad_to_prev):
            raise ValueError(f"forward action {self} cannot carry gradient communication")
        if not self.is_forward and (self.recv_input_from_prev or self.send_output_to_next):
            raise ValueError(f"backward action {self} cannot carry activation communication")

    @property
    def is_forward(self) -> bool:
        """Whether this runs a forward (and, if at all, communicates activations)."""
        return self.kind in _FORWARD_KINDS

    @property
    def label(self) -> str:
        """Short form used in messages and debugging: "F3", "B3", "FF0", "FB0", "EF1", ..."""
        return f"{self.kind.value}{self.microbatch}"

    def __str__(self) -> str:
        return self.label


def format_plan(actions: Iterable[Action]) -> str:
    """A plan as one line of labels, e.g. "F0 F1 FF0 F2 FB0 B0 F3 B1 ..."."""
    return " ".join(action.label for action in actions)


def build_plan(
    num_stages: int,
    stage: int,
    num_microbatches: int,
    stages_with_exits: frozenset[int],
    fill: FillConfig | None = None,
    mode: str = "train",
) -> list[Action]:
    """The ordered actions of ``stage`` for one iteration of ``num_microbatches`` microbatches.

    ``stages_with_exits``: the stages hosting at least one exit head. ``fill``: explicit bubble
    filling (train mode only; ``None`` = plain 1F1B). Raises ValueError naming the bad argument.
    """
    exit_stages = _validate(num_stages, stage, num_microbatches, stages_with_exits, fill, mode)
    if mode == "eval":
        return _eval_actions(num_stages, stage, num_microbatches, stage in exit_stages)
    if mode == "tune":
        return _tune_actions(stage, num_microbatches, exit_stages)
    schedule = None
    if fill is not None:
        schedule = build_fill_schedule(num_stages, num_microbatches, exit_stages, fill)
    return _train_actions(num_stages, stage, num_microbatches, stage in exit_stages, schedule)


def build_plans(
    num_stages: int,
    num_microbatches: int,
    stages_with_exits: frozenset[int],
    fill: FillConfig | None = None,
    mode: str = "train",
) -> list[list[Action]]:
    """``build_plan`` for every stage, indexed by stage (what ``simulate`` takes)."""
    return [
        build_plan(num_stages, stage, num_microbatches, stages_with_exits, fill, mode)
        for stage in range(num_stages)
    ]


def _validate(num_stages, stage, num_microbatches, stages_with_exits, fill, mode) -> frozenset:
    for name, value in (("num_stages", num_stages), ("num_microbatches", num_microbatches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {name}={value!r}")
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < num_stages:
        raise ValueError(f"stage must be in [0, {num_stages}), got stage={stage!r}")
    exit_stages = frozenset(stages_with_exits)
    bad = sorted(
        (s for s in exit_stages if not (isinstance(s, int) and 0 <= s < num_stages)), key=str
    )
    if bad:
        raise ValueError(f"stages_with_exits must lie in [0, {num_stages}), got {bad}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}")
    if fill is not None and mode != "train":
        raise ValueError(f"fill (bubble filling) needs mode='train', got mode={mode!r}")
    if mode == "tune" and not exit_stages:
        raise ValueError("mode='tune' needs at least one stage in stages_with_exits, got none")
    return exit_stages


def _eval_actions(num_stages, stage, num_microbatches, has_exits) -> list[Action]:
    return [
        Action(
            ActionKind.EVAL_FORWARD,
            j,
            recv_input_from_prev=stage > 0,
            send_output_to_next=stage < num_stages - 1,
            runs_exit_losses=has_exits,
        )
        for j in range(num_microbatches)
    ]


def _tune_actions(stage, num_microbatches, exit_stages) -> list[Action]:
    deepest = max(exit_stages)
    if stage > deepest:
        return []  # forward truncation: nothing behind this stage has a loss to train
    actions = []
    for j in range(num_microbatches):
        actions.append(
            Action(
                ActionKind.TUNE_FORWARD,
                j,
                recv_input_from_prev=stage > 0,
                send_output_to_next=stage < deepest,
            )
        )
        if stage in exit_stages:
            actions.append(Action(ActionKind.TUNE_BACKWARD, j, runs_exit_losses=True))
    return actions


def _train_actions(num_stages, stage, num_microbatches, has_exits, schedule) -> list[Action]:
    num_warmup = min(num_stages - stage - 1, num_microbatches)
    forwards = _train_forwards(num_stages, stage, num_microbatches, schedule)
    backwards = _train_backwards(num_stages, stage, num_microbatches, has_exits, schedule)
    position = {(a.kind, a.microbatch): i for i, a in enumerate(forwards)}
    if schedule is not None:
        # The fill backwards sit in the bubble after the first steady forward and all fills.
        fill_positions = [i for i, a in enumerate(forwards) if a.kind is ActionKind.FILL_FORWARD]
        fill_block_after = max([position[(ActionKind.FORWARD, num_warmup)], *fill_positions])
    actions, num_emitted = [], 0
    for backward in backwards:
        if backward.kind is ActionKind.FILL_BACKWARD:
            needed = fill_block_after
        else:
            last_real = min(num_warmup + backward.microbatch, num_microbatches - 1)
            needed = position[(ActionKind.FORWARD, last_real)]
        actions.extend(forwards[num_emitted : needed + 1])
        num_emitted = max(num_emitted, needed + 1)
        actions.append(backward)
    assert num_emitted == len(forwards), "every forward precedes the last backward"
    return actions


def _train_forwards(num_stages, stage, num_microbatches, schedule) -> list[Action]:
    """Real forwards in order, with fill forward f right after real forward P - d_f - 1."""
    forwards = []
    fills = _fills_by_position(num_stages, stage, schedule)
    for j in range(num_microbatches):
        forwards.append(
            Action(
                ActionKind.FORWARD,
                j,
                recv_input_from_prev=stage > 0,
                send_output_to_next=stage < num_stages - 1,
            )
        )
        for fill_index in fills.get(j, ()):
            forwards.append(
                Action(
                    ActionKind.FILL_FORWARD,
                    fill_index,
                    recv_input_from_prev=stage > 0,
                    send_output_to_next=stage < schedule.fill_depths[fill_index],
                )
            )
    return forwards


def _fills_by_position(num_stages, stage, schedule) -> dict[int, list[int]]:
    """Real forward index -> fills that follow it; the same positions on every stage."""
    if schedule is None:
        return {}
    by_position: dict[int, list[int]] = {}
    for fill_index in schedule.fills_on_stage(stage):
        after = num_stages - schedule.fill_depths[fill_index] - 1
        by_position.setdefault(after, []).append(fill_index)
    return by_position


def _train_backwards(
    num_stages, stage, num_microbatches, has_exits, schedule: FillSchedule | None
) -> list[Action]:
    """Fill backwards (shallowest fill first: its gradient is ready first), then real ones."""
    backwards = []
    fills = schedule.fills_on_stage(stage) if schedule is not None else ()
    for fill_index in reversed(fills):
        backwards.append(
            Action(
                ActionKind.FILL_BACKWARD,
                fill_index,
                recv_grad_from_next=stage < schedule.fill_depths[fill_index],
                send_grad_to_prev=stage > 0,
                runs_exit_losses=has_exits,
            )
        )
    for j in range(num_microbatches):
        if schedule is not None and not schedule.runs_backward(stage, j):
            continue  # cool-down fill: truncated backward, see bubble_fill
        sends = stage > 0 and (schedule is None or schedule.runs_backward(stage - 1, j))
        backwards.append(
            Action(
                ActionKind.BACKWARD,
                j,
                recv_grad_from_next=stage < num_stages - 1,
                send_grad_to_prev=sends,
                runs_exit_losses=has_exits,
            )
        )
    return backwards
