"""Server protocol: request validation, limits, error bodies, mapping onto GenerationRequest."""

import dataclasses
import json

import pytest
from pydantic import ValidationError

from megatron.early_exit.inference.decide import ExitPolicy
from megatron.early_exit.server.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    CompletionUsage,
    GenerateResponse,
    GenerationRequest,
    RequestError,
    ServerLimits,
    check_prompt_tokens,
    error_body,
    params_from_completion,
    params_from_generate,
    parse_completion_request,
    parse_generate_request,
)

SMALL_LIMITS = ServerLimits(max_prompts=2, max_prompt_tokens=16, max_tokens_to_generate=8)


def _generate_error(body, limits=None) -> dict:
    with pytest.raises(ValidationError) as caught:
        parse_generate_request(body, limits)
    return error_body(caught.value)["error"]


def _completion_error(body, limits=None) -> dict:
    with pytest.raises(ValidationError) as caught:
        parse_completion_request(body, limits)
    return error_body(caught.value)["error"]


def _generate_params(**fields) -> GenerationRequest:
    return params_from_generate(parse_generate_request({"prompts": "hi", **fields}))


# ----------------------------------------------------------------------------- PUT /api


def test_generate_defaults():
    request = parse_generate_request({"prompts": "Hello"})
    assert request.prompts == ["Hello"]
    assert request.tokens_to_generate == 64
    assert request.temperature == 0.0 and request.top_k == 0 and request.top_p == 0.0
    assert request.random_seed == 1234
    assert request.use_early_exit is False and request.early_exit_thres == 0.8
    assert request.early_exit_method == "auto" and request.early_exit_measure == "max_prob"


def test_prompts_count_and_emptiness():
    assert parse_generate_request({"prompts": ["a", "b"]}).prompts == ["a", "b"]
    assert _generate_error({"prompts": []})["field"] == "prompts"
    assert _generate_error({"prompts": ["a"] * 129})["field"] == "prompts"
    error = _generate_error({"prompts": ["a", "b", "c"]}, SMALL_LIMITS)
    assert error["field"] == "prompts" and "at most 2" in error["message"]
    error = _generate_error({"prompts": ["a", ""]})
    assert error["field"] == "prompts.1" and "add_BOS" in error["message"]
    assert parse_generate_request({"prompts": [""], "add_BOS": True}).prompts == [""]
    assert _generate_error({"prompts": 3})["field"] == "prompts"
    assert _generate_error({})["type"] == "missing"


def test_tokens_to_generate_bounds_and_limits():
    assert _generate_error({"prompts": "a", "tokens_to_generate": -1})["field"] == (
        "tokens_to_generate"
    )
    assert _generate_error({"prompts": "a", "tokens_to_generate": 1025})["field"] == (
        "tokens_to_generate"
    )
    body = {"prompts": "a", "tokens_to_generate": 9}
    error = _generate_error(body, SMALL_LIMITS)
    assert error["field"] == "tokens_to_generate" and "at most 8" in error["message"]
    assert parse_generate_request({**body, "tokens_to_generate": 8}, SMALL_LIMITS)
    assert _generate_error({"prompts": "a", "tokens_to_generate": "8"})["type"] == "int_type"


@pytest.mark.parametrize("threshold", [0, 1, 0.0, 0.5, 1.0])
def test_early_exit_threshold_accepts_ints_and_floats(threshold):
    params = _generate_params(use_early_exit=True, early_exit_thres=threshold)
    assert params.early_exit == ExitPolicy(threshold=float(threshold))


@pytest.mark.parametrize("threshold", [-0.1, 1.5, 40.0, "0.5", True, None])
def test_early_exit_threshold_out_of_range_or_wrong_type(threshold):
    error = _generate_error({"prompts": "a", "early_exit_thres": threshold})
    assert error["field"] == "early_exit_thres"


def test_use_early_exit_is_a_strict_boolean():
    assert _generate_params().early_exit is None
    assert _generate_params(use_early_exit=False, early_exit_thres=0.3).early_exit is None
    policy = _generate_params(use_early_exit=True).early_exit
    assert policy == ExitPolicy(threshold=0.8, measure="max_prob", depths=None)
    for not_a_bool in ("false", "true", 0, 1, None):
        assert _generate_error({"prompts": "a", "use_early_exit": not_a_bool})["field"] == (
            "use_early_exit"
        )
        assert _generate_error({"prompts": "a", "print_max_prob": not_a_bool})["field"] == (
            "print_max_prob"
        )


