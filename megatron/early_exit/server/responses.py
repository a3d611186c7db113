"""Mapping generator results onto the protocol's responses, and OpenAI stream assembly.

Echoed prompts are cut into token segments by incremental detokenization (``text.token_pieces``),
so a character whose bytes span tokens is never garbled. Scored prompts (``PromptScores``) put
their log-probs before the generated tokens' own, the first prompt token's ``None`` as OpenAI
does.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Sequence
from typing import Literal

from megatron.early_exit.inference.sampling import find_stop_string
from megatron.early_exit.server.generator import (
    EngineFinishReason,
    PromptCompletion,
    PromptScores,
    StreamItem,
    Tokenizer,
)
from megatron.early_exit.server.preparation import PreparedRequest
from megatron.early_exit.server.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionUsage,
    GenerationRequest,
)
from megatron.early_exit.server.text import stop_holdback, token_pieces

logger = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """The generator failed while serving a request (reported as a server error)."""


def completion_id(prefix: str = "cmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def openai_finish_reason(reason: EngineFinishReason) -> Literal["stop", "length"]:
    return "length" if reason == "length" else "stop"


def usage(prepared: PreparedRequest, completion_tokens: int) -> CompletionUsage:
    prompt_tokens = sum(len(ids) for ids in prepared.prompt_token_ids)
    return CompletionUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def text_offsets(segments: Sequence[str], start: int) -> list[int]:
    offsets = []
    for segment in segments:
        offsets.append(start)
        start += len(segment)
    return offsets


def alternatives_text(
    tokenizer: Tokenizer, alternatives: Sequence[tuple[int, float]] | None
) -> dict[str, float] | None:
    """``(token id, log-prob)`` alternatives as OpenAI's ``{token text: log-prob}``."""
    if alternatives is None:
        return None
    return {tokenizer.detokenize([token]): logprob for token, logprob in alternatives}


def prompt_logprobs(
    tokenizer: Tokenizer,
    ids: Sequence[int],
    scores: PromptScores | None,
    num_top: int,
) -> CompletionLogprobs:
    """OpenAI logprobs of an echoed prompt (``None`` log-probs where it was not scored)."""
    pieces = token_pieces(tokenizer, ids)
    if scores is None:
        logprobs: list[float | None] = [None] * len(ids)
        top: list[dict[str, float] | None] = [None] * len(ids)
    else:
        logprobs = list(scores.logprobs)
        top = [alternatives_text(tokenizer, alt) for alt in scores.top_logprobs]
    return CompletionLogprobs(
        tokens=pieces,
        token_logprobs=logprobs,
        top_logprobs=top if num_top > 0 else None,
        text_offset=text_offsets(pieces, 0),
    )


def generated_logprobs(result: PromptCompletion, params: GenerationRequest, start: int):
    """OpenAI logprobs of the generated tokens (offsets from ``start``)."""
    top = None
    if params.num_top_logprobs > 0:
        top = (
            [dict(alternatives) for alternatives in result.top_logprobs]
            if result.top_logprobs is not None
            else [None] * len(result.segments)
        )
    return CompletionLogprobs(
        tokens=list(result.segments),
        token_logprobs=list(result.logprobs or [None] * len(result.segments)),
        top_logprobs=top,
        text_offset=text_offsets(result.segments, start),
    )


