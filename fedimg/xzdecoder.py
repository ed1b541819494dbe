"""Decode xz streams, in this process or as the decoder child process of ``fedimg.xzproc``.

``XzStreams`` decompresses concatenated xz streams with stream padding, a
bounded output per step (``fedimg.download`` streams with it too).

Run as ``python -m fedimg.xzdecoder RAW_SIZE STEP``, this module is the child
process that decodes a single-block image out of the uploading process's
GIL: it reads the compressed file on stdin, decodes it in steps of at most
``STEP`` raw bytes, cuts the output into 512 KiB EBS blocks and writes to
stdout only the non-zero ones, with their index (gigabytes of zeros never
cross the pipe), then its end report. It imports nothing but the standard
library and ``fedimg.ebsblocks``, so it starts in about a tenth of a second.

The protocol, on stdout: frames of a ``HEADER`` (kind, a, b), some with a payload.

- ``HELLO`` (a = ``PROTOCOL``): first, once the child runs.
- ``BLOCK`` (a = block index, b = raw bytes decoded so far) + 512 KiB of data.
- ``RAW`` (b = raw bytes decoded so far): at least every ``PROGRESS_BYTES``.
- ``END`` (b = raw bytes decoded): the input ended cleanly as exactly
  ``RAW_SIZE`` raw bytes; last frame.
- ``ERROR`` (a = 1 if found at the end of the input, else 0; b = length) +
  the message, UTF-8: corrupt data, more raw bytes than ``RAW_SIZE`` (both
  found mid-stream), a truncated stream or fewer raw bytes (at the end); last frame.

The child checks nothing else: the sha256 of the compressed bytes is the
parent's, which holds back the last block until it matches. A parent that
goes away closes both pipes: the child then reads the end of its input or
fails to write, and exits.
"""

from __future__ import annotations

import lzma
import os
import queue
import struct
import sys
import threading
from collections.abc import Iterator
from typing import BinaryIO

from fedimg.ebsblocks import Reblocker

HEADER = struct.Struct("<cQQ")
HELLO, BLOCK, RAW, END, ERROR = b"H", b"B", b"R", b"E", b"X"
PROTOCOL = 1
READ_SIZE = 1 << 20  # compressed bytes read from stdin at a time, at most
PREFETCH = 8  # pieces of input read ahead, at most (8 MiB: ~0.4 s of decoding)
PROGRESS_BYTES = 8 << 20  # raw bytes between two reports of progress, at most
USAGE = 2  # exit status for bad arguments
MODULE = "fedimg.xzdecoder"  # what ``python -m`` runs


class XzDataError(ValueError):
    """The data is not a valid xz file of the declared size (the message says how)."""


class XzStreams:
    """Decompresses concatenated xz streams with padding, at most ``max_length`` per step."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self._dec: lzma.LZMADecompressor | None = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        self._padding = 0  # zero bytes seen since the last stream ended
        self.streams = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Yield the raw output for compressed ``data`` (each piece <= max_length)."""
        while data:
            if self._dec is None:
                stripped = data.lstrip(b"\0")
                self._padding += len(data) - len(stripped)
                if not stripped:
                    return
                if self._padding % 4:
                    raise XzDataError("xz stream padding is not a multiple of 4")
                self._padding = 0
                self._dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
                data = stripped
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
            if self.streams == 0:
                raise XzDataError("not an xz file, or it ends before its first stream")
            raise XzDataError("xz stream is truncated")
        if self._padding % 4:
            raise XzDataError("xz stream padding is not a multiple of 4")


# ---------------------------------------------------------------------------
# The child process


class _Frames:
    """Writes protocol frames to ``out``, each flushed at once."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out

    def send(self, kind: bytes, a: int = 0, b: int = 0, payload: bytes = b"") -> None:
        self.out.write(HEADER.pack(kind, a, b))
        if payload:
            self.out.write(payload)
        self.out.flush()


def decode(source: BinaryIO, frames: _Frames, raw_size: int, step: int) -> None:
    """Decode all of ``source`` into frames: blocks, progress, and END or ERROR."""
    xz = XzStreams(step)
    reblocker = Reblocker()
    produced = 0
    reported = 0
    try:
        for data in _prefetched(source):
            for out in xz.feed(data):
                produced += len(out)
                if produced > raw_size:
                    raise XzDataError(f"decompresses to more than the declared {raw_size} bytes")
                for index, block in reblocker.push(out):
                    frames.send(BLOCK, index, produced, block)
                    reported = produced
                if produced - reported >= PROGRESS_BYTES:
                    frames.send(RAW, 0, produced)
                    reported = produced
    except XzDataError as exc:
        frames.send(ERROR, 0, *_message(exc))
        return
    try:
        xz.finish()
        if produced != raw_size:
            raise XzDataError(f"decompresses to {produced} bytes, declared {raw_size}")
    except XzDataError as exc:
        frames.send(ERROR, 1, *_message(exc))
        return
    for index, block in reblocker.finish():
        frames.send(BLOCK, index, produced, block)
    frames.send(END, 0, produced)


def _prefetched(source: BinaryIO) -> Iterator[bytes]:
    """The pieces of ``source``, read ahead by a thread: up to ``PREFETCH`` pieces.

    The parent writes the input from a thread that competes for its GIL and
    its core; reading ahead here keeps this process decoding through the
    parent's pauses instead of waiting on an empty pipe.
    """
    pieces: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=PREFETCH)
    read = source.read1 if hasattr(source, "read1") else source.read

    def reader() -> None:
        try:
            while data := read(READ_SIZE):
                pieces.put(data)
            pieces.put(b"")
        except BaseException as exc:  # noqa: BLE001 - raised by the decoding thread
            pieces.put(exc)

    threading.Thread(target=reader, name="xz-input", daemon=True).start()
    while True:
        item = pieces.get()
        if isinstance(item, BaseException):
            raise item
        if not item:
            return
        yield item


def _message(exc: XzDataError) -> tuple[int, bytes]:
    text = str(exc).encode("utf-8", "replace")
    return len(text), text


def main(argv: list[str]) -> int:
    """The child: ``argv`` is [RAW_SIZE, STEP]; stdin and stdout are the pipes."""
    try:
        raw_size, step = (int(arg) for arg in argv)
        if raw_size < 1 or step < 1:
            raise ValueError
    except ValueError:
        print(f"usage: python -m {MODULE} RAW_SIZE STEP (positive)", file=sys.stderr)
        return USAGE
    frames = _Frames(sys.stdout.buffer)
    try:
        frames.send(HELLO, PROTOCOL)
        decode(sys.stdin.buffer, frames, raw_size, step)
    except BrokenPipeError:
        # The parent went away or stopped reading: nobody to report to.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
