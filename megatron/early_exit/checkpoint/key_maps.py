"""Declarative key maps between Hugging Face checkpoints and our model's state dict.

A :class:`Rule` says which of our keys (one) corresponds to which HF keys (one or more), through
which named tensor transform, and what shape each side must have (symbolic dimension names,
resolved from the HF config by :func:`dims`). Keys may contain ``{i}``: the rule then applies to
every backbone layer. Transforms are pairs of pure functions in :data:`TRANSFORMS` (HF tensors ->
our tensor, our tensor -> HF tensors); nothing here knows about processes or devices.

Our layout is megatron-core's local layer spec at TP=1/PP=1:

* ``linear_qkv`` fuses Q, K and V per query group along dim 0:
  ``[q heads of group 0..., k0, v0, q heads of group 1..., k1, v1, ...]`` (see megatron-core's
  ``SelfAttention.get_query_key_value_tensors``);
* ``linear_fc1`` of a gated MLP (SwiGLU) is ``cat([gate, up])`` along dim 0;
* GPT-2's ``Conv1D`` stores ``[in, out]`` (our linears store ``[out, in]``), and its ``c_attn``
  is ``[q; k; v]`` (not grouped).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Shape = tuple[str, ...]


@dataclass(frozen=True)
class Rule:
    """One of our tensors and the HF tensors it is made of."""

    ours: str
    hf: tuple[str, ...]
    transform: str = "identity"
    ours_shape: Shape = ()
    hf_shapes: tuple[Shape, ...] = ()

    def expand(self, layer: int | None) -> Rule:
        if layer is None:
            return self
        return Rule(
            self.ours.format(i=layer),
            tuple(k.format(i=layer) for k in self.hf),
            self.transform,
            self.ours_shape,
            self.hf_shapes,
        )

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.ours


@dataclass(frozen=True)
class Dims:
    """The sizes a transform needs (from the HF config)."""

    num_heads: int
    num_groups: int
    head_dim: int


@dataclass(frozen=True)
class Transform:
    to_ours: Callable[[Sequence[torch.Tensor], Dims], torch.Tensor]
    to_hf: Callable[[torch.Tensor, Dims], tuple[torch.Tensor, ...]]


# ---------------------------------------------------------------------------------------------
# Named tensor transforms
# ---------------------------------------------------------------------------------------------


def _group_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: Dims) -> torch.Tensor:
    """[q; k; v] rows (``[out, ...]``) -> megatron's per-group interleaving."""
    rest = q.shape[1:]
    per_group = d.num_heads // d.num_groups
    q = q.reshape(d.num_groups, per_group * d.head_dim, *rest)
    k = k.reshape(d.num_groups, d.head_dim, *rest)
    v = v.reshape(d.num_groups, d.head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest).contiguous()


def _ungroup_qkv(qkv: torch.Tensor, d: Dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rest = qkv.shape[1:]
    per_group = d.num_heads // d.num_groups
    grouped = qkv.reshape(d.num_groups, (per_group + 2) * d.head_dim, *rest)
    q, k, v = torch.split(grouped, [per_group * d.head_dim, d.head_dim, d.head_dim], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


def _split3(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(t.chunk(3, dim=0))


def _c_attn_weight_to_ours(ts, d):
    return _group_qkv(*_split3(ts[0].t()), d)


def _c_attn_weight_to_hf(t, d):
    return (torch.cat(_ungroup_qkv(t, d), dim=0).t().contiguous(),)


def _c_attn_bias_to_ours(ts, d):
    return _group_qkv(*_split3(ts[0]), d)


def _c_attn_bias_to_hf(t, d):
    return (torch.cat(_ungroup_qkv(t, d), dim=0),)


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(lambda ts, d: ts[0].clone(), lambda t, d: (t.clone(),)),
    # GPT-2 Conv1D stores [in, out].
    "transpose": Transform(
        lambda ts, d: ts[0].t().contiguous(), lambda t, d: (t.t().contiguous(),)
    ),
    # Separate q/k/v projections (Llama) <-> megatron's grouped fused QKV (weights or biases).
    "fuse_qkv": Transform(lambda ts, d: _group_qkv(*ts, d), _ungroup_qkv),
    # GPT-2 c_attn ([q; k; v], Conv1D-transposed for weights) <-> grouped fused QKV.
    "c_attn_weight": Transform(_c_attn_weight_to_ours, _c_attn_weight_to_hf),
    "c_attn_bias": Transform(_c_attn_bias_to_ours, _c_attn_bias_to_hf),
    # SwiGLU: linear_fc1 = cat([gate, up]).
    "fuse_gate_up": Transform(
        lambda ts, d: torch.cat(list(ts), dim=0), lambda t, d: tuple(t.chunk(2, dim=0))
    ),
}


# ---------------------------------------------------------------------------------------------
# Key maps
# ---------------------------------------------------------------------------------------------

_L = "decoder.layers.{i}."
_ATTN = _L + "self_attention."
_HL = "model.layers.{i}."

LLAMA_RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
         ours_shape=("v", "h"), hf_shapes=(("v", "h"),)),
    Rule(_L + "input_layernorm.weight", (_HL + "input_layernorm.weight",),
         ours_shape=("h",), hf_shapes=(("h",),)),
    Rule(_ATTN + "linear_qkv.weight",
         (_HL + "self_attn.q_proj.weight", _HL + "self_attn.k_proj.weight",
          _HL + "self_attn.v_proj.weight"),
         "fuse_qkv", ("qkv", "h"), (("q", "h"), ("kv", "h"), ("kv", "h"))),
    Rule(_ATTN + "linear_proj.weight", (_HL + "self_attn.o_proj.weight",),
         ours_shape=("h", "q"), hf_shapes=(("h", "q"),)),
    Rule(_L + "pre_mlp_layernorm.weight", (_HL + "post_attention_layernorm.weight",),
         ours_shape=("h",), hf_shapes=(("h",),)),
    Rule(_L + "mlp.linear_fc1.weight", (_HL + "mlp.gate_proj.weight", _HL + "mlp.up_proj.weight"),
         "fuse_gate_up", ("2f", "h"), (("f", "h"), ("f", "h"))),
    Rule(_L + "mlp.linear_fc2.weight", (_HL + "mlp.down_proj.weight",),
         ours_shape=("h", "f"), hf_shapes=(("h", "f"),)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",),
         ours_shape=("h",), hf_shapes=(("h",),)),
)  # fmt: skip