def join_logprobs(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    top = None
    if first.top_logprobs is not None or second.top_logprobs is not None:
        top = (first.top_logprobs or [None] * len(first.tokens)) + (
            second.top_logprobs or [None] * len(second.tokens)
        )
    return CompletionLogprobs(
        tokens=first.tokens + second.tokens,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        top_logprobs=top,
        text_offset=first.text_offset + second.text_offset,
    )


def completion_choice(
    tokenizer: Tokenizer,
    prepared: PreparedRequest,
    result: PromptCompletion,
    scores: PromptScores | None,
) -> CompletionChoice:
    """One choice of a non-streamed completion (echoed prompt and its scores first)."""
    params = prepared.params
    index = result.index
    prompt = params.prompts[index] if params.echo_prompts else ""
    logprobs = None
    if params.return_logprobs:
        logprobs = generated_logprobs(result, params, len(prompt))
        if params.echo_prompts:
            echoed = prompt_logprobs(
                tokenizer, prepared.prompt_token_ids[index], scores,
                params.num_top_logprobs,
            )  # fmt: skip
            logprobs = join_logprobs(echoed, logprobs)
    return CompletionChoice(
        index=index,
        text=prompt + result.text,
        finish_reason=openai_finish_reason(result.finish_reason),
        logprobs=logprobs,
        exit_layers=list(result.exit_depths),
    )


def max_probs(results: Sequence[PromptCompletion]) -> list[list[dict[int, float]]]:
    """``print_max_prob``'s per-token, per-exit top probabilities of every prompt."""
    return [[dict(token) for token in (result.exit_max_probs or ())] for result in results]


class ChunkAssembler:
    """Turns stream items into completion chunks, releasing only text that stop strings keep.

    The model name is the served one, given once: a request's own ``model`` field is never
    echoed into every chunk.
    """

    def __init__(
        self,
        prepared: PreparedRequest,
        tokenizer: Tokenizer,
        chunk_id: str,
        model: str,
        start: float,
        scores: Sequence[PromptScores] | None = None,
    ):
        self.params = prepared.params
        self.prepared = prepared
        self.tokenizer = tokenizer
        self.chunk_id = chunk_id
        self.model = model
        self.start = start
        self.scores = scores
        num_prompts = len(self.params.prompts)
        self._raw = [""] * num_prompts  # all generated text so far
        self._sent = [0] * num_prompts  # characters of generated text sent
        self._prefix = [len(p) if self.params.echo_prompts else 0 for p in self.params.prompts]
        self._done = [False] * num_prompts
        self._completion_tokens = 0

    def _chunk(self, choice: CompletionChoice) -> CompletionChunk:
        return CompletionChunk(id=self.chunk_id, model=self.model, choices=[choice])

    def opening(self) -> Iterator[CompletionChunk]:
        if not self.params.echo_prompts:
            return
        for index, prompt in enumerate(self.params.prompts):
            logprobs = None
            if self.params.return_logprobs:
                scores = self.scores[index] if self.scores is not None else None
                logprobs = prompt_logprobs(
                    self.tokenizer, self.prepared.prompt_token_ids[index], scores,
                    self.params.num_top_logprobs,
                )  # fmt: skip
            yield self._chunk(
                CompletionChoice(index=index, text=prompt, logprobs=logprobs, exit_layers=[])
            )

    def _releasable(self, index: int) -> int:
        text, stops = self._raw[index], self.params.stop_strings
        safe = len(text) - stop_holdback(text, stops)
        hit = find_stop_string(text, stops, self._sent[index])
        return safe if hit is None else min(safe, hit)

    def add(self, item: StreamItem) -> Iterator[CompletionChunk]:
        index = item.index
        if self._done[index]:
            raise GenerationError(f"generator streamed prompt {index} after its result")
        sent = self._sent[index]
        if isinstance(item, PromptCompletion):
            self._done[index] = True
            if not item.text.startswith(self._raw[index][:sent]):
                logger.warning("prompt %d: final text disagrees with streamed text", index)
            self._completion_tokens += len(item.token_ids)
            yield self._chunk(
                CompletionChoice(
                    index=index,
                    text=item.text[sent:],
                    finish_reason=openai_finish_reason(item.finish_reason),
                    exit_layers=[],
                )
            )
            return
        self._raw[index] += item.text
        release = max(sent, self._releasable(index))
        self._sent[index] = release
        logprobs = None
        if self.params.return_logprobs:
            top = None
            if self.params.num_top_logprobs > 0:
                top = [dict(item.top_logprobs) if item.top_logprobs is not None else None]
            logprobs = CompletionLogprobs(
                tokens=[item.text],
                token_logprobs=[item.logprob],
                top_logprobs=top,
                text_offset=[self._prefix[index] + len(self._raw[index]) - len(item.text)],
            )
        yield self._chunk(
            CompletionChoice(
                index=index,
                text=self._raw[index][sent:release],
                logprobs=logprobs,
                exit_layers=[item.exit_depth],
            )
        )

    def closing(self) -> CompletionChunk:
        if not all(self._done):
            raise GenerationError("generator ended the stream before every prompt finished")
        return CompletionChunk(
            id=self.chunk_id,
            model=self.model,
            choices=[],
            usage=usage(self.prepared, self._completion_tokens),
        )
