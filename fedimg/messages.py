"""The message contract between pungi, fedimg, autocloud_ami and ResultsDB.

One place defines every topic the project consumes or emits, builds the
bodies it emits (compatible with upstream fedimg 2.x and Autocloud, see
``messages.md``) and validates the bodies it receives. Both ``fedimg`` and
``autocloud_ami`` import this module, and nothing else from each other.

A ``MessageType`` names a topic (``modname`` + ``name``) and carries a JSON
``body_schema``; ``Topics`` turns it into the full fedmsg topic for the local
``topic_prefix`` and ``environment``. The schemas of every topic fedimg and
autocloud_ami publish come from the schema package ``fedimg_messages``
(``fedimg-messages/`` in this repository), whose fedora-messaging classes
carry the same dictionaries: one contract on both buses. Parsers return small frozen dataclasses
and raise ``InvalidMessage`` with a clear reason for anything malformed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import jsonschema
from fedimg_messages import schemas
from fedimg_messages.schemas import (
    AMI_ID_RE,
    ARCHES,
    COMPOSE_ID_RE,
    IMAGE_NAME_RE,
    REGION_RE,
    SERVICE,
    SHA256_RE,
    VIRT_TYPE,
)

if TYPE_CHECKING:
    from fedora_messaging.message import Message as FedoraMessage

from fedimg.settings import ConfigError

SCHEMA_VERSION: Final = 1
MAX_BODY_BYTES: Final = 64 * 1024
MAX_BODY_DEPTH: Final = 32

TESTCASE_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}\Z")
FINISHED_STATUSES: Final = ("FINISHED", "FINISHED_INCOMPLETE")
OUTCOMES: Final = ("PASSED", "INFO", "FAILED", "NEEDS_INSPECTION")


class InvalidMessage(ValueError):
    """A message body that breaks the contract; the text says why."""


# -- schemas ---------------------------------------------------------------
# What fedimg and autocloud_ami publish is defined by the schema package
# (fedimg-messages/, ``fedimg_messages.schemas``): the fedora-messaging classes
# carry the same dictionaries. The topics consumed from others are described
# here, from the same building blocks.

_STR = schemas.TEXT
_ID = schemas.NAME
_obj = schemas.obj


def _depth(value: Any) -> int:
    """How deeply ``value`` nests lists and objects (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


@dataclass(frozen=True)
class MessageType:
    """A topic of the contract and the JSON schema of its body."""

    modname: str
    name: str
    body_schema: Mapping[str, Any]
    summary: str = ""

    def validate(self, body: Any) -> dict[str, Any]:
        """Return ``body`` if it satisfies the schema, else raise InvalidMessage."""
        if not isinstance(body, dict):
            raise InvalidMessage(f"{self}: body is {type(body).__name__}, not an object")
        try:
            size = len(json.dumps(body))
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidMessage(f"{self}: body is not JSON-serialisable: {exc!s:.200}") from exc
        if size > MAX_BODY_BYTES:
            raise InvalidMessage(f"{self}: body is {size} bytes, over {MAX_BODY_BYTES}")
        if _depth(body) > MAX_BODY_DEPTH:
            raise InvalidMessage(f"{self}: body nests deeper than {MAX_BODY_DEPTH} levels")
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(body))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "body"
            raise InvalidMessage(f"{self}: {where}: {error.message[:300]}")
        return body

    @functools.cached_property
    def _validator(self) -> jsonschema.Draft7Validator:
        """Built once per message type: the schema is a constant."""
        return jsonschema.Draft7Validator(self.body_schema)

    def __str__(self) -> str:
        return f"{self.modname}.{self.name}"


def _published(modname: str, name: str, body_schema: Mapping[str, Any]) -> MessageType:
    """A type fedimg or autocloud_ami publishes: its schema comes from the schema package."""
    return MessageType(modname, name, body_schema, str(body_schema["description"]))


