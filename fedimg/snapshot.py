"""Write a raw disk image into a new EBS snapshot with the EBS direct APIs.

start_snapshot -> put_snapshot_block for every 512 KiB block that is not all
zeros (a new snapshot reads as zeros), from a bounded pool of threads fed
through a bounded queue -> complete_snapshot with the LINEAR aggregate of the
per-block SHA256 checksums -> wait until EC2 reports it ``completed``.

The raw data comes as chunks of any size (re-blocked here) or, from a
multi-block xz file, as a ``BlockSource`` already cut into blocks
(``fedimg.xzparallel``). Memory is O(workers x 512 KiB) whatever the image
size. On any failure, from the raw data (a download error) or from AWS,
nothing is completed: the workers stop, the snapshot is deleted and the error re-raised (download
errors unchanged, AWS errors as ``SnapshotError`` carrying the AWS code).

Retries: botocore's adaptive mode (fedimg.aws.AwsClients) retries
``RequestThrottledException`` (a throttling code) and ``InternalServerException``
/ 503s (transient status codes). ``ConcurrentLimitExceededException`` (HTTP 400)
is in neither list, so it alone gets the bounded backoff below.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from botocore.exceptions import BotoCoreError, ClientError

from fedimg.arenas import limit_arenas
from fedimg.aws import error_code, tag_list
from fedimg.ebsblocks import BLOCK_SIZE, Reblocker
from fedimg.priority import background_thread

log = logging.getLogger(__name__)

GIB = 1 << 30

# EBS errors botocore does not retry itself, and how hard to retry them here.
RETRY_CODES = frozenset({"ConcurrentLimitExceededException"})
RETRY_ATTEMPTS = 8
RETRY_BASE_DELAY = 0.25
RETRY_MAX_DELAY = 8.0

QUEUE_BLOCKS_PER_WORKER = 1
MIN_TIMEOUT_MINUTES = 10  # start_snapshot's Timeout range
MAX_TIMEOUT_MINUTES = 4320
STOP_WORKERS_SECONDS = 30.0
COMPLETION_POLL_FIRST = 1.0
_clock = time.monotonic  # every deadline here; a test may move it
COMPLETION_POLL_MAX = 15.0


class SnapshotError(Exception):
    """The snapshot could not be written; ``code`` is the AWS error code if AWS said no."""

    def __init__(self, message: str, code: str = "", snapshot_id: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.snapshot_id = snapshot_id


class SnapshotTimeout(SnapshotError, TimeoutError):
    """The upload or the snapshot's completion outran its deadline."""


@dataclass(frozen=True)
class SnapshotUpload:
    snapshot_id: str
    volume_size_gib: int
    blocks_total: int
    blocks_sent: int
    bytes_read: int


@runtime_checkable
class BlockSource(Protocol):
    """Raw data already cut into non-zero 512 KiB blocks (fedimg.xzparallel.ParallelRaw).

    ``blocks()`` yields (index, block) pairs in any order, or None when there
    is no block yet (so the caller can report progress and check its
    deadline); it raises on bad data and ends only once all of it is verified.
    ``raw_done`` counts the raw bytes behind what was yielded so far.
    ``close()`` stops it early.
    """

    raw_size: int

    @property
    def raw_done(self) -> int: ...

    def blocks(self) -> Iterator[tuple[int, bytes] | None]: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------
# Functional core


