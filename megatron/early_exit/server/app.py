"""HTTP transport: thin FastAPI routes over a ``GenerationService``, and the uvicorn server.

Routes:

* ``PUT /api``: the Megatron / EE-LLM text-generation contract (``GenerateRequest`` ->
  ``GenerateResponse``); ``tokens_to_generate: 0`` with ``logprobs: true`` scores the prompts.
* ``POST /v1/completions``: OpenAI legacy completions with an ``early_exit`` extension; with
  ``"stream": true`` the answer is server-sent events ``data: {chunk}\\n\\n`` ending with
  ``data: [DONE]\\n\\n``; ``echo`` with ``logprobs`` scores the prompt tokens.
* ``POST /v1/chat/completions``: OpenAI chat completions (the tokenizer's chat template).
* ``GET /v1/models``: the served model and one alias per exit.
* ``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize``: the tokenizer, in the form
  lm-evaluation-harness' remote tokenizer reads.
* ``GET /health``: model facts and request counters.

Hardening: a body is read in chunks and refused with 413 as soon as it exceeds
``ServerLimits.max_body_bytes`` (a ``Content-Length`` above it is refused before reading), and
within ``BODY_TIMEOUT_S`` (408); a body must be ``application/json`` (415: a web page cannot post
to the server as a CORS "simple request"); a full queue answers 503; no ``/openapi.json`` or docs.
Bodies are validated by ``protocol.parse_*`` under the service's limits (not by FastAPI's
parameter parsing), so every invalid request, malformed JSON included, gets status 400 and the
body ``{"error": {"message", "field", "type"}}``. A generator failure gets 500 with a message
(inside a stream: an ``error`` event, then ``[DONE]``); the server keeps serving. A client that
disconnects has its request dropped from the queue, or, with continuous batching, stopped while
it runs; a request past ``ServerLimits.max_request_seconds`` gets 504 (continuous batching).

``serve`` runs uvicorn with a header-read timeout (a connection that has not sent a request's
headers within ``header_timeout_s`` is closed) and a concurrency limit (503 beyond it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from megatron.early_exit.server.chat import ChatCompletionRequest
from megatron.early_exit.server.protocol import (
    DetokenizeRequest,
    RequestError,
    ServerLimits,
    TokenizeRequest,
    error_body,
    parse_completion_request,
    parse_generate_request,
    parse_request,
)
from megatron.early_exit.server.service import (
    GenerationService,
    RequestCancelled,
    RequestTimedOut,
    ServiceBusy,
)

logger = logging.getLogger(__name__)

BAD_REQUEST = 400
REQUEST_TIMEOUT = 408
PAYLOAD_TOO_LARGE = 413
UNSUPPORTED_MEDIA_TYPE = 415
SERVER_ERROR = 500
SERVICE_UNAVAILABLE = 503
GATEWAY_TIMEOUT = 504
CLIENT_CLOSED = 499
BODY_TIMEOUT_S = 30.0
_QUEUE_POLL_S = 0.02


class HTTPRefusal(Exception):
    """A request refused before parsing (status, message)."""

    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type


def _error(status: int, message: str, error_type: str, field: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "field": field, "type": error_type}}
    return JSONResponse(body, status_code=status)


def _error_response(error: ValidationError | RequestError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=BAD_REQUEST)


def _server_error(error: Exception) -> dict:
    return {"error": {"message": str(error), "field": None, "type": "server_error"}}


async def read_json_body(request: Request, limits: ServerLimits) -> bytes:
    """The raw body, if JSON and within the limit; ``HTTPRefusal`` (415, 413, 408) otherwise.

    Never holds more than ``max_body_bytes`` plus one network chunk.
    """
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise HTTPRefusal(
            UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type must be application/json, got {media_type or 'none'!r}",
            "unsupported_media_type",
        )
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HTTPRefusal(
            PAYLOAD_TOO_LARGE, f"the body is over the {limit}-byte limit", "too_large"
        )

    async def read() -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise HTTPRefusal(
                    PAYLOAD_TOO_LARGE, f"the body is over the {limit}-byte limit", "too_large"
                )
        return bytes(body)

    try:
        return await asyncio.wait_for(read(), BODY_TIMEOUT_S)
    except TimeoutError:
        raise HTTPRefusal(
            REQUEST_TIMEOUT, f"the body was not received within {BODY_TIMEOUT_S:g} s", "timeout"
        ) from None


async def _watch_disconnect(request: Request, cancelled: threading.Event) -> None:
    """Set ``cancelled`` when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancelled.set()
            return


async def _call(fn: Callable, parsed, request: Request) -> JSONResponse:
    """Run a blocking service call off the event loop, dropping it if the client leaves before
    it starts; map its errors onto responses."""
    cancelled = threading.Event()
    watcher = asyncio.ensure_future(_watch_disconnect(request, cancelled))
    try:
        response = await run_in_threadpool(fn, parsed, cancelled)
    except RequestError as error:
        return _error_response(error)
    except ServiceBusy as error:
        return _error(SERVICE_UNAVAILABLE, str(error), "busy")
    except RequestCancelled as error:
        return _error(CLIENT_CLOSED, str(error), "cancelled")
    except RequestTimedOut as error:
        return _error(GATEWAY_TIMEOUT, str(error), "time_limit")
    except Exception as error:
        logger.exception("request failed")
        return JSONResponse(_server_error(error), status_code=SERVER_ERROR)
    finally:
        watcher.cancel()
    return JSONResponse(response.model_dump(mode="json"))


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


