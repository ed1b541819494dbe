"""fedimg and autocloud_ami as fedora-messaging consumers on a private RabbitMQ node.

The AMQP twin of ``devel.bus.LocalBus`` for ``devel/stack.py`` (``--bus amqp``),
the tests and the scale-out benchmark. Each consumer process runs
``fedora-messaging --conf FILE consume`` (the production command line), FILE
being the repository's sample (``fedora-messaging/fedimg.toml`` or
``autocloud_ami.toml``) with only what a local run must change: the broker URL,
a monitoring port per process, the queue names (a suffix, when several stacks
share one node) and the ``[consumer_config]`` settings. Every process of an
app consumes the same durable queue.

``AmqpTap`` records every message published on the node's ``amq.topic``
exchange (a durable queue of its own bound to ``#``, so it misses nothing
across a broker restart). Ready means each process's monitoring endpoint
(``/ready``) says it consumes. Every wait has a deadline; every process runs
in its own process group and is stopped on exit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pika
import pika.exceptions
import requests

from devel.bus import (
    BIN,
    ManagedProcess,
    Recording,
    Seen,
    Spawner,
    WaitTimeout,
    free_port,
    wait_until,
    write_fedmsg_config,
)
from devel.rabbitmq import RabbitMQ, write_client_config

log = logging.getLogger(__name__)

REPO: Final = Path(__file__).resolve().parent.parent
SAMPLES: Final = REPO / "fedora-messaging"
SAMPLE_PREFIX: Final = "org.fedoraproject.dev"
APPS: Final = ("fedimg", "autocloud_ami")


def consumer_config_of(settings: Mapping[str, Any], app: str) -> dict[str, Any]:
    """The ``[consumer_config]`` of ``app``: its settings, without the ones left unset (None)."""
    return {k: v for k, v in settings.items() if k.startswith(f"{app}.") and v is not None}


def app_config(
    app: str,
    url: str,
    settings: Mapping[str, Any],
    *,
    monitoring_port: int,
    queue_suffix: str = "",
    prefix: str = SAMPLE_PREFIX,
) -> dict[str, Any]:
    """The repository's sample for ``app`` with only what a local run must change."""
    with (SAMPLES / f"{app}.toml").open("rb") as fh:
        config = tomllib.load(fh)
    queue = f"{app}{queue_suffix}"
    config.update(
        amqp_url=url,
        topic_prefix=prefix,
        queues={queue: config["queues"][app]},
        bindings=[
            {
                **binding,
                "queue": queue,
                "routing_keys": [
                    key.replace(SAMPLE_PREFIX, prefix, 1) for key in binding["routing_keys"]
                ],
            }
            for binding in config["bindings"]
        ],
        monitoring={"address": "127.0.0.1", "port": monitoring_port},
        consumer_config=consumer_config_of(settings, app),
    )
    return config


