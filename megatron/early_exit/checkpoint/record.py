"""The checkpoint's own description of the model: the ``ee_llm`` record and its config.

Every checkpoint written by :func:`~megatron.early_exit.checkpoint.store.save_checkpoint`
carries, beside its tensors, what rebuilding the model needs without any command line: the
config fields that define the network (:data:`MODEL_CONFIG_FIELDS`), the early-exit fields
(:data:`EARLY_EXIT_CONFIG_FIELDS`), the model facts the config does not hold (vocab size,
positions), the caller's ``model_args`` (tokenizer, ...), the layout it was saved in, the
optimizer kind and the data position. :class:`CheckpointInfo` is that record as read back;
:func:`config_from_checkpoint` turns it into an :class:`EarlyExitTransformerConfig`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core.activations import fast_gelu, quick_gelu, squared_relu
from megatron.core.transformer.utils import openai_gelu

from megatron.early_exit import platform
from megatron.early_exit.config import EarlyExitTransformerConfig, ExitHeadConfig

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
MODEL_FACT_FIELDS = ("vocab_size", "max_sequence_length", "position_embedding_type", "rotary_base")
ACTIVATIONS = {
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
    "squared_relu": squared_relu,
    "quick_gelu": quick_gelu,
    "fast_gelu": fast_gelu,
    "openai_gelu": openai_gelu,  # GPT-2's gelu_new (tanh approximation)
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    if activation not in ACTIVATIONS:
        raise CheckpointError(
            f"activation_func: the checkpoint's {activation!r} is not one of "
            f"{', '.join(ACTIVATIONS)}; pass activation_func= explicitly"
        )
    fields["activation_func"] = ACTIVATIONS[activation]
    if activation == "openai_gelu":  # megatron's fused bias-GeLU implements only plain GeLU
        fields["bias_activation_fusion"] = False
    fields["params_dtype"] = DTYPES[fields["params_dtype"]]
    fields["exit_heads"] = tuple(ExitHeadConfig(**e) for e in fields["exit_heads"])
    fields.update(platform.config_overrides())
    fields.update(overrides)
    return EarlyExitTransformerConfig(**fields)


def model_facts(model) -> dict:
    return {name: getattr(model, name, None) for name in MODEL_FACT_FIELDS}


def check_same_model(info: CheckpointInfo, config: EarlyExitTransformerConfig, model) -> None:
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
    facts = model_facts(model)
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


def check_model_args_agree(model_args: dict, facts: dict) -> None:
    for name, value in facts.items():
        if name in model_args and model_args[name] != value:
            raise ValueError(
                f"model_args: {name}={model_args[name]!r}, but the model has {value!r}"
            )


def check_json(name: str, value) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: must be JSON-serialisable ({exc})") from exc


def checkpoint_config(info: CheckpointInfo, **overrides) -> EarlyExitTransformerConfig:
    """:func:`config_from_checkpoint` at TP=1/PP=1 unless ``overrides`` say otherwise. With
    PP>1, activations travel between stages in the parameters' dtype unless ``pipeline_dtype``
    is given."""
    fields = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    fields.update(overrides)
    if fields["pipeline_model_parallel_size"] > 1 and fields.get("pipeline_dtype") is None:
        saved = info.model_config.get("pipeline_dtype") or info.model_config["params_dtype"]
        fields["pipeline_dtype"] = DTYPES[saved]
    return config_from_checkpoint(info, **fields)
