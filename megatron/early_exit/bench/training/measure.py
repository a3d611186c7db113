"""Round-robin timing and per-stage memory of a suite's configurations, on spawned ranks."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import time

from megatron.early_exit.bench.training.cases import SEED, SUITES, Case, Settings
from megatron.early_exit.launch import run_distributed

# ------------------------------------------------------------------------------ measurement


class SavedActivationTracker:
    """Peak bytes of distinct non-parameter storages saved for backward while active.

    The pack hook wraps each saved tensor in a :class:`_SavedRef`; the ref dies when autograd frees
    the graph node holding it, which is when the storage stops being held for backward.
    """

    def __init__(self, parameters):
        self._excluded = {p.untyped_storage().data_ptr() for p in parameters}
        self._live: dict[int, list[int]] = {}  # storage pointer -> [refs, bytes]
        self.current = 0
        self.peak = 0

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self._excluded:
            return tensor
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [1, nbytes]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[0] += 1
        return _SavedRef(self, key, tensor)

    def _release(self, key: int) -> None:
        entry = self._live[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self._live[key]
            self.current -= entry[1]

    @contextlib.contextmanager
    def active(self):
        import torch

        unpack = lambda packed: packed.tensor if isinstance(packed, _SavedRef) else packed
        with torch.autograd.graph.saved_tensors_hooks(self._pack, unpack):
            yield self


class _SavedRef:
    __slots__ = ("tracker", "key", "tensor")

    def __init__(self, tracker: SavedActivationTracker, key: int, tensor):
        self.tracker, self.key, self.tensor = tracker, key, tensor

    def __del__(self):
        self.tracker._release(self.key)


@contextlib.contextmanager
def peak_memory_window():
    """Yields a dict whose ``bytes`` is set, on exit, to the peak memory growth in the window
    (GPU: peak allocated - allocated at entry; CPU: peak RSS - RSS at entry; None if unknown)."""
    import torch

    from megatron.early_exit import platform

    result: dict = {"bytes": None}
    if platform.device().type != "cpu":
        platform.synchronize()
        start = torch.accelerator.memory_allocated()
        platform.reset_peak_memory()
        yield result
        platform.synchronize()
        result["bytes"] = platform.peak_memory_bytes() - start
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages: RSS ~ live memory
    start = _reset_rss_peak()
    yield result
    peak = _proc_status_kib("VmHWM")
    if start is not None and peak is not None:
        result["bytes"] = (peak - start) * 1024


def _reset_rss_peak() -> int | None:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        return None
    return _proc_status_kib("VmRSS")


def _proc_status_kib(name: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _timed(case: Case) -> tuple[float, float]:
    """(wall seconds of the slowest rank, CPU seconds of this rank) for one iteration."""
    import torch.distributed as dist

    from megatron.early_exit import platform

    gc.collect()
    dist.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    case.run()
    platform.synchronize()
    cpu = time.process_time() - cpu_start  # gloo blocks without spinning: waits cost no CPU
    dist.barrier()
    return time.perf_counter() - start, cpu


def measure(cases: list[Case], settings: Settings) -> dict:
    """Round-robin timing, then one memory iteration per case; this rank's numbers."""
    wall: dict[str, list[float]] = {c.name: [] for c in cases}
    cpu: dict[str, list[float]] = {c.name: [] for c in cases}
    for round_index in range(settings.warmup + settings.iters):
        shift = round_index % len(cases)
        for case in cases[shift:] + cases[:shift]:
            elapsed, cpu_seconds = _timed(case)
            if round_index >= settings.warmup:
                wall[case.name].append(elapsed)
                cpu[case.name].append(cpu_seconds)
    memory = {}
    for case in cases:
        tracker = SavedActivationTracker(case.parameters())
        gc.collect()
        with peak_memory_window() as window, tracker.active():
            case.run()
        memory[case.name] = {"saved": tracker.peak, "peak": window["bytes"]}
    return {"wall": wall, "cpu": cpu, "memory": memory}


# ------------------------------------------------------------------------------------ ranks


def _suite_worker(rank: int, world_size: int, suite: str, settings: Settings) -> dict | None:
    import torch

    from megatron.early_exit import platform

    platform.initialize(1, world_size, seed=SEED)  # untied exits: no extra embedding stages
    cases = SUITES[suite][1](settings)
    local = measure(cases, settings)
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, (local["cpu"], local["memory"]))
    if rank != 0:
        return None
    return {
        "wall": local["wall"],
        "cpu": [cpu for cpu, _ in gathered],
        "memory": [memory for _, memory in gathered],
        "extra": {c.name: (c.extra_microbatches, c.skipped_backwards) for c in cases},
    }


def run_suite(suite: str, settings: Settings, timeout_s: float) -> dict:
    """Spawn the suite's ranks; return rank 0's result (``launch.DistributedError``, a
    RuntimeError, with the failing rank's traceback)."""
    world_size = SUITES[suite][0]
    num_threads = max(1, (os.cpu_count() or 1) // world_size)
    results = run_distributed(
        _suite_worker, world_size, suite, settings, timeout_s=timeout_s, num_threads=num_threads
    )
    return results[0]
