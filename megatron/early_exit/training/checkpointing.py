"""Checkpoints through megatron-core's dist_checkpointing (torch_dist backend).

Layout (Megatron's)::

    <dir>/latest_checkpointed_iteration.txt     "10": the newest complete checkpoint
    <dir>/iter_0000010/                         one dist_checkpointing checkpoint
        common.pt  metadata.json  .metadata  __*.distcp
    <dir>/iter_0000020.incomplete/              a save in progress or one that crashed

One checkpoint holds, under these state-dict keys:

* ``model``: the model's sharded state dict (TP/PP-resharded on load by dist_checkpointing;
  exit heads under split-independent ``exit_heads.<depth>.`` keys);
* ``optimizer``: the plain or the distributed optimizer; the latter in the
  ``fully_reshardable`` format (the only one that resumes correctly with torch AdamW, see
  :func:`apply_distributed_optimizer_checkpoint_fix`);
* ``scheduler``, ``iteration``;
* ``rng_state``: Python, NumPy, torch (and device) generators and megatron's RNG tracker, one
  entry per (pipeline, tensor, data)-parallel rank; restored only into the same layout;
* ``ee_llm``: what rebuilding the model needs without any command line (the config fields that
  define the network, the exits, vocab size, position embeddings, the caller's ``model_args``
  such as tokenizer info), the parallel layout, the optimizer kind and the caller's data
  position. :func:`read_checkpoint_info` reads it alone; :func:`config_from_checkpoint` turns
  it back into an :class:`EarlyExitTransformerConfig`.

A model that holds only the first layers of the checkpoint's model (EE-Tuning with
``--tune-exit-pipeline-parallel-size``) reads only those, and its saves are still complete
checkpoints: see :class:`PartialBackbone`.

Crash safety: every rank writes into ``iter_N.incomplete``; only when all ranks are done does
rank 0 rename it to ``iter_N`` and atomically replace the tracker file. A save that dies midway
leaves the previous checkpoint and the tracker untouched; loading follows the tracker, so it
never sees an incomplete directory. All ranks must see one shared ``save_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.activations import fast_gelu, quick_gelu, squared_relu
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.transformer.utils import openai_gelu
from torch.distributed.checkpoint.api import CheckpointException as DCPCheckpointException

from megatron.early_exit import platform
from megatron.early_exit.config import EarlyExitTransformerConfig, ExitHeadConfig
from megatron.early_exit.model.builder import unwrap_model

if TYPE_CHECKING:
    from megatron.early_exit.training.loop import Trainer

logger = logging.getLogger(__name__)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1
INCOMPLETE_SUFFIX = ".incomplete"
_REPLACED_SUFFIX = ".replaced"  # an older copy of the same iteration, kept until the swap is done

# The optimizer format every save uses and every load expects (see the module docstring).
_SHARDING_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
}

# Config fields that define the network function (enough to rebuild the model) and the early-exit
# training fields; layout and platform fields (parallel sizes, fusions, init device) are not
# recorded: the run that loads chooses them.
MODEL_CONFIG_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "normalization", "layernorm_epsilon", "layernorm_zero_centered_gamma",
    "add_bias_linear", "add_qkv_bias", "gated_linear_unit", "activation_func", "qk_layernorm",
    "apply_residual_connection_post_layernorm", "rotary_interleaved", "init_method_std",
    "hidden_dropout", "attention_dropout", "untie_embeddings_and_output_weights",
    "fp16", "bf16", "params_dtype",
)  # fmt: skip
EARLY_EXIT_CONFIG_FIELDS = (
    "exit_heads", "exit_loss_weight_warmup_iters", "exit_loss_weight_warmup_style",
    "include_final_loss", "dynamic_exit_loss_weight", "exit_kl_weight",
    "exit_confidence_loss_weight",
)  # fmt: skip
# Fields whose change makes the checkpoint's weights not fit (or mean something else); a load
# with a difference in any of them needs finetune=True.
_MUST_MATCH_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "normalization", "add_bias_linear", "add_qkv_bias", "gated_linear_unit",
    "activation_func", "qk_layernorm", "untie_embeddings_and_output_weights",
)  # fmt: skip
_EXIT_STRUCTURE_FIELDS = (
    "layer_number", "pre_exit", "structure", "untied", "confidence_hidden_size",
)  # fmt: skip
_EXIT_FIELD_DEFAULTS = {"confidence_hidden_size": 0}  # fields older checkpoints do not record
_MODEL_FIELDS = ("vocab_size", "max_sequence_length", "position_embedding_type", "rotary_base")
_ACTIVATIONS = {
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
    "squared_relu": squared_relu,
    "quick_gelu": quick_gelu,
    "fast_gelu": fast_gelu,
    "openai_gelu": openai_gelu,  # GPT-2's gelu_new (tanh approximation)
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used: missing, incomplete or corrupted, or saved
    for a different model."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about itself (read from its common state, no tensors loaded)."""

    path: Path
    iteration: int
    model_config: dict
    """Recorded config fields (:data:`MODEL_CONFIG_FIELDS` + :data:`EARLY_EXIT_CONFIG_FIELDS`)."""
    model: dict
    """vocab_size, max_sequence_length, position_embedding_type, rotary_base of the model."""
    model_args: dict
    """The caller's ``model_args`` (e.g. tokenizer info), as saved."""
    data_state: dict | None
    layout: dict
    """tensor/pipeline/data-parallel sizes of the run that saved."""
    optimizer: str | None
    """``"distributed"``, ``"plain"`` or None (saved before the first step: no optimizer state)."""


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------


