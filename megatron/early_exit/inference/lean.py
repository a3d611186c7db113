"""The lean forward step: plain functions over the model's own parameters.

Megatron-core's modules are built for training (bias-dropout-add handlers, activation offload,
inference contexts, unfused attention); calling them per decode step costs several times the
arithmetic of a small model. This module reads the *same* parameter tensors out of an
:class:`EarlyExitGPTModel` once (on CPU it also keeps one transposed copy of each weight matrix,
see :class:`Linear`) and runs a layer as a handful of torch calls:

* one QKV matmul, split as megatron splits it (``[.., ng, (np/ng + 2) * hn]``, group-major);
* RoPE on the new positions only, from per-row ``cos``/``sin`` tables built once per request
  (left padding gives each row its own positions), so K is cached **after** RoPE;
* K/V in our own buffers ``[b, groups/tp, max_seq, hn]`` (:class:`LeanKV`), the layout
  ``scaled_dot_product_attention`` reads; GQA folds a group's query heads into the query length
  (``[b, g, r * n, hn]``), so keys are never repeated;
* fused SDPA over the filled length ``[0, start + n)`` with an explicit additive mask (0 / -inf,
  the numbers SDPA makes of a bool mask) only when the chunk needs one (padded rows, or several
  queries: prefill, catch-up, speculative verify), built once per step and shared by every
  layer; a decode step of a padded batch slices it from a per-request padding mask;
* norms (LayerNorm / RMSNorm, qk-layernorm included) and the MLP (GeLU, gated SwiGLU) as
  functional calls; residual adds in megatron's order (``residual + (out + bias)``).

Tensor parallelism follows megatron-core's collectives exactly: column-parallel matmuls are local,
row-parallel outputs (attention ``linear_proj``, MLP ``linear_fc2``) are all-reduced over the TP
group before their bias is added, and vocabulary-parallel logits are all-gathered along the
vocabulary. The TP=2 test checks this against megatron's own forward.

``tests/distributed/test_lean_step.py`` proves that these functions equal megatron-core's modules
(logits within 1e-5 of the model's own no-cache forward) for every exit structure, both backbone
families, TP=1/2, padded batches, catch-up chunks and speculative verification at an offset.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

# ----------------------------------------------------------------------------- profiling probe

_probe = None


def set_probe(probe) -> None:
    """Install ``probe(name, width) -> context manager`` around every timed part of a step
    (``embedding``, ``layer``, ``exit<d>/<part>``, ``final/<part>``; ``width`` = positions per
    row), or remove it (None). The generation benchmark's profiler uses it."""
    global _probe
    _probe = probe


def probed(name: str, width: int, fn, *args):
    """``fn(*args)``, inside the probe when one is installed."""
    if _probe is None:
        return fn(*args)
    with _probe(name, width):
        return fn(*args)


# ----------------------------------------------------------------------------- norms and linears


@dataclass(frozen=True)
class Norm:
    """A LayerNorm or RMSNorm as data: ``kind``, ``weight``, ``bias`` (RMSNorm: None), ``eps``."""

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.weight.shape[-1],)
        if self.kind == "layernorm":
            return F.layer_norm(x, shape, self.weight, self.bias, self.eps)
        return F.rms_norm(x, shape, self.weight, self.eps)


def read_norm(module, config) -> Norm:
    """The :class:`Norm` of a megatron norm module (torch LayerNorm/RMSNorm, or TE's norms)."""
    if isinstance(module, torch.nn.LayerNorm):
        return Norm("layernorm", module.weight, module.bias, module.eps)
    if isinstance(module, torch.nn.RMSNorm):
        return Norm("rmsnorm", module.weight, None, module.eps)
    if getattr(config, "layernorm_zero_centered_gamma", False):
        raise ValueError("the lean step does not support layernorm_zero_centered_gamma")
    weight = getattr(module, "weight", None)
    if weight is None:
        raise ValueError(f"the lean step cannot read the norm {type(module).__name__}")
    kind = "layernorm" if config.normalization == "LayerNorm" else "rmsnorm"
    return Norm(kind, weight, getattr(module, "bias", None), config.layernorm_epsilon)


