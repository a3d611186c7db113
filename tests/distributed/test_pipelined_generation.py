"""Pipelined early-exit decoding (PP=2, and TP=2 x PP=2) against PP=1 decoding of the same weights.

Each spawn first decodes with the PP=1 model of the same seed (every rank alike; the oracle:
full-depth decoding and KV recomputation, which the PP=1 tests check against megatron's
no-cache forward), then rebuilds the layout as a 2-stage pipeline and decodes with
``method="pipelined"``. Both tiny families have exits on both stages (gpt: depths 1, 2 | 3, 4;
llama: 1, 2 | 3, 4), so decisions come from stage 0 and from the reporting stage.
"""

from __future__ import annotations

import pytest

from tests.distributed.harness import run_distributed
from tests.distributed.test_generation import INIT_STD, MAX_SEQ, THRESHOLD, _params, _prompts
from tests.helpers import VOCAB, position_embedding_type, tiny_config

SAMPLING = dict(temperature=0.9, top_k=20, seed=5)


def _build(family: str, tp: int, pp: int):
    from megatron.core import parallel_state

    from megatron.early_exit import platform
    from megatron.early_exit.model.builder import build_early_exit_model
    from megatron.early_exit.placement import tied_exit_stages

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    config = tiny_config(
        family,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        init_method_std=INIT_STD,
    )
    platform.initialize(tp, pp, seed=7, embedding_stages=tied_exit_stages(config))
    model = build_early_exit_model(
        config, VOCAB, MAX_SEQ, position_embedding_type=position_embedding_type(family), seed=11
    )
    return model.eval()


def _decode_all(model, prompts, method: str) -> dict:
    """Every decoding the tests compare, as {name: [(tokens, exit_depths), ...]}."""
    from megatron.early_exit.inference.generate import generate

    def run(rows, **kwargs):
        return [(r.tokens, r.exit_depths) for r in generate(model, rows, _params(**kwargs))]

    early = run(prompts, method=method, threshold=THRESHOLD)
    eos = early[0][0][3]
    return {
        "full": run(prompts, early_exit=False),
        "never": run(prompts, method=method, threshold=1.0),
        "early": early,
        "early_alone": [run([p], method=method, threshold=THRESHOLD)[0] for p in prompts[:2]],
        "late_exits_only": run(prompts, method=method, threshold=THRESHOLD, depths=[3, 4]),
        "zero": run(prompts, method=method, threshold=0.0),
        "sampled": run(prompts[:3], method=method, threshold=THRESHOLD, **SAMPLING),
        "eos": run(prompts[:2], method=method, threshold=THRESHOLD, eos_token_ids=(eos,)),
    }


def _error(model, prompts, **kwargs) -> str:
    from megatron.early_exit.inference.generate import generate

    try:
        generate(model, prompts, _params(**kwargs))
    except ValueError as error:
        return str(error)
    return "no error"


def _logprobs(model, prompts, method: str) -> dict:
    """Every token's log-prob, full depth and with early exit (the lean step on each stage)."""
    from megatron.early_exit.inference.generate import generate

    return {
        "full": [r.logprobs for r in generate(model, prompts, _params(early_exit=False))],
        "early": [
            r.logprobs
            for r in generate(model, prompts, _params(method=method, threshold=THRESHOLD))
        ],
    }


def pipelined_worker(rank: int, world_size: int, families: tuple[str, ...], tp: int) -> dict:
    out: dict = {}
    prompts = _prompts(seed=3, count=4)
    for family in families:
        model = _build(family, tp, 1)
        reference = _decode_all(model, prompts, "recompute")
        reference_logprobs = _logprobs(model, prompts, "recompute")
        out["errors/pipelined_at_pp1"] = _error(model, prompts, method="pipelined")
        model = _build(family, tp, 2)
        pipelined = _decode_all(model, prompts, "pipelined")
        for name, rows in _logprobs(model, prompts, "pipelined").items():
            pairs = zip(rows, reference_logprobs[name], strict=True)
            out[f"{family}/logprob_error/{name}"] = max(
                abs(a - b) for x, y in pairs for a, b in zip(x, y, strict=True)
            )
        out["errors/recompute_at_pp2"] = _error(model, prompts, method="recompute")
        for name in reference:
            out[f"{family}/{name}/reference"] = reference[name]
            out[f"{family}/{name}/pipelined"] = pipelined[name]
    return out


