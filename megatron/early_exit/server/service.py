"""The generation service: plain Python between the HTTP routes and a text generator.

``GenerationService`` validates a parsed request against the server limits and the model (prompt
token counts, exit layers, context length), runs it on a ``TextGenerator`` and maps the results
onto the protocol's response types. Requests are serialised: every generation runs on one
dedicated thread, in arrival order, so a multi-rank generator never interleaves its broadcasts.
The request time reported to the client includes the time spent waiting for that thread.

A ``TextGenerator`` is anything with a tokenizer, the model's layer numbers and two methods:
``generate(params)`` returning one ``PromptCompletion`` per prompt, and ``stream(params)``
yielding a ``TokenEvent`` per kept generated token and a ``PromptCompletion`` per prompt once
that prompt is finished. ``FakeGenerator`` is a deterministic one for tests and demos.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

import torch

from megatron.early_exit.inference.sampling import StopChecker, find_stop_string
from megatron.early_exit.server.protocol import (
    DECODING_METHODS,
    MAX_RANDOM_SEED,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
    GenerateRequest,
    GenerateResponse,
    GenerationRequest,
    RequestError,
    ServerLimits,
    check_prompt_tokens,
    params_from_completion,
    params_from_generate,
)

logger = logging.getLogger(__name__)

EngineFinishReason = Literal["stop", "eos", "length"]


# ------------------------------------------------------------------------------- interface


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


StreamItem = TokenEvent | PromptCompletion


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


# ---------------------------------------------------------------------------------- service


class GenerationError(RuntimeError):
    """The generator failed while serving a request (reported as a server error)."""


class RequestFields(NamedTuple):
    """Request field names of one transport, for error messages."""

    prompts: str
    exit_layers: str
    new_tokens: str
    method: str
    measure: str


GENERATE_FIELDS = RequestFields(
    "prompts", "exit_layers", "tokens_to_generate", "early_exit_method", "early_exit_measure"
)
COMPLETION_FIELDS = RequestFields(
    "prompt", "early_exit.exit_layers", "max_tokens", "early_exit.method", "early_exit.measure"
)


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request: parameters (seed chosen) and each prompt's token ids."""

    params: GenerationRequest
    prompt_token_ids: tuple[tuple[int, ...], ...]


_END = object()


