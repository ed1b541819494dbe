"""The whole pipeline on one machine, on loopback: ``with Stack() as stack`` or ``make stack``.

What runs (every port free at start, every child in its own process group,
stopped in reverse order on exit, Ctrl-C or SIGTERM; one temp dir, removed):

- ``moto_server``: the AWS endpoint (``AWS_ENDPOINT_URL``) for everything;
- the bus, one of two (``StackOptions.bus``):

  - ``fedmsg``: ``fedmsg-relay`` and ONE ``fedmsg-hub`` running fedimg stage,
    autocloud_ami and fedimg promote from their entry points, configured by a
    generated ``fedmsg.d/`` (fedmsg's backlog feature on);
  - ``amqp``: a private RabbitMQ node (``devel.rabbitmq``) and
    ``StackOptions.per_app`` processes per app of ``fedora-messaging --conf
    FILE consume`` (``fedimg.amqp:FedimgConsumer``,
    ``autocloud_ami.amqp:AmiTestConsumer``) sharing one durable queue per app,
    FILE being the repository's sample with the local URL and settings
    (``devel.amqpbus``);

  both with the same settings: staging region us-east-1, four target regions,
  short timeouts for stand-ins;
- the ResultsDB stand-in (``python -m devel.resultsdb``), publishing
  ``resultsdb.result.new`` on the bus (over AMQP as the real server does);
- the instance host (``python -m devel.instancehost``): the SSH address of
  every test instance (``autocloud_ami.ssh_override``), failing SELinux on the
  aarch64 Cloud Base image so a rejection shows next to the releases;
- in this process: a compose server with small real raw.xz images (Cloud Base
  x86_64 and aarch64, AtomicHost x86_64, and a qcow2 fedimg must ignore), a
  datagrepper stand-in holding the compose's FINISHED message under the
  PRODUCTION topic and recording the bus, and a file server for test output.

    python -m devel.stack up [--bus amqp]   # prints the endpoints and how to drive it; Ctrl-C stops
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import http.server
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final, TextIO

from devel.amqpbus import AmqpBus, replay_argv
from devel.bus import (
    BIN,
    LocalBus,
    ManagedProcess,
    WaitTimeout,
    free_port,
    wait_until,
)
from devel.compose import DEFAULT_IMAGES, ComposeServer, ComposeTree, ImageSpec, build_compose
from devel.compose import compose_message as pungi_body
from devel.datagrepper import Datagrepper
from devel.instancehost import FailRule, family_of
from devel.motoserver import MotoServer
from devel.rabbitmq import RabbitMQ
from fedimg.messages import scenario_name

log = logging.getLogger(__name__)

REPO: Final = Path(__file__).resolve().parent.parent
PRODUCTION_TOPIC: Final = "org.fedoraproject.prod.pungi.compose.status.change"
LOOPBACK: Final = "127.0.0.1"
# Worker threads per consumer in the hub: three AMI tests and the result messages at
# once (the relay always runs with one: devel.bus.LocalBus.relay_config).
HUB_SETTINGS: Final = {"moksha.workers_per_consumer": 6}
# Faults that only fail a check of one family (the rest fail a gating check of both).
FAULT_FAMILIES: Final = {
    "docker": ("Atomic",),
    "dnf": ("Base",),
    "imds-v1": ("Base",),
    "xen-root": ("Base",),
    "cloud-init": ("Base",),
}
SCENARIOS: Final = {"x86_64": ("t3.small", "t2.small"), "aarch64": ("t4g.small",)}


@dataclass(frozen=True)
class StackOptions:
    """What the stack runs; the defaults are the demo's."""

    staging_region: str = "us-east-1"
    regions: tuple[str, ...] = ("us-east-2", "us-west-2", "eu-west-1", "ap-northeast-1")
    compose_id: str = "Fedora-40-20240501.0"
    images: tuple[ImageSpec, ...] = DEFAULT_IMAGES
    fail: tuple[str, ...] = ("Fedora-Cloud-Base-*aarch64*=selinux",)
    # autocloud_ami.scenarios: every AMI is tested on each instance type of its arch.
    # x86_64: a Nitro type (NVMe root) and a Xen type; aarch64: a Graviton type.
    scenarios: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(SCENARIOS))
    boot_delay: float = 0.5
    reboot_delay: float = 0.5
    hub_timeout: float = 90.0
    extra_settings: Mapping[str, Any] = field(default_factory=dict)
    # moto_server records every AWS request (MotoServer(record=True)): the IAM policy test.
    record_aws: bool = False
    # Added to the environment of every process on the bus (hub, relay, stand-ins).
    extra_env: Mapping[str, str] = field(default_factory=dict)
    # Given moto_server's URL, the AWS endpoint of the bus processes (a recording proxy in tests).
    aws_proxy: Callable[[str], str] | None = None
    # "fedmsg" (relay + one hub) or "amqp" (RabbitMQ + per_app consumer processes per app).
    bus: str = "fedmsg"
    per_app: int = 2
    # amqp: a running node to use (tests share one) instead of starting one; a suffix for
    # the queue names, so that stacks sharing a node do not share queues.
    rabbitmq: RabbitMQ | None = None
    queue_suffix: str = ""

    def rules(self) -> list[FailRule]:
        return [FailRule.parse(text) for text in self.fail]