def save_checkpoint(
    save_dir: str | os.PathLike,
    trainer: Trainer,
    *,
    data_state: dict | None = None,
    model_args: dict,
    partial: PartialBackbone | None = None,
) -> Path:
    """Save ``trainer`` (model, optimizer, scheduler, RNG, iteration) to
    ``save_dir/iter_<iteration>`` and point the tracker file at it. Collective: every rank calls.

    Args:
        data_state: the data position to resume from (JSON-able, the same on every rank, e.g.
            consumed samples); returned by :func:`read_checkpoint_info`.
        model_args: JSON-able facts the config does not hold that rebuilding the model needs
            (tokenizer type and files, ...); vocab size, sequence length and position embeddings
            are taken from the model itself (any of them given here must agree).
        partial: the model holds only the first layers of ``partial.config``'s model; the
            checkpoint written is still the complete model (see :class:`PartialBackbone`).

    Returns the published checkpoint directory.
    """
    if multiprocessing.current_process().daemon:
        raise CheckpointError(
            "save_checkpoint: dist_checkpointing writes through helper processes, which a "
            "daemonic process cannot start; run training in a non-daemonic process"
        )
    model = unwrap_model(trainer.model)
    _check_json("model_args", model_args)
    _check_json("data_state", data_state)
    _check_model_args_agree(model_args, _model_facts(model))
    root = Path(save_dir)
    final = root / iteration_dir_name(trainer.iteration)
    staging = final.with_name(final.name + INCOMPLETE_SUFFIX)
    _on_rank_zero(_prepare_staging_dir, root, staging)
    optimizer_kind = _optimizer_kind(trainer.optimizer) if _has_state(trainer.optimizer) else None
    if optimizer_kind == "distributed":
        apply_distributed_optimizer_checkpoint_fix()
    model_sd = model.sharded_state_dict(metadata=dict(_SHARDING_METADATA))
    if partial is not None:
        model_sd = _widen_layer_axis(model_sd, partial.config.num_layers)
    state = {
        "model": model_sd,
        "scheduler": trainer.scheduler.state_dict(),
        "iteration": trainer.iteration,
        "rng_state": _rng_sharded_object(_capture_rng_state()),
        "ee_llm": {
            "format_version": FORMAT_VERSION,
            "iteration": trainer.iteration,
            "model_config": config_to_dict(trainer.config if partial is None else partial.config),
            "model": _model_facts(model),
            "model_args": dict(model_args),
            "data_state": data_state,
            "layout": _layout(),
            "optimizer": optimizer_kind,
        },
    }
    if optimizer_kind is not None:  # before the first step there is no optimizer state
        state["optimizer"] = trainer.optimizer.sharded_state_dict(
            model_sd, is_loading=False, metadata=dict(_SHARDING_METADATA)
        )
    if partial is not None:  # after the optimizer's view of the model: these are no parameters
        state["model"] = {**model_sd, **_untouched_backbone(partial, model, model_sd)}
    dist_checkpointing.save(state, str(staging), content_metadata=dict(_SHARDING_METADATA))
    _on_rank_zero(_publish, root, staging, final, trainer.iteration)
    return final


