"""``tools/bench_serving.py`` end to end, short: the tiny checkpoint of
``test_server_script`` served by ``tools/run_text_generation_server.py`` in each of ``MODES``,
3 clients x 4 mixed requests (every kind, with and without early exit); every answer under load
equals the same request answered alone, nothing fails, the server is gone afterwards.

``MODES`` are the benchmark's ``--modes``: one-request-at-a-time serving and continuous
batching. ``MIN_RATIO`` stays None: speed is shown by the benchmark run (numbers in
``docs/benchmarks/serving.md``), not by a timed test on a shared machine.
"""

from __future__ import annotations

import json

import psutil
import pytest

from megatron.early_exit.bench.serving.cli import main
from tests.distributed.test_server_script import _train

MODES = ["serial", "continuous"]
MIN_RATIO: float | None = None
"""Least continuous/serial requests/s ratio, checked when both modes run."""
CLIENTS, REQUESTS_PER_CLIENT = 3, 4
SUMMARY_KEYS = {
    "requests_per_second", "latency_p50_s", "latency_p99_s", "errors", "errors_total",
    "cross_talk", "unchecked", "server_cpu_seconds", "wall_seconds", "tokens_per_second",
}  # fmt: skip


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("bench_serving")
    _train(work / "ckpt")
    out = work / "bench.json"
    result = main([
        "--load", str(work / "ckpt"), "--modes", *MODES, "--clients", str(CLIENTS),
        "--requests-per-client", str(REQUESTS_PER_CLIENT), "--prompt-words", "2", "5",
        "--max-tokens", "4", "8", "--server-threads", "1", "--request-timeout", "30",
        "--deadline", "180", "--out", str(out),
    ])  # fmt: skip
    return {"result": result, "json": json.loads(out.read_text())}


@pytest.mark.parametrize("mode", MODES)
def test_no_errors_and_no_cross_talk(bench, mode):
    summary = bench["json"]["summary"][mode]
    (row,) = [r for r in bench["json"]["rows"] if r["mode"] == mode]
    assert summary["errors_total"] == 0, row["error_messages"] + row["alone_error_messages"]
    assert summary["cross_talk"] == 0, row["cross_talk_examples"]
    assert summary["answered"] == CLIENTS * REQUESTS_PER_CLIENT
    assert summary["unchecked"] == 0 and summary["not_sent"] == 0
    assert summary["requests_per_second"] > 0 and summary["server_cpu_seconds"] > 0


@pytest.mark.parametrize("mode", MODES)
def test_the_report_has_its_keys(bench, mode):
    report = bench["json"]
    assert report == json.loads(json.dumps(bench["result"]))
    assert set(report) == {"meta", "summary", "rows", "ratio"}
    assert SUMMARY_KEYS <= set(report["summary"][mode])
    mix = report["meta"]["mix"]
    assert {k.split("/")[0] for k in mix} == {"api", "completion", "stream"}
    assert {k.split("/")[1] for k in mix} == {"full", "ee0.8"}
    (row,) = [r for r in report["rows"] if r["mode"] == mode]
    assert ("--batching" in row["server_command"]) == (mode != "default")


def test_every_server_is_gone(bench):
    for row in bench["json"]["rows"]:
        try:
            command = psutil.Process(row["server_pid"]).cmdline()
        except psutil.NoSuchProcess:
            continue
        assert "run_text_generation_server.py" not in " ".join(command), row["server_pid"]


@pytest.mark.skipif(
    MIN_RATIO is None or not {"serial", "continuous"} <= set(MODES),
    reason="needs --modes serial continuous and MIN_RATIO",
)
def test_continuous_batching_outserves_serial(bench):
    assert bench["json"]["ratio"] >= MIN_RATIO
