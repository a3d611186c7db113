"""The OpenAI-compatible surface and the HTTP hardening, against ``FakeGenerator``.

Chat completions (template rendering, streaming, the 400 without a template), ``/v1/models`` and
exit aliases, prompt scoring (OpenAI echo + logprobs, Megatron ``tokens_to_generate=0``),
logprobs alternatives and ``print_max_prob``, neutral OpenAI fields, token-id prompts, the
tokenizer routes; 413/415/503, ``/openapi.json`` gone, the header-read timeout, dropping queued
work whose client left, and incremental detokenization of echoed non-ASCII prompts.
"""

from __future__ import annotations

import gc
import json
import socket
import threading
import time

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient

from megatron.early_exit.data.tokenizers import ByteLevelTokenizer
from megatron.early_exit.server.app import create_app
from megatron.early_exit.server.protocol import ServerLimits
from megatron.early_exit.server.service import GenerationService
from megatron.early_exit.server.text import token_pieces
from tests.fake_generator import FakeGenerator, fake_alternatives, fake_logprob
from tests.live_server import live_server

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
LIMITS = ServerLimits(
    max_prompts=4, max_prompt_tokens=64, max_tokens_to_generate=64, max_body_bytes=4096,
    max_queued_requests=2, max_stop_strings=2, max_stop_chars=8, max_request_tokens=200,
)  # fmt: skip
NUM_LAYERS = 8
EXITS = (2, 4, 6)
HEADER_TIMEOUT_S = 2.0


def make_service(template: str | None = TEMPLATE, **fake_kwargs):
    fake_kwargs.setdefault("max_sequence_length", 200)
    fake = FakeGenerator(num_layers=NUM_LAYERS, exit_depths=EXITS, **fake_kwargs)
    return GenerationService(fake, LIMITS, model_name="tiny", chat_template=template), fake


@pytest.fixture
def client():
    service, fake = make_service()
    with TestClient(create_app(service)) as test_client:
        yield test_client, fake
    service.close()


def error_of(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def events(text: str) -> list[dict]:
    blocks = [b[len("data: ") :] for b in text.strip().split("\n\n")]
    assert blocks[-1] == "[DONE]", blocks[-3:]
    return [json.loads(b) for b in blocks[:-1]]


# ---------------------------------------------------------------------------- chat


def test_chat_renders_the_template_and_answers(client):
    test_client, fake = client
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    answer = test_client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": messages, "max_tokens": 5, "temperature": 0},
    ).json()
    prompt = "<system>be brief\n<user>hi\n<assistant>"
    assert fake.calls[-1].prompts == (prompt,)
    assert answer["object"] == "chat.completion" and answer["model"] == "tiny"
    choice = answer["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": f" [{prompt[::-1]}]"[:5]}
    assert choice["finish_reason"] == "length" and choice["exit_layers"] == [NUM_LAYERS] * 5
    assert answer["usage"]["prompt_tokens"] == len(prompt.encode())


def test_chat_streams_deltas_with_the_role_first(client):
    test_client, _ = client
    body = {"messages": [{"role": "user", "content": "abc"}], "max_tokens": 6, "stream": True,
            "logprobs": True, "top_logprobs": 2,
            "stream_options": {"include_usage": True}}  # fmt: skip
    chunks = events(test_client.post("/v1/chat/completions", json=body).text)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0]["role"] == "assistant" and all("role" not in d for d in deltas[1:])
    prompt = "<user>abc\n<assistant>"
    assert "".join(d.get("content", "") for d in deltas) == f" [{prompt[::-1]}]"[:6]
    with_logprobs = [c["choices"][0]["logprobs"]["content"] for c in chunks
                     if c["choices"] and c["choices"][0].get("logprobs")]  # fmt: skip
    assert len(with_logprobs) == 6 and all(len(e[0]["top_logprobs"]) == 2 for e in with_logprobs)
    assert chunks[-1]["usage"]["completion_tokens"] == 6