def _prepare_staging_dir(root: Path, staging: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)  # left by a save that crashed
    staging.mkdir()


def _publish(root: Path, staging: Path, final: Path, iteration: int) -> None:
    """Make the finished ``staging`` directory the checkpoint of ``iteration`` (rank 0)."""
    for path in staging.iterdir():  # the shards are fsynced by their writers, common.pt is not
        if path.is_file():
            _fsync(path)
    _fsync(staging)
    if final.exists():  # saving an iteration again: keep the old copy until the new one is in
        replaced = final.with_name(final.name + _REPLACED_SUFFIX)
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
        os.rename(staging, final)
        shutil.rmtree(replaced)
    else:
        os.rename(staging, final)
    _fsync(root)
    tracker = root / TRACKER_FILENAME
    partial = tracker.with_name(tracker.name + ".tmp")
    with open(partial, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, tracker)
    _fsync(root)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _on_rank_zero(fn, *args) -> None:
    """Run ``fn`` on rank 0 only; every rank raises if it failed there."""
    error = None
    if torch.distributed.get_rank() == 0:
        try:
            fn(*args)
        except Exception as exc:  # reported to every rank below, so none hangs in a collective
            error = f"{type(exc).__name__}: {exc}"
    box = [error]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise CheckpointError(f"checkpoint {fn.__name__.strip('_')} failed on rank 0: {box[0]}")


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


def read_checkpoint_info(load_dir: str | os.PathLike) -> CheckpointInfo:
    """The newest complete checkpoint in ``load_dir`` (per the tracker file), without tensors.

    Raises CheckpointError naming the problem: no such directory, no tracker file, a tracker that
    names a missing or incomplete iteration, or an unreadable common state.
    """
    root = Path(load_dir)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    tracker = root / TRACKER_FILENAME
    if not tracker.is_file():
        raise CheckpointError(
            f"no {TRACKER_FILENAME} in {root}: not a checkpoint directory, or no save into it "
            "has finished"
        )
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} is corrupted: expected an iteration, got {text!r}")
    iteration = int(text)
    path = _iteration_dir(root, iteration)
    missing = [n for n in ("metadata.json", "common.pt", ".metadata") if not (path / n).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is incomplete or corrupted: {', '.join(missing)} missing"
        )
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupted: {exc}") from exc
    record = common.get("ee_llm") if isinstance(common, dict) else None
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} was not written by this version of EE-LLM's save_checkpoint "
            f"(format_version {None if record is None else record.get('format_version')}, "
            f"expected {FORMAT_VERSION})"
        )
    return CheckpointInfo(
        path=path,
        iteration=record["iteration"],
        model_config=record["model_config"],
        model=record["model"],
        model_args=record["model_args"],
        data_state=record["data_state"],
        layout=record["layout"],
        optimizer=record["optimizer"],
    )


def _iteration_dir(root: Path, iteration: int) -> Path:
    path = root / iteration_dir_name(iteration)
    if path.is_dir():
        return path
    replaced = path.with_name(path.name + _REPLACED_SUFFIX)
    if replaced.is_dir():  # a re-save of this iteration stopped between its two renames
        return replaced
    raise CheckpointError(
        f"{root / TRACKER_FILENAME} names iteration {iteration}, but {path} does not exist"
    )


