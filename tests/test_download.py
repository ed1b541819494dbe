"""fedimg.download against real xz files served by a real loopback HTTP server.

The images come from devel.images (built with lzma or the xz binary); the
server (devel.images.ImageServer) supports Range and can 404, ignore Range,
stall or cut a download short.
"""

from __future__ import annotations

import hashlib
import lzma
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import urllib3

from devel.images import (
    BLOCK,
    ImageFacts,
    ImageServer,
    Route,
    build_raw_xz,
    concatenate_streams,
    file_sha256,
    parse_range,
    xz_index,
)
from fedimg import download
from fedimg.download import (
    ChecksumMismatch,
    CorruptImage,
    DownloadError,
    check_sha256,
    decode_multibyte,
    parse_footer,
    parse_index,
    probe_raw_size,
    stream_raw,
)
from fedimg.http import make_session
from fedimg.readahead import ReadAhead


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> ImageFacts:
    """One stream, one xz block; raw size not a multiple of 512 KiB."""
    return build_raw_xz(
        tmp_path_factory.mktemp("single") / "single.raw.xz",
        12 * BLOCK + 4321,
        {0: b"boot", 5: b"x" * 1000},
        seed=1,
    )


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> ImageFacts:
    """Incompressible data in every block: a damaged byte lands in real xz data."""
    return build_raw_xz(tmp_path_factory.mktemp("noisy") / "noisy.raw.xz", 4 * BLOCK, range(4))


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, int]:
    """Two streams with 8 bytes of stream padding; the second has 16 xz blocks."""
    tmp_path = tmp_path_factory.mktemp("multi")
    a = build_raw_xz(tmp_path / "a.raw.xz", 10 * BLOCK + 7, [0, 10], seed=2)
    b = build_raw_xz(tmp_path / "b.raw.xz", 32 * BLOCK, [1, 31], seed=3, xz_block_size=2 * BLOCK)
    path = tmp_path / "multi.raw.xz"
    sha = concatenate_streams(path, [a.path, b.path], padding=8)
    return path, sha, a.raw_size + b.raw_size


def xz_dc(path: Path) -> bytes:
    """What the reference implementation decompresses a file to."""
    return subprocess.run(["xz", "-dc", str(path)], capture_output=True, check=True).stdout


def serve_bytes(server: ImageServer, name: str, data: bytes, **faults: object) -> str:
    return server.add(name, Route(data, **faults))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# The xz index parsing core


def test_decode_multibyte_reads_xz_integers() -> None:
    assert decode_multibyte(b"\x00", 0) == (0, 1)
    assert decode_multibyte(b"\x7f", 0) == (127, 1)
    assert decode_multibyte(b"\x80\x01", 0) == (128, 2)
    assert decode_multibyte(b"\xff\xff\x03", 0) == (65535, 3)
    assert decode_multibyte(b"..\xac\x02", 2) == (300, 4)


