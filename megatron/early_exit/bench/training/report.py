"""Rows (what ``--json`` writes), the printed table and the machine description."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
from dataclasses import dataclass, field

MIB = 1 << 20


@dataclass
class Row:
    """One configuration's result (what ``--json`` writes); ratios are to the suite's first row."""

    suite: str
    config: str
    wall_median_ms: float
    wall_q1_ms: float
    wall_q3_ms: float
    wall_min_ms: float
    wall_ratio: float  # median / baseline median
    wall_paired_ratio: float  # median over rounds of (time / baseline time of the same round)
    wall_paired_ratio_q1: float
    wall_paired_ratio_q3: float
    wall_min_ratio: float  # min / baseline min
    cpu_stage_ms: list[float]  # per stage, median CPU time per iteration
    busiest_cpu_ratio: float  # max over stages of median CPU, over the baseline's
    total_cpu_ratio: float  # sum over stages of median CPU, over the baseline's
    extra_microbatches: int  # warm-up fill microbatches per iteration
    skipped_backwards: list[int]  # per stage, cool-down fill
    saved_mib: list[float] = field(default_factory=list)  # per stage
    peak_mib: list[float | None] = field(default_factory=list)  # per stage
    wall_ms: list[float] = field(default_factory=list)  # every timed round


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def make_rows(suite: str, result: dict) -> list[Row]:
    """One row per configuration of a suite's result (:func:`.measure.run_suite`)."""
    wall, names = result["wall"], list(result["wall"])
    base = names[0]
    cpu = {n: [statistics.median(stage[n]) for stage in result["cpu"]] for n in names}
    rows = []
    for name in names:
        q1, median, q3 = _quartiles(wall[name])
        paired = [t / b for t, b in zip(wall[name], wall[base], strict=True)]
        p1, p2, p3 = _quartiles(paired)
        per_stage = [stage[name] for stage in result["memory"]]
        rows.append(
            Row(
                suite=suite,
                config=name,
                wall_median_ms=1e3 * median,
                wall_q1_ms=1e3 * q1,
                wall_q3_ms=1e3 * q3,
                wall_min_ms=1e3 * min(wall[name]),
                wall_ratio=median / statistics.median(wall[base]),
                wall_paired_ratio=p2,
                wall_paired_ratio_q1=p1,
                wall_paired_ratio_q3=p3,
                wall_min_ratio=min(wall[name]) / min(wall[base]),
                cpu_stage_ms=[1e3 * c for c in cpu[name]],
                busiest_cpu_ratio=max(cpu[name]) / max(cpu[base]),
                total_cpu_ratio=sum(cpu[name]) / sum(cpu[base]),
                extra_microbatches=result["extra"][name][0],
                skipped_backwards=list(result["extra"][name][1]),
                saved_mib=[m["saved"] / MIB for m in per_stage],
                peak_mib=[None if m["peak"] is None else m["peak"] / MIB for m in per_stage],
                wall_ms=[1e3 * t for t in wall[name]],
            )
        )
    return rows


def format_table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""

    def joined(values, fmt):
        return " / ".join("?" if v is None else format(v, fmt) for v in values)

    header = (
        "| config | wall ms median [IQR] | wall ratio | paired [IQR] | min ratio "
        "| CPU ms / stage | busiest CPU ratio | total CPU ratio | extra mb | skipped bwd "
        "| saved MiB / stage | peak MiB / stage |"
    )
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r.config} | {r.wall_median_ms:.0f} [{r.wall_q1_ms:.0f}-{r.wall_q3_ms:.0f}] "
            f"| {r.wall_ratio:.3f} | {r.wall_paired_ratio:.3f} "
            f"[{r.wall_paired_ratio_q1:.3f}-{r.wall_paired_ratio_q3:.3f}] "
            f"| {r.wall_min_ratio:.3f} | {joined(r.cpu_stage_ms, '.0f')} "
            f"| {r.busiest_cpu_ratio:.3f} | {r.total_cpu_ratio:.3f} "
            f"| {r.extra_microbatches} | {sum(r.skipped_backwards)} "
            f"| {joined(r.saved_mib, '.1f')} | {joined(r.peak_mib, '.0f')} |"
        )
    return "\n".join(lines)


def machine_info() -> dict:
    """Device, backend, CPU model, cores, load and versions of this machine."""
    import torch
    from megatron.core import __version__ as megatron_version

    from megatron.early_exit import platform

    cpu = "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            cpu = next((ln.split(":", 1)[1].strip() for ln in handle if "model name" in ln), cpu)
    return {
        "device": str(platform.device()),
        "backend": platform.distributed_backend(),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "megatron_core": megatron_version,
    }