class GenerationService:
    """Validate, serialise and time generation requests; map results onto responses.

    Args:
        generator: the engine (a ``BroadcastingGenerator`` on rank 0 of a multi-rank server).
        limits: per-request bounds.
        model_name: reported in OpenAI-style responses.
    """

    def __init__(
        self,
        generator: TextGenerator,
        limits: ServerLimits | None = None,
        model_name: str = "ee-llm",
    ) -> None:
        self.generator = generator
        self.limits = limits or ServerLimits()
        self.model_name = model_name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generation")
        self._stats_lock = threading.Lock()
        self._num_pending = 0
        self._num_served = 0
        self._num_failed = 0

    # ---------------------------------------------------------------- validation and running

    def prepare(
        self, params: GenerationRequest, fields: RequestFields = GENERATE_FIELDS
    ) -> PreparedRequest:
        """Check ``params`` against the limits and the model; choose a seed if none was given.

        Raises ``RequestError`` naming the offending field.
        """
        tokenizer = self.generator.tokenizer
        prompt_ids = tuple(tuple(tokenizer.tokenize(prompt)) for prompt in params.prompts)
        counts = [len(ids) + int(params.add_bos) for ids in prompt_ids]
        check_prompt_tokens(counts, self.limits, fields.prompts)
        if params.max_new_tokens > self.limits.max_tokens_to_generate:
            raise RequestError(
                fields.new_tokens,
                f"at most {self.limits.max_tokens_to_generate} tokens can be generated",
            )
        max_length = self.generator.max_sequence_length
        if max_length is not None:
            for index, count in enumerate(counts):
                if count + params.max_new_tokens > max_length:
                    raise RequestError(
                        fields.new_tokens,
                        f"prompt {index} has {count} tokens; with {params.max_new_tokens} new "
                        f"tokens it exceeds the model's {max_length}-token context",
                        "too_long",
                    )
        methods = self.generator.decoding_methods
        if params.decoding_method not in methods:
            raise RequestError(
                fields.method,
                f"decoding method {params.decoding_method!r} is not available on this server "
                f"(available: {', '.join(methods)})",
            )
        if params.early_exit is not None:
            try:
                params.early_exit.check_model_exits(self.generator.exit_depths)
            except ValueError as error:
                raise RequestError(fields.exit_layers, str(error)) from None
            measures = getattr(self.generator, "confidence_measures", None)
            if measures is not None and params.early_exit.measure not in measures:
                raise RequestError(
                    fields.measure,
                    f"confidence measure {params.early_exit.measure!r} is not available for this "
                    f"model (available: {', '.join(measures)}; 'learned' needs exits with "
                    "confidence heads)",
                )
        if params.random_seed is None:
            params = dataclasses.replace(params, random_seed=secrets.randbelow(MAX_RANDOM_SEED))
        return PreparedRequest(params, prompt_ids)

    def submit(
        self, params: GenerationRequest, fields: RequestFields = GENERATE_FIELDS
    ) -> Future[list[PromptCompletion]]:
        """Validate now (``RequestError``), queue the generation; the future holds the results."""
        return self._submit(self._generate_now, self.prepare(params, fields).params)

    def run(
        self, params: GenerationRequest, fields: RequestFields = GENERATE_FIELDS
    ) -> list[PromptCompletion]:
        """Validate and generate (waiting for earlier requests); one result per prompt."""
        return self.submit(params, fields).result()

    def _submit(self, fn: Callable, *args):
        with self._stats_lock:
            self._num_pending += 1
        try:
            return self._executor.submit(self._counted, fn, *args)
        except RuntimeError:  # the service was closed
            with self._stats_lock:
                self._num_pending -= 1
            raise

    def _counted(self, fn: Callable, *args):
        try:
            result = fn(*args)
        except BaseException:
            with self._stats_lock:
                self._num_failed += 1
                self._num_pending -= 1
            raise
        with self._stats_lock:
            self._num_served += 1
            self._num_pending -= 1
        return result

    def _generate_now(self, params: GenerationRequest) -> list[PromptCompletion]:
        try:
            results = list(self.generator.generate(params))
        except Exception as error:
            logger.exception("generation failed")
            raise GenerationError(f"generation failed: {type(error).__name__}: {error}") from error
        if [result.index for result in results] != list(range(len(params.prompts))):
            raise GenerationError("generator returned results out of prompt order")
        return results

    def _stream_now(self, params: GenerationRequest, out: queue.Queue) -> None:
        try:
            for item in self.generator.stream(params):
                out.put(item)
        except Exception as error:
            logger.exception("streaming generation failed")
            out.put(GenerationError(f"generation failed: {type(error).__name__}: {error}"))
            raise
        finally:
            out.put(_END)

    def _log(self, params: GenerationRequest, kind: str, seconds: float) -> None:
        if not params.no_log:
            logger.info(
                "%s: %d prompt(s), %d new tokens, early exit %s, %.3f s",
                kind,
                len(params.prompts),
                params.max_new_tokens,
                params.early_exit if params.early_exit is not None else "off",
                seconds,
            )

    # ------------------------------------------------------------------------- transports

    def generate(self, request: GenerateRequest) -> GenerateResponse:
        """Serve a ``PUT /api`` request."""
        start = time.perf_counter()
        prepared = self.prepare(params_from_generate(request), GENERATE_FIELDS)
        params = prepared.params
        results = self._submit(self._generate_now, params).result()
        texts, segments = [], []
        for result, prompt, ids in zip(results, params.prompts, prepared.prompt_token_ids):
            prompt_segments = [self._piece(token) for token in ids] if params.echo_prompts else []
            texts.append((prompt if params.echo_prompts else "") + result.text)
            segments.append(prompt_segments + list(result.segments))
        elapsed = time.perf_counter() - start
        self._log(params, "generate", elapsed)
        return GenerateResponse(
            text=texts,
            segments=segments,
            logprobs=[list(r.logprobs or ()) for r in results] if params.return_logprobs else None,
            exit_layers=[list(result.exit_depths) for result in results],
            request_time=elapsed,
        )

    def complete(self, request: CompletionRequest) -> CompletionResponse:
        """Serve a non-streaming ``POST /v1/completions`` request."""
        start = time.perf_counter()
        prepared = self.prepare(params_from_completion(request), COMPLETION_FIELDS)
        params = prepared.params
        results = self._submit(self._generate_now, params).result()
        choices = []
        for result, prompt in zip(results, params.prompts):
            prefix = prompt if params.echo_prompts else ""
            choices.append(
                CompletionChoice(
                    index=result.index,
                    text=prefix + result.text,
                    finish_reason=_openai_finish_reason(result.finish_reason),
                    logprobs=_choice_logprobs(result, params, len(prefix)),
                    exit_layers=list(result.exit_depths),
                )
            )
        self._log(params, "complete", time.perf_counter() - start)
        return CompletionResponse(
            id=_completion_id(),
            model=request.model or self.model_name,
            choices=choices,
            usage=_usage(prepared, sum(len(result.token_ids) for result in results)),
        )

    def stream_completion(self, request: CompletionRequest) -> Iterator[CompletionChunk]:
        """Serve a streaming ``POST /v1/completions`` request.

        Validation happens here, before the first chunk (``RequestError`` is raised directly);
        generation then runs on the service thread. The chunks of one prompt assemble to the
        non-streamed text: text that might begin a stop string is held back until it is known
        not to. After the last prompt's final chunk comes one chunk with ``usage`` and no
        choices. A generator failure raises ``GenerationError`` from the iterator. If the
        consumer stops early, generation still runs to completion (other ranks are in lockstep).
        """
        start = time.perf_counter()
        prepared = self.prepare(params_from_completion(request), COMPLETION_FIELDS)
        out: queue.Queue = queue.Queue()
        self._submit(self._stream_now, prepared.params, out)
        assembler = _ChunkAssembler(
            prepared, _completion_id(), request.model or self.model_name, start
        )
        return self._stream_chunks(assembler, out)

    def _stream_chunks(self, assembler: _ChunkAssembler, out: queue.Queue):
        yield from assembler.opening()
        while (item := out.get()) is not _END:
            if isinstance(item, GenerationError):
                raise item
            yield from assembler.add(item)
        yield assembler.closing()
        self._log(assembler.params, "stream", time.perf_counter() - assembler.start)

    def _piece(self, token_id: int) -> str:
        return self.generator.tokenizer.detokenize([token_id])

    # ------------------------------------------------------------------------------ state

    def health(self) -> dict:
        """Model facts and request counters, for ``GET /health``."""
        with self._stats_lock:
            counters = {
                "pending": self._num_pending,
                "served": self._num_served,
                "failed": self._num_failed,
            }
        return {
            "status": "ok",
            "model": self.model_name,
            "num_layers": self.generator.num_layers,
            "exit_layers": list(self.generator.exit_depths),
            "max_sequence_length": self.generator.max_sequence_length,
            "limits": dataclasses.asdict(self.limits),
            "requests": counters,
        }

    def close(self) -> None:
        """Finish queued requests and stop the service thread."""
        self._executor.shutdown(wait=True)


