"""The AWS edge of a promotion: copy an AMI into one region and make it public.

Every step is "find, else create" so that a retry, a replayed message or a
resumed promotion never makes a second copy:

* find: an image we own in the destination region tagged
  ``fedimg:source-ami=<staging AMI>`` or carrying our deterministic name and
  copied from that AMI (``SourceImageId``, our description, or the tag);
* create: ``copy_image`` called IN the destination region with a
  deterministic ``ClientToken`` and name, tags for image and snapshot (also
  applied with ``create_tags`` afterwards, as moto drops them);
* wait until ``available`` (our own poll loop, deadline ``copy_timeout``);
* make the image and its snapshot(s) public, retrying
  ``InvalidAMIID.Unavailable`` with backoff up to ``publish_retry_timeout``.

``Copier`` holds no per-promotion state and is safe to share between threads.
The clock is a seam so tests run the retry and timeout paths without sleeping.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from fedimg import tags
from fedimg.aws import error_code, tag_specs, with_extra
from fedimg.facts import parse_when
from fedimg.messages import StagedImage

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_TOKEN = 64  # CopyImage ClientToken limit
MAX_NAME = 128  # AMI name limit
MAX_DESCRIPTION = 255

#: Codes worth retrying with backoff (botocore's own retries may have given up).
TRANSIENT = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "ResourceLimitExceeded",  # CopyImage: too many concurrent copies, clears as they finish
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "Unavailable",
    }
)
#: Codes of a copy that is not visible or not ready yet.
NOT_READY = frozenset({"InvalidAMIID.Unavailable", "InvalidAMIID.NotFound"})
SNAPSHOT_MISSING = "InvalidSnapshot.NotFound"
FAILED_STATES = frozenset({"failed", "error", "invalid", "deregistered"})


class CopyError(RuntimeError):
    """A copy could not be started, finished or published; the text says why."""


class CopyTimeout(CopyError, TimeoutError):
    """A copy was not ``available`` before ``copy_timeout``."""


class RetryTimeout(CopyError, TimeoutError):
    """A retried call kept failing with a retryable code until its deadline."""


class Ec2Factory(Protocol):
    """``fedimg.aws.AwsClients`` as the copier and the promoter use it."""

    def ec2(self, region: str) -> Any: ...

    def client(self, service: str, region: str) -> Any: ...


@dataclass(frozen=True)
class Clock:
    """Time as the copier sees it (tests pass a fake that does not sleep)."""

    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


@dataclass(frozen=True)
class Timing:
    """Deadlines and intervals, from ``FedimgConfig`` in production."""

    copy_timeout: float = 3 * 3600.0
    retry_timeout: float = 1800.0
    poll_interval: float = 15.0
    backoff_initial: float = 5.0
    backoff_max: float = 60.0


@dataclass(frozen=True)
class RegionResult:
    """How one region ended: the copy's id (when known) or why it failed."""

    region: str
    ami_id: str | None
    error: str | None = None
    started: bool = False  # this pass called copy_image
    published: bool = False  # this pass made the image public (a publish event is due)

    @property
    def ok(self) -> bool:
        return self.error is None and self.ami_id is not None


# -- pure helpers ---------------------------------------------------------------


def copy_token(source_ami: str, region: str, after: str | None = None) -> str:
    """The ``ClientToken`` of the copy of ``source_ami`` into ``region`` (<= 64 chars).

    ``after`` names a failed copy being replaced, so the new attempt gets a new
    (and still deterministic) token instead of AWS's answer for the old one.
    """
    token = f"fedimg-{source_ami}-{region}" + (f"-r{after[-8:]}" if after else "")
    if len(token) > MAX_TOKEN:
        digest = hashlib.sha256(token.encode()).hexdigest()[:24]
        token = f"fedimg-{source_ami}-{digest}"[:MAX_TOKEN]
    return token


