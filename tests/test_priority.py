"""fedimg.priority: a helper thread's nice value is raised, and only that thread's."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

import pytest

from fedimg.priority import BACKGROUND_STEP, background_thread


def nice_of_this_thread() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def nice_of_the_process() -> int:
    """The main thread's nice value (its thread id is the process id)."""
    return os.getpriority(os.PRIO_PROCESS, os.getpid())


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


def test_the_calling_thread_only_goes_background_steps_below_the_process() -> None:
    mine = nice_of_this_thread()
    process = nice_of_the_process()
    expected = min(19, process + BACKGROUND_STEP)
    assert expected > process  # 0 in a shell, 10 under make test's nice -n 10
    before, lowered, after = in_a_thread(
        nice_of_this_thread, background_thread, nice_of_this_thread
    )
    assert (before, lowered, after) == (mine, True, expected)
    assert nice_of_this_thread() == mine
    assert in_a_thread(nice_of_this_thread) == [mine]  # a new thread starts from its creator's


def test_it_is_idempotent_and_never_lowers_a_nice_value() -> None:
    process = nice_of_the_process()
    assert process + 5 <= 19
    again = in_a_thread(
        lambda: background_thread(2),
        lambda: background_thread(2),
        nice_of_this_thread,
    )
    assert again == [True, True, process + 2]

    def already_lower() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), process + 5)

    assert in_a_thread(already_lower, lambda: background_thread(2), nice_of_this_thread) == [
        None,
        True,
        process + 5,
    ]


def test_the_nice_value_stops_at_19() -> None:
    assert in_a_thread(lambda: background_thread(19), nice_of_this_thread) == [True, 19]


@pytest.mark.parametrize("step", [0, -5, 20])
def test_bad_steps_are_refused(step: int) -> None:
    with pytest.raises(ValueError, match="step must be 1 to 19"):
        background_thread(step)


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
