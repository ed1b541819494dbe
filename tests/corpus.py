"""A corpus of hostile and malformed input for every topic the hub consumes, as data.

``message_corpus()`` returns ``BadMessage`` values: a topic (short form, e.g.
``pungi.compose.status.change``), a body, and where the pipeline must refuse
it: ``parse`` (the contract's parser raises InvalidMessage) or
``validation`` (the body parses, and a later validator refuses it before any
AWS call: the compose-host allow-list, the AMI-id check of a result's item).
``RAW_PAYLOADS`` are zmq frames that are not a fedmsg envelope at all.
``BAD_IMAGE_PATHS`` are images.json paths that must never leave the compose.
``IMAGE_FAULTS`` are what a hostile compose server does with one image file
(``serve_fault`` applies one to a ``devel.compose.ComposeServer``);
``future_metadata``, ``huge_images_json`` and ``long_image_name`` build the
metadata and names that test fedimg's limits.

The valid bodies the mutations start from are in ``VALID``; tests check that
each of them is accepted, so every refusal is down to the mutation.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import jsonschema

from devel.compose import ComposeServer
from devel.images import forged_xz
from fedimg.messages import Topics

ALLOWED_HOST: Final = "kojipkgs.fedoraproject.org"
LOCATION: Final = f"https://{ALLOWED_HOST}/compose/40/Fedora-40-20240501.0/compose"
AMI: Final = "ami-0123456789abcdef0"
IMAGE: Final = "Fedora-Cloud-Base-40-20240501.0.x86_64.raw.xz"

COMPOSE_TOPIC: Final = "pungi.compose.status.change"
TEST_TOPIC: Final = "fedimg.image.test"
RESULT_TOPIC: Final = "resultsdb.result.new"
TASKOTRON_TOPIC: Final = "taskotron.result.new"
PING_TOPIC: Final = "fedimg.hub.ping"
TOPICS: Final = (COMPOSE_TOPIC, TEST_TOPIC, RESULT_TOPIC, TASKOTRON_TOPIC, PING_TOPIC)

VALID: Final[dict[str, dict[str, Any]]] = {
    COMPOSE_TOPIC: {
        "status": "FINISHED",
        "compose_id": "Fedora-40-20240501.0",
        "location": LOCATION,
        "release_version": "40",
        "release_short": "Fedora",
        "compose_date": "20240501",
        "compose_type": "production",
        "compose_respin": 0,
    },
    TEST_TOPIC: {
        "image_url": f"{LOCATION}/Cloud/x86_64/images/{IMAGE}",
        "image_name": IMAGE,
        "destination": "us-east-1",
        "service": "EC2",
        "status": "started",
        "compose": "Fedora-40-20240501.0",
        "compose_id": "Fedora-40-20240501.0",
        "architecture": "x86_64",
        "subvariant": "Cloud_Base",
        "release": "40",
        "extra": {"id": AMI, "virt_type": "hvm", "vol_type": "gp3"},
    },
    RESULT_TOPIC: {
        "id": 42,
        "testcase": {"name": "fedimg.ami.boot"},
        "outcome": "PASSED",
        "data": {"item": [AMI], "type": ["ami"]},
        "groups": ["c0ffee"],
        "note": "",
        "ref_url": None,
    },
    TASKOTRON_TOPIC: {
        "task": {"item": AMI, "type": "ami", "name": "fedimg.ami.boot"},
        "result": {"id": 42, "outcome": "PASSED"},
    },
    PING_TOPIC: {"token": "c0ffee"},
}

# Paths (inside a body) of the identifiers each topic carries, for the id mutations.
ID_FIELDS: Final[dict[str, tuple[tuple[str, ...], ...]]] = {
    COMPOSE_TOPIC: (("compose_id",),),
    TEST_TOPIC: (
        ("compose",),
        ("image_name",),
        ("destination",),
        ("extra", "id"),
        ("extra", "source_image_id"),
        ("image_sha256",),
    ),
    RESULT_TOPIC: (),  # data.item is free text on the bus: see RESULT item mutations
    TASKOTRON_TOPIC: (),
    PING_TOPIC: (),
}
URL_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    COMPOSE_TOPIC: ("location",),
    TEST_TOPIC: ("image_url",),
}

HOSTILE_IDS: Final = (
    "ami-$(reboot)",
    "Fedora-40;rm -rf /",
    "`reboot`",
    "../../etc/passwd",
    "..",
    "/etc/shadow",
    "Fedora-40|nc evil 1",
    "Fedora-40&&reboot",
    "Fedora-40\nERROR forged log line",
    "ami-0123456789abcdef0\n",
    "Fedora-40\r",
    "Fedora-40\x00",
    "Fedora-40\x1b[2J",
    "Fedora-\u202e04-arodeF",  # RTL override
    "Fedora\u200b-40",  # zero-width space
    "Fedora-40\ufeff",  # BOM
    "\uff26edora-40",  # fullwidth F
    "Fedora-40\ud800",  # a lone surrogate, as "\\ud800" in JSON
    "",
    " ",
    "x" * 5000,
    "-rf",
    "Fedora 40",
    "Fedora-40\t",
    "Fedora-40'",
    'Fedora-40"',
    "Fedora-40*",
    "%2e%2e%2f",
)
# Not AMI ids, though harmless as compose ids or names: for the AMI-id fields only.
BAD_AMI_IDS: Final = (
    "ami-0123456789ABCDEF0",
    "ami-123",
    "ami-0123456789abcdef0 ",
    "ami-0123456789abcdef00",
    "snap-0123456789abcdef0",
    "ami-0123456789abcdef0;reboot",
)

# Refused by the contract's URL schema wherever a URL is carried.
HOSTILE_URLS: Final = (
    "file:///etc/passwd",
    "gopher://kojipkgs.fedoraproject.org/compose",
    "ftp://kojipkgs.fedoraproject.org/compose",
    "data:text/plain;base64,SGVsbG8=",
    "javascript:alert(1)",
    "//kojipkgs.fedoraproject.org/compose",
    "kojipkgs.fedoraproject.org/compose",
    "http://",
    "https://kojipkgs.fedoraproject.org\n/compose",
    "https://kojipkgs.fedoraproject.org/compose\x00",
    "https://kojipkgs.fedoraproject.org/compose with space",
    "https://kojipkgs.fedoraproject.org/\u202ecompose",
    "https://kojipkgs.fedoraproject.org\u200b/compose",
    "https://k\u043ejipkgs.fedoraproject.org/compose",  # Cyrillic o
    "https://kojipkgs.fedoraproject.org/" + "a" * 3000,
)
# Parse as http(s) URLs but must be refused by the compose-host allow-list.
DISALLOWED_LOCATIONS: Final = (
    "https://evil.example.com/compose",
    "http://kojipkgs.fedoraproject.org@evil.example.com/compose",
    "http://kojipkgs.fedoraproject.org:x@evil.example.com/compose",
    "http://evil.example.com#@kojipkgs.fedoraproject.org/compose",
    "http://evil.example.com?@kojipkgs.fedoraproject.org/compose",
    "http://evil.example.com\\@kojipkgs.fedoraproject.org/compose",
    "http://kojipkgs.fedoraproject.org.evil.example.com/compose",
    "http://kojipkgs.fedoraproject.org./compose",
    "http://[::1]/compose",
    "http://[::ffff:127.0.0.1]/compose",
    "http://[::1/compose",
    "http://127.0.0.1/compose",
    "http://2130706433/compose",
    "http://0x7f.1/compose",
    "http://169.254.169.254/latest/meta-data/",
    "http://kojipkgs.fedoraproject.org:99999/compose",
    "http://xn--kojipkgs-fedoraproject-org.example/compose",
    "http:///compose",
    "http://localhost/compose",
)

# images.json paths that must be refused (fedimg.compose.image_url).
BAD_IMAGE_PATHS: Final = (
    "/etc/passwd",
    "../../../etc/passwd",
    "Cloud/../../x.raw.xz",
    "Cloud/./x86_64/x.raw.xz",
    "Cloud//x.raw.xz",
    "Cloud\\x86_64\\x.raw.xz",
    "http://evil.example.com/x.raw.xz",
    "//evil.example.com/x.raw.xz",
    "file:///etc/passwd",
    "Cloud/%2e%2e/x.raw.xz",
    "Cloud/x86_64/images/x.raw.xz\x00.txt",
    "Cloud/x86_64/images/x\n.raw.xz",
    "Cloud/x86_64/images/$(reboot).raw.xz",
    "Cloud/x86_64/images/`id`.raw.xz",
    "Cloud/x86_64/images/x;id.raw.xz",
    "Cloud/x86_64/images/\u202ezx.war.raw.xz",
    "Cloud/x86_64/images/x\u200b.raw.xz",
    "~/x.raw.xz/..",
    "",
    ".",
    "Cloud/x86_64/images/",
)

# zmq frames on a consumed topic that are not a JSON fedmsg envelope with a dict body.
RAW_PAYLOADS: Final[tuple[tuple[str, bytes], ...]] = (
    ("not JSON", b"this is not json {"),
    ("not UTF-8", b"\xff\xfe\xfa{\x00"),
    ("empty", b""),
    ("JSON list envelope", b"[1, 2, 3]"),
    ("JSON string envelope", b'"msg"'),
    ("JSON null envelope", b"null"),
    ("JSON number envelope", b"1e999999"),
    ("envelope without msg", b'{"topic": "TOPIC"}'),
    ("msg is a list", b'{"topic": "TOPIC", "msg": [1, 2]}'),
    ("msg is a string", b'{"topic": "TOPIC", "msg": "FINISHED"}'),
    ("msg is null", b'{"topic": "TOPIC", "msg": null}'),
    ("deep JSON", b'{"topic": "TOPIC", "msg": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
)


@dataclass(frozen=True)
class BadMessage:
    """One hostile body for one topic and where the pipeline must refuse it."""

    topic: str
    name: str
    body: Any
    refused_at: str  # "parse" or "validation"

    @property
    def id(self) -> str:
        return f"{self.topic}:{self.name}"[:120]


def _set(body: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    target = out
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    return out


def _drop(body: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    out = copy.deepcopy(body)
    target = out
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return out


def _schema(topic: str) -> Mapping[str, Any]:
    mtype = Topics().which(f"org.fedoraproject.dev.{topic}")
    assert mtype is not None
    return mtype.body_schema


def _field_schema(topic: str, path: tuple[str, ...]) -> Mapping[str, Any]:
    schema = _schema(topic)
    for key in path:
        schema = schema.get("properties", {}).get(key, {})
    return schema


def _required(topic: str) -> list[tuple[str, ...]]:
    schema = _schema(topic)
    paths: list[tuple[str, ...]] = [(key,) for key in schema.get("required", [])]
    for key, sub in schema.get("properties", {}).items():
        for inner in sub.get("required", []) if isinstance(sub, dict) else []:
            paths.append((key, inner))
    if topic == TEST_TOPIC:
        paths.append(("extra", "id"))  # a test request must name its AMI
    if topic == RESULT_TOPIC:
        paths += [("data", "item"), ("data", "type")]
    return paths


def _deep(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


_WRONG_TYPES: Final[tuple[Any, ...]] = (None, 7, 1.5, True, [], ["a"], {}, {"a": 1})


def _common(topic: str) -> Iterator[BadMessage]:
    valid = VALID[topic]
    for name, body in (
        ("body is a list", [valid]),
        ("body is a string", "FINISHED"),
        ("body is null", None),
        ("body is a number", 42),
        ("body is empty", {}),
        ("huge body over 64 KiB", {**valid, "x_padding": "p" * (65 * 1024)}),
        ("huge body of 3 MiB", {**valid, "x_padding": ["p" * 1024] * 3072}),
        ("deep nesting (200)", {**valid, "x_nested": _deep(200)}),
        ("deep nesting (5000)", {**valid, "x_nested": _deep(5000)}),
    ):
        yield BadMessage(topic, name, body, "parse")
    for path in _required(topic):
        yield BadMessage(topic, f"missing {'.'.join(path)}", _drop(valid, path), "parse")
        field_schema = _field_schema(topic, path)
        for wrong in _WRONG_TYPES:
            if path != ("extra", "id") and jsonschema.Draft7Validator(field_schema).is_valid(wrong):
                continue  # the right type for this field: not a wrong-type case
            yield BadMessage(
                topic, f"{'.'.join(path)} is {wrong!r}"[:60], _set(valid, path, wrong), "parse"
            )


def _compose() -> Iterator[BadMessage]:
    valid = VALID[COMPOSE_TOPIC]
    yield BadMessage(
        COMPOSE_TOPIC, "finished without location", _drop(valid, ("location",)), "parse"
    )
    yield BadMessage(
        COMPOSE_TOPIC, "compose_respin is a string", _set(valid, ("compose_respin",), "0"), "parse"
    )
    for loc in DISALLOWED_LOCATIONS:
        yield BadMessage(
            COMPOSE_TOPIC, f"location {loc!r}"[:80], _set(valid, ("location",), loc), "validation"
        )


def _test_request() -> Iterator[BadMessage]:
    valid = VALID[TEST_TOPIC]
    for name, path, value in (
        ("service is not EC2", ("service",), "GCE"),
        ("architecture is unknown", ("architecture",), "ppc64le"),
        ("architecture with a shell", ("architecture",), "x86_64;reboot"),
        ("status is unknown", ("status",), "STARTED"),
        ("virt_type is not hvm", ("extra", "virt_type"), "paravirtual"),
        ("vol_type is long", ("extra", "vol_type"), "gp3" * 20),
        ("extra is a list", ("extra",), [AMI]),
        ("reason is huge", ("reason",), "r" * 70_000),
    ):
        yield BadMessage(TEST_TOPIC, name, _set(valid, path, value), "parse")


def _results() -> Iterator[BadMessage]:
    valid = VALID[RESULT_TOPIC]
    for name, path, value in (
        ("id is a string", ("id",), "42"),
        ("data is a list", ("data",), [AMI]),
        ("data.item is a number", ("data", "item"), [42]),
        ("data.item is an empty list", ("data", "item"), []),
        ("data.item has 65 entries", ("data", "item"), [AMI] * 65),
        ("testcase.name is huge", ("testcase", "name"), "t" * 300),
        ("groups has a number", ("groups",), [1]),
        ("note is a number", ("note",), 1),
    ):
        yield BadMessage(RESULT_TOPIC, name, _set(valid, path, value), "parse")
    for item in HOSTILE_IDS + BAD_AMI_IDS:
        if len(item) > 2048:
            yield BadMessage(
                RESULT_TOPIC, "item is 5000 chars", _set(valid, ("data", "item"), [item]), "parse"
            )
            continue
        yield BadMessage(
            RESULT_TOPIC, f"item {item!r}"[:60], _set(valid, ("data", "item"), [item]), "validation"
        )
    tvalid = VALID[TASKOTRON_TOPIC]
    for item in HOSTILE_IDS + BAD_AMI_IDS:
        refused = "parse" if len(item) > 255 else "validation"
        yield BadMessage(
            TASKOTRON_TOPIC, f"item {item!r}"[:60], _set(tvalid, ("task", "item"), item), refused
        )
    yield BadMessage(
        TASKOTRON_TOPIC, "result.id is a string", _set(tvalid, ("result", "id"), "42"), "parse"
    )


def _ids_and_urls() -> Iterator[BadMessage]:
    for topic, paths in ID_FIELDS.items():
        for path in paths:
            ami_field = path[-1] in ("id", "source_image_id")
            for value in HOSTILE_IDS + (BAD_AMI_IDS if ami_field else ()):
                body = _set(VALID[topic], path, value)
                yield BadMessage(topic, f"{'.'.join(path)}={value!r}"[:80], body, "parse")
    for topic, fields in URL_FIELDS.items():
        for key in fields:
            for url in HOSTILE_URLS:
                body = _set(VALID[topic], (key,), url)
                yield BadMessage(topic, f"{key}={url!r}"[:80], body, "parse")


def message_corpus() -> list[BadMessage]:
    """Every bad message, for every consumed topic; names are unique."""
    corpus: list[BadMessage] = []
    for topic in TOPICS:
        corpus.extend(_common(topic))
    corpus.extend(_compose())
    corpus.extend(_test_request())
    corpus.extend(_results())
    corpus.extend(_ids_and_urls())
    seen: dict[str, int] = {}
    unique = []
    for bad in corpus:
        n = seen.get(bad.id, 0)
        seen[bad.id] = n + 1
        unique.append(
            bad if n == 0 else BadMessage(bad.topic, f"{bad.name} #{n}", bad.body, bad.refused_at)
        )
    return unique


# -- hostile compose servers and files (what fedimg stage downloads) ------------------------

NOT_ALLOWED_HOST: Final = "127.0.0.2"  # a second loopback address, never in allowed_hosts
FUTURE_HEADER_VERSION: Final = "99.0"
CLAIMED_RAW_SIZE: Final = 100 * 2**40  # what a forged xz index claims: 100 TiB
HUGE_COMPOSE_ENTRIES: Final = 5000
LONG_NAME_LENGTH: Final = 253  # a valid image name; its URL is longer than a tag value

REDIRECT_AWAY: Final = "redirect to a host not allowed"
CLAIMS_100_TIB: Final = "xz index claims 100 TiB"
CUT_EVERY_ANSWER: Final = "cut after 256 KiB on every answer"
CUT_AFTER_1_MIB: Final = "cut after 1 MiB on every answer"
# (fault, staged?): refused faults fail that image only; the 1 MiB cuts are resumed.
IMAGE_FAULTS: Final = (
    (REDIRECT_AWAY, False),
    (CLAIMS_100_TIB, False),
    (CUT_EVERY_ANSWER, False),
    (CUT_AFTER_1_MIB, True),
)


def serve_fault(fault: str, server: ComposeServer, rel: str, elsewhere: ComposeServer) -> None:
    """Make ``server`` answer image ``rel`` as ``fault`` says.

    ``elsewhere`` serves the same tree on a host outside the allowed hosts:
    the redirect points there, so following it would fetch a good image.
    A cut fault cuts each answer longer than the cut; the 256 KiB one
    outlasts a few resumes of a 1.5 MiB image, the 1 MiB one does not.
    """
    if fault == REDIRECT_AWAY:
        server.redirect(rel, elsewhere.url_of(rel))
    elif fault == CLAIMS_100_TIB:
        server.replace(rel, forged_xz(CLAIMED_RAW_SIZE), "application/x-xz", ranges=True)
    elif fault == CUT_EVERY_ANSWER:
        server.cut(rel, 256 * 1024)
    elif fault == CUT_AFTER_1_MIB:
        server.cut(rel, 1024 * 1024)
    else:
        raise ValueError(f"unknown image fault {fault!r}")


def future_metadata(text: str, version: str = FUTURE_HEADER_VERSION) -> bytes:
    """productmd metadata (images.json, composeinfo.json) with its header version changed."""
    data = json.loads(text)
    data["header"]["version"] = version
    return json.dumps(data).encode()


def junk_name(n: int) -> str:
    """The file name of the ``n``-th made-up image (sorts after the compose's own)."""
    return f"Fedora-Cloud-Base-Junk-{n:05d}.x86_64.raw.xz"


def huge_images_json(text: str, entries: int = HUGE_COMPOSE_ENTRIES) -> bytes:
    """images.json plus ``entries`` Cloud x86_64 raw.xz images that the server 404s.

    Each made-up entry is valid metadata (name, sha256, size), and its path
    sorts after the compose's own Cloud x86_64 image, so those come first.
    """
    data = json.loads(text)
    images = data["payload"]["images"].setdefault("Cloud", {}).setdefault("x86_64", [])
    for n in range(entries):
        name = junk_name(n)
        images.append(
            {
                "path": f"Cloud/x86_64/images/{name}",
                "arch": "x86_64",
                "format": "raw.xz",
                "type": "raw-xz",
                "subvariant": f"Junk_{n}",  # productmd wants one per (subvariant, type, ...)
                "size": 1024,
                "mtime": 1714521600,
                "checksums": {"sha256": hashlib.sha256(name.encode()).hexdigest()},
                "bootable": False,
                "disc_number": 1,
                "disc_count": 1,
                "implant_md5": None,
                "volume_id": None,
            }
        )
    return json.dumps(data).encode()


def long_image_name(arch: str = "x86_64", length: int = LONG_NAME_LENGTH) -> str:
    """A valid image file name of exactly ``length`` characters."""
    tail = f".{arch}.raw.xz"
    stem = "Fedora-Cloud-Base-40-20240501.0-"
    return stem + "x" * (length - len(stem) - len(tail)) + tail