COMPOSE_STATUS = MessageType(
    "pungi",
    "compose.status.change",
    _obj(
        ["status", "compose_id"],
        status=_ID,
        compose_id=schemas.COMPOSE,
        location=schemas.URL,
        release_version=_ID,
        release_short=_ID,
        compose_date=_ID,
        compose_type=_ID,
        compose_respin={"type": "integer"},
    ),
    "a pungi compose changed status",
)
IMAGE_UPLOAD = _published("fedimg", "image.upload", schemas.IMAGE_UPLOAD)
IMAGE_TEST = _published("fedimg", "image.test", schemas.IMAGE_TEST)
IMAGE_COPY = _published("fedimg", "image.copy", schemas.IMAGE_COPY)
IMAGE_PUBLISH = _published("fedimg", "image.publish", schemas.IMAGE_PUBLISH)
IMAGE_RELEASE = _published("fedimg", "image.release", schemas.IMAGE_RELEASE)
IMAGE_DELETE = _published("fedimg", "image.delete", schemas.IMAGE_DELETE)
AMI_QUEUED = _published("autocloud", "ami.queued", schemas.AMI_QUEUED)
AMI_RUNNING = _published("autocloud", "ami.running", schemas.AMI_RUNNING)
AMI_SUCCESS = _published("autocloud", "ami.success", schemas.AMI_SUCCESS)
AMI_FAILED = _published("autocloud", "ami.failed", schemas.AMI_FAILED)

_LISTED = {"type": "array", "items": _STR, "maxItems": 64}
RESULT_NEW = MessageType(
    "resultsdb",
    "result.new",
    _obj(
        ["id", "testcase", "outcome", "data"],
        id={"type": "integer"},
        testcase=_obj(["name"], name=_ID),
        outcome=_ID,
        data={"type": "object", "additionalProperties": _LISTED},
        groups={"type": "array", "items": _ID},
        note={"type": ["string", "null"]},
        ref_url={"type": ["string", "null"]},
    ),
    "ResultsDB stored a result (API v2.0 body)",
)
TASKOTRON_RESULT_NEW = MessageType(
    "taskotron",
    "result.new",
    _obj(
        ["task", "result"],
        task=_obj(["item", "type", "name"], item=_ID, type=_ID, name=_ID),
        result=_obj(["outcome"], id={"type": "integer"}, outcome=_ID),
    ),
    "ResultsDB 2017 notification (sent only on outcome changes)",
)

_WAIVER = _obj(
    ["id", "subject_type", "subject_identifier", "testcase", "waived"],
    id={"type": "integer"},
    subject_type=_ID,
    subject_identifier=_ID,
    testcase=_ID,
    scenario={"type": ["string", "null"], "maxLength": 255},
    waived={"type": "boolean"},
    username=_ID,
    comment={"type": ["string", "null"]},
    product_version={"type": ["string", "null"]},
)
WAIVER_NEW = MessageType(
    "waiverdb",
    "waiver.new",
    _WAIVER,
    "WaiverDB stored a waiver (the API v1.0 waiver, as WaiverDB publishes it)",
)

HUB_PING = _published("fedimg", "hub.ping", schemas.HUB_PING)
HUB_PONG = _published("fedimg", "hub.pong", schemas.HUB_PONG)

ALL_TYPES: Final = (
    HUB_PING,
    HUB_PONG,
    COMPOSE_STATUS,
    IMAGE_UPLOAD,
    IMAGE_TEST,
    IMAGE_COPY,
    IMAGE_PUBLISH,
    IMAGE_RELEASE,
    IMAGE_DELETE,
    AMI_QUEUED,
    AMI_RUNNING,
    AMI_SUCCESS,
    AMI_FAILED,
    RESULT_NEW,
    TASKOTRON_RESULT_NEW,
    WAIVER_NEW,
)


# -- topics -----------------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    """Full topic names for one bus (``topic_prefix`` + ``environment``)."""

    prefix: str = "org.fedoraproject"
    environment: str = "dev"

    @classmethod
    def from_fedmsg(cls, raw: Mapping[str, Any]) -> Topics:
        """Read ``topic_prefix`` and ``environment`` from a fedmsg config."""
        return cls(str(raw.get("topic_prefix", cls.prefix)), str(raw.get("environment", "dev")))

    def of(self, mtype: MessageType) -> str:
        """The full topic of ``mtype`` on this bus."""
        return f"{self.prefix}.{self.environment}.{mtype.modname}.{mtype.name}"

    def which(self, topic: str) -> MessageType | None:
        """The contract type a full topic belongs to, or None."""
        for mtype in ALL_TYPES:
            if topic == self.of(mtype):
                return mtype
        return None


