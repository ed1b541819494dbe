"""fedimg.snapshot with moto in process, fed by real downloads from a loopback server.

moto does not verify checksums nor block sizes, so what the code SENDS is
checked with botocore event hooks, and what moto stored is read back with
list_snapshot_blocks / get_snapshot_block.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import lzma
import os
import threading
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from moto import mock_aws

from devel.bus import wait_until
from devel.images import BLOCK, ImageFacts, ImageServer, Route, build_raw_xz
from fedimg import snapshot
from fedimg.aws import AwsClients, error_code
from fedimg.download import (
    CHILD_MIN_RAW,
    ChecksumMismatch,
    DownloadError,
    probe_raw_size,
    stream_raw,
)
from fedimg.http import make_session
from fedimg.priority import BACKGROUND_STEP
from fedimg.snapshot import (
    BLOCK_SIZE,
    Reblocker,
    SnapshotError,
    SnapshotTimeout,
    aggregate_checksum,
    delete_snapshot_quietly,
    iter_blocks,
    max_blocks_in_flight,
    upload_snapshot,
    volume_size_gib,
)
from fedimg.xzparallel import ParallelRaw
from fedimg.xzproc import ChildRaw

REGION = "us-east-1"
TOKEN = "fedimg-test-token"


class Aws:
    """moto clients plus a record of what was sent to EBS."""

    def __init__(self, session: boto3.session.Session) -> None:
        clients = AwsClients(max_attempts=3, session=session)
        self.ebs = clients.ebs(REGION)
        self.ec2 = clients.ec2(REGION)
        self.sent: dict[str, list[dict[str, Any]]] = {}
        self.lock = threading.Lock()
        self.started: list[str] = []
        for op in ("StartSnapshot", "PutSnapshotBlock", "CompleteSnapshot"):
            self.ebs.meta.events.register(f"provide-client-params.ebs.{op}", self._record)
        self.ebs.meta.events.register("after-call.ebs.StartSnapshot", self._started)

    def _started(self, parsed: dict[str, Any], **_: Any) -> None:
        self.started.append(parsed["SnapshotId"])

    def _record(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        with self.lock:
            self.sent.setdefault(model.name, []).append(dict(params))

    def calls(self, op: str) -> list[dict[str, Any]]:
        return self.sent.get(op, [])

    def stored_blocks(self, snapshot_id: str) -> dict[int, bytes]:
        listed = self.ebs.list_snapshot_blocks(SnapshotId=snapshot_id)
        return {
            b["BlockIndex"]: self.ebs.get_snapshot_block(
                SnapshotId=snapshot_id, BlockIndex=b["BlockIndex"], BlockToken=b["BlockToken"]
            )["BlockData"].read()
            for b in listed["Blocks"]
        }

    def snapshot_exists(self, snapshot_id: str) -> bool:
        try:
            self.ec2.describe_snapshots(SnapshotIds=[snapshot_id])
        except ClientError as exc:
            assert error_code(exc) == "InvalidSnapshot.NotFound"
            return False
        return True


@pytest.fixture(scope="module")
def boto_session() -> boto3.session.Session:
    """One session for the module: it caches the parsed service models (slow to load)."""
    return boto3.session.Session()


@pytest.fixture
def aws(boto_session: boto3.session.Session) -> Iterator[Aws]:
    with mock_aws():
        yield Aws(boto_session)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> ImageFacts:
    """Random and text blocks, zero gaps, and a non-zero partial last block."""
    raw_size = 20 * BLOCK + 12345
    contents = {
        0: b"\x01" * BLOCK,
        1: bytes(BLOCK - 1) + b"\x01",  # non-zero only in its very last byte
        7: hashlib.sha256(b"seven").digest() * (BLOCK // 32),
        8: b"text " * 1000,
        20: b"\xff" * 12345,
    }
    return build_raw_xz(tmp_path_factory.mktemp("img") / "img.raw.xz", raw_size, contents)


def upload(aws: Aws, raw: Any, raw_size: int, **kwargs: Any) -> snapshot.SnapshotUpload:
    args: dict[str, Any] = {
        "workers": 4,
        "description": "fedimg test",
        "tags": {"fedimg:compose-id": "Fedora-40-20240101.0"},
        "client_token": TOKEN,
        "timeout_minutes": 10,
        "log_context": "Fedora-40-20240101.0",
    }
    args.update(kwargs)
    return upload_snapshot(aws.ebs, aws.ec2, raw, raw_size, **args)


def stream(
    server: ImageServer,
    facts: ImageFacts,
    sha256: str | None = None,
    child_min_raw: int = CHILD_MIN_RAW,
) -> Iterator[bytes] | snapshot.BlockSource:
    url = server.add(facts.path.name, Route(facts.path))
    session = make_session(retries=0, timeout=5.0)
    raw_size = probe_raw_size(session, url)
    return stream_raw(
        session,
        url,
        sha256 or facts.sha256,
        raw_size,
        chunk_size=300_000,
        child_min_raw=child_min_raw,
    )


# How a one-block image is decoded: in this process (it is small), or in a child
# process (fedimg.xzproc) as an image of CHILD_MIN_RAW or more would be.
DECODERS = pytest.mark.parametrize(
    "child_min_raw", [CHILD_MIN_RAW, 0], ids=["in-process", "child-process"]
)


def assert_child_reaped(raw: object) -> None:
    """A ChildRaw's decoder process, if it had one, is no longer running nor ours."""
    if isinstance(raw, ChildRaw):
        assert raw.returncode is not None
        with pytest.raises(ChildProcessError):
            os.waitpid(raw.pid, os.WNOHANG)


