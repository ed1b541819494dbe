"""The release announcement Fedora already reads, and the fedora-messaging publisher.

``aws_published_event`` builds ``fedora_image_uploader.published.v1.aws.*``;
the real ``AwsPublishedV1`` from PyPI (fedora-image-uploader-messages)
validates every body it builds. ``amqp_publisher`` sends each topic as its
schema class (checked with fedora-messaging's own ``mock_sends``).
"""

from __future__ import annotations

import re

import jsonschema
import pytest
from fedimg_messages.messages import ImageReleaseV1, ImageUploadV1
from fedora_image_uploader_messages.publish import AwsPublishedV1
from fedora_messaging import message as fm
from fedora_messaging.testing import mock_sends
from hypothesis import given
from hypothesis import strategies as st

from fedimg import messages as m
from fedimg.config import ConfigError, FedimgConfig
from tests.conftest import Recorder
from tests.test_messages import staged

AMI = "ami-0123456789abcdef0"
COPY = "ami-0fedcba9876543210"
NAME = "Fedora-Cloud-Base-40-20240501.0.x86_64-hvm-gp3-aaaaaaaa"
REGIONS = {"us-east-1": AMI, "eu-west-1": COPY}


def test_the_release_becomes_the_fedora_image_uploader_message() -> None:
    ann = m.aws_published_event(staged(), NAME, REGIONS)
    assert ann.topic == "fedora_image_uploader.published.v1.aws.Cloud_Base.28.x86_64"
    assert (ann.modname, ann.name) == (
        "fedora_image_uploader",
        "published.v1.aws.Cloud_Base.28.x86_64",
    )
    assert ann.body == {
        "architecture": "x86_64",
        "compose_id": "Fedora-Cloud-28-20180425.0",
        "image_name": NAME,
        "regions": {"eu-west-1": COPY, "us-east-1": AMI},
        "release": 28,
        "subvariant": "Cloud_Base",
    }
    real = AwsPublishedV1(topic=ann.topic, body=ann.body)
    real.validate()
    assert "in 2 regions" in real.summary
    assert f"eu-west-1 as {COPY}" in str(real)


LOWER = "abcdefghijklmnopqrstuvwxyz"
# The languages of r"[a-z]{2}-[a-z]{4,9}-[1-9]" and r"ami-[0-9a-f]{17}", built from
# text strategies: st.from_regex draws the same strings at a tenth of the speed.
REGION_NAMES = st.builds(
    "{}-{}-{}".format,
    st.text(LOWER, min_size=2, max_size=2),
    st.text(LOWER, min_size=4, max_size=9),
    st.integers(min_value=1, max_value=9),
)
AMI_IDS = st.text("0123456789abcdef", min_size=17, max_size=17).map("ami-{}".format)


@given(
    release=st.integers(min_value=1, max_value=999),
    arch=st.sampled_from(["x86_64", "aarch64"]),
    subvariant=st.from_regex(r"\A[A-Za-z0-9_-]{1,20}\Z"),
    regions=st.dictionaries(REGION_NAMES, AMI_IDS, min_size=1, max_size=30),
)
def test_every_announcement_validates_against_the_real_schema(
    release: int, arch: str, subvariant: str, regions: dict[str, str]
) -> None:
    image = staged(release=str(release), architecture=arch, subvariant=subvariant)
    ann = m.aws_published_event(image, NAME, regions)
    AwsPublishedV1(topic=ann.topic, body=ann.body).validate()
    words = ann.topic.split(".")
    assert words == [
        "fedora_image_uploader",
        "published",
        "v1",
        "aws",
        subvariant,
        str(release),
        arch,
    ]
    assert ann.body["regions"] == regions


