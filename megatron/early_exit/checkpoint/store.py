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

import logging
import multiprocessing
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron.early_exit import platform
from megatron.early_exit.checkpoint.optimizer_state import (
    apply_distributed_optimizer_checkpoint_fix,
    check_optimizer_kind,
    create_distributed_optimizer_state,
    has_state,
    optimizer_kind,
)
from megatron.early_exit.checkpoint.record import (
    CheckpointError,
    CheckpointInfo,
    check_json,
    check_model_args_agree,
    check_same_model,
    config_to_dict,
    model_facts,
)
from megatron.early_exit.checkpoint.sharded import (
    PartialBackbone,
    partial_read_request,
    read_sharded,
    untouched_backbone,
    widen_layer_axis,
)
from megatron.early_exit.checkpoint.writer_processes import tie_to_this_process
from megatron.early_exit.model.builder import unwrap_model

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


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------


def save_checkpoint(
    save_dir: str | os.PathLike,
    model,
    optimizer=None,
    scheduler=None,
    *,
    iteration: int,
    model_args: dict,
    data_state: dict | None = None,
    partial: PartialBackbone | None = None,
) -> Path:
    """Save ``model`` (wrapped or not), ``optimizer``, ``scheduler``, the RNG states and
    ``iteration`` to ``save_dir/iter_<iteration>`` and point the tracker file at it.
    Collective: every rank calls.

    Args:
        optimizer: megatron-core optimizer, or None (a conversion tool's checkpoint: no state).
            Before its first step it has no state either, and none is written.
        scheduler: ``OptimizerParamScheduler`` or None (recorded as None; a training run that
            loads such a checkpoint keeps its own fresh scheduler).
        iteration: the number of iterations done; the directory's name.
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
    model = unwrap_model(model)
    check_json("model_args", model_args)
    check_json("data_state", data_state)
    check_model_args_agree(model_args, model_facts(model))
    root = Path(save_dir)
    final = root / iteration_dir_name(iteration)
    staging = final.with_name(final.name + INCOMPLETE_SUFFIX)
    _on_rank_zero(_prepare_staging_dir, root, staging)
    saved_optimizer = None
    if optimizer is not None and has_state(optimizer):
        saved_optimizer = optimizer_kind(optimizer)
    if saved_optimizer == "distributed":
        apply_distributed_optimizer_checkpoint_fix()
    model_sd = model.sharded_state_dict(metadata=dict(_SHARDING_METADATA))
    if partial is not None:
        model_sd = widen_layer_axis(model_sd, partial.config.num_layers)
    state = {
        "model": model_sd,
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "iteration": iteration,
        "rng_state": _rng_sharded_object(_capture_rng_state()),
        "ee_llm": {
            "format_version": FORMAT_VERSION,
            "iteration": iteration,
            "model_config": config_to_dict(model.config if partial is None else partial.config),
            "model": model_facts(model),
            "model_args": dict(model_args),
            "data_state": data_state,
            "layout": _layout(),
            "optimizer": saved_optimizer,
        },
    }
    if saved_optimizer is not None:  # before the first step there is no optimizer state
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=False, metadata=dict(_SHARDING_METADATA)
        )
    if partial is not None:  # after the optimizer's view of the model: these are no parameters
        state["model"] = {**model_sd, **untouched_backbone(partial, model, model_sd)}
    tie_to_this_process()  # megatron-core's writer processes die with this one
    dist_checkpointing.save(state, str(staging), content_metadata=dict(_SHARDING_METADATA))
    _on_rank_zero(_publish, root, staging, final, iteration)
    return final


def sweep_stale(save_dir: str | os.PathLike) -> list[str]:
    """Clean what crashed saves left in ``save_dir`` (rank 0 of a run, before it saves); returns
    what it did, one line each.

    * ``iter_N.incomplete``: a save that did not finish; removed.
    * ``iter_N.replaced``: the old copy of an iteration that was being saved again. If
      ``iter_N`` is there, the new copy was published and the old one (perhaps half deleted) is
      removed; if not, the crash came between the two renames and the old copy is put back.
    """
    root = Path(save_dir)
    if not root.is_dir():
        return []
    done = []
    for path in sorted(root.iterdir()):
        if not path.is_dir():
            continue
        if path.name.endswith(INCOMPLETE_SUFFIX):
            shutil.rmtree(path)
            done.append(f"removed the unfinished save {path.name}")
        elif path.name.endswith(_REPLACED_SUFFIX):
            final = path.with_name(path.name[: -len(_REPLACED_SUFFIX)])
            if final.exists():
                shutil.rmtree(path)
                done.append(f"removed {path.name}, the old copy of the published {final.name}")
            else:
                os.rename(path, final)
                done.append(f"restored {final.name} from {path.name} (a re-save stopped)")
    if done:
        _fsync(root)
    for line in done:
        logger.warning("%s: %s", root, line)
    return done


def _prepare_staging_dir(root: Path, staging: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    sweep_stale(root)  # a save that crashed left these
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
    model,
    optimizer=None,
    scheduler=None,
    *,
    finetune: bool = False,
    load_optimizer: bool = True,
    partial: PartialBackbone | None = None,
) -> int:
    """Load the newest checkpoint in ``load_dir`` into ``model`` (wrapped or not) and, when
    given, ``optimizer`` and ``scheduler``; returns the iteration to continue from. Collective:
    every rank calls. Any TP/PP layout loads any other.

    Without ``finetune``: the model must match the checkpoint's (architecture, exits, vocab,
    position embeddings) or CheckpointError lists the differences; restores model, optimizer and
    scheduler (unless ``load_optimizer=False``) and, in the same parallel layout, the RNG
    states, and returns the saved iteration. With ``finetune``: loads only the model weights the
    checkpoint has (new exit heads keep their initialisation) and returns 0 (Megatron's
    ``--finetune``). Inference passes no optimizer and no scheduler: only the weights are read.

    With ``partial``, the model holds only the first layers of ``partial.config``'s model, which
    the checkpoint must match (unless ``finetune``); only those layers are read (see
    :class:`PartialBackbone`).

    Errors found before reading (missing/incomplete checkpoint, other model, other optimizer)
    leave the objects untouched; after a failed read the model's weights are undefined.
    """
    info = read_checkpoint_info(load_dir)
    model = unwrap_model(model)
    if not finetune:
        check_same_model(info, model.config if partial is None else partial.config, model)
    with_scheduler = load_optimizer and not finetune and scheduler is not None
    with_optimizer = (
        load_optimizer and not finetune and optimizer is not None and info.optimizer is not None
    )
    if with_optimizer:
        check_optimizer_kind(info, optimizer)
    with_rng = not finetune and optimizer is not None and info.layout == _layout()
    if not finetune and optimizer is not None and not with_rng:
        logger.info(
            "checkpoint %s was saved with layout %s, this run is %s: RNG states not restored",
            info.path, info.layout, _layout(),
        )  # fmt: skip
    if with_optimizer and info.optimizer == "distributed":
        apply_distributed_optimizer_checkpoint_fix()
        create_distributed_optimizer_state(optimizer)

    model_sd = model.sharded_state_dict(metadata=dict(_SHARDING_METADATA))
    if partial is not None:
        model_sd = widen_layer_axis(model_sd, partial.config.num_layers)
    request: dict[str, Any] = {"model": model_sd}
    if with_optimizer:
        request["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=dict(_SHARDING_METADATA)
        )
    if with_rng:
        request["rng_state"] = _rng_sharded_object(None)
    finish = None
    if partial is not None:
        request["model"], finish = partial_read_request(model_sd)
    loaded, unexpected = read_sharded(request, info.path, partial=partial is not None)
    if finish is not None:
        loaded["model"] = finish(loaded["model"])
    if unexpected and not finetune:
        raise CheckpointError(
            f"checkpoint {info.path} lacks {len(unexpected)} tensors this model needs "
            f"(e.g. {sorted(unexpected)[:5]}); pass finetune=True to load only what it has"
        )
    _load_model_state(model, loaded["model"], finetune, unexpected)
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    elif optimizer is not None:
        optimizer.reload_model_params()  # fp16/bf16 main params from the loaded model
    if with_scheduler:
        _load_scheduler(scheduler, loaded.get("scheduler"), info)
    if with_rng:
        _restore_rng_state(loaded["rng_state"])
    torch.distributed.barrier()
    return 0 if finetune else int(loaded["iteration"])


# The scheduler values Megatron-LM checks against the flags on load (num_steps always comes
# from the checkpoint).
_SCHEDULER_FIELDS = {
    "max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters/-fraction",
    "lr_decay_steps": "--train-iters", "lr_decay_style": "--lr-decay-style",
    "start_wd": "--weight-decay", "end_wd": "--weight-decay",
    "wd_incr_steps": "--train-iters", "wd_incr_style": "weight-decay schedule",
}  # fmt: skip


def _load_scheduler(scheduler, state: dict | None, info: CheckpointInfo) -> None:
    """Continue ``scheduler`` from the checkpoint's step. Which schedule (its values: peak and
    minimum LR, warm-up and decay steps, ...) is Megatron's choice: the scheduler's own with
    ``override_opt_param_scheduler``, the checkpoint's with
    ``use_checkpoint_opt_param_scheduler``; with neither, they must be equal, or
    CheckpointError names every difference (megatron-core's default would keep the
    checkpoint's silently)."""
    if state is None:  # written by a conversion tool, which has no scheduler
        logger.info("checkpoint %s has no scheduler state: the scheduler starts fresh", info.path)
        return
    override = scheduler.override_opt_param_scheduler
    if not override and not scheduler.use_checkpoint_opt_param_scheduler:
        differences = [
            f"{name} ({flag}): checkpoint {state[name]!r}, this run {getattr(scheduler, name)!r}"
            for name, flag in _SCHEDULER_FIELDS.items()
            if name in state and state[name] != getattr(scheduler, name)
        ]
        if differences:
            raise CheckpointError(
                f"checkpoint {info.path} was trained with another learning-rate/weight-decay "
                f"schedule: {'; '.join(differences)}. Pass --override-opt_param-scheduler to "
                "follow this run's flags from the checkpoint's step, or "
                "--use-checkpoint-opt_param-scheduler to keep the checkpoint's schedule"
            )
    scheduler.load_state_dict(state)
    scheduler.step(increment=0)  # the optimizer's LR and WD from the values just chosen


def _load_model_state(model, state_dict: dict, finetune: bool, unexpected: set) -> None:
    result = model.load_state_dict(state_dict, strict=False)
    # Entries without tensors (empty _extra_state of local layers) may be absent: harmless.
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing and not finetune:
        raise CheckpointError(f"checkpoint has no values for {missing[:5]} ({len(missing)})")
    if finetune and (missing or unexpected):
        logger.info("finetune: %d model tensors kept their initialisation", len(missing))
    assert not result.unexpected_keys, result.unexpected_keys


def _layout() -> dict:
    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
    }


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
