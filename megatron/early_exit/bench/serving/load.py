"""Sending the requests: concurrent clients, and each distinct request alone.

:func:`run_clients` starts one thread per client, each with its own ``httpx.Client`` (its own
keep-alive connection), releases them together through a barrier and lets each send its
requests one after another, each waiting for its answer before the next (a closed loop). Every
request has a timeout, never beyond the run's deadline; requests the deadline leaves no time
for are not sent and counted. :func:`send_alone` sends requests one at a time from one client:
the references the load's answers are compared with.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from megatron.early_exit.bench.serving.workload import (
    ServingRequest,
    answer_of_chunks,
    answer_of_json,
)
from megatron.early_exit.server.client import ClientError, describe_error_response, parse_sse_lines

OK = 200


class RequestFailed(Exception):
    """A request that got no answer: a status other than 200, an error event, a timeout, a
    connection failure or an unreadable body."""


@dataclass(frozen=True)
class Outcome:
    """One request sent under load."""

    client: int
    request: ServingRequest
    started_s: float
    """Seconds from the release of the clients to the request's start."""
    latency_s: float
    """Seconds from sending to the end of the answer (a stream read to ``[DONE]``)."""
    answer: dict | None
    error: str | None


@dataclass
class LoadResult:
    """What :func:`run_clients` saw."""

    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0
    """From the release of the clients to the last answer."""
    not_sent: int = 0
    """Requests the deadline left no time for."""

    @property
    def answered(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is None]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is not None]


def send(client: httpx.Client, url: str, request: ServingRequest, timeout_s: float) -> dict:
    """Send one request and read its whole answer; returns :func:`answer_of_json` /
    :func:`answer_of_chunks`. ``timeout_s`` bounds each network wait, and a stream as a whole."""
    method, path = request.route()
    end = time.perf_counter() + timeout_s
    try:
        if not request.streamed:
            response = client.request(method, url + path, json=request.body(), timeout=timeout_s)
            if response.status_code != OK:
                raise RequestFailed(describe_error_response(response))
            return answer_of_json(request, response.json())
        with client.stream(method, url + path, json=request.body(), timeout=timeout_s) as response:
            if response.status_code != OK:
                response.read()
                raise RequestFailed(describe_error_response(response))
            chunks = []
            for chunk in parse_sse_lines(response.iter_lines()):
                chunks.append(chunk)
                if time.perf_counter() > end:
                    raise RequestFailed(f"the stream took longer than {timeout_s:g} s")
            return answer_of_chunks(chunks)
    except httpx.TimeoutException as error:
        raise RequestFailed(f"timed out after {timeout_s:g} s ({type(error).__name__})") from None
    except httpx.HTTPError as error:
        raise RequestFailed(f"{type(error).__name__}: {error}") from None
    except ClientError as error:
        raise RequestFailed(str(error)) from None
    except (ValueError, KeyError, IndexError, TypeError) as error:  # an unreadable body
        raise RequestFailed(f"malformed answer: {type(error).__name__}: {error}") from None


def _client_loop(
    client_index: int, url: str, requests: Sequence[ServingRequest], timeout_s: float,
    deadline: float, barrier: threading.Barrier, clock: dict, result: LoadResult,
    lock: threading.Lock,
) -> None:  # fmt: skip
    outcomes, not_sent = [], 0
    try:
        barrier.wait()
        with httpx.Client() as client:
            for position, request in enumerate(requests):
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    not_sent = len(requests) - position
                    break
                start = time.perf_counter()
                try:
                    answer, error = send(client, url, request, min(timeout_s, remaining)), None
                except RequestFailed as failure:
                    answer, error = None, str(failure)
                end = time.perf_counter()
                outcomes.append(Outcome(client_index, request, start - clock["start"],
                                        end - start, answer, error))  # fmt: skip
    except threading.BrokenBarrierError:
        not_sent = len(requests)
    except Exception as error:  # anything else stops this client; it is reported, not lost
        sent = min(len(outcomes), len(requests) - 1)
        message = f"client failed: {type(error).__name__}: {error}"
        outcomes.append(Outcome(client_index, requests[sent], 0.0, 0.0, None, message))
        not_sent = len(requests) - sent - 1
    with lock:
        result.outcomes.extend(outcomes)
        result.not_sent += not_sent
        clock["end"] = max(clock.get("end", 0.0), time.perf_counter())


def run_clients(
    url: str, mix: Sequence[Sequence[ServingRequest]], timeout_s: float, deadline: float
) -> LoadResult:
    """Client ``i`` sends ``mix[i]`` in order, all clients at once; returns every outcome (in
    client order) and the wall time from their release to the last answer. ``deadline`` is a
    ``time.perf_counter`` value."""
    result, lock, clock = LoadResult(), threading.Lock(), {}
    barrier = threading.Barrier(
        len(mix), action=lambda: clock.update(start=time.perf_counter()), timeout=60.0
    )
    threads = [
        threading.Thread(
            target=_client_loop,
            args=(i, url, requests, timeout_s, deadline, barrier, clock, result, lock),
            name=f"bench-client-{i}",
            daemon=True,
        )
        for i, requests in enumerate(mix)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:  # every request is bounded by the deadline; the margin is for slack
        thread.join(timeout=max(0.0, deadline - time.perf_counter()) + 30.0)
    if any(thread.is_alive() for thread in threads):
        barrier.abort()
        raise RuntimeError("a client thread did not finish 30 s after the deadline")
    result.outcomes.sort(key=lambda o: (o.client, o.started_s))
    result.wall_s = clock.get("end", 0.0) - clock.get("start", clock.get("end", 0.0))
    return result


def send_alone(
    url: str, requests: Sequence[ServingRequest], timeout_s: float, deadline: float
) -> tuple[dict[ServingRequest, dict], LoadResult]:
    """Each request alone, one after another: ``(answers by request, what was seen)``."""
    answers, result = {}, LoadResult()
    start_all = time.perf_counter()
    with httpx.Client() as client:
        for position, request in enumerate(requests):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                result.not_sent = len(requests) - position
                break
            start = time.perf_counter()
            try:
                answer, error = send(client, url, request, min(timeout_s, remaining)), None
                answers[request] = answer
            except RequestFailed as failure:
                answer, error = None, str(failure)
            end = time.perf_counter()
            result.outcomes.append(
                Outcome(0, request, start - start_all, end - start, answer, error)
            )
    result.wall_s = time.perf_counter() - start_all
    return answers, result