def expected_state(image_name: str, subvariant: str, rules: Sequence[FailRule]) -> str:
    """``rejected`` if a rule makes a gating check of this image fail, else ``released``."""
    family = family_of(subvariant)
    for rule in rules:
        if rule.matches(image_name) and family in FAULT_FAMILIES.get(rule.fault, (family,)):
            return "rejected"
    return "released"


def hub_settings(
    options: StackOptions,
    *,
    workdir: Path,
    resultsdb_url: str,
    ssh_override: str,
    datagrepper_url: str,
    output_url: str | None,
) -> dict[str, Any]:
    """Every fedmsg setting the hub's three consumers read, for stand-ins on loopback."""
    settings: dict[str, Any] = {
        # fedimg: stage and promote
        "fedimg.stage.enabled": True,
        "fedimg.promote.enabled": True,
        "fedimg.health.enabled": True,
        "fedimg.resultsdb_url": resultsdb_url,
        "fedimg.aws.staging_region": options.staging_region,
        "fedimg.aws.regions": list(options.regions),
        "fedimg.aws.volume_types": ["gp3"],
        "fedimg.aws.upload_workers": 4,
        "fedimg.aws.max_attempts": 3,
        "fedimg.aws.extra_tags": {"FedoraGroup": "cloud"},
        "fedimg.compose.allowed_hosts": [LOOPBACK],
        "fedimg.stage.workers": 3,
        "fedimg.http.timeout": 15.0,
        "fedimg.http.retries": 2,
        "fedimg.gate.deadline": 900.0,
        "fedimg.promote.max_concurrent_copies": 8,
        "fedimg.promote.copy_timeout": 120.0,
        "fedimg.promote.publish_retry_timeout": 60.0,
        "fedimg.reconcile.interval": 30.0,
        "fedimg.state_dir": str(workdir / "fedimg-state"),
        # autocloud_ami: the test runs
        "autocloud_ami.enabled": True,
        "autocloud_ami.resultsdb_url": resultsdb_url,
        "autocloud_ami.resultsdb_spool": str(workdir / "resultsdb-spool"),
        "autocloud_ami.resultsdb_retries": 2,
        "autocloud_ami.resultsdb_backoff": 0.2,
        "autocloud_ami.resultsdb_timeout": 10.0,
        "autocloud_ami.ssh_cidr": f"{LOOPBACK}/32",
        "autocloud_ami.ssh_override": ssh_override,
        "autocloud_ami.regions": [options.staging_region],
        "autocloud_ami.scenarios": {arch: list(types) for arch, types in options.scenarios.items()},
        "autocloud_ami.max_concurrent": 4,
        "autocloud_ami.queue_timeout": 300.0,
        "autocloud_ami.deadline": 600.0,
        "autocloud_ami.launch_retry_timeout": 10.0,
        "autocloud_ami.boot_timeout": 60.0,
        "autocloud_ami.ssh_timeout": 60.0,
        "autocloud_ami.reboot_timeout": 60.0,
        "autocloud_ami.cleanup_timeout": 60.0,
        "autocloud_ami.host_key_wait": 0.0,
        "autocloud_ami.poll_interval": 0.5,
        "autocloud_ami.output_dir": str(workdir / "test-output"),
        "autocloud_ami.output_url": output_url,
        "autocloud_ami.sweep_interval": 60.0,
        "autocloud_ami.aws_max_attempts": 3,
        "autocloud_ami.extra_tags": {"FedoraGroup": "cloud"},
        # fedmsg's backlog: a restarted hub replays what it missed from datagrepper
        "status_directory": str(workdir / "status"),
        "datagrepper_url": datagrepper_url,
    }
    settings.update(options.extra_settings)
    return settings


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("output server: " + format, *args)


