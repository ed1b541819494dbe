"""fedimg as a fedora-messaging callback: ``fedora-messaging --conf fedimg.toml consume``.

``FedimgConsumer`` is the AMQP twin of the moksha consumers in
``fedimg.consumers``: it parses a message with the contract and asks its
``fedimg.engine.Engine`` to converge one scope, then says how the message is
acknowledged (see ``fedimg.fmcallback`` for the mechanics):

- ``pungi.compose.status.change``: ``accept_compose(..., wait=False)`` records
  the compose's durable intent (``fedimg.state_dir``) and hands its images to
  the engine's pool; the message is acked as soon as the intent is on disk.
  Staging a compose takes longer than RabbitMQ lets a delivery stay unacked
  (``consumer_timeout``, 30 minutes by default) and would keep this process
  from taking result messages meanwhile; the intent is what makes the
  hand-off safe: a process killed while staging leaves it to the reconcile
  pass of any process sharing the state directory. An intent that cannot be
  written is retried, then stops the process (the message is requeued).
- ``resultsdb.result.new`` / ``taskotron.result.new`` / ``waiverdb.waiver.new``
  (a waiver may release a failed AMI): ``on_result`` converges
  the AMI (gate, promotion) before the message is acked. ``busy`` (another
  thread or process holds the AMI) is acked: the engine left a mark the holder
  reads when it lets go, and it looks again. ResultsDB unreachable and AWS or
  broker errors are retried with a backoff; once the retries are used up the
  message is acked: the reconcile pass gates every ``testing`` AMI and resumes
  every ``promoting`` one anyway.
  A release is acked once the gate decided it, and its promotion (copies to
  every region: minutes to hours, longer than ``consumer_timeout``) goes on in
  a pool of this process, up to 8 at a time: the AMI is tagged ``promoting``
  first, which the reconcile pass resumes if this process dies (and a crash
  before the tag leaves it ``testing``, which the pass gates again). Anything
  else still running after ``ack_after`` seconds (10 minutes) is acked too and
  goes on the same way.
- ``fedimg.hub.ping``: answered with ``fedimg.hub.pong`` (what runs here).

With ``fedimg.promote.enabled`` the reconcile pass runs in a thread of this
process, once the consumer runs and then every ``fedimg.reconcile.interval``
(as ``fedimg.consumers.ReconcileProducer`` does in a hub; with
``fedimg.stage.enabled`` it also finishes recorded composes). Likewise the
prune (``fedimg.prune.interval``) and the public-access audit
(``fedimg.audit.interval``), each in its own thread when its interval is not 0.

Any number of these processes may consume one queue: they must share
``fedimg.state_dir`` (one host, or a shared filesystem whose ``flock`` works
across its clients), whose locks make each image staged and each AMI gated and
promoted by one process at a time.
"""

from __future__ import annotations

import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
from botocore.exceptions import BotoCoreError, ClientError
from fedora_messaging.exceptions import ConnectionException, PublishException

from fedimg.config import ConfigError, FedimgConfig
from fedimg.engine import Engine, Outcome
from fedimg.fmcallback import PUBLISH_TIMEOUT, Callback, Periodic, Transient, when_reactor_runs
from fedimg.intents import IntentError
from fedimg.messages import (
    COMPOSE_STATUS,
    HUB_PING,
    HUB_PONG,
    RESULT_NEW,
    TASKOTRON_RESULT_NEW,
    WAIVER_NEW,
    Emitter,
    MessageType,
    Publisher,
    amqp_publisher,
    parse_compose_status,
    parse_result_notice,
)

log = logging.getLogger(__name__)

RECONCILE = "fedimg_reconcile"
PRUNE = "fedimg_prune"
AUDIT = "fedimg_audit"
# What AWS, ResultsDB and the broker may raise for a while (throttled, unreachable, 5xx,
# a publish the broker did not confirm in time).
PASSING = (
    ClientError,
    BotoCoreError,
    requests.RequestException,
    ConnectionException,
    PublishException,
)


