"""Checkpoint conversion: declarative key maps and named tensor transforms (``key_maps``) and
the Hugging Face converters built on them (``hf``)."""

from megatron.early_exit.checkpoint.hf import (
    SUPPORTED_ARCHITECTURES,
    config_from_hf,
    hf_to_megatron_state_dict,
    load_megatron_state_dict,
    megatron_to_hf_state_dict,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "config_from_hf",
    "hf_to_megatron_state_dict",
    "load_megatron_state_dict",
    "megatron_to_hf_state_dict",
]
