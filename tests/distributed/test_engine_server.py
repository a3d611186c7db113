"""The REST server in front of the real generation engine (one rank, a tiny model, bytes)."""

from __future__ import annotations

import pytest

from tests.distributed.harness import run_distributed


def server_worker(rank: int, world_size: int) -> dict:
    from fastapi.testclient import TestClient

    from megatron.early_exit import platform
    from megatron.early_exit.data.tokenizers import build_tokenizer
    from megatron.early_exit.inference.generate import GenerationParams, generate
    from megatron.early_exit.model.builder import build_early_exit_model
    from megatron.early_exit.server.app import create_app
    from megatron.early_exit.server.engine_generator import EngineGenerator
    from megatron.early_exit.server.service import GenerationService
    from tests.helpers import tiny_config

    platform.initialize(1, 1, seed=3)
    tokenizer = build_tokenizer("ByteLevelTokenizer")
    model = build_early_exit_model(tiny_config("gpt"), 512, 64, seed=3)
    prompt = "The county jury said"
    direct = generate(
        model,
        [tokenizer.tokenize(prompt)],
        GenerationParams(max_new_tokens=8, early_exit=False, eos_token_ids=(tokenizer.eod,)),
    )[0]
    service = GenerationService(EngineGenerator(model, tokenizer))
    client = TestClient(create_app(service))
    full = client.put("/api", json={"prompts": [prompt], "tokens_to_generate": 8}).json()
    early_request = {"prompts": [prompt], "tokens_to_generate": 8, "use_early_exit": True}
    early = client.put("/api", json={**early_request, "early_exit_thres": 0}).json()
    bad = client.put("/api", json={"prompts": [prompt], "early_exit_thres": 2})
    learned = client.put("/api", json={**early_request, "early_exit_measure": "learned"})
    stream = client.post(
        "/v1/completions",
        json={"prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True},
    ).text
    service.close()
    return {
        "direct": tokenizer.detokenize(direct.tokens),
        "direct_exits": direct.exit_depths,
        "full": full,
        "early": early,
        "bad_status": bad.status_code,
        "learned": (learned.status_code, learned.json()),
        "stream_done": stream.strip().endswith("data: [DONE]"),
    }


@pytest.fixture(scope="module")
def result() -> dict:
    return run_distributed(server_worker, 1)[0]


def test_put_api_matches_direct_full_decoding(result):
    assert result["full"]["text"] == [result["direct"]]
    assert result["full"]["exit_layers"] == [[4] * len(result["direct_exits"])]


def test_threshold_zero_exits_at_the_first_exit(result):
    layers = result["early"]["exit_layers"][0]
    assert layers and set(layers) == {1}


def test_bad_request_and_streaming(result):
    assert result["bad_status"] in (400, 422)
    assert result["stream_done"]


def test_learned_measure_needs_confidence_heads(result):
    status, body = result["learned"]
    assert status in (400, 422)
    assert body["error"]["field"] == "early_exit_measure"
    assert "confidence heads" in body["error"]["message"]
