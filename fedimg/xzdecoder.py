"""The xz decoder child process of ``fedimg.xzproc``: ``python -m fedimg.xzdecoder RAW_SIZE STEP``.

It decodes a single-block image out of the uploading process's GIL: it
reads the compressed file on stdin, decodes it with ``fedimg.xzlib``'s
``block_decoder`` (liblzma straight into 512 KiB EBS blocks; else the
standard library's ``lzma`` in steps of at most ``STEP`` raw bytes, cut into
blocks) and writes to stdout only the non-zero blocks, with their index
(gigabytes of zeros never cross the pipe), then its end report. It imports
nothing but the standard library and two small fedimg modules, so it starts
in about a tenth of a second.

The protocol, on stdout: frames of a ``HEADER`` (kind, a, b), some with a payload.

- ``HELLO`` (a = ``PROTOCOL``, b = ``LIBLZMA`` or ``STDLIB``, the decoder):
  first, once the child runs.
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

import os
import queue
import struct
import sys
import threading
from collections.abc import Iterator
from typing import BinaryIO

from fedimg.xzlib import BlockDecoder, LiblzmaBlocks, XzDataError, block_decoder, load_liblzma

HEADER = struct.Struct("<cQQ")
HELLO, BLOCK, RAW, END, ERROR = b"H", b"B", b"R", b"E", b"X"
PROTOCOL = 1
STDLIB, LIBLZMA = 0, 1  # HELLO's b: the decoder the child uses
READ_SIZE = 1 << 20  # compressed bytes read from stdin at a time, at most
PREFETCH = 8  # pieces of input read ahead, at most (8 MiB: ~0.4 s of decoding)
PROGRESS_BYTES = 8 << 20  # raw bytes between two reports of progress, at most
USAGE = 2  # exit status for bad arguments
MODULE = "fedimg.xzdecoder"  # what ``python -m`` runs


# ---------------------------------------------------------------------------
# The child process


class _Frames:
    """Writes protocol frames to ``out``, each flushed at once."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out

    def send(self, kind: bytes, a: int = 0, b: int = 0, payload: bytes | memoryview = b"") -> None:
        self.out.write(HEADER.pack(kind, a, b))
        if payload:
            self.out.write(payload)
        self.out.flush()


def decode(
    source: BinaryIO,
    frames: _Frames,
    raw_size: int,
    step: int,
    decoder: BlockDecoder | None = None,
) -> None:
    """Decode all of ``source`` into frames: blocks, progress, and END or ERROR.

    ``decoder`` (default: liblzma's, else the standard library's) is closed on the way out.
    """
    blocks = decoder if decoder is not None else block_decoder(step, load_liblzma())
    try:
        _decode(source, frames, raw_size, blocks)
    finally:
        blocks.close()


def _decode(source: BinaryIO, frames: _Frames, raw_size: int, blocks: BlockDecoder) -> None:
    reported = 0
    try:
        for data in _prefetched(source):
            for item in blocks.feed(data):
                produced = blocks.produced
                if produced > raw_size:
                    raise XzDataError(f"decompresses to more than the declared {raw_size} bytes")
                if item is not None:
                    frames.send(BLOCK, item[0], produced, item[1])
                    reported = produced
                elif produced - reported >= PROGRESS_BYTES:
                    frames.send(RAW, 0, produced)
                    reported = produced
    except XzDataError as exc:
        frames.send(ERROR, 0, *_message(exc))
        return
    try:
        last = list(blocks.finish())
        if blocks.produced != raw_size:
            raise XzDataError(f"decompresses to {blocks.produced} bytes, declared {raw_size}")
    except XzDataError as exc:
        frames.send(ERROR, 1, *_message(exc))
        return
    for index, block in last:
        frames.send(BLOCK, index, blocks.produced, block)
    frames.send(END, 0, blocks.produced)


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
    decoder = block_decoder(step, load_liblzma())
    try:
        frames.send(HELLO, PROTOCOL, LIBLZMA if isinstance(decoder, LiblzmaBlocks) else STDLIB)
        decode(sys.stdin.buffer, frames, raw_size, step, decoder)
    except BrokenPipeError:
        # The parent went away or stopped reading: nobody to report to.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
