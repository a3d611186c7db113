"""Timing the runners, and counting and timing the model's module calls.

:func:`measure` runs, in this order: one untimed full-decoding run of the first batch
(first-call costs); a *profile* run of every row with a :class:`ModuleProfiler` attached (it is
also the row's warm-up: every shape the row uses has been seen once before timing); then
``repeats`` timed rounds without hooks, each running every row once, the starting row rotating
from round to round so that load on a shared machine hits all rows alike. A timed run is the
runner call between two ``time.perf_counter`` reads (and barriers when there are several ranks,
so it is the slowest rank's time); ``time.process_time`` is recorded beside it.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from megatron.early_exit.bench.generation.methods import EngineRunner, MethodSpec, Outputs
from megatron.early_exit.bench.generation.metrics import CallKey


class ModuleProfiler:
    """Counts every timed part of the engine's steps by ``(name, width)`` and times it, through
    the lean step's probe (``inference.lean.set_probe``: the embedding, each layer, each exit's
    parts, the final norm and head), synchronising the device before and after each part so
    that asynchronous kernels are charged to the part that launched them."""

    def __init__(self, model=None):
        from megatron.early_exit import platform

        self.synchronize = platform.synchronize
        self.calls: Counter[CallKey] = Counter()
        self.samples: list[tuple[CallKey, float]] = []

    def __enter__(self) -> ModuleProfiler:
        from megatron.early_exit.inference import lean

        lean.set_probe(self._probe)
        return self

    def __exit__(self, *exc) -> None:
        from megatron.early_exit.inference import lean

        lean.set_probe(None)

    @contextlib.contextmanager
    def _probe(self, name: str, width: int):
        self.synchronize()
        start = time.perf_counter()
        yield
        self.synchronize()
        self.calls[(name, width)] += 1
        self.samples.append(((name, width), time.perf_counter() - start))


@dataclass
class Measured:
    """Everything recorded for one row."""

    spec: MethodSpec
    outputs: Outputs
    """Of the profile run."""
    calls: Counter[CallKey] | None = None
    """Module calls of the profile run (None for runners outside our engine)."""
    wall: list[float] = field(default_factory=list)
    """Seconds of each timed run."""
    cpu: list[float] = field(default_factory=list)
    """Process CPU seconds of each timed run."""
    deterministic: bool = True
    """Every timed run produced the profile run's tokens."""

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.outputs.tokens)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def measure(
    runners: dict[MethodSpec, Callable[[Sequence[Sequence[int]]], Outputs]],
    model,
    prompts: Sequence[Sequence[int]],
    repeats: int,
    warmup_prompts: int = 1,
    log: Callable[[str], None] = print,
) -> tuple[dict[MethodSpec, Measured], list[tuple[CallKey, float]]]:
    """Warm-up, profile and time every runner (see the module docstring); returns each row's
    record and every timed module call of the profile runs. The first runner must be full
    decoding."""
    specs = list(runners)
    started = time.perf_counter()
    runners[specs[0]](prompts[:warmup_prompts])
    records, samples = {}, []
    for spec in specs:
        runner = runners[spec]
        if isinstance(runner, EngineRunner):
            with ModuleProfiler(model) as profiler:
                outputs = runner(prompts)
            records[spec] = Measured(spec, outputs, profiler.calls)
            samples += profiler.samples
        else:
            records[spec] = Measured(spec, runner(prompts))
        first = getattr(runner, "first_call_s", None)
        note = f" (first call {first:.1f} s)" if first is not None else ""
        log(f"  [{time.perf_counter() - started:6.1f} s] profiled {spec.label}{note}")
    for index in range(repeats):
        for spec in specs[index % len(specs) :] + specs[: index % len(specs)]:
            _barrier()
            wall, cpu = time.perf_counter(), time.process_time()
            outputs = runners[spec](prompts)
            _barrier()
            record = records[spec]
            record.wall.append(time.perf_counter() - wall)
            record.cpu.append(time.process_time() - cpu)
            record.deterministic &= outputs.tokens == record.outputs.tokens
        log(f"  [{time.perf_counter() - started:6.1f} s] timed round {index + 1}/{repeats}")
    return records, samples


def gather_profiles(records: dict[MethodSpec, Measured], samples: list) -> list:
    """With several ranks: replace each record's calls by the sum over the pipeline stages
    (tensor-parallel rank 0 of each; TP ranks make the same calls) and return the timings of
    those ranks pooled. Collective. With one rank: ``samples`` unchanged."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return samples
    from megatron.core import parallel_state

    calls = {spec: r.calls for spec, r in records.items() if r.calls is not None}
    gathered = [None] * dist.get_world_size()
    mine = (parallel_state.get_tensor_model_parallel_rank(), calls, samples)
    dist.all_gather_object(gathered, mine)
    totals = {spec: Counter() for spec in calls}
    pooled = []
    for tp_rank, rank_calls, rank_samples in gathered:
        if tp_rank == 0:
            for spec, counter in rank_calls.items():
                totals[spec].update(counter)
            pooled += rank_samples
    for spec, counter in totals.items():
        records[spec].calls = counter
    return pooled