def _sse_events(chunks: Iterator[BaseModel]) -> Iterator[str]:
    """Server-sent events for a chunk iterator; a failure becomes an ``error`` event."""
    try:
        for chunk in chunks:
            yield _sse(chunk.model_dump_json(exclude_none=True))
    except Exception as error:  # headers are sent: report in-band, then end the stream
        logger.error("stream failed: %s", error)
        yield _sse(json.dumps(_server_error(error)))
    yield _sse("[DONE]")


async def _stream(start: Callable, parsed):
    """A streaming response, or the error response when the request is refused up front."""
    try:
        chunks = await run_in_threadpool(start, parsed)
    except RequestError as error:
        return _error_response(error)
    except ServiceBusy as error:
        return _error(SERVICE_UNAVAILABLE, str(error), "busy")
    except Exception as error:
        logger.exception("request failed")
        return JSONResponse(_server_error(error), status_code=SERVER_ERROR)

    async def events() -> AsyncIterator[str]:
        try:
            # Wait for the job's first item on the event loop: a thread blocked on the queue
            # cannot be cancelled, so a client leaving during the wait would not be noticed
            # until the job had started.
            while not chunks.has_output():
                await asyncio.sleep(_QUEUE_POLL_S)
            async for event in iterate_in_threadpool(_sse_events(chunks)):
                yield event
        finally:  # the client left (or the stream ended): drop the request if not started
            chunks.cancel()

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def create_app(service: GenerationService) -> FastAPI:
    """The HTTP app serving ``service``."""
    app = FastAPI(title="EE-LLM generation server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    limits = service.limits

    async def body_of(request: Request, parse: Callable):
        return parse(await read_json_body(request, limits), limits)

    @app.exception_handler(HTTPRefusal)
    async def refused(_request: Request, error: HTTPRefusal):
        return _error(error.status, str(error), error.error_type)

    @app.exception_handler(ValidationError)
    async def invalid(_request: Request, error: ValidationError):
        return _error_response(error)

    @app.put("/api")
    async def generate(request: Request):
        parsed = await body_of(request, parse_generate_request)
        return await _call(service.generate, parsed, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        parsed = await body_of(request, parse_completion_request)
        if parsed.stream:
            return await _stream(service.stream_completion, parsed)
        return await _call(service.complete, parsed, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        parsed = await body_of(
            request, lambda body, lim: parse_request(ChatCompletionRequest, body, lim)
        )
        if parsed.stream:
            return await _stream(service.stream_chat, parsed)
        return await _call(service.chat, parsed, request)

    @app.get("/v1/models")
    async def models():
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "ee-llm"}
            for name in service.model_names()
        ]
        return {"object": "list", "data": data}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return service.tokenizer_info()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        parsed = await body_of(request, lambda body, lim: parse_request(TokenizeRequest, body, lim))
        return {"tokens": service.tokenize(parsed.prompt)}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        parsed = await body_of(
            request, lambda body, lim: parse_request(DetokenizeRequest, body, lim)
        )
        try:
            return {"prompt": service.detokenize(parsed.tokens)}
        except RequestError as error:
            return _error_response(error)

    @app.get("/health")
    async def health():
        return service.health()

    return app


def build_server(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 5000,
    log_level: str = "info",
    *,
    header_timeout_s: float = 10.0,
    max_connections: int = 64,
):
    """A ``uvicorn.Server`` for ``app``: ``header_timeout_s`` bounds the wait for a request's
    headers on every connection (slow clients holding connections open); beyond
    ``max_connections`` concurrent connections and requests, uvicorn answers 503."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=header_timeout_protocol(header_timeout_s),
        limit_concurrency=max_connections,
        timeout_keep_alive=5,
    )
    return uvicorn.Server(config)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 5000, log_level: str = "info",
          **limits) -> None:  # fmt: skip
    """Serve ``app`` until interrupted (blocking, one process); ``limits`` as ``build_server``."""
    build_server(app, host, port, log_level, **limits).run()


def header_timeout_protocol(timeout_s: float):
    """uvicorn's h11 protocol, closing a connection whose next request's headers do not arrive
    within ``timeout_s`` (uvicorn's keep-alive timer stops at the first byte, so a client that
    trickles headers would otherwise hold the connection forever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            self._waiting_cycle = self.cycle
            self._header_timer = self.loop.call_later(timeout_s, self._header_timeout)

        def _header_timeout(self) -> None:
            if self.cycle is self._waiting_cycle and not self.transport.is_closing():
                logger.info("closing a connection that sent no request headers in %g s", timeout_s)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not self._waiting_cycle:  # headers arrived: a new request cycle
                self._header_timer.cancel()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._header_timer.cancel()
            self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            self._header_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutH11Protocol
