"""Stream a ``.raw.xz`` image over HTTP: its raw size from the xz index, then its bytes.

``probe_raw_size`` reads only the file's tail (HTTP Range requests) and walks
the xz stream footers and indexes backwards to add up the uncompressed sizes,
so the snapshot can be sized before the download starts.

``stream_raw`` downloads once, hashes the compressed bytes, decompresses with
a bounded output per step and yields raw chunks. The last chunk is held back
until the sha256 is verified: a consumer that finishes its work after the
last chunk can never finish on a bad download. A connection cut short is
resumed from the last byte received with a Range request, as often and with
the backoff the session's ``fedimg.http.RetryPolicy`` says, then fails.

The probe's answer is a ``RawSize``: an ``int`` that also carries the xz
block layout (``fedimg.xzblocks``), and a ``Spool`` when the server ignored
Range (its one full answer, kept in a temporary file). From it
``stream_raw`` picks the path: a multi-block file is decoded in parallel
(``fedimg.xzparallel.ParallelRaw``), anything else streamed as above, in a
thread of its own (``fedimg.readahead``).

xz file format (https://tukaani.org/xz/xz-file-format.txt), as used here:
a file is one or more streams, each optionally followed by stream padding
(zero bytes, a multiple of 4). A stream is a 12-byte header, blocks, an index
and a 12-byte footer. The footer is CRC32 (4) | Backward Size (4, LE, stored
as size/4 - 1) | Stream Flags (2) | "YZ"; Backward Size is the index's size.
The index is 0x00 | record count | records (unpadded size, uncompressed
size) as multibyte integers | zero padding to 4 | CRC32.
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
import time
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, overload

import requests
import urllib3.exceptions

from fedimg.http import retry_policy
from fedimg.rawio import (
    DEFAULT_CHUNK,
    ChecksumMismatch,
    CorruptImage,
    DownloadError,
    ImageTooLarge,
    Spool,
    check_sha256,
    raise_for_status,
)
from fedimg.readahead import ReadAhead
from fedimg.xzblocks import (
    BLOCKS_IN_FLIGHT,
    FOOTER_MAGIC,
    FOOTER_SIZE,
    HEADER_MAGIC,
    HEADER_SIZE,
    StreamInfo,
    XzLayout,
    plan_layout,
    plan_parts,
)
from fedimg.xzlib import XzDataError, XzStreams

if TYPE_CHECKING:
    from fedimg.xzparallel import ParallelRaw
    from fedimg.xzproc import ChildRaw

log = logging.getLogger(__name__)

# Tail bytes fetched by the first Range request: holds the footer and the index
# of every image fedimg uploads (a 4 GiB image in 1 MiB xz blocks has a ~16 KiB index).
PROBE_WINDOW = 64 * 1024
# The largest index believed; a bigger one is refused rather than downloaded.
MAX_INDEX_SIZE = 16 * 1024 * 1024
MAX_STREAMS = 1024
# Index records kept for planning a parallel decode (fedimg.xzparallel); a file
# with more xz blocks (none that xz writes for a disk image) is streamed.
MAX_PLANNED_BLOCKS = 65536
# A server that ignores Range gets its file spooled to a temporary file of at
# most this many bytes (a Fedora cloud raw.xz is well under 1 GiB).
SPOOL_LIMIT = 8 << 30
# A single-stream image of at least this many raw bytes is decoded in a child
# process (fedimg.xzproc); a smaller one in this process. Measured (single-block
# uploads, docs/performance.md): the child is slower at 16 MiB (its start-up),
# as fast at 64 and 256 MiB, 13% faster at 1 GiB and more so at 4 GiB.
CHILD_MIN_RAW = 256 << 20
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
_sleep = time.sleep  # the backoff between resumes; a test may record it instead
_IDENTITY = {"Accept-Encoding": "identity"}


# ---------------------------------------------------------------------------
# The xz index: pure functions on bytes


def decode_multibyte(data: bytes, pos: int) -> tuple[int, int]:
    """An xz multibyte integer at ``pos``: (value, position after it)."""
    value = 0
    for i in range(9):
        if pos + i >= len(data):
            raise ValueError("multibyte integer runs past the index")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise ValueError("multibyte integer is not minimally encoded")
            return value, pos + i + 1
    raise ValueError("multibyte integer longer than 9 bytes")


def parse_footer(footer: bytes) -> tuple[int, bytes]:
    """(index size, stream flags) of a 12-byte stream footer; ValueError if invalid."""
    if len(footer) != FOOTER_SIZE or footer[10:] != FOOTER_MAGIC:
        raise ValueError("no xz stream footer magic")
    crc, stored = struct.unpack_from("<II", footer)
    flags = footer[8:10]
    if zlib.crc32(footer[4:10]) != crc:
        raise ValueError("xz stream footer CRC32 mismatch")
    if flags[0] != 0 or flags[1] & 0xF0:
        raise ValueError("unsupported xz stream flags")
    return (stored + 1) * 4, flags


def parse_header(header: bytes) -> bytes:
    """Stream flags of a 12-byte stream header; ValueError if invalid."""
    if len(header) != HEADER_SIZE or header[:6] != HEADER_MAGIC:
        raise ValueError("no xz stream header magic")
    flags = header[6:8]
    (crc,) = struct.unpack_from("<I", header, 8)
    if zlib.crc32(flags) != crc:
        raise ValueError("xz stream header CRC32 mismatch")
    return flags


def parse_index(index: bytes, records: list[tuple[int, int]] | None = None) -> tuple[int, int, int]:
    """(record count, blocks' total padded size, total uncompressed size) of an xz index.

    Each record, (unpadded size, uncompressed size), is appended to ``records`` if given.
    """
    if len(index) < 8 or len(index) % 4 or index[0] != 0:
        raise ValueError("not an xz index")
    (crc,) = struct.unpack_from("<I", index, len(index) - 4)
    if zlib.crc32(index[:-4]) != crc:
        raise ValueError("xz index CRC32 mismatch")
    body = index[:-4]
    count, pos = decode_multibyte(body, 1)
    if count > len(body):  # every record takes at least two bytes
        raise ValueError("xz index record count is impossible")
    blocks_size = 0
    uncompressed = 0
    for _ in range(count):
        unpadded, pos = decode_multibyte(body, pos)
        size, pos = decode_multibyte(body, pos)
        if unpadded < 5:
            raise ValueError("xz index record with an impossible block size")
        blocks_size += (unpadded + 3) & ~3
        uncompressed += size
        if records is not None:
            records.append((unpadded, size))
    padding = body[pos:]
    if len(padding) > 3 or any(padding):
        raise ValueError("xz index padding is wrong")
    return count, blocks_size, uncompressed


# ---------------------------------------------------------------------------
# Range reads


class RawSize(int):
    """The raw size ``probe_raw_size`` learned, with what else it learned on the way.

    An ``int`` to every caller; ``stream_raw`` reads the rest: the block
    layout (None when the index was not kept) and the spool (None unless the
    server ignored Range).
    """

    layout: XzLayout | None
    spool: Spool | None

    def __new__(
        cls, value: int, layout: XzLayout | None = None, spool: Spool | None = None
    ) -> RawSize:
        obj = super().__new__(cls, value)
        obj.layout = layout
        obj.spool = spool
        return obj


class _RangeReader:
    """Reads byte ranges of one URL, caching what it fetched.

    A server that answers the first (tail) request with the whole file gets
    it spooled (``Spool``, when ``spool_limit`` allows); every read then
    comes from the spool.
    """

    def __init__(
        self, session: requests.Session, url: str, log_context: str, spool_limit: int = 0
    ) -> None:
        self.session = session
        self.url = url
        self.log_context = log_context
        self.spool_limit = spool_limit
        self.spool: Spool | None = None
        self.size = -1
        self.requests = 0
        self._base = 0
        self._cache = b""

    def tail(self, length: int) -> None:
        """Fetch the last ``length`` bytes (or the whole file if shorter); learn the size."""
        start, _end, total, data = self._get(f"bytes=-{length}")
        self.size = total
        self._base, self._cache = start, data

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CorruptImage(self.url, "xz index points outside the file")
        if self.spool is not None:
            return self.spool.read(offset, length)
        if offset >= self._base and offset + length <= self._base + len(self._cache):
            return self._cache[offset - self._base : offset - self._base + length]
        # Fetch a window ending at the wanted range's end, so walking back is cheap.
        start = max(0, min(offset, offset + length - PROBE_WINDOW))
        got_start, _end, _total, data = self._get(f"bytes={start}-{offset + length - 1}")
        if got_start != start or len(data) != offset + length - start:
            raise DownloadError(self.url, "server answered a different byte range")
        self._base, self._cache = start, data
        return data[offset - start : offset - start + length]

    def _get(self, byte_range: str) -> tuple[int, int, int, bytes]:
        self.requests += 1
        headers = {**_IDENTITY, "Range": byte_range}
        try:
            with self.session.get(self.url, headers=headers, stream=True) as resp:
                if resp.status_code == 416:
                    raise CorruptImage(self.url, "file is empty (HTTP 416 for its tail)")
                if resp.status_code != 206:
                    raise_for_status(resp, self.url)
                    if resp.status_code == 200 and self.spool_limit and self.spool is None:
                        spool = Spool.download(resp, self.url, self.spool_limit, self.log_context)
                        self.spool = spool
                        return 0, spool.size - 1, spool.size, b""
                    raise DownloadError(
                        self.url,
                        f"server ignored the Range request (HTTP {resp.status_code}, "
                        "need 206 Partial Content)",
                    )
                match = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", ""))
                if not match:
                    raise DownloadError(self.url, "206 answer without a usable Content-Range")
                start, end, total = (int(g) for g in match.groups())
                if end < start or end >= total or end - start + 1 > MAX_INDEX_SIZE + PROBE_WINDOW:
                    raise DownloadError(self.url, "206 answer with an impossible Content-Range")
                data = resp.raw.read(end - start + 1, decode_content=False)
        except requests.RequestException as exc:
            raise DownloadError(self.url, f"range request failed: {exc}") from exc
        except (OSError, urllib3.exceptions.HTTPError) as exc:  # raw reads: urllib3's errors
            raise DownloadError(self.url, f"range request failed: {exc}") from exc
        if len(data) != end - start + 1:
            raise DownloadError(self.url, "range answer shorter than its Content-Range")
        return start, end, total, data


# A transfer that broke off (connection closed, reset or stalled): worth resuming.
_CUT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


def _compressed(
    session: requests.Session, url: str, chunk_size: int, log_context: str
) -> Iterator[bytes]:
    """The bytes of ``url`` as served, resuming a cut transfer where it broke off.

    At most ``retry_policy(session).retries`` resumes, each after its backoff;
    then, or on any other HTTP failure, ``DownloadError``.
    """
    policy = retry_policy(session)
    received = 0
    resumes = 0
    file_size: int | None = None  # from the first answer: a resumed one must agree
    while True:
        try:
            resp = _open_at(session, url, received, file_size)
        except requests.RequestException as exc:  # the session already retried it
            raise DownloadError(url, f"download failed after {received} bytes: {exc}") from exc
        with resp:
            if file_size is None and resp.headers.get("Content-Length", "").isdigit():
                file_size = int(resp.headers["Content-Length"])
            try:
                for piece in resp.iter_content(chunk_size):
                    received += len(piece)
                    yield piece
                return
            except _CUT as exc:
                cut: requests.RequestException = exc
            except requests.RequestException as exc:
                raise DownloadError(url, f"download failed after {received} bytes: {exc}") from exc
        if resumes >= policy.retries:
            raise DownloadError(
                url, f"download failed after {received} bytes and {resumes} resumes: {cut}"
            ) from cut
        resumes += 1
        delay = policy.delay(resumes)
        log.warning(
            "%s: %s cut after %d bytes (%s); resuming from there in %.1fs (%d of %d)",
            log_context,
            url,
            received,
            type(cut).__name__,
            delay,
            resumes,
            policy.retries,
        )
        _sleep(delay)


def _open_at(
    session: requests.Session, url: str, offset: int, file_size: int | None
) -> requests.Response:
    """GET ``url`` from byte ``offset`` on (a Range request unless 0), its answer checked."""
    headers = dict(_IDENTITY)
    if offset:
        headers["Range"] = f"bytes={offset}-"
    resp = session.get(url, headers=headers, stream=True)
    try:
        raise_for_status(resp, url)
        if not offset:
            if resp.status_code != 200:
                raise DownloadError(url, f"unexpected HTTP {resp.status_code} for a GET")
            return resp
        if resp.status_code != 206:
            raise DownloadError(
                url, f"cannot resume at byte {offset}: HTTP {resp.status_code}, need 206"
            )
        match = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != offset:
            raise DownloadError(url, f"cannot resume at byte {offset}: another range answered")
        if file_size is not None and int(match.group(3)) != file_size:
            raise DownloadError(url, "the file changed size while it was downloaded")
    except BaseException:
        resp.close()
        raise
    return resp


def probe_raw_size(
    session: requests.Session,
    url: str,
    *,
    log_context: str = "",
    max_raw_gib: int | None = None,
    spool_limit: int = SPOOL_LIMIT,
) -> RawSize:
    """The uncompressed size of the xz file at ``url``, read from its index with Range requests.

    Handles several concatenated streams and stream padding. Raises
    ``CorruptImage`` if the tail is not valid xz, ``ImageTooLarge`` if the
    index claims more than ``max_raw_gib`` GiB (``fedimg.stage.max_volume_gib``)
    and ``DownloadError`` on HTTP errors (a 404 is not retried). A server that
    ignores Range gets the file downloaded once into a ``Spool`` of at most
    ``spool_limit`` bytes (0: DownloadError instead), with one warning. The
    result carries the xz block layout for ``stream_raw``.
    """
    reader = _RangeReader(session, url, log_context, spool_limit)
    try:
        reader.tail(PROBE_WINDOW)
        return _probe(reader, max_raw_gib)
    except BaseException:
        if reader.spool is not None:
            reader.spool.close()
        raise


def _probe(reader: _RangeReader, max_raw_gib: int | None) -> RawSize:
    url = reader.url
    streams: list[StreamInfo] = []
    pos = reader.size
    keep = MAX_PLANNED_BLOCKS
    try:
        while pos > 0:
            if len(streams) >= MAX_STREAMS:
                raise ValueError(f"more than {MAX_STREAMS} xz streams")
            pos = _skip_padding(reader, pos)
            streams.append(_read_stream_backwards(reader, pos, keep))
            pos = streams[-1].start
            keep -= streams[-1].blocks
    except ValueError as exc:
        raise CorruptImage(url, f"not a valid xz file: {exc}") from exc
    if not streams:
        raise CorruptImage(url, "empty file")
    total = sum(s.uncompressed_size for s in streams)
    if max_raw_gib is not None and total > max_raw_gib * 2**30:
        raise ImageTooLarge(
            url,
            f"its xz index claims {total} bytes raw ({-(-total // 2**30)} GiB), more than "
            f"the largest volume allowed (fedimg.stage.max_volume_gib = {max_raw_gib} GiB)",
        )
    layout: XzLayout | None = None
    try:
        layout = plan_layout(reader.size, streams)
    except ValueError as exc:
        log.warning("%s: %s: no parallel decoding (%s)", reader.log_context, url, exc)
    else:
        if layout.raw_size != total:
            raise CorruptImage(url, "xz index records and stream sizes disagree")
    log.info(
        "%s: %s is %d bytes raw (%d xz streams, %d blocks, %d range requests%s)",
        reader.log_context,
        url,
        total,
        len(streams),
        sum(s.blocks for s in streams),
        reader.requests,
        ", spooled" if reader.spool is not None else "",
    )
    return RawSize(total, layout, reader.spool)


def _skip_padding(reader: _RangeReader, pos: int) -> int:
    """Walk back over stream padding (zero bytes in 4-byte groups) ending at ``pos``."""
    if pos % 4:
        raise ValueError("file size is not a multiple of four")
    while pos >= 4 and reader.read(pos - 4, 4) == b"\0\0\0\0":
        pos -= 4
    if pos < HEADER_SIZE + FOOTER_SIZE:
        raise ValueError("no xz stream before the padding")
    return pos


def _read_stream_backwards(reader: _RangeReader, end: int, keep: int = 0) -> StreamInfo:
    """The stream ending at ``end``; its index records kept if it has at most ``keep``."""
    index_size, flags = parse_footer(reader.read(end - FOOTER_SIZE, FOOTER_SIZE))
    if index_size > MAX_INDEX_SIZE:
        raise ValueError(f"xz index of {index_size} bytes is larger than believable")
    index_start = end - FOOTER_SIZE - index_size
    if index_start < HEADER_SIZE:
        raise ValueError("xz index would start before the file")
    index = reader.read(index_start, index_size)
    records: list[tuple[int, int]] | None = None
    if index_size > 1 and decode_multibyte(index, 1)[0] <= keep:
        records = []
    count, blocks_size, uncompressed = parse_index(index, records)
    start = index_start - blocks_size - HEADER_SIZE
    if start < 0:
        raise ValueError("xz blocks would start before the file")
    if parse_header(reader.read(start, HEADER_SIZE)) != flags:
        raise ValueError("xz stream header and footer flags differ")
    return StreamInfo(
        start=start,
        end=end,
        blocks=count,
        uncompressed_size=uncompressed,
        flags=flags,
        records=None if records is None else tuple(records),
    )


# ---------------------------------------------------------------------------
# Streaming download and decompression


class _XzStreams(XzStreams):
    """``XzStreams`` raising ``CorruptImage`` for ``url``."""

    def __init__(self, url: str, max_length: int) -> None:
        super().__init__(max_length)
        self.url = url

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            yield from super().feed(data)
        except XzDataError as exc:
            raise CorruptImage(self.url, str(exc)) from exc

    def finish(self) -> None:
        try:
            super().finish()
        except XzDataError as exc:
            raise CorruptImage(self.url, str(exc)) from exc


# How stream_raw reads an image (choose_reader)
PARALLEL = "parallel"  # fedimg.xzparallel: parts fetched and decoded at once
CHILD = "child"  # fedimg.xzproc: one download, decoded in a child process
THREAD = "thread"  # one download, decoded in a thread of this process (ReadAhead)
SPOOLED_THREAD = "spooled-thread"  # the spool decoded by one xzparallel worker


def choose_reader(raw_size: int, parts: int | None, *, spooled: bool, child_min_raw: int) -> str:
    """How ``stream_raw`` reads an image of ``raw_size`` raw bytes.

    ``parts``: how many xz parts ``fedimg.xzblocks`` planned from the index
    the probe kept, 0 if it was too large to plan, None for a plain ``int``
    raw size (no probe: the caller gets the chunk iterator it was promised).
    ``spooled``: the probe spooled the file. Several parts decode in
    parallel; one stream of at least ``child_min_raw`` raw bytes in a child
    process; anything smaller in this process.
    """
    if parts is None:
        return THREAD
    if parts > 1:
        return PARALLEL
    if raw_size >= child_min_raw:
        return CHILD
    if spooled:
        return SPOOLED_THREAD
    return THREAD


@overload
def stream_raw(  # type: ignore[overload-overlap]  # a RawSize may come as blocks
    session: requests.Session,
    url: str,
    sha256: str,
    raw_size: RawSize,
    chunk_size: int = ...,
    *,
    log_context: str = ...,
    blocks_in_flight: int = ...,
    child_min_raw: int = ...,
) -> Iterator[bytes] | ParallelRaw | ChildRaw: ...


@overload
def stream_raw(
    session: requests.Session,
    url: str,
    sha256: str,
    raw_size: int,
    chunk_size: int = ...,
    *,
    log_context: str = ...,
    blocks_in_flight: int = ...,
    child_min_raw: int = ...,
) -> Iterator[bytes]: ...


def stream_raw(
    session: requests.Session,
    url: str,
    sha256: str,
    raw_size: int,
    chunk_size: int = DEFAULT_CHUNK,
    *,
    log_context: str = "",
    blocks_in_flight: int = BLOCKS_IN_FLIGHT,
    child_min_raw: int = CHILD_MIN_RAW,
) -> Iterator[bytes] | ParallelRaw | ChildRaw:
    """The raw image at ``url``, checked against ``sha256``, for ``upload_snapshot``.

    Given the ``RawSize`` of ``probe_raw_size`` (``choose_reader`` decides):
    a file of several xz parts (``fedimg.xzblocks``) becomes a
    ``fedimg.xzparallel.ParallelRaw``: ``blocks_in_flight`` parts fetched
    (one Range request each) and decoded at once, straight into EBS blocks.
    A file of one xz block (or an index too large to plan) of at least
    ``child_min_raw`` raw bytes becomes a ``fedimg.xzproc.ChildRaw``: one
    streaming download (or the spool) decoded by a child process into EBS
    blocks. Anything smaller (or a plain ``int``) is one streaming download
    decoded in a thread of its own, up to 8 MiB ahead of the consumer
    (``ReadAhead``): an iterator of raw chunks of at most ``chunk_size``, as
    ``_stream_http`` describes; a smaller spooled file is decoded by one
    ``ParallelRaw`` worker. All raise the same errors and release nothing
    unverified: the sha256 is checked before the last chunk or block.
    """
    if blocks_in_flight < 1:
        raise ValueError(f"blocks_in_flight must be at least 1, not {blocks_in_flight}")
    layout = raw_size.layout if isinstance(raw_size, RawSize) else None
    spool = raw_size.spool if isinstance(raw_size, RawSize) else None
    if spool is not None and layout is None:
        spool.close()
        raise DownloadError(url, "too many xz blocks to decode from a spooled download")
    parts = plan_parts(layout) if layout is not None else ()
    how = choose_reader(
        raw_size,
        len(parts) if isinstance(raw_size, RawSize) else None,
        spooled=spool is not None,
        child_min_raw=child_min_raw,
    )

    def in_thread() -> ReadAhead:
        return ReadAhead(
            _stream_http(session, url, sha256, raw_size, chunk_size, log_context=log_context),
            name="xz-stream",
        )

    def in_workers() -> ParallelRaw:
        from fedimg.xzparallel import ParallelRaw  # it builds on this module

        assert layout is not None
        return ParallelRaw(
            session,
            url,
            sha256,
            layout,
            parts,
            spool=spool,
            in_flight=blocks_in_flight,
            step=chunk_size,
            log_context=log_context,
        )

    if how == CHILD:
        from fedimg.xzproc import ChildRaw, spool_pieces

        def pieces() -> Iterator[bytes]:
            if spool is not None:
                return spool_pieces(spool)
            return _compressed(session, url, chunk_size, log_context)

        return ChildRaw(
            url,
            sha256,
            raw_size,
            pieces,
            fallback=in_workers if spool is not None else in_thread,
            step=chunk_size,
            spool=spool,
            log_context=log_context,
        )
    if how in (PARALLEL, SPOOLED_THREAD):
        return in_workers()
    return in_thread()


def _stream_http(
    session: requests.Session,
    url: str,
    sha256: str,
    raw_size: int,
    chunk_size: int = DEFAULT_CHUNK,
    *,
    log_context: str = "",
) -> Iterator[bytes]:
    """Download ``url`` once and yield its decompressed bytes, in chunks of <= chunk_size.

    Exactly ``raw_size`` bytes are yielded, and the final chunk only after the
    compressed file's sha256 matched ``sha256``. A connection cut or stalled
    mid-file is resumed from the last byte received (a Range request), at
    most the session's ``RetryPolicy.retries`` times with its backoff. Raises
    ``DownloadError`` (HTTP error, stall or cut connection beyond those
    resumes), ``ChecksumMismatch`` or ``CorruptImage`` (not xz, corrupt or
    truncated xz, more or fewer raw bytes than ``raw_size``). Memory stays
    O(chunk_size) whatever the image.
    """
    expected = check_sha256(sha256)
    if raw_size <= 0:
        raise ValueError(f"raw_size must be positive, not {raw_size}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, not {chunk_size}")
    digest = hashlib.sha256()
    xz = _XzStreams(url, chunk_size)
    produced = 0
    compressed = 0
    held: bytes | None = None
    log.info("%s: downloading %s (%d bytes raw)", log_context, url, raw_size)
    for piece in _compressed(session, url, chunk_size, log_context):
        digest.update(piece)
        compressed += len(piece)
        for out in xz.feed(piece):
            produced += len(out)
            if produced > raw_size:
                raise CorruptImage(url, f"decompresses to more than the declared {raw_size} bytes")
            if held is not None:
                yield held
            held = out
    actual = digest.hexdigest()
    if actual != expected:
        raise ChecksumMismatch(url, f"sha256 is {actual}, expected {expected}")
    xz.finish()
    if produced != raw_size or held is None:
        raise CorruptImage(url, f"decompresses to {produced} bytes, declared {raw_size}")
    log.info(
        "%s: downloaded %s: %d bytes compressed, %d raw, %d xz streams, sha256 ok",
        log_context,
        url,
        compressed,
        produced,
        xz.streams,
    )
    yield held
