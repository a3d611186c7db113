"""TP=2 (with and without sequence parallelism) against TP=1 from the same weights and data.

One spawn of 2 gloo ranks runs every check; each pytest test asserts one of them. The oracle:
``reproducible_init_`` gives both layouts the same logical weights, so the final loss, every exit
loss, every exit's logits and every gathered gradient (after megatron-core's DDP and
``finalize_model_grads``) must agree within 1e-5 relative in fp32.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_distributed
from tests.helpers import (
    SEQ,
    VOCAB,
    backward_and_gather,
    make_batch,
    position_embedding_type,
    relative_error,
    tiny_config,
)

TOL = 1e-5
FAMILY_NAMES = ("gpt", "llama")
LAYOUTS = ("tp2", "tp2_sp")


def _build(family: str, tp: int, sp: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron.early_exit import platform
    from megatron.early_exit.model.builder import build_early_exit_model, reproducible_init_

    platform.initialize(tp, 1, seed=7)
    config = tiny_config(family, tensor_model_parallel_size=tp, sequence_parallel=sp)
    model = build_early_exit_model(
        config, VOCAB, SEQ, position_embedding_type=position_embedding_type(family)
    )
    reproducible_init_(model, seed=11, norm_jitter=0.1)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=False), model
    )
    return config, model, ddp


def _step(family: str, tp: int, sp: bool) -> dict:
    """Forward + backward of the weighted total loss; returns losses, logits and full grads."""
    config, model, ddp = _build(family, tp, sp)
    batch = make_batch(seed=3)
    final, exits = ddp(
        batch["input_ids"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
    )
    step = backward_and_gather(ddp, model, config, batch, final, exits)
    losses, grads = step["losses"], step["grads"]
    logits, exit_logits = step["final_logits"], step["exit_logits"]
    exit_checks = _exit_logits_match_manual(model, batch, exit_logits)
    exit_checks.update(_exit_losses_match_formula(config, batch, exits, exit_logits))
    return {
        "losses": {k: v.item() for k, v in losses.items()},
        "grads": grads,
        "logits": logits,
        "exit_logits": exit_logits,
        "exit_checks": exit_checks,
    }


def _exit_logits_match_manual(model, batch, exit_logits) -> dict:
    """Recompute each exit from the hidden state of its layer, run layer by layer by hand."""
    from megatron.core import tensor_parallel

    from megatron.early_exit.model.exit_heads import LayerInputs

    hidden = model.embedding(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    rotary = model.rotary_pos_emb(SEQ) if hasattr(model, "rotary_pos_emb") else None
    inputs = LayerInputs(attention_mask=batch["attention_mask"], rotary_pos_emb=rotary)
    states = [hidden]  # states[d] = hidden state after d layers; [s/tp, b, h] under SP
    with torch.no_grad():
        for layer in model.decoder.layers:
            hidden, _ = layer(hidden_states=hidden, **inputs.as_kwargs())
            states.append(hidden)
        errors = {}
        for exit_config in model.local_exit_configs:
            manual = model.exit_heads[exit_config.key](
                states[exit_config.depth], model.tied_exit_weight(), inputs, True
            ).transpose(0, 1)
            errors[exit_config.depth] = relative_error(exit_logits[exit_config.depth], manual)
        # An independent formula for the plain tied head: hidden @ E^T.
        for exit_config in model.local_exit_configs:
            if exit_config.structure == "head" and not exit_config.untied:
                state = (
                    tensor_parallel.gather_from_sequence_parallel_region(
                        states[exit_config.depth], tensor_parallel_output_grad=False
                    )
                    if model.config.sequence_parallel
                    else states[exit_config.depth]
                )
                embedding = tensor_parallel.gather_from_tensor_model_parallel_region(
                    model.tied_exit_weight().t()
                )  # [h, v]
                formula = (state @ embedding).transpose(0, 1)
                errors[f"{exit_config.depth}/formula"] = relative_error(
                    exit_logits[exit_config.depth], formula
                )
    errors["sequence_shard"] = states[0].shape[0]
    return errors


def _exit_losses_match_formula(config, batch, exits, exit_logits) -> dict:
    """Each exit's per-token training loss against an independent formula on its gathered logits:
    CE(logits / T) [* max softmax prob of logits / T when the weights are dynamic]."""
    import torch.nn.functional as F

    errors = {}
    for exit_config in config.exit_heads:
        logits = exit_logits[exit_config.depth].double() / exit_config.temperature
        expected = F.cross_entropy(
            logits.flatten(0, 1), batch["labels"].flatten(), reduction="none"
        ).view_as(batch["labels"])
        if config.dynamic_exit_loss_weight:
            expected = expected * torch.softmax(logits, dim=-1).max(dim=-1).values
        got = exits[exit_config.depth].detach()
        errors[f"{exit_config.depth}/loss_formula"] = relative_error(got, expected)
    return errors


def _tied_exit_reaches_embedding(tp: int) -> dict:
    """Backpropagate only the tied depth-1 exit; its grad must reach the word embedding's rows of
    tokens that never occur in the input (only the output projection can touch those)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    from megatron.early_exit.model.losses import masked_mean
    from megatron.early_exit.model.sharding import gather

    _, model, ddp = _build("gpt", tp, False)
    batch = make_batch(seed=5)
    _, exits = ddp(batch["input_ids"], batch["position_ids"], batch["attention_mask"],
                   labels=batch["labels"], exit_depths=[1])  # fmt: skip
    ddp.zero_grad_buffer()
    masked_mean(exits[1], batch["loss_mask"]).backward()
    finalize_model_grads([ddp])
    weight = model.embedding.word_embeddings.weight
    grad = gather(weight.main_grad, weight, parallel_state.get_tensor_model_parallel_group())
    unused = sorted(set(range(VOCAB)) - set(batch["input_ids"].flatten().tolist()))
    return {"unused_rows_grad_norm": grad[unused].norm().item(), "grad": grad}


