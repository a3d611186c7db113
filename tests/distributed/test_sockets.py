"""No network exposure: the process group of a one-process run opens no store socket, and the
sockets a multi-process run on loopback listens on are all loopback (an ``ss -ltnp`` check
read from ``/proc``, Linux only)."""

from __future__ import annotations

import ipaddress
import os
import sys

import pytest

from megatron.early_exit.launch import run_distributed

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def listening_addresses(pid: int) -> list[str]:
    """The local addresses of the TCP sockets process ``pid`` listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    addresses = []
    for table in ("tcp", "tcp6"):
        for line in open(f"/proc/net/{table}").read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                addresses.append(_address(fields[1]))
    return addresses


def _address(hex_address: str) -> str:
    host, _ = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words))


def _not_loopback(addresses: list[str]) -> list[str]:
    return [a for a in addresses if not ipaddress.ip_address(a).is_loopback]


def _rank_sockets(rank: int, world_size: int) -> tuple[float, list[str]]:
    import torch
    import torch.distributed as dist

    from megatron.early_exit import platform

    platform.initialize(1, 1)
    total = torch.ones(1)
    dist.all_reduce(total)
    return float(total), listening_addresses(os.getpid())


def test_address_parsing():
    assert _address("0100007F:1F90") == "127.0.0.1"
    assert _address("00000000000000000000000000000000:C0ED") == "::"
    assert _not_loopback(["127.0.0.1", "::", "::1"]) == ["::"]


@pytest.mark.parametrize("world_size", [1, 2])
def test_process_group_listens_on_loopback_only(world_size):
    results = run_distributed(_rank_sockets, world_size)
    for total, addresses in results:
        assert total == world_size
        assert not _not_loopback(addresses), addresses
