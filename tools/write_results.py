"""Collect benchmark and exit-quality JSONs into one results folder: ``results.json`` (one row per
method, measure and threshold), a markdown table, and two PNG plots (speed-up against agreement;
exit usage per threshold).

    python tools/write_results.py --bench runs/x/bench_*.json --quality-before q0.json \\
        --quality-after q1.json --out docs/results [--title "..."] [--notes notes.md]

Every number comes from the input files; nothing is computed here but formatting and, for the
plots, grouping.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROW_KEYS = (
    "method", "confidence_measure", "threshold", "tokens_per_second", "speedup",
    "ideal_speedup", "agreement", "rouge_l", "mean_exit_layer", "exit_shares",
    "pipeline_parallel_size", "num_draft_tokens", "draft_exit_depth", "speedup_vs_baseline",
)  # fmt: skip


def load_rows(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """``(rows, metas)``: every bench row (the keys above) with its source file; each meta
    carries its run's ``unit_costs``."""
    rows, metas = [], []
    for path in paths:
        record = json.loads(path.read_text())
        meta = record.get("meta", {})
        metas.append({"file": path.name, **meta, "unit_costs": record.get("unit_costs", {})})
        for row in record["rows"]:
            kept = {key: row.get(key) for key in ROW_KEYS}
            kept["source"] = path.name
            if kept["method"] == "hf_transformers":
                kept["confidence_measure"] = None
            rows.append(kept)
    return rows, metas


def _f(value, spec=".2f") -> str:
    return "-" if value is None else format(value, spec)


def label(row: dict) -> str:
    name = row["method"]
    if name == "full":  # each bench run has its own, measured beside its rows
        return f"full ({Path(row['source']).stem})"
    if (row.get("pipeline_parallel_size") or 1) > 1:
        name += f" (PP={row['pipeline_parallel_size']})"
    if row["method"] in ("recompute", "pipelined"):
        name += f", {row['confidence_measure']}"
    if row["method"] == "speculative":
        name += f", k={row['num_draft_tokens']}, exit {row['draft_exit_depth']}"
    return name


