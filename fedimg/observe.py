"""Observe: read AWS (staging region), ResultsDB and WaiverDB into ``fedimg.facts``.

Every function here only describes, and decides nothing. A ResultsDB or
WaiverDB outage becomes ``Results(unavailable=...)`` (the plan waits); AWS
errors propagate (the engine logs them and the next pass looks again).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final

from botocore.exceptions import BotoCoreError, ClientError

from fedimg import ami, tags
from fedimg.aws import error_code
from fedimg.compose import CloudImage
from fedimg.copies import Ec2Factory, describe_error, snapshot_is_public
from fedimg.facts import AmiFacts, AmiLife, ImageFacts, Results, SnapshotFacts
from fedimg.messages import ARCHES, RESULTSDB_ITEM_TYPE, SHA256_RE, InvalidMessage, check_http_url
from fedimg.preflight import DEFAULT_PUBLIC_AMI_QUOTA, PUBLIC_AMI_QUOTA_CODE, RegionFacts
from fedimg.prune import PRUNING, Fleet, MarkedSnapshot, RegionalAmi
from fedimg.results import ResultsSource, ResultsUnavailable
from fedimg.tags import State
from fedimg.waivers import NoWaivers, WaiverSource, WaiversUnavailable

log = logging.getLogger(__name__)

RAW_XZ: Final = "raw.xz"
_NOT_FOUND: Final = frozenset({"InvalidAMIID.NotFound", "InvalidAMIID.Malformed"})


def image_snapshots(ec2: Any, sha256: str, now: datetime) -> tuple[SnapshotFacts, ...]:
    """Every snapshot of ours started for this image (any state), found by its sha256 tag."""
    found: list[SnapshotFacts] = []
    pages = ec2.get_paginator("describe_snapshots").paginate(
        OwnerIds=["self"], Filters=[{"Name": f"tag:{tags.SHA256}", "Values": [sha256]}]
    )
    for page in pages:
        for snap in page.get("Snapshots", []):
            if tags.SOURCE_AMI in tags.as_dict(snap.get("Tags")):
                continue  # a public copy's snapshot in this region, not a staging one
            found.append(SnapshotFacts.from_aws(snap, now))
    return tuple(found)


def image_amis(ec2: Any, image: CloudImage, vol_types: Sequence[str]) -> dict[str, AmiFacts | None]:
    """The staging AMI of every volume type (by deterministic name, then by tags)."""
    found: dict[str, AmiFacts | None] = {}
    for vol in vol_types:
        described = ami.find_ami(ec2, ami.ami_name(image, vol), image.sha256, vol)
        found[vol] = None if described is None else AmiFacts.from_aws(described)
    return found


def observe_image(
    ec2: Any, image: CloudImage, vol_types: Sequence[str], now: datetime, *, busy: bool = False
) -> ImageFacts:
    return ImageFacts(
        image=image,
        snapshots=image_snapshots(ec2, image.sha256, now),
        amis=image_amis(ec2, image, vol_types),
        busy=busy,
    )


def describe_staging_ami(ec2: Any, ami_id: str) -> dict[str, Any] | None:
    """Our AMI ``ami_id`` as EC2 describes it, or None if EC2 knows no such AMI of ours."""
    try:
        images = ec2.describe_images(ImageIds=[ami_id], Owners=["self"])["Images"]
    except ClientError as exc:
        if error_code(exc) in _NOT_FOUND:
            return None
        raise
    return dict(images[0]) if images else None


def ami_results(
    results: ResultsSource, ami_id: str, required: Sequence[str], waivers: WaiverSource
) -> Results:
    """The AMI's newest results per testcase and scenario, and its waivers.

    Either source down makes the whole answer unavailable: the gate never
    decides on half of what it needs (a waiver unseen could be the one that
    releases; a result unseen the one that rejects).
    """
    try:
        latest = results.latest_by_scenario(
            ami_id, item_type=RESULTSDB_ITEM_TYPE, testcases=list(required)
        )
    except ResultsUnavailable as exc:
        return Results(unavailable=str(exc) or type(exc).__name__)
    try:
        found = tuple(waivers.waivers(ami_id))
    except WaiversUnavailable as exc:
        return Results(unavailable=f"WaiverDB: {exc or type(exc).__name__}")
    return Results(latest=latest, waivers=found)


def observe_ami(
    described: Mapping[str, Any],
    results: ResultsSource,
    required: Sequence[str],
    waivers: WaiverSource | None = None,
) -> AmiLife:
    """An AMI's facts, with its results and waivers when its state needs them
    (``testing``; ``rejected``, which a waiver may release)."""
    facts = AmiFacts.from_aws(described)
    compose_id = facts.tags.get(tags.COMPOSE_ID, "?")
    if facts.state not in (State.TESTING, State.REJECTED) or facts.broken:
        return AmiLife(facts, compose_id)
    found = ami_results(results, facts.ami_id, required, waivers or NoWaivers())
    return AmiLife(facts, compose_id, found)


def staged_amis(ec2: Any, states: Iterable[State] | None = None) -> list[dict[str, Any]]:
    """Every fedimg AMI we own in a region, optionally only in ``states``, oldest first."""
    wanted = [s.value for s in states or ()]
    if wanted:
        filters = [{"Name": f"tag:{tags.STATE}", "Values": wanted}]
    else:
        filters = [{"Name": "tag-key", "Values": [tags.STATE]}]
    images: list[dict[str, Any]] = []
    for page in ec2.get_paginator("describe_images").paginate(Owners=["self"], Filters=filters):
        images.extend(page.get("Images", []))
    return sorted(images, key=lambda i: (i.get("CreationDate", ""), i["ImageId"]))


def public_ami_quota(quotas: Any) -> float:
    """The region's public-AMI quota (Service Quotas ``L-0E3CBAB9``).

    AWS has no applied value for a quota never changed in a region
    (NoSuchResourceException): its default then applies.
    """
    try:
        answer = quotas.get_service_quota(ServiceCode="ec2", QuotaCode=PUBLIC_AMI_QUOTA_CODE)
    except ClientError as exc:
        if error_code(exc) == "NoSuchResourceException":
            return DEFAULT_PUBLIC_AMI_QUOTA
        raise
    return float(answer["Quota"]["Value"])


def region_publish_facts(ec2: Any, quotas: Any, region: str, ami_id: str) -> RegionFacts:
    """Whether ``region`` can take one more public AMI: its block public access state,
    its public-AMI quota and the public images we own there (is ``ami_id``, or a copy
    of it, one of them?). An AWS error is a fact too (``RegionFacts.error``)."""
    try:
        answer = ec2.get_image_block_public_access_state()
        state = str(answer.get("ImageBlockPublicAccessState") or "unknown")
        public: list[dict[str, Any]] = []
        pages = ec2.get_paginator("describe_images").paginate(
            Owners=["self"], Filters=[{"Name": "is-public", "Values": ["true"]}]
        )
        for page in pages:
            public.extend(page.get("Images", []))
        quota = public_ami_quota(quotas)
    except (ClientError, BotoCoreError) as exc:
        return RegionFacts(region, error=describe_error(exc))
    mine = any(
        i.get("ImageId") == ami_id or tags.as_dict(i.get("Tags")).get(tags.SOURCE_AMI) == ami_id
        for i in public
    )
    return RegionFacts(region, state, quota, len(public), mine)


def testing_snapshots(ec2: Any) -> dict[str, list[dict[str, Any]]]:
    """sha256 -> the staging snapshots of that image still tagged ``testing``."""
    filters = [{"Name": f"tag:{tags.STATE}", "Values": [State.TESTING.value]}]
    found: dict[str, list[dict[str, Any]]] = {}
    pages = ec2.get_paginator("describe_snapshots").paginate(OwnerIds=["self"], Filters=filters)
    for page in pages:
        for snap in page.get("Snapshots", []):
            snap_tags = tags.as_dict(snap.get("Tags"))
            sha = snap_tags.get(tags.SHA256, "")
            if sha and tags.SOURCE_AMI not in snap_tags:
                found.setdefault(sha, []).append(snap)
    return found


def image_from_tags(
    snapshot_tags: Mapping[str, str], allowed_hosts: Iterable[str] = ()
) -> CloudImage:
    """The compose image a fedimg snapshot was uploaded from, rebuilt from its tags.

    ValueError when a tag is missing or unusable; the URL must still be an
    allowed http(s) compose host. ``size`` is unknown (0): stage reads the
    raw size from the file itself and checks the sha256 while streaming.
    """
    compose_id = snapshot_tags.get(tags.COMPOSE_ID, "")
    image_name = snapshot_tags.get(tags.IMAGE_NAME, "")
    url = snapshot_tags.get(tags.IMAGE_URL, "")
    sha256 = snapshot_tags.get(tags.SHA256, "").lower()
    arch = snapshot_tags.get(tags.ARCH, "")
    if not (compose_id and image_name and url):
        raise ValueError("compose id, image name or image URL tag missing")
    if not SHA256_RE.match(sha256):
        raise ValueError(f"sha256 tag {sha256[:80]!r} is not a sha256")
    if arch not in ARCHES:
        raise ValueError(f"arch tag {arch[:40]!r} is not one fedimg stages")
    try:
        check_http_url(url, tuple(allowed_hosts))
    except InvalidMessage as exc:
        raise ValueError(f"image URL tag refused: {exc}") from exc
    return CloudImage(
        compose_id=compose_id,
        variant="",
        arch=arch,
        subvariant=snapshot_tags.get(tags.SUBVARIANT, ""),
        format=RAW_XZ,
        path=image_name,
        url=url,
        size=0,
        sha256=sha256,
        image_name=image_name,
        type="raw-xz",
        release=snapshot_tags.get(tags.RELEASE, ""),
    )


# -- after release: every fedimg AMI in every region ----------------------------------------

_OURS: Final = [{"Name": "tag-key", "Values": [tags.COMPOSE_ID]}]


def _backing(facts: AmiFacts, snapshots: Mapping[str, Mapping[str, str]]) -> tuple[str, ...]:
    """The snapshots of ours behind an AMI: its block device mappings, else by tags.

    EC2 always names the real snapshots; a mapping naming one that does not exist
    (moto's copies) falls back to the snapshots tagged as this AMI's: a copy's by
    ``fedimg:source-ami``, a staging AMI's by compose, image name and sha256.
    """
    named = tuple(s for s in facts.snapshots if s in snapshots)
    if named:
        return named
    if tags.SOURCE_AMI in facts.tags:
        wanted = {tags.SOURCE_AMI: facts.tags[tags.SOURCE_AMI]}
    else:
        keys = (tags.COMPOSE_ID, tags.IMAGE_NAME, tags.SHA256)
        wanted = {k: facts.tags.get(k, "") for k in keys}
    return tuple(
        sorted(
            snap
            for snap, values in snapshots.items()
            if all(values.get(k) == v for k, v in wanted.items())
            and (tags.SOURCE_AMI in wanted or tags.SOURCE_AMI not in values)
        )
    )


def region_fleet(ec2: Any, region: str) -> Fleet:
    """Every AMI and snapshot carrying fedimg's tags in one region (tag-less ones are unseen)."""
    snapshots: dict[str, dict[str, str]] = {}
    for page in ec2.get_paginator("describe_snapshots").paginate(OwnerIds=["self"], Filters=_OURS):
        for snap in page.get("Snapshots", []):
            snapshots[str(snap["SnapshotId"])] = tags.as_dict(snap.get("Tags"))
    amis = []
    for page in ec2.get_paginator("describe_images").paginate(Owners=["self"], Filters=_OURS):
        for described in page.get("Images", []):
            facts = AmiFacts.from_aws(described)
            backed = dataclasses.replace(facts, snapshots=_backing(facts, snapshots))
            amis.append(RegionalAmi(region, backed))
    marked = tuple(
        MarkedSnapshot(region, snap, values[PRUNING])
        for snap, values in sorted(snapshots.items())
        if values.get(PRUNING)
    )
    return Fleet(tuple(sorted(amis, key=lambda a: a.ami_id)), marked, (region,))


def observe_fleet(aws: Ec2Factory, regions: Sequence[str]) -> Fleet:
    """``region_fleet`` of every region, as one fleet (AWS errors propagate)."""
    parts = [region_fleet(aws.ec2(region), region) for region in regions]
    return Fleet(
        tuple(a for p in parts for a in p.amis),
        tuple(m for p in parts for m in p.marked),
        tuple(regions),
    )


def snapshot_permissions(aws: Ec2Factory, amis: Iterable[RegionalAmi]) -> dict[str, bool]:
    """Snapshot id -> whether it is public, for every snapshot behind ``amis``."""
    return {
        snap: snapshot_is_public(aws.ec2(placed.region), snap)
        for placed in amis
        for snap in placed.ami.snapshots
    }
