"""A private RabbitMQ node on free loopback ports: Debian's ``rabbitmq-server``, run directly.

Debian's ``/usr/sbin/rabbitmq-server`` switches to the ``rabbitmq`` user, who
cannot write a data directory another user made, and the packaged service is
the machine's. So the node is started with
``/usr/lib/rabbitmq/bin/rabbitmq-server`` and an environment of its own: node
name, AMQP, distribution and epmd ports (picked free), data, logs, config,
enabled plugins and ``HOME`` (the Erlang cookie), all under one directory.
Its own ``epmd`` runs beside it (the node is told not to start one), so
nothing outlives ``stop()``; both are stopped by their process ids, never by
name.

Ready means an AMQP connection to the node succeeded; a start waits for that
with a deadline (a node takes tens of seconds on a busy 2-core machine) and
raises ``RabbitMQTimeout``. ``restart()`` stops the node and starts it again
on the same directory and ports (durable queues and persistent messages
survive, clients see the broker go away and come back); ``kill_node()`` is the
crash for fault tests. A stock node lets ``guest`` in from loopback only,
which is all tests and the devel stack need.

    python -m devel.rabbitmq    # start a node, print its URL, stop on Ctrl-C
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from devel.bus import ManagedProcess, WaitTimeout, free_port, wait_for_port, wait_until

log = logging.getLogger(__name__)

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
DEBIAN_PACKAGE = "rabbitmq-server"
START_TIMEOUT = 300.0
EPMD_TIMEOUT = 60.0
STOP_GRACE = 60.0


class RabbitMQError(RuntimeError):
    """The node cannot run here (not installed) or exited while starting."""


class RabbitMQTimeout(WaitTimeout):
    """The node did not accept an AMQP connection before the deadline."""


def _epmd_binary() -> str:
    found = shutil.which("epmd") or next(
        (str(p) for p in sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"))), None
    )
    if found is None:
        raise RabbitMQError(f"epmd not found: install Debian's {DEBIAN_PACKAGE} (see .ci/run)")
    return found


class RabbitMQ:
    """One private node: ``with RabbitMQ() as rmq: rmq.url``."""

    def __init__(self, workdir: Path | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.amqp_port, self.dist_port, self.epmd_port = (free_port() for _ in range(3))
        self.nodename = f"fedimg-{uuid.uuid4().hex[:8]}@localhost"
        self._own_workdir = workdir is None
        self.workdir = workdir
        self._node: ManagedProcess | None = None
        self._epmd: ManagedProcess | None = None
        self.starts: list[float] = []  # seconds each start took until ready

    # -- addresses ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The AMQP URL of the node (``guest``, default vhost)."""
        return f"amqp://guest:guest@{self.host}:{self.amqp_port}/%2F"

    def env(self) -> dict[str, str]:
        """The node's environment: every path and port of its own."""
        assert self.workdir is not None, "start() first"
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k != "HOME"
        }
        return {
            **base,
            "HOME": str(self.workdir / "home"),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": self.host,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": self.host,
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.workdir / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.workdir / "rabbitmq-env.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-start_epmd false",
        }

    # -- life cycle ----------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT) -> RabbitMQ:
        """Start epmd and the node; return once an AMQP connection succeeds."""
        if not SERVER.exists():
            raise RabbitMQError(
                f"{SERVER} not found: install Debian's {DEBIAN_PACKAGE} (.ci/run does)"
            )
        self._prepare()
        try:
            self._start_epmd()
            self._start_node(timeout)
        except BaseException:
            self.kill_node()  # never ready: nothing to shut down cleanly
            self.stop()
            raise
        return self

    def _prepare(self) -> None:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="fedimg-rabbitmq-"))
        for sub in ("home", "mnesia", "log"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        (self.workdir / "enabled_plugins").write_text("[].\n")
        (self.workdir / "rabbitmq-env.conf").write_text("# see devel/rabbitmq.py\n")
        (self.workdir / "rabbitmq.conf").write_text(
            "# A private test node (devel/rabbitmq.py); ports come from the environment.\n"
            "log.file.level = info\n"
        )

    def _start_epmd(self, timeout: float = EPMD_TIMEOUT) -> None:
        if self._epmd is not None and self._epmd.alive:
            return
        assert self.workdir is not None
        self._epmd = ManagedProcess(
            name="epmd",
            argv=[_epmd_binary(), "-port", str(self.epmd_port), "-address", self.host],
            cwd=self.workdir,
            env=self.env(),
            log_path=self.workdir / "epmd.log",
        ).start()
        try:
            wait_for_port(self.host, self.epmd_port, timeout, f"epmd on port {self.epmd_port}")
        except WaitTimeout as exc:
            raise RabbitMQTimeout(f"{exc}\n{self._epmd.output()[-2000:]}") from exc

    def _start_node(self, timeout: float) -> None:
        assert self.workdir is not None
        began = time.monotonic()
        self._node = ManagedProcess(
            name="rabbitmq-server",
            argv=[str(SERVER)],
            cwd=self.workdir,
            env=self.env(),
            log_path=self.workdir / "node.log",
        ).start()
        try:
            wait_until(self._ready, timeout, f"RabbitMQ {self.nodename} on {self.url}", 0.5)
        except WaitTimeout as exc:
            raise RabbitMQTimeout(f"{exc}\n{self.output()[-3000:]}") from exc
        self.starts.append(time.monotonic() - began)
        log.info("RabbitMQ %s ready on %s after %.1fs", self.nodename, self.url, self.starts[-1])

    def _ready(self) -> bool:
        if self._node is None or not self._node.alive:
            raise RabbitMQError(f"rabbitmq-server exited while starting:\n{self.output()[-3000:]}")
        try:  # a plain TCP probe first: pika logs every refused attempt as an error
            socket.create_connection((self.host, self.amqp_port), timeout=2.0).close()
            self.connection(timeout=2.0).close()
        except (pika.exceptions.AMQPError, OSError):
            return False
        return True

    @property
    def alive(self) -> bool:
        return self._node is not None and self._node.alive

    @property
    def pids(self) -> dict[str, int]:
        """The pids this object owns (node wrapper, epmd)."""
        found = {}
        for proc in (self._node, self._epmd):
            if proc is not None and proc.proc is not None and proc.alive:
                found[proc.name] = proc.proc.pid
        return found

    def stop_node(self, grace: float = STOP_GRACE) -> int | None:
        """SIGTERM the node's process group (a clean shutdown), SIGKILL after ``grace``."""
        if self._node is None:
            return None
        code = self._node.stop(grace)
        self._node = None
        return code

    def kill_node(self) -> None:
        """SIGKILL the node now (a broker crash); ``restart()`` brings it back."""
        if self._node is not None:
            self._node.kill()
            self._node.stop(grace=1)
            self._node = None

    def restart(self, timeout: float = START_TIMEOUT) -> RabbitMQ:
        """Stop the node and start it again on the same directory and ports."""
        self.stop_node()
        self._start_epmd()
        self._start_node(timeout)
        return self

    def stop(self) -> None:
        """Stop the node, then its epmd; remove the directory if this object made it."""
        self.stop_node()
        if self._epmd is not None:
            self._epmd.stop()
            self._epmd = None
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> RabbitMQ:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def output(self) -> str:
        """The node's console output and log file (for failure messages)."""
        if self.workdir is None:
            return ""
        parts = [p.read_text(errors="replace") for p in sorted(self.workdir.glob("log/*.log"))]
        console = self.workdir / "node.log"
        if console.exists():
            parts.insert(0, console.read_text(errors="replace"))
        return "\n".join(parts)

    # -- plain AMQP (pika), for tests and the devel stack ----------------------------------------
    def connection(self, timeout: float = 10.0) -> pika.BlockingConnection:
        """A new blocking pika connection to the node (the caller closes it)."""
        params = pika.URLParameters(self.url)
        params.connection_attempts = 1
        params.socket_timeout = timeout
        params.blocked_connection_timeout = timeout
        params.stack_timeout = timeout
        return pika.BlockingConnection(params)

    def declare_queue(
        self, name: str, routing_keys: Sequence[str], exchange: str = "amq.topic"
    ) -> None:
        """A durable named queue bound to ``routing_keys``, as infrastructure pre-creates one."""
        with self.connection() as conn:
            channel = conn.channel()
            channel.queue_declare(name, durable=True)
            for key in routing_keys:
                channel.queue_bind(name, exchange, routing_key=key)

    def queue_depth(self, name: str) -> int:
        """Messages ready in queue ``name`` (it must exist)."""
        with self.connection() as conn:
            frame: Any = conn.channel().queue_declare(name, passive=True)
            return int(frame.method.message_count)


# -- fedora-messaging configs for a node ---------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+\Z")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return json.dumps(value)  # JSON numbers and strings are TOML ones too
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{" + inner + "}"
    raise TypeError(f"no TOML form for {type(value).__name__} {value!r}")


def toml_text(config: Mapping[str, Any]) -> str:
    """``config`` (as ``tomllib`` reads a fedora-messaging file) written back as TOML."""
    lines: list[str] = []
    tables: list[str] = []
    for key, value in config.items():
        if isinstance(value, Mapping):
            tables.append(f"\n[{_toml_key(key)}]")
            tables += [f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for item in value:
                tables.append(f"\n[[{_toml_key(key)}]]")
                tables += [f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in item.items()]
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines + tables) + "\n"


def write_client_config(path: Path, url: str, base: Mapping[str, Any]) -> Path:
    """Write ``base`` (a fedora-messaging config) pointed at ``url`` to ``path``."""
    path.write_text(toml_text({**base, "amqp_url": url}))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A private RabbitMQ node on free ports.")
    parser.add_argument("--dir", type=Path, help="data directory (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=START_TIMEOUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    node = RabbitMQ(args.dir).start(args.timeout)
    try:
        print(f"RabbitMQ {node.nodename} on {node.url} (started in {node.starts[0]:.1f}s)")
        print(f"data in {node.workdir}; Ctrl-C stops it", flush=True)
        done.wait()
    finally:
        node.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
