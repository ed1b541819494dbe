"""fedora-messaging classes for every topic fedimg and autocloud_ami publish.

Each class is registered under the ``fedora.messages`` entry point group
(see ``pyproject.toml``), so a consumer with this package installed gets an
instance of it, validated against its ``body_schema`` (the dictionaries of
``fedimg_messages.schemas``). ``topic`` is the topic without the broker's
``topic_prefix`` (``org.fedoraproject.prod`` in Fedora).
"""

from __future__ import annotations

from typing import Any, ClassVar

from fedora_messaging.message import Message

from fedimg_messages import schemas


class _Base(Message):
    """Shared rendering: ``summary`` per class, ``__str__`` as "Field: value" lines."""

    _app: ClassVar[str] = ""
    _fields: ClassVar[tuple[tuple[str, str], ...]] = ()

    @property
    def app_name(self) -> str:
        return self._app

    def _get(self, *path: str) -> Any:
        value: Any = self.body
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    @property
    def ami_id(self) -> str | None:
        """The AMI the message is about (None when the body names none)."""
        found = self._get("ami_id") or self._get("extra", "id")
        return str(found) if found else None

    def __str__(self) -> str:
        lines = [self.summary, ""]
        for label, dotted in self._fields:
            value = self._get(*dotted.split("."))
            if value not in (None, "", {}, []):
                lines.append(f"\t{label}: {value}")
        return "\n".join(lines) + "\n"


class _FedimgMessage(_Base):
    _app = "fedimg"


class _AutocloudMessage(_Base):
    _app = "autocloud_ami"
    _fields = (
        ("Compose ID", "compose_id"),
        ("Image", "image_name"),
        ("AMI", "ami_id"),
        ("Region", "region"),
        ("Architecture", "architecture"),
        ("Job", "job_id"),
        ("Passed", "passed"),
        ("Failed", "failed"),
        ("Results", "results_url"),
        ("Reason", "reason"),
    )

    _verb: ClassVar[str] = ""

    @property
    def summary(self) -> str:
        ami, region = self._get("ami_id"), self._get("region")
        return f"autocloud_ami: the test of {ami} in {region} {self._verb}"


_IMAGE_FIELDS = (
    ("Compose ID", "compose"),
    ("Image", "image_name"),
    ("Image URL", "image_url"),
    ("Architecture", "architecture"),
    ("Region", "destination"),
    ("AMI", "extra.id"),
    ("Volume type", "extra.vol_type"),
    ("Reason", "reason"),
)


# An AMI in one region, named by compose id (copies, removals).
_REGIONAL_FIELDS = (
    ("Compose ID", "compose_id"),
    ("Image", "image_name"),
    ("Architecture", "architecture"),
    ("Region", "destination"),
    ("AMI", "extra.id"),
)


class HubPingV1(_FedimgMessage):
    """Asks every fedimg consumer to answer with ``fedimg.hub.pong``."""

    topic = "fedimg.hub.ping"
    body_schema = schemas.HUB_PING
    _fields = (("Token", "token"),)

    @property
    def summary(self) -> str:
        return f"fedimg: ping {self._get('token')}"


class HubPongV1(_FedimgMessage):
    """A fedimg consumer answered a ping: it is subscribed and can publish."""

    topic = "fedimg.hub.pong"
    body_schema = schemas.HUB_PONG
    _fields = (("Token", "token"), ("Host", "host"))

    @property
    def summary(self) -> str:
        return f"fedimg on {self._get('host')} answered ping {self._get('token')}"


class ImageUploadV1(_FedimgMessage):
    """An image's upload as an AMI in the staging region started, completed or failed."""

    topic = "fedimg.image.upload"
    body_schema = schemas.IMAGE_UPLOAD
    _fields = _IMAGE_FIELDS

    @property
    def summary(self) -> str:
        verb = {"started": "started uploading", "completed": "finished uploading"}.get(
            self._get("status"), "failed to upload"
        )
        return f"fedimg {verb} {self._get('image_name')} to {self._get('destination')}"


class ImageTestV1(_FedimgMessage):
    """A test request (``started``) or the gate's verdict (``completed``/``failed``)."""

    topic = "fedimg.image.test"
    body_schema = schemas.IMAGE_TEST
    _fields = _IMAGE_FIELDS

    @property
    def summary(self) -> str:
        verb = {"started": "started testing", "completed": "finished testing"}.get(
            self._get("status"), "failed testing"
        )
        extra = (self.ami_id, self._get("extra", "virt_type"), self._get("extra", "vol_type"))
        detail = ", ".join(str(x) for x in extra if x)
        return f"{self._get('image_name')} {verb} on {self._get('destination')} ({detail})"


