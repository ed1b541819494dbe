"""Kill the hub at every stage of the pipeline, restart it, and check nothing was lost or leaked.

One ``devel.stack.Stack`` (moto_server, relay, ONE fedmsg-hub with all
consumers, the ResultsDB stand-in, the instance SSH stand-in, datagrepper
with fedmsg's backlog on) serves every kill point; each kill point stages a
compose of its own (a Cloud Base x86_64 image the instance host passes and an
aarch64 one it fails on SELinux) so its images end released or rejected.

Hitting a precise point: the hub reaches AWS through ``AwsGate``, an HTTP
proxy in front of moto_server in this process (the hub's ``AWS_ENDPOINT_URL``),
and reaches the test instances through ``SshGate``, a TCP proxy in front of
the instance host (``autocloud_ami.ssh_override``). An armed rule holds the
n-th matching request (and, by default, every AWS request after it: the
world stops at that call), reports the hit, and the test SIGKILLs the hub's
process group. Held requests are then dropped, never forwarded: what the
dead hub was doing did not happen. The hub is started again and must finish
everything from AWS tags, ResultsDB and the backlog alone. No production
code knows about any of this.

After each kill point (its own test), every image must end released everywhere
exactly once or rejected: one staging AMI per image, one copy per target
region for a released image and none for a rejected one, one snapshot per
image, no public AMI whose ``autocloud.ami.all`` did not pass. The test
resources a killed test run leaked (instance, key pair, security group) are
removed by autocloud_ami's sweeper once their deadline passes; the last test
waits for that and checks nothing of any kill point is left.
"""

from __future__ import annotations

import http.client
import http.server
import json
import logging
import re
import shutil
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

import devel.stack
from devel.awscalls import call_of
from devel.bus import WaitTimeout, free_port, wait_until
from devel.compose import ComposeServer, ComposeTree, ImageSpec, build_compose, compose_message
from devel.demo import is_public, leftovers, read_tests
from devel.motoserver import MotoServer
from devel.stack import Stack, StackOptions, expected_state
from fedimg import tags
from fedimg.copies import copy_names

pytestmark = [pytest.mark.integration, pytest.mark.slow]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
STAGING = "us-east-1"
TARGETS = ("us-east-2", "eu-west-1", "ap-northeast-1")
SUMMARY = "autocloud.ami.all"
HIT_TIMEOUT = 90.0
SETTLE_TIMEOUT = 150.0
# Short clocks so that recovery shows within a test; production's are hours.
CRASH_SETTINGS: dict[str, Any] = {
    # One image at a time: a crash mid-upload leaves the other image with no trace.
    "fedimg.stage.workers": 1,
    "fedimg.reconcile.interval": 2.0,
    "fedimg.reconcile.orphan_grace": 2.0,
    "fedimg.gate.retest_after": 12.0,
    "fedimg.gate.deadline": 240.0,
    "fedimg.promote.copy_timeout": 60.0,
    "autocloud_ami.deadline": 35.0,
    "autocloud_ami.boot_timeout": 20.0,
    "autocloud_ami.ssh_timeout": 20.0,
    "autocloud_ami.reboot_timeout": 20.0,
    "autocloud_ami.cleanup_timeout": 20.0,
    "autocloud_ami.sweep_interval": 2.0,
    "autocloud_ami.queue_timeout": 60.0,
}
# fedmsg's default logging config leaves fedimg's and autocloud_ami's INFO lines out.
_CONSOLE = {"level": "INFO", "propagate": False, "handlers": ["console"]}
CRASH_SETTINGS["logging"] = {
    "version": 1,
    "formatters": {"bare": {"format": "[%(asctime)s][%(name)s %(levelname)s] %(message)s"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "bare",
            "level": "INFO",
            "stream": "ext://sys.stdout",
        }
    },
    "loggers": {name: _CONSOLE for name in ("fedmsg", "moksha", "fedimg", "autocloud_ami")},
}
_SCOPE = re.compile(r"Credential=[^/]+/\d{8}/([a-z0-9-]+)/([a-z0-9-]+)/aws4_request")


# -- the AWS gate: an HTTP proxy in front of moto_server --------------------------------------


