"""autocloud_ami as a fedora-messaging callback (``fedora-messaging --conf FILE consume``).

``AmiTestConsumer`` is the AMQP twin of ``autocloud_ami.consumer.AmiTestConsumer``:
a ``fedimg.image.test`` request (status ``started``) runs ``job.test_ami``
in the callback, and the message is acked only once the job finished and
its results are in ResultsDB or in the spool (``autocloud_ami.resultsdb_spool``,
re-sent by the housekeeping thread). A runner killed mid-test leaves the
message unacked: RabbitMQ hands it to another runner, which tests the AMI
again (the killed run's instance is removed by the sweeper at its deadline).
With ``prefetch_count = 1`` a process runs one test at a time: run more
processes on the queue to test more AMIs at once. RabbitMQ's
``consumer_timeout`` (30 minutes by default) must exceed
``autocloud_ami.deadline``, or a long test's delivery is taken back.

- a verdict on the same topic (``completed``/``failed``) is acked and ignored;
- one test per AMI at a time across the runners of a host: a run holds the
  flock ``<autocloud_ami.resultsdb_spool>/locks/ami-<id>.lock`` (released
  when its process dies), and a request for an AMI held by another run is
  retried with the backoff. A delivery is taken back when the connection to
  the broker drops (a restart) and handed out again, possibly to the process
  still testing it, or to another one; runners on several hosts share the
  spool directory on a filesystem with working flock, or may test such an
  AMI twice;
- a request for an AMI whose summary result is already in ResultsDB (for a
  retest: submitted after ``extra.retest_since``) is acked without a test: a
  delivery taken back after the job finished is
  redelivered, and fedimg asks again only while the summary is missing (if
  ResultsDB cannot be asked, the test runs);
- a malformed request, or one this runner refuses (a region or architecture
  it does not test), is dropped with one log line;
- no free test slot before ``autocloud_ami.queue_timeout``: retried;
- results that could neither be posted nor spooled: the process stops
  (``HaltConsumer``) and the request goes back to the queue for another runner.

The housekeeping of ``consumer.SweepProducer`` (leak sweep, spool flush) runs
in a thread of this process once it consumes, then every
``autocloud_ami.sweep_interval`` seconds. Only the contract, the AWS seam,
the settings loader and the callback base are shared with fedimg.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import requests
from resultsdb_api import ResultsDBapiException

from autocloud_ami.config import AutocloudConfig
from fedimg.fmcallback import PUBLISH_TIMEOUT, Callback, Periodic, Transient, when_reactor_runs
from fedimg.locks import Guard
from fedimg.messages import (
    IMAGE_TEST,
    Emitter,
    InvalidMessage,
    MessageType,
    Publisher,
    amqp_publisher,
    retest_since,
)
from fedimg.settings import ConfigError

log = logging.getLogger(__name__)

SWEEP = "autocloud_ami_sweep"


class AmiTestConsumer(Callback):
    """Tests every AMI fedimg asks for, one at a time per process."""

    handled = (IMAGE_TEST,)

    def __init__(
        self,
        conf: Any = None,
        *,
        publisher: Publisher | None = None,
        deps: Any = None,
        start: Any = when_reactor_runs,
        **kw: Any,
    ) -> None:
        self._publisher = publisher
        self._deps = deps
        self._start = start
        super().__init__(conf, **kw)

    def setup(self, consumer_config: Any) -> None:
        from autocloud_ami.job import Deps, reporter_for

        self.cfg = cfg = AutocloudConfig.from_consumer_config(consumer_config)
        if not cfg.enabled:
            raise ConfigError("autocloud_ami.enabled is false: this consumer would do nothing")
        emitter = Emitter(self._publisher or amqp_publisher(PUBLISH_TIMEOUT))
        self.deps = self._deps if self._deps is not None else Deps.from_config(cfg, emitter)
        self.reporter = reporter_for(cfg)  # the spool's flusher (as SweepProducer has one)
        self.guard = Guard(cfg.resultsdb_spool)  # <spool>/locks: one run per AMI per host
        self.sweep = Periodic(SWEEP, self._housekeeping, cfg.sweep_interval)
        self._start(self.sweep.start)
        log.info(
            "autocloud_ami consumer: testing AMIs in %s, one at a time",
            ", ".join(cfg.regions),
        )

    def _housekeeping(self) -> None:
        from autocloud_ami.sweeper import housekeeping

        cfg = self.cfg
        housekeeping(
            self.deps.aws.ec2,
            cfg.regions,
            self.reporter,
            lifetime=cfg.deadline,
            poll=cfg.poll_interval,
        )

    def handle(self, mtype: MessageType, body: Any) -> None:
        from autocloud_ami.job import (
            InvalidRequest,
            QueueTimeout,
            log_finished,
            test_ami,
            test_request,
        )

        image = test_request(body)
        if image is None:
            return
        with self.guard.hold(f"ami-{image.ami_id}") as mine:
            if not mine:
                raise Transient(f"{image.compose_id} {image.ami_id}: being tested by another run")
            if self._tested(image.compose_id, str(image.ami_id), retest_since(body)):
                return
            try:
                result = test_ami(image, self.deps)
            except InvalidRequest as exc:
                raise InvalidMessage(f"refused test request: {exc}") from exc
            except QueueTimeout as exc:
                raise Transient(str(exc)) from exc
        if result.delivery is None:
            from fedora_messaging.exceptions import HaltConsumer

            # The results are in the log only: this runner cannot record results.
            raise HaltConsumer(
                exit_code=1,
                reason=f"{image.ami_id}: results neither posted nor spooled",
                requeue=True,
            )
        log_finished(image, result)

    def _tested(self, compose_id: str, ami_id: str, since: datetime | None) -> bool:
        from autocloud_ami.report import summary_posted

        try:
            posted = summary_posted(self.reporter.api, ami_id, since)
        except (ResultsDBapiException, requests.RequestException, ValueError) as exc:
            # ResultsDB cannot be asked: testing again is the safe side.
            log.warning("%s %s: cannot ask ResultsDB (%s); testing", compose_id, ami_id, exc)
            return False
        if posted:
            log.info(
                "%s %s: its summary is in ResultsDB already; not tested again", compose_id, ami_id
            )
        return posted

    def exhausted(self, mtype: MessageType, body: Any, why: str) -> None:
        from fedora_messaging.exceptions import Nack

        # No slot for so long: not this message's fault; back to the queue, untested.
        log.warning("%s; requeued for another runner", why)
        raise Nack

    def close(self) -> None:
        """Stop the housekeeping thread (tests; a process just exits)."""
        self.sweep.stop()
