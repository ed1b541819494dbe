"""The JSON schemas of every message fedimg and autocloud_ami publish, as plain data.

This module needs only the standard library: fedimg validates its fedmsg
bodies with these dictionaries (``fedimg.messages``) and the fedora-messaging
classes in ``fedimg_messages.messages`` carry the very same objects, so both
buses share one contract. Field names follow upstream fedimg 2.x (the
fedmsg_meta processors and the Fedora websites read them); fields are added,
never renamed.

The building blocks (``AMI``, ``REGION``, ``COMPOSE``...) are public so a
consumer can describe the messages it reads with the same rules.
"""

from __future__ import annotations

import re
from typing import Any, Final

AMI_ID_RE: Final = re.compile(r"^ami-(?:[0-9a-f]{8}|[0-9a-f]{17})\Z")
REGION_RE: Final = re.compile(r"^[a-z]{2}(?:-[a-z]+)+-\d{1,2}\Z")
COMPOSE_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}\Z")
IMAGE_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}\Z")
SHA256_RE: Final = re.compile(r"^[0-9a-f]{64}\Z")
ARCHES: Final = ("x86_64", "aarch64")
SERVICE: Final = "EC2"
VIRT_TYPE: Final = "hvm"
DRAFT: Final = "http://json-schema.org/draft-07/schema#"

# -- building blocks ------------------------------------------------------------

TEXT: Final[dict[str, Any]] = {"type": "string", "maxLength": 2048}
NAME: Final[dict[str, Any]] = {"type": "string", "maxLength": 255}
AMI: Final[dict[str, Any]] = {"type": "string", "pattern": AMI_ID_RE.pattern}
REGION: Final[dict[str, Any]] = {"type": "string", "pattern": REGION_RE.pattern}
COMPOSE: Final[dict[str, Any]] = {"type": "string", "pattern": COMPOSE_ID_RE.pattern}
IMAGE: Final[dict[str, Any]] = {"type": "string", "pattern": IMAGE_NAME_RE.pattern}
ARCH: Final[dict[str, Any]] = {"type": "string", "enum": list(ARCHES)}
# Printable ASCII only: no whitespace, control or format characters (RTL override, NUL).
URL: Final[dict[str, Any]] = {"type": "string", "maxLength": 2048, "pattern": "^https?://[!-~]+\\Z"}
EXTRA: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        "id": AMI,
        "virt_type": {"const": VIRT_TYPE},
        "vol_type": {"type": "string", "maxLength": 16},
        "source_image_id": AMI,
        # On a test request made by `fedimg retest` (optional, added compatibly): results
        # of these scenarios ("*": all) submitted before this UTC time no longer count.
        "retest_since": NAME,
        "scenarios": {"type": "array", "items": NAME, "maxItems": 64},
    },
}


def obj(required: list[str], **props: Any) -> dict[str, Any]:
    """An object schema with ``required`` keys and these ``properties``."""
    return {"type": "object", "required": required, "properties": props}


def body_schema(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A top-level body schema: ``schema`` with its draft and description."""
    return {"$schema": DRAFT, "description": description, **schema}


# -- fedimg ---------------------------------------------------------------------------

_IMAGE_EVENT: Final = obj(
    ["image_name", "destination", "service", "status", "compose", "architecture"],
    image_url=URL,
    image_name=IMAGE,
    destination=REGION,
    service={"const": SERVICE},
    status={"enum": ["started", "completed", "failed"]},
    compose=COMPOSE,
    compose_id=COMPOSE,
    architecture=ARCH,
    subvariant=NAME,
    release=NAME,
    image_sha256={"type": "string", "pattern": SHA256_RE.pattern},
    reason=TEXT,
    extra=EXTRA,
)

HUB_PING: Final = body_schema("asks every fedimg hub to answer", obj(["token"], token=NAME))
HUB_PONG: Final = body_schema(
    "a fedimg hub is subscribed, can publish, and says whether every component runs",
    obj(
        ["token", "host"],
        token=NAME,
        host=NAME,
        healthy={"type": "boolean"},
        components={"type": "object", "additionalProperties": NAME, "maxProperties": 64},
    ),
)
IMAGE_UPLOAD: Final = body_schema("an AMI upload", _IMAGE_EVENT)
IMAGE_TEST: Final = body_schema("an AMI test request or verdict", _IMAGE_EVENT)
IMAGE_COPY: Final = body_schema(
    "an AMI copy to one region was started",
    obj(
        ["image_name", "destination", "architecture", "service", "compose_id", "extra"],
        image_name=IMAGE,
        destination=REGION,
        architecture=ARCH,
        service={"const": SERVICE},
        compose_id=COMPOSE,
        extra=EXTRA,
    ),
)
IMAGE_PUBLISH: Final = body_schema(
    "an AMI was made public in one region",
    obj(
        ["image_name", "destination", "architecture", "service", "compose", "extra"],
        image_name=IMAGE,
        image_url=URL,
        destination=REGION,
        architecture=ARCH,
        service={"const": SERVICE},
        compose=COMPOSE,
        extra=EXTRA,
    ),
)
IMAGE_RELEASE: Final = body_schema(
    "an image is public in every region it could reach",
    obj(
        ["compose_id", "image_name", "architecture", "regions"],
        compose_id=COMPOSE,
        image_name=IMAGE,
        architecture=ARCH,
        subvariant=NAME,
        release={"type": ["integer", "string"]},
        regions={"type": "object", "additionalProperties": AMI},
        failed_regions={"type": "object", "additionalProperties": TEXT},
        # Optional (added compatibly): every WaiverDB waiver the gate used to release it.
        waivers={
            "type": "array",
            "maxItems": 64,
            "items": obj(
                ["id", "testcase", "username", "comment"],
                id={"type": "integer"},
                testcase=NAME,
                scenario={"type": ["string", "null"], "maxLength": 255},
                username=NAME,
                comment=TEXT,
            ),
        },
    ),
)

IMAGE_DELETE: Final = body_schema(
    "fedimg removed an AMI and its snapshots in one region (pruning)",
    obj(
        ["compose_id", "image_name", "destination", "service", "reason", "extra"],
        compose_id=COMPOSE,
        image_name=IMAGE,
        architecture=ARCH,
        destination=REGION,
        service={"const": SERVICE},
        reason=TEXT,
        snapshots={"type": "array", "items": NAME, "maxItems": 64},
        extra=EXTRA,
    ),
)

# -- autocloud_ami ----------------------------------------------------------------------

_AMI_EVENT: Final = obj(
    ["compose_id", "ami_id", "region", "status", "job_id"],
    compose_id=COMPOSE,
    ami_id=AMI,
    region=REGION,
    image_name=IMAGE,
    architecture=ARCH,
    status={"enum": ["queued", "running", "success", "failed"]},
    job_id=NAME,
    passed={"type": "integer", "minimum": 0},
    failed={"type": "integer", "minimum": 0},
    results_url=URL,
    reason=TEXT,
)
AMI_QUEUED: Final = body_schema("an AMI test is queued", _AMI_EVENT)
AMI_RUNNING: Final = body_schema("an AMI test is running", _AMI_EVENT)
AMI_SUCCESS: Final = body_schema("an AMI passed its gating tests", _AMI_EVENT)
AMI_FAILED: Final = body_schema("an AMI failed its tests", _AMI_EVENT)
