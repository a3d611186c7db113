"""Start a group of local ranks and collect what each returns; pick a free port.

Used by the distributed tests (``tests/distributed/harness.py``) and the training benchmark
(``bench/training``). Each rank is a spawned process with MASTER_ADDR=127.0.0.1, MASTER_PORT,
RANK, LOCAL_RANK and WORLD_SIZE set, so ``platform.initialize`` forms the group over the
platform's backend (gloo on CPU, NCCL on GPU, one device per local rank). The function a rank
runs must be a module-level function of an import-safe module (spawn pickles it by reference).

The port is only free when :func:`free_port` closes it; rank 0 binds it seconds later (after
spawn and ``import torch``), and any process may take it in between (another test's
``free_port``, or an outgoing connection's ephemeral port). :func:`run_distributed` therefore
starts the whole group again on a fresh port when a rank fails with "address already in use"
(:func:`address_in_use`) while MASTER_PORT is still that port, at most ``PORT_ATTEMPTS``
launches in all; any other failure is raised at once.

Only the standard library is imported here: ``platform`` imports :func:`free_port`, and a rank
imports ``torch`` and ``platform`` itself, after its environment is set.
"""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

DEFAULT_TIMEOUT_S = 600.0
PORT_ATTEMPTS = 4
"""Launches :func:`run_distributed` tries, each on a fresh port, while the port was taken."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DistributedError(RuntimeError):
    """A rank raised (the message holds its traceback), or the group did not finish in time."""


class PortInUseError(DistributedError):
    """A rank could not bind the group's port: another process took it after :func:`free_port`
    closed it (raised by :func:`run_distributed` only once every attempt failed so)."""


def address_in_use(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from or while handling, is "address
    already in use": an ``OSError`` with errno EADDRINUSE (``platform``'s rendezvous binds the
    port itself) or torch's ``DistNetworkError`` naming EADDRINUSE (torch's TCPStore server,
    ``init_process_group`` with ``env://``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            return True
        if type(exc).__name__ == "DistNetworkError" and "EADDRINUSE" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


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
        queue.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException as exc:  # report every failure, assertion errors included, to the parent
        # Only the launch's own port is retried: a worker that picks its next port itself
        # (MASTER_PORT changed) would not be helped by starting it again.
        own_port = os.environ.get("MASTER_PORT") == str(port)
        status = "address_in_use" if own_port and address_in_use(exc) else "failed"
        queue.put((rank, status, traceback.format_exc()))
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

    When the first failure is "address already in use" (:func:`address_in_use`) with MASTER_PORT
    still the port :func:`free_port` chose (it was taken before rank 0 bound it), the group is
    killed and started again on a fresh port, ``fn`` from its beginning (it should form its
    group first, as every worker does), at most :data:`PORT_ATTEMPTS` launches in all; then
    :class:`PortInUseError`.
    """
    last = None
    for _ in range(PORT_ATTEMPTS):
        try:
            return _launch(fn, world_size, args, timeout_s, num_threads, free_port())
        except PortInUseError as error:
            last = error
    raise PortInUseError(f"all {PORT_ATTEMPTS} launches found their port taken; the last:\n{last}")


def _launch(
    fn: Callable, world_size: int, args: tuple, timeout_s: float, num_threads: int, port: int
) -> list[Any]:
    """One launch of :func:`run_distributed` on ``port``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, port, num_threads, fn, args, queue))
        for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    failures: list[str] = []
    port_in_use = False
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout_s)
            if status != "ok":
                failures.append(f"--- rank {rank} ---\n{payload}")
                port_in_use = status == "address_in_use"
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
        error = PortInUseError if port_in_use else DistributedError
        raise error("\n".join(failures))
    return [results[r] for r in range(world_size)]
