"""Early-exit pipeline schedules: a pure plan per stage, bubble filling, and a simulator.

The torch-facing executor lives next to these modules; everything imported here is pure Python.
"""

from megatron.early_exit.pipeline.bubble_fill import (
    FillConfig,
    FillSchedule,
    build_fill_schedule,
    max_fill_microbatches,
)
from megatron.early_exit.pipeline.plan import (
    Action,
    ActionKind,
    build_plan,
    build_plans,
    format_plan,
)
from megatron.early_exit.pipeline.simulate import (
    SimulationResult,
    StageCosts,
    format_timeline,
    simulate,
)

__all__ = [
    "Action",
    "ActionKind",
    "FillConfig",
    "FillSchedule",
    "SimulationResult",
    "StageCosts",
    "build_fill_schedule",
    "build_plan",
    "build_plans",
    "format_plan",
    "format_timeline",
    "max_fill_microbatches",
    "simulate",
]
