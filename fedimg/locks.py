"""One worker at a time per image or AMI, across threads AND processes sharing a state directory.

``Guard.hold(key)`` takes a non-blocking exclusive ``flock`` on
``<state_dir>/locks/<key>.lock``, opened anew for every attempt: Linux binds a
flock to the open file description, so two threads of one process exclude
each other exactly as two processes do. A killed holder releases its locks
with its file descriptors; nothing is ever left to clean up by hand.

``mark(key)`` leaves ``<key>.again`` beside the lock: a worker that found the
key held asks its holder to look again when it lets go (``marked``, ``unmark``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Final

_SAFE: Final = re.compile(r"[^A-Za-z0-9._-]")


class Guard:
    """Non-blocking per-key exclusion; ``hold`` yields True when this caller got the key."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.root = Path(state_dir) / "locks"

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[bool]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path(key, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def _path(self, key: str, suffix: str) -> Path:
        return self.root / f"{_SAFE.sub('_', key)[:200] or '_'}{suffix}"

    def mark(self, key: str) -> None:
        """Ask whoever holds ``key`` to look again once it lets go (``marked``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._path(key, ".again").touch()

    def unmark(self, key: str) -> None:
        self._path(key, ".again").unlink(missing_ok=True)

    def marked(self, key: str) -> bool:
        return self._path(key, ".again").exists()

    def held(self, key: str) -> bool:
        """Whether someone holds ``key`` right now (a snapshot of a moment)."""
        with self.hold(key) as got:
            return not got
