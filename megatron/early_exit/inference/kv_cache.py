"""The KV cache of early-exit decoding: the lean step's buffers plus per-position fill depth.

Storage is :class:`lean.LeanKV`: one ``(K, V)`` buffer pair per attention layer, keyed by the
layer's global ``layer_number`` (block exits own the slots ``num_layers + depth``), each
``[b, groups/tp, max_seq, head_dim]`` (the layout ``scaled_dot_product_attention`` reads), keys
stored after RoPE, written by the lean layers at the step's start position. The per-request
tables (positions, RoPE ``cos``/``sin``, the step's masks) are :class:`lean.StepTables`. This
module adds what early exit needs on top (see ``docs/kv_cache_policy.md``):

* ``filled_depths``: for every position that is not yet in all layers' caches ("pending"), the
  number of backbone layers that hold its K/V, and ``pending_hidden``, its hidden state after that
  many layers, so that a later step can push it through the layers it skipped (catch-up) instead
  of re-running it from the embedding.
* Invariant: fill depths are non-increasing along the pending positions, so at any layer the
  positions that still need that layer form one contiguous suffix (one cache write per layer).
* Rows are left-padded; ``pad_lengths[b]`` gives each row's padding, from which the per-row
  attention masks and position ids follow.

:meth:`KVCache.update` is the only mutator: it records what one step computed, and dropping the
tail of a step (rejected speculative drafts) is just recording fewer positions.
"""

from __future__ import annotations

import torch

from megatron.early_exit.inference.lean import LeanKV, StepTables


class KVCache:
    """Static KV buffers for one batch and the fill state of every position."""

    def __init__(
        self, pad_lengths: torch.Tensor, max_sequence_length: int, num_layers: int
    ) -> None:
        self.pad_lengths = pad_lengths.long().cpu()  # [b]
        self.num_layers = num_layers
        self.kv = LeanKV(len(pad_lengths), max_sequence_length)
        self.complete_length = 0
        """Positions ``[0, complete_length)`` have K/V in every layer."""
        self.filled_depths: list[int] = []
        """Fill depth of positions ``[complete_length, length)`` (non-increasing)."""
        self.pending_hidden: torch.Tensor | None = None
        """``[length - complete_length, b, h]``: each pending position's state at its depth."""
        self.tables: StepTables | None = None
        """Per-row positions, RoPE tables and step masks (set by the engine)."""

    @property
    def batch_size(self) -> int:
        return len(self.pad_lengths)

    @property
    def length(self) -> int:
        """Number of positions written (complete or pending)."""
        return self.complete_length + len(self.filled_depths)

    @property
    def max_sequence_length(self) -> int:
        return self.kv.max_sequence_length

    def catch_up(self, depth: int) -> tuple[int, torch.Tensor | None]:
        """Pending positions whose K/V stops at layer ``depth - 1``: ``(first position, hidden)``.

        They must join a step right before layer ``depth``; ``hidden`` is ``[n, b, h]`` or None.
        """
        rows = [i for i, filled in enumerate(self.filled_depths) if filled == depth - 1]
        if not rows:
            return self.length, None
        assert rows == list(range(rows[0], rows[-1] + 1)), self.filled_depths
        return self.complete_length + rows[0], self.pending_hidden[rows[0] : rows[-1] + 1]

    def update(self, start: int, depth: int, hidden: torch.Tensor) -> None:
        """Record a step: positions ``[start, start + n)`` now have K/V in layers ``1..depth`` and
        ``hidden[n, b, h]`` is their state after ``depth`` layers. Every position from
        ``start + n`` on is forgotten (rolled back: the buffers keep stale values there, which
        no later step reads, since each step reads only up to what it has just written).
        """
        assert 0 <= start <= self.length, (start, self.length)
        if not self.filled_depths and start == self.complete_length and depth >= self.num_layers:
            self.complete_length += hidden.shape[0]  # the common full-depth step: nothing pending
            assert self.length <= self.max_sequence_length, "increase max_sequence_length"
            return
        if start < self.complete_length:  # rollback into complete positions
            self.complete_length, self.filled_depths = start, []
            self.pending_hidden = None
        keep = start - self.complete_length
        assert all(d >= depth for d in self.filled_depths[:keep]), (self.filled_depths, depth)
        self.filled_depths = self.filled_depths[:keep] + [depth] * hidden.shape[0]
        parts = ([self.pending_hidden[:keep]] if keep else []) + ([hidden] if len(hidden) else [])
        self.pending_hidden = torch.cat(parts, dim=0) if parts else None
        num_complete = sum(1 for d in self.filled_depths if d >= self.num_layers)
        assert self.filled_depths[:num_complete] == [self.num_layers] * num_complete
        self.complete_length += num_complete
        self.filled_depths = self.filled_depths[num_complete:]
        self.pending_hidden = self.pending_hidden[num_complete:] if self.filled_depths else None
        assert self.length <= self.max_sequence_length, "increase max_sequence_length"

    # ------------------------------------------------------------------ per-row views for a step

    def position_ids(self, start: int, num_positions: int) -> torch.Tensor:
        """``[b, n]`` position ids of slots ``[start, start + n)`` (0 at each row's first token;
        padding slots clamp to 0)."""
        slots = torch.arange(start, start + num_positions)
        return (slots.unsqueeze(0) - self.pad_lengths.unsqueeze(1)).clamp(min=0)

    def key_value(self, layer_number: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(K, V)`` buffers of a layer (global ``layer_number``), ``[b, g, max_seq, d]``."""
        return self.kv.buffers[layer_number]
