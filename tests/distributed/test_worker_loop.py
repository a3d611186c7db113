"""Multi-rank serving over 2 gloo ranks: rank 0 broadcasts commands, rank 1 runs ``worker_loop``.

One spawn runs every check. Each rank wraps a ``FakeGenerator`` in a recorder of (method, params)
calls; the oracle is that both ranks record the identical sequence, in order, and that ``STOP``
ends the loop. The concurrent phase drives a ``GenerationService`` on rank 0 from several threads:
if requests were not serialised, broadcasts would interleave and the sequences (or the gloo
collectives) would break.
"""

from __future__ import annotations

import threading

import pytest

from tests.distributed.harness import run_distributed

NUM_THREADS = 6


class Recorder:
    """A generator that records each call, then delegates to a ``FakeGenerator``."""

    def __init__(self, fake) -> None:
        self.fake = fake
        self.tokenizer = fake.tokenizer
        self.num_layers = fake.num_layers
        self.exit_depths = fake.exit_depths
        self.max_sequence_length = fake.max_sequence_length
        self.decoding_methods = fake.decoding_methods
        self.calls: list = []
        self.texts: list = []

    def generate(self, params):
        self.calls.append(("generate", params))
        results = self.fake.generate(params)
        self.texts.append([result.text for result in results])
        return results

    def stream(self, params):
        self.calls.append(("stream", params))
        items = list(self.fake.stream(params))
        self.texts.append([item.text for item in items if not hasattr(item, "token_id")])
        return iter(items)


def _direct_phase(generator, group) -> dict:
    """Rank 0 calls the broadcasting wrapper directly; returns what it produced."""
    from megatron.early_exit.inference.decide import ExitPolicy
    from megatron.early_exit.server.protocol import GenerationRequest
    from megatron.early_exit.server.worker_loop import BroadcastingGenerator

    broadcasting = BroadcastingGenerator(generator, group)
    first = GenerationRequest(prompts=("abc", "de"), max_new_tokens=5, random_seed=1)
    second = GenerationRequest(
        prompts=("xyz",),
        max_new_tokens=7,
        stop_strings=("y",),
        early_exit=ExitPolicy(threshold=0.0, depths=[4]),
    )
    texts = [result.text for result in broadcasting.generate(first)]
    streamed = list(broadcasting.stream(second))
    broadcasting.generate(GenerationRequest(prompts=("q",), max_new_tokens=0))
    broadcasting.stop()
    broadcasting.stop()  # idempotent: no second STOP reaches the workers
    return {"texts": texts, "num_streamed": len(streamed)}


def _serve_concurrently(service) -> dict:
    """Rank 0's server stand-in: the service hit by several threads, one failing request."""
    from megatron.early_exit.server.protocol import (
        params_from_generate,
        parse_completion_request,
        parse_generate_request,
    )
    from megatron.early_exit.server.service import GenerationError

    answers: dict = {}

    def client(index: int) -> None:
        if index % 2:
            request = parse_completion_request(
                {"prompt": f"p{index}", "max_tokens": 6, "stream": True}
            )
            answers[index] = "".join(
                c.choices[0].text for c in service.stream_completion(request) if c.choices
            )
        else:
            request = parse_generate_request({"prompts": f"p{index}", "tokens_to_generate": 6})
            answers[index] = service.generate(request).text[0]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(NUM_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        service.generate(parse_generate_request({"prompts": "BOOM", "tokens_to_generate": 2}))
        failed = False
    except GenerationError:
        failed = True
    after = service.generate(parse_generate_request({"prompts": "ok", "tokens_to_generate": 3}))
    # Left in the queue when serving ends: run_ranks must finish it before broadcasting STOP.
    request = parse_generate_request({"prompts": "late", "tokens_to_generate": 3})
    service.submit(params_from_generate(request))
    return {"answers": answers, "failure_reported": failed, "after_failure": after.text[0]}


def worker_loop_worker(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from megatron.early_exit.server.worker_loop import run_ranks, worker_loop
    from tests.fake_generator import FakeGenerator

    dist.init_process_group("gloo")
    out: dict = {"rank": rank}

    # Phase 1: the world group, BroadcastingGenerator driven by hand.
    recorder = Recorder(FakeGenerator())
    if rank == 0:
        out["direct"] = _direct_phase(recorder, None)
    else:
        out["direct"] = {"num_commands": worker_loop(recorder, None)}
    out["direct_calls"], out["direct_texts"] = recorder.calls, recorder.texts

    # Phase 2: a separate group, run_ranks, a service with concurrent clients and a failure.
    group = dist.new_group([0, 1])
    recorder = Recorder(FakeGenerator(delay_s=0.002, fail_on="BOOM"))
    out["served"] = run_ranks(recorder, _serve_concurrently, group)
    out["served_calls"], out["served_texts"] = recorder.calls, recorder.texts
    out["max_active"] = recorder.fake.max_active
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_distributed(worker_loop_worker, 2, timeout_s=180)


def test_direct_commands_reach_the_worker_in_order(ranks):
    leader, worker = ranks
    kinds = [kind for kind, _ in leader["direct_calls"]]
    assert kinds == ["generate", "stream", "generate"]
    assert worker["direct_calls"] == leader["direct_calls"]
    assert worker["direct_texts"] == leader["direct_texts"]
    assert worker["direct"] == {"num_commands": 3}  # STOP ended the loop, once
    assert leader["direct"]["texts"] == [" [cba", " [ed]"]
    assert leader["direct_texts"][1] == [" [z"]


def test_concurrent_requests_are_broadcast_one_at_a_time(ranks):
    leader, worker = ranks
    calls = leader["served_calls"]
    assert len(calls) == NUM_THREADS + 3
    assert worker["served_calls"] == calls  # same params (seeds included), same order
    assert worker["served_texts"] == leader["served_texts"]
    assert leader["max_active"] == worker["max_active"] == 1
    seeds = [params.random_seed for _, params in calls]
    assert all(isinstance(seed, int) for seed in seeds)
    assert sorted(kind for kind, _ in calls).count("stream") == NUM_THREADS // 2
    assert worker["served"] == NUM_THREADS + 3


def test_service_answers_and_survives_a_failure(ranks):
    served = ranks[0]["served"]
    for index, text in served["answers"].items():
        script = f" [{f'p{index}'[::-1]}]"
        assert text == (script * 2)[:6], index
    assert sorted(served["answers"]) == list(range(NUM_THREADS))
    assert served["failure_reported"] is True
    assert served["after_failure"] == " [k"
