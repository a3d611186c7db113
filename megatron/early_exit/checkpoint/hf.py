"""Hugging Face <-> EE-LLM state dicts (TP=1, PP=1, megatron-core local layer spec), in memory.

* :func:`config_from_hf`: an HF ``LlamaConfig`` / ``GPT2Config`` -> keyword arguments of
  :class:`EarlyExitTransformerConfig` and of ``build_early_exit_model``.
* :func:`hf_to_megatron_state_dict` / :func:`megatron_to_hf_state_dict`: the key maps and tensor
  transforms of :mod:`megatron.early_exit.checkpoint.key_maps`. Both check the whole input first
  and raise one ValueError listing every missing, unexpected and wrong-shape tensor.
* :func:`load_megatron_state_dict`: load a converted state dict into a model (filling in the
  ``_extra_state`` entries megatron-core's linears carry, which no HF checkpoint has).

HF models have no exits: converting to HF drops ``exit_heads.<depth>.*`` and returns those
tensors separately, ``{depth: {name: tensor}}``, and converting from HF accepts the same mapping
to put them back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megatron.early_exit.checkpoint.key_maps import (
    GPT2_RULES,
    LLAMA_BIAS_RULES,
    LLAMA_RULES,
    OUTPUT_RULE,
    TRANSFORMS,
    Dims,
    Rule,
    expand_rules,
    resolve_shape,
)

EXTRA_STATE_SUFFIX = "._extra_state"
EXIT_PREFIX = "exit_heads."
_EXIT_KEY_RE = re.compile(r"^exit_heads\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class _Architecture:
    """What the converters need to know about one HF architecture."""

    name: str
    rules: tuple[Rule, ...]
    num_layers: int
    dims: Dims
    sizes: dict[str, int]
    tied: bool
    ignored_hf: tuple[str, ...]  # regexes of HF keys that are not weights (buffers, tied copies)


def _rope(hf_config) -> tuple[float, str]:
    """(theta, rope type) from transformers 5 (``rope_parameters``) or 4.x (``rope_theta``,
    ``rope_scaling``)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    return float(10000.0 if theta is None else theta), rope_type or "default"


def _llama_config(c) -> tuple[dict[str, Any], dict[str, Any]]:
    problems = []
    if c.hidden_act != "silu":
        problems.append(f"hidden_act={c.hidden_act!r} (only 'silu' is supported)")
    attention_bias = bool(getattr(c, "attention_bias", False))
    mlp_bias = bool(getattr(c, "mlp_bias", False))
    if attention_bias != mlp_bias:
        problems.append(
            f"attention_bias={attention_bias} with mlp_bias={mlp_bias} (megatron-core's "
            "add_bias_linear covers attention and MLP linears together)"
        )
    theta, rope_type = _rope(c)
    if rope_type != "default":
        problems.append(f"rope type {rope_type!r} (only 'default' RoPE is supported)")
    if problems:
        raise ValueError("unsupported Llama config: " + "; ".join(problems))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    config = dict(
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        ffn_hidden_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads,
        num_query_groups=c.num_key_value_heads or c.num_attention_heads,
        kv_channels=head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=c.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=attention_bias,
        hidden_dropout=0.0,
        attention_dropout=float(getattr(c, "attention_dropout", 0.0)),
        untie_embeddings_and_output_weights=not c.tie_word_embeddings,
    )
    model = dict(
        vocab_size=c.vocab_size,
        max_sequence_length=c.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=int(theta) if theta.is_integer() else theta,
    )
    return config, model


