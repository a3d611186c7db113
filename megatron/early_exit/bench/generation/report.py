"""Rows, table and plot of the generation benchmark (keys: ``docs/benchmarks/generation.md``)."""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from megatron.early_exit.bench.generation import metrics
from megatron.early_exit.bench.generation.measure import Measured
from megatron.early_exit.bench.generation.methods import MethodSpec
from megatron.early_exit.bench.generation.metrics import UnitCosts


def paired_speedup(
    times: Sequence[float], reference_times: Sequence[float], tokens: int, reference_tokens: int
) -> float:
    """Median over rounds of (tokens / time) / (reference tokens / reference time of the same
    round)."""
    return statistics.median(
        (tokens / t) / (reference_tokens / r) for t, r in zip(times, reference_times)
    )


def build_rows(
    records: Mapping[MethodSpec, Measured],
    costs: UnitCosts | None,
    common: Mapping[str, object],
    with_ideal: bool = True,
) -> list[dict]:
    """One row per record, in order; the record of method ``full`` is the reference."""
    reference = next(r for r in records.values() if r.spec.method == "full")
    rows = []
    for record in records.values():
        spec, tokens = record.spec, record.num_tokens
        quality = metrics.agreement(record.outputs.tokens, reference.outputs.tokens)
        wall = statistics.median(record.wall)
        row = {
            "method": spec.method,
            "threshold": spec.threshold,
            "num_draft_tokens": spec.num_draft_tokens,
            "draft_exit_depth": spec.draft_exit_depth,
            "compiled": spec.compiled,
            **common,
            "generated_tokens": tokens,
            "wall_seconds": wall,
            "wall_seconds_runs": list(record.wall),
            "cpu_seconds": statistics.median(record.cpu),
            "tokens_per_second": tokens / wall,
            "speedup": paired_speedup(record.wall, reference.wall, tokens, reference.num_tokens),
            "cpu_speedup": paired_speedup(record.cpu, reference.cpu, tokens, reference.num_tokens),
            "ideal_speedup": None,
            "agreement": quality.token,
            "prefix_agreement": quality.prefix,
            "rouge_l": quality.rouge_l,
            "mean_exit_layer": None,
            "exit_shares": None,
            "work_per_token": None,
            "module_calls": None,
            "module_seconds": None,
            "overhead_ms_per_step": None,
            "deterministic": record.deterministic,
        }
        if record.outputs.exit_depths is not None:
            stats = metrics.exit_statistics(record.outputs.exit_depths)
            row["mean_exit_layer"] = stats.mean_exit_depth
            row["exit_shares"] = {str(d): s for d, s in stats.shares.items()}
        if record.calls is not None:
            row["work_per_token"] = metrics.work_per_token(record.calls, tokens)
            row["module_calls"] = {metrics.key_name(k): n for k, n in sorted(record.calls.items())}
            if costs is not None:
                row["module_seconds"] = costs.cost(record.calls)
                row["overhead_ms_per_step"] = overhead_ms_per_step(
                    wall, row["module_seconds"], tokens, common.get("batch_size")
                )
                if with_ideal:
                    row["ideal_speedup"] = metrics.ideal_speedup(
                        costs, reference.calls, reference.num_tokens, record.calls, tokens
                    )
        rows.append(row)
    return rows


def overhead_ms_per_step(
    wall: float, module_seconds: float, tokens: int, batch_size: int | None
) -> float | None:
    """The engine's fixed cost of a decode step: wall time not spent in the profiled modules
    (layers, heads, embedding), per step of ``batch_size`` rows emitting one token each."""
    if not tokens or not batch_size:
        return None
    return 1e3 * (wall - module_seconds) * batch_size / tokens


def headline(rows: Sequence[Mapping]) -> str | None:
    """Full decoding against Hugging Face greedy ``generate`` in the same run (None without the
    HF row): the median of per-round tokens/s ratios, and the engine's fixed per-step cost."""
    full = next((r for r in rows if r["method"] == "full"), None)
    hf = next((r for r in rows if r["method"] == "hf_transformers"), None)
    if full is None or hf is None or not hf["speedup"]:
        return None
    line = (
        f"headline: full decoding {full['tokens_per_second']:.1f} tok/s, HF generate "
        f"{hf['tokens_per_second']:.1f} tok/s: ours / HF = {1.0 / hf['speedup']:.2f}x "
        f"(median of per-round ratios; CPU time {1.0 / hf['cpu_speedup']:.2f}x)"
    )
    if full["overhead_ms_per_step"] is not None:
        line += f"; engine overhead {full['overhead_ms_per_step']:.2f} ms per step"
    return line


