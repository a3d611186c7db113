"""Calibration data from a real (tiny, random) model, and ``--target-agreement`` end to end.

One spawned rank: ``collect_calibration_data`` against the no-cache forward's own logits
(oracle: ``decide.confidence`` and the argmax of every head), the learned measure's shape and
range, then the generation benchmark with a calibrated row (certified target) and without one
(target 1.0: refused, no row added).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.harness import run_distributed

TEXT = "The jury said it did find that many of the election laws are outdated. " * 30


def calibrate_worker(rank: int, world_size: int, tmp: str) -> dict:
    import torch

    from megatron.early_exit import platform
    from megatron.early_exit.bench.generation.cli import main
    from megatron.early_exit.checkpoint.store import save_checkpoint
    from megatron.early_exit.inference.calibrate import (
        collect_calibration_data,
        collect_on_generations,
        greedy_continuations,
    )
    from megatron.early_exit.inference.decide import confidence
    from megatron.early_exit.model.builder import build_early_exit_model
    from tests.distributed.test_learned_exit import learned_config
    from tests.helpers import VOCAB, no_cache_forward, tiny_config

    platform.initialize(1, 1, seed=7)
    out: dict = {}
    model = build_early_exit_model(learned_config("gpt"), VOCAB, 64, seed=11).eval()
    windows = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(3))
    data = collect_calibration_data(model, windows, "margin", batch_size=2)
    final, exits = no_cache_forward(model, windows)
    depths = sorted(exits)
    expected_conf = torch.stack(
        [confidence(exits[d].reshape(36, -1), "margin") for d in depths], dim=1
    )
    expected_agree = torch.stack(
        [exits[d].argmax(-1).reshape(-1) == final.argmax(-1).reshape(-1) for d in depths], dim=1
    )
    out["depths"] = (list(data.depths), depths)
    out["conf_error"] = float((data.confidence - expected_conf).abs().max())
    out["agree_equal"] = bool(torch.equal(data.agrees, expected_agree))
    out["sequence_ids"] = data.sequence_ids.tolist()
    learned = collect_calibration_data(model, windows, "learned")
    out["learned_range"] = (float(learned.confidence.min()), float(learned.confidence.max()))
    out["learned_agree_equal"] = bool(torch.equal(learned.agrees, expected_agree))
    from megatron.early_exit.bench.shortlist import shortlist_fidelity

    out["fidelity"] = shortlist_fidelity(model, windows, (4, VOCAB), 0.05)
    prompts = windows[:, :5]
    sequences = greedy_continuations(model, prompts, 4, batch_size=2)
    final, exits = no_cache_forward(model, sequences)
    out["greedy"] = bool(torch.equal(sequences[:, 5:], final[:, 4:8].argmax(-1)))
    generated = collect_on_generations(model, prompts, 4, "max_prob", batch_size=2)
    kept_agree = torch.stack(
        [(exits[d].argmax(-1) == final.argmax(-1))[:, 4:].reshape(-1) for d in depths], dim=1
    )
    out["generated_tokens"] = generated.num_tokens
    out["generated_agree_equal"] = bool(torch.equal(generated.agrees, kept_agree))

    config = tiny_config("llama", init_method_std=0.3)
    model = build_early_exit_model(config, 257, 128, position_embedding_type="rope", seed=11)
    checkpoint = Path(tmp) / "ckpt"
    tokenizer = {"tokenizer_type": "ByteLevelTokenizer"}
    save_checkpoint(checkpoint, model, iteration=0, model_args={"tokenizer": tokenizer})
    prompts, text = Path(tmp) / "prompts.txt", Path(tmp) / "calibration.jsonl"
    prompts.write_text("Once upon a time\nIt was a bright cold day\n")
    text.write_text(json.dumps({"text": TEXT}) + "\n")
    from megatron.early_exit.bench.generation import calibrated

    decode_prompts = [
        list(range(40, 40 + n)) for n in (5, 7, 9)
    ]  # before main() tears the group down
    losses = calibrated.decoded_sequence_losses(
        model, decode_prompts, 6, "max_prob", 0, batch_size=2
    )
    out["decode_losses"] = (losses(1.0).tolist(), losses(0.0).tolist())
    for target in (0.9, 1.0):
        generate = ["--calibration-generate", "8"] if target == 1.0 else []
        argv = [*generate,
            "--load", str(checkpoint), "--prompts-file", str(prompts), "--max-new-tokens", "4",
            "--repeats", "1", "--methods", "recompute", "--thresholds", "1.0",
            "--target-agreement", str(target), "--calibration-text", str(text),
            "--calibration-seq-length", "32", "--calibration-windows", "12",
            "--save-calibration-data", str(Path(tmp) / f"data{target}.pt"),
            "--output-json", "", "--output-plot", "",
        ]  # fmt: skip
        report = main(argv)
        out[target] = {
            "thresholds": [r["threshold"] for r in report["rows"]],
            "calibration": report["meta"]["calibration"],
        }
    from megatron.early_exit.bench.generation import calibrated

    out["tool"] = calibrated.main([
        "--load", str(checkpoint), "--calibration-data", str(Path(tmp) / "data0.9.pt"),
        "--targets", "0.9", "1.0", "--output-json", str(Path(tmp) / "cal.json"),
    ])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    return run_distributed(calibrate_worker, 1, str(tmp_path_factory.mktemp("calibrate")))[0]


def test_collected_data_equals_the_no_cache_forward(result):
    assert result["depths"][0] == result["depths"][1]
    assert result["conf_error"] <= 1e-6
    assert result["agree_equal"] and result["learned_agree_equal"]
    assert result["sequence_ids"] == [0] * 12 + [1] * 12 + [2] * 12
    low, high = result["learned_range"]
    assert 0.0 < low <= high < 1.0


def test_benchmark_adds_a_row_at_the_certified_threshold(result):
    calibration = result[0.9]["calibration"]["calibration"]
    assert calibration["certified"] and calibration["threshold"] < 1.0
    assert calibration["threshold"] in result[0.9]["thresholds"]
    assert result[0.9]["calibration"]["test"]["num_tokens"] > 0


def test_uncertifiable_target_adds_no_row(result):
    calibration = result[1.0]["calibration"]["calibration"]
    assert not calibration["certified"] and "not certifiable" in calibration["reason"]
    assert result[1.0]["thresholds"] == [None, 1.0]


def test_calibration_tool_reports_the_held_out_split(result):
    certified, refused = result["tool"]
    assert certified["certified"] and 0.0 <= certified["test"]["agreement"] <= 1.0
    assert 0.0 < certified["test"]["mean_depth_fraction"] <= 1.0
    assert not refused["certified"] and "test" not in refused


def test_generations_are_greedy_and_keep_only_their_positions(result):
    assert result["greedy"]
    assert result["generated_tokens"] == 3 * 5  # positions 4..8 of 3 sequences
    assert result["generated_agree_equal"]


def test_decoded_losses_are_zero_without_exits_and_bounded_with_them(result):
    never, always = result["decode_losses"]
    assert never == [0.0, 0.0, 0.0]
    assert all(0.0 <= x <= 1.0 for x in always) and max(always) > 0.0


def test_shortlist_fidelity_is_exact_with_the_whole_vocabulary(result):
    rows = result["fidelity"]
    assert {r["k"] for r in rows} == {4, 64} and all(r["positions"] == 33 for r in rows)
    for row in rows:
        assert row["same_token"] >= row["recall"] - 1e-9  # listed top token => same token
        if row["k"] == 64:  # every token listed: the full projection's decision exactly
            assert row["recall"] == row["same_token"] == row["same_decision"] == 1.0
