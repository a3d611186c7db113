"""Start a group of local ranks and collect what each returns; pick a free port.

Used by the distributed tests (``tests/distributed/harness.py``) and the training benchmark
(``bench/training``). Each rank is a spawned process with MASTER_ADDR=127.0.0.1, MASTER_PORT,
RANK, LOCAL_RANK and WORLD_SIZE set, so ``platform.initialize`` forms the group over the
platform's backend (gloo on CPU, NCCL on GPU, one device per local rank). The function a rank
runs must be a module-level function of an import-safe module (spawn pickles it by reference).

Only the standard library is imported here: ``platform`` imports :func:`free_port`, and a rank
imports ``torch`` and ``platform`` itself, after its environment is set.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

DEFAULT_TIMEOUT_S = 600.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DistributedError(RuntimeError):
    """A rank raised (the message holds its traceback), or the group did not finish in time."""


def _rank_main(
    rank: int, world_size: int, port: int, num_threads: int, fn: Callable, args: tuple, queue
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    try:
        import torch

        torch.set_num_threads(num_threads)
        queue.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # report every failure, assertion errors included, to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        _destroy_group()


def _destroy_group() -> None:
    """Tear down what ``platform.initialize`` set up, if anything (no megatron import if not)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            from megatron.early_exit import platform

            platform.destroy()
    except Exception:
        pass


def run_distributed(
    fn: Callable,
    world_size: int,
    *args: Any,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    num_threads: int = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return each result.

    Each rank uses ``num_threads`` torch threads. A rank's process group (if it formed one) is
    destroyed after ``fn`` returns. Raises :class:`DistributedError` with the traceback of the
    first failing rank (the others are then likely stuck in a collective and are killed), or
    when no rank reports for ``timeout_s`` seconds.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, port, num_threads, fn, args, queue))
        for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    failures: list[str] = []
    try:
        for _ in range(world_size):
            rank, ok, payload = queue.get(timeout=timeout_s)
            if not ok:
                failures.append(f"--- rank {rank} ---\n{payload}")
                break
            results[rank] = payload
    except Exception as exc:  # queue.Empty: a rank hung
        failures.append(f"timed out after {timeout_s}s waiting for ranks ({exc!r})")
    finally:
        for proc in procs:
            proc.join(timeout=10 if not failures else 0.5)
            if proc.is_alive():
                proc.kill()
    if failures:
        raise DistributedError("\n".join(failures))
    return [results[r] for r in range(world_size)]