def unit_cost_summary(costs: UnitCosts, num_layers: int, exit_depths: Sequence[int]) -> dict:
    """Milliseconds of the width-1 (decode-step) calls: a layer, each exit head (also in
    layers), the final head, the embedding and a full-model token; and every measured key."""
    layer = 1e3 * costs.layer(1)
    exits = {}
    for depth in exit_depths:
        try:
            exits[str(depth)] = 1e3 * costs.head(metrics.exit_module(depth), 1)
        except ValueError:  # no method evaluated this exit on a single position
            continue
    return {
        "layer_ms": layer,
        "exit_head_ms": exits,
        "exit_head_in_layers": {d: ms / layer for d, ms in exits.items()},
        "final_head_ms": 1e3 * costs.head(metrics.FINAL, 1),
        "embedding_ms": 1e3 * costs.seconds.get((metrics.EMBEDDING, 1), 0.0),
        "full_token_ms": 1e3 * costs.full_token(num_layers),
        "per_call_ms": {metrics.key_name(k): 1e3 * s for k, s in sorted(costs.seconds.items())},
    }


def cost_line(summary: Mapping, num_layers: int, batch_size: int) -> str:
    """The unit costs in one printed line."""
    exits = "".join(
        f"exit {d} {ms:.3f} ms ({summary['exit_head_in_layers'][d]:.2f} layers), "
        for d, ms in summary["exit_head_ms"].items()
    )
    return (
        f"unit costs (one decode step, batch {batch_size}): layer {summary['layer_ms']:.3f} ms, "
        f"{exits}final head {summary['final_head_ms']:.3f} ms; full-model token = embedding + "
        f"{num_layers} layers + final head = {summary['full_token_ms']:.3f} ms"
    )


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def row_label(row: Mapping) -> str:
    label = row["method"]
    if row["num_draft_tokens"] is not None:
        label += f" k={row['num_draft_tokens']} d={row['draft_exit_depth']}"
    if row.get("compiled"):
        label += " compiled"
    return label


HEADER = ("method", "thr", "tok/s", "speed-up", "ideal", "agree", "prefix", "ROUGE-L", "exit",
          "tokens per exit")  # fmt: skip


def _cells(row: Mapping) -> tuple[str, ...]:
    shares = row["exit_shares"] or {}
    return (
        row_label(row), _fmt(row["threshold"]), _fmt(row["tokens_per_second"], ".1f"),
        _fmt(row["speedup"]), _fmt(row["ideal_speedup"]), _fmt(row["agreement"], ".3f"),
        _fmt(row["prefix_agreement"], ".3f"), _fmt(row["rouge_l"], ".3f"),
        _fmt(row["mean_exit_layer"]),
        " ".join(f"{d}:{100 * s:.0f}%" for d, s in shares.items()) or "-",
    )  # fmt: skip


def format_table(rows: Sequence[Mapping]) -> str:
    """The rows as a fixed-width text table."""
    lines = [HEADER, *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    left = (0, len(HEADER) - 1)

    def render(line) -> str:
        cells = (
            x.ljust(w) if i in left else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths))
        )
        return "  ".join(cells).rstrip()

    return "\n".join(render(line) for line in lines)


def markdown_table(rows: Sequence[Mapping]) -> str:
    """The rows as a Markdown table (for ``docs/benchmarks``)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|---|" + "---:|" * (len(HEADER) - 2) + "---|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def write_plot(rows: Sequence[Mapping], path: str | os.PathLike, title: str) -> None:
    """Speed-up against token agreement, one series per method: filled markers measured,
    hollow markers (dashed) ideal; thresholds or draft lengths next to the points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    series: dict[str, list[Mapping]] = {}
    for row in rows:
        series.setdefault(row_label(row).split(" k=")[0], []).append(row)
    for index, (method, group) in enumerate(series.items()):
        color = f"C{index}"
        x = [r["agreement"] for r in group]
        ax.plot(x, [r["speedup"] for r in group], "o-", color=color, label=f"{method}")
        ideal = [r["ideal_speedup"] for r in group]
        if method != "full" and all(v is not None for v in ideal):
            ax.plot(x, ideal, "o--", color=color, mfc="none", alpha=0.6, label=f"{method} (ideal)")
        for r in group:
            if r["threshold"] is not None:
                note = f"{r['threshold']:g}"
            elif r["num_draft_tokens"] is not None:
                note = f"k={r['num_draft_tokens']}"
            else:
                continue
            ax.annotate(note, (r["agreement"], r["speedup"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8, color=color)  # fmt: skip
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("token agreement with full decoding")
    ax.set_ylabel("speed-up over full decoding (tokens/s)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
