"""devel.bus.free_port: one port per caller across processes, outside the kernel's range."""

from __future__ import annotations

import multiprocessing
import socket

from devel.bus import _port_range, free_port


def _take(count: int) -> list[int]:
    return [free_port() for _ in range(count)]


def test_processes_taking_ports_at_once_never_get_the_same_one() -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        batches = pool.map(_take, [40, 40, 40])
    ports = [p for batch in batches for p in batch]
    assert len(ports) == len(set(ports)) == 120
    ephemeral_start = _port_range().stop
    assert all(20000 <= p < ephemeral_start for p in ports)


def test_a_port_someone_listens_on_is_skipped() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        port = free_port()
        busy.bind(("127.0.0.1", port + 1 if port + 1 < _port_range().stop else port))
        busy.listen()
        taken = busy.getsockname()[1]
        following = _take(3)
    assert taken not in following
    for p in following:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", p))  # free: binding it works