# -- the bus seam -------------------------------------------------------------

Publisher = Callable[[str, str, dict[str, Any]], None]
"""``publish(modname, topic, body)``: fedmsg.publish in the hub, a list in tests."""


def fedmsg_publisher(**fedmsg_overrides: Any) -> Publisher:
    """A Publisher that sends with ``fedmsg.publish`` (one context per thread)."""
    import fedmsg

    def publish(modname: str, topic: str, body: dict[str, Any]) -> None:
        fedmsg.publish(modname=modname, topic=topic, msg=body, **fedmsg_overrides)

    return publish


def fedmsg_publish_problem(config: Mapping[str, Any], hostname: str | None = None) -> str | None:
    """Why ``fedmsg.publish`` from this process could not send with ``config``, or None.

    Mirrors how fedmsg 1.1's FedMsgContext sets up its publisher: with
    ``active`` it connects to the endpoint named ``name`` (default
    ``relay_inbound``); otherwise it binds ``endpoints[name]``, ``name``
    defaulting to ``<caller's top-level package>.<short host name>`` (here
    ``fedimg.<host>``, as ``fedmsg_publisher`` is the caller). Without a
    publisher fedmsg only fails at the first message, after work was done.
    """
    host = (hostname or socket.gethostname()).split(".", 1)[0]
    if config.get("mute"):
        return "mute is True, so fedmsg sends nothing: set mute to False"
    if not config.get("zmq_enabled", True):
        return "zmq_enabled is False: only a moksha hub can publish then; set it to True"
    if config.get("active"):
        name = config.get("name", "relay_inbound")  # as fedmsg reads it: None stays None
        if not isinstance(name, str) or not config.get(name):
            return (
                f"active is True but {name!r} is not set: set it to fedmsg-relay's "
                'inbound endpoint, e.g. ["tcp://relay.example:9941"]'
            )
    else:
        name = str(config.get("name") or f"{__name__.split('.')[0]}.{host}")
        endpoints = config.get("endpoints")
        if not isinstance(endpoints, Mapping) or not endpoints.get(name):
            return (
                f"active is False and endpoints has no {name!r} to bind: set active to True "
                f"and relay_inbound to fedmsg-relay's inbound endpoint, or add endpoints[{name!r}]"
            )
    if config.get("sign_messages"):
        return _signing_problem(config, host, name)
    return None


def _signing_problem(config: Mapping[str, Any], host: str, name: str) -> str | None:
    """What fedmsg 1.1 would miss when it signs the first message, or None."""
    if config.get("crypto_backend") == "gpg":
        if "gpg_signing_key" in config or host in (config.get("gpg_keys") or {}):
            return None
        return f"sign_messages is True but neither gpg_signing_key nor gpg_keys[{host!r}] is set"
    if "cert_prefix" in config:
        cert = f"{config['cert_prefix']}.{host}"
    else:
        cert = f"shell.{host}" if name == "relay_inbound" else name
    if cert in (config.get("certnames") or {}):
        return None
    return f"sign_messages is True but certnames has no {cert!r} (the certificate to sign with)"


def cli_publisher(
    publish: bool = True, fedmsg_config: Mapping[str, Any] | None = None
) -> Publisher:
    """For the CLIs: fedmsg.publish, or with ``--no-publish`` a Publisher that only logs.

    With ``fedmsg_config``, a config fedmsg could not publish with is a
    ``ConfigError`` now, before any work, saying what to set.
    """
    if publish:
        problem = fedmsg_publish_problem(fedmsg_config) if fedmsg_config is not None else None
        if problem:
            raise ConfigError(
                f"the bus cannot publish: {problem}; or run with --no-publish to only log messages"
            )
        return fedmsg_publisher()

    def log_only(modname: str, topic: str, body: dict[str, Any]) -> None:
        logging.getLogger(__name__).info("not published: %s.%s %s", modname, topic, body)

    return log_only


