"""Loading a checkpoint's model without a training run: for inference, serving, evaluation,
benchmarks and the conversion tools.

No optimizer, scheduler or DDP wrapper is built: :func:`load_checkpoint` reads the weights
only. The model is built from the checkpoint's own record (:func:`checkpoint_config`) in the
layout the caller asks for; dist_checkpointing reshards whatever layout it was saved in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from megatron.early_exit import platform
from megatron.early_exit.checkpoint.record import CheckpointInfo, checkpoint_config
from megatron.early_exit.checkpoint.store import load_checkpoint, read_checkpoint_info
from megatron.early_exit.config import EarlyExitTransformerConfig
from megatron.early_exit.model.builder import build_early_exit_model
from megatron.early_exit.placement import tied_exit_stages


@dataclass(frozen=True)
class Layout:
    """The model-parallel layout to load a checkpoint into (one model replica)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class LoadedModel:
    """What :func:`load_for_inference` returns."""

    model: object
    """This rank's slice of the model, in eval mode."""
    tokenizer: object | None
    """The checkpoint's recorded tokenizer (None when ``tokenizer=False`` was asked)."""
    info: CheckpointInfo
    config: EarlyExitTransformerConfig


def build_model(config: EarlyExitTransformerConfig, model_facts: Mapping, *, seed: int = 1234):
    """This rank's model for ``config`` with a checkpoint's vocab/positions facts
    (:attr:`CheckpointInfo.model`)."""
    kwargs = dict(
        vocab_size=model_facts["vocab_size"],
        max_sequence_length=model_facts["max_sequence_length"],
        position_embedding_type=model_facts["position_embedding_type"],
    )
    if model_facts.get("rotary_base") is not None:
        kwargs["rotary_base"] = model_facts["rotary_base"]
    return build_early_exit_model(config, seed=seed, **kwargs)


LOCAL_SPEC = {"transformer_impl": "local"}
"""Config override of the checkpoint tools: megatron-core's local layers, whose state-dict names
(``input_layernorm``, ``pre_mlp_layernorm``) the key maps use, on every host (TE or not)."""


def load_model(load_dir: str | os.PathLike, *, seed: int = 1234, **config_overrides):
    """``(info, config, model)``: the newest checkpoint in ``load_dir`` loaded into this rank's
    model, in eval mode, for the checkpoint tools: built with the local layer spec
    (:data:`LOCAL_SPEC`) unless ``config_overrides`` say otherwise; ``config_overrides`` as
    :func:`checkpoint_config` takes them (default TP=1/PP=1). Needs an initialised platform of
    that layout."""
    info = read_checkpoint_info(load_dir)
    config = checkpoint_config(info, **{**LOCAL_SPEC, **config_overrides})
    model = build_model(config, info.model, seed=seed)
    load_checkpoint(load_dir, model)
    model.eval()
    return info, config, model


def load_for_inference(
    load_dir: str | os.PathLike,
    layout: Layout = Layout(),
    *,
    seed: int = 1234,
    tokenizer: bool = True,
    tokenizer_model: str | None = None,
) -> LoadedModel:
    """Initialise the platform for ``layout`` (every rank calls; the world must be exactly one
    TP x PP replica), load the newest checkpoint of ``load_dir`` into this rank's slice and
    build the tokenizer it records (``tokenizer_model`` overrides the recorded file).

    Raises :class:`~megatron.early_exit.checkpoint.record.CheckpointError` for a checkpoint
    that cannot be used and ValueError naming the checkpoint when it records no tokenizer.
    """
    from megatron.early_exit.data.tokenizers import checkpoint_tokenizer

    info = read_checkpoint_info(load_dir)
    tp, pp = layout.tensor_parallel_size, layout.pipeline_parallel_size
    config = checkpoint_config(info, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    platform.initialize(tp, pp, seed=seed, embedding_stages=tied_exit_stages(config))
    model = build_model(config, info.model, seed=seed)
    load_checkpoint(load_dir, model)
    model.eval()
    loaded_tokenizer = None
    if tokenizer:
        try:
            loaded_tokenizer = checkpoint_tokenizer(info, tokenizer_model)
        except ValueError as error:
            raise ValueError(f"{load_dir}: {error}") from None
    return LoadedModel(model, loaded_tokenizer, info, config)
