"""fedimg's moksha consumers and producer: thin callers of the lifecycle engine.

Each consumer parses a message with the contract and asks its
``fedimg.engine.Engine`` to converge ONE scope (a compose, an AMI); the
reconcile producer asks it to converge everything; the prune and audit
producers (off unless their interval is set) ask it to prune and to audit. A malformed body is
logged and dropped; an unexpected error is logged with its traceback;
neither stops the hub. Settings are validated, and the state directory
checked, when an enabled consumer starts; one that cannot start says so at
ERROR once and makes the health check answer unhealthy.

Every consumer builds its own engine (``self.lifecycle``: moksha's consumers
already use ``self.engine`` for a database): they coordinate through the
locks and intents of ``fedimg.state_dir`` exactly as separate processes do.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, ClassVar

from fedmsg.consumers import FedmsgConsumer
from moksha.hub.api.producer import PollingProducer

from fedimg.backlog import ResumableBacklog
from fedimg.config import FedimgConfig
from fedimg.engine import Engine
from fedimg.health import check_hub
from fedimg.messages import (
    COMPOSE_STATUS,
    HUB_PING,
    HUB_PONG,
    RESULT_NEW,
    TASKOTRON_RESULT_NEW,
    WAIVER_NEW,
    Emitter,
    InvalidMessage,
    MessageType,
    Topics,
    fedmsg_publisher,
    parse_compose_status,
    parse_result_notice,
    unwrap,
)

log = logging.getLogger(__name__)


def _start(cls: type, build: Any) -> Any:
    """Run ``build()``; on failure remember why (for the health check), log once, re-raise."""
    try:
        return build()
    except Exception as exc:
        cls.start_error = f"{type(exc).__name__}: {exc}"[:300]  # type: ignore[attr-defined]
        log.error("%s did not start: %s", cls.__name__, cls.start_error)  # type: ignore[attr-defined]
        raise


def build_engine(hub: Any) -> Engine:
    cfg = FedimgConfig.from_fedmsg(hub.config)
    return Engine.from_config(cfg, Emitter(fedmsg_publisher()))


class FedimgConsumer(ResumableBacklog, FedmsgConsumer):
    """Subscribes to ``consumes`` on the local bus and dispatches to ``handle``."""

    consumes: ClassVar[tuple[MessageType, ...]] = ()
    config_key: ClassVar[str]
    needs_engine: ClassVar[bool] = True
    start_error: ClassVar[str] = ""

    def __init__(self, hub: Any) -> None:
        self.hub_ref = hub
        self.topics = Topics.from_fedmsg(hub.config)
        self.topic = [self.topics.of(mtype) for mtype in self.consumes]
        if hub.config.get(self.config_key):
            self.emitter = Emitter(fedmsg_publisher())
            if self.needs_engine:
                self.lifecycle = _start(type(self), lambda: build_engine(hub))
        super().__init__(hub)

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
    """Answers ``fedimg.hub.ping`` with ``fedimg.hub.pong``: healthy only if all of us run."""

    config_key = "fedimg.health.enabled"
    consumes = (HUB_PING,)
    needs_engine = False

    def __init__(self, hub: Any) -> None:
        super().__init__(hub)
        self._reported: set[str] = set()

    def handle(self, mtype: MessageType, body: Any) -> None:
        HUB_PING.validate(body)
        health = check_hub(self.hub_ref)
        for problem in health.problems:
            if problem not in self._reported:
                self._reported.add(problem)
                log.error("health: %s", problem)
        self.emitter.emit(
            HUB_PONG,
            {
                "token": body["token"],
                "host": socket.gethostname(),
                "healthy": health.healthy,
                "components": health.summary,
            },
        )


class StageConsumer(FedimgConsumer):
    """Stages the cloud images of a finished compose in the staging region."""

    config_key = "fedimg.stage.enabled"
    consumes = (COMPOSE_STATUS,)

    def handle(self, mtype: MessageType, body: Any) -> None:
        status = parse_compose_status(body)
        if not status.finished:
            log.debug("%s: status %s, nothing to stage", status.compose_id, status.status)
            return
        self.lifecycle.accept_compose(status)


class PromoteConsumer(FedimgConsumer):
    """Runs the gate when ResultsDB says a result for an AMI arrived, or WaiverDB a waiver."""

    config_key = "fedimg.promote.enabled"
    consumes = (RESULT_NEW, TASKOTRON_RESULT_NEW, WAIVER_NEW)

    def handle(self, mtype: MessageType, body: Any) -> None:
        self.lifecycle.on_result(parse_result_notice(mtype, body))


class ReconcileProducer(PollingProducer):
    """At start-up and every ``fedimg.reconcile.interval`` seconds, converge everything.

    Runs with ``fedimg.promote.enabled``: every AMI ``testing`` is gated (or its
    test requested once more), every AMI ``promoting`` gets its missing
    regions; with ``fedimg.stage.enabled`` too, every recorded compose intent
    is finished and what a killed stage left is staged again or cleaned up.
    This is what makes a lost message or a killed hub harmless.
    """

    config_key = "fedimg.promote.enabled"
    start_error: ClassVar[str] = ""
    now = True

    def __init__(self, hub: Any) -> None:
        if not hub.config.get(self.config_key):
            self.now = False  # no pass at start-up...
            self.die = True  # ...and the polling thread returns at once
            self.frequency = 60.0
            super().__init__(hub)
            return

        def build() -> tuple[FedimgConfig, Engine]:
            return FedimgConfig.from_fedmsg(hub.config), build_engine(hub)

        cfg, self.lifecycle = _start(type(self), build)
        self.frequency = cfg.reconcile_interval
        self.stage = cfg.stage_enabled
        super().__init__(hub)

    def poll(self) -> None:
        try:
            self.lifecycle.reconcile(stage=self.stage)
        except Exception:
            log.exception("reconcile pass failed")


class _AfterReleaseProducer(PollingProducer):
    """A periodic job of the engine, on when its interval setting (``config_key``) is not 0.

    Started at hub start-up, then every interval; the engine's lock makes one
    run at a time across every process sharing ``fedimg.state_dir``.
    """

    config_key: ClassVar[str]
    start_error: ClassVar[str] = ""
    now = True

    def __init__(self, hub: Any) -> None:
        if not hub.config.get(self.config_key):
            log.info("* disabled by config - %s", type(self).__name__)
            return  # not _initialized: moksha neither counts nor polls it

        def build() -> tuple[FedimgConfig, Engine]:
            return FedimgConfig.from_fedmsg(hub.config), build_engine(hub)

        self.cfg, self.lifecycle = _start(type(self), build)
        self.frequency = float(hub.config[self.config_key])
        super().__init__(hub)

    def poll(self) -> None:
        try:
            self.run()
        except Exception:
            log.exception("%s: the periodic run failed", type(self).__name__)

    def run(self) -> None:
        raise NotImplementedError


class PruneProducer(_AfterReleaseProducer):
    """Every ``fedimg.prune.interval`` seconds: ``fedimg prune --apply`` (0: off)."""

    config_key = "fedimg.prune.interval"

    def run(self) -> None:
        self.lifecycle.prune(apply=True)


class AuditProducer(_AfterReleaseProducer):
    """Every ``fedimg.audit.interval`` seconds: the public-access audit (0: off),
    re-publishing what AWS made private with ``fedimg.audit.fix``."""

    config_key = "fedimg.audit.interval"

    def run(self) -> None:
        self.lifecycle.audit(fix=self.cfg.audit_fix)
