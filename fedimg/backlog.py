"""fedmsg's backlog, resumed from before the work a crash interrupted.

With ``status_directory`` and ``datagrepper_url`` configured, a
``FedmsgConsumer`` writes the message it handles to a status file, and at
start-up asks datagrepper for everything published after it. fedmsg records
the message a worker STARTS, and the replay skips that very message: a compose
being staged (or an AMI being tested) when the hub was killed would never be
handled again. With several workers, a message finishing can also record a
point past older messages still in flight or queued.

``ResumableBacklog`` (a mixin placed before ``FedmsgConsumer``) records
instead the point a replay must start from so that nothing unfinished is
skipped: just before the oldest message in flight or queued, and, when the
consumer is idle, the newest message it handled (which a replay skips). While
the start-up replay runs the point is left where it was, so a crash during it
replays it all again. Messages may then be handled twice after a crash: every
handler here is idempotent (find, else create).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

RESUME_MARGIN = 0.001  # seconds before the oldest unfinished message


@dataclass(frozen=True)
class Stamp:
    """A message's place in the bus's history."""

    msg_id: str
    timestamp: float
    topic: str = ""


def stamp_of(message: Any) -> Stamp | None:
    """The stamp of a message as moksha hands it to a consumer (None if it has none)."""
    if not isinstance(message, Mapping):
        return None
    envelope = message.get("body")
    if not isinstance(envelope, Mapping):
        return None
    msg_id, timestamp = envelope.get("msg_id"), envelope.get("timestamp")
    if not isinstance(msg_id, str) or not msg_id:
        return None
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
        return None
    topic = envelope.get("topic") or message.get("topic") or ""
    return Stamp(msg_id, float(timestamp), str(topic))


def resume_point(unfinished: Iterable[Stamp], newest_done: Stamp | None) -> Stamp | None:
    """Where a replay must start: before the oldest unfinished message, else after the newest
    handled one (a replay skips the message recorded with its own id)."""
    pending = list(unfinished)
    if pending:
        oldest = min(pending, key=lambda s: s.timestamp)
        return Stamp(
            f"resume-before-{oldest.msg_id}", oldest.timestamp - RESUME_MARGIN, oldest.topic
        )
    return newest_done


class ResumableBacklog:
    """Mixin for a ``fedmsg.consumers.FedmsgConsumer``: see the module docstring."""

    def __init__(self, hub: Any) -> None:
        self._resume_lock = threading.Lock()
        self._in_flight: dict[int, Stamp] = {}
        self._newest_done: Stamp | None = None
        self._replaying = False
        super().__init__(hub)  # type: ignore[call-arg]

    def _queued(self) -> list[Stamp]:
        queue = getattr(self, "incoming", None)
        if queue is None:
            return []
        with queue.mutex:
            waiting = list(queue.queue)
        return [s for s in map(stamp_of, waiting) if s is not None]

    def _record(self) -> None:
        """Write the resume point (caller holds ``_resume_lock``)."""
        filename = getattr(self, "status_filename", None)
        if self._replaying or not (filename and getattr(self, "status_lock", None)):
            return
        point = resume_point([*self._in_flight.values(), *self._queued()], self._newest_done)
        if point is None:
            return
        message = {
            "topic": point.topic,
            "body": {"msg_id": point.msg_id, "timestamp": point.timestamp, "topic": point.topic},
        }
        try:
            self.save_status({"message": message, "status": "resume"})
        except OSError:
            log.exception("could not record the backlog resume point in %s", filename)

    def save_status(self, data: dict[str, Any]) -> None:
        """fedmsg's writer of the status file (``FedmsgConsumer.save_status``)."""
        super().save_status(data)  # type: ignore[misc]

    def pre_consume(self, message: Any) -> None:
        stamp = stamp_of(message)
        if stamp is None:
            return
        with self._resume_lock:
            self._in_flight[id(message)] = stamp
            self._record()

    def post_consume(self, message: Any) -> None:
        stamp = stamp_of(message)
        if stamp is None:
            return
        with self._resume_lock:
            self._in_flight.pop(id(message), None)
            if self._newest_done is None or stamp.timestamp >= self._newest_done.timestamp:
                self._newest_done = stamp
            self._record()

    def _backlog(self, data: Any) -> None:
        """fedmsg's start-up replay; the recorded point stays put until it is queued."""
        with self._resume_lock:
            self._replaying = True
        try:
            super()._backlog(data)  # type: ignore[misc]
        finally:
            with self._resume_lock:
                self._replaying = False
                self._record()