# ------------------------------------------------------------------------ response mapping


def _completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def _openai_finish_reason(reason: EngineFinishReason) -> Literal["stop", "length"]:
    return "length" if reason == "length" else "stop"


def _usage(prepared: PreparedRequest, completion_tokens: int) -> CompletionUsage:
    add_bos = int(prepared.params.add_bos)
    prompt_tokens = sum(len(ids) + add_bos for ids in prepared.prompt_token_ids)
    return CompletionUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _text_offsets(segments: Sequence[str], start: int) -> list[int]:
    offsets = []
    for segment in segments:
        offsets.append(start)
        start += len(segment)
    return offsets


def _choice_logprobs(
    result: PromptCompletion, params: GenerationRequest, start: int
) -> CompletionLogprobs | None:
    """OpenAI logprobs of the generated tokens (echoed prompt tokens are not scored)."""
    if not params.return_logprobs:
        return None
    top = None
    if params.num_top_logprobs > 0 and result.top_logprobs is not None:
        top = [dict(alternatives) for alternatives in result.top_logprobs]
    return CompletionLogprobs(
        tokens=list(result.segments),
        token_logprobs=list(result.logprobs or [None] * len(result.segments)),
        top_logprobs=top,
        text_offset=_text_offsets(result.segments, start),
    )