def _fused_norm(linear, config) -> Norm | None:
    """The norm Transformer Engine fuses into ``linear`` (``TELayerNormColumnParallelLinear``)."""
    weight = getattr(linear, "layer_norm_weight", None)
    if weight is None:
        return None
    kind = "layernorm" if config.normalization == "LayerNorm" else "rmsnorm"
    return Norm(kind, weight, getattr(linear, "layer_norm_bias", None), config.layernorm_epsilon)


def _layer_norm_of(norm_module, linear, config) -> Norm:
    fused = _fused_norm(linear, config)
    return fused if fused is not None else read_norm(norm_module, config)


_TRANSPOSED: dict[int, tuple] = {}


def transposed(weight: torch.Tensor) -> torch.Tensor:
    """``weight.t()`` as a contiguous tensor ``[in, out]``, made once per parameter and reused
    while it still equals the parameter: every call compares the two (a read of both, about a
    third of a fresh copy's cost), because updates through ``.data`` or through megatron's
    parameter buffers change a parameter without bumping its version counter."""
    version = 0 if weight.is_inference() else weight._version
    key = (version, weight.data_ptr(), tuple(weight.shape), weight.dtype, weight.device)
    entry = _TRANSPOSED.get(id(weight))
    if (
        entry is None
        or entry[0]() is not weight
        or entry[1] != key
        or not torch.equal(entry[2].t(), weight.detach())
    ):
        with torch.no_grad():
            copy = weight.detach().t().contiguous()
        ref = weakref.ref(weight, functools.partial(_forget, id(weight)))
        entry = _TRANSPOSED[id(weight)] = (ref, key, copy)
    return entry[2]


def _forget(key: int, _ref) -> None:
    _TRANSPOSED.pop(key, None)


