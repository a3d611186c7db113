"""Hugging Face <-> EE-LLM conversion at TP=1/PP=1 against random tiny HF models (no hub access).

One spawned rank builds a random tiny ``LlamaForCausalLM`` (GQA, untied) and ``GPT2LMHeadModel``
(tied, biases, learned positions), converts each into an ``EarlyExitGPTModel`` with a ``norm`` exit
after the last layer initialised from the final norm and head, and returns every check; each
pytest test asserts one of them. Oracles: HF's own logits (fp32, 1e-4 absolute), bit-identical
round trips, and the final head reproduced exactly by an exit that copies it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.distributed.harness import run_distributed
from tests.helpers import tiny_hf_model

LOGIT_TOL = 1e-4
FAMILIES = ("llama", "gpt2")
BATCH, SEQ = 2, 12


def _family_checks(family: str) -> dict:
    from megatron.early_exit import platform
    from megatron.early_exit.checkpoint import (
        config_from_hf,
        hf_to_megatron_state_dict,
        load_megatron_state_dict,
        megatron_to_hf_state_dict,
    )
    from megatron.early_exit.config import EarlyExitTransformerConfig, ExitHeadConfig
    from megatron.early_exit.model.builder import build_early_exit_model

    hf = tiny_hf_model(family)
    hf_sd = hf.state_dict()
    config_kwargs, model_kwargs = config_from_hf(hf.config)
    untied = config_kwargs["untie_embeddings_and_output_weights"]
    depth = config_kwargs["num_layers"]
    fields = dict(config_kwargs)
    fields["exit_heads"] = (ExitHeadConfig(depth, structure="norm", untied=untied),)
    fields.update(platform.config_overrides())
    config = EarlyExitTransformerConfig(**fields)
    model = build_early_exit_model(config, **model_kwargs)
    ours = hf_to_megatron_state_dict(hf_sd, hf.config)
    exit_head = {
        k.removeprefix("decoder.final_layer"): v.clone()
        for k, v in ours.items()
        if k.startswith("decoder.final_layernorm.")
    }  # norm.weight (, norm.bias)
    if untied:
        exit_head["output_layer.weight"] = ours["output_layer.weight"].clone()
    with_exit = hf_to_megatron_state_dict(hf_sd, hf.config, exit_heads={depth: exit_head})
    load_megatron_state_dict(model, with_exit)
    model.eval()

    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, model_kwargs["vocab_size"], (BATCH, SEQ), generator=generator)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1).contiguous()
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1)
    with torch.no_grad():
        expected = hf(input_ids=input_ids).logits
        logits, exit_logits = model(input_ids, position_ids, mask, runtime_gather_output=True)

    out: dict = {
        "model_kwargs": model_kwargs,
        "logits_shape": tuple(logits.shape) == tuple(expected.shape),
        "logits_max_abs": (logits - expected).abs().max().item(),
        "logits_scale": expected.abs().max().item(),
        "exit_equals_final": torch.equal(exit_logits[depth], logits),
        "exit_depths": sorted(exit_logits),
    }

    # Round trips: HF -> ours -> HF directly, and through the model's own state dict.
    direct, no_exits = megatron_to_hf_state_dict(ours, hf.config)
    back, exits = megatron_to_hf_state_dict(model.state_dict(), hf.config)
    for name, got in (("direct", direct), ("model", back)):
        out[f"roundtrip/{name}/keys"] = sorted(got) == sorted(hf_sd)
        out[f"roundtrip/{name}/unequal"] = [k for k in hf_sd if not torch.equal(got[k], hf_sd[k])]
    out["roundtrip/no_exits"] = no_exits == {}
    out["roundtrip/exits"] = sorted(exits) == [depth] and (
        sorted(exits[depth]) == sorted(exit_head)
        and all(torch.equal(exits[depth][k], v) for k, v in exit_head.items())
    )
    out["roundtrip/hf_loads"] = str(hf.load_state_dict(back, strict=True))

    # Problem reports: one error listing every missing, unexpected and wrong-shape tensor.
    broken = dict(model.state_dict())
    qkv = "decoder.layers.1.self_attention.linear_qkv.weight"
    del broken["decoder.layers.0.mlp.linear_fc2.weight"]
    broken["decoder.layers.9.mlp.linear_fc2.weight"] = torch.zeros(1)
    broken[qkv] = broken[qkv][:-1]
    out["report/ours"] = _error(megatron_to_hf_state_dict, broken, hf.config)
    broken_hf = dict(hf_sd)
    down = "mlp.c_proj.weight" if family == "gpt2" else "mlp.down_proj.weight"
    first, second = sorted(k for k in hf_sd if k.endswith(down))[:2]
    del broken_hf[first]
    broken_hf["model.extra.weight"] = torch.zeros(3)
    broken_hf[second] = torch.zeros(2, 2)
    out["report/hf"] = _error(hf_to_megatron_state_dict, broken_hf, hf.config)
    out["report/hf_names"] = (first, second)
    broken_load = dict(with_exit)
    del broken_load["embedding.word_embeddings.weight"]
    broken_load["decoder.final_layernorm.weight"] = torch.zeros(3)
    broken_load["bogus"] = torch.zeros(1)
    out["report/load"] = _error(load_megatron_state_dict, model, broken_load)
    return out


def _error(fn, *args) -> str:
    try:
        fn(*args)
    except ValueError as exc:
        return str(exc)
    return "<no error>"


def conversion_worker(rank: int, world_size: int) -> dict:
    from megatron.early_exit import platform

    platform.initialize(1, 1, seed=7)
    return {family: _family_checks(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def results() -> dict:
    pytest.importorskip("transformers")
    return run_distributed(conversion_worker, 1)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hugging_face(results, family):
    got = results[family]
    assert got["logits_shape"]
    assert got["logits_scale"] > 0.1  # not a degenerate comparison
    assert got["logits_max_abs"] < LOGIT_TOL, got["logits_max_abs"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("path", ["direct", "model"])
def test_round_trip_is_bit_identical(results, family, path):
    assert results[family][f"roundtrip/{path}/keys"]
    assert results[family][f"roundtrip/{path}/unequal"] == []


@pytest.mark.parametrize("family", FAMILIES)
def test_exit_heads_come_back_separately(results, family):
    assert results[family]["roundtrip/no_exits"]
    assert results[family]["roundtrip/exits"]
    assert results[family]["roundtrip/hf_loads"] == "<All keys matched successfully>"


@pytest.mark.parametrize("family", FAMILIES)
def test_exit_copying_final_head_reproduces_final_logits(results, family):
    assert results[family]["exit_depths"] == [3]
    assert results[family]["exit_equals_final"]


@pytest.mark.parametrize("family", FAMILIES)
def test_problem_reports_list_every_problem(results, family):
    got = results[family]
    ours = got["report/ours"]
    assert "3 problem(s)" in ours, ours
    assert "missing: decoder.layers.0.mlp.linear_fc2.weight" in ours
    assert "unexpected: decoder.layers.9.mlp.linear_fc2.weight" in ours
    assert "wrong shape: decoder.layers.1.self_attention.linear_qkv.weight" in ours
    hf = got["report/hf"]
    first, second = got["report/hf_names"]
    assert "3 problem(s)" in hf, hf
    assert f"missing: {first}" in hf
    assert "unexpected: model.extra.weight" in hf
    assert f"wrong shape: {second} is [2, 2]" in hf
    load = got["report/load"]
    assert "3 problem(s)" in load, load
    assert "missing: embedding.word_embeddings.weight" in load
    assert "unexpected: bogus" in load
    assert "wrong shape: decoder.final_layernorm.weight is [3]" in load


def test_model_kwargs(results):
    llama, gpt2 = results["llama"]["model_kwargs"], results["gpt2"]["model_kwargs"]
    assert llama == dict(vocab_size=128, max_sequence_length=64, position_embedding_type="rope",
                         rotary_base=50000)  # fmt: skip
    assert gpt2 == dict(vocab_size=128, max_sequence_length=32,
                        position_embedding_type="learned_absolute")  # fmt: skip


def test_unsupported_architecture_is_rejected():
    from megatron.early_exit.checkpoint import config_from_hf

    with pytest.raises(ValueError, match="model_type='mistral'.*supported: llama, gpt2"):
        config_from_hf(SimpleNamespace(model_type="mistral"))


def _llama_namespace(**overrides) -> SimpleNamespace:
    fields = dict(
        model_type="llama", hidden_act="silu", num_hidden_layers=2, hidden_size=64,
        intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=None,
        rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=128, max_position_embeddings=64,
    )  # fmt: skip
    fields.update(overrides)
    return SimpleNamespace(**fields)


def test_llama_config_reads_rope_theta_of_transformers_4_and_5():
    from megatron.early_exit.checkpoint import config_from_hf

    v4 = config_from_hf(_llama_namespace(rope_theta=500000.0, rope_scaling=None))[1]
    v5 = config_from_hf(
        _llama_namespace(rope_parameters={"rope_theta": 250000.0, "rope_type": "default"})
    )[1]
    assert v4["rotary_base"] == 500000 and v5["rotary_base"] == 250000


def test_llama_config_rejects_what_megatron_cannot_express():
    from megatron.early_exit.checkpoint import config_from_hf

    config = _llama_namespace(
        attention_bias=True, mlp_bias=False, hidden_act="gelu",
        rope_parameters={"rope_theta": 1e4, "rope_type": "llama3"},
    )  # fmt: skip
    with pytest.raises(ValueError) as info:
        config_from_hf(config)
    for needle in ("hidden_act='gelu'", "attention_bias=True with mlp_bias=False", "'llama3'"):
        assert needle in str(info.value)
    kwargs = config_from_hf(_llama_namespace(attention_bias=True, mlp_bias=True))[0]
    assert kwargs["add_bias_linear"] and kwargs["num_query_groups"] == 2
    assert kwargs["kv_channels"] == 16 and not kwargs["untie_embeddings_and_output_weights"]
