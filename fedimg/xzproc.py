"""Decode a single-block xz image in a child process, out of the uploading process's GIL.

``stream_raw`` returns a ``ChildRaw`` for an image of one xz block (the
output of any single-threaded xz) of at least ``fedimg.download.CHILD_MIN_RAW``
raw bytes; ``upload_snapshot`` consumes it as a ``BlockSource``. Decoding
such a file is one thread's work whatever the number of cores; in the
uploading process that thread had to win the GIL back from the re-blocking
thread and 16 botocore writers each time it came back from ``lzma``. Here:

- a feeder thread downloads the file once (the caller's ``pieces``: the
  HTTP stream with its resumes, or the spool of a server that ignored
  Range), hashes it in file order and writes it to the child's stdin;
- the child (``python -m fedimg.xzdecoder``: liblzma, else the standard
  library's ``lzma``; started with ``subprocess``, never a fork of this threaded
  process) decodes it and writes back only the non-zero 512 KiB EBS blocks
  with their index, and its end report (``fedimg.xzdecoder`` describes the
  frames);
- a reader thread takes the frames off the pipe into a bounded queue
  (``FRAMES_AHEAD``), and the calling thread hands the blocks on, waiting at
  most ``POLL`` seconds at a time (yielding None meanwhile, so
  ``upload_snapshot`` reports progress and checks its deadline). The last
  block is held back until the child reported the exact raw size and the
  sha256 matched (else ``ChecksumMismatch``): an upload can never complete
  on a bad download.

Feeding and reading are different threads, so neither pipe can fill up
against the other. Memory, whatever the image: one download piece, the
pipes (``PIPE_SIZE`` each), ``FRAMES_AHEAD`` blocks, and in the child its
decoder (the dictionary, 8 MiB at ``xz -6``), one block (or step), and at most
32 MiB of input read ahead and 32 MiB of frames not yet written
(``fedimg.childio``: the child decodes on through this process's pauses).
The child is always reaped: it exits at the end of its input; ``close()``
(which ``upload_snapshot`` calls on any failure, and the ``blocks()``
generator on its way out) kills it if it still runs and waits for it. If
this process dies instead, the child sees its input end or its output
closed, and exits.

A child that cannot start (no interpreter, no ``HELLO`` within
``START_SECONDS``) costs one warning: ``fallback`` (the in-process path) is
used instead. Errors are those of the in-process path: ``CorruptImage``,
``ChecksumMismatch``, ``DownloadError``, each carrying the URL.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import queue
import select
import site
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import IO

from fedimg.ebsblocks import BLOCK_SIZE, Reblocker
from fedimg.priority import background_thread
from fedimg.rawio import (
    ChecksumMismatch,
    CorruptImage,
    DownloadError,
    Spool,
    check_sha256,
    held_back,
)
from fedimg.readahead import drain, put_until
from fedimg.snapshot import BlockSource
from fedimg.xzdecoder import BLOCK, END, ERROR, HEADER, HELLO, LIBLZMA, MODULE, PROTOCOL, RAW

log = logging.getLogger(__name__)

START_SECONDS = 30.0  # for the child's HELLO; a loaded machine is slow to start Python
POLL = 0.5  # seconds between checks for a failure (and a None for the caller) while waiting
STOP_SECONDS = 30.0  # how long close() waits for the child and the feeder
PIPE_SIZE = 1 << 20  # asked for both pipes (Linux; fewer wake-ups per 512 KiB block)
MAX_MESSAGE = 4096  # bytes of an ERROR frame's message read, at most
FRAMES_AHEAD = 8  # frames read from the child and not yet taken, at most (4 MiB of blocks)

_Frame = tuple[bytes, int, int, bytes]  # kind, a, b, payload


class _ChildGone(Exception):
    """The child's output ended (it exited or was killed)."""


def child_env() -> dict[str, str]:
    """The child's environment: this one, with this fedimg first on its module path.

    Not for an installed fedimg (its directory is site-packages, which must
    not come before the standard library): the child finds it as this process did.
    """
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    installed = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if root not in installed:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    return env


