"""fedimg.xzlib: the two block decoders of the xz decoder child, on bytes in this process.

The frames the child sends with each decoder (and each decoder's handling
of bad data) are tested in test_xzproc.py; here, the decoders themselves:
the same blocks whatever the input's pieces and the block size, and which
decoder ``block_decoder`` picks.
"""

from __future__ import annotations

import ctypes
import hashlib
import lzma
import random

import pytest

from fedimg import xzlib
from fedimg.ebsblocks import BLOCK_SIZE
from fedimg.xzlib import (
    PROBE,
    PROBE_RAW,
    BlockDecoder,
    LiblzmaBlocks,
    StdlibBlocks,
    XzDataError,
    block_decoder,
    decodes_probe,
    load_liblzma,
)


def liblzma() -> ctypes.CDLL:
    lib = load_liblzma()
    assert lib is not None, "liblzma, which the standard library's lzma uses, must load"
    return lib


def raw_image(size: int, data: dict[int, bytes]) -> bytes:
    """``size`` zero bytes with ``data`` written at byte offsets (not aligned to blocks)."""
    raw = bytearray(size)
    for offset, chunk in data.items():
        raw[offset : offset + len(chunk)] = chunk
    return bytes(raw)


def expected_blocks(raw: bytes, block_size: int) -> list[tuple[int, str]]:
    """The non-zero blocks of ``raw``, the last one zero-padded: (index, sha256)."""
    blocks = []
    for index in range(-(-len(raw) // block_size)):
        block = raw[index * block_size : (index + 1) * block_size].ljust(block_size, b"\0")
        if any(block):
            blocks.append((index, hashlib.sha256(block).hexdigest()))
    return blocks


def decode_in_pieces(decoder: BlockDecoder, data: bytes, piece: int) -> list[tuple[int, str]]:
    """Feed ``data`` ``piece`` bytes at a time; the blocks as (index, sha256), copied at once."""
    got = []
    try:
        for start in range(0, len(data), piece):
            for item in decoder.feed(data[start : start + piece]):
                if item is not None:
                    got.append((item[0], hashlib.sha256(item[1]).hexdigest()))
        got += [(index, hashlib.sha256(block).hexdigest()) for index, block in decoder.finish()]
    finally:
        decoder.close()
    return got


# Two streams with padding between them; data across block boundaries, a
# non-zero byte alone at the end of a block, and a partial last block.
FIRST = raw_image(
    3 * BLOCK_SIZE + 100,
    {10: b"boot", BLOCK_SIZE - 3: b"across", 3 * BLOCK_SIZE - 1: b"!", 3 * BLOCK_SIZE + 50: b"x"},
)
SECOND = raw_image(2 * BLOCK_SIZE, {BLOCK_SIZE + 7: random.Random(13).randbytes(5000)})
TWO_STREAMS = lzma.compress(FIRST) + bytes(8) + lzma.compress(SECOND, check=lzma.CHECK_SHA256)


@pytest.mark.parametrize("piece", [13, 4096, 1 << 30], ids=["13", "4096", "whole"])
def test_both_decoders_give_the_same_blocks_whatever_the_pieces(piece: int) -> None:
    expected = expected_blocks(FIRST + SECOND, BLOCK_SIZE)
    for decoder in (LiblzmaBlocks(liblzma()), StdlibBlocks(64 * 1024)):
        assert decode_in_pieces(decoder, TWO_STREAMS, piece) == expected, decoder.name
        assert decoder.produced == len(FIRST) + len(SECOND)


@pytest.mark.parametrize("block_size", [1000, 4096, 3 * BLOCK_SIZE])
def test_liblzma_blocks_of_any_size(block_size: int) -> None:
    """Blocks smaller than the xz output steps, and one block spanning several 512 KiB."""
    decoder = LiblzmaBlocks(liblzma(), block_size=block_size)
    got = decode_in_pieces(decoder, TWO_STREAMS, 4096)
    assert got == expected_blocks(FIRST + SECOND, block_size)
    assert decoder.streams == 2


def test_liblzma_fed_a_byte_at_a_time() -> None:
    raw = raw_image(5000, {0: b"a", 999: b"bc", 4999: b"z"})
    decoder = LiblzmaBlocks(liblzma(), block_size=1000)
    assert decode_in_pieces(decoder, lzma.compress(raw), 1) == expected_blocks(raw, 1000)
    assert decoder.produced == len(raw)


def test_produced_follows_the_decoding() -> None:
    """``produced`` is the raw bytes decoded so far, at every yield and at the end."""
    decoder = LiblzmaBlocks(liblzma(), block_size=1000)
    seen = []
    for item in decoder.feed(lzma.compress(raw_image(2500, {2400: b"q"}))):
        seen.append((decoder.produced, item is None))
    assert seen == [(1000, True), (2000, True), (2500, True)]
    assert [index for index, _ in decoder.finish()] == [2]
    assert decoder.produced == 2500
    decoder.close()
    decoder.close()  # idempotent


def test_the_probe_is_a_real_xz_stream() -> None:
    assert lzma.decompress(PROBE) == PROBE_RAW


def test_block_decoder_uses_liblzma() -> None:
    decoder = block_decoder(64 * 1024, load_liblzma())
    assert isinstance(decoder, LiblzmaBlocks) and decoder.name.startswith("liblzma 5.")
    assert decodes_probe(liblzma())
    decoder.close()


def test_a_library_that_is_not_liblzma_is_not_loaded() -> None:
    assert load_liblzma(("no-such-library.so.9", "libc.so.6")) is None


def test_without_liblzma_the_standard_library_decodes() -> None:
    decoder = block_decoder(64 * 1024, lib=None)
    assert isinstance(decoder, StdlibBlocks)
    assert decode_in_pieces(decoder, TWO_STREAMS, 4096) == expected_blocks(
        FIRST + SECOND, BLOCK_SIZE
    )


def test_a_library_failing_the_probe_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xzlib, "PROBE_RAW", b"not what the probe decodes to")
    assert not decodes_probe(liblzma())
    assert isinstance(block_decoder(64 * 1024, liblzma()), StdlibBlocks)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "not an xz file"),
        (PROBE[:-1], "not an xz file"),
        (PROBE + PROBE[:20], "truncated"),
        (PROBE + bytes(5), "padding"),
        (PROBE + bytes(4) + b"PK\x03\x04" * 8, "corrupt"),
        (bytes(4) + PROBE, "corrupt"),  # padding comes only between and after streams
    ],
    ids=["empty", "cut", "second-cut", "odd-padding", "trailing", "leading-zeros"],
)
def test_both_decoders_fail_alike(data: bytes, says: str) -> None:
    messages = []
    for decoder in (LiblzmaBlocks(liblzma()), StdlibBlocks(64 * 1024)):
        with pytest.raises(XzDataError) as caught:
            decode_in_pieces(decoder, data, 7)
        messages.append(str(caught.value))
    assert messages[0] == messages[1] and says in messages[0]
