"""``--target-agreement`` flags of the generation benchmark."""

from __future__ import annotations

import pytest

from megatron.early_exit.bench.generation.cli import parse_args


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "exactly one of --calibration-data and --calibration-text"),
        (["--calibration-data", "a.pt", "--calibration-text", "b.txt"], "exactly one of"),
        (["--calibration-data", "a.pt", "--calibration-delta", "0"], "--calibration-delta"),
        (["--calibration-data", "a.pt", "--calibration-test-fraction", "1"], "test-fraction"),
        (["--calibration-text", "a.txt", "--calibration-decode"], "--calibration-generate"),
    ],
)
def test_bad_calibration_flags(extra, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--load", "x", "--target-agreement", "0.9", *extra])
    assert message in capsys.readouterr().err


def test_target_agreement_flags_parse():
    args = parse_args(["--load", "x", "--target-agreement", "0.9", "--calibration-data", "a.pt"])
    assert args.target_agreement == 0.9 and args.calibration_delta == 0.1
    assert parse_args(["--load", "x"]).target_agreement is None
    with pytest.raises(SystemExit):
        parse_args(["--load", "x", "--target-agreement", "1.5", "--calibration-data", "a.pt"])
