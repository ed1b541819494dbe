"""fedimg.backlog: the resume point fedmsg's backlog replays from never skips unfinished work."""

from __future__ import annotations

import queue
import threading
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fedimg.backlog import RESUME_MARGIN, ResumableBacklog, Stamp, resume_point, stamp_of


def message(msg_id: str, timestamp: float) -> dict[str, Any]:
    """A message as moksha hands it to a consumer's worker (after fedmsg's validate)."""
    topic = "org.fedoraproject.dev.pungi.compose.status.change"
    return {
        "topic": topic,
        "body": {"topic": topic, "msg_id": msg_id, "timestamp": timestamp, "msg": {}},
    }


class FakeFedmsgConsumer:
    """What ResumableBacklog uses of ``fedmsg.consumers.FedmsgConsumer``."""

    def __init__(self, hub: Any) -> None:
        self.status_filename: str | None = "/nonexistent/status"
        self.status_lock: Any = threading.Lock()
        self.incoming: queue.Queue[Any] = queue.Queue()
        self.saved: list[dict[str, Any]] = []
        self.replayed: list[Any] = []

    def save_status(self, data: dict[str, Any]) -> None:
        self.saved.append(data)

    def pre_consume(self, message: Any) -> None:
        raise AssertionError("fedmsg's pre_consume must not run: it records the started message")

    def post_consume(self, message: Any) -> None:
        raise AssertionError("fedmsg's post_consume must not run")

    def _backlog(self, data: Any) -> None:
        self.replayed.append(data)
        # While replaying, work goes on: nothing may move the recorded point.
        consumer = self
        assert isinstance(consumer, ResumableBacklog)
        live = message("live", 500.0)
        consumer.pre_consume(live)
        consumer.post_consume(live)


class Consumer(ResumableBacklog, FakeFedmsgConsumer):
    pass


def point(consumer: Consumer) -> tuple[str, float]:
    body = consumer.saved[-1]["message"]["body"]
    return body["msg_id"], body["timestamp"]


def test_stamp_of_reads_the_envelope_and_refuses_the_rest() -> None:
    assert stamp_of(message("2026-a", 10.5)) == Stamp(
        "2026-a", 10.5, "org.fedoraproject.dev.pungi.compose.status.change"
    )
    assert stamp_of({"topic": "t", "body": {"msg_id": "x", "timestamp": 3}}) == Stamp("x", 3.0, "t")
    for bad in (
        None,
        "text",
        {"body": "not an envelope"},
        {"body": {"msg_id": "x"}},
        {"body": {"msg_id": "x", "timestamp": True}},
        {"body": {"msg_id": "x", "timestamp": "10"}},
        {"body": {"msg_id": "", "timestamp": 10}},
        {"body": {"msg_id": 7, "timestamp": 10}},
    ):
        assert stamp_of(bad) is None, bad


def test_resume_point_is_before_the_oldest_unfinished_else_the_newest_done() -> None:
    done = Stamp("done", 50.0)
    assert resume_point([], None) is None
    assert resume_point([], done) == done
    before = resume_point([Stamp("b", 30.0, "t"), Stamp("a", 20.0, "t")], done)
    assert before is not None
    assert before.timestamp == 20.0 - RESUME_MARGIN and before.msg_id != "a"


def test_a_message_in_flight_is_replayed_after_a_crash() -> None:
    consumer = Consumer(hub=None)
    first = message("m1", 10.0)
    consumer.pre_consume(first)
    msg_id, ts = point(consumer)
    # fedmsg's replay asks from ``ts`` and skips ``msg_id``: m1 is asked for, not skipped.
    assert ts < 10.0 and msg_id != "m1"
    consumer.post_consume(first)
    assert point(consumer) == ("m1", 10.0)  # idle: after the newest handled one


def test_a_later_message_finishing_first_does_not_pass_an_older_one_in_flight() -> None:
    consumer = Consumer(hub=None)
    old, new = message("old", 10.0), message("new", 20.0)
    consumer.pre_consume(old)
    consumer.pre_consume(new)
    consumer.post_consume(new)
    assert point(consumer)[1] < 10.0
    consumer.post_consume(old)
    assert point(consumer) == ("new", 20.0)


def test_queued_messages_older_than_the_one_finishing_are_not_passed() -> None:
    consumer = Consumer(hub=None)
    consumer.incoming.put(message("queued", 5.0))  # e.g. put there by the start-up replay
    consumer.incoming.put(StopIteration)  # moksha's stop sentinel is no message
    live = message("live", 100.0)
    consumer.pre_consume(live)
    consumer.post_consume(live)
    assert point(consumer)[1] < 5.0


def test_the_point_stays_put_during_the_start_up_replay_then_moves() -> None:
    consumer = Consumer(hub=None)
    consumer._backlog('{"message": {"body": {"msg_id": "x", "timestamp": 1}}}')
    assert consumer.replayed  # fedmsg's replay ran
    assert len(consumer.saved) == 1  # only once it was over
    assert point(consumer) == ("live", 500.0)


def test_without_a_status_file_nothing_is_written() -> None:
    consumer = Consumer(hub=None)
    consumer.status_filename = None
    consumer.pre_consume(message("m", 1.0))
    consumer.post_consume(message("m", 1.0))
    assert consumer.saved == []


def test_messages_without_a_stamp_are_not_tracked() -> None:
    consumer = Consumer(hub=None)
    consumer.pre_consume({"topic": "t", "body": {"msg": {}}})
    consumer.post_consume({"topic": "t", "body": {"msg": {}}})
    assert consumer.saved == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=8),
    st.randoms(use_true_random=False),
)
def test_a_crash_at_any_moment_replays_every_unfinished_message(
    timestamps: list[float], rng: Any
) -> None:
    """Start and finish messages in any interleaving; after every step, a replay from the
    recorded point (fedmsg: timestamp >= point, the point's own id skipped) covers every
    message started but not finished."""
    consumer = Consumer(hub=None)
    messages = [message(f"m{i}", ts) for i, ts in enumerate(timestamps)]
    rng.shuffle(messages)  # arrival order is not timestamp order (replays, clock skew)
    unfinished: list[dict[str, Any]] = []
    for m in messages:
        consumer.pre_consume(m)
        unfinished.append(m)
        check(consumer, unfinished)
        if rng.random() < 0.5:  # some message in flight finishes, not necessarily the oldest
            done = unfinished.pop(rng.randrange(len(unfinished)))
            consumer.post_consume(done)
            check(consumer, unfinished)
    while unfinished:
        done = unfinished.pop(rng.randrange(len(unfinished)))
        consumer.post_consume(done)
        check(consumer, unfinished)


def check(consumer: Consumer, unfinished: list[dict[str, Any]]) -> None:
    msg_id, ts = point(consumer)
    for m in unfinished:
        body = m["body"]
        assert body["timestamp"] >= ts and body["msg_id"] != msg_id, (msg_id, ts, body)
