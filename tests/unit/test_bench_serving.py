"""The serving benchmark's parts (``megatron/early_exit/bench/serving``): the seeded mix and its
request bodies (validated by the server's own protocol), percentiles, ratios, cross-talk on
synthetic answers, rows and table; then the clients against a real uvicorn app over a fake
generator: an honest server shows no cross-talk, a leaky one does."""

from __future__ import annotations

import itertools
import random
import time

import numpy as np
import pytest

from megatron.early_exit.bench.serving import cli, report
from megatron.early_exit.bench.serving.load import LoadResult, Outcome, run_clients, send_alone
from megatron.early_exit.bench.serving.metrics import cross_talk, paired_ratio, percentile
from megatron.early_exit.bench.serving.server import server_command
from megatron.early_exit.bench.serving.workload import (
    KINDS,
    ServingRequest,
    answer_of_chunks,
    answer_of_json,
    build_mix,
    check_fit,
    distinct,
    prompts_of,
)
from megatron.early_exit.server.protocol import parse_completion_request, parse_generate_request
from tests.live_server import live_server

PROMPTS = prompts_of([2, 5], 2)
THRESHOLDS = (None, 0.8)


def mix_of(seed: int, clients: int = 3, per_client: int = 4) -> list[list[ServingRequest]]:
    return build_mix(seed, clients, per_client, PROMPTS, (4, 8), THRESHOLDS)


# --- the mix and the requests


def test_the_mix_is_a_function_of_the_seed():
    assert mix_of(0) == mix_of(0)
    assert mix_of(0) != mix_of(1)
    mix = mix_of(0, clients=8, per_client=25)
    assert [len(c) for c in mix] == [25] * 8
    flat = [r for c in mix for r in c]
    combos = {(r.kind, r.threshold) for r in flat}
    assert combos == set(itertools.product(KINDS, THRESHOLDS))
    counts = [sum((r.kind, r.threshold) == c for r in flat) for c in combos]
    assert max(counts) - min(counts) <= 1, "every combination equally represented"
    assert {r.prompt for r in flat} == set(PROMPTS) and {r.max_tokens for r in flat} == {4, 8}


def test_a_short_mix_still_has_every_combination():
    flat = [r for c in mix_of(5, clients=3, per_client=2) for r in c]
    assert {(r.kind, r.threshold) for r in flat} == set(itertools.product(KINDS, THRESHOLDS))


def test_bodies_are_greedy_and_valid_for_the_server():
    for kind, threshold in itertools.product(KINDS, THRESHOLDS):
        request = ServingRequest(kind, "The jury", 8, threshold)
        method, path = request.route()
        body = request.body()
        if kind == "api":
            assert (method, path) == ("PUT", "/api")
            parsed = parse_generate_request(body)
            assert parsed.temperature == 0 and parsed.tokens_to_generate == 8
            assert parsed.use_early_exit == (threshold is not None)
            if threshold is not None:
                assert parsed.early_exit_thres == threshold
        else:
            assert (method, path) == ("POST", "/v1/completions")
            parsed = parse_completion_request(body)
            assert parsed.temperature == 0 and parsed.max_tokens == 8
            assert parsed.stream == (kind == "stream")
            assert (parsed.early_exit is None) == (threshold is None)
            if threshold is not None:
                assert parsed.early_exit.enabled and parsed.early_exit.threshold == threshold


def test_prompts_and_fit():
    assert prompts_of([2], 2) == ["The committee", "She opened"]
    with pytest.raises(ValueError, match="word counts"):
        prompts_of([0], 1)
    requests = [ServingRequest("api", "a b", 8), ServingRequest("api", "a b c", 8)]
    assert check_fit(requests, {"a b": 3, "a b c": 5}, 13) == []
    (problem,) = check_fit(requests, {"a b": 3, "a b c": 6}, 13)
    assert "6 prompt tokens + 8 new tokens = 14 > 13" in problem


