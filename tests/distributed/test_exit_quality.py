"""``exit_quality``: held-out loss, agreement and confidence-head quality per exit.

Oracles: the model's own per-token losses (megatron's vocab-parallel cross entropy, with labels)
for the loss column, a brute-force pairwise count for the ROC AUC, a direct search over the
temperatures for each head's best temperature.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.distributed.harness import run_distributed
from tests.distributed.test_learned_exit import learned_config
from tests.helpers import VOCAB


def quality_worker(rank: int, world_size: int) -> dict:
    from megatron.early_exit import platform
    from megatron.early_exit.inference.exit_quality import exit_quality
    from megatron.early_exit.model.builder import build_early_exit_model

    platform.initialize(1, 1, seed=7)
    model = build_early_exit_model(learned_config("gpt"), VOCAB, 64, seed=11).eval()
    windows = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(2))
    rows = {r.head: r for r in exit_quality(model, windows, batch_size=2)}
    inputs, labels = windows[:, :-1], windows[:, 1:]
    s = inputs.shape[1]
    with torch.no_grad():
        final, exits = model(
            inputs, torch.arange(s).expand(3, -1), torch.ones(1, 1, s, s, dtype=torch.bool).triu(1),
            labels=labels,
        )  # fmt: skip
    reference = {
        "final": float(final.mean()),
        **{str(d): float(v.mean()) for d, v in exits.items()},
    }
    from megatron.early_exit.inference.exit_quality import TEMPERATURES

    with torch.no_grad():
        final, exits = model(
            inputs, torch.arange(s).expand(3, -1), torch.ones(1, 1, s, s, dtype=torch.bool).triu(1),
            runtime_gather_output=True,
        )  # fmt: skip
    best = {}
    for head, logits in {"final": final, **{str(d): v for d, v in exits.items()}}.items():
        losses = [
            float(
                torch.nn.functional.cross_entropy(
                    (logits.float() / t).reshape(-1, logits.shape[-1]), labels.reshape(-1)
                )
            )
            for t in TEMPERATURES
        ]
        best[head] = (TEMPERATURES[losses.index(min(losses))], min(losses))
    return {
        "rows": {k: r.as_dict() for k, r in rows.items()},
        "reference_loss": reference,
        "best_temperature": best,
    }


@pytest.fixture(scope="module")
def result() -> dict:
    return run_distributed(quality_worker, 1)[0]


def test_losses_equal_the_models_own_cross_entropy(result):
    for head, loss in result["reference_loss"].items():
        assert abs(result["rows"][head]["loss"] - loss) <= 1e-5 * abs(loss), head


def test_final_head_agrees_with_itself_and_exits_report_confidence(result):
    rows = result["rows"]
    assert rows["final"]["agreement"] == 1.0 and rows["final"]["confidence_mean"] is None
    assert all(rows[h]["tokens"] == 48 for h in rows)
    for head in ("1", "2", "3", "4"):
        assert 0.0 <= rows[head]["agreement"] <= 1.0
        assert 0.0 < rows[head]["confidence_mean"] < 1.0
        assert 0.0 <= rows[head]["confidence_accuracy"] <= 1.0


def test_best_temperature_against_a_direct_search(result):
    for head, (temperature, loss) in result["best_temperature"].items():
        row = result["rows"][head]
        assert row["best_temperature"] == temperature, head
        assert row["best_temperature_loss"] == pytest.approx(loss, rel=1e-5), head
        assert row["best_temperature_loss"] <= row["loss"] + 1e-6, head


def test_roc_auc_against_pairwise_counting():
    from megatron.early_exit.inference.exit_quality import roc_auc

    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40,), generator=generator).float()  # many ties
    positives = torch.rand(40, generator=generator) < 0.4
    pos, neg = scores[positives].tolist(), scores[~positives].tolist()
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    assert roc_auc(scores, positives) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert roc_auc(scores, torch.ones(40, dtype=torch.bool)) is None