@pytest.fixture(scope="module")
def pp2():
    return run_distributed(pipelined_worker, 2, ("gpt", "llama"), 1, timeout_s=300)


@pytest.fixture(scope="module")
def tp2_pp2():
    return run_distributed(pipelined_worker, 4, ("llama",), 2, timeout_s=300)


def _check_all_ranks_agree(results, key):
    assert all(r[key] == results[0][key] for r in results), key


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize(
    "name", ["full", "never", "early", "late_exits_only", "zero", "sampled", "eos"]
)
def test_pipelined_equals_pp1_decoding(pp2, family, name):
    """Tokens and exit layers equal PP=1 decoding: full depth for ``full`` and threshold 1.0,
    KV recomputation with the same threshold/exits/sampling/EOS otherwise. Every rank of the
    pipeline returns the same results."""
    for key in (f"{family}/{name}/pipelined", f"{family}/{name}/reference"):
        _check_all_ranks_agree(pp2, key)
    assert pp2[0][f"{family}/{name}/pipelined"] == pp2[0][f"{family}/{name}/reference"]


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("name", ["full", "early"])
def test_pipelined_logprobs_equal_pp1(pp2, family, name):
    """The PP=2 lean step's log-probs equal PP=1's (which test_generation checks against
    megatron's no-cache forward), token by token."""
    assert pp2[0][f"{family}/logprob_error/{name}"] < 1e-5


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_never_exit_reproduces_full_decoding(pp2, family):
    assert pp2[0][f"{family}/never/pipelined"] == pp2[0][f"{family}/full/reference"]


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_exits_fire_on_both_stages_and_threshold_zero_takes_the_first(pp2, family):
    depths = {d for _, layers in pp2[0][f"{family}/early/pipelined"] for d in layers}
    assert depths & {1, 2} and depths & {3, 4}, depths  # decisions from stage 0 and stage 1
    zero = {d for _, layers in pp2[0][f"{family}/zero/pipelined"] for d in layers}
    assert zero == {1}
    late = {d for _, layers in pp2[0][f"{family}/late_exits_only/pipelined"] for d in layers}
    assert late <= {3, 4}


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_batched_pipelined_equals_one_by_one(pp2, family):
    batched = pp2[0][f"{family}/early/pipelined"][:2]
    assert pp2[0][f"{family}/early_alone/pipelined"] == batched


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_eos_ends_rows_in_pipelined_decoding(pp2, family):
    """Row 0 stops at its first EOS (the original always generated the full length)."""
    tokens, layers = pp2[0][f"{family}/early/pipelined"][0]
    eos_tokens, eos_layers = pp2[0][f"{family}/eos/pipelined"][0]
    stop = tokens.index(tokens[3])
    assert (eos_tokens, eos_layers) == (tokens[:stop], layers[:stop])


@pytest.mark.parametrize(
    "name", ["full", "never", "early", "late_exits_only", "zero", "sampled", "eos"]
)
def test_tp2_pp2_pipelined_equals_tp2_pp1(tp2_pp2, name):
    """4 ranks: two pipelines' worth of group-relative p2p (TP ranks 0/1 of each stage)."""
    for key in (f"llama/{name}/pipelined", f"llama/{name}/reference"):
        _check_all_ranks_agree(tp2_pp2, key)
    assert tp2_pp2[0][f"llama/{name}/pipelined"] == tp2_pp2[0][f"llama/{name}/reference"]


def test_pipelined_needs_pp_and_pp_needs_pipelined(pp2):
    assert "needs pipeline_model_parallel_size > 1" in pp2[0]["errors/pipelined_at_pp1"]
    assert "with PP>1 use method='pipelined'" in pp2[0]["errors/recompute_at_pp2"]
