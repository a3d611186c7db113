"""Lock-step simulator for per-stage plans (pure, no torch): finds what would hang or mismatch.

Model of the hardware: stage s sends activations to s+1 and gradients to s-1 over FIFO channels;
sends are buffered (never block), receives block until a message is at the head of the channel.
Every message is tagged with the sender's action label ("F3", "FB0", ...) and a receive must find
exactly its own label at the head: real point-to-point libraries (NCCL) match messages by order
only, so a different head means the executor would silently consume the wrong tensor.

Each round, every stage that is not finished tries its next action; messages sent in a round are
delivered at its end. The simulation stops when all stages finish or a round makes no progress
(deadlock). With ``costs`` it also times the run: an action starts when the stage is free and its
message has arrived, and lasts the stage's cost for that kind of action (communication is free),
giving the makespan and per-stage idle time.
"""

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from megatron.early_exit.pipeline.plan import BACKWARD_OF, FORWARD_OF, Action, ActionKind


@dataclass(frozen=True)
class StageCosts:
    """Time of each kind of action on one stage, in any unit (one forward = 1 by default)."""

    forward: float = 1.0
    backward: float = 2.0
    exit_losses: float = 0.0
    """Extra time of an action that runs the stage's exit losses (exit forward + backward)."""

    @classmethod
    def from_ratio(
        cls, backward_forward_ratio: float, forward: float = 1.0, exit_losses: float = 0.0
    ) -> "StageCosts":
        """Costs with backward = r * forward."""
        return cls(forward, backward_forward_ratio * forward, exit_losses)

    def cost(self, action: Action) -> float:
        """How long ``action`` runs on this stage (a tune backward only runs exit heads)."""
        extra = self.exit_losses if action.runs_exit_losses else 0.0
        if action.kind is ActionKind.TUNE_BACKWARD:
            return extra
        return (self.forward if action.is_forward else self.backward) + extra


@dataclass(frozen=True)
class StuckStage:
    """A stage that could not finish: its next action and what it waits for."""

    stage: int
    action_index: int
    action: str
    waiting_for: str


@dataclass(frozen=True)
class TagMismatch:
    """A receive that found another message at the head of its channel."""

    stage: int
    action: str
    expected: str
    found: str
    channel: str


@dataclass(frozen=True)
class SimulationResult:
    """Everything ``simulate`` found; ``ok`` is False on any communication or order problem."""

    num_rounds: int
    completed: tuple[bool, ...]
    stuck: tuple[StuckStage, ...]
    mismatches: tuple[TagMismatch, ...]
    leftover_messages: tuple[str, ...]
    order_errors: tuple[str, ...]
    """Backward before (or without) its forward, or the same action twice, per stage."""
    forwards_without_backward: tuple[tuple[str, ...], ...]
    """Per stage: train forwards (F, FF) whose backward is absent (cool-down truncation, bugs)."""
    max_in_flight: tuple[int, ...]
    """Per stage: most microbatches whose stored activations await a backward at once."""
    finish_times: tuple[float, ...] | None = None
    busy_times: tuple[float, ...] | None = None
    timelines: tuple[tuple[tuple[float, float, str], ...], ...] | None = field(
        default=None, repr=False
    )
    """Per stage: (start, end, label) of every executed action, when timed."""

    @property
    def deadlocked(self) -> bool:
        """Whether some stage never finished its plan."""
        return bool(self.stuck)

    @property
    def ok(self) -> bool:
        """No deadlock, no mismatched tag, no unreceived message, no order error."""
        problems = (self.stuck, self.mismatches, self.leftover_messages, self.order_errors)
        return not any(problems)

    @property
    def makespan(self) -> float | None:
        """Time at which the last stage finishes (timed mode only)."""
        return None if self.finish_times is None else max(self.finish_times, default=0.0)

    @property
    def idle_times(self) -> tuple[float, ...] | None:
        """Per stage: makespan minus busy time (timed mode only)."""
        if self.busy_times is None:
            return None
        return tuple(self.makespan - busy for busy in self.busy_times)

    def describe(self) -> str:
        """Human-readable list of the problems found (empty string when ``ok``)."""
        lines = [
            f"stage {s.stage} stuck at #{s.action_index} {s.action}: waits for {s.waiting_for}"
            for s in self.stuck
        ]
        lines += [
            f"stage {m.stage} {m.action}: expected {m.expected} on {m.channel}, head is {m.found}"
            for m in self.mismatches
        ]
        lines += [f"leftover message {m}" for m in self.leftover_messages]
        lines += list(self.order_errors)
        return "\n".join(lines)


