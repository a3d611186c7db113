"""Exit heads: one module per exit structure, all with the same contract.

``forward(hidden_states [s, b, h], output_weight=None, layer_inputs=None,
runtime_gather_output=None) -> logits [s, b, v/tp]`` (``v`` when gathered).

Every head ends in a vocab-parallel projection. A tied head owns no projection weight: the model
passes the word embedding it shares (``output_weight``). Under sequence parallelism the input is
sequence-sharded; the projection all-gathers it, the norm works on the local shard with
parameters tagged for the SP gradient reduction, and the MLP/transformer layer handle SP
themselves.

The two halves are public for callers that need the state between them (the inference engine,
the confidence head): ``transform(hidden, layer_inputs) -> states`` then ``project(states,
output_weight) -> logits``. An exit with ``confidence_hidden_size > 0`` also has a
:class:`ConfidenceHead` on ``states``; see :meth:`ExitHead.confidence`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron.early_exit.config import ExitHeadConfig
from megatron.early_exit.model.layer_specs import (
    exit_mlp_spec,
    norm_module,
    transformer_layer_spec,
)


@dataclass
class LayerInputs:
    """What a transformer layer inside a ``block`` exit needs besides the hidden states."""

    attention_mask: torch.Tensor | None = None
    rotary_pos_emb: Any = None
    inference_context: Any = None
    packed_seq_params: Any = None

    def as_kwargs(self) -> dict[str, Any]:
        return {
            "attention_mask": self.attention_mask,
            "rotary_pos_emb": self.rotary_pos_emb,
            "inference_context": self.inference_context,
            "packed_seq_params": self.packed_seq_params,
        }


class ConfidenceHead(torch.nn.Module):
    """``Linear(h, c) -> GELU -> Linear(c, 1)``: one logit per token that the exit's top-1 token
    is the final head's top-1 token. ``h*c + c`` multiply-adds per token.

    Its parameters are replicated over TP (saved once, from TP rank 0). Under sequence
    parallelism it runs on the local sequence shard, so, like megatron-core's norms and MoE
    router, its parameters are tagged ``sequence_parallel`` and ``finalize_model_grads`` sums
    their per-shard gradients over the TP group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(config.hidden_size, hidden_size, dtype=config.params_dtype)
        self.fc2 = torch.nn.Linear(hidden_size, 1, dtype=config.params_dtype)
        with torch.no_grad():
            for linear in (self.fc1, self.fc2):
                if config.perform_initialization:
                    config.init_method(linear.weight)
                linear.bias.zero_()
        for param in self.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """Confidence logits ``[...]`` of ``states`` ``[..., h]``."""
        hidden = torch.nn.functional.gelu(self.fc1(states))
        return self.fc2(hidden).squeeze(-1)


def _build_norm(config: TransformerConfig) -> torch.nn.Module:
    return build_module(
        norm_module(config),
        config=config,
        hidden_size=config.hidden_size,
        eps=config.layernorm_epsilon,
    )


