"""The xz decoder child process of ``fedimg.xzproc``: ``python -m fedimg.xzdecoder RAW_SIZE STEP``.

It decodes a single-block image out of the uploading process's GIL: it
reads the compressed file on stdin, decodes it with ``fedimg.xzlib``'s
``block_decoder`` (liblzma straight into 512 KiB EBS blocks; else the
standard library's ``lzma`` in steps of at most ``STEP`` raw bytes, cut into
blocks) and writes to stdout only the non-zero blocks, with their index
(gigabytes of zeros never cross the pipe), then its end report. One thread
does it all: between two decoding steps it moves what the pipes allow, with
buffers of its own (``fedimg.childio``), so that it decodes on while the
parent's threads wait for their GIL. It imports nothing but the standard
library and three small fedimg modules, so it starts in about a tenth of a
second.

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
import struct
import sys

from fedimg.childio import ChildIO
from fedimg.xzlib import BlockDecoder, LiblzmaBlocks, XzDataError, block_decoder, load_liblzma

HEADER = struct.Struct("<cQQ")
HELLO, BLOCK, RAW, END, ERROR = b"H", b"B", b"R", b"E", b"X"
PROTOCOL = 1
STDLIB, LIBLZMA = 0, 1  # HELLO's b: the decoder the child uses
PROGRESS_BYTES = 8 << 20  # raw bytes between two reports of progress, at most
USAGE = 2  # exit status for bad arguments
MODULE = "fedimg.xzdecoder"  # what ``python -m`` runs


# ---------------------------------------------------------------------------
# The child process


def _send(
    io: ChildIO, kind: bytes, a: int = 0, b: int = 0, payload: bytes | memoryview = b""
) -> None:
    io.send(HEADER.pack(kind, a, b), payload)


def decode(io: ChildIO, raw_size: int, decoder: BlockDecoder) -> None:
    """Decode all of ``io``'s input into frames: blocks, progress, and END or ERROR.

    Between two decoding steps ``io`` moves what the pipes allow, so the
    parent's pauses do not stop the decoding (``fedimg.childio``); every frame
    is written before this returns. ``decoder`` is closed on the way out.
    """
    try:
        _decode(io, raw_size, decoder)
    finally:
        decoder.close()
    io.flush()


def _decode(io: ChildIO, raw_size: int, blocks: BlockDecoder) -> None:
    reported = 0
    try:
        while data := io.read():
            for item in blocks.feed(data):
                produced = blocks.produced
                if produced > raw_size:
                    raise XzDataError(f"decompresses to more than the declared {raw_size} bytes")
                if item is not None:
                    _send(io, BLOCK, item[0], produced, item[1])
                    reported = produced
                elif produced - reported >= PROGRESS_BYTES:
                    _send(io, RAW, 0, produced)
                    reported = produced
                io.pump()
    except XzDataError as exc:
        _send(io, ERROR, 0, *_message(exc))
        return
    try:
        last = list(blocks.finish())
        if blocks.produced != raw_size:
            raise XzDataError(f"decompresses to {blocks.produced} bytes, declared {raw_size}")
    except XzDataError as exc:
        _send(io, ERROR, 1, *_message(exc))
        return
    for index, block in last:
        _send(io, BLOCK, index, blocks.produced, block)
    _send(io, END, 0, blocks.produced)


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
    decoder = block_decoder(step, load_liblzma())
    try:
        io = ChildIO(sys.stdin.fileno(), sys.stdout.fileno())
        _send(io, HELLO, PROTOCOL, LIBLZMA if isinstance(decoder, LiblzmaBlocks) else STDLIB)
        decode(io, raw_size, decoder)
    except BrokenPipeError:
        # The parent went away or stopped reading: nobody to report to.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
