"""The bus misbehaving, through the real fedmsg-relay and fedmsg-hub.

fedmsg is fire-and-forget: a message may arrive twice, late, out of order,
about something fedimg never staged, or while the hub is down. The hub here
runs fedimg's consumers from their entry points against a real
``moto_server``; the ResultsDB stand-in runs in this process (so its fault
switches are at hand) and publishes ``resultsdb.result.new`` on the bus like
the real server. What must hold: one promotion per AMI whatever the
deliveries, nothing done for what is not ours, the hub alive throughout --
and, with fedmsg's backlog configured (status files + datagrepper), what was
published while the hub was down is replayed at its start and acted on.

"Processed" is known without sleeping, and means finished, not just dequeued:
the hub runs several workers per consumer (devel.bus), so a sentinel AMI's
verdict, sent after the messages under test, only proves those were taken off
the queue. The barrier then waits for the promote consumer's backlog resume
point (fedimg.backlog, written to its fedmsg status file at every start and end
of a message) to be the sentinel's message or a later one: it is only ever a
real message when nothing older is in flight or queued.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import resultsdb_api

from devel.bus import LocalBus, ManagedProcess, Seen, Tap, free_port, wait_until
from devel.compose import (
    DEFAULT_IMAGES,
    ComposeServer,
    ComposeTree,
    build_compose,
    compose_message,
)
from devel.datagrepper import Datagrepper
from devel.motoserver import MotoServer
from devel.resultsdb import ResultsDBServer
from fedimg import tags
from fedimg.messages import (
    IMAGE_RELEASE,
    TASKOTRON_RESULT_NEW,
    StagedImage,
    parse_test_request,
)
from tests.e2e_support import register_ami
from tests.test_promote_integration import REPO, STAGING, TARGETS, TESTCASE, copies, ec2, stage

pytestmark = pytest.mark.integration

WRITES = frozenset(
    {
        "CopyImage",
        "CreateTags",
        "DeleteTags",
        "DeregisterImage",
        "DeleteSnapshot",
        "ModifyImageAttribute",
        "ModifySnapshotAttribute",
        "RegisterImage",
    }
)
_serial = itertools.count(100)


@dataclass
class Hub:
    """moto_server + relay + one hub (fedimg promote) + the ResultsDB stand-in in process."""

    moto: MotoServer
    bus: LocalBus
    rdb: ResultsDBServer
    hub: ManagedProcess
    status_dir: Path

    @property
    def api(self) -> resultsdb_api.ResultsDBapi:
        return resultsdb_api.ResultsDBapi(self.rdb.url)

    def staged(self) -> str:
        return stage(self.moto, next(_serial))

    def result(self, ami: str, outcome: str = "PASSED", testcase: str = TESTCASE) -> dict[str, Any]:
        """Post a result to ResultsDB (which announces it on the bus); its message body."""
        return dict(
            self.api.create_result(outcome=outcome, testcase=testcase, item=ami, type="ami")
        )

    def released(self, ami: str, timeout: float = 60) -> Seen:
        """The release message, then the ``released`` tag fedimg sets right after sending it."""
        assert self.bus.tap is not None
        seen = self.bus.tap.wait_for(
            "fedimg.image.release", lambda b: b["regions"].get(STAGING) == ami, timeout
        )
        wait_until(lambda: self.state(ami) == "released", timeout, f"{ami} tagged released")
        return seen

    def verdict(self, ami: str, status: str, timeout: float = 60) -> Seen:
        assert self.bus.tap is not None
        return self.bus.tap.wait_for(
            "fedimg.image.test",
            lambda b: b["status"] == status and b["extra"].get("id") == ami,
            timeout,
        )

    def count(self, suffix: str, ami: str) -> int:
        assert self.bus.tap is not None

        def about(body: dict[str, Any]) -> bool:
            extra = body.get("extra") or {}
            return ami in (
                extra.get("id"),
                extra.get("source_image_id"),
                (body.get("regions") or {}).get(STAGING),
            )

        return sum(1 for m in self.bus.tap.messages(suffix) if about(m.body))

    def barrier(self, outcome: str = "PASSED") -> str:
        """A sentinel AMI's result, sent after everything before it: returns once the
        sentinel is released (or rejected) and the promote consumer finished every message."""
        sentinel = self.staged()
        body = self.result(sentinel, outcome)
        if outcome == "PASSED":
            self.released(sentinel)
        else:
            self.verdict(sentinel, "failed")
        assert self.bus.tap is not None
        sent = self.bus.tap.wait_for("resultsdb.result.new", lambda b: b.get("id") == body["id"])
        self.settled(float(sent.envelope["timestamp"]))
        return sentinel

    def settled(self, since: float) -> None:
        """Wait until the promote consumer was idle after the message published at ``since``:
        its resume point is then a real message (not a point before one still unfinished)
        no older than that one."""
        tap = self.bus.tap
        assert tap is not None

        def idle() -> bool:
            point = status_of(self.status_dir, "PromoteConsumer")
            if point is None or float(point["timestamp"]) < since:
                return False
            return any(m.envelope.get("msg_id") == point["msg_id"] for m in tap.messages())

        wait_until(idle, 60, "the promote consumer to finish every message")

    def state(self, ami: str) -> str | None:
        image = ec2(self.moto, STAGING).describe_images(ImageIds=[ami])["Images"][0]
        return tags.as_dict(image.get("Tags")).get(tags.STATE)

    def assert_released_once(self, ami: str) -> None:
        assert self.state(ami) == "released"
        for region in TARGETS:
            assert len(copies(self.moto, region, ami)) == 1, region
        assert self.count("fedimg.image.release", ami) == 1
        assert self.count("fedimg.image.copy", ami) == len(TARGETS)
        assert self.bus.tap is not None
        ours = {ami} | {c["ImageId"] for r in TARGETS for c in copies(self.moto, r, ami)}
        published = [
            m.body["destination"]
            for m in self.bus.tap.messages("fedimg.image.publish")
            if m.body["extra"]["id"] in ours
        ]
        assert sorted(published) == sorted([*TARGETS, STAGING])  # each region announced once

    def assert_alive(self) -> None:
        assert self.hub.alive
        self.bus.wait_hub(self.hub, timeout=30)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")  # read by moto_server at start
        moto = MotoServer(record=True).start()
    port = free_port()
    status_dir = tmp_path_factory.mktemp("status")
    try:
        dg = Datagrepper()  # with status files, fedmsg's backlog needs one
        settings = {
            "fedimg.promote.enabled": True,
            "fedimg.resultsdb_url": f"http://127.0.0.1:{port}/api/v2.0",
            "fedimg.aws.staging_region": STAGING,
            "fedimg.aws.regions": TARGETS,
            "fedimg.http.retries": 1,
            "fedimg.reconcile.interval": 3600.0,  # messages only, after the pass at start
            "status_directory": str(status_dir),  # what the barrier reads
            "datagrepper_url": f"{dg.url}/raw",
        }
        env = {**moto.env(), "PYTHONPATH": str(REPO)}
        with (
            dg,
            LocalBus(settings=settings, extra_env=env) as bus,
            ResultsDBServer(port=port, publisher=bus.publish) as rdb,
        ):
            yield Hub(moto, bus, rdb, bus.start_hub(), status_dir)
    finally:
        moto.stop()


@contextmanager
def unannounced(rdb: ResultsDBServer) -> Iterator[None]:
    """Results stored while this is on are not announced on the bus (a lost message)."""
    assert rdb.api is not None
    publisher, rdb.api.publisher = rdb.api.publisher, None
    try:
        yield
    finally:
        rdb.api.publisher = publisher


def register(moto: MotoServer, n: int) -> tuple[str, str, StagedImage]:
    """An AMI (and its snapshot) registered as stage does, before stage tags them."""
    client = ec2(moto, STAGING)
    image = StagedImage(
        compose_id=f"Fedora-Cloud-41-20261125.{n}",
        image_name=f"Fedora-Cloud-Base-Generic-41-20261125.{n}.x86_64",
        image_url=f"https://kojipkgs.test/f41-early-{n}.raw.xz",
        architecture="x86_64",
        region=STAGING,
        subvariant="Cloud_Base",
        release="41",
    )
    ami, snap = register_ami(client, image)
    return ami, snap, image


def test_the_same_result_delivered_again_and_again_promotes_once(hub: Hub) -> None:
    ami = hub.staged()
    body = hub.result(ami, "PASSED")
    for _ in range(5):  # redelivered, while the first is being worked on
        hub.bus.publish("resultsdb", "result.new", body)
    hub.released(ami)
    for _ in range(3):  # and again once it is released
        hub.bus.publish("resultsdb", "result.new", body)
    hub.barrier()

    hub.assert_released_once(ami)
    IMAGE_RELEASE.validate(hub.released(ami).body)
    assert hub.count("fedimg.image.test", ami) == 1  # one "completed" verdict
    hub.assert_alive()


def test_both_shapes_of_the_same_result_promote_once(hub: Hub) -> None:
    ami = hub.staged()
    body = hub.result(ami, "PASSED")
    old_style = {
        "task": {"item": ami, "type": "ami", "name": TESTCASE},
        "result": {"id": body["id"], "outcome": "PASSED", "prev_outcome": None},
    }
    TASKOTRON_RESULT_NEW.validate(old_style)
    hub.bus.publish("taskotron", "result.new", old_style)
    hub.released(ami)
    hub.barrier()
    hub.assert_released_once(ami)
    hub.assert_alive()


def test_the_summary_before_the_per_test_results_promotes_once(hub: Hub) -> None:
    ami = hub.staged()
    hub.result(ami, "PASSED")  # the summary first ...
    hub.released(ami)
    for test in ("selinux", "logging", "services"):  # ... then the per-test results
        hub.result(ami, "PASSED", f"autocloud.ami.{test}")
    hub.result(ami, "FAILED", "autocloud.ami.bash_version")  # a non-gating test failed
    hub.barrier()
    hub.assert_released_once(ami)
    hub.assert_alive()


def test_per_test_results_before_the_summary_wait_for_it(hub: Hub) -> None:
    ami = hub.staged()
    for test in ("selinux", "logging"):
        hub.result(ami, "PASSED", f"autocloud.ami.{test}")
    hub.barrier()
    assert hub.state(ami) == "testing"  # no summary yet: nothing decided
    assert hub.count("fedimg.image.copy", ami) == 0
    hub.result(ami, "PASSED")
    hub.released(ami)
    hub.assert_released_once(ami)


def test_a_result_before_the_ami_is_fedimgs_is_ignored_then_acted_on(hub: Hub) -> None:
    """The result arrives while stage has registered the AMI but not tagged it yet."""
    ami, snap, image = register(hub.moto, next(_serial))
    body = hub.result(ami, "PASSED")
    hub.barrier()
    client = ec2(hub.moto, STAGING)
    assert tags.state_of(client.describe_images(ImageIds=[ami])["Images"][0]) is None
    assert all(copies(hub.moto, region, ami) == [] for region in TARGETS)
    assert hub.count("fedimg.image.test", ami) == 0

    # Stage tags it (testing): the next delivery about it is acted on, once.
    values = tags.image_tags(image, tags.State.TESTING, datetime.now(UTC).isoformat())
    client.create_tags(Resources=[ami, snap], Tags=tags.as_list(values))
    hub.bus.publish("resultsdb", "result.new", body)
    hub.bus.publish("resultsdb", "result.new", body)
    hub.released(ami)
    hub.barrier()
    hub.assert_released_once(ami)
    hub.assert_alive()


def test_results_about_amis_never_staged_cost_nothing(hub: Hub) -> None:
    client = ec2(hub.moto, STAGING)
    foreign = client.register_image(Name=f"not-fedimg-{next(_serial)}", RootDeviceName="/dev/sda1")[
        "ImageId"
    ]
    bogus = [
        "ami-0123456789abcdef0",  # well-formed, nowhere
        foreign,  # ours to AWS, not fedimg's: no fedimg tags
    ]
    calls_before = len(hub.moto.recorded_calls())
    gets_before = hub.rdb.request_count("GET", "/results")
    for item in bogus:
        hub.result(item, "PASSED")
        hub.bus.publish(
            "taskotron",
            "result.new",
            {
                "task": {"item": item, "type": "ami", "name": TESTCASE},
                "result": {"id": 1, "outcome": "PASSED"},
            },
        )
    for item, kind in (("koji-build-1.0-1.fc41", "koji_build"), ("ami-../../etc/passwd", "ami")):
        hub.api.create_result(outcome="PASSED", testcase=TESTCASE, item=item, type=kind)
    sentinel = hub.barrier("FAILED")  # a rejection writes only its own state tag
    assert hub.state(sentinel) == "rejected"

    window = hub.moto.recorded_calls()[calls_before:]
    writes = [c.operation for c in window if c.component == "fedimg" and c.operation in WRITES]
    assert set(writes) <= {"CreateTags"}, writes  # the sentinel's rejection, nothing else
    assert all(c.service == "ec2" for c in window)
    # Only the sentinel made fedimg ask ResultsDB: the others were dropped before that.
    assert hub.rdb.request_count("GET", "/results") == gets_before + 1
    assert tags.as_dict(client.describe_images(ImageIds=[foreign])["Images"][0].get("Tags")) == {}
    for region in TARGETS:
        assert copies(hub.moto, region, foreign) == []
    hub.assert_alive()


def test_resultsdb_down_while_the_hub_gates_waits_then_releases(hub: Hub) -> None:
    ami = hub.staged()
    with unannounced(hub.rdb):
        body = hub.result(ami, "PASSED")

    hub.rdb.set_down(True)
    asked = hub.rdb.request_count("GET", "/results")
    hub.bus.publish("resultsdb", "result.new", body)
    # The hub asked ResultsDB (and retried once) and got 503s: no decision.
    wait_until(
        lambda: hub.rdb.request_count("GET", "/results") >= asked + 2,
        30,
        "the hub to ask ResultsDB",
    )
    hub.rdb.set_down(False)
    hub.barrier()
    assert hub.state(ami) == "testing"
    assert all(copies(hub.moto, r, ami) == [] for r in TARGETS)
    assert hub.count("fedimg.image.test", ami) == 0

    hub.bus.publish("resultsdb", "result.new", body)  # the next message about it
    hub.released(ami)
    hub.assert_released_once(ami)
    hub.assert_alive()


# ==========================================================================================
# fedmsg's backlog: what was published while the hub was down is replayed at its start
# ==========================================================================================

ARM = next(s for s in DEFAULT_IMAGES if s.arch == "aarch64")


def status_of(root: Path, consumer: str) -> dict[str, Any] | None:
    """The last message a consumer recorded in its fedmsg status file, if any."""
    found = sorted(root.glob(f"*/{consumer}"))
    if not found:
        return None
    try:
        data = json.loads(found[0].read_text())
    except ValueError:  # being written
        return None
    body = data["message"]["body"]
    return body if isinstance(body, dict) else json.loads(body)


@dataclass
class Backlog:
    """A hub with fedmsg's backlog on: status files, and datagrepper recording the bus."""

    tree: ComposeTree
    moto: MotoServer
    dg: Datagrepper
    compose: ComposeServer
    bus: LocalBus
    rdb: ResultsDBServer
    status_dir: Path

    @property
    def tap(self) -> Tap:
        assert self.bus.tap is not None
        return self.bus.tap

    def missed(self, since: float, suffixes: tuple[str, ...]) -> list[dict[str, Any]]:
        """Wait until datagrepper holds one message per suffix published since ``since``."""

        def recorded() -> list[dict[str, Any]] | None:
            found = [
                m for m in self.dg.store.between(since, None, []) if m["topic"].endswith(suffixes)
            ]
            return found if len(found) >= len(suffixes) else None

        found: list[dict[str, Any]] = wait_until(recorded, 30, "datagrepper to record them")
        # fedmsg asks datagrepper up to int(now): start a second past the last of them.
        last = max(float(m["timestamp"]) for m in found)
        wait_until(lambda: time.time() >= last + 1.5, 10, "a second past the last message")
        return found

    def staged(self, timeout: float = 120) -> StagedImage:
        """The test request for the compose's image (it was staged)."""
        (image,) = self.tree.raw_images()
        test = self.tap.wait_for(
            "fedimg.image.test",
            lambda b: b["status"] == "started" and b["image_name"] == image.image_name,
            timeout,
        )
        staged = parse_test_request(test.body)
        assert staged.compose_id == self.tree.compose_id and staged.ami_id
        client = ec2(self.moto, STAGING)
        (ami,) = client.describe_images(
            Owners=["self"], Filters=[{"Name": f"tag:{tags.SHA256}", "Values": [image.sha256]}]
        )["Images"]
        assert ami["ImageId"] == staged.ami_id  # one AMI for the image, whatever happened
        assert tags.state_of(ami) is tags.State.TESTING
        return staged