def test_chat_without_a_template_is_refused():
    service, _ = make_service(template=None)
    with TestClient(create_app(service)) as test_client:
        error = error_of(
            test_client.post("/v1/chat/completions", json={"messages": [{"role": "user"}]})
        )
    assert error["field"] == "messages" and "chat template" in error["message"]


@pytest.mark.parametrize(
    "field, value",
    [("presence_penalty", 0.5), ("frequency_penalty", -1.0), ("logit_bias", {"5": 1.0}),
     ("n", 2), ("response_format", {"type": "json_object"}), ("tools", [])],
)  # fmt: skip
def test_chat_refuses_fields_it_does_not_implement(client, field, value):
    body = {"messages": [{"role": "user", "content": "x"}], field: value}
    assert error_of(client[0].post("/v1/chat/completions", json=body))["field"] == field


# ---------------------------------------------------------------- models and neutral fields


def test_models_lists_the_checkpoint_and_its_exits(client):
    data = client[0].get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny", "tiny@exit2", "tiny@exit4", "tiny@exit6"]


def test_neutral_openai_fields_are_accepted(client):
    body = {"model": "tiny", "prompt": "ab", "max_tokens": 2, "presence_penalty": 0,
            "frequency_penalty": 0.0, "logit_bias": {}, "user": "someone", "best_of": 1,
            "stream_options": {"include_usage": True}}  # fmt: skip
    response = client[0].post("/v1/completions", json=body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "field, value",
    [("presence_penalty", 0.1), ("frequency_penalty", 1), ("logit_bias", {"1": -100}),
     ("best_of", 2), ("suffix", "x"), ("model", "gpt-4"), ("model", "m" * 300),
     ("user", "u" * 300), ("stop", ["a", "b", "c"]), ("stop", ["toolongstop"])],
)  # fmt: skip
def test_non_neutral_or_oversized_fields_are_refused(client, field, value):
    body = {"prompt": "ab", "max_tokens": 2, field: value}
    error = error_of(client[0].post("/v1/completions", json=body))
    assert error["field"] == field, error


def test_token_id_prompts(client):
    test_client, fake = client
    ids = list(b"hello")
    answer = test_client.post(
        "/v1/completions", json={"prompt": [ids, [104, 105]], "max_tokens": 3, "echo": True}
    ).json()
    assert [c["text"] for c in answer["choices"]] == ["hello [o", "hi [i"]
    assert fake.calls[-1].prompt_ids == (tuple(ids), (104, 105))
    error = error_of(test_client.post("/v1/completions", json={"prompt": [1, 999]}))
    assert error["field"] == "prompt.0" and "vocabulary" in error["message"]


# --------------------------------------------------------------------------- scoring


def test_echo_logprobs_score_the_prompt_tokens(client):
    test_client, _ = client
    body = {"prompt": "abcd", "max_tokens": 0, "echo": True, "logprobs": 2}
    choice = test_client.post("/v1/completions", json=body).json()["choices"][0]
    ids = list(b"abcd")
    logprobs = choice["logprobs"]
    assert choice["text"] == "abcd" and logprobs["tokens"] == list("abcd")
    assert logprobs["token_logprobs"] == [None] + [pytest.approx(fake_logprob(t)) for t in ids[1:]]
    assert logprobs["top_logprobs"][0] is None
    assert logprobs["top_logprobs"][1] == {chr(t): pytest.approx(lp)
                                           for t, lp in fake_alternatives(ids[1], 2)}  # fmt: skip
    assert logprobs["text_offset"] == [0, 1, 2, 3]


def test_echo_logprobs_with_generation_as_lm_eval_sends_it(client):
    """lm-evaluation-harness' loglikelihood request: echo, logprobs=1, max_tokens=1."""
    body = {"model": "tiny", "prompt": [list(b"abc")], "max_tokens": 1, "temperature": 0,
            "logprobs": 1, "seed": 1234, "echo": True}  # fmt: skip
    logprobs = client[0].post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 4
    assert logprobs["token_logprobs"][1:3] == [pytest.approx(fake_logprob(t)) for t in b"bc"]


