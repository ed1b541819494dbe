"""Decode xz streams: the standard library's ``lzma``, or liblzma itself straight into EBS blocks.

Standard library only (the xz decoder child, ``fedimg.xzdecoder``, imports
it and must start fast).

- ``XzStreams`` decompresses concatenated xz streams with stream padding,
  a bounded output per step, through ``lzma`` (``fedimg.download`` streams
  with it).
- ``block_decoder(step, load_liblzma())`` returns what the decoder child decodes with: a
  ``BlockDecoder`` yielding the 512 KiB EBS blocks of the raw image. It is
  ``LiblzmaBlocks`` where liblzma 5 loads (through ``ctypes``) and decodes a
  known stream correctly, else ``StdlibBlocks`` (``XzStreams`` and a
  ``Reblocker``).

Why liblzma directly: ``lzma.LZMADecompressor`` returns every step as a new
``bytes``, assembled from several growing buffers and joined (one more copy
of every raw byte, gigabytes of zeros included), and the zero test copies no
less. ``LiblzmaBlocks`` has liblzma write into one 512 KiB buffer that
stays in the cache, one EBS block at a time, tests it against zeros in
place (one ``memcmp``) and hands out a view of it only when it holds data:
measured on a 4 GiB image with 384 MiB of data, 1.02x the CPU time of
``xz -dc`` against 1.08-1.11x through ``lzma``.

Both decoders accept exactly what ``XzStreams`` accepts and raise
``XzDataError`` with the same messages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import lzma
from collections.abc import Iterator
from typing import Protocol

from fedimg.ebsblocks import BLOCK_SIZE, Reblocker


class XzDataError(ValueError):
    """The data is not a valid xz file of the declared size (the message says how)."""


NOT_XZ = "not an xz file, or it ends before its first stream"
TRUNCATED = "xz stream is truncated"
BAD_PADDING = "xz stream padding is not a multiple of 4"


class _Padding:
    """Zero bytes between and after xz streams: a multiple of 4 before a stream and at the end."""

    def __init__(self) -> None:
        self.count = 0  # zero bytes seen since the last stream ended

    def strip(self, data: bytes) -> bytes:
        """``data`` after its leading padding (b"" if that is all of it); XzDataError if a
        stream starts after padding that is not a multiple of 4."""
        stripped = data.lstrip(b"\0")
        self.count += len(data) - len(stripped)
        if stripped:
            self.finish()
            self.count = 0
        return stripped

    def finish(self) -> None:
        if self.count % 4:
            raise XzDataError(BAD_PADDING)


class XzStreams:
    """Decompresses concatenated xz streams with padding, at most ``max_length`` per step."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self._dec: lzma.LZMADecompressor | None = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        self._padding = _Padding()
        self.streams = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Yield the raw output for compressed ``data`` (each piece <= max_length)."""
        while data:
            if self._dec is None:
                data = self._padding.strip(data)
                if not data:
                    return
                self._dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            dec = self._dec
            try:
                out = dec.decompress(data, self.max_length)
                if out:
                    yield out
                while not dec.eof and not dec.needs_input:
                    out = dec.decompress(b"", self.max_length)
                    if out:
                        yield out
            except lzma.LZMAError as exc:
                raise XzDataError(f"xz data is corrupt: {exc}") from exc
            if not dec.eof:
                return
            self.streams += 1
            data = dec.unused_data
            self._dec = None

    def finish(self) -> None:
        """Raise XzDataError unless the input ended cleanly between streams."""
        if self._dec is not None:
            raise XzDataError(NOT_XZ if self.streams == 0 else TRUNCATED)
        self._padding.finish()


# ---------------------------------------------------------------------------
# Block decoders: what the decoder child decodes with


Block = tuple[int, bytes | memoryview]  # EBS block index, its 512 KiB


class BlockDecoder(Protocol):
    """Decodes concatenated xz streams into the raw image's non-zero EBS blocks.

    ``feed`` yields each completed non-zero block as (index, data), and None
    now and then while it decodes zeros (a chance to report progress);
    ``produced`` counts the raw bytes decoded so far. ``finish`` checks that
    the input ended cleanly (else ``XzDataError``) and yields the last,
    partial block zero-padded, unless it is all zero. A yielded block is
    valid until the decoder is resumed. ``close`` frees the decoder.
    """

    name: str
    produced: int

    def feed(self, data: bytes) -> Iterator[Block | None]: ...

    def finish(self) -> Iterator[Block]: ...

    def close(self) -> None: ...


class StdlibBlocks:
    """A ``BlockDecoder`` on ``XzStreams`` (steps of ``step`` raw bytes) and a ``Reblocker``."""

    name = "lzma"

    def __init__(self, step: int) -> None:
        self._xz = XzStreams(step)
        self._reblocker = Reblocker()
        self.produced = 0

    def feed(self, data: bytes) -> Iterator[Block | None]:
        for out in self._xz.feed(data):
            self.produced += len(out)
            yield from self._reblocker.push(out)
            yield None

    def finish(self) -> Iterator[Block]:
        self._xz.finish()
        yield from self._reblocker.finish()

    def close(self) -> None:
        """Nothing to free."""


# liblzma's API (lzma/base.h, lzma/container.h): stable since liblzma 5.0.
LZMA_OK, LZMA_STREAM_END, LZMA_NO_CHECK, LZMA_GET_CHECK = 0, 1, 2, 4
LZMA_RUN = 0
MEMLIMIT = (1 << 64) - 1  # no limit, as the standard library's decompressor
MIN_VERSION = 50000002  # 5.0.0 stable
_RET_MESSAGES = {  # the texts of the standard library's lzma for the same codes
    3: "Unsupported integrity check",
    5: "Memory error",
    6: "Memory usage limit exceeded",
    7: "Input format not supported by decoder",
    8: "Invalid or unsupported options",
    9: "Corrupt input data",
    10: "Insufficient buffer space",
    11: "Internal error",
}
# lzma.compress(b"fedimg xz probe\n" * 4, preset=0): a library must decode it right.
PROBE = bytes.fromhex(
    "fd377a585a000004e6d6b446020021010c0000008f98419ce0003f00175d00331948b5d5d470afcc"
    "f20177ccce701885eaa77ff780000000c6a634b7372daae7000133408b9131a21fb6f37d01000000"
    "0004595a"
)
PROBE_RAW = b"fedimg xz probe\n" * 4


class _Stream(ctypes.Structure):
    """``lzma_stream``; all zero is ``LZMA_STREAM_INIT``."""

    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_size_t),
        ("total_in", ctypes.c_uint64),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_size_t),
        ("total_out", ctypes.c_uint64),
        ("allocator", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
        ("reserved_ptr1", ctypes.c_void_p),
        ("reserved_ptr2", ctypes.c_void_p),
        ("reserved_ptr3", ctypes.c_void_p),
        ("reserved_ptr4", ctypes.c_void_p),
        ("seek_pos", ctypes.c_uint64),
        ("reserved_int2", ctypes.c_uint64),
        ("reserved_int3", ctypes.c_size_t),
        ("reserved_int4", ctypes.c_size_t),
        ("reserved_enum1", ctypes.c_int),
        ("reserved_enum2", ctypes.c_int),
    ]


def load_liblzma(names: tuple[str | None, ...] | None = None) -> ctypes.CDLL | None:
    """liblzma 5 with its decoding functions declared, or None if none of ``names`` loads.

    By default the library the standard library's ``lzma`` is linked to
    (``liblzma.so.5``, already loaded by then), else what ``ctypes.util`` finds.
    """
    candidates = names if names is not None else ("liblzma.so.5", None)
    for candidate in candidates:
        name = candidate if candidate is not None else ctypes.util.find_library("lzma")
        if name is None:
            continue
        try:
            lib = ctypes.CDLL(name)
            lib.lzma_version_number.argtypes = []
            lib.lzma_version_number.restype = ctypes.c_uint32
            lib.lzma_stream_decoder.argtypes = [
                ctypes.POINTER(_Stream),
                ctypes.c_uint64,
                ctypes.c_uint32,
            ]
            lib.lzma_stream_decoder.restype = ctypes.c_int
            lib.lzma_code.argtypes = [ctypes.POINTER(_Stream), ctypes.c_int]
            lib.lzma_code.restype = ctypes.c_int
            lib.lzma_end.argtypes = [ctypes.POINTER(_Stream)]
            lib.lzma_end.restype = None
        except (OSError, AttributeError):
            continue
        if lib.lzma_version_number() >= MIN_VERSION:
            return lib
    return None


class LiblzmaBlocks:
    """A ``BlockDecoder`` on liblzma: it writes into one block buffer, tested in place.

    Streams are decoded one at a time, as ``XzStreams`` does (the padding
    between them checked here), so that the same inputs fail the same way.
    """

    def __init__(self, lib: ctypes.CDLL, block_size: int = BLOCK_SIZE) -> None:
        self.name = f"liblzma {_version(lib)}"
        self.block_size = block_size
        self.produced = 0
        self.streams = 0
        self._lib = lib
        self._code = lib.lzma_code
        self._stream = _Stream()
        self._ref = ctypes.byref(self._stream)
        self._buffer = ctypes.create_string_buffer(block_size)
        self._address = ctypes.addressof(self._buffer)
        self._view = memoryview(self._buffer).cast("B")
        self._zero = bytes(block_size)
        self._index = 0  # of the block in the buffer
        self._in_stream = False
        self._padding = _Padding()
        self._input = b""  # what liblzma reads from: kept alive while it does
        self._stream.next_out = self._address
        self._stream.avail_out = block_size
        self._begin_stream()  # the first stream starts at the first byte, as in XzStreams

    def feed(self, data: bytes) -> Iterator[Block | None]:
        stream = self._stream
        while data:
            if not self._in_stream:
                data = self._padding.strip(data)
                if not data:
                    return
                self._begin_stream()
            self._input = data
            stream.next_in = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
            stream.avail_in = len(data)
            while True:
                ret = self._code(self._ref, LZMA_RUN)
                if stream.avail_out == 0:
                    self.produced = (self._index + 1) * self.block_size
                    yield self._take_block()
                if ret == LZMA_STREAM_END:
                    break
                if ret not in (LZMA_OK, LZMA_NO_CHECK, LZMA_GET_CHECK):
                    raise XzDataError(f"xz data is corrupt: {_message(ret)}")
                if stream.avail_in == 0 and stream.avail_out != 0:
                    self._sync_produced()
                    self._input = b""
                    yield None  # all of ``data`` decoded: ``produced`` is up to date
                    return
            self.streams += 1
            self._in_stream = False
            self._sync_produced()
            data = data[len(data) - stream.avail_in :]
            self._input = b""
            yield None  # the stream's end: ``produced`` is up to date

    def finish(self) -> Iterator[Block]:
        if self._in_stream:
            raise XzDataError(NOT_XZ if self.streams == 0 else TRUNCATED)
        self._padding.finish()
        filled = self.block_size - self._stream.avail_out
        if filled:
            ctypes.memset(self._address + filled, 0, self.block_size - filled)
            block = self._take_block()
            if block is not None:
                yield block

    def close(self) -> None:
        """Free liblzma's decoder (idempotent)."""
        self._lib.lzma_end(self._ref)
        self._in_stream = False

    def _begin_stream(self) -> None:
        """Start decoding a new stream; the output buffer carries on where it was."""
        stream = self._stream
        next_out, avail_out = stream.next_out, stream.avail_out
        ret = self._lib.lzma_stream_decoder(self._ref, MEMLIMIT, 0)
        if ret != LZMA_OK:
            raise XzDataError(f"xz decoder cannot start: {_message(ret)}")
        stream.next_out, stream.avail_out = next_out, avail_out
        self._in_stream = True

    def _take_block(self) -> Block | None:
        """The buffer's block, or None if it is all zero; the next block starts in the buffer."""
        index = self._index
        self._index += 1
        self._stream.next_out = self._address
        self._stream.avail_out = self.block_size
        if self._zero.startswith(self._view):
            return None
        return index, self._view

    def _sync_produced(self) -> None:
        self.produced = self._index * self.block_size + self.block_size - self._stream.avail_out