@contextmanager
def backlog_stack(tmp_path: Path) -> Iterator[Backlog]:
    tree = build_compose(tmp_path / "compose", images=(ARM,))
    status_dir = tmp_path / "status"
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
        moto = MotoServer().start()
    try:
        with Datagrepper() as dg, ComposeServer(tree.root, stall_seconds=120) as compose:
            settings = {
                "fedimg.stage.enabled": True,
                "fedimg.promote.enabled": True,
                "fedimg.resultsdb_url": f"http://127.0.0.1:{port}/api/v2.0",
                "fedimg.aws.staging_region": STAGING,
                "fedimg.aws.regions": TARGETS,
                "fedimg.aws.upload_workers": 2,
                "fedimg.compose.allowed_hosts": ["127.0.0.1"],
                "fedimg.stage.workers": 1,
                "fedimg.http.retries": 1,
                "fedimg.http.timeout": 10.0,
                "fedimg.reconcile.interval": 3600.0,
                "status_directory": str(status_dir),
                "datagrepper_url": f"{dg.url}/raw",
            }
            env = {**moto.env(), "PYTHONPATH": str(REPO)}
            with (
                LocalBus(settings=settings, extra_env=env) as bus,
                ResultsDBServer(port=port, publisher=bus.publish) as rdb,
            ):
                dg.record(bus.outbound)
                yield Backlog(tree, moto, dg, compose, bus, rdb, status_dir)
    finally:
        moto.stop()


