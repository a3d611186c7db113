"""One decoding step of an early-exit model, on the lean functional step (``lean.py``).

:meth:`Engine.forward` feeds new tokens at the end of a :class:`KVCache` and walks the depths
``0..L``: before layer ``l`` the cache's pending positions whose K/V stops at ``l - 1`` join the
chunk (catch-up of skipped layers, from their stored hidden states); after layer ``l`` every exit
the caller asked for at depth ``l`` is offered to the caller's ``on_exit`` callback as an
:class:`ExitView`, and the callback may end the step there. The view computes on demand: a
block exit's own layer always runs (it writes the exit's KV slot for every chunk position), but
the exit's transform, its confidence head and its vocabulary projection run only when the
callback asks for them (``view.confidence()`` costs a small MLP; ``view.logits()`` the full
projection), so a cheap decision pays for the projection only at the exit actually taken. A
step that reaches depth ``L`` without being stopped ends with the final norm and head. Logits
are gathered over tensor parallelism, so every TP rank sees the same logits and decides alike.

Layers, exits and heads run as :mod:`lean` functions over the model's own parameters (tested
equal to megatron-core's modules). Multi-token chunks and padded batches get one explicit
``[b, 1, n, offset + n]`` additive mask per step (``StepTables.mask``); RoPE tables are built once
per request with per-row positions, so left-padded rows get their own positions.

With pipeline parallelism (``Engine(model, pipeline_stage=True)``) the engine runs one stage's
slice: the depths ``first_depth..last_depth`` of its layers and the exits that live there, fed
with the previous stage's hidden states instead of tokens. Pipelined decoding
(``inference/pipelined.py``) never stops a step early, so a stage's cache has no pending
positions; only the PP=1 policies stop steps and rely on catch-up.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megatron.early_exit.inference.kv_cache import KVCache
from megatron.early_exit.inference.lean import LeanModel, StepTables, probed


class ExitView:
    """One exit's outputs for the last ``m`` positions of a step's chunk, computed on demand."""

    def __init__(self, engine: Engine, depth: int, states_fn: Callable[[], torch.Tensor]):
        self.depth = depth
        self.head = engine.model.exit_heads[engine.exits[depth].key]
        self._engine = engine
        self._states_fn = states_fn
        self._states: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None
        self._confidence: torch.Tensor | None = None

    @property
    def states(self) -> torch.Tensor:
        """``[m, b, h]`` the states the exit's output layer reads (after its transform)."""
        if self._states is None:
            self._states = self._states_fn()
        return self._states

    def logits(self) -> torch.Tensor:
        """``[b, m, V]`` float32 logits, gathered over TP (the full vocabulary projection)."""
        if self._logits is None:
            lean, states = self._engine.lean, self.states
            weight = lean.exit_weights[self.depth]
            name = f"exit{self.depth}/output_layer"
            self._logits = probed(name, states.shape[0], lean.project, states, weight)
            self._engine.counts["exit_projections"] += 1
        return self._logits

    @property
    def has_confidence_head(self) -> bool:
        return getattr(self.head, "confidence_head", None) is not None

    def confidence(self) -> torch.Tensor:
        """``[b, m]`` the learned confidence head's probability that this exit's top-1 token is
        the final head's (a few multiply-adds per hidden unit, no vocabulary projection)."""
        if not self.has_confidence_head:
            raise ValueError(
                f"the exit at depth {self.depth} has no confidence head (train one with "
                "--exit-confidence-head), so measure 'learned' cannot be used"
            )
        if self._confidence is None:
            states = self.states
            name = f"exit{self.depth}/confidence_head"
            confidence = probed(name, states.shape[0], self.head.confidence, states)
            self._confidence = confidence.transpose(0, 1).float()
            self._engine.counts["confidence_heads"] += 1
        return self._confidence


ExitCallback = Callable[[int, ExitView], bool]
"""``on_exit(depth, view) -> stop``: called at each requested exit, in depth order."""


@dataclass
class StepOutput:
    """What one :meth:`Engine.forward` computed."""

    depth: int
    """Backbone layers the step ran (``num_layers`` when it reached the final head)."""
    final_logits: torch.Tensor | None
    """``[b, m, V]`` final-head logits of the last ``m`` positions, or None if stopped early,
    not asked for, or not on this stage."""
    hidden: torch.Tensor | None = None
    """``[n, b, h]`` the chunk's hidden states after the stage's last layer (pipeline stages)."""


