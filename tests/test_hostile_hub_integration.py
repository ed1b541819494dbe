"""The hostile corpus (tests/corpus.py) through a real fedmsg-hub running every consumer.

One hub runs fedimg stage, fedimg promote, autocloud_ami and the health
consumer against a recording moto_server and a compose server on loopback.
Every bad message of every consumed topic, and zmq frames that are not fedmsg
at all, are published; then bad image files are served for a real compose.
Each bad message must produce a WARNING/ERROR record from the project's
loggers (counted by level, never by wording), no mutating AWS call, no
success message, and the hub must still answer a ping afterwards. The
hostile compose servers (tests/corpus.py IMAGE_FAULTS, metadata from the
future or redirected away, a compose of 5,000 images) run against the same
hub, with a second compose server on 127.0.0.2 (not an allowed host) that
must never be asked anything.

The compose holds one raw image (and a qcow2 fedimg ignores): a bad file fails
it, so no test leaves staging or AMI tests running in the shared hub for the
next one (that one image's failure leaving the others alone is test_stage's).
Each test compares AWS with what it found at its start, so any order works.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from devel.bus import LocalBus, ManagedProcess, wait_until
from devel.compose import (
    DEFAULT_IMAGES,
    ComposeServer,
    ComposeTree,
    build_compose,
    compose_message,
)
from devel.motoserver import MotoServer
from devel.stack import LOOPBACK, StackOptions, hub_settings
from fedimg.intents import IntentStore
from tests.corpus import (
    ALLOWED_HOST,
    HUGE_COMPOSE_ENTRIES,
    IMAGE_FAULTS,
    NOT_ALLOWED_HOST,
    RAW_PAYLOADS,
    TOPICS,
    future_metadata,
    huge_images_json,
    junk_name,
    message_corpus,
    serve_fault,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REGION = "us-east-1"
# Mutating calls a refused message must never cause.
NEVER_FOR_A_MESSAGE = {
    "RunInstances",
    "StartSnapshot",
    "RegisterImage",
    "CopyImage",
    "ModifyImageAttribute",
    "CreateKeyPair",
    "ImportKeyPair",
    "CreateSecurityGroup",
    "CreateTags",
}
# What staging creates (autocloud_ami's test runs, still going from earlier tests, make others).
STAGE_WRITES = {"StartSnapshot", "RegisterImage"}
_RECORD = re.compile(r"^<(fedimg|autocloud_ami)[a-z_.]* (WARNING|ERROR)> ", re.M)
# The project's loggers, with their level and name on every line (the text is never matched).
LOGGING = {
    "version": 1,
    "formatters": {"lvl": {"format": "<%(name)s %(levelname)s> %(message)s"}},
    "handlers": {
        "out": {"class": "logging.StreamHandler", "formatter": "lvl", "stream": "ext://sys.stdout"}
    },
    "loggers": {
        name: {"level": "INFO", "handlers": ["out"], "propagate": False}
        for name in ("fedimg", "autocloud_ami")
    },
}


@dataclass
class Hub:
    tree: ComposeTree
    moto: MotoServer
    server: ComposeServer
    bus: LocalBus
    hub: ManagedProcess
    away: ComposeServer  # the same compose on a host outside allowed_hosts
    state_dir: Path  # the hub's fedimg.state_dir (compose intents)

    def ec2(self) -> Any:
        return boto3.client(
            "ec2",
            region_name=REGION,
            endpoint_url=self.moto.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def refusals(self) -> int:
        """WARNING/ERROR records of fedimg/autocloud_ami loggers in the hub's log so far."""
        return len(_RECORD.findall(self.hub.output()))

    def mutating_calls(self, forbidden: set[str], since: int = 0) -> list[str]:
        """Operations in ``forbidden`` among the recorded calls from number ``since`` on."""
        calls = self.moto.recorded_calls()[since:]
        return sorted(c.operation for c in calls if c.operation in forbidden)

    def images(self) -> list[str]:
        return sorted(i["ImageId"] for i in self.ec2().describe_images(Owners=["self"])["Images"])

    def stage_errors(self) -> int:
        """ERROR records of the engine and the stager (a compose or an image failed) so far."""
        return len(re.findall(r"^<fedimg\.(engine|stage) ERROR> ", self.hub.output(), re.M))

    def requests_away(self) -> int:
        with self.away._lock:
            return sum(self.away.hits.values())

    def uploads(self, since: float, status: str) -> list[str]:
        """Image names of fedimg.image.upload messages with ``status`` published since ``since``."""
        assert self.bus.tap is not None
        return [
            str(m.body.get("image_name"))
            for m in self.bus.tap.messages("fedimg.image.upload")
            if m.at >= since and m.body.get("status") == status
        ]

    def send_compose(self) -> float:
        """Publish the compose's FINISHED message; the time just before it."""
        t0 = time.time()
        self.bus.publish(
            "pungi", "compose.status.change", compose_message(self.tree, self.server.url)
        )
        return t0

    def test_requests(self, since: float) -> list[str]:
        """Image names of fedimg.image.test messages published since ``since``."""
        assert self.bus.tap is not None
        return [
            str(m.body.get("image_name"))
            for m in self.bus.tap.messages("fedimg.image.test")
            if m.at >= since
        ]

    def left_by(self, image_name: str) -> list[str]:
        """AMIs and snapshots an image left in the staging region."""
        ec2 = self.ec2()
        snaps = ec2.describe_snapshots(
            OwnerIds=["self"],
            Filters=[{"Name": "tag:fedimg:image-name", "Values": [image_name]}],
        )["Snapshots"]
        amis = [
            i["ImageId"]
            for i in ec2.describe_images(Owners=["self"])["Images"]
            if str(i.get("Name", "")).startswith(image_name[: -len(".raw.xz")])
        ]
        return amis + [s["SnapshotId"] for s in snaps]

    def leave_as_found(self, *staged: str) -> None:
        """After a test that sent the compose: the compose server serves it plainly again,
        the hub forgets the compose (its intent: a later message is read afresh and no image
        left unfinished is tried again) and the images ``staged`` are unstaged."""
        self.server.reset()
        IntentStore(self.state_dir).drop(self.tree.compose_id)
        for image_name in staged:
            self.forget(image_name)

    def quiet(self, timeout: float = 240) -> None:
        """Wait until every AMI test an earlier test caused has ended (autocloud_ami's
        success or failure message): nothing still running publishes during a test."""
        tap = self.bus.tap
        assert tap is not None

        def ended() -> bool:
            requested = {m.body.get("extra", {}).get("id") for m in tap.messages("image.test")}
            done = {
                m.body.get("ami_id")
                for suffix in ("autocloud.ami.success", "autocloud.ami.failed")
                for m in tap.messages(suffix)
            }
            return requested <= done

        wait_until(ended, timeout, "the AMI tests of earlier tests to end")

    def forget(self, image_name: str) -> None:
        """Deregister the AMIs and delete the snapshots of an image, as if never staged."""
        ec2 = self.ec2()
        for resource in self.left_by(image_name):
            if resource.startswith("ami-"):
                ec2.deregister_image(ImageId=resource)
        for resource in self.left_by(image_name):
            ec2.delete_snapshot(SnapshotId=resource)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    workdir = tmp_path_factory.mktemp("hostile")
    images = [s for s in DEFAULT_IMAGES if s.format != "raw.xz" or s == DEFAULT_IMAGES[0]]
    tree = build_compose(workdir / "compose", images=images)
    assert len(tree.raw_images()) == 1
    settings = hub_settings(
        StackOptions(staging_region=REGION),
        workdir=workdir,
        resultsdb_url="http://127.0.0.1:9/api/v2.0",
        ssh_override="127.0.0.1:9",
        datagrepper_url="http://127.0.0.1:9/raw",
        output_url=None,
    )
    for key in ("status_directory", "datagrepper_url"):  # no backlog here
        settings.pop(key)
    settings["fedimg.compose.allowed_hosts"] = [LOOPBACK, ALLOWED_HOST]
    settings["fedimg.http.retries"] = 2  # a 404 is still asked once; cut downloads resume
    settings["fedimg.compose.max_images"] = 20
    # Each test's message is the only attempt at its faulty image: no reconcile pass
    # retries it in between, and the same image failing test after test is not given up.
    settings["fedimg.reconcile.interval"] = 24 * 3600.0
    settings["fedimg.stage.max_attempts"] = 1000
    settings["logging"] = LOGGING
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
        moto = MotoServer(record=True).start()
    try:
        with (
            ComposeServer(tree.root) as server,
            ComposeServer(tree.root, host=NOT_ALLOWED_HOST) as away,
            LocalBus(
                settings={**settings, "moksha.workers_per_consumer": 4},
                workdir=Path(workdir / "bus"),
                extra_env=moto.env(),
            ) as bus,
        ):
            hub = bus.start_hub(timeout=90)
            yield Hub(tree, moto, server, bus, hub, away, Path(settings["fedimg.state_dir"]))
    finally:
        moto.stop()