def b64sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


# ---------------------------------------------------------------------------
# The functional core


def test_volume_size_rounds_up_to_whole_gib() -> None:
    assert volume_size_gib(1) == 1
    assert volume_size_gib(1 << 30) == 1
    assert volume_size_gib((1 << 30) + 1) == 2
    with pytest.raises(ValueError):
        volume_size_gib(0)


@pytest.mark.parametrize("chunk", [1, 4096, 100_000, BLOCK, BLOCK + 1, 2 * BLOCK, 3 * BLOCK - 7])
def test_reblocker_whatever_the_chunk_size(image: ImageFacts, chunk: int) -> None:
    raw = lzma.decompress(image.path.read_bytes())
    pieces = (raw[i : i + chunk] for i in range(0, len(raw), chunk))
    if chunk == 1:  # one byte at a time is slow in Python: only the first 2 blocks
        pieces = (raw[i : i + 1] for i in range(2 * BLOCK))
        expected = [i for i in image.nonzero_blocks if i < 2]
    else:
        expected = list(image.nonzero_blocks)
    blocks = list(iter_blocks(pieces))
    assert [i for i, _ in blocks] == expected
    for index, block in blocks:
        assert len(block) == BLOCK_SIZE
        assert hashlib.sha256(block).hexdigest() == image.block_digests[index]


