"""fedimg.priority: a helper thread's nice value is raised, and only that thread's."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

import pytest

from fedimg.priority import BACKGROUND_NICE, background_thread


def nice_of_this_thread() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def in_a_thread(*steps: Callable[[], object]) -> list[object]:
    """Run ``steps`` one after the other in one new thread; what each returned."""
    results: list[object] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.extend(step() for step in steps)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    if errors:
        raise errors[0]
    return results


def test_the_calling_thread_only_gets_the_background_nice_value() -> None:
    mine = nice_of_this_thread()
    assert mine < BACKGROUND_NICE  # else this test would show nothing
    before, raised, after = in_a_thread(nice_of_this_thread, background_thread, nice_of_this_thread)
    assert (before, raised, after) == (mine, True, BACKGROUND_NICE)
    assert nice_of_this_thread() == mine
    assert in_a_thread(nice_of_this_thread) == [mine]  # a new thread starts from the process's


def test_a_nice_value_is_raised_never_lowered() -> None:
    base = nice_of_this_thread()  # 10 under make test's nice -n 10
    assert base <= BACKGROUND_NICE - 3
    results = in_a_thread(
        lambda: background_thread(base + 2),
        nice_of_this_thread,
        lambda: background_thread(base + 1),
        nice_of_this_thread,
        lambda: background_thread(base + 3),
        nice_of_this_thread,
    )
    assert results == [True, base + 2, True, base + 2, True, base + 3]


@pytest.mark.parametrize("nice", [0, -5, 20])
def test_bad_nice_values_are_refused(nice: int) -> None:
    with pytest.raises(ValueError, match="nice must be 1 to 19"):
        background_thread(nice)


def test_elsewhere_than_linux_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    mine = nice_of_this_thread()
    assert in_a_thread(background_thread, nice_of_this_thread) == [False, mine]


def test_a_refused_setpriority_leaves_the_thread_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*_: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    mine = nice_of_this_thread()
    assert in_a_thread(background_thread, nice_of_this_thread) == [False, mine]