_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _gpt2_config(c) -> tuple[dict[str, Any], dict[str, Any]]:
    from megatron.core.transformer.utils import openai_gelu

    problems = []
    act = c.activation_function
    if act not in (*_GELU_TANH, "gelu"):
        problems.append(f"activation_function={act!r} (supported: gelu, {', '.join(_GELU_TANH)})")
    if not getattr(c, "scale_attn_weights", True):
        problems.append("scale_attn_weights=False")
    if getattr(c, "scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=True")
    if getattr(c, "add_cross_attention", False):
        problems.append("add_cross_attention=True")
    if problems:
        raise ValueError("unsupported GPT-2 config: " + "; ".join(problems))
    config = dict(
        num_layers=c.n_layer,
        hidden_size=c.n_embd,
        ffn_hidden_size=c.n_inner or 4 * c.n_embd,
        num_attention_heads=c.n_head,
        normalization="LayerNorm",
        layernorm_epsilon=c.layer_norm_epsilon,
        add_bias_linear=True,
        activation_func=F.gelu if act == "gelu" else openai_gelu,
        hidden_dropout=float(c.resid_pdrop),
        attention_dropout=float(c.attn_pdrop),
        untie_embeddings_and_output_weights=not c.tie_word_embeddings,
    )
    if act != "gelu":
        # megatron-core's fused bias-activation kernels only know F.gelu / swiglu.
        config["bias_activation_fusion"] = False
    model = dict(
        vocab_size=c.vocab_size,
        max_sequence_length=c.n_positions,
        position_embedding_type="learned_absolute",
    )
    return config, model


_CONFIG_READERS = {"llama": _llama_config, "gpt2": _gpt2_config}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_CONFIG_READERS)


def _model_type(hf_config) -> str:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in _CONFIG_READERS:
        raise ValueError(
            f"unsupported Hugging Face architecture: model_type={model_type!r}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (LlamaForCausalLM, GPT2LMHeadModel)"
        )
    return model_type


def config_from_hf(hf_config) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(transformer config kwargs, model kwargs)`` for an HF Llama or GPT-2 config.

    The first goes to :class:`EarlyExitTransformerConfig` (add ``exit_heads`` and the platform's
    overrides), the second to ``build_early_exit_model(config, **model_kwargs)``:
    ``vocab_size``, ``max_sequence_length``, ``position_embedding_type`` and, for RoPE,
    ``rotary_base``. Raises ValueError for other architectures or unsupported options.
    """
    return _CONFIG_READERS[_model_type(hf_config)](hf_config)


def _architecture(hf_config) -> _Architecture:
    model_type = _model_type(hf_config)
    config, model = config_from_hf(hf_config)
    heads, groups = config["num_attention_heads"], config.get("num_query_groups")
    groups = groups or heads
    head_dim = config.get("kv_channels") or config["hidden_size"] // heads
    ffn = config["ffn_hidden_size"]
    sizes = dict(
        h=config["hidden_size"],
        v=model["vocab_size"],
        p=model["max_sequence_length"],
        f=ffn,
        q=heads * head_dim,
        kv=groups * head_dim,
        qkv=(heads + 2 * groups) * head_dim,
    )
    sizes["2f"] = 2 * ffn
    tied = not config["untie_embeddings_and_output_weights"]
    if model_type == "llama":
        rules = LLAMA_RULES + (LLAMA_BIAS_RULES if config["add_bias_linear"] else ())
        ignored = (r"(^|\.)rotary_emb\.inv_freq$",)
    else:
        rules = GPT2_RULES
        ignored = (r"\.attn\.(masked_)?bias$",)  # causal-mask buffers of older transformers
    if tied:
        ignored += (r"^lm_head\.weight$",)
    else:
        rules += (OUTPUT_RULE,)
    return _Architecture(
        model_type, rules, config["num_layers"], Dims(heads, groups, head_dim), sizes, tied,
        ignored,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _shape_problems(
    given: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], ignored
) -> list[str]:
    problems = []
    for key, shape in expected.items():
        if key not in given:
            problems.append(f"missing: {key} (expected shape {list(shape)})")
        elif not isinstance(given[key], torch.Tensor):
            problems.append(f"not a tensor: {key} ({type(given[key]).__name__})")
        elif tuple(given[key].shape) != shape:
            problems.append(
                f"wrong shape: {key} is {list(given[key].shape)}, expected {list(shape)}"
            )
    for key in given:
        if key not in expected and not ignored(key):
            problems.append(f"unexpected: {key}")
    return problems


def _raise(what: str, problems: list[str]) -> None:
    if problems:
        raise ValueError(
            f"{what}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems)
        )


# ---------------------------------------------------------------------------------------------
# Conversions
# ---------------------------------------------------------------------------------------------


def hf_to_megatron_state_dict(
    hf_state_dict: Mapping[str, torch.Tensor],
    hf_config,
    exit_heads: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Our model's state dict (tensors only, no ``_extra_state``) from an HF state dict.

    ``exit_heads`` (``{depth: {name: tensor}}``, as :func:`megatron_to_hf_state_dict` returns
    them) are added as ``exit_heads.<depth>.<name>``. Tied HF models may or may not carry
    ``lm_head.weight``; it is the embedding and is not converted.
    """
    arch = _architecture(hf_config)
    rules = expand_rules(arch.rules, arch.num_layers)
    expected = {
        key: resolve_shape(shape, arch.sizes)
        for rule in rules
        for key, shape in zip(rule.hf, rule.hf_shapes, strict=True)
    }
    patterns = [re.compile(p) for p in arch.ignored_hf]
    problems = _shape_problems(
        hf_state_dict, expected, lambda k: any(p.search(k) for p in patterns)
    )
    _raise(f"Hugging Face {arch.name} state dict -> ours", problems)
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        tensors = [hf_state_dict[k] for k in rule.hf]
        out[rule.ours] = TRANSFORMS[rule.transform].to_ours(tensors, arch.dims)
    for depth, tensors in (exit_heads or {}).items():
        for name, tensor in tensors.items():
            out[f"{EXIT_PREFIX}{int(depth)}.{name}"] = tensor
    return out


