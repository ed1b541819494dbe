"""fedimg.childio: the decoder child's non-blocking pipes, on real pipes (tests/pipes.py).

What matters: frames arrive whole and in order whatever the pipe takes at a
time; the decoding thread never waits on a full pipe while its buffer has
room, nor on an empty one while it has input read ahead; the limits hold; a
reader that went away is a ``BrokenPipeError``.
"""

from __future__ import annotations

import os
import random

import pytest

from fedimg.childio import ChildIO
from tests.pipes import Pipes

PAGE = 4096


def frames(count: int, seed: int = 0) -> list[tuple[bytes, bytes]]:
    """(header, payload) pairs of varied sizes, some without payload."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        size = rng.choice([0, 1, 100, PAGE - 3, PAGE, 3 * PAGE + 7, 512 * 1024])
        out.append((n.to_bytes(4, "big") * 5 + b"h", rng.randbytes(size)))
    return out


def joined(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(header + payload for header, payload in pairs)


@pytest.mark.parametrize("out_limit", [1, PAGE, 64 * 1024 * 1024])
def test_frames_arrive_whole_and_in_order(out_limit: int) -> None:
    sent = frames(40)
    with Pipes(pipe_size=PAGE) as pipes:  # a small pipe: writes are partial
        pipes.drain()
        io = ChildIO(pipes.in_r, pipes.out_w, out_limit=out_limit)
        for header, payload in sent:
            io.send(header, memoryview(payload))
        io.flush()
        assert io.buffered == (0, 0)
    assert bytes(pipes.received) == joined(sent)


def test_a_full_pipe_does_not_stop_the_sender_while_its_buffer_has_room() -> None:
    sent = frames(30, seed=1)
    total = len(joined(sent))
    with Pipes(pipe_size=PAGE) as pipes:
        io = ChildIO(pipes.in_r, pipes.out_w, out_limit=total)
        for header, payload in sent:  # nobody reads yet: a blocking write would hang here
            io.send(header, payload)
        assert 0 < io.buffered[1] <= total
        pipes.drain()
        io.flush()
    assert bytes(pipes.received) == joined(sent)


def test_a_payload_is_copied_when_the_pipe_does_not_take_it() -> None:
    """The decoder reuses its block buffer: what waits in the buffer must be a copy."""
    block = bytearray(b"a" * (64 * 1024))
    with Pipes(pipe_size=PAGE) as pipes:
        io = ChildIO(pipes.in_r, pipes.out_w)
        io.send(b"1", memoryview(block))
        block[:] = b"b" * len(block)  # the next block decoded into the same buffer
        io.send(b"2", memoryview(block))
        pipes.drain()
        io.flush()
    assert bytes(pipes.received) == b"1" + b"a" * len(block) + b"2" + b"b" * len(block)


def test_input_arrives_whole_and_in_order_then_its_end() -> None:
    data = random.Random(2).randbytes(300_000)
    with Pipes(pipe_size=PAGE) as pipes:
        pipes.feed(data)
        io = ChildIO(pipes.in_r, pipes.out_w, in_limit=10_000, read_size=3000)
        pieces = []
        while piece := io.read():
            assert len(piece) <= 3000
            pieces.append(piece)
        assert io.read() == b""  # and again: the end stays the end
    assert b"".join(pieces) == data


def test_pump_reads_ahead_up_to_the_limit_without_waiting() -> None:
    data = bytes(range(256)) * 400  # 102400 bytes
    with Pipes() as pipes:  # the default pipe (64 KiB) holds what the feeder wrote so far
        pipes.feed(data)
        io = ChildIO(pipes.in_r, pipes.out_w, in_limit=20_000, read_size=1000)
        first = io.read()  # waits for the first bytes
        while io.buffered[0] < 19_000 and pipes.fed < len(data):
            io.pump()  # never waits: it takes only what the pipe holds
        io.pump()
        ahead = io.buffered[0]
        assert 19_000 <= ahead < 20_000 + 1000  # stops reading once past the limit
        rest = []
        while piece := io.read():
            rest.append(piece)
    assert first + b"".join(rest) == data


def test_pump_writes_what_the_pipe_takes_and_keeps_the_rest() -> None:
    with Pipes(pipe_size=PAGE) as pipes:
        io = ChildIO(pipes.in_r, pipes.out_w)
        io.send(b"h", bytes(5 * PAGE))
        waiting = io.buffered[1]
        assert 0 < waiting < 5 * PAGE + 1
        io.pump()  # the pipe is still full: nothing moves, nothing waits
        assert io.buffered[1] == waiting
        pipes.drain()
        io.flush()
    assert bytes(pipes.received) == b"h" + bytes(5 * PAGE)


def test_a_reader_that_went_away_is_a_broken_pipe() -> None:
    with Pipes(pipe_size=PAGE) as pipes:
        io = ChildIO(pipes.in_r, pipes.out_w)
        io.send(b"h", bytes(3 * PAGE))  # more than the pipe takes: some is buffered
        pipes.close(pipes.out_r)
        with pytest.raises(BrokenPipeError):
            io.flush()
        with pytest.raises(BrokenPipeError):
            ChildIO(pipes.in_r, pipes.out_w).send(b"h")


def test_both_ends_become_non_blocking() -> None:
    with Pipes() as pipes:
        ChildIO(pipes.in_r, pipes.out_w)
        assert not os.get_blocking(pipes.in_r) and not os.get_blocking(pipes.out_w)


@pytest.mark.parametrize(
    "limits",
    [{"in_limit": 0}, {"out_limit": 0}, {"read_size": 0}, {"in_limit": -1}],
)
def test_limits_must_be_positive(limits: dict[str, int]) -> None:
    with Pipes() as pipes, pytest.raises(ValueError, match="positive"):
        ChildIO(pipes.in_r, pipes.out_w, **limits)