@dataclass(frozen=True)
class Call:
    """One AWS request that went through the gate."""

    region: str
    service: str
    operation: str
    params: dict[str, list[str]]

    def param(self, name: str) -> str:
        return (self.params.get(name) or [""])[0]

    def tag(self, key: str) -> str | None:
        """The value of tag ``key`` in a CreateTags request, else None."""
        for name, values in self.params.items():
            if name.startswith("Tag.") and name.endswith(".Key") and values == [key]:
                return self.param(name[: -len("Key")] + "Value")
        return None


@dataclass
class Rule:
    """Hold the ``nth`` request matching ``match``; with ``freeze`` every later one too."""

    match: Callable[[Call], bool]
    nth: int = 1
    freeze: bool = True
    seen: int = 0
    hit: threading.Event = field(default_factory=threading.Event)
    dropped: threading.Event = field(default_factory=threading.Event)
    first: Call | None = None

    def wait_hit(self, timeout: float = HIT_TIMEOUT) -> Call:
        if not self.hit.wait(timeout):
            raise WaitTimeout(f"the kill point was not reached within {timeout:.0f}s")
        assert self.first is not None
        return self.first


class _QuietHTTPServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("AWS gate: a connection from %s broke", client_address)


class AwsGate:
    """Forwards every AWS request to moto_server, except what an armed rule holds."""

    def __init__(self, target: str) -> None:
        self.target = target.removeprefix("http://")
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._rule: Rule | None = None
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                gate.handle(self)

            do_POST = do_PUT = do_DELETE = do_HEAD = do_GET

        self._server = _QuietHTTPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://{LOOPBACK}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def arm(self, rule: Rule) -> Rule:
        with self._lock:
            self._rule = rule
        return rule

    def drop(self) -> None:
        """Discard every held request (their process is dead) and pass everything again."""
        with self._lock:
            rule, self._rule = self._rule, None
        if rule is not None:
            rule.dropped.set()

    def close(self) -> None:
        self.drop()
        self._server.shutdown()
        self._server.server_close()

    def _classify(self, req: http.server.BaseHTTPRequestHandler, body: bytes) -> Call:
        headers = {k.lower(): v for k, v in req.headers.items()}
        scope = _SCOPE.search(headers.get("authorization", ""))
        region, service = (scope.group(1), scope.group(2)) if scope else ("?", "?")
        text = "" if service == "ebs" else body.decode("utf-8", "replace")
        entry: dict[str, object] = {
            "headers": headers,
            "url": req.path,
            "method": req.command,
            "body": text,
        }
        found = call_of(entry)
        params = parse_qs(text) if service == "ec2" else {}
        return Call(region, service, found.operation if found else "?", params)

    def _hold(self, call: Call) -> Rule | None:
        with self._lock:
            self.calls.append(call)
            rule = self._rule
            if rule is None:
                return None
            if rule.hit.is_set():
                return rule if rule.freeze else None
            if not rule.match(call):
                return None
            rule.seen += 1
            if rule.seen < rule.nth:
                return None
            rule.first = call
            rule.hit.set()
            return rule

    def handle(self, req: http.server.BaseHTTPRequestHandler) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else b""
        call = self._classify(req, body)
        rule = self._hold(call)
        if rule is not None:
            # Never forwarded: the hub is killed while this request waits.
            rule.dropped.wait(300)
            req.close_connection = True
            return
        headers = {
            k: v for k, v in req.headers.items() if k.lower() not in ("expect", "connection")
        }
        upstream = http.client.HTTPConnection(self.target, timeout=60)
        try:
            upstream.request(req.command, req.path, body=body or None, headers=headers)
            resp = upstream.getresponse()
            data = resp.read()
            req.send_response(resp.status)
            for key, value in resp.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    req.send_header(key, value)
            req.send_header("Content-Length", str(len(data)))
            req.end_headers()
            if req.command != "HEAD":
                req.wfile.write(data)
        except OSError:
            req.close_connection = True
        finally:
            upstream.close()


class GatedMoto(MotoServer):
    """moto_server whose ``env()`` sends the processes it is given to through an AwsGate.

    Stack starts its MotoServer itself; the test module swaps this class in. The
    instance host and the test's own clients use ``url`` (moto directly).
    """

    current: GatedMoto | None = None

    def launch(self) -> MotoServer:
        super().launch()
        self.gate = AwsGate(self.url)
        GatedMoto.current = self
        return self

    def env(self) -> dict[str, str]:
        env = super().env()
        gate = getattr(self, "gate", None)
        if gate is not None:
            env["AWS_ENDPOINT_URL"] = gate.url
        return env

    def stop(self) -> None:
        gate = getattr(self, "gate", None)
        if gate is not None:
            gate.close()
        super().stop()


