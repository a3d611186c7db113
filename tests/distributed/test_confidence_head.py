"""Distillation and confidence heads in the model: references, W=0 identity, TP/SP parity.

One spawn of 2 gloo ranks. For each family, the model with ``exit_kl_weight=0.5`` and a
confidence head on every exit runs forward + backward at TP=1, TP=2 and TP=2 with SP from the
same logical weights (``reproducible_init_``):

* every loss, every confidence term and every gathered gradient agree within 1e-5 relative, every
  KL term within 1e-6 nats (a KL of float32 log-probabilities carries ~1e-7 absolute rounding,
  which is more than 1e-5 of the small KLs of a tiny model);
* the KL terms equal ``KL(softmax(final) || softmax(exit / T))`` written out on the gathered
  logits, and the confidence terms equal the binary cross entropy written out from the head's
  logits and ``argmax(exit) == argmax(final)`` on the full vocabulary;
* the per-token exit losses of that model equal, bit for bit, those of the same weights with both
  features off, which equal the pre-feature formula (the head's logits, / T, megatron's cross
  entropy, x the dynamic weight), while their gradients differ;
* switching the confidence heads off leaves every other gradient unchanged (they read the exit's
  state detached);
* the vocab-parallel argmax breaks ties, inside and across shards, as ``torch.argmax`` does.
"""

from __future__ import annotations

import dataclasses

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
KL_ATOL = 1e-6
KL_WEIGHT = 0.5
CONFIDENCE_SIZE = 8
FAMILY_NAMES = ("gpt", "llama")
LAYOUTS = ("tp2", "tp2_sp")


def _config(family: str, tp: int, sp: bool, *, kl: float, confidence: int):
    exits = tuple(
        dataclasses.replace(e, confidence_hidden_size=confidence)
        for e in tiny_config(family).exit_heads
    )
    return tiny_config(
        family,
        tensor_model_parallel_size=tp,
        sequence_parallel=sp,
        exit_heads=exits,
        exit_kl_weight=kl,
        exit_confidence_loss_weight=0.7,
    )


