"""Configuration of early-exit models: one frozen record per exit head, held by a
:class:`megatron.core.transformer.TransformerConfig` subclass.

Exit numbering follows the original EE-LLM's ``--exit-layer-nums``: ``layer_number`` is the
1-based backbone layer an exit belongs to. A post-exit (the default) reads that layer's output; a
pre-exit (``pre_exit=True``) reads its input, so "post-exit at L" and "pre-exit at L+1" see the
same hidden state but live on different pipeline stages when L is a stage boundary.

Every exit is identified by :attr:`ExitHeadConfig.depth`, the number of backbone layers below the
hidden state it reads. Checkpoint keys, logs and metrics use that depth, so they do not depend on
the pipeline split or on pre/post placement.

Vocabulary (the one place it is defined): **depth** is the only name the code uses for an exit
once its config exists (``ExitPolicy.depths``, ``Engine.exits``, ``GenerationResult.exit_depths``,
``FirstExit.depth``, exit module keys ``str(depth)``); ``layer_number`` appears only where the
flag's number is needed (building the exit on its pipeline stage, the checkpoint record). The
generation API keeps the field names users know (``exit_layers`` in requests and responses, the
final head reported as ``num_layers``): their values are depths, mapped in ``server/protocol.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from megatron.core.transformer import TransformerConfig

from megatron.early_exit.placement import exit_heads_on_stage

ExitStructure = Literal["head", "norm", "mlp", "block"]
EXIT_STRUCTURES: tuple[str, ...] = ("head", "norm", "mlp", "block")
WARMUP_STYLES: tuple[str, ...] = ("linear", "cosine")


@dataclass(frozen=True)
class ExitHeadConfig:
    """One early exit.

    Structures (each adds to the previous one's path to the logits):
      * ``head``: the output embedding only (vocab-parallel projection).
      * ``norm``: a norm, then the output embedding.
      * ``mlp``: a residual MLP (``h + MLP(norm(h))``), a norm, then the output embedding. Unlike
        the original EE-LLM, whose MLP exit was a second MLP branch inside the exit layer, ours
        is a standalone head on the hidden state, so it also works as a pre-exit and needs no
        change to the backbone layer.
      * ``block``: a full transformer layer, a norm, then the output embedding.
    """

    layer_number: int
    """1-based backbone layer the exit belongs to (``--exit-layer-nums``)."""

    pre_exit: bool = False
    """Read the layer's input instead of its output (``--pre-exit``)."""

    structure: str = "head"
    """One of :data:`EXIT_STRUCTURES`."""

    loss_weight: float = 1.0
    """Target weight of this exit's loss in the total loss (``--exit-layer-weight``)."""

    loss_weight_init: float = 0.0
    """Weight at iteration 0 of the warm-up (``--exit-layer-weight-init``)."""

    temperature: float = 1.0
    """Training-time divisor of the exit logits before the cross entropy."""

    untied: bool = False
    """Own vocab-parallel output layer instead of sharing the word embedding."""

    confidence_hidden_size: int = 0
    """Width ``c`` of the exit's learned confidence head (``--exit-confidence-hidden-size``); 0
    means the exit has none. The head, ``Linear(h, c) -> GELU -> Linear(c, 1)`` on the state the
    exit's output layer reads, predicts whether the exit's top-1 token equals the final head's,
    for ``h*c + c`` multiply-adds per token instead of the exit's vocabulary projection."""

    def __post_init__(self):
        _check_int("layer_number", self.layer_number, minimum=1)
        _check_int("confidence_hidden_size", self.confidence_hidden_size, minimum=0)
        if self.structure not in EXIT_STRUCTURES:
            raise ValueError(
                f"exit structure: unknown value {self.structure!r} for the exit at layer "
                f"{self.layer_number}; expected one of {', '.join(EXIT_STRUCTURES)}"
            )
        for name in ("loss_weight", "loss_weight_init"):
            value = getattr(self, name)
            if not _is_finite(value) or value < 0:
                raise ValueError(
                    f"{name}: must be a finite number >= 0, got {value!r} for the exit at layer "
                    f"{self.layer_number}"
                )
        if not _is_finite(self.temperature) or self.temperature <= 0:
            raise ValueError(
                f"temperature: must be a finite number > 0, got {self.temperature!r} for the "
                f"exit at layer {self.layer_number}"
            )

    @property
    def depth(self) -> int:
        """Number of backbone layers below the hidden state this exit reads."""
        return self.layer_number - 1 if self.pre_exit else self.layer_number

    @property
    def key(self) -> str:
        """Module/checkpoint key of this exit (its depth), independent of the pipeline split."""
        return str(self.depth)


@dataclass
class EarlyExitTransformerConfig(TransformerConfig):
    """megatron-core's TransformerConfig plus the early exits and the GPT options they depend on."""

    exit_heads: tuple[ExitHeadConfig, ...] = ()
    """The early exits, in any order (stored sorted by depth)."""

    exit_loss_weight_warmup_iters: int = 0
    """Iterations over which each exit weight moves from ``loss_weight_init`` to ``loss_weight``;
    0 means the target weights apply from the start."""

    exit_loss_weight_warmup_style: str = "linear"
    """``linear`` or ``cosine``."""

    include_final_loss: bool = True
    """Add the final head's loss to the total; EE-Tuning switches it off."""

    dynamic_exit_loss_weight: bool = False
    """Weight each token's exit loss by the exit's own (stop-gradient) max probability."""

    untie_embeddings_and_output_weights: bool = False
    """The final output layer has its own weight instead of the word embedding."""

    exit_kl_weight: float = 0.0
    """``W`` of the distillation term: each exit's objective becomes ``CE + W * KL(final ||
    exit)``, the final head's distribution (detached) as the teacher and the exit's
    temperature-scaled distribution as the student (``--exit-kl-weight``). 0 switches it off."""

    exit_confidence_loss_weight: float = 1.0
    """Weight ``c`` of the confidence heads' binary cross entropy in each exit's objective
    (``--exit-confidence-loss-weight``); used only by exits with a confidence head."""

    def __post_init__(self):
        super().__post_init__()
        self.exit_heads = tuple(sorted(self.exit_heads, key=lambda e: e.depth))
        self._validate_exit_heads()
        self._validate_loss_schedule()
        self._validate_final_head_weights()

    def _validate_exit_heads(self) -> None:
        seen: dict[int, ExitHeadConfig] = {}
        for exit_head in self.exit_heads:
            if not isinstance(exit_head, ExitHeadConfig):
                raise ValueError(f"exit_heads: expected ExitHeadConfig records, got {exit_head!r}")
            if exit_head.layer_number > self.num_layers:
                raise ValueError(
                    f"exit layer number: {exit_head.layer_number} is out of range for a model "
                    f"with num_layers={self.num_layers} (valid: 1..{self.num_layers})"
                )
            if exit_head.depth in seen:
                raise ValueError(
                    f"exit_heads: duplicate exits at depth {exit_head.depth} "
                    f"({seen[exit_head.depth]} and {exit_head})"
                )
            seen[exit_head.depth] = exit_head
            if not exit_head.untied and self.untie_embeddings_and_output_weights:
                raise ValueError(
                    f"untied: the exit at layer {exit_head.layer_number} shares the word "
                    "embedding, but the model unties embeddings and output weights; untie the "
                    "exit heads too (--untie-exit-output-weights)"
                )
        if self.exit_heads:
            self._reject_unsupported_with_exits()
        if self.exit_heads and self.recompute_granularity == "full":
            self._check_full_recompute_boundaries()

    def _check_full_recompute_boundaries(self) -> None:
        """Full recomputation runs each chunk of layers without autograd and again in backward;
        a state inside a chunk has no autograd history, so an exit must read a chunk's input or
        output (megatron-core hands these out as the tensors the chunk returns, with history).
        ``block`` checkpoints single layers: always fine. ``uniform`` with N layers per chunk:
        every exit must sit at a multiple of N from its stage's first layer (or after its last).
        """
        if self.recompute_method != "uniform":
            return
        from megatron.early_exit.placement import stage_layer_range

        def inside(num_per_chunk: int) -> list[str]:
            bad = []
            for stage in range(self.pipeline_model_parallel_size):
                layers = stage_layer_range(self, stage)
                for e in self.exit_heads:
                    if e.layer_number not in layers:
                        continue
                    below = e.layer_number - layers.start + (0 if e.pre_exit else 1)
                    stage_output = not e.pre_exit and e.layer_number == layers[-1]
                    if below % num_per_chunk and not stage_output:
                        bad.append(f"{'before' if e.pre_exit else 'after'} layer {e.layer_number}")
            return bad

        bad = inside(self.recompute_num_layers)
        if bad:
            stages = range(self.pipeline_model_parallel_size)
            most = max(len(stage_layer_range(self, s)) for s in stages)
            valid = [n for n in range(1, most + 1) if not inside(n)]
            raise ValueError(
                f"recompute_num_layers: uniform full recomputation in chunks of "
                f"{self.recompute_num_layers} layers would put the exits {', '.join(bad)} inside a "
                "chunk, where their input has no autograd history; use recompute_method 'block' "
                f"or recompute_num_layers in {valid} (--recompute-method/--recompute-num-layers)"
            )

    def _reject_unsupported_with_exits(self) -> None:
        unsupported = {
            "virtual_pipeline_model_parallel_size": self.virtual_pipeline_model_parallel_size,
            "context_parallel_size": self.context_parallel_size
            if self.context_parallel_size > 1
            else None,
            "mtp_num_layers": self.mtp_num_layers,
            "calculate_per_token_loss": self.calculate_per_token_loss or None,
        }
        for name, value in unsupported.items():
            if value is not None:
                raise ValueError(f"{name}: {value!r} is not supported with early exits yet")
        if self.dynamic_exit_loss_weight and self.cross_entropy_loss_fusion:
            raise ValueError(
                "dynamic_exit_loss_weight: not supported with cross_entropy_loss_fusion (the fused "
                "kernel overwrites the logits the weight is computed from)"
            )

    def _validate_loss_schedule(self) -> None:
        _check_int("exit_loss_weight_warmup_iters", self.exit_loss_weight_warmup_iters, minimum=0)
        if self.exit_loss_weight_warmup_style not in WARMUP_STYLES:
            raise ValueError(
                "exit_loss_weight_warmup_style: unknown value "
                f"{self.exit_loss_weight_warmup_style!r}; "
                f"expected one of {', '.join(WARMUP_STYLES)}"
            )
        if not self.include_final_loss and not self.exit_heads:
            raise ValueError(
                "include_final_loss: dropping the final loss needs at least one exit head"
            )

    def _validate_final_head_weights(self) -> None:
        for name in ("exit_kl_weight", "exit_confidence_loss_weight"):
            value = getattr(self, name)
            if not _is_finite(value) or value < 0:
                raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")

    def check_trainable_final_head_targets(self) -> None:
        """Training-time rule (the pipeline schedule and the entry point call it; inference of a
        model with confidence heads works in any layout): exits whose loss learns from the final
        head's logits (distillation, confidence heads) must be on the last pipeline stage."""
        if not self.exits_use_final_logits:
            return
        # The teacher is the final head's output of the same microbatch, which only the last
        # pipeline stage has; sending the final logits back to earlier stages is not supported.
        last_stage = self.pipeline_model_parallel_size - 1
        on_last_stage = set(exit_heads_on_stage(self, last_stage))
        for exit_head in self.exit_heads:
            if exit_head not in on_last_stage:
                raise ValueError(
                    "exit_kl_weight / confidence_hidden_size (--exit-kl-weight, "
                    "--exit-confidence-head): the exit at layer "
                    f"{exit_head.layer_number} is not on the last of "
                    f"{self.pipeline_model_parallel_size} pipeline stages, where the final "
                    "head's logits it learns from are; use pipeline_model_parallel_size=1 or "
                    "put every exit on the last stage"
                )

    @property
    def exits_use_final_logits(self) -> bool:
        """Whether exit losses need the final head's logits (distillation or confidence)."""
        return self.exit_kl_weight > 0 or any(e.confidence_hidden_size for e in self.exit_heads)

    def exit_head(self, depth: int) -> ExitHeadConfig:
        """The exit at ``depth``; KeyError if there is none."""
        for exit_head in self.exit_heads:
            if exit_head.depth == depth:
                return exit_head
        raise KeyError(f"no exit head at depth {depth}")


def make_exit_heads(
    layer_numbers: Sequence[int],
    *,
    pre_exit: bool = False,
    structure: str = "head",
    loss_weights: Sequence[float] | None = None,
    loss_weights_init: Sequence[float] | None = None,
    temperatures: Sequence[float] | None = None,
    untied: bool = False,
    confidence_hidden_size: int = 0,
) -> tuple[ExitHeadConfig, ...]:
    """Build exit records from EE-LLM-style parallel lists (``--exit-layer-nums``,
    ``--exit-layer-weight``, ...). Each list must have one entry per exit layer.

    Defaults follow the original: target weight 1.0, initial weight 0.0, temperature 1.0.
    """
    count = len(layer_numbers)
    lists = {
        "loss_weights": loss_weights,
        "loss_weights_init": loss_weights_init,
        "temperatures": temperatures,
    }
    for name, values in lists.items():
        if values is not None and len(values) != count:
            raise ValueError(
                f"{name}: got {len(values)} values for {count} exit layers "
                f"({list(layer_numbers)}); give one value per exit layer"
            )
    return tuple(
        ExitHeadConfig(
            layer_number=layer_number,
            pre_exit=pre_exit,
            structure=structure,
            loss_weight=1.0 if loss_weights is None else loss_weights[i],
            loss_weight_init=0.0 if loss_weights_init is None else loss_weights_init[i],
            temperature=1.0 if temperatures is None else temperatures[i],
            untied=untied,
            confidence_hidden_size=confidence_hidden_size,
        )
        for i, layer_number in enumerate(layer_numbers)
    )


def _is_finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")


__all__ = [
    "EXIT_STRUCTURES",
    "EarlyExitTransformerConfig",
    "ExitHeadConfig",
    "make_exit_heads",
]
