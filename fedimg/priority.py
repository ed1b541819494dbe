"""The uploader's helper threads give the CPU to the decoder first.

An upload runs as fast as its decoder: the child process of a single-block
image (``fedimg.xzproc``), or the ``xz-part`` threads of a multi-block one
(``fedimg.xzparallel``). The decoder needs a core for the whole upload. The
other threads of an upload mostly wait, with slack in front of them:

- the block writers wait on the network, 16 of them behind a queue;
- the child's feeder and frame reader wait on pipes, with 32 MiB buffered in
  the child each way.

Each of their many short wake-ups still takes the core from the decoder at
nice 0. ``background_thread`` raises the calling thread's nice value, so the
scheduler runs it when the decoder does not need the core, and seldom
preempts the decoder for it.

Measured with ``benchmarks/upload.py`` (single-block image, moto_server on the
same two cores; the variants interleaved in one process, five rounds, three
runs): median 0.77-0.79x ``xz -dc`` with every thread at nice 0, 0.83x with
the block writers at nice 19, 0.84x with the feeder and the reader too
(docs/performance.md).

Linux sets the nice value of one thread (a task of its own for
``setpriority``). Raising it needs no privilege; a thread cannot lower it
again without one, so only threads that end with their upload call this.
Where the hub runs in a cgroup or session of its own (a systemd service, a
shell's autogroup), the nice value orders the hub's own threads only. It does
nothing on other systems, and never lowers a nice value.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

BACKGROUND_NICE = 19


def background_thread(nice: int = BACKGROUND_NICE) -> bool:
    """Raise this thread's nice value to ``nice`` (never lower it); False where it cannot."""
    if not 0 < nice <= 19:
        raise ValueError(f"nice must be 1 to 19, not {nice}")
    if not sys.platform.startswith("linux"):
        return False  # setpriority(PRIO_PROCESS, tid) would renice the whole process
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:
        log.debug("thread %d keeps its nice value: %s", tid, exc)
        return False
    return True


__all__ = ["BACKGROUND_NICE", "background_thread"]