class Linear:
    """``F.linear(x, weight, bias)`` (``bias`` may be None).

    On CPU the weight is held transposed (:func:`transposed`, ``[in, out]`` contiguous): a
    decode step's products are tiny (``[b, h] @ [h, out]``) and MKL runs them faster from a
    contiguous ``[in, out]`` operand than from the transposed view ``F.linear`` passes (the demo
    model's final head, ``[12, 128] @ [128, 8064]``: 0.65-0.9x the time; at one row 0.6x), with
    the same products (MKL's matrix-vector kernel may round a last bit differently at one row).
    The copies cost the weights' memory once more, and each :class:`LeanModel` (each request)
    checks them against the parameters. Elsewhere (CUDA) plain ``F.linear``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias
        self.weight_t = transposed(weight) if weight.device.type == "cpu" else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_t is None:
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])  # always one mm (matmul may pick bmm by strides)
        if self.bias is None:
            out = torch.mm(rows, self.weight_t)
        else:
            out = torch.addmm(self.bias, rows, self.weight_t)
        return out.view(*x.shape[:-1], self.weight_t.shape[-1])


def _bias(linear) -> torch.Tensor | None:
    bias = getattr(linear, "bias", None)
    return bias if isinstance(bias, torch.Tensor) and bias.numel() else None


class TensorParallel:
    """The TP group and the two collectives the lean step needs (no-ops at TP=1)."""

    def __init__(self, group, size: int):
        self.group, self.size = group, size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over TP ranks (megatron's ``reduce_from_tensor_model_parallel_region``)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the ranks' last dimensions in rank order (vocabulary-parallel logits)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class MLP:
    """Megatron's MLP: column-parallel ``fc1`` (gated: ``[gate; up]`` per rank), activation,
    row-parallel ``fc2`` whose bias is returned apart, as megatron returns it."""

    fc1: Linear
    fc2: Linear
    fc2_bias: torch.Tensor | None
    activation: object
    gated: bool
    tp: TensorParallel

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = self.fc1(x)
        if self.gated:
            gate, up = torch.chunk(hidden, 2, dim=-1)
            hidden = self.activation(gate) * up
        else:
            hidden = self.activation(hidden)
        return self.tp.all_reduce(self.fc2(hidden)), self.fc2_bias


def read_mlp(mlp, config, tp: TensorParallel) -> MLP:
    return MLP(
        Linear(mlp.linear_fc1.weight, _bias(mlp.linear_fc1)),
        Linear(mlp.linear_fc2.weight),
        _bias(mlp.linear_fc2),
        config.activation_func,
        bool(config.gated_linear_unit),
        tp,
    )


def _add_residual(residual, out_and_bias) -> torch.Tensor:
    out, bias = out_and_bias
    return residual + (out + bias if bias is not None else out)


# ----------------------------------------------------------------------------- per-request tables


class StepTables:
    """Per-request, per-row tables, built once: position ids, RoPE ``cos``/``sin`` and the
    padding mask of one-query steps.

    ``positions[b, max_seq]`` is ``slot - pad`` clamped at 0 (left padding); ``cos``/``sin`` are
    ``[max_seq, b, rot]`` from megatron's own rotary table (rotary percent and scaling included),
    ``sin`` with the sign of ``rotate_half`` folded into its first half (see :func:`apply_rope`).
    Masks are additive (0 = attend, ``-inf`` = hidden, what SDPA turns a bool mask into, so the
    numbers are the same), built once per step (see :meth:`mask`) and shared by every layer.
    """

    def __init__(self, model, pad_lengths: torch.Tensor, max_sequence_length: int, device):
        pads = pad_lengths.long().to(device)
        self.pad_lengths = pads
        self.any_padding = bool(pad_lengths.any())
        self.max_padding = int(pad_lengths.max()) if len(pad_lengths) else 0
        self.dtype = model.config.params_dtype  # of the additive masks (the queries' dtype)
        slots = torch.arange(max_sequence_length, device=device)
        self.positions = (slots.unsqueeze(0) - pads.unsqueeze(1)).clamp(min=0)  # [b, s]
        self.cos = self.sin = None
        if getattr(model, "position_embedding_type", "") == "rope":
            table = model.rotary_pos_emb(max_sequence_length)  # [s, 1, 1, rot]
            freqs = table[:, 0, 0].to(device)[self.positions.t()]  # [s, b, rot]
            self.cos, sin = freqs.cos().to(self.dtype), freqs.sin().to(self.dtype)
            half = sin.shape[-1] // 2
            self.sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        self._padding_mask = None  # [b, 1, 1, max_seq]: 0 at a row's tokens, -inf at padding
        if self.any_padding:
            visible = slots.unsqueeze(0) >= pads.unsqueeze(1)
            self._padding_mask = _additive(visible, self.dtype)[:, None, None]
        self._masks: dict[tuple, object] = {}  # this step's masks and RoPE slices

    def new_step(self) -> None:
        self._masks.clear()

    def rope(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``cos, sin`` ``[n, b, 1, 1, rot]`` for slots ``[start, end)`` (None without RoPE),
        to broadcast over the ``[n, b, groups, heads, hn]`` query/key layout."""
        if self.cos is None:
            return None
        key = ("rope", start, end)  # shared by the step's layers, like the masks
        if key not in self._masks:
            self._masks[key] = (
                self.cos[start:end, :, None, None],
                self.sin[start:end, :, None, None],
            )
        return self._masks[key]

    def mask(self, start: int, num_positions: int) -> torch.Tensor | None:
        """``[b, 1, n, start + n]`` additive (0 = attend), or None when plain attention to every
        filled key is right (one query and no padding). Causal; padding keys hidden, except a
        padding query sees itself so no softmax row is empty."""
        key = (start, num_positions)
        if key not in self._masks:
            self._masks[key] = self._build_mask(start, num_positions)
        return self._masks[key]

    def _build_mask(self, start: int, num_positions: int) -> torch.Tensor | None:
        if num_positions == 1 and not self.any_padding:
            return None
        end = start + num_positions
        if num_positions == 1 and start >= self.max_padding:  # a decode step: padding only
            return self._padding_mask[..., :end]
        device = self.pad_lengths.device
        query = torch.arange(start, end, device=device).view(1, -1, 1)
        key = torch.arange(end, device=device).view(1, 1, -1)
        visible = (key <= query) & ((key >= self.pad_lengths.view(-1, 1, 1)) | (key == query))
        return _additive(visible, self.dtype).unsqueeze(1)  # [b, 1, n, end]