# -- the SSH gate: a TCP proxy in front of the instance host ----------------------------------


class _QuietTCPServer(socketserver.ThreadingTCPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("SSH gate: a connection from %s broke", client_address)


class SshGate:
    """Pipes TCP to the instance host; armed, it freezes every connection once
    ``threshold`` bytes have passed since arming (a test suite half run)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.target: tuple[str, int] | None = None
        self.passed = 0
        self._threshold: int | None = None
        self.hit = threading.Event()
        self._frozen = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        gate = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                gate.pipe(self.request)

        self._server = _QuietTCPServer((LOOPBACK, port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def arm(self, threshold: int) -> None:
        with self._lock:
            self.passed, self._threshold = 0, threshold
            self.hit.clear()
            self._frozen.clear()

    def drop(self) -> None:
        """Close every connection (their client is dead) and pass traffic again."""
        with self._lock:
            self._threshold = None
            socks, self._socks = self._socks, []
            self._frozen.clear()
        for sock in socks:
            try:
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        self.drop()
        self._server.shutdown()
        self._server.server_close()

    def _count(self, n: int) -> bool:
        """Account ``n`` bytes; False when traffic must stop here."""
        with self._lock:
            if self._frozen.is_set():
                return False
            self.passed += n
            if self._threshold is not None and self.passed >= self._threshold:
                self._frozen.set()
                self.hit.set()
                return False
            return True

    def pipe(self, client: socket.socket) -> None:
        assert self.target is not None
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        with self._lock:
            self._socks += [client, upstream]
        done = threading.Event()

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while not done.is_set():
                    data = src.recv(65536)
                    if not data:
                        break
                    if not self._count(len(data)):
                        self._frozen_wait()
                        break
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                done.set()
                for sock in (src, dst):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        other = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        other.start()
        pump(client, upstream)
        other.join(timeout=30)
        for sock in (client, upstream):
            sock.close()

    def _frozen_wait(self) -> None:
        # Hold the connection open and silent until the test drops it.
        deadline = time.monotonic() + 300
        while self._frozen.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)


# -- the world ------------------------------------------------------------------------------


@dataclass
class World:
    stack: Stack
    aws: AwsGate
    ssh: SshGate
    tmp: Path
    composes: list[ComposeTree] = field(default_factory=list)
    figures: dict[str, dict[str, int]] = field(default_factory=dict)
    amis: dict[str, str] = field(default_factory=dict)  # staging AMI -> kill point

    @property
    def bus(self) -> Any:
        assert self.stack.bus is not None
        return self.stack.bus

    def ec2(self, region: str) -> Any:
        return self.stack.ec2(region)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    ssh = SshGate(free_port())
    options = StackOptions(
        regions=TARGETS,
        extra_settings={**CRASH_SETTINGS, "autocloud_ami.ssh_override": f"{LOOPBACK}:{ssh.port}"},
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(devel.stack, "MotoServer", GatedMoto)
        patch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
        stack = Stack(options).start()
    try:
        host, port = stack.ssh_override.rsplit(":", 1)
        ssh.target = (host, int(port))
        assert GatedMoto.current is not None
        yield World(stack, GatedMoto.current.gate, ssh, tmp_path_factory.mktemp("crash"))
    finally:
        stack.stop()
        ssh.close()


# -- kill points -------------------------------------------------------------------------------


def op(name: str, region: str | None = None, **want: str) -> Callable[[Call], bool]:
    """Match operation ``name`` (in ``region``); ``tag__k=v`` CreateTags tag, ``p=v`` params."""

    def match(call: Call) -> bool:
        if call.operation != name or (region is not None and call.region != region):
            return False
        for key, value in want.items():
            if key.startswith("tag_"):
                tag = "fedimg:" + key[len("tag_") :].replace("_", "-")
                if call.tag(tag) != value:
                    return False
            elif not call.param(key).startswith(value):
                return False
        return True

    return match


@dataclass(frozen=True)
class KillPoint:
    name: str
    rule: Callable[[], Rule] | None = None  # an AWS call to stop at
    ssh_bytes: int = 0  # or: SSH traffic of the test suite to stop at
    settle_first: Callable[[World, ComposeTree], bool] | None = None  # then wait for this
    signum: int = signal.SIGKILL
    # Lose fedmsg's status files with the hub (a new host): no backlog replay at
    # start-up, so the reconcile pass alone must find and finish the work.
    forget_backlog: bool = False
    # A test run dies with its instance, key pair and group: the sweeper removes them.
    leaks_test_resources: bool = False

    def __str__(self) -> str:
        return self.name


def _other_regions_public(world: World, tree: ComposeTree) -> bool:
    """Every target region but eu-west-1 holds a public copy of the x86_64 image."""
    staging = _staging_amis(world, tree)
    x86 = next((a for n, a in staging.items() if "x86_64" in n), None)
    if x86 is None:
        return False
    for region in TARGETS:
        if region == "eu-west-1":
            continue
        found = _copies(world, region, x86)
        if not found or not is_public(world.ec2(region), found[0]["ImageId"]):
            return False
    return True


# A smoke of three real kills: every partial state a kill can leave is a table
# test of the pure plan (tests/test_plan.py); these prove the engine, the
# intents, the locks and the sweeper hold together in a real hub. None keeps
# fedmsg's backlog: the durable intents alone must finish the compose.
KILL_POINTS = [
    # One image at a time (fedimg.stage.workers=1): the other image has not
    # started when the hub dies, and nothing in AWS says it exists.
    KillPoint(
        "mid-upload-no-backlog", lambda: Rule(op("PutSnapshotBlock"), nth=2), forget_backlog=True
    ),
    # A test run killed before its cleanup: the sweeper must remove what it left.
    KillPoint(
        "suite-done-before-cleanup-no-backlog",
        lambda: Rule(op("TerminateInstances")),
        forget_backlog=True,
        leaks_test_resources=True,
    ),
    KillPoint(
        "mid-copy-some-regions-done-no-backlog",
        lambda: Rule(op("CopyImage", "eu-west-1"), freeze=False),
        settle_first=_other_regions_public,
        forget_backlog=True,
    ),
]


# -- reading the end state -----------------------------------------------------------------------


def _staging_amis(world: World, tree: ComposeTree) -> dict[str, str]:
    """image name -> staging AMI id (the first one, if there were several)."""
    found = world.ec2(STAGING).describe_images(
        Owners=["self"], Filters=[{"Name": f"tag:{tags.COMPOSE_ID}", "Values": [tree.compose_id]}]
    )["Images"]
    out: dict[str, str] = {}
    for image in sorted(found, key=lambda i: i["ImageId"]):
        image_tags = tags.as_dict(image.get("Tags"))
        if tags.SOURCE_AMI not in image_tags:
            out.setdefault(image_tags.get(tags.IMAGE_NAME, "?"), image["ImageId"])
    return out


def _copies(world: World, region: str, source: str) -> list[dict[str, Any]]:
    """Our images in ``region`` that are copies of ``source``: by tag OR by name."""
    ec2 = world.ec2(region)
    staging = world.ec2(STAGING).describe_images(ImageIds=[source])["Images"][0]
    names = list(copy_names(staging["Name"], source))
    by_tag = ec2.describe_images(
        Owners=["self"], Filters=[{"Name": f"tag:{tags.SOURCE_AMI}", "Values": [source]}]
    )["Images"]
    by_name = ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": names}])[
        "Images"
    ]
    return list({i["ImageId"]: i for i in [*by_tag, *by_name]}.values())


def _state(world: World, ami_id: str) -> str | None:
    images = world.ec2(STAGING).describe_images(ImageIds=[ami_id])["Images"]
    return tags.as_dict(images[0].get("Tags")).get(tags.STATE) if images else None


def settled(world: World, tree: ComposeTree) -> bool:
    """Every image of ``tree`` in its end state: rejected, or released and public everywhere."""
    staging = _staging_amis(world, tree)
    for built in tree.raw_images():
        ami_id = staging.get(built.image_name)
        if ami_id is None:
            return False
        state = _state(world, ami_id)
        if state == "rejected":
            continue
        if state != "released" or not is_public(world.ec2(STAGING), ami_id):
            return False
        for region in TARGETS:
            found = _copies(world, region, ami_id)
            if len(found) != 1 or found[0].get("State") != "available":
                return False
            if not is_public(world.ec2(region), found[0]["ImageId"]):
                return False
    return True


def judge(world: World, tree: ComposeTree) -> tuple[dict[str, int], list[str]]:
    """The figures of one compose, and every problem found (empty when all is right)."""
    problems: list[str] = []
    figures = dict.fromkeys(
        ("images", "lost", "wrong_state", "duplicate_amis", "leaked_snapshots", "untested_public"),
        0,
    )
    rules = world.stack.rules
    ec2 = world.ec2(STAGING)
    all_staging = ec2.describe_images(
        Owners=["self"], Filters=[{"Name": f"tag:{tags.COMPOSE_ID}", "Values": [tree.compose_id]}]
    )["Images"]
    for built in tree.raw_images():
        figures["images"] += 1
        name = built.image_name
        mine = [
            i
            for i in all_staging
            if tags.as_dict(i.get("Tags")).get(tags.IMAGE_NAME) == name
            and tags.SOURCE_AMI not in tags.as_dict(i.get("Tags"))
        ]
        if not mine:
            figures["lost"] += 1
            problems.append(f"{name}: no staging AMI")
            continue
        if len(mine) > 1:
            figures["duplicate_amis"] += len(mine) - 1
            problems.append(f"{name}: {len(mine)} staging AMIs {[i['ImageId'] for i in mine]}")
        ami_id = mine[0]["ImageId"]
        same_name = ec2.describe_images(
            Owners=["self"], Filters=[{"Name": "name", "Values": [mine[0]["Name"]]}]
        )["Images"]
        if len(same_name) > len(mine):
            figures["duplicate_amis"] += len(same_name) - len(mine)
            problems.append(f"{name}: untagged AMIs named like {ami_id}")
        state = tags.as_dict(mine[0].get("Tags")).get(tags.STATE)
        want = expected_state(name, built.spec.subvariant, rules)
        if state != want:
            figures["wrong_state"] += 1
            problems.append(f"{name} {ami_id}: state {state}, expected {want}")
        summary = read_tests(world.stack.resultsdb_url, ami_id).summary
        snaps = ec2.describe_snapshots(
            OwnerIds=["self"], Filters=[{"Name": f"tag:{tags.SHA256}", "Values": [built.sha256]}]
        )["Snapshots"]
        if len(snaps) != 1 or tags.UPLOADED not in tags.as_dict(snaps[0].get("Tags")):
            figures["leaked_snapshots"] += max(len(snaps) - 1, 0)
            problems.append(f"{name}: snapshots {[s['SnapshotId'] for s in snaps]}")
        public = [(STAGING, ami_id)] if is_public(ec2, ami_id) else []
        for region in TARGETS:
            copies = _copies(world, region, ami_id)
            wanted = 1 if want == "released" else 0
            if len(copies) > wanted:
                figures["duplicate_amis"] += len(copies) - wanted
                problems.append(f"{name} {ami_id}: {len(copies)} copies in {region}")
            public += [
                (region, c["ImageId"]) for c in copies if is_public(world.ec2(region), c["ImageId"])
            ]
            copy_snaps = world.ec2(region).describe_snapshots(
                OwnerIds=["self"], Filters=[{"Name": f"tag:{tags.SOURCE_AMI}", "Values": [ami_id]}]
            )["Snapshots"]
            if len(copy_snaps) > len(copies):
                figures["leaked_snapshots"] += len(copy_snaps) - len(copies)
                problems.append(f"{name} {ami_id}: {len(copy_snaps)} copy snapshots in {region}")
        if public and summary != "PASSED":
            figures["untested_public"] += len(public)
            problems.append(f"{name} {ami_id}: public in {public} but {SUMMARY} is {summary}")
    return figures, problems


# -- the sweep -------------------------------------------------------------------------------------


def _compose(world: World, index: int) -> ComposeTree:
    compose_id = f"Fedora-40-202406{index + 1:02d}.0"
    seed = 1000 + 10 * index
    return build_compose(
        world.tmp / f"kp{index}",
        compose_id,
        (
            ImageSpec("Cloud", "x86_64", "Cloud_Base", raw_mib=3, data_blocks=(0, 1, 4), seed=seed),
            ImageSpec(
                "Cloud", "aarch64", "Cloud_Base", raw_mib=3, data_blocks=(0, 2, 3), seed=seed + 1
            ),
        ),
    )


def _restart(world: World, signum: int, forget_backlog: bool = False) -> float:
    """Stop the hub with ``signum`` (its whole process group) and start a new one."""
    hub = world.stack.hub
    assert hub is not None
    started = time.monotonic()
    hub.signal(signum)
    assert hub.proc is not None
    hub.proc.wait(timeout=30)
    stopped = time.monotonic() - started
    if signum != signal.SIGKILL:
        hub.kill()  # anything of its group still there goes now
    world.aws.drop()
    world.ssh.drop()
    if forget_backlog:
        assert world.stack.workdir is not None
        shutil.rmtree(world.stack.workdir / "status", ignore_errors=True)
    world.stack.hub = world.bus.start_hub(timeout=90)
    return stopped


@pytest.mark.parametrize("point", KILL_POINTS, ids=str)
def test_a_killed_hub_loses_nothing_duplicates_nothing_releases_nothing_untested(
    world: World, point: KillPoint
) -> None:
    index = KILL_POINTS.index(point)
    tree = _compose(world, index)
    world.composes.append(tree)
    started = time.monotonic()
    with ComposeServer(tree.root) as server:
        rule = world.aws.arm(point.rule()) if point.rule is not None else None
        if point.ssh_bytes:
            world.ssh.arm(point.ssh_bytes)
        world.bus.publish("pungi", "compose.status.change", compose_message(tree, server.url))
        if rule is not None:
            call = rule.wait_hit()
            log.info("%s: holding %s %s", point, call.region, call.operation)
        else:
            assert world.ssh.hit.wait(HIT_TIMEOUT), "the suite never got that far"
        if point.settle_first is not None:
            first = point.settle_first
            wait_until(lambda: first(world, tree), 60, f"{point}: the setup", interval=0.2)
        stopped = _restart(world, point.signum, point.forget_backlog)
        try:
            wait_until(
                lambda: settled(world, tree),
                SETTLE_TIMEOUT,
                f"{point}: every image settled",
                interval=1.0,
            )
        except WaitTimeout:
            pass  # judged below, with the reasons
        figures, problems = judge(world, tree)
    for ami_id in _staging_amis(world, tree).values():
        world.amis[ami_id] = point.name
    figures["seconds"] = round(time.monotonic() - started)
    figures["stop_ms"] = int(stopped * 1000)
    world.figures[point.name] = figures
    log.warning("kill point %s: %s", point, json.dumps(figures))
    assert world.stack.hub is not None and world.stack.hub.alive
    assert problems == [], f"{problems}\n{_hub_log(world)}"
    assert figures["images"] == 2
    if point.leaks_test_resources:
        assert_swept(world, set(_staging_amis(world, tree).values()))


def assert_swept(world: World, amis: set[str]) -> None:
    """Killed test runs leave instances, key pairs and groups: the sweeper removes them."""
    ec2 = world.ec2(STAGING)
    deadline = CRASH_SETTINGS["autocloud_ami.deadline"] + 60
    try:
        wait_until(
            lambda: not leftovers(ec2), deadline, "the sweeper to remove leftovers", interval=1.0
        )
    except WaitTimeout:
        pass
    left = leftovers(ec2)
    assert not left, left.describe()
    reservations = ec2.describe_instances(
        Filters=[
            {"Name": "tag-key", "Values": ["autocloud:ami-test"]},
            {"Name": "image-id", "Values": sorted(amis)},
        ]
    )["Reservations"]
    launched = [i for r in reservations for i in r["Instances"]]
    assert launched and {i["State"]["Name"] for i in launched} == {"terminated"}


def _hub_log(world: World, lines: int = 60) -> str:
    """The last warnings and errors of the hubs, for a failure message."""
    out = []
    for proc in world.stack.processes():
        if proc.name.startswith("hub"):
            out += [
                f"{proc.name}: {line[:400]}"
                for line in proc.output().splitlines()
                if " WARNING]" in line or " ERROR]" in line or "Traceback" in line
            ]
    return "\n".join(out[-lines:])
