"""The training benchmark's pure parts (``megatron/early_exit/bench/training``): rows and their
ratios, the table, the flags, and the tool's ``--help``."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from megatron.early_exit.bench.training.cli import parse_args
from megatron.early_exit.bench.training.report import MIB, format_table, make_rows

REPO = Path(__file__).resolve().parents[2]
ROW_KEYS = [
    "suite", "config", "wall_median_ms", "wall_q1_ms", "wall_q3_ms", "wall_min_ms", "wall_ratio",
    "wall_paired_ratio", "wall_paired_ratio_q1", "wall_paired_ratio_q3", "wall_min_ratio",
    "cpu_stage_ms", "busiest_cpu_ratio", "total_cpu_ratio", "extra_microbatches",
    "skipped_backwards", "saved_mib", "peak_mib", "wall_ms",
]  # fmt: skip


def suite_result() -> dict:
    """What rank 0 of a two-stage suite returns: seconds per round, per-stage CPU and memory."""
    return {
        "wall": {"base": [1.0, 2.0, 3.0], "fast": [0.5, 1.0, 3.0]},
        "cpu": [{"base": [1.0, 1.0, 1.0], "fast": [0.5, 0.5, 0.5]},  # stage 0
                {"base": [2.0, 2.0, 2.0], "fast": [2.0, 2.0, 2.0]}],  # stage 1
        "memory": [{"base": {"saved": 2 * MIB, "peak": 4 * MIB},
                    "fast": {"saved": MIB, "peak": None}},
                   {"base": {"saved": MIB, "peak": 0}, "fast": {"saved": MIB, "peak": MIB}}],
        "extra": {"base": (0, (0, 0)), "fast": (2, (1, 0))},
    }  # fmt: skip


def test_rows_are_ratios_to_the_first_configuration():
    base, fast = make_rows("pp2", suite_result())
    assert list(asdict(base)) == ROW_KEYS  # the --json schema of docs/benchmarks/training.md
    assert json.loads(json.dumps(asdict(fast)))["config"] == "fast"
    assert base.wall_ratio == base.wall_paired_ratio == base.total_cpu_ratio == 1.0
    assert fast.wall_median_ms == pytest.approx(1000.0)
    assert (fast.wall_q1_ms, fast.wall_q3_ms) == pytest.approx((750.0, 2000.0))
    assert fast.wall_ratio == pytest.approx(0.5)
    assert fast.wall_paired_ratio == pytest.approx(0.5)  # median of 0.5, 0.5, 1.0
    assert fast.wall_min_ratio == pytest.approx(0.5)
    assert fast.cpu_stage_ms == pytest.approx([500.0, 2000.0])
    assert fast.busiest_cpu_ratio == pytest.approx(1.0)
    assert fast.total_cpu_ratio == pytest.approx(2.5 / 3.0)
    assert (fast.extra_microbatches, fast.skipped_backwards) == (2, [1, 0])
    assert (fast.saved_mib, fast.peak_mib) == ([1.0, 1.0], [None, 1.0])
    assert fast.wall_ms == pytest.approx([500.0, 1000.0, 3000.0])


def test_table_has_a_line_per_row_and_marks_unknown_memory():
    lines = format_table(make_rows("pp2", suite_result())).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| config | wall ms median [IQR] |")
    assert lines[3].startswith("| fast | 1000 [750-2000] | 0.500 |")
    assert lines[3].endswith("| 2 | 1 | 1.0 / 1.0 | ? / 1 |")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--iters", "0"], "--iters must be >= 1"),
        (["--num-layers", "6"], "--num-layers must be a multiple of 4"),
        (["--hidden-size", "96"], "--hidden-size must be a multiple of 64"),
        (["--only", "pp3"], "invalid choice"),
    ],
)
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_tool_help():
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_training.py"), "--help"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "against megatron-core's own 1F1B schedule" in " ".join(out.stdout.split())
    for flag in ("--iters", "--only", "--json", "--backward-forward-ratio", "--timeout"):
        assert flag in out.stdout
