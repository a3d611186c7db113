"""Continuous batching: requests join and leave one running batch between decode steps.

A :class:`Lane` is one running batch: one :class:`KVCache`, one :class:`DecodeState`, one policy
(``policies.py``). Its rows come from any number of requests, and each row keeps its own
request's settings: sampling settings and seeds (rows of one :class:`RowSampler`), exit policy
(:meth:`KVRecompute.per_row`), stop strings, EOS and length limit (one :class:`Recorder` per
request), top log-probs and exit max-probs.

* **Joining.** A request is prefilled alone, on its own cache with its own policy, so its first
  token is the one it gets alone. Its rows are then merged into the lane between two steps: both
  caches are completed first (``Engine.complete``: positions left pending by early exits are
  pushed through the layers they skipped, work the next full-depth step would do anyway), then
  right-aligned at a common length. The side with the shorter content gets more left padding;
  a row's positions are its slots minus its padding, so nothing moves in position space.
* **Leaving.** Rows of finished, cancelled or timed-out requests are dropped after the step that
  ended them: the lane is rebuilt from the remaining rows (completed, copied, and trimmed to
  the longest remaining content), so a finished row never costs another step.
* **Who shares a lane.** Full-depth and KV-recomputation requests, with any settings, share one
  lane (a step runs as deep as its deepest undecided row). Self-speculative requests share a
  lane with requests of the same draft exit, draft count and sampling settings (a round keeps
  the same number of tokens for every row). Lanes take turns, one step each.
* **Exactness.** A row decodes the tokens it decodes alone: per-row padding masks and
  positions, per-row decisions, samplers reseeded per token index (speculative sampling: the
  row's running stream). Only float rounding differs with the batch's shape, as it does between
  ``generate`` calls of different batch sizes.

:class:`ContinuousBatcher` owns the thread that runs the lanes. ``submit`` queues a request
(thread-safe) and returns a :class:`BatchRequest`, whose iterator yields the request's
:class:`StreamUpdate` items as its tokens are decoded (the same items as ``generate_stream``).
``cancel()`` drops a request, waiting or running, at the next step boundary; a request past its
deadline is dropped the same way and its iterator raises :class:`TimeLimitExceeded`. ``call``
runs other work on the model (prompt scoring) on the same thread between steps. One process
only (TP=PP=1): multi-rank servers decode one request at a time in lockstep.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future

import torch

from megatron.early_exit.inference.engine import Engine
from megatron.early_exit.inference.generate import (
    GenerationParams,
    Recorder,
    StreamUpdate,
    build_policy,
    check_layout,
    initial_state,
)
from megatron.early_exit.inference.kv_cache import KVCache
from megatron.early_exit.inference.policies import (
    DecodeState,
    Emitted,
    KVFillPolicy,
    KVRecompute,
    RowSampler,
    SelfSpeculative,
)

logger = logging.getLogger(__name__)

_CAPACITY_STEP = 64
"""Cache lengths are rounded up to a multiple of this (fewer distinct shapes)."""


class RequestStopped(RuntimeError):
    """The request was dropped before it finished (its iterator raises this)."""


class RequestCancelled(RequestStopped):
    """``BatchRequest.cancel()`` was called."""


class TimeLimitExceeded(RequestStopped):
    """The request ran past its deadline."""


def lane_key(params: GenerationParams, exit_depths: Sequence[int]) -> tuple:
    """Requests with equal keys can share a lane (see the module docstring); ``exit_depths``:
    the model's exits (a speculative request's default draft exit is its shallowest allowed)."""
    if params.early_exit and params.method == "speculative":
        draft = params.draft_exit_depth
        if draft is None:
            draft = min(d for d in sorted(exit_depths) if params.exit_policy.allows(d))
        return ("speculative", draft, params.num_draft_tokens,
                params.temperature, params.top_k, params.top_p)  # fmt: skip
    return ("one-token",)


class BatchRequest:
    """One submitted request: its prompts, settings and the updates decoded for it.

    Iterating yields :class:`StreamUpdate` items (tokens per prompt, the last with the results);
    it raises :class:`RequestStopped` if the request was cancelled or timed out, or the error
    that failed it.
    """

    def __init__(
        self,
        prompts: Sequence[Sequence[int]],
        params: GenerationParams,
        deadline: float | None,
        cancelled: threading.Event | None = None,
        stream: bool = True,
    ) -> None:
        self.prompts = [list(p) for p in prompts]
        self.stream = stream
        """False: the iterator yields only the final item (no per-step updates)."""
        self.params = params
        self.deadline = deadline
        """``time.monotonic()`` value after which the request is dropped (None: no limit)."""
        self._updates: queue.Queue = queue.Queue()
        self._cancelled = cancelled if cancelled is not None else threading.Event()
        """Set by :meth:`cancel`, or by whoever passed the event (a client that left)."""
        self.done = False
        # Engine side (the batching thread only):
        self.recorder = Recorder(len(self.prompts), params)
        self.active = torch.ones(len(self.prompts), dtype=torch.bool)
        self.num_generated = 0

    def cancel(self) -> None:
        """Drop the request at the next step boundary (a no-op once it has finished)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[StreamUpdate]:
        while True:
            item = self._updates.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.results is not None:
                return

    # ------------------------------------------------------------------ the batching thread

    def stop_reason(self, now: float) -> RequestStopped | None:
        if self.cancelled:
            return RequestCancelled("the request was cancelled")
        if self.deadline is not None and now > self.deadline:
            return TimeLimitExceeded("the request ran past its time limit")
        return None

    def record(self, emitted: Emitted) -> None:
        """Record a step's tokens for the request's prompts (``emitted`` is ``[n, t]``; its
        alternatives cut to the request's own ``top_logprobs``)."""
        if emitted.top_ids is not None:
            n = self.params.top_logprobs
            emitted.top_ids = emitted.top_ids[..., :n] if n else None
            emitted.top_logprobs = emitted.top_logprobs[..., :n] if n else None
        self.active = self.recorder.add(emitted, self.active)
        self.num_generated += emitted.tokens.shape[1]
        if self.stream:
            self._updates.put(self.recorder.take_update())
        if not self.active.any():
            self.finish(StreamUpdate(results=self.recorder.results()))

    def finish(self, item: StreamUpdate | BaseException) -> None:
        if not self.done:
            self.done = True
            self._updates.put(item)


