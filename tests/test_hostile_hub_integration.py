"""The hostile corpus (tests/corpus.py) through a real fedmsg-hub running every consumer.

One hub runs fedimg stage, fedimg promote, autocloud_ami and the health
consumer against a recording moto_server and a compose server on loopback.
Every bad message of every consumed topic, and zmq frames that are not fedmsg
at all, are published; then bad image files are served for a real compose.
Each bad message must produce a WARNING/ERROR record from the project's
loggers (counted by level, never by wording), no mutating AWS call, no
success message, and the hub must still answer a ping afterwards.

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
from tests.corpus import ALLOWED_HOST, RAW_PAYLOADS, TOPICS, message_corpus

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
    settings["fedimg.http.retries"] = 0
    settings["logging"] = LOGGING
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
        moto = MotoServer(record=True).start()
    try:
        with (
            ComposeServer(tree.root) as server,
            LocalBus(
                settings={**settings, "moksha.workers_per_consumer": 4},
                workdir=Path(workdir / "bus"),
                extra_env=moto.env(),
            ) as bus,
        ):
            yield Hub(tree, moto, server, bus, bus.start_hub(timeout=90))
    finally:
        moto.stop()


def test_every_bad_message_is_refused_at_no_cost_and_the_hub_keeps_answering(hub: Hub) -> None:
    corpus = message_corpus()
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
        assert not [
            m
            for m in hub.bus.tap.messages("fedimg.image.test")
            if m.at >= t0 and m.body.get("image_name") == image.image_name
        ]
        hub.bus.wait_hub(hub.hub, timeout=30)
    finally:
        hub.server.reset()