def _version(lib: ctypes.CDLL) -> str:
    number = int(lib.lzma_version_number())
    return f"{number // 10000000}.{number // 10000 % 1000}.{number // 10 % 1000}"


def _message(ret: int) -> str:
    return _RET_MESSAGES.get(ret, f"liblzma error {ret}")


def decodes_probe(lib: ctypes.CDLL) -> bool:
    """Whether ``lib`` decodes ``PROBE`` to ``PROBE_RAW`` through ``LiblzmaBlocks``."""
    decoder = LiblzmaBlocks(lib, block_size=len(PROBE_RAW) + 3)
    blocks: list[bytes] = []
    try:
        for item in decoder.feed(PROBE):
            if item is not None:
                blocks.append(bytes(item[1]))
        blocks += [bytes(block) for _, block in decoder.finish()]
    except XzDataError:
        return False
    finally:
        decoder.close()
    return blocks == [PROBE_RAW + b"\0\0\0"] and decoder.produced == len(PROBE_RAW)


def block_decoder(step: int, lib: ctypes.CDLL | None) -> BlockDecoder:
    """``LiblzmaBlocks`` on ``lib`` (``load_liblzma()``) if it decodes the probe, else
    ``StdlibBlocks(step)``."""
    if lib is not None and decodes_probe(lib):
        return LiblzmaBlocks(lib)
    return StdlibBlocks(step)