@dataclass
class _Message:
    label: str
    ready_time: float


@dataclass
class _StageState:
    plan: list[Action]
    costs: StageCosts
    next_index: int = 0
    clock: float = 0.0
    busy: float = 0.0
    blocked_by_mismatch: bool = False
    done: set = field(default_factory=set)
    in_flight: int = 0
    max_in_flight: int = 0
    timeline: list = field(default_factory=list)
    planned: set = field(init=False)

    def __post_init__(self):
        self.planned = {(a.kind, a.microbatch) for a in self.plan}

    @property
    def finished(self) -> bool:
        return self.next_index == len(self.plan)


def simulate(
    plans: Sequence[Sequence[Action]], costs: StageCosts | Sequence[StageCosts] | None = None
) -> SimulationResult:
    """Run every stage's plan together (``plans[s]`` is stage s's) and report what went wrong.

    ``costs`` (one ``StageCosts`` for all stages, or one per stage) switches on timing.
    Raises ValueError for a plan that talks to a stage that does not exist.
    """
    num_stages = len(plans)
    per_stage = _per_stage_costs(costs, num_stages)
    states = [_StageState(list(plan), c) for plan, c in zip(plans, per_stage)]
    for stage, state in enumerate(states):
        _check_neighbours(stage, num_stages, state.plan)
    channels: dict[tuple[int, int], deque[_Message]] = {}
    mismatches: list[TagMismatch] = []
    order_errors: list[str] = []
    num_rounds = 0
    while True:
        staged: list[tuple[tuple[int, int], _Message]] = []
        progressed = False
        for stage, state in enumerate(states):
            if state.finished or state.blocked_by_mismatch:
                continue
            progressed |= _try_step(stage, state, channels, staged, mismatches, order_errors)
        for key, message in staged:
            channels.setdefault(key, deque()).append(message)
        if not progressed:
            break
        num_rounds += 1
    return _result(states, channels, mismatches, order_errors, num_rounds, costs is not None)


def _per_stage_costs(costs, num_stages: int) -> list[StageCosts]:
    if costs is None or isinstance(costs, StageCosts):
        return [costs or StageCosts()] * num_stages
    if len(costs) != num_stages:
        raise ValueError(f"costs must have one entry per stage ({num_stages}), got {len(costs)}")
    return list(costs)


def _check_neighbours(stage: int, num_stages: int, plan: list[Action]) -> None:
    for action in plan:
        talks_down = action.recv_input_from_prev or action.send_grad_to_prev
        talks_up = action.send_output_to_next or action.recv_grad_from_next
        if (talks_down and stage == 0) or (talks_up and stage == num_stages - 1):
            raise ValueError(f"stage {stage} action {action} talks to a stage that does not exist")


def _source(stage: int, action: Action) -> tuple[int, int] | None:
    """The channel (sender, receiver) this action receives from, if any."""
    if action.recv_input_from_prev:
        return (stage - 1, stage)
    if action.recv_grad_from_next:
        return (stage + 1, stage)
    return None


def _destination(stage: int, action: Action) -> tuple[int, int] | None:
    if action.send_output_to_next:
        return (stage, stage + 1)
    if action.send_grad_to_prev:
        return (stage, stage - 1)
    return None


def _channel_name(key: tuple[int, int]) -> str:
    payload = "activation" if key[1] > key[0] else "gradient"
    return f"{payload} channel {key[0]}->{key[1]}"


