"""glibc's malloc in a long-running, threaded uploader: a bounded number of arenas.

glibc gives threads that allocate arenas of their own, up to eight per core
(16 on two cores). Memory freed in one arena serves later allocations in that
arena only, and is mostly kept. Every upload starts new threads (16 block
writers, the xz workers, a feeder and a reader), which spread their blocks over
many arenas; a worker process doing upload after upload keeps the sum of each
arena's high-water mark. Measured with ``benchmarks/upload.py`` (multi-block
image, fake AWS, eight uploads in one process): peak RSS 232 MiB with glibc's
default, 166 MiB with two arenas, at the same speed (docs/performance.md).

``limit_arenas`` asks glibc for at most ``ARENAS`` arenas, once per process,
before the first upload starts its threads (``upload_snapshot`` calls it).
glibc applies the limit to arenas created afterwards. It does nothing where
there is no glibc, or when ``MALLOC_ARENA_MAX`` is in the environment (the
operator's setting, which glibc applied at start-up, wins).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

log = logging.getLogger(__name__)

ARENAS = 2
M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
ENV = "MALLOC_ARENA_MAX"

_lock = threading.Lock()
_done: list[bool] = []  # [applied?] once asked


def limit_arenas(count: int = ARENAS) -> bool:
    """At most ``count`` malloc arenas from now on; True if glibc took the limit (asked once)."""
    if count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    with _lock:
        if _done:
            return _done[0]
        applied = _apply(count)
        _done.append(applied)
    if applied:
        log.info("malloc arenas limited to %d for this process", count)
    return applied


def _apply(count: int) -> bool:
    if ENV in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no libc found, or not glibc's
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, count))


__all__ = ["ARENAS", "limit_arenas"]
