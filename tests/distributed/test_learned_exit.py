"""Cheap exit decisions: measure ``"learned"`` (the exits' confidence heads) in the decoding engine.

Oracle: megatron's no-cache forward of the generated sequence, with a hook on each exit's output
layer capturing the states it projects; the confidence head on those states says where each token
must have exited, and that exit's argmax which token. The cheap part is checked by counting the
engine's vocabulary projections: with ``"learned"`` an exit is projected only when it is taken.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.distributed.harness import run_distributed
from tests.distributed.test_generation import INIT_STD, MAX_SEQ, _prompts
from tests.helpers import VOCAB, no_cache_forward, position_embedding_type, tiny_config

THRESHOLD = 0.5
NEW_TOKENS = 10


def learned_config(family: str, **kwargs):
    config = tiny_config(family, init_method_std=INIT_STD, **kwargs)
    heads = tuple(dataclasses.replace(e, confidence_hidden_size=16) for e in config.exit_heads)
    return tiny_config(family, init_method_std=INIT_STD, exit_heads=heads, **kwargs)


def _build(family: str):
    from megatron.early_exit import platform
    from megatron.early_exit.model.builder import build_early_exit_model

    platform.initialize(1, 1, seed=7)
    model = build_early_exit_model(
        learned_config(family), VOCAB, MAX_SEQ,
        position_embedding_type=position_embedding_type(family), seed=11,
    )  # fmt: skip
    return model.eval()


def _params(**kwargs):
    from megatron.early_exit.inference.decide import ExitPolicy
    from megatron.early_exit.inference.generate import GenerationParams

    policy = ExitPolicy(threshold=kwargs.pop("threshold", THRESHOLD), measure="learned")
    return GenerationParams(max_new_tokens=NEW_TOKENS, exit_policy=policy, **kwargs)


def _oracle_violations(model, prompts, results) -> dict:
    """Each token's exit and value against the confidence heads on a no-cache forward."""
    depths = sorted(e.depth for e in model.local_exit_configs)
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        model.exit_heads[str(d)].output_layer.register_forward_hook(
            lambda _m, args, _out, d=d: captured.__setitem__(d, args[0])
        )
        for d in depths
    ]
    out = {"violations": 0, "ambiguous": 0, "checked": 0}
    for prompt, result in zip(prompts, results):
        sequence = torch.tensor([prompt + result.tokens])
        final, exits = no_cache_forward(model, sequence)
        with torch.no_grad():
            conf = {d: model.exit_heads[str(d)].confidence(captured[d])[:, 0] for d in depths}
        for i, (token, depth) in enumerate(zip(result.tokens, result.exit_depths)):
            position = len(prompt) - 1 + i
            values = {d: float(conf[d][position]) for d in depths}
            if any(abs(v - THRESHOLD) < 1e-4 for v in values.values()):
                out["ambiguous"] += 1
                continue
            fired = [d for d in depths if values[d] >= THRESHOLD]
            expected = fired[0] if fired else model.config.num_layers
            logits = exits[expected] if fired else final
            out["violations"] += int(
                depth != expected or int(logits[0, position].argmax()) != token
            )
            out["checked"] += 1
    for hook in hooks:
        hook.remove()
    return out


def _projection_counts(model, prompt, measure: str) -> dict:
    """Vocabulary projections of one row's decoding, by the engine's counters."""
    from megatron.early_exit.inference.decide import ExitPolicy
    from megatron.early_exit.inference.engine import Engine
    from megatron.early_exit.inference.generate import left_pad
    from megatron.early_exit.inference.policies import DecodeState, KVRecompute, RowSampler

    engine = Engine(model)
    tokens, pads = left_pad([prompt], 0)
    cache = engine.new_cache(pads, MAX_SEQ)
    policy = KVRecompute(
        ExitPolicy(threshold=THRESHOLD, measure=measure), sorted(engine.exits)
    )
    state = DecodeState(tokens, torch.ones(1, dtype=torch.bool), RowSampler(0.0, 0, 0.0, [0]))
    early = 0
    for step in range(NEW_TOKENS):
        emitted = policy.step(engine, cache, state)
        early += int(emitted.exit_depths[0, 0] < model.config.num_layers)
        state.inputs, state.num_generated = emitted.tokens, step + 1
    return {"early_tokens": early, **engine.counts}


def learned_worker(rank: int, world_size: int) -> dict:
    from megatron.early_exit.inference.generate import GenerationParams, generate

    out: dict = {}
    prompts = _prompts(seed=4, count=4)
    for family in ("gpt", "llama"):
        model = _build(family)
        full = [
            r.tokens
            for r in generate(model, prompts, GenerationParams(NEW_TOKENS, early_exit=False))
        ]
        results = generate(model, prompts, _params())
        out[family] = {
            "full": full,
            "never": [r.tokens for r in generate(model, prompts, _params(threshold=1.0))],
            "zero": sorted(
                {d for r in generate(model, prompts, _params(threshold=0.0)) for d in r.exit_depths}
            ),
            "depths": sorted({d for r in results for d in r.exit_depths}),
            "oracle": _oracle_violations(model, prompts, results),
            "speculative": [
                r.tokens for r in generate(model, prompts, _params(method="speculative"))
            ],
            "learned_counts": _projection_counts(model, prompts[0], "learned"),
            "max_prob_counts": _projection_counts(model, prompts[0], "max_prob"),
        }
    return out


@pytest.fixture(scope="module")
def result() -> dict:
    return run_distributed(learned_worker, 1)[0]


FAMILIES = ["gpt", "llama"]


@pytest.mark.parametrize("family", FAMILIES)
def test_never_exit_equals_full_decoding(result, family):
    assert result[family]["never"] == result[family]["full"]


@pytest.mark.parametrize("family", FAMILIES)
def test_threshold_zero_takes_the_first_exit(result, family):
    assert result[family]["zero"] == [1]


@pytest.mark.parametrize("family", FAMILIES)
def test_decisions_follow_the_confidence_heads(result, family):
    oracle = result[family]["oracle"]
    assert oracle["violations"] == 0, oracle
    assert oracle["checked"] >= 30, oracle
    assert len(result[family]["depths"]) >= 2, result[family]["depths"]  # a mix of depths


@pytest.mark.parametrize("family", FAMILIES)
def test_learned_decisions_project_only_the_exit_taken(result, family):
    """One vocabulary projection per generated token with "learned" (the exit taken, or the
    final head); max_prob projects every exit it passes on the way."""
    learned, max_prob = result[family]["learned_counts"], result[family]["max_prob_counts"]
    projections = learned["exit_projections"] + learned.get("final_projections", 0)
    assert projections == NEW_TOKENS
    assert learned["early_tokens"] > 0 and learned["confidence_heads"] > 0
    assert max_prob["exit_projections"] + max_prob.get("final_projections", 0) > NEW_TOKENS
    assert max_prob.get("confidence_heads", 0) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_is_lossless_with_a_confidence_head_model(result, family):
    assert result[family]["speculative"] == result[family]["full"]
