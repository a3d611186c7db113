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

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from megatron.early_exit.bench.generation import metrics
from megatron.early_exit.bench.generation.methods import EngineRunner, MethodSpec, Outputs
from megatron.early_exit.bench.generation.metrics import CallKey


def profiled_modules(model) -> list[tuple[str, torch.nn.Module, int]]:
    """``(call-key name, module, sequence dim of its first input)`` of every module the cost
    model prices, among those this pipeline stage holds."""
    out: list[tuple[str, torch.nn.Module, int]] = []
    if model.pre_process:
        out.append((metrics.EMBEDDING, model.embedding, 1))  # input_ids [b, n]
    out += [(metrics.LAYER, layer, 0) for layer in model.decoder.layers]  # [n, b, h]
    for exit_config in model.local_exit_configs:
        head = model.exit_heads[exit_config.key]
        prefix = metrics.exit_module(exit_config.depth)
        out += [(f"{prefix}/{name}", child, 0) for name, child in head.named_children()]
    if model.post_process:
        if model.decoder.final_layernorm is not None:
            out.append((f"{metrics.FINAL}/norm", model.decoder.final_layernorm, 0))
        out.append((f"{metrics.FINAL}/output_layer", model.output_layer, 0))
    return out


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


class ModuleProfiler:
    """Forward hooks that count every call of the profiled modules by ``(name, width)`` and
    time it, synchronising the device before and after each call so that asynchronous kernels
    are charged to the module that launched them."""

    def __init__(self, model):
        from megatron.early_exit import platform

        self.modules = profiled_modules(model)
        self.synchronize = platform.synchronize
        self.calls: Counter[CallKey] = Counter()
        self.samples: list[tuple[CallKey, float]] = []
        self._handles: list = []
        self._started: dict[int, tuple[CallKey, float]] = {}

    def __enter__(self) -> ModuleProfiler:
        for name, module, seq_dim in self.modules:
            pre = module.register_forward_pre_hook(self._pre(name, seq_dim), with_kwargs=True)
            self._handles += [pre, module.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre(self, name: str, seq_dim: int):
        def hook(module, args, kwargs):
            tensor = _first_tensor(args, kwargs)
            width = int(tensor.shape[seq_dim]) if tensor is not None else 0
            self.synchronize()
            self._started[id(module)] = ((name, width), time.perf_counter())

        return hook

    def _post(self, module, args, output) -> None:
        self.synchronize()
        key, start = self._started.pop(id(module))
        self.calls[key] += 1
        self.samples.append((key, time.perf_counter() - start))


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
        log(f"  [{time.perf_counter() - started:6.1f} s] profiled {spec.label}")
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