def test_every_bad_message_is_refused_at_no_cost_and_the_hub_keeps_answering(hub: Hub) -> None:
    corpus = message_corpus()
    hub.quiet()  # what earlier tests staged is tested (and fails) before we look
    before = hub.refusals()
    calls_before, images_before = len(hub.moto.recorded_calls()), hub.images()
    t0 = time.time()
    # Frames that are not a fedmsg envelope with a dict body, on every consumed topic.
    hub.bus.publish("fedimg", "hub.ping", {"token": "open-the-socket"})
    for topic in TOPICS:
        full = hub.bus.topic(*topic.split(".", 1))
        for _, payload in RAW_PAYLOADS:
            hub.bus._pub.send_multipart([full.encode(), payload.replace(b"TOPIC", full.encode())])
    for bad in corpus:
        modname, name = bad.topic.split(".", 1)
        try:
            hub.bus.publish(modname, name, bad.body)
        except (TypeError, ValueError, RecursionError):
            # Not even JSON-encodable (5000-deep nesting): it cannot reach the bus at all.
            before -= 1
    # Each bad message leaves at least one WARNING/ERROR record; wait until they all have.
    wait_until(
        lambda: hub.refusals() - before >= len(corpus),
        120,
        f"{len(corpus)} refusals in the hub log",
    )
    hub.bus.wait_hub(hub.hub, timeout=30)
    assert hub.hub.alive

    assert hub.mutating_calls(NEVER_FOR_A_MESSAGE, since=calls_before) == []
    assert hub.images() == images_before
    assert hub.bus.tap is not None
    # What the hub published (fedmsg.publish sets the username; this test's frames are
    # "devel" or carry none): nothing but pongs.
    published = [
        m.topic
        for m in hub.bus.tap.messages()
        if m.at >= t0
        and isinstance(m.envelope, dict)
        and m.envelope.get("username") not in (None, "devel")
        and not m.topic.endswith("fedimg.hub.pong")
    ]
    assert published == []