def copy_names(source_name: str, source_ami: str) -> tuple[str, str]:
    """The copy's name, and the fallback used when a foreign image holds that name."""
    fallback = f"{source_name[: MAX_NAME - len(source_ami) - 1]}-{source_ami}"
    return source_name[:MAX_NAME], fallback


def copy_description(image: StagedImage, source_region: str) -> str:
    text = f"{image.image_name} (fedimg copy of {image.ami_id} from {source_region})"
    return text[:MAX_DESCRIPTION]


def copy_tags(image: StagedImage) -> dict[str, str]:
    """Tags of a copy: the image's provenance plus the AMI it was copied from.

    The state tag stays on the staging AMI only: it is the one record.
    """
    assert image.ami_id is not None
    provenance = tags.image_tags(image, tags.State.RELEASED, "")
    del provenance[tags.STATE], provenance[tags.STAGED_AT]
    provenance[tags.SOURCE_AMI] = image.ami_id
    return {k: v for k, v in provenance.items() if v}


def bdm_snapshots(described: Mapping[str, Any]) -> list[str]:
    """Snapshot ids in a described image's block device mappings."""
    ids = []
    for mapping in described.get("BlockDeviceMappings") or ():
        snap = (mapping.get("Ebs") or {}).get("SnapshotId")
        if snap and snap not in ids:
            ids.append(snap)
    return ids


def is_copy_of(described: Mapping[str, Any], image: StagedImage, source_region: str) -> bool:
    """True if ``described`` is recognisably our copy of ``image``."""
    if tags.as_dict(described.get("Tags")).get(tags.SOURCE_AMI) == image.ami_id:
        return True
    if described.get("SourceImageId") == image.ami_id:
        return True
    return described.get("Description") == copy_description(image, source_region)


