"""fedimg.xzblocks: the plan from xz index records to byte ranges and EBS blocks.

Pure functions, checked against arithmetic, properties, and two independent
oracles: ``xz --robot --list`` (where the xz tool says each block is) and
liblzma decoding a block wrapped by ``wrap_block``.
"""

from __future__ import annotations

import itertools
import lzma
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devel.images import BLOCK, build_raw_xz, concatenate_streams
from fedimg.download import decode_multibyte, parse_footer, parse_index
from fedimg.xzblocks import (
    EbsSplit,
    Part,
    StreamInfo,
    XzBlock,
    XzLayout,
    ebs_split,
    encode_multibyte,
    parts_in_flight,
    plan_layout,
    plan_parts,
    wrap_block,
)

MIB = 1 << 20
FLAGS = b"\x00\x04"  # CRC64


def stream(start: int, records: list[tuple[int, int]], index_and_footer: int = 24) -> StreamInfo:
    """A stream at ``start`` holding blocks of these (unpadded, raw) sizes."""
    blocks = sum((u + 3) & ~3 for u, _ in records)
    return StreamInfo(
        start=start,
        end=start + 12 + blocks + index_and_footer,
        blocks=len(records),
        uncompressed_size=sum(s for _, s in records),
        flags=FLAGS,
        records=tuple(records),
    )


def xz_list_blocks(path: Path) -> list[tuple[int, int, int]]:
    """(file offset, raw offset, raw size) of every block, as the xz tool lists them."""
    out = subprocess.run(
        ["xz", "--robot", "--list", "-v", str(path)], capture_output=True, text=True, check=True
    ).stdout
    rows = [line.split("\t") for line in out.splitlines() if line.startswith("block\t")]
    return [(int(r[4]), int(r[5]), int(r[7])) for r in rows]


# ---------------------------------------------------------------------------
# multibyte integers


@given(st.integers(min_value=0, max_value=(1 << 63) - 1))
def test_encode_multibyte_round_trips(value: int) -> None:
    encoded = encode_multibyte(value)
    assert decode_multibyte(encoded, 0) == (value, len(encoded))


@pytest.mark.parametrize("value", [-1, 1 << 63])
def test_encode_multibyte_refuses_what_xz_cannot_hold(value: int) -> None:
    with pytest.raises(ValueError):
        encode_multibyte(value)


# ---------------------------------------------------------------------------
# plan_layout


def test_layout_offsets_follow_padded_sizes() -> None:
    s = stream(0, [(13, 1000), (250, 70000), (8, 5)])
    layout = plan_layout(s.end, [s])
    assert layout.raw_size == 71005
    assert [(b.offset, b.unpadded_size, b.raw_offset, b.raw_size) for b in layout.blocks] == [
        (12, 13, 0, 1000),
        (28, 250, 1000, 70000),  # 13 padded to 16
        (280, 8, 71000, 5),  # 250 padded to 252
    ]
    assert layout.blocks[-1].end == 288
    assert all(b.flags == FLAGS for b in layout.blocks)


def test_layout_of_several_streams_in_any_order() -> None:
    first = stream(0, [(100, 4000)])
    second = stream(first.end + 8, [(40, 300), (41, 301)])  # 8 bytes of stream padding
    layout = plan_layout(second.end, [second, first])  # the probe walks backwards
    assert [b.offset for b in layout.blocks] == [12, first.end + 8 + 12, first.end + 8 + 52]
    assert [b.raw_offset for b in layout.blocks] == [0, 4000, 4300]
    assert layout.raw_size == 4601


@pytest.mark.parametrize(
    "streams",
    [
        [stream(0, [(100, 4000)]), stream(50, [(10, 10)])],  # overlapping streams
        [StreamInfo(0, 40, 1, 10, FLAGS, ((100, 10),))],  # blocks run into the index
        [stream(0, [(4, 10)])],  # a block smaller than a block header
        [stream(0, [(10, 0)])],  # an empty block
        [StreamInfo(0, 48, 1, 10, FLAGS, None)],  # records not kept
        [StreamInfo(0, 48, 1, 10, b"\x00", ((10, 10),))],  # flags cut short
        [],
    ],
    ids=["overlap", "into-index", "tiny-block", "empty-block", "no-records", "flags", "none"],
)
def test_layout_refuses_impossible_indexes(streams: list[StreamInfo]) -> None:
    with pytest.raises(ValueError):
        plan_layout(10_000, streams)


def test_layout_refuses_a_stream_past_the_file() -> None:
    s = stream(0, [(100, 4000)])
    with pytest.raises(ValueError):
        plan_layout(s.end - 1, [s])