def test_answers_keep_what_must_not_change():
    request = ServingRequest("api", "x", 2)
    body = {"text": ["ab"], "segments": [["a", "b"]], "exit_layers": [[1, 4]], "request_time": 3}
    assert answer_of_json(request, body) == {
        "text": "ab", "pieces": ["a", "b"], "exit_layers": [1, 4], "finish_reason": None,
    }  # fmt: skip
    completion = {"id": "cmpl-1", "created": 5, "choices": [
        {"index": 0, "text": "ab", "finish_reason": "length", "exit_layers": [1, 4]}]}  # fmt: skip
    expected = {"text": "ab", "pieces": None, "exit_layers": [1, 4], "finish_reason": "length"}
    assert answer_of_json(ServingRequest("completion", "x", 2), completion) == expected
    chunks = [
        {"id": "c", "choices": [{"index": 0, "text": "", "exit_layers": [1]}]},
        {"id": "c", "choices": [{"index": 0, "text": "a", "exit_layers": [4]}]},
        {"id": "c", "choices": [{"index": 0, "text": "b", "finish_reason": "length",
                                 "exit_layers": []}]},
        {"id": "c", "choices": [], "usage": {"completion_tokens": 2}},
    ]  # fmt: skip
    assert answer_of_chunks(chunks) == expected


# --- arithmetic