@pytest.mark.parametrize(
    ("change", "ami_name", "regions"),
    [
        ({"release": "Rawhide"}, NAME, REGIONS),
        ({"release": ""}, NAME, REGIONS),
        ({"release": "4O"}, NAME, REGIONS),
        ({"subvariant": ""}, NAME, REGIONS),
        ({"subvariant": "Cloud.Base"}, NAME, REGIONS),  # would add a topic word
        ({"subvariant": "Cloud#"}, NAME, REGIONS),  # an AMQP wildcard
        ({"subvariant": "Cloud Base"}, NAME, REGIONS),
        ({}, "", REGIONS),
        ({}, "x" * 129, REGIONS),
        ({}, NAME, {}),
        ({}, NAME, {"us-east-1": "ami-nope"}),
        ({}, NAME, {"moon-1": AMI}),
    ],
)
def test_what_cannot_be_announced_is_refused(
    change: dict[str, str], ami_name: str, regions: dict[str, str]
) -> None:
    with pytest.raises(m.InvalidMessage):
        m.aws_published_event(staged(**change), ami_name, regions)


def test_announce_publishes_once_when_enabled_and_never_when_disabled(recorder: Recorder) -> None:
    emitter = m.Emitter(recorder)
    assert m.announce_aws_published(emitter, staged(), NAME, REGIONS, enabled=False) is None
    assert recorder.sent == []
    body = m.announce_aws_published(emitter, staged(), NAME, REGIONS, enabled=True)
    assert recorder.sent == [
        ("fedora_image_uploader", "published.v1.aws.Cloud_Base.28.x86_64", body)
    ]


def test_an_image_that_cannot_be_announced_is_skipped(recorder: Recorder) -> None:
    emitter = m.Emitter(recorder)
    rawhide = staged(release="Rawhide")
    assert m.announce_aws_published(emitter, rawhide, NAME, REGIONS, enabled=True) is None
    assert recorder.sent == []


def test_the_setting_defaults_on_and_is_checked() -> None:
    raw = {"fedimg.resultsdb_url": "http://127.0.0.1:5001/api/v2.0"}
    assert FedimgConfig.from_fedmsg(raw).fedora_image_uploader_message is True
    off = {**raw, "fedimg.promote.fedora_image_uploader_message": False}
    assert FedimgConfig.from_fedmsg(off).fedora_image_uploader_message is False
    with pytest.raises(
        ConfigError, match=re.escape("fedimg.promote.fedora_image_uploader_message")
    ):
        FedimgConfig.from_fedmsg({**raw, "fedimg.promote.fedora_image_uploader_message": "no"})


# -- the fedora-messaging publisher ------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "cls"),
    [
        ("fedimg.image.upload", ImageUploadV1),
        ("fedimg.image.release", ImageReleaseV1),
        ("fedora_image_uploader.published.v1.aws.Cloud_Base.28.x86_64", AwsPublishedV1),
        ("fedora_image_uploader.published.v1.aws", AwsPublishedV1),
        ("fedora_image_uploader.published.v1.awsome.x", fm.Message),
        ("resultsdb.result.new", fm.Message),
        ("fedimg.image", fm.Message),
    ],
)
def test_each_topic_is_sent_as_its_class(topic: str, cls: type[fm.Message]) -> None:
    assert m.message_class(topic) is cls


def test_amqp_publisher_sends_validated_instances_of_the_schema_classes() -> None:
    publish = m.amqp_publisher()
    emitter = m.Emitter(publish)
    image = staged()
    with mock_sends(ImageUploadV1, ImageReleaseV1, AwsPublishedV1, fm.Message) as sent:
        emitter.emit(m.IMAGE_UPLOAD, m.image_event(image, "started"))
        emitter.emit(m.IMAGE_RELEASE, m.release_event(image, REGIONS))
        m.announce_aws_published(emitter, image, NAME, REGIONS, enabled=True)
        publish("resultsdb", "result.new", {"id": 1, "outcome": "PASSED"})
    assert [s.topic for s in sent] == [
        "fedimg.image.upload",
        "fedimg.image.release",
        "fedora_image_uploader.published.v1.aws.Cloud_Base.28.x86_64",
        "resultsdb.result.new",
    ]
    assert sent[2]._headers["fedora_messaging_schema"] == "fedora_image_uploader.published.v1.aws"
    assert sent[3]._headers["fedora_messaging_schema"] == "base.message"


def test_a_body_its_class_rejects_fails_the_class_validation() -> None:
    publish = m.amqp_publisher()
    with pytest.raises(jsonschema.ValidationError), mock_sends(ImageUploadV1):
        publish("fedimg", "image.upload", {"status": "started"})