def _try_step(stage, state, channels, staged, mismatches, order_errors) -> bool:
    """Run ``state``'s next action if its message is there; return whether it ran."""
    action = state.plan[state.next_index]
    ready_time = 0.0
    source = _source(stage, action)
    if source is not None:
        queue = channels.get(source)
        if not queue:
            return False
        if queue[0].label != action.label:
            mismatches.append(
                TagMismatch(
                    stage, action.label, action.label, queue[0].label, _channel_name(source)
                )
            )
            state.blocked_by_mismatch = True
            return False
        ready_time = queue.popleft().ready_time
    _account(stage, state, action, order_errors)
    start = max(state.clock, ready_time)
    duration = state.costs.cost(action)
    state.clock, state.busy = start + duration, state.busy + duration
    state.timeline.append((start, state.clock, action.label))
    destination = _destination(stage, action)
    if destination is not None:
        staged.append((destination, _Message(action.label, state.clock)))
    state.next_index += 1
    return True


def _holds_activation(state: _StageState, action: Action) -> bool:
    """Whether a forward stores something that a later backward of this stage consumes."""
    if action.kind in (ActionKind.FORWARD, ActionKind.FILL_FORWARD):
        return True
    backward = BACKWARD_OF.get(action.kind)
    return backward is not None and (backward, action.microbatch) in state.planned


def _account(stage: int, state: _StageState, action: Action, order_errors: list[str]) -> None:
    """Order checks and in-flight bookkeeping for an action about to run."""
    key = (action.kind, action.microbatch)
    if key in state.done:
        order_errors.append(f"stage {stage}: {action} runs twice")
    state.done.add(key)
    forward_kind = FORWARD_OF.get(action.kind)
    if forward_kind is not None:
        if (forward_kind, action.microbatch) not in state.done:
            order_errors.append(f"stage {stage}: {action} runs before its forward")
        else:
            state.in_flight -= 1
    elif _holds_activation(state, action):
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)


def _waiting_for(stage: int, state: _StageState, channels) -> str:
    action = state.plan[state.next_index]
    source = _source(stage, action)
    queue = channels.get(source)
    head = f"head is {queue[0].label}" if queue else "channel empty"
    payload = "activation" if action.recv_input_from_prev else "gradient"
    return f"{payload} {action.label} from stage {source[0]} ({head})"


def _forwards_without_backward(plan: list[Action]) -> tuple[str, ...]:
    present = {(a.kind, a.microbatch) for a in plan}
    return tuple(
        a.label
        for a in plan
        if a.kind in (ActionKind.FORWARD, ActionKind.FILL_FORWARD)
        and (BACKWARD_OF[a.kind], a.microbatch) not in present
    )


def _result(states, channels, mismatches, order_errors, num_rounds, timed) -> SimulationResult:
    stuck = tuple(
        StuckStage(s, st.next_index, st.plan[st.next_index].label, _waiting_for(s, st, channels))
        for s, st in enumerate(states)
        if not st.finished
    )
    leftovers = tuple(
        f"{message.label} on {_channel_name(key)}"
        for key, queue in sorted(channels.items())
        for message in queue
    )
    return SimulationResult(
        num_rounds=num_rounds,
        completed=tuple(st.finished for st in states),
        stuck=stuck,
        mismatches=tuple(mismatches),
        leftover_messages=leftovers,
        order_errors=tuple(order_errors),
        forwards_without_backward=tuple(_forwards_without_backward(st.plan) for st in states),
        max_in_flight=tuple(st.max_in_flight for st in states),
        finish_times=tuple(st.clock for st in states) if timed else None,
        busy_times=tuple(st.busy for st in states) if timed else None,
        timelines=tuple(tuple(st.timeline) for st in states) if timed else None,
    )


def format_timeline(result: SimulationResult, time_per_char: float = 1.0) -> str:
    """ASCII Gantt chart of a timed result: one row per stage, '.' where the stage idles.

    Each action is drawn as its label padded with '-' over its duration (truncated if short).
    """
    if result.timelines is None:
        raise ValueError("format_timeline needs a timed result: pass costs to simulate()")
    width = round(result.makespan / time_per_char)
    rows = []
    for stage, timeline in enumerate(result.timelines):
        row = ["."] * width
        for start, end, label in timeline:
            first, last = round(start / time_per_char), round(end / time_per_char)
            text = (label + "-" * (last - first))[: last - first]
            row[first:last] = list(text)
        rows.append(f"stage {stage} |{''.join(row)}|")
    return "\n".join(rows)