def message_class(topic: str) -> type[FedoraMessage]:
    """The fedora-messaging class a topic (without the broker's prefix) is sent as.

    Every topic of ours has its class in the schema package; the release
    announcement ``fedora_image_uploader.published.v1.aws.<...>`` is sent as
    ``AwsPublishedV1`` (the class whose topic is the longest dotted prefix);
    anything else (``resultsdb.result.new`` from the devel stand-in) as the base
    ``Message``, exactly as the real ResultsDB sends it.
    """
    from fedimg_messages.messages import ALL
    from fedora_image_uploader_messages.publish import AwsPublishedV1
    from fedora_messaging.message import Message

    best: type[FedoraMessage] = Message
    for cls in (*ALL, AwsPublishedV1):
        matches = topic == cls.topic or topic.startswith(cls.topic + ".")
        if matches and len(cls.topic) > len(best.topic):
            best = cls
    return best


def amqp_publisher(timeout: int = 30) -> Publisher:
    """A Publisher that sends with ``fedora_messaging.api.publish``, each topic as its class.

    The broker, TLS and ``topic_prefix`` come from the fedora-messaging config
    (``$FEDORA_MESSAGING_CONF``, or ``fedora-messaging --conf`` in a consumer).
    The class validates the body again before it is sent; a broker that does not
    confirm within ``timeout`` seconds raises ``PublishTimeout``, a refused
    message ``PublishReturned``/``PublishForbidden``, a dead connection
    ``ConnectionException`` (all fedora_messaging.exceptions).
    """
    from fedora_messaging import api

    def publish(modname: str, topic: str, body: dict[str, Any]) -> None:
        _share_running_reactor()
        full = f"{modname}.{topic}"
        api.publish(message_class(full)(topic=full, body=body), timeout=timeout)

    return publish


def _share_running_reactor() -> None:
    """Inside ``fedora-messaging consume`` the reactor already runs (main thread).

    ``api.publish`` waits through crochet, whose set-up would start the
    reactor in a thread of its own; told ``no_setup`` it uses the running one.
    """
    import crochet
    from twisted.internet import reactor

    if getattr(reactor, "running", False):
        with contextlib.suppress(RuntimeError):  # crochet already runs its own reactor
            crochet.no_setup()


@dataclass
class Emitter:
    """Validates a body against its type, then hands it to the Publisher."""

    publish: Publisher

    def emit(self, mtype: MessageType, body: dict[str, Any]) -> dict[str, Any]:
        mtype.validate(body)
        self.publish(mtype.modname, mtype.name, body)
        return body

    def announce(self, announcement: Announcement) -> dict[str, Any]:
        """Publish a message whose topic is built per image (see ``aws_published_event``)."""
        self.publish(announcement.modname, announcement.name, announcement.body)
        return announcement.body


def unwrap(message: Mapping[str, Any]) -> tuple[str, Any]:
    """Return ``(topic, body)`` from what a moksha/fedmsg consumer receives.

    A hub hands consumers ``{"topic": ..., "body": <fedmsg envelope>}``, the
    envelope holding the body under ``msg``; tests and the CLI may hand the
    envelope itself.
    """
    envelope = message.get("body", message)
    if not isinstance(envelope, Mapping):
        raise InvalidMessage("message envelope is not an object")
    topic = envelope.get("topic") or message.get("topic")
    if not isinstance(topic, str):
        raise InvalidMessage("message has no topic")
    if "msg" not in envelope:
        raise InvalidMessage(f"{topic}: envelope has no 'msg'")
    return topic, envelope["msg"]


# -- what is consumed ----------------------------------------------------------