def load_checkpoint(
    load_dir: str | os.PathLike,
    trainer: Trainer,
    *,
    finetune: bool = False,
    load_optimizer: bool = True,
    partial: PartialBackbone | None = None,
) -> int:
    """Load the newest checkpoint in ``load_dir`` into ``trainer``; returns the iteration to
    continue from. Collective: every rank calls. Any TP/PP layout loads any other.

    Without ``finetune``: the model must match the checkpoint's (architecture, exits, vocab,
    position embeddings) or CheckpointError lists the differences; restores model, optimizer and
    scheduler (unless ``load_optimizer=False``), iteration and, in the same parallel layout,
    the RNG states. With ``finetune``: loads only the model weights the checkpoint has (new exit
    heads keep their initialisation) and starts at iteration 0 (Megatron's ``--finetune``).

    With ``partial``, the model holds only the first layers of ``partial.config``'s model, which
    the checkpoint must match (unless ``finetune``); only those layers are read (see
    :class:`PartialBackbone`).

    Errors found before reading (missing/incomplete checkpoint, other model, other optimizer)
    leave ``trainer`` untouched; after a failed read its weights are undefined.
    """
    info = read_checkpoint_info(load_dir)
    model = unwrap_model(trainer.model)
    if not finetune:
        _check_same_model(info, trainer.config if partial is None else partial.config, model)
    with_scheduler = load_optimizer and not finetune
    with_optimizer = with_scheduler and info.optimizer is not None
    if with_optimizer:
        _check_optimizer_kind(info, trainer.optimizer)
    with_rng = not finetune and info.layout == _layout()
    if not finetune and not with_rng:
        logger.info(
            "checkpoint %s was saved with layout %s, this run is %s: RNG states not restored",
            info.path, info.layout, _layout(),
        )  # fmt: skip
    if with_optimizer and info.optimizer == "distributed":
        apply_distributed_optimizer_checkpoint_fix()
        _create_distributed_optimizer_state(trainer.optimizer)

    model_sd = model.sharded_state_dict(metadata=dict(_SHARDING_METADATA))
    if partial is not None:
        model_sd = _widen_layer_axis(model_sd, partial.config.num_layers)
    request: dict[str, Any] = {"model": model_sd}
    if with_optimizer:
        request["optimizer"] = trainer.optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=dict(_SHARDING_METADATA)
        )
    if with_rng:
        request["rng_state"] = _rng_sharded_object(None)
    finish = None
    if partial is not None:
        request["model"], finish = _partial_read_request(model_sd)
    loaded, unexpected = _read(request, info.path, partial=partial is not None)
    if finish is not None:
        loaded["model"] = finish(loaded["model"])
    if unexpected and not finetune:
        raise CheckpointError(
            f"checkpoint {info.path} lacks {len(unexpected)} tensors this model needs "
            f"(e.g. {sorted(unexpected)[:5]}); pass finetune=True to load only what it has"
        )
    _load_model_state(model, loaded["model"], finetune, unexpected)
    if with_optimizer:
        trainer.optimizer.load_state_dict(loaded["optimizer"])
    else:
        trainer.optimizer.reload_model_params()  # fp16/bf16 main params from the loaded model
    if with_scheduler:
        trainer.scheduler.load_state_dict(loaded["scheduler"])
    if with_rng:
        _restore_rng_state(loaded["rng_state"])
    trainer.iteration = 0 if finetune else int(loaded["iteration"])
    torch.distributed.barrier()
    return trainer.iteration


def _read(request: dict, path: Path, *, partial: bool = False) -> tuple[dict, set]:
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


def _load_model_state(model, state_dict: dict, finetune: bool, unexpected: set) -> None:
    result = model.load_state_dict(state_dict, strict=False)
    # Entries without tensors (empty _extra_state of local layers) may be absent: harmless.
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing and not finetune:
        raise CheckpointError(f"checkpoint has no values for {missing[:5]} ({len(missing)})")
    if finetune and (missing or unexpected):
        logger.info("finetune: %d model tensors kept their initialisation", len(missing))
    assert not result.unexpected_keys, result.unexpected_keys


# --------------------------------------------------------------------------------------------
# Partial backbones (EE-Tuning with --tune-exit-pipeline-parallel-size)
# --------------------------------------------------------------------------------------------

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
    are requested as shards of the checkpoint's layer axis (:func:`_widen_layer_axis`). Two
    megatron-core checks assume that the ranks together read every shard, so this read skips
    them: the access-integrity validation, and the regular-grid conversion to torch's
    ShardedTensor, which fails in a one-process run with "Number of local shards". The layer
    shards are therefore requested as free-form chunks (:func:`_partial_read_request`).

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


def _widen_layer_axis(sharded_state_dict, num_layers: int, layer: int | None = None):
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
            return _widen_layer_axis(build(*args), num_layers, layer)

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