def test_layout_matches_the_xz_tool(tmp_path: Path) -> None:
    """Two streams, stream padding, blocks of 700000 raw bytes (not 512 KiB aligned)."""
    a = build_raw_xz(tmp_path / "a.xz", 3 * BLOCK + 11, [0, 2], seed=1, xz_block_size=700_000)
    b = build_raw_xz(tmp_path / "b.xz", 5 * BLOCK, [1, 4], seed=2, xz_block_size=700_000)
    path = tmp_path / "ab.xz"
    concatenate_streams(path, [a.path, b.path], padding=12)
    data = path.read_bytes()
    end_a = a.compressed_size
    streams = [_stream_of(data[:end_a], 0), _stream_of(data[end_a + 12 :], end_a + 12)]
    layout = plan_layout(len(data), streams)
    assert [(b.offset, b.raw_offset, b.raw_size) for b in layout.blocks] == xz_list_blocks(path)
    assert layout.raw_size == a.raw_size + b.raw_size


def _stream_of(data: bytes, start: int) -> StreamInfo:
    """The StreamInfo of the single stream ``data``, read the way the probe does."""
    index_size, flags = parse_footer(data[-12:])
    records: list[tuple[int, int]] = []
    count, _, raw = parse_index(data[-12 - index_size : -12], records)
    return StreamInfo(start, start + len(data), count, raw, flags, tuple(records))


# ---------------------------------------------------------------------------
# plan_parts


def layout_of(raw_sizes: list[int], tail: int = 24) -> XzLayout:
    s = stream(0, [(100 + 7 * n, size) for n, size in enumerate(raw_sizes)], tail)
    return plan_layout(s.end, [s])


def test_parts_group_blocks_up_to_the_minimum() -> None:
    layout = layout_of([3 * MIB, 3 * MIB, 3 * MIB, 10 * MIB, 1 * MIB, 2 * MIB])
    parts = plan_parts(layout, min_raw=8 * MIB)
    assert [len(p.blocks) for p in parts] == [3, 1, 2]
    assert [p.raw_end - p.raw_start for p in parts] == [9 * MIB, 10 * MIB, 3 * MIB]


def test_one_part_when_the_minimum_is_the_whole_image() -> None:
    layout = layout_of([MIB] * 5)
    (part,) = plan_parts(layout, min_raw=100 * MIB)
    assert (part.start, part.end) == (0, layout.file_size)
    assert part.blocks == layout.blocks


def test_parts_refuse_a_silly_minimum() -> None:
    with pytest.raises(ValueError):
        plan_parts(layout_of([MIB]), min_raw=0)


@given(
    st.lists(st.integers(min_value=1, max_value=40 * MIB), min_size=1, max_size=40),
    st.integers(min_value=1, max_value=64 * MIB),
    st.integers(min_value=12, max_value=4000),
)
def test_parts_tile_the_file_and_the_image(sizes: list[int], min_raw: int, tail: int) -> None:
    layout = layout_of(sizes, tail=tail)
    parts = plan_parts(layout, min_raw)
    assert parts[0].start == 0 and parts[-1].end == layout.file_size
    for before, after in itertools.pairwise(parts):
        assert before.end == after.start  # hashed in order, every byte once
        assert before.raw_end == after.raw_start
        assert before.raw_end - before.raw_start >= min_raw
    assert [n for n, _ in enumerate(parts)] == [p.number for p in parts]
    assert tuple(b for p in parts for b in p.blocks) == layout.blocks
    for part in parts:
        assert part.start <= part.blocks[0].offset and part.blocks[-1].end <= part.end
    assert parts[0].raw_start == 0 and parts[-1].raw_end == layout.raw_size


# ---------------------------------------------------------------------------
# ebs_split


def test_split_of_a_range_not_aligned_at_either_end() -> None:
    assert ebs_split(BLOCK - 100, 3 * BLOCK + 5, BLOCK) == EbsSplit(
        head=(BLOCK - 100, BLOCK), body=(BLOCK, 3 * BLOCK), tail=(3 * BLOCK, 3 * BLOCK + 5)
    )


def test_split_of_a_block_spanning_many_ebs_blocks() -> None:
    split = ebs_split(0, 48 * BLOCK, BLOCK)  # a 24 MiB xz block at the image start
    assert split == EbsSplit(head=None, body=(0, 48 * BLOCK), tail=None)


def test_split_inside_one_ebs_block() -> None:
    assert ebs_split(BLOCK + 10, BLOCK + 20, BLOCK) == EbsSplit(
        (BLOCK + 10, BLOCK + 20), None, None
    )
    assert ebs_split(BLOCK, BLOCK + 20, BLOCK) == EbsSplit(None, None, (BLOCK, BLOCK + 20))
    assert ebs_split(BLOCK + 10, 2 * BLOCK, BLOCK) == EbsSplit((BLOCK + 10, 2 * BLOCK), None, None)


