"""The lean step (``inference/lean.py``) against megatron-core's own no-cache forward.

One spawn of 2 gloo ranks runs TP=1 (both ranks alike) and then TP=2. For each model (the GPT-2
style and Llama style tiny families, which hold every exit structure between them, plus a Llama
variant with partial rotary and qk-layernorm) the engine decodes a left-padded batch through
four kinds of chunk and every logit is compared with the model's forward without a cache
(``tests.helpers.no_cache_forward``, one unpadded row at a time):

* ``prefill``: the padded prompts, every position's final and exit logits;
* ``stopped``: one token stopped at the shallowest exit (its position stays pending);
* ``catch_up``: the next token at full depth, the pending position joining it before the
  layers it skipped (logits of both positions);
* ``verify``: three tokens at once at an offset, as speculative verification feeds them.

A second spawn runs the same comparison under pipeline parallelism (PP=2, one stage per rank, the
GPT-2 and Llama families): each stage runs ``Engine(model, pipeline_stage=True)`` and passes its
hidden states to the next stage as pipelined decoding does (``StageCommunicator``), for the
padded prefill and three one-token decode steps; the exits on stage 0 (depths 1, 2), the exits
on stage 1 (depths 3, 4) and the final head are compared, within an absolute 1e-5 (relative to
the largest logit where it exceeds 1), with the no-cache forward of the PP=1 model of the same
weights (``reproducible_init_`` is independent of the layout).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import gather_dicts, run_distributed
from tests.helpers import (
    VOCAB,
    no_cache_forward,
    position_embedding_type,
    relative_error,
    tiny_config,
)

MAX_SEQ = 64
INIT_STD = 0.3
TOLERANCE = 1e-5
MODELS = ("gpt", "llama", "llama_partial_rope_qk_norm")
CHUNKS = ("prefill", "stopped", "catch_up", "verify")
PP_MODELS = ("gpt", "llama")
PP_DECODE_STEPS = 3
PP_CHUNKS = ("prefill", *(f"decode_{i + 1}" for i in range(PP_DECODE_STEPS)))
PP_STAGE_HEADS = {0: ["1", "2"], 1: ["3", "4", "final"]}


def _build(name: str, tp: int, pp: int = 1):
    from megatron.core import parallel_state

    from megatron.early_exit import platform
    from megatron.early_exit.model.builder import reproducible_init_
    from megatron.early_exit.model.gpt_model import EarlyExitGPTModel
    from megatron.early_exit.placement import tied_exit_stages

    family = "gpt" if name == "gpt" else "llama"
    overrides = {"qk_layernorm": True} if name.endswith("qk_norm") else {}
    config = tiny_config(
        family,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        init_method_std=INIT_STD,
        **overrides,
    )
    platform.initialize(tp, pp, seed=7, embedding_stages=tied_exit_stages(config))
    model = EarlyExitGPTModel(
        config,
        vocab_size=VOCAB,
        max_sequence_length=MAX_SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type=position_embedding_type(family),
        rotary_percent=0.5 if name.endswith("qk_norm") else 1.0,
    )
    reproducible_init_(model, 11, norm_jitter=0.2)
    return model.eval()


class _Collect:
    """``on_exit`` that records every exit's logits and stops at ``stop_depth`` (if given)."""

    def __init__(self, stop_depth: int | None = None):
        self.stop_depth = stop_depth
        self.logits: dict[int, torch.Tensor] = {}

    def __call__(self, depth, view) -> bool:
        self.logits[depth] = view.logits()
        return depth == self.stop_depth


def _oracle(model, pads, sequences) -> list[dict]:
    """Per row, ``{"final" or depth: logits [s, V]}`` of the no-cache forward of its tokens."""
    oracle = []
    for row, pad in enumerate(pads.tolist()):
        final, exits = no_cache_forward(model, sequences[row : row + 1, pad:])
        oracle.append({"final": final[0], **{d: v[0] for d, v in exits.items()}})
    return oracle


def _chunk_errors(oracle, pads, chunk_logits, error=relative_error) -> dict:
    """Largest ``error`` of each chunk's logits against the oracle's logits of each row."""
    errors = {}
    for chunk, (start, heads) in chunk_logits.items():
        worst = 0.0
        for head, logits in heads.items():  # logits [b, m, V] of slots [start, start + m)
            for row, pad in enumerate(pads.tolist()):
                skip = max(pad - start, 0)  # padding slots have no oracle
                first = start + skip - pad
                want = oracle[row][head][first : first + logits.shape[1] - skip]
                assert want.shape[0] == logits.shape[1] - skip, (chunk, head, row)
                worst = max(worst, error(logits[row, skip:], want))
        errors[chunk] = (worst, sorted(str(h) for h in heads))
    return errors


