"""EarlyExitGPTModel: megatron-core's GPTModel with exit heads on intermediate layers.

The backbone (embedding, TransformerBlock, final norm and head) is megatron-core's, unchanged.
Exit heads live in ``self.exit_heads``, a ModuleDict keyed by exit depth, so checkpoint keys do
not depend on the pipeline split; each stage builds only the heads of its own layers.

How exits see the backbone: for the duration of one forward, a forward hook on each exit's layer
(a forward-pre hook for pre-exits) records the hidden state the exit reads. The block itself runs
unmodified, so megatron-core's layer loop, SP/TP handling and selective recomputation stay
intact. Under full-layer recomputation a chunk of layers runs without autograd and again in
backward; the tensors a chunk receives and returns carry the history, so the config requires every
exit to read one of them (see ``EarlyExitTransformerConfig._check_full_recompute_boundaries``).

Forward returns ``(output, exit_outputs)``:

* ``output`` is what GPTModel returns: the per-token final loss ``[b, s]`` when labels are given
  on the last stage, the logits ``[b, s, v]`` without labels, the hidden states on other stages;
* ``exit_outputs`` maps each local exit depth to its per-token loss ``[b, s]`` (labels given) or
  its logits ``[b, s, v(/tp)]``; with ``defer_exits=True`` it maps to :class:`PendingExit`
  objects that compute the same thing later (the pipeline schedule runs them right before the
  microbatch's backward, so exit logits of only one microbatch are alive at a time).

Learning from the final head (distillation, ``exit_kl_weight > 0``; confidence heads): with labels,
a forward hook on the final output layer turns its logits into :class:`FinalHeadTargets` (teacher
log-probabilities, top-1 tokens) before the final cross entropy overwrites them, and hands them to
every exit of the microbatch. The per-token loss an exit returns is still its cross entropy in
value; the KL and confidence terms ride on it through ``AttachAuxiliaryLoss`` (see ``losses.py``)
and are kept, per token and detached, in :attr:`PendingExit.components`.

Tied exits share the word embedding: on the first stage the embedding itself, on the last stage
megatron-core's tied output weight, on any other stage a copy (``early_exit_word_embeddings``)
that joins megatron-core's embedding group, so it starts equal to the embedding and its gradient
is all-reduced with the first/last-stage pair by ``finalize_model_grads``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from megatron.core.utils import divide, make_tp_sharded_tensor_for_checkpoint

from megatron.early_exit import platform
from megatron.early_exit.config import EarlyExitTransformerConfig, ExitHeadConfig
from megatron.early_exit.model.exit_heads import LayerInputs, build_exit_head
from megatron.early_exit.model.layer_specs import decoder_block_spec
from megatron.early_exit.model.losses import (
    FinalHeadTargets,
    attach_auxiliary_loss,
    confidence_loss,
    final_head_targets,
    vocab_parallel_argmax,
    vocab_parallel_kl_divergence,
    vocab_parallel_max_prob,
)
from megatron.early_exit.placement import exit_heads_on_stage


@dataclass
class PendingExit:
    """An exit whose head has not run yet: the recorded hidden state and what the head needs."""

    model: EarlyExitGPTModel
    depth: int
    hidden_states: torch.Tensor
    layer_inputs: LayerInputs
    labels: torch.Tensor | None
    runtime_gather_output: bool | None = None
    final_targets: FinalHeadTargets | None = None
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    """After :meth:`compute` with labels: the exit's extra per-token loss terms ``[b, s]``,
    detached and unweighted: ``"kl"`` (distillation) and ``"confidence"`` (the confidence
    head's binary cross entropy), those the model uses."""

    def compute(self) -> torch.Tensor:
        """Per-token loss ``[b, s]`` when labels were given, else logits ``[b, s, v(/tp)]``."""
        return self.model.exit_output(
            self.depth,
            self.hidden_states,
            self.layer_inputs,
            labels=self.labels,
            runtime_gather_output=self.runtime_gather_output,
            final_targets=self.final_targets,
            components=self.components,
        )


class EarlyExitGPTModel(GPTModel):
    """GPT model with early-exit heads; builds any pipeline stage's slice."""

    def __init__(
        self,
        config: EarlyExitTransformerConfig,
        vocab_size: int,
        max_sequence_length: int,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = True,
        position_embedding_type: str = "learned_absolute",
        rotary_percent: float = 1.0,
        rotary_base: int = 10000,
        vp_stage: int | None = None,
    ):
        if not isinstance(config, EarlyExitTransformerConfig):
            raise TypeError("EarlyExitGPTModel needs an EarlyExitTransformerConfig")
        super().__init__(
            config=config,
            transformer_layer_spec=decoder_block_spec(config, vp_stage),
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=not config.untie_embeddings_and_output_weights,
            position_embedding_type=position_embedding_type,
            rotary_percent=rotary_percent,
            rotary_base=rotary_base,
            vp_stage=vp_stage,
        )
        stage = parallel_state.get_pipeline_model_parallel_rank()
        self.layer_offset = get_transformer_layer_offset(config, vp_stage, stage)
        self.local_exit_configs: tuple[ExitHeadConfig, ...] = exit_heads_on_stage(
            config, stage, vp_stage
        )
        self.exit_heads = torch.nn.ModuleDict(
            {
                e.key: build_exit_head(
                    config,
                    e,
                    vocab_size,
                    tp_group=self.pg_collection.tp,
                    layer_offset=self.layer_offset,
                    vp_stage=vp_stage,
                )
                for e in self.local_exit_configs
            }
        )
        self.early_exit_word_embeddings = self._build_exit_embedding_copy(vocab_size)

    # ---------------------------------------------------------------------------------------
    # Tied exit heads
    # ---------------------------------------------------------------------------------------

    def _build_exit_embedding_copy(self, vocab_size: int) -> torch.nn.Parameter | None:
        """A copy of the word embedding for tied exits on a stage without embedding or head."""
        has_tied = any(not e.untied for e in self.local_exit_configs)
        if self.pre_process or self.post_process:
            return None
        if not has_tied:
            if self._is_in_embd_group():
                raise ValueError(
                    "this middle pipeline stage is in the embedding group but hosts no tied exit "
                    "head; pass platform.initialize(embedding_stages=tied_exit_stages(config))"
                )
            return None
        if not self._is_in_embd_group():
            raise ValueError(
                "tied exit heads on a middle pipeline stage need that stage in the embedding "
                "group: call platform.initialize(embedding_stages=tied_exit_stages(config))"
            )
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        on_cpu = self.config.use_cpu_initialization
        weight = torch.nn.Parameter(
            torch.zeros(
                divide(vocab_size, tp_size),
                self.config.hidden_size,
                dtype=self.config.params_dtype,
                device=torch.device("cpu") if on_cpu else platform.device(),
            )
        )
        tensor_parallel.set_tensor_model_parallel_attributes(weight, True, 0, 1)
        weight.shared = True
        weight.shared_embedding = True
        weight.is_embedding_or_output_parameter = True
        if torch.distributed.is_initialized():
            # Joins the all-reduce megatron-core's first and last stage run in
            # setup_embeddings_and_output_layer: zeros here, so the sum is the embedding.
            torch.distributed.all_reduce(weight.data, group=self.embd_group)
        return weight

    def _is_in_embd_group(self) -> bool:
        if self.embd_group is None or not torch.distributed.is_initialized():
            return False
        ranks = torch.distributed.get_process_group_ranks(self.embd_group)
        if torch.distributed.get_rank() not in ranks:
            return False
        if self.pre_process or self.post_process:
            return super()._is_in_embd_group()
        return True

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        if self.pre_process or self.post_process:
            return super().shared_embedding_or_output_weight()
        return self.early_exit_word_embeddings

    def tied_exit_weight(self) -> torch.Tensor | None:
        """The word-embedding weight tied exits on this stage project with."""
        if self.pre_process:
            return self.embedding.word_embeddings.weight
        if self.post_process and self.share_embeddings_and_output_weights:
            return self.output_layer.weight
        return self.early_exit_word_embeddings

    # ---------------------------------------------------------------------------------------
    # Forward
    # ---------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        decoder_input: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inference_context=None,
        packed_seq_params=None,
        runtime_gather_output: bool | None = None,
        *,
        exit_depths: Iterable[int] | None = None,
        defer_exits: bool = False,
        loss_mask: torch.Tensor | None = None,
        stop_after_exits: bool = False,
    ):
        """Run this stage; see the module docstring for what is returned.

        Args:
            exit_depths: which local exits to evaluate (default: all of this stage's exits).
            defer_exits: return :class:`PendingExit` objects instead of computing the exits.
            stop_after_exits: skip the layers after the deepest exit asked for (EE-Tuning on
                the deepest stage with exits: nothing after it has a loss). ``output`` is then
                None. Only without autograd, where abandoning the forward leaves no graph. When
                the exits learn from the final head (distillation, confidence heads) and labels
                are given, the forward runs to the final head anyway and ``output`` is the final
                per-token loss.
        """
        decoder_input, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, seq_offset, _ = (
            self._preprocess(
                input_ids=input_ids,
                position_ids=position_ids,
                decoder_input=decoder_input,
                inference_context=inference_context,
                packed_seq_params=packed_seq_params,
            )[:6]
        )
        wanted = self._select_exits(exit_depths)
        targets_needed = self._final_head_targets_needed(wanted, labels)
        if stop_after_exits and torch.is_grad_enabled():
            raise ValueError("stop_after_exits: only supported without autograd (EE-Tuning)")
        if stop_after_exits and not any(targets_needed):
            return self._forward_until_exits(
                wanted, decoder_input, attention_mask, rotary_pos_emb, labels, defer_exits
            )
        with self._record_exit_inputs(wanted) as recorded:
            hidden_states = self.decoder(
                hidden_states=decoder_input,
                attention_mask=attention_mask,
                inference_context=inference_context,
                rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos,
                rotary_pos_sin=rotary_pos_sin,
                packed_seq_params=packed_seq_params,
                sequence_len_offset=seq_offset,
            )
        with self._capture_final_head_targets(*targets_needed) as captured:
            output = self._postprocess(
                hidden_states=hidden_states,
                input_ids=input_ids,
                position_ids=position_ids,
                labels=labels,
                rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos,
                rotary_pos_sin=rotary_pos_sin,
                loss_mask=loss_mask,
                decoder_input=decoder_input,
                attention_mask=attention_mask,
                packed_seq_params=packed_seq_params,
                sequence_len_offset=seq_offset,
                runtime_gather_output=runtime_gather_output,
                inference_context=inference_context,
            )
        layer_inputs = LayerInputs(
            attention_mask, rotary_pos_emb, inference_context, packed_seq_params
        )
        targets = captured.get("targets")
        pending = {
            depth: PendingExit(
                self, depth, recorded[depth], layer_inputs, labels, runtime_gather_output, targets
            )
            for depth in sorted(recorded)
        }
        if defer_exits:
            return output, pending
        return output, {depth: p.compute() for depth, p in pending.items()}

    def _forward_until_exits(
        self, wanted, decoder_input, attention_mask, rotary_pos_emb, labels, defer_exits
    ):
        if not wanted:
            raise ValueError("stop_after_exits: this stage evaluates no exit")
        deepest = max(wanted, key=lambda e: e.depth)
        layer = self.decoder.layers[deepest.layer_number - self.layer_offset - 1]
        with self._record_exit_inputs(wanted) as recorded:
            handle = (
                layer.register_forward_pre_hook(_stop_forward)
                if deepest.pre_exit
                else layer.register_forward_hook(_stop_forward)
            )
            try:
                self.decoder(
                    hidden_states=decoder_input,
                    attention_mask=attention_mask,
                    rotary_pos_emb=rotary_pos_emb,
                )
            except _ExitInputsRecorded:
                pass
            finally:
                handle.remove()
        inputs = LayerInputs(attention_mask, rotary_pos_emb)
        pending = {d: PendingExit(self, d, recorded[d], inputs, labels) for d in sorted(recorded)}
        if defer_exits:
            return None, pending
        return None, {depth: p.compute() for depth, p in pending.items()}

    def _select_exits(self, exit_depths: Iterable[int] | None) -> tuple[ExitHeadConfig, ...]:
        if exit_depths is None:
            return self.local_exit_configs
        wanted = set(exit_depths)
        local = {e.depth for e in self.local_exit_configs}
        if not wanted <= local:
            raise ValueError(
                f"exit_depths: {sorted(wanted - local)} are not exits of this stage "
                f"(local exits: {sorted(local)})"
            )
        return tuple(e for e in self.local_exit_configs if e.depth in wanted)

    def _final_head_targets_needed(
        self, wanted: tuple[ExitHeadConfig, ...], labels: torch.Tensor | None
    ) -> tuple[bool, bool]:
        """Whether the evaluated exits need the final head's (log-probabilities, top-1)."""
        if labels is None or not wanted:
            return False, False
        needed = (
            self.config.exit_kl_weight > 0,
            any(e.confidence_hidden_size for e in wanted),
        )
        if any(needed) and not self.post_process:
            raise ValueError(
                "exit_kl_weight / confidence heads: the exits of this pipeline stage need the "
                "final head's logits, which only the last stage has"
            )  # EarlyExitTransformerConfig rejects such a placement; this is a safety net
        return needed

    @contextlib.contextmanager
    def _capture_final_head_targets(self, log_probs: bool, top1: bool):
        """During one ``_postprocess``: turn the final output layer's logits into
        :class:`FinalHeadTargets` (``captured["targets"]``) before the cross entropy runs."""
        captured: dict[str, FinalHeadTargets] = {}
        if not (log_probs or top1):
            yield captured
            return

        def hook(module, args, output):
            logits = output[0] if isinstance(output, tuple) else output  # [s, b, v/tp]
            captured["targets"] = final_head_targets(
                logits.detach(), log_probs=log_probs, top1=top1, tp_group=self.pg_collection.tp
            )

        handle = self.output_layer.register_forward_hook(hook)
        try:
            yield captured
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _record_exit_inputs(self, exit_configs: tuple[ExitHeadConfig, ...]):
        """Record, during one decoder call, the hidden state each exit reads."""
        recorded: dict[int, torch.Tensor] = {}
        handles = []
        for exit_config in exit_configs:
            layer = self.decoder.layers[exit_config.layer_number - self.layer_offset - 1]
            assert layer.layer_number == exit_config.layer_number, (layer.layer_number, exit_config)
            if exit_config.pre_exit:
                hook = partial(_record_layer_input, recorded, exit_config.depth)
                handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                hook = partial(_record_layer_output, recorded, exit_config.depth)
                handles.append(layer.register_forward_hook(hook))
        try:
            yield recorded
        finally:
            for handle in handles:
                handle.remove()

    def exit_output(
        self,
        depth: int,
        hidden_states: torch.Tensor,
        layer_inputs: LayerInputs | None = None,
        labels: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
        final_targets: FinalHeadTargets | None = None,
        components: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Apply exit head ``depth`` to ``hidden_states`` ``[s(/tp), b, h]``.

        Returns the per-token loss ``[b, s]`` (temperature-scaled logits, optionally weighted by
        the exit's stop-gradient confidence) when ``labels`` are given, else logits ``[b, s, v]``.
        With ``exit_kl_weight > 0`` or a confidence head, the loss needs ``final_targets`` (the
        forward supplies them) and carries the gradient of ``W * KL + c * BCE`` (see
        ``losses.py``); its value stays the cross entropy. ``components``, when given, receives
        those terms per token, detached (``"kl"``, ``"confidence"``).
        """
        exit_config = self.config.exit_head(depth)
        if labels is None and runtime_gather_output is None:
            runtime_gather_output = not self.parallel_output
        head = self.exit_heads[exit_config.key]
        states = head.transform(hidden_states, layer_inputs)
        logits = head.project(
            states,
            self.tied_exit_weight(),
            runtime_gather_output=False if labels is not None else runtime_gather_output,
        )
        if labels is None:
            return logits.transpose(0, 1).contiguous()  # [s, b, v] -> [b, s, v]
        # Everything that reads the logits runs before the cross entropy: megatron's
        # vocab-parallel CE overwrites its fp32 input.
        self._check_final_targets(exit_config, final_targets)
        auxiliary: dict[str, torch.Tensor] = {}  # unweighted per-token terms [b, s]
        if exit_config.confidence_hidden_size:
            auxiliary["confidence"] = self._confidence_loss(head, states, logits, final_targets)
        if exit_config.temperature != 1.0:
            logits = logits / exit_config.temperature
        if self.config.exit_kl_weight > 0:
            auxiliary["kl"] = vocab_parallel_kl_divergence(
                final_targets.log_probs, logits, self.pg_collection.tp
            ).transpose(0, 1)  # [s, b] -> [b, s]
        confidence = None
        if self.config.dynamic_exit_loss_weight:
            confidence = vocab_parallel_max_prob(logits, self.pg_collection.tp).transpose(0, 1)
        loss = self.compute_language_model_loss(labels, logits)
        loss = loss if confidence is None else loss * confidence
        if components is not None:
            components.update({name: term.detach() for name, term in auxiliary.items()})
        if not auxiliary:
            return loss
        weights = {
            "kl": self.config.exit_kl_weight,
            "confidence": self.config.exit_confidence_loss_weight,
        }
        weighted = [weights[name] * term for name, term in auxiliary.items()]
        return attach_auxiliary_loss(loss, torch.stack(weighted).sum(dim=0))

    def _check_final_targets(
        self, exit_config: ExitHeadConfig, final_targets: FinalHeadTargets | None
    ) -> None:
        needs_log_probs = self.config.exit_kl_weight > 0
        needs_top1 = bool(exit_config.confidence_hidden_size)
        if not (needs_log_probs or needs_top1):
            return
        if (
            final_targets is None
            or (needs_log_probs and final_targets.log_probs is None)
            or (needs_top1 and final_targets.top1 is None)
        ):
            raise ValueError(
                f"exit at depth {exit_config.depth}: its loss needs the final head's logits "
                "(exit_kl_weight > 0 or a confidence head); run it through the model's forward "
                "with labels"
            )

    def _confidence_loss(
        self,
        head,
        states: torch.Tensor,
        logits: torch.Tensor,
        final_targets: FinalHeadTargets,
    ) -> torch.Tensor:
        """Per-token BCE ``[b, s]`` of the exit's confidence head; its target compares the
        exit's top-1 token (of the untempered logits, as decoding sees them) with the final
        head's."""
        # The head reads the exit's state detached: it probes the exit and its loss does not
        # reshape the exit. Under SP the state is this rank's sequence shard.
        confidence_logits = head.confidence_logits(states.detach())  # [s(/tp), b]
        if self.config.sequence_parallel:
            confidence_logits = tensor_parallel.gather_from_sequence_parallel_region(
                confidence_logits, tensor_parallel_output_grad=False, group=self.pg_collection.tp
            )  # [s/tp, b] -> [s, b]; backward: this rank's slice (the loss is replicated)
        exit_top1 = vocab_parallel_argmax(logits, self.pg_collection.tp)
        bce = confidence_loss(confidence_logits, exit_top1, final_targets.top1)
        return bce.transpose(0, 1)  # [s, b] -> [b, s]

    # ---------------------------------------------------------------------------------------
    # Distributed checkpointing
    # ---------------------------------------------------------------------------------------

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> ShardedStateDict:
        """megatron-core's sharded state dict of the backbone plus every local exit head.

        * Each exit head contributes its own sharded state dict under ``exit_heads.<depth>.``:
          its vocab-parallel projection, MLP and (``block``) transformer layer stay sharded over
          TP. (``exit_heads`` is a ModuleDict, for which megatron-core's default would record
          every tensor as replicated, i.e. only TP rank 0's shard.) Keys hold the exit depth and
          no layer number, so they are the same for every pipeline split; a block exit's layer
          is saved relative to its head (``exit_heads.<depth>.layer.``).
        * The middle-stage copy of the tied word embedding (``early_exit_word_embeddings``) is
          not a tensor of its own: like megatron-core's tied output layer on the last stage, it
          is a non-main replica of ``embedding.word_embeddings.weight`` (replica id ``1 +
          stage``, distinct from the first stage's 0 and the last stage's 1), so saving writes
          the embedding once and loading fills the copy from the embedding.
        """
        sharded_state_dict = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        heads_prefix = f"{prefix}exit_heads."
        for key in [k for k in sharded_state_dict if k.startswith(heads_prefix)]:
            del sharded_state_dict[key]  # the replicated-by-default ModuleDict entries
        for key, head in self.exit_heads.items():
            sharded_state_dict.update(
                head.sharded_state_dict(f"{heads_prefix}{key}.", sharded_offsets, metadata)
            )
        if self.early_exit_word_embeddings is not None:
            self._tie_exit_embedding_copy_state_dict(sharded_state_dict, prefix)
        return sharded_state_dict

    def _tie_exit_embedding_copy_state_dict(
        self, sharded_state_dict: ShardedStateDict, prefix: str
    ) -> None:
        copy_key = f"{prefix}early_exit_word_embeddings"
        assert copy_key in sharded_state_dict, sorted(sharded_state_dict)
        stage = parallel_state.get_pipeline_model_parallel_rank()
        sharded_state_dict[copy_key] = make_tp_sharded_tensor_for_checkpoint(
            tensor=self.early_exit_word_embeddings,
            key=f"{prefix}embedding.word_embeddings.weight",
            replica_id=(1 + stage, 0, parallel_state.get_data_parallel_rank(True)),
            allow_shape_mismatch=True,
            tp_group=self.tp_group,
        )


class _ExitInputsRecorded(Exception):
    """Raised by a hook to abandon the rest of a no-grad forward once every exit input is in."""


def _stop_forward(*_args):
    raise _ExitInputsRecorded


def _record_layer_input(recorded, depth, module, args, kwargs):
    recorded[depth] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _record_layer_output(recorded, depth, module, args, output):
    recorded[depth] = output[0] if isinstance(output, tuple) else output