def test_percentile_matches_numpy():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    rng = random.Random(0)
    for n in (2, 7, 100):
        values = [rng.random() for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_paired_ratio_is_the_median_of_per_round_ratios():
    rounds = [{"continuous": 6, "serial": 2}, {"continuous": 9, "serial": 3},
              {"continuous": 8, "serial": 2}]  # fmt: skip
    assert paired_ratio(rounds, "continuous", "serial") == 3.0
    rounds.append({"continuous": 1.0})  # a round without the baseline is left out
    rounds.append({"continuous": None, "serial": 2})
    assert paired_ratio(rounds, "continuous", "serial") == 3.0
    assert paired_ratio([{"serial": 2}], "continuous", "serial") is None


def _answer(text: str, layers=(4, 4)) -> dict:
    return {"text": text, "pieces": None, "exit_layers": list(layers), "finish_reason": "length"}


def test_cross_talk_counts_answers_that_differ_from_the_request_alone():
    a, b = ServingRequest("completion", "a", 2), ServingRequest("stream", "b", 2)
    references = {a: _answer("xx"), b: _answer("yy")}
    equal = [(a, _answer("xx")), (b, _answer("yy")), (a, _answer("xx"))]
    assert cross_talk(equal, references) == ([], 0)
    swapped = [(a, _answer("yy")), (b, _answer("xx")), (a, _answer("xx"))]
    mismatches, unchecked = cross_talk(swapped, references)
    assert [m.request for m in mismatches] == [a, b] and unchecked == 0
    assert mismatches[0].fields == ("text",) and "'yy' vs alone 'xx'" in mismatches[0].describe()
    exits_only = [(a, _answer("xx", (1, 4)))]
    assert cross_talk(exits_only, references)[0][0].fields == ("exit_layers",)
    unknown = ServingRequest("api", "c", 2)
    assert cross_talk([(unknown, _answer("zz"))], references) == ([], 1)


def _result(answers, wall: float, errors: int = 0) -> LoadResult:
    result = LoadResult(wall_s=wall)
    for i, (request, answer) in enumerate(answers):
        result.outcomes.append(Outcome(0, request, 0.1 * i, 0.1 * (i + 1), answer, None))
    for _ in range(errors):
        result.outcomes.append(Outcome(1, answers[0][0], 0.0, 0.0, None, "HTTP 503: busy"))
    return result


def test_rows_summary_and_table():
    a, b = ServingRequest("api", "a", 2), ServingRequest("completion", "b", 2)
    references = {a: _answer("xx"), b: _answer("yy")}
    rows = []
    for round_index, (serial_wall, continuous_wall) in enumerate([(2.0, 0.5), (3.0, 1.5)]):
        for mode, wall in (("serial", serial_wall), ("continuous", continuous_wall)):
            load = _result([(a, _answer("xx")), (b, _answer("yy" if mode == "serial" else "xx"))],
                           wall, errors=int(mode == "continuous"))  # fmt: skip
            alone = _result([(a, _answer("xx")), (b, _answer("yy"))], 1.0)
            rows.append(report.build_row(mode, round_index, load, alone, references,
                                         server={"server_cpu_seconds": 1.0}))  # fmt: skip
    serial, continuous = rows[0], rows[1]
    assert serial["requests_per_second"] == 1.0 and serial["generated_tokens"] == 4
    assert serial["latency_p50_s"] == pytest.approx(0.15) and serial["cross_talk"] == 0
    assert continuous["errors"] == 1
    assert continuous["error_messages"] == ["api/full/1w/2t: HTTP 503: busy"]
    assert continuous["cross_talk"] == 1 and continuous["cross_talk_fields"] == {"text": 1}
    summary = report.summarize(rows, ["serial", "continuous"], "serial")
    assert summary["continuous"]["ratio_vs_serial"] == pytest.approx((4.0 + 2.0) / 2)
    assert summary["continuous"]["errors"] == 2 and summary["continuous"]["cross_talk"] == 2
    assert summary["serial"]["ratio_vs_serial"] == 1.0
    table = report.format_table(summary, "serial").splitlines()
    assert table[0].split()[:2] == ["mode", "req/s"] and table[2].startswith("continuous")


def test_server_command_passes_the_mode_as_batching():
    default = server_command("ckpt", 5001, "default")
    assert "--batching" not in default and default[-4:] == ["--host", "127.0.0.1", "--port", "5001"]
    serial = server_command("ckpt", 5001, "serial", "--max-queued-requests 64")
    assert serial[-4:] == ["--batching", "serial", "--max-queued-requests", "64"]


def test_flags():
    args = cli.parse_args(["--load", "ckpt"])
    assert (args.clients, args.requests_per_client, args.modes) == (8, 25, ["serial", "continuous"])
    mix, warmup = cli.mixes(args)
    assert len(mix) == 8 and {(r.kind, r.threshold) for c in warmup for r in c} == set(
        itertools.product(KINDS, (None, 0.8))
    )
    for bad in (["--clients", "0"], ["--thresholds", "2"], ["--modes", "fast"],
                ["--prompt-words", "40"], ["--deadline", "0"]):  # fmt: skip
        with pytest.raises(SystemExit):
            cli.parse_args(["--load", "ckpt", *bad])


# --- the clients against a real app over a fake generator


def _fake_service(script=None):
    from megatron.early_exit.server.service import GenerationService
    from tests.fake_generator import FakeGenerator

    kwargs = {"script": script} if script else {}
    fake = FakeGenerator(num_layers=4, exit_depths=(1, 3), max_sequence_length=128, **kwargs)
    return GenerationService(fake, model_name="fake")


def _measure(url: str, mix) -> dict:
    deadline = time.perf_counter() + 60
    load = run_clients(url, mix, timeout_s=30, deadline=deadline)
    references, alone = send_alone(url, distinct(o.request for o in load.answered), 30, deadline)
    return report.build_row("default", 0, load, alone, references)


def test_clients_against_an_honest_and_a_leaky_server():
    mix = mix_of(0, clients=3, per_client=4)
    with live_server(_fake_service()) as (url, _):
        row = _measure(url, mix)
    assert (row["answered"], row["errors_total"], row["cross_talk"], row["unchecked"]) == (
        12, 0, 0, 0)  # fmt: skip
    assert row["requests_per_second"] > 0 and row["latency_p99_s"] >= row["latency_p50_s"]
    assert row["distinct_requests"] == len(distinct(r for c in mix for r in c))

    # A server whose answer depends on the requests served before it: cross-talk. (It leaks
    # the request count, which the alone pass after the load never repeats; leaking the
    # previous prompt would go unseen whenever the load happened to be served in the alone
    # pass's order, as on a slow machine.)
    seen = []

    def leaky(prompt: str) -> str:
        seen.append(prompt)
        return f"{len(seen) - 1} requests before {prompt}"  # the count within max_tokens

    with live_server(_fake_service(leaky)) as (url, _):
        row = _measure(url, mix)
    assert row["errors_total"] == 0 and row["cross_talk"] > 0, row
    assert row["cross_talk_examples"] and row["cross_talk_fields"].get("text")
