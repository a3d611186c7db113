"""What the service sees of a generation engine: the ``TextGenerator`` protocol and its records.

A ``TextGenerator`` is anything with a tokenizer, the model's layer numbers and two methods:
``generate(params)`` returning one ``PromptCompletion`` per prompt, and ``stream(params)``
yielding a ``TokenEvent`` per kept generated token and a ``PromptCompletion`` per prompt once
that prompt is finished. Optional capabilities, read with ``getattr``: ``confidence_measures``
(the measures the model supports), ``score(prompt_ids, exit_depth, num_top)`` (prompt scoring by a
full no-cache forward; ``None`` or absent where the layout cannot score) and ``chat_template``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from megatron.early_exit.server.protocol import GenerationRequest

EngineFinishReason = Literal["stop", "eos", "length"]


class Tokenizer(Protocol):
    """What the service needs from a tokenizer (every tokenizer in ``data/tokenizers.py``)."""

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: Iterable[int]) -> str: ...


@dataclass(frozen=True)
class TokenEvent:
    """One kept generated token of one prompt, as the generator streams it."""

    index: int
    """Position of the prompt in ``GenerationRequest.prompts``."""
    token_id: int
    text: str
    """The token's text: the growth of the detokenized generated text (before stop truncation)."""
    exit_depth: int
    """Layer of the exit that produced the token; the final head reports ``num_layers``."""
    logprob: float | None = None
    top_logprobs: Mapping[str, float] | None = None
    """The ``num_top_logprobs`` most likely alternatives (token text -> log-prob), if asked."""
    exit_max_probs: Mapping[int, float] | None = None
    """Per exit evaluated for this token (by depth), its top probability (``print_max_prob``)."""


@dataclass(frozen=True)
class PromptCompletion:
    """The finished generation of one prompt (prompt excluded)."""

    index: int
    """Position of the prompt in ``GenerationRequest.prompts``."""
    text: str
    """Generated text, cut before a stop string or EOS."""
    token_ids: tuple[int, ...]
    """Kept generated tokens (an EOS token is dropped; a token completing a stop string kept)."""
    segments: tuple[str, ...]
    """Text of each kept token."""
    exit_depths: tuple[int, ...]
    """Exit layer of each kept token."""
    logprobs: tuple[float, ...] | None = None
    """Log-prob of each kept token when ``return_logprobs``."""
    top_logprobs: tuple[Mapping[str, float], ...] | None = None
    """Alternatives of each kept token when ``num_top_logprobs > 0``."""
    finish_reason: EngineFinishReason = "length"
    exit_max_probs: tuple[Mapping[int, float], ...] | None = None
    """Per kept token, each evaluated exit's top probability by depth, when ``print_max_prob``."""


StreamItem = TokenEvent | PromptCompletion


@dataclass(frozen=True)
class PromptScores:
    """A prompt scored by one head: each token's log-prob given the tokens before it."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float | None, ...]
    """``None`` for the first token (nothing precedes it), then one log-prob per token."""
    top_logprobs: tuple[tuple[tuple[int, float], ...] | None, ...]
    """Per token, the most likely ``(token id, log-prob)`` alternatives; ``None`` for the first."""


class TextGenerator(Protocol):
    """A generation engine as the service sees it (one process, or rank 0 of many)."""

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def num_layers(self) -> int:
        """The model's number of layers: the exit layer reported for the final head."""
        ...

    @property
    def exit_depths(self) -> tuple[int, ...]:
        """Layers the model's exits follow, increasing."""
        ...

    @property
    def max_sequence_length(self) -> int | None:
        """Most prompt plus generated tokens per sequence; None for no limit."""
        ...

    @property
    def decoding_methods(self) -> tuple[str, ...]:
        """Values of ``GenerationRequest.decoding_method`` it accepts (``"auto"`` among them)."""
        ...

    def generate(self, params: GenerationRequest) -> list[PromptCompletion]:
        """Generate for every prompt; one result per prompt, in prompt order."""
        ...

    def stream(self, params: GenerationRequest) -> Iterator[StreamItem]:
        """Yield a ``TokenEvent`` per kept token and a ``PromptCompletion`` per finished prompt."""
        ...


def stream_from_results(results: Iterable[PromptCompletion]) -> Iterator[StreamItem]:
    """Events of finished results (for generators that cannot stream: tokens arrive at the end)."""
    for result in results:
        for position, (token_id, piece, layer) in enumerate(
            zip(result.token_ids, result.segments, result.exit_depths, strict=True)
        ):
            yield TokenEvent(
                index=result.index,
                token_id=token_id,
                text=piece,
                exit_depth=layer,
                logprob=result.logprobs[position] if result.logprobs else None,
                top_logprobs=result.top_logprobs[position] if result.top_logprobs else None,
                exit_max_probs=result.exit_max_probs[position] if result.exit_max_probs else None,
            )
        yield result


def results_from_stream(items: Iterable[StreamItem], num_prompts: int) -> list[PromptCompletion]:
    """The results of a ``stream``, in prompt order (for generators that implement only it)."""
    results: dict[int, PromptCompletion] = {}
    for item in items:
        if isinstance(item, PromptCompletion):
            results[item.index] = item
    if sorted(results) != list(range(num_prompts)):
        raise RuntimeError(f"generator returned results for {sorted(results)}, not all prompts")
    return [results[index] for index in range(num_prompts)]


def check_scores(scores: Sequence[PromptScores], prompt_ids: Sequence[Sequence[int]]) -> None:
    """Internal invariant of a ``score`` answer: one record per prompt, one entry per token."""
    assert len(scores) == len(prompt_ids), "one score record per prompt"
    for record, ids in zip(scores, prompt_ids):
        assert list(record.token_ids) == list(ids), "scores of other tokens"
        assert len(record.logprobs) == len(ids) == len(record.top_logprobs)


def engine_prompt_ids(params: GenerationRequest, tokenizer) -> list[tuple[int, ...]]:
    """The token ids the engine runs for each prompt of a prepared request: the prepared ids,
    with the BOS token (EOD where the tokenizer has none) first when ``add_bos``."""
    assert params.prompt_ids is not None, "prepare the request first (GenerationService.prepare)"
    if not params.add_bos:
        return [tuple(ids) for ids in params.prompt_ids]
    bos = getattr(tokenizer, "bos", None)
    bos = bos if bos is not None else tokenizer.eod
    return [(bos, *ids) for ids in params.prompt_ids]
