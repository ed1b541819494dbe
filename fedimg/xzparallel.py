"""Decode a multi-block xz image in parallel, straight into 512 KiB EBS blocks.

``stream_raw`` returns a ``ParallelRaw`` when ``probe_raw_size`` found an xz
file of several parts (``fedimg.xzblocks``) or spooled it;
``upload_snapshot`` consumes it as a ``BlockSource``:

- ``in_flight`` worker threads take the parts in file order. Each fetches
  its part's byte range (one HTTP Range request, resumed where it stopped if
  the answer is cut short, ``RANGE_ATTEMPTS`` times at most; or from the
  spool), decodes its blocks with a decoder of its own (each block wrapped as
  a one-block stream, ``wrap_block``, so liblzma checks it completely), and
  cuts the output into EBS blocks: those the part fills alone through a
  ``Reblocker``, the partial ones at its ends through the shared
  ``Assembler``. ``lzma``, ``hashlib`` and socket reads release the GIL, so
  parts decode on every core at once.
- An xz block identical to one already decoded to nothing but zeros (the
  free space of a disk image, in blocks of 24 MiB at ``xz -6 -T0``) is not
  decoded again (``ZeroBlocks``): it decodes to the same zeros.
- The compressed bytes are hashed in file order (``OrderedDigest``): the
  worker of the earliest unfinished part hashes as it reads, the others keep
  their bytes (``UNHASHED_LIMIT`` in all; beyond it they wait) until their turn.
- Non-zero blocks reach the consumer through a bounded queue, in the order
  they are completed; the last one is held back until the whole file's
  sha256 matched (else ``ChecksumMismatch``), as ``stream_raw`` holds back
  its last chunk, so an upload can never complete on a bad download.

Memory, whatever the image size: per worker one decoder (its dictionary,
never more than the largest block's raw size; ``parts_in_flight`` keeps their
sum under ``DECODER_BUDGET``), one decode step and one partial EBS block; plus
``UNHASHED_LIMIT`` and ``OUTPUT_DEPTH`` blocks of 512 KiB.
"""

from __future__ import annotations

import hashlib
import logging
import lzma
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

import requests
import urllib3.exceptions

from fedimg.ebsblocks import BLOCK_SIZE, ZERO_BLOCK, Reblocker
from fedimg.rawio import (
    DEFAULT_CHUNK,
    ChecksumMismatch,
    CorruptImage,
    DownloadError,
    Spool,
    check_sha256,
    held_back,
    raise_for_status,
)
from fedimg.readahead import drain
from fedimg.xzblocks import (
    BLOCKS_IN_FLIGHT,
    Part,
    XzBlock,
    XzLayout,
    ebs_split,
    parts_in_flight,
    wrap_block,
)

log = logging.getLogger(__name__)

PIECE = 256 * 1024  # compressed bytes read at a time
RANGE_ATTEMPTS = 4  # tries of one part's range; a cut answer resumes where it stopped
RETRY_DELAY = 0.5  # seconds before the first resume, growing linearly
UNHASHED_LIMIT = 32 << 20  # compressed bytes held for the in-order sha256 at most
DECODER_BUDGET = 128 << 20  # decoder dictionaries of all workers at most
OUTPUT_DEPTH = 4  # finished EBS blocks waiting for the consumer at most
ZERO_BLOCK_BYTES = 64 * 1024  # compressed size of the blocks ZeroBlocks keeps, at most
POLL = 0.5  # seconds between checks for a stop or a failure while waiting
STOP_SECONDS = 30.0  # how long close() waits for the workers


class _Stopped(Exception):
    """The run was stopped (the consumer closed it, or another worker failed)."""


class RangeReader(Protocol):
    """Delivers the file's bytes ``[start, end)`` in order to ``sink``, unless ``stop`` is set."""

    def read(
        self, start: int, end: int, sink: Callable[[bytes], None], stop: threading.Event
    ) -> None: ...