def markdown_rows(rows: list[dict]) -> str:
    lines = [
        "| method | threshold | tokens/s | speed-up | ideal | agreement | ROUGE-L | mean exit "
        "layer | tokens per exit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        shares = row.get("exit_shares") or {}
        usage = " ".join(f"{d}:{100 * s:.0f}%" for d, s in shares.items() if s > 0)
        lines.append(
            f"| {label(row)} | {_f(row['threshold'])} | {_f(row['tokens_per_second'], '.1f')} | "
            f"{_f(row['speedup'])} | {_f(row['ideal_speedup'])} | {_f(row['agreement'], '.3f')} | "
            f"{_f(row['rouge_l'], '.3f')} | {_f(row['mean_exit_layer'], '.1f')} | {usage} |"
        )
    return "\n".join(lines)


def _exit_parts(per_call: dict, depth: str, width: int = 1) -> dict[str, float]:
    prefix = f"exit{depth}/"
    return {
        key[len(prefix) :].rsplit("@", 1)[0]: ms
        for key, ms in per_call.items()
        if key.startswith(prefix) and key.endswith(f"@{width}")
    }


COST_NOTE = (
    "Measured per-call milliseconds of each bench run: a layer at one position and at two (what "
    "KV recomputation runs after an early exit), an exit's transform (norms + MLP), its "
    "confidence head and its projection (averaged over exits), the final head (norm + "
    "projection). A decision at an exit costs the transform plus the confidence head with "
    "`learned`, the transform plus the projection with `max_prob`."
)


def _mean(values) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def cost_table(records: list[tuple[str, dict]]) -> str:
    """The :data:`COST_NOTE` table, one row per ``(run name, unit_costs)``."""
    lines = [
        "| run | layer (1 pos) | layer (2 pos) | exit transform | confidence head | exit "
        "projection | final head | learned decision | max-prob decision |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, unit in records:
        per_call = unit.get("per_call_ms") or {}
        exits = sorted(unit.get("exit_head_ms") or {}, key=int)
        parts = [_exit_parts(per_call, d) for d in exits]
        parts = [p for p in parts if p]
        transform = _mean([sum(v for k, v in p.items() if k in ("norm", "mlp_norm", "mlp", "layer"))
                          for p in parts])  # fmt: skip
        confidence = _mean([p.get("confidence_head") for p in parts])
        projection = _mean([p.get("output_layer") for p in parts])
        learned = None if transform is None or confidence is None else transform + confidence
        max_prob = None if transform is None or projection is None else transform + projection
        lines.append(
            f"| {name} | {_f(per_call.get('layer@1'))} | {_f(per_call.get('layer@2'))} | "
            f"{_f(transform)} | {_f(confidence)} | {_f(projection)} | "
            f"{_f(unit.get('final_head_ms'))} | {_f(learned)} | {_f(max_prob)} |"
        )
    return "\n".join(lines)


def runs_list(metas: list[dict]) -> str:
    """One line per bench run: its command line, threads, load and software."""
    lines = []
    for meta in metas:
        argv = shlex.join(meta.get("argv") or [])
        load = ", ".join(f"{x:.1f}" for x in meta.get("load_average") or [])
        layout = f"TP={meta.get('tensor_parallel_size')} PP={meta.get('pipeline_parallel_size')}"
        threads = f"{meta.get('torch_threads')} torch threads on {meta.get('cpu_count')} CPUs"
        lines.append(
            f"- `{meta['file']}`: `tools/bench_generation.py {argv}`; {layout}, {threads}, "
            f"load average {load}, {_f(meta.get('seconds'), '.0f')} s; torch {meta.get('torch')}, "
            f"Python {meta.get('python')}, checkpoint iteration {meta.get('iteration')}"
        )
    return "\n".join(lines)


def quality_table(before: dict | None, after: dict | None) -> str:
    if after is None:
        return ""
    heads_before = {h["head"]: h for h in (before or {}).get("heads", [])}
    lines = [
        "| head | ppl before | ppl after | agreement before | agreement after | confidence "
        "accuracy | confidence AUC |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for head in after["heads"]:
        old = heads_before.get(head["head"], {})
        lines.append(
            f"| {head['head']} | {_f(old.get('perplexity'), '.1f')} | "
            f"{_f(head['perplexity'], '.1f')} | {_f(old.get('agreement'), '.3f')} | "
            f"{_f(head['agreement'], '.3f')} | {_f(head.get('confidence_accuracy'), '.3f')} | "
            f"{_f(head.get('confidence_auc'), '.3f')} |"
        )
    return "\n".join(lines)


def plot_speedup(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    series: dict[str, list[dict]] = {}
    for row in rows:
        if row["method"] == "full" or row["speedup"] is None or row["agreement"] is None:
            continue
        key = label(row)
        series.setdefault(key, []).append(row)
    for key, points in series.items():
        points = sorted(points, key=lambda r: r["agreement"])
        ax.plot([r["agreement"] for r in points], [r["speedup"] for r in points], "o-", label=key)
        for r in points:
            if r["threshold"] is not None:
                ax.annotate(f"{r['threshold']:g}", (r["agreement"], r["speedup"]), fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("token agreement with full decoding (greedy)")
    ax.set_ylabel("tokens/s over full decoding (same run)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_exit_usage(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in rows if r["method"] == "recompute" and r.get("exit_shares")]
    if not chosen:
        return
    depths = sorted({d for r in chosen for d in r["exit_shares"]}, key=int)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"{r['confidence_measure']}\n{r['threshold']:g}" for r in chosen]
    bottom = [0.0] * len(chosen)
    for depth in depths:
        values = [r["exit_shares"].get(depth, 0.0) for r in chosen]
        ax.bar(range(len(chosen)), values, bottom=bottom, label=f"layer {depth}")
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(range(len(chosen)), labels, fontsize=7)
    ax.set_ylabel("share of generated tokens")
    ax.set_xlabel("KV recompute: confidence measure / threshold")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", nargs="+", required=True, help="bench_generation.py JSONs")
    parser.add_argument("--quality-before", default=None)
    parser.add_argument("--quality-after", default=None)
    parser.add_argument("--out", required=True, help="results folder")
    parser.add_argument("--title", default="early exit")
    parser.add_argument("--notes", default=None, help="markdown placed above the tables")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, metas = load_rows([Path(p) for p in args.bench])
    before = json.loads(Path(args.quality_before).read_text()) if args.quality_before else None
    after = json.loads(Path(args.quality_after).read_text()) if args.quality_after else None
    (out / "results.json").write_text(
        json.dumps(
            {"rows": rows, "runs": metas, "quality_before": before, "quality_after": after},
            indent=1,
        )
        + "\n"  # fmt: skip
    )
    plot_speedup(rows, out / "speedup_vs_agreement.png", args.title)
    plot_exit_usage(rows, out / "exit_usage.png", args.title)
    notes = Path(args.notes).read_text() if args.notes else ""
    text = [f"# Results: {args.title}", "", notes, "", "## Exit quality (held-out text)", ""]
    text += [quality_table(before, after), "", "## Decoding", "", markdown_rows(rows), ""]
    text += ["![speed-up vs agreement](speedup_vs_agreement.png)", ""]
    text += ["![exit usage](exit_usage.png)", ""]
    text += ["## Cost model (ms per call, one decode step, batch 1)", "", COST_NOTE, ""]
    text += [cost_table([(Path(m["file"]).stem, m["unit_costs"]) for m in metas]), ""]
    text += ["## Runs", "", runs_list(metas), ""]
    (out / "README.md").write_text("\n".join(text))
    print(f"wrote {out}/README.md, results.json and plots ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