class Lane:
    """One running batch: rows ``(request, prompt index)`` decoding together."""

    def __init__(self, key: tuple) -> None:
        self.key = key
        self.rows: list[tuple[BatchRequest, int]] = []
        self.engine: Engine | None = None
        self.cache: KVCache | None = None
        self.state: DecodeState | None = None
        self.policy: KVFillPolicy | None = None

    @property
    def requests(self) -> list[BatchRequest]:
        return list(dict.fromkeys(request for request, _ in self.rows))

    def join(self, engine: Engine, request: BatchRequest) -> None:
        """Prefill ``request`` alone and merge its unfinished rows into the lane."""
        state, cache = initial_state(engine, request.prompts, request.params)
        policy = build_policy(engine, request.params)
        emitted = policy.step(engine, cache, state)
        request.record(emitted)
        if request.done:
            return
        state.inputs = emitted.tokens[:, -1:].to(engine.device)
        state.num_generated = torch.full((len(request.prompts),), request.num_generated)
        joining = Lane(self.key)
        joining.rows = [(request, i) for i in range(len(request.prompts))]
        joining.engine, joining.cache, joining.state, joining.policy = engine, cache, state, policy
        self.engine = engine
        self._rebuild([self, joining])

    def step(self) -> None:
        """One decode step of every row; each request records its rows' tokens."""
        state = self.state
        emitted = self.policy.step(self.engine, self.cache, state)
        state.inputs = emitted.tokens[:, -1:].to(self.engine.device)
        state.num_generated += emitted.tokens.shape[1]
        for request, lane_rows, prompt_rows in self._by_request():
            share = _rows_of(emitted, lane_rows, prompt_rows, len(request.prompts))
            request.record(share)

    def drop_finished(self) -> None:
        """Rebuild without the rows of finished requests and rows that finished."""
        if any(request.done or not request.active[i] for request, i in self.rows):
            self._rebuild([self])

    def _by_request(self):
        groups: dict[BatchRequest, tuple[list[int], list[int]]] = {}
        for lane_row, (request, prompt_row) in enumerate(self.rows):
            lane_rows, prompt_rows = groups.setdefault(request, ([], []))
            lane_rows.append(lane_row)
            prompt_rows.append(prompt_row)
        return [(request, *rows) for request, rows in groups.items()]

    def _rebuild(self, lanes: Sequence[Lane]) -> None:
        """This lane as the live rows of ``lanes`` (itself among them), in one new cache."""
        parts = []
        for lane in lanes:
            if lane.cache is None:
                continue
            keep = [i for i, (r, p) in enumerate(lane.rows) if not r.done and bool(r.active[p])]
            if keep:
                lane.engine.complete(lane.cache, lane.policy.exit_depths)
                parts.append((lane, keep))
        rows = [lane.rows[i] for lane, keep in parts for i in keep]
        if not parts:
            self.rows, self.cache, self.state, self.policy = [], None, None, None
            return
        length = max(lane.cache.length - int(lane.cache.pad_lengths[keep].min())
                     for lane, keep in parts)  # fmt: skip
        cache = _merged_cache(self.engine, parts, length, self._capacity_need(parts, length))
        state = DecodeState(
            inputs=torch.cat([lane.state.inputs[keep] for lane, keep in parts]),
            active=torch.ones(len(rows), dtype=torch.bool),
            sampler=RowSampler.concat([lane.state.sampler.select(keep) for lane, keep in parts]),
            num_generated=torch.cat([lane.state.num_generated[keep] for lane, keep in parts]),
            exit_max_probs=any(request.params.exit_max_probs for request, _ in rows),
        )
        self.rows, self.cache, self.state = rows, cache, state
        self.policy = self._policy()

    def _capacity_need(self, parts, length: int) -> int:
        """Cache slots the merged rows need until the last of them ends, from ``length``."""
        need = 0
        for request in {lane.rows[i][0] for lane, keep in parts for i in keep}:
            params = request.params
            extra = params.num_draft_tokens + 1 if self.key[0] == "speculative" else 0
            need = max(need, length + params.max_new_tokens - request.num_generated + extra)
        return -(-need // _CAPACITY_STEP) * _CAPACITY_STEP

    def _policy(self) -> KVFillPolicy:
        if self.key[0] == "speculative":
            _, draft, num_drafts = self.key[:3]
            return SelfSpeculative(draft, num_drafts)
        groups = []
        for request, lane_rows, _ in self._by_request():
            rows = torch.zeros(len(self.rows), dtype=torch.bool)
            rows[lane_rows] = True
            params = request.params
            policy = params.exit_policy if params.early_exit else None
            groups.append((policy, rows, params.exit_max_probs))
        return KVRecompute.per_row(groups, sorted(self.engine.exits))


def _rows_of(emitted: Emitted, lane_rows, prompt_rows, num_prompts: int) -> Emitted:
    """A request's ``[num_prompts, t]`` share of a lane step (rows not in the lane: zeros)."""
    index = torch.tensor(lane_rows)
    target = torch.tensor(prompt_rows)

    def scatter(x: torch.Tensor | None, fill=0) -> torch.Tensor | None:
        if x is None:
            return None
        out = torch.full((num_prompts, *x.shape[1:]), fill, dtype=x.dtype)
        out[target] = x[index]
        return out

    return Emitted(
        scatter(emitted.tokens), scatter(emitted.logprobs), scatter(emitted.exit_depths),
        scatter(emitted.top_ids), scatter(emitted.top_logprobs),
        {d: scatter(p, float("nan")) for d, p in emitted.exit_max_probs.items()},
    )  # fmt: skip


def _merged_cache(engine: Engine, parts, length: int, capacity: int) -> KVCache:
    """One complete cache holding rows ``keep`` of each part's (complete) cache, right-aligned.

    Each part's content occupies slots ``[min pad, length)`` of its rows; the merged ``length``
    is the widest content, and each part's rows move by ``length - part length`` slots (more
    padding on the left, or less)."""
    pads = torch.cat([lane.cache.pad_lengths[keep] + (length - lane.cache.length)
                      for lane, keep in parts])  # fmt: skip
    merged = engine.new_cache(pads, capacity)
    layer_numbers = sorted({n for lane, _ in parts for n in lane.cache.kv.buffers})
    for layer_number in layer_numbers:
        like = next(lane.cache.kv.buffers[layer_number][0]
                    for lane, _ in parts if layer_number in lane.cache.kv.buffers)  # fmt: skip
        keys, values = merged.kv.slot(layer_number, len(pads), like.shape[1], like.shape[3], like)
        row = 0
        for lane, keep in parts:
            source = lane.cache.kv.buffers.get(layer_number)
            if source is not None:
                first = max(0, lane.cache.length - length)  # source slots [first, length_c)
                to = first + length - lane.cache.length
                rows = torch.tensor(keep, device=like.device)
                end = lane.cache.length
                keys[row : row + len(keep), :, to:length] = source[0][rows, :, first:end]
                values[row : row + len(keep), :, to:length] = source[1][rows, :, first:end]
            row += len(keep)
    merged.complete_length = length
    return merged


class Scheduler:
    """The lanes and the waiting requests, without a thread: :meth:`run_once` admits what fits
    and runs one step of every lane (the :class:`ContinuousBatcher` thread's loop body; tests
    drive it directly to join requests at chosen steps)."""

    def __init__(self, model, max_rows: int = 64) -> None:
        config = model.config
        if config.pipeline_model_parallel_size > 1 or config.tensor_model_parallel_size > 1:
            raise ValueError("continuous batching runs one process (TP=PP=1)")
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.model = model.eval()
        self.max_rows = max_rows
        self.exit_depths = tuple(sorted(e.depth for e in model.config.exit_heads))
        self.engine = Engine(self.model)
        """One engine for every request: its lean copies of the weights are checked against the
        parameters once, here (the weights of a model being served do not change; a new
        ``Scheduler`` sees new weights)."""
        self.waiting: deque[BatchRequest] = deque()
        self.lanes: list[Lane] = []
        self.num_steps = 0
        """Lane steps run so far."""
        self.num_row_steps = 0
        """Rows decoded over those steps (``num_row_steps / num_steps``: the mean batch)."""
        self.num_joins = 0

    def new_request(
        self,
        prompts: Sequence[Sequence[int]],
        params: GenerationParams,
        time_limit_s: float | None = None,
        cancelled: threading.Event | None = None,
        stream: bool = True,
    ) -> BatchRequest:
        """A checked request (ValueError naming the problem), not queued yet."""
        check_layout(self.model, params)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("need at least one prompt, and every prompt needs at least one token")
        deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
        return BatchRequest(prompts, params, deadline, cancelled, stream)

    @property
    def num_running(self) -> int:
        """Rows decoding now."""
        return sum(len(lane.rows) for lane in self.lanes)

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.lanes)

    @torch.inference_mode()
    def run_once(self) -> None:
        """Admit the waiting requests that fit, then one step of every lane."""
        self._admit()
        for lane in list(self.lanes):
            self._step(lane)
        self.lanes = [lane for lane in self.lanes if lane.rows]

    def _admit(self) -> None:
        self._drop_stopped_waiting()
        while self.waiting:
            request = self.waiting[0]
            running = self.num_running
            if running and running + len(request.prompts) > self.max_rows:
                return
            self.waiting.popleft()
            try:
                key = lane_key(request.params, self.exit_depths)
                lane = next((ln for ln in self.lanes if ln.key == key), None)
                if lane is None:
                    lane = Lane(key)
                    self.lanes.append(lane)
                self.num_joins += 1
                lane.join(self.engine, request)
            except Exception as error:  # noqa: BLE001 - this request's error, reported to it
                logger.exception("prefill failed")
                request.finish(error)

    def _drop_stopped_waiting(self) -> None:
        now = time.monotonic()
        for request in list(self.waiting):
            reason = request.stop_reason(now)
            if reason is not None:
                self.waiting.remove(request)
                request.finish(reason)

    def _step(self, lane: Lane) -> None:
        now = time.monotonic()
        for request in lane.requests:
            reason = request.stop_reason(now)
            if reason is not None:
                request.finish(reason)
        lane.drop_finished()
        if not lane.rows:
            return
        try:
            self.num_row_steps += len(lane.rows)
            lane.step()
            self.num_steps += 1
        except Exception as error:  # noqa: BLE001 - every request of the lane gets it
            logger.exception("decode step failed")
            for request in lane.requests:
                request.finish(error)
        lane.drop_finished()


