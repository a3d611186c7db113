"""The Decoder API, token-by-token streaming, top-N log-probs and per-exit max probabilities.

One spawn of one rank (TP=1). Oracles: ``generate`` itself (streams must reassemble to its
results), megatron's no-cache forward (alternatives and exit probabilities at every position),
and a count of decode steps (the server's first token event arrives after prefill only).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_distributed
from tests.distributed.test_generation import INIT_STD, MAX_SEQ, THRESHOLD, _params, _prompts
from tests.helpers import VOCAB, no_cache_forward, position_embedding_type, tiny_config

FAMILIES = ("gpt", "llama")
TOP_N = 3


def _build(family: str):
    from megatron.early_exit import platform
    from megatron.early_exit.model.builder import build_early_exit_model

    platform.initialize(1, 1, seed=7)
    config = tiny_config(family, init_method_std=INIT_STD)
    model = build_early_exit_model(
        config, VOCAB, MAX_SEQ, position_embedding_type=position_embedding_type(family), seed=11
    )
    return model.eval()


def _stream_checks(model, prompts) -> dict:
    from megatron.early_exit.inference.generate import generate, generate_stream

    out = {}
    for name, params in {
        "full": _params(early_exit=False),
        "recompute": _params(threshold=THRESHOLD),
        "speculative": _params(method="speculative"),
        "eos": _params(early_exit=False, eos_token_ids=(5, 9, 17)),
    }.items():
        updates = list(generate_stream(model, prompts, params))
        final = updates[-1].results
        steps = updates[:-1]
        joined = [[t for u in steps for t in u.tokens[row]] for row in range(len(prompts))]
        depths = [[d for u in steps for d in u.exit_depths[row]] for row in range(len(prompts))]
        out[f"{name}/joined"] = joined == [r.tokens for r in final]
        out[f"{name}/depths"] = depths == [r.exit_depths for r in final]
        out[f"{name}/same_as_generate"] = [r.tokens for r in final] == [
            r.tokens for r in generate(model, prompts, params)
        ]
        out[f"{name}/num_steps"] = len(steps)
        out[f"{name}/first_step_sizes"] = [len(t) for t in steps[0].tokens]
    return out


def _top_logprob_checks(model, prompts) -> dict:
    """Alternatives and exit max-probs against the no-cache forward at every position."""
    from megatron.early_exit.inference.generate import generate

    params = _params(threshold=THRESHOLD, top_logprobs=TOP_N, exit_max_probs=True)
    results = generate(model, prompts, params)
    worst = {"top": 0.0, "max_prob": 0.0, "first_is_token": True, "keys": True, "fired": True}
    allowed = sorted(e.depth for e in model.local_exit_configs)
    for prompt, result in zip(prompts, results):
        final, exits = no_cache_forward(model, torch.tensor([prompt + result.tokens]))
        for i, token in enumerate(result.tokens):
            position = len(prompt) - 1 + i
            probs = result.exit_max_probs[i]
            fired = [d for d, p in probs.items() if p >= THRESHOLD]  # at most the deepest key
            worst["fired"] &= fired in ([], [max(probs)])
            head = exits[fired[0]] if fired else final
            reached = [d for d in allowed if not fired or d <= fired[0]]
            worst["keys"] &= sorted(probs) == reached
            values, ids = torch.log_softmax(head[0, position].float(), -1).topk(TOP_N)
            got = result.top_logprobs[i]
            worst["first_is_token"] &= got[0][0] == token
            worst["top"] = max(worst["top"], max(abs(v - g[1]) for v, g in zip(values, got)))
            worst["top"] = max(worst["top"], float(ids.tolist() != [g[0] for g in got]))
            for d, p in probs.items():
                want = float(torch.softmax(exits[d][0, position].float(), -1).max())
                worst["max_prob"] = max(worst["max_prob"], abs(want - p))
    speculative = generate(model, prompts[:2], _params(method="speculative", top_logprobs=TOP_N))
    worst["speculative_top"] = all(
        len(r.top_logprobs) == len(r.tokens) and r.top_logprobs[0][0][0] == r.tokens[0]
        for r in speculative
    )
    worst["depths_seen"] = sorted({d for r in results for d in r.exit_depths})
    return worst


def _decoder_checks(model, prompts) -> dict:
    from megatron.early_exit.inference.generate import Decoder, generate

    params = _params(threshold=THRESHOLD)
    decoder = Decoder(model, params)
    state = decoder.prefill(prompts)
    columns = [state.emitted.tokens]
    for _ in range(params.max_new_tokens - 1):
        columns.append(decoder.step(state).tokens)
    tokens = torch.cat(columns, dim=1).tolist()
    return {"equals_generate": tokens == [r.tokens for r in generate(model, prompts, params)]}


def _server_stream_checks(model) -> dict:
    """The engine generator's first token event comes after the prefill (which runs the first
    ``Decoder.step``), before any further step."""
    from megatron.early_exit.data.tokenizers import build_tokenizer
    from megatron.early_exit.inference import generate as generate_module
    from megatron.early_exit.server.engine_generator import EngineGenerator
    from megatron.early_exit.server.generator import PromptCompletion, TokenEvent
    from megatron.early_exit.server.protocol import GenerationRequest

    steps = []
    original = generate_module.Decoder.step

    def counting_step(self, state):
        steps.append(1)
        return original(self, state)

    generate_module.Decoder.step = counting_step
    try:
        generator = EngineGenerator(model, build_tokenizer("ByteLevelTokenizer"))
        request = GenerationRequest(
            prompts=("The jury", "It said"), max_new_tokens=6, num_top_logprobs=2,
            return_logprobs=True,
        )  # fmt: skip
        seen_at_first_event, events, completions = None, [], []
        for item in generator.stream(request):
            if isinstance(item, TokenEvent):
                if seen_at_first_event is None:
                    seen_at_first_event = len(steps)
                events.append(item)
            else:
                assert isinstance(item, PromptCompletion)
                completions.append(item)
    finally:
        generate_module.Decoder.step = original
    return {
        "steps_before_first_event": seen_at_first_event,
        "total_steps": len(steps),
        "events_match": [
            [e.token_id for e in events if e.index == c.index] == list(c.token_ids)
            for c in completions
        ],
        "top_sizes": {len(e.top_logprobs) for e in events},
    }


def _context_limit_checks() -> dict:
    """Issue 15, defect 7: speculation near the end of a learned-position context."""
    from megatron.early_exit.inference.generate import generate
    from megatron.early_exit.model.builder import build_early_exit_model

    context = 24
    config = tiny_config("gpt", init_method_std=INIT_STD)
    model = build_early_exit_model(config, VOCAB, context, seed=11).eval()
    prompts = [list(range(1, 11)), [7, 8, 9]]
    new_tokens = context - len(prompts[0])  # fills the context exactly
    full = generate(model, prompts, _params(early_exit=False, max_new_tokens=new_tokens))
    out = {}
    for k in (1, 4, 9):
        spec = generate(
            model, prompts, _params(method="speculative", num_draft_tokens=k,
                                    max_new_tokens=new_tokens),
        )  # fmt: skip
        out[f"k{k}_equals_full"] = [r.tokens for r in spec] == [r.tokens for r in full]
    try:  # the last new token is never fed, so new_tokens + 1 still fits; + 2 does not
        generate(model, prompts, _params(method="speculative", max_new_tokens=new_tokens + 2))
        out["too_long"] = "no error"
    except ValueError as error:
        out["too_long"] = str(error)
    return out


def decoder_worker(rank: int, world_size: int) -> dict:
    out = {}
    prompts = _prompts(seed=3, count=4)
    for family in FAMILIES:
        model = _build(family)
        for group, checks in {
            "stream": _stream_checks(model, prompts),
            "top": _top_logprob_checks(model, prompts),
            "decoder": _decoder_checks(model, prompts),
        }.items():
            out.update({f"{family}/{group}/{k}": v for k, v in checks.items()})
    from megatron.early_exit.model.builder import build_early_exit_model

    byte_model = build_early_exit_model(tiny_config("gpt"), 512, 64, seed=3).eval()
    out.update({f"server/{k}": v for k, v in _server_stream_checks(byte_model).items()})
    out.update({f"context/{k}": v for k, v in _context_limit_checks().items()})
    return out


@pytest.fixture(scope="module")
def results() -> dict:
    return run_distributed(decoder_worker, 1)[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ("full", "recompute", "speculative", "eos"))
def test_stream_reassembles_to_generate(results, family, method):
    prefix = f"{family}/stream/{method}"
    assert results[f"{prefix}/joined"] and results[f"{prefix}/depths"]
    assert results[f"{prefix}/same_as_generate"]
    if method in ("full", "recompute"):  # one token per row per decode step
        assert results[f"{prefix}/num_steps"] == 12
        assert results[f"{prefix}/first_step_sizes"] == [1, 1, 1, 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_top_logprobs_and_exit_max_probs_match_no_cache_forward(results, family):
    prefix = f"{family}/top"
    assert len(results[f"{prefix}/depths_seen"]) >= 2  # exits and the final head both chose
    assert results[f"{prefix}/first_is_token"] and results[f"{prefix}/top"] < 1e-4
    assert results[f"{prefix}/keys"] and results[f"{prefix}/fired"]
    assert results[f"{prefix}/max_prob"] < 1e-5
    assert results[f"{prefix}/speculative_top"]


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_prefill_and_step_equal_generate(results, family):
    assert results[f"{family}/decoder/equals_generate"]


def test_server_streams_first_token_after_prefill_only(results):
    assert results["server/steps_before_first_event"] == 1  # the prefill's own step
    assert results["server/total_steps"] >= 2
    assert results["server/events_match"] == [True, True]
    # two alternatives per token; byte tokens that are not valid UTF-8 alone share a text, so
    # the API's {text: logprob} may hold one
    assert 2 in results["server/top_sizes"] and results["server/top_sizes"] <= {1, 2}


def test_speculation_near_the_context_end_drafts_less_and_refuses_beyond(results):
    for k in (1, 4, 9):
        assert results[f"context/k{k}_equals_full"]
    assert "exceeds the model's 24-position context" in results["context/too_long"]
