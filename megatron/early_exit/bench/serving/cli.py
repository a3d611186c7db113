"""``tools/bench_serving.py``: flags and the whole run.

For each round, for each mode (the starting mode rotating from round to round): start a server
(``--batching MODE``; mode ``default`` passes no flag), check every prompt fits, warm up, run
the clients, send each distinct answered request alone, stop the server. Then the summary (per
mode: medians over rounds, and the median of per-round requests/s ratios to the baseline mode),
the table and the JSON. The whole run is bounded by ``--deadline``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform as host
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from megatron.early_exit.bench.serving import report
from megatron.early_exit.bench.serving.load import run_clients, send_alone
from megatron.early_exit.bench.serving.server import (
    DEFAULT_MODE,
    SERVER_SCRIPT,
    ServerProcess,
    ServerStartError,
    tokenized_lengths,
)
from megatron.early_exit.bench.serving.workload import (
    KINDS,
    ServingRequest,
    build_mix,
    check_fit,
    distinct,
    prompts_of,
)

MODES = (DEFAULT_MODE, "serial", "continuous")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_serving.py",
        description="Load benchmark of the REST server: concurrent clients, mixed requests.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--load", required=True, help="checkpoint the server loads (runs/tiny after `make demo`)")
    add("--modes", nargs="+", choices=MODES, default=["serial", "continuous"],
        help="server modes, each `--batching MODE`; 'default' passes no --batching")  # fmt: skip
    add("--baseline-mode", default="serial", help="the mode ratios are taken against")
    add("--clients", type=int, default=8, help="concurrent clients")
    add("--requests-per-client", type=int, default=25)
    add("--rounds", type=int, default=1, help="rounds of all modes, interleaved")
    add("--seed", type=int, default=0, help="seed of the request mix")
    add("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
        help="api: PUT /api; completion: POST /v1/completions; stream: it, streamed")  # fmt: skip
    add("--thresholds", type=float, nargs="+", default=[0.8],
        help="early-exit thresholds in the mix (early exit off is always in it)")  # fmt: skip
    add("--prompt-words", type=int, nargs="+", default=[2, 6, 12], help="prompt lengths (words)")
    add("--prompts-per-length", type=int, default=2)
    add("--max-tokens", type=int, nargs="+", default=[8, 16, 32], help="new tokens per request")
    add("--request-timeout", type=float, default=120.0, help="seconds per request")
    add("--deadline", type=float, default=1800.0, help="seconds for the whole run")
    add("--startup-timeout", type=float, default=300.0, help="seconds for a server to come up")
    add("--server-args", default="", help="more server flags, one shell-quoted string")
    add("--server-threads", type=int, default=None,
        help="OMP_NUM_THREADS of the server (default: inherited)")  # fmt: skip
    add("--server-script", default=str(SERVER_SCRIPT), help="the server entry point")
    add("--server-log-dir", default=None, help="keep the servers' logs here (default: dropped)")
    add("--out", default="runs/bench_serving.json", help="JSON report; '' to skip")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parsed flags; misuse exits with a message naming the flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    counts = ("clients", "requests_per_client", "rounds", "prompts_per_length")
    problems = [f"--{n.replace('_', '-')} must be >= 1" for n in counts if getattr(args, n) < 1]
    for name in ("request_timeout", "deadline", "startup_timeout"):
        if getattr(args, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be > 0")
    if any(not 0.0 <= t <= 1.0 for t in args.thresholds):
        problems.append(f"--thresholds must lie in [0, 1], got {args.thresholds}")
    if any(n < 1 for n in args.max_tokens):
        problems.append("--max-tokens must be >= 1")
    args.modes = list(dict.fromkeys(args.modes))
    try:
        args.prompts = prompts_of(args.prompt_words, args.prompts_per_length)
    except ValueError as error:
        problems.append(str(error))
    if problems:
        parser.error("; ".join(problems))
    return args


def mixes(args: argparse.Namespace) -> tuple[list[list[ServingRequest]], list[list]]:
    """``(the measured mix, the warm-up mix)``: the warm-up sends every (kind, threshold)
    combination at least once, from all clients at once."""
    thresholds = [None, *args.thresholds]
    common = dict(prompts=args.prompts, max_tokens=args.max_tokens, thresholds=thresholds,
                  kinds=args.kinds)  # fmt: skip
    mix = build_mix(args.seed, args.clients, args.requests_per_client, **common)
    per_client = math.ceil(len(args.kinds) * len(thresholds) / args.clients)
    warmup = build_mix(args.seed + 1, args.clients, per_client, **common)
    return mix, warmup


class RequestsDoNotFit(ValueError):
    """A prompt plus its new tokens is longer than the served model's positions."""


def _check_prompts(server: ServerProcess, requests: Sequence[ServingRequest]) -> None:
    prompts = sorted({r.prompt for r in requests})
    lengths = dict(zip(prompts, tokenized_lengths(server.url, prompts)))
    problems = check_fit(requests, lengths, server.health["max_sequence_length"])
    if problems:
        raise RequestsDoNotFit(
            "requests longer than the model's positions (shorten --prompt-words or "
            "--max-tokens): " + "; ".join(problems[:5])
        )


