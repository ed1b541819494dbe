"""fedimg.xzparallel: multi-block xz images decoded in parallel into EBS blocks.

Real xz files (built by the xz binary with small blocks) served by a real
loopback HTTP server (devel.images.ImageServer), which can ignore Range, cut
answers short or 404. Every test checks the blocks against the image's own
record of its non-zero blocks and their sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import lzma
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devel.bus import wait_until
from devel.images import (
    BLOCK,
    ImageFacts,
    ImageServer,
    Route,
    build_raw_xz,
    concatenate_streams,
)
from fedimg import xzparallel
from fedimg.download import (
    ChecksumMismatch,
    CorruptImage,
    DownloadError,
    RawSize,
    probe_raw_size,
    stream_raw,
)
from fedimg.readahead import ReadAhead
from fedimg.xzblocks import XzBlock, XzLayout, plan_parts
from fedimg.xzparallel import Assembler, OrderedDigest, ParallelRaw

pytestmark = pytest.mark.integration

# 44 EBS blocks and a bit; xz blocks of 700000 raw bytes, so their boundaries
# fall inside EBS blocks, and data on both sides of several of them.
RAW_SIZE = 44 * BLOCK + 12345
DATA = (0, 1, 2, 5, 6, 13, 20, 21, 22, 23, 30, 40, 44)


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> ImageFacts:
    path = tmp_path_factory.mktemp("multi") / "multi.raw.xz"
    return build_raw_xz(path, RAW_SIZE, DATA, seed=7, xz_block_size=700_000)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> ImageFacts:
    """Big enough for several parts of the default size (8 MiB raw): 24 MiB in 3 MiB blocks."""
    path = tmp_path_factory.mktemp("big") / "big.raw.xz"
    return build_raw_xz(path, 48 * BLOCK, (0, 7, 15, 16, 17, 31, 47), seed=8, xz_block_size=3 << 20)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> ImageFacts:
    path = tmp_path_factory.mktemp("single") / "single.raw.xz"
    return build_raw_xz(path, 9 * BLOCK + 77, {0: b"boot", 8: b"x" * 9000, 9: b"end"}, seed=9)


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xzparallel, "RETRY_DELAY", 0.01)


def collect(source: ParallelRaw, got: dict[int, bytes] | None = None) -> dict[int, bytes]:
    """Every block ``source`` yields (into ``got``, kept if it raises); each index once."""
    got = {} if got is None else got
    for item in source.blocks():
        if item is None:
            continue
        index, block = item
        assert index not in got, f"block {index} yielded twice"
        assert len(block) == BLOCK
        got[index] = block
    return got


def assert_blocks(got: dict[int, bytes], facts: ImageFacts) -> None:
    assert sorted(got) == list(facts.nonzero_blocks)
    for index, block in got.items():
        assert hashlib.sha256(block).hexdigest() == facts.block_digests[index], index


def probed(
    server: ImageServer, session: requests.Session, facts: ImageFacts
) -> tuple[str, RawSize]:
    url = server.add(facts.path.name, Route(facts.path))
    return url, probe_raw_size(session, url)


def parallel(
    session: requests.Session,
    url: str,
    facts: ImageFacts,
    layout: XzLayout,
    *,
    min_raw: int = 1,
    in_flight: int = 3,
    sha256: str | None = None,
) -> ParallelRaw:
    parts = plan_parts(layout, min_raw)
    return ParallelRaw(
        session, url, sha256 or facts.sha256, layout, parts, in_flight=in_flight, step=100_000
    )


def range_starts(server: ImageServer, name: str) -> list[int]:
    """The first byte asked by each Range request for ``name`` (tail requests excluded)."""
    starts = []
    for path, header in server.requests:
        if path == "/" + name and header and not header.startswith("bytes=-"):
            starts.append(int(header.removeprefix("bytes=").split("-")[0]))
    return starts


# ---------------------------------------------------------------------------
# Good input


def test_stream_raw_decodes_a_multi_part_file_in_parallel(
    server: ImageServer, session: requests.Session, big: ImageFacts
) -> None:
    url, raw_size = probed(server, session, big)
    assert raw_size == big.raw_size and raw_size.layout is not None
    source = stream_raw(session, url, big.sha256, raw_size)
    assert isinstance(source, ParallelRaw)
    parts = plan_parts(raw_size.layout)
    assert len(parts) == 3
    server.requests.clear()
    assert_blocks(collect(source), big)
    assert source.raw_done == big.raw_size
    assert sorted(range_starts(server, big.path.name)) == [p.start for p in parts]
    assert len(server.requests) == len(parts), "each part fetched once, nothing else"


@pytest.mark.parametrize("in_flight", [1, 3, 8])
def test_every_xz_block_its_own_part(
    server: ImageServer, session: requests.Session, multi: ImageFacts, in_flight: int
) -> None:
    """Parts of one 700000-byte xz block each: EBS blocks straddle parts everywhere."""
    url, raw_size = probed(server, session, multi)
    assert raw_size.layout is not None and len(raw_size.layout.blocks) == 33
    source = parallel(session, url, multi, raw_size.layout, in_flight=in_flight)
    assert_blocks(collect(source), multi)
    assert source.raw_done == multi.raw_size


def test_several_streams_with_padding(
    server: ImageServer, session: requests.Session, multi: ImageFacts, tmp_path: Path
) -> None:
    other = build_raw_xz(tmp_path / "b.xz", 6 * BLOCK, (1, 5), seed=10, xz_block_size=400_000)
    path = tmp_path / "two.raw.xz"
    sha = concatenate_streams(path, [multi.path, other.path], padding=16)
    url = server.add("two.raw.xz", Route(path))
    raw_size = probe_raw_size(session, url)
    assert raw_size.layout is not None
    assert raw_size == multi.raw_size + other.raw_size
    source = ParallelRaw(
        session, url, sha, raw_size.layout, plan_parts(raw_size.layout, 1), in_flight=4
    )
    got = collect(source)
    assert multi.raw_size % BLOCK, "the second stream begins inside an EBS block"
    raw = lzma.decompress(path.read_bytes())
    for index in range(-(-len(raw) // BLOCK)):
        expected = raw[index * BLOCK : (index + 1) * BLOCK].ljust(BLOCK, b"\0")
        if expected == bytes(BLOCK):
            assert index not in got
        else:
            assert got[index] == expected, index


# ---------------------------------------------------------------------------
# Bad input: nothing unverified gets through


def test_wrong_checksum_holds_back_the_last_block(
    server: ImageServer, session: requests.Session, multi: ImageFacts
) -> None:
    url, raw_size = probed(server, session, multi)
    assert raw_size.layout is not None
    wrong = hashlib.sha256(b"another file").hexdigest()
    source = parallel(session, url, multi, raw_size.layout, sha256=wrong)
    got: dict[int, bytes] = {}
    with pytest.raises(ChecksumMismatch) as info:
        collect(source, got)
    assert info.value.url == url
    assert got, "blocks flow before the checksum is known"
    assert len(got) == len(multi.nonzero_blocks) - 1, "the last one is never handed out"


@pytest.mark.parametrize("where", ["data", "header", "check"])
def test_a_corrupt_block_raises_corrupt_image(
    server: ImageServer,
    session: requests.Session,
    multi: ImageFacts,
    tmp_path: Path,
    where: str,
) -> None:
    """The sha256 given matches the damaged file: only xz validation can catch it."""
    url, raw_size = probed(server, session, multi)
    assert raw_size.layout is not None
    block = raw_size.layout.blocks[7]
    at = {
        "data": block.offset + block.unpadded_size // 2,
        "header": block.offset + 1,
        "check": block.offset + block.unpadded_size - 3,
    }[where]
    data = bytearray(multi.path.read_bytes())
    data[at] ^= 0x10
    bad = tmp_path / "bad.raw.xz"
    bad.write_bytes(bytes(data))
    url = server.add("bad.raw.xz", Route(bad))
    sha = hashlib.sha256(bytes(data)).hexdigest()
    source = parallel(session, url, multi, raw_size.layout, sha256=sha)
    with pytest.raises(CorruptImage) as info:
        collect(source)
    assert str(block.offset) in info.value.reason
    wait_until(lambda: not _alive(source), 10, "workers to stop after the error")


def test_an_index_that_lies_about_a_block_size(
    server: ImageServer, session: requests.Session, multi: ImageFacts
) -> None:
    """Raw sizes from another file's index: each block checks its size against it."""
    url, raw_size = probed(server, session, multi)
    assert raw_size.layout is not None
    blocks = list(raw_size.layout.blocks)
    first, second = blocks[3], blocks[4]
    blocks[3] = dataclasses.replace(first, raw_size=first.raw_size - 1)
    blocks[4] = dataclasses.replace(
        second, raw_offset=second.raw_offset - 1, raw_size=second.raw_size + 1
    )
    lying = XzLayout(raw_size.layout.file_size, raw_size.layout.raw_size, tuple(blocks))
    with pytest.raises(CorruptImage) as info:
        collect(parallel(session, url, multi, lying))
    assert re.search(rf"xz block at byte ({first.offset}|{second.offset})\b", info.value.reason)


