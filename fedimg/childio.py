"""The xz decoder child's stdin and stdout: non-blocking, each with a bounded buffer.

The decoder child (``fedimg.xzdecoder``) is the critical path of a
single-block upload: the upload can go no faster than one core decodes. Its
parent reads the compressed file into the child's stdin and the blocks out
of its stdout from Python threads that wait for their GIL (16 botocore
writers hold it in turn) and for a core. With blocking pipes of 1 MiB, every
such pause stopped the decoder: its output pipe was full (two blocks), or its
input pipe was empty.

Here the one decoding thread also moves the data, between two decoding steps
(``pump``: what the pipes take and give at once, never waiting). It waits
(``select``) only when it has no input left at all, or when more than
``out_limit`` bytes wait to be written. So it decodes through the parent's
pauses, up to ``in_limit`` bytes read ahead and ``out_limit`` written behind;
and no second thread of the child competes for its GIL.

A frame the pipe takes at once is never copied; what it does not take is
copied once into the buffer (the decoder reuses its block buffer).
``BrokenPipeError`` (the parent went away) reaches the caller of ``send``,
``pump`` or ``flush``.
"""

from __future__ import annotations

import os
import select
from collections import deque

READ_SIZE = 1 << 20  # bytes read from stdin at a time, at most (a full pipe)
IN_LIMIT = 32 << 20  # compressed bytes read ahead, at most (~1.5 s of decoding at xz -6)
OUT_LIMIT = 32 << 20  # bytes of frames waiting to be written, at most (64 blocks)


class ChildIO:
    """Two pipe ends made non-blocking; ``in_limit`` and ``out_limit`` bytes buffered, at most."""

    def __init__(
        self,
        in_fd: int,
        out_fd: int,
        *,
        in_limit: int = IN_LIMIT,
        out_limit: int = OUT_LIMIT,
        read_size: int = READ_SIZE,
    ) -> None:
        if min(in_limit, out_limit, read_size) < 1:
            raise ValueError("limits and read size must be positive")
        self.in_fd, self.out_fd = in_fd, out_fd
        self.in_limit, self.out_limit, self.read_size = in_limit, out_limit, read_size
        os.set_blocking(in_fd, False)
        os.set_blocking(out_fd, False)
        self._input: deque[bytes] = deque()
        self._in_bytes = 0
        self._eof = False
        self._output: deque[memoryview] = deque()
        self._out_bytes = 0

    @property
    def buffered(self) -> tuple[int, int]:
        """(input bytes read ahead, output bytes not yet written)."""
        return self._in_bytes, self._out_bytes

    def read(self) -> bytes:
        """The next piece of input, at most ``read_size`` bytes; b"" at its end.

        Waits only when nothing is buffered (writing meanwhile what it can).
        """
        while not self._input:
            self._pull()
            if self._input or self._eof:
                break
            self._wait()
        if not self._input:
            return b""
        piece = self._input.popleft()
        self._in_bytes -= len(piece)
        return piece

    def send(self, header: bytes, payload: bytes | memoryview = b"") -> None:
        """Queue one frame (``header`` then ``payload``) behind those not yet written.

        Written at once as far as the pipe takes it; the rest is copied. Waits
        while more than ``out_limit`` bytes are buffered (reading meanwhile).
        """
        written = 0
        if not self._output:
            try:
                written = os.writev(self.out_fd, [header, payload])
            except BlockingIOError:
                written = 0
        if written < len(header):
            self._queue(memoryview(header)[written:])
            if payload:
                self._queue(memoryview(bytes(payload)))
        elif written < len(header) + len(payload):
            self._queue(memoryview(bytes(memoryview(payload)[written - len(header) :])))
        while self._out_bytes > self.out_limit:
            self._wait()

    def pump(self) -> None:
        """Write what the output pipe takes and read what the input pipe holds; never waits."""
        self._push()
        self._pull()

    def flush(self) -> None:
        """Wait until every frame is written."""
        while self._output:
            select.select([], [self.out_fd], [])
            self._push()

    # -- internals ----------------------------------------------------------

    def _queue(self, view: memoryview) -> None:
        self._output.append(view)
        self._out_bytes += len(view)

    def _pull(self) -> None:
        while not self._eof and self._in_bytes < self.in_limit:
            try:
                piece = os.read(self.in_fd, self.read_size)
            except BlockingIOError:
                return
            if not piece:
                self._eof = True
                return
            self._input.append(piece)
            self._in_bytes += len(piece)

    def _push(self) -> None:
        while self._output:
            head = self._output[0]
            try:
                written = os.write(self.out_fd, head)
            except BlockingIOError:
                return
            self._out_bytes -= written
            if written < len(head):
                self._output[0] = head[written:]
                return
            self._output.popleft()

    def _wait(self) -> None:
        """Wait until input can be read (if there is room for it) or output written."""
        readable = [self.in_fd] if not self._eof and self._in_bytes < self.in_limit else []
        writable = [self.out_fd] if self._output else []
        if not readable and not writable:
            raise AssertionError("nothing to wait for")  # pragma: no cover - callers check
        select.select(readable, writable, [])
        self.pump()


__all__ = ["IN_LIMIT", "OUT_LIMIT", "READ_SIZE", "ChildIO"]
