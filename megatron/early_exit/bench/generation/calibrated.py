"""``--target-agreement``: a benchmark row at a Learn-then-Test calibrated threshold.

The calibration data (per-token confidences and agreements of every exit, see
``inference/calibrate.py``) comes from ``--calibration-data`` (a file written by
:meth:`CalibrationData.save`, or by this run with ``--save-calibration-data``) or is collected
here from ``--calibration-text`` with one no-cache forward per window (single process only).
With ``--calibration-generate K`` each window is instead a prompt that the model continues
greedily for ``K`` tokens, and only those positions count: the model's own text, whose exit
confidences can differ a lot from teacher-forced text's. The data is split by window:
``--calibration-test-fraction`` of the windows are held out and the certified threshold's
realised agreement on them is reported beside the calibration numbers.
The threshold then joins ``--thresholds``, so ``recompute`` gets a row at it; the benchmark's own
agreement column is the sequence-level check of the per-token certificate.

The calibration text must not contain the benchmark's prompts (a calibration on the test data
certifies nothing); no default is taken for that reason.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from megatron.early_exit.inference.calibrate import (
    CalibrationData,
    agreement_report,
    calibrate_by_decoding,
    calibrate_threshold,
    collect_calibration_data,
    collect_on_generations,
)
from megatron.early_exit.inference.exit_quality import token_windows


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibrated thresholds (Learn-then-Test)")
    add = group.add_argument
    add("--target-agreement", type=float, default=None,
        help="add a row at the threshold certified to reach this token agreement with full "
        "decoding with probability 1 - --calibration-delta")  # fmt: skip
    add("--calibration-delta", type=float, default=0.1, help="1 - confidence of the certificate")
    add("--calibration-data", default=None, help="calibration data file (CalibrationData.save)")
    add("--calibration-text", default=None,
        help="JSONL ({'text': ...}) or plain text to collect calibration data from; must not "
        "contain the benchmark prompts")  # fmt: skip
    add("--calibration-seq-length", type=int, default=128, help="tokens per calibration window")
    add("--calibration-windows", type=int, default=32, help="calibration windows to collect")
    add("--calibration-test-fraction", type=float, default=0.3,
        help="share of windows held out to report the realised agreement")  # fmt: skip
    add("--calibration-unit", default="token", choices=("token", "sequence"),
        help="the i.i.d. unit of the test (see inference/calibrate.py)")  # fmt: skip
    add("--calibration-generate", type=int, default=0,
        help="> 0: each calibration window is a prompt that the model continues greedily for "
        "this many tokens, and only those positions are kept (the model's own text, as in "
        "decoding); 0: teacher-forced text")  # fmt: skip
    add("--calibration-decode", action="store_true",
        help="certify on decoded sequences instead of per-token data: the calibration windows "
        "are prompts, each threshold of inference.calibrate.DECODE_GRID decodes them for "
        "--calibration-generate tokens, and the loss is 1 - position-wise agreement with full "
        "decoding (no per-token proxy; costs one decoding pass per threshold)")  # fmt: skip
    add("--save-calibration-data", default=None, help="write the collected data here")


def check_flags(args: argparse.Namespace) -> list[str]:
    """Problems with the calibration flags (empty when fine)."""
    problems = []
    if args.target_agreement is None:
        return problems
    if not 0.0 < args.target_agreement <= 1.0:
        problems.append(f"--target-agreement must be in (0, 1], got {args.target_agreement}")
    if not 0.0 < args.calibration_delta < 1.0:
        problems.append(f"--calibration-delta must be in (0, 1), got {args.calibration_delta}")
    if (args.calibration_data is None) == (args.calibration_text is None):
        problems.append("--target-agreement needs exactly one of --calibration-data and "
                        "--calibration-text")  # fmt: skip
    if not 0.0 < args.calibration_test_fraction < 1.0:
        problems.append("--calibration-test-fraction must be in (0, 1)")
    if args.calibration_generate < 0:
        problems.append("--calibration-generate must be >= 0")
    if args.calibration_decode and (args.calibration_text is None or args.calibration_generate < 1):
        problems.append("--calibration-decode needs --calibration-text and --calibration-generate")
    if min(args.calibration_seq_length, args.calibration_windows) < 1:
        problems.append("--calibration-seq-length and --calibration-windows must be >= 1")
    return problems


def read_calibration_texts(path: str | Path) -> list[str]:
    """Texts of a JSONL file (``text`` field) or, for other files, the whole file as one text."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{number}: no 'text' string")
            texts.append(record["text"])
    return texts