def test_scoring_by_an_exit(client):
    test_client, _ = client
    body = {"prompt": "abc", "max_tokens": 0, "echo": True, "logprobs": 0}
    by_field = test_client.post("/v1/completions", json={**body, "score_exit_layer": 4}).json()
    by_alias = test_client.post("/v1/completions", json={**body, "model": "tiny@exit4"}).json()
    expected = [None] + [pytest.approx(fake_logprob(t, 4)) for t in b"bc"]
    assert by_field["choices"][0]["logprobs"]["token_logprobs"] == expected
    assert by_alias["choices"][0]["logprobs"]["token_logprobs"] == expected
    error = error_of(test_client.post("/v1/completions", json={**body, "score_exit_layer": 3}))
    assert error["field"] == "score_exit_layer"
    no_echo = {"prompt": "a", "score_exit_layer": 2}
    error = error_of(test_client.post("/v1/completions", json=no_echo))
    assert error["field"] == "score_exit_layer"


def test_exit_alias_generates_at_that_exit(client):
    answer = client[0].post(
        "/v1/completions", json={"model": "tiny@exit4", "prompt": "ab", "max_tokens": 3}
    ).json()
    assert answer["choices"][0]["exit_layers"] == [4, 4, 4]


def test_put_api_scores_prompts_in_megatrons_format(client):
    body = {"prompts": ["abc", "xy"], "tokens_to_generate": 0, "logprobs": True}
    answer = client[0].put("/api", json=body).json()
    assert answer["text"] == ["abc", "xy"]
    assert answer["segments"] == [["a", "b", "c"], ["x", "y"]]
    assert answer["logprobs"] == [[pytest.approx(fake_logprob(t)) for t in b"bc"],
                                  [pytest.approx(fake_logprob(ord("y")))]]  # fmt: skip
    exit_answer = client[0].put("/api", json={**body, "score_exit_layer": 2}).json()
    assert exit_answer["logprobs"][1] == [pytest.approx(fake_logprob(ord("y"), 2))]


def test_logprob_alternatives_and_print_max_prob(client):
    test_client, _ = client
    answer = test_client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 3,
                                                       "logprobs": 3}).json()  # fmt: skip
    top = answer["choices"][0]["logprobs"]["top_logprobs"]
    assert len(top) == 3 and all(len(alternatives) == 3 for alternatives in top)
    body = {"prompts": ["ab"], "tokens_to_generate": 3, "print_max_prob": True,
            "use_early_exit": True, "early_exit_thres": 1.0}  # fmt: skip
    answer = test_client.put("/api", json=body).json()
    assert answer["exit_layers"] == [[NUM_LAYERS] * 3]
    expected = {str(d): pytest.approx(d / (NUM_LAYERS + 1)) for d in EXITS}
    assert answer["max_probs"] == [[expected] * 3]
    assert test_client.put("/api", json={"prompts": ["ab"]}).json()["max_probs"] is None
    speculative = {**body, "early_exit_method": "speculative"}
    error = error_of(test_client.put("/api", json=speculative))
    assert error["field"] == "print_max_prob" and "speculative" in error["message"]


def test_alternatives_refused_where_the_engine_cannot_give_them(client):
    test_client, fake = client
    fake.reports_top_logprobs = False  # as a pipeline-parallel engine
    try:
        body = {"prompt": "ab", "max_tokens": 3, "logprobs": 2}
        error = error_of(test_client.post("/v1/completions", json=body))
        assert error["field"] == "logprobs" and "alternatives" in error["message"]
    finally:
        del fake.reports_top_logprobs


def test_tokenizer_routes(client):
    test_client, _ = client
    info = test_client.get("/tokenizer_info").json()
    assert "eos_token" in info and info["chat_template"] == TEMPLATE
    tokens = test_client.post("/tokenize", json={"prompt": "hé", "add_special_tokens": False})
    assert tokens.json()["tokens"] == list("hé".encode())
    text = test_client.post("/detokenize", json={"tokens": list("hé".encode())}).json()
    assert text == {"prompt": "hé"}


# ------------------------------------------------------------------------ hardening


