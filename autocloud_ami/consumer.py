"""autocloud_ami's moksha side: the test-request consumer and the sweep producer.

``AmiTestConsumer`` subscribes to ``fedimg.image.test`` (topic built from the
config's ``topic_prefix`` and ``environment``), acts on status ``started``
only, and hands the parsed request to ``job.test_ami``. moksha runs
``consume`` in ``moksha.workers_per_consumer`` worker threads, so a long test
never blocks the hub; ``autocloud_ami.max_concurrent`` bounds how many run at
once. A malformed message is logged at ERROR and dropped; nothing stops the hub.

``SweepProducer`` (entry point group ``moksha.producer``) removes leaked
``autocloud:*`` resources and re-sends spooled ResultsDB results at start-up
and every ``autocloud_ami.sweep_interval`` seconds.
"""

from __future__ import annotations

import logging
from typing import Any

from fedmsg.consumers import FedmsgConsumer
from moksha.hub.api.producer import PollingProducer

from autocloud_ami.config import AutocloudConfig
from fedimg.backlog import ResumableBacklog
from fedimg.messages import (
    IMAGE_TEST,
    Emitter,
    InvalidMessage,
    Topics,
    fedmsg_publisher,
    unwrap,
)

log = logging.getLogger(__name__)

CONFIG_KEY = "autocloud_ami.enabled"


class AmiTestConsumer(ResumableBacklog, FedmsgConsumer):
    """Tests every AMI fedimg asks for (``fedimg.image.test`` status ``started``)."""

    config_key = CONFIG_KEY
    start_error = ""  # why it did not start: fedimg's health check reports it

    def __init__(self, hub: Any) -> None:
        self.topics = Topics.from_fedmsg(hub.config)
        self.topic = [self.topics.of(IMAGE_TEST)]
        if hub.config.get(self.config_key):
            from autocloud_ami.job import Deps

            try:
                self.cfg = AutocloudConfig.from_fedmsg(hub.config)
                self.deps = Deps.from_config(self.cfg, Emitter(fedmsg_publisher()))
            except Exception as exc:
                type(self).start_error = f"{type(exc).__name__}: {exc}"[:300]
                log.error("AmiTestConsumer did not start: %s", type(self).start_error)
                raise
            log.info(
                "autocloud_ami: testing AMIs in %s, at most %d at once",
                ", ".join(self.cfg.regions),
                self.cfg.max_concurrent,
            )
        super().__init__(hub)

    def consume(self, message: dict[str, Any]) -> None:
        topic = str(message.get("topic", "?"))
        try:
            topic, body = unwrap(message)
            if self.topics.which(topic) is not IMAGE_TEST:
                log.warning("ignoring message on unexpected topic %s", topic)
                return
            self.handle(body)
        except InvalidMessage as exc:
            log.error("rejected malformed message on %s: %s", topic, exc)
        except Exception:
            log.exception("failed to handle message on %s", topic)

    def handle(self, body: Any) -> None:
        from autocloud_ami.job import InvalidRequest, log_finished, test_ami, test_request

        image = test_request(body)
        if image is None:
            return
        try:
            result = test_ami(image, self.deps)
        except InvalidRequest as exc:
            log.error("refused test request: %s", exc)
            return
        log_finished(image, result)


class SweepProducer(PollingProducer):
    """Sweeps leaked test resources and flushes the ResultsDB spool, periodically."""

    config_key = CONFIG_KEY
    frequency = 600.0
    now = True  # also once at start-up (in a worker thread: the hub is not held up)

    def __init__(self, hub: Any) -> None:
        if not hub.config.get(CONFIG_KEY):
            log.info("* disabled by config - %s", type(self).__name__)
            return  # not _initialized: moksha neither counts nor polls it
        from autocloud_ami.job import reporter_for
        from fedimg.aws import AwsClients

        self.cfg = AutocloudConfig.from_fedmsg(hub.config)
        self.frequency = self.cfg.sweep_interval
        self.aws = AwsClients(max_attempts=self.cfg.aws_max_attempts, component="autocloud_ami")
        self.reporter = reporter_for(self.cfg)
        super().__init__(hub)

    def poll(self) -> None:
        # moksha's poll thread dies with the first exception: housekeeping never raises.
        from autocloud_ami.sweeper import housekeeping

        cfg = self.cfg
        housekeeping(
            self.aws.ec2, cfg.regions, self.reporter, lifetime=cfg.deadline, poll=cfg.poll_interval
        )