class ImageCopyV1(_FedimgMessage):
    """A copy of a released AMI to one region was started."""

    topic = "fedimg.image.copy"
    body_schema = schemas.IMAGE_COPY
    _fields = (*_REGIONAL_FIELDS, ("Source AMI", "extra.source_image_id"))

    @property
    def summary(self) -> str:
        return (
            f"fedimg started copying {self._get('image_name')} to "
            f"{self._get('destination')} as {self.ami_id}"
        )


class ImagePublishV1(_FedimgMessage):
    """An AMI was made public in one region."""

    topic = "fedimg.image.publish"
    body_schema = schemas.IMAGE_PUBLISH
    _fields = _IMAGE_FIELDS

    @property
    def summary(self) -> str:
        return (
            f"fedimg made {self._get('image_name')} public in "
            f"{self._get('destination')} as {self.ami_id}"
        )


class ImageReleaseV1(_FedimgMessage):
    """An image is public in every region it could reach (one message per image)."""

    topic = "fedimg.image.release"
    body_schema = schemas.IMAGE_RELEASE
    _fields = (
        ("Compose ID", "compose_id"),
        ("Image", "image_name"),
        ("Architecture", "architecture"),
        ("Release", "release"),
        ("Subvariant", "subvariant"),
    )

    @property
    def regions(self) -> dict[str, str]:
        """Region -> public AMI id."""
        return dict(self._get("regions") or {})

    @property
    def summary(self) -> str:
        text = (
            f"fedimg released {self._get('image_name')} from {self._get('compose_id')} "
            f"in {len(self.regions)} region(s)"
        )
        failed = self._get("failed_regions") or {}
        return f"{text}, failed in {len(failed)}" if failed else text

    def __str__(self) -> str:
        lines = [super().__str__().rstrip("\n")]
        lines += [f"\t{region}: {ami}" for region, ami in sorted(self.regions.items())]
        failed = self._get("failed_regions") or {}
        lines += [f"\tFAILED {region}: {why}" for region, why in sorted(failed.items())]
        for waiver in self._get("waivers") or []:
            where = f" [{waiver['scenario']}]" if waiver.get("scenario") else ""
            lines.append(
                f"\tWAIVED {waiver.get('testcase')}{where} by {waiver.get('username')}:"
                f" {waiver.get('comment')}"
            )
        return "\n".join(lines) + "\n"


class ImageDeleteV1(_FedimgMessage):
    """An AMI (a staging AMI or a copy) was deregistered in one region, its snapshots deleted."""

    topic = "fedimg.image.delete"
    body_schema = schemas.IMAGE_DELETE
    _fields = (*_REGIONAL_FIELDS, ("Reason", "reason"))

    @property
    def summary(self) -> str:
        return (
            f"fedimg removed {self.ami_id} ({self._get('image_name')}) "
            f"in {self._get('destination')}"
        )


class AmiQueuedV1(_AutocloudMessage):
    """An AMI test request waits for a free test slot."""

    topic = "autocloud.ami.queued"
    body_schema = schemas.AMI_QUEUED
    _verb = "is queued"


class AmiRunningV1(_AutocloudMessage):
    """An AMI is being tested on a throwaway instance."""

    topic = "autocloud.ami.running"
    body_schema = schemas.AMI_RUNNING
    _verb = "is running"


class AmiSuccessV1(_AutocloudMessage):
    """Every gating test passed."""

    topic = "autocloud.ami.success"
    body_schema = schemas.AMI_SUCCESS
    _verb = "passed"


class AmiFailedV1(_AutocloudMessage):
    """A gating test failed, or the test could not run."""

    topic = "autocloud.ami.failed"
    body_schema = schemas.AMI_FAILED
    _verb = "failed"


ALL: tuple[type[Message], ...] = (
    HubPingV1,
    HubPongV1,
    ImageUploadV1,
    ImageTestV1,
    ImageCopyV1,
    ImagePublishV1,
    ImageReleaseV1,
    ImageDeleteV1,
    AmiQueuedV1,
    AmiRunningV1,
    AmiSuccessV1,
    AmiFailedV1,
)
"""Every class of this package, one per topic."""
