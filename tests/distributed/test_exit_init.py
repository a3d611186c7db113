"""``zero_mlp_output`` (``--exit-mlp-zero-init``): a new ``mlp`` exit starts as the logit lens;
``temperature`` (``--exit-temperature-init``) divides a new exit's starting logits by T.

Oracle: the same exit added with the ``norm`` structure (final-norm copy + head on the layer's
output) must give the same logits, and the MLP's input side is still the layer's copy; with
temperature T the logits are the lens's / T (the norm is RMSNorm or LayerNorm with bias)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_distributed
from tests.helpers import VOCAB, tiny_config


def init_worker(rank: int, world_size: int) -> dict:
    from megatron.early_exit import platform
    from megatron.early_exit.checkpoint.add_exits import add_exits_to_model
    from megatron.early_exit.config import ExitHeadConfig
    from megatron.early_exit.model.builder import build_early_exit_model

    platform.initialize(1, 1, seed=3)
    base_config = tiny_config("llama", exit_heads=(), include_final_loss=True)
    facts = dict(vocab_size=VOCAB, max_sequence_length=32, position_embedding_type="rope")
    base = build_early_exit_model(base_config, VOCAB, 32, position_embedding_type="rope", seed=5)

    def make_config(**overrides):
        return tiny_config("llama", **overrides)

    out = {}
    logits = {}
    for name, structure, zero, temperature in (
        ("zero", "mlp", True, 1.0),
        ("copy", "mlp", False, 1.0),
        ("lens", "norm", False, 1.0),
        ("zero_t4", "mlp", True, 4.0),
    ):
        exits = (ExitHeadConfig(2, structure=structure, untied=True),)
        _, model = add_exits_to_model(
            base, facts, make_config, exits, zero_mlp_output=zero, temperature=temperature
        )
        tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
        mask = torch.ones(1, 1, 12, 12, dtype=torch.bool).triu(1)
        with torch.no_grad():
            _, exit_logits = model(tokens, torch.arange(12).expand(2, -1), mask)
        logits[name] = exit_logits[2]
        state = model.state_dict()
        if structure == "mlp":
            out[f"{name}/fc2_zero"] = bool((state["exit_heads.2.mlp.linear_fc2.weight"] == 0).all())
            out[f"{name}/fc1_copied"] = torch.equal(
                state["exit_heads.2.mlp.linear_fc1.weight"],
                base.state_dict()["decoder.layers.1.mlp.linear_fc1.weight"],
            )
    out["zero_equals_lens"] = float((logits["zero"] - logits["lens"]).abs().max())
    out["copy_differs"] = float((logits["copy"] - logits["lens"]).abs().max())
    out["t4_error"] = float((logits["zero_t4"] * 4 - logits["lens"]).abs().max())
    out["lens_scale"] = float(logits["lens"].abs().max())
    errors = {}
    for name, structure, temperature in (("zero", "mlp", 0.0), ("head", "head", 2.0)):
        exits = (ExitHeadConfig(2, structure=structure, untied=True),)
        try:
            add_exits_to_model(base, facts, make_config, exits, temperature=temperature)
        except ValueError as exc:
            errors[name] = str(exc)
    out["errors"] = errors
    return out


@pytest.fixture(scope="module")
def result() -> dict:
    return run_distributed(init_worker, 1)[0]


def test_zero_init_mlp_exit_starts_as_the_logit_lens(result):
    assert result["zero/fc2_zero"] and result["zero/fc1_copied"]
    assert result["zero_equals_lens"] == 0.0


def test_copy_init_keeps_the_layer_mlp(result):
    assert not result["copy/fc2_zero"] and result["copy/fc1_copied"]
    assert result["copy_differs"] > 1e-3


def test_temperature_divides_the_starting_logits(result):
    assert result["t4_error"] <= 1e-5 * result["lens_scale"]


def test_temperature_errors_name_the_problem(result):
    assert "temperature must be > 0" in result["errors"]["zero"]
    assert "no norm to scale" in result["errors"]["head"]