def megatron_to_hf_state_dict(
    state_dict: Mapping[str, Any], hf_config
) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """``(HF state dict, exit heads)`` from our model's state dict.

    The HF state dict has exactly the keys of the HF model's ``state_dict()`` (for tied models
    ``lm_head.weight`` is the embedding tensor itself, as in HF). Exit heads have no HF
    counterpart: they come back as ``{depth: {name: tensor}}`` (``_extra_state`` dropped) so a
    caller can store them beside the HF checkpoint. ``_extra_state`` entries are ignored, and
    for tied models so is a copy of the output weight (``output_layer.weight``).
    """
    arch = _architecture(hf_config)
    rules = expand_rules(arch.rules, arch.num_layers)
    expected = {rule.ours: resolve_shape(rule.ours_shape, arch.sizes) for rule in rules}
    exits: dict[int, dict[str, torch.Tensor]] = {}
    backbone: dict[str, Any] = {}
    for key, value in state_dict.items():
        match = _EXIT_KEY_RE.match(key)
        if match:
            if not key.endswith(EXTRA_STATE_SUFFIX):
                exits.setdefault(int(match.group(1)), {})[match.group(2)] = value
        else:
            backbone[key] = value

    def ignored(key: str) -> bool:
        return key.endswith(EXTRA_STATE_SUFFIX) or (arch.tied and key == "output_layer.weight")

    problems = _shape_problems(backbone, expected, ignored)
    _raise(f"our state dict -> Hugging Face {arch.name}", problems)
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        tensors = TRANSFORMS[rule.transform].to_hf(backbone[rule.ours], arch.dims)
        out.update(zip(rule.hf, tensors, strict=True))
    if arch.tied:
        out["lm_head.weight"] = out[rules[0].hf[0]]  # the word embedding, shared as in HF
    return out, dict(sorted(exits.items()))


def load_megatron_state_dict(model: torch.nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Load a converted state dict into ``model`` strictly, after one check that lists every
    missing, unexpected and wrong-shape tensor. ``_extra_state`` entries the state dict lacks
    keep the model's own values."""
    own = model.state_dict()
    expected = {
        k: tuple(v.shape)
        for k, v in own.items()
        if isinstance(v, torch.Tensor) and not k.endswith(EXTRA_STATE_SUFFIX)
    }
    problems = _shape_problems(state_dict, expected, lambda k: k.endswith(EXTRA_STATE_SUFFIX))
    _raise("loading into the model", problems)
    full = dict(state_dict)
    for key, value in own.items():
        if key.endswith(EXTRA_STATE_SUFFIX):
            full.setdefault(key, value)
    model.load_state_dict(full, strict=True)


__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "config_from_hf",
    "hf_to_megatron_state_dict",
    "load_megatron_state_dict",
    "megatron_to_hf_state_dict",
]
