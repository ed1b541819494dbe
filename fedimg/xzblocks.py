"""Plan the parallel decoding of a multi-block xz file: pure functions, no I/O.

An xz file (https://tukaani.org/xz/xz-file-format.txt) is streams of
independent blocks; each stream's index lists every block's unpadded size
(header + compressed data + check) and uncompressed size, so the index alone
tells where each block starts in the file and in the raw image. Multi-threaded
``xz`` (``-T0``) writes such files (a block per 3 x dictionary size: 24 MiB of
raw data at ``-6``), and every block can be decoded on its own.

The plan, from the probe's index walk (``fedimg.download``) to EBS blocks:

- ``plan_layout``: every block's file offset and raw offset (``XzLayout``);
- ``plan_parts``: consecutive blocks grouped into ``Part``s of at least
  ``min_raw`` raw bytes, whose byte ranges cover the whole file, in order and
  without overlap (stream headers, indexes, footers and padding included), so
  hashing the parts in order hashes the whole file;
- ``ebs_split``: a part's raw range cut into the 512 KiB blocks it alone fills
  (``body``) and the partial blocks at its ends (``head``, ``tail``), which it
  shares with the neighbouring parts or which end the image;
- ``wrap_block``: the 12-byte stream header and the index + footer that make
  one block a complete single-block xz stream, so liblzma checks everything a
  whole-file decode would (block header CRC, the block's check, its
  compressed and uncompressed sizes against the index);
- ``parts_in_flight``: how many parts to decode at once within a memory budget.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

HEADER_MAGIC = b"\xfd7zXZ\x00"
FOOTER_MAGIC = b"YZ"
HEADER_SIZE = 12
FOOTER_SIZE = 12
# An xz block header is at least 8 bytes and a block's check at most 64:
# smaller records are refused by the index parser.
MIN_UNPADDED_SIZE = 5
# Parts fetched and decoded at once per image (fedimg.download.xz_blocks_in_flight).
BLOCKS_IN_FLIGHT = 4
# Raw bytes a part holds at least (blocks are grouped up to it): one HTTP
# request and one decoder set-up per part.
MIN_PART_RAW = 8 << 20


@dataclass(frozen=True)
class StreamInfo:
    """One xz stream as read from its footer and index."""

    start: int  # offset of the stream header in the file
    end: int  # offset just past the stream footer
    blocks: int
    uncompressed_size: int
    flags: bytes = b"\x00\x00"  # the 2 stream flag bytes (the check type)
    # (unpadded size, uncompressed size) of each block; None when not kept
    records: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True)
class XzBlock:
    """One xz block: where it is in the file and in the raw image."""

    offset: int  # file offset of its block header
    unpadded_size: int
    raw_offset: int
    raw_size: int
    flags: bytes  # its stream's flags

    @property
    def padded_size(self) -> int:
        return (self.unpadded_size + 3) & ~3

    @property
    def end(self) -> int:
        """File offset just past the block padding."""
        return self.offset + self.padded_size


@dataclass(frozen=True)
class XzLayout:
    """Every block of an xz file, in file order (which is raw order)."""

    file_size: int
    raw_size: int
    blocks: tuple[XzBlock, ...]


@dataclass(frozen=True)
class Part:
    """A byte range of the file to fetch, hash and decode as one unit.

    ``[start, end)`` holds ``blocks`` (consecutive) and whatever lies between
    them and the neighbouring parts (stream headers, indexes, padding): bytes
    that are hashed but not decoded.
    """

    number: int
    start: int
    end: int
    blocks: tuple[XzBlock, ...]

    @property
    def raw_start(self) -> int:
        return self.blocks[0].raw_offset

    @property
    def raw_end(self) -> int:
        last = self.blocks[-1]
        return last.raw_offset + last.raw_size


@dataclass(frozen=True)
class EbsSplit:
    """A raw range cut at EBS block boundaries (each a [start, end) range, or None).

    ``head`` and ``tail`` each lie inside one EBS block that the range does
    not fill alone; ``body`` is a whole number of EBS blocks.
    """

    head: tuple[int, int] | None
    body: tuple[int, int] | None
    tail: tuple[int, int] | None


def encode_multibyte(value: int) -> bytes:
    """An xz multibyte integer (7 bits per byte, least significant first)."""
    if value < 0 or value >= 1 << 63:
        raise ValueError(f"not encodable as an xz multibyte integer: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def plan_layout(file_size: int, streams: Sequence[StreamInfo]) -> XzLayout:
    """Every block's file and raw offsets from the streams' indexes (in any order).

    ValueError unless the streams tile the file without overlap, each one's
    blocks fill it exactly between its header and its index, and every block
    is non-empty.
    """
    ordered = sorted(streams, key=lambda s: s.start)
    blocks: list[XzBlock] = []
    raw = 0
    previous_end = 0
    for stream in ordered:
        if stream.start < previous_end or stream.end > file_size:
            raise ValueError("xz streams overlap or run past the file")
        if stream.records is None:
            raise ValueError("the stream's index records were not kept")
        if len(stream.flags) != 2:
            raise ValueError("xz stream flags are two bytes")
        offset = stream.start + HEADER_SIZE
        for unpadded, size in stream.records:
            if unpadded < MIN_UNPADDED_SIZE or size <= 0:
                raise ValueError("xz index record with an impossible size")
            block = XzBlock(offset, unpadded, raw, size, stream.flags)
            blocks.append(block)
            offset = block.end
            raw += size
        if offset > stream.end - FOOTER_SIZE:
            raise ValueError("xz blocks run into their stream's index")
        previous_end = stream.end
    if not blocks:
        raise ValueError("no xz blocks")
    return XzLayout(file_size=file_size, raw_size=raw, blocks=tuple(blocks))


def plan_parts(layout: XzLayout, min_raw: int = MIN_PART_RAW) -> tuple[Part, ...]:
    """Blocks grouped, in order, into parts of >= ``min_raw`` raw bytes (the last may be less).

    Part ``n`` covers the file from the end of part ``n - 1`` (0 for the first)
    to the end of its last block (the file's end for the last part).
    """
    if min_raw < 1:
        raise ValueError(f"min_raw must be positive, not {min_raw}")
    groups: list[list[XzBlock]] = [[]]
    held = 0
    for block in layout.blocks:
        if held >= min_raw:
            groups.append([])
            held = 0
        groups[-1].append(block)
        held += block.raw_size
    parts: list[Part] = []
    start = 0
    for number, group in enumerate(groups):
        end = layout.file_size if number == len(groups) - 1 else group[-1].end
        parts.append(Part(number, start, end, tuple(group)))
        start = end
    return tuple(parts)


def ebs_split(raw_start: int, raw_end: int, block_size: int) -> EbsSplit:
    """Cut ``[raw_start, raw_end)`` where EBS blocks of ``block_size`` begin."""
    if not 0 <= raw_start < raw_end:
        raise ValueError(f"not a raw range: [{raw_start}, {raw_end})")
    first_full = -(-raw_start // block_size) * block_size
    last_full = raw_end // block_size * block_size
    if first_full > last_full:  # inside one EBS block, touching neither of its ends
        return EbsSplit((raw_start, raw_end), None, None)
    return EbsSplit(
        head=(raw_start, first_full) if raw_start < first_full else None,
        body=(first_full, last_full) if first_full < last_full else None,
        tail=(last_full, raw_end) if last_full < raw_end else None,
    )


def wrap_block(block: XzBlock) -> tuple[bytes, bytes]:
    """(stream header, index + stream footer) making ``block`` a one-block xz stream."""
    flags = block.flags
    header = HEADER_MAGIC + flags + struct.pack("<I", zlib.crc32(flags))
    body = b"\x00" + encode_multibyte(1)
    body += encode_multibyte(block.unpadded_size) + encode_multibyte(block.raw_size)
    body += bytes(-len(body) % 4)
    index = body + struct.pack("<I", zlib.crc32(body))
    fields = struct.pack("<I", len(index) // 4 - 1) + flags
    footer = struct.pack("<I", zlib.crc32(fields)) + fields + FOOTER_MAGIC
    return header, index + footer


def parts_in_flight(parts: Sequence[Part], wanted: int, budget: int) -> int:
    """Parts to decode at once: ``wanted``, fewer if their decoders could outgrow ``budget``.

    A decoder touches at most its dictionary, and never more of it than the
    raw size of the block it decodes, so the largest block bounds each one.
    Always at least one.
    """
    if wanted < 1:
        raise ValueError(f"wanted must be at least 1, not {wanted}")
    largest = max((b.raw_size for p in parts for b in p.blocks), default=1)
    return max(1, min(wanted, len(parts), budget // largest))