class FileServer:
    """Serves a directory read-only on a loopback port (the test outputs' ref_url)."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        handler = functools.partial(_Quiet, directory=str(root))
        self._server = http.server.ThreadingHTTPServer((LOOPBACK, 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://{LOOPBACK}:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )

    def start(self) -> FileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class StackError(RuntimeError):
    """A part of the stack did not come up; the text says which and shows its log."""


class Stack:
    """Every part of the pipeline on loopback; ``start``/``stop`` or a ``with`` block."""

    def __init__(self, options: StackOptions | None = None) -> None:
        self.options = options or StackOptions()
        self.rules = self.options.rules()
        self.workdir: Path | None = None
        self.moto: MotoServer | None = None
        self.tree: ComposeTree | None = None
        self.compose_server: ComposeServer | None = None
        self.datagrepper: Datagrepper | None = None
        self.outputs: FileServer | None = None
        self.bus: LocalBus | AmqpBus | None = None
        self.hub: ManagedProcess | None = None  # fedmsg
        self.workers: list[ManagedProcess] = []  # the hub, or every consumer process
        self.resultsdb: ManagedProcess | None = None
        self.instancehost: ManagedProcess | None = None
        self.resultsdb_url = ""
        self.ssh_override = ""
        self.msg_id = ""
        self.started_at = 0.0
        self._exit = contextlib.ExitStack()
        self._clients: dict[str, Any] = {}
        self._clients_lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------
    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything in reverse order of start and remove the temp dir."""
        self._exit.close()

    def _start(self) -> None:
        self.started_at = time.monotonic()
        opts = self.options
        workdir = Path(tempfile.mkdtemp(prefix="fedimg-stack-"))
        self.workdir = workdir
        self._exit.callback(shutil.rmtree, workdir, ignore_errors=True)

        # Every process of the stack starts at once (each spends its first seconds importing);
        # each is waited for just before something needs it.
        self.moto = MotoServer(LOOPBACK, record=opts.record_aws)
        self._exit.callback(self.moto.stop)
        self.moto.launch()

        self.tree = build_compose(workdir / "compose-root", opts.compose_id, opts.images)
        self.compose_server = self._exit.enter_context(ComposeServer(self.tree.root))
        log.info("compose %s served at %s", self.tree.compose_id, self.compose_server.url)

        self.datagrepper = self._exit.enter_context(Datagrepper(LOOPBACK))
        self.msg_id = self.datagrepper.store.add(
            PRODUCTION_TOPIC,
            self.compose_message(),
            msg_id=f"{time.strftime('%Y')}-{uuid.uuid4()}",
        )
        self.outputs = FileServer(workdir / "test-output").start()
        self._exit.callback(self.outputs.stop)

        rdb_port, ssh_port = free_port(), free_port()
        self.resultsdb_url = f"http://{LOOPBACK}:{rdb_port}/api/v2.0"
        self.ssh_override = f"{LOOPBACK}:{ssh_port}"
        settings = hub_settings(
            opts,
            workdir=workdir,
            resultsdb_url=self.resultsdb_url,
            ssh_override=self.ssh_override,
            datagrepper_url=f"{self.datagrepper.url}/raw",
            output_url=self.outputs.url,
        )
        resultsdb_bus = self._start_bus(settings, workdir)

        self.resultsdb = self._spawn_devel(
            "resultsdb",
            [
                "devel.resultsdb",
                "--host",
                LOOPBACK,
                "--port",
                str(rdb_port),
                "--db",
                str(workdir / "resultsdb.sqlite"),
                *resultsdb_bus,
            ],
        )
        self.instancehost = self._spawn_devel(
            "instancehost",
            [
                "devel.instancehost",
                "--host",
                LOOPBACK,
                "--port",
                str(ssh_port),
                "--moto",
                self.moto.url,
                "--region",
                opts.staging_region,
                "--boot-delay",
                str(opts.boot_delay),
                "--reboot-delay",
                str(opts.reboot_delay),
                *[arg for text in opts.fail for arg in ("--fail", text)],
            ],
        )
        try:
            if isinstance(self.bus, LocalBus):
                self.bus.wait_ready()
            self.moto.wait_ready(60.0)
        except (WaitTimeout, RuntimeError) as exc:
            raise StackError(str(exc)) from exc
        log.info("moto_server on %s", self.moto.url)
        self._wait_ready(self.resultsdb, "ResultsDB stand-in listening on", 60.0)
        self._wait_ready(self.instancehost, "listening on", 60.0)
        if isinstance(self.bus, AmqpBus):
            try:
                self.workers = self.bus.start_consumers(timeout=opts.hub_timeout)
            except (WaitTimeout, RuntimeError) as exc:
                raise StackError(str(exc)) from exc
        elif isinstance(self.bus, LocalBus):
            self.hub = self.bus.start_hub(timeout=opts.hub_timeout)
            self.workers = [self.hub]
        log.info("stack up in %.1fs", time.monotonic() - self.started_at)

    def _start_bus(self, settings: dict[str, Any], workdir: Path) -> list[str]:
        """Start the bus (the relay is waited for later); ResultsDB's arguments for it."""
        opts = self.options
        assert self.datagrepper is not None
        extra_env = {**self._aws_env(), **opts.extra_env}
        if opts.bus == "amqp":
            node = opts.rabbitmq or self._exit.enter_context(RabbitMQ())
            self.bus = self._exit.enter_context(
                AmqpBus(
                    node,
                    settings=settings,
                    per_app=opts.per_app,
                    queue_suffix=opts.queue_suffix,
                    workdir=workdir / "bus",
                    extra_env=extra_env,
                )
            )
            return ["--no-bus", "--amqp-conf", str(self.bus.publisher_config)]
        if opts.bus == "fedmsg":
            local = LocalBus(
                settings={**settings, **HUB_SETTINGS},
                workdir=workdir / "bus",
                extra_env=extra_env,
            )
            self._exit.callback(local.close)
            self.bus = local.launch()  # waited for below, with the others
            self.datagrepper.record(self.bus.outbound)
            return []
        raise StackError(f"unknown bus {opts.bus!r}: fedmsg or amqp")

    def _aws_env(self) -> dict[str, str]:
        assert self.moto is not None
        env = self.moto.env()
        if self.options.aws_proxy is not None:
            env["AWS_ENDPOINT_URL"] = self.options.aws_proxy(self.moto.url)
        return env

    def _devel_env(self) -> dict[str, str]:
        """The bus environment, with this repository importable (``python -m devel.*``)."""
        env = self.env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        return env

    def _spawn_devel(self, name: str, args: list[str]) -> ManagedProcess:
        assert self.bus is not None
        return self.bus.spawn(name, [sys.executable, "-m", *args], env=self._devel_env())

    @staticmethod
    def _wait_ready(proc: ManagedProcess, marker: str, timeout: float) -> None:
        def ready() -> bool:
            if not proc.alive:
                raise StackError(f"{proc.name} exited:\n{proc.output()[-4000:]}")
            return marker in proc.output()

        try:
            wait_until(ready, timeout, f"{proc.name} to be ready", interval=0.1)
        except WaitTimeout as exc:
            raise StackError(f"{exc}:\n{proc.output()[-4000:]}") from exc

    # -- facts --------------------------------------------------------------------
    def compose_message(self) -> dict[str, Any]:
        """The pungi FINISHED body of the stack's compose (``location`` = the compose server)."""
        assert self.tree is not None and self.compose_server is not None
        return pungi_body(self.tree, self.compose_server.url)

    def raw_images(self, tree: ComposeTree | None = None) -> list[tuple[str, str, str]]:
        """(image name, arch, subvariant) of every image fedimg should stage (of ``tree``)."""
        tree = tree or self.tree
        assert tree is not None
        return [
            (i.image_name, i.spec.arch, i.spec.subvariant)
            for i in tree.raw_images()
            if i.spec.format == "raw.xz"
        ]

    def scenarios_of(self, arch: str) -> list[str]:
        """The scenarios an AMI of ``arch`` is tested in (``x86_64:t3.small``, ...)."""
        return [scenario_name(arch, t) for t in self.options.scenarios.get(arch, ())]

    def expected(self, tree: ComposeTree | None = None) -> dict[str, str]:
        """image name -> the end state it must reach (released / rejected)."""
        return {
            name: expected_state(name, subvariant, self.rules)
            for name, _arch, subvariant in self.raw_images(tree)
        }

    @property
    def fedmsg_config(self) -> Path:
        assert self.bus is not None and self.bus.workdir is not None
        return self.bus.workdir / "fedmsg.d"

    def env(self) -> dict[str, str]:
        """The environment of a process that talks to this stack (bus and AWS)."""
        assert self.bus is not None
        return self.bus.env()

    def ec2(self, region: str) -> Any:
        """A boto3 EC2 client of ``region`` on the stack's moto_server (cached)."""
        assert self.moto is not None
        import boto3

        with self._clients_lock:
            if region not in self._clients:
                creds = self.moto.env()
                self._clients[region] = boto3.client(
                    "ec2",
                    region_name=region,
                    endpoint_url=self.moto.url,
                    aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                    aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
                    aws_session_token=creds["AWS_SESSION_TOKEN"],
                )
            return self._clients[region]

    def processes(self) -> list[ManagedProcess]:
        return list(self.bus.processes) if self.bus is not None else []

    def replay(
        self, msg_id: str | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Replay a datagrepper message onto the bus: ``fedmsg-dg-replay`` or ``devel.replay``."""
        assert self.bus is not None and self.datagrepper is not None
        return subprocess.run(
            self.replay_argv(msg_id),
            cwd=self.bus.workdir,
            env=self._devel_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    @property
    def replay_tool(self) -> str:
        return "devel.replay" if isinstance(self.bus, AmqpBus) else "fedmsg-dg-replay"

    def replay_argv(self, msg_id: str | None = None) -> list[str]:
        assert self.datagrepper is not None
        if isinstance(self.bus, AmqpBus):
            return replay_argv(
                msg_id or self.msg_id, self.datagrepper.url, self.bus.publisher_config
            )
        return [
            str(BIN / "fedmsg-dg-replay"),
            "--msg-id",
            msg_id or self.msg_id,
            "--datagrepper-url",
            self.datagrepper.url,
        ]

    def commands(self) -> dict[str, str]:
        """How to drive the running stack from another shell, exactly.

        fedmsg 1.1's command-line tools (and ``fedimg``) read ``./fedmsg.d`` of the
        working directory and ignore ``$FEDMSG_CONFIG``: every command runs in
        the bus directory (the repository's own ``fedmsg.d`` has other ports).
        """
        assert self.moto is not None and self.bus is not None
        where = shlex.quote(str(self.bus.workdir))
        bus = (
            f"cd {where} && env -u VIRTUAL_ENV FEDMSG_CONFIG={shlex.quote(str(self.fedmsg_config))}"
        )
        aws = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.moto.env().items())
        body = shlex.quote(json.dumps({"status": "DOOMED", "compose_id": self.options.compose_id}))
        if isinstance(self.bus, AmqpBus):
            return self._amqp_commands(self.bus, bus, aws, body)
        return {
            "replay the recorded compose message (what `make demo` does)": (
                f"{bus} {shlex.join(self.replay_argv())}"
            ),
            "tail the bus": f"{bus} {BIN}/fedmsg-tail --really-pretty",
            "staged AMIs, their tests and copies": f"{bus} {aws} {BIN}/fedimg status",
            "resume unfinished promotions": f"{bus} {aws} {BIN}/fedimg reconcile",
            "publish your own message": (
                f"echo {body} | ({bus} {BIN}/fedmsg-logger --json-input "
                "--modname pungi --topic compose.status.change)"
            ),
            "results in ResultsDB": f"curl -s '{self.resultsdb_url}/results?limit=5'",
        }

    def _amqp_commands(self, amqp: AmqpBus, bus: str, aws: str, body: str) -> dict[str, str]:
        """The commands of an AMQP stack: fedora-messaging's CLI with the stack's configs."""
        conf = shlex.quote(str(amqp.publisher_config))
        replay = shlex.join(self.replay_argv())
        fm = f"{BIN}/fedora-messaging --conf {conf}"
        printer = "fedora_messaging.example:printer"
        return {
            "replay the recorded compose message (what `make demo BUS=amqp` does)": (
                f"cd {shlex.quote(str(REPO))} && {replay}"
            ),
            "tail the bus (a queue of its own, removed when you stop it)": (
                f"{fm} consume --callback {printer} --routing-key '#' "
                f"--queue-name tail-$$ --app-name tail"
            ),
            "staged AMIs, their tests and copies": f"{bus} {aws} {BIN}/fedimg status",
            "resume unfinished promotions (no bus: the consumers also run a pass)": (
                f"{bus} {aws} {BIN}/fedimg --no-publish reconcile"
            ),
            "publish your own message": (
                f"echo {body} | {sys.executable} -c "
                "'import json,sys; from fedora_messaging import api, message; "
                'api.publish(message.Message(topic="pungi.compose.status.change", '
                "body=json.load(sys.stdin)))' "
                f"# with FEDORA_MESSAGING_CONF={conf}"
            ),
            "results in ResultsDB": f"curl -s '{self.resultsdb_url}/results?limit=5'",
        }

    def describe(self) -> str:
        """The endpoints and the commands, for a person at a terminal."""
        assert self.moto and self.bus and self.datagrepper and self.compose_server
        assert self.outputs is not None and self.workers
        if isinstance(self.bus, AmqpBus):
            bus_lines = [
                f"  RabbitMQ              {self.bus.node.url}",
                *(
                    f"  {w.name:<21} pid {w.proc.pid if w.proc else '?'} "
                    f"(fedora-messaging consume, queue {self.bus.queue(w.name.rsplit('-', 1)[0])})"
                    for w in self.workers
                ),
            ]
        else:
            assert self.hub is not None and self.hub.proc is not None
            bus_lines = [
                f"  fedmsg relay          in {self.bus.inbound}  out {self.bus.outbound}",
                f"  fedmsg-hub            pid {self.hub.proc.pid} (fedimg stage, autocloud_ami, "
                "fedimg promote)",
            ]
        lines = [
            "fedimg local stack (loopback only; Ctrl-C stops everything)",
            "",
            f"  AWS (moto_server)     {self.moto.url}",
            *bus_lines,
            f"  ResultsDB stand-in    {self.resultsdb_url}",
            f"  instance SSH stand-in {self.ssh_override}  (fails: {', '.join(self.options.fail)})",
            f"  compose               {self.compose_server.url}",
            f"  datagrepper stand-in  {self.datagrepper.url}  (recorded msg {self.msg_id})",
            f"  test output           {self.outputs.url}",
            f"  fedmsg config         {self.fedmsg_config} (the CLIs' settings)",
            f"  logs                  {self.bus.workdir}/*.log",
            f"  staging region        {self.options.staging_region}; targets "
            f"{', '.join(self.options.regions)}",
            "",
        ]
        for what, command in self.commands().items():
            lines += [f"# {what}", command, ""]
        return "\n".join(lines)


# -- python -m devel.stack up -----------------------------------------------------------


class Stopped(Exception):
    """SIGTERM or SIGHUP arrived: unwind, so that every ``with`` block tears down."""


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into ``Stopped`` (Ctrl-C already raises KeyboardInterrupt)."""
    previous = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_up(options: StackOptions, out: TextIO | None = None) -> int:
    """Bring the stack up, print how to use it, wait for Ctrl-C/SIGTERM, tear it down."""
    out = out or sys.stdout
    try:
        with stop_on_signals(), Stack(options) as stack:
            print(stack.describe(), file=out, flush=True)
            # A signal interrupts this wait with KeyboardInterrupt/Stopped.
            while all(w.alive for w in stack.workers):
                time.sleep(0.5)
            gone = next(w for w in stack.workers if not w.alive)
            print(f"{gone.name} exited:\n{gone.output()[-4000:]}", file=sys.stderr)
            return 1
    except (KeyboardInterrupt, Stopped):
        print("stopped; everything torn down", file=out, flush=True)
        return 0
    except StackError as exc:
        print(f"the stack did not come up: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devel.stack", description=__doc__)
    parser.add_argument("command", choices=["up"])
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--bus", choices=["fedmsg", "amqp"], default="fedmsg")
    parser.add_argument(
        "--fail",
        action="append",
        metavar="GLOB=FAULT",
        help="instance misbehaviour by image name (default: the aarch64 Cloud Base fails selinux)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    options = StackOptions(bus=args.bus)
    if args.fail is not None:
        options = dataclasses.replace(options, fail=tuple(args.fail))
    try:
        options.rules()
    except ValueError as exc:
        parser.error(str(exc))
    return run_up(options)


if __name__ == "__main__":
    sys.exit(main())