@pytest.mark.parametrize(
    "data",
    [b"\x80", b"\x80\x00", b"\xff" * 10],
    ids=["runs-past-end", "not-minimal", "too-long"],
)
def test_decode_multibyte_refuses_bad_integers(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_multibyte(data, 0)


def test_parse_index_adds_block_sizes() -> None:
    count, padded, raw = parse_index(xz_index([(13, 1000), (250, 70000)]))
    assert (count, padded, raw) == (2, 16 + 252, 71000)


def test_parse_index_refuses_bad_crc_and_padding() -> None:
    good = xz_index([(13, 1000)])
    with pytest.raises(ValueError, match="CRC32"):
        parse_index(good[:-1] + bytes([good[-1] ^ 1]))
    body = b"\x00\x01\x0d\x88\x07\x01\x00\x00"  # non-zero index padding
    with pytest.raises(ValueError, match="padding"):
        parse_index(body + struct.pack("<I", zlib.crc32(body)))
    with pytest.raises(ValueError):
        parse_index(b"\x01" + good[1:])


def test_parse_footer_checks_magic_and_crc() -> None:
    flags = b"\x00\x04"
    fields = struct.pack("<I", 1) + flags
    footer = struct.pack("<I", zlib.crc32(fields)) + fields + b"YZ"
    assert parse_footer(footer) == (8, flags)
    with pytest.raises(ValueError, match="CRC32"):
        parse_footer(footer[:4] + struct.pack("<I", 2) + flags + b"YZ")
    with pytest.raises(ValueError, match="magic"):
        parse_footer(footer[:10] + b"ZY")


def test_check_sha256_formats() -> None:
    assert check_sha256("AB" * 32) == "ab" * 32
    for bad in ["", "ab" * 31, "ab" * 33, "zz" * 32, " " + "ab" * 32]:
        with pytest.raises(ValueError):
            check_sha256(bad)


def test_image_server_parses_ranges() -> None:
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=-1000", 100) == (0, 99)
    assert parse_range("bytes=95-200", 100) == (95, 99)
    assert parse_range("bytes=100-", 100) is None
    with pytest.raises(ValueError):
        parse_range("bytes=1-2,5-6", 100)


# ---------------------------------------------------------------------------
# probe_raw_size


@pytest.mark.integration
def test_probe_single_stream(
    server: ImageServer, session: requests.Session, single: ImageFacts
) -> None:
    url = server.add("single.raw.xz", Route(single.path))
    assert probe_raw_size(session, url) == single.raw_size
    assert all(r is not None for _, r in server.requests), "every request is a Range request"


@pytest.mark.integration
def test_probe_multi_block_multi_stream_with_padding(
    server: ImageServer, session: requests.Session, multi: tuple[Path, str, int]
) -> None:
    path, _sha, raw_size = multi
    url = server.add("multi.raw.xz", Route(path))
    assert probe_raw_size(session, url) == raw_size
    assert raw_size == len(xz_dc(path))


@pytest.mark.integration
def test_probe_reads_only_the_tail_of_a_big_file(
    server: ImageServer,
    session: requests.Session,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A small probe window forces several Range reads; the whole file is never fetched."""
    facts = build_raw_xz(tmp_path / "big.raw.xz", 32 * BLOCK, [3, 17], seed=4, xz_block_size=BLOCK)
    monkeypatch.setattr(download, "PROBE_WINDOW", 64)
    url = server.add("big.raw.xz", Route(facts.path))
    assert probe_raw_size(session, url) == facts.raw_size
    assert len(server.requests) >= 3
    assert server.bytes_sent["/big.raw.xz"] < facts.compressed_size // 10


@pytest.mark.integration
def test_probe_not_xz(server: ImageServer, session: requests.Session) -> None:
    url = serve_bytes(server, "junk.raw.xz", b"this is not an xz file at all" * 100)
    with pytest.raises(CorruptImage) as info:
        probe_raw_size(session, url)
    assert info.value.url == url


@pytest.mark.integration
def test_probe_truncated_and_damaged_tails(
    server: ImageServer, session: requests.Session, single: ImageFacts
) -> None:
    data = single.path.read_bytes()
    cut = serve_bytes(server, "cut.raw.xz", data[:-4])
    damaged = bytearray(data)
    damaged[-20] ^= 0xFF  # inside the index: its CRC32 no longer matches
    bad = serve_bytes(server, "bad.raw.xz", bytes(damaged))
    odd = serve_bytes(server, "odd.raw.xz", data + b"\0\0")  # padding not a multiple of 4
    for url in (cut, bad, odd):
        with pytest.raises(CorruptImage):
            probe_raw_size(session, url)


@pytest.mark.integration
def test_probe_empty_file(server: ImageServer, session: requests.Session) -> None:
    url = serve_bytes(server, "empty.raw.xz", b"")
    with pytest.raises(CorruptImage):
        probe_raw_size(session, url)


@pytest.mark.integration
def test_probe_spools_what_a_server_that_ignores_range_sends(
    server: ImageServer, session: requests.Session, single: ImageFacts
) -> None:
    """Python's http.server ignores Range: its one full answer is kept, not fetched again."""
    url = server.add("norange.raw.xz", Route(single.path, ranges=False))
    raw_size = probe_raw_size(session, url)
    assert raw_size == single.raw_size
    assert raw_size.spool is not None and raw_size.spool.size == single.compressed_size
    raw_size.spool.close()
    assert len(server.requests) == 1, "no second download"


@pytest.mark.integration
def test_probe_without_a_spool_refuses_a_server_that_ignores_range(
    server: ImageServer, session: requests.Session, single: ImageFacts
) -> None:
    url = server.add("norange.raw.xz", Route(single.path, ranges=False))
    with pytest.raises(DownloadError) as info:
        probe_raw_size(session, url, spool_limit=0)
    assert not isinstance(info.value, CorruptImage)
    assert "Range" in str(info.value)
    assert len(server.requests) == 1, "no fallback to another full download"


@pytest.mark.integration
def test_probe_404(server: ImageServer, session: requests.Session) -> None:
    with pytest.raises(DownloadError, match="404") as info:
        probe_raw_size(session, server.url("missing.raw.xz"))
    assert not isinstance(info.value, CorruptImage)


# ---------------------------------------------------------------------------
# stream_raw: good input


@pytest.mark.integration
def test_stream_raw_yields_the_raw_image(
    server: ImageServer, session: requests.Session, single: ImageFacts
) -> None:
    url = server.add("single.raw.xz", Route(single.path))
    chunks = list(stream_raw(session, url, single.sha256, single.raw_size, chunk_size=BLOCK))
    assert all(0 < len(c) <= BLOCK for c in chunks)
    raw = b"".join(chunks)
    assert raw == lzma.decompress(single.path.read_bytes())
    assert len(raw) == single.raw_size
    for index, digest in single.block_digests.items():
        block = raw[index * BLOCK : (index + 1) * BLOCK]
        assert hashlib.sha256(block + bytes(BLOCK - len(block))).hexdigest() == digest


@pytest.mark.integration
def test_stream_raw_multi_stream(
    server: ImageServer, session: requests.Session, multi: tuple[Path, str, int]
) -> None:
    path, sha, raw_size = multi
    url = server.add("multi.raw.xz", Route(path))
    raw = b"".join(stream_raw(session, url, sha.upper(), raw_size, chunk_size=100_000))
    assert raw == xz_dc(path)


# ---------------------------------------------------------------------------
# stream_raw: bad input


def consume(chunks: Iterator[bytes], got: list[bytes] | None = None) -> list[bytes]:
    """Read every chunk into ``got``; what was got before an error stays in ``got``."""
    got = [] if got is None else got
    for chunk in chunks:
        got.append(chunk)
    return got


@pytest.mark.integration
def test_checksum_mismatch_holds_back_the_last_chunk(
    server: ImageServer, session: requests.Session, single: ImageFacts
) -> None:
    url = server.add("single.raw.xz", Route(single.path))
    wrong = hashlib.sha256(b"another file").hexdigest()
    got: list[bytes] = []
    with pytest.raises(ChecksumMismatch) as info:
        consume(stream_raw(session, url, wrong, single.raw_size, chunk_size=BLOCK), got)
    assert got, "earlier chunks flow before the checksum is known"
    assert sum(map(len, got)) < single.raw_size, "the last chunk is never handed out"
    assert info.value.url == url


@pytest.mark.integration
def test_sha256_argument_is_validated(
    server: ImageServer, session: requests.Session, single: ImageFacts
) -> None:
    url = server.add("single.raw.xz", Route(single.path))
    with pytest.raises(ValueError):
        next(stream_raw(session, url, "not-a-digest", single.raw_size))
    with pytest.raises(ValueError):
        next(stream_raw(session, url, single.sha256, 0))
    assert server.requests == [], "nothing downloaded for bad arguments"


@pytest.mark.integration
@pytest.mark.parametrize(
    "case", ["truncated", "flipped", "trailing-garbage", "bad-padding", "not-xz", "empty"]
)
def test_corrupt_files_raise_corrupt_image(
    server: ImageServer,
    session: requests.Session,
    noisy: ImageFacts,
    case: str,
) -> None:
    """The sha256 given matches the bad file: only xz validation can catch these."""
    data = noisy.path.read_bytes()
    bad = {
        "truncated": data[: len(data) // 2],
        "flipped": data[:5000] + bytes(b ^ 0x55 for b in data[5000:5100]) + data[5100:],
        "trailing-garbage": data + b"GARBAGE!",
        "bad-padding": data + b"\0\0\0",
        "not-xz": b"\x89PNG" + bytes(4000),
        "empty": b"",
    }[case]
    url = serve_bytes(server, f"{case}.raw.xz", bad)
    with pytest.raises(CorruptImage):
        consume(stream_raw(session, url, hashlib.sha256(bad).hexdigest(), noisy.raw_size))


@pytest.mark.integration
def test_more_output_than_declared_is_an_xz_bomb(
    server: ImageServer, session: requests.Session, tmp_path: Path
) -> None:
    """32 MiB of zeros declared as 1 MiB: stopped at the limit, chunks stay bounded."""
    bomb = build_raw_xz(tmp_path / "bomb.raw.xz", 64 * BLOCK, [])
    assert bomb.compressed_size < 64 * BLOCK // 100
    url = server.add("bomb.raw.xz", Route(bomb.path))
    got: list[bytes] = []
    with pytest.raises(CorruptImage, match="more than"):
        consume(stream_raw(session, url, bomb.sha256, 2 * BLOCK, chunk_size=BLOCK), got)
    assert sum(map(len, got)) <= 2 * BLOCK
    assert all(len(c) <= BLOCK for c in got)


@pytest.mark.integration
def test_less_output_than_declared(
    server: ImageServer, session: requests.Session, single: ImageFacts
) -> None:
    url = server.add("single.raw.xz", Route(single.path))
    got: list[bytes] = []
    with pytest.raises(CorruptImage, match="declared"):
        consume(stream_raw(session, url, single.sha256, single.raw_size + 1), got)
    assert got and sum(map(len, got)) < single.raw_size


@pytest.mark.integration
def test_404(server: ImageServer, session: requests.Session, single: ImageFacts) -> None:
    url = server.add("gone.raw.xz", Route(single.path, status=404))
    with pytest.raises(DownloadError, match="404") as info:
        consume(stream_raw(session, url, single.sha256, single.raw_size))
    assert type(info.value) is DownloadError


@pytest.mark.integration
def test_stalled_server_times_out(server: ImageServer, single: ImageFacts) -> None:
    url = server.add("stall.raw.xz", Route(single.path, stall_after=100))
    session = make_session(retries=0, timeout=0.5)
    with pytest.raises(DownloadError) as info:
        consume(stream_raw(session, url, single.sha256, single.raw_size))
    assert type(info.value) is DownloadError
    # The server never sends the rest (until it stops): only the read timeout ends this.
    cause = info.value.__cause__
    assert isinstance(cause, requests.ConnectionError)
    assert isinstance(cause.args[0], urllib3.exceptions.ReadTimeoutError)
    assert [p for p, _ in server.requests] == ["/stall.raw.xz"] and not server.release.is_set()


@pytest.mark.integration
def test_connection_cut_short(
    server: ImageServer, session: requests.Session, noisy: ImageFacts
) -> None:
    url = server.add("cut.raw.xz", Route(noisy.path, cut_after=noisy.compressed_size // 2))
    with pytest.raises(DownloadError) as info:
        consume(stream_raw(session, url, noisy.sha256, noisy.raw_size))
    assert type(info.value) is DownloadError, "a cut connection is not a bad image"


def test_generated_image_facts_match_the_file(single: ImageFacts) -> None:
    raw = lzma.decompress(single.path.read_bytes())
    assert file_sha256(single.path) == (single.sha256, single.compressed_size)
    assert single.nonzero_blocks == (0, 5)
    assert raw[:4] == b"boot" and raw[5 * BLOCK : 5 * BLOCK + 1000] == b"x" * 1000
    assert raw.count(0) == len(raw) - 4 - 1000


# ---------------------------------------------------------------------------
# Which path stream_raw takes (fedimg.xzparallel has the parallel one)


@pytest.mark.integration
def test_a_single_block_file_keeps_the_streaming_path(
    server: ImageServer, session: requests.Session, single: ImageFacts
) -> None:
    url = server.add("single.raw.xz", Route(single.path))
    raw_size = probe_raw_size(session, url)
    assert raw_size.layout is not None and len(raw_size.layout.blocks) == 1
    chunks = stream_raw(session, url, single.sha256, raw_size)
    assert isinstance(chunks, ReadAhead)
    assert b"".join(chunks) == lzma.decompress(single.path.read_bytes())


@pytest.mark.integration
def test_an_index_too_big_to_plan_falls_back_to_streaming(
    server: ImageServer,
    session: requests.Session,
    multi: tuple[Path, str, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, sha, raw_size = multi
    monkeypatch.setattr(download, "MAX_PLANNED_BLOCKS", 4)  # the file has 17 xz blocks
    url = server.add("multi.raw.xz", Route(path))
    probed = probe_raw_size(session, url)
    assert probed == raw_size and probed.layout is None
    chunks = stream_raw(session, url, sha, probed)
    assert isinstance(chunks, ReadAhead)
    assert b"".join(chunks) == xz_dc(path)


def test_stream_raw_refuses_a_silly_parallelism(single: ImageFacts) -> None:
    with pytest.raises(ValueError):
        stream_raw(
            make_session(),
            "http://127.0.0.1:9/x",
            single.sha256,
            single.raw_size,
            blocks_in_flight=0,
        )
