"""Crash hygiene: a trainer killed with ``kill -9`` leaves no helper process behind, and what a
crashed save left in the save directory is cleaned up by the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron.early_exit.checkpoint.store import sweep_stale

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "assets" / "checkpoint_format_v1" / "checkpoint"

SAVE_AND_WAIT = f"""
import sys, time
from megatron.early_exit import platform
from megatron.early_exit.checkpoint.loading import load_model
from megatron.early_exit.checkpoint.store import save_checkpoint

platform.initialize(1, 1)
info, config, model = load_model({str(FIXTURE)!r}, seed=1)
save_checkpoint(sys.argv[1], model, iteration=1, model_args={{}}, data_state={{}})
print("saved", flush=True)
time.sleep(120)
"""


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killed_trainer_leaves_no_checkpoint_writer_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVE_AND_WAIT, str(tmp_path / "ck")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "saved"
        helpers = _children(proc.pid)
        assert helpers, "dist_checkpointing.save started no helper process (nothing to check)"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(p) for p in helpers):
        time.sleep(0.2)
    left = [p for p in helpers if _alive(p)]
    for pid in left:  # do not leave them to the next test either
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes outlived the killed trainer: {left}"


def test_sweep_removes_unfinished_saves_and_settles_re_saves(tmp_path):
    for name in ("iter_0000003.incomplete", "iter_0000002", "iter_0000002.replaced",
                 "iter_0000001.replaced", "unrelated"):  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "common.pt").write_text(name)
    done = sweep_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000001", "iter_0000002", "unrelated"
    ]  # fmt: skip
    # The re-save of 1 stopped between its renames: its old copy is put back.
    assert (tmp_path / "iter_0000001" / "common.pt").read_text() == "iter_0000001.replaced"
    assert (tmp_path / "iter_0000002" / "common.pt").read_text() == "iter_0000002"
    assert len(done) == 3
    assert sweep_stale(tmp_path) == [] and sweep_stale(tmp_path / "missing") == []
