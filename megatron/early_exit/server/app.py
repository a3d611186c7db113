"""HTTP transport: thin FastAPI routes over a ``GenerationService``.

Routes:

* ``PUT /api``: the Megatron / EE-LLM text-generation contract (``GenerateRequest`` ->
  ``GenerateResponse``).
* ``POST /v1/completions``: OpenAI legacy completions with an ``early_exit`` extension; with
  ``"stream": true`` the answer is server-sent events ``data: {chunk}\\n\\n`` ending with
  ``data: [DONE]\\n\\n``.
* ``GET /health``: model facts and request counters.

Bodies are read raw and validated by ``protocol.parse_*`` under the service's limits (not by
FastAPI's parameter parsing), so every invalid request, malformed JSON included, gets status 400
and the body ``{"error": {"message", "field", "type"}}``. A generator failure gets 500 with a
message (inside a stream: an ``error`` event, then ``[DONE]``); the server keeps serving.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from megatron.early_exit.server.protocol import (
    RequestError,
    error_body,
    parse_completion_request,
    parse_generate_request,
)
from megatron.early_exit.server.service import GenerationService

logger = logging.getLogger(__name__)

BAD_REQUEST = 400
SERVER_ERROR = 500


def _error_response(error: ValidationError | RequestError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=BAD_REQUEST)


def _server_error(error: Exception) -> dict:
    return {"error": {"message": str(error), "field": None, "type": "server_error"}}


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


def _sse_events(chunks: Iterator) -> Iterator[str]:
    """Server-sent events for a chunk iterator; a failure becomes an ``error`` event."""
    try:
        for chunk in chunks:
            yield _sse(chunk.model_dump_json(exclude_none=True))
    except Exception as error:  # headers are sent: report in-band, then end the stream
        logger.error("stream failed: %s", error)
        yield _sse(json.dumps(_server_error(error)))
    yield _sse("[DONE]")


async def _call(fn, request) -> JSONResponse:
    """Run a blocking service call off the event loop; map its errors onto responses."""
    try:
        response = await run_in_threadpool(fn, request)
    except RequestError as error:
        return _error_response(error)
    except Exception as error:
        logger.exception("request failed")
        return JSONResponse(_server_error(error), status_code=SERVER_ERROR)
    return JSONResponse(response.model_dump())


def create_app(service: GenerationService) -> FastAPI:
    """The HTTP app serving ``service``."""
    app = FastAPI(title="EE-LLM generation server", docs_url=None, redoc_url=None)
    app.state.service = service

    @app.put("/api")
    async def generate(request: Request):
        try:
            parsed = parse_generate_request(await request.body(), service.limits)
        except ValidationError as error:
            return _error_response(error)
        return await _call(service.generate, parsed)

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            parsed = parse_completion_request(await request.body(), service.limits)
        except ValidationError as error:
            return _error_response(error)
        if not parsed.stream:
            return await _call(service.complete, parsed)
        try:
            chunks = await run_in_threadpool(service.stream_completion, parsed)
        except RequestError as error:
            return _error_response(error)
        except Exception as error:
            logger.exception("request failed")
            return JSONResponse(_server_error(error), status_code=SERVER_ERROR)
        return StreamingResponse(
            _sse_events(chunks),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/health")
    async def health():
        return service.health()

    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 5000, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until interrupted (blocking, one process)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


def _serve_fake_demo() -> None:
    """``python -m megatron.early_exit.server.app [--port N]``: serve ``FakeGenerator`` (no model),
    for trying the client tools."""
    import argparse

    from megatron.early_exit.server.service import FakeGenerator

    parser = argparse.ArgumentParser(description="Serve the fake generator (a demo, no model).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--delay", type=float, default=0.02, help="seconds per generated token")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    service = GenerationService(FakeGenerator(delay_s=args.delay), model_name="fake")
    serve(create_app(service), args.host, args.port)


if __name__ == "__main__":
    _serve_fake_demo()
