"""``megatron.early_exit.launch``: ranks see their place in the group, form a group over the
platform's backend and return values; a failing rank's traceback and a hung rank reach the
caller as :class:`DistributedError`; a port taken before rank 0 binds it is replaced by a fresh
one, and nothing else is retried. ``torchrun_command`` ranks rendezvous without a chosen port."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import time

import pytest

from megatron.early_exit import launch
from megatron.early_exit.launch import (
    DistributedError,
    PortInUseError,
    address_in_use,
    free_port,
    run_distributed,
)
from tests.distributed.harness import torchrun_command


def all_reduce_worker(rank: int, world_size: int, value: int) -> dict:
    import torch
    import torch.distributed as dist

    from megatron.early_exit import platform

    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    env = {k: os.environ[k] for k in names}
    dist.init_process_group(backend=platform.distributed_backend())  # torch's env:// TCPStore
    total = torch.tensor([value * (rank + 1)], device=platform.device())
    dist.all_reduce(total)
    return {"env": env, "total": int(total.item()), "threads": torch.get_num_threads()}


def failing_worker(rank: int, world_size: int) -> str:
    if rank == 1:
        raise ValueError("boom on rank 1")
    return "ok"


def own_port_worker(rank: int, world_size: int, port: int) -> None:
    """A worker that picks its rendezvous port itself (as ``test_tune_partial`` does)."""
    import torch.distributed as dist

    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(backend="gloo")


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


@pytest.fixture
def taken_port():
    """A port another process holds (listening) while the test runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _record_ports(monkeypatch, *first: int) -> list[int]:
    """Make ``run_distributed`` take the ports ``first``, then free ones; returns the list of
    ports it took, filled as it takes them."""
    taken, real = [], launch.free_port

    def pick() -> int:
        taken.append(first[len(taken)] if len(taken) < len(first) else real())
        return taken[-1]

    monkeypatch.setattr(launch, "free_port", pick)
    return taken


def test_a_failing_rank_reports_its_traceback(monkeypatch):
    ports = _record_ports(monkeypatch)
    with pytest.raises(DistributedError) as error:
        run_distributed(failing_worker, 2)
    message = str(error.value)
    assert "--- rank 1 ---" in message
    assert "Traceback" in message and "ValueError: boom on rank 1" in message
    assert not isinstance(error.value, PortInUseError)
    assert len(ports) == 1  # not retried


def test_a_taken_port_is_replaced_by_a_fresh_one(monkeypatch, taken_port):
    """Rank 0's store cannot bind the port (EADDRINUSE): the group starts again elsewhere."""
    ports = _record_ports(monkeypatch, taken_port)
    results = run_distributed(all_reduce_worker, 2, 5)
    assert [r["total"] for r in results] == [15, 15]
    assert len(ports) == 2 and ports[1] != taken_port
    assert {r["env"]["MASTER_PORT"] for r in results} == {str(ports[1])}


def test_port_retries_are_bounded(monkeypatch, taken_port):
    monkeypatch.setattr(launch, "PORT_ATTEMPTS", 2)
    ports = _record_ports(monkeypatch, taken_port, taken_port, taken_port)
    with pytest.raises(PortInUseError, match="all 2 launches found their port taken") as error:
        run_distributed(all_reduce_worker, 1, 5)
    assert "EADDRINUSE" in str(error.value)
    assert ports == [taken_port, taken_port]


def test_a_port_the_worker_chose_is_not_retried(monkeypatch, taken_port):
    ports = _record_ports(monkeypatch)
    with pytest.raises(DistributedError, match="EADDRINUSE") as error:
        run_distributed(own_port_worker, 1, taken_port)
    assert not isinstance(error.value, PortInUseError)
    assert len(ports) == 1


def test_address_in_use_recognises_both_rendezvous_errors_and_nothing_else(taken_port):
    import torch.distributed as dist

    with socket.socket() as sock, pytest.raises(OSError) as bind_error:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as platform's rendezvous
        sock.bind(("127.0.0.1", taken_port))
    timeout = datetime.timedelta(seconds=5)
    with pytest.raises(dist.DistNetworkError) as store_error:
        dist.TCPStore("127.0.0.1", taken_port, 2, True, timeout)
    assert address_in_use(bind_error.value) and address_in_use(store_error.value)
    try:
        try:
            raise bind_error.value
        except OSError as cause:
            raise RuntimeError("rendezvous failed") from cause
    except RuntimeError as wrapped:
        assert address_in_use(wrapped)
    with socket.socket() as sock, pytest.raises(OSError) as refused:
        sock.connect(("127.0.0.1", free_port()))  # nobody listens: ECONNREFUSED
    assert not address_in_use(refused.value)
    assert not address_in_use(ValueError("boom"))
    assert not address_in_use(dist.DistNetworkError("connect() timed out"))
    assert not address_in_use(None)


TORCHRUN_WORKER = """
import os, sys, torch, torch.distributed as dist
from megatron.early_exit import platform
platform._init_process_group(60.0)
total = torch.tensor([int(os.environ["RANK"]) + 1])
dist.all_reduce(total)
# One file per rank: two ranks printing to one stdout interleave their characters.
with open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"]), "w") as out:
    out.write(f"rank {os.environ['RANK']} total {int(total)} agent store "
              f"{os.environ['TORCHELASTIC_USE_AGENT_STORE']}")
dist.destroy_process_group()
"""


def test_torchrun_command_rendezvous_needs_no_chosen_port(tmp_path):
    """``--standalone``: the agent's store binds port 0, the ranks join it (agent store)."""
    script = tmp_path / "worker.py"
    script.write_text(TORCHRUN_WORKER)
    command = torchrun_command(2)
    assert "--master-port" not in command and "--standalone" in command
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = sorted(path.read_text() for path in tmp_path.glob("rank*"))
    assert lines == ["rank 0 total 3 agent store True", "rank 1 total 3 agent store True"]


def test_a_hung_rank_times_out():
    started = time.monotonic()
    with pytest.raises(DistributedError, match="timed out"):
        run_distributed(sleeping_worker, 1, timeout_s=5)
    assert time.monotonic() - started < 60
