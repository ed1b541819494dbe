"""fedimg.arenas: glibc keeps to the arena limit, in a fresh interpreter each time.

glibc's ``malloc_stats()`` prints one "Arena N:" section per arena: a process
whose twelve threads allocate at once has many arenas, and at most two once
``limit_arenas(2)`` ran first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedimg import arenas

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import ctypes, sys, threading
from fedimg.arenas import limit_arenas
if sys.argv[1] == "limit":
    print(limit_arenas(2), flush=True)
held, barrier = [], threading.Barrier(12)
def allocate():
    held.append(bytearray(300_000))  # malloc'd in this thread's arena
    barrier.wait(timeout=60)
threads = [threading.Thread(target=allocate) for _ in range(12)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
ctypes.CDLL(None).malloc_stats()  # to stderr
"""


def arena_count(mode: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """(arenas glibc reports, what the script printed) for one fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env or {k: v for k, v in os.environ.items() if k != arenas.ENV},
        check=True,
    )
    return done.stderr.count("Arena "), done.stdout.strip()


def test_the_limit_holds_where_threads_would_make_many_arenas() -> None:
    many, _ = arena_count("none")
    limited, said = arena_count("limit")
    assert many > 2, "without the limit, twelve allocating threads use more arenas"
    assert said == "True" and 1 <= limited <= 2


def test_an_operators_malloc_arena_max_wins() -> None:
    env = {**os.environ, arenas.ENV: "4"}
    count, said = arena_count("limit", env)
    assert said == "False" and count <= 4


def test_asked_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def apply(count: int) -> bool:
        calls.append(count)
        return True

    monkeypatch.setattr(arenas, "_done", [])
    monkeypatch.setattr(arenas, "_apply", apply)
    assert arenas.limit_arenas(3) and arenas.limit_arenas(3)
    assert calls == [3]


def test_the_count_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        arenas.limit_arenas(0)