def check_http_url(url: str, allowed_hosts: tuple[str, ...] | list[str] = ()) -> str:
    """Return ``url`` if it is http(s) with a host, and the host is allowed."""
    if not isinstance(url, str) or any(ch.isspace() or not ch.isprintable() for ch in url):
        raise InvalidMessage(f"URL has whitespace or control characters: {str(url)[:200]!r}")
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:  # e.g. an unbalanced IPv6 bracket
        raise InvalidMessage(f"not a valid URL: {url[:200]!r}: {exc}") from exc
    if parts.scheme not in ("http", "https") or not hostname:
        raise InvalidMessage(f"not an http(s) URL: {url[:200]!r}")
    if "@" in parts.netloc:  # userinfo, even empty: "http://allowed@evil/" tricks
        raise InvalidMessage("URL must not carry credentials")
    if allowed_hosts and hostname not in allowed_hosts:
        raise InvalidMessage(f"host {hostname!r} is not in the allowed compose hosts")
    return url


@dataclass(frozen=True)
class ComposeStatus:
    """A ``pungi.compose.status.change`` body, checked."""

    compose_id: str
    status: str
    location: str | None
    release_version: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES


def parse_compose_status(body: Any) -> ComposeStatus:
    """Validate a pungi status body; ``location`` must be http(s) when finished."""
    COMPOSE_STATUS.validate(body)
    status = ComposeStatus(
        compose_id=body["compose_id"],
        status=body["status"],
        location=body.get("location"),
        release_version=body.get("release_version"),
    )
    if status.finished and not status.location:
        raise InvalidMessage(f"{status.compose_id}: finished compose without a location")
    return status


@dataclass(frozen=True)
class StagedImage:
    """One staged AMI: what fedimg tags on it and what a test request carries."""

    compose_id: str
    image_name: str
    image_url: str
    architecture: str
    region: str
    ami_id: str | None = None
    vol_type: str = "gp3"
    subvariant: str = ""
    release: str = ""
    sha256: str = ""

    def __post_init__(self) -> None:
        for value, regex, what in (
            (self.compose_id, COMPOSE_ID_RE, "compose id"),
            (self.image_name, IMAGE_NAME_RE, "image name"),
            (self.region, REGION_RE, "region"),
        ):
            if not regex.match(value):
                raise InvalidMessage(f"invalid {what}: {value[:200]!r}")
        if self.architecture not in ARCHES:
            raise InvalidMessage(f"unknown architecture {self.architecture!r}")
        if self.ami_id is not None and not AMI_ID_RE.match(self.ami_id):
            raise InvalidMessage(f"invalid AMI id {self.ami_id[:200]!r}")
        if self.sha256 and not SHA256_RE.match(self.sha256):
            raise InvalidMessage("invalid sha256")


def image_event(image: StagedImage, status: str, reason: str | None = None) -> dict[str, Any]:
    """Body of ``fedimg.image.upload`` / ``fedimg.image.test`` (upstream fields)."""
    extra: dict[str, Any] = {"virt_type": VIRT_TYPE, "vol_type": image.vol_type}
    if image.ami_id:
        extra["id"] = image.ami_id
    body: dict[str, Any] = {
        "image_url": image.image_url,
        "image_name": image.image_name,
        "destination": image.region,
        "service": SERVICE,
        "status": status,
        "compose": image.compose_id,
        "compose_id": image.compose_id,
        "architecture": image.architecture,
        "subvariant": image.subvariant,
        "release": image.release,
        "extra": extra,
    }
    if image.sha256:
        body["image_sha256"] = image.sha256
    if reason is not None:
        body["reason"] = reason[:2000]
    return body


def parse_image_event(body: Any, mtype: MessageType = IMAGE_TEST) -> tuple[str, StagedImage]:
    """Return ``(status, image)`` from a ``fedimg.image.upload|test`` body."""
    mtype.validate(body)
    ami_id = body.get("extra", {}).get("id")
    image = StagedImage(
        compose_id=body["compose"],
        image_name=body["image_name"],
        image_url=body.get("image_url", ""),
        architecture=body["architecture"],
        region=body["destination"],
        ami_id=ami_id,
        vol_type=body.get("extra", {}).get("vol_type", "gp3"),
        subvariant=body.get("subvariant", ""),
        release=str(body.get("release", "")),
        sha256=body.get("image_sha256", ""),
    )
    return body["status"], image


