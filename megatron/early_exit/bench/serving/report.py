"""Rows, summary and table of the serving benchmark (keys: ``docs/benchmarks/serving.md``)."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping, Sequence

from megatron.early_exit.bench.serving.load import LoadResult
from megatron.early_exit.bench.serving.metrics import cross_talk, paired_ratio, percentile
from megatron.early_exit.bench.serving.workload import ServingRequest, generated_tokens

NUM_MESSAGES = 5
"""Error messages and cross-talk examples kept per row."""


def _first_messages(result: LoadResult) -> list[str]:
    messages = [f"{o.request.label()}: {o.error}" for o in result.failed]
    return list(dict.fromkeys(messages))[:NUM_MESSAGES]


def _rate(count: float, seconds: float) -> float | None:
    return count / seconds if seconds > 0 else None


def build_row(
    mode: str,
    round_index: int,
    load: LoadResult,
    alone: LoadResult,
    references: Mapping[ServingRequest, Mapping],
    warmup: LoadResult | None = None,
    server: Mapping | None = None,
) -> dict:
    """One row per (round, mode): throughput and latency under load, errors, cross-talk against
    ``references`` (each request answered alone), and ``server`` facts (pid, command, CPU)."""
    answered = load.answered
    latencies = [o.latency_s for o in answered]
    alone_latencies = [o.latency_s for o in alone.answered]
    tokens = sum(generated_tokens(o.answer) for o in answered)
    mismatches, unchecked = cross_talk([(o.request, o.answer) for o in answered], references)
    warmup = warmup or LoadResult()
    row = {
        "mode": mode,
        "round": round_index,
        "requests": len(load.outcomes) + load.not_sent,
        "answered": len(answered),
        "errors": len(load.failed),
        "error_messages": _first_messages(load),
        "not_sent": load.not_sent,
        "wall_seconds": load.wall_s,
        "requests_per_second": _rate(len(answered), load.wall_s),
        "generated_tokens": tokens,
        "tokens_per_second": _rate(tokens, load.wall_s),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "latency_mean_s": statistics.fmean(latencies) if latencies else None,
        "latency_max_s": max(latencies, default=None),
        "cross_talk": len(mismatches),
        "cross_talk_fields": dict(Counter(f for m in mismatches for f in m.fields)),
        "cross_talk_examples": [m.describe() for m in mismatches[:NUM_MESSAGES]],
        "unchecked": unchecked,
        "distinct_requests": len(alone.outcomes) + alone.not_sent,
        "alone_errors": len(alone.failed),
        "alone_error_messages": _first_messages(alone),
        "alone_not_sent": alone.not_sent,
        "alone_latency_p50_s": percentile(alone_latencies, 50),
        "alone_requests_per_second": _rate(len(alone.answered), alone.wall_s),
        "warmup_errors": len(warmup.failed) + warmup.not_sent,
        "warmup_error_messages": _first_messages(warmup),
    }
    row["errors_total"] = row["errors"] + row["alone_errors"] + row["warmup_errors"]
    server = dict(server or {})
    cpu = server.get("server_cpu_seconds")
    row.update(server)
    row["server_cpu_per_wall"] = cpu / load.wall_s if cpu is not None and load.wall_s else None
    return row


def _median(rows: Sequence[Mapping], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


SUMMED = ("requests", "answered", "errors", "errors_total", "not_sent", "cross_talk",
          "unchecked", "alone_errors", "warmup_errors")  # fmt: skip
MEDIAN = ("requests_per_second", "tokens_per_second", "latency_p50_s", "latency_p99_s",
          "wall_seconds", "server_cpu_seconds", "client_cpu_seconds", "server_cpu_per_wall",
          "alone_latency_p50_s", "alone_requests_per_second")  # fmt: skip


def summarize(rows: Sequence[Mapping], modes: Sequence[str], baseline: str) -> dict:
    """Per mode: medians over rounds of rates, latencies and CPU, sums of counts, and the median
    of per-round requests/s ratios to the ``baseline`` mode (None without it)."""
    rounds: dict[int, dict[str, float | None]] = {}
    for row in rows:
        rounds.setdefault(row["round"], {})[row["mode"]] = row["requests_per_second"]
    summary = {}
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        entry = {"rounds": len(mine)}
        entry.update({key: sum(r[key] for r in mine) for key in SUMMED})
        entry.update({key: _median(mine, key) for key in MEDIAN})
        entry["ratio_vs_" + baseline] = (
            paired_ratio(list(rounds.values()), mode, baseline) if baseline in modes else None
        )
        summary[mode] = entry
    return summary


HEADER = ("mode", "req/s", "tok/s", "p50 s", "p99 s", "errors", "cross-talk", "server CPU s",
          "wall s", "alone p50 s", "ratio")  # fmt: skip


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def format_row(row: Mapping) -> str:
    """One row in a line (printed as the run goes)."""
    return (
        f"{_fmt(row['requests_per_second'])} req/s, p50 {_fmt(row['latency_p50_s'], '.3f')} s, "
        f"p99 {_fmt(row['latency_p99_s'], '.3f')} s, {row['answered']}/{row['requests']} "
        f"answered, {row['errors_total']} errors, {row['cross_talk']} cross-talk, server CPU "
        f"{_fmt(row['server_cpu_seconds'], '.1f')} s in {_fmt(row['wall_seconds'], '.1f')} s"
    )


def format_table(summary: Mapping[str, Mapping], baseline: str) -> str:
    """The per-mode summary as a fixed-width table (``ratio``: requests/s over ``baseline``)."""
    lines = [HEADER]
    for mode, s in summary.items():
        lines.append((
            mode, _fmt(s["requests_per_second"]), _fmt(s["tokens_per_second"], ".1f"),
            _fmt(s["latency_p50_s"], ".3f"), _fmt(s["latency_p99_s"], ".3f"),
            str(s["errors_total"]), str(s["cross_talk"]), _fmt(s["server_cpu_seconds"], ".1f"),
            _fmt(s["wall_seconds"], ".1f"), _fmt(s["alone_latency_p50_s"], ".3f"),
            _fmt(s["ratio_vs_" + baseline]),
        ))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    cells = ((c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in lines)  # fmt: skip
    return "\n".join("  ".join(line) for line in cells)