class AmqpTap(Recording):
    """Records every message on the node's ``amq.topic`` (reconnecting across restarts)."""

    def __init__(self, node: RabbitMQ, queue: str | None = None) -> None:
        super().__init__()
        self.node = node
        self.queue = queue or f"devel-tap-{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._declare()  # bound before anything is published
        self._thread = threading.Thread(target=self._run, name="amqp-tap", daemon=True)
        self._thread.start()

    def _declare(self) -> None:
        self.node.declare_queue(self.queue, ["#"])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.node.connection() as conn:
                    channel = conn.channel()
                    channel.basic_qos(prefetch_count=100)
                    for method, properties, body in channel.consume(
                        self.queue, auto_ack=True, inactivity_timeout=0.2
                    ):
                        if self._stop.is_set():
                            break
                        if method is None:
                            continue
                        self._record(method.routing_key, properties, body)
            except (pika.exceptions.AMQPError, OSError) as exc:
                log.debug("amqp tap: %s; reconnecting", exc)
                self._stop.wait(0.5)

    def _record(self, topic: str, properties: Any, body: bytes) -> None:
        try:
            decoded = json.loads(body)
        except ValueError:
            log.warning("amqp tap: a message on %s is not JSON; skipped", topic)
            return
        envelope = {"id": properties.message_id, "headers": dict(properties.headers or {})}
        self.add(Seen(topic, decoded if isinstance(decoded, dict) else {}, envelope, time.time()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            with self.node.connection() as conn:
                conn.channel().queue_delete(self.queue)
        except (pika.exceptions.AMQPError, OSError):
            log.warning("amqp tap: could not delete queue %s", self.queue)


@dataclass
class AmqpBus(Spawner):
    """Consumer processes of both apps on one node, their configs and a tap, in a temp dir."""

    node: RabbitMQ
    settings: dict[str, Any] = field(default_factory=dict)
    per_app: int = 2
    prefix: str = SAMPLE_PREFIX
    queue_suffix: str = ""
    workdir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: list[ManagedProcess] = field(default_factory=list)
    tap: AmqpTap | None = None
    ports: dict[str, int] = field(default_factory=dict)  # process name -> monitoring port
    _own_workdir: bool = False
    _index: dict[str, int] = field(default_factory=dict)

    def __enter__(self) -> AmqpBus:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="fedimg-amqp-"))
            self._own_workdir = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            for app in APPS:  # declared now: nothing published before a consumer runs is lost
                config = self._config(app, monitoring_port=0)
                self.node.declare_queue(self.queue(app), config["bindings"][0]["routing_keys"])
            write_client_config(
                self.publisher_config,
                self.node.url,
                {"topic_prefix": self.prefix, "client_properties": {"app": "fedimg-devel"}},
            )
            # The CLIs (fedimg status ...) read their settings from ./fedmsg.d.
            write_fedmsg_config(self.workdir, self.settings)
            self.tap = AmqpTap(self.node)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def publisher_config(self) -> Path:
        """A fedora-messaging config that only publishes (``FEDORA_MESSAGING_CONF``)."""
        assert self.workdir is not None
        return self.workdir / "publisher.toml"

    def queue(self, app: str) -> str:
        return f"{app}{self.queue_suffix}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDORA_MESSAGING")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    # -- consumers ----------------------------------------------------------------------------
    def _config(self, app: str, monitoring_port: int) -> dict[str, Any]:
        return app_config(
            app,
            self.node.url,
            self.settings,
            monitoring_port=monitoring_port,
            queue_suffix=self.queue_suffix,
            prefix=self.prefix,
        )

    def start_consumer(self, app: str) -> tuple[ManagedProcess, int]:
        """One more ``fedora-messaging consume`` process of ``app``; (process, monitoring port)."""
        assert self.workdir is not None
        index = self._index.get(app, 0)
        self._index[app] = index + 1
        port = free_port()
        config = self._config(app, monitoring_port=port)
        path = write_client_config(self.workdir / f"{app}-{index}.toml", self.node.url, config)
        argv = [str(BIN / "fedora-messaging"), "--conf", str(path), "consume"]
        proc = self.spawn(f"{app}-{index}", argv)
        self.ports[proc.name] = port
        return proc, port

    def start_consumers(self, timeout: float = 120.0) -> list[ManagedProcess]:
        """``per_app`` processes of each app; returns once each of them consumes."""
        started = [self.start_consumer(app) for app in APPS for _ in range(self.per_app)]
        for proc, port in started:
            self.wait_consuming(proc, port, timeout)
        return [proc for proc, _ in started]

    @staticmethod
    def wait_consuming(proc: ManagedProcess, port: int, timeout: float) -> None:
        """Until the process's ``/ready`` says it consumes; its log in the error otherwise."""

        def consuming() -> bool:
            if not proc.alive:
                raise RuntimeError(f"{proc.name} exited:\n{proc.output()[-4000:]}")
            try:
                answer = requests.get(f"http://127.0.0.1:{port}/ready", timeout=2)
            except requests.RequestException:
                return False
            return answer.ok and bool(answer.json().get("consuming"))

        try:
            wait_until(consuming, timeout, f"{proc.name} to consume", interval=0.2)
        except WaitTimeout as exc:
            raise WaitTimeout(f"{exc}:\n{proc.output()[-4000:]}") from None

    def stats(self, proc: ManagedProcess) -> dict[str, int]:
        """What the process's consumer counted (``/ready``): received, processed, rejected..."""
        answer = requests.get(f"http://127.0.0.1:{self.ports[proc.name]}/ready", timeout=10)
        answer.raise_for_status()
        return {k: int(v) for k, v in answer.json()["consumed"].items()}

    def close(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
        if self.tap is not None:
            self.tap.close()
            self.tap = None
        if self.node.alive:
            try:
                with self.node.connection() as conn:
                    channel = conn.channel()
                    for app in APPS:
                        channel.queue_delete(self.queue(app))
            except (pika.exceptions.AMQPError, OSError):
                log.warning("could not delete this bus's queues")
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def replay_argv(msg_id: str, datagrepper_url: str, conf: Path) -> list[str]:
    """``devel.replay``: a datagrepper message republished on the broker (see devel/replay.py)."""
    return [
        sys.executable,
        "-m",
        "devel.replay",
        msg_id,
        "--datagrepper-url",
        datagrepper_url,
        "--conf",
        str(conf),
    ]
