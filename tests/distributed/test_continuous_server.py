"""The generation service on continuous batching (one rank, a tiny model, bytes).

Oracle: the same requests on a serial service over the same model (one request at a time).
Concurrent mixed requests (``PUT /api``, completions, streamed completions, early exit,
speculation) must get exactly the serial answers (no cross-talk); a short request submitted
behind a long one finishes first; a client that leaves stops its running request; a request
past the time limit is stopped with ``RequestTimedOut``.
"""

from __future__ import annotations

import pytest

from tests.distributed.harness import run_distributed

PROMPTS = ["The county jury said", "It was a dark and", "Numbers: 1, 2, 3,", "Q: why? A:"]


def _requests():
    """``(kind, body)`` pairs, all greedy."""
    out = []
    for i, prompt in enumerate(PROMPTS * 2):
        tokens = 4 + 3 * i
        if i % 4 == 0:
            out.append(("api", {"prompts": [prompt, prompt[:5]], "tokens_to_generate": tokens}))
        elif i % 4 == 1:
            body = {"prompts": [prompt], "tokens_to_generate": tokens, "use_early_exit": True,
                    "early_exit_thres": 0.2}  # fmt: skip
            out.append(("api", body))
        elif i % 4 == 2:
            body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
                    "stop": [" the"]}  # fmt: skip
            out.append(("stream", body))
        else:
            body = {"prompts": [prompt], "tokens_to_generate": tokens, "use_early_exit": True,
                    "early_exit_method": "speculative"}  # fmt: skip
            out.append(("api", body))
    return out


def _answer(service, kind: str, body: dict, cancelled=None):
    from megatron.early_exit.server.protocol import parse_completion_request, parse_generate_request

    if kind == "api":
        response = service.generate(parse_generate_request(body, service.limits), cancelled)
        return {"text": response.text, "exit_layers": response.exit_layers}
    chunks = service.stream_completion(parse_completion_request(body, service.limits))
    return {"text": "".join(c.choices[0].text for c in chunks if c.choices)}


def _concurrently(fns) -> list:
    import threading

    results = [None] * len(fns)

    def run(i):
        try:
            results[i] = fns[i]()
        except Exception as error:  # noqa: BLE001 - reported as the result
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def _timed(service, kind, body, finished: dict, name: str, cancelled=None):
    import time

    try:
        return _answer(service, kind, body, cancelled)
    finally:
        finished[name] = time.monotonic()


def server_worker(rank: int, world_size: int) -> dict:
    import threading
    import time

    from megatron.early_exit import platform
    from megatron.early_exit.data.tokenizers import build_tokenizer
    from megatron.early_exit.model.builder import build_early_exit_model
    from megatron.early_exit.server.engine_generator import EngineGenerator
    from megatron.early_exit.server.protocol import ServerLimits
    from megatron.early_exit.server.service import (
        GenerationService,
        RequestCancelled,
        RequestTimedOut,
    )
    from tests.helpers import tiny_config

    platform.initialize(1, 1, seed=3)
    tokenizer = build_tokenizer("ByteLevelTokenizer")
    model = build_early_exit_model(tiny_config("gpt", init_method_std=0.3), 512, 2048, seed=3)
    serial = GenerationService(EngineGenerator(model, tokenizer))
    generator = EngineGenerator(model, tokenizer, continuous=True)
    service = GenerationService(
        generator, ServerLimits(max_tokens_to_generate=2000, max_request_seconds=2)
    )
    out = {"health": service.health()["batching"], "serial_health": serial.health()["batching"]}
    try:
        requests = _requests()
        out["serial"] = [_answer(serial, kind, body) for kind, body in requests]
        steps = generator._batcher.num_steps
        out["continuous"] = _concurrently(
            [lambda k=kind, b=body: _answer(service, k, b) for kind, body in requests]
        )
        out["steps"] = generator._batcher.num_steps - steps

        # A short request behind a long one.
        finished: dict[str, float] = {}
        long_body = {"prompts": PROMPTS, "tokens_to_generate": 400}
        short_body = {"prompts": ["Hi"], "tokens_to_generate": 2}
        long_thread = threading.Thread(
            target=_timed, args=(service, "api", long_body, finished, "long")
        )
        long_thread.start()
        while generator._batcher.num_steps == steps + out["steps"]:
            time.sleep(0.001)  # the long request is decoding
        _timed(service, "api", short_body, finished, "short")
        long_thread.join()
        out["short_first"] = finished["short"] < finished["long"]

        # A client that leaves: its running request stops at the next step.
        cancelled = threading.Event()
        box = {}

        def leaving():
            try:
                _answer(service, "api", {"prompts": PROMPTS, "tokens_to_generate": 1500},
                        cancelled)  # fmt: skip
            except RequestCancelled as error:
                box["error"] = str(error)
                box["at"] = time.monotonic()
            except Exception as error:  # noqa: BLE001 - reported
                box["error"] = repr(error)
                cancelled.set()

        thread = threading.Thread(target=leaving)
        thread.start()
        before = generator._batcher.num_steps
        while generator._batcher.num_steps < before + 5 and not cancelled.is_set():
            time.sleep(0.001)
        left_at = time.monotonic()
        cancelled.set()
        thread.join(timeout=30)
        out["cancel_error"] = box.get("error")
        out["cancel_latency_s"] = box["at"] - left_at if "at" in box else None
        out["rows_after_cancel"] = generator._batcher.scheduler.num_running
        out["cancelled_count"] = service.health()["requests"]["cancelled"]

        # The time limit.
        start = time.monotonic()
        try:
            _answer(service, "api", {"prompts": PROMPTS * 2, "tokens_to_generate": 1990})
            out["time_limit"] = "finished"
        except RequestTimedOut as error:
            out["time_limit"] = str(error)
        out["time_limit_s"] = time.monotonic() - start
    finally:
        service.close()
        serial.close()
        generator.close()
    return out


@pytest.fixture(scope="module")
def result() -> dict:
    return run_distributed(server_worker, 1, timeout_s=600)[0]


def test_health_names_the_batching(result):
    assert result["health"] == "continuous"
    assert result["serial_health"] == "serial"


def test_concurrent_requests_get_the_serial_answers(result):
    assert result["continuous"] == result["serial"]


def test_concurrent_requests_share_steps(result):
    # serially the requests would take the sum of their decode steps
    serial_steps = sum(
        body.get("tokens_to_generate", body.get("max_tokens")) for _, body in _requests()
    )
    assert result["steps"] < serial_steps


def test_short_request_behind_a_long_one_finishes_first(result):
    assert result["short_first"]


def test_client_leaving_stops_its_running_request(result):
    assert "client left" in result["cancel_error"]
    assert result["cancel_latency_s"] < 1.0
    assert result["rows_after_cancel"] == 0
    assert result["cancelled_count"] == 1


def test_time_limit_stops_a_request(result):
    assert "2-second limit" in result["time_limit"]
    assert result["time_limit_s"] < 4.0
