"""``tools/bench_generation.py`` end to end on a tiny checkpoint (one spawned rank).

The rank saves a random tiny Llama-family model (exits of all four structures after layers
1-4, untied; byte-level tokenizer) as a checkpoint, then runs the benchmark's ``main`` with a
prompts file, two thresholds, speculative decoding and the Hugging Face baseline, and returns
its report. Oracles: full decoding agrees with itself; threshold 1.0 never exits; threshold 0
exits every token at the first exit; greedy self-speculation and HF greedy generate reproduce
full decoding; the ideal speed-up is the cost model applied to the recorded calls.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.harness import run_distributed

THRESHOLDS = (1.0, 0.0)
NEW_TOKENS = 8
PROMPTS = ("The jury said", "It was a bright cold day in April", "Once upon")
ROW_KEYS = {
    "method", "threshold", "tokens_per_second", "speedup", "agreement", "mean_exit_layer",
    "ideal_speedup", "rouge_l", "prefix_agreement", "exit_shares", "work_per_token",
    "module_calls", "module_seconds", "generated_tokens", "wall_seconds", "cpu_speedup",
    "batch_size", "pipeline_parallel_size", "speedup_vs_baseline", "deterministic",
}  # fmt: skip


def bench_worker(rank: int, world_size: int, tmp: str) -> dict:
    from megatron.early_exit import platform
    from megatron.early_exit.bench.generation.cli import main
    from megatron.early_exit.checkpoint.store import save_checkpoint
    from megatron.early_exit.model.builder import build_early_exit_model
    from tests.helpers import tiny_config

    platform.initialize(1, 1, seed=7)
    config = tiny_config("llama", init_method_std=0.3)
    model = build_early_exit_model(config, 257, 128, position_embedding_type="rope", seed=11)
    checkpoint = Path(tmp) / "ckpt"
    tokenizer = {"tokenizer_type": "ByteLevelTokenizer"}
    save_checkpoint(checkpoint, model, iteration=0, model_args={"tokenizer": tokenizer})
    prompts = Path(tmp) / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = Path(tmp)
    argv = [
        "--load", str(checkpoint), "--prompts-file", str(prompts),
        "--max-new-tokens", str(NEW_TOKENS), "--batch-size", "2", "--repeats", "2",
        "--thresholds", *map(str, THRESHOLDS), "--num-draft-tokens", "3",
        "--output-json", str(out / "bench.json"), "--output-plot", str(out / "bench.png"),
    ]  # fmt: skip
    report = main(argv)
    return {
        "demo": _demo(checkpoint, out),
        "report": report,
        "json": json.loads((out / "bench.json").read_text()),
        "png": (out / "bench.png").read_bytes()[:8],
        "num_layers": config.num_layers,
    }


def _demo(checkpoint: Path, out: Path) -> dict:
    """``tools/generate_demo.py``'s comparison at threshold 0 (every token exits at the first
    exit) on two prompts."""
    from megatron.early_exit.bench.generation import demo
    from megatron.early_exit.checkpoint.loading import load_for_inference

    texts = out / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": p + " and more words"}) + "\n" for p in PROMPTS))
    args = demo.parse_args([
        "--load", str(checkpoint), "--text-jsonl", str(texts), "--num-prompts", "2",
        "--prompt-words", "3", "--max-new-tokens", "4", "--threshold", "0", "--rounds", "2",
    ])  # fmt: skip
    loaded = load_for_inference(checkpoint)
    result = demo.run(loaded.model, loaded.tokenizer, args)
    from megatron.early_exit import platform

    platform.destroy()
    return {
        "prompts": result["prompts"],
        "full_exits": [r.exit_depths for r in result["full"]],
        "early_exits": [r.exit_depths for r in result["early exit"]],
        "table": result["table"],
    }


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bench_generation")
    return run_distributed(bench_worker, 1, str(tmp))[0]


def _rows(result, method: str) -> list[dict]:
    return [r for r in result["json"]["rows"] if r["method"] == method]


def test_files_and_schema(result):
    assert result["png"] == b"\x89PNG\r\n\x1a\n"
    assert result["json"] == json.loads(json.dumps(result["report"]))
    rows = result["json"]["rows"]
    labels = [(r["method"], r["threshold"]) for r in rows]
    assert labels == [("full", None), *(("recompute", t) for t in THRESHOLDS),
                      ("speculative", None), ("hf_transformers", None)]  # fmt: skip
    for row in rows:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["generated_tokens"] == NEW_TOKENS * len(PROMPTS)
        assert row["tokens_per_second"] > 0 and len(row["wall_seconds_runs"]) == 2
        assert row["deterministic"]
    assert result["json"]["meta"]["hf_baseline"] == "ran"
    assert result["json"]["meta"]["prompts"] == list(PROMPTS)


def test_full_decoding_is_the_reference(result):
    (full,) = _rows(result, "full")
    assert full["agreement"] == full["rouge_l"] == full["prefix_agreement"] == 1.0
    assert full["speedup"] == full["ideal_speedup"] == 1.0
    assert full["mean_exit_layer"] == result["num_layers"]
    assert full["work_per_token"]["exit_projections"] == 0


def test_threshold_one_never_exits(result):
    (row,) = [r for r in _rows(result, "recompute") if r["threshold"] == 1.0]
    assert row["agreement"] == 1.0 and row["rouge_l"] == 1.0
    assert row["mean_exit_layer"] == result["num_layers"]
    assert row["exit_shares"] == {str(result["num_layers"]): 1.0}
    # Every exit is evaluated and none is used: more module work than full decoding.
    assert row["work_per_token"]["exit_projections"] > 0
    assert row["ideal_speedup"] < 1.0


def test_threshold_zero_exits_at_the_first_exit(result):
    (row,) = [r for r in _rows(result, "recompute") if r["threshold"] == 0.0]
    assert row["exit_shares"] == {"1": 1.0} and row["mean_exit_layer"] == 1.0
    # Even the prefill steps stop at exit 1: the final head never runs.
    assert row["module_calls"].get("final/output_layer@1", 0) == 0


def test_speculative_and_hf_reproduce_full_decoding(result):
    (spec,) = _rows(result, "speculative")
    assert spec["agreement"] == 1.0 and spec["num_draft_tokens"] == 3
    assert spec["draft_exit_depth"] == 1
    (hf,) = _rows(result, "hf_transformers")
    assert hf["agreement"] == 1.0 and hf["rouge_l"] == 1.0
    assert hf["ideal_speedup"] is None and hf["mean_exit_layer"] is None


def test_ideal_speedup_is_the_cost_model_of_the_recorded_calls(result):
    unit_ms = result["json"]["unit_costs"]["per_call_ms"]
    (full,) = _rows(result, "full")

    def cost_per_token(row) -> float:
        return (
            sum(n * unit_ms[key] for key, n in row["module_calls"].items())
            / (row["generated_tokens"])
        )

    for row in result["json"]["rows"]:
        if row["module_calls"] is None:
            continue
        assert row["module_seconds"] == pytest.approx(
            cost_per_token(row) * row["generated_tokens"] / 1e3
        )
        assert row["ideal_speedup"] == pytest.approx(cost_per_token(full) / cost_per_token(row))
    summary = result["json"]["unit_costs"]
    assert summary["full_token_ms"] == pytest.approx(
        summary["embedding_ms"] + result["num_layers"] * summary["layer_ms"]
        + summary["final_head_ms"]
    )  # fmt: skip
    assert set(summary["exit_head_ms"]) == {"1", "2", "3", "4"}


def test_generate_demo(result):
    demo = result["demo"]
    assert demo["prompts"] == ["The jury said", "It was a"]
    assert all(layers == [result["num_layers"]] * 4 for layers in demo["full_exits"])
    early = demo["early_exits"]  # threshold 0: every token at the first exit (or EOS sooner)
    assert all(layers and set(layers) == {1} for layers in early), early
    rows = {line.split()[0]: line.split() for line in demo["table"].splitlines()[2:]}
    assert rows["full"][-3:-1] == ["1.00", "1.00"] and rows["full"][-1] == "1.000"
    assert rows["early"][:2] == ["early", "exit"]
