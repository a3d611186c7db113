"""The generation service: plain Python between the HTTP routes and a text generator.

``GenerationService`` prepares a parsed request (``preparation.prepare_request``), runs it as a
job and maps the results onto the protocol's responses (``responses``). The queue is bounded
(``ServerLimits.max_queued_requests``, waiting plus running): one more request raises
``ServiceBusy`` (503). The request time reported to the client includes the wait.

Two ways to run jobs, chosen by the generator:

* A ``concurrent`` generator (continuous batching, one process) decodes every running request
  in one batch on its own thread; the service waits on each job from a pool thread. A client
  that leaves (its ``cancelled`` event set) has its request dropped, waiting or running, at the
  next decode step (``RequestCancelled``, 499); a request running past
  ``ServerLimits.max_request_seconds`` is stopped (``RequestTimedOut``, 504).
* Otherwise jobs are serialised on one generation thread, in arrival order, so a multi-rank
  generator never interleaves its broadcasts. A request whose client has gone is dropped if it
  has not started; a started one runs to its end, because the other ranks of a multi-rank
  server are in lockstep with it, and no time limit applies.

A request that scores prompts (OpenAI ``echo`` with ``logprobs``; Megatron's
``tokens_to_generate=0`` with ``logprobs``) first runs the generator's ``score`` (a full
no-cache forward, by the final head or the chosen exit), then generates, in the same job.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass

from megatron.early_exit.inference.batching import RequestCancelled as BatchCancelled
from megatron.early_exit.inference.batching import TimeLimitExceeded
from megatron.early_exit.inference.decide import ExitPolicy
from megatron.early_exit.server.chat import (
    ChatChunkConverter,
    ChatCompletionRequest,
    ChatCompletionResponse,
    chat_choice,
    params_from_chat,
    render_chat,
)
from megatron.early_exit.server.generator import (
    PromptCompletion,
    PromptScores,
    TextGenerator,
    check_scores,
    engine_prompt_ids,
)
from megatron.early_exit.server.preparation import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    GENERATE_FIELDS,
    PreparedRequest,
    RequestFields,
    prepare_request,
)
from megatron.early_exit.server.protocol import (
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    GenerateRequest,
    GenerateResponse,
    GenerationRequest,
    RequestError,
    ServerLimits,
    params_from_completion,
    params_from_generate,
)
from megatron.early_exit.server.responses import (
    ChunkAssembler,
    GenerationError,
    completion_choice,
    completion_id,
    max_probs,
    usage,
)
from megatron.early_exit.server.text import token_pieces

logger = logging.getLogger(__name__)

__all__ = [
    "GenerationError",
    "GenerationService",
    "RequestCancelled",
    "RequestTimedOut",
    "ServiceBusy",
]


class ServiceBusy(RuntimeError):
    """The queue is full (reported as 503)."""


class RequestCancelled(RuntimeError):
    """The client left; its request was dropped (before or, with continuous batching, while
    it ran)."""


class RequestTimedOut(RuntimeError):
    """The request ran past ``ServerLimits.max_request_seconds`` and was stopped (504)."""


@dataclass(frozen=True)
class JobResult:
    """What one job computed: the prompts' scores (when asked) and the generations."""

    scores: list[PromptScores] | None
    results: list[PromptCompletion]


_END = object()
_POLL_S = 0.05


