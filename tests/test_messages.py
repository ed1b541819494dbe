"""The message contract: topics, builders, validators and parsers."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedimg import messages as m

COMPOSE = {
    "status": "FINISHED",
    "release_type": "ga",
    "compose_label": "RC-20180425.0",
    "compose_respin": 0,
    "compose_date": "20180425",
    "release_version": "28",
    "location": "https://kojipkgs.fedoraproject.org/compose/28/Fedora-28-20180425.0/compose",
    "compose_type": "production",
    "release_is_layered": False,
    "release_name": "Fedora",
    "release_short": "Fedora",
    "compose_id": "Fedora-28-20180425.0",
}

RESULT_NEW = {
    "id": 1,
    "groups": ["41e6c327-0000-0000-0000-000000000000"],
    "testcase": {"name": "autocloud.ami.all", "ref_url": "x", "href": "y"},
    "submit_time": "2026-11-24T18:41:41.194357",
    "outcome": "PASSED",
    "note": "",
    "ref_url": "https://example.org/jobs/2023/output",
    "data": {
        "item": ["ami-0123456789abcdef0"],
        "type": ["ami"],
        "productmd.compose.id": ["Fedora-Cloud-26-20170620.0"],
        "region": ["us-east-1"],
    },
    "href": "https://example.org/results/1",
}

TASKOTRON = {
    "task": {"item": "ami-0123456789abcdef0", "type": "ami", "name": "autocloud.ami.all"},
    "result": {
        "id": 7,
        "submit_time": "2017-06-20 10:00:00 UTC",
        "prev_outcome": None,
        "outcome": "FAILED",
        "log_url": "https://example.org/log",
    },
}


def staged(**kw: Any) -> m.StagedImage:
    base: dict[str, Any] = {
        "compose_id": "Fedora-Cloud-28-20180425.0",
        "image_name": "Fedora-Cloud-Base-28-1.1.x86_64.raw.xz",
        "image_url": "https://kojipkgs.fedoraproject.org/compose/x/Fedora-Cloud-Base.raw.xz",
        "architecture": "x86_64",
        "region": "us-east-1",
        "ami_id": "ami-0123456789abcdef0",
        "vol_type": "gp3",
        "subvariant": "Cloud_Base",
        "release": "28",
        "sha256": "a" * 64,
    }
    base.update(kw)
    return m.StagedImage(**base)


def test_topics_follow_prefix_and_environment() -> None:
    prod = m.Topics("org.fedoraproject", "prod")
    assert prod.of(m.IMAGE_UPLOAD) == "org.fedoraproject.prod.fedimg.image.upload"
    assert prod.of(m.COMPOSE_STATUS) == "org.fedoraproject.prod.pungi.compose.status.change"
    dev = m.Topics.from_fedmsg({"topic_prefix": "org.example", "environment": "stg"})
    assert dev.which("org.example.stg.resultsdb.result.new") is m.RESULT_NEW
    assert dev.which("org.fedoraproject.prod.resultsdb.result.new") is None


def test_compose_status_parses_the_pungi_body() -> None:
    status = m.parse_compose_status(COMPOSE)
    assert status.finished
    assert status.compose_id == "Fedora-28-20180425.0"
    assert status.location == COMPOSE["location"]
    assert status.release_version == "28"
    assert not m.parse_compose_status({**COMPOSE, "status": "STARTED"}).finished


@pytest.mark.parametrize(
    "change",
    [
        {"compose_id": None},
        {"compose_id": 5},
        {"compose_id": "../../etc/passwd"},
        {"compose_id": "Fedora; rm -rf /"},
        {"location": "file:///etc/passwd"},
        {"location": "ftp://example.org/compose"},
        {"location": "https://exa mple.org/"},
        {"status": ["FINISHED"]},
        {"compose_respin": "zero"},
    ],
)
def test_compose_status_rejects_bad_bodies(change: dict[str, Any]) -> None:
    with pytest.raises(m.InvalidMessage):
        m.parse_compose_status({**COMPOSE, **change})


def test_compose_status_requires_location_when_finished() -> None:
    body = dict(COMPOSE)
    del body["location"]
    with pytest.raises(m.InvalidMessage):
        m.parse_compose_status(body)
    assert m.parse_compose_status({**body, "status": "DOOMED"}).location is None


def test_huge_bodies_are_rejected() -> None:
    with pytest.raises(m.InvalidMessage):
        m.parse_compose_status({**COMPOSE, "padding": "x" * (m.MAX_BODY_BYTES + 1)})


def test_image_event_round_trips_through_the_test_request_parser() -> None:
    image = staged()
    body = m.image_event(image, "started")
    m.IMAGE_TEST.validate(body)
    # upstream fedimg 2.x fields
    assert body["service"] == "EC2"
    assert body["compose"] == image.compose_id
    assert body["destination"] == "us-east-1"
    assert body["extra"] == {"id": image.ami_id, "virt_type": "hvm", "vol_type": "gp3"}
    assert m.parse_test_request(body) == image


def test_test_request_needs_started_and_an_ami() -> None:
    with pytest.raises(m.InvalidMessage):
        m.parse_test_request(m.image_event(staged(), "completed"))
    with pytest.raises(m.InvalidMessage):
        m.parse_test_request(m.image_event(staged(ami_id=None), "started"))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("extra", "id"), "ami-XYZ"),
        (("extra", "id"), "ami-0123456789abcdef0; true"),
        (("destination",), "mars-north-1x"),
        (("architecture",), "ppc64le"),
        (("image_url",), "javascript:alert(1)"),
        (("status",), "maybe"),
    ],
)
def test_test_request_rejects_bad_fields(path: tuple[str, ...], value: Any) -> None:
    body = copy.deepcopy(m.image_event(staged(), "started"))
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(m.InvalidMessage):
        m.parse_test_request(body)


def test_staged_image_validates_its_identifiers() -> None:
    with pytest.raises(m.InvalidMessage):
        staged(ami_id="ami-../../x")
    with pytest.raises(m.InvalidMessage):
        staged(region="us-east-1; reboot")
    with pytest.raises(m.InvalidMessage):
        staged(sha256="nothex")


def test_copy_publish_and_release_bodies_match_upstream_shapes() -> None:
    image = staged()
    copy_body = m.copy_event(image, "eu-west-1", "ami-00000000000000001")
    m.IMAGE_COPY.validate(copy_body)
    assert copy_body["extra"]["source_image_id"] == image.ami_id
    assert copy_body["compose_id"] == image.compose_id
    publish = m.publish_event(image, "eu-west-1", "ami-00000000000000001")
    m.IMAGE_PUBLISH.validate(publish)
    assert publish["compose"] == image.compose_id
    release = m.release_event(
        image,
        {"us-east-1": image.ami_id or "", "eu-west-1": "ami-00000000000000001"},
        {"ap-south-2": "InvalidRegion"},
    )
    m.IMAGE_RELEASE.validate(release)
    assert release["release"] == 28
    assert release["failed_regions"] == {"ap-south-2": "InvalidRegion"}
    assert list(release["regions"]) == ["eu-west-1", "us-east-1"]


def test_autocloud_events_validate() -> None:
    event = m.AmiTestEvent(
        compose_id="Fedora-28-20180425.0",
        ami_id="ami-0123456789abcdef0",
        region="us-east-1",
        job_id="abc",
        passed=3,
        failed=1,
    )
    for mtype, status in (
        (m.AMI_QUEUED, "queued"),
        (m.AMI_RUNNING, "running"),
        (m.AMI_SUCCESS, "success"),
        (m.AMI_FAILED, "failed"),
    ):
        mtype.validate(event.body(status))
    with pytest.raises(m.InvalidMessage):
        m.AMI_FAILED.validate({**event.body("failed"), "passed": -1})


def test_both_result_message_shapes_parse_to_one_notice() -> None:
    modern = m.parse_result_notice(m.RESULT_NEW, RESULT_NEW)
    assert modern == m.ResultNotice(
        "ami-0123456789abcdef0", "ami", "autocloud.ami.all", "PASSED", 1
    )
    old = m.parse_result_notice(m.TASKOTRON_RESULT_NEW, TASKOTRON)
    assert old.item == "ami-0123456789abcdef0"
    assert old.outcome == "FAILED"
    assert old.testcase == "autocloud.ami.all"


@pytest.mark.parametrize(
    "body",
    [
        {**RESULT_NEW, "data": {"item": [], "type": ["ami"]}},
        {**RESULT_NEW, "data": {"type": ["ami"]}},
        {**RESULT_NEW, "data": {"item": [5], "type": ["ami"]}},
        {**RESULT_NEW, "testcase": "autocloud.ami.all"},
        {**RESULT_NEW, "id": "1"},
        [],
        "PASSED",
    ],
)
def test_malformed_result_bodies_are_rejected(body: Any) -> None:
    with pytest.raises(m.InvalidMessage):
        m.parse_result_notice(m.RESULT_NEW, body)


def test_unwrap_accepts_hub_and_envelope_shapes() -> None:
    envelope = {"topic": "a.b.c", "msg": {"x": 1}}
    assert m.unwrap({"topic": "a.b.c", "body": envelope}) == ("a.b.c", {"x": 1})
    assert m.unwrap(envelope) == ("a.b.c", {"x": 1})
    with pytest.raises(m.InvalidMessage):
        m.unwrap({"topic": "a.b.c", "body": {"topic": "a.b.c"}})
    with pytest.raises(m.InvalidMessage):
        m.unwrap({"body": "nope"})


def test_emitter_validates_before_publishing(recorder: Any) -> None:
    emitter = m.Emitter(recorder)
    with pytest.raises(m.InvalidMessage):
        emitter.emit(m.IMAGE_UPLOAD, {"status": "started"})
    assert recorder.sent == []
    emitter.emit(m.IMAGE_UPLOAD, m.image_event(staged(), "started"))
    assert recorder.topics() == ["fedimg.image.upload"]


@pytest.mark.parametrize(
    ("url", "allowed", "ok"),
    [
        ("https://kojipkgs.fedoraproject.org/compose/x", (), True),
        ("http://127.0.0.1:8000/compose", ("127.0.0.1",), True),
        ("https://evil.example/compose", ("kojipkgs.fedoraproject.org",), False),
        ("https://user:pw@kojipkgs.fedoraproject.org/", (), False),
        ("file:///etc/shadow", (), False),
        ("gopher://x/", (), False),
        ("https:///nohost", (), False),
    ],
)
def test_check_http_url(url: str, allowed: tuple[str, ...], ok: bool) -> None:
    if ok:
        assert m.check_http_url(url, allowed) == url
    else:
        with pytest.raises(m.InvalidMessage):
            m.check_http_url(url, allowed)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    body=st.one_of(
        json_values,
        st.fixed_dictionaries({}, optional={k: json_values for k in COMPOSE}),
        st.fixed_dictionaries({}, optional={k: json_values for k in RESULT_NEW}),
    )
)
def test_parsers_never_fail_with_anything_but_invalid_message(body: Any) -> None:
    """Any JSON at all either parses to checked values or raises InvalidMessage."""
    for parse in (
        m.parse_compose_status,
        m.parse_test_request,
        lambda b: m.parse_result_notice(m.RESULT_NEW, b),
        lambda b: m.parse_result_notice(m.TASKOTRON_RESULT_NEW, b),
    ):
        try:
            parsed = parse(body)
        except m.InvalidMessage:
            continue
        # Whatever got through carries only checked identifiers.
        if isinstance(parsed, m.ComposeStatus):
            assert m.COMPOSE_ID_RE.match(parsed.compose_id)
        elif isinstance(parsed, m.StagedImage):
            assert parsed.ami_id and m.AMI_ID_RE.match(parsed.ami_id)
