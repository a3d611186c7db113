"""The generation service: plain Python between the HTTP routes and a text generator.

``GenerationService`` prepares a parsed request (``preparation.prepare_request``), runs it as a
job (``jobs.Jobs``: the bounded queue, serial or concurrent running, cancellation and time
limits) and maps the results onto the protocol's responses (``responses``). The request time
reported to the client includes the wait.

A request that scores prompts (OpenAI ``echo`` with ``logprobs``; Megatron's
``tokens_to_generate=0`` with ``logprobs``) first runs the generator's ``score`` (a full
no-cache forward, by the final head or the chosen exit), then generates, in the same job.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

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
    TextGenerator,
)
from megatron.early_exit.server.jobs import (
    CancellableStream,
    JobResult,
    Jobs,
    RequestCancelled,
    RequestTimedOut,
    ServiceBusy,
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
        self.jobs = Jobs(generator, self.limits)

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
        return self.jobs.results(prepared)

    def run(
        self, params: GenerationRequest, fields: RequestFields = GENERATE_FIELDS
    ) -> list[PromptCompletion]:
        """Validate and generate (waiting for earlier requests); one result per prompt."""
        return self.submit(params, fields).result()

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
        return self.jobs.run(prepared, cancelled)

    def stream_prepared(
        self,
        prepared: PreparedRequest,
        assembler_fn: Callable[[list | None], object],
        convert: Callable | None = None,
    ) -> CancellableStream:
        """Queue a prepared request for streaming; ``assembler_fn(scores)`` makes the chunks'
        assembler once the scores (if any) are known; ``convert`` maps each chunk."""

        def log(seconds: float) -> None:
            self._log(prepared.params, "stream", seconds)

        return self.jobs.stream(prepared, assembler_fn, convert, log)

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
        return {
            "status": "ok",
            "model": self.model_name,
            "num_layers": self.generator.num_layers,
            "exit_layers": list(self.generator.exit_depths),
            "max_sequence_length": self.generator.max_sequence_length,
            "limits": {**vars(self.limits), "max_prompt_chars": self.limits.prompt_chars},
            "batching": "continuous" if self.jobs.concurrent else "serial",
            "batching_statistics": getattr(self.generator, "batching_statistics", lambda: None)(),
            "requests": self.jobs.counters(),
        }

    def close(self) -> None:
        """Finish queued requests and stop the service thread(s)."""
        self.jobs.close()