def test_exit_layers_measure_and_method():
    params = _generate_params(use_early_exit=True, exit_layers=[4, 2], early_exit_measure="entropy")
    assert params.early_exit.depths == frozenset({2, 4})
    assert params.early_exit.measure == "entropy"
    assert _generate_params(use_early_exit=True, exit_layers=[]).early_exit.depths is None
    assert _generate_params(early_exit_method="speculative").decoding_method == "speculative"
    assert _generate_error({"prompts": "a", "exit_layers": [0]})["field"] == "exit_layers.0"
    assert _generate_error({"prompts": "a", "exit_layers": [-2]})["field"] == "exit_layers.0"
    error = _generate_error({"prompts": "a", "exit_layers": [2, 2]})
    assert error["field"] == "exit_layers" and "unique" in error["message"]
    assert _generate_error({"prompts": "a", "early_exit_measure": "x"})["field"] == (
        "early_exit_measure"
    )
    assert _generate_error({"prompts": "a", "early_exit_method": "x"})["field"] == (
        "early_exit_method"
    )


def test_sampling_fields():
    error = _generate_error({"prompts": "a", "top_k": 5, "top_p": 0.5})
    assert error["field"] == "top_p" and "exclusive" in error["message"]
    assert _generate_params(temperature=1, top_k=5).top_k == 5
    assert _generate_params(temperature=0.5, top_p=0.9).top_p == 0.9
    for field, value in [("top_k", 1001), ("top_k", -1), ("top_p", 1.1), ("temperature", 101)]:
        assert _generate_error({"prompts": "a", field: value})["field"] == field
    assert _generate_error({"prompts": "a", "random_seed": -1})["field"] == "random_seed"


def test_unknown_and_unsupported_fields_are_rejected():
    error = _generate_error({"prompts": "a", "temprature": 0.5})
    assert error == {
        "message": "temprature: Extra inputs are not permitted",
        "field": "temprature",
        "type": "extra_forbidden",
    }
    for name in (
        "beam_width",
        "length_penalty",
        "max_len",
        "sentences",
        "top_p_decay",
        "top_p_bound",
        "prevent_newline_after_colon",
    ):
        error = _generate_error({"prompts": "a", name: 1})
        assert error["field"] == name and "not supported" in error["message"]


def test_stop_sequences_are_strings():
    assert _generate_params(stop_sequences=["\n\n", "END"]).stop_strings == ("\n\n", "END")
    assert _generate_error({"prompts": "a", "stop_sequences": [50256]})["field"] == (
        "stop_sequences.0"
    )
    assert _generate_error({"prompts": "a", "stop_sequences": [""]})["field"] == "stop_sequences"


def test_generate_mapping_and_json_body():
    body = json.dumps(
        {
            "prompts": ["a", "b"],
            "tokens_to_generate": 5,
            "logprobs": True,
            "add_BOS": True,
            "echo_prompts": True,
            "random_seed": 7,
            "print_max_prob": True,
            "no_log": True,
        }
    )
    params = params_from_generate(parse_generate_request(body.encode()))
    assert params == GenerationRequest(
        prompts=("a", "b"),
        max_new_tokens=5,
        add_bos=True,
        random_seed=7,
        echo_prompts=True,
        return_logprobs=True,
        print_max_prob=True,
        no_log=True,
    )
    assert _generate_error(b'{"prompts": ')["type"] == "json_invalid"


def test_generate_response_fields():
    response = GenerateResponse(
        text=["ab"], segments=[["a", "b"]], exit_layers=[[2, 8]], request_time=0.5
    )
    dumped = response.model_dump()
    assert dumped["request_time"] == 0.5 and "requst_time" not in dumped
    assert dumped["logprobs"] is None


# --------------------------------------------------------------------- POST /v1/completions


def test_completion_defaults_and_mapping():
    request = parse_completion_request({"prompt": "Hello"})
    params = params_from_completion(request)
    assert params == GenerationRequest(
        prompts=("Hello",), max_new_tokens=16, temperature=1.0, top_p=1.0, random_seed=None
    )
    assert params.early_exit is None


def test_completion_fields():
    body = {
        "model": "ee-7b",
        "prompt": ["a", "b"],
        "max_tokens": 4,
        "temperature": 0,
        "stop": "\n",
        "stream": True,
        "logprobs": 2,
        "seed": 3,
        "echo": True,
    }
    params = params_from_completion(parse_completion_request(body))
    assert params.prompts == ("a", "b") and params.max_new_tokens == 4
    assert params.stop_strings == ("\n",) and params.stream and params.echo_prompts
    assert params.return_logprobs and params.num_top_logprobs == 2 and params.random_seed == 3
    no_stop = parse_completion_request({"prompt": "a", "stop": None})
    assert params_from_completion(no_stop).stop_strings == ()
    zero_logprobs = params_from_completion(parse_completion_request({"prompt": "a", "logprobs": 0}))
    assert zero_logprobs.return_logprobs and zero_logprobs.num_top_logprobs == 0