class HttpRanges:
    """Byte ranges of one URL, each one GET with Range, resumed where a cut answer stopped.

    Connection errors and 429/5xx answers are retried by the session (fedimg.http);
    a body cut short is resumed here (``RANGE_ATTEMPTS`` requests at most).
    """

    def __init__(
        self, session: requests.Session, url: str, file_size: int, log_context: str
    ) -> None:
        self.session = session
        self.url = url
        self.file_size = file_size
        self.log_context = log_context

    def read(
        self, start: int, end: int, sink: Callable[[bytes], None], stop: threading.Event
    ) -> None:
        pos = start  # every byte before it went to the sink, exactly once

        def counted(piece: bytes) -> None:
            nonlocal pos
            if len(piece) > end - pos:
                raise DownloadError(self.url, f"more than the bytes {start}-{end - 1} asked")
            sink(piece)
            pos += len(piece)

        for attempt in range(1, RANGE_ATTEMPTS + 1):
            try:
                self._get(pos, end, counted, stop)
                if pos == end or stop.is_set():
                    return
                reason = f"the answer ended at byte {pos}"
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if attempt == RANGE_ATTEMPTS:
                raise DownloadError(
                    self.url, f"bytes {start}-{end - 1}: {reason} ({attempt} attempts)"
                )
            log.warning(
                "%s: %s: bytes %d-%d: %s; resuming at byte %d (attempt %d of %d)",
                self.log_context,
                self.url,
                start,
                end - 1,
                reason,
                pos,
                attempt + 1,
                RANGE_ATTEMPTS,
            )
            if stop.wait(RETRY_DELAY * attempt):
                return

    def _get(
        self, pos: int, end: int, sink: Callable[[bytes], None], stop: threading.Event
    ) -> None:
        """One request for ``[pos, end)``, its body handed to ``sink`` until ``stop``."""
        headers = {"Accept-Encoding": "identity", "Range": f"bytes={pos}-{end - 1}"}
        with self.session.get(self.url, headers=headers, stream=True) as resp:
            if resp.status_code != 206:
                raise_for_status(resp, self.url)
                raise DownloadError(
                    self.url, f"HTTP {resp.status_code} for bytes {pos}-{end - 1}, not 206"
                )
            wanted = f"bytes {pos}-{end - 1}/{self.file_size}"
            if resp.headers.get("Content-Range") != wanted:
                raise DownloadError(
                    self.url,
                    f"Content-Range {resp.headers.get('Content-Range')!r}, asked {wanted!r}",
                )
            for piece in resp.iter_content(PIECE):
                if stop.is_set():
                    return
                sink(piece)