def _partial_read_request(entry):
    """A request that reads part of the stacked layer tensors, whatever the number of ranks.
    Factories are applied here, and each stacked tensor becomes a free-form chunk: no regular
    grid, and its prepended layer axis made a real axis of size 1. Returns the request and the
    function that turns what was read into the model's tensors (entries the checkpoint lacks
    are absent)."""
    if isinstance(entry, dict):
        parts = {key: _partial_read_request(value) for key, value in entry.items()}
        return (
            {key: request for key, (request, _) in parts.items()},
            lambda loaded: {key: parts[key][1](value) for key, value in loaded.items()},
        )
    if isinstance(entry, list):  # a factory's pieces: all share one key, read all or none
        parts = [_partial_read_request(value) for value in entry]
        return (
            [request for request, _ in parts],
            lambda loaded: [f(v) for (_, f), v in zip(parts, loaded, strict=True)],
        )
    if isinstance(entry, ShardedTensorFactory):
        request, finish = _partial_read_request(entry.build())
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


def _untouched_backbone(partial: PartialBackbone, model, model_sd: dict) -> dict:
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
    request, finish = _partial_read_request(wanted)
    loaded, _ = _read({"model": request}, partial.source, partial=True)
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


# --------------------------------------------------------------------------------------------
# Model config record (for --use-checkpoint-args and the server)
# --------------------------------------------------------------------------------------------


def config_to_dict(config: EarlyExitTransformerConfig) -> dict:
    """The recorded config fields as JSON-able values (functions and dtypes by name)."""
    record = {}
    for name in MODEL_CONFIG_FIELDS + EARLY_EXIT_CONFIG_FIELDS:
        value = getattr(config, name)
        if name == "activation_func":
            value = value.__name__
        elif name == "params_dtype":
            value = str(value).removeprefix("torch.")
        elif name == "exit_heads":
            value = [dataclasses.asdict(e) for e in value]
        record[name] = value
    return record


def config_from_checkpoint(info: CheckpointInfo, **overrides) -> EarlyExitTransformerConfig:
    """Rebuild the checkpoint's EarlyExitTransformerConfig; ``overrides`` set the layout
    (``tensor_model_parallel_size``, ...) or change fields. Platform overrides apply."""
    fields = dict(info.model_config)
    activation = fields["activation_func"]
    if activation not in _ACTIVATIONS:
        raise CheckpointError(
            f"activation_func: the checkpoint's {activation!r} is not one of "
            f"{', '.join(_ACTIVATIONS)}; pass activation_func= explicitly"
        )
    fields["activation_func"] = _ACTIVATIONS[activation]
    if activation == "openai_gelu":  # megatron's fused bias-GeLU implements only plain GeLU
        fields["bias_activation_fusion"] = False
    fields["params_dtype"] = _DTYPES[fields["params_dtype"]]
    fields["exit_heads"] = tuple(ExitHeadConfig(**e) for e in fields["exit_heads"])
    fields.update(platform.config_overrides())
    fields.update(overrides)
    return EarlyExitTransformerConfig(**fields)


def _model_facts(model) -> dict:
    return {name: getattr(model, name, None) for name in _MODEL_FIELDS}


def _check_same_model(info: CheckpointInfo, config: EarlyExitTransformerConfig, model) -> None:
    saved, current = info.model_config, config_to_dict(config)
    differences = [
        f"{name}: checkpoint {saved.get(name)!r}, this run {current[name]!r}"
        for name in _MUST_MATCH_FIELDS
        if saved.get(name) != current[name]
    ]
    saved_exits, current_exits = (
        _exit_structure(saved["exit_heads"]),
        _exit_structure(current["exit_heads"]),
    )
    if saved_exits != current_exits:
        differences.append(f"exit heads: checkpoint {saved_exits}, this run {current_exits}")
    facts = _model_facts(model)
    for name in ("vocab_size", "position_embedding_type"):
        if info.model.get(name) != facts[name]:
            differences.append(
                f"{name}: checkpoint {info.model.get(name)!r}, this run {facts[name]!r}"
            )
    if differences:
        raise CheckpointError(
            f"checkpoint {info.path} was saved for a different model: "
            + "; ".join(differences)
            + ". Pass finetune=True (--finetune) to load the weights that fit and start at "
            "iteration 0"
        )


def _exit_structure(exit_heads: list[dict]) -> list[tuple]:
    return [
        tuple(e.get(f, _EXIT_FIELD_DEFAULTS.get(f)) for f in _EXIT_STRUCTURE_FIELDS)
        for e in exit_heads
    ]


