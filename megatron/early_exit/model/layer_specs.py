"""Module specs for the backbone and the exit heads.

The platform and the config decide the backend: Transformer Engine layers when TE and a CUDA
device are present and ``config.transformer_impl`` is ``"transformer_engine"`` (megatron-core's
default), megatron-core's local modules otherwise. The checkpoint tools ask for ``"local"``: their
state dicts use the local spec's names (``input_layernorm``, ``pre_mlp_layernorm``), which TE
fuses into its linear layers; checkpoints are the same either way (the local spec saves under
TE's names). Without TE/Apex megatron-core's local norm refuses
sequence parallelism (``WrappedTorchNorm`` asserts), so the local spec uses
:class:`SequenceParallelTorchNorm`, which tags its parameters ``sequence_parallel`` so that
``finalize_model_grads`` all-reduces their (partial, per-rank) gradients over the TP group. The
final norm is chosen by the block spec, not the layer spec, so we always build a block spec.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
    get_mlp_module_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron.early_exit import platform


class SequenceParallelTorchNorm:
    """torch LayerNorm/RMSNorm whose parameters are marked for the sequence-parallel reduction."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(
                f"normalization: {config.normalization!r} is not supported; use LayerNorm or "
                "RMSNorm"
            )
        if config.params_dtype is not None:
            norm.to(dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm


def uses_transformer_engine(config: TransformerConfig) -> bool:
    """True when ``config``'s model is built from Transformer Engine's layers."""
    return config.transformer_impl == "transformer_engine" and platform.has_transformer_engine()


def norm_module(config: TransformerConfig):
    """The norm class used by the backbone's final norm and by exit norms."""
    if uses_transformer_engine(config):
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return SequenceParallelTorchNorm


def transformer_layer_spec(config: TransformerConfig) -> ModuleSpec:
    """The spec of one backbone layer (also used by ``block`` exits)."""
    if uses_transformer_engine(config):
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    spec = get_gpt_layer_local_spec(
        qk_layernorm=config.qk_layernorm, normalization=config.normalization
    )
    spec.submodules.input_layernorm = SequenceParallelTorchNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    return spec


def decoder_block_spec(config: TransformerConfig, vp_stage: int | None = None) -> ModuleSpec:
    """The block spec of this pipeline stage's slice (its layers and, on the last stage, the
    final norm)."""
    layer_spec = transformer_layer_spec(config)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(
            layer_specs=[layer_spec] * num_layers, layer_norm=norm_module(config)
        ),
    )


def exit_mlp_spec() -> ModuleSpec:
    """Spec of the MLP inside ``mlp`` exits: megatron-core's local (TP-aware) MLP, so exits are
    built the same way on every platform and can copy a layer's MLP weights."""
    return get_mlp_module_spec(use_te=False)
