"""What fedimg's and autocloud_ami's fedora-messaging callbacks (``consume``) share.

``fedora-messaging --conf FILE consume`` instantiates the configured
``callback`` class once per process, before its reactor runs, and calls it with
one message at a time from a worker thread; the message is acked when the call
returns, requeued on ``Nack``, discarded on ``Drop``. ``Callback`` is the base
of ``fedimg.amqp.FedimgConsumer`` and ``autocloud_ami.amqp.AmiTestConsumer``
(as ``fedimg.backlog`` is shared by their moksha counterparts):

- settings are read once, in ``__init__``, from
  ``fedora_messaging.config.conf["consumer_config"]`` by the subclass's
  ``setup``; a bad key raises ``ConfigError`` naming it, which stops
  ``consume`` at start-up;
- a topic the subclass does not handle, or a topic of another environment
  (``topic_prefix`` is the environment), is dropped with one log line; so is a
  body that breaks the contract (``InvalidMessage``);
- a handler raises ``Transient`` when the work cannot be done now for a passing
  reason (ResultsDB or AWS down, another process holds the AMI). The message is
  held a little longer, then nacked (requeued for any process of the queue):
  1 s the first time, doubling up to 15 s (``Backoff``), so nothing spins. A
  requeued message goes back to the head of the queue, so after
  ``Backoff.tries`` attempts in this process the subclass's ``exhausted``
  decides: ack when another mechanism finishes the work (fedimg's reconcile
  pass), or stop the process (``HaltConsumer``, the message requeued) when
  nothing would;
- anything else a handler raises is a bug: logged with its traceback and
  dropped (as the moksha consumers do), not left to stop the consumer;
- ``Periodic`` runs a job (the reconcile pass, the leak sweep) in a daemon
  thread now and every interval; ``when_reactor_runs`` starts it only once
  fedora-messaging's reactor runs (a publish before that would start a second
  reactor through crochet).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from fedimg.messages import InvalidMessage, MessageType

if TYPE_CHECKING:
    from fedora_messaging.message import Message

log = logging.getLogger(__name__)


# Seconds a publish from a consumer may wait for the broker: fedora-messaging keeps
# retrying across a lost connection, and reconnects after 1, 2.7, 7.4, 20, 54 s... (a
# broker restart of ~20 s is noticed after ~30 s), so this covers a restart.
PUBLISH_TIMEOUT = 120


class Transient(Exception):
    """The work cannot be done now for a passing reason; the text says which."""


def full_topic(prefix: str, mtype: MessageType) -> str:
    """The routing key ``mtype`` has under fedora-messaging's ``topic_prefix``."""
    return f"{prefix}.{mtype}" if prefix else str(mtype)


def which(topic: str, prefix: str, handled: tuple[MessageType, ...]) -> MessageType | None:
    """The handled type a routing key is, in this environment; None for anything else."""
    return next((m for m in handled if topic == full_topic(prefix, m)), None)


@dataclass
class Backoff:
    """How long a message is held before each Nack; retries are declared here, once."""

    first: float = 1.0
    cap: float = 15.0
    tries: int = 6  # attempts in this process before ``Callback.exhausted`` decides
    remember: int = 4096  # message ids kept (oldest forgotten first)
    _seen: OrderedDict[str, int] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def next_delay(self, key: str) -> float | None:
        """The delay before this attempt's Nack; None once ``tries`` attempts failed."""
        with self._lock:
            count = self._seen.pop(key, 0) + 1
            self._seen[key] = count
            while len(self._seen) > self.remember:
                self._seen.popitem(last=False)
        if count >= self.tries:
            self.forget(key)
            return None
        return float(min(self.cap, self.first * 2 ** (count - 1)))

    def forget(self, key: str) -> None:
        with self._lock:
            self._seen.pop(key, None)


class Periodic:
    """``job()`` in a daemon thread: at once, then every ``interval`` seconds until ``stop``."""

    def __init__(self, name: str, job: Callable[[], Any], interval: float) -> None:
        self.name = name
        self.job = job
        self.interval = interval
        self.runs = 0  # completed runs (raised or not)
        self._stop = threading.Event()
        self._done = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.job()
            except Exception:  # a failed pass must not end the loop
                log.exception("%s: the periodic job raised", self.name)
            with self._done:
                self.runs += 1
                self._done.notify_all()
            self._stop.wait(self.interval)

    def wait_runs(self, count: int, timeout: float) -> bool:
        """Whether ``count`` runs completed within ``timeout`` seconds."""
        with self._done:
            return self._done.wait_for(lambda: self.runs >= count, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)


def when_reactor_runs(start: Callable[[], Any]) -> None:
    """Call ``start`` once fedora-messaging's reactor runs (never, in ``reconsume``)."""
    from twisted.internet import reactor

    reactor.callWhenRunning(start)


class Callback:
    """The base of a fedora-messaging callback: see the module docstring."""

    handled: ClassVar[tuple[MessageType, ...]] = ()

    def __init__(
        self,
        conf: Mapping[str, Any] | None = None,
        *,
        sleep: Callable[[float], Any] = time.sleep,
        backoff: Backoff | None = None,
    ) -> None:
        if conf is None:
            from fedora_messaging import config

            conf = config.conf
        self.prefix = str(conf.get("topic_prefix") or "")
        self.sleep = sleep
        self.backoff = backoff or Backoff()
        try:
            self.setup(conf.get("consumer_config"))
        except Exception as exc:
            log.error("%s did not start: %s", type(self).__name__, exc)
            raise

    def setup(self, consumer_config: Any) -> None:
        """Read and validate the settings, build the seams (ConfigError names a bad key)."""
        raise NotImplementedError

    def handle(self, mtype: MessageType, body: Any) -> None:
        """Do the work of one message; InvalidMessage drops it, Transient retries it."""
        raise NotImplementedError

    def exhausted(self, mtype: MessageType, body: Any, why: str) -> None:
        """``Backoff.tries`` attempts failed here: return to ack, raise to do otherwise."""
        raise NotImplementedError

    def __call__(self, message: Message) -> None:
        from fedora_messaging.exceptions import Drop, HaltConsumer, Nack

        topic, msg_id = message.topic, str(message.id)
        mtype = which(topic, self.prefix, self.handled)
        if mtype is None:
            log.warning("message %s on %s: not a topic handled here; dropped", msg_id, topic)
            raise Drop
        try:
            self.handle(mtype, message.body)
        except InvalidMessage as exc:
            log.error("message %s on %s: malformed, dropped: %s", msg_id, topic, exc)
            self.backoff.forget(msg_id)
            raise Drop from None
        except Transient as exc:
            delay = self.backoff.next_delay(msg_id)
            if delay is None:
                log.warning("message %s on %s: %s; retries used up", msg_id, topic, exc)
                self.exhausted(mtype, message.body, str(exc))
                return
            log.warning("message %s on %s: %s; requeued in %.0fs", msg_id, topic, exc, delay)
            self.sleep(delay)
            raise Nack from None
        except (Drop, HaltConsumer, Nack):
            raise  # a handler's own decision
        except Exception:
            # A bug, not the message: logged with its traceback and dropped, as the
            # moksha consumers do; what it was about is left to the durable state.
            log.exception("message %s on %s: failed unexpectedly; dropped", msg_id, topic)
            self.backoff.forget(msg_id)
            raise Drop from None
        self.backoff.forget(msg_id)
