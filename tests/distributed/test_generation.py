"""The generation engine: full decoding, KV recomputation and self-speculation, TP=1 and TP=2.

One spawn of 2 gloo ranks runs every check (first the TP=1 layout, both ranks alike, then TP=2);
each pytest test asserts one of them. Oracles: full-depth greedy decoding, one-by-one decoding of
the same prompts, megatron's own no-cache forward (exit logits at every position) and a fresh
full-depth prefill's KV cache.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_distributed
from tests.helpers import (
    VOCAB,
    no_cache_forward,
    position_embedding_type,
    relative_error,
    tiny_config,
)

FAMILY_NAMES = ("gpt", "llama")
MAX_SEQ = 128
NEW_TOKENS = 12
THRESHOLD = 0.4  # with init std 0.3 this gives a mix of exit depths on both families
CACHE_THRESHOLD = 0.25  # more early exits, so more positions go through catch-up
INIT_STD = 0.3  # sharper exit distributions than the training tests' 0.05


def _prompts(seed: int, count: int, low: int = 2, high: int = 9) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=generator).tolist()
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def _build(family: str, tp: int):
    from megatron.early_exit import platform
    from megatron.early_exit.model.builder import build_early_exit_model

    platform.initialize(tp, 1, seed=7)
    config = tiny_config(family, tensor_model_parallel_size=tp, init_method_std=INIT_STD)
    model = build_early_exit_model(
        config, VOCAB, MAX_SEQ, position_embedding_type=position_embedding_type(family), seed=11
    )
    return model.eval()


def _params(**kwargs):
    from megatron.early_exit.inference.decide import ExitPolicy
    from megatron.early_exit.inference.generate import GenerationParams

    if "threshold" in kwargs or "depths" in kwargs:
        kwargs["exit_policy"] = ExitPolicy(
            threshold=kwargs.pop("threshold", THRESHOLD),
            depths=kwargs.pop("depths", None),
        )
    return GenerationParams(max_new_tokens=kwargs.pop("max_new_tokens", NEW_TOKENS), **kwargs)


def _tokens(results) -> list[list[int]]:
    return [r.tokens for r in results]


def _never_exit_checks(model, prompts, full, tp: int) -> dict:
    from megatron.early_exit.inference.generate import generate

    deepest = max(e.depth for e in model.local_exit_configs)
    out = {"threshold_1": _tokens(generate(model, prompts, _params(threshold=1.0))) == full}
    if tp == 1:
        restricted = _params(threshold=1.0, depths=[deepest])
        out["threshold_1_deepest_only"] = _tokens(generate(model, prompts, restricted)) == full
    return out


def _threshold_zero_checks(model, prompts) -> dict:
    from megatron.early_exit.inference.generate import generate

    shallowest = min(e.depth for e in model.local_exit_configs)
    everywhere = generate(model, prompts, _params(threshold=0.0))
    only_two = generate(model, prompts, _params(threshold=0.0, depths=[2]))
    return {
        "first_exit": {d for r in everywhere for d in r.exit_depths} == {shallowest},
        "only_exit_2": {d for r in only_two for d in r.exit_depths} == {2},
    }


def _batched_checks(model, prompts) -> dict:
    """Batched (left-padded) recompute decoding against one prompt at a time."""
    from megatron.early_exit.inference.generate import generate

    out = {}
    for name, (params, rows) in {
        "greedy": (_params(threshold=THRESHOLD), prompts),
        "sampled": (_params(threshold=THRESHOLD, temperature=0.9, top_k=20, seed=5), prompts[:3]),
    }.items():
        batched = generate(model, rows, params)
        alone = [
            generate(model, [p], _params(**_as_kwargs(params, seed=params.seed + i)))[0]
            for i, p in enumerate(rows)
        ]
        out[f"{name}/tokens"] = _tokens(batched) == _tokens(alone)
        out[f"{name}/exit_layers"] = [r.exit_depths for r in batched] == [
            r.exit_depths for r in alone
        ]
        out[f"{name}/logprobs"] = max(
            abs(a - b) for x, y in zip(batched, alone) for a, b in zip(x.logprobs, y.logprobs)
        )
        out[f"{name}/depths"] = sorted({d for r in batched for d in r.exit_depths})
    return out


def _as_kwargs(params, **overrides) -> dict:
    fields = dict(
        threshold=params.exit_policy.threshold,
        temperature=params.temperature,
        top_k=params.top_k,
        seed=params.seed,
    )
    fields.update(overrides)
    return fields


def _consistency_checks(model, prompts) -> dict:
    """Every token's exit layer, token and log-prob against megatron's no-cache forward."""
    from megatron.early_exit.inference.decide import max_prob_confidence
    from megatron.early_exit.inference.generate import generate

    results = generate(model, prompts, _params(threshold=THRESHOLD))
    depths = sorted(e.depth for e in model.local_exit_configs)
    num_layers = model.config.num_layers
    worst = {"violations": 0, "ambiguous": 0, "logprob": 0.0, "tokens": 0}
    for prompt, result in zip(prompts, results):
        sequence = torch.tensor([prompt + result.tokens])
        final, exits = no_cache_forward(model, sequence)
        for i, (token, depth) in enumerate(zip(result.tokens, result.exit_depths)):
            position = len(prompt) - 1 + i
            conf = {d: float(max_prob_confidence(exits[d][:, position])) for d in depths}
            if any(abs(c - THRESHOLD) < 1e-4 for c in conf.values()):
                worst["ambiguous"] += 1
                continue
            fired = [d for d in depths if conf[d] >= THRESHOLD]
            expected = fired[0] if fired else num_layers
            head = exits[expected] if fired else final
            logits = head[0, position].float()
            worst["violations"] += int(depth != expected or int(logits.argmax()) != token)
            logprob = float(torch.log_softmax(logits, -1)[token])
            worst["logprob"] = max(worst["logprob"], abs(logprob - result.logprobs[i]))
            worst["tokens"] += 1
    return worst


def _cache_checks(model, prompts) -> dict:
    """After recompute steps, the cache equals a fresh full forward's at every complete position."""
    from megatron.early_exit.inference.decide import ExitPolicy
    from megatron.early_exit.inference.engine import Engine
    from megatron.early_exit.inference.generate import left_pad
    from megatron.early_exit.inference.policies import DecodeState, KVRecompute, RowSampler

    engine = Engine(model)
    depths = sorted(engine.exits)
    tokens, pads = left_pad(prompts, 0)
    cache = engine.new_cache(pads, MAX_SEQ)
    policy = KVRecompute(ExitPolicy(threshold=CACHE_THRESHOLD), depths)
    sampler = RowSampler(0.0, 0, 0.0, range(len(prompts)))
    state = DecodeState(tokens, torch.ones(len(prompts), dtype=torch.bool), sampler)
    fed, step_depths, pending_seen = tokens, [], 0
    for _ in range(NEW_TOKENS):
        emitted = policy.step(engine, cache, state)
        pending_seen = max(pending_seen, len(cache.filled_depths))
        step_depths.append(int(emitted.exit_depths.max()))
        state.inputs = emitted.tokens
        fed = torch.cat([fed, emitted.tokens], dim=1)
    fresh = engine.new_cache(pads, MAX_SEQ)
    engine.forward(fresh, fed[:, : cache.complete_length], depths)
    errors = {}
    for layer_number in fresh.kv.buffers:
        for name, got, want in zip(
            "KV", cache.key_value(layer_number), fresh.key_value(layer_number)
        ):
            for row, pad in enumerate(pads.tolist()):
                a = got[row, :, pad : cache.complete_length]  # [g, s, d]
                b = want[row, :, pad : cache.complete_length]
                errors[f"{name}{layer_number}/{row}"] = relative_error(a, b)
    return {
        "max_error": max(errors.values()),
        "num_buffers": len(fresh.kv.buffers),
        "pending_seen": pending_seen,
        "complete": cache.complete_length - tokens.shape[1],
        "early_steps": sum(d < model.config.num_layers for d in step_depths),
    }


