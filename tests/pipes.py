"""Real pipes around code that reads one fd and writes another (the decoder child's ``ChildIO``).

``Pipes`` gives an input pipe and an output pipe; ``feed`` writes bytes into
the input from a thread (then closes it) and ``drain`` reads the output from a
thread until its end. Both threads are joined with a deadline: a test that
would hang fails instead.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable
from types import TracebackType

JOIN_SECONDS = 60.0


class Pipes:
    """Two pipes: the code under test reads ``in_r`` and writes ``out_w``."""

    def __init__(self, pipe_size: int | None = None) -> None:
        self.in_r, self.in_w = os.pipe()
        self.out_r, self.out_w = os.pipe()
        if pipe_size is not None:  # Linux rounds it up to a page
            for fd in (self.in_w, self.out_w):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, pipe_size)
        self.received = bytearray()
        self.fed = 0
        self._threads: list[threading.Thread] = []
        self._open = {self.in_r, self.in_w, self.out_r, self.out_w}
        self._lock = threading.Lock()

    def feed(self, data: bytes) -> None:
        """Write ``data`` into the input from a thread, then close it (its reader may quit)."""

        def run() -> None:
            view = memoryview(data)
            try:
                while view:
                    written = os.write(self.in_w, view)
                    self.fed += written
                    view = view[written:]
            except BrokenPipeError:
                pass
            finally:
                self.close(self.in_w)

        self._start(run)

    def drain(self) -> None:
        """Read the output from a thread until every writer closed it."""

        def run() -> None:
            while chunk := os.read(self.out_r, 1 << 16):
                self.received += chunk
            self.close(self.out_r)

        self._start(run)

    def close(self, fd: int) -> None:
        """Close one of the four ends (once)."""
        with self._lock:
            if fd not in self._open:
                return
            self._open.discard(fd)
        os.close(fd)

    def join(self) -> None:
        """Wait for the threads; AssertionError if one still runs after ``JOIN_SECONDS``."""
        for thread in self._threads:
            thread.join(JOIN_SECONDS)
            assert not thread.is_alive(), f"{thread.name} still running"

    def _start(self, run: Callable[[], None]) -> None:
        thread = threading.Thread(target=run, daemon=True)
        self._threads.append(thread)
        thread.start()

    def __enter__(self) -> Pipes:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for fd in (self.out_w, self.in_r):  # the code under test's ends: its threads end
            self.close(fd)
        self.join()
        for fd in list(self._open):
            self.close(fd)
