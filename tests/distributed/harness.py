"""The tests' view of ``megatron.early_exit.launch``, plus :func:`gather_dicts`.

A test module runs *one* spawn per layout (process start and ``import megatron.core`` cost seconds
per rank) and performs many checks inside it; the worker returns ``{check_name: detail}`` and the
pytest tests assert on the entries. Workers must be module-level functions (spawn pickles them by
reference) in import-safe modules.
"""

from __future__ import annotations

from megatron.early_exit.launch import DistributedError, free_port, run_distributed

__all__ = ["DistributedError", "free_port", "gather_dicts", "run_distributed"]


def gather_dicts(local: dict) -> dict:
    """Inside a rank: the union of every rank's dict (all ranks get the same result)."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged
