"""The uploader's helper threads give the CPU to the decoder first.

An upload runs as fast as its decoder: the child process of a single-block
image (``fedimg.xzproc``), or the ``xz-part`` threads of a multi-block one
(``fedimg.xzparallel``). The decoder needs a core for the whole upload. The
other threads of an upload mostly wait, with slack in front of them:

- the block writers wait on the network, 16 of them behind a queue;
- the child's feeder and frame reader wait on pipes, with 32 MiB buffered in
  the child each way.

Each of their many short wake-ups still takes the core from the decoder when
they run at its priority. ``background_thread`` lowers the calling thread's
priority: its nice value becomes the process's (its main thread's) plus
``BACKGROUND_STEP``, at most 19. A thread at a tenth of the decoder's weight
seldom preempts it, and runs when the decoder does not need the core.

Measured with ``benchmarks/upload.py`` (single-block image, moto_server on the
same two cores; the variants interleaved in one process, five rounds each):
median 0.77-0.79x ``xz -dc`` with every thread at the process's nice value;
0.79x with these threads 5 levels lower; 0.83x 10 levels lower; 0.83-0.84x at
19 (docs/performance.md). Ten levels rather than nineteen, for the same gain:
once its buffers are full, a decoder waits for these threads, and CPU-bound
work elsewhere in the hub's cgroup would then hold the whole upload back seven
times more at 19 (nice 19 weighs 15, nice 10 weighs 110, nice 0 1024).

Linux sets the nice value of one thread (a task of its own for
``setpriority``). Raising it needs no privilege; a thread cannot lower it
again without one, so only threads that end with their upload call this.
Where the hub runs in a cgroup or session of its own (a systemd service, a
shell's autogroup), the nice values order the hub's own threads only. It does
nothing on other systems, and never lowers a nice value.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

BACKGROUND_STEP = 10
MAX_NICE = 19


def background_thread(step: int = BACKGROUND_STEP) -> bool:
    """This thread's nice value: the process's plus ``step`` (at most 19, never lowered).

    False where it cannot be set (not Linux, or refused). Idempotent.
    """
    if not 0 < step <= MAX_NICE:
        raise ValueError(f"step must be 1 to {MAX_NICE}, not {step}")
    if not sys.platform.startswith("linux"):
        return False  # setpriority(PRIO_PROCESS, tid) would renice the whole process
    tid = threading.get_native_id()
    try:
        target = min(MAX_NICE, os.getpriority(os.PRIO_PROCESS, os.getpid()) + step)
        if os.getpriority(os.PRIO_PROCESS, tid) < target:
            os.setpriority(os.PRIO_PROCESS, tid, target)
    except OSError as exc:
        log.debug("thread %d keeps its nice value: %s", tid, exc)
        return False
    return True


__all__ = ["BACKGROUND_STEP", "background_thread"]
