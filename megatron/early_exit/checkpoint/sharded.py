"""Reading sharded checkpoints, whole or in part (EE-Tuning on the first layers only)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException as DCPCheckpointException

from megatron.early_exit.checkpoint.record import CheckpointError
from megatron.early_exit.config import EarlyExitTransformerConfig


def read_sharded(request: dict, path: Path, *, partial: bool = False) -> tuple[dict, set]:
    """``dist_checkpointing.load`` of ``request``; returns what was read and the requested keys
    the checkpoint lacks. ``partial``: the ranks together read only part of some tensors (the
    check that every shard is read exactly once is skipped)."""
    try:
        loaded, _, unexpected = dist_checkpointing.load(
            request,
            str(path),
            strict=StrictHandling.RETURN_UNEXPECTED,
            validate_access_integrity=not partial,
        )
    except (Exception, DCPCheckpointException) as exc:  # DCP's is a BaseException
        raise CheckpointError(
            f"checkpoint {path} could not be loaded (incomplete, corrupted, or tensor "
            f"shapes that do not fit this model): {type(exc).__name__}: {exc}"
        ) from exc
    return loaded, unexpected


_LAYERS_PREFIX = "decoder.layers."
# Checkpoint keys that are not the backbone: exit heads (a run keeps only its own), optimizer
# state and RNG states (see save_checkpoint).
_NOT_BACKBONE_PREFIXES = ("exit_heads.", "optimizer.", "rng_state")


@dataclass(frozen=True)
class PartialBackbone:
    """The trainer's model holds only the first ``trainer.config.num_layers`` layers of the
    model ``config`` describes, and no final norm or output layer.

    This is EE-Tuning with ``--tune-exit-pipeline-parallel-size``: the backbone is frozen and
    nothing after the deepest exit has a loss, so the run builds only the layers up to it.

    Loading reads only what the model holds. megatron-core stores the decoder's layers stacked:
    one tensor per layer parameter with a leading layer axis (``decoder.layers.mlp.linear_fc2.
    weight`` is ``[num_layers, h, f]``), and each layer is one shard of it. The model's layers
    are requested as shards of the checkpoint's layer axis (:func:`widen_layer_axis`). Two
    megatron-core checks assume that the ranks together read every shard, so this read skips
    them: the access-integrity validation, and the regular-grid conversion to torch's
    ShardedTensor, which fails in a one-process run with "Number of local shards". The layer
    shards are therefore requested as free-form chunks (:func:`partial_read_request`).

    Saving writes a complete checkpoint of ``config``'s model, the one a full-model run would
    write. It holds the model's own tensors and every backbone tensor the model does not hold:
    the later layers, the final norm, an untied output layer, and anything else the source
    checkpoint has outside exits, optimizer and RNG state. These are read again from ``source``
    at each save (the backbone is frozen, so they are the source's values), into host memory
    spread over the ranks, and are dropped after the save. They are written in the run's
    parameter dtype, as a full-model run would write them. The usual staging directory and
    atomic publish apply. Like a full-model EE-Tuning save, the checkpoint has no optimizer
    state for the backbone (frozen parameters have none).
    """

    config: EarlyExitTransformerConfig
    """The complete model (all layers, final norm, output layer). A load without ``finetune``
    must match it, and a save records it."""
    source: Path
    """The checkpoint (an iteration directory) that saves copy the untouched tensors from."""


def _is_stacked_layer(entry) -> bool:
    return getattr(entry, "key", "").startswith(_LAYERS_PREFIX)


def widen_layer_axis(sharded_state_dict, num_layers: int, layer: int | None = None):
    """Stacked decoder-layer entries (of a model with fewer layers) as shards of the
    ``num_layers``-layer checkpoint tensors, moved to global ``layer`` if given. Other entries
    are returned unchanged."""
    return dict_list_map_outplace(
        lambda entry: _widen_entry(entry, num_layers, layer), sharded_state_dict
    )


def _widen_entry(entry, num_layers: int, layer: int | None):
    if not _is_stacked_layer(entry):
        return entry
    if isinstance(entry, ShardedTensorFactory):  # e.g. SwiGLU's fc1 under TP: built at save/load
        build = entry.build_fn

        def build_fn(*args):
            return widen_layer_axis(build(*args), num_layers, layer)

        return dataclasses.replace(entry, build_fn=build_fn)
    offset = entry.global_offset if layer is None else (layer, *entry.global_offset[1:])
    shape = (num_layers, *entry.global_shape[1:])
    if isinstance(entry, ShardedObject):
        return dataclasses.replace(entry, global_shape=shape, global_offset=offset)
    assert isinstance(entry, ShardedTensor) and entry.prepend_axis_num >= 1, entry
    grid = (num_layers, *entry.axis_fragmentations[1:])
    return dataclasses.replace(
        entry, global_shape=shape, global_offset=offset, axis_fragmentations=grid
    )


def partial_read_request(entry):
    """A request that reads part of the stacked layer tensors, whatever the number of ranks.
    Factories are applied here, and each stacked tensor becomes a free-form chunk: no regular
    grid, and its prepended layer axis made a real axis of size 1. Returns the request and the
    function that turns what was read into the model's tensors (entries the checkpoint lacks
    are absent)."""
    if isinstance(entry, dict):
        parts = {key: partial_read_request(value) for key, value in entry.items()}
        return (
            {key: request for key, (request, _) in parts.items()},
            lambda loaded: {key: parts[key][1](value) for key, value in loaded.items()},
        )
    if isinstance(entry, list):  # a factory's pieces: all share one key, read all or none
        parts = [partial_read_request(value) for value in entry]
        return (
            [request for request, _ in parts],
            lambda loaded: [f(v) for (_, f), v in zip(parts, loaded, strict=True)],
        )
    if isinstance(entry, ShardedTensorFactory):
        request, finish = partial_read_request(entry.build())
        return request, lambda loaded: entry.merge_fn(finish(loaded))
    if isinstance(entry, ShardedTensor) and _is_stacked_layer(entry):
        local_shape = (1,) * entry.prepend_axis_num + tuple(entry.local_shape)
        chunk = dataclasses.replace(
            entry,
            data=None if entry.data is None else entry.data.reshape(local_shape),
            local_shape=local_shape,
            prepend_axis_num=0,
            axis_fragmentations=None,
        )
        return chunk, lambda tensor: tensor.reshape(entry.local_shape)
    return entry, lambda value: value


def untouched_backbone(partial: PartialBackbone, model, model_sd: dict) -> dict:
    """Sharded entries of ``partial.config``'s model that ``model`` does not hold, with their
    values read from ``partial.source``. Collective. Each entry goes to one rank: a later layer
    to one (pipeline stage, data-parallel rank) group, round robin, in the TP shards of the
    model's own layers; any other tensor or object whole to one rank."""
    if not (partial.source / ".metadata").is_file():
        raise CheckpointError(
            f"checkpoint {partial.source} is gone: a save of a model that holds only the first "
            f"{model.config.num_layers} layers copies the rest of the model from it"
        )
    wanted = {
        **_later_layers(partial.config.num_layers, model.config.num_layers, model_sd),
        **_absent_backbone_entries(partial, model_sd),
    }
    request, finish = partial_read_request(wanted)
    loaded, _ = read_sharded({"model": request}, partial.source, partial=True)
    values = finish(loaded.get("model", {}))
    entries = {}
    for key, entry in wanted.items():
        if key in values:
            entries[f"untouched.{key}"] = dataclasses.replace(entry, data=values[key])
        elif isinstance(entry, ShardedObject):  # e.g. extra state the source did not save
            entries[f"untouched.{key}"] = entry
        else:
            raise CheckpointError(
                f"checkpoint {partial.source} has no {entry.key}, which the complete model "
                "needs; it cannot be copied into the saved checkpoint"
            )
    return entries