def _speculative_checks(model) -> dict:
    from megatron.early_exit.inference.generate import generate

    prompts = _prompts(seed=21, count=20, low=1, high=12)
    full = _tokens(generate(model, prompts, _params(early_exit=False)))
    out = {}
    for draft, k in ((None, 3), (3, 2)):
        params = _params(method="speculative", draft_exit_depth=draft, num_draft_tokens=k)
        out[f"greedy/{draft}/{k}"] = _tokens(generate(model, prompts, params)) == full
    alone = [_tokens(generate(model, [p], _params(method="speculative")))[0] for p in prompts[:2]]
    out["greedy/alone"] = alone == full[:2]
    sampled = generate(
        model, prompts[:4], _params(method="speculative", temperature=0.8, top_p=0.9)
    )
    out["sampled/lengths"] = [len(r.tokens) for r in sampled]
    return out


def _stop_checks(model, prompts, full) -> dict:
    from megatron.early_exit.inference.generate import generate

    def detokenize(ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)

    eos = full[0][3]
    first_eos = full[0].index(eos)
    by_eos = generate(model, prompts[:1], _params(early_exit=False, eos_token_ids=(eos,)))[0]
    stop = detokenize(full[1][4:6])
    first_stop = detokenize(full[1]).index(stop)
    by_stop = generate(
        model, prompts[:2], _params(early_exit=False, stop_strings=(stop,), detokenize=detokenize)
    )[1]
    return {
        "eos": by_eos.tokens == full[0][:first_eos] and by_eos.finish_reason == "eos",
        "stop": by_stop.text == detokenize(full[1])[:first_stop]
        and by_stop.finish_reason == "stop",
    }


