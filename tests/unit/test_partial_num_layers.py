"""How many layers EE-Tuning over K stages builds (``--tune-exit-pipeline-parallel-size``); pure."""

from __future__ import annotations

import pytest

from megatron.early_exit.config import EarlyExitTransformerConfig, make_exit_heads
from megatron.early_exit.training.run import partial_num_layers


def config(exit_layers, num_layers: int = 8, **overrides) -> EarlyExitTransformerConfig:
    return EarlyExitTransformerConfig(
        num_layers=num_layers,
        hidden_size=32,
        num_attention_heads=4,
        use_cpu_initialization=True,
        exit_heads=make_exit_heads(exit_layers, structure="norm", untied=True),
        untie_embeddings_and_output_weights=True,
        include_final_loss=False,
        **overrides,
    )


@pytest.mark.parametrize(
    ("exit_layers", "num_stages", "num_layers"),
    [
        ((2, 5), 1, 5),  # up to the deepest exit
        ((2, 5), 2, 6),  # rounded up to 3 layers per stage; layer 6 is read, never run
        ((2, 5), 3, 6),
        ((2, 5), 5, 5),
        ((8,), 4, 8),  # an exit on the last layer: every layer, no final norm or head
        ((1, 7), 2, 8),
        ((1, 7), 7, 7),
    ],
)
def test_layers_up_to_the_deepest_exit_split_evenly(exit_layers, num_stages, num_layers):
    assert partial_num_layers(config(exit_layers), num_stages) == num_layers


@pytest.mark.parametrize(
    ("exit_layers", "num_stages", "valid"),
    [
        ((2, 5), 4, "1, 2, 3, 5"),  # 2 layers per stage: the 4th stage would start at layer 7
        ((2, 5), 6, "1, 2, 3, 5"),  # more stages than layers
        ((1, 7), 3, "1, 2, 4, 7"),  # 3 layers per stage need 9 of the 8 layers
    ],
)
def test_stages_that_do_not_fit_list_the_valid_values(exit_layers, num_stages, valid):
    with pytest.raises(ValueError, match=f"valid values: {valid}$"):
        partial_num_layers(config(exit_layers), num_stages)


def test_exits_that_learn_from_the_final_head_are_refused():
    with pytest.raises(ValueError, match="final head's logits"):
        partial_num_layers(config((2,), exit_kl_weight=0.5), 1)
