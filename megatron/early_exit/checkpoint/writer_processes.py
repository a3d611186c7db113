"""Tie the lifetimes of megatron-core's checkpoint writer processes to the trainer's.

``dist_checkpointing.save`` (the ``torch_dist`` format) starts helper processes: a
``multiprocessing`` manager (spawned once, then kept for the process's lifetime) that carries the
writers' results, and, for every save, writer processes forked from the trainer. When the trainer
is killed (``kill -9``, a SLURM pre-emption), none of them is told, and the manager never exits:
a crash-and-requeue loop on one node piles them up (about 1 GB each time).

:func:`tie_to_this_process` makes each of them die with its parent: the manager is started by us
(megatron-core picks up an existing results queue) with an initializer, and every process forked
afterwards runs the same hook, which asks the kernel (Linux ``PR_SET_PDEATHSIG``) to kill it
when the process that created it ends. A writer killed that way leaves only the ``*.incomplete``
staging directory, which the next save or start-up removes (``store.sweep_stale``). Elsewhere than
Linux the hook does nothing (there is no such kernel feature) and this is logged once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_tied = False


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent ends (Linux; else a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # the parent ended before the request took effect
        os._exit(1)


def tie_to_this_process() -> None:
    """Start megatron-core's writer results manager ourselves and tie every later fork to its
    parent (idempotent; call before the first ``dist_checkpointing.save``)."""
    global _tied
    if _tied:
        return
    _tied = True
    if not sys.platform.startswith("linux"):
        logger.info("checkpoint writer processes cannot be tied to the trainer on %s", sys.platform)
        return
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    os.register_at_fork(after_in_child=die_with_parent)
    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=die_with_parent)
        filesystem_async._results_queue = manager.Queue()