class ChildRaw:
    """The raw image of a one-block xz file as non-zero EBS blocks (a ``BlockSource``)."""

    def __init__(
        self,
        url: str,
        sha256: str,
        raw_size: int,
        pieces: Callable[[], Iterator[bytes]],
        *,
        fallback: Callable[[], Iterable[bytes] | BlockSource],
        step: int,
        spool: Spool | None = None,
        log_context: str = "",
        command: list[str] | None = None,
    ) -> None:
        self._expected = check_sha256(sha256)
        if raw_size < 1 or step < 1:
            raise ValueError(f"raw_size and step must be positive, not {raw_size} and {step}")
        self.url = url
        self.raw_size = raw_size
        self.step = step
        self.spool = spool
        self.log_context = log_context
        self.command = command or [sys.executable, "-m", MODULE]
        self.pid = 0  # the child's, once started
        self.decoder = ""  # what the child decodes with, once started: "liblzma" or "lzma"
        self._pieces = pieces
        self._fallback = fallback
        self._fallback_source: Iterable[bytes] | BlockSource | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._feeder: threading.Thread | None = None
        self._reader: threading.Thread | None = None
        self._frames: queue.Queue[_Frame | BaseException] = queue.Queue(maxsize=FRAMES_AHEAD)
        self._stop = threading.Event()
        self._raw = 0
        self._digest = ""  # of the compressed file, once fed whole
        self._compressed = 0
        self._error: BaseException | None = None  # the feeder's

    @property
    def raw_done(self) -> int:
        source = self._fallback_source
        if isinstance(source, BlockSource):
            return source.raw_done
        return self._raw

    @property
    def returncode(self) -> int | None:
        """The child's exit status once reaped (negative: killed by that signal)."""
        return None if self._proc is None else self._proc.returncode

    def blocks(self) -> Generator[tuple[int, bytes] | None, None, None]:
        """Non-zero (index, block) pairs in disk order; None while waiting."""
        try:
            if self._start():
                yield from self._from_child()
            else:
                yield from self._in_process()
        finally:
            self.close()

    def close(self) -> None:
        """Stop the child (killed if still running, always reaped) and the feeder; idempotent."""
        if self._stop.is_set():  # set only here
            return
        self._stop.set()
        self._end_child()
        drain(self._frames)  # so a reader blocked on a full queue sees the stop
        for thread in (self._feeder, self._reader):
            if thread is not None:
                thread.join(timeout=STOP_SECONDS)
                if thread.is_alive():
                    log.warning("%s: %s: %s still busy", self.log_context, self.url, thread.name)
        self._close_pipes()
        source = self._fallback_source
        close = getattr(source, "close", None)
        if callable(close):
            close()
        if self.spool is not None:
            self.spool.close()

    # -- start-up -----------------------------------------------------------

    def _start(self) -> bool:
        """Start the child and wait for its HELLO; False (and a warning) if it cannot run."""
        command = [*self.command, str(self.raw_size), str(self.step)]
        try:
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module, no shell
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,
                env=child_env(),
            )
        except OSError as exc:
            self._warn_fallback(f"cannot start it: {exc}")
            return False
        self._proc = proc
        self.pid = proc.pid
        for pipe in (proc.stdin, proc.stdout):
            _grow_pipe(pipe)
        try:
            kind, version, decoder = self._header(time.monotonic() + START_SECONDS)
        except (_ChildGone, TimeoutError) as exc:
            self._warn_fallback(f"no HELLO from process {proc.pid}: {exc}")
            self._end_child()
            self._close_pipes()
            return False
        if kind != HELLO or version != PROTOCOL:
            raise DownloadError(self.url, f"xz decoder process said {kind!r} {version}, not HELLO")
        self.decoder = "liblzma" if decoder == LIBLZMA else "lzma"
        log.info(
            "%s: decoding %s in xz decoder process %d (%s, %d bytes raw)",
            self.log_context,
            self.url,
            proc.pid,
            self.decoder,
            self.raw_size,
        )
        return True

    def _warn_fallback(self, reason: str) -> None:
        log.warning(
            "%s: %s: no xz decoder process (%s); decoding in this process",
            self.log_context,
            self.url,
            reason,
        )

    def _end_child(self) -> None:
        """Kill the child if it still runs, and reap it (a bounded wait)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            log.error(
                "%s: %s: xz decoder process %d still running %.0f s after SIGKILL",
                self.log_context,
                self.url,
                proc.pid,
                STOP_SECONDS,
            )

    def _close_pipes(self) -> None:
        if self._proc is not None:
            for pipe in (self._proc.stdin, self._proc.stdout):
                _close_quietly(pipe)

    # -- the fallback -------------------------------------------------------

    def _in_process(self) -> Iterator[tuple[int, bytes] | None]:
        source = self._fallback_source = self._fallback()
        if isinstance(source, BlockSource):
            yield from source.blocks()
            return
        reblocker = Reblocker()
        for chunk in source:
            self._raw += len(chunk)
            yield from reblocker.push(chunk)
            yield None  # progress
        yield from reblocker.finish()

    # -- the child ----------------------------------------------------------

    def _from_child(self) -> Iterator[tuple[int, bytes] | None]:
        self._feeder = threading.Thread(target=self._feed, name="xz-feeder", daemon=True)
        self._reader = threading.Thread(target=self._read_frames, name="xz-frames", daemon=True)
        self._feeder.start()
        self._reader.start()
        return held_back(self._child_blocks(), self._verify)

    def _child_blocks(self) -> Iterator[tuple[int, bytes] | None]:
        """The blocks of the child's frames (None for progress or waiting), up to its END."""
        while True:
            self._raise_if_feeder_failed()
            try:
                frame = self._frames.get(timeout=POLL)
            except queue.Empty:
                yield None
                continue
            if isinstance(frame, BaseException):
                raise frame
            kind, a, b, payload = frame
            if kind == BLOCK:
                self._raw = b
                yield a, payload
            elif kind == RAW:
                self._raw = b
                yield None
            elif kind == END:
                self._raw = b
                return
            elif kind == ERROR:
                self._fail(at_end=bool(a), message=payload)
            else:
                raise DownloadError(self.url, f"xz decoder process sent a frame {kind!r}")

    def _read_frames(self) -> None:
        """The reader thread: the child's frames into a bounded queue, until END or ERROR.

        It keeps the pipe drained while the calling thread waits for the GIL
        or for a writer, so the child seldom waits to write.
        """
        background_thread()  # the child first: its 32 MiB buffer waits for this thread
        try:
            while not self._stop.is_set():
                kind, a, b = self._frame_header()
                size = BLOCK_SIZE if kind == BLOCK else min(b, MAX_MESSAGE) if kind == ERROR else 0
                frame = (kind, a, b, self._read(size) if size else b"")
                if not put_until(self._frames, frame, self._stop) or kind not in (BLOCK, RAW):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put_until(self._frames, exc, self._stop)

    def _feed(self) -> None:
        """The feeder thread: the compressed file, hashed in order, into the child's stdin."""
        background_thread()  # the child first: it reads 32 MiB ahead of this thread
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        stdin = proc.stdin
        digest = hashlib.sha256()
        pieces = self._pieces()
        try:
            for piece in pieces:
                if self._stop.is_set():
                    return
                digest.update(piece)
                self._compressed += len(piece)
                if not _write_all(stdin, piece):
                    return  # the child is gone: its frames (or their absence) say why
            self._digest = digest.hexdigest()
            stdin.close()
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._error = exc
        finally:
            close = getattr(pieces, "close", None)
            if callable(close):
                close()

    def _raise_if_feeder_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _fail(self, *, at_end: bool, message: bytes) -> None:
        """The child's ERROR: a bad download explains an error at the end better."""
        if at_end:
            self._wait_for_feeder()
            self._check_digest()
        raise CorruptImage(self.url, message.decode("utf-8", "replace"))

    def _verify(self) -> None:
        self._wait_for_feeder()
        self._check_digest()
        if self._raw != self.raw_size:  # the child checked it; a bad frame would be a bug
            raise CorruptImage(
                self.url, f"decompresses to {self._raw} bytes, declared {self.raw_size}"
            )
        proc = self._proc
        assert proc is not None
        try:
            status = proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            status = None
        if status != 0:
            raise DownloadError(self.url, f"xz decoder process {proc.pid} ended with {status}")
        log.info(
            "%s: downloaded %s: %d bytes compressed, %d raw (xz decoder process %d), sha256 ok",
            self.log_context,
            self.url,
            self._compressed,
            self._raw,
            proc.pid,
        )

    def _wait_for_feeder(self) -> None:
        """The feeder is done once the child reported the end of its input; wait for it."""
        feeder = self._feeder
        assert feeder is not None
        feeder.join(timeout=STOP_SECONDS)
        self._raise_if_feeder_failed()
        if feeder.is_alive() or not self._digest:
            raise DownloadError(self.url, "the xz decoder process ended before its input")

    def _check_digest(self) -> None:
        if self._digest != self._expected:
            raise ChecksumMismatch(self.url, f"sha256 is {self._digest}, expected {self._expected}")

    # -- reading frames -----------------------------------------------------

    def _readable(self, timeout: float) -> bool:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        return bool(ready)

    def _header(self, deadline: float) -> tuple[bytes, int, int]:
        """The next frame's header, waiting until ``deadline`` (TimeoutError) for it to start."""
        while not self._readable(max(0.0, min(POLL, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing within {START_SECONDS:.0f} s")
        return self._frame_header()

    def _frame_header(self) -> tuple[bytes, int, int]:
        kind, a, b = HEADER.unpack(self._read(HEADER.size))
        return kind, a, b

    def _read(self, size: int) -> bytes:
        """Exactly ``size`` bytes of the child's output (the child writes a frame at once)."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            n = proc.stdout.readinto(view[got:])  # type: ignore[attr-defined]
            if not n:
                raise self._gone(got, size)
            got += n
        return bytes(buffer)

    def _gone(self, got: int, size: int) -> BaseException:
        """The error for a child whose output ended in the middle of (or before) a frame."""
        proc = self._proc
        assert proc is not None
        try:
            status: int | None = proc.wait(timeout=POLL)
        except subprocess.TimeoutExpired:
            status = None
        if self._feeder is None:
            return _ChildGone(f"exit status {status}")
        if self._error is not None:
            return self._error
        return DownloadError(
            self.url,
            f"xz decoder process {proc.pid} ended (status {status}) {got} bytes into a "
            f"frame of {size}, before its end report",
        )


def _grow_pipe(pipe: IO[bytes] | None) -> None:
    """Ask for a larger pipe buffer (Linux only); the default is kept if refused."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if pipe is None or set_size is None:
        return
    try:
        fcntl.fcntl(pipe.fileno(), set_size, PIPE_SIZE)
    except OSError:
        pass


def _write_all(pipe: IO[bytes], data: bytes) -> bool:
    """Write all of ``data`` to an unbuffered pipe; False if its reader is gone or it was closed."""
    view = memoryview(data)
    try:
        while view:
            view = view[pipe.write(view) :]
    except (BrokenPipeError, ValueError):  # ValueError: close() closed it meanwhile
        return False
    return True


def _close_quietly(pipe: IO[bytes] | None) -> None:
    if pipe is None:
        return
    try:
        pipe.close()
    except OSError:
        pass


def spool_pieces(spool: Spool, size: int = 1 << 20) -> Iterator[bytes]:
    """The spooled file in order, ``size`` bytes at a time."""
    for offset in range(0, spool.size, size):
        yield spool.read(offset, min(size, spool.size - offset))