@pytest.mark.slow
def test_messages_published_while_the_hub_was_down_are_replayed_at_start(
    tmp_path: Path,
) -> None:
    with backlog_stack(tmp_path) as stack:
        bus, status_dir = stack.bus, stack.status_dir
        first = bus.start_hub()
        # Each consumer records the last message it handled (here: ones it ignores).
        bus.publish(
            "pungi",
            "compose.status.change",
            compose_message(stack.tree, stack.compose.url, "STARTED"),
        )
        bus.publish(
            "resultsdb",
            "result.new",
            {
                "id": 1,
                "testcase": {"name": TESTCASE},
                "outcome": "PASSED",
                "data": {"item": ["kernel-6.11-1.fc41"], "type": ["koji_build"]},
            },
        )
        wait_until(
            lambda: (
                status_of(status_dir, "StageConsumer") and status_of(status_dir, "PromoteConsumer")
            ),
            30,
            "both consumers to record a message",
        )
        first.kill()  # SIGKILL: no goodbye
        assert not first.alive

        # While it is down: the compose finishes, and a staged AMI passes its tests.
        waiting = stage(stack.moto, next(_serial))
        t_down = time.time()
        bus.publish(
            "pungi", "compose.status.change", compose_message(stack.tree, stack.compose.url)
        )
        resultsdb_api.ResultsDBapi(stack.rdb.url).create_result(
            outcome="PASSED", testcase=TESTCASE, item=waiting, type="ami"
        )
        missed = stack.missed(t_down, ("pungi.compose.status.change", "resultsdb.result.new"))

        second = bus.start_hub(name="hub-restarted")
        stack.staged()
        stack.tap.wait_for(
            "fedimg.image.release", lambda b: b["regions"].get(STAGING) == waiting, 60
        )
        for region in TARGETS:
            assert len(copies(stack.moto, region, waiting)) == 1

        # It was the backlog: what each consumer handled last is what it had missed.
        compose_id = next(m["msg_id"] for m in missed if "pungi" in m["topic"])
        result_id = next(m["msg_id"] for m in missed if "resultsdb" in m["topic"])
        wait_until(
            lambda: (status_of(status_dir, "StageConsumer") or {}).get("msg_id") == compose_id,
            30,
            "the stage consumer to record the replayed compose message",
        )
        # (its release is announced before that message is finished: wait for the end)
        wait_until(
            lambda: (status_of(status_dir, "PromoteConsumer") or {}).get("msg_id") == result_id,
            30,
            "the promote consumer to finish the replayed result",
        )
        assert second.alive
        bus.wait_hub(second, timeout=30)


@pytest.mark.slow
def test_a_compose_being_staged_when_the_hub_is_killed_is_replayed_at_start(
    tmp_path: Path,
) -> None:
    """fedmsg records the message a worker STARTS, and its backlog skips that one."""
    with backlog_stack(tmp_path) as stack:
        bus = stack.bus
        first = bus.start_hub()
        (image,) = stack.tree.raw_images()
        stack.compose.stall(image.path)  # the download hangs: the hub is mid-stage
        t0 = time.time()
        bus.publish(
            "pungi", "compose.status.change", compose_message(stack.tree, stack.compose.url)
        )
        wait_until(lambda: stack.compose.hits_of(image.path) > 0, 30, "the download to start")
        first.kill()
        assert not first.alive
        stack.compose.reset()
        stack.missed(t0, ("pungi.compose.status.change",))
        assert not [
            m for m in stack.tap.messages("fedimg.image.test") if m.body["status"] == "started"
        ]

        second = bus.start_hub(name="hub-restarted")
        stack.staged()
        bus.wait_hub(second, timeout=30)
