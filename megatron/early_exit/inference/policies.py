"""How the KV of layers a token skipped gets filled: one policy object per decoding method.

Every policy has the same interface, ``step(engine, cache, state) -> Emitted``: feed
``state.inputs`` (the prompt, then each row's last emitted token), and return the next token(s)
of every row. The fill strategies (see ``docs/kv_cache_policy.md``):

* :class:`FullDepth`: never exits; every position runs through every layer.
* :class:`KVRecompute` (EE-LLM's method for PP=1): a step stops as soon as every active row has
  exited (the batch runs as deep as its deepest row; each row keeps the token of its own first
  qualifying exit). Positions left short of the last layer stay pending in the cache and are
  pushed through the layers they skipped, together with the next token, before those layers
  read the cache.
* :class:`SelfSpeculative`: an exit drafts ``k`` tokens (layers up to the exit), one full-depth
  pass verifies them and fills every layer's KV of the drafted positions; the cache rolls back
  past the first rejected draft. Lossless: greedy output equals full-model greedy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from megatron.early_exit.inference.decide import ExitPolicy, confidence, exit_mask
from megatron.early_exit.inference.engine import Engine, ExitView
from megatron.early_exit.inference.kv_cache import KVCache
from megatron.early_exit.inference.sampling import (
    greedy_verify,
    sampling_logprobs,
    speculative_accept,
    token_logprobs,
)


class Draw(NamedTuple):
    """What :meth:`RowSampler.sample` drew for every row of ``logits[b, V]``."""

    tokens: torch.Tensor
    """``[b]`` long (CPU)."""
    logprobs: torch.Tensor
    """``[b]`` float32 (CPU): the reported log-prob (see ``sampling.sample``)."""
    top_ids: torch.Tensor | None = None
    """``[b, N]`` the ``N`` most likely tokens under the head's own log-softmax (if asked)."""
    top_logprobs: torch.Tensor | None = None
    """``[b, N]`` their log-probs."""


