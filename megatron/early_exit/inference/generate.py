"""``generate`` and ``generate_stream``: decode a batch of prompts with an early-exit model.

Every method runs on one :class:`Decoder`: ``prefill(prompts) -> state`` feeds the prompts and
decodes the first token of every row, ``step(state) -> Emitted`` the next token(s) (per-row
token, exit depth, log-prob); full depth, KV recomputation and self-speculation are policy
objects over it (``policies.py``). Pipelined decoding (PP>1) runs its stage loops
(``pipelined.py``); stage 0 yields after each step, so it streams too.

Prompts of different lengths are left-padded into one batch; each row gets its own positions
and attention mask, so a row decodes the same tokens batched or alone. Every TP rank must call
``generate`` with the same arguments; logits are gathered, so all ranks take the same decisions
and (with the same seeds) draw the same samples.

Exits are named by depth (the number of backbone layers below the exit, = the layer number a
post-exit follows); ``ExitPolicy.depths`` uses the same numbers, and a token's reported
exit depth is the depth of the head that chose it (``num_layers`` for the final head).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from megatron.early_exit.inference.decide import ExitPolicy
from megatron.early_exit.inference.engine import Engine
from megatron.early_exit.inference.pipelined import stream_pipelined
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
    top_logprobs: int = 0
    """Return the ``N`` most likely alternatives of each emitted token, ``(token_id, logprob)``
    under the log-softmax of the head that chose it (``GenerationResult.top_logprobs``)."""
    exit_max_probs: bool = False
    """Return, per token, each reached exit's top-1 softmax probability (EE-LLM's
    ``print_max_prob``; ``GenerationResult.exit_max_probs``). Not with ``speculative`` or
    ``pipelined``."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        if self.exit_max_probs and self.early_exit and self.method != "recompute":
            raise ValueError(f"exit_max_probs is not available with method {self.method!r}")
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
    top_logprobs: list[list[tuple[int, float]]] | None = None
    """Per token, the ``GenerationParams.top_logprobs`` most likely ``(token_id, logprob)``
    under the head that chose it, best first (None unless asked)."""
    exit_max_probs: list[dict[int, float]] | None = None
    """Per token, ``{exit depth: top-1 probability}`` of each exit its step reached (None
    unless ``GenerationParams.exit_max_probs``)."""


@dataclass
class StreamUpdate:
    """One item of :func:`generate_stream`: the tokens a decode step added to each row (rows
    that finished or produced nothing kept have empty lists), or, last, the final results."""

    tokens: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    exit_depths: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[list[tuple[int, float]]]] = field(default_factory=list)
    """Per row and new token, as ``GenerationResult.top_logprobs`` (empty lists unless asked)."""
    exit_max_probs: list[list[dict[int, float]]] = field(default_factory=list)
    """Per row and new token, as ``GenerationResult.exit_max_probs`` (empty unless asked)."""
    results: list[GenerationResult] | None = None
    """Set on the last item only (and then the lists are empty)."""


def build_policy(engine: Engine, params: GenerationParams) -> KVFillPolicy:
    """The KV-fill policy object for ``params``."""
    if not params.early_exit:
        return FullDepth(sorted(engine.exits) if params.exit_max_probs else ())
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


class Decoder:
    """One decoding method over the engine (PP=1): ``prefill`` then ``step`` until done.

    ``prefill(prompts)`` left-pads the prompts, builds the cache and feeds them; the returned
    state carries the first emitted token of every row in ``state.emitted``. ``step(state)``
    feeds each row's last token and returns what the method emitted (one token per row, or
    several for self-speculation); rows the caller marks inactive ride along.
    """

    def __init__(self, model, params: GenerationParams):
        check_layout(model, params)
        if model.config.pipeline_model_parallel_size > 1:
            raise ValueError("with PP>1 decoding runs the pipeline (generate / generate_stream)")
        self.model = model
        self.params = params
        self.engine = Engine(model)
        self.policy = build_policy(self.engine, params)
        self.device = self.engine.device

    def prefill(self, prompts_token_ids: Sequence[Sequence[int]]) -> DecodeState:
        state, self.cache = initial_state(self.engine, prompts_token_ids, self.params)
        state.emitted = self.step(state)
        return state

    def step(self, state: DecodeState) -> Emitted:
        emitted = self.policy.step(self.engine, self.cache, state)
        state.inputs = emitted.tokens[:, -1:].to(self.device)
        state.num_generated += emitted.tokens.shape[1]
        return emitted