class SpoolRanges:
    """Byte ranges of a spooled file (``fedimg.download.Spool``)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def read(
        self, start: int, end: int, sink: Callable[[bytes], None], stop: threading.Event
    ) -> None:
        for offset in range(start, end, PIECE):
            if stop.is_set():
                return
            sink(self.spool.read(offset, min(PIECE, end - offset)))


class OrderedDigest:
    """The sha256 of parts' bytes in part order, whatever order they arrive in.

    ``feed(n, data)`` hashes at once for the earliest unfinished part and
    keeps the data of later ones (``limit`` bytes in all; beyond it their
    feeders wait for their turn); ``finish(n)`` says part ``n`` is complete.
    """

    def __init__(self, parts: int, limit: int, stop: threading.Event) -> None:
        self.parts = parts
        self.limit = limit
        self.stop = stop
        self.total = 0
        self._sha = hashlib.sha256()
        self._front = 0
        self._held: dict[int, list[bytes]] = {}
        self._held_bytes = 0
        self._finished: set[int] = set()
        self._cond = threading.Condition()

    def feed(self, part: int, data: bytes) -> None:
        with self._cond:
            while (
                part != self._front
                and self._held_bytes
                and self._held_bytes + len(data) > self.limit
            ):
                if self.stop.is_set():
                    raise _Stopped
                self._cond.wait(POLL)
            if part == self._front:
                self._sha.update(data)
            else:
                self._held.setdefault(part, []).append(data)
                self._held_bytes += len(data)
            self.total += len(data)

    def finish(self, part: int) -> None:
        with self._cond:
            self._finished.add(part)
            while self._front in self._finished:
                self._finished.discard(self._front)
                self._front += 1
                for data in self._held.pop(self._front, ()):
                    self._sha.update(data)
                    self._held_bytes -= len(data)
            self._cond.notify_all()

    def hexdigest(self) -> str:
        """The digest, once every part is finished."""
        with self._cond:
            if self._front != self.parts:
                raise RuntimeError(f"{self.parts - self._front} parts not hashed yet")
            return self._sha.hexdigest()


class Assembler:
    """EBS blocks that several parts fill (or that end the image), collected piece by piece.

    ``add`` takes raw bytes lying inside one EBS block and returns that block,
    zero-filled around its pieces (and padded if it ends the image), once all
    its bytes have arrived and unless they are all zero. Zero pieces are
    counted, never kept.
    """

    def __init__(self, raw_size: int, block_size: int = BLOCK_SIZE) -> None:
        self.raw_size = raw_size
        self.block_size = block_size
        self._zero = bytes(block_size)
        self._pending: dict[int, tuple[int, list[tuple[int, bytes]]]] = {}
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """EBS blocks started and not complete."""
        with self._lock:
            return len(self._pending)

    def add(self, raw_offset: int, data: bytes | memoryview) -> tuple[int, bytes] | None:
        index, at = divmod(raw_offset, self.block_size)
        if at + len(data) > self.block_size or raw_offset + len(data) > self.raw_size:
            raise ValueError(f"{len(data)} bytes at {raw_offset} cross an EBS block or the end")
        expected = min(self.block_size, self.raw_size - index * self.block_size)
        kept = None if self._zero.startswith(data) else bytes(data)
        with self._lock:
            got, pieces = self._pending.pop(index, (0, []))
            got += len(data)
            if kept is not None:
                pieces.append((at, kept))
            if got > expected:
                raise ValueError(f"EBS block {index} got {got} bytes, holds {expected}")
            if got < expected:
                self._pending[index] = (got, pieces)
                return None
        if not pieces:
            return None
        block = bytearray(self.block_size)
        for at, piece in pieces:
            block[at : at + len(piece)] = piece
        return index, bytes(block)


class _PartOutput:
    """Routes one part's raw output, in order, to the EBS blocks it belongs to."""

    def __init__(
        self,
        part: Part,
        assembler: Assembler,
        emit: Callable[[tuple[int, bytes]], None],
    ) -> None:
        split = ebs_split(part.raw_start, part.raw_end, BLOCK_SIZE)
        self.pos = part.raw_start
        self.head_end = split.head[1] if split.head else part.raw_start
        self.body_end = split.body[1] if split.body else self.head_end
        self.reblocker = Reblocker(first_index=self.head_end // BLOCK_SIZE)
        self.assembler = assembler
        self.emit = emit

    def push(self, data: bytes) -> None:
        pos = self.pos
        size = len(data)
        self.pos = pos + size
        done = 0
        if pos < self.head_end:
            done = min(size, self.head_end - pos)
            self._assemble(pos, memoryview(data)[:done])
        if done < size and pos + done < self.body_end:
            length = min(size - done, self.body_end - pos - done)
            chunk = data if length == size else data[done : done + length]
            for block in self.reblocker.push(chunk):
                self.emit(block)
            done += length
        if done < size:
            self._assemble(pos + done, memoryview(data)[done:])

    def _assemble(self, raw_offset: int, data: memoryview) -> None:
        block = self.assembler.add(raw_offset, data)
        if block is not None:
            self.emit(block)


class ZeroBlocks:
    """The xz blocks already decoded, completely and verified, to nothing but zeros.

    An xz block is decoded independently of the rest of the file, so another
    block of the same bytes and sizes decodes to the same raw bytes: zeros,
    without decoding it again. Multi-threaded xz compresses every run of
    zeros as long as a block (24 MiB at ``-6``) to the same few KiB, and the
    free space of a disk image is such runs. Keys are the blocks' own bytes
    (no hash to collide); only blocks of at most ``max_bytes`` compressed
    (``ZERO_BLOCK_BYTES``; 0 turns this off) are kept, and ``max_entries`` of them.
    """

    def __init__(self, max_bytes: int | None = None, max_entries: int = 64) -> None:
        self.max_bytes = ZERO_BLOCK_BYTES if max_bytes is None else max_bytes
        self.max_entries = max_entries
        self._known: set[bytes] = set()
        self._lock = threading.Lock()

    def candidate(self, block: XzBlock) -> bool:
        return block.padded_size <= self.max_bytes

    @staticmethod
    def key(block: XzBlock, data: bytes) -> bytes:
        return block.flags + block.raw_size.to_bytes(8, "little") + data

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._known

    def add(self, key: bytes) -> None:
        with self._lock:
            if len(self._known) < self.max_entries:
                self._known.add(key)


class _PartDecoder:
    """Decodes the blocks of one part from the part's bytes, fed in file order.

    A block small enough to be a ``ZeroBlocks`` candidate is collected whole
    first; if it is known to decode to zeros, zeros are pushed instead.
    """

    def __init__(
        self,
        part: Part,
        url: str,
        step: int,
        push: Callable[[bytes], None],
        count: Callable[[int], None],
        *,
        zero_blocks: ZeroBlocks,
    ) -> None:
        self.part = part
        self.url = url
        self.step = step
        self.push = push
        self.count = count
        self.zero_blocks = zero_blocks
        self.pos = part.start
        self.next_block = 0
        self.produced = 0
        self.all_zero = False  # so far, for a ZeroBlocks candidate
        self.trailer = b""
        self.dec: lzma.LZMADecompressor | None = None
        self.held: list[bytes] | None = None  # a candidate's bytes until it is whole

    def feed(self, piece: bytes) -> None:
        view = memoryview(piece)
        pos = self.pos
        self.pos += len(piece)
        blocks = self.part.blocks
        while view and self.next_block < len(blocks):
            block = blocks[self.next_block]
            if pos < block.offset:  # a stream header, index or padding: hashed only
                skip = min(len(view), block.offset - pos)
                view, pos = view[skip:], pos + skip
                continue
            if pos == block.offset:
                self._start(block)
            length = min(len(view), block.end - pos)
            if self.held is not None:
                self.held.append(bytes(view[:length]))
            else:
                self._decode(block, view[:length])
            view, pos = view[length:], pos + length
            if pos == block.end:
                self._end(block)

    def finish(self) -> None:
        if self.next_block != len(self.part.blocks):
            raise CorruptImage(self.url, f"xz part at byte {self.part.start} is truncated")

    def _start(self, block: XzBlock) -> None:
        self.produced = 0
        self.held = [] if self.zero_blocks.candidate(block) else None
        if self.held is None:
            self._open(block, candidate=False)

    def _open(self, block: XzBlock, candidate: bool) -> None:
        header, self.trailer = wrap_block(block)
        self.dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        self.all_zero = candidate
        self._decode(block, header)

    def _decode(self, block: XzBlock, data: bytes | memoryview) -> None:
        dec = self.dec
        assert dec is not None
        try:
            out = dec.decompress(data, self.step)
            while True:
                if out:
                    self._output(block, out)
                if dec.needs_input or dec.eof:
                    return
                out = dec.decompress(b"", self.step)
        except lzma.LZMAError as exc:
            raise CorruptImage(self.url, f"xz block at byte {block.offset}: {exc}") from exc

    def _output(self, block: XzBlock, out: bytes) -> None:
        self.produced += len(out)
        if self.produced > block.raw_size:
            raise CorruptImage(
                self.url,
                f"xz block at byte {block.offset} decodes to more than its {block.raw_size} bytes",
            )
        if self.all_zero:
            self.all_zero = ZERO_BLOCK.startswith(out) if len(out) <= BLOCK_SIZE else not any(out)
        self.push(out)
        self.count(len(out))

    def _end(self, block: XzBlock) -> None:
        key = b""
        if self.held is not None:
            data = b"".join(self.held)
            self.held = None
            key = ZeroBlocks.key(block, data)
            if key in self.zero_blocks:
                self._zeros(block)
                return
            self._open(block, candidate=True)
            self._decode(block, data)
        self._decode(block, self.trailer)
        dec = self.dec
        assert dec is not None
        if not dec.eof or dec.unused_data or self.produced != block.raw_size:
            raise CorruptImage(
                self.url,
                f"xz block at byte {block.offset} decodes to {self.produced} bytes, "
                f"its index says {block.raw_size}",
            )
        if key and self.all_zero:
            self.zero_blocks.add(key)
        self.dec = None
        self.next_block += 1

    def _zeros(self, block: XzBlock) -> None:
        """The raw bytes of a block known to decode to zeros, without decoding it."""
        left = block.raw_size
        while left:
            out = ZERO_BLOCK if left >= BLOCK_SIZE else ZERO_BLOCK[:left]
            self.push(out)
            self.count(len(out))
            left -= len(out)
        self.next_block += 1


class _Done:
    """Queue sentinel: a worker has no more parts."""


_DONE = _Done()


class ParallelRaw:
    """The raw image of a multi-part xz file as non-zero EBS blocks (a ``BlockSource``)."""

    def __init__(
        self,
        session: requests.Session,
        url: str,
        sha256: str,
        layout: XzLayout,
        parts: tuple[Part, ...],
        *,
        spool: Spool | None = None,
        in_flight: int = BLOCKS_IN_FLIGHT,
        step: int = DEFAULT_CHUNK,
        log_context: str = "",
    ) -> None:
        self._expected = check_sha256(sha256)
        if not parts or step < 1:
            raise ValueError("nothing to decode, or a step below one byte")
        self.raw_size = layout.raw_size
        self.url = url
        self.layout = layout
        self.parts = parts
        self.spool = spool
        self.step = step
        self.log_context = log_context
        self.reader: RangeReader = (
            SpoolRanges(spool)
            if spool is not None
            else HttpRanges(session, url, layout.file_size, log_context)
        )
        self.workers = parts_in_flight(parts, in_flight, DECODER_BUDGET)
        self._stop = threading.Event()
        self._out: queue.Queue[tuple[int, bytes] | _Done] = queue.Queue(maxsize=OUTPUT_DEPTH)
        self._digest = OrderedDigest(len(parts), UNHASHED_LIMIT, self._stop)
        self._assembler = Assembler(self.raw_size)
        self.zero_blocks = ZeroBlocks()
        self._raw = [0] * self.workers  # raw bytes decoded, one slot per worker
        self._lock = threading.Lock()
        self._next_part = 0
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._closed = False

    @property
    def raw_done(self) -> int:
        return sum(self._raw)

    def blocks(self) -> Iterator[tuple[int, bytes] | None]:
        """Non-zero (index, block) pairs as parts complete them; None while waiting."""
        log.info(
            "%s: decoding %s: %d xz blocks in %d parts, %d at once%s",
            self.log_context,
            self.url,
            len(self.layout.blocks),
            len(self.parts),
            self.workers,
            " from the spooled download" if self.spool is not None else "",
        )
        self._threads = [
            threading.Thread(target=self._work, args=(n,), name=f"xz-part-{n}", daemon=True)
            for n in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()
        try:
            yield from held_back(self._decoded(), self._verify)
        finally:
            self.close()

    def _decoded(self) -> Iterator[tuple[int, bytes] | None]:
        """The workers' blocks as they come (None while waiting), until every worker is done."""
        running = len(self._threads)
        while running:
            self._raise_if_failed()
            try:
                item = self._out.get(timeout=POLL)
            except queue.Empty:
                yield None
                continue
            if isinstance(item, _Done):
                running -= 1
                continue
            yield item
        self._raise_if_failed()

    def close(self) -> None:
        """Stop the workers (bounded wait) and drop the spool; safe to call again."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        drain(self._out)  # so a worker blocked on a full queue sees the stop
        for thread in self._threads:
            thread.join(timeout=STOP_SECONDS)
        if any(t.is_alive() for t in self._threads):
            log.warning("%s: %s: xz workers still busy after stop", self.log_context, self.url)
        if self.spool is not None:
            self.spool.close()

    def _verify(self) -> None:
        actual = self._digest.hexdigest()
        if actual != self._expected:
            raise ChecksumMismatch(self.url, f"sha256 is {actual}, expected {self._expected}")
        if self._assembler.pending or self.raw_done != self.raw_size:
            raise CorruptImage(
                self.url, f"decompresses to {self.raw_done} bytes, declared {self.raw_size}"
            )
        log.info(
            "%s: downloaded %s: %d bytes compressed, %d raw, %d xz blocks, sha256 ok",
            self.log_context,
            self.url,
            self._digest.total,
            self.raw_done,
            len(self.layout.blocks),
        )

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _take_part(self) -> Part | None:
        with self._lock:
            if self._next_part >= len(self.parts) or self._stop.is_set():
                return None
            self._next_part += 1
            return self.parts[self._next_part - 1]

    def _work(self, worker: int) -> None:
        def count(raw: int) -> None:
            self._raw[worker] += raw

        try:
            while (part := self._take_part()) is not None:
                self._decode_part(part, count)
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            with self._lock:
                if self._error is None:
                    self._error = exc
            self._stop.set()
        finally:
            self._emit(_DONE, wait=False)

    def _decode_part(self, part: Part, count: Callable[[int], None]) -> None:
        output = _PartOutput(part, self._assembler, self._emit)
        decoder = _PartDecoder(
            part, self.url, self.step, output.push, count, zero_blocks=self.zero_blocks
        )

        def sink(piece: bytes) -> None:
            self._digest.feed(part.number, piece)
            decoder.feed(piece)

        self.reader.read(part.start, part.end, sink, self._stop)
        if self._stop.is_set():
            raise _Stopped
        decoder.finish()
        self._digest.finish(part.number)

    def _emit(self, item: tuple[int, bytes] | _Done, wait: bool = True) -> None:
        while True:
            try:
                self._out.put(item, timeout=POLL)
                return
            except queue.Full:
                if self._stop.is_set():
                    if wait:
                        raise _Stopped from None
                    return