def lean_worker(rank: int, world_size: int) -> dict:
    from megatron.early_exit.inference.engine import Engine
    from megatron.early_exit.inference.generate import left_pad

    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (7, 3, 5)]
    extra = torch.randint(0, VOCAB, (len(prompts), 5), generator=generator)
    out = {}
    for tp in (1, 2):
        for name in MODELS:
            model = _build(name, tp)
            engine = Engine(model)
            depths = sorted(engine.exits)
            tokens, pads = left_pad(prompts, 0)
            width = tokens.shape[1]
            cache = engine.new_cache(pads, MAX_SEQ)
            chunks = {}
            prefill = _Collect()
            step = engine.forward(cache, tokens, depths, prefill, num_logits=width)
            chunks["prefill"] = (0, {"final": step.final_logits, **prefill.logits})
            stopped = _Collect(stop_depth=depths[0])
            engine.forward(cache, extra[:, :1], depths, stopped)
            chunks["stopped"] = (width, stopped.logits)
            assert len(cache.filled_depths) == 1, cache.filled_depths
            catch_up = _Collect()
            step = engine.forward(cache, extra[:, 1:2], depths, catch_up, num_logits=2)
            deep = {d: v for d, v in catch_up.logits.items() if d > depths[0]}
            chunks["catch_up"] = (width, {"final": step.final_logits, **deep})
            verify = _Collect()
            step = engine.forward(cache, extra[:, 2:5], depths, verify, num_logits=3)
            chunks["verify"] = (width + 2, {"final": step.final_logits, **verify.logits})
            sequences = torch.cat([tokens, extra], dim=1)
            oracle = _oracle(model, pads, sequences)
            for chunk, value in _chunk_errors(oracle, pads, chunks).items():
                out[f"tp{tp}/{name}/{chunk}"] = value
    return out


def _absolute_or_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected|, divided by max |expected| only where that exceeds 1: fp32 logits
    of 16-32 are 1.9e-6 apart, so an unnormalised exit (llama's ``head`` at depth 4 reaches 18)
    differs from megatron's by a few ulps over 1e-5 (1.4e-5 at PP=1 too)."""
    diff = (actual.double() - expected.double()).abs().max().item()
    return diff / max(1.0, expected.abs().max().item())


def _stage_step(engine, comm, cache, tokens, num_logits: int) -> dict:
    """One step of this stage as pipelined decoding runs it: stage 0 embeds ``tokens``, a later
    stage runs on the hidden states the previous stage sends; returns ``{head: logits}`` of the
    exits on this stage (and the final head on the last stage)."""
    hidden = None
    if not engine.is_first_stage:
        width = tokens.shape[1]
        shape = (width, tokens.shape[0], engine.model.config.hidden_size)
        hidden = comm.recv_prev(shape, engine.model.config.params_dtype)
        tokens = None
    collect = _Collect()
    step = engine.forward(
        cache, tokens, sorted(engine.exits), collect, num_logits=num_logits, hidden=hidden
    )
    if not engine.is_last_stage:
        comm.send_next(step.hidden)
        comm.wait_all()
    heads = dict(collect.logits)
    if step.final_logits is not None:
        heads["final"] = step.final_logits
    return heads


def pipelined_lean_worker(rank: int, world_size: int, models: tuple[str, ...]) -> dict:
    from megatron.core import parallel_state

    from megatron.early_exit.inference.engine import Engine
    from megatron.early_exit.inference.generate import left_pad
    from megatron.early_exit.pipeline.comm import StageCommunicator

    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (7, 3, 5)]
    extra = torch.randint(0, VOCAB, (len(prompts), PP_DECODE_STEPS), generator=generator)
    tokens, pads = left_pad(prompts, 0)
    width = tokens.shape[1]
    sequences = torch.cat([tokens, extra], dim=1)
    out = {}
    for name in models:
        oracle = _oracle(_build(name, 1), pads, sequences)  # PP=1, the same weights
        model = _build(name, 1, pp=2)
        stage = parallel_state.get_pipeline_model_parallel_rank()
        group = parallel_state.get_pipeline_model_parallel_group()
        comm = StageCommunicator(group, stage, 2, torch.device("cpu"))
        engine = Engine(model, pipeline_stage=True)
        cache = engine.new_cache(pads, MAX_SEQ)
        chunks = {"prefill": (0, _stage_step(engine, comm, cache, tokens, width))}
        for step in range(PP_DECODE_STEPS):
            heads = _stage_step(engine, comm, cache, extra[:, step : step + 1], 1)
            chunks[f"decode_{step + 1}"] = (width + step, heads)
        errors = _chunk_errors(oracle, pads, chunks, _absolute_or_relative_error)
        for chunk, value in errors.items():
            out[f"pp2/{name}/stage{stage}/{chunk}"] = value
    return gather_dicts(out)


@pytest.fixture(scope="module")
def results() -> dict:
    ranks = run_distributed(lean_worker, 2)
    assert ranks[0] == ranks[1]
    return ranks[0]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("tp", (1, 2))
def test_lean_step_equals_megatron_no_cache_forward(results, tp, name, chunk):
    error, heads = results[f"tp{tp}/{name}/{chunk}"]
    assert error < TOLERANCE, (error, heads)
    if chunk in ("prefill", "verify"):  # every exit and the final head were compared
        assert len(heads) == 5, heads


@pytest.fixture(scope="module")
def pp2_results() -> dict:
    ranks = run_distributed(pipelined_lean_worker, 2, PP_MODELS, timeout_s=300)
    assert ranks[0] == ranks[1]
    return ranks[0]


@pytest.mark.parametrize("chunk", PP_CHUNKS)
@pytest.mark.parametrize("stage", (0, 1))
@pytest.mark.parametrize("name", PP_MODELS)
def test_pp2_lean_stages_equal_megatron_no_cache_forward(pp2_results, name, stage, chunk):
    """Each stage's exits (and the last stage's final head) of the PP=2 lean step, prefill and
    decode steps of a left-padded batch, equal the PP=1 no-cache forward within 1e-5 (absolute,
    relative to logits over 1)."""
    error, heads = pp2_results[f"pp2/{name}/stage{stage}/{chunk}"]
    assert heads == PP_STAGE_HEADS[stage]
    assert error < TOLERANCE, (error, heads)
