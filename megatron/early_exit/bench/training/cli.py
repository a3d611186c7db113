"""``tools/bench_training.py``: flags and the whole run."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

from megatron.early_exit.bench.training.cases import SUITES, Settings
from megatron.early_exit.bench.training.measure import run_suite
from megatron.early_exit.bench.training.report import Row, format_table, machine_info, make_rows

DESCRIPTION = "Benchmark early-exit pipeline training against megatron-core's own 1F1B schedule."


def parse_args(argv=None) -> argparse.Namespace:
    """Parsed flags; misuse exits with a message naming the flag."""
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--iters", type=int, default=15, help="timed rounds per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--num-microbatches", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--backward-forward-ratio", type=float, default=2.0)
    parser.add_argument("--only", choices=("pp2", "pp4"), help="run one suite")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per suite")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    if args.num_layers % 4:
        parser.error("--num-layers must be a multiple of 4 (the pp4 suite splits it evenly)")
    if args.hidden_size % 64:
        parser.error("--hidden-size must be a multiple of 64 (heads of size 64)")
    return args


def main(argv=None) -> int:
    """Run the requested suites, print a table per suite, write ``--json`` if asked."""
    args = parse_args(argv)
    settings = Settings(
        iters=args.iters,
        warmup=args.warmup,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        num_microbatches=args.num_microbatches,
        vocab_size=args.vocab_size,
        backward_forward_ratio=args.backward_forward_ratio,
    )
    machine = machine_info()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    print("settings: " + ", ".join(f"{k}={v}" for k, v in asdict(settings).items()))
    suites = [args.only] if args.only else list(SUITES)
    rows: list[Row] = []
    for suite in suites:
        start = time.perf_counter()
        suite_rows = make_rows(suite, run_suite(suite, settings, args.timeout))
        rows.extend(suite_rows)
        print(f"\n## {suite} ({SUITES[suite][0]} ranks, {time.perf_counter() - start:.0f} s)")
        print(format_table(suite_rows))
    print(
        "\nratios are to each suite's first row; paired = median of per-round ratios; CPU = "
        "process CPU time per iteration (median over rounds; robust to other load on the machine)"
    )
    if args.json:
        with open(args.json, "w") as handle:
            payload = {
                "machine": machine,
                "settings": asdict(settings),
                "rows": [asdict(r) for r in rows],
            }
            json.dump(payload, handle, indent=2)
    return 0
