"""Continuous batching (``inference/batching.py``): rows join and leave one running batch.

Oracle: each request decoded alone by ``generate``. Requests with different methods, exits,
thresholds, sampling settings, stop conditions and lengths join a running batch at chosen steps
(``Scheduler.run_once`` driven directly), and every one must get exactly its alone result:
tokens, exit depths, finish reason, log-probs (1e-5), alternatives and exit max-probs. Then the
threaded ``ContinuousBatcher``: cancellation, time limits, a failing request beside good ones,
``call`` between steps. One spawn of one rank.
"""

from __future__ import annotations

import pytest

from tests.distributed.harness import run_distributed
from tests.distributed.test_decoder import _build
from tests.distributed.test_generation import THRESHOLD, _params, _prompts

FAMILIES = ("gpt", "llama")
LOGPROB_TOL = 5e-5
"""fp32: a row's logits differ from the alone run's by the rounding of other matrix shapes
(~1e-6 relative); a tempered, top-p renormalised log-prob amplifies that to ~3e-5."""


def _schedule():
    """``(name, prompts, params, join step)``: a mix of every per-row setting."""
    return [
        ("full", _prompts(1, 1), _params(early_exit=False, max_new_tokens=10), 0),
        ("recompute", _prompts(2, 2), _params(threshold=THRESHOLD, max_new_tokens=8), 0),
        ("low_threshold", _prompts(3, 1, 6, 12),
         _params(threshold=0.25, top_logprobs=3, exit_max_probs=True, max_new_tokens=9), 2),
        ("deepest_only", _prompts(4, 2), _params(threshold=0.2, depths=[2], max_new_tokens=7), 3),
        ("sampled_full", _prompts(5, 2),
         _params(early_exit=False, temperature=0.9, top_k=6, seed=5, max_new_tokens=8), 1),
        ("sampled_exit", _prompts(6, 1),
         _params(threshold=THRESHOLD, temperature=0.7, top_p=0.9, seed=9, max_new_tokens=6), 4),
        ("eos", _prompts(7, 2), _params(early_exit=False, eos_token_ids=(5, 9, 17, 23)), 5),
        ("one_token", _prompts(8, 1), _params(threshold=THRESHOLD, max_new_tokens=1), 5),
        ("max_probs_full", _prompts(9, 1),
         _params(early_exit=False, exit_max_probs=True, max_new_tokens=5), 6),
        ("speculative", _prompts(10, 2), _params(method="speculative", max_new_tokens=11), 0),
        ("speculative_late", _prompts(11, 1, 10, 14),
         _params(method="speculative", max_new_tokens=6), 3),
        ("speculative_k2", _prompts(12, 1), _params(method="speculative", num_draft_tokens=2), 2),
    ]  # fmt: skip


def _compare(got, want) -> dict:
    out = {
        "tokens": [r.tokens for r in got] == [r.tokens for r in want],
        "depths": [r.exit_depths for r in got] == [r.exit_depths for r in want],
        "finish": [r.finish_reason for r in got] == [r.finish_reason for r in want],
        "top_ids": [[[t for t, _ in a] for a in r.top_logprobs or []] for r in got]
        == [[[t for t, _ in a] for a in r.top_logprobs or []] for r in want],
        "max_prob_keys": [[sorted(p) for p in r.exit_max_probs or []] for r in got]
        == [[sorted(p) for p in r.exit_max_probs or []] for r in want],
    }
    worst = 0.0
    for g, w in zip(got, want):
        worst = max([worst, *(abs(a - b) for a, b in zip(g.logprobs, w.logprobs))])
        for a, b in zip(g.exit_max_probs or [], w.exit_max_probs or []):
            worst = max([worst, *(abs(a[d] - b[d]) for d in a if d in b)])
    out["logprob_error"] = worst
    return out


def _drain(request):
    updates = list(request)
    results = updates[-1].results
    joined = [[t for u in updates[:-1] for t in u.tokens[row]] for row in range(len(results))]
    return results, joined == [r.tokens for r in results]


def _scheduled_checks(model) -> dict:
    from megatron.early_exit.inference.batching import Scheduler
    from megatron.early_exit.inference.generate import generate

    scheduler = Scheduler(model)
    schedule = _schedule()
    requests = {}
    step = 0
    most_rows = 0
    while step == 0 or not scheduler.idle:
        for name, prompts, params, join in schedule:
            if join == step:
                requests[name] = scheduler.new_request(prompts, params)
                scheduler.waiting.append(requests[name])
        scheduler.run_once()
        most_rows = max(most_rows, scheduler.num_running)
        step += 1
    out = {"most_rows": most_rows, "lanes_left": len(scheduler.lanes)}
    for name, prompts, params, _ in schedule:
        results, streamed = _drain(requests[name])
        out[name] = {**_compare(results, generate(model, prompts, params)), "streamed": streamed}
    return out