def _additive(visible: torch.Tensor, dtype) -> torch.Tensor:
    """A bool mask (True = attend) as SDPA's additive mask: 0 or ``-inf``."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill_(~visible, float("-inf"))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Megatron's non-interleaved RoPE on ``x[..., hn]`` (the first ``rot`` dims rotate):
    ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``, computed as
    ``[x2, x1] * sin'`` where ``sin'`` carries the minus sign (:class:`StepTables`; the same
    numbers: negating is exact)."""
    rot = cos.shape[-1]
    x_rot, x_pass = (x, None) if rot == x.shape[-1] else (x[..., :rot], x[..., rot:])
    half = rot // 2
    swapped = torch.cat((x_rot[..., half:], x_rot[..., :half]), dim=-1)
    rotated = x_rot * cos + swapped * sin
    return rotated if x_pass is None else torch.cat((rotated, x_pass), dim=-1)


# ----------------------------------------------------------------------------- KV buffers


class LeanKV:
    """K/V of every attention layer, ``[b, groups/tp, max_seq, hn]`` per slot, keys after RoPE.

    Slots are keyed by the layer's global ``layer_number`` (block exits: ``num_layers + depth``)
    and allocated (zeroed) on first write. A step writes ``[start, start + n)`` and reads
    ``[0, start + n)``; rolled-back positions keep stale values that are overwritten first.
    """

    def __init__(self, batch_size: int, max_sequence_length: int):
        self.batch_size = batch_size
        self.max_sequence_length = max_sequence_length
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def slot(self, layer_number: int, batch_size: int, groups: int, head_dim: int, like):
        """The ``(K, V)`` buffers of a layer, ``[b, g, max_seq, hn]``, allocated on first use."""
        if layer_number not in self.buffers:
            shape = (batch_size, groups, self.max_sequence_length, head_dim)
            self.buffers[layer_number] = (
                torch.zeros(shape, dtype=like.dtype, device=like.device),
                torch.zeros(shape, dtype=like.dtype, device=like.device),
            )
        return self.buffers[layer_number]


# ----------------------------------------------------------------------------- one layer


class Layer:
    """One transformer layer (backbone or block exit) over its module's parameters."""

    def __init__(self, layer, config, tp: TensorParallel):
        attention = layer.self_attention
        self.layer_number = int(layer.layer_number)
        self.input_norm = _layer_norm_of(layer.input_layernorm, attention.linear_qkv, config)
        self.pre_mlp_norm = _layer_norm_of(layer.pre_mlp_layernorm, layer.mlp.linear_fc1, config)
        self.qkv = Linear(attention.linear_qkv.weight, _bias(attention.linear_qkv))
        self.proj = Linear(attention.linear_proj.weight)  # its bias is added after the reduce
        self.proj_bias = _bias(attention.linear_proj)
        self.num_heads = attention.num_attention_heads_per_partition
        self.num_groups = attention.num_query_groups_per_partition
        self.head_dim = attention.hidden_size_per_attention_head
        self.q_norm = _optional_norm(getattr(attention, "q_layernorm", None), config)
        self.k_norm = _optional_norm(getattr(attention, "k_layernorm", None), config)
        self.scale = config.softmax_scale  # None: 1/sqrt(hn), as megatron
        self.mlp = read_mlp(layer.mlp, config, tp)
        self.tp = tp

    def __call__(
        self, hidden: torch.Tensor, kv: LeanKV, start: int, tables: StepTables
    ) -> torch.Tensor:
        """``hidden[n, b, h]`` at slots ``[start, start + n)`` -> the layer's output."""
        n, b = hidden.shape[:2]
        keys, values = kv.slot(self.layer_number, b, self.num_groups, self.head_dim, hidden)
        if start + n > kv.max_sequence_length:
            raise ValueError(
                f"the KV cache holds {kv.max_sequence_length} positions, a step needs {start + n}"
            )
        compiled = _use_compiled and self.tp.size == 1
        step = _compiled_step if compiled else layer_step
        return step(self, hidden, keys, values, start, tables.rope(start, start + n),
                    tables.mask(start, n))  # fmt: skip


