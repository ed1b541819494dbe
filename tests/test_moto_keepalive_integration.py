"""devel.motoextra.keep_connections_alive: a real moto_server keeping its connections.

The benchmark's moto_server (``MotoServer(keep_alive=True)``) answers on one
connection request after request, as AWS does: botocore's pool then opens one
connection for many calls. A body the application does not read, or reads
only in part, must not become the start of the next request on the same
connection. Without the option, werkzeug closes every connection (the
control: the count below can fail).
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from typing import Any

import pytest
import urllib3.util.connection

from devel.motoserver import MotoServer
from fedimg.aws import AwsClients

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[bool, MotoServer]]:
    with MotoServer(keep_alive=True) as alive, MotoServer() as closing:
        yield {True: alive, False: closing}


def connections_for_calls(
    server: MotoServer, monkeypatch: pytest.MonkeyPatch, calls: int
) -> tuple[int, list[int]]:
    """(TCP connections botocore opened, block indexes read back) after ``calls`` puts."""
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    opened: list[Any] = []
    create = urllib3.util.connection.create_connection

    def counting(*args: Any, **kwargs: Any) -> Any:
        opened.append(args[0])
        return create(*args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", counting)
    ebs = AwsClients().ebs("us-east-1")
    snapshot = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    for index in range(calls):
        block = bytes([index + 1]) * 512 * 1024
        ebs.put_snapshot_block(
            SnapshotId=snapshot,
            BlockIndex=index,
            BlockData=block,
            DataLength=len(block),
            Checksum="unchecked-by-moto",
            ChecksumAlgorithm="SHA256",
        )
    listed = ebs.list_snapshot_blocks(SnapshotId=snapshot)["Blocks"]
    return len(opened), sorted(b["BlockIndex"] for b in listed)


@pytest.mark.parametrize("keep_alive", [True, False])
def test_botocore_reuses_one_connection_only_when_kept_alive(
    servers: dict[bool, MotoServer], monkeypatch: pytest.MonkeyPatch, keep_alive: bool
) -> None:
    opened, stored = connections_for_calls(servers[keep_alive], monkeypatch, 6)
    assert stored == list(range(6))
    if keep_alive:
        assert opened == 1
    else:
        assert opened >= 8  # start, 6 puts, the listing: each on a new connection


def test_an_unread_body_does_not_become_the_next_request(
    servers: dict[bool, MotoServer],
) -> None:
    server = servers[True]
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        # moto's own API answers this without reading the body.
        connection.request("GET", "/moto-api/data.json", body=b"GET / HTTP/1.1\r\n" * 5000)
        first = connection.getresponse()
        assert first.status == 200 and first.read()
        assert first.getheader("Connection") != "close"
        connection.request("GET", "/moto-api/data.json")  # the same connection
        second = connection.getresponse()
        assert second.status == 200 and b"ec2" in second.read().lower()
        assert connection.sock is not None  # never reconnected
    finally:
        connection.close()