class ExitHead(MegatronModule):
    """Base class: ``transform`` (structure-specific) followed by the vocab projection."""

    def __init__(
        self,
        config: TransformerConfig,
        exit_config: ExitHeadConfig,
        vocab_size: int,
        tp_group=None,
    ):
        super().__init__(config=config)
        self.exit_config = exit_config
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size,
            vocab_size,
            config=config,
            init_method=config.init_method,
            bias=False,
            skip_bias_add=False,
            gather_output=False,
            skip_weight_param_allocation=not exit_config.untied,
            tp_group=tp_group,
        )
        if self.output_layer.weight is not None:
            self.output_layer.weight.is_embedding_or_output_parameter = True
        self.confidence_head = None
        if exit_config.confidence_hidden_size:
            self.confidence_head = ConfidenceHead(config, exit_config.confidence_hidden_size)

    def transform(self, hidden_states: torch.Tensor, layer_inputs: LayerInputs | None):
        """Structure-specific part; the identity for the plain output head."""
        return hidden_states

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_weight: torch.Tensor | None = None,
        layer_inputs: LayerInputs | None = None,
        runtime_gather_output: bool | None = None,
    ) -> torch.Tensor:
        states = self.transform(hidden_states, layer_inputs)
        return self.project(states, output_weight, runtime_gather_output)

    def confidence_logits(self, states: torch.Tensor) -> torch.Tensor:
        """The confidence head's logits ``[...]`` for ``states`` ``[..., h]`` (training uses
        these with a binary cross entropy; :meth:`confidence` is their sigmoid)."""
        if self.confidence_head is None:
            raise ValueError(
                f"exit at depth {self.exit_config.depth} has no confidence head "
                "(confidence_hidden_size=0; --exit-confidence-head)"
            )
        return self.confidence_head(states)

    def confidence(self, states: torch.Tensor) -> torch.Tensor:
        """Predicted probability, per token, that this exit's top-1 token equals the final
        head's top-1 token: a cheap exit decision made before the vocabulary projection.

        Args:
            states: ``[..., h]``, what :meth:`transform` returned (the state :meth:`project`
                would read), e.g. ``[m, b, h]`` for the last ``m`` positions of ``b`` rows; the
                full hidden size on every TP rank (not sequence-sharded).
        Returns:
            ``[...]`` float32 probabilities in (0, 1), e.g. ``[m, b]``; identical on every TP
            rank (the head is replicated). No gradient is needed: call it under
            ``torch.no_grad()``.
        Raises:
            ValueError: when the exit was built without a confidence head.
        """
        return torch.sigmoid(self.confidence_logits(states).float())

    def project(
        self,
        states: torch.Tensor,
        output_weight: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ) -> torch.Tensor:
        """The vocab-parallel projection of :meth:`transform`'s output: ``[s, b, v/tp]``.

        A tied exit projects with ``output_weight`` (the word embedding the model passes).
        """
        if self.exit_config.untied:
            output_weight = None
        elif output_weight is None:
            raise ValueError(
                f"exit at depth {self.exit_config.depth} is tied to the word embedding; "
                "pass output_weight"
            )
        logits, _ = self.output_layer(
            states, weight=output_weight, runtime_gather_output=runtime_gather_output
        )
        return logits  # [s, b, v/tp] (or [s, b, v] when gathered)


class OutputHeadExit(ExitHead):
    """``head``: the output embedding applied to the hidden state as is."""


class NormExit(ExitHead):
    """``norm``: a norm, then the output embedding."""

    def __init__(self, config, exit_config, vocab_size, tp_group=None):
        super().__init__(config, exit_config, vocab_size, tp_group)
        self.norm = _build_norm(config)

    def transform(self, hidden_states, layer_inputs):
        return self.norm(hidden_states)


class MLPExit(NormExit):
    """``mlp``: a residual MLP ``h + MLP(mlp_norm(h))``, a norm, then the output embedding.

    The MLP has the backbone's shape, so it can start as a copy of the exit layer's own MLP.
    """

    def __init__(self, config, exit_config, vocab_size, tp_group=None):
        super().__init__(config, exit_config, vocab_size, tp_group)
        self.mlp_norm = _build_norm(config)
        self.mlp = build_module(exit_mlp_spec(), config=config)

    def transform(self, hidden_states, layer_inputs):
        mlp_output, mlp_bias = self.mlp(self.mlp_norm(hidden_states))
        if mlp_bias is not None:
            mlp_output = mlp_output + mlp_bias
        return self.norm(hidden_states + mlp_output)


class BlockExit(NormExit):
    """``block``: a full transformer layer of the backbone's kind, a norm, the output embedding.

    Its layer number is ``num_layers + depth`` so that it has a KV-cache slot of its own.
    """

    def __init__(
        self, config, exit_config, vocab_size, tp_group=None, layer_offset: int = 0, vp_stage=None
    ):
        super().__init__(config, exit_config, vocab_size, tp_group)
        # TransformerLayer adds this stage's layer offset itself.
        self.layer = build_module(
            transformer_layer_spec(config),
            config=config,
            layer_number=config.num_layers + exit_config.depth - layer_offset,
            vp_stage=vp_stage,
        )

    def transform(self, hidden_states, layer_inputs):
        layer_inputs = layer_inputs or LayerInputs()
        hidden_states, _ = self.layer(hidden_states=hidden_states, **layer_inputs.as_kwargs())
        return self.norm(hidden_states)


EXIT_HEAD_CLASSES: dict[str, type[ExitHead]] = {
    "head": OutputHeadExit,
    "norm": NormExit,
    "mlp": MLPExit,
    "block": BlockExit,
}


def build_exit_head(
    config: TransformerConfig,
    exit_config: ExitHeadConfig,
    vocab_size: int,
    *,
    tp_group=None,
    layer_offset: int = 0,
    vp_stage: int | None = None,
) -> ExitHead:
    """Build the exit head for ``exit_config.structure``."""
    cls = EXIT_HEAD_CLASSES[exit_config.structure]
    if cls is BlockExit:
        return cls(config, exit_config, vocab_size, tp_group, layer_offset, vp_stage)
    return cls(config, exit_config, vocab_size, tp_group)