def test_json_content_type_is_required(client):
    response = client[0].post(
        "/v1/completions", content=b'{"prompt": "a"}', headers={"Content-Type": "text/plain"}
    )
    assert error_of(response, 415)["type"] == "unsupported_media_type"
    response = client[0].put("/api", content=b'{"prompts": "a"}')
    assert response.status_code == 415


def test_openapi_is_not_served(client):
    assert client[0].get("/openapi.json").status_code == 404
    assert client[0].get("/docs").status_code == 404


def test_prompts_are_bounded_before_tokenizing(client):
    test_client, fake = client
    calls = len(fake.calls)
    response = test_client.post("/v1/completions", json={"prompt": "a" * 2000})
    error = error_of(response)
    assert error["type"] == "too_long" and "characters" in error["message"]
    error = error_of(test_client.post("/v1/completions", json={"prompt": ["a"] * 4,
                                                               "max_tokens": 64}))  # fmt: skip
    assert error["field"] == "max_tokens" and "200 tokens per request" in error["message"]
    assert len(fake.calls) == calls


def test_echo_of_non_ascii_prompts_is_not_garbled(client):
    prompt = "naïve café — 日本"
    answer = client[0].put(
        "/api", json={"prompts": [prompt], "tokens_to_generate": 1, "echo_prompts": True}
    ).json()
    segments = answer["segments"][0]
    assert "".join(segments[:-1]) == prompt and "\ufffd" not in "".join(segments)
    tokenizer = ByteLevelTokenizer()
    pieces = token_pieces(tokenizer, tokenizer.tokenize(prompt * 30))
    assert "".join(pieces) == prompt * 30 and "\ufffd" not in "".join(pieces)


# ------------------------------------------------------------------ a real uvicorn server


