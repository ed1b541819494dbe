"""The staging AMI: its name and RegisterImage parameters, and the EC2 calls around them.

The first half is pure: ``ami_name`` (unique and deterministic from the image,
so a replay finds the AMI instead of uploading again), ``ami_description`` and
``register_params``. The second half is the AWS edge, every call on one EC2
client of the staging region: ``find_ami`` / ``find_snapshot`` (the "find"
of find-else-create), ``register`` (never leaves a half-registered AMI) and
``wait_available`` (a deadline and a typed timeout).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

from botocore.exceptions import ClientError

from fedimg import tags
from fedimg.aws import error_code, tag_specs
from fedimg.messages import VIRT_TYPE

log = logging.getLogger(__name__)

ROOT_DEVICE: Final = "/dev/sda1"
ARCHITECTURES: Final = {"x86_64": "x86_64", "aarch64": "arm64"}
BOOT_MODES: Final = {"x86_64": "uefi-preferred", "aarch64": "uefi"}
IMDS_SUPPORT: Final = "v2.0"  # instances of every AMI require IMDSv2 (HttpTokens required)
TPM_SUPPORT: Final = "v2.0"
# NitroTPM needs the instance to boot UEFI, which only the ``uefi`` boot mode
# guarantees: ``uefi-preferred`` falls back to legacy BIOS on instance types
# without UEFI, where there is no TPM. So TpmSupport goes with ``uefi`` only.
TPM_BOOT_MODES: Final = frozenset({"uefi"})
BOOTABLE_VOLUME_TYPES: Final = frozenset({"gp2", "gp3", "io1", "io2", "standard"})
PROVISIONED_IOPS: Final = frozenset({"io1", "io2"})
NAME_MAX: Final = 128
SHA_PREFIX: Final = 16
_NAME_BAD_CHARS: Final = re.compile(r"[^A-Za-z0-9()\[\]./'@_ -]")
IMAGE_SUFFIXES: Final = (".raw.xz", ".raw", ".xz")
BROKEN_STATES: Final = frozenset({"failed", "error", "invalid"})
_STATE_RANK: Final = {"available": 0, "pending": 1, "transient": 1}
_NOT_FOUND: Final = frozenset({"InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"})


class AmiImage(Protocol):
    """What the AMI functions need of an image (``fedimg.compose.CloudImage`` has it)."""

    @property
    def compose_id(self) -> str: ...
    @property
    def image_name(self) -> str: ...
    @property
    def arch(self) -> str: ...
    @property
    def sha256(self) -> str: ...


class AmiError(Exception):
    """An AMI could not be registered or did not become usable."""


class AmiTimeout(AmiError, TimeoutError):
    """An AMI did not become available before its deadline."""


# -- pure ------------------------------------------------------------------------


def _stem(image_name: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if image_name.endswith(suffix):
            return image_name[: -len(suffix)]
    return image_name


def ami_name(image: AmiImage, vol_type: str) -> str:
    """``<file name without .raw.xz>-hvm-<vol type>-<sha256 prefix>``, within AWS's rules.

    Deterministic (the same image file gives the same name in every run and
    every respin) and unique (the content hash tells apart two files with the
    same name). AWS allows 3-128 characters of ``[A-Za-z0-9()[]./'@_ -]``.
    """
    if not re.fullmatch(r"[0-9a-f]{64}", image.sha256):
        raise ValueError(f"{image.image_name}: no sha256 to name the AMI by")
    if not re.fullmatch(r"[a-z0-9]{1,16}", vol_type):
        raise ValueError(f"invalid volume type {vol_type!r}")
    suffix = f"-{VIRT_TYPE}-{vol_type}-{image.sha256[:SHA_PREFIX]}"
    stem = _NAME_BAD_CHARS.sub("_", _stem(image.image_name))[: NAME_MAX - len(suffix)]
    return f"{stem or 'fedimg'}{suffix}"


def ami_description(image: AmiImage, vol_type: str) -> str:
    """A human description naming the compose, arch and image (AWS allows 255 chars)."""
    text = f"Fedora compose {image.compose_id} {image.arch} {VIRT_TYPE} {vol_type}: "
    return (text + image.image_name)[:255]


def register_params(
    image: AmiImage,
    snapshot_id: str,
    vol_type: str,
    volume_size_gib: int,
    *,
    description: str,
    tags: list[dict[str, str]],  # shadows the tags module, unused in this function
) -> dict[str, Any]:
    """The keyword arguments of ``register_image`` for one image and volume type."""
    if image.arch not in ARCHITECTURES:
        raise ValueError(f"{image.image_name}: unsupported architecture {image.arch!r}")
    if vol_type not in BOOTABLE_VOLUME_TYPES:
        raise ValueError(f"volume type {vol_type!r} cannot be a root volume")
    if volume_size_gib < 1:
        raise ValueError(f"volume size {volume_size_gib} GiB is not positive")
    ebs: dict[str, Any] = {
        "SnapshotId": snapshot_id,
        "VolumeType": vol_type,
        "VolumeSize": volume_size_gib,
        "DeleteOnTermination": True,
    }
    if vol_type in PROVISIONED_IOPS:
        # Within io1's 50 IOPS/GiB and io2's 1000 IOPS/GiB, at least AWS's 100.
        ebs["Iops"] = max(100, min(3000, 50 * volume_size_gib))
    boot_mode = BOOT_MODES[image.arch]
    params: dict[str, Any] = {
        "Name": ami_name(image, vol_type),
        "Description": description[:255],
        "Architecture": ARCHITECTURES[image.arch],
        "VirtualizationType": VIRT_TYPE,
        "EnaSupport": True,
        "SriovNetSupport": "simple",
        "RootDeviceName": ROOT_DEVICE,
        "BootMode": boot_mode,
        "ImdsSupport": IMDS_SUPPORT,
        "BlockDeviceMappings": [{"DeviceName": ROOT_DEVICE, "Ebs": ebs}],
        "TagSpecifications": tag_specs(("image",), {t["Key"]: t["Value"] for t in tags}),
    }
    if boot_mode in TPM_BOOT_MODES:
        params["TpmSupport"] = TPM_SUPPORT
    return params


def snapshot_tags(image_tags: Mapping[str, str]) -> dict[str, str]:
    """The tags of the snapshot behind an image's AMIs (it is shared by every volume type)."""
    return {k: v for k, v in image_tags.items() if k != tags.VOL_TYPE}


def _best(images: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not images:
        return None
    # Usable first, then the newest (ISO 8601 strings sort by time).
    newest = sorted(images, key=lambda i: str(i.get("CreationDate", "")), reverse=True)
    return sorted(newest, key=lambda i: _STATE_RANK.get(str(i.get("State")), 2))[0]


# -- the AWS edge -------------------------------------------------------------------


def find_ami(
    ec2: Any, name: str, sha256: str | None = None, vol_type: str | None = None
) -> dict[str, Any] | None:
    """A self-owned AMI named ``name``, else one tagged with this image's sha256 and volume type."""
    found = ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": [name]}])
    best = _best(list(found.get("Images", [])))
    if best is not None or not (sha256 and vol_type):
        return best
    found = ec2.describe_images(
        Owners=["self"],
        Filters=[
            {"Name": f"tag:{tags.SHA256}", "Values": [sha256]},
            {"Name": f"tag:{tags.VOL_TYPE}", "Values": [vol_type]},
        ],
    )
    return _best(list(found.get("Images", [])))


def find_snapshot(ec2: Any, sha256: str) -> dict[str, Any] | None:
    """A completed snapshot of this image left by an earlier run (found by its sha256 tag)."""
    paginator = ec2.get_paginator("describe_snapshots")
    snapshots: list[dict[str, Any]] = []
    for page in paginator.paginate(
        OwnerIds=["self"],
        Filters=[
            {"Name": f"tag:{tags.SHA256}", "Values": [sha256]},
            {"Name": "status", "Values": ["completed"]},
        ],
    ):
        snapshots.extend(page.get("Snapshots", []))
    snapshots = [s for s in snapshots if s.get("State") == "completed"]
    if not snapshots:
        return None
    return max(snapshots, key=lambda s: str(s.get("StartTime", "")))


def describe_image(ec2: Any, ami_id: str) -> dict[str, Any] | None:
    """The AMI, or None if EC2 does not (yet, or any more) know it."""
    try:
        found = ec2.describe_images(ImageIds=[ami_id])
    except ClientError as exc:
        if error_code(exc) in _NOT_FOUND:
            return None
        raise
    images = found.get("Images", [])
    return dict(images[0]) if images else None


def ensure_tags(ec2: Any, resource_id: str, wanted: Mapping[str, str], present: Any) -> None:
    """Add the ``wanted`` tags missing from ``present`` (AWS's tag list) to a resource."""
    have = tags.as_dict(present)
    missing = {k: v for k, v in wanted.items() if k not in have}
    if missing:
        ec2.create_tags(Resources=[resource_id], Tags=tags.as_list(missing))


def _snapshot_tags_of(ec2: Any, snapshot_id: str) -> list[dict[str, str]]:
    found = ec2.describe_snapshots(SnapshotIds=[snapshot_id])
    snaps = found.get("Snapshots", [])
    return list(snaps[0].get("Tags", [])) if snaps else []


def register(
    ec2: Any, params: Mapping[str, Any], settle_timeout: float = 60.0, log_context: str = ""
) -> str:
    """Register the AMI, make sure it and its snapshot carry the tags; return its id.

    A name already taken (a concurrent run of the same image) returns that AMI.
    If anything fails after ``register_image`` succeeded, the new AMI is
    deregistered before the error propagates: nothing half-registered is left.
    """
    name = str(params["Name"])
    image_tags = {
        t["Key"]: t["Value"]
        for spec in params.get("TagSpecifications", [])
        if spec.get("ResourceType") == "image"
        for t in spec.get("Tags", [])
    }
    snapshot_id = str(params["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"])
    try:
        ami_id = str(ec2.register_image(**params)["ImageId"])
    except ClientError as exc:
        if error_code(exc) != "InvalidAMIName.Duplicate":
            raise
        existing = find_ami(ec2, name)
        if existing is None:
            raise
        log.warning(
            "%s: AMI %s: name %s was registered concurrently; using it",
            log_context,
            existing["ImageId"],
            name,
        )
        return str(existing["ImageId"])
    try:
        image = _settle(lambda: describe_image(ec2, ami_id), settle_timeout, ami_id)
        ensure_tags(ec2, ami_id, image_tags, image.get("Tags"))
        ensure_tags(
            ec2, snapshot_id, snapshot_tags(image_tags), _snapshot_tags_of(ec2, snapshot_id)
        )
    except BaseException:
        deregister_quietly(ec2, ami_id, log_context)
        raise
    log.info("%s: AMI %s: registered %s from snapshot %s", log_context, ami_id, name, snapshot_id)
    return ami_id


def _settle(
    describe: Callable[[], dict[str, Any] | None], timeout: float, ami_id: str
) -> dict[str, Any]:
    """Describe a just-registered AMI, waiting out EC2's eventual consistency."""
    deadline = time.monotonic() + timeout
    while True:
        image = describe()
        if image is not None:
            return image
        if time.monotonic() >= deadline:
            raise AmiTimeout(f"AMI {ami_id}: still unknown to EC2 {timeout:.0f}s after register")
        time.sleep(1.0)


def deregister_quietly(ec2: Any, ami_id: str, log_context: str = "") -> None:
    """Deregister an AMI, logging (not raising) if that fails too."""
    try:
        ec2.deregister_image(ImageId=ami_id)
        log.warning("%s: AMI %s: deregistered", log_context, ami_id)
    except ClientError as exc:
        if error_code(exc) in _NOT_FOUND:
            return
        log.error(
            "%s: AMI %s: could not deregister (%s); remove it by hand",
            log_context,
            ami_id,
            error_code(exc),
        )


def wait_available(ec2: Any, ami_id: str, timeout: float, interval: float = 5.0) -> dict[str, Any]:
    """Poll until the AMI is ``available``; AmiError if it fails, AmiTimeout at the deadline."""
    deadline = time.monotonic() + timeout
    state = "unknown"
    while True:
        image = describe_image(ec2, ami_id)
        if image is not None:
            state = str(image.get("State", "unknown"))
            if state == "available":
                return image
            if state not in _STATE_RANK:
                reason = image.get("StateReason", {}).get("Message", "no reason given")
                raise AmiError(f"AMI {ami_id} is {state}: {reason}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise AmiTimeout(f"AMI {ami_id} still {state} after {timeout:.0f}s")
        time.sleep(min(interval, left))