class GenerationService:
    """Prepare, serialise and time generation requests; map results onto responses.

    Args:
        generator: the engine (a ``BroadcastingGenerator`` on rank 0 of a multi-rank server).
        limits: per-request bounds.
        model_name: reported in OpenAI-style responses and listed by ``/v1/models``, with one
            alias ``<model_name>@exit<K>`` per exit: the model truncated at that exit (generation
            always exits there; echoed prompts are scored by that exit).
        chat_template: overrides the tokenizer's chat template (``None``: the tokenizer's).
    """

    def __init__(
        self,
        generator: TextGenerator,
        limits: ServerLimits | None = None,
        model_name: str = "ee-llm",
        chat_template: str | None = None,
    ) -> None:
        self.generator = generator
        self.limits = limits or ServerLimits()
        self.model_name = model_name
        self.chat_template = chat_template
        self.concurrent = bool(getattr(generator, "concurrent", False))
        workers = self.limits.max_queued_requests if self.concurrent else 1
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="generation")
        self._stats_lock = threading.Lock()
        self._num_pending = 0
        self._num_served = 0
        self._num_failed = 0
        self._num_cancelled = 0
        self._num_refused = 0

    # ---------------------------------------------------------------- preparing and running

    def prepare(
        self, params: GenerationRequest, fields: RequestFields = GENERATE_FIELDS
    ) -> PreparedRequest:
        """Check ``params`` (``RequestError`` naming the field); choose a seed if none given."""
        return prepare_request(self.generator, self.limits, params, fields)

    def submit(
        self, params: GenerationRequest, fields: RequestFields = GENERATE_FIELDS
    ) -> Future[list[PromptCompletion]]:
        """Validate now (``RequestError``), queue the generation; the future holds the results."""
        prepared = self.prepare(params, fields)
        return self._submit(lambda p: self._run_job(p, None).results, prepared)

    def run(
        self, params: GenerationRequest, fields: RequestFields = GENERATE_FIELDS
    ) -> list[PromptCompletion]:
        """Validate and generate (waiting for earlier requests); one result per prompt."""
        return self.submit(params, fields).result()

    def _submit(self, fn: Callable, *args) -> Future:
        with self._stats_lock:
            if self._num_pending >= self.limits.max_queued_requests:
                self._num_refused += 1
                raise ServiceBusy(
                    f"the server is busy ({self._num_pending} requests queued or running); "
                    "retry later"
                )
            self._num_pending += 1
        try:
            future = self._executor.submit(self._counted, fn, *args)
        except RuntimeError:  # the service was closed
            with self._stats_lock:
                self._num_pending -= 1
            raise
        return future

    def _counted(self, fn: Callable, *args):
        try:
            result = fn(*args)
        except BaseException as error:
            with self._stats_lock:
                if isinstance(error, RequestCancelled):
                    self._num_cancelled += 1
                else:
                    self._num_failed += 1
                self._num_pending -= 1
            raise
        with self._stats_lock:
            self._num_served += 1
            self._num_pending -= 1
        return result

    def _wait(self, future: Future, cancelled: threading.Event | None):
        """The future's result; drops the job if ``cancelled`` is set before it starts."""
        if cancelled is None:
            return future.result()
        while True:
            try:
                return future.result(timeout=_POLL_S)
            except TimeoutError:
                if cancelled.is_set() and future.cancel():
                    self._note_cancelled()
                    raise RequestCancelled("the client left before the request started") from None

    def _note_cancelled(self) -> None:
        with self._stats_lock:
            self._num_pending -= 1
            self._num_cancelled += 1

    def _scores(self, params: GenerationRequest) -> list[PromptScores] | None:
        if not params.score_prompts:
            return None
        scores = self.generator.score(params)
        check_scores(scores, engine_prompt_ids(params, self.generator.tokenizer))
        return scores

    def _limits_of_job(self, cancelled: threading.Event | None) -> dict:
        """The stop conditions a concurrent generator takes (a serial one runs to the end)."""
        if not self.concurrent:
            return {}
        return {"cancelled": cancelled, "time_limit_s": self.limits.max_request_seconds}

    def _stopped(self, error: Exception) -> Exception:
        if isinstance(error, BatchCancelled):
            return RequestCancelled("the client left; its request was stopped")
        return RequestTimedOut(
            f"the request ran past the server's {self.limits.max_request_seconds:g}-second "
            "limit and was stopped (--max-request-seconds)"
        )

    def _run_job(self, prepared: PreparedRequest, cancelled: threading.Event | None) -> JobResult:
        params = prepared.params
        try:
            scores = self._scores(params)
            if params.max_new_tokens == 0:
                results = [_empty_completion(i) for i in range(len(params.prompts))]
            else:
                results = list(self.generator.generate(params, **self._limits_of_job(cancelled)))
        except (BatchCancelled, TimeLimitExceeded) as error:
            raise self._stopped(error) from None
        except Exception as error:
            logger.exception("generation failed")
            raise GenerationError(f"generation failed: {type(error).__name__}: {error}") from error
        if [result.index for result in results] != list(range(len(params.prompts))):
            raise GenerationError("generator returned results out of prompt order")
        return JobResult(scores, results)

    def _stream_job(
        self, prepared: PreparedRequest, out: queue.Queue, cancelled: threading.Event
    ) -> None:
        params = prepared.params
        try:
            out.put(("scores", self._scores(params)))
            if params.max_new_tokens == 0:
                for index in range(len(params.prompts)):
                    out.put(_empty_completion(index))
            else:
                for item in self.generator.stream(params, **self._limits_of_job(cancelled)):
                    out.put(item)
        except (BatchCancelled, TimeLimitExceeded) as error:
            stopped = self._stopped(error)
            out.put(GenerationError(str(stopped)))
            raise stopped from None
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

    def run_prepared(
        self, prepared: PreparedRequest, cancelled: threading.Event | None = None
    ) -> JobResult:
        """Queue a prepared request and wait for it (``RequestCancelled`` if dropped)."""
        return self._wait(self._submit(self._run_job, prepared, cancelled), cancelled)

    def stream_prepared(
        self,
        prepared: PreparedRequest,
        assembler_fn: Callable[[list | None], object],
        convert: Callable | None = None,
    ) -> CancellableStream:
        """Queue a prepared request for streaming; ``assembler_fn(scores)`` makes the chunks'
        assembler once the scores (if any) are known; ``convert`` maps each chunk."""
        out: queue.Queue = queue.Queue()
        cancelled = threading.Event()
        future = self._submit(self._stream_job, prepared, out, cancelled)
        return CancellableStream(
            self, future, out, assembler_fn, prepared.params, convert, cancelled
        )

    # ---------------------------------------------------------------- models and templates

    def model_names(self) -> list[str]:
        """The served model and its per-exit aliases (``/v1/models``)."""
        return [
            self.model_name,
            *(f"{self.model_name}@exit{d}" for d in self.generator.exit_depths),
        ]

    def _exit_alias(self, model: str | None) -> int | None:
        """The exit depth ``model`` names (None for the full model); RequestError if unknown."""
        if model is None or model == self.model_name:
            return None
        for depth in self.generator.exit_depths:
            if model == f"{self.model_name}@exit{depth}":
                return depth
        raise RequestError(
            "model",
            f"unknown model {model[:64]!r}; this server serves {', '.join(self.model_names())}",
            "model_not_found",
        )

    def _for_model(self, params: GenerationRequest, model: str | None) -> GenerationRequest:
        """``params`` for the model the request names: an exit alias decodes and scores there."""
        depth = self._exit_alias(model)
        if depth is None:
            return params
        if params.early_exit is not None or params.score_exit_depth not in (None, depth):
            raise RequestError(
                "model", "an exit alias fixes the exit: leave out early_exit and score_exit_layer"
            )
        return dataclasses.replace(
            params,
            early_exit=ExitPolicy(threshold=0.0, depths=[depth]),
            score_exit_depth=depth,
        )

    def chat_prompt(self, request: ChatCompletionRequest) -> str:
        """The conversation rendered with the chat template (RequestError if there is none)."""
        template = self.chat_template or getattr(self.generator, "chat_template", None)
        if not template:
            raise RequestError(
                "messages",
                "this model has no chat template (its checkpoint's tokenizer records none); "
                "use /v1/completions, or serve with --chat-template FILE",
                "no_chat_template",
            )
        messages = [message.as_template_input() for message in request.messages]
        return render_chat(template, messages, self.generator.tokenizer)

    # ------------------------------------------------------------------------- transports

    def generate(
        self, request: GenerateRequest, cancelled: threading.Event | None = None
    ) -> GenerateResponse:
        """Serve a ``PUT /api`` request."""
        start = time.perf_counter()
        prepared = self.prepare(params_from_generate(request), GENERATE_FIELDS)
        params = prepared.params
        job = self.run_prepared(prepared, cancelled)
        tokenizer = self.generator.tokenizer
        texts, segments, logprobs = [], [], []
        for result, prompt, ids in zip(job.results, params.prompts, prepared.prompt_token_ids):
            echo = params.echo_prompts or params.score_prompts
            prompt_segments = token_pieces(tokenizer, ids) if echo else []
            texts.append((prompt if echo else "") + result.text)
            segments.append(prompt_segments + list(result.segments))
            logprobs.append(list(result.logprobs or ()))
        if job.scores is not None:  # Megatron's format: no entry for the first token
            logprobs = [list(score.logprobs[1:]) for score in job.scores]
        elapsed = time.perf_counter() - start
        self._log(params, "generate", elapsed)
        return GenerateResponse(
            text=texts,
            segments=segments,
            logprobs=logprobs if params.return_logprobs else None,
            exit_layers=[list(result.exit_depths) for result in job.results],
            max_probs=max_probs(job.results) if params.print_max_prob else None,
            request_time=elapsed,
        )

    def complete(
        self, request: CompletionRequest, cancelled: threading.Event | None = None
    ) -> CompletionResponse:
        """Serve a non-streaming ``POST /v1/completions`` request."""
        start = time.perf_counter()
        params = self._for_model(params_from_completion(request), request.model)
        prepared = self.prepare(params, COMPLETION_FIELDS)
        job = self.run_prepared(prepared, cancelled)
        tokenizer = self.generator.tokenizer
        choices = [
            completion_choice(
                tokenizer, prepared, result, job.scores[i] if job.scores is not None else None
            )
            for i, result in enumerate(job.results)
        ]
        self._log(prepared.params, "complete", time.perf_counter() - start)
        return CompletionResponse(
            id=completion_id(),
            model=self.model_name,
            choices=choices,
            usage=usage(prepared, sum(len(result.token_ids) for result in job.results)),
        )

    def stream_completion(self, request: CompletionRequest) -> CancellableStream:
        """Serve a streaming ``POST /v1/completions`` request.

        Validation happens here, before the first chunk (``RequestError`` is raised directly);
        generation then runs on the service thread. The chunks of one prompt assemble to the
        non-streamed text: text that might begin a stop string is held back until it is known
        not to. After the last prompt's final chunk comes one chunk with ``usage`` and no
        choices. A generator failure raises ``GenerationError`` from the iterator. ``cancel()``
        drops the request if it has not started.
        """
        start = time.perf_counter()
        params = self._for_model(params_from_completion(request), request.model)
        prepared = self.prepare(params, COMPLETION_FIELDS)
        chunk_id = completion_id()

        def assembler(scores):
            return ChunkAssembler(
                prepared, self.generator.tokenizer, chunk_id, self.model_name, start, scores
            )

        return self.stream_prepared(prepared, assembler)

    def _prepare_chat(self, request: ChatCompletionRequest) -> PreparedRequest:
        params = params_from_chat(request, self.chat_prompt(request))
        return self.prepare(self._for_model(params, request.model), CHAT_FIELDS)

    def chat(
        self, request: ChatCompletionRequest, cancelled: threading.Event | None = None
    ) -> ChatCompletionResponse:
        """Serve a non-streaming ``POST /v1/chat/completions`` request."""
        start = time.perf_counter()
        prepared = self._prepare_chat(request)
        job = self.run_prepared(prepared, cancelled)
        result = job.results[0]
        choice = completion_choice(self.generator.tokenizer, prepared, result, None)
        self._log(prepared.params, "chat", time.perf_counter() - start)
        return ChatCompletionResponse(
            id=completion_id("chatcmpl"),
            model=self.model_name,
            choices=[chat_choice(choice)],
            usage=usage(prepared, len(result.token_ids)),
        )

    def stream_chat(self, request: ChatCompletionRequest) -> CancellableStream:
        """Serve a streaming ``POST /v1/chat/completions`` request (as ``stream_completion``)."""
        start = time.perf_counter()
        prepared = self._prepare_chat(request)
        chunk_id = completion_id()

        def assembler(scores):
            return ChunkAssembler(
                prepared, self.generator.tokenizer, chunk_id, self.model_name, start, scores
            )

        return self.stream_prepared(prepared, assembler, ChatChunkConverter())

    # -------------------------------------------------------------------------- tokenizer

    def tokenizer_info(self) -> dict:
        """``GET /tokenizer_info``: special tokens and the chat template."""
        tokenizer = self.generator.tokenizer
        special = {}
        for name, attribute in (("eos_token", "eod"), ("bos_token", "bos")):
            token_id = getattr(tokenizer, attribute, None)
            special[name] = tokenizer.detokenize([token_id]) if token_id is not None else None
        return {
            **special,
            "pad_token": None,
            "chat_template": self.chat_template or getattr(self.generator, "chat_template", None),
            "vocab_size": getattr(tokenizer, "vocab_size", None),
            "model_max_length": self.generator.max_sequence_length,
        }

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """``POST /tokenize``: the ids the server runs for ``text`` (no special tokens)."""
        return list(self.generator.tokenizer.tokenize(text))

    def detokenize(self, ids: list[int]) -> str:
        """``POST /detokenize``."""
        vocab_size = getattr(self.generator.tokenizer, "vocab_size", None)
        if vocab_size is not None and any(token >= vocab_size for token in ids):
            raise RequestError(
                "tokens", f"token ids must be below the vocabulary size {vocab_size}"
            )
        return self.generator.tokenizer.detokenize(ids)

    # ------------------------------------------------------------------------------ state

    def health(self) -> dict:
        """Model facts and request counters, for ``GET /health``."""
        with self._stats_lock:
            counters = {
                "pending": self._num_pending,
                "served": self._num_served,
                "failed": self._num_failed,
                "cancelled": self._num_cancelled,
                "refused_busy": self._num_refused,
            }
        return {
            "status": "ok",
            "model": self.model_name,
            "num_layers": self.generator.num_layers,
            "exit_layers": list(self.generator.exit_depths),
            "max_sequence_length": self.generator.max_sequence_length,
            "limits": {**vars(self.limits), "max_prompt_chars": self.limits.prompt_chars},
            "batching": "continuous" if self.concurrent else "serial",
            "batching_statistics": getattr(self.generator, "batching_statistics", lambda: None)(),
            "requests": counters,
        }

    def close(self) -> None:
        """Finish queued requests and stop the service thread."""
        self._executor.shutdown(wait=True)