def run_mode(
    args: argparse.Namespace, mode: str, round_index: int, mix, warmup_mix, log_path: Path,
    deadline: float,
) -> dict:  # fmt: skip
    """One server in ``mode``: warm-up, the load, the references; returns the row."""
    env = {"OMP_NUM_THREADS": str(args.server_threads)} if args.server_threads else {}
    startup = min(args.startup_timeout, max(1.0, deadline - time.perf_counter()))
    server = ServerProcess(args.load, mode, log_path, args.server_args, env, startup,
                           args.server_script)  # fmt: skip
    with server:
        _check_prompts(server, distinct([r for c in mix + warmup_mix for r in c]))
        warmup = run_clients(server.url, warmup_mix, args.request_timeout, deadline)
        server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
        load = run_clients(server.url, mix, args.request_timeout, deadline)
        server_cpu_after, client_cpu_after = server.cpu_seconds(), time.process_time()
        answered = distinct(o.request for o in load.answered)
        references, alone = send_alone(server.url, answered, args.request_timeout, deadline)
        alive = server.alive()
    health = server.health or {}
    facts = {
        "server_command": server.command,
        "server_pid": server.pid,
        "server_startup_seconds": server.startup_seconds,
        "server_cpu_seconds": (server_cpu_after - server_cpu
                               if None not in (server_cpu, server_cpu_after) else None),
        "client_cpu_seconds": client_cpu_after - client_cpu,
        "server_alive_at_end": alive,
        "server_exit_code_before_stop": server.exit_code_before_stop,
        "deadline_reached": time.perf_counter() >= deadline,
        "model": {k: health.get(k) for k in ("model", "num_layers", "exit_layers",
                                             "max_sequence_length")},
    }  # fmt: skip
    return report.build_row(mode, round_index, load, alone, references, warmup, facts)


def run(args: argparse.Namespace) -> dict:
    """Every round of every mode; prints the table, writes ``--out``, returns the report."""
    mix, warmup_mix = mixes(args)
    started = time.perf_counter()
    deadline = started + args.deadline
    load_average = os.getloadavg() if hasattr(os, "getloadavg") else None
    flat = [r for client in mix for r in client]
    print(f"{args.clients} clients x {args.requests_per_client} requests ({len(distinct(flat))} "
          f"distinct), modes {' '.join(args.modes)}, {args.rounds} round(s), checkpoint "
          f"{args.load}", flush=True)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_serving_") as tmp:
        log_dir = Path(args.server_log_dir or tmp)
        for round_index in range(args.rounds):
            shift = round_index % len(args.modes)
            for mode in args.modes[shift:] + args.modes[:shift]:
                if time.perf_counter() >= deadline:
                    print(f"deadline reached: round {round_index} {mode} not run", flush=True)
                    continue
                log_path = log_dir / f"server_{mode}_round{round_index}.log"
                row = run_mode(args, mode, round_index, mix, warmup_mix, log_path, deadline)
                rows.append(row)
                print(f"round {round_index} {mode}: {report.format_row(row)}", flush=True)
    summary = report.summarize(rows, args.modes, args.baseline_mode)
    ratio_key = "ratio_vs_" + args.baseline_mode
    result = {
        "meta": _meta(args, flat, started, load_average, rows),
        "summary": summary,
        "rows": rows,
        "ratio": summary.get("continuous", {}).get(ratio_key) if "continuous" in summary else None,
    }
    print(report.format_table(summary, args.baseline_mode))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


def _meta(args, flat: Sequence[ServingRequest], started: float, load_average, rows) -> dict:
    return {
        "checkpoint": str(Path(args.load).resolve()),
        "model": rows[0]["model"] if rows else None,
        "modes": args.modes,
        "baseline_mode": args.baseline_mode,
        "clients": args.clients,
        "requests_per_client": args.requests_per_client,
        "rounds": args.rounds,
        "seed": args.seed,
        "distinct_requests": len(distinct(flat)),
        "mix": dict(Counter(r.label().rsplit("/", 2)[0] for r in flat)),
        "thresholds": args.thresholds,
        "prompt_words": args.prompt_words,
        "max_tokens": args.max_tokens,
        "request_timeout_s": args.request_timeout,
        "deadline_s": args.deadline,
        "server_args": args.server_args,
        "server_threads": args.server_threads,
        "seconds": time.perf_counter() - started,
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_start": list(load_average) if load_average else None,
        "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "machine": host.machine(),
        "argv": list(sys.argv[1:]),
    }


def _terminate(signum, _frame):
    raise SystemExit(128 + signum)  # unwinds through every `with ServerProcess`


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv`` (default: the command line) and run; SIGTERM stops the servers too."""
    args = parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(args)
    except (ServerStartError, RequestsDoNotFit) as error:
        hint = ""
        if "unrecognized arguments: --batching" in str(error):
            hint = "\n(this server has no --batching flag: run with --modes default)"
        raise SystemExit(f"bench_serving: {error}{hint}") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