def aware(moment: datetime) -> datetime:
    """Naive datetimes are UTC (AWS and ResultsDB both speak UTC)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def parse_when(value: Any) -> datetime | None:
    """A datetime from boto3 (datetime) or a tag/ISO string; None if unreadable."""
    if isinstance(value, datetime):
        return aware(value)
    if isinstance(value, str) and value:
        try:
            return aware(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def retest_since(body: Any) -> datetime | None:
    """When ``fedimg retest`` moved the AMI back to testing (a retest request's
    ``extra.retest_since``, UTC); None for a first request.

    Results of the AMI from before that moment do not answer this request.
    """
    extra = body.get("extra") if isinstance(body, Mapping) else None
    value = extra.get("retest_since") if isinstance(extra, Mapping) else None
    if value is None:
        return None
    when = parse_when(value)
    if when is None:
        raise InvalidMessage(f"extra.retest_since {str(value)[:40]!r} is not a time")
    return when.astimezone(UTC)


def parse_test_request(body: Any) -> StagedImage:
    """A ``fedimg.image.test`` ``started`` body: the image to test (AMI id required)."""
    status, image = parse_image_event(body, IMAGE_TEST)
    if status != "started":
        raise InvalidMessage(f"fedimg.image.test status {status!r} is not a test request")
    if image.ami_id is None:
        raise InvalidMessage(f"{image.compose_id}: test request without extra.id (AMI id)")
    return image


def copy_event(image: StagedImage, region: str, new_ami: str) -> dict[str, Any]:
    """Body of ``fedimg.image.copy`` for one destination region."""
    return {
        "image_name": image.image_name,
        "destination": region,
        "architecture": image.architecture,
        "service": SERVICE,
        "compose_id": image.compose_id,
        "extra": {
            "id": new_ami,
            "virt_type": VIRT_TYPE,
            "vol_type": image.vol_type,
            "source_image_id": image.ami_id,
        },
    }


def publish_event(image: StagedImage, region: str, ami_id: str) -> dict[str, Any]:
    """Body of ``fedimg.image.publish`` for one region."""
    return {
        "image_name": image.image_name,
        "image_url": image.image_url,
        "architecture": image.architecture,
        "destination": region,
        "service": SERVICE,
        "compose": image.compose_id,
        "extra": {"id": ami_id, "virt_type": VIRT_TYPE, "vol_type": image.vol_type},
    }


def release_event(
    image: StagedImage,
    regions: Mapping[str, str],
    failed: Mapping[str, str] | None = None,
    waivers: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Body of ``fedimg.image.release`` (the successor's one-per-image shape).

    ``waivers``: every waiver the gate used to release it (``id``, ``testcase``,
    ``scenario``, ``username``, ``comment``), in the optional field ``waivers``.
    """
    release: int | str = int(image.release) if image.release.isdigit() else image.release
    body: dict[str, Any] = {
        "compose_id": image.compose_id,
        "image_name": image.image_name,
        "architecture": image.architecture,
        "subvariant": image.subvariant,
        "release": release,
        "regions": dict(sorted(regions.items())),
    }
    if failed:
        body["failed_regions"] = {k: v[:2000] for k, v in sorted(failed.items())}
    if waivers:
        body["waivers"] = [
            {
                "id": int(w["id"]),
                "testcase": str(w["testcase"]),
                "scenario": str(w.get("scenario") or "") or None,
                "username": str(w["username"])[:255],
                "comment": str(w["comment"])[:2000],
            }
            for w in waivers
        ]
    return body