class RowSampler:
    """Sampling settings and one generator per row.

    Settings are per row (``temperature``, ``top_k``, ``top_p`` are ``[b]`` tensors), so rows of
    different requests share one sampler in a continuous batch (:meth:`concat`, :meth:`select`).
    Batched: greedy rows take the argmax and its log-softmax value (a gather and a logsumexp, no
    sort); sampled rows get their tempered, top-k/top-p filtered distribution in one batched call,
    and only the final draw runs per row, from the row's own generator. Per-row generators make
    every row's random stream independent of the batch it runs in, so a row samples the same
    tokens batched or alone (given the same seed). ``sample(..., step=t)`` reseeds the row's
    generator from ``(seed, t)`` first, so the ``t``-th generated token's draw does not depend on
    which head or which pipeline stage sampled the tokens before it: the one-token-per-step
    methods (full depth, KV recompute, pipelined) pass the token index (one for all rows, or a
    ``[b]`` tensor where rows are at different tokens) and therefore sample alike. Speculative
    decoding uses the running streams (``step=None``).
    """

    def __init__(
        self,
        temperature: float | torch.Tensor,
        top_k: int | torch.Tensor,
        top_p: float | torch.Tensor,
        seeds: Sequence[int],
        num_top_logprobs: int = 0,
        generators: Sequence[torch.Generator] | None = None,
    ):
        b = len(seeds)
        self.temperature = torch.as_tensor(temperature, dtype=torch.float32).expand(b).clone()
        self.top_k = torch.as_tensor(top_k, dtype=torch.long).expand(b).clone()
        self.top_p = torch.as_tensor(top_p, dtype=torch.float32).expand(b).clone()
        self.seeds = [int(s) for s in seeds]
        if generators is None:
            generators = [torch.Generator().manual_seed(s) for s in self.seeds]
        self.generators = list(generators)
        self.num_top_logprobs = num_top_logprobs
        self._greedy_rows = self.temperature == 0
        self.greedy = bool(self._greedy_rows.all())
        """Every row is greedy."""

    @classmethod
    def concat(cls, samplers: Sequence[RowSampler]) -> RowSampler:
        """One sampler over the rows of ``samplers`` in order; generators are shared (not copied),
        so each row's random stream goes on where it was."""
        return cls(
            torch.cat([s.temperature for s in samplers]),
            torch.cat([s.top_k for s in samplers]),
            torch.cat([s.top_p for s in samplers]),
            [seed for s in samplers for seed in s.seeds],
            max((s.num_top_logprobs for s in samplers), default=0),
            [g for s in samplers for g in s.generators],
        )

    def select(self, rows: Sequence[int]) -> RowSampler:
        """The sampler of ``rows`` (indices), sharing their generators."""
        index = torch.tensor(list(rows), dtype=torch.long)
        return RowSampler(
            self.temperature[index], self.top_k[index], self.top_p[index],
            [self.seeds[r] for r in rows], self.num_top_logprobs,
            [self.generators[r] for r in rows],
        )  # fmt: skip

    def sample(
        self, logits: torch.Tensor, rows: torch.Tensor, step: int | torch.Tensor | None = None
    ) -> Draw:
        """Tokens and log-probs ``[b]`` of ``logits[b, V]``; only the ``rows`` (bool ``[b]``)
        draw from their generators (the others' entries are unspecified); ``step``: index of the
        token being drawn, one for all rows or ``[b]`` (reseeds the rows' generators, see
        above)."""
        logits = logits.float()
        # Greedy rows (every row, usually): the argmax and its log-softmax, vectorised.
        tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        tokens, logprobs = tokens.cpu(), logprobs.cpu()
        if not self.greedy:
            drawing = (rows.cpu() & ~self._greedy_rows).nonzero().flatten()
            if len(drawing):
                log_probs = sampling_logprobs(
                    logits[drawing.to(logits.device)].cpu(), self.temperature[drawing],
                    self.top_k[drawing], self.top_p[drawing],
                )  # fmt: skip
                probs = log_probs.exp()
                for i, row in enumerate(drawing.tolist()):
                    generator = self.generators[row]
                    if step is not None:
                        index = step if isinstance(step, int) else int(step[row])
                        generator.manual_seed(_step_seed(self.seeds[row], index))
                    token = torch.multinomial(probs[i : i + 1], 1, generator=generator)[0, 0]
                    tokens[row], logprobs[row] = token, log_probs[i, token]
        return Draw(tokens, logprobs, *self.top(logits))

    def top(self, logits: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(ids, log-probs)`` ``[b, N]`` of the ``N = num_top_logprobs`` most likely tokens
        under ``logits[b, V]``'s log-softmax (the head's own distribution), or ``(None, None)``."""
        if not self.num_top_logprobs:
            return None, None
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        values, ids = log_probs.topk(min(self.num_top_logprobs, logits.shape[-1]), dim=-1)
        return ids.cpu(), values.cpu()

    def _settings(self, repeat: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        settings = (self.temperature, self.top_k, self.top_p)
        return tuple(x.repeat_interleave(repeat) for x in settings)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution ``sample`` draws from, for ``logits[b, ..., V]`` (sampled rows)."""
        flat = logits.reshape(-1, logits.shape[-1]).cpu()
        lp = sampling_logprobs(flat, *self._settings(flat.shape[0] // logits.shape[0]))
        return lp.exp().view(*logits.shape[:-1], -1)

    def logprob(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Reported log-prob of ``tokens[b]`` under ``logits[b, V]``, as ``sample`` reports it."""
        greedy = token_logprobs(logits.cpu(), tokens)
        if self.greedy:
            return greedy
        sampled = ~self._greedy_rows
        lp = sampling_logprobs(
            logits[sampled].cpu(), self.temperature[sampled], self.top_k[sampled],
            self.top_p[sampled],
        )  # fmt: skip
        greedy[sampled] = lp.gather(-1, tokens[sampled].unsqueeze(-1)).squeeze(-1)
        return greedy


def max_probs(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 softmax probability ``[b]`` of ``logits[b, V]`` (EE-LLM's ``print_max_prob``)."""
    logits = logits.float()
    return torch.exp(logits.max(dim=-1).values - torch.logsumexp(logits, dim=-1)).cpu()


def decide_rows(
    view: ExitView, policy: ExitPolicy, rows: torch.Tensor, measured: dict | None = None
) -> torch.Tensor:
    """Which of ``rows`` (bool ``[b]``) exit at ``view``'s exit, from the last position.

    Computes only what the decision needs: nothing for threshold 0 or a disallowed exit, the
    confidence head for ``"learned"``, the vocabulary projection for the logit measures.
    ``measured``: confidences already computed at this exit, by measure (filled here), so
    groups of rows with different thresholds share one computation.
    """
    if not rows.any() or policy.threshold <= 0.0 or not policy.allows(view.depth):
        return exit_mask(view.depth, torch.zeros(rows.shape[0]), policy, rows)
    values = None if measured is None else measured.get(policy.measure)
    if values is None:
        if policy.measure == "learned":
            values = view.confidence()[:, -1]
        else:
            values = confidence(view.logits()[:, -1].cpu(), policy.measure)
        if measured is not None:
            measured[policy.measure] = values
    return exit_mask(view.depth, values, policy, rows)


def _step_seed(seed: int, step: int) -> int:
    """The generator seed of a row's ``step``-th token (distinct for distinct (seed, step))."""
    return (seed * 1_000_003 + step) % (2**63)


@dataclass
class DecodeState:
    """The batch between steps."""

    inputs: torch.Tensor
    """``[b, n]`` tokens not fed yet: the left-padded prompts, then each row's last token."""
    active: torch.Tensor
    """``[b]`` bool: rows still generating (finished rows ride along, ignored)."""
    sampler: RowSampler
    num_generated: int = 0
    """Tokens generated so far per row (the same for every row: finished rows ride along)."""
    exit_max_probs: bool = False
    """Record each reached exit's top-1 probability per token (``Emitted.exit_max_probs``)."""
    emitted: Emitted | None = None
    """What the prefill emitted (``generate.Decoder.prefill``)."""


@dataclass
class Emitted:
    """The tokens a step produced, ``[b, t]`` each (``t`` is the same for every row)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    exit_depths: torch.Tensor
    """Depth of the head that chose each token (``num_layers`` for the final head)."""
    top_ids: torch.Tensor | None = None
    """``[b, t, N]`` the head's ``N`` most likely tokens (``RowSampler.num_top_logprobs``)."""
    top_logprobs: torch.Tensor | None = None
    """``[b, t, N]`` their log-probs under the head that chose the token."""
    exit_max_probs: dict[int, torch.Tensor] = field(default_factory=dict)
    """``{depth: [b, t]}`` each exit's top-1 probability where the token's step reached it
    (NaN where it did not), when ``DecodeState.exit_max_probs``."""


class KVFillPolicy(ABC):
    """A decoding method: how a step runs and how skipped layers' KV gets filled.

    ``exit_depths``: the exits its steps run (block exits among them write their KV).
    """

    exit_depths: tuple[int, ...] = ()

    @abstractmethod
    def step(self, engine: Engine, cache: KVCache, state: DecodeState) -> Emitted:
        """Feed ``state.inputs`` and return each row's next token(s)."""


class _Choices:
    """One step's per-row choices, filled head by head (exits in depth order, then the final
    head) for the rows each head decides."""

    def __init__(self, batch_size: int, num_layers: int):
        self.tokens = torch.zeros(batch_size, dtype=torch.long)
        self.logprobs = torch.zeros(batch_size)
        self.depths = torch.full((batch_size,), num_layers, dtype=torch.long)
        self.top_ids: torch.Tensor | None = None
        self.top_logprobs: torch.Tensor | None = None
        self.max_probs: dict[int, torch.Tensor] = {}
        self._top_probs: dict[int, torch.Tensor] = {}

    def take(self, rows: torch.Tensor, draw: Draw, depth: int, everything: bool = False) -> None:
        if everything:
            self.tokens, self.logprobs = draw.tokens, draw.logprobs
            self.depths.fill_(depth)
            self.top_ids, self.top_logprobs = draw.top_ids, draw.top_logprobs
            return
        self.tokens[rows], self.logprobs[rows], self.depths[rows] = (
            draw.tokens[rows], draw.logprobs[rows], depth,
        )  # fmt: skip
        if draw.top_ids is not None:
            if self.top_ids is None:
                self.top_ids = torch.zeros_like(draw.top_ids)
                self.top_logprobs = torch.zeros_like(draw.top_logprobs)
            self.top_ids[rows], self.top_logprobs[rows] = (
                draw.top_ids[rows],
                draw.top_logprobs[rows],
            )

    def record_max_prob(self, depth: int, view: ExitView, rows: torch.Tensor) -> None:
        """The exit's top-1 probability for ``rows`` (the rows that reached it)."""
        if depth not in self._top_probs:
            self._top_probs[depth] = max_probs(view.logits()[:, -1])
        probs = self._top_probs[depth]
        unset = self.max_probs.get(depth, torch.full_like(probs, float("nan")))
        self.max_probs[depth] = torch.where(rows, probs, unset)

    def emitted(self) -> Emitted:
        def column(x):
            return None if x is None else x.unsqueeze(1)

        return Emitted(
            self.tokens.unsqueeze(1), self.logprobs.unsqueeze(1), self.depths.unsqueeze(1),
            column(self.top_ids), column(self.top_logprobs),
            {d: p.unsqueeze(1) for d, p in self.max_probs.items()},
        )  # fmt: skip


class FullDepth(KVFillPolicy):
    """Never exit: every token from the final head, every layer's KV written at once.

    ``exit_depths``: exits evaluated anyway, only to report their top-1 probabilities
    (``DecodeState.exit_max_probs``); without that request no exit runs.
    """

    def __init__(self, exit_depths: Sequence[int] = ()):
        self.exit_depths = tuple(sorted(exit_depths))

    def step(self, engine: Engine, cache: KVCache, state: DecodeState) -> Emitted:
        choices = _Choices(state.active.shape[0], engine.num_layers)
        depths, on_exit = (), None
        if state.exit_max_probs and self.exit_depths:
            depths = self.exit_depths

            def on_exit(depth: int, view: ExitView) -> bool:
                choices.record_max_prob(depth, view, state.active)
                return False

        out = engine.forward(cache, state.inputs, depths, on_exit)
        draw = state.sampler.sample(out.final_logits[:, -1], state.active, state.num_generated)
        choices.take(state.active, draw, engine.num_layers, everything=True)
        return choices.emitted()


class RowExits(NamedTuple):
    """The exit policy of some rows of a batch (``KVRecompute.per_row``)."""

    policy: ExitPolicy | None
    """None: the rows never exit (full depth)."""
    rows: torch.Tensor | None
    """bool ``[b]``; None: every row."""
    reported: frozenset[int]
    """Exits whose top-1 probability these rows report (``DecodeState.exit_max_probs``)."""


class KVRecompute(KVFillPolicy):
    """Per-row early exit; pending positions catch up through skipped layers next step.

    Rows may follow different exit policies (rows of several requests in one continuous batch,
    :meth:`per_row`): each row is decided only at the exits its own policy allows, and the step
    stops when every active row has exited, so a row decodes as it would alone.
    """

    def __init__(self, exit_policy: ExitPolicy, exit_depths: Sequence[int]):
        depths = tuple(d for d in sorted(exit_depths) if exit_policy.allows(d))
        self.groups = [RowExits(exit_policy, None, frozenset(depths))]
        self.exit_depths = depths

    @classmethod
    def per_row(
        cls, groups: Sequence[tuple[ExitPolicy | None, torch.Tensor, bool]], exit_depths
    ) -> KVRecompute:
        """Rows with their own policies: ``(policy or None, rows [b] bool, report max probs)``
        per group, over the model's ``exit_depths``. A full-depth group (None) that reports
        max probs evaluates every exit (as :class:`FullDepth`)."""
        policy = cls.__new__(cls)
        policy.groups = []
        for exit_policy, rows, report in groups:
            if exit_policy is None:
                depths = frozenset(exit_depths) if report else frozenset()
            else:
                depths = frozenset(d for d in exit_depths if exit_policy.allows(d))
            policy.groups.append(RowExits(exit_policy, rows, depths))
        policy.exit_depths = tuple(sorted(set().union(*(g.reported for g in policy.groups))))
        return policy

    def step(self, engine: Engine, cache: KVCache, state: DecodeState) -> Emitted:
        choices = _Choices(state.inputs.shape[0], engine.num_layers)
        undecided = state.active.clone()

        def on_exit(depth: int, view: ExitView) -> bool:
            fired = torch.zeros_like(undecided)
            measured: dict = {}
            for group in self.groups:
                if depth not in group.reported:
                    continue
                rows = undecided if group.rows is None else undecided & group.rows
                if state.exit_max_probs:
                    choices.record_max_prob(depth, view, rows)
                if group.policy is not None and rows.any():
                    fired |= decide_rows(view, group.policy, rows, measured)
            if fired.any():
                draw = state.sampler.sample(view.logits()[:, -1], fired, state.num_generated)
                choices.take(fired, draw, depth)
                undecided.copy_(undecided & ~fired)
            return not bool(undecided.any())

        out = engine.forward(cache, state.inputs, self.exit_depths, on_exit)
        if out.final_logits is not None:
            draw = state.sampler.sample(out.final_logits[:, -1], undecided, state.num_generated)
            choices.take(undecided, draw, engine.num_layers)
        return choices.emitted()


class SelfSpeculative(KVFillPolicy):
    """Draft ``num_draft_tokens`` with the exit at ``draft_depth``, verify with the full model.

    All rows of a batch keep the same number of tokens per round (the smallest accepted prefix
    among the active rows, plus one token), so the batch shares one cache length. Truncating a
    row's accepted prefix early is still lossless: each kept token was accepted (or drawn from
    the target) given exactly the prefix before it.

    Near the end of a learned-position model's context (``Engine.max_positions``) a round drafts
    only as many tokens as positions remain (none: one plain full-depth step), so drafts never
    run past the position table.
    """

    def __init__(self, draft_depth: int, num_draft_tokens: int):
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
        self.draft_depth = draft_depth
        self.exit_depths = (draft_depth,)
        self.num_draft_tokens = num_draft_tokens

    def step(self, engine: Engine, cache: KVCache, state: DecodeState) -> Emitted:
        num_drafts = self.num_draft_tokens
        if engine.max_positions is not None:  # slots start..start + k are fed this round
            num_drafts = min(num_drafts, engine.max_positions - 1 - cache.length)
        if state.inputs.shape[1] > 1 or num_drafts < 1:
            # prefill, or no room to draft: one full-depth step (fills the draft exit too)
            out = engine.forward(cache, state.inputs, (self.draft_depth,))
            choices = _Choices(state.active.shape[0], engine.num_layers)
            draw = state.sampler.sample(out.final_logits[:, -1], state.active)
            choices.take(state.active, draw, engine.num_layers, everything=True)
            return choices.emitted()
        start = cache.length
        drafts, draft_probs = self._draft(engine, cache, state, num_drafts)
        out = engine.forward(cache, drafts[:, -1:], (self.draft_depth,), num_logits=num_drafts + 1)
        num_accepted, next_tokens = self._verify(drafts, draft_probs, out.final_logits, state)
        keep = int(num_accepted[state.active].min()) if state.active.any() else 0
        emitted = torch.cat([drafts, next_tokens.unsqueeze(1)], dim=1)[:, : keep + 1].clone()
        emitted[:, keep] = torch.where(num_accepted == keep, next_tokens, emitted[:, keep])
        # Positions start..start+keep (the fed token and `keep` drafts) stay; the rest roll back.
        cache.update(start + keep + 1, engine.num_layers, torch.empty(0))
        target = out.final_logits[:, : keep + 1]
        logprobs = torch.stack(
            [state.sampler.logprob(target[:, i], emitted[:, i]) for i in range(keep + 1)], dim=1
        )
        top_ids, top_logprobs = state.sampler.top(target.reshape(-1, target.shape[-1]))
        if top_ids is not None:
            top_ids = top_ids.view(*emitted.shape, -1)
            top_logprobs = top_logprobs.view(*emitted.shape, -1)
        depths = torch.full_like(emitted, engine.num_layers)
        return Emitted(emitted, logprobs, depths, top_ids, top_logprobs)

    def _draft(self, engine: Engine, cache: KVCache, state: DecodeState, num_drafts: int):
        """Feed the last token and ``k - 1`` drafts up to the draft exit: drafts ``[b, k]`` and
        their distributions ``[b, k, V]`` (None when greedy: verification needs only tokens)."""
        drafts, draft_probs, inputs = [], [], state.inputs
        captured: list[torch.Tensor] = []

        def stop_here(depth: int, view: ExitView) -> bool:
            captured.append(view.logits()[:, -1])
            return True

        for _ in range(num_drafts):
            engine.forward(cache, inputs, (self.draft_depth,), stop_here)
            logits = captured.pop()
            tokens = state.sampler.sample(logits, torch.ones_like(state.active)).tokens
            drafts.append(tokens)
            if not state.sampler.greedy:
                draft_probs.append(state.sampler.probs(logits))
            inputs = tokens.unsqueeze(1).to(state.inputs.device)
        probs = torch.stack(draft_probs, dim=1) if draft_probs else None
        return torch.stack(drafts, dim=1), probs

    def _verify(self, drafts, draft_probs, target_logits, state: DecodeState):
        """``(num_accepted [b], next_tokens [b])`` from the target logits ``[b, k + 1, V]``."""
        sampler = state.sampler
        if sampler.greedy:
            return greedy_verify(drafts, target_logits.cpu())
        target_probs = sampler.probs(target_logits)
        results = [
            speculative_accept(
                drafts[r : r + 1], draft_probs[r : r + 1], target_probs[r : r + 1],
                generator=sampler.generators[r],
            )
            for r in range(drafts.shape[0])
        ]  # fmt: skip
        num_accepted = torch.cat([v.num_accepted for v in results])
        return num_accepted, torch.cat([v.next_tokens for v in results])