def tp_worker(rank: int, world_size: int) -> dict:
    """Every TP check, as {name: relative error or value}."""
    out: dict = {}
    for family in FAMILY_NAMES:
        reference = _step(family, tp=1, sp=False)
        for layout in LAYOUTS:
            got = _step(family, tp=2, sp=layout == "tp2_sp")
            prefix = f"{family}/{layout}"
            for key, value in reference["losses"].items():
                out[f"{prefix}/loss/{key}"] = abs(got["losses"][key] - value) / abs(value)
            out[f"{prefix}/grads"] = max(
                (relative_error(got["grads"][n], g), n) for n, g in reference["grads"].items()
            )
            out[f"{prefix}/grad_names"] = sorted(got["grads"]) == sorted(reference["grads"])
            out[f"{prefix}/logits"] = relative_error(got["logits"], reference["logits"])
            for depth, logits in reference["exit_logits"].items():
                out[f"{prefix}/exit_logits/{depth}"] = relative_error(
                    got["exit_logits"][depth], logits
                )
            out[f"{prefix}/sequence_shard"] = got["exit_checks"].pop("sequence_shard")
            out[f"{prefix}/manual_exit"] = max(got["exit_checks"].values())
            out[f"{prefix}/manual_exit_count"] = len(got["exit_checks"])
    ref_tied = _tied_exit_reaches_embedding(tp=1)
    got_tied = _tied_exit_reaches_embedding(tp=2)
    out["tied/unused_rows_grad_norm"] = got_tied["unused_rows_grad_norm"]
    out["tied/grad"] = relative_error(got_tied["grad"], ref_tied["grad"])
    return out


@pytest.fixture(scope="module")
def tp_results() -> dict:
    results = run_distributed(tp_worker, 2)
    assert results[0].keys() == results[1].keys()
    return results[0]


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_losses_match_tp1(tp_results, family, layout):
    keys = [k for k in tp_results if k.startswith(f"{family}/{layout}/loss/")]
    assert len(keys) == 5  # the final loss and four exits
    for key in keys:
        assert tp_results[key] < TOL, (key, tp_results[key])


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_match_tp1(tp_results, family, layout):
    assert tp_results[f"{family}/{layout}/grad_names"]
    error, name = tp_results[f"{family}/{layout}/grads"]
    assert error < TOL, (name, error)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_inference_logits_match_tp1(tp_results, family, layout):
    assert tp_results[f"{family}/{layout}/logits"] < TOL
    keys = [k for k in tp_results if k.startswith(f"{family}/{layout}/exit_logits/")]
    assert len(keys) == 4
    for key in keys:
        assert tp_results[key] < TOL, (key, tp_results[key])


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_exits_match_independent_computation(tp_results, family, layout):
    assert tp_results[f"{family}/{layout}/manual_exit_count"] >= 4
    assert tp_results[f"{family}/{layout}/manual_exit"] < TOL


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_sequence_parallel_shards_the_sequence(tp_results, family):
    assert tp_results[f"{family}/tp2/sequence_shard"] == SEQ
    assert tp_results[f"{family}/tp2_sp/sequence_shard"] == SEQ // 2


def test_tied_exit_gradient_reaches_word_embedding(tp_results):
    assert tp_results["tied/unused_rows_grad_norm"] > 1e-6
    assert tp_results["tied/grad"] < TOL
