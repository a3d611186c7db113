"""Generation server: service layer, HTTP routes, streaming, errors, concurrency, client tools.

In-process checks use FastAPI's TestClient; streaming framing, concurrency and the client tools
run against one real uvicorn server on 127.0.0.1 (a free port) in a background thread. The engine
is ``FakeGenerator``: its continuation of a prompt is `` [<prompt reversed>]`` repeated, and with
threshold 0 every token takes the first allowed exit.
"""

from __future__ import annotations

import io
import json
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from megatron.early_exit.launch import free_port
from megatron.early_exit.server import client as request_client
from megatron.early_exit.server import interactive as text_generation_cli
from megatron.early_exit.server.app import create_app
from megatron.early_exit.server.generator import (
    PromptCompletion,
    TokenEvent,
    results_from_stream,
    stream_from_results,
)
from megatron.early_exit.server.protocol import (
    GenerationRequest,
    ServerLimits,
    parse_completion_request,
)
from megatron.early_exit.server.service import GenerationService
from megatron.early_exit.server.text import stop_holdback
from tests.fake_generator import FakeGenerator
from tests.live_server import live_server as serving

LIMITS = ServerLimits(max_prompts=4, max_prompt_tokens=64, max_tokens_to_generate=64)
NUM_LAYERS = 8
EXITS = (2, 4, 6)
MAX_SEQUENCE = 80


