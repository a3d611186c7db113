"""How often Learn-then-Test thresholds miss their target on synthetic scores
(``tools/calibration_coverage.py``; the table in ``docs/exit_calibration_shortlist_sparse_kl.md``).

Synthetic model: each exit's confidence is uniform on [0, 1], independent across exits and
tokens, and the exit agrees with the final head with probability ``score ** power`` (``POWERS``,
earlier exits less reliable at the same score). For each seed the threshold is calibrated on
``n`` fresh tokens and its agreement is measured on one large fresh sample; a *miss* is a
realised agreement below the target, which LTT allows with probability at most ``delta``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from megatron.early_exit.inference.calibrate import (
    CalibrationData,
    agreement_report,
    calibrate_threshold,
)

POWERS = (3.0, 2.0, 1.0)
DEPTHS = (4, 8, 12)


def synthetic(num_tokens: int, seed: int, tokens_per_sequence: int = 50) -> CalibrationData:
    """Synthetic calibration data with known agreement probability ``score ** power``."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, len(POWERS), generator=generator)
    p_agree = scores ** torch.tensor(POWERS)
    agrees = torch.rand(num_tokens, len(POWERS), generator=generator) < p_agree
    sequence_ids = torch.arange(num_tokens) // tokens_per_sequence
    return CalibrationData(DEPTHS, scores, agrees, sequence_ids, "max_prob")


def coverage(target, delta, num_tokens, num_seeds, unit, method, fresh) -> dict:
    """Miss rate and medians of one (target, delta, n, unit) setting over ``num_seeds``."""
    misses, thresholds, agreements, exit_rates, uncertified = 0, [], [], [], 0
    for seed in range(num_seeds):
        result = calibrate_threshold(
            synthetic(num_tokens, seed), target, delta, unit=unit, method=method
        )
        if not result.certified:
            uncertified += 1
            continue
        report = agreement_report(fresh, result.threshold)
        misses += report.agreement < target
        thresholds.append(result.threshold)
        agreements.append(report.agreement)
        exit_rates.append(report.exit_rate)

    def median(values):
        return statistics.median(values) if values else float("nan")

    return {
        "target": target, "delta": delta, "num_tokens": num_tokens, "unit": unit,
        "method": method, "miss_rate": misses / num_seeds, "median_threshold": median(thresholds),
        "median_agreement": median(agreements), "median_exit_rate": median(exit_rates),
        "uncertified": uncertified,
    }  # fmt: skip


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--num-tokens", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--num-seeds", type=int, default=100)
    parser.add_argument("--fresh-tokens", type=int, default=400_000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # many small ops: threads only add waiting
    fresh = synthetic(args.fresh_tokens, seed=99_999)
    rows = []
    print("target delta unit/method tokens | miss median_thr median_agree median_exit uncertified")
    for unit, method in (("token", "binomial"), ("sequence", "hoeffding_bentkus")):
        for target in args.targets:
            for n in args.num_tokens:
                row = coverage(target, args.delta, n, args.num_seeds, unit, method, fresh)
                rows.append(row)
                print(
                    f"{target} {args.delta} {unit}/{method} {n} | {row['miss_rate']:.2f} "
                    f"{row['median_threshold']:.3f} {row['median_agreement']:.3f} "
                    f"{row['median_exit_rate']:.3f} {row['uncertified']}",
                    flush=True,
                )
    return rows