def layer_step(layer: Layer, hidden, keys, values, start: int, rope, mask) -> torch.Tensor:
    """One layer over ``hidden[n, b, h]`` at ``start``: writes K/V ``[b, g, start:start+n, hn]``
    into the slot buffers ``keys``/``values`` and attends over ``[0, start + n)``."""
    x = layer.input_norm(hidden)
    n, b = x.shape[:2]
    g, hn = layer.num_groups, layer.head_dim
    r = layer.num_heads // g
    mixed = layer.qkv(x).view(n, b, g, r + 2, hn)
    query_key, value = mixed[:, :, :, : r + 1], mixed[:, :, :, r + 1]  # per group: r queries, key
    if layer.q_norm is not None or layer.k_norm is not None:
        query, key = mixed[:, :, :, :r], mixed[:, :, :, r : r + 1]
        query = query if layer.q_norm is None else layer.q_norm(query)
        key = key if layer.k_norm is None else layer.k_norm(key)
        query_key = torch.cat([query, key], dim=3)
    if rope is not None:  # queries and keys rotated in one go, new positions only
        query_key = apply_rope(query_key, *rope)
    query = query_key[:, :, :, :r].reshape(n, b, g * r, hn).permute(1, 2, 0, 3)  # [b, np, n, hn]
    key = query_key[:, :, :, r].permute(1, 2, 0, 3)  # [b, g, n, hn]
    value = value.permute(1, 2, 0, 3)
    end = start + n
    keys[:, :, start:end] = key
    values[:, :, start:end] = value
    if r > 1:  # GQA: a group's r query heads become r * n queries against its keys
        query = query.reshape(b, g, r * n, hn)
        if mask is not None:
            mask = mask.unsqueeze(2).expand(-1, -1, r, -1, -1).reshape(b, 1, r * n, -1)
    context = F.scaled_dot_product_attention(
        query, keys[:, :, :end], values[:, :, :end], attn_mask=mask, scale=layer.scale
    )  # [b, g, r * n, hn] = [b, np, n, hn]
    context = context.reshape(b, g * r, n, hn).permute(2, 0, 1, 3).reshape(n, b, g * r * hn)
    attention = layer.tp.all_reduce(layer.proj(context))
    hidden = _add_residual(hidden, (attention, layer.proj_bias))
    return _add_residual(hidden, layer.mlp(layer.pre_mlp_norm(hidden)))


_compiled_step = None
_use_compiled = False


def set_compile(enabled: bool) -> None:
    """Run every layer through ``torch.compile(layer_step, dynamic=True)`` (inductor; TP=1
    only: the all-reduce is not traced) or, ``False``, through the plain function. The first
    calls pay the compilation (the benchmark reports it as first-call time); the compiled
    function is kept, so switching back and forth does not compile again."""
    global _compiled_step, _use_compiled
    if enabled and _compiled_step is None:
        _compiled_step = torch.compile(layer_step, dynamic=True)
    _use_compiled = enabled


def _optional_norm(module, config) -> Norm | None:
    if module is None or type(module).__name__ == "IdentityOp":
        return None
    if type(module).__name__ == "L2Norm":
        raise ValueError("the lean step does not support qk_l2_norm")
    return read_norm(module, config)


def check_supported(config) -> None:
    """Refuse, with a clear message, the configurations the lean step does not implement."""
    refusals = {
        "rotary_interleaved": "interleaved RoPE",
        "multi_latent_attention": "multi-latent attention",
        "apply_residual_connection_post_layernorm": "post-layernorm residuals",
        "num_moe_experts": "mixture of experts",
        "qk_l2_norm": "qk L2 norm",
        "attention_output_gate": "gated attention output",
    }
    for name, what in refusals.items():
        if getattr(config, name, None):
            raise ValueError(f"the lean decoding step does not support {what} ({name})")
    groups = config.num_query_groups or config.num_attention_heads
    if groups < config.tensor_model_parallel_size:
        raise ValueError(
            f"the lean decoding step needs num_query_groups ({groups}) >= "
            f"tensor_model_parallel_size ({config.tensor_model_parallel_size})"
        )


