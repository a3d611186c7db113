"""Running generation jobs: the bounded queue, the generation thread(s), cancellation, time
limits and a streamed job's output.

:class:`Jobs` runs each prepared request as one job: the prompts' scores when asked (a full
no-cache forward), then the generations. The queue is bounded
(``ServerLimits.max_queued_requests``, waiting plus running): one more job raises
:class:`ServiceBusy` (503). Two ways to run jobs, chosen by the generator:

* A ``concurrent`` generator (continuous batching, one process) decodes every running request
  in one batch on its own thread; each job waits on its request from a pool thread. A client
  that leaves (its ``cancelled`` event set) has its request dropped, waiting or running, at the
  next decode step (:class:`RequestCancelled`, 499); a request running past
  ``ServerLimits.max_request_seconds`` is stopped (:class:`RequestTimedOut`, 504).
* Otherwise jobs are serialised on one generation thread, in arrival order, so a multi-rank
  generator never interleaves its broadcasts. A job whose client has gone is dropped if it has
  not started; a started one runs to its end, because the other ranks of a multi-rank server
  are in lockstep with it, and no time limit applies.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass

from megatron.early_exit.inference.batching import RequestCancelled as BatchCancelled
from megatron.early_exit.inference.batching import TimeLimitExceeded
from megatron.early_exit.server.generator import (
    PromptCompletion,
    PromptScores,
    TextGenerator,
    check_scores,
    engine_prompt_ids,
)
from megatron.early_exit.server.preparation import PreparedRequest
from megatron.early_exit.server.protocol import CompletionChunk, GenerationRequest, ServerLimits
from megatron.early_exit.server.responses import GenerationError

logger = logging.getLogger(__name__)


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


class Jobs:
    """The job queue of a :class:`GenerationService` (see the module docstring)."""

    def __init__(self, generator: TextGenerator, limits: ServerLimits) -> None:
        self.generator = generator
        self.limits = limits
        self.concurrent = bool(getattr(generator, "concurrent", False))
        workers = limits.max_queued_requests if self.concurrent else 1
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="generation")
        self._stats_lock = threading.Lock()
        self._num_pending = 0
        self._num_served = 0
        self._num_failed = 0
        self._num_cancelled = 0
        self._num_refused = 0

    def results(self, prepared: PreparedRequest) -> Future[list[PromptCompletion]]:
        """Queue a job; the future holds its generations."""
        return self._submit(lambda p: self._run_job(p, None).results, prepared)

    def run(self, prepared: PreparedRequest, cancelled: threading.Event | None = None) -> JobResult:
        """Queue a job and wait for it (``RequestCancelled`` if the client left)."""
        return self._wait(self._submit(self._run_job, prepared, cancelled), cancelled)

    def stream(
        self,
        prepared: PreparedRequest,
        assembler_fn: Callable[[list | None], object],
        convert: Callable | None = None,
        on_end: Callable[[float], None] | None = None,
    ) -> CancellableStream:
        """Queue a job for streaming; ``assembler_fn(scores)`` makes the chunks' assembler once
        the scores (if any) are known; ``convert`` maps each chunk; ``on_end(seconds)`` runs
        after the last chunk."""
        out: queue.Queue = queue.Queue()
        cancelled = threading.Event()
        future = self._submit(self._stream_job, prepared, out, cancelled)
        return CancellableStream(self, future, out, assembler_fn, convert, cancelled, on_end)

    def counters(self) -> dict:
        """Jobs pending (waiting or running), served, failed, cancelled and refused."""
        with self._stats_lock:
            return {
                "pending": self._num_pending,
                "served": self._num_served,
                "failed": self._num_failed,
                "cancelled": self._num_cancelled,
                "refused_busy": self._num_refused,
            }

    def close(self) -> None:
        """Finish the queued jobs and stop the threads."""
        self._executor.shutdown(wait=True)

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
                    self.note_cancelled()
                    raise RequestCancelled("the client left before the request started") from None

    def note_cancelled(self) -> None:
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


class CancellableStream:
    """The chunks of one streamed request; ``cancel()`` drops it if it has not started, and
    stops it if it runs (with continuous batching)."""

    def __init__(
        self,
        jobs: Jobs,
        future: Future,
        out: queue.Queue,
        assembler_fn,
        convert=None,
        cancelled: threading.Event | None = None,
        on_end: Callable[[float], None] | None = None,
    ) -> None:
        self._jobs = jobs
        self._on_end = on_end
        self._cancelled = cancelled
        self._convert = convert
        self._future = future
        self._out = out
        self._assembler_fn = assembler_fn
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
            self._jobs.note_cancelled()
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
        if self._on_end is not None:
            self._on_end(time.perf_counter() - assembler.start)


def _empty_completion(index: int) -> PromptCompletion:
    return PromptCompletion(index, "", (), (), (), finish_reason="length")