def load_or_collect(args: argparse.Namespace, model, tokenizer, world_size: int) -> CalibrationData:
    """The calibration data the flags name, collected in this process if need be."""
    if args.calibration_data:
        data = CalibrationData.load(args.calibration_data)
        if data.measure != args.confidence_measure:
            raise ValueError(
                f"{args.calibration_data} holds {data.measure!r} confidences, the run uses "
                f"--confidence-measure {args.confidence_measure}"
            )
        return data
    if world_size > 1:
        raise ValueError("--calibration-text collects in one process; pass --calibration-data")
    windows = calibration_windows(args, tokenizer)
    if args.calibration_generate:
        data = collect_on_generations(
            model, windows, args.calibration_generate, args.confidence_measure, batch_size=8
        )
    else:
        data = collect_calibration_data(model, windows, args.confidence_measure)
    if args.save_calibration_data:
        data.save(args.save_calibration_data)
    return data


def calibration_windows(args: argparse.Namespace, tokenizer) -> torch.Tensor:
    length = args.calibration_seq_length
    ids: list[int] = []
    for text in read_calibration_texts(args.calibration_text):
        ids += [*tokenizer.tokenize(text), tokenizer.eod]
        if len(ids) >= args.calibration_windows * length:
            break
    return token_windows(ids, length, args.calibration_windows)


def decoded_sequence_losses(
    model, prompts: list[list[int]], max_new_tokens: int, measure: str, pad_token_id: int,
    batch_size: int = 8,
):  # fmt: skip
    """``losses(threshold) -> [num_prompts]``: 1 - position-wise agreement of greedy early-exit
    decoding (KV recompute) at ``threshold`` with greedy full decoding, per prompt."""
    from megatron.early_exit.bench.generation.metrics import matching_positions
    from megatron.early_exit.inference.decide import ExitPolicy
    from megatron.early_exit.inference.generate import GenerationParams, generate

    def run(**settings) -> list[list[int]]:
        params = GenerationParams(max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                                  **settings)  # fmt: skip
        outputs = []
        for start in range(0, len(prompts), batch_size):
            outputs += [
                r.tokens for r in generate(model, prompts[start : start + batch_size], params)
            ]
        return outputs

    reference = run(early_exit=False)

    def losses(threshold: float) -> torch.Tensor:
        outputs = run(exit_policy=ExitPolicy(threshold=threshold, measure=measure))
        pairs = [matching_positions(o, r) for o, r in zip(outputs, reference)]
        return torch.tensor([1.0 - a / n if n else 0.0 for a, n in pairs], dtype=torch.float64)

    return losses


def calibrated_by_decoding(args, model, tokenizer, log) -> tuple[float | None, dict]:
    """``--calibration-decode``: certify on decoded calibration prompts."""
    windows = calibration_windows(args, tokenizer)
    depths = sorted(e.depth for e in model.config.exit_heads)
    losses = decoded_sequence_losses(
        model, windows.tolist(), args.calibration_generate, args.confidence_measure,
        tokenizer.eod,
    )  # fmt: skip
    result = calibrate_by_decoding(
        losses, args.target_agreement, args.calibration_delta, measure=args.confidence_measure,
        depths=depths,
    )  # fmt: skip
    summary = {"calibration": result.as_dict()}
    if not result.certified:
        log(f"calibrated threshold (decoded): none ({result.reason})")
        return None, summary
    log(
        f"calibrated threshold (decoded) {result.threshold:g} for agreement >= "
        f"{args.target_agreement} with probability {1 - args.calibration_delta:g} on "
        f"{result.num_units} decoded prompts: their agreement {result.calibration_agreement:.3f}"
    )
    return result.threshold, summary


