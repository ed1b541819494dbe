"""fedimg's moksha consumers: thin callbacks around the domain modules.

Each consumer parses a message with the contract, calls ONE domain function,
and lets that function emit its messages. A malformed body is logged and
dropped; an unexpected error is logged with its traceback; neither stops the
hub. Settings are validated when an enabled consumer starts.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import TYPE_CHECKING, Any, ClassVar

from fedmsg.consumers import FedmsgConsumer
from moksha.hub.api.producer import PollingProducer

from fedimg.backlog import ResumableBacklog
from fedimg.config import FedimgConfig
from fedimg.messages import (
    COMPOSE_STATUS,
    HUB_PING,
    HUB_PONG,
    RESULT_NEW,
    TASKOTRON_RESULT_NEW,
    Emitter,
    InvalidMessage,
    MessageType,
    Topics,
    fedmsg_publisher,
    parse_compose_status,
    parse_result_notice,
    unwrap,
)

if TYPE_CHECKING:
    from fedimg.promote import Promoter
    from fedimg.stage import Stager

log = logging.getLogger(__name__)

_promoters: dict[int, Promoter] = {}
_stagers: dict[int, Stager] = {}
_promoters_lock = threading.Lock()


def shared_promoter(hub: Any, cfg: FedimgConfig, emitter: Emitter) -> Promoter:
    """One Promoter per hub: the listener and the reconcile pass share its locks and slots."""
    from fedimg.promote import Promoter

    with _promoters_lock:
        if id(hub) not in _promoters:
            _promoters[id(hub)] = Promoter.from_config(cfg, emitter)
        return _promoters[id(hub)]


def shared_stager(hub: Any, cfg: FedimgConfig, emitter: Emitter) -> Stager:
    """One Stager per hub: the reconcile pass sees what the listener is staging."""
    from fedimg.stage import Stager

    with _promoters_lock:
        if id(hub) not in _stagers:
            _stagers[id(hub)] = Stager.from_config(cfg, emitter)
        return _stagers[id(hub)]


class FedimgConsumer(ResumableBacklog, FedmsgConsumer):
    """Subscribes to ``consumes`` on the local bus and dispatches to ``handle``."""

    consumes: ClassVar[tuple[MessageType, ...]] = ()
    config_key: ClassVar[str]
    needs_settings: ClassVar[bool] = True

    def __init__(self, hub: Any) -> None:
        self.hub_ref = hub
        self.topics = Topics.from_fedmsg(hub.config)
        self.topic = [self.topics.of(mtype) for mtype in self.consumes]
        if hub.config.get(self.config_key):
            if self.needs_settings:
                self.cfg = FedimgConfig.from_fedmsg(hub.config)
            self.emitter = Emitter(fedmsg_publisher())
            self.setup()
        super().__init__(hub)

    def setup(self) -> None:
        """Build the domain objects (called once, only when enabled)."""

    def consume(self, message: dict[str, Any]) -> None:
        topic = str(message.get("topic", "?"))
        try:
            topic, body = unwrap(message)
            mtype = self.topics.which(topic)
            if mtype is None or mtype not in self.consumes:
                log.warning("ignoring message on unexpected topic %s", topic)
                return
            self.handle(mtype, body)
        except InvalidMessage as exc:
            log.error("rejected malformed message on %s: %s", topic, exc)
        except Exception:
            log.exception("failed to handle message on %s", topic)

    def handle(self, mtype: MessageType, body: Any) -> None:
        raise NotImplementedError


class HealthConsumer(FedimgConsumer):
    """Answers ``fedimg.hub.ping`` with ``fedimg.hub.pong``: the hub is live end to end."""

    config_key = "fedimg.health.enabled"
    consumes = (HUB_PING,)
    needs_settings = False

    def handle(self, mtype: MessageType, body: Any) -> None:
        HUB_PING.validate(body)
        self.emitter.emit(HUB_PONG, {"token": body["token"], "host": socket.gethostname()})


class StageConsumer(FedimgConsumer):
    """Stages the cloud images of a finished compose in the staging region."""

    config_key = "fedimg.stage.enabled"
    consumes = (COMPOSE_STATUS,)

    def setup(self) -> None:
        self.stager = shared_stager(self.hub_ref, self.cfg, self.emitter)

    def handle(self, mtype: MessageType, body: Any) -> None:
        status = parse_compose_status(body)
        if not status.finished:
            log.debug("%s: status %s, nothing to stage", status.compose_id, status.status)
            return
        self.stager.stage_compose(status)


class PromoteConsumer(FedimgConsumer):
    """Runs the gate when ResultsDB says a result for an AMI arrived."""

    config_key = "fedimg.promote.enabled"
    consumes = (RESULT_NEW, TASKOTRON_RESULT_NEW)

    def setup(self) -> None:
        self.promoter = shared_promoter(self.hub_ref, self.cfg, self.emitter)

    def handle(self, mtype: MessageType, body: Any) -> None:
        notice = parse_result_notice(mtype, body)
        self.promoter.on_result(notice)


class ReconcileProducer(PollingProducer):
    """At start-up and every ``fedimg.reconcile.interval`` seconds, resume unfinished work.

    ``fedimg.reconcile``: AMIs ``testing`` whose results are complete (or whose
    deadline passed) are gated, those whose results never came get their test
    requested once more; AMIs ``promoting`` get their missing regions; with
    stage enabled in this hub, what a killed stage left is cleaned up or
    staged again. This is what makes a lost message or a killed hub harmless.
    """

    now = True

    def __init__(self, hub: Any) -> None:
        if not hub.config.get(PromoteConsumer.config_key):
            self.now = False  # no pass at start-up...
            self.die = True  # ...and the polling thread returns at once
            self.frequency = 60.0
            super().__init__(hub)
            return
        cfg = FedimgConfig.from_fedmsg(hub.config)
        self.frequency = cfg.reconcile_interval
        emitter = Emitter(fedmsg_publisher())
        self.promoter = shared_promoter(hub, cfg, emitter)
        self.stager = shared_stager(hub, cfg, emitter) if cfg.stage_enabled else None
        super().__init__(hub)

    def poll(self) -> None:
        from fedimg.reconcile import reconcile

        try:
            reconcile(self.promoter, self.stager)
        except Exception:
            log.exception("reconcile pass failed")
