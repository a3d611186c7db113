"""Tensor-parallel layout of megatron-core parameters: split a full tensor the way megatron-core
does, and gather shards back into the full tensor.

megatron-core tags TP-sharded parameters with ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride``. A strided parameter (SwiGLU's ``linear_fc1`` has stride 2: each rank holds
a slice of the gate *and* of the up projection) is cut into ``world * stride`` chunks along the
partition dimension and rank ``r`` holds chunks ``r, r + world, ...``.
"""

from __future__ import annotations

import torch


def is_tensor_parallel(param: torch.Tensor) -> bool:
    """True when megatron-core shards ``param`` over the TP group."""
    return bool(getattr(param, "tensor_model_parallel", False))


def shard(full: torch.Tensor, param: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """The part of ``full`` that TP rank ``rank`` holds for a parameter laid out like ``param``."""
    if not is_tensor_parallel(param) or world_size == 1:
        return full
    dim = param.partition_dim
    stride = getattr(param, "partition_stride", 1)
    chunk = full.shape[dim] // (world_size * stride)
    pieces = torch.split(full, chunk, dim=dim)
    return torch.cat(pieces[rank::world_size], dim=dim)


def unshard(shards: list[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from every TP rank's shard, in rank order."""
    world_size = len(shards)
    if not is_tensor_parallel(param) or world_size == 1:
        return shards[0]
    dim = param.partition_dim
    stride = getattr(param, "partition_stride", 1)
    per_rank = [torch.chunk(s, stride, dim=dim) for s in shards]
    ordered = [per_rank[r][k] for k in range(stride) for r in range(world_size)]
    return torch.cat(ordered, dim=dim)


def gather(local: torch.Tensor, param: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather a TP-sharded tensor (a parameter or its gradient) into the full tensor."""
    import torch.distributed as dist

    if not is_tensor_parallel(param) or group is None or dist.get_world_size(group) == 1:
        return local
    shards = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, local.contiguous(), group=group)
    return unshard(shards, param)