def expected_text(prompt: str, num_tokens: int) -> str:
    """FakeGenerator's continuation of an ASCII prompt (one byte, one token)."""
    script = f" [{prompt[::-1]}]"
    return (script * (num_tokens // len(script) + 1))[:num_tokens]


def make_service(**fake_kwargs) -> tuple[GenerationService, FakeGenerator]:
    fake_kwargs.setdefault("max_sequence_length", MAX_SEQUENCE)
    fake_kwargs.setdefault("decoding_methods", ("auto", "recompute", "speculative"))
    fake = FakeGenerator(num_layers=NUM_LAYERS, exit_depths=EXITS, **fake_kwargs)
    return GenerationService(fake, LIMITS, model_name="fake-ee"), fake


@pytest.fixture
def app_client():
    service, fake = make_service(fail_on="BOOM")
    with TestClient(create_app(service)) as client:
        yield client, fake
    service.close()


def sse_events(text: str) -> list[str]:
    """Payloads of a server-sent event body; asserts the ``data: ...\\n\\n`` framing."""
    assert text.endswith("\n\n"), text[-50:]
    blocks = text[:-2].split("\n\n")
    assert all(block.startswith("data: ") for block in blocks), blocks
    return [block[len("data: ") :] for block in blocks]


def assemble(payloads: list[str]) -> tuple[dict[int, str], dict[int, list[int]], list[dict]]:
    """Text and exit layers per choice index from chunk payloads (``[DONE]`` must be last)."""
    assert payloads[-1] == "[DONE]"
    texts: dict[int, str] = {}
    layers: dict[int, list[int]] = {}
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            layers.setdefault(choice["index"], []).extend(choice.get("exit_layers") or [])
    return texts, layers, chunks


# ------------------------------------------------------------------------------- PUT /api


def test_api_generates_with_exit_layers(app_client):
    client, fake = app_client
    body = {
        "prompts": ["abc", "hello"],
        "tokens_to_generate": 7,
        "use_early_exit": True,
        "early_exit_thres": 0.0,
    }
    response = client.put("/api", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["text"] == [expected_text("abc", 7), expected_text("hello", 7)]
    assert answer["segments"][0] == list(expected_text("abc", 7))
    assert answer["exit_layers"] == [[2] * 7, [2] * 7]
    assert answer["logprobs"] is None
    assert answer["request_time"] > 0
    params = fake.calls[-1]
    assert params.early_exit.threshold == 0.0 and params.random_seed == 1234


def test_api_early_exit_settings_reach_the_generator(app_client):
    client, _ = app_client
    off = client.put("/api", json={"prompts": "abc", "tokens_to_generate": 5}).json()
    assert off["exit_layers"] == [[NUM_LAYERS] * 5]
    body = {
        "prompts": "abc",
        "tokens_to_generate": 5,
        "use_early_exit": True,
        "early_exit_thres": 0,
        "exit_layers": [4],
    }
    assert client.put("/api", json=body).json()["exit_layers"] == [[4] * 5]
    body.update(early_exit_thres=1.0, exit_layers=None)
    assert client.put("/api", json=body).json()["exit_layers"] == [[NUM_LAYERS] * 5]
    body.update(use_early_exit=False, early_exit_thres=0)  # false means off (original: on)
    assert client.put("/api", json=body).json()["exit_layers"] == [[NUM_LAYERS] * 5]


def test_api_echo_logprobs_and_stop_sequences(app_client):
    client, _ = app_client
    body = {
        "prompts": "abc",
        "tokens_to_generate": 12,
        "echo_prompts": True,
        "logprobs": True,
        "stop_sequences": ["ba]"],
    }
    answer = client.put("/api", json=body).json()
    # " [cba] [cba]": the stop string "ba]" starts at index 4; its last token is kept.
    assert answer["text"] == ["abc [c"]
    assert answer["segments"] == [list("abc") + list(" [cba]")]
    assert len(answer["logprobs"][0]) == len(answer["exit_layers"][0]) == 6
    assert all(lp <= 0 for lp in answer["logprobs"][0])


def test_random_seed_is_chosen_when_absent(app_client):
    client, fake = app_client
    client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2})
    assert isinstance(fake.calls[-1].random_seed, int)


# ------------------------------------------------------------------------ /v1/completions


def test_completions_non_streaming(app_client):
    client, _ = app_client
    body = {
        "prompt": ["abc", "xy"],
        "max_tokens": 9,
        "temperature": 0,
        "early_exit": {"threshold": 0.0, "exit_layers": [6]},
        "logprobs": 0,
    }
    answer = client.post("/v1/completions", json=body).json()
    assert answer["object"] == "text_completion" and answer["model"] == "fake-ee"
    assert answer["id"].startswith("cmpl-")
    assert [c["text"] for c in answer["choices"]] == [
        expected_text("abc", 9),
        expected_text("xy", 9),
    ]
    assert [c["finish_reason"] for c in answer["choices"]] == ["length", "length"]
    assert answer["choices"][0]["exit_layers"] == [6] * 9
    logprobs = answer["choices"][0]["logprobs"]
    assert logprobs["tokens"] == list(expected_text("abc", 9))
    assert logprobs["text_offset"] == list(range(9))
    assert answer["usage"] == {"prompt_tokens": 5, "completion_tokens": 18, "total_tokens": 23}


STREAM_CASES = {
    "plain": {"prompt": "abc", "max_tokens": 10},
    "early_exit": {"prompt": "abc", "max_tokens": 10, "early_exit": {"threshold": 0.3}},
    "stop_across_tokens": {"prompt": "abc", "max_tokens": 20, "stop": ["cba]", "zz"]},
    "echo_batch_logprobs": {
        "prompt": ["abc", "hello"],
        "max_tokens": 12,
        "echo": True,
        "stop": ["ll"],
        "logprobs": 2,
    },
}


@pytest.mark.parametrize("case", sorted(STREAM_CASES))
def test_stream_assembles_to_the_non_streamed_answer(app_client, case):
    client, _ = app_client
    body = {**STREAM_CASES[case], "seed": 3}
    whole = client.post("/v1/completions", json=body).json()
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        payload = response.read().decode()
    texts, layers, chunks = assemble(sse_events(payload))
    for choice in whole["choices"]:
        assert texts[choice["index"]] == choice["text"]
        assert layers[choice["index"]] == choice["exit_layers"]
    finals = [c for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")]
    assert sorted(c["finish_reason"] for c in finals) == sorted(
        c["finish_reason"] for c in whole["choices"]
    )
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert len({chunk["id"] for chunk in chunks}) == 1


def test_stream_never_sends_text_past_a_stop_string(app_client):
    client, _ = app_client
    body = {"prompt": "abc", "max_tokens": 20, "stop": ["ba]"], "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        payloads = sse_events(response.read().decode())
    sent = ""
    for payload in payloads[:-1]:
        for choice in json.loads(payload)["choices"]:
            sent += choice["text"]
            assert expected_text("abc", 20).startswith(sent) and "b" not in sent
    assert sent == " [c"


def test_stop_holdback():
    assert stop_holdback("hello wor", ["world"]) == 3
    assert stop_holdback("hello", ["world"]) == 0
    assert stop_holdback("abcab", ["abx", "bca", "cabz"]) == 3
    assert stop_holdback("x", []) == 0


# ---------------------------------------------------------------------------- bad requests

GOOD_API = {"prompts": ["abc"], "tokens_to_generate": 4}
BAD_API = {
    "malformed_json": (b'{"prompts": ["abc"', None),
    "not_an_object": (b'["abc"]', None),
    "empty_body": (b"", None),
    "missing_prompts": ({"tokens_to_generate": 4}, "prompts"),
    "prompt_wrong_type": ({"prompts": 5}, "prompts"),
    "tokens_as_string": ({"prompts": "a", "tokens_to_generate": "4"}, "tokens_to_generate"),
    "bool_as_string": ({"prompts": "a", "use_early_exit": "true"}, "use_early_exit"),
    "threshold_too_high": ({"prompts": "a", "early_exit_thres": 1.5}, "early_exit_thres"),
    "threshold_negative": ({"prompts": "a", "early_exit_thres": -0.1}, "early_exit_thres"),
    "too_many_new_tokens": ({"prompts": "a", "tokens_to_generate": 65}, "tokens_to_generate"),
    "too_many_prompts": ({"prompts": ["a"] * 5}, "prompts"),
    "prompt_too_long": ({"prompts": ["a", "x" * 65]}, "prompts.1"),
    "context_too_long": ({"prompts": "x" * 60, "tokens_to_generate": 30}, "tokens_to_generate"),
    "unknown_field": ({"prompts": "a", "max_new_tokens": 4}, "max_new_tokens"),
    "unsupported_field": ({"prompts": "a", "beam_width": 2}, "beam_width"),
    "method_not_served": ({"prompts": "a", "early_exit_method": "pipelined"}, "early_exit_method"),
    "unknown_exit_layer": (
        {"prompts": "a", "use_early_exit": True, "exit_layers": [3]},
        "exit_layers",
    ),
    "top_k_and_top_p": ({"prompts": "a", "temperature": 1.0, "top_k": 5, "top_p": 0.5}, "top_p"),
}
BAD_COMPLETIONS = {
    "malformed_json": (b"{prompt: abc}", None),
    "missing_prompt": ({"max_tokens": 4}, "prompt"),
    "stream_wrong_type": ({"prompt": "a", "stream": "yes"}, "stream"),
    "threshold_out_of_range": (
        {"prompt": "a", "early_exit": {"threshold": 2}},
        "early_exit.threshold",
    ),
    "unknown_early_exit_field": ({"prompt": "a", "early_exit": {"thres": 0.5}}, "early_exit.thres"),
    "too_many_tokens": ({"prompt": "a", "max_tokens": 100}, "max_tokens"),
    "prompt_too_long": ({"prompt": "x" * 65, "stream": True}, "prompt.0"),
    "unknown_exit_layer_streamed": (
        {"prompt": "a", "stream": True, "early_exit": {"exit_layers": [8]}},
        "early_exit.exit_layers",
    ),
    "n_above_one": ({"prompt": "a", "n": 2}, "n"),
    "method_not_served": (
        {"prompt": "a", "early_exit": {"method": "pipelined"}},
        "early_exit.method",
    ),
    "unknown_field": ({"prompt": "a", "best_of": 2}, "best_of"),
}


def _send(client, method: str, path: str, body):
    if isinstance(body, bytes):
        return client.request(
            method, path, content=body, headers={"content-type": "application/json"}
        )
    return client.request(method, path, json=body)


def _check_rejected(client, method, path, body, field, good_body):
    response = _send(client, method, path, body)
    assert response.status_code in (400, 422), response.text
    error = response.json()["error"]
    assert error["field"] == field, error
    assert error["message"] and error["type"]
    if field is not None:
        assert field in error["message"], error
    follow_up = _send(client, method, path, good_body)
    assert follow_up.status_code == 200, follow_up.text


@pytest.mark.parametrize("case", sorted(BAD_API))
def test_api_rejects_bad_requests_and_keeps_serving(app_client, case):
    client, fake = app_client
    body, field = BAD_API[case]
    _check_rejected(client, "PUT", "/api", body, field, GOOD_API)
    assert len(fake.calls) == 1  # only the good follow-up reached the generator


@pytest.mark.parametrize("case", sorted(BAD_COMPLETIONS))
def test_completions_reject_bad_requests_and_keep_serving(app_client, case):
    client, fake = app_client
    body, field = BAD_COMPLETIONS[case]
    _check_rejected(client, "POST", "/v1/completions", body, field, {"prompt": "a"})
    assert len(fake.calls) == 1


def test_generator_failure_is_a_server_error_and_serving_goes_on(app_client):
    client, _ = app_client
    response = client.put("/api", json={"prompts": "BOOM", "tokens_to_generate": 4})
    assert response.status_code == 500
    assert "fake failure" in response.json()["error"]["message"]
    response = client.post("/v1/completions", json={"prompt": "BOOM", "max_tokens": 4})
    assert response.status_code == 500
    with client.stream(
        "POST", "/v1/completions", json={"prompt": "BOOM", "max_tokens": 4, "stream": True}
    ) as response:
        payloads = sse_events(response.read().decode())
    assert payloads[-1] == "[DONE]"
    assert "fake failure" in json.loads(payloads[-2])["error"]["message"]
    assert client.put("/api", json=GOOD_API).status_code == 200
    health = client.get("/health").json()
    assert health["requests"]["failed"] == 3 and health["requests"]["served"] == 1


def test_health(app_client):
    client, _ = app_client
    response = client.get("/health")
    assert response.status_code == 200
    health = response.json()
    assert health["status"] == "ok" and health["model"] == "fake-ee"
    assert health["num_layers"] == NUM_LAYERS and health["exit_layers"] == list(EXITS)
    assert health["limits"]["max_prompts"] == LIMITS.max_prompts
    assert health["requests"] == {
        "pending": 0, "served": 0, "failed": 0, "cancelled": 0, "refused_busy": 0
    }


# -------------------------------------------------------------- service without transport


def test_service_rejects_results_out_of_order():
    class Shuffled(FakeGenerator):
        def generate(self, params):
            return list(reversed(super().generate(params)))

    service = GenerationService(Shuffled(), LIMITS)
    with pytest.raises(RuntimeError, match="order"):
        service.run(GenerationRequest(prompts=("a", "b"), max_new_tokens=2))
    service.close()


class GenerateOnly(FakeGenerator):
    """An engine that cannot stream: ``stream`` replays finished results."""

    def stream(self, params):
        return stream_from_results(self.generate(params))

    def generate(self, params):
        return results_from_stream(FakeGenerator.stream(self, params), len(params.prompts))


def test_generate_only_engine_streams_the_same_chunks():
    params = GenerationRequest(
        prompts=("abc", "hello"), max_new_tokens=9, stop_strings=("ll",), return_logprobs=True
    )
    fake, replaying = FakeGenerator(), GenerateOnly()
    assert results_from_stream(replaying.stream(params), 2) == fake.generate(params)
    body = {"prompt": ["abc", "hello"], "max_tokens": 9, "stop": ["ll"], "stream": True}
    streamed = []
    for generator in (fake, replaying):
        service = GenerationService(generator, LIMITS)
        request = parse_completion_request(body, LIMITS)
        chunks = list(service.stream_completion(request))
        streamed.append([(c.index, c.text) for chunk in chunks for c in chunk.choices])
        service.close()
    texts = [{i: "".join(t for j, t in pairs if j == i) for i in (0, 1)} for pairs in streamed]
    assert texts[0] == texts[1] == {0: expected_text("abc", 9), 1: " [o"}


def test_fake_generator_stream_contract():
    fake = FakeGenerator()
    params = GenerationRequest(prompts=("ab", "c"), max_new_tokens=5, stop_strings=("a]",))
    items = list(fake.stream(params))
    events = [item for item in items if isinstance(item, TokenEvent)]
    results = {item.index: item for item in items if isinstance(item, PromptCompletion)}
    assert results[0].text == " [b" and results[0].finish_reason == "stop"
    assert results[1].text == " [c] " and results[1].finish_reason == "length"
    for index, result in results.items():
        assert [e.token_id for e in events if e.index == index] == list(result.token_ids)


# ------------------------------------------------------------------- real server (uvicorn)


@pytest.fixture(scope="module")
def live_server():
    service, fake = make_service(delay_s=0.004)
    with serving(service) as (url, _):
        yield url, service, fake


def _one_client(url: str, index: int, out: dict) -> None:
    prompt = f"client {index}"
    with httpx.Client(timeout=30) as client:
        if index % 2:
            body = {
                "prompt": prompt,
                "max_tokens": 12,
                "stream": True,
                "early_exit": {"threshold": 0},
            }
            with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                texts, layers, _ = assemble(sse_events(response.read().decode()))
            out[index] = (texts[0], layers[0])
        else:
            body = {
                "prompts": prompt,
                "tokens_to_generate": 12,
                "use_early_exit": True,
                "early_exit_thres": 0,
            }
            answer = client.put(f"{url}/api", json=body).json()
            out[index] = (answer["text"][0], answer["exit_layers"][0])


def test_concurrent_clients_are_served_one_at_a_time(live_server):
    url, service, fake = live_server
    # Control: the overlap detector sees overlap when the generator is called concurrently.
    control = FakeGenerator(delay_s=0.004)
    params = GenerationRequest(prompts=("x",), max_new_tokens=8)
    threads = [threading.Thread(target=control.generate, args=(params,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert control.max_active > 1

    num_clients = 8
    answers: dict[int, tuple] = {}
    num_calls_before = len(fake.calls)
    threads = [
        threading.Thread(target=_one_client, args=(url, i, answers)) for i in range(num_clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(answers) == list(range(num_clients))
    for index, (text, layers) in answers.items():
        assert text == expected_text(f"client {index}", 12), index
        assert layers == [2] * 12
    assert len(fake.calls) - num_calls_before == num_clients
    assert fake.max_active == 1
    assert service.health()["requests"]["pending"] == 0


def test_sse_framing_over_http(live_server):
    url, _, _ = live_server
    body = {"prompt": "abc", "max_tokens": 5, "stream": True}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            raw = response.read().decode()
    payloads = sse_events(raw)
    assert payloads[-1] == "[DONE]" and len(payloads) == 1 + 5 + 1 + 1  # tokens, final, usage
    assert raw.endswith("data: [DONE]\n\n")


# ------------------------------------------------------------------------------ client tools


def test_request_client_prints_text_exit_layers_and_latency(live_server, tmp_path, capsys):
    url, _, _ = live_server
    out = io.StringIO()
    code = request_client.main(
        ["--url", url, "--prompt", "abc", "--tokens", "6", "--threshold", "0", "--logprobs"],
        out=out,
    )
    assert code == 0, capsys.readouterr().err
    report = out.getvalue()
    assert repr(expected_text("abc", 6)) in report
    assert "exit layers: 2 2 2 2 2 2" in report and "layer 2: 6 (100%)" in report
    assert "latency:" in report and "logprobs:" in report

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text('{"text": "ab"}\n\n{"text": "xyz"}\n')
    out = io.StringIO()
    argv = [
        "--url",
        url,
        "--prompts-file",
        str(prompts_file),
        "--tokens",
        "4",
        "--stream",
        "--exit-layers",
        "4",
        "--threshold",
        "0",
    ]
    assert request_client.main(argv, out=out) == 0
    report = out.getvalue()
    assert expected_text("ab", 4) + "\n" in report and expected_text("xyz", 4) + "\n" in report
    assert report.count("exit layers: 4 4 4 4") == 2 and "first token" in report


def test_request_client_errors(live_server, capsys):
    url, _, _ = live_server
    assert request_client.main(["--url", url, "--prompt", "a", "--threshold", "3"]) == 1
    err = capsys.readouterr().err
    assert "HTTP 400" in err and "early_exit_thres" in err
    argv = ["--url", url, "--prompt", "a", "--stream", "--exit-layers", "7"]
    assert request_client.main(argv) == 1
    assert "early_exit.exit_layers" in capsys.readouterr().err
    closed = f"http://127.0.0.1:{free_port()}"
    assert request_client.main(["--url", closed, "--prompt", "a", "--timeout", "5"]) == 1
    assert "cannot reach the server" in capsys.readouterr().err


def test_request_client_bodies_and_prompts(tmp_path):
    args = request_client.parse_args(
        [
            "--prompt",
            "a",
            "--no-early-exit",
            "--threshold",
            "0.5",
            "--top-p",
            "0.9",
            "--seed",
            "7",
            "--stop",
            "\n",
        ]
    )
    body = request_client.generate_body("a", args)
    assert body["use_early_exit"] is False and "early_exit_thres" not in body
    assert body["random_seed"] == 7 and body["stop_sequences"] == ["\n"]
    completion = request_client.completion_body("a", args)
    assert completion["early_exit"] == {"enabled": False} and completion["top_p"] == 0.9
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"prompt": "no text key"}\n')
    with pytest.raises(request_client.ClientError, match="bad.jsonl:2"):
        request_client.load_prompts([], str(bad))
    lines = ['data: {"a": 1}', "", "data: [DONE]", 'data: {"b": 2}']
    assert list(request_client.parse_sse_lines(iter(lines))) == [{"a": 1}]
    with pytest.raises(request_client.ClientError, match="without"):
        list(request_client.parse_sse_lines(iter(['data: {"a": 1}'])))
    with pytest.raises(request_client.ClientError, match="boom"):
        list(request_client.parse_sse_lines(iter(['data: {"error": {"message": "boom"}}'])))


def test_text_generation_cli_renders_exits(live_server):
    url, _, _ = live_server
    out = io.StringIO()
    argv = ["--url", url, "--prompt", "abc", "--tokens", "4", "--threshold", "0"]
    assert text_generation_cli.main(argv, out=out) == 0
    red = text_generation_cli.exit_palette(EXITS)[2]
    assert f"{red} {text_generation_cli.RESET}" in out.getvalue() and "legend:" in out.getvalue()

    out = io.StringIO()
    lines = [
        ":threshold 0",
        "abc",
        ":exits 4",
        "abc",
        ":early off",
        "abc",
        ":tokens x",
        "x" * 70,
        ":quit",
        "never sent",
    ]
    assert text_generation_cli.main(["--url", url, "--tokens", "3", "--no-color"], lines, out) == 0
    report = out.getvalue()
    assert " {2}[{2}c{2}" in report and " {4}[{4}c{4}" in report and "\n [c\n" in report
    assert "bad arguments for :tokens" in report and "HTTP 400" in report and "prompts.0" in report


def test_render_tokens_and_legend():
    palette = text_generation_cli.exit_palette([6, 2])
    assert list(palette) == [2, 6] and palette[2] != palette[6]
    plain = text_generation_cli.render_tokens(["a", "b", "c"], [2, 8, 6], palette, color=False)
    assert plain == "a{2}bc{6}"
    coloured = text_generation_cli.render_tokens(["a", "b"], [2, 8], palette, color=True)
    assert coloured == f"{palette[2]}a{text_generation_cli.RESET}b"
    assert "final@8" in text_generation_cli.legend(palette, 8, color=True)
    assert "\x1b" not in text_generation_cli.legend(palette, 8, color=False)
