"""Spawn a group of CPU ranks over gloo and collect what each returns.

A test module runs *one* spawn per layout (process start and ``import megatron.core`` cost seconds
per rank) and performs many checks inside it; the worker returns ``{check_name: detail}`` and the
pytest tests assert on the entries. Workers must be module-level functions (spawn pickles them by
reference) in import-safe modules.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

DEFAULT_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
    except BaseException:  # report every failure, including assertion errors, to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        from megatron.early_exit import platform

        try:
            platform.destroy()
        except Exception:
            pass


def gather_dicts(local: dict) -> dict:
    """Inside a rank: the union of every rank's dict (all ranks get the same result)."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged


class DistributedError(RuntimeError):
    """A rank raised, or the group did not finish in time."""


def run_distributed(
    fn: Callable, world_size: int, *args: Any, timeout_s: float = DEFAULT_TIMEOUT_S
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return each result.

    Raises DistributedError with every failing rank's traceback.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue), daemon=False)
        for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    failures: list[str] = []
    try:
        for _ in range(world_size):
            rank, ok, payload = queue.get(timeout=timeout_s)
            if ok:
                results[rank] = payload
            else:
                failures.append(f"--- rank {rank} ---\n{payload}")
                break  # the others are likely stuck in a collective
    except Exception as exc:  # queue.Empty: a rank hung
        failures.append(f"timed out after {timeout_s}s waiting for ranks ({exc!r})")
    finally:
        for proc in procs:
            proc.join(timeout=5 if not failures else 0.5)
            if proc.is_alive():
                proc.kill()
    if failures:
        raise DistributedError("\n".join(failures))
    return [results[r] for r in range(world_size)]
