"""``tools/bench_training.py`` end to end, tiny: the pp2 suite on two ranks it spawns itself
(through ``launch.run_distributed``), one timed round, its table and its ``--json``."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from megatron.early_exit.bench.training.cli import main

PP2_CONFIGS = [
    "megatron-core 1F1B, GPTModel",
    "early-exit executor, no exits",
    "exit @ end of stage 0, deferred",
    "exit @ end of stage 0, not deferred",
]
TINY = ["--hidden-size", "64", "--num-layers", "4", "--seq-length", "16", "--vocab-size", "256",
        "--micro-batch-size", "1", "--num-microbatches", "4"]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, str]:
    path = tmp_path_factory.mktemp("bench_training") / "bench.json"
    argv = ["--only", "pp2", "--iters", "2", "--warmup", "0", *TINY, "--json", str(path)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(path.read_text()), out.getvalue()


def test_json_has_the_machine_the_settings_and_a_row_per_configuration(run):
    payload, _ = run
    assert list(payload) == ["machine", "settings", "rows"]
    assert payload["settings"]["hidden_size"] == 64 and payload["settings"]["iters"] == 2
    assert payload["machine"]["backend"] in ("gloo", "nccl")
    assert [r["config"] for r in payload["rows"]] == PP2_CONFIGS
    assert {r["suite"] for r in payload["rows"]} == {"pp2"}


def test_rows_hold_measurements_of_both_stages(run):
    rows = run[0]["rows"]
    assert rows[0]["wall_ratio"] == rows[0]["wall_paired_ratio"] == 1.0
    for row in rows:
        assert len(row["wall_ms"]) == 2 and min(row["wall_ms"]) > 0
        assert len(row["cpu_stage_ms"]) == len(row["saved_mib"]) == len(row["peak_mib"]) == 2
        assert min(row["saved_mib"]) > 0  # every stage keeps activations for backward
        assert row["extra_microbatches"] == 0 and row["skipped_backwards"] == []  # no fill


def test_table_is_printed(run):
    _, out = run
    assert "## pp2 (2 ranks" in out
    for config in PP2_CONFIGS:
        assert f"| {config} |" in out
