"""Every example and recipe script under ``examples/`` parses, at every size it documents.

A dry run: each script runs under bash with ``python``, ``torchrun``, ``srun`` and
``scontrol`` replaced by ``example_recorder.py``, which records every command line instead of
running it. Each recorded command is then checked as the real program would check it:

* ``pretrain_early_exit_gpt.py``: its flag checks, then (unless the model comes from a
  checkpoint) the model config those flags build (exit placement, parallel sizes, ...) and the
  batch arithmetic at the world size the launcher starts (``torchrun --nnodes x
  --nproc-per-node``);
* every other tool: its own argparse parser, stopped right after parsing.

A script added under ``examples/`` without a scenario here fails
:func:`test_every_example_script_has_a_scenario`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import runpy
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.early_exit.training import arguments

ROOT = Path(__file__).resolve().parents[2]
RECORDER = Path(__file__).with_name("example_recorder.py")
LAUNCHERS = ("python", "torchrun", "srun", "scontrol")

LLAMA_7B = dict(HF_DIR="/models/Llama-2-7b-hf", EXITS="8 16", NPROC="8", TP="1", K="1",
                SEQ="2048", MICRO="2", GLOBAL="16", ITERS="40000", WARMUP="400", LR="1e-4",
                MIN_LR="1e-5", PRECISION="--bf16")  # fmt: skip
# (script, size, environment): the sizes each script's header documents
SCENARIOS = [
    ("examples/cpu/train_tiny.sh", "default", {}),
    ("examples/cpu/train_torchrun_pp2.sh", "default", {}),
    ("examples/gpu/train_single_node.sh", "1.3b", {"DATA": "/data/corpus_text_document"}),
    *[
        ("examples/slurm/ee_llm.sbatch", size,
         {"MODEL": size, "DATA": "/data/corpus_text_document", "TOKENIZER_MODEL": "/t.model",
          "SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "node[0-3]", "SLURM_JOB_ID": "1"})
        for size in ("1.3b", "7b", "13b", "30b")
    ],  # fmt: skip
    ("examples/ee_tuning/llama_ee_tuning.sh", "SmolLM2-135M", {}),
    ("examples/ee_tuning/llama_ee_tuning.sh", "7b", LLAMA_7B),
    ("examples/ee_tuning/llama_ee_tuning.sh", "13b",
     {**LLAMA_7B, "HF_DIR": "/models/Llama-2-13b-hf", "EXITS": "5 10 15 20 25 30 35 40",
      "TP": "2", "K": "4"}),  # fmt: skip
    ("examples/ee_tuning/llama_ee_tuning.sh", "70b",
     {**LLAMA_7B, "HF_DIR": "/models/Llama-2-70b-hf", "EXITS": "20", "TP": "8",
      "EXTRA": "--sequence-parallel"}),  # fmt: skip
    ("examples/ee_tuning/smollm2_cpu.sh", "default", {}),
]


def run_example(script: str, env: dict, tmp_path: Path) -> list[list[str]]:
    """Run ``script`` with the launchers recorded; the command lines it ran."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in LAUNCHERS:
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{RECORDER}" "$0" "$@"\n')
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "commands.jsonl"
    work = tmp_path / "work"
    full_env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": str(bin_dir / "python"),
        "TORCHRUN": str(bin_dir / "torchrun"),
        "EXAMPLE_LOG": str(log),
        "EXAMPLE_WORK": str(work),
        "WORK": str(work),
        "OUT": str(tmp_path / "out"),
        "SAVE": str(tmp_path / "save"),
        "SLURM_SUBMIT_DIR": str(ROOT),
        **env,
    }
    result = subprocess.run(["bash", str(ROOT / script)], env=full_env, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in log.read_text().splitlines()]


def split_command(command: list[str]) -> tuple[int, str | None, list[str]]:
    """``(world size, script, its flags)`` of a recorded ``python``/``torchrun`` command."""
    name, args = command[0], command[1:]
    if name == "python" and args[:2] == ["-m", "torch.distributed.run"]:
        name, args = "torchrun", args[2:]
    scripts = [i for i, a in enumerate(args) if a.endswith(".py")]
    if name not in ("python", "torchrun") or not scripts:
        return 1, None, []
    launcher, script, flags = args[: scripts[0]], args[scripts[0]], args[scripts[0] + 1 :]
    world = 1
    if name == "torchrun":
        options = dict(zip(launcher[::2], launcher[1::2], strict=False))
        world = int(options.get("--nnodes", 1)) * int(options.get("--nproc-per-node", 1))
    return world, script, flags


def check_pretrain(flags: list[str], world_size: int) -> None:
    args = arguments.parse_args(flags)
    if args.use_checkpoint_args:
        return  # the model is the checkpoint's
    stages = args.tune_exit_pipeline_parallel_size or args.pipeline_model_parallel_size
    model_parallel = args.tensor_model_parallel_size * stages
    assert world_size % model_parallel == 0, (world_size, model_parallel)
    config = arguments.model_config(args, vocab_size=32000)
    config.check_trainable_final_head_targets()
    arguments.run_settings(args, world_size // model_parallel)
    arguments.training_config(args)


class _Parsed(BaseException):
    """Stops a tool right after its parser accepted the flags."""


def check_tool(script: str, flags: list[str], monkeypatch) -> None:
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", [script, *flags])
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except _Parsed:
        return
    except SystemExit as stop:
        pytest.fail(f"{script} {' '.join(flags)}: exit {stop.code}: {stderr.getvalue()}")
    pytest.fail(f"{script} never parsed its flags")


@pytest.mark.parametrize(
    ("script", "size", "env"), SCENARIOS, ids=[f"{Path(s).name}-{n}" for s, n, _ in SCENARIOS]
)
def test_example_parses(script, size, env, tmp_path, monkeypatch):
    commands = run_example(script, env, tmp_path)
    checked = []
    for command in commands:
        world_size, tool, flags = split_command(command)
        if tool is None:
            continue
        if Path(tool).name == "pretrain_early_exit_gpt.py":
            check_pretrain(flags, world_size)
        else:
            with monkeypatch.context() as patch:
                check_tool(tool, flags, patch)
        checked.append(Path(tool).name)
    assert "pretrain_early_exit_gpt.py" in checked, commands


def test_every_example_script_has_a_scenario():
    scripts = {str(p.relative_to(ROOT)) for p in (ROOT / "examples").rglob("*")
               if p.suffix in (".sh", ".sbatch")}  # fmt: skip
    assert scripts == {s for s, _, _ in SCENARIOS}


def test_the_recorder_catches_a_bad_flag(tmp_path):
    """The dry run can fail: a flag the parser refuses stops the check."""
    with pytest.raises(SystemExit):
        check_pretrain(["--no-such-flag"], 1)
    with pytest.raises(ValueError, match="not divisible"):
        check_pretrain(["--micro-batch-size", "2", "--global-batch-size", "6"], 4)
