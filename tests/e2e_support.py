"""Helpers for the end-to-end tests: reading the bus record, moto's state, process trees."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psutil

from devel.bus import Seen
from fedimg import tags
from fedimg.messages import InvalidMessage, StagedImage, Topics

TOPICS = Topics("org.fedoraproject", "dev")


def contract_errors(messages: Iterable[Seen]) -> list[str]:
    """Every message of a contract topic whose body breaks its schema."""
    errors = []
    for m in messages:
        mtype = TOPICS.which(m.topic)
        if mtype is None:
            continue
        try:
            mtype.validate(m.body)
        except InvalidMessage as exc:
            errors.append(f"{m.topic}: {exc}")
    return errors


def short(topic: str) -> str:
    """``org.fedoraproject.dev.fedimg.image.upload`` -> ``fedimg.image.upload``."""
    prefix = f"{TOPICS.prefix}.{TOPICS.environment}."
    return topic[len(prefix) :] if topic.startswith(prefix) else topic


def about(messages: Sequence[Seen], image_name: str, ami_id: str) -> list[Seen]:
    """The messages about one image/AMI, in arrival order."""

    def mine(m: Seen) -> bool:
        body = m.body
        extra = body.get("extra") if isinstance(body.get("extra"), dict) else {}
        item = body.get("data", {}).get("item") if isinstance(body.get("data"), dict) else None
        return (
            body.get("image_name") == image_name
            or body.get("ami_id") == ami_id
            or (extra or {}).get("id") == ami_id
            or (extra or {}).get("source_image_id") == ami_id
            or (isinstance(item, list) and ami_id in item)
        )

    return [m for m in messages if mine(m)]


def first(messages: Sequence[Seen], topic: str, pred: Callable[[dict[str, Any]], bool]) -> int:
    """Index of the first message on ``topic`` (short form) whose body matches; -1 if none."""
    for i, m in enumerate(messages):
        if short(m.topic) == topic and pred(m.body):
            return i
    return -1


def last(messages: Sequence[Seen], topic: str, pred: Callable[[dict[str, Any]], bool]) -> int:
    found = -1
    for i, m in enumerate(messages):
        if short(m.topic) == topic and pred(m.body):
            found = i
    return found


def count(messages: Sequence[Seen], topic: str, pred: Callable[[dict[str, Any]], bool]) -> int:
    return sum(1 for m in messages if short(m.topic) == topic and pred(m.body))


def any_body(body: dict[str, Any]) -> bool:
    return True


@dataclass(frozen=True)
class AwsCounts:
    """How many fedimg AMIs and snapshots each region holds."""

    images: dict[str, int]
    snapshots: dict[str, int]


def aws_counts(ec2: Callable[[str], Any], regions: Sequence[str]) -> AwsCounts:
    """Our AMIs and snapshots per region (moto's built-in public images are not ours)."""
    images, snapshots = {}, {}
    for region in regions:
        client = ec2(region)
        images[region] = len(client.describe_images(Owners=["self"])["Images"])
        snapshots[region] = len(client.describe_snapshots(OwnerIds=["self"])["Snapshots"])
    return AwsCounts(images, snapshots)


class ProcessWatcher:
    """Records every descendant of a process while it runs (polled, with create times)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.seen: dict[int, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                for child in root.children(recursive=True):
                    try:
                        self.seen.setdefault(
                            child.pid, (child.create_time(), " ".join(child.cmdline())[:200])
                        )
                    except psutil.Error:
                        continue
            except psutil.NoSuchProcess:
                return
            self._stop.wait(self.interval)

    def alive(self) -> list[str]:
        """Descendants seen while it ran that still exist now (same pid AND create time)."""
        left = []
        for pid, (created, cmdline) in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid}: {cmdline}")
            except psutil.NoSuchProcess:
                continue
        return left


def ami_in_testing(client: Any, n: int) -> str:
    """An AMI in ``client``'s region tagged ``testing`` as fedimg's stage tags it."""
    region = client.meta.region_name
    image = StagedImage(
        compose_id=f"Fedora-Cloud-41-20261124.{n}",
        image_name=f"Fedora-Cloud-Base-Generic-41-20261124.{n}.x86_64",
        image_url=f"https://kojipkgs.test/f41-{n}.raw.xz",
        architecture="x86_64",
        region=region,
        subvariant="Cloud_Base",
        release="41",
    )
    ami, snap = register_ami(client, image)
    values = tags.image_tags(image, tags.State.TESTING, datetime.now(UTC).isoformat())
    client.create_tags(Resources=[ami], Tags=tags.as_list(values))
    client.create_tags(Resources=[snap], Tags=tags.as_list(values))
    return str(ami)


def register_ami(client: Any, image: StagedImage) -> tuple[str, str]:
    """``(AMI, snapshot)`` registered for ``image`` as stage registers them, untagged."""
    vol = client.create_volume(Size=5, AvailabilityZone=f"{image.region}a")
    snap = str(client.create_snapshot(VolumeId=vol["VolumeId"])["SnapshotId"])
    ami = client.register_image(
        Name=f"{image.image_name}-hvm-gp3",
        RootDeviceName="/dev/sda1",
        VirtualizationType="hvm",
        BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": snap}}],
    )["ImageId"]
    return str(ami), snap
