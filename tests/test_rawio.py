"""fedimg.rawio.held_back: the last block of an upload comes only after the download checked out."""

from __future__ import annotations

import pytest

from fedimg.rawio import ChecksumMismatch, held_back


def test_every_item_comes_in_order_the_last_after_verify() -> None:
    events: list[object] = []

    def verify() -> None:
        events.append("verified")

    for item in held_back(iter([1, None, 2, None, 3]), verify):
        events.append(item)
    assert events == [None, 1, None, 2, "verified", 3]


def test_a_failed_verify_keeps_the_last_item_back() -> None:
    def verify() -> None:
        raise ChecksumMismatch("http://x/img.raw.xz", "sha256 differs")

    got: list[int | None] = []
    with pytest.raises(ChecksumMismatch):
        for item in held_back(iter([1, 2, 3]), verify):
            got.append(item)
    assert got == [1, 2]


@pytest.mark.parametrize("items", [[], [None, None]])
def test_verify_runs_even_with_nothing_to_hold(items: list[None]) -> None:
    calls: list[bool] = []
    assert list(held_back(iter(items), lambda: calls.append(True))) == items
    assert calls == [True]
