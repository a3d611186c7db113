"""``tools/bench_generation.py``: flags, prompts, loading, and the whole run.

At PP=1 (one process, or TP ranks under ``torchrun``) the rows are full decoding, KV
recomputation at each threshold, self-speculative decoding and the Hugging Face baseline. At
PP>1 (``torchrun`` with WORLD_SIZE = TP x PP) they are full decoding and pipelined early exit
at that layout; ``--baseline-json`` adds the ratio to a PP=1 run's full decoding. Rank 0
prints and writes; the other ranks run the same calls.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform as host
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron.early_exit.bench.generation import calibrated, report
from megatron.early_exit.bench.generation.measure import gather_profiles, measure
from megatron.early_exit.bench.generation.methods import (
    HF_METHOD,
    EngineRunner,
    MethodSpec,
    engine_params,
    load_hf_runner,
    method_specs,
)
from megatron.early_exit.bench.generation.metrics import UnitCosts
from megatron.early_exit.checkpoint.loading import Layout, load_for_inference
from megatron.early_exit.inference.decide import CONFIDENCE_MEASURES, DEFAULT_CONFIDENCE_MEASURE

DEFAULT_THRESHOLDS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
PP1_METHODS = ("full", "recompute", "speculative", "hf")
PIPELINE_METHODS = ("full", "pipelined")
ALL_METHODS = ("full", "recompute", "speculative", "pipelined", "hf")
SAMPLE_TEXT = Path(__file__).resolve().parents[4] / "tests" / "assets" / "brown_sample.txt"


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_generation.py",
        description="Generation benchmark: full decoding, early exit, self-speculation, HF.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--load", required=True, help="checkpoint directory (runs/tiny after `make demo`)")
    add("--tokenizer-model", default=None, help="override the tokenizer file the checkpoint names")
    add("--prompts-file", default=None,
        help="one prompt per line, or JSONL ({'text': ...}, {'prompt': ...} or a JSON string); "
        "default: sentence openings of the bundled held-out Brown sample")  # fmt: skip
    add("--num-prompts", type=int, default=12, help="use the first N prompts")
    add("--prompt-words", type=int, default=10, help="words per default prompt")
    add("--max-new-tokens", type=int, default=48)
    add("--batch-size", type=int, default=1, help="prompts decoded together (left-padded)")
    add("--methods", nargs="+", choices=ALL_METHODS, default=None,
        help=f"default: {' '.join(PP1_METHODS)} at PP=1, {' '.join(PIPELINE_METHODS)} at PP>1; "
        "full decoding always runs (the reference)")  # fmt: skip
    add("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS),
        help="exit thresholds of recompute and pipelined")  # fmt: skip
    add("--confidence-measure", default=DEFAULT_CONFIDENCE_MEASURE, choices=CONFIDENCE_MEASURES)
    add("--num-draft-tokens", type=int, nargs="+", default=[4], help="speculative: k values")
    add("--draft-exit-depths", type=int, nargs="+", default=None,
        help="speculative: draft exits (default: the shallowest exit)")  # fmt: skip
    add("--pipeline-parallel-size", type=int, default=1,
        help="PP>1 (under torchrun, WORLD_SIZE = TP x PP) compares full decoding with pipelined "
        "early exit at that layout")  # fmt: skip
    add(
        "--baseline-json",
        default=None,
        help="JSON of a PP=1 run: rows also get speedup_vs_baseline (over its full decoding)",
    )
    add("--repeats", type=int, default=3, help="timed rounds")
    add(
        "--stop-at-eos",
        action="store_true",
        help="rows end at the tokenizer's EOD (default: every row gets --max-new-tokens)",
    )
    add("--num-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    add("--compile", action="store_true",
        help="add a row of full decoding with torch.compile'd layers (its first call, which "
        "compiles, is reported)")  # fmt: skip
    add("--seed", type=int, default=1234)
    add("--output-json", default="runs/bench_generation.json", help="'' to skip")
    add("--output-plot", default="runs/bench_generation.png", help="'' to skip")
    calibrated.add_flags(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parsed flags; misuse exits with a message naming the flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    counts = ("num_prompts", "max_new_tokens", "batch_size", "repeats", "pipeline_parallel_size")
    problems = [f"--{n.replace('_', '-')} must be >= 1" for n in counts if getattr(args, n) < 1]
    if any(not 0.0 <= t <= 1.0 for t in args.thresholds):
        problems.append(f"--thresholds must lie in [0, 1], got {args.thresholds}")
    if any(k < 1 for k in args.num_draft_tokens):
        problems.append("--num-draft-tokens must be >= 1")
    pp = args.pipeline_parallel_size
    methods = args.methods or (PP1_METHODS if pp == 1 else PIPELINE_METHODS)
    args.methods = list(dict.fromkeys(["full", *methods]))
    if pp > 1:
        wrong = [m for m in args.methods if m not in PIPELINE_METHODS]
        if wrong:
            problems.append(f"at --pipeline-parallel-size > 1 only {PIPELINE_METHODS} run: {wrong}")
    elif "pipelined" in args.methods:
        problems.append("--methods pipelined needs --pipeline-parallel-size > 1 (under torchrun)")
    problems += calibrated.check_flags(args)
    if problems:
        parser.error("; ".join(problems))
    return args


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def default_prompts(num_prompts: int, num_words: int = 10) -> list[str]:
    """The first ``num_words`` words of sentences of the bundled Brown sample (file 01 of each
    genre, held out from the demo's training data), one genre after another."""
    blocks = [b.split("\n") for b in SAMPLE_TEXT.read_text(encoding="utf-8").split("\n\n")]
    sentences = [[s for s in block if len(s.split()) >= num_words + 4] for block in blocks]
    prompts = []
    for index in range(max(map(len, sentences))):
        for block in sentences:
            if index < len(block) and len(prompts) < num_prompts:
                prompts.append(" ".join(block[index].split()[:num_words]))
    return prompts


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts of a text file (one per line) or JSONL (JSON strings or objects with ``text``
    or ``prompt``); blank lines are skipped."""
    prompts = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith(("{", '"')):
            record = json.loads(line)
            if isinstance(record, dict):
                record = record.get("text", record.get("prompt"))
            if not isinstance(record, str):
                raise ValueError(f"{path}:{number}: no 'text' or 'prompt' string")
            line = record
        prompts.append(line)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What the run works on."""

    info: object
    model: object
    tokenizer: object
    texts: list[str]
    prompts: list[list[int]]
    tensor_parallel_size: int
    pipeline_parallel_size: int
    rank: int

    @property
    def exit_depths(self) -> list[int]:
        return [e.depth for e in self.model.config.exit_heads]


def prepare(args: argparse.Namespace) -> Setup:
    """Check the layout, load the model, read and tokenize the prompts."""
    import torch.distributed as dist

    from megatron.early_exit.inference import generate as generation

    pp = args.pipeline_parallel_size
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size % pp:
        raise ValueError(f"WORLD_SIZE={world_size} is not a multiple of PP={pp}")
    if pp > 1 and "pipelined" not in generation.METHODS:
        raise SystemExit(
            "pipelined decoding (PP>1) is not available in this version of "
            f"megatron.early_exit.inference.generate (methods: {', '.join(generation.METHODS)})"
            "; run with --pipeline-parallel-size 1"
        )
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    loaded = load_for_inference(
        args.load, Layout(world_size // pp, pp), seed=args.seed,
        tokenizer_model=args.tokenizer_model,
    )  # fmt: skip
    info, model, tokenizer = loaded.info, loaded.model, loaded.tokenizer
    if not model.config.exit_heads:
        raise ValueError(f"{args.load} has no exits: nothing to compare with full decoding")
    texts = read_prompts(args.prompts_file) if args.prompts_file else default_prompts(
        args.num_prompts, args.prompt_words)  # fmt: skip
    texts = texts[: args.num_prompts]
    prompts = [tokenizer.tokenize(t) or [tokenizer.eod] for t in texts]
    needed = max(map(len, prompts)) + args.max_new_tokens + max(args.num_draft_tokens) + 1
    if needed > info.model["max_sequence_length"]:
        raise ValueError(
            f"the longest prompt ({max(map(len, prompts))} tokens) + --max-new-tokens "
            f"{args.max_new_tokens} + draft tokens + 1 = {needed} exceeds the model's "
            f"{info.model['max_sequence_length']} positions"
        )
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Setup(info, model, tokenizer, texts, prompts, world_size // pp, pp, rank)


def build_runners(args: argparse.Namespace, setup: Setup, log) -> tuple[dict, str]:
    """``({row: runner}, what became of the HF baseline)``."""
    tokenizer = setup.tokenizer
    eos = tokenizer.eod if args.stop_at_eos else None
    settings = dict(
        max_new_tokens=args.max_new_tokens, measure=args.confidence_measure,
        eos_token_ids=(eos,) if eos is not None else (), pad_token_id=tokenizer.eod,
        seed=args.seed,
    )  # fmt: skip
    specs = method_specs(
        args.methods, args.thresholds, args.num_draft_tokens, args.draft_exit_depths,
        setup.exit_depths, compiled=args.compile,
    )  # fmt: skip
    runners: dict[MethodSpec, Callable] = {}
    hf_note = "not requested"
    for spec in specs:
        if spec.method != HF_METHOD:
            params = engine_params(spec, **settings)
            runners[spec] = EngineRunner(setup.model, params, args.batch_size, spec.compiled)
            continue
        runner, reason = None, "it runs in a single process (TP=1, PP=1); run without torchrun"
        if setup.tensor_parallel_size * setup.pipeline_parallel_size == 1:
            runner, reason = load_hf_runner(
                args.load, args.batch_size, args.max_new_tokens, tokenizer.eod, eos
            )
        if runner is None:
            hf_note = f"skipped: {reason}"
            log(f"Hugging Face baseline {hf_note}")
        else:
            hf_note, runners[spec] = "ran", runner
    return runners, hf_note


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict | None:
    """Run the benchmark; rank 0 prints, writes the files and returns the report."""
    setup = prepare(args)
    log = functools.partial(print, flush=True) if setup.rank == 0 else (lambda *_: None)
    calibration = None
    if args.target_agreement is not None:
        world_size = setup.tensor_parallel_size * setup.pipeline_parallel_size
        threshold, calibration = calibrated.calibrated_threshold(
            args, setup.model, setup.tokenizer, world_size, log
        )
        if threshold is not None and threshold not in args.thresholds:
            args.thresholds = [*args.thresholds, threshold]
    runners, hf_note = build_runners(args, setup, log)
    log(_banner(args, setup))
    started = time.perf_counter()
    records, samples = measure(
        runners, setup.model, setup.prompts, args.repeats, args.batch_size, log=log
    )
    costs = UnitCosts.from_samples(gather_profiles(records, samples))
    common = dict(
        confidence_measure=args.confidence_measure,
        pipeline_parallel_size=setup.pipeline_parallel_size,
        tensor_parallel_size=setup.tensor_parallel_size, batch_size=args.batch_size,
        num_prompts=len(setup.prompts), max_new_tokens=args.max_new_tokens,
    )  # fmt: skip
    # The cost model prices compute; what pipelining buys is overlap, which it does not model.
    rows = report.build_rows(records, costs, common, with_ideal=setup.pipeline_parallel_size == 1)
    baseline = _baseline_tokens_per_second(args.baseline_json)
    for row in rows:
        row["speedup_vs_baseline"] = row["tokens_per_second"] / baseline if baseline else None
    if setup.rank != 0:
        return None
    num_layers = setup.model.config.num_layers
    summary = report.unit_cost_summary(costs, num_layers, setup.exit_depths)
    meta = _meta(args, setup, hf_note, baseline, time.perf_counter() - started)
    meta["calibration"] = calibration
    result = {"meta": meta, "unit_costs": summary, "rows": rows}
    print(report.cost_line(summary, num_layers, args.batch_size))
    print(report.format_table(rows))
    line = report.headline(rows)
    if line is not None:
        print(line)
    if not all(r["deterministic"] for r in rows):
        print("warning: a method produced different tokens in different runs ('deterministic')")
    _write(args, setup, result)
    return result


def _baseline_tokens_per_second(path: str | None) -> float | None:
    if not path:
        return None
    rows = json.loads(Path(path).read_text())["rows"]
    full = [r for r in rows if r["method"] == "full" and r["pipeline_parallel_size"] == 1]
    if not full:
        raise ValueError(f"{path} has no PP=1 full-decoding row")
    return full[0]["tokens_per_second"]


def _write(args: argparse.Namespace, setup: Setup, result: dict) -> None:
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output_json}")
    if args.output_plot:
        title = (
            f"{Path(args.load).resolve().name}: {len(setup.prompts)} prompts x "
            f"{args.max_new_tokens} tokens, batch {args.batch_size}, "
            f"TP={setup.tensor_parallel_size} PP={setup.pipeline_parallel_size}"
        )
        report.write_plot(result["rows"], args.output_plot, title)
        print(f"wrote {args.output_plot}")


def _banner(args: argparse.Namespace, setup: Setup) -> str:
    config, lengths = setup.model.config, [len(p) for p in setup.prompts]
    exits = ", ".join(f"{e.depth} ({e.structure})" for e in config.exit_heads)
    return (
        f"checkpoint {args.load} (iteration {setup.info.iteration}): {config.num_layers} "
        f"layers, hidden {config.hidden_size}, vocab {setup.info.model['vocab_size']}, exits "
        f"at depths {exits}\n{len(lengths)} prompts ({min(lengths)}-{max(lengths)} tokens), "
        f"{args.max_new_tokens} new tokens each, batch {args.batch_size}, "
        f"TP={setup.tensor_parallel_size} PP={setup.pipeline_parallel_size}, {args.repeats} "
        f"timed rounds, {torch.get_num_threads()} torch threads"
    )


def _meta(args, setup: Setup, hf_note: str, baseline, seconds: float) -> dict:
    config = setup.model.config
    from megatron.early_exit import platform

    return {
        "checkpoint": str(Path(args.load).resolve()),
        "iteration": setup.info.iteration,
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": setup.info.model["vocab_size"],
        "exits": [
            {"depth": e.depth, "structure": e.structure, "untied": e.untied}
            for e in config.exit_heads
        ],  # fmt: skip
        "params_dtype": str(config.params_dtype),
        "prompts": setup.texts,
        "prompt_tokens": [len(p) for p in setup.prompts],
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "stop_at_eos": args.stop_at_eos,
        "tensor_parallel_size": setup.tensor_parallel_size,
        "pipeline_parallel_size": setup.pipeline_parallel_size,
        "reference": "full",
        "hf_baseline": hf_note,
        "baseline_full_tokens_per_second": baseline,
        "seconds": seconds,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "machine": host.machine(),
        "device": str(platform.device()),
        "argv": list(sys.argv[1:]),
    }


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Parse ``argv`` (default: the command line), run, tear the process group down."""
    from megatron.early_exit import platform

    args = parse_args(argv)
    try:
        return run(args)
    finally:
        platform.destroy()