@pytest.mark.parametrize(
    "fault",
    ["corrupted bytes", "HTML page with 200", "not xz", "truncated", "empty file"],
)
def test_a_bad_image_file_fails_that_image_only_and_leaves_nothing(hub: Hub, fault: str) -> None:
    image = hub.tree.raw_images()[0]
    rel = image.path
    data = image.file.read_bytes()
    hub.server.reset()
    if fault == "corrupted bytes":
        middle = len(data) // 2
        hub.server.replace(rel, data[:middle] + bytes(64) + data[middle + 64 :], "application/x-xz")
    elif fault == "HTML page with 200":
        hub.server.html(rel)
    elif fault == "not xz":
        hub.server.replace(rel, b"\x7fELF" + bytes(4092), "application/x-xz")
    elif fault == "truncated":
        hub.server.replace(rel, data[: len(data) // 2], "application/x-xz")
    else:
        hub.server.replace(rel, b"", "application/x-xz")
    t0 = time.time()
    try:
        hub.bus.publish("pungi", "compose.status.change", compose_message(hub.tree, hub.server.url))
        assert hub.bus.tap is not None
        tap = hub.bus.tap
        wait_until(
            lambda: [
                m
                for m in tap.messages("fedimg.image.upload")
                if m.at >= t0
                and m.body.get("image_name") == image.image_name
                and m.body.get("status") == "failed"
            ],
            90,
            f"fedimg.image.upload failed for {image.image_name}",
        )
        ec2 = hub.ec2()

        def left_by_the_image() -> list[str]:
            """Snapshots fedimg tagged for this image (moto adds untagged ones per AMI)."""
            snaps = ec2.describe_snapshots(
                OwnerIds=["self"],
                Filters=[{"Name": "tag:fedimg:image-name", "Values": [image.image_name]}],
            )["Snapshots"]
            return [s["SnapshotId"] for s in snaps]

        wait_until(lambda: not left_by_the_image(), 60, f"no snapshot left by {image.image_name}")
        failed_amis = [
            i
            for i in ec2.describe_images(Owners=["self"])["Images"]
            if image.image_name in (i.get("Name") or "")
            or any(t.get("Value") == image.image_name for t in i.get("Tags", []))
        ]
        assert failed_amis == []
        assert image.image_name not in hub.test_requests(t0)
        hub.bus.wait_hub(hub.hub, timeout=30)
    finally:
        hub.leave_as_found()


@pytest.mark.parametrize(("fault", "staged"), IMAGE_FAULTS, ids=[f for f, _ in IMAGE_FAULTS])
def test_a_hostile_compose_server_fails_that_image_only_and_never_reaches_another_host(
    hub: Hub, fault: str, staged: bool
) -> None:
    target = hub.tree.raw_images()[0]
    others = [i.image_name for i in hub.tree.raw_images()[1:]]
    hub.server.reset()
    serve_fault(fault, hub.server, target.path, hub.away)
    try:
        t0 = hub.send_compose()
        wait_until(
            lambda: set(others) <= set(hub.uploads(t0, "completed")),
            120,
            "the other images of the compose staged (or found)",
        )
        outcome = "completed" if staged else "failed"
        wait_until(
            lambda: target.image_name in hub.uploads(t0, outcome),
            120,
            f"fedimg.image.upload {outcome} for {target.image_name}",
        )
        assert hub.requests_away() == 0, "a host outside allowed_hosts was contacted"
        if staged:
            assert hub.server.hits_of(target.path) >= 3  # the probe, the GET, a resume
            return
        wait_until(lambda: not hub.left_by(target.image_name), 60, "nothing left by the image")
        assert target.image_name not in hub.uploads(t0, "completed")
        assert target.image_name not in hub.test_requests(t0)
        hub.bus.wait_hub(hub.hub, timeout=30)
    finally:
        hub.leave_as_found(*([target.image_name] if staged else []))


@pytest.mark.parametrize("fault", ["header version 99.0", "images.json redirected away"])
def test_hostile_metadata_refuses_the_compose_before_any_aws_call(hub: Hub, fault: str) -> None:
    rel = "metadata/images.json"
    hub.server.reset()
    if fault.startswith("header"):
        hub.server.replace(rel, future_metadata(hub.tree.images_json.read_text()))
    else:
        hub.server.redirect(rel, hub.away.url_of(rel))
    before, writes = hub.stage_errors(), hub.mutating_calls(STAGE_WRITES)
    try:
        t0 = hub.send_compose()
        wait_until(lambda: hub.stage_errors() > before, 60, "the compose refused in the hub log")
        assert hub.requests_away() == 0
        assert hub.server.hits_of(rel) >= 1
        assert hub.mutating_calls(STAGE_WRITES) == writes
        assert hub.uploads(t0, "started") == []
        hub.bus.wait_hub(hub.hub, timeout=30)
    finally:
        hub.leave_as_found()


def test_a_compose_of_5000_images_takes_20_and_each_404_is_asked_once(hub: Hub) -> None:
    hub.server.reset()
    hub.server.replace("metadata/images.json", huge_images_json(hub.tree.images_json.read_text()))
    own = [i.image_name for i in hub.tree.raw_images()]
    taken = [junk_name(n) for n in range(20 - len(own))]
    try:
        t0 = hub.send_compose()
        wait_until(
            lambda: set(taken) <= set(hub.uploads(t0, "failed")),
            300,
            f"{len(taken)} made-up images failed",
        )
        wait_until(lambda: set(own) <= set(hub.uploads(t0, "completed")), 120, "own images")
        hub.bus.wait_hub(hub.hub, timeout=30)
        for name in taken:
            assert hub.server.hits_of(f"Cloud/x86_64/images/{name}") == 1, name
        made_up = {n for n in hub.uploads(t0, "started") if n.startswith("Fedora-Cloud-Base-Junk")}
        assert made_up == set(taken), f"{HUGE_COMPOSE_ENTRIES - len(taken)} are never started"
        assert hub.server.hits_of(f"Cloud/x86_64/images/{junk_name(len(taken))}") == 0
    finally:
        hub.leave_as_found(*own)  # its made-up images are never given up: forget them
