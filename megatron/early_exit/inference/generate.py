"""``generate``: decode a batch of prompts with an early-exit model (PP=1, any TP).

Prompts of different lengths are left-padded into one batch; each row gets its own positions
and attention mask, so a row decodes the same tokens batched or alone. Every TP rank must call
``generate`` with the same arguments; logits are gathered, so all ranks take the same decisions
and (with the same seeds) draw the same samples.

Exits are named by depth (the number of backbone layers below the exit, = the layer number a
post-exit follows); ``ExitPolicy.depths`` uses the same numbers, and a token's reported
exit depth is the depth of the head that chose it (``num_layers`` for the final head).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from megatron.early_exit.inference.decide import ExitPolicy
from megatron.early_exit.inference.engine import Engine
from megatron.early_exit.inference.pipelined import decode_pipelined
from megatron.early_exit.inference.policies import (
    DecodeState,
    Emitted,
    FullDepth,
    KVFillPolicy,
    KVRecompute,
    RowSampler,
    SelfSpeculative,
)
from megatron.early_exit.inference.sampling import StopChecker

METHODS = ("recompute", "speculative", "pipelined")


@dataclass(frozen=True)
class GenerationParams:
    """Request settings of one :func:`generate` call."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    """0 is greedy."""
    top_k: int = 0
    top_p: float = 0.0
    early_exit: bool = True
    """False decodes with the full model only (exits are not even evaluated)."""
    method: str = "recompute"
    """``recompute`` (KV recomputation, PP=1), ``speculative`` (lossless self-speculation, PP=1)
    or ``pipelined`` (PP>1). With PP>1 and ``early_exit=False`` the pipeline decodes at full
    depth whatever the method."""
    exit_policy: ExitPolicy = field(default_factory=ExitPolicy)
    """Threshold, confidence measure and allowed exits (``recompute``, ``pipelined``)."""
    num_draft_tokens: int = 4
    """Tokens drafted per round (``speculative``)."""
    draft_exit_depth: int | None = None
    """Exit that drafts (``speculative``); default: the shallowest exit the policy allows."""
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    detokenize: Callable[[list[int]], str] | None = None
    """Token ids -> text; needed for ``stop_strings`` and to fill ``GenerationResult.text``."""
    pad_token_id: int = 0
    seed: int = 1234
    """Row ``i`` samples from a generator seeded ``seed + i``."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.stop_strings and self.detokenize is None:
            raise ValueError("stop_strings need a detokenize function")


@dataclass
class GenerationResult:
    """One prompt's output."""

    tokens: list[int]
    logprobs: list[float]
    """Log-prob of each emitted token under the head that chose it (see ``sampling.sample``)."""
    exit_depths: list[int]
    """Depth of the head that chose each token; ``num_layers`` for the final head."""
    finish_reason: str
    """``eos``, ``stop`` or ``length``."""
    text: str | None = None