def delete_event(
    *,
    compose_id: str,
    image_name: str,
    architecture: str,
    region: str,
    ami_id: str,
    vol_type: str,
    reason: str,
    snapshots: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Body of ``fedimg.image.delete``: one AMI removed in one region (``fedimg prune``)."""
    body: dict[str, Any] = {
        "compose_id": compose_id,
        "image_name": image_name,
        "destination": region,
        "service": SERVICE,
        "reason": reason[:2000],
        "snapshots": list(snapshots)[:64],
        "extra": {"id": ami_id, "virt_type": VIRT_TYPE, "vol_type": vol_type[:16]},
    }
    if architecture in ARCHES:
        body["architecture"] = architecture
    return body


AWS_PUBLISHED_MODNAME: Final = "fedora_image_uploader"
AWS_PUBLISHED_PREFIX: Final = "published.v1.aws"
_TOPIC_WORD_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")


@dataclass(frozen=True)
class Announcement:
    """A message whose topic carries per-image words: ``modname`` + ``name`` and its body."""

    modname: str
    name: str
    body: dict[str, Any]

    @property
    def topic(self) -> str:
        return f"{self.modname}.{self.name}"


def aws_published_event(
    image: StagedImage, ami_name: str, regions: Mapping[str, str]
) -> Announcement:
    """``fedora_image_uploader.published.v1.aws.<subvariant>.<release>.<arch>`` for a release.

    The message Fedora's websites and tooling read today (what
    fedora-image-uploader sends; schema ``AwsPublishedV1`` of the PyPI package
    ``fedora-image-uploader-messages``): ``image_name`` is the AMI's name,
    ``regions`` maps every region the image is public in to its AMI id and
    ``release`` is a number. Pure; raises InvalidMessage when the image cannot
    be described that way (a release such as ``Rawhide``, no subvariant, no region).
    """
    if not image.release.isdigit():
        raise InvalidMessage(f"{image.compose_id}: release {image.release[:50]!r} is not a number")
    for word, what in ((image.subvariant, "subvariant"), (image.architecture, "architecture")):
        if not _TOPIC_WORD_RE.match(word):
            raise InvalidMessage(f"{image.compose_id}: {what} {word[:80]!r} cannot be a topic word")
    if not ami_name or len(ami_name) > 128:
        raise InvalidMessage(f"{image.compose_id}: AMI name {ami_name[:200]!r} is not 1-128 chars")
    if not regions:
        raise InvalidMessage(f"{image.compose_id}: a release in no region is not announced")
    for region, ami in regions.items():
        if not REGION_RE.match(region) or not AMI_ID_RE.match(ami):
            raise InvalidMessage(
                f"{image.compose_id}: bad region/AMI {region[:50]!r}: {ami[:50]!r}"
            )
    body = {
        "architecture": image.architecture,
        "compose_id": image.compose_id,
        "image_name": ami_name,
        "regions": dict(sorted(regions.items())),
        "release": int(image.release),
        "subvariant": image.subvariant,
    }
    from fedora_image_uploader_messages.publish import AwsPublishedV1

    schema = AwsPublishedV1.body_schema
    error = jsonschema.exceptions.best_match(
        jsonschema.validators.validator_for(schema)(schema).iter_errors(body)
    )
    if error is not None:
        raise InvalidMessage(
            f"{image.compose_id}: not an AwsPublishedV1 body: {error.message:.300}"
        )
    name = f"{AWS_PUBLISHED_PREFIX}.{image.subvariant}.{body['release']}.{image.architecture}"
    return Announcement(AWS_PUBLISHED_MODNAME, name, body)


def announce_aws_published(
    emitter: Emitter,
    image: StagedImage,
    ami_name: str,
    regions: Mapping[str, str],
    enabled: bool,
) -> dict[str, Any] | None:
    """At release: publish ``aws_published_event`` unless disabled; the body, or None.

    An image that cannot be announced that way is logged and skipped (the
    release itself stands; ``fedimg.image.release`` was sent).
    """
    if not enabled:
        return None
    try:
        announcement = aws_published_event(image, ami_name, regions)
    except InvalidMessage as exc:
        logging.getLogger(__name__).warning(
            "compose %s AMI %s: no %s message: %s",
            image.compose_id,
            image.ami_id,
            AWS_PUBLISHED_MODNAME,
            exc,
        )
        return None
    return emitter.announce(announcement)


@dataclass(frozen=True)
class AmiTestEvent:
    """Fields of ``autocloud.ami.*``."""

    compose_id: str
    ami_id: str
    region: str
    job_id: str
    image_name: str = ""
    architecture: str = "x86_64"
    passed: int = 0
    failed: int = 0
    results_url: str | None = None
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def body(self, status: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "compose_id": self.compose_id,
            "ami_id": self.ami_id,
            "region": self.region,
            "architecture": self.architecture,
            "status": status,
            "job_id": self.job_id,
            "passed": self.passed,
            "failed": self.failed,
        }
        if self.image_name:
            body["image_name"] = self.image_name
        if self.results_url:
            body["results_url"] = self.results_url
        if self.reason:
            body["reason"] = self.reason[:2000]
        return body


@dataclass(frozen=True)
class ResultNotice:
    """What a ResultsDB message says happened; a hint to look again, never a verdict."""

    item: str
    item_type: str
    testcase: str
    outcome: str
    result_id: int | None


def _first(value: Any, what: str) -> str:
    if isinstance(value, list):
        if not value:
            raise InvalidMessage(f"result data {what} is an empty list")
        value = value[0]
    if not isinstance(value, str):
        raise InvalidMessage(f"result data {what} is not a string")
    return value


def parse_result_notice(mtype: MessageType, body: Any) -> ResultNotice:
    """Read a ``resultsdb.result.new`` (v2.0), ``taskotron.result.new`` (2017) or
    ``waiverdb.waiver.new`` body: each says "look at this item's gate again"."""
    if mtype is not WAIVER_NEW:
        mtype.validate(body)
    if mtype is RESULT_NEW:
        data = body["data"]
        if "item" not in data or "type" not in data:
            raise InvalidMessage("resultsdb.result.new: data has no item/type")
        return ResultNotice(
            item=_first(data["item"], "item"),
            item_type=_first(data["type"], "type"),
            testcase=body["testcase"]["name"],
            outcome=body["outcome"],
            result_id=body["id"],
        )
    if mtype is TASKOTRON_RESULT_NEW:
        return ResultNotice(
            item=body["task"]["item"],
            item_type=body["task"]["type"],
            testcase=body["task"]["name"],
            outcome=body["result"]["outcome"],
            result_id=body["result"].get("id"),
        )
    if mtype is WAIVER_NEW:
        # waiverdb-messages' schema wraps the waiver in {"id", "topic", "headers", "body"};
        # WaiverDB itself publishes the waiver as the body. Both are read.
        if isinstance(body, dict) and isinstance(body.get("body"), dict) and "topic" in body:
            body = body["body"]
        mtype.validate(body)
        return ResultNotice(
            item=body["subject_identifier"],
            item_type=body["subject_type"],
            testcase=body["testcase"],
            outcome="WAIVED" if body["waived"] else "UNWAIVED",
            result_id=body["id"],
        )
    raise InvalidMessage(f"{mtype} is not a result message")


# -- ResultsDB conventions (the other half of the contract) ------------------------------
# autocloud_ami posts, fedimg's gate reads: one result per suite check under
# ``autocloud.ami.<check>``, one summary ``autocloud.ami.all`` posted LAST, every
# one about the item ``<ami id>`` of type ``ami``, with ``source`` = ``autocloud``.

RESULTSDB_ITEM_TYPE: Final = "ami"
RESULTSDB_SOURCE: Final = "autocloud"
TESTCASE_PREFIX: Final = "autocloud.ami."
SUMMARY_TESTCASE: Final = TESTCASE_PREFIX + "all"
PASSED, INFO, FAILED, NEEDS_INSPECTION = OUTCOMES

# Scenarios: one AMI is tested on several instance types. Every result
# autocloud_ami posts (each test and the per-scenario summary) carries the
# scenario it ran in under SCENARIO_KEY, named by ``scenario_name``.
SCENARIO_KEY: Final = "scenario"
# A test that does not apply to an image (an Atomic-only test on Cloud Base) is
# posted with outcome INFO and the reason under SKIPPED_KEY: a rule that
# requires it is then visibly inapplicable instead of waiting for a result.
SKIPPED_KEY: Final = "skipped"
# On each summary: every scenario of its test run, comma-separated. The gate
# waits for a summary in each of them (one scenario's PASSED may be posted a
# moment before another's FAILED).
RUN_SCENARIOS_KEY: Final = "scenarios"


def scenario_name(arch: str, instance_type: str) -> str:
    """The scenario of a test run: ``x86_64:t3.small`` (architecture, instance type)."""
    return f"{arch}:{instance_type}"