def stop_holdback(text: str, stop_strings: Sequence[str]) -> int:
    """Characters at the end of ``text`` that could be the start of a stop string."""
    longest = 0
    for stop in stop_strings:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


class _ChunkAssembler:
    """Turns stream items into completion chunks, releasing only text that stop strings keep."""

    def __init__(self, prepared: PreparedRequest, chunk_id: str, model: str, start: float):
        self.params = prepared.params
        self.prepared = prepared
        self.chunk_id = chunk_id
        self.model = model
        self.start = start
        num_prompts = len(self.params.prompts)
        self._raw = [""] * num_prompts  # all generated text so far
        self._sent = [0] * num_prompts  # characters of generated text sent
        self._prefix = [len(p) if self.params.echo_prompts else 0 for p in self.params.prompts]
        self._done = [False] * num_prompts
        self._completion_tokens = 0

    def _chunk(self, choice: CompletionChoice) -> CompletionChunk:
        return CompletionChunk(id=self.chunk_id, model=self.model, choices=[choice])

    def opening(self) -> Iterator[CompletionChunk]:
        if self.params.echo_prompts:
            for index, prompt in enumerate(self.params.prompts):
                yield self._chunk(CompletionChoice(index=index, text=prompt, exit_layers=[]))

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
                    finish_reason=_openai_finish_reason(item.finish_reason),
                    exit_layers=[],
                )
            )
            return
        self._raw[index] += item.text
        release = max(sent, self._releasable(index))
        self._sent[index] = release
        logprobs = None
        if self.params.return_logprobs:
            logprobs = CompletionLogprobs(
                tokens=[item.text],
                token_logprobs=[item.logprob],
                top_logprobs=[dict(item.top_logprobs or {})]
                if self.params.num_top_logprobs > 0
                else None,
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
            usage=_usage(self.prepared, self._completion_tokens),
        )


# --------------------------------------------------------------------------- fake generator


def _default_script(prompt: str) -> str:
    return f" [{prompt[::-1]}]"