def generation_worker(rank: int, world_size: int) -> dict:
    """Every check, as {name: value}."""
    from megatron.early_exit.inference.generate import generate

    out: dict = {}
    prompts = _prompts(seed=3, count=5)
    for tp in (1, 2):
        for family in FAMILY_NAMES:
            model = _build(family, tp)
            prefix = f"tp{tp}/{family}"
            full = _tokens(generate(model, prompts, _params(early_exit=False)))
            out[f"{prefix}/full"] = full
            out[f"{prefix}/recompute"] = _tokens(generate(model, prompts, _params()))
            for key, value in _never_exit_checks(model, prompts, full, tp).items():
                out[f"{prefix}/never/{key}"] = value
            spec = generate(model, prompts, _params(method="speculative"))
            out[f"{prefix}/speculative_equals_full"] = _tokens(spec) == full
            if tp == 2:
                continue
            checks = {
                "zero": _threshold_zero_checks(model, prompts),
                "batched": _batched_checks(model, prompts),
                "consistency": _consistency_checks(model, prompts),
                "cache": _cache_checks(model, prompts[:2]),
                "speculative": _speculative_checks(model),
                "stop": _stop_checks(model, prompts, full),
            }
            for group, values in checks.items():
                for key, value in values.items():
                    out[f"{prefix}/{group}/{key}"] = value
    return out


@pytest.fixture(scope="module")
def results() -> dict:
    ranks = run_distributed(generation_worker, 2)
    assert ranks[0] == ranks[1]  # both ranks took the same decisions
    return ranks[0]


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("tp", (1, 2))
def test_never_exit_reproduces_full_decoding(results, family, tp):
    prefix = f"tp{tp}/{family}"
    assert results[f"{prefix}/never/threshold_1"]
    assert results[f"tp1/{family}/never/threshold_1_deepest_only"]
    assert results[f"{prefix}/full"] == results[f"tp1/{family}/full"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tp2_recompute_matches_tp1(results, family):
    assert results[f"tp2/{family}/recompute"] == results[f"tp1/{family}/recompute"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_threshold_zero_exits_at_first_enabled_exit(results, family):
    assert results[f"tp1/{family}/zero/first_exit"]
    assert results[f"tp1/{family}/zero/only_exit_2"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("mode", ("greedy", "sampled"))
def test_batched_equals_one_by_one(results, family, mode):
    prefix = f"tp1/{family}/batched/{mode}"
    assert len(results[f"{prefix}/depths"]) >= 2  # a mix of exit depths, so rows disagree
    assert results[f"{prefix}/tokens"]
    assert results[f"{prefix}/exit_layers"]
    assert results[f"{prefix}/logprobs"] < 1e-4


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_reported_exit_layers_tokens_and_logprobs_are_consistent(results, family):
    prefix = f"tp1/{family}/consistency"
    assert results[f"{prefix}/tokens"] >= 40
    assert results[f"{prefix}/violations"] == 0
    assert results[f"{prefix}/logprob"] < 1e-4


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_recompute_cache_equals_full_forward_cache(results, family):
    prefix = f"tp1/{family}/cache"
    assert results[f"{prefix}/early_steps"] >= 2 and results[f"{prefix}/pending_seen"] >= 1
    assert results[f"{prefix}/complete"] >= 4
    assert results[f"{prefix}/num_buffers"] == 5  # four backbone layers and one block exit
    assert results[f"{prefix}/max_error"] < 1e-5


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("tp", (1, 2))
def test_self_speculative_greedy_equals_full(results, family, tp):
    assert results[f"tp{tp}/{family}/speculative_equals_full"]
    if tp == 1:
        spec = {k: v for k, v in results.items() if k.startswith(f"tp1/{family}/speculative/")}
        assert all(spec[k] for k in spec if "/greedy/" in k) and len(spec) == 4
        assert results[f"tp1/{family}/speculative/sampled/lengths"] == [NEW_TOKENS] * 4


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_eos_and_stop_strings_end_a_sequence(results, family):
    assert results[f"tp1/{family}/stop/eos"]
    assert results[f"tp1/{family}/stop/stop"]