def calibrated_threshold(
    args: argparse.Namespace, model, tokenizer, world_size: int, log
) -> tuple[float | None, dict]:
    """``(threshold or None, summary)``: None when the target cannot be certified (the summary
    says why; no row is faked)."""
    if args.calibration_decode:
        if world_size > 1:
            raise ValueError("--calibration-decode runs in one process")
        return calibrated_by_decoding(args, model, tokenizer, log)
    data = load_or_collect(args, model, tokenizer, world_size)
    model_depths = sorted(e.depth for e in model.config.exit_heads)
    if list(data.depths) != model_depths:
        raise ValueError(f"calibration data exits {data.depths} != model exits {model_depths}")
    calibration, test = data.split(1.0 - args.calibration_test_fraction, seed=args.seed)
    result = calibrate_threshold(
        calibration, args.target_agreement, args.calibration_delta, unit=args.calibration_unit
    )
    summary = {"calibration": result.as_dict(), "test_tokens": test.num_tokens}
    if not result.certified:
        log(f"calibrated threshold: none ({result.reason})")
        return None, summary
    report = agreement_report(test, result.threshold, model.config.num_layers)
    summary["test"] = report.as_dict()
    log(
        f"calibrated threshold {result.threshold:g} for agreement >= {args.target_agreement} "
        f"with probability {1 - args.calibration_delta:g} ({result.num_units} {result.unit}s): "
        f"calibration agreement {result.calibration_agreement:.3f}, exit rate "
        f"{result.calibration_exit_rate:.3f}; held-out {test.num_tokens} tokens: agreement "
        f"{report.agreement:.3f}, exit rate {report.exit_rate:.3f}"
    )
    return result.threshold, summary


# ---------------------------------------------------------------------------------------------
# tools/calibrate_exits.py: calibration and its held-out report, without the benchmark
# ---------------------------------------------------------------------------------------------


def calibration_table(data: CalibrationData, targets, delta: float, unit: str, test_fraction: float,
                      num_layers: int | None = None, seed: int = 0) -> list[dict]:  # fmt: skip
    """One row per target: the certified threshold and its agreement, exit rate and mean depth
    on the calibration split and on the held-out split."""
    calibration, test = data.split(1.0 - test_fraction, seed=seed)
    rows = []
    for target in targets:
        result = calibrate_threshold(calibration, target, delta, unit=unit)
        row = {"target": target, "delta": delta, **result.as_dict()}
        if result.certified:
            row["test"] = agreement_report(test, result.threshold, num_layers).as_dict()
        rows.append(row)
    return rows


def format_calibration_table(rows: list[dict]) -> str:
    lines = [f"{'target':>7}{'delta':>7}{'thr':>7}{'cal agree':>10}{'cal exit':>9}"
             f"{'test agree':>11}{'test exit':>10}{'depth':>7}"]  # fmt: skip
    for row in rows:
        if not row["certified"]:
            lines.append(f"{row['target']:>7g}{row['delta']:>7g}  never exit (not certifiable)")
            continue
        test = row["test"]
        lines.append(
            f"{row['target']:>7g}{row['delta']:>7g}{row['threshold']:>7.3f}"
            f"{row['calibration_agreement']:>10.3f}{row['calibration_exit_rate']:>9.3f}"
            f"{test['agreement']:>11.3f}{test['exit_rate']:>10.3f}"
            f"{test['mean_depth_fraction']:>7.3f}"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    from megatron.early_exit import platform
    from megatron.early_exit.checkpoint.loading import load_for_inference
    from megatron.early_exit.inference.decide import CONFIDENCE_MEASURES

    parser = argparse.ArgumentParser(description="Learn-then-Test exit thresholds of a checkpoint")
    parser.add_argument("--load", required=True)
    parser.add_argument("--confidence-measure", default="max_prob", choices=CONFIDENCE_MEASURES)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", default=None)
    add_flags(parser)
    args = parser.parse_args(argv)
    args.target_agreement = args.targets[0]
    problems = check_flags(args)
    if any(not 0.0 < t <= 1.0 for t in args.targets):
        problems.append(f"--targets must lie in (0, 1], got {args.targets}")
    if problems:
        parser.error("; ".join(problems))
    loaded = load_for_inference(args.load)
    data = load_or_collect(args, loaded.model, loaded.tokenizer, world_size=1)
    rows = calibration_table(
        data, args.targets, args.calibration_delta, args.calibration_unit,
        args.calibration_test_fraction, loaded.model.config.num_layers, args.seed,
    )  # fmt: skip
    print(
        f"{args.load}: {data.num_tokens} tokens, exits {list(data.depths)}, measure "
        f"{data.measure}, unit {args.calibration_unit}, held-out share "
        f"{args.calibration_test_fraction}"
    )
    print(format_calibration_table(rows))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(rows, indent=1, default=str) + "\n")
    platform.destroy()
    return rows