@pytest.fixture(scope="module")
def live():
    service, fake = make_service(delay_s=0.05)
    options = {"header_timeout_s": HEADER_TIMEOUT_S, "max_connections": 16}
    with live_server(service, **options) as (url, port):
        yield url, port, service, fake


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def _raw_post(port: int, headers: str, body: bytes) -> bytes:
    """Send a request's head and the first bytes of its body; stop writing; read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{headers}\r\n"
        sock.sendall(head.encode() + body)
        answer = b""
        while b"\r\n\r\n" not in answer and (data := sock.recv(4096)):
            answer += data
        return answer


def test_oversized_bodies_answer_413(live):
    _, port, _, _ = live
    json_type = "Content-Type: application/json\r\n"
    declared = _raw_post(port, f"{json_type}Content-Length: {50 << 20}\r\n", b"{" * 1024)
    assert declared.startswith(b"HTTP/1.1 413"), declared[:200]
    chunk = b"{" * 2048
    chunks = b"%x\r\n%s\r\n" % (len(chunk), chunk) * 3
    chunked = _raw_post(port, f"{json_type}Transfer-Encoding: chunked\r\n", chunks)
    assert chunked.startswith(b"HTTP/1.1 413"), chunked[:200]  # 6 KB read, over the 4 KB limit


def test_a_50_mb_body_does_not_grow_the_server(live):
    url, _, _, _ = live
    chunk = b"x" * (1 << 20)

    def body():  # 50 MB, never held by the client
        for _ in range(50):
            yield chunk

    with httpx.Client(timeout=30) as http:
        http.post(f"{url}/v1/completions", json={"prompt": "warm", "max_tokens": 1})
    before = _rss()
    for headers in ({"Content-Length": str(50 << 20)}, {}):  # declared, then chunked
        # The server refuses before reading the body and closes the connection; a client still
        # writing may see the close before the 413 arrives.
        with httpx.Client(timeout=30) as http:
            try:
                response = http.post(
                    f"{url}/v1/completions", content=body(),
                    headers={"Content-Type": "application/json", **headers},
                )  # fmt: skip
                assert response.status_code == 413, response.text
            except (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError):
                pass
    grown = _rss() - before
    assert grown < 8 << 20, f"the server grew by {grown / 2**20:.1f} MB"


def _slow(url: str, out: list, **extra) -> None:
    with httpx.Client(timeout=30) as http:
        out.append(http.post(f"{url}/v1/completions",
                             json={"prompt": "slow", "max_tokens": 30, **extra}))  # fmt: skip


def test_a_full_queue_answers_503(live):
    url, _, service, _ = live
    answers: list = []
    threads = [threading.Thread(target=_slow, args=(url, answers)) for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while service.health()["requests"]["pending"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with httpx.Client(timeout=30) as http:
        busy = http.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
    for thread in threads:
        thread.join()
    assert error_of(busy, 503)["type"] == "busy"
    assert [a.status_code for a in answers] == [200, 200]


def test_queued_work_of_a_departed_client_is_dropped(live):
    url, _, service, fake = live
    answers: list = []
    running = threading.Thread(target=_slow, args=(url, answers))
    running.start()
    deadline = time.monotonic() + 10
    while service.health()["requests"]["pending"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    cancelled_before = service.health()["requests"]["cancelled"]
    leave_soon = httpx.Timeout(10.0, read=0.3)
    with httpx.Client(timeout=leave_soon) as http:  # leaves while its request waits in the queue
        with pytest.raises(httpx.ReadTimeout):
            http.post(f"{url}/v1/completions", json={"prompt": "departed", "max_tokens": 5})
    running.join()
    deadline = time.monotonic() + 5
    while service.health()["requests"]["cancelled"] == cancelled_before:
        assert time.monotonic() < deadline, "the departed client's request was not dropped"
        time.sleep(0.02)
    assert not any("departed" in p for call in fake.calls for p in call.prompts)
    assert answers[0].status_code == 200


def test_a_connection_without_headers_is_closed(live):
    _, port, _, _ = live
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # headers never end
        start = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server
        assert time.monotonic() - start < HEADER_TIMEOUT_S + 3


# --------------------------------------------------------------- the recorded template


def test_the_importer_records_the_chat_template_with_the_tokenizer(tmp_path):
    from megatron.early_exit.checkpoint.convert import copy_tokenizer_files
    from megatron.early_exit.data.tokenizers import read_chat_template

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    copied = tmp_path / "ckpt" / "tokenizer"
    assert "tokenizer_config.json" in copy_tokenizer_files(hf, copied)
    assert read_chat_template(str(copied)) == TEMPLATE
    (hf / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    copy_tokenizer_files(hf, copied)
    assert read_chat_template(str(copied)) == "{{ messages[0]['content'] }}"  # the file wins
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "y"}]
    (tmp_path / "named").mkdir()
    (tmp_path / "named" / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert read_chat_template(str(tmp_path / "named")) == "y"
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "tokenizer_config.json").write_text("{}")
    assert read_chat_template(str(tmp_path / "none")) is None


def test_connections_beyond_the_limit_answer_503(live):
    url, port, _, _ = live
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(16)]
    try:  # (within the header timeout, which would close them)
        with httpx.Client(timeout=10) as http:
            assert http.get(f"{url}/health").status_code == 503
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while True:  # the idle connections are gone: served again
        with httpx.Client(timeout=10) as http:
            if http.get(f"{url}/health").status_code == 200:
                break
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_streamed_echo_carries_the_prompt_scores_first(client):
    body = {"prompt": "abc", "max_tokens": 2, "echo": True, "logprobs": 1, "stream": True}
    chunks = events(client[0].post("/v1/completions", json=body).text)
    opening = chunks[0]["choices"][0]
    assert opening["text"] == "abc"
    assert opening["logprobs"]["token_logprobs"] == [None] + [
        pytest.approx(fake_logprob(t)) for t in b"bc"
    ]
    generated = [c["choices"][0]["logprobs"]["token_logprobs"][0] for c in chunks[1:3]]
    assert len(generated) == 2 and all(lp is not None for lp in generated)
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_engine_results_alternatives_and_exit_probs_reach_the_completion():
    """The engine's ``top_logprobs`` / ``exit_max_probs`` result fields (token by token engine)
    map onto ``PromptCompletion``; an engine without them gives None, not an error."""
    from types import SimpleNamespace

    from megatron.early_exit.server.engine_generator import EngineGenerator
    from megatron.early_exit.server.protocol import GenerationRequest

    generator = EngineGenerator.__new__(EngineGenerator)
    generator._tokenizer = ByteLevelTokenizer()
    params = GenerationRequest(prompts=("x",), max_new_tokens=2, return_logprobs=True,
                               num_top_logprobs=2, print_max_prob=True)  # fmt: skip
    tokens = list("é".encode())
    result = SimpleNamespace(
        tokens=tokens, logprobs=[-0.1, -0.2], exit_depths=[2, 4], finish_reason="length",
        text=None, top_logprobs=[[(tokens[0], -0.1), (65, -3.0)], [(tokens[1], -0.2)]],
        exit_max_probs=[{2: 0.9}, {2: 0.3, 4: 0.8}],
    )  # fmt: skip
    completion = generator._result(0, result, params)
    assert completion.text == "é" and completion.segments == ("", "é")
    assert completion.top_logprobs[0]["A"] == -3.0 and len(completion.top_logprobs[1]) == 1
    assert completion.exit_max_probs == ({2: 0.9}, {2: 0.3, 4: 0.8})
    del result.top_logprobs, result.exit_max_probs  # today's engine
    completion = generator._result(0, result, params)
    assert completion.top_logprobs is None and completion.exit_max_probs is None


def test_a_queued_stream_of_a_departed_client_is_dropped(live):
    url, _, service, fake = live
    answers: list = []
    running = threading.Thread(target=_slow, args=(url, answers))
    running.start()
    deadline = time.monotonic() + 10
    while service.health()["requests"]["pending"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    cancelled_before = service.health()["requests"]["cancelled"]
    body = {"prompt": "gone-stream", "max_tokens": 5, "stream": True}
    leave_soon = httpx.Timeout(10.0, read=0.3)
    with httpx.Client(timeout=leave_soon) as http, pytest.raises(httpx.ReadTimeout):
        with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            response.read()
    running.join()
    deadline = time.monotonic() + 5
    while service.health()["requests"]["cancelled"] == cancelled_before:
        assert time.monotonic() < deadline, "the departed stream's request was not dropped"
        time.sleep(0.02)
    assert not any("gone-stream" in p for call in fake.calls for p in call.prompts)


def test_a_model_without_exits_refuses_early_exit_methods_with_400():
    """Issue 15 defect 7: a speculative request to a model without exits was a 500."""
    from types import SimpleNamespace

    from megatron.early_exit.server.engine_generator import EngineGenerator

    config = SimpleNamespace(pipeline_model_parallel_size=1, exit_heads=(), num_layers=NUM_LAYERS)
    model = SimpleNamespace(config=config, max_sequence_length=64)
    generator = EngineGenerator(model, FakeGenerator(num_layers=NUM_LAYERS).tokenizer)
    assert generator.decoding_methods == ("auto",)
    service = GenerationService(generator, LIMITS, model_name="no-exits")
    try:
        with TestClient(create_app(service)) as test_client:
            body = {"prompt": "ab", "max_tokens": 2,
                    "early_exit": {"threshold": 0.5, "method": "speculative"}}  # fmt: skip
            error = error_of(test_client.post("/v1/completions", json=body))
    finally:
        service.close()
    assert error["field"] == "early_exit.method" and "speculative" in error["message"]


def test_grown_text_releases_a_split_character_whole():
    """Streaming decodes the growing text token by token: a character whose UTF-8 bytes span two
    tokens is released with the token that completes it, never as a replacement character."""
    from megatron.early_exit.server.text import _prefix_pieces, grown_text

    tokenizer = FakeGenerator(num_layers=NUM_LAYERS).tokenizer
    ids = tokenizer.tokenize("aé")  # bytes: a, 0xC3, 0xA9
    assert len(ids) == 3
    assert grown_text(tokenizer, ids[:1], "") == "a"
    assert grown_text(tokenizer, ids[:2], "a") is None  # inside the character: nothing yet
    assert grown_text(tokenizer, ids[:3], "a") == "aé"
    assert _prefix_pieces(tokenizer, ids) == ["a", "", "é"]