class FedimgConsumer(Callback):
    """fedimg stage, promote and health in one fedora-messaging consumer process."""

    handled = (COMPOSE_STATUS, RESULT_NEW, TASKOTRON_RESULT_NEW, WAIVER_NEW, HUB_PING)

    def __init__(
        self,
        conf: Any = None,
        *,
        publisher: Publisher | None = None,
        engine: Engine | None = None,
        start: Any = when_reactor_runs,
        ack_after: float = 600.0,
        **kw: Any,
    ) -> None:
        self._publisher = publisher
        self._engine = engine
        self._start = start
        self.ack_after = ack_after
        # Where an AMI converges: the callback waits until it is decided, at most ack_after.
        self._results = ThreadPoolExecutor(8, thread_name_prefix="fedimg-result")
        super().__init__(conf, **kw)

    def setup(self, consumer_config: Any) -> None:
        self.cfg = cfg = FedimgConfig.from_consumer_config(consumer_config)
        if not (cfg.stage_enabled or cfg.promote_enabled or cfg.health_enabled):
            raise ConfigError(
                "fedimg.stage.enabled, fedimg.promote.enabled and fedimg.health.enabled "
                "are all false: this consumer would do nothing"
            )
        self.emitter = Emitter(self._publisher or amqp_publisher(PUBLISH_TIMEOUT))
        after_release = cfg.prune_interval > 0 or cfg.audit_interval > 0
        self.engine = (
            self._engine
            if self._engine is not None
            else Engine.from_config(cfg, self.emitter)
            if cfg.stage_enabled or cfg.promote_enabled or after_release
            else None
        )
        self.reconcile: Periodic | None = None
        if cfg.promote_enabled:
            self.reconcile = Periodic(RECONCILE, self._reconcile, cfg.reconcile_interval)
            self._start(self.reconcile.start)
        # Off unless their interval is set; the engine's locks: one run at a time.
        self.periodic: dict[str, Periodic] = {}
        if cfg.prune_interval > 0:
            self.periodic[PRUNE] = Periodic(PRUNE, self._prune, cfg.prune_interval)
        if cfg.audit_interval > 0:
            self.periodic[AUDIT] = Periodic(AUDIT, self._audit, cfg.audit_interval)
        for job in self.periodic.values():
            self._start(job.start)
        log.info(
            "fedimg consumer: stage %s, promote %s, health %s; state in %s",
            *("on" if on else "off" for on in (cfg.stage_enabled, cfg.promote_enabled)),
            "on" if cfg.health_enabled else "off",
            cfg.state_dir,
        )

    def _reconcile(self) -> None:
        assert self.engine is not None
        self.engine.reconcile(stage=self.cfg.stage_enabled)

    def _prune(self) -> None:
        assert self.engine is not None
        self.engine.prune(apply=True)

    def _audit(self) -> None:
        assert self.engine is not None
        self.engine.audit(fix=self.cfg.audit_fix)

    def enabled(self, mtype: MessageType) -> bool:
        if mtype is COMPOSE_STATUS:
            return self.cfg.stage_enabled
        if mtype is HUB_PING:
            return self.cfg.health_enabled
        return self.cfg.promote_enabled

    def handle(self, mtype: MessageType, body: Any) -> None:
        if not self.enabled(mtype):
            log.info("%s: not enabled in this consumer; message ignored", mtype)
            return
        if mtype is HUB_PING:
            self._pong(body)
        elif mtype is COMPOSE_STATUS:
            self._compose(body)
        else:
            self._result(mtype, body)

    def _compose(self, body: Any) -> None:
        assert self.engine is not None
        status = parse_compose_status(body)
        try:
            failed = self.engine.accept_compose(status, wait=False)
        except (IntentError, OSError) as exc:
            raise Transient(f"compose {status.compose_id}: intent not recorded: {exc}") from exc
        for outcome in failed:
            log.warning(
                "compose %s: %s: %s (the reconcile pass tries again)",
                status.compose_id,
                outcome.image_name,
                outcome.reason,
            )

    def _result(self, mtype: MessageType, body: Any) -> None:
        assert self.engine is not None
        notice = parse_result_notice(mtype, body)
        settled = threading.Event()
        promoting: list[Outcome] = []

        def decided(outcome: Outcome) -> None:
            promoting.append(outcome)
            settled.set()

        future = self._results.submit(self.engine.on_result, notice, decided=decided)
        future.add_done_callback(lambda _: settled.set())
        settled.wait(self.ack_after)
        if not future.done():
            log.info(
                "%s: %s; acked, the work goes on in this process",
                notice.item,
                promoting[0].text if promoting else f"still converging after {self.ack_after:.0f}s",
            )
            return
        try:
            outcome = future.result()
        except PASSING as exc:
            raise Transient(f"{notice.item}: {type(exc).__name__}: {exc}"[:300]) from exc
        if outcome is not None and outcome.transient:
            raise Transient(f"{notice.item}: {outcome.text}")

    def _pong(self, body: Any) -> None:
        HUB_PING.validate(body)
        components = {
            "fedimg_stage": "running" if self.cfg.stage_enabled else "disabled",
            "fedimg_promote": "running" if self.cfg.promote_enabled else "disabled",
            "fedimg_health": "running",
        }
        threads = dict(self.periodic)
        if self.reconcile is not None:
            threads[RECONCILE] = self.reconcile
        for name, job in threads.items():
            components[name] = "running" if job.alive else "not running: thread not started"
        self.emitter.emit(
            HUB_PONG,
            {
                "token": body["token"],
                "host": socket.gethostname(),
                "healthy": all(v in ("running", "disabled") for v in components.values()),
                "components": components,
            },
        )

    def exhausted(self, mtype: MessageType, body: Any, why: str) -> None:
        if mtype is COMPOSE_STATUS:
            from fedora_messaging.exceptions import HaltConsumer

            # Nothing would finish a compose whose intent is not on disk: stop this
            # process (its state directory is unusable); the message goes back.
            raise HaltConsumer(exit_code=1, reason=why, requeue=True)
        log.warning("%s; acked: the reconcile pass looks at it again", why)

    def close(self) -> None:
        """Stop the reconcile thread and the engine's pool (tests; a process just exits)."""
        if self.reconcile is not None:
            self.reconcile.stop()
        for job in self.periodic.values():
            job.stop()
        self._results.shutdown(wait=True)
        if self.engine is not None:
            self.engine.close()