class CancellableStream:
    """The chunks of one streamed request; ``cancel()`` drops it if it has not started, and
    stops it if it runs (with continuous batching)."""

    def __init__(
        self,
        service,
        future: Future,
        out: queue.Queue,
        assembler_fn,
        params,
        convert=None,
        cancelled: threading.Event | None = None,
    ) -> None:
        self._service = service
        self._cancelled = cancelled
        self._convert = convert
        self._future = future
        self._out = out
        self._assembler_fn = assembler_fn
        self._params = params
        self._iterator = self._chunks()

    def __iter__(self) -> Iterator[CompletionChunk]:
        return self

    def __next__(self) -> CompletionChunk:
        chunk = next(self._iterator)
        return self._convert(chunk) if self._convert is not None else chunk

    def has_output(self) -> bool:
        """Whether the job has put anything out yet (it has started, or failed or ended)."""
        return not self._out.empty() or self._future.done()

    def cancel(self) -> bool:
        """Drop the request if it has not started (True), else ask a running one to stop (it
        stops at the next decode step with continuous batching; a no-op once it has ended)."""
        dropped = self._future.cancel()
        if dropped:
            self._service._note_cancelled()
            self._out.put(_END)
        elif self._cancelled is not None and not self._future.done():
            self._cancelled.set()
        return dropped

    def _get(self):
        item = self._out.get()
        if isinstance(item, GenerationError):
            raise item
        return item

    def _chunks(self) -> Iterator[CompletionChunk]:
        first = self._get()
        if first is _END:
            if self._future.cancelled():
                raise CancelledError("the request was cancelled before it started")
            raise GenerationError("the generation ended without output")
        _, scores = first
        assembler = self._assembler_fn(scores)
        yield from assembler.opening()
        while (item := self._get()) is not _END:
            yield from assembler.add(item)
        yield assembler.closing()
        self._service._log(self._params, "stream", time.perf_counter() - assembler.start)


def _empty_completion(index: int) -> PromptCompletion:
    return PromptCompletion(index, "", (), (), (), finish_reason="length")