def volume_size_gib(raw_size: int) -> int:
    """The snapshot's volume size: the image rounded up to whole GiB."""
    if raw_size <= 0:
        raise ValueError(f"raw_size must be positive, not {raw_size}")
    return -(-raw_size // GIB)


def blocks_total(raw_size: int) -> int:
    return -(-raw_size // BLOCK_SIZE)


def block_checksum(block: bytes) -> tuple[bytes, str]:
    """(raw sha256 digest, base64 of it) of one block."""
    digest = hashlib.sha256(block).digest()
    return digest, base64.b64encode(digest).decode("ascii")


def aggregate_checksum(digests: Mapping[int, bytes]) -> str:
    """EBS's LINEAR aggregate: b64(sha256(concatenated block digests in index order))."""
    joined = b"".join(digests[index] for index in sorted(digests))
    return base64.b64encode(hashlib.sha256(joined).digest()).decode("ascii")


def queue_depth(workers: int) -> int:
    """Blocks waiting for a writer at most: lets a run of data overlap the zeros after it."""
    return QUEUE_BLOCKS_PER_WORKER * workers


def max_blocks_in_flight(workers: int) -> int:
    """Blocks held at most between the reader and AWS: one per writer plus a full queue."""
    return workers + queue_depth(workers)


# ---------------------------------------------------------------------------
# The writer pool


class _Stop:
    """Queue sentinel."""


_STOP = _Stop()


class _BlockWriter:
    """``workers`` threads putting blocks taken from a queue of ``queue_depth(workers)``."""

    def __init__(
        self, ebs: Any, snapshot_id: str, workers: int, deadline: float, log_context: str
    ) -> None:
        self.ebs = ebs
        self.snapshot_id = snapshot_id
        self.deadline = deadline
        self.log_context = log_context
        self.digests: dict[int, bytes] = {}
        self.error: BaseException | None = None
        self.abort = threading.Event()
        self._queue: queue.Queue[tuple[int, bytes] | _Stop] = queue.Queue(
            maxsize=queue_depth(workers)
        )
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, name=f"ebs-put-{n}", daemon=True)
            for n in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, index: int, block: bytes) -> None:
        """Queue one block, waiting for room; raise a worker's error or the deadline."""
        self._enqueue((index, block))

    def finish(self) -> dict[int, bytes]:
        """Wait for every queued block to be written; the digests by block index."""
        for _ in self._threads:
            self._enqueue(_STOP)
        for thread in self._threads:
            while thread.is_alive():
                self._raise_if_failed()
                thread.join(timeout=min(self._remaining(), 0.5))
        self._raise_if_failed()
        return self.digests

    def _enqueue(self, item: tuple[int, bytes] | _Stop) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=min(self._remaining(), 0.5))
                return
            except queue.Full:
                continue

    def _remaining(self) -> float:
        """Seconds left before the deadline; SnapshotTimeout once it has passed."""
        remaining = self.deadline - _clock()
        if remaining <= 0:
            raise SnapshotTimeout(
                f"upload of {self.snapshot_id} outran its deadline", snapshot_id=self.snapshot_id
            )
        return remaining

    def stop(self) -> None:
        """Abort: drop queued blocks, let in-flight calls end, do not wait forever."""
        self.abort.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            try:
                self._queue.put_nowait(_STOP)
            except queue.Full:
                break
        give_up = time.monotonic() + STOP_WORKERS_SECONDS
        for thread in self._threads:
            thread.join(timeout=max(0.0, give_up - time.monotonic()))
        alive = sum(t.is_alive() for t in self._threads)
        if alive:
            log.warning(
                "%s: %s: %d block writers still busy after abort; left to finish alone",
                self.log_context,
                self.snapshot_id,
                alive,
            )

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        background_thread()  # the decoder first: this thread mostly waits on the network
        while not self.abort.is_set():
            item = self._queue.get()
            if isinstance(item, _Stop):
                return
            index, block = item
            try:
                digest = self._put(index, block)
            except BaseException as exc:  # noqa: BLE001 - handed to the producer, re-raised there
                with self._lock:
                    if self.error is None:
                        self.error = exc
                self.abort.set()
                return
            with self._lock:
                self.digests[index] = digest

    def _put(self, index: int, block: bytes) -> bytes:
        digest, checksum = block_checksum(block)
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            try:
                self.ebs.put_snapshot_block(
                    SnapshotId=self.snapshot_id,
                    BlockIndex=index,
                    BlockData=block,
                    DataLength=BLOCK_SIZE,
                    Checksum=checksum,
                    ChecksumAlgorithm="SHA256",
                )
                return digest
            except ClientError as exc:
                code = error_code(exc)
                if code not in RETRY_CODES or attempt == RETRY_ATTEMPTS or self.abort.is_set():
                    raise
                delay = min(RETRY_MAX_DELAY, RETRY_BASE_DELAY * 2 ** (attempt - 1))
                delay *= random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not crypto
                log.warning(
                    "%s: %s: block %d: %s, retry %d/%d in %.1fs",
                    self.log_context,
                    self.snapshot_id,
                    index,
                    code,
                    attempt,
                    RETRY_ATTEMPTS - 1,
                    delay,
                )
                if self.abort.wait(delay):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------------------
# The shell