def _later_layers(num_layers: int, num_held: int, model_sd: dict) -> dict:
    """This rank's share of layers ``num_held..num_layers-1``: copies of the model's first
    local layer entries moved there, with empty host buffers and as the one saved replica."""
    first = f"{_LAYERS_PREFIX}0."
    template = {key[len(first) :]: e for key, e in model_sd.items() if key.startswith(first)}
    dp_size = parallel_state.get_data_parallel_world_size()
    num_groups = parallel_state.get_pipeline_model_parallel_world_size() * dp_size
    group = parallel_state.get_pipeline_model_parallel_rank() * dp_size
    group += parallel_state.get_data_parallel_rank()
    entries = {}
    for layer in range(num_held, num_layers):
        if (layer - num_held) % num_groups != group:
            continue
        for name, entry in template.items():
            if not isinstance(entry, ShardedObject):
                entry = dataclasses.replace(entry, data=torch.empty_like(entry.data, device="cpu"))
            entry = dataclasses.replace(entry, replica_id=_main_replica(entry.replica_id))
            entries[f"{_LAYERS_PREFIX}{layer}.{name}"] = _widen_entry(entry, num_layers, layer)
    return entries


def _main_replica(replica_id):
    """The replica id of the one saved copy of this rank's shard. megatron-core's ids are
    (pipeline, tensor, data); only the tensor part stays, since a tensor replicated over TP is
    saved by TP rank 0 only."""
    if isinstance(replica_id, int):
        return 0
    return tuple(r if i == 1 else 0 for i, r in enumerate(replica_id))


def _absent_backbone_entries(partial: PartialBackbone, model_sd: dict) -> dict:
    """Backbone tensors and objects of ``partial.source`` that no rank's model has a key of
    (final norm, output layer, ...): each one whole, on one rank, round robin."""
    held_here = {entry.key for entry in nested_values(model_sd)}
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, held_here)
    held = set().union(*everyone)
    metadata = load_sharded_metadata(str(partial.source))
    absent = sorted(
        (unique_key, entry)
        for unique_key, entry in metadata.items()
        if not entry.key.startswith(_NOT_BACKBONE_PREFIXES) and entry.key not in held
    )
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    entries = {}
    for index, (unique_key, entry) in enumerate(absent):
        if index % world_size != rank:
            continue
        if isinstance(entry, ShardedObject):
            entries[unique_key] = dataclasses.replace(entry, replica_id=0)
            continue
        dtype = partial.config.params_dtype if entry.dtype.is_floating_point else entry.dtype
        buffer = torch.empty(entry.global_shape, dtype=dtype, device="cpu")
        entries[unique_key] = ShardedTensor.from_rank_offsets(entry.key, buffer)
    return entries
