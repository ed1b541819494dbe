"""A real fedmsg bus on loopback: fedmsg-relay, fedmsg-hub, a publisher and a tap.

Used by ``devel/stack.py`` and the integration tests. Every port is picked
free at start; every process is started in its own process group and killed
with it on exit; every wait has a deadline and raises ``WaitTimeout``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pprint
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import zmq

log = logging.getLogger(__name__)

BIN = Path(sys.executable).parent


class WaitTimeout(TimeoutError):
    """A condition did not hold before its deadline."""


# Ports are handed out BELOW the kernel's ephemeral range (ip_local_port_range,
# 32768-60999 by default): neither another process's bind(0) nor an outgoing
# connection takes one between the moment it is picked and the moment its server
# binds it. A counter shared by every process of the machine (a file under flock)
# hands each port out once, so parallel test workers, the stacks they spawn and a
# developer's own stack never pick the same one. The file is machine-wide on
# purpose (not under $TMPDIR, which tests and the demo point at private folders).
# Per user, opened without following a symbolic link.
PORT_FLOOR = 20000
_PORT_COUNTER = Path(f"/tmp/fedimg-free-port-{os.getuid()}.next")  # noqa: S108 (see above)


def _port_range() -> range:
    try:
        first = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first = 32768
    return range(PORT_FLOOR, max(PORT_FLOOR, min(first, 65536)))


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, handed to no one else before."""
    ports = _port_range()
    if len(ports) < 1000:  # an unusual ip_local_port_range: let the kernel pick
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    fd = os.open(_PORT_COUNTER, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with open(fd, "r+", encoding="ascii") as counter:
        fcntl.flock(counter, fcntl.LOCK_EX)  # released when the file is closed
        text = counter.read().strip()
        at = int(text) % len(ports) if text.isdigit() else os.getpid() % len(ports)
        for _ in range(len(ports)):
            port = ports[at]
            at = (at + 1) % len(ports)
            if _bindable(port):
                break
        else:
            raise OSError(f"no free port in {ports.start}-{ports.stop - 1}")
        counter.seek(0)
        counter.truncate()
        counter.write(str(at))
    return port


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_for_port(host: str, port: int, timeout: float, what: str) -> None:
    """Wait until something accepts TCP connections on host:port."""

    def accepting() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_until(accepting, timeout, what)


@dataclass
class ManagedProcess:
    """A child process in its own process group, logged to a file, always stopped."""

    name: str
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log_file: IO[bytes] | None = None

    def start(self) -> ManagedProcess:
        self._log_file = open(self.log_path, "ab")  # closed in stop()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.debug("started %s pid %s: %s", self.name, self.proc.pid, self.argv)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive and self.proc is not None:
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the group, then SIGKILL after ``grace`` seconds; return the exit code."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        # Anything left in the group (grandchildren) goes too.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole group now (a crash, for fault tests)."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass(frozen=True)
class Seen:
    """One message seen on the relay's outbound socket."""

    topic: str
    body: dict[str, Any]
    envelope: dict[str, Any]
    at: float


class Recording:
    """Messages seen on a bus, in arrival order, and waits on them (a tap's memory)."""

    def __init__(self) -> None:
        self._seen: list[Seen] = []
        self._cond = threading.Condition()

    def add(self, seen: Seen) -> None:
        with self._cond:
            self._seen.append(seen)
            self._cond.notify_all()

    def messages(self, suffix: str | None = None) -> list[Seen]:
        with self._cond:
            return [m for m in self._seen if suffix is None or m.topic.endswith(suffix)]

    def wait_for(
        self,
        suffix: str,
        predicate: Callable[[dict[str, Any]], bool] = lambda body: True,
        timeout: float = 60.0,
    ) -> Seen:
        """The first message whose topic ends with ``suffix`` and whose body matches."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self._seen:
                    if m.topic.endswith(suffix) and predicate(m.body):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    topics = sorted({m.topic for m in self._seen})
                    raise WaitTimeout(f"no {suffix} message within {timeout:.0f}s; saw {topics}")
                self._cond.wait(left)


class Tap(Recording):
    """Subscribes to the relay's outbound socket and records every message."""

    def __init__(self, endpoint: str) -> None:
        super().__init__()
        self.endpoint = endpoint
        self._ctx: zmq.Context[Any] = zmq.Context.instance()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bus-tap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not dict(poller.poll(100)):
                    continue
                frames = sock.recv_multipart()
                try:
                    topic, payload = frames[0], frames[1]
                    envelope = json.loads(payload)
                except (IndexError, ValueError):
                    log.warning("bus tap: skipped a message that is not [topic, json]")
                    continue
                self.add(Seen(topic.decode(), envelope.get("msg", {}), envelope, time.time()))
        finally:
            sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def write_fedmsg_config(directory: Path, config: Mapping[str, Any]) -> Path:
    """Write ``config`` as ``directory/fedmsg.d/base.py``; return the fedmsg.d path."""
    confd = directory / "fedmsg.d"
    confd.mkdir(parents=True, exist_ok=True)
    text = "# Generated by devel/bus.py for a loopback bus.\nconfig = " + pprint.pformat(
        dict(config), width=100
    )
    (confd / "base.py").write_text(text + "\n")
    return confd


class Spawner:
    """Processes started in a bus's work directory, logged there, remembered to be stopped."""

    workdir: Path | None
    processes: list[ManagedProcess]

    def env(self) -> dict[str, str]:
        raise NotImplementedError

    def spawn(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start a process that reads this bus's config (fedmsg reads ./fedmsg.d)."""
        assert self.workdir is not None
        proc = ManagedProcess(
            name=name,
            argv=argv,
            cwd=cwd or self.workdir,
            env=env or self.env(),
            log_path=self.workdir / f"{name}-{len(self.processes)}.log",
        ).start()
        self.processes.append(proc)
        return proc


@dataclass
class LocalBus(Spawner):
    """A relay (and optionally hubs) on free loopback ports, in a temp dir."""

    settings: dict[str, Any] = field(default_factory=dict)
    prefix: str = "org.fedoraproject"
    environment: str = "dev"
    workdir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: list[ManagedProcess] = field(default_factory=list)
    _own_workdir: bool = False
    _pub: Any = None
    _pub_lock: threading.Lock = field(default_factory=threading.Lock)
    tap: Tap | None = None

    def __post_init__(self) -> None:
        self.inbound = f"tcp://127.0.0.1:{free_port()}"
        self.outbound = f"tcp://127.0.0.1:{free_port()}"

    # -- configuration ----------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The fedmsg config the hubs and tools of this bus read."""
        base: dict[str, Any] = {
            "topic_prefix": self.prefix,
            "environment": self.environment,
            "active": True,
            "relay_inbound": [self.inbound],
            "endpoints": {"relay_outbound": [self.outbound]},
            "fedmsg.consumers.relay.enabled": False,
            "sign_messages": False,
            "validate_signatures": False,
            "zmq_enabled": True,
            "post_init_sleep": 0.3,
            "moksha.workers_per_consumer": 4,
            "fedimg.health.enabled": True,
        }
        if self.workdir is not None:
            # Durable intents and locks of this bus's processes, never the machine's
            # /var/lib/fedimg (the default): tests run side by side, and a reconcile
            # pass would stage another test's compose.
            base["fedimg.state_dir"] = str(self.workdir / "fedimg-state")
        base.update(self.settings)
        return base

    def relay_config(self) -> dict[str, Any]:
        """The relay's own config: ONE worker thread.

        fedmsg's RelayConsumer forwards every message through one zmq PUB socket
        from each moksha worker thread; zmq sockets are not thread-safe, so with
        more workers the frames of concurrent messages interleave.
        """
        return {
            **self.config(),
            "fedmsg.consumers.relay.enabled": True,
            "moksha.workers_per_consumer": 1,
        }

    def topic(self, modname: str, name: str) -> str:
        return f"{self.prefix}.{self.environment}.{modname}.{name}"

    def env(self, confdir: Path | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("VIRTUAL_ENV", None)  # fedmsg would read $VIRTUAL_ENV/etc/fedmsg.d
        assert self.workdir is not None
        env["FEDMSG_CONFIG"] = str((confdir or self.workdir) / "fedmsg.d")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    # -- lifecycle --------------------------------------------------------
    def __enter__(self) -> LocalBus:
        self.launch()
        try:
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def launch(self) -> LocalBus:
        """Start the relay without waiting for it to relay (``wait_ready`` waits)."""
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="fedimg-bus-"))
            self._own_workdir = True
        write_fedmsg_config(self.workdir, self.config())
        relay_dir = self.workdir / "relay"
        write_fedmsg_config(relay_dir, self.relay_config())
        try:
            self.spawn("relay", [str(BIN / "fedmsg-relay")], env=self.env(relay_dir), cwd=relay_dir)
            self.tap = Tap(self.outbound)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
        if self.tap is not None:
            self.tap.close()
            self.tap = None
        if self._pub is not None:
            self._pub.close()
            self._pub = None
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def start_hub(self, name: str = "hub", timeout: float = 60.0) -> ManagedProcess:
        """Start ``fedmsg-hub`` (consumers from their entry points) and wait until it answers."""
        hub = self.spawn(name, [str(BIN / "fedmsg-hub")])
        self.wait_hub(hub, timeout)
        return hub

    def wait_hub(self, hub: ManagedProcess, timeout: float = 60.0) -> None:
        """Ping the hub's health consumer until it pongs (its subscriptions are live)."""
        token = uuid.uuid4().hex
        assert self.tap is not None
        tap = self.tap
        deadline = time.monotonic() + timeout
        while True:
            if not hub.alive:
                raise RuntimeError(f"{hub.name} exited:\n{hub.output()[-4000:]}")
            self.publish("fedimg", "hub.ping", {"token": token})
            try:
                tap.wait_for("fedimg.hub.pong", lambda b: b.get("token") == token, timeout=0.5)
                return
            except WaitTimeout:
                if time.monotonic() >= deadline:
                    raise WaitTimeout(
                        f"{hub.name} did not answer within {timeout:.0f}s:\n{hub.output()[-4000:]}"
                    ) from None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until a message published now comes back through the relay."""
        token = uuid.uuid4().hex
        assert self.tap is not None
        tap = self.tap
        deadline = time.monotonic() + timeout
        while True:
            self.publish("devel", "bus.probe", {"token": token})
            try:
                tap.wait_for("devel.bus.probe", lambda b: b.get("token") == token, timeout=0.3)
                return
            except WaitTimeout:
                if time.monotonic() >= deadline:
                    relay = self.processes[0]
                    raise WaitTimeout(f"relay not relaying:\n{relay.output()[-4000:]}") from None

    # -- publishing -------------------------------------------------------
    def publish(self, modname: str, name: str, body: dict[str, Any]) -> None:
        """Publish like fedmsg.publish does: a fedmsg envelope to relay_inbound."""
        topic = self.topic(modname, name)
        envelope = {
            "topic": topic,
            "msg": body,
            "msg_id": f"{time.strftime('%Y')}-{uuid.uuid4()}",
            "timestamp": time.time(),
            "i": 1,
            "username": "devel",
            "crypto": None,
        }
        with self._pub_lock:
            if self._pub is None:
                self._pub = zmq.Context.instance().socket(zmq.PUB)
                self._pub.setsockopt(zmq.LINGER, 0)
                self._pub.connect(self.inbound)
            self._pub.send_multipart([topic.encode(), json.dumps(envelope).encode()])


@contextmanager
def local_bus(**kwargs: Any) -> Iterator[LocalBus]:
    with LocalBus(**kwargs) as bus:
        yield bus