def _limit_checks(model) -> dict:
    """``max_rows`` makes requests wait; a request over the limit runs alone."""
    from megatron.early_exit.inference.batching import Scheduler
    from megatron.early_exit.inference.generate import generate

    scheduler = Scheduler(model, max_rows=2)
    big = scheduler.new_request(_prompts(20, 3), _params(early_exit=False, max_new_tokens=4))
    small = scheduler.new_request(_prompts(21, 1), _params(threshold=THRESHOLD))
    scheduler.waiting.extend([big, small])
    rows_seen = []
    while not scheduler.idle:
        scheduler.run_once()
        rows_seen.append(scheduler.num_running)
    big_results, _ = _drain(big)
    small_results, _ = _drain(small)
    return {
        "rows_seen": rows_seen,
        "big": [r.tokens for r in big_results]
        == [r.tokens for r in generate(model, _prompts(20, 3), big.params)],
        "small": [r.tokens for r in small_results]
        == [r.tokens for r in generate(model, _prompts(21, 1), small.params)],
    }


def _threaded_checks(model) -> dict:
    import threading
    import time

    from megatron.early_exit.inference.batching import (
        ContinuousBatcher,
        RequestCancelled,
        TimeLimitExceeded,
    )
    from megatron.early_exit.inference.generate import generate

    out = {}
    batcher = ContinuousBatcher(model)
    try:
        long_params = _params(early_exit=False, max_new_tokens=100)
        running = batcher.submit(_prompts(30, 1), long_params)
        timed = batcher.submit(_prompts(31, 1), long_params, time_limit_s=0.0)
        good = batcher.submit(_prompts(32, 2), _params(threshold=THRESHOLD))
        too_long = _params(early_exit=False, max_new_tokens=120)
        failing = batcher.submit([[1] * 20], too_long)  # past the 128 positions
        next(iter(running))  # it has started
        running.cancel()
        for name, request, error in (
            ("cancelled", running, RequestCancelled),
            ("timed_out", timed, TimeLimitExceeded),
            ("failing", failing, ValueError),
        ):
            try:
                list(request)
                out[name] = "finished"
            except error as raised:
                out[name] = type(raised).__name__ + ": " + str(raised)
        results, _ = _drain(good)
        want = generate(model, _prompts(32, 2), _params(threshold=THRESHOLD))
        out["good"] = [r.tokens for r in results] == [r.tokens for r in want]
        out["call"] = batcher.call(lambda: "ran on " + threading.current_thread().name)
        steps = batcher.num_steps
        time.sleep(0.2)
        out["idle_steps"] = batcher.num_steps - steps  # nothing runs when nothing is queued
        try:
            batcher.submit([[]], _params())
            out["empty_prompt"] = "accepted"
        except ValueError as error:
            out["empty_prompt"] = str(error)
    finally:
        batcher.close()
    out["closed_thread"] = not batcher._thread.is_alive()
    return out


def batching_worker(rank: int, world_size: int) -> dict:
    out = {}
    for family in FAMILIES:
        model = _build(family)
        out[family] = {"scheduled": _scheduled_checks(model), "limit": _limit_checks(model)}
        if family == "gpt":  # learned positions: a request can run past the context
            out["threaded"] = _threaded_checks(model)
    return out


@pytest.fixture(scope="module")
def results() -> dict:
    return run_distributed(batching_worker, 1)[0]


@pytest.mark.parametrize("name", [entry[0] for entry in _schedule()])
@pytest.mark.parametrize("family", FAMILIES)
def test_joined_rows_decode_as_alone(results, family, name):
    checks = results[family]["scheduled"][name]
    assert checks.pop("logprob_error") < LOGPROB_TOL
    assert checks == dict.fromkeys(checks, True)


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_share_a_batch_and_leave_it(results, family):
    scheduled = results[family]["scheduled"]
    assert scheduled["most_rows"] >= 8  # requests really ran together
    assert scheduled["lanes_left"] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_max_rows_makes_requests_wait(results, family):
    limit = results[family]["limit"]
    assert limit["big"] and limit["small"]
    # the 3-prompt request runs alone (over the limit, nothing else running), then the other
    assert limit["rows_seen"][0] == 3 and 1 in limit["rows_seen"] and max(limit["rows_seen"]) == 3


def test_cancel_time_limit_and_errors(results):
    threaded = results["threaded"]
    assert threaded["cancelled"].startswith("RequestCancelled")
    assert threaded["timed_out"].startswith("TimeLimitExceeded")
    assert threaded["failing"].startswith("ValueError") and "context" in threaded["failing"]
    assert threaded["good"]
    assert threaded["call"] == "ran on continuous-batching"
    assert threaded["idle_steps"] == 0
    assert "at least one token" in threaded["empty_prompt"]
    assert threaded["closed_thread"]
