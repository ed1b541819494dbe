"""fedimg's record on AWS: the tags on the staging AMI and its snapshot.

``fedimg:state`` moves  (none) -> testing -> promoting -> released, or
testing -> rejected. Everything else needed to resume is in the other tags.

Tags are written within AWS's limits through ``fedimg.aws.tag_list`` (here
``as_list``) and ``fedimg.aws.tag_specs``; the full values stay in the messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from fedimg.aws import tag_list
from fedimg.messages import StagedImage

COMPOSE_ID = "fedimg:compose-id"
IMAGE_NAME = "fedimg:image-name"
IMAGE_URL = "fedimg:image-url"
SHA256 = "fedimg:sha256"
ARCH = "fedimg:arch"
SUBVARIANT = "fedimg:subvariant"
RELEASE = "fedimg:release"
VOL_TYPE = "fedimg:vol-type"
STATE = "fedimg:state"
STAGED_AT = "fedimg:staged-at"
SOURCE_AMI = "fedimg:source-ami"  # on copies: the staging AMI they came from
UPLOADED = "fedimg:uploaded"  # on snapshots: every block written and completed (a UTC time)
TEST_REQUESTED = "fedimg:test-requested"  # on AMIs: times reconcile asked for the test again
RESUMED = "fedimg:resumed"  # on snapshots: times reconcile restaged the image from it
TESTING_SINCE = "fedimg:testing-since"  # on AMIs: when a retest moved it back to testing
RETESTED = "fedimg:retested"  # on AMIs: the scenarios of that retest ("*": every one)
HISTORY = "fedimg:history"  # on AMIs: "<state>@<UTC minute>@<who>" per transition, newest last
HISTORY_CHARS = 256  # AWS's tag value limit: the oldest entries go first
ALL_SCENARIOS = "*"


class State(StrEnum):
    TESTING = "testing"
    PROMOTING = "promoting"
    RELEASED = "released"
    REJECTED = "rejected"


def as_dict(tags: Iterable[Mapping[str, str]] | None) -> dict[str, str]:
    """AWS's ``[{"Key": k, "Value": v}]`` as a dict."""
    return {t["Key"]: t["Value"] for t in tags or ()}


def as_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    """A dict as AWS's ``[{"Key": k, "Value": v}]``, within AWS's limits (``aws.tag_list``)."""
    return tag_list(tags)


def image_tags(image: StagedImage, state: State, staged_at: str) -> dict[str, str]:
    """Every fedimg tag of a staged image."""
    return {
        COMPOSE_ID: image.compose_id,
        IMAGE_NAME: image.image_name,
        IMAGE_URL: image.image_url,
        SHA256: image.sha256,
        ARCH: image.architecture,
        SUBVARIANT: image.subvariant,
        RELEASE: image.release,
        VOL_TYPE: image.vol_type,
        STATE: state.value,
        STAGED_AT: staged_at,
    }


def staged_image(ami: Mapping[str, Any], region: str) -> StagedImage | None:
    """The StagedImage recorded on a described AMI, or None if it is not fedimg's."""
    tags = as_dict(ami.get("Tags"))
    if COMPOSE_ID not in tags or IMAGE_NAME not in tags or ARCH not in tags:
        return None
    return StagedImage(
        compose_id=tags[COMPOSE_ID],
        image_name=tags[IMAGE_NAME],
        image_url=tags.get(IMAGE_URL, ""),
        architecture=tags[ARCH],
        region=region,
        ami_id=ami["ImageId"],
        vol_type=tags.get(VOL_TYPE, "gp3"),
        subvariant=tags.get(SUBVARIANT, ""),
        release=tags.get(RELEASE, ""),
        sha256=tags.get(SHA256, ""),
    )


def add_history(old: str, state: str, when: datetime, who: str) -> str:
    """``old`` with one transition appended, the oldest entries dropped to fit one tag value.

    An entry is ``<state>@<YYYY-MM-DDTHH:MMZ>@<who>``; ``who`` is cut to 60
    characters and its spaces and ``@`` replaced, so entries stay parseable.
    """
    stamp = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")
    actor = "".join("_" if c.isspace() or c == "@" else c for c in who)[:60] or "?"
    entries = [*old.split(), f"{state}@{stamp}@{actor}"]
    while len(" ".join(entries)) > HISTORY_CHARS and len(entries) > 1:
        entries.pop(0)
    return " ".join(entries)[-HISTORY_CHARS:]


def history_of(value: str) -> list[tuple[str, str, str]]:
    """``(state, when, who)`` per entry of a ``fedimg:history`` value; unreadable ones skipped."""
    found = []
    for entry in value.split():
        parts = entry.split("@", 2)
        if len(parts) == 3:
            found.append((parts[0], parts[1], parts[2]))
    return found


def state_of(ami: Mapping[str, Any]) -> State | None:
    value = as_dict(ami.get("Tags")).get(STATE)
    try:
        return State(value) if value else None
    except ValueError:
        return None