def check_layout(model, params: GenerationParams) -> None:
    pipelined = model.config.pipeline_model_parallel_size > 1
    if params.method == "pipelined" and not pipelined:
        raise ValueError("method 'pipelined' needs pipeline_model_parallel_size > 1")
    if pipelined and params.early_exit and params.method != "pipelined":
        raise ValueError(
            f"method {params.method!r} needs pipeline_model_parallel_size=1; "
            "with PP>1 use method='pipelined'"
        )
    if pipelined and (params.top_logprobs or params.exit_max_probs):
        raise ValueError("top_logprobs and exit_max_probs are not available with PP>1")


def initial_state(engine: Engine, prompts_token_ids, params: GenerationParams):
    """``(DecodeState, KVCache)`` of a new request: padded prompts, cache, per-row samplers."""
    tokens, pad_lengths = left_pad(prompts_token_ids, params.pad_token_id)
    # The last generated token is never fed: positions up to width + max_new_tokens - 2 are.
    needed = tokens.shape[1] + params.max_new_tokens - 1
    if engine.max_positions is not None and needed > engine.max_positions:
        raise ValueError(
            f"the longest prompt has {tokens.shape[1]} tokens; with {params.max_new_tokens} new "
            f"tokens it exceeds the model's {engine.max_positions}-position context"
        )
    max_length = tokens.shape[1] + params.max_new_tokens + params.num_draft_tokens + 1
    cache = engine.new_cache(pad_lengths, max_length)
    seeds = [params.seed + row for row in range(len(prompts_token_ids))]
    sampler = RowSampler(params.temperature, params.top_k, params.top_p, seeds, params.top_logprobs)
    state = DecodeState(
        inputs=tokens.to(engine.device),
        active=torch.ones(len(prompts_token_ids), dtype=torch.bool),
        sampler=sampler,
        exit_max_probs=params.exit_max_probs,
    )
    return state, cache


@torch.no_grad()
def generate(
    model, prompts_token_ids: Sequence[Sequence[int]], params: GenerationParams
) -> list[GenerationResult]:
    """Generate up to ``params.max_new_tokens`` tokens after each prompt (see module docstring)."""
    for update in _decode(model, prompts_token_ids, params, stream=False):
        if update.results is not None:
            return update.results
    raise AssertionError("decoding ends with the results")


def generate_stream(
    model, prompts_token_ids: Sequence[Sequence[int]], params: GenerationParams
) -> Iterator[StreamUpdate]:
    """Like :func:`generate`, yielding each decode step's newly kept tokens per row as soon as
    they are decoded (:class:`StreamUpdate`), then one last item with the final results.

    Every rank of a TP/PP group iterates it alike; with PP>1 only pipeline stage 0 learns the
    tokens step by step, the other stages yield just the final results.
    """
    yield from _decode(model, prompts_token_ids, params, stream=True)


def _decode(model, prompts_token_ids, params: GenerationParams, stream: bool):
    """The decoding loop of both entry points, each resumption under ``torch.inference_mode``
    (never held across a ``yield``, so the consumer's code between items runs in its own mode)."""
    steps = _decode_steps(model, prompts_token_ids, params, stream)
    while True:
        with torch.inference_mode():
            item = next(steps, None)
        if item is None:
            return
        yield item


def _decode_steps(model, prompts_token_ids, params: GenerationParams, stream: bool):
    model.eval()
    check_layout(model, params)
    recorder = Recorder(len(prompts_token_ids), params)
    if model.config.pipeline_model_parallel_size > 1:
        engine = Engine(model, pipeline_stage=True)
        state, cache = initial_state(engine, prompts_token_ids, params)
        exit_depths = _pipeline_exit_depths(model, params)
        steps = stream_pipelined(engine, cache, state, recorder, exit_depths, params.exit_policy)
        for results in steps:
            if results is None:
                if stream:
                    yield recorder.take_update()
            else:
                yield StreamUpdate(results=results)
        return
    decoder = Decoder(model, params)
    state = decoder.prefill(prompts_token_ids)
    emitted = state.emitted
    while True:
        state.active = recorder.add(emitted, state.active)
        if stream:
            yield recorder.take_update()
        if not state.active.any():
            break
        emitted = decoder.step(state)
    yield StreamUpdate(results=recorder.results())


