"""Learn-then-Test thresholds on synthetic scores whose agreement probability is known.

Synthetic model: three exits, each token's confidence at each exit uniform on [0, 1] and
independent; the exit agrees with the final head with probability ``score ** power`` (the earlier
exit, the larger power: less reliable at the same score). The realised agreement of a threshold
is measured on a large fresh sample the calibration never saw.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron.early_exit.bench.calibration_coverage import DEPTHS, coverage, synthetic
from megatron.early_exit.inference.calibrate import (
    DEFAULT_GRID,
    CalibrationData,
    agreement_report,
    binomial_cdf,
    binomial_p_value,
    calibrate_threshold,
    exit_policy_for,
    first_exit_index,
    hoeffding_bentkus_p_value,
    threshold_for_target,
    token_losses,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many small tensor ops: on a shared 2-core machine, intra-op threads only add waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fresh() -> CalibrationData:
    return synthetic(200_000, seed=10_000)


def test_binomial_cdf_matches_the_direct_sum():
    for k, n, p in [(0, 5, 0.5), (3, 10, 0.3), (7, 20, 0.25), (20, 20, 0.9)]:
        direct = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
        assert binomial_cdf(k, n, p) == pytest.approx(direct, rel=1e-9)


def test_hoeffding_bentkus_is_a_valid_but_looser_p_value():
    losses = torch.tensor([1.0] * 8 + [0.0] * 192)  # risk 0.04
    exact = binomial_p_value(losses, 0.1)
    hb = hoeffding_bentkus_p_value(losses, 0.1)
    assert 0.0 < exact <= hb <= 1.0
    assert hb < 0.05  # still rejects a risk of 0.1 on 200 samples at 4% observed
    with pytest.raises(ValueError, match="0/1 losses"):
        binomial_p_value(torch.tensor([0.5, 0.0]), 0.1)


@pytest.mark.parametrize("unit, method", [("token", "binomial"), ("sequence", "hoeffding_bentkus")])
def test_realised_agreement_meets_the_target_at_the_stated_rate(fresh, unit, method):
    target, delta, num_seeds = 0.9, 0.2, 30
    # Hoeffding-Bentkus on per-sequence rates is valid under dependence within sequences but
    # looser: it certifies a more conservative threshold.
    power_bound = {"binomial": 0.95, "hoeffding_bentkus": 0.98}[method]
    misses, naive_misses, thresholds = 0, 0, []
    for seed in range(num_seeds):
        data = synthetic(3000, seed)
        result = calibrate_threshold(data, target, delta, unit=unit, method=method)
        assert result.certified, result.reason
        thresholds.append(result.threshold)
        misses += agreement_report(fresh, result.threshold).agreement < target
        # The uncorrected choice (lowest threshold whose calibration agreement reaches the
        # target) misses about half the time: the check below can tell the two apart.
        grid = torch.tensor(DEFAULT_GRID)
        agreement = 1.0 - token_losses(data, grid).mean(dim=1)  # [len(grid)]
        naive = float(grid[agreement >= target].min())
        naive_misses += agreement_report(fresh, naive).agreement < target
    print(f"{unit}/{method}: misses {misses}/{num_seeds}, naive {naive_misses}/{num_seeds}")
    assert misses / num_seeds <= delta, (misses, thresholds)
    assert naive_misses / num_seeds > delta
    # Not vacuous: the certified policy exits and is near the target, not far above it.
    median = sorted(thresholds)[num_seeds // 2]
    report = agreement_report(fresh, median)
    assert report.exit_rate > 0.2 and report.agreement < power_bound


def test_threshold_is_monotone_in_target_and_delta():
    data = synthetic(3000, seed=3)
    by_target = [calibrate_threshold(data, t, 0.1).threshold for t in (0.7, 0.8, 0.9, 0.95)]
    assert by_target == sorted(by_target) and by_target[0] < by_target[-1]
    by_delta = [calibrate_threshold(data, 0.9, d).threshold for d in (0.5, 0.2, 0.05, 0.01)]
    assert by_delta == sorted(by_delta)


def test_impossible_target_returns_never_exit_and_the_policy_refuses():
    data = synthetic(200, seed=5)
    result = calibrate_threshold(data, 1.0, 0.1)
    assert not result.certified and result.threshold == math.inf
    assert result.calibration_agreement == 1.0 and result.calibration_exit_rate == 0.0
    assert threshold_for_target(data, 1.0) == {d: math.inf for d in DEPTHS}
    with pytest.raises(ValueError, match="target agreement 1.0 at delta 0.1 is not certifiable"):
        exit_policy_for(result)
    # Too little data for a strict target: also refused, not faked.
    tiny = synthetic(20, seed=6)
    assert not calibrate_threshold(tiny, 0.99, 0.05).certified


def test_exit_policy_carries_the_calibrated_threshold_and_measure():
    result = calibrate_threshold(synthetic(3000, seed=1), 0.8, 0.1)
    policy = exit_policy_for(result)
    assert policy.threshold == result.threshold < 1.0
    assert policy.measure == "max_prob" and policy.depths == frozenset(DEPTHS)
    assert result.thresholds_per_exit() == {d: result.threshold for d in DEPTHS}


def test_bad_inputs_are_named():
    data = synthetic(100, seed=0)
    with pytest.raises(ValueError, match="target_agreement"):
        calibrate_threshold(data, 1.5)
    with pytest.raises(ValueError, match="delta"):
        calibrate_threshold(data, 0.9, 0.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        calibrate_threshold(data, 0.9, grid=[0.5, 0.9])
    with pytest.raises(ValueError, match="confidence must be"):
        CalibrationData(DEPTHS, torch.rand(4, 2), torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="unit"):
        calibrate_threshold(data, 0.9, unit="word")


def test_first_exit_and_report_count_the_earliest_qualifying_exit():
    confidence = torch.tensor([[0.9, 0.95, 0.1], [0.1, 0.2, 0.3], [0.1, 0.8, 0.99]])
    agrees = torch.tensor([[False, True, True], [True, True, True], [True, True, False]])
    data = CalibrationData(DEPTHS, confidence, agrees)
    assert first_exit_index(confidence, 0.8).tolist() == [0, 3, 1]
    assert token_losses(data, 0.8).tolist() == [1.0, 0.0, 0.0]
    report = agreement_report(data, 0.8, num_layers=16)
    assert report.agreement == pytest.approx(2 / 3)
    assert report.exit_share == {4: pytest.approx(1 / 3), 8: pytest.approx(1 / 3), 12: 0.0}
    assert report.mean_depth_fraction == pytest.approx((4 + 16 + 8) / 48)


def test_split_and_save_round_trip(tmp_path):
    data = synthetic(500, seed=2)
    calibration, test = data.split(0.6, seed=0)
    assert calibration.num_tokens + test.num_tokens == 500
    assert not set(calibration.sequence_ids.tolist()) & set(test.sequence_ids.tolist())
    data.save(tmp_path / "c.pt")
    loaded = CalibrationData.load(tmp_path / "c.pt")
    assert torch.equal(loaded.confidence, data.confidence) and loaded.depths == DEPTHS


def test_coverage_tool_counts_misses(fresh):
    row = coverage(0.9, 0.2, 2000, 5, "token", "binomial", fresh)
    assert row["uncertified"] == 0 and 0.0 <= row["miss_rate"] <= 1.0
    assert 0.85 < row["median_agreement"] < 0.97 and row["median_threshold"] < 1.0


def test_calibrate_by_decoding_stops_at_the_first_failure_and_covers():
    from megatron.early_exit.inference.calibrate import DECODE_GRID, calibrate_by_decoding

    # Each prompt's disagreement rate at threshold t: Binomial(48, r(t)) / 48, r(t) = 0.3 (1 - t).
    def make_losses(seed):
        calls = []

        def sequence_losses(threshold):
            calls.append(threshold)
            generator = torch.Generator().manual_seed(seed * 1000 + len(calls))
            rate = torch.full((200, 48), 0.3 * (1.0 - threshold))
            return torch.bernoulli(rate, generator=generator).mean(dim=1)

        return sequence_losses, calls

    misses = 0
    for seed in range(20):
        sequence_losses, calls = make_losses(seed)
        result = calibrate_by_decoding(sequence_losses, 0.9, 0.1)
        assert result.certified and calls == list(DECODE_GRID[: len(calls)])
        assert calls[-1] < result.threshold or result.threshold == DECODE_GRID[-1]
        misses += 0.3 * (1.0 - result.threshold) > 0.1  # the true risk exceeds 1 - target
    assert misses / 20 <= 0.1
    result = calibrate_by_decoding(lambda t: torch.ones(5), 0.9, 0.1)
    assert not result.certified and "5 decoded sequences" in result.reason
    with pytest.raises(ValueError, match="num_prompts"):
        calibrate_by_decoding(lambda t: torch.ones(2, 2), 0.9)
