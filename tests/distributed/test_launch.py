"""``megatron.early_exit.launch``: ranks see their place in the group, form a group over the
platform's backend and return values; a failing rank's traceback and a hung rank reach the
caller as :class:`DistributedError`."""

from __future__ import annotations

import os
import socket
import time

import pytest

from megatron.early_exit.launch import DistributedError, free_port, run_distributed


def all_reduce_worker(rank: int, world_size: int, value: int) -> dict:
    import torch
    import torch.distributed as dist

    from megatron.early_exit import platform

    env = {k: os.environ[k] for k in ("MASTER_ADDR", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    dist.init_process_group(backend=platform.distributed_backend())
    total = torch.tensor([value * (rank + 1)], device=platform.device())
    dist.all_reduce(total)
    return {"env": env, "total": int(total.item()), "threads": torch.get_num_threads()}


def failing_worker(rank: int, world_size: int) -> str:
    if rank == 1:
        raise ValueError("boom on rank 1")
    return "ok"


def sleeping_worker(rank: int, world_size: int) -> None:
    time.sleep(600)


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_ranks_all_reduce_and_return_their_values():
    results = run_distributed(all_reduce_worker, 2, 5, num_threads=2)
    assert [r["total"] for r in results] == [15, 15]  # 5 * 1 + 5 * 2
    assert [r["env"]["RANK"] for r in results] == ["0", "1"]
    assert [r["env"]["LOCAL_RANK"] for r in results] == ["0", "1"]
    assert {r["env"]["WORLD_SIZE"] for r in results} == {"2"}
    assert {r["env"]["MASTER_ADDR"] for r in results} == {"127.0.0.1"}
    assert {r["threads"] for r in results} == {2}


def test_a_failing_rank_reports_its_traceback():
    with pytest.raises(DistributedError) as error:
        run_distributed(failing_worker, 2)
    message = str(error.value)
    assert "--- rank 1 ---" in message
    assert "Traceback" in message and "ValueError: boom on rank 1" in message


def test_a_hung_rank_times_out():
    started = time.monotonic()
    with pytest.raises(DistributedError, match="timed out"):
        run_distributed(sleeping_worker, 1, timeout_s=5)
    assert time.monotonic() - started < 60
