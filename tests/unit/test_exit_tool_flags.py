"""The checkpoint tools' exit flags (``add_exit_arguments``/``new_exits_from_args``): what they
build, and misuse stopped with a message naming the flag."""

from __future__ import annotations

import argparse

import pytest

from megatron.early_exit.checkpoint.convert import (
    ConversionError,
    add_exit_arguments,
    new_exits_from_args,
)


def parse(flags: str):
    parser = argparse.ArgumentParser()
    add_exit_arguments(parser)
    return new_exits_from_args(parser.parse_args(flags.split()))


def test_flags_build_the_new_exits():
    spec = parse(
        "--exit-layer-nums 2 4 --use-exit-norm --use-exit-mlp --exit-mlp-zero-init "
        "--exit-temperature-init 4"
    )
    assert spec.layer_numbers == (2, 4) and spec.structure == "mlp"
    assert spec.zero_mlp_output and spec.temperature == 4.0
    assert parse("--exit-layer-nums 3").temperature == 1.0


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--exit-temperature-init 2", "--exit-temperature-init given without --exit-layer-nums"),
        ("--exit-layer-nums 2 --exit-temperature-init 2", "needs --use-exit-norm"),
        ("--exit-layer-nums 2 --use-exit-norm --exit-temperature-init 0", "must be > 0, got 0.0"),
        ("--exit-layer-nums 2 --use-exit-norm --exit-temperature-init -1", "must be > 0"),
        ("--exit-layer-nums 2 --use-exit-norm --exit-mlp-zero-init", "applies to --use-exit-mlp"),
        ("--exit-layer-nums 2 --use-exit-mlp", "--use-exit-mlp/--use-exit-block need"),
        (
            "--exit-layer-nums 2 --use-exit-norm --use-exit-mlp --use-exit-block",
            "mutually exclusive",
        ),
    ],
)
def test_misuse_names_the_flag(flags, message):
    with pytest.raises(ConversionError, match=message):
        parse(flags)