def _pipeline_exit_depths(model, params: GenerationParams) -> tuple[int, ...]:
    """Depths of every exit of the model (all stages) that may fire under ``params``."""
    if not params.early_exit:
        return ()
    depths = sorted(e.depth for e in model.config.exit_heads)
    params.exit_policy.check_model_exits(depths)
    return tuple(d for d in depths if params.exit_policy.allows(d))


class Recorder:
    """Collects emitted tokens per row and applies EOS, stop strings and the length limit."""

    def __init__(self, batch_size: int, params: GenerationParams) -> None:
        self.params = params
        self.num_columns = 0
        self.stop = StopChecker(batch_size, params.eos_token_ids, params.stop_strings)
        self.rows: list[dict[str, list]] = [
            {"tokens": [], "logprobs": [], "exit_depths": [], "top": [], "max_probs": []}
            for _ in range(batch_size)
        ]
        self._num_streamed = [0] * batch_size

    def add(self, emitted: Emitted, active: torch.Tensor) -> torch.Tensor:
        """Record a step's tokens (one column at a time); returns the rows still active."""
        active = active.clone()
        columns = _Columns(emitted)
        for column in range(emitted.tokens.shape[1]):
            rows = [row for row, on in enumerate(active.tolist()) if on]
            if not rows:
                break
            for row in rows:
                columns.append_to(self.rows[row], row, column)
            active &= ~self.stop.update(emitted.tokens[:, column], self._texts())
            self.num_columns += 1
            if self.num_columns >= self.params.max_new_tokens:
                active[:] = False
        return active

    def take_update(self) -> StreamUpdate:
        """The kept tokens recorded since the last call, per row."""
        update = StreamUpdate()
        for row, record in enumerate(self.rows):
            kept = self._num_kept(row)
            first, self._num_streamed[row] = (
                self._num_streamed[row],
                max(kept, self._num_streamed[row]),
            )
            update.tokens.append(record["tokens"][first:kept])
            update.logprobs.append(record["logprobs"][first:kept])
            update.exit_depths.append(record["exit_depths"][first:kept])
            update.top_logprobs.append(record["top"][first:kept])
            update.exit_max_probs.append(record["max_probs"][first:kept])
        return update

    def _num_kept(self, row: int) -> int:
        num_tokens = self.stop.num_tokens[row]
        return len(self.rows[row]["tokens"]) if num_tokens is None else num_tokens

    def _texts(self) -> list[str]:
        """Each row's generated text, for the stop checks (empty when nothing can stop a row)."""
        detokenize = self.params.detokenize
        if detokenize is None or not (self.stop.stop_strings or len(self.stop.eos_token_ids)):
            return [""] * len(self.rows)
        return [detokenize(record["tokens"]) for record in self.rows]

    def results(self) -> list[GenerationResult]:
        out = []
        for row, record in enumerate(self.rows):
            num_tokens = self._num_kept(row)
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
                    top_logprobs=record["top"][:num_tokens] if self.params.top_logprobs else None,
                    exit_max_probs=(
                        record["max_probs"][:num_tokens] if self.params.exit_max_probs else None
                    ),
                )
            )
        return out


class _Columns:
    """An :class:`Emitted` as Python lists, converted once per step (no per-row ``.item()``)."""

    def __init__(self, emitted: Emitted):
        self.tokens = emitted.tokens.tolist()
        self.logprobs = emitted.logprobs.tolist()
        self.depths = emitted.exit_depths.tolist()
        self.top = None
        if emitted.top_ids is not None:
            self.top = (emitted.top_ids.tolist(), emitted.top_logprobs.tolist())
        self.max_probs = {d: p.tolist() for d, p in emitted.exit_max_probs.items()}

    def append_to(self, record: dict, row: int, column: int) -> None:
        record["tokens"].append(self.tokens[row][column])
        record["logprobs"].append(self.logprobs[row][column])
        record["exit_depths"].append(self.depths[row][column])
        if self.top is not None:
            ids, values = self.top[0][row][column], self.top[1][row][column]
            record["top"].append(list(zip(ids, values, strict=True)))
        if not self.max_probs:
            record["max_probs"].append({})
            return
        probs = {d: p[row][column] for d, p in self.max_probs.items()}
        record["max_probs"].append({d: p for d, p in probs.items() if p == p})  # drop NaN