LLAMA_BIAS_RULES: tuple[Rule, ...] = (
    Rule(_ATTN + "linear_qkv.bias",
         (_HL + "self_attn.q_proj.bias", _HL + "self_attn.k_proj.bias",
          _HL + "self_attn.v_proj.bias"),
         "fuse_qkv", ("qkv",), (("q",), ("kv",), ("kv",))),
    Rule(_ATTN + "linear_proj.bias", (_HL + "self_attn.o_proj.bias",),
         ours_shape=("h",), hf_shapes=(("h",),)),
    Rule(_L + "mlp.linear_fc1.bias", (_HL + "mlp.gate_proj.bias", _HL + "mlp.up_proj.bias"),
         "fuse_gate_up", ("2f",), (("f",), ("f",))),
    Rule(_L + "mlp.linear_fc2.bias", (_HL + "mlp.down_proj.bias",),
         ours_shape=("h",), hf_shapes=(("h",),)),
)  # fmt: skip

_GL = "transformer.h.{i}."


def _vec(ours: str, hf: str, dim: str = "h") -> Rule:
    return Rule(ours, (hf,), ours_shape=(dim,), hf_shapes=((dim,),))


GPT2_RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("transformer.wte.weight",),
         ours_shape=("v", "h"), hf_shapes=(("v", "h"),)),
    Rule("embedding.position_embeddings.weight", ("transformer.wpe.weight",),
         ours_shape=("p", "h"), hf_shapes=(("p", "h"),)),
    _vec(_L + "input_layernorm.weight", _GL + "ln_1.weight"),
    _vec(_L + "input_layernorm.bias", _GL + "ln_1.bias"),
    Rule(_ATTN + "linear_qkv.weight", (_GL + "attn.c_attn.weight",),
         "c_attn_weight", ("qkv", "h"), (("h", "qkv"),)),
    Rule(_ATTN + "linear_qkv.bias", (_GL + "attn.c_attn.bias",),
         "c_attn_bias", ("qkv",), (("qkv",),)),
    Rule(_ATTN + "linear_proj.weight", (_GL + "attn.c_proj.weight",),
         "transpose", ("h", "q"), (("q", "h"),)),
    _vec(_ATTN + "linear_proj.bias", _GL + "attn.c_proj.bias"),
    _vec(_L + "pre_mlp_layernorm.weight", _GL + "ln_2.weight"),
    _vec(_L + "pre_mlp_layernorm.bias", _GL + "ln_2.bias"),
    Rule(_L + "mlp.linear_fc1.weight", (_GL + "mlp.c_fc.weight",),
         "transpose", ("f", "h"), (("h", "f"),)),
    _vec(_L + "mlp.linear_fc1.bias", _GL + "mlp.c_fc.bias", "f"),
    Rule(_L + "mlp.linear_fc2.weight", (_GL + "mlp.c_proj.weight",),
         "transpose", ("h", "f"), (("f", "h"),)),
    _vec(_L + "mlp.linear_fc2.bias", _GL + "mlp.c_proj.bias"),
    _vec("decoder.final_layernorm.weight", "transformer.ln_f.weight"),
    _vec("decoder.final_layernorm.bias", "transformer.ln_f.bias"),
)  # fmt: skip

OUTPUT_RULE = Rule(
    "output_layer.weight", ("lm_head.weight",), ours_shape=("v", "h"), hf_shapes=(("v", "h"),)
)
"""Only for untied models; tied ones use the word embedding (HF's ``lm_head.weight`` is then the
same tensor as the embedding and is not converted)."""


def expand_rules(rules: Sequence[Rule], num_layers: int) -> list[Rule]:
    """Every rule with ``{i}`` replaced by each layer index."""
    out: list[Rule] = []
    for rule in rules:
        if rule.per_layer:
            out.extend(rule.expand(i) for i in range(num_layers))
        else:
            out.append(rule)
    return out


def resolve_shape(shape: Shape, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(sizes[name] for name in shape)


__all__ = [
    "GPT2_RULES",
    "LLAMA_BIAS_RULES",
    "LLAMA_RULES",
    "OUTPUT_RULE",
    "TRANSFORMS",
    "Dims",
    "Rule",
    "Transform",
    "expand_rules",
    "resolve_shape",
]
