"""Run a producer of byte chunks in a thread of its own, a bounded way ahead of its consumer.

``stream_raw`` wraps its download-and-decompress generator in ``ReadAhead``:
``lzma`` (and hashing, and socket reads) release the GIL, so decompression runs
on one core while the consumer (``upload_snapshot``'s re-blocking and zero
checks) runs on another, instead of taking turns in one thread.

Chunks travel in batches of about ``batch_bytes`` (one queue hand-over per
batch, not per chunk), at most ``depth`` batches ahead. The producer's
exception reaches the consumer after the chunks produced before it, as if it
were iterated directly. ``close()`` stops the producer thread, which closes
the producer itself (a generator may only be closed by the thread running it).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

POLL = 0.5  # seconds between checks of the other side while waiting
STOP_SECONDS = 30.0  # how long close() waits for the producer thread


def drain(items: queue.Queue[Any]) -> None:
    """Take everything out of ``items`` without waiting."""
    while True:
        try:
            items.get_nowait()
        except queue.Empty:
            return


def put_until(items: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    """Queue ``item``, waiting for room; False if ``stop`` was set first."""
    while not stop.is_set():
        try:
            items.put(item, timeout=POLL)
            return True
        except queue.Full:
            continue
    return False


class _End:
    """Queue sentinel: the producer is exhausted."""


_END = _End()
_Item = list[bytes] | BaseException | _End


class ReadAhead(Iterator[bytes]):
    """Iterate ``source`` in a thread of its own, at most ``depth`` batches ahead."""

    def __init__(
        self,
        source: Iterator[bytes],
        *,
        depth: int = 8,
        batch_bytes: int = 1 << 20,
        name: str = "read-ahead",
    ) -> None:
        if depth < 1 or batch_bytes < 1:
            raise ValueError("depth and batch_bytes must be positive")
        self._source = source
        self._batch_bytes = batch_bytes
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._ready: deque[bytes] = deque()
        self._finished = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __iter__(self) -> ReadAhead:
        return self

    def __next__(self) -> bytes:
        while not self._ready:
            if self._finished:
                raise StopIteration
            item = self._take()
            if isinstance(item, _End):
                self._finished = True
            elif isinstance(item, BaseException):
                self._finished = True
                raise item
            else:
                self._ready.extend(item)
        return self._ready.popleft()

    def close(self) -> None:
        """Stop the producer (it closes its source) and wait a bounded time for it."""
        self._finished = True
        self._stop.set()
        self._ready.clear()
        drain(self._queue)  # so a producer blocked on a full queue sees the stop
        if self._thread.is_alive():
            self._thread.join(timeout=STOP_SECONDS)
            if self._thread.is_alive():
                log.warning(
                    "%s: producer still busy %.0f s after close", self._thread.name, STOP_SECONDS
                )

    def _take(self) -> _Item:
        if not self._thread.is_alive() and self._thread.ident is None:
            self._thread.start()
        while True:
            try:
                return self._queue.get(timeout=POLL)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    return RuntimeError(f"{self._thread.name} ended without a result")

    def _put(self, item: _Item) -> bool:
        """Queue ``item``; False if the consumer closed first."""
        return put_until(self._queue, item, self._stop)

    def _run(self) -> None:
        batch: list[bytes] = []
        held = 0
        try:
            for chunk in self._source:
                batch.append(chunk)
                held += len(chunk)
                if held >= self._batch_bytes:
                    if not self._put(batch):
                        return
                    batch, held = [], 0
            if batch and not self._put(batch):
                return
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            if not batch or self._put(batch):
                self._put(exc)
        finally:
            close = getattr(self._source, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:
                    log.exception("%s: closing the producer failed", self._thread.name)