def test_reblocker_skips_zero_chunks_and_counts_blocks() -> None:
    r = Reblocker()
    assert r.push(bytes(4 * BLOCK)) == []
    assert r.next_index == 4
    assert r.push(bytes(BLOCK // 2)) == []
    assert r.push(b"\x00" * (BLOCK // 2 - 1) + b"\x02") == [(4, bytes(BLOCK - 1) + b"\x02")]
    assert r.push(b"\x03") == []
    assert r.finish() == [(5, b"\x03" + bytes(BLOCK - 1))]
    assert r.finish() == []


def test_aggregate_checksum_is_in_index_order() -> None:
    digests = {5: b"b" * 32, 1: b"a" * 32}
    assert aggregate_checksum(digests) == b64sha(b"a" * 32 + b"b" * 32)
    assert aggregate_checksum({}) == b64sha(b"")


# ---------------------------------------------------------------------------
# Uploads


@pytest.mark.integration
@DECODERS
def test_upload_from_a_download(
    aws: Aws, server: ImageServer, image: ImageFacts, child_min_raw: int
) -> None:
    seen: list[int] = []
    raw = stream(server, image, child_min_raw=child_min_raw)
    assert isinstance(raw, ChildRaw) == (child_min_raw == 0)
    result = upload(aws, raw, image.raw_size, progress=seen.append)
    assert_child_reaped(raw)

    assert result.blocks_sent == len(image.nonzero_blocks) == 5
    assert result.blocks_total == 21
    assert result.bytes_read == image.raw_size
    assert result.volume_size_gib == 1
    stored = aws.stored_blocks(result.snapshot_id)
    assert sorted(stored) == list(image.nonzero_blocks)
    for index, data in stored.items():
        assert hashlib.sha256(data).hexdigest() == image.block_digests[index]
    assert seen == sorted(seen) and seen[-1] == image.raw_size
    snap = aws.ec2.describe_snapshots(SnapshotIds=[result.snapshot_id])["Snapshots"][0]
    assert snap["State"] == "completed"
    assert {"Key": "fedimg:compose-id", "Value": "Fedora-40-20240101.0"} in snap["Tags"]


@pytest.mark.integration
@DECODERS
def test_what_is_sent(aws: Aws, server: ImageServer, image: ImageFacts, child_min_raw: int) -> None:
    result = upload(
        aws, stream(server, image, child_min_raw=child_min_raw), image.raw_size, workers=3
    )

    (start,) = aws.calls("StartSnapshot")
    assert start["VolumeSize"] == 1
    assert start["Timeout"] == 10
    assert start["ClientToken"] == TOKEN
    assert start["Tags"] == [{"Key": "fedimg:compose-id", "Value": "Fedora-40-20240101.0"}]

    puts = aws.calls("PutSnapshotBlock")
    assert sorted(p["BlockIndex"] for p in puts) == list(image.nonzero_blocks)
    for put in puts:
        data = put["BlockData"]
        assert put["SnapshotId"] == result.snapshot_id
        assert put["DataLength"] == 524288 == len(data)
        assert put["ChecksumAlgorithm"] == "SHA256"
        assert put["Checksum"] == b64sha(data)
        assert hashlib.sha256(data).hexdigest() == image.block_digests[put["BlockIndex"]]

    (complete,) = aws.calls("CompleteSnapshot")
    digests = b"".join(bytes.fromhex(image.block_digests[i]) for i in image.nonzero_blocks)
    assert complete == {
        "SnapshotId": result.snapshot_id,
        "ChangedBlocksCount": 5,
        "Checksum": b64sha(digests),
        "ChecksumAlgorithm": "SHA256",
        "ChecksumAggregationMethod": "LINEAR",
    }


def test_all_zero_image_sends_no_block(aws: Aws) -> None:
    zeros = bytes(1 << 20)
    raw_size = (1 << 30) + BLOCK + 100  # just over 1 GiB: a 2 GiB volume
    chunks = [zeros] * (raw_size // len(zeros)) + [bytes(raw_size % len(zeros))]
    result = upload(aws, iter(chunks), raw_size)
    assert result.blocks_sent == 0
    assert result.volume_size_gib == 2
    assert result.blocks_total == 2050
    assert aws.calls("PutSnapshotBlock") == []
    assert aws.calls("CompleteSnapshot")[0]["ChangedBlocksCount"] == 0
    assert aws.stored_blocks(result.snapshot_id) == {}


# ---------------------------------------------------------------------------
# Failures: nothing completed, the snapshot deleted


def assert_abandoned(aws: Aws) -> None:
    (snapshot_id,) = aws.started
    assert aws.calls("CompleteSnapshot") == []
    assert not aws.snapshot_exists(snapshot_id), "the started snapshot was deleted"


@pytest.mark.integration
@DECODERS
def test_checksum_mismatch_deletes_the_snapshot(
    aws: Aws, server: ImageServer, image: ImageFacts, child_min_raw: int
) -> None:
    wrong = hashlib.sha256(b"not this image").hexdigest()
    raw = stream(server, image, sha256=wrong, child_min_raw=child_min_raw)
    with pytest.raises(ChecksumMismatch):
        upload(aws, raw, image.raw_size)
    assert aws.calls("PutSnapshotBlock"), "blocks were written before the checksum was known"
    assert len(aws.calls("PutSnapshotBlock")) < len(image.nonzero_blocks)
    assert_abandoned(aws)
    assert_child_reaped(raw)


def refuse_block_7(params: dict[str, Any], **_: Any) -> None:
    """A botocore hook: EBS refuses block 7."""
    if params.get("BlockIndex") == 7:
        raise ClientError(
            {"Error": {"Code": "ValidationException", "Message": "bad block"}},
            "PutSnapshotBlock",
        )


@pytest.mark.integration
def test_aws_error_mid_upload_stops_the_decoder_process(
    aws: Aws, server: ImageServer, image: ImageFacts
) -> None:
    aws.ebs.meta.events.register("before-parameter-build.ebs.PutSnapshotBlock", refuse_block_7)
    raw = stream(server, image, child_min_raw=0)
    assert isinstance(raw, ChildRaw)
    with pytest.raises(SnapshotError) as info:
        upload(aws, raw, image.raw_size, workers=1)
    assert info.value.code == "ValidationException"
    assert_abandoned(aws)
    assert_child_reaped(raw)


@pytest.mark.integration
def test_cut_download_deletes_the_snapshot(
    aws: Aws, server: ImageServer, image: ImageFacts
) -> None:
    url = server.add("cut.raw.xz", Route(image.path, cut_after=image.compressed_size // 2))
    session = make_session(retries=0, timeout=5.0)
    with pytest.raises(DownloadError) as info:
        upload(aws, stream_raw(session, url, image.sha256, image.raw_size), image.raw_size)
    assert type(info.value) is DownloadError
    assert_abandoned(aws)


def test_aws_error_mid_upload_deletes_the_snapshot(aws: Aws, image: ImageFacts) -> None:
    aws.ebs.meta.events.register("before-parameter-build.ebs.PutSnapshotBlock", refuse_block_7)
    raw = lzma.decompress(image.path.read_bytes())
    with pytest.raises(SnapshotError) as info:
        upload(aws, iter([raw[i : i + BLOCK] for i in range(0, len(raw), BLOCK)]), len(raw))
    assert info.value.code == "ValidationException"
    assert info.value.snapshot_id.startswith("snap-")
    assert_abandoned(aws)


def test_error_from_the_data_source_is_reraised_unchanged(aws: Aws) -> None:
    class Boom(RuntimeError):
        pass

    def raw() -> Iterator[bytes]:
        yield b"\x01" * BLOCK
        raise Boom("disk on fire")

    with pytest.raises(Boom):
        upload(aws, raw(), 4 * BLOCK)
    assert_abandoned(aws)


@pytest.mark.parametrize("given", [3 * BLOCK, 5 * BLOCK], ids=["short", "long"])
def test_raw_data_of_the_wrong_length(aws: Aws, given: int) -> None:
    with pytest.raises(SnapshotError, match="bytes"):
        upload(aws, iter([b"\x01" * given]), 4 * BLOCK)
    assert_abandoned(aws)


def test_start_snapshot_refused(aws: Aws) -> None:
    def quota(**_: Any) -> None:
        raise ClientError(
            {"Error": {"Code": "ServiceQuotaExceededException", "Message": "100 pending"}},
            "StartSnapshot",
        )

    aws.ebs.meta.events.register("before-parameter-build.ebs.StartSnapshot", quota)
    closed = []

    def raw() -> Iterator[bytes]:
        try:
            yield b"\x01" * BLOCK
        finally:
            closed.append(True)

    source = raw()
    next(source)  # started, so closing it runs its finally
    with pytest.raises(SnapshotError) as info:
        upload(aws, source, BLOCK)
    assert info.value.code == "ServiceQuotaExceededException"
    assert closed == [True], "the download is closed, not left hanging"
    assert aws.started == []


def test_upload_outrunning_its_deadline(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow download stops at start_snapshot's Timeout: AWS would cancel it anyway."""
    now = {"t": 1000.0}
    monkeypatch.setattr(snapshot, "_clock", lambda: now["t"])

    def slow_raw() -> Iterator[bytes]:
        yield b"\x01" * BLOCK
        now["t"] += 10 * 60 + 1  # the 10 minutes have passed
        yield b"\x02" * BLOCK

    with pytest.raises(SnapshotTimeout) as info:
        upload(aws, slow_raw(), 4 * BLOCK, timeout_minutes=10)
    assert isinstance(info.value, TimeoutError)
    assert_abandoned(aws)


@pytest.mark.parametrize(
    "kwargs", [{"workers": 0}, {"timeout_minutes": 5}, {"timeout_minutes": 5000}]
)
def test_bad_arguments(aws: Aws, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        upload(aws, iter([b"\x01" * BLOCK]), BLOCK, **kwargs)
    assert aws.calls("StartSnapshot") == []


# ---------------------------------------------------------------------------
# Retries


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.body


def error_response(code: str, status: int) -> AWSResponse:
    body = json.dumps({"message": "injected"}).encode()
    headers = {"x-amzn-ErrorType": code, "Content-Type": "application/json"}
    return AWSResponse("https://ebs.local/", status, headers, _Raw(body))


@pytest.mark.parametrize(
    ("code", "status"),
    [("RequestThrottledException", 400), ("InternalServerException", 500)],
)
def test_botocore_retries_throttling_and_server_errors(
    aws: Aws, image: ImageFacts, code: str, status: int
) -> None:
    """The errors left to botocore's adaptive mode really are retried by it."""
    failures = {"left": 1}

    def fail_once(**_: Any) -> AWSResponse | None:
        if failures["left"]:
            failures["left"] -= 1
            return error_response(code, status)
        return None

    aws.ebs.meta.events.register_first("before-send.ebs.PutSnapshotBlock", fail_once)
    result = upload(aws, iter([b"\x05" * BLOCK]), BLOCK)
    assert result.blocks_sent == 1
    assert failures["left"] == 0
    assert len(aws.calls("PutSnapshotBlock")) == 1, "one API call, retried inside botocore"


def test_concurrent_limit_is_retried_here(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    """ConcurrentLimitExceededException is a 400 botocore gives up on at once."""
    monkeypatch.setattr(snapshot, "RETRY_BASE_DELAY", 0.001)
    failures = {"left": 2}

    def limit(**_: Any) -> AWSResponse | None:
        if failures["left"]:
            failures["left"] -= 1
            return error_response("ConcurrentLimitExceededException", 400)
        return None

    aws.ebs.meta.events.register_first("before-send.ebs.PutSnapshotBlock", limit)
    result = upload(aws, iter([b"\x05" * BLOCK]), BLOCK)
    assert result.blocks_sent == 1
    assert len(aws.calls("PutSnapshotBlock")) == 3


def test_concurrent_limit_retries_are_bounded(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot, "RETRY_BASE_DELAY", 0.001)
    aws.ebs.meta.events.register_first(
        "before-send.ebs.PutSnapshotBlock",
        lambda **_: error_response("ConcurrentLimitExceededException", 400),
    )
    with pytest.raises(SnapshotError) as info:
        upload(aws, iter([b"\x05" * BLOCK]), BLOCK)
    assert info.value.code == "ConcurrentLimitExceededException"
    assert len(aws.calls("PutSnapshotBlock")) == snapshot.RETRY_ATTEMPTS
    assert_abandoned(aws)


# ---------------------------------------------------------------------------
# Memory: the queue bounds the blocks held


def test_blocks_in_flight_are_bounded(aws: Aws) -> None:
    """With every writer stuck, the reader stops pulling data at the bound."""
    workers = 3
    bound = max_blocks_in_flight(workers)
    gate = threading.Event()
    lock = threading.Lock()
    state = {"pulled": 0, "done": 0, "max": 0, "entered": 0}

    def stuck(**_: Any) -> None:
        with lock:
            state["entered"] += 1
        assert gate.wait(timeout=30), "test gate never opened"

    def done(**_: Any) -> None:
        with lock:
            state["done"] += 1

    aws.ebs.meta.events.register_first("before-send.ebs.PutSnapshotBlock", stuck)
    aws.ebs.meta.events.register("after-call.ebs.PutSnapshotBlock", done)
    blocks = 40

    def raw() -> Iterator[bytes]:
        for n in range(blocks):
            with lock:
                state["pulled"] += 1
                # blocks read and not yet written: in a writer, the queue or the reader's hand
                state["max"] = max(state["max"], state["pulled"] - state["done"])
            yield n.to_bytes(4, "big") * (BLOCK // 4) if n else b"\x01" * BLOCK

    outcome: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: outcome.setdefault("result", upload(aws, raw(), blocks * BLOCK, workers=3))
    )
    worker.start()
    try:
        # All writers stuck and the queue full: the reader holds one more, then waits.
        wait_until(lambda: state["pulled"] >= bound + 1, 10, "the reader to fill the queue")
        wait_until(lambda: state["entered"] == workers, 10, "every writer to be busy")
        assert state["pulled"] == bound + 1
    finally:
        gate.set()
        worker.join(timeout=30)
    assert outcome["result"].blocks_sent == blocks
    assert state["max"] == bound + 1


def test_the_block_writers_give_the_cpu_to_the_decoder_first(aws: Aws) -> None:
    """Every put comes from a thread BACKGROUND_STEP nice levels down; the caller keeps its own."""
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    background = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + BACKGROUND_STEP)
    seen: list[int] = []

    def record(**_: Any) -> None:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    aws.ebs.meta.events.register("before-send.ebs.PutSnapshotBlock", record)
    blocks = [bytes([n + 1]) * BLOCK for n in range(6)]
    result = upload(aws, iter(blocks), len(blocks) * BLOCK, workers=3)

    assert result.blocks_sent == len(seen) == 6
    assert set(seen) == {background} != {mine}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


# ---------------------------------------------------------------------------
# Completion and cleanup


class FakeEc2:
    """describe_snapshots answering a scripted list of states (moto completes at once)."""

    def __init__(self, states: list[str]) -> None:
        self.states = states
        self.deleted: list[str] = []

    def describe_snapshots(self, SnapshotIds: list[str]) -> dict[str, Any]:
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return {"Snapshots": [{"SnapshotId": SnapshotIds[0], "State": state}]}

    def delete_snapshot(self, SnapshotId: str) -> None:
        self.deleted.append(SnapshotId)


def test_waits_for_a_pending_snapshot(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot, "COMPLETION_POLL_FIRST", 0.001)
    ec2 = FakeEc2(["pending", "pending", "completed"])
    result = upload_snapshot(
        aws.ebs,
        ec2,
        iter([b"\x01" * BLOCK]),
        BLOCK,
        description="d",
        tags={},
        client_token=TOKEN,
        timeout_minutes=10,
    )
    assert ec2.states == ["completed"]
    assert ec2.deleted == []
    assert result.blocks_sent == 1


@pytest.mark.parametrize(
    ("states", "error", "wait"),
    [(["pending", "error"], SnapshotError, 60.0), (["pending"], SnapshotTimeout, 0.05)],
    ids=["error", "timeout"],
)
def test_snapshot_that_never_completes_is_deleted(
    aws: Aws,
    monkeypatch: pytest.MonkeyPatch,
    states: list[str],
    error: type[Exception],
    wait: float,
) -> None:
    monkeypatch.setattr(snapshot, "COMPLETION_POLL_FIRST", 0.001)
    ec2 = FakeEc2(states)
    with pytest.raises(error) as info:
        upload_snapshot(
            aws.ebs,
            ec2,
            iter([b"\x01" * BLOCK]),
            BLOCK,
            description="d",
            tags={},
            client_token=TOKEN,
            completion_timeout=wait,
        )
    assert (type(info.value) is SnapshotTimeout) == (error is SnapshotTimeout)
    assert len(ec2.deleted) == 1


def test_delete_snapshot_quietly(aws: Aws, caplog: pytest.LogCaptureFixture) -> None:
    snap = aws.ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    delete_snapshot_quietly(aws.ec2, snap, "ctx")
    assert not aws.snapshot_exists(snap)
    delete_snapshot_quietly(aws.ec2, snap, "ctx")  # already gone: fine, no error logged
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

    def refuse(**_: Any) -> None:
        raise ClientError({"Error": {"Code": "UnauthorizedOperation"}}, "DeleteSnapshot")

    aws.ec2.meta.events.register("before-parameter-build.ec2.DeleteSnapshot", refuse)
    delete_snapshot_quietly(aws.ec2, "snap-0123456789abcdef0", "ctx")  # logged, not raised
    assert [r for r in caplog.records if r.levelno >= logging.ERROR]


# ---------------------------------------------------------------------------
# Multi-block xz images: blocks from a BlockSource (fedimg.xzparallel)


@pytest.fixture(scope="module")
def multiblock(tmp_path_factory: pytest.TempPathFactory) -> ImageFacts:
    """xz blocks of 700000 raw bytes (not 512 KiB aligned), 3 parts of >= 8 MiB raw."""
    return build_raw_xz(
        tmp_path_factory.mktemp("multiblock") / "multiblock.raw.xz",
        40 * BLOCK + 999,
        (0, 1, 2, 13, 14, 15, 16, 26, 39, 40),
        seed=21,
        xz_block_size=700_000,
    )


@pytest.mark.integration
def test_upload_of_a_multi_block_image_decoded_in_parallel(
    aws: Aws, server: ImageServer, multiblock: ImageFacts
) -> None:
    raw = stream(server, multiblock)
    assert isinstance(raw, ParallelRaw) and len(raw.parts) == 3
    seen: list[int] = []
    result = upload(aws, raw, multiblock.raw_size, progress=seen.append)

    assert result.blocks_sent == len(multiblock.nonzero_blocks)
    assert result.bytes_read == multiblock.raw_size
    puts = aws.calls("PutSnapshotBlock")
    assert sorted(p["BlockIndex"] for p in puts) == list(multiblock.nonzero_blocks)
    for put in puts:
        assert put["DataLength"] == BLOCK == len(put["BlockData"])
        assert put["Checksum"] == b64sha(put["BlockData"])
    (complete,) = aws.calls("CompleteSnapshot")
    digests = b"".join(
        bytes.fromhex(multiblock.block_digests[i]) for i in multiblock.nonzero_blocks
    )
    assert complete["ChangedBlocksCount"] == len(multiblock.nonzero_blocks)
    assert complete["Checksum"] == b64sha(digests)
    stored = aws.stored_blocks(result.snapshot_id)
    assert {i: hashlib.sha256(d).hexdigest() for i, d in stored.items()} == (
        multiblock.block_digests
    )
    assert seen == sorted(seen) and seen[-1] == multiblock.raw_size


@pytest.mark.integration
def test_parallel_checksum_mismatch_deletes_the_snapshot(
    aws: Aws, server: ImageServer, multiblock: ImageFacts
) -> None:
    raw = stream(server, multiblock, sha256=hashlib.sha256(b"not this image").hexdigest())
    assert isinstance(raw, ParallelRaw)
    with pytest.raises(ChecksumMismatch):
        upload(aws, raw, multiblock.raw_size)
    assert aws.calls("PutSnapshotBlock"), "blocks were written before the checksum was known"
    assert len(aws.calls("PutSnapshotBlock")) < len(multiblock.nonzero_blocks)
    assert_abandoned(aws)


class Blocks:
    """A BlockSource handing out given items; records whether it was closed."""

    def __init__(self, raw_size: int, items: list[tuple[int, bytes] | None]) -> None:
        self.raw_size = raw_size
        self.items = items
        self.closed = False
        self.done = 0

    @property
    def raw_done(self) -> int:
        return self.done

    def blocks(self) -> Iterator[tuple[int, bytes] | None]:
        for item in self.items:
            self.done += BLOCK
            yield item

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("raw_size", "items"),
    [
        (3 * BLOCK, [(0, b"\x01" * BLOCK), (3, b"\x01" * BLOCK)]),  # past the volume
        (3 * BLOCK, [(1, b"\x01" * 100)]),  # not a whole block
        (3 * BLOCK, [(-1, b"\x01" * BLOCK)]),
    ],
    ids=["index", "length", "negative"],
)
def test_a_block_source_handing_out_a_bad_block(
    aws: Aws, raw_size: int, items: list[tuple[int, bytes] | None]
) -> None:
    source = Blocks(raw_size, items)
    with pytest.raises(SnapshotError, match="block"):
        upload(aws, source, raw_size)
    assert source.closed
    assert_abandoned(aws)


def test_a_block_source_of_another_size(aws: Aws) -> None:
    source = Blocks(2 * BLOCK, [(0, b"\x01" * BLOCK)])
    with pytest.raises(SnapshotError, match="bytes"):
        upload(aws, source, 3 * BLOCK)
    assert source.closed
    assert_abandoned(aws)


def test_a_block_source_outrunning_the_deadline(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> None:
    now = {"t": 1000.0}
    monkeypatch.setattr(snapshot, "_clock", lambda: now["t"])

    class Slow(Blocks):
        def blocks(self) -> Iterator[tuple[int, bytes] | None]:
            yield (0, b"\x01" * BLOCK)
            now["t"] += 10 * 60 + 1
            while True:  # a download that stalls: the caller must give up
                yield None

    source = Slow(4 * BLOCK, [])
    with pytest.raises(SnapshotTimeout):
        upload(aws, source, 4 * BLOCK, timeout_minutes=10)
    assert source.closed
    assert_abandoned(aws)
