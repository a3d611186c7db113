"""Build this process's slice of an early-exit model, and initialise weights reproducibly.

:func:`reproducible_init_` gives every logical parameter the same values whatever the TP/PP
layout: each full tensor is drawn from a generator seeded by (seed, layout-independent parameter
name) and then cut the way megatron-core shards it. This is the oracle for layout-parity tests
(TP=2 vs TP=1, PP=2 vs PP=1) and lets users compare layouts from one seed.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
from megatron.core import parallel_state

from megatron.early_exit import platform
from megatron.early_exit.config import EarlyExitTransformerConfig
from megatron.early_exit.model.gpt_model import EarlyExitGPTModel
from megatron.early_exit.model.sharding import is_tensor_parallel, shard

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")
_TIED_COPIES = ("output_layer.weight", "early_exit_word_embeddings")


def build_early_exit_model(
    config: EarlyExitTransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    *,
    position_embedding_type: str = "learned_absolute",
    rotary_base: int = 10000,
    parallel_output: bool = True,
    seed: int | None = None,
) -> EarlyExitGPTModel:
    """The model slice of this pipeline stage; ``seed`` applies :func:`reproducible_init_`."""
    model = EarlyExitGPTModel(
        config,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=parallel_output,
        position_embedding_type=position_embedding_type,
        rotary_base=rotary_base,
    )
    model.to(platform.device())  # torch norms are built on the CPU; a no-op on CPU machines
    if seed is not None:
        reproducible_init_(model, seed)
    return model


def unwrap_model(model) -> EarlyExitGPTModel:
    """The EarlyExitGPTModel inside DDP / Float16Module wrappers."""
    while not isinstance(model, EarlyExitGPTModel) and hasattr(model, "module"):
        model = model.module
    return model


def canonical_parameter_name(model: EarlyExitGPTModel, name: str) -> str:
    """A parameter's name as it would be in a single-stage model (global layer numbers; tied
    copies named after the word embedding they copy)."""
    if name in _TIED_COPIES and model.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    match = _LAYER_RE.match(name)
    if match:
        global_index = int(match.group(1)) + model.layer_offset
        return f"decoder.layers.{global_index}." + name[match.end() :]
    return name


@torch.no_grad()
def reproducible_init_(model: EarlyExitGPTModel, seed: int, norm_jitter: float = 0.0) -> None:
    """Initialise every parameter from (seed, canonical name), independent of the TP/PP layout.

    Weights ~ N(0, init_method_std) (output projections of attention and MLP scaled by
    1/sqrt(2 * num_layers), as megatron-core does), biases 0, norm weights 1 (+ ``norm_jitter``
    * N(0, 1), which tests use so that norms are not the identity).
    """
    config = model.config
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for name, param in model.named_parameters():
        canonical = canonical_parameter_name(model, name)
        full_shape = list(param.shape)
        if is_tensor_parallel(param):
            full_shape[param.partition_dim] *= tp_size
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(canonical.encode()))
        full = _draw(canonical, full_shape, config, generator, norm_jitter)
        param.copy_(shard(full, param, tp_rank, tp_size).to(param.dtype))


def _draw(name, shape, config, generator, norm_jitter) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) == 1:  # norm weights
        return 1.0 + norm_jitter * torch.randn(shape, generator=generator)
    std = config.init_method_std
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = std / math.sqrt(2.0 * config.num_layers)
    return torch.randn(shape, generator=generator) * std