class FakeGenerator:
    """A deterministic ``TextGenerator`` for tests and demos; no model involved.

    Each prompt's continuation is ``script(prompt)`` repeated to ``max_new_tokens`` tokens (stop
    strings apply as in the real engine, through ``StopChecker``). With early exit on, a token's
    fake confidence at its k-th allowed exit is ``min(0.99, base + 0.15 k)`` with ``base`` a
    function of the token id, and it takes the first allowed exit whose confidence reaches the
    threshold, else the final head: threshold 0 always takes the first allowed exit, 1.0 never
    exits. ``delay_s`` sleeps per step; ``fail_on`` raises after the first step when a prompt
    contains that string. ``calls`` records every params; ``max_active`` the most overlapping
    calls ever seen.
    """

    def __init__(
        self,
        tokenizer: Tokenizer | None = None,
        *,
        num_layers: int = 8,
        exit_depths: Sequence[int] = (2, 4, 6),
        script: Callable[[str], str] = _default_script,
        delay_s: float = 0.0,
        max_sequence_length: int | None = None,
        fail_on: str | None = None,
        decoding_methods: Sequence[str] = DECODING_METHODS,
    ) -> None:
        if tokenizer is None:
            from megatron.early_exit.data.tokenizers import ByteLevelTokenizer

            tokenizer = ByteLevelTokenizer()
        self.tokenizer = tokenizer
        self.num_layers = num_layers
        self.exit_depths = tuple(exit_depths)
        self.max_sequence_length = max_sequence_length
        self.decoding_methods = tuple(decoding_methods)
        self.script = script
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.calls: list[GenerationRequest] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def exit_depth_for(self, token_id: int, params: GenerationRequest) -> int:
        """The fake exit decision for one token."""
        policy = params.early_exit
        if policy is None:
            return self.num_layers
        base = (token_id * 37 % 100) / 100
        allowed = [layer for layer in self.exit_depths if policy.allows(layer)]
        for k, layer in enumerate(allowed):
            if min(0.99, base + 0.15 * k) >= policy.threshold:
                return layer
        return self.num_layers

    def _continuation(self, prompt: str, num_tokens: int) -> list[int]:
        ids = self.tokenizer.tokenize(self.script(prompt)) or [0]
        return [ids[i % len(ids)] for i in range(num_tokens)]

    def generate(self, params: GenerationRequest) -> list[PromptCompletion]:
        return results_from_stream(self.stream(params), len(params.prompts))

    def stream(self, params: GenerationRequest) -> Iterator[StreamItem]:
        with self._lock:
            self.calls.append(params)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            yield from self._stream(params)
        finally:
            with self._lock:
                self.active -= 1

    def _stream(self, params: GenerationRequest) -> Iterator[StreamItem]:
        num_prompts = len(params.prompts)
        planned = [self._continuation(p, params.max_new_tokens) for p in params.prompts]
        checker = StopChecker(num_prompts, stop_strings=params.stop_strings)
        rows = [_FakeRow() for _ in range(num_prompts)]
        for step in range(params.max_new_tokens):
            if self.delay_s:
                time.sleep(self.delay_s)
            texts = []
            for index, row in enumerate(rows):
                if not checker.finished[index]:
                    yield row.add(index, planned[index][step], self, params)
                texts.append(self.tokenizer.detokenize(row.token_ids))
            new_tokens = torch.tensor([plan[step] for plan in planned], dtype=torch.long)
            finished_before = checker.finished.clone()
            finished = checker.update(new_tokens, texts)
            if step == 0 and self.fail_on and any(self.fail_on in p for p in params.prompts):
                raise RuntimeError(f"fake failure on a prompt containing {self.fail_on!r}")
            for index in torch.nonzero(finished & ~finished_before).flatten().tolist():
                yield rows[index].result(index, texts[index], checker, "stop")
            if bool(finished.all()):
                return
        for index, row in enumerate(rows):
            if not checker.finished[index]:
                text = self.tokenizer.detokenize(row.token_ids)
                yield row.result(index, text, checker, "length")


class _FakeRow:
    """One prompt's generated tokens inside ``FakeGenerator``."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.events: list[TokenEvent] = []
        self.text = ""

    def add(self, index: int, token_id: int, fake: FakeGenerator, params) -> TokenEvent:
        self.token_ids.append(token_id)
        text = fake.tokenizer.detokenize(self.token_ids)
        piece, self.text = text[len(self.text) :], text
        logprob = -((token_id % 10) / 10)
        event = TokenEvent(
            index=index,
            token_id=token_id,
            text=piece,
            exit_depth=fake.exit_depth_for(token_id, params),
            logprob=logprob if params.return_logprobs else None,
            top_logprobs={piece: logprob} if params.num_top_logprobs else None,
        )
        self.events.append(event)
        return event

    def result(self, index: int, text: str, checker: StopChecker, reason) -> PromptCompletion:
        kept = self.events
        if reason == "stop":
            reason = checker.reason[index]
            text = text[: checker.truncate_at[index]]
            kept = kept[: checker.num_tokens[index]]
        with_logprobs = bool(kept) and kept[0].logprob is not None
        with_top = bool(kept) and kept[0].top_logprobs is not None
        return PromptCompletion(
            index=index,
            text=text,
            token_ids=tuple(event.token_id for event in kept),
            segments=tuple(event.text for event in kept),
            exit_depths=tuple(event.exit_depth for event in kept),
            logprobs=tuple(event.logprob for event in kept) if with_logprobs else None,
            top_logprobs=tuple(event.top_logprobs for event in kept) if with_top else None,
            finish_reason=reason,
        )