def _check_model_args_agree(model_args: dict, facts: dict) -> None:
    for name, value in facts.items():
        if name in model_args and model_args[name] != value:
            raise ValueError(
                f"model_args: {name}={model_args[name]!r}, but the model has {value!r}"
            )


def _check_json(name: str, value) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: must be JSON-serialisable ({exc})") from exc


def _layout() -> dict:
    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
    }


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------


def _megatron_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _optimizer_kind(optimizer) -> str:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chain = _megatron_optimizers(optimizer)
    return "distributed" if any(isinstance(o, DistributedOptimizer) for o in chain) else "plain"


def _has_state(optimizer) -> bool:
    """True when the optimizer has state on any rank (a rank may hold no parameters: a
    distributed-optimizer shard, a frozen stage)."""
    local = any(len(o.optimizer.state) > 0 for o in _megatron_optimizers(optimizer))
    flag = torch.tensor([int(local)], device=platform.device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _check_optimizer_kind(info: CheckpointInfo, optimizer) -> None:
    kind = _optimizer_kind(optimizer)
    if info.optimizer != kind:
        raise CheckpointError(
            f"checkpoint {info.path} holds the {info.optimizer} optimizer's state, this run uses "
            f"the {kind} optimizer; pass load_optimizer=False (--no-load-optim) to load the model "
            "only"
        )


def _create_distributed_optimizer_state(optimizer) -> None:
    """The fully-reshardable load writes into existing torch optimizer state (without it
    ``DistributedOptimizer.state_dict`` fails on ``assert len(steps) == 1``): create it with
    megatron-core's own dummy step. The load overwrites params and state afterwards."""
    for opt in _megatron_optimizers(optimizer):
        if len(opt.optimizer.state) == 0:
            opt._init_optimizer_states_with_dummy_values()


_DISTOPT_FIX_APPLIED = False


def apply_distributed_optimizer_checkpoint_fix() -> bool:
    """Patch megatron-core 0.16.1's DistributedOptimizer checkpoint path for torch AdamW.

    Only without TE/Apex (their fused Adam keeps ``step`` per param group, and megatron-core's
    own code path is right there). Three bugs in ``distrib_optimizer.py``:

    1. ``_set_main_param_and_optimizer_states`` copies into ``optim_state['step']``, which the
       fully-reshardable checkpoint never contains (KeyError);
    2. for fp32 params the main param is a view of a leaf that requires grad, so the ``copy_``
       outside ``no_grad`` raises;
    3. ``load_state_dict`` gives every param *one shared* ``step`` tensor, which torch AdamW then
       increments once per param per step: the bias correction is wrong after a resume and the
       run silently diverges (the resume test catches this).

    Idempotent; returns True when the patch is (now) installed.
    """
    global _DISTOPT_FIX_APPLIED
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return False
    if _DISTOPT_FIX_APPLIED:
        return True
    cls = distrib_optimizer.DistributedOptimizer
    original_set = cls._set_main_param_and_optimizer_states
    original_load = cls.load_state_dict

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original_set(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        with torch.no_grad():  # bug 2
            targets = {"param": main_param, **self.optimizer.state[main_param]}
            for key, target in targets.items():
                if key in tensors:  # bug 1: no "step" in the checkpoint
                    target.copy_(tensors[key])

    def load_state_dict(self, state_dict):
        result = original_load(self, state_dict)
        for param_state in self.optimizer.state.values():  # bug 3: one step tensor per param
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = param_state["step"].clone()
        return result

    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    cls.load_state_dict = load_state_dict
    _DISTOPT_FIX_APPLIED = True
    return True


# --------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------


def _capture_rng_state() -> dict:
    accelerator = _accelerator_module()
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "device": None if accelerator is None else accelerator.get_rng_state(),
        # megatron's tracker of named (model-parallel, data-parallel, expert) generators
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    accelerator = _accelerator_module()
    if accelerator is not None and state["device"] is not None:
        accelerator.set_rng_state(state["device"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _accelerator_module():
    """The torch module of this platform's accelerator; None on the CPU (whose generator is
    ``torch``'s own)."""
    device = platform.device()
    return None if device.type == "cpu" else torch.get_device_module(device)


def _rng_sharded_object(state: dict | None) -> ShardedObject:
    """This rank's RNG state as one entry of a (pipeline, tensor, data)-parallel grid."""
    shape = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )
    offset = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)