class Engine:
    """Runs an :class:`EarlyExitGPTModel` step by step over a :class:`KVCache`.

    ``pipeline_stage=False`` (the PP=1 methods) needs the whole model; ``True`` runs whatever
    slice this pipeline stage holds.
    """

    def __init__(self, model, pipeline_stage: bool = False) -> None:
        config = model.config
        if config.pipeline_model_parallel_size != 1 and not pipeline_stage:
            raise ValueError(
                "this decoding method needs pipeline_model_parallel_size=1 "
                f"(got {config.pipeline_model_parallel_size}); PP>1 decodes with method='pipelined'"
            )
        if config.sequence_parallel:
            raise ValueError("the generation engine does not support sequence_parallel")
        self.model = model
        self.num_layers = config.num_layers
        self.first_depth = model.layer_offset
        """Depth of this stage's input (0 on the first stage)."""
        self.last_depth = model.layer_offset + len(model.decoder.layers)
        """Depth of this stage's output (``num_layers`` on the last stage)."""
        self.is_first_stage = bool(model.pre_process)
        self.is_last_stage = bool(model.post_process)
        self.counts: Counter[str] = Counter()
        """Work done so far: ``layer_positions`` (positions x layers run), ``exit_projections``,
        ``final_projections``, ``confidence_heads`` (the benchmark's cost accounting)."""
        self.exits = {e.depth: e for e in model.local_exit_configs}
        """This stage's exits by depth."""
        self.max_positions = None
        """Positions the model can embed (its learned position table), None for RoPE."""
        if getattr(model, "position_embedding_type", "") == "learned_absolute":
            self.max_positions = model.max_sequence_length
        self.lean = LeanModel(model)
        self.device = next(model.parameters()).device

    def new_cache(self, pad_lengths: torch.Tensor, max_sequence_length: int) -> KVCache:
        """An empty cache for left-padded rows, with their per-row positions and RoPE tables."""
        cache = KVCache(pad_lengths, max_sequence_length, self.num_layers)
        cache.tables = StepTables(self.model, pad_lengths, max_sequence_length, self.device)
        return cache

    @torch.no_grad()
    def forward(
        self,
        cache: KVCache,
        tokens: torch.Tensor | None,
        exit_depths: Sequence[int] = (),
        on_exit: ExitCallback | None = None,
        num_logits: int = 1,
        *,
        hidden: torch.Tensor | None = None,
        final_logits: bool = True,
    ) -> StepOutput:
        """Feed ``tokens[b, n]`` (first stage) or ``hidden[n, b, h]`` (later pipeline stages) at
        ``cache.length``; see the module docstring.

        Args:
            exit_depths: exits to run when the step passes their depth (block exits fill their
                KV for every chunk position; the others only see the last positions).
            on_exit: decides whether the step stops after an exit; None never stops.
            num_logits: how many trailing positions' logits exits and the final head return.
            final_logits: whether a step that reaches the last layer runs the final head.
        """
        start = cache.length
        cache.tables.new_step()
        if self.is_first_stage:
            positions = cache.tables.positions[:, start : start + tokens.shape[1]]
            hidden = probed("embedding", tokens.shape[1], self.lean.embed, tokens, positions)
        elif hidden is None:
            raise ValueError("a later pipeline stage is fed hidden states, not tokens")
        depths = sorted(exit_depths)
        for depth in range(self.first_depth, self.last_depth + 1):
            if depth > self.first_depth:
                start, hidden = self._join_pending(cache, depth, start, hidden)
                layer = self.lean.layers[depth - self.first_depth - 1]
                hidden = probed(
                    "layer", hidden.shape[0], layer, hidden, cache.kv, start, cache.tables
                )
                self.counts["layer_positions"] += hidden.shape[0]
            if depth in depths:
                view = self._exit_view(cache, depth, start, hidden, num_logits)
                if on_exit is not None and on_exit(depth, view):
                    cache.update(start, depth, hidden)
                    return StepOutput(depth, None)
        # A pipeline stage records its positions as complete: every layer it holds has them.
        cache.update(start, self.num_layers, hidden)
        logits = None
        if self.is_last_stage and final_logits:
            logits = self._final_logits(hidden, num_logits)
        return StepOutput(self.last_depth, logits, hidden)

    @torch.no_grad()
    def complete(self, cache: KVCache, exit_depths: Sequence[int] = ()) -> None:
        """Push the cache's pending positions through the layers they skipped (and the block
        exits among ``exit_depths`` past their depth), feeding no new token: afterwards every
        position has K/V in every layer. The same computation the next full-depth step would
        do as its catch-up (PP=1)."""
        if not cache.filled_depths:
            return
        cache.tables.new_step()
        start, hidden = cache.length, None
        depths = set(exit_depths)
        for depth in range(cache.filled_depths[-1] + 1, self.num_layers + 1):
            start, hidden = self._join_pending(cache, depth, start, hidden)
            layer = self.lean.layers[depth - 1]
            hidden = probed("layer", hidden.shape[0], layer, hidden, cache.kv, start, cache.tables)
            self.counts["layer_positions"] += hidden.shape[0]
            if depth in depths:
                self._exit_view(cache, depth, start, hidden, 1)  # a block exit writes its KV
        cache.update(start, self.num_layers, hidden)

    def _join_pending(self, cache: KVCache, depth: int, start: int, hidden: torch.Tensor | None):
        """Prepend the pending positions that skipped layer ``depth`` (their catch-up);
        ``hidden`` None: the chunk has no positions yet (``complete``)."""
        first, pending = cache.catch_up(depth)
        if pending is None or first >= start:
            return start, hidden
        assert first + pending.shape[0] == start, (first, pending.shape, start)
        return first, pending if hidden is None else torch.cat([pending, hidden], dim=0)

    def _exit_view(self, cache, depth, start, hidden, num_logits) -> ExitView:
        """The exit at ``depth`` over the last ``num_logits`` chunk positions. A block exit's
        layer runs now on every position (it writes the exit's KV slot); other transforms wait
        until the caller asks."""
        transform = self.lean.exit_transforms[depth]
        name = f"exit{depth}/{transform.structure}"
        if transform.layer is not None:
            args = (hidden, cache.kv, start, cache.tables)
            out = probed(f"exit{depth}/layer", hidden.shape[0], transform.layer, *args)
            states = probed(name, num_logits, transform, out[-num_logits:])
            return ExitView(self, depth, lambda: states)
        last = hidden[-num_logits:]
        return ExitView(self, depth, lambda: probed(name, last.shape[0], transform, last))

    def _final_logits(self, hidden: torch.Tensor, num_logits: int) -> torch.Tensor:
        states = hidden[-num_logits:]
        width = states.shape[0]
        if self.lean.final_norm is not None:
            states = probed("final/norm", width, self.lean.final_norm, states)
        self.counts["final_projections"] += 1
        return probed(
            "final/output_layer", width, self.lean.project, states, self.lean.final_weight
        )