def test_split_of_the_last_partial_block() -> None:
    raw_size = 7 * BLOCK + 12345
    assert ebs_split(6 * BLOCK - 1, raw_size, BLOCK) == EbsSplit(
        head=(6 * BLOCK - 1, 6 * BLOCK), body=(6 * BLOCK, 7 * BLOCK), tail=(7 * BLOCK, raw_size)
    )


@pytest.mark.parametrize("bad", [(5, 5), (6, 5), (-1, 5)])
def test_split_refuses_empty_ranges(bad: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        ebs_split(*bad, BLOCK)


@given(
    st.integers(min_value=0, max_value=100 * BLOCK),
    st.integers(min_value=1, max_value=10 * BLOCK),
    st.sampled_from([BLOCK, 4096, 7]),
)
def test_split_pieces_cover_the_range(start: int, length: int, size: int) -> None:
    split = ebs_split(start, start + length, size)
    pieces = [p for p in (split.head, split.body, split.tail) if p is not None]
    assert pieces[0][0] == start and pieces[-1][1] == start + length
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
    for edge in (split.head, split.tail):
        if edge is not None:  # inside one EBS block, not a whole one
            assert edge[0] // size == (edge[1] - 1) // size
            assert edge[1] - edge[0] < size
    if split.body is not None:
        assert split.body[0] % size == 0 and split.body[1] % size == 0


# ---------------------------------------------------------------------------
# wrap_block: each block as a stream of its own, checked by liblzma


@pytest.fixture(scope="module")
def blocky(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, XzLayout, bytes]:
    """A file of 6 xz blocks of 300000 raw bytes (the last shorter), and its raw bytes."""
    path = tmp_path_factory.mktemp("blocky") / "blocky.xz"
    build_raw_xz(path, 3 * BLOCK + 99, [0, 1, 3], seed=5, xz_block_size=300_000)
    data = path.read_bytes()
    layout = plan_layout(len(data), [_stream_of(data, 0)])
    return data, layout, lzma.decompress(data)


def decode_wrapped(data: bytes, block: XzBlock) -> bytes:
    header, trailer = wrap_block(block)
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    out = dec.decompress(header + data[block.offset : block.end] + trailer)
    assert dec.eof and not dec.unused_data
    return out


def test_wrapped_blocks_decode_to_their_share_of_the_image(
    blocky: tuple[bytes, XzLayout, bytes],
) -> None:
    data, layout, raw = blocky
    assert len(layout.blocks) == 6
    for block in layout.blocks:
        assert (
            decode_wrapped(data, block) == raw[block.raw_offset : block.raw_offset + block.raw_size]
        )


def test_a_wrapped_block_with_a_wrong_size_is_refused(
    blocky: tuple[bytes, XzLayout, bytes],
) -> None:
    data, layout, _raw = blocky
    block = layout.blocks[1]
    for lie in (
        XzBlock(block.offset, block.unpadded_size, 0, block.raw_size + 1, block.flags),
        XzBlock(block.offset, block.unpadded_size + 4, 0, block.raw_size, block.flags),
    ):
        with pytest.raises(lzma.LZMAError):
            decode_wrapped(data[: lie.end], lie)


def test_a_corrupt_wrapped_block_is_refused(blocky: tuple[bytes, XzLayout, bytes]) -> None:
    data, layout, _raw = blocky
    block = layout.blocks[0]
    damaged = bytearray(data)
    damaged[block.offset + 40] ^= 0x20
    with pytest.raises(lzma.LZMAError):
        decode_wrapped(bytes(damaged), block)


# ---------------------------------------------------------------------------
# parts_in_flight


def parts_of(*block_raw: int) -> tuple[Part, ...]:
    return plan_parts(layout_of(list(block_raw)), min_raw=1)


def test_in_flight_is_what_was_asked_within_the_budget() -> None:
    parts = parts_of(*[24 * MIB] * 10)
    assert parts_in_flight(parts, 4, budget=128 * MIB) == 4
    assert parts_in_flight(parts, 8, budget=128 * MIB) == 5  # 5 x 24 MiB fit
    assert parts_in_flight(parts, 4, budget=10 * MIB) == 1  # always one
    assert parts_in_flight(parts_of(MIB, MIB), 4, budget=128 * MIB) == 2  # no more than parts
    with pytest.raises(ValueError):
        parts_in_flight(parts, 0, budget=128 * MIB)