def _step(family: str, tp: int, sp: bool, *, kl=KL_WEIGHT, confidence=CONFIDENCE_SIZE) -> dict:
    """Forward (deferred exits) + backward of the weighted total; losses, terms, full grads."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
    )

    from megatron.early_exit import platform
    from megatron.early_exit.model.builder import build_early_exit_model, reproducible_init_

    platform.initialize(tp, 1, seed=7)
    config = _config(family, tp, sp, kl=kl, confidence=confidence)
    model = build_early_exit_model(
        config, VOCAB, SEQ, position_embedding_type=position_embedding_type(family)
    )
    reproducible_init_(model, seed=11, norm_jitter=0.1)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=False), model
    )
    batch = make_batch(seed=3)
    head_logits = _capture_confidence_logits(model)
    final, pending = ddp(
        batch["input_ids"], batch["position_ids"], batch["attention_mask"],
        labels=batch["labels"], defer_exits=True,
    )  # fmt: skip
    per_token = {d: p.compute() for d, p in pending.items()}
    step = backward_and_gather(ddp, model, config, batch, final, per_token)
    losses, grads = step["losses"], step["grads"]
    final_logits, exit_logits = step["final_logits"], step["exit_logits"]
    return {
        "config": config,
        "model": model,
        "batch": batch,
        "losses": {k: v.item() for k, v in losses.items()},
        "per_token": {d: v.detach() for d, v in per_token.items()},
        "terms": {(d, name): t for d, p in pending.items() for name, t in p.components.items()},
        "head_logits": {d: torch.cat(v, dim=0) for d, v in head_logits.items()},
        "grads": grads,
        "final_logits": final_logits,
        "exit_logits": exit_logits,
    }


def _capture_confidence_logits(model) -> dict:
    """Every call's output of each exit's confidence head (this rank's sequence shard)."""
    captured: dict[int, list] = {}
    for exit_config in model.local_exit_configs:
        head = model.exit_heads[exit_config.key].confidence_head
        if head is not None:

            def hook(module, args, output, depth=exit_config.depth):
                captured.setdefault(depth, []).append(output.detach())

            head.register_forward_hook(hook)
    return captured


def _reference_errors(step: dict) -> dict:
    """KL and BCE terms against formulas written out on the gathered logits (float64)."""
    config = step["config"]
    final = step["final_logits"].double()  # [b, s, v]
    p = torch.softmax(final, dim=-1)
    errors = {}
    for exit_config in config.exit_heads:
        depth = exit_config.depth
        logits = step["exit_logits"][depth].double()
        log_q = torch.log_softmax(logits / exit_config.temperature, dim=-1)
        kl = (p * (p.log() - log_q)).sum(-1)  # [b, s]
        errors[f"{depth}/kl"] = _absolute_error(step["terms"][(depth, "kl")], kl)
        if not config.sequence_parallel:  # the hook saw the whole sequence
            x = step["head_logits"][depth].double().transpose(0, 1)  # [s, b] -> [b, s]
            target = (logits.argmax(-1) == final.argmax(-1)).double()
            sigmoid = 1.0 / (1.0 + torch.exp(-x))
            bce = -(target * sigmoid.log() + (1.0 - target) * (1.0 - sigmoid).log())
            errors[f"{depth}/bce"] = relative_error(step["terms"][(depth, "confidence")], bce)
            errors[f"{depth}/targets_mixed"] = 0.0 < target.mean().item() < 1.0
    return errors


def _absolute_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def _identity_checks(family: str, full: dict) -> dict:
    """TP=1: the exit losses with both features on equal those with both off, bit for bit, and
    the pre-feature formula; gradients change; the confidence heads leave other gradients."""
    from megatron.early_exit.model.exit_heads import LayerInputs
    from megatron.early_exit.model.losses import vocab_parallel_max_prob

    plain = _step(family, 1, False, kl=0.0, confidence=0)
    no_heads = _step(family, 1, False, confidence=0)
    model, batch = plain["model"], plain["batch"]
    rotary = model.rotary_pos_emb(SEQ) if hasattr(model, "rotary_pos_emb") else None
    inputs = LayerInputs(attention_mask=batch["attention_mask"], rotary_pos_emb=rotary)
    hidden = {}
    with torch.no_grad(), model._record_exit_inputs(model.local_exit_configs) as recorded:
        model(batch["input_ids"], batch["position_ids"], batch["attention_mask"])
        hidden.update(recorded)
    out = {}
    for exit_config in plain["config"].exit_heads:
        depth = exit_config.depth
        with torch.no_grad():
            logits = (
                model.exit_heads[exit_config.key](hidden[depth], model.tied_exit_weight(), inputs)
                / exit_config.temperature
            )
            weight = vocab_parallel_max_prob(logits).transpose(0, 1)
            formula = model.compute_language_model_loss(batch["labels"], logits)
            if plain["config"].dynamic_exit_loss_weight:
                formula = formula * weight
        out[f"{depth}/off_equals_formula"] = torch.equal(plain["per_token"][depth], formula)
        out[f"{depth}/on_equals_off"] = torch.equal(
            full["per_token"][depth], plain["per_token"][depth]
        )
    shared = [n for n in plain["grads"] if "confidence_head" not in n]
    out["grads_changed"] = max(relative_error(full["grads"][n], plain["grads"][n]) for n in shared)
    out["confidence_heads_leave_other_grads"] = max(
        relative_error(full["grads"][n], no_heads["grads"][n]) for n in shared
    )
    out["confidence_params"] = sum("confidence_head" in n for n in full["grads"])
    return out


def _argmax_checks() -> dict:
    """TP=2 global argmax on hand-made logits with ties inside and across the vocab shards."""
    from megatron.core import parallel_state

    from megatron.early_exit import platform
    from megatron.early_exit.model.losses import vocab_parallel_argmax

    platform.initialize(2, 1, seed=7)
    full = torch.tensor(
        [
            [[0.0, 1.0, 7.0, 0.0, 0.0, 7.0, 0.0, 7.0]],  # tie across shards: 2 (rank 0)
            [[0.0, 1.0, 2.0, 0.0, 9.0, 0.0, 9.0, 0.0]],  # tie inside rank 1: 4
            [[3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0]],  # last token
        ]
    )  # [s=3, b=1, v=8]
    rank = parallel_state.get_tensor_model_parallel_rank()
    local = full.chunk(2, dim=-1)[rank]
    return {"argmax/tp2": vocab_parallel_argmax(local).flatten().tolist()}


def parity_worker(rank: int, world_size: int) -> dict:
    out: dict = _argmax_checks()
    for family in FAMILY_NAMES:
        reference = _step(family, tp=1, sp=False)
        out.update({f"{family}/tp1/ref/{k}": v for k, v in _reference_errors(reference).items()})
        out.update(
            {f"{family}/identity/{k}": v for k, v in _identity_checks(family, reference).items()}
        )
        for layout in LAYOUTS:
            got = _step(family, tp=2, sp=layout == "tp2_sp")
            prefix = f"{family}/{layout}"
            out.update({f"{prefix}/ref/{k}": v for k, v in _reference_errors(got).items()})
            for key, value in reference["losses"].items():
                out[f"{prefix}/loss/{key}"] = abs(got["losses"][key] - value) / abs(value)
            for (depth, name), value in reference["terms"].items():
                error = _absolute_error if name == "kl" else relative_error
                out[f"{prefix}/term/{depth}/{name}"] = error(got["terms"][(depth, name)], value)
            out[f"{prefix}/grad_names"] = sorted(got["grads"]) == sorted(reference["grads"])
            out[f"{prefix}/grads"] = max(
                (relative_error(got["grads"][n], g), n) for n, g in reference["grads"].items()
            )
    return out


@pytest.fixture(scope="module")
def results() -> dict:
    results = run_distributed(parity_worker, 2)
    assert results[0].keys() == results[1].keys()
    return results[0]


def test_tp2_argmax_has_the_tp1_tie_rule(results):
    assert results["argmax/tp2"] == [2, 4, 7]


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("layout", ("tp1", *LAYOUTS))
def test_terms_match_reference_formulas(results, family, layout):
    prefix = f"{family}/{layout}/ref/"
    kl = [k for k in results if k.startswith(prefix) and k.endswith("/kl")]
    assert len(kl) == 4
    for key in kl:
        assert results[key] < KL_ATOL, (key, results[key])
    bce = [k for k in results if k.startswith(prefix) and k.endswith("/bce")]
    assert len(bce) == (0 if layout == "tp2_sp" else 4)
    for key in bce:
        assert results[key] < TOL, (key, results[key])
    if bce:  # both target classes occur (agreeing and disagreeing tokens)
        assert any(results[k.replace("/bce", "/targets_mixed")] for k in bce)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_losses_are_unchanged_in_value_and_bit_identical_when_off(results, family):
    prefix = f"{family}/identity/"
    for depth in (e.depth for e in tiny_config(family).exit_heads):
        assert results[f"{prefix}{depth}/off_equals_formula"], depth
        assert results[f"{prefix}{depth}/on_equals_off"], depth
    assert results[f"{prefix}grads_changed"] > 1e-3  # the KL term does train the exits
    assert results[f"{prefix}confidence_heads_leave_other_grads"] < 1e-6
    assert results[f"{prefix}confidence_params"] == 4 * 4  # two weights, two biases per exit


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tp2_matches_tp1(results, family, layout):
    prefix = f"{family}/{layout}"
    losses = [k for k in results if k.startswith(f"{prefix}/loss/")]
    terms = [k for k in results if k.startswith(f"{prefix}/term/")]
    assert len(losses) == 5 and len(terms) == 8  # final + 4 exits; kl + confidence per exit
    for key in losses + terms:
        tolerance = KL_ATOL if key.endswith("/kl") else TOL
        assert results[key] < tolerance, (key, results[key])
    assert results[f"{prefix}/grad_names"]
    error, name = results[f"{prefix}/grads"]
    assert error < TOL, (name, error)