def build_policy(engine: Engine, params: GenerationParams) -> KVFillPolicy:
    """The KV-fill policy object for ``params``."""
    if not params.early_exit:
        return FullDepth()
    depths = sorted(engine.exits)
    params.exit_policy.check_model_exits(depths)
    allowed = [d for d in depths if params.exit_policy.allows(d)]
    if params.method == "recompute":
        return KVRecompute(params.exit_policy, allowed)
    draft = params.draft_exit_depth if params.draft_exit_depth is not None else min(allowed)
    if draft not in depths:
        raise ValueError(f"draft_exit_depth {draft} is not an exit (exits: {depths})")
    return SelfSpeculative(draft, params.num_draft_tokens)


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, ...]:
    """``(tokens [b, n], pad_lengths [b])`` with each prompt right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("need at least one prompt, and every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
    return tokens, torch.tensor([width - len(p) for p in prompts])


@torch.no_grad()
def generate(
    model, prompts_token_ids: Sequence[Sequence[int]], params: GenerationParams
) -> list[GenerationResult]:
    """Generate up to ``params.max_new_tokens`` tokens after each prompt (see module docstring)."""
    model.eval()
    pipelined = model.config.pipeline_model_parallel_size > 1
    if params.method == "pipelined" and not pipelined:
        raise ValueError("method 'pipelined' needs pipeline_model_parallel_size > 1")
    if pipelined and params.early_exit and params.method != "pipelined":
        raise ValueError(
            f"method {params.method!r} needs pipeline_model_parallel_size=1; "
            "with PP>1 use method='pipelined'"
        )
    engine = Engine(model, pipeline_stage=pipelined)
    policy = None if pipelined else build_policy(engine, params)
    tokens, pad_lengths = left_pad(prompts_token_ids, params.pad_token_id)
    device = next(model.parameters()).device
    max_length = tokens.shape[1] + params.max_new_tokens + params.num_draft_tokens + 1
    cache = engine.new_cache(pad_lengths, max_length)
    seeds = [params.seed + row for row in range(len(prompts_token_ids))]
    state = DecodeState(
        inputs=tokens.to(device),
        active=torch.ones(len(prompts_token_ids), dtype=torch.bool),
        sampler=RowSampler(params.temperature, params.top_k, params.top_p, seeds),
    )
    recorder = _Recorder(len(prompts_token_ids), params)
    if pipelined:
        exit_depths = _pipeline_exit_depths(model, params)
        return decode_pipelined(engine, cache, state, recorder, exit_depths, params.exit_policy)
    while state.active.any():
        emitted = policy.step(engine, cache, state)
        state.active = recorder.add(emitted, state.active)
        state.inputs = emitted.tokens[:, -1:].to(device)
        state.num_generated += emitted.tokens.shape[1]
    return recorder.results()


def _pipeline_exit_depths(model, params: GenerationParams) -> tuple[int, ...]:
    """Depths of every exit of the model (all stages) that may fire under ``params``."""
    if not params.early_exit:
        return ()
    depths = sorted(e.depth for e in model.config.exit_heads)
    params.exit_policy.check_model_exits(depths)
    return tuple(d for d in depths if params.exit_policy.allows(d))


class _Recorder:
    """Collects emitted tokens per row and applies EOS, stop strings and the length limit."""

    def __init__(self, batch_size: int, params: GenerationParams) -> None:
        self.params = params
        self.num_columns = 0
        self.stop = StopChecker(batch_size, params.eos_token_ids, params.stop_strings)
        self.rows: list[dict[str, list]] = [
            {"tokens": [], "logprobs": [], "exit_depths": []} for _ in range(batch_size)
        ]

    def add(self, emitted: Emitted, active: torch.Tensor) -> torch.Tensor:
        """Record a step's tokens (one column at a time); returns the rows still active."""
        active = active.clone()
        for column in range(emitted.tokens.shape[1]):
            if not active.any():
                break
            for row in active.nonzero().flatten().tolist():
                record = self.rows[row]
                record["tokens"].append(int(emitted.tokens[row, column]))
                record["logprobs"].append(float(emitted.logprobs[row, column]))
                record["exit_depths"].append(int(emitted.exit_depths[row, column]))
            active &= ~self.stop.update(emitted.tokens[:, column], self._texts())
            self.num_columns += 1
            if self.num_columns >= self.params.max_new_tokens:
                active[:] = False
        return active

    def _texts(self) -> list[str]:
        detokenize = self.params.detokenize
        if detokenize is None:
            return [""] * len(self.rows)
        return [detokenize(record["tokens"]) for record in self.rows]

    def results(self) -> list[GenerationResult]:
        out = []
        for row, record in enumerate(self.rows):
            num_tokens = self.stop.num_tokens[row]
            if num_tokens is None:
                num_tokens = len(record["tokens"])
            tokens = record["tokens"][:num_tokens]
            text = None
            if self.params.detokenize is not None:
                text = self.params.detokenize(tokens)[: self.stop.truncate_at[row]]
            out.append(
                GenerationResult(
                    tokens=tokens,
                    logprobs=record["logprobs"][:num_tokens],
                    exit_depths=record["exit_depths"][:num_tokens],
                    finish_reason=self.stop.reason[row] or "length",
                    text=text,
                )
            )
        return out