# ----------------------------------------------------------------------------- the whole model


class LeanModel:
    """A stage of an :class:`EarlyExitGPTModel` as lean functions: embedding, layers by global
    layer number, exit transforms, final norm and every head's projection through one API."""

    def __init__(self, model):
        from megatron.core import parallel_state

        config = model.config
        check_supported(config)
        tp_size = config.tensor_model_parallel_size
        group = parallel_state.get_tensor_model_parallel_group() if tp_size > 1 else None
        self.model = model
        self.config = config
        self.tp = TensorParallel(group, tp_size)
        self.layers = [Layer(layer, config, self.tp) for layer in model.decoder.layers]
        self.final_norm = None
        if model.post_process and model.decoder.final_layernorm is not None:
            self.final_norm = read_norm(model.decoder.final_layernorm, config)
        self.exit_transforms = {
            exit_config.depth: _exit_transform(model.exit_heads[exit_config.key], config, self.tp)
            for exit_config in model.local_exit_configs
        }
        self.final_weight = self._final_weight()
        self.exit_weights = {e.depth: self._exit_weight(e) for e in model.local_exit_configs}
        self._plain_embedding = (
            model.pre_process and tp_size == 1 and not config.fp32_residual_connection
        )

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``tokens[b, n]`` at ``positions[b, n]`` -> ``[n, b, h]`` (dropout is off in eval)."""
        embedding = self.model.embedding
        if not self._plain_embedding:  # vocab-parallel lookup and its all-reduce
            return embedding(input_ids=tokens, position_ids=positions)
        hidden = F.embedding(tokens, embedding.word_embeddings.weight)
        if embedding.add_position_embedding:
            hidden = hidden + F.embedding(positions, embedding.position_embeddings.weight)
        return hidden.transpose(0, 1)

    def _final_weight(self) -> Linear | None:
        model = self.model
        if not model.post_process:
            return None
        if model.share_embeddings_and_output_weights:
            return Linear(model.shared_embedding_or_output_weight())
        return Linear(model.output_layer.weight)

    def _exit_weight(self, exit_config) -> Linear:
        if exit_config.untied:
            return Linear(self.model.exit_heads[exit_config.key].output_layer.weight)
        return Linear(self.model.tied_exit_weight())

    def project(self, states: torch.Tensor, head: Linear) -> torch.Tensor:
        """``states[m, b, h]`` -> float32 logits ``[b, m, V]`` through ``head`` (``final_weight``,
        ``exit_weights``), gathered over TP. Projected in ``[m, b]`` order (contiguous rows)."""
        logits = self.tp.gather_last(head(states)).float().transpose(0, 1)
        return logits if logits.shape[1] == 1 else logits.contiguous()


class _ExitTransform:
    """An exit's structure-specific part: ``head`` (identity), ``norm``, ``mlp``
    (``norm(h + mlp(mlp_norm(h)))``) or ``block`` (its own layer and KV slot, then ``norm``)."""

    def __init__(self, structure: str, norm=None, mlp_norm=None, mlp=None, layer=None):
        self.structure = structure
        self.norm, self.mlp_norm, self.mlp, self.layer = norm, mlp_norm, mlp, layer

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.structure == "head":
            return hidden
        if self.structure == "mlp":
            hidden = _add_residual(hidden, self.mlp(self.mlp_norm(hidden)))
        return self.norm(hidden)


def _exit_transform(head, config, tp: TensorParallel) -> _ExitTransform:
    structure = head.exit_config.structure
    if structure == "head":
        return _ExitTransform("head")
    norm = read_norm(head.norm, config)
    if structure == "norm":
        return _ExitTransform("norm", norm)
    if structure == "mlp":
        mlp = read_mlp(head.mlp, config, tp)
        return _ExitTransform("mlp", norm, read_norm(head.mlp_norm, config), mlp)
    return _ExitTransform("block", norm, layer=Layer(head.layer, config, tp))
