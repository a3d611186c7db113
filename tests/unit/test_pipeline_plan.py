"""Pure tests of the early-exit pipeline plan, bubble-filling math and lock-step simulator."""

import dataclasses
import itertools
import random

import pytest

from megatron.early_exit.pipeline.bubble_fill import (
    COOLDOWN_FLAG,
    WARMUP_FLAG,
    FillConfig,
    build_fill_schedule,
    cooldown_skip_counts,
    max_fill_microbatches,
    resolve_fill_counts,
    warmup_fill_budgets,
)
from megatron.early_exit.pipeline.plan import (
    Action,
    ActionKind,
    build_plan,
    build_plans,
    format_plan,
)
from megatron.early_exit.pipeline.simulate import StageCosts, format_timeline, simulate

F, B = ActionKind.FORWARD, ActionKind.BACKWARD


def _exit_subsets(num_stages: int) -> list[frozenset[int]]:
    """Every subset for small pipelines; for larger ones a fixed sample (empty, all, singletons
    at the ends and the middle, and seeded random subsets)."""
    stages = range(num_stages)
    if num_stages <= 4:
        return [
            frozenset(c) for k in range(num_stages + 1) for c in itertools.combinations(stages, k)
        ]
    rng = random.Random(1234)
    sample = [frozenset(), frozenset(stages), frozenset({0}), frozenset({num_stages // 2})]
    sample += [frozenset({num_stages - 1}), frozenset(range(0, num_stages, 2))]
    sample += [frozenset(rng.sample(stages, rng.randint(1, num_stages))) for _ in range(6)]
    return sample


def _check_train(num_stages, num_microbatches, exit_stages, fill) -> list[str]:
    """Simulate one train configuration; return the problems found (empty when fine)."""
    where = f"P={num_stages} M={num_microbatches} exit_stages={sorted(exit_stages)} fill={fill}"
    plans = build_plans(num_stages, num_microbatches, exit_stages, fill)
    result = simulate(plans)
    if not result.ok or not all(result.completed):
        return [f"{where}: {result.describe()}"]
    problems = []
    schedule = fill and build_fill_schedule(num_stages, num_microbatches, exit_stages, fill)
    for stage in range(num_stages):
        skips = schedule.cooldown_skips[stage] if schedule else 0
        truncated = tuple(f"F{j}" for j in range(num_microbatches - skips, num_microbatches))
        if result.forwards_without_backward[stage] != truncated:
            problems.append(f"{where} stage {stage}: {result.forwards_without_backward[stage]}")
        num_fills = len(schedule.fills_on_stage(stage)) if schedule else 0
        bound = min(num_stages - stage, num_microbatches) + num_fills
        in_flight = result.max_in_flight[stage]
        if in_flight > bound or (not num_fills and in_flight != bound):
            problems.append(f"{where} stage {stage}: {in_flight} in flight, bound {bound}")
    return problems


def _fill_configs(num_stages, ratio=2.0, every_pair=True) -> list[FillConfig | None]:
    """No fill, then (warm-up, cool-down) counts: every pair, or the diagonal and both edges."""
    maximum = max_fill_microbatches(num_stages, ratio)
    counts = range(maximum + 1)
    pairs = {(w, c) for w in counts for c in counts if every_pair or w in (c, 0, maximum)}
    return [None] + [FillConfig(w, c, ratio) for w, c in sorted(pairs)]


# ---------------------------------------------------------------- plain 1F1B


def _reference_1f1b(num_stages, stage, num_microbatches) -> list[tuple[ActionKind, int]]:
    """megatron-core's forward_backward_pipelining_without_interleaving, transcribed."""
    num_warmup = min(num_stages - stage - 1, num_microbatches)
    num_remaining = num_microbatches - num_warmup
    order = [(F, j) for j in range(num_warmup)]
    for i in range(num_remaining):
        order += [(F, num_warmup + i), (B, i)]
    return order + [(B, j) for j in range(num_remaining, num_microbatches)]


@pytest.mark.parametrize("num_stages", [1, 2, 3, 4, 5, 8])
def test_train_plan_is_megatron_1f1b(num_stages):
    for stage, num_microbatches in itertools.product(range(num_stages), range(1, 13)):
        plan = build_plan(num_stages, stage, num_microbatches, frozenset())
        assert [(a.kind, a.microbatch) for a in plan] == _reference_1f1b(
            num_stages, stage, num_microbatches
        )
        first_backward = next(i for i, a in enumerate(plan) if a.kind is B)
        # warm-up of P - stage - 1 forwards, then the first steady forward
        assert first_backward == min(num_stages - stage - 1, num_microbatches) + (
            num_microbatches > num_stages - stage - 1
        )


def test_train_plan_communication_flags():
    plans = build_plans(3, 4, frozenset({1}))
    for stage, plan in enumerate(plans):
        for action in plan:
            if action.kind is F:
                assert action.recv_input_from_prev == (stage > 0)
                assert action.send_output_to_next == (stage < 2)
                assert not action.runs_exit_losses  # deferred to the backward
            else:
                assert action.recv_grad_from_next == (stage < 2)
                assert action.send_grad_to_prev == (stage > 0)
                assert action.runs_exit_losses == (stage == 1)


def test_every_forward_precedes_its_backward_in_every_plan():
    for num_stages in (2, 3, 4, 8):
        for fill in _fill_configs(num_stages):
            for exit_stages in _exit_subsets(num_stages)[:6]:
                for plan in build_plans(num_stages, 2 * num_stages, exit_stages, fill):
                    seen = set()
                    for action in plan:
                        if action.kind in (B, ActionKind.FILL_BACKWARD):
                            forward = F if action.kind is B else ActionKind.FILL_FORWARD
                            assert (forward, action.microbatch) in seen, format_plan(plan)
                        seen.add((action.kind, action.microbatch))


# ---------------------------------------------------------------- lock-step sweeps


@pytest.mark.parametrize("num_stages", [2, 3, 4, 8])
def test_simulated_train_sweep(num_stages):
    problems = []
    counts = range(num_stages, 3 * num_stages + 1)
    if num_stages == 8:
        counts = (8, 9, 16, 24)  # keeps the sweep fast; smaller P cover every M
    for num_microbatches in counts:
        for exit_stages in _exit_subsets(num_stages):
            for fill in _fill_configs(num_stages):
                problems += _check_train(num_stages, num_microbatches, exit_stages, fill)
    assert not problems, "\n".join(problems[:10])


@pytest.mark.parametrize("ratio", [0.5, 1.0, 3.0, 7.0])
def test_simulated_train_sweep_other_ratios(ratio):
    problems = []
    for num_stages, num_microbatches in ((4, 5), (6, 13), (8, 9)):
        for exit_stages in _exit_subsets(num_stages)[:8]:
            for fill in _fill_configs(num_stages, ratio, every_pair=False):
                problems += _check_train(num_stages, num_microbatches, exit_stages, fill)
    assert not problems, "\n".join(problems[:10])


@pytest.mark.parametrize("num_stages", [1, 2, 3, 4, 8])
def test_simulated_eval_and_tune_sweep(num_stages):
    for num_microbatches in range(1, 3 * num_stages + 1):
        for exit_stages in _exit_subsets(num_stages):
            for mode in ("eval", "tune"):
                if mode == "tune" and not exit_stages:
                    continue
                result = simulate(build_plans(num_stages, num_microbatches, exit_stages, mode=mode))
                assert result.ok and all(result.completed), result.describe()
                assert result.forwards_without_backward == ((),) * num_stages


def test_eval_plan_is_forward_only_with_exit_losses():
    plans = build_plans(4, 5, frozenset({1, 3}), mode="eval")
    for stage, plan in enumerate(plans):
        assert [a.label for a in plan] == [f"EF{j}" for j in range(5)]
        assert all(a.runs_exit_losses == (stage in (1, 3)) for a in plan)
        assert all(a.send_output_to_next == (stage < 3) for a in plan)


def test_tune_plan_truncates_forward_and_never_sends_gradients():
    plans = build_plans(5, 3, frozenset({0, 2}), mode="tune")
    assert format_plan(plans[0]) == "TF0 TB0 TF1 TB1 TF2 TB2"
    assert format_plan(plans[1]) == "TF0 TF1 TF2"
    assert format_plan(plans[2]) == "TF0 TB0 TF1 TB1 TF2 TB2"
    assert plans[3] == [] and plans[4] == []  # after the deepest exit stage: nothing to do
    for stage, plan in enumerate(plans[:3]):
        for action in plan:
            assert not (action.recv_grad_from_next or action.send_grad_to_prev)
            if action.kind is ActionKind.TUNE_FORWARD:
                assert action.send_output_to_next == (stage < 2)
    assert simulate(plans).max_in_flight == (1, 0, 1, 0, 0)


# ---------------------------------------------------------------- bubble-filling math


@pytest.mark.parametrize(
    "num_stages, ratio, expected",
    [
        (2, 2.0, 0),
        (4, 2.0, 2),
        (8, 2.0, 4),
        (4, 1.0, 1),
        (4, 3.0, 2),
        (8, 1.0, 3),
        (8, 3.0, 5),
        (11, 0.1, 0),
        (12, 0.1, 1),
    ],
)
def test_default_fill_counts(num_stages, ratio, expected):
    assert max_fill_microbatches(num_stages, ratio) == expected
    assert resolve_fill_counts(num_stages, FillConfig(backward_forward_ratio=ratio)) == (
        expected,
        expected,
    )


@pytest.mark.parametrize(
    "fill, flag",
    [
        (FillConfig(num_fill_warmup_microbatches=3), WARMUP_FLAG),
        (FillConfig(num_fill_cooldown_microbatches=3), COOLDOWN_FLAG),
    ],
)
def test_fill_count_above_maximum_raises(fill, flag):
    with pytest.raises(ValueError, match=f"{flag}=3 exceeds the maximum 2"):
        build_plan(4, 0, 8, frozenset({1}), fill)


def test_budgets_and_skips_are_non_increasing():
    for num_stages, ratio in itertools.product(range(2, 17), (0.25, 0.5, 1.0, 2.0, 3.0, 9.0)):
        for count in range(max_fill_microbatches(num_stages, ratio) + 1):
            budgets = warmup_fill_budgets(num_stages, count, ratio)
            skips = cooldown_skip_counts(num_stages, count, ratio)
            assert budgets[0] == count and skips[-1] == 0
            assert all(a >= b for a, b in itertools.pairwise(budgets)), budgets
            assert all(a >= b for a, b in itertools.pairwise(skips)), skips


def test_worked_example_p4_r2():
    schedule = build_fill_schedule(4, 8, frozenset({1, 2}), FillConfig())
    assert schedule.warmup_budgets == (2, 1, 0, 0)
    assert schedule.cooldown_skips == (2, 1, 0, 0)
    assert schedule.fill_depths == (1,)  # fill 1 only reaches stage 0, which has no exit
    assert schedule.num_effective_warmup == 1
    assert [schedule.first_backward_stage(j) for j in range(8)] == [0] * 6 + [1, 2]
    plans = build_plans(4, 8, frozenset({1, 2}), FillConfig())
    assert format_plan(plans[0]) == "F0 F1 F2 FF0 F3 FB0 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5"
    assert format_plan(plans[1]) == "F0 F1 F2 FF0 FB0 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 B6"


def test_ratio_is_honoured():
    low = build_fill_schedule(8, 16, frozenset(range(8)), FillConfig(backward_forward_ratio=1.0))
    high = build_fill_schedule(8, 16, frozenset(range(8)), FillConfig(backward_forward_ratio=3.0))
    assert low.warmup_budgets == (3, 2, 1, 0, 0, 0, 0, 0)
    assert high.warmup_budgets == (5, 4, 3, 2, 1, 0, 0, 0)
    assert low.cooldown_skips == (3, 3, 2, 2, 1, 1, 0, 0)
    assert high.cooldown_skips == (5, 4, 3, 3, 2, 1, 0, 0)
    assert (low.fill_depths, high.fill_depths) == ((2, 1, 0), (4, 3, 2, 1, 0))
    low_plan = build_plan(8, 1, 16, frozenset(range(8)), FillConfig(backward_forward_ratio=1.0))
    high_plan = build_plan(8, 1, 16, frozenset(range(8)), FillConfig(backward_forward_ratio=3.0))
    assert low_plan != high_plan


def test_fills_stop_at_the_deepest_exit_stage_of_their_prefix():
    for exit_stages in _exit_subsets(8):
        fill = FillConfig(backward_forward_ratio=3.0)
        schedule = build_fill_schedule(8, 8, exit_stages, fill)
        plans = build_plans(8, 8, exit_stages, fill)
        for fill_index, depth in enumerate(schedule.fill_depths):
            assert depth in exit_stages and fill_index < schedule.warmup_budgets[depth]
            assert not any(
                s in exit_stages
                for s in range(depth + 1, 8)
                if fill_index < schedule.warmup_budgets[s]
            )
            for stage, plan in enumerate(plans):
                fills = [
                    a
                    for a in plan
                    if a.is_forward
                    and a.kind is ActionKind.FILL_FORWARD
                    and a.microbatch == fill_index
                ]
                assert len(fills) == (stage <= depth)
                assert all(a.send_output_to_next == (stage < depth) for a in fills)
        assert all(a.kind is not ActionKind.FILL_FORWARD for a in plans[-1])


def test_fills_without_an_exit_in_reach_are_dropped():
    schedule = build_fill_schedule(4, 4, frozenset({2, 3}), FillConfig())
    assert schedule.num_requested_warmup == 2 and schedule.num_effective_warmup == 0
    filled = build_plans(4, 4, frozenset({2, 3}), FillConfig(num_fill_cooldown_microbatches=0))
    assert filled == build_plans(4, 4, frozenset({2, 3}))


def test_zero_fills_is_plain_1f1b():
    for exit_stages in _exit_subsets(4):
        assert build_plans(4, 6, exit_stages, FillConfig(0, 0)) == build_plans(4, 6, exit_stages)


def test_cooldown_truncation_is_a_stop_gradient():
    schedule = build_fill_schedule(8, 10, frozenset({3}), FillConfig(0, 4))
    plans = build_plans(8, 10, frozenset({3}), FillConfig(0, 4))
    assert schedule.cooldown_skips == (4, 4, 3, 2, 2, 1, 0, 0)
    for stage, plan in enumerate(plans):
        backwards = {a.microbatch: a for a in plan if a.kind is B}
        assert sorted(backwards) == list(range(10 - schedule.cooldown_skips[stage]))
        for j, action in backwards.items():
            assert action.send_grad_to_prev == (stage > 0 and schedule.runs_backward(stage - 1, j))


# ---------------------------------------------------------------- argument validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_microbatches=0), "num_microbatches=0"),
        (dict(num_stages=0, stage=0), "num_stages=0"),
        (dict(stage=4), "stage=4"),
        (dict(stage=-1), "stage=-1"),
        (dict(stages_with_exits=frozenset({4})), r"stages_with_exits .*\[4\]"),
        (dict(mode="infer"), "mode='infer'"),
        (dict(mode="tune", stages_with_exits=frozenset()), "mode='tune'"),
        (dict(mode="eval", fill=FillConfig()), "mode='eval'"),
        (dict(num_microbatches=3, fill=FillConfig()), "num_microbatches=3 < num_stages=4"),
        (
            dict(num_stages=1, stage=0, stages_with_exits=frozenset({0}), fill=FillConfig()),
            "num_stages >= 2",
        ),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    arguments = dict(
        num_stages=4, stage=0, num_microbatches=8, stages_with_exits=frozenset({1}), fill=None
    )
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        build_plan(**arguments)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(num_fill_warmup_microbatches=-1), WARMUP_FLAG),
        (dict(num_fill_cooldown_microbatches=1.5), COOLDOWN_FLAG),
        (dict(backward_forward_ratio=0.0), "--backward-forward-ratio"),
        (dict(backward_forward_ratio=float("nan")), "--backward-forward-ratio"),
    ],
)
def test_bad_fill_config_raises(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        FillConfig(**kwargs)


def test_action_labels_and_flag_validation():
    assert str(Action(F, 3)) == "F3" and Action(B, 3).label == "B3"
    assert str(Action(ActionKind.FILL_FORWARD, 0)) == "FF0"
    assert str(Action(ActionKind.FILL_BACKWARD, 0)) == "FB0"
    with pytest.raises(ValueError, match="gradient communication"):
        Action(F, 0, recv_grad_from_next=True)
    with pytest.raises(ValueError, match="activation communication"):
        Action(B, 0, send_output_to_next=True)
    with pytest.raises(ValueError, match="talks to a stage that does not exist"):
        simulate([[Action(F, 0, recv_input_from_prev=True)]])


# ---------------------------------------------------------------- the simulator catches bugs


def _replace(plan, index, **changes):
    plan = list(plan)
    plan[index] = dataclasses.replace(plan[index], **changes)
    return plan


def test_simulator_reports_a_dropped_backward():
    plans = build_plans(4, 6, frozenset({1}))
    plans[2] = [a for a in plans[2] if a.label != "B3"]
    result = simulate(plans)
    assert not result.ok and result.deadlocked
    assert result.forwards_without_backward[2] == ("F3",)
    assert any(m.stage == 2 and m.expected == "B4" and m.found == "B3" for m in result.mismatches)
    assert any(s.stage == 1 and "gradient B3 from stage 2" in s.waiting_for for s in result.stuck)


def test_simulator_reports_swapped_forwards():
    plans = build_plans(3, 4, frozenset())
    i, k = (next(n for n, a in enumerate(plans[1]) if a.label == x) for x in ("F0", "F1"))
    plans[1][i], plans[1][k] = plans[1][k], plans[1][i]
    result = simulate(plans)
    assert [(m.stage, m.expected, m.found) for m in result.mismatches] == [(1, "F1", "F0")]
    assert "expected F1 on activation channel 0->1, head is F0" in result.describe()


def test_simulator_reports_a_missing_receive_as_leftover():
    plans = build_plans(2, 3, frozenset())
    plans[0] = _replace(plans[0], len(plans[0]) - 1, recv_grad_from_next=False)
    result = simulate(plans)
    assert not result.deadlocked and not result.ok
    assert result.leftover_messages == ("B2 on gradient channel 1->0",)


def test_simulator_reports_backward_before_forward():
    plan = [Action(B, 0), Action(F, 0)]
    result = simulate([plan])
    assert result.order_errors == ("stage 0: B0 runs before its forward",)


def test_simulator_rejects_fills_placed_after_the_first_steady_forward_on_every_stage():
    """The naive placement (every stage: warm-up, first steady forward, then FF..., FB...)
    disagrees on channel order: stage s-1 sends F_{P-s} before FF0, stage s wants FF0 first."""
    plans = build_plans(4, 8, frozenset({0, 1, 2}), FillConfig(2, 0))
    naive = []
    for stage, plan in enumerate(plans):
        fills = [a for a in plan if a.kind is ActionKind.FILL_FORWARD]
        rest = [a for a in plan if a.kind is not ActionKind.FILL_FORWARD]
        first_steady = next(i for i, a in enumerate(rest) if a.label == f"F{4 - stage - 1}")
        naive.append(rest[: first_steady + 1] + fills + rest[first_steady + 1 :])
    assert naive != plans
    result = simulate(naive)
    assert result.mismatches and result.mismatches[0].stage == 1
    assert (result.mismatches[0].expected, result.mismatches[0].found) == ("FF0", "F3")


# ---------------------------------------------------------------- timing


@pytest.mark.parametrize(
    "num_stages, num_microbatches, ratio", [(4, 8, 2.0), (8, 8, 1.0), (3, 9, 3.0)]
)
def test_timed_1f1b_makespan(num_stages, num_microbatches, ratio):
    plans = build_plans(num_stages, num_microbatches, frozenset({1}))
    result = simulate(plans, StageCosts.from_ratio(ratio))
    assert result.makespan == (num_microbatches + num_stages - 1) * (1 + ratio)
    assert result.idle_times == ((num_stages - 1) * (1 + ratio),) * num_stages


def test_timed_fills_fit_in_the_bubble_p4_r2():
    exit_stages = frozenset({0, 1, 2})
    costs = StageCosts.from_ratio(2.0)
    plain = simulate(build_plans(4, 8, exit_stages), costs)
    warmup = simulate(build_plans(4, 8, exit_stages, FillConfig(2, 0)), costs)
    both = simulate(build_plans(4, 8, exit_stages, FillConfig(2, 2)), costs)
    assert plain.makespan == warmup.makespan == 33.0  # two extra fills, no extra time
    assert sum(plain.idle_times) - sum(warmup.idle_times) == 2 * (1 + 2.0) + 1 * (1 + 2.0)
    assert both.makespan == 29.0  # stage 0 skips two backwards at the end
    assert "FF0" in format_timeline(warmup, time_per_char=1 / 3)


def test_warmup_fills_never_lengthen_the_iteration():
    for num_stages, ratio in itertools.product((2, 3, 4, 6, 8), (0.5, 1.0, 2.0, 3.0)):
        costs = StageCosts.from_ratio(ratio)
        for exit_stages in _exit_subsets(num_stages)[:8]:
            plain = simulate(build_plans(num_stages, 2 * num_stages, exit_stages), costs).makespan
            fill = FillConfig(num_fill_cooldown_microbatches=0, backward_forward_ratio=ratio)
            filled = simulate(build_plans(num_stages, 2 * num_stages, exit_stages, fill), costs)
            assert filled.makespan == plain, (num_stages, ratio, sorted(exit_stages))
