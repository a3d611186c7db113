"""The generation benchmark's pure parts: agreement, ROUGE-L, exit statistics, the cost model,
rows, table and plot, the HF runner, prompts and flags
(``megatron/early_exit/bench/generation``)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

from megatron.early_exit.bench.generation import metrics
from megatron.early_exit.bench.generation.cli import default_prompts, parse_args, read_prompts
from megatron.early_exit.bench.generation.measure import Measured
from megatron.early_exit.bench.generation.methods import (
    HF_METHOD,
    HFRunner,
    MethodSpec,
    Outputs,
    method_specs,
)
from megatron.early_exit.bench.generation.metrics import UnitCosts
from megatron.early_exit.bench.generation.report import (
    build_rows,
    format_table,
    markdown_table,
    paired_speedup,
    write_plot,
)

REPO = Path(__file__).resolve().parents[2]


# --- agreement and ROUGE-L


@pytest.mark.parametrize(
    "a, b, lcs",
    [
        ([], [], 0),
        ([1, 2, 3], [], 0),
        ([1, 2, 3], [1, 2, 3], 3),
        ([1, 2, 3, 4], [1, 3, 4, 5], 3),
        ([5, 1, 5, 2, 5, 3], [1, 2, 3], 3),
        ([1, 2, 3], [3, 2, 1], 1),
        ([7, 7, 7], [7, 8, 7], 2),
    ],
)
def test_lcs_length(a, b, lcs):
    assert metrics.lcs_length(a, b) == lcs
    assert metrics.lcs_length(b, a) == lcs


def test_rouge_l():
    assert metrics.rouge_l([], []) == 1.0
    assert metrics.rouge_l([1], []) == 0.0
    assert metrics.rouge_l([], [1]) == 0.0
    assert metrics.rouge_l([1, 2], [3, 4]) == 0.0
    assert metrics.rouge_l([1, 2, 3, 4], [1, 3, 4, 5]) == pytest.approx(0.75)
    # LCS 2, P = 2/2, R = 2/4: F1 = 2 * 1 * 0.5 / 1.5
    assert metrics.rouge_l([1, 3], [1, 2, 3, 4]) == pytest.approx(2 / 3)


def test_position_wise_agreement_counts_length_mismatches():
    assert metrics.matching_positions([1, 2, 3], [1, 2, 3]) == (3, 3)
    assert metrics.matching_positions([1, 9, 3], [1, 2, 3]) == (2, 3)
    assert metrics.matching_positions([1, 2], [1, 2, 3, 4]) == (2, 4)
    assert metrics.matching_positions([1, 2, 3, 4, 5], [1, 2]) == (2, 5)
    assert metrics.common_prefix_length([1, 2, 9, 4], [1, 2, 3, 4]) == 2
    assert metrics.common_prefix_length([1, 2], [1, 2, 3]) == 2


def test_agreement_pools_over_prompts():
    outputs = [[1, 2, 3, 4], [5, 6], [7, 0, 9]]
    references = [[1, 2, 3, 4], [5, 6, 8, 8], [7, 8, 9]]
    got = metrics.agreement(outputs, references)
    assert got.token == pytest.approx((4 + 2 + 2) / (4 + 4 + 3))
    assert got.prefix == pytest.approx((4 + 2 + 1) / (4 + 4 + 3))
    rouge = [1.0, 2 * 1 * 0.5 / 1.5, 2 / 3]
    assert got.rouge_l == pytest.approx(sum(rouge) / 3)
    same = metrics.agreement(references, references)
    assert (same.token, same.prefix, same.rouge_l) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        metrics.agreement([[1]], [[1], [2]])


def test_exit_statistics():
    stats = metrics.exit_statistics([[1, 4, 4], [2], []])
    assert stats.mean_exit_depth == pytest.approx((1 + 4 + 4 + 2) / 4)
    assert stats.shares == {1: 0.25, 2: 0.25, 4: 0.5}
    assert list(stats.shares) == [1, 2, 4]
    with pytest.raises(ValueError):
        metrics.exit_statistics([[], []])


# --- the cost model

L = 4
LAYER, EXIT, FINAL_NORM, FINAL_OUT = 1.0, 0.3, 0.1, 0.6  # seconds per call, made up
COSTS = UnitCosts(
    {
        ("layer", 1): LAYER,
        ("layer", 2): 1.5 * LAYER,
        ("exit1/norm", 1): 0.1,
        ("exit1/output_layer", 1): EXIT - 0.1,
        ("exit2/output_layer", 1): EXIT,
        ("final/norm", 1): FINAL_NORM,
        ("final/output_layer", 1): FINAL_OUT,
    }
)
FULL_TOKEN = L * LAYER + FINAL_NORM + FINAL_OUT


def _full_calls(tokens: int) -> Counter:
    return Counter(
        {("layer", 1): L * tokens, ("final/norm", 1): tokens, ("final/output_layer", 1): tokens}
    )


def test_unit_costs_are_medians_of_the_samples():
    samples = [(("layer", 1), s) for s in (3.0, 1.0, 2.0, 100.0, 2.5)] + [(("layer", 2), 4.0)]
    costs = UnitCosts.from_samples(samples)
    assert costs.seconds == {("layer", 1): 2.5, ("layer", 2): 4.0}
    assert costs.cost({("layer", 1): 2, ("layer", 2): 1}) == pytest.approx(9.0)
    with pytest.raises(ValueError, match="no measured unit cost"):
        costs.cost({("layer", 3): 1})


def test_heads_and_full_token():
    assert COSTS.head("exit1") == pytest.approx(EXIT)
    assert COSTS.head("exit2") == pytest.approx(EXIT)
    assert COSTS.head("final") == pytest.approx(FINAL_NORM + FINAL_OUT)
    assert COSTS.full_token(L) == pytest.approx(FULL_TOKEN)
    with pytest.raises(ValueError):
        COSTS.head("exit3")


def test_token_cost_counts_layers_and_every_exit_head_evaluated():
    # Left at exit 1 (only exit 1 evaluated); its 3 skipped layers recomputed later, or not.
    assert metrics.token_cost(COSTS, L, 1, [1]) == pytest.approx(L * LAYER + EXIT)
    assert metrics.token_cost(COSTS, L, 1, [1], recompute_skipped=False) == pytest.approx(
        LAYER + EXIT
    )
    # Reached the final head after evaluating both exits: dearer than a full-model token.
    assert metrics.token_cost(COSTS, L, L, [1, 2]) == pytest.approx(FULL_TOKEN + 2 * EXIT)


def test_ideal_speedup_prices_the_calls_each_run_made():
    tokens = 10
    assert (
        metrics.ideal_speedup(COSTS, _full_calls(tokens), tokens, _full_calls(tokens), tokens) == 1
    )
    # Never exits, but both exits are evaluated every step: slower than full decoding.
    never = _full_calls(tokens) + Counter(
        {("exit1/norm", 1): tokens, ("exit1/output_layer", 1): tokens,
         ("exit2/output_layer", 1): tokens}
    )  # fmt: skip
    expected = FULL_TOKEN / (FULL_TOKEN + 2 * EXIT)
    assert metrics.ideal_speedup(COSTS, _full_calls(tokens), tokens, never, tokens) == (
        pytest.approx(expected)
    )
    # Every other token exits at 1: it runs layer 1 and exit 1; the next token runs layer 1
    # alone, then layers 2-4 with the skipped position caught up (width 2), both exits and the
    # final head.
    pair = Counter(
        {("layer", 1): 2, ("layer", 2): 3, ("exit1/norm", 1): 2, ("exit1/output_layer", 1): 2,
         ("exit2/output_layer", 1): 1, ("final/norm", 1): 1, ("final/output_layer", 1): 1}
    )  # fmt: skip
    pair_cost = 2 * LAYER + 3 * 1.5 * LAYER + 2 * EXIT + EXIT + FINAL_NORM + FINAL_OUT
    calls = Counter({k: 5 * n for k, n in pair.items()})
    assert metrics.ideal_speedup(COSTS, _full_calls(tokens), tokens, calls, tokens) == (
        pytest.approx(FULL_TOKEN / (pair_cost / 2))
    )
    with pytest.raises(ValueError):
        metrics.ideal_speedup(COSTS, _full_calls(1), 1, Counter(), 0)


def test_work_per_token():
    calls = Counter(
        {("layer", 1): 6, ("layer", 2): 2, ("embedding", 1): 2, ("exit1/norm", 1): 3,
         ("exit1/output_layer", 1): 3, ("final/norm", 1): 1, ("final/output_layer", 1): 1}
    )  # fmt: skip
    assert metrics.work_per_token(calls, 2) == {
        "layer_calls": 4.0,
        "layer_positions": 5.0,
        "exit_projections": 1.5,
        "final_projections": 0.5,
    }


# --- rows, table, plot


def _record(spec, tokens, exit_layers, calls, wall, cpu=None):
    return Measured(spec, Outputs(tokens, exit_layers), calls, list(wall), list(cpu or wall))


def _records():
    full = MethodSpec("full")
    early = MethodSpec("recompute", threshold=0.5)
    hf = MethodSpec(HF_METHOD)
    full_calls = _full_calls(4)
    early_calls = Counter(
        {("layer", 1): 10, ("layer", 2): 3, ("exit1/norm", 1): 4, ("exit1/output_layer", 1): 4,
         ("exit2/output_layer", 1): 3, ("final/norm", 1): 3, ("final/output_layer", 1): 3}
    )  # fmt: skip
    return {
        full: _record(full, [[1, 2], [3, 4]], [[4, 4], [4, 4]], full_calls, [2.0, 1.0, 4.0]),
        early: _record(early, [[1, 2], [3, 5]], [[1, 4], [4, 4]], early_calls, [1.0, 1.0, 1.0]),
        hf: _record(hf, [[1, 2], [3, 4]], None, None, [0.5, 0.5, 0.5]),
    }


def test_paired_speedup_is_the_median_of_per_round_ratios():
    assert paired_speedup([1.0, 1.0, 1.0], [2.0, 1.0, 4.0], 4, 4) == 2.0
    assert paired_speedup([1.0], [1.0], 2, 4) == 0.5


def test_build_rows():
    rows = build_rows(_records(), COSTS, {"batch_size": 2})
    full, early, hf = rows
    assert [r["method"] for r in rows] == ["full", "recompute", HF_METHOD]
    assert full["speedup"] == 1.0 and full["ideal_speedup"] == 1.0 and full["agreement"] == 1.0
    assert full["tokens_per_second"] == pytest.approx(4 / 2.0)
    assert early["threshold"] == 0.5 and early["batch_size"] == 2
    assert early["speedup"] == 2.0
    assert early["agreement"] == pytest.approx(3 / 4)
    assert early["mean_exit_layer"] == pytest.approx(13 / 4)
    assert early["exit_shares"] == {"1": 0.25, "4": 0.75}
    assert early["module_calls"]["layer@2"] == 3
    early_cost = 10 * LAYER + 3 * 1.5 * LAYER + 4 * EXIT + 3 * EXIT + 3 * (FINAL_NORM + FINAL_OUT)
    assert early["module_seconds"] == pytest.approx(early_cost)
    assert early["ideal_speedup"] == pytest.approx(FULL_TOKEN / (early_cost / 4))
    assert hf["ideal_speedup"] is None and hf["exit_shares"] is None
    assert hf["speedup"] == 4.0 and hf["agreement"] == 1.0
    no_ideal = build_rows(_records(), COSTS, {}, with_ideal=False)
    assert all(r["ideal_speedup"] is None for r in no_ideal)
    json.dumps(rows)  # the rows are JSON as they are


def test_table_and_plot(tmp_path):
    rows = build_rows(_records(), COSTS, {})
    table = format_table(rows).splitlines()
    assert len(table) == 4 and table[0].split()[:3] == ["method", "thr", "tok/s"]
    assert "1:25% 4:75%" in table[2]
    assert markdown_table(rows).count("\n") == 4
    write_plot(rows, tmp_path / "plot.png", "title")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- methods, prompts, flags


def test_method_specs():
    specs = method_specs(
        ["full", "recompute", "speculative", "hf"], [1.0, 0.5], [2, 4], None, [2, 1]
    )
    assert specs == [
        MethodSpec("full"),
        MethodSpec("recompute", threshold=1.0),
        MethodSpec("recompute", threshold=0.5),
        MethodSpec("speculative", num_draft_tokens=2, draft_exit_depth=1),
        MethodSpec("speculative", num_draft_tokens=4, draft_exit_depth=1),
        MethodSpec(HF_METHOD),
    ]
    assert method_specs(["pipelined"], [0.8], [4], None, [1])[1] == MethodSpec(
        "pipelined", threshold=0.8
    )


def test_default_prompts():
    prompts = default_prompts(16, num_words=8)
    assert len(prompts) == 16 and len(set(prompts)) == 16
    assert all(len(p.split()) == 8 for p in prompts)


def test_read_prompts(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("first prompt\n\nsecond prompt\n")
    assert read_prompts(text) == ["first prompt", "second prompt"]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"text": "a"}\n{"prompt": "b"}\n"c"\n')
    assert read_prompts(jsonl) == ["a", "b", "c"]
    jsonl.write_text('{"other": 1}\n')
    with pytest.raises(ValueError, match="prompts.jsonl:1"):
        read_prompts(jsonl)


def test_flags():
    args = parse_args(["--load", "x"])
    assert args.methods == ["full", "recompute", "speculative", "hf"]
    assert args.thresholds == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    pp2 = parse_args(["--load", "x", "--pipeline-parallel-size", "2"])
    assert pp2.methods == ["full", "pipelined"]
    assert parse_args(["--load", "x", "--methods", "speculative"]).methods == [
        "full",
        "speculative",
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "pipelined"], "needs --pipeline-parallel-size > 1"),
        (["--pipeline-parallel-size", "2", "--methods", "recompute"], "only"),
        (["--thresholds", "1.5"], "--thresholds must lie in"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ],
)
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--load", "x", *argv])
    assert message in capsys.readouterr().err


def test_tool_help():
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_generation.py"), "--help"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "--pipeline-parallel-size" in out.stdout and "--output-json" in out.stdout


class _FakeHF(torch.nn.Module):
    """Records generate's inputs; 'generates' 100 + row index, then 7 (EOS), then 100s."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.generation_config = types.SimpleNamespace(eos_token_id=2)
        self.inputs = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.inputs.append((input_ids.tolist(), attention_mask.tolist(), kwargs))
        rows = [[100 + r, 7] + [100] * (max_new_tokens - 2) for r in range(len(input_ids))]
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_hf_runner_pads_left_and_applies_our_eos_rule():
    model = _FakeHF()
    runner = HFRunner(model, batch_size=2, max_new_tokens=4, pad_id=0, eos_id=None)
    assert model.generation_config.eos_token_id is None  # never stop early
    out = runner([[5, 6, 7], [8], [9, 9]])
    assert out.exit_depths is None
    assert out.tokens == [[100, 7, 100, 100], [101, 7, 100, 100], [100, 7, 100, 100]]
    ids, mask, kwargs = model.inputs[0]
    assert ids == [[5, 6, 7], [0, 0, 8]] and mask == [[1, 1, 1], [0, 0, 1]]
    assert kwargs["do_sample"] is False and kwargs["use_cache"] is True
    stopping = HFRunner(_FakeHF(), batch_size=4, max_new_tokens=4, pad_id=0, eos_id=7)
    assert stopping([[1], [2]]).tokens == [[100], [101]]  # EOS ends the row, unreported


def test_headline_and_overhead():
    from megatron.early_exit.bench.generation import report

    assert report.overhead_ms_per_step(2.0, 1.5, 100, 4) == pytest.approx(20.0)
    assert report.overhead_ms_per_step(2.0, 1.5, 0, 4) is None
    full = {"method": "full", "tokens_per_second": 50.0, "overhead_ms_per_step": 3.0}
    hf = {"method": "hf_transformers", "tokens_per_second": 100.0, "speedup": 2.0,
          "cpu_speedup": 4.0}  # fmt: skip
    line = report.headline([full, hf])
    assert "ours / HF = 0.50x" in line and "CPU time 0.25x" in line and "3.00 ms per step" in line
    assert report.headline([full]) is None
