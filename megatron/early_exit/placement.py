"""Which exit heads live on which pipeline stage: computed from the config, never encoded in names.

An exit belongs to the stage that builds its ``layer_number`` (the layer whose output, or for a
pre-exit whose input, it reads). Layer ranges come from megatron-core's own split functions, so
uneven splits configured in the TransformerConfig are honoured. It sits beside ``config.py``,
which uses it to validate configs, and imports nothing of ours at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

if TYPE_CHECKING:  # the config imports this module; it needs only the config's attributes
    from megatron.early_exit.config import EarlyExitTransformerConfig, ExitHeadConfig


def stage_layer_range(
    config: EarlyExitTransformerConfig, stage: int, vp_stage: int | None = None
) -> range:
    """1-based global layer numbers built by pipeline ``stage``."""
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=stage)
    return range(offset + 1, offset + count + 1)


def exit_heads_on_stage(
    config: EarlyExitTransformerConfig, stage: int, vp_stage: int | None = None
) -> tuple[ExitHeadConfig, ...]:
    """The exit heads pipeline ``stage`` builds, in depth order."""
    layers = stage_layer_range(config, stage, vp_stage)
    return tuple(e for e in config.exit_heads if e.layer_number in layers)


def stages_with_exits(config: EarlyExitTransformerConfig) -> frozenset[int]:
    """Pipeline stages that host at least one exit head."""
    num_stages = config.pipeline_model_parallel_size
    return frozenset(s for s in range(num_stages) if exit_heads_on_stage(config, s))


def tied_exit_stages(config: EarlyExitTransformerConfig) -> frozenset[int]:
    """Pipeline stages that host an exit head tied to the word embedding.

    These stages must be in megatron-core's embedding group (``platform.initialize(
    embedding_stages=...)``) so that their copy of the embedding stays in sync.
    """
    num_stages = config.pipeline_model_parallel_size
    return frozenset(
        s for s in range(num_stages) if any(not e.untied for e in exit_heads_on_stage(config, s))
    )