def pick(images: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The copy to keep among several: available first, then the oldest."""
    usable = [dict(i) for i in images if i.get("State") not in FAILED_STATES]
    if not usable:
        return None
    return sorted(
        usable,
        key=lambda i: (i.get("State") != "available", i.get("CreationDate", ""), i["ImageId"]),
    )[0]


def snapshot_is_public(ec2: Any, snapshot_id: str) -> bool:
    """Whether anyone may create a volume from the snapshot (``createVolumePermission`` all)."""
    perms = ec2.describe_snapshot_attribute(
        SnapshotId=snapshot_id, Attribute="createVolumePermission"
    ).get("CreateVolumePermissions", [])
    return {"Group": "all"} in perms


def describe_error(exc: BaseException) -> str:
    """One line for a log or a message: the AWS code when there is one."""
    code = error_code(exc)
    if code:
        message = str(getattr(exc, "response", {}).get("Error", {}).get("Message") or "")
        return f"{code}: {message}"[:300] if message else code
    return f"{type(exc).__name__}: {exc}"[:300]


# -- the edge -------------------------------------------------------------------


@dataclass
class Copier:
    """Copies and publishes AMIs region by region (thread-safe, stateless)."""

    aws: Ec2Factory
    source_region: str
    timing: Timing = field(default_factory=Timing)
    clock: Clock = field(default_factory=Clock)
    extra_tags: Mapping[str, str] = field(default_factory=dict)  # fedimg.aws.extra_tags
    # fedimg.promote.copy_completion_minutes: 0 is a best-effort copy, else time-based
    completion_minutes: int = 0

    def tags_of(self, image: StagedImage) -> dict[str, str]:
        """The tags of a copy and its snapshots: ``copy_tags`` and the extra ones."""
        return with_extra(copy_tags(image), self.extra_tags)

    def copy_params(self, image: StagedImage, name: str, token: str) -> dict[str, Any]:
        """The ``copy_image`` arguments (called in the destination region)."""
        params: dict[str, Any] = {
            "SourceRegion": self.source_region,
            "SourceImageId": image.ami_id,
            "Name": name,
            "Description": copy_description(image, self.source_region),
            "ClientToken": token,
            "TagSpecifications": tag_specs(("image", "snapshot"), self.tags_of(image)),
        }
        if self.completion_minutes:
            params["SnapshotCopyCompletionDurationMinutes"] = self.completion_minutes
        return params

    # -- retry / wait primitives --------------------------------------------
    def retrying(self, call: Callable[[], T], codes: frozenset[str], what: str) -> T:
        """``call()``, retrying ``codes`` with capped exponential backoff until the deadline."""
        deadline = self.clock.monotonic() + self.timing.retry_timeout
        delay = self.timing.backoff_initial
        while True:
            try:
                return call()
            except ClientError as exc:
                code = error_code(exc)
                if code not in codes:
                    raise
                left = deadline - self.clock.monotonic()
                if left <= 0:
                    raise RetryTimeout(
                        f"{what}: still {code} after {self.timing.retry_timeout:g}s"
                    ) from exc
                log.info("%s: %s, retrying in %.0fs", what, code, min(delay, left))
                self.clock.sleep(min(delay, left))
                delay = min(delay * 2, self.timing.backoff_max)

    def describe(self, region: str, ami_id: str) -> dict[str, Any] | None:
        """The described image, or None if AWS does not know it (yet)."""
        try:
            images = self.aws.ec2(region).describe_images(ImageIds=[ami_id])["Images"]
        except ClientError as exc:
            if error_code(exc) in NOT_READY:
                return None
            raise
        return dict(images[0]) if images else None

    def wait_available(self, region: str, ami_id: str, what: str) -> dict[str, Any]:
        """Poll until the image is ``available``; raise CopyTimeout / CopyError."""
        deadline = self.clock.monotonic() + self.timing.copy_timeout
        while True:
            described = self.retrying(lambda: self.describe(region, ami_id), TRANSIENT, what)
            state = described.get("State") if described else "unknown"
            if described is not None and state == "available":
                return described
            if state in FAILED_STATES:
                reason = ((described or {}).get("StateReason") or {}).get("Message", "")
                raise CopyError(f"{what}: {ami_id} is {state}: {reason}".rstrip(": "))
            left = deadline - self.clock.monotonic()
            if left <= 0:
                raise CopyTimeout(
                    f"{what}: {ami_id} still {state} after {self.timing.copy_timeout:g}s"
                )
            self.clock.sleep(min(self.timing.poll_interval, left))

    # -- find, else create ----------------------------------------------------
    def find_copy(
        self, region: str, image: StagedImage, names: tuple[str, ...]
    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """Our existing copy of ``image`` in ``region`` (None if there is none usable),
        and the failed copies found on the way."""
        ec2 = self.aws.ec2(region)
        by_tag = ec2.describe_images(
            Owners=["self"], Filters=[{"Name": f"tag:{tags.SOURCE_AMI}", "Values": [image.ami_id]}]
        )["Images"]
        failed = [dict(i) for i in by_tag if i.get("State") in FAILED_STATES]
        found = pick(by_tag)
        if found is not None:
            return found, failed
        by_name = ec2.describe_images(
            Owners=["self"], Filters=[{"Name": "name", "Values": list(names)}]
        )["Images"]
        ours = [i for i in by_name if is_copy_of(i, image, self.source_region)]
        failed += [dict(i) for i in ours if i.get("State") in FAILED_STATES]
        unique = {i["ImageId"]: i for i in failed}
        return pick(ours), list(unique.values())

    def name_taken(self, region: str, name: str, image: StagedImage) -> bool:
        """True if an image that is not our copy already holds ``name`` in ``region``."""
        images = self.aws.ec2(region).describe_images(
            Owners=["self"], Filters=[{"Name": "name", "Values": [name]}]
        )["Images"]
        return any(not is_copy_of(i, image, self.source_region) for i in images)

    def start_copy(
        self, region: str, image: StagedImage, source_name: str, replacing: str | None = None
    ) -> str:
        """Call ``copy_image`` in ``region``; return the new AMI id."""
        source = image.ami_id
        assert source is not None
        primary, fallback = copy_names(source_name, source)
        name = fallback if self.name_taken(region, primary, image) else primary
        token = copy_token(source, region, replacing)
        what = f"{image.compose_id} {source} -> {region}"
        params = self.copy_params(image, name, token)
        answer = self.retrying(
            lambda: self.aws.ec2(region).copy_image(**params),
            TRANSIENT,
            f"{what}: copy_image",
        )
        new_ami = str(answer["ImageId"])
        log.info("%s: copy %s started as %s", what, name, new_ami)
        self.tag(region, [new_ami], self.tags_of(image), what)
        return new_ami

    def tag(self, region: str, resources: list[str], values: Mapping[str, str], what: str) -> None:
        """``create_tags`` (idempotent), retrying transient errors and not-yet-visible ids."""
        if not resources:
            return
        self.retrying(
            lambda: self.aws.ec2(region).create_tags(
                Resources=resources, Tags=tags.as_list(values)
            ),
            TRANSIENT | NOT_READY,
            f"{what}: create_tags",
        )

    # -- public ---------------------------------------------------------------
    def snapshots_of(
        self, region: str, described: Mapping[str, Any], fallback_tags: Mapping[str, str]
    ) -> list[str]:
        """Existing snapshots of an image: its block device mappings, else by tag.

        AWS always lists the real snapshot in the mappings; a mapping that
        names a missing snapshot (moto can do that) falls back to snapshots we
        own carrying ``fallback_tags``.
        """
        ec2 = self.aws.ec2(region)
        existing = []
        for snap in bdm_snapshots(described):
            try:
                ec2.describe_snapshots(SnapshotIds=[snap])
                existing.append(snap)
            except ClientError as exc:
                if error_code(exc) != SNAPSHOT_MISSING:
                    raise
                log.warning(
                    "%s: %s lists snapshot %s, which does not exist",
                    region,
                    described.get("ImageId"),
                    snap,
                )
        if existing:
            return existing
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in fallback_tags.items()]
        found = ec2.describe_snapshots(OwnerIds=["self"], Filters=filters)["Snapshots"]
        return sorted({s["SnapshotId"] for s in found})

    def is_public(self, region: str, described: Mapping[str, Any], snapshots: list[str]) -> bool:
        """True if the image and every snapshot are public already (nothing to announce)."""
        if not described.get("Public") or not snapshots:
            return False
        ec2 = self.aws.ec2(region)
        return all(snapshot_is_public(ec2, snap) for snap in snapshots)

    def make_public(self, region: str, ami_id: str, snapshots: list[str], what: str) -> None:
        """Launch permission ``all`` on the image; ``createVolumePermission`` ``all`` on snapshots.

        Retries ``InvalidAMIID.Unavailable`` (a copy not ready yet) with backoff.
        """
        ec2 = self.aws.ec2(region)
        self.retrying(
            lambda: ec2.modify_image_attribute(
                ImageId=ami_id, LaunchPermission={"Add": [{"Group": "all"}]}
            ),
            TRANSIENT | {"InvalidAMIID.Unavailable"},
            f"{what}: make {ami_id} public",
        )
        if not snapshots:
            raise CopyError(f"{what}: {ami_id} is public but no snapshot of it was found")
        for snap in snapshots:
            self.retrying(
                lambda snap=snap: ec2.modify_snapshot_attribute(  # type: ignore[misc]
                    SnapshotId=snap,
                    Attribute="createVolumePermission",
                    OperationType="add",
                    GroupNames=["all"],
                ),
                TRANSIENT,
                f"{what}: make snapshot {snap} public",
            )
        log.info("%s: %s and snapshot(s) %s are public", what, ami_id, ", ".join(snapshots))

    def deprecate(
        self, region: str, described: Mapping[str, Any], when: datetime | None, what: str
    ) -> None:
        """``EnableImageDeprecation`` at ``when``, unless the image already has that time."""
        if when is None:
            return
        ami_id = str(described["ImageId"])
        if parse_when(described.get("DeprecationTime")) == when:
            return
        ec2 = self.aws.ec2(region)
        self.retrying(
            lambda: ec2.enable_image_deprecation(ImageId=ami_id, DeprecateAt=when),
            TRANSIENT | {"InvalidAMIID.Unavailable"},
            f"{what}: deprecate {ami_id}",
        )
        log.info("%s: %s is deprecated at %s", what, ami_id, when.strftime("%Y-%m-%dT%H:%MZ"))

    # -- one region, end to end ----------------------------------------------
    def copy_and_publish(
        self,
        region: str,
        image: StagedImage,
        source_name: str,
        on_started: Callable[[str], None],
        deprecate_at: datetime | None = None,
    ) -> RegionResult:
        """Find or start the copy, wait for it, make it public. Never raises for AWS errors."""
        assert image.ami_id is not None
        what = f"{image.compose_id} {image.ami_id} -> {region}"
        ami_id: str | None = None
        started = False
        try:
            names = copy_names(source_name, image.ami_id)
            existing, failed_copies = self.find_copy(region, image, names)
            if existing is None:
                replacing = None
                for failed in failed_copies:
                    replacing = failed["ImageId"]
                    log.warning(
                        "%s: copy %s is %s; deregistering it and copying again",
                        what,
                        replacing,
                        failed.get("State"),
                    )
                    self.aws.ec2(region).deregister_image(ImageId=replacing)
                ami_id = self.start_copy(region, image, source_name, replacing)
                started = True
                on_started(ami_id)
            else:
                ami_id = str(existing["ImageId"])
                log.info("%s: found existing copy %s (%s)", what, ami_id, existing.get("State"))
            described = self.wait_available(region, ami_id, what)
            snapshots = self.snapshots_of(region, described, {tags.SOURCE_AMI: image.ami_id})
            self.tag(region, [ami_id, *snapshots], self.tags_of(image), what)
            # Deprecation first: no image goes public without its deprecation time.
            self.deprecate(region, described, deprecate_at, what)
            already = self.is_public(region, described, snapshots)
            self.make_public(region, ami_id, snapshots, what)
            return RegionResult(region, ami_id, None, started, published=not already)
        except (ClientError, BotoCoreError, CopyError) as exc:
            reason = describe_error(exc)
            log.error("%s: region failed (copy %s): %s", what, ami_id or "not started", reason)
            return RegionResult(region, ami_id, reason, started)

    def publish_in_place(
        self,
        image: StagedImage,
        described: Mapping[str, Any],
        snapshots: list[str],
        deprecate_at: datetime | None = None,
    ) -> RegionResult:
        """Make the staging AMI itself public (its snapshots found by the caller)."""
        assert image.ami_id is not None
        region = self.source_region
        what = f"{image.compose_id} {image.ami_id} in {region}"
        try:
            self.deprecate(region, described, deprecate_at, what)
            already = self.is_public(region, described, snapshots)
            self.make_public(region, image.ami_id, snapshots, what)
        except (ClientError, BotoCoreError, CopyError) as exc:
            reason = describe_error(exc)
            log.error("%s: staging AMI not made public: %s", what, reason)
            return RegionResult(region, image.ami_id, reason)
        return RegionResult(region, image.ami_id, published=not already)


class Slots:
    """A bound on copies in flight from one source region, shared by every promotion."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sem = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self.in_use = 0
        self.peak = 0  # the most slots ever held at once (for tests and the benchmark)

    def __enter__(self) -> Slots:
        self._sem.acquire()
        with self._lock:
            self.in_use += 1
            self.peak = max(self.peak, self.in_use)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.in_use -= 1
        self._sem.release()