def upload_snapshot(
    ebs: Any,
    ec2: Any,
    raw: Iterable[bytes] | BlockSource,
    raw_size: int,
    *,
    workers: int = 16,
    description: str,
    tags: Mapping[str, str],
    client_token: str,
    progress: Callable[[int], None] | None = None,
    timeout_minutes: int = 60,
    completion_timeout: float = 1800.0,
    log_context: str = "",
) -> SnapshotUpload:
    """Write ``raw`` (exactly ``raw_size`` bytes) into a new snapshot.

    ``raw`` is either chunks of any size, re-blocked here, or a
    ``BlockSource`` handing over 512 KiB blocks itself (``stream_raw`` of a
    multi-block xz file).

    ``timeout_minutes`` is both start_snapshot's Timeout (AWS cancels an
    unfinished snapshot after it) and the deadline for writing every block;
    ``completion_timeout`` (seconds) bounds the wait for EC2 to report the
    completed snapshot. ``progress(bytes_read)`` is called as raw data is read.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    if not MIN_TIMEOUT_MINUTES <= timeout_minutes <= MAX_TIMEOUT_MINUTES:
        raise ValueError(
            f"timeout_minutes must be {MIN_TIMEOUT_MINUTES}..{MAX_TIMEOUT_MINUTES}, "
            f"not {timeout_minutes}"
        )
    limit_arenas()  # before this upload's threads allocate: fedimg.arenas says why
    size_gib = volume_size_gib(raw_size)
    total = blocks_total(raw_size)
    deadline = _clock() + timeout_minutes * 60
    try:
        started = ebs.start_snapshot(
            VolumeSize=size_gib,
            Timeout=timeout_minutes,
            ClientToken=client_token,
            Description=description,
            Tags=tag_list(tags),
        )
    except (ClientError, BotoCoreError) as exc:
        _close(raw)
        raise SnapshotError(
            f"start_snapshot failed: {error_code(exc) or exc}", code=error_code(exc)
        ) from exc
    snapshot_id = str(started["SnapshotId"])
    log.info(
        "%s: started snapshot %s: %d GiB, %d blocks of %d bytes, %d writers",
        log_context,
        snapshot_id,
        size_gib,
        total,
        BLOCK_SIZE,
        workers,
    )
    writer: _BlockWriter | None = None
    try:
        writer = _BlockWriter(ebs, snapshot_id, workers, deadline, log_context)
        if isinstance(raw, BlockSource):
            bytes_read = _feed_blocks(writer, raw, raw_size, snapshot_id, progress)
        else:
            bytes_read = _feed(writer, raw, raw_size, snapshot_id, progress)
        digests = writer.finish()
        blocks_sent = len(digests)
        _complete(ebs, snapshot_id, digests)
        _wait_completed(ec2, snapshot_id, _clock() + completion_timeout, log_context)
    except BaseException as exc:
        if writer is not None:
            writer.stop()
        _close(raw)
        log.error(
            "%s: snapshot %s failed (%s: %s); deleting it",
            log_context,
            snapshot_id,
            type(exc).__name__,
            error_code(exc) or exc,
        )
        delete_snapshot_quietly(ec2, snapshot_id, log_context)
        if isinstance(exc, (ClientError, BotoCoreError)):
            code = error_code(exc)
            raise SnapshotError(
                f"snapshot {snapshot_id}: {code or exc}", code=code, snapshot_id=snapshot_id
            ) from exc
        raise
    log.info(
        "%s: snapshot %s completed: %d of %d blocks written, %d bytes read",
        log_context,
        snapshot_id,
        blocks_sent,
        total,
        bytes_read,
    )
    return SnapshotUpload(
        snapshot_id=snapshot_id,
        volume_size_gib=size_gib,
        blocks_total=total,
        blocks_sent=blocks_sent,
        bytes_read=bytes_read,
    )


def _feed(
    writer: _BlockWriter,
    raw: Iterable[bytes],
    raw_size: int,
    snapshot_id: str,
    progress: Callable[[int], None] | None,
) -> int:
    reblocker = Reblocker()
    bytes_read = 0
    for chunk in raw:
        bytes_read += len(chunk)
        if bytes_read > raw_size:
            raise SnapshotError(
                f"snapshot {snapshot_id}: more than the declared {raw_size} bytes of raw data",
                snapshot_id=snapshot_id,
            )
        for index, block in reblocker.push(chunk):
            writer.submit(index, block)
        if progress is not None:
            progress(bytes_read)
        _check_deadline(writer, snapshot_id)
    if bytes_read != raw_size:
        raise SnapshotError(
            f"snapshot {snapshot_id}: raw data ended at {bytes_read} of {raw_size} bytes",
            snapshot_id=snapshot_id,
        )
    for index, block in reblocker.finish():
        writer.submit(index, block)
    return bytes_read


def _feed_blocks(
    writer: _BlockWriter,
    source: BlockSource,
    raw_size: int,
    snapshot_id: str,
    progress: Callable[[int], None] | None,
) -> int:
    if source.raw_size != raw_size:
        raise SnapshotError(
            f"snapshot {snapshot_id}: raw data of {source.raw_size} bytes, "
            f"not the declared {raw_size}",
            snapshot_id=snapshot_id,
        )
    total = blocks_total(raw_size)
    for item in source.blocks():
        if item is not None:
            index, block = item
            if not 0 <= index < total or len(block) != BLOCK_SIZE:
                raise SnapshotError(
                    f"snapshot {snapshot_id}: block {index} of {len(block)} bytes "
                    f"does not fit a volume of {total} blocks",
                    snapshot_id=snapshot_id,
                )
            writer.submit(index, block)
        if progress is not None:
            progress(source.raw_done)
        _check_deadline(writer, snapshot_id)
    return source.raw_done


def _check_deadline(writer: _BlockWriter, snapshot_id: str) -> None:
    if _clock() > writer.deadline:
        raise SnapshotTimeout(
            f"upload of {snapshot_id} outran its deadline", snapshot_id=snapshot_id
        )


def _complete(ebs: Any, snapshot_id: str, digests: Mapping[int, bytes]) -> None:
    done = ebs.complete_snapshot(
        SnapshotId=snapshot_id,
        ChangedBlocksCount=len(digests),
        Checksum=aggregate_checksum(digests),
        ChecksumAlgorithm="SHA256",
        ChecksumAggregationMethod="LINEAR",
    )
    if done.get("Status") == "error":
        raise SnapshotError(
            f"complete_snapshot of {snapshot_id} reported status error", snapshot_id=snapshot_id
        )


def _wait_completed(ec2: Any, snapshot_id: str, deadline: float, log_context: str) -> None:
    """Poll EC2 until the snapshot is ``completed``; SnapshotError on ``error``."""
    delay = COMPLETION_POLL_FIRST
    while True:
        found = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
        state = found[0]["State"] if found else "missing"
        if state == "completed":
            return
        if state in ("error", "missing"):
            raise SnapshotError(
                f"snapshot {snapshot_id} is in state {state}", snapshot_id=snapshot_id
            )
        remaining = deadline - _clock()
        if remaining <= 0:
            raise SnapshotTimeout(
                f"snapshot {snapshot_id} still {state} at its deadline", snapshot_id=snapshot_id
            )
        log.info("%s: snapshot %s is %s, waiting", log_context, snapshot_id, state)
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, COMPLETION_POLL_MAX)


def _close(raw: Iterable[bytes] | BlockSource) -> None:
    """Close a generator (and so its HTTP connection) the upload will not finish reading."""
    close = getattr(raw, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            log.exception("closing the raw data source failed")


def delete_snapshot_quietly(ec2: Any, snapshot_id: str, log_context: str = "") -> None:
    """Delete a snapshot; gone already is fine; any other failure is logged, never raised.

    Used on failure paths, where raising would hide the original error. A
    snapshot that cannot be deleted is logged at ERROR with its id; AWS
    cancels an uncompleted one at its Timeout anyway.
    """
    try:
        ec2.delete_snapshot(SnapshotId=snapshot_id)
    except ClientError as exc:
        if error_code(exc) == "InvalidSnapshot.NotFound":
            log.info("%s: snapshot %s already gone", log_context, snapshot_id)
            return
        log.error(
            "%s: could not delete snapshot %s (%s); delete it by hand",
            log_context,
            snapshot_id,
            error_code(exc),
        )
        return
    except BotoCoreError as exc:
        log.error(
            "%s: could not delete snapshot %s (%s); delete it by hand",
            log_context,
            snapshot_id,
            exc,
        )
        return
    log.info("%s: deleted snapshot %s", log_context, snapshot_id)


def iter_blocks(raw: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """Every non-zero (index, block) of a chunk stream, final block zero-padded."""
    reblocker = Reblocker()
    for chunk in raw:
        yield from reblocker.push(chunk)
    yield from reblocker.finish()