# ---------------------------------------------------------------------------
# HTTP faults


def test_a_range_cut_mid_way_is_resumed(
    server: ImageServer,
    session: requests.Session,
    big: ImageFacts,
    fast_retries: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(xzparallel, "PIECE", 50_000)  # the cut falls between two pieces
    url, raw_size = probed(server, session, big)
    server.requests.clear()
    server.add(big.path.name, Route(big.path, cut_after=150_000, cuts=2))
    source = stream_raw(session, url, big.sha256, raw_size)
    assert isinstance(source, ParallelRaw)
    assert_blocks(collect(source), big)
    starts = range_starts(server, big.path.name)
    part_starts = [p.start for p in source.parts]
    resumed = sorted(set(starts) - set(part_starts))
    assert len(resumed) == 2, starts
    # Each resumes exactly where its cut answer stopped: the cut answer began at a part's
    # start, or at the other resumption (both cuts may fall on one part, one after the other).
    for start in resumed:
        assert start - 150_000 in {*part_starts, *resumed}, starts
    assert server.cut["/" + big.path.name] == 2


def test_a_range_cut_every_time_fails_as_a_download_error(
    server: ImageServer, session: requests.Session, big: ImageFacts, fast_retries: None
) -> None:
    url, raw_size = probed(server, session, big)
    server.add(big.path.name, Route(big.path, cut_after=150_000))
    source = stream_raw(session, url, big.sha256, raw_size)
    assert isinstance(source, ParallelRaw)
    with pytest.raises(DownloadError) as info:
        collect(source)
    assert type(info.value) is DownloadError, "a cut connection is not a bad image"
    assert f"{xzparallel.RANGE_ATTEMPTS} attempts" in info.value.reason


@pytest.mark.parametrize("fault", ["404", "no-range"])
def test_a_server_that_changes_its_mind_after_the_probe(
    server: ImageServer, session: requests.Session, big: ImageFacts, fault: str
) -> None:
    url, raw_size = probed(server, session, big)
    route = Route(big.path, status=404) if fault == "404" else Route(big.path, ranges=False)
    server.add(big.path.name, route)
    server.requests.clear()
    source = stream_raw(session, url, big.sha256, raw_size)
    assert isinstance(source, ParallelRaw)
    with pytest.raises(DownloadError) as info:
        collect(source)
    assert type(info.value) is DownloadError
    assert len(server.requests) <= len(source.parts), "failed at once, never retried"


# ---------------------------------------------------------------------------
# A server that ignores Range (Python's http.server): one download, spooled


@pytest.mark.parametrize("name", ["multi", "single"])
def test_a_server_without_range_support_is_read_once_into_a_spool(
    server: ImageServer, session: requests.Session, request: pytest.FixtureRequest, name: str
) -> None:
    facts: ImageFacts = request.getfixturevalue(name)
    url = server.add("norange.raw.xz", Route(facts.path, ranges=False))
    raw_size = probe_raw_size(session, url)
    assert raw_size == facts.raw_size
    assert raw_size.spool is not None and raw_size.spool.size == facts.compressed_size
    source = stream_raw(session, url, facts.sha256, raw_size)
    assert isinstance(source, ParallelRaw)
    assert_blocks(collect(source), facts)
    assert len(server.requests) == 1, "one download, nothing fetched twice"
    assert server.bytes_sent["/norange.raw.xz"] == facts.compressed_size
    assert raw_size.spool.file.closed, "the temporary file is gone"


def test_a_spooled_file_with_the_wrong_checksum(
    server: ImageServer, session: requests.Session, multi: ImageFacts
) -> None:
    url = server.add("norange.raw.xz", Route(multi.path, ranges=False))
    raw_size = probe_raw_size(session, url)
    wrong = hashlib.sha256(b"not it").hexdigest()
    source = stream_raw(session, url, wrong, raw_size)
    assert isinstance(source, ParallelRaw)
    with pytest.raises(ChecksumMismatch):
        collect(source)
    assert raw_size.spool is not None and raw_size.spool.file.closed


def test_the_spool_is_bounded(
    server: ImageServer, session: requests.Session, multi: ImageFacts
) -> None:
    url = server.add("norange.raw.xz", Route(multi.path, ranges=False))
    with pytest.raises(DownloadError, match="spooled"):
        probe_raw_size(session, url, spool_limit=multi.compressed_size - 1)
    with pytest.raises(DownloadError, match="Range"):
        probe_raw_size(session, url, spool_limit=0)  # no spooling: refused as before


def test_a_spooled_file_that_is_not_xz(server: ImageServer, session: requests.Session) -> None:
    url = server.add("junk.raw.xz", Route(b"not xz at all" * 1000, ranges=False))
    with pytest.raises(CorruptImage):
        probe_raw_size(session, url)


# ---------------------------------------------------------------------------
# Stopping early


def test_close_stops_every_worker(
    server: ImageServer, session: requests.Session, multi: ImageFacts
) -> None:
    url, raw_size = probed(server, session, multi)
    assert raw_size.layout is not None
    source = parallel(session, url, multi, raw_size.layout, in_flight=4)
    blocks = source.blocks()
    first = next(item for item in blocks if item is not None)
    assert first[0] in multi.nonzero_blocks
    source.close()
    wait_until(lambda: not _alive(source), 10, "every worker to stop")
    source.close()  # again: nothing happens


def _alive(source: ParallelRaw) -> bool:
    return any(t.is_alive() for t in source._threads)


# ---------------------------------------------------------------------------
# The pieces


def test_ordered_digest_hashes_in_part_order_within_its_limit() -> None:
    digest = OrderedDigest(parts=3, limit=10, stop=threading.Event())
    most = 0

    def track() -> None:
        nonlocal most
        most = max(most, digest._held_bytes)

    def feed_part_2() -> None:
        for _ in range(20):
            digest.feed(2, b"cc")
            track()

    digest.feed(1, b"bbb")
    track()
    later = threading.Thread(target=feed_part_2, daemon=True)
    later.start()
    digest.finish(1)
    digest.feed(0, b"a")
    digest.finish(0)  # part 1, already finished, is hashed now; part 2 may go on
    later.join(timeout=10)
    assert not later.is_alive()
    digest.finish(2)
    assert digest.hexdigest() == hashlib.sha256(b"a" + b"bbb" + b"cc" * 20).hexdigest()
    assert most <= 10
    assert digest.total == 1 + 3 + 40


def test_ordered_digest_is_not_ready_before_every_part() -> None:
    digest = OrderedDigest(parts=2, limit=10, stop=threading.Event())
    digest.feed(1, b"x")
    digest.finish(1)
    with pytest.raises(RuntimeError):
        digest.hexdigest()


def test_ordered_digest_waiter_gives_up_on_stop() -> None:
    stop = threading.Event()
    digest = OrderedDigest(parts=3, limit=4, stop=stop)
    digest.feed(2, b"1234")
    errors: list[BaseException] = []

    def feed() -> None:
        try:
            digest.feed(2, b"5")
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    waiter = threading.Thread(target=feed, daemon=True)
    waiter.start()
    stop.set()
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert [type(e).__name__ for e in errors] == ["_Stopped"]


def test_assembler_completes_blocks_from_pieces_in_any_order() -> None:
    asm = Assembler(raw_size=3 * BLOCK + 100, block_size=BLOCK)
    assert asm.add(BLOCK + 10, b"\x01" * 5) is None
    assert asm.add(BLOCK, bytes(10)) is None  # zeros are counted, not kept
    assert asm.pending == 1
    done = asm.add(BLOCK + 15, bytes(BLOCK - 15))
    assert done == (1, bytes(10) + b"\x01" * 5 + bytes(BLOCK - 15))
    assert asm.pending == 0
    assert asm.add(0, bytes(BLOCK // 2)) is None
    assert asm.add(BLOCK // 2, bytes(BLOCK // 2)) is None, "an all-zero block is dropped"
    assert asm.pending == 0
    # the image's last block: 100 bytes, padded with zeros
    assert asm.add(3 * BLOCK + 60, b"\x02" * 40) is None
    assert asm.add(3 * BLOCK, bytes(60)) == (3, bytes(60) + b"\x02" * 40 + bytes(BLOCK - 100))


def test_assembler_refuses_what_cannot_fit() -> None:
    asm = Assembler(raw_size=2 * BLOCK, block_size=BLOCK)
    with pytest.raises(ValueError):
        asm.add(BLOCK - 5, bytes(10))  # crosses a block boundary
    with pytest.raises(ValueError):
        asm.add(2 * BLOCK - 5, bytes(10))  # past the image
    asm.add(0, bytes(BLOCK - 5))
    with pytest.raises(ValueError):
        asm.add(BLOCK - 10, bytes(10))  # more bytes than the block holds


def test_read_ahead_keeps_order_and_errors() -> None:
    closed = threading.Event()

    def produce() -> Iterator[bytes]:
        try:
            for n in range(50):
                yield bytes([n]) * 1000
            raise ValueError("broken after 50")
        finally:
            closed.set()

    ahead = ReadAhead(produce(), depth=2, batch_bytes=3000)
    got: list[bytes] = []
    with pytest.raises(ValueError, match="broken"):
        for chunk in ahead:
            got.append(chunk)
    assert got == [bytes([n]) * 1000 for n in range(50)]
    assert closed.wait(10)


def test_read_ahead_starts_lazily_and_close_stops_the_producer() -> None:
    started = threading.Event()
    closed = threading.Event()

    def produce() -> Iterator[bytes]:
        started.set()
        try:
            while True:
                yield b"x" * 100
        finally:
            closed.set()

    ahead = ReadAhead(produce(), depth=2, batch_bytes=100)
    assert not started.is_set()
    assert next(ahead) == b"x" * 100
    ahead.close()
    assert closed.wait(10), "the producer was closed in its own thread"
    with pytest.raises(StopIteration):
        next(ahead)


# ---------------------------------------------------------------------------
# ZeroBlocks: identical all-zero xz blocks are decoded once


@pytest.fixture(scope="module")
def sparse(tmp_path_factory: pytest.TempPathFactory) -> ImageFacts:
    """40 xz blocks of 1 MiB: 3 with data, 4 alike but not zero, the rest zeros."""
    alike = {n: b"the same text " * 30000 for n in (20, 22, 24, 26)}  # 2 EBS blocks per xz block
    data = {0: b"boot" * 1000, 31: b"\x07" * BLOCK, 79: b"end", **alike}
    path = tmp_path_factory.mktemp("sparse") / "sparse.raw.xz"
    return build_raw_xz(path, 80 * BLOCK, data, seed=11, xz_block_size=2 * BLOCK)


def count_decoders(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Monkeypatch _PartDecoder._open to record the file offset of every block decoded."""
    opened: list[int] = []
    original = xzparallel._PartDecoder._open

    def counting(self: xzparallel._PartDecoder, block: XzBlock, candidate: bool) -> None:
        opened.append(block.offset)
        original(self, block, candidate)

    monkeypatch.setattr(xzparallel._PartDecoder, "_open", counting)
    return opened


@pytest.mark.parametrize("case", [(64 * 1024, 7 + 1), (0, 40)], ids=["kept", "none-kept"])
def test_identical_zero_blocks_are_decoded_once(
    server: ImageServer,
    session: requests.Session,
    sparse: ImageFacts,
    monkeypatch: pytest.MonkeyPatch,
    case: tuple[int, int],
) -> None:
    """Blocks 0, 10..13 (alike but not zero: each decoded), 15 and 39 hold data; of the
    33 zero ones only the first is decoded, unless ZeroBlocks keeps nothing."""
    max_bytes, decoded = case
    opened = count_decoders(monkeypatch)
    url, raw_size = probed(server, session, sparse)
    assert raw_size.layout is not None and len(raw_size.layout.blocks) == 40
    source = parallel(session, url, sparse, raw_size.layout, in_flight=1)
    source.zero_blocks = xzparallel.ZeroBlocks(max_bytes=max_bytes)
    assert_blocks(collect(source), sparse)
    assert source.raw_done == sparse.raw_size
    assert len(opened) == decoded
    with_data = {raw_size.layout.blocks[n].offset for n in (0, 10, 11, 12, 13, 15, 39)}
    assert with_data <= set(opened)


def test_a_damaged_copy_of_a_zero_block_is_still_caught(
    server: ImageServer, session: requests.Session, sparse: ImageFacts, tmp_path: Path
) -> None:
    url, raw_size = probed(server, session, sparse)
    assert raw_size.layout is not None
    block = raw_size.layout.blocks[30]  # the 20th zero block: its twins were seen first
    data = bytearray(sparse.path.read_bytes())
    data[block.offset + block.unpadded_size // 2] ^= 0x01
    bad = tmp_path / "bad.raw.xz"
    bad.write_bytes(bytes(data))
    url = server.add("bad.raw.xz", Route(bad))
    source = parallel(
        session, url, sparse, raw_size.layout, in_flight=1, sha256=hashlib.sha256(data).hexdigest()
    )
    with pytest.raises(CorruptImage) as info:
        collect(source)
    assert f"byte {block.offset}" in info.value.reason