class ContinuousBatcher:
    """Runs submitted requests in continuous batches on its own thread (see module docstring).

    Args:
        model: an EarlyExitGPTModel with TP=PP=1.
        max_rows: rows (prompts) decoding at once; a request waits while admitting it would pass
            this, unless nothing runs (a request with more prompts runs alone).
    """

    def __init__(self, model, max_rows: int = 64) -> None:
        self.scheduler = Scheduler(model, max_rows)
        self._incoming: deque[BatchRequest] = deque()
        self._calls: deque[tuple[Callable, Future]] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="continuous-batching", daemon=True)
        self._thread.start()

    def submit(
        self,
        prompts: Sequence[Sequence[int]],
        params: GenerationParams,
        time_limit_s: float | None = None,
        cancelled: threading.Event | None = None,
        stream: bool = True,
    ) -> BatchRequest:
        """Queue a request (ValueError naming a problem); its updates arrive on the returned
        :class:`BatchRequest` (only the final one unless ``stream``); setting ``cancelled`` (if
        given) cancels it."""
        request = self.scheduler.new_request(prompts, params, time_limit_s, cancelled, stream)
        with self._condition:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._incoming.append(request)
            self._condition.notify()
        return request

    def call(self, fn: Callable[[], object]) -> object:
        """Run ``fn()`` on the batching thread between two steps; returns its value."""
        future: Future = Future()
        with self._condition:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._calls.append((fn, future))
            self._condition.notify()
        return future.result()

    def close(self) -> None:
        """Finish the running and waiting requests, then stop the thread (idempotent)."""
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join()

    @property
    def num_steps(self) -> int:
        return self.scheduler.num_steps

    def statistics(self) -> dict:
        """Requests admitted, decode steps and the mean rows per step so far."""
        scheduler = self.scheduler
        return {
            "requests_admitted": scheduler.num_joins,
            "decode_steps": scheduler.num_steps,
            "mean_rows_per_step": scheduler.num_row_steps / max(scheduler.num_steps, 1),
        }

    def _run(self) -> None:
        scheduler = self.scheduler
        while True:
            with self._condition:
                while not (self._incoming or self._calls or not scheduler.idle or self._closed):
                    self._condition.wait()
                scheduler.waiting.extend(self._incoming)
                self._incoming.clear()
                calls, self._calls = list(self._calls), deque()
                if self._closed and scheduler.idle and not calls:
                    return
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as error:  # noqa: BLE001 - handed to the caller
                        future.set_exception(error)
            scheduler.run_once()
