"""The tests' view of ``megatron.early_exit.launch``, plus :func:`gather_dicts` and
:func:`torchrun_command`.

A test module runs *one* spawn per layout (process start and ``import megatron.core`` cost seconds
per rank) and performs many checks inside it; the worker returns ``{check_name: detail}`` and the
pytest tests assert on the entries. Workers must be module-level functions (spawn pickles them by
reference) in import-safe modules.
"""

from __future__ import annotations

import sys

from megatron.early_exit.launch import DistributedError, free_port, run_distributed

__all__ = ["DistributedError", "free_port", "gather_dicts", "run_distributed", "torchrun_command"]


def torchrun_command(num_processes: int) -> list[str]:
    """``python -m torch.distributed.run`` over ``num_processes`` local ranks, to be followed by
    the script and its flags. ``--standalone``: torchrun's agent opens its store on port 0 (the
    OS picks a free port as it binds) and the ranks join that store, so no port is chosen in
    advance for another process to take (``--master-port <free_port()>`` flaked so)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(num_processes),
    ]  # fmt: skip


def gather_dicts(local: dict) -> dict:
    """Inside a rank: the union of every rank's dict (all ranks get the same result)."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged
