"""The schema package (fedimg-messages/): one contract for fedmsg and fedora-messaging.

Every topic fedimg and autocloud_ami publish has a registered
``fedora_messaging`` class carrying the very schema fedimg's fedmsg path
validates with; what the builders produce passes both, what breaks the
contract fails both, and a message survives fedora-messaging's own wire
encoding as an instance of its class.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import jsonschema
import pika
import pytest
from fedimg_messages import messages as schema_classes
from fedimg_messages import schemas
from fedora_messaging import message as fm
from fedora_messaging.exceptions import ValidationError

from fedimg import messages as m
from tests.corpus import PING_TOPIC, TEST_TOPIC, message_corpus
from tests.corpus import _set as set_path
from tests.test_messages import staged

AMI = "ami-0123456789abcdef0"
COPY_AMI = "ami-0fedcba9876543210"

PUBLISHED = (
    m.HUB_PING,
    m.HUB_PONG,
    m.IMAGE_UPLOAD,
    m.IMAGE_TEST,
    m.IMAGE_COPY,
    m.IMAGE_PUBLISH,
    m.IMAGE_RELEASE,
    m.IMAGE_DELETE,
    m.AMI_QUEUED,
    m.AMI_RUNNING,
    m.AMI_SUCCESS,
    m.AMI_FAILED,
)


def built_bodies() -> list[tuple[m.MessageType, dict[str, Any]]]:
    """What the project's builders emit, one or more per published topic."""
    image = staged()
    event = m.AmiTestEvent(
        compose_id=image.compose_id,
        ami_id=AMI,
        region="us-east-1",
        job_id="job-1",
        image_name=image.image_name,
        passed=3,
        failed=1,
        results_url="https://example.org/out/job-1",
        reason="selinux failed",
    )
    return [
        (m.HUB_PING, {"token": "c0ffee"}),
        (m.HUB_PONG, {"token": "c0ffee", "host": "hub.example.org"}),
        (m.IMAGE_UPLOAD, m.image_event(staged(ami_id=None), "started")),
        (m.IMAGE_UPLOAD, m.image_event(image, "failed", reason="EBS said no")),
        (m.IMAGE_TEST, m.image_event(image, "started")),
        (m.IMAGE_TEST, m.image_event(image, "completed")),
        (m.IMAGE_COPY, m.copy_event(image, "eu-west-1", COPY_AMI)),
        (m.IMAGE_PUBLISH, m.publish_event(image, "eu-west-1", COPY_AMI)),
        (m.IMAGE_RELEASE, m.release_event(image, {"eu-west-1": COPY_AMI, "us-east-1": AMI})),
        (
            m.IMAGE_RELEASE,
            m.release_event(image, {"us-east-1": AMI}, {"ap-south-1": "copy failed"}),
        ),
        (
            m.IMAGE_DELETE,
            m.delete_event(
                compose_id=image.compose_id,
                image_name=image.image_name,
                architecture=image.architecture,
                region="eu-west-1",
                ami_id=COPY_AMI,
                vol_type="gp3",
                reason="nightly compose 30 days old (limit 14)",
                snapshots=("snap-0123456789abcdef0",),
            ),
        ),
        (m.AMI_QUEUED, m.AmiTestEvent(image.compose_id, AMI, "us-east-1", "j").body("queued")),
        (m.AMI_RUNNING, event.body("running")),
        (m.AMI_SUCCESS, event.body("success")),
        (m.AMI_FAILED, event.body("failed")),
    ]


def class_of(mtype: m.MessageType) -> type[fm.Message]:
    (found,) = [c for c in schema_classes.ALL if c.topic == str(mtype)]
    return found


# -- one contract ------------------------------------------------------------------------


def test_every_published_topic_has_one_class_with_the_same_schema_object() -> None:
    assert {c.topic for c in schema_classes.ALL} == {str(t) for t in PUBLISHED}
    assert len(schema_classes.ALL) == len(PUBLISHED)
    for mtype in PUBLISHED:
        assert class_of(mtype).body_schema is mtype.body_schema
        assert mtype.summary == mtype.body_schema["description"]
    # Everything else in ALL_TYPES is consumed from others, never published by us.
    consumed = {str(t) for t in m.ALL_TYPES} - {str(t) for t in PUBLISHED}
    assert consumed == {
        "pungi.compose.status.change",
        "resultsdb.result.new",
        "taskotron.result.new",
        "waiverdb.waiver.new",
    }


def test_every_class_is_registered_under_the_fedora_messages_entry_point() -> None:
    for cls in schema_classes.ALL:
        name = fm.get_name(cls)
        assert name == f"{cls.topic}.v1"
        assert fm.get_class(name) is cls


def test_the_public_names_fedimg_messages_re_exports_are_the_packages() -> None:
    assert m.AMI_ID_RE is schemas.AMI_ID_RE
    assert m.REGION_RE is schemas.REGION_RE
    assert m.ARCHES == ("x86_64", "aarch64")
    assert (m.SERVICE, m.VIRT_TYPE) == ("EC2", "hvm")


@pytest.mark.parametrize(
    ("mtype", "body"), built_bodies(), ids=lambda v: str(v) if isinstance(v, m.MessageType) else ""
)
def test_built_bodies_pass_both_validations(mtype: m.MessageType, body: dict[str, Any]) -> None:
    mtype.validate(body)
    msg = class_of(mtype)(body=body)
    msg.validate()
    assert msg.topic == str(mtype)
    assert msg.app_name in ("fedimg", "autocloud_ami")
    summary = msg.summary
    assert summary and "\n" not in summary
    assert "None" not in summary
    text = str(msg)
    assert text.startswith(summary)
    for value in (body.get("image_name"), body.get("ami_id"), body.get("token")):
        if value:
            assert value in text


@pytest.mark.parametrize(
    ("mtype", "path", "value"),
    [
        (m.IMAGE_UPLOAD, ("extra", "id"), "ami-XYZ"),
        (m.IMAGE_TEST, ("destination",), "mars-north-1x"),
        (m.IMAGE_TEST, ("status",), "exploded"),
        (m.IMAGE_COPY, ("service",), "GCE"),
        (m.IMAGE_PUBLISH, ("image_url",), "file:///etc/passwd"),
        (m.IMAGE_RELEASE, ("regions",), {"eu-west-1": "not-an-ami"}),
        (m.IMAGE_RELEASE, ("release",), 40.5),
        (m.AMI_SUCCESS, ("passed",), -1),
        (m.AMI_FAILED, ("job_id",), None),
        (m.HUB_PONG, ("host",), ["a", "list"]),
    ],
)
def test_a_body_breaking_the_contract_fails_both(
    mtype: m.MessageType, path: tuple[str, ...], value: Any
) -> None:
    body = set_path(next(b for t, b in built_bodies() if t is mtype), path, value)
    with pytest.raises(m.InvalidMessage):
        mtype.validate(body)
    with pytest.raises(jsonschema.ValidationError):
        class_of(mtype)(body=body).validate()


@pytest.mark.parametrize("mtype", PUBLISHED, ids=str)
def test_a_missing_required_field_fails_both(mtype: m.MessageType) -> None:
    body = next(b for t, b in built_bodies() if t is mtype)
    for key in mtype.body_schema["required"]:
        partial = {k: v for k, v in body.items() if k != key}
        with pytest.raises(m.InvalidMessage):
            mtype.validate(partial)
        with pytest.raises(jsonschema.ValidationError):
            class_of(mtype)(body=partial).validate()


def test_hostile_corpus_bodies_get_the_same_schema_verdict_on_both_paths() -> None:
    checked = 0
    for bad in message_corpus():
        if bad.topic not in (TEST_TOPIC, PING_TOPIC) or not isinstance(bad.body, dict):
            continue
        mtype = m.Topics().which(f"org.fedoraproject.dev.{bad.topic}")
        assert mtype is not None
        validator = jsonschema.Draft7Validator(mtype.body_schema)
        try:
            schema_errors = list(validator.iter_errors(bad.body))
        except TypeError:  # not JSON data at all (the size/depth guards handle it)
            continue
        try:
            class_of(mtype)(body=bad.body).validate()
            fm_ok = True
        except jsonschema.ValidationError:
            fm_ok = False
        assert fm_ok == (not schema_errors), bad.id
        checked += 1
    assert checked > 20


def test_summaries_hold_on_the_smallest_valid_bodies() -> None:
    for mtype, body in built_bodies():
        required = {k: body[k] for k in mtype.body_schema["required"]}
        msg = class_of(mtype)(body=required)
        msg.validate()
        assert msg.summary
        assert str(msg).startswith(msg.summary)


def test_release_text_lists_every_region_and_failure() -> None:
    body = m.release_event(staged(), {"us-east-1": AMI, "eu-west-1": COPY_AMI}, {"ap-south-1": "x"})
    msg = schema_classes.ImageReleaseV1(body=body)
    assert msg.regions == {"us-east-1": AMI, "eu-west-1": COPY_AMI}
    assert "2 region(s), failed in 1" in msg.summary
    assert f"eu-west-1: {COPY_AMI}" in str(msg)
    assert "FAILED ap-south-1: x" in str(msg)
    assert msg.ami_id is None
    assert schema_classes.ImageTestV1(body=m.image_event(staged(), "started")).ami_id == AMI


# -- the wire --------------------------------------------------------------------------------


@pytest.mark.parametrize(("mtype", "body"), built_bodies()[::3])
def test_wire_round_trip_decodes_to_the_class(mtype: m.MessageType, body: dict[str, Any]) -> None:
    sent = class_of(mtype)(body=body)
    assert sent._headers["fedora_messaging_schema"] == f"{mtype}.v1"
    assert sent._headers["fedora_messaging_schema_package"] == "fedimg_messages"
    got = fm.get_message(f"org.fedoraproject.prod.{mtype}", sent._properties, sent._encoded_body)
    assert type(got) is class_of(mtype)
    assert got.body == body
    assert fm.loads(fm.dumps(sent))[0] == sent


def test_a_consumer_refuses_a_bad_body_under_our_schema_header() -> None:
    good = schema_classes.ImageTestV1(body=m.image_event(staged(), "started"))
    properties = pika.BasicProperties(
        content_type="application/json",
        content_encoding="utf-8",
        headers=dict(good._headers),
    )
    with pytest.raises(ValidationError):
        fm.get_message("org.fedoraproject.prod.fedimg.image.test", properties, b'{"status": 1}')
    with pytest.raises(ValidationError):
        fm.get_message("org.fedoraproject.prod.fedimg.image.test", properties, b"not json")


def test_the_schema_package_does_not_import_fedimg() -> None:
    code = (
        "import sys, fedimg_messages.messages, fedimg_messages.schemas\n"
        "bad = sorted(n for n in sys.modules if n == 'fedimg' or n.startswith('fedimg.'))\n"
        "assert not bad, bad\n"
        "import fedimg_messages.schemas as s\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    # The plain-data module needs nothing beyond the standard library.
    code = (
        "import sys, fedimg_messages.schemas\n"
        "assert 'fedora_messaging' not in sys.modules and 'jsonschema' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