def test_completion_validation():
    assert _completion_error({"prompt": "a", "n": 2})["field"] == "n"
    assert _completion_error({"prompt": "a", "logprobs": 6})["field"] == "logprobs"
    assert _completion_error({"prompt": "a", "top_p": 0})["field"] == "top_p"
    assert _completion_error({"prompt": "a", "temperature": 2.5})["field"] == "temperature"
    assert _completion_error({"prompt": ""})["field"] == "prompt"
    assert _completion_error({"prompt": "a", "tools": []})["field"] == "tools"
    assert _completion_error({"prompt": "a", "max_tokens": 9}, SMALL_LIMITS)["field"] == (
        "max_tokens"
    )
    assert _completion_error({"prompt": ["a"] * 3}, SMALL_LIMITS)["field"] == "prompt"


def test_completion_early_exit_object():
    def policy(**options):
        body = {"prompt": "a", "early_exit": options}
        return params_from_completion(parse_completion_request(body))

    assert policy().early_exit == ExitPolicy()
    assert policy(enabled=False, threshold=0.2).early_exit is None
    enabled = policy(threshold=1, exit_layers=[3], measure="margin", method="recompute")
    assert enabled.early_exit == ExitPolicy(threshold=1.0, measure="margin", depths=[3])
    assert enabled.decoding_method == "recompute"
    for options, field in [
        ({"threshold": 1.2}, "early_exit.threshold"),
        ({"enabled": "yes"}, "early_exit.enabled"),
        ({"exit_layers": [1, 1]}, "early_exit.exit_layers"),
        ({"method": "beam"}, "early_exit.method"),
        ({"thres": 0.5}, "early_exit.thres"),
    ]:
        assert _completion_error({"prompt": "a", "early_exit": options})["field"] == field


def test_completion_response_and_chunk_serialise():
    logprobs = CompletionLogprobs(
        tokens=["a"], token_logprobs=[-0.1], top_logprobs=[{"a": -0.1}], text_offset=[0]
    )
    choice = CompletionChoice(
        index=0, text="a", finish_reason="length", logprobs=logprobs, exit_layers=[2]
    )
    usage = CompletionUsage(prompt_tokens=3, completion_tokens=1, total_tokens=4)
    response = CompletionResponse(id="cmpl-1", model="m", choices=[choice], usage=usage)
    dumped = json.loads(response.model_dump_json())
    assert dumped["object"] == "text_completion" and isinstance(dumped["created"], int)
    assert dumped["choices"][0]["exit_layers"] == [2]
    assert dumped["usage"]["total_tokens"] == 4
    chunk = CompletionChunk(id="cmpl-1", model="m", choices=[CompletionChoice(index=0, text="b")])
    dumped = json.loads(chunk.model_dump_json())
    assert dumped["usage"] is None and dumped["choices"][0]["finish_reason"] is None
    with pytest.raises(ValidationError):
        CompletionChoice(index=0, text="", finish_reason="eos")


# ------------------------------------------------------------------- limits and internal form


def test_prompt_token_limit_and_error_body():
    check_prompt_tokens([3, 16], SMALL_LIMITS)
    with pytest.raises(RequestError) as caught:
        check_prompt_tokens([3, 17], SMALL_LIMITS, field="prompt")
    assert error_body(caught.value) == {
        "error": {
            "message": "prompt.1: prompt has 17 tokens, at most 16 are allowed",
            "field": "prompt.1",
            "type": "too_long",
        }
    }
    json.dumps(_generate_error({"prompts": "a", "top_k": 2, "top_p": 0.5, "x": 1}))


def test_error_body_reports_the_first_of_several_errors():
    error = _generate_error({"prompts": "a", "top_k": -1, "temperature": -1})
    assert error["field"] == "temperature" and "1 more" in error["message"]


def test_server_limits_and_params_validation():
    with pytest.raises(ValueError, match="max_prompts"):
        ServerLimits(max_prompts=0)
    with pytest.raises(ValueError, match="prompts"):
        GenerationRequest(prompts=(), max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationRequest(prompts=("a",), max_new_tokens=-1)
    with pytest.raises(ValueError, match="decoding_method"):
        GenerationRequest(prompts=("a",), max_new_tokens=1, decoding_method="beam")
    with pytest.raises(dataclasses.FrozenInstanceError):
        GenerationRequest(prompts=("a",), max_new_tokens=1).max_new_tokens = 2
