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

MAX_SEQ = 64
INIT_STD = 0.3
TOLERANCE = 1e-5
MODELS = ("gpt", "llama", "llama_partial_rope_qk_norm")
CHUNKS = ("prefill", "stopped", "catch_up", "verify")


def _build(name: str, tp: int):
    from megatron.early_exit import platform
    from megatron.early_exit.model.builder import reproducible_init_
    from megatron.early_exit.model.gpt_model import EarlyExitGPTModel

    platform.initialize(tp, 1, seed=7)
    family = "gpt" if name == "gpt" else "llama"
    overrides = {"qk_layernorm": True} if name.endswith("qk_norm") else {}
    config = tiny_config(
        family, tensor_model_parallel_size=tp, init_method_std=INIT_STD, **overrides
    )
    model = EarlyExitGPTModel(
        config,
        vocab_size=VOCAB,
        max_sequence_length=MAX_SEQ,
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


def _chunk_errors(model, rows, pads, sequences, chunk_logits) -> dict:
    """Max relative error of each chunk's logits against the no-cache forward of each row."""
    oracle = []
    for row, pad in enumerate(pads.tolist()):
        final, exits = no_cache_forward(model, sequences[row : row + 1, pad:])
        oracle.append({"final": final[0], **{d: v[0] for d, v in exits.items()}})
    errors = {}
    for chunk, (start, heads) in chunk_logits.items():
        worst = 0.0
        for head, logits in heads.items():  # logits [b, m, V] of slots [start, start + m)
            for row, pad in enumerate(pads.tolist()):
                skip = max(pad - start, 0)  # padding slots have no oracle
                first = start + skip - pad
                want = oracle[row][head][first : first + logits.shape[1] - skip]
                worst = max(worst, relative_error(logits[row, skip:], want))
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
            for chunk, value in _chunk_errors(model, prompts, pads, sequences, chunks).items():
                out[f"tp{tp}/{name}/{chunk}"] = value
    return out


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
