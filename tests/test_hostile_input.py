"""Hostile and malformed input (tests/corpus.py) through every parser and consumer entry point.

Each bad message must be refused - by the contract's parser, or by the
validator right after it (compose-host allow-list, AMI-id check) - with a
WARNING or ERROR record, without a domain call, an AWS call, an HTTP request
or a published message. The consumers are built without a hub (their
``consume`` is what moksha calls) around fakes that raise ``Touched`` (a
BaseException the consumers' ``except Exception`` cannot swallow) if anything
reaches them.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autocloud_ami import consumer as ac_consumer
from fedimg import consumers
from fedimg.compose import ComposeError, image_url, read_compose
from fedimg.config import FedimgConfig
from fedimg.engine import Engine
from fedimg.messages import (
    AMI_ID_RE,
    COMPOSE_ID_RE,
    IMAGE_NAME_RE,
    REGION_RE,
    RESULT_NEW,
    TASKOTRON_RESULT_NEW,
    Emitter,
    InvalidMessage,
    Topics,
    check_http_url,
    parse_compose_status,
    parse_result_notice,
    parse_test_request,
)
from tests.corpus import (
    ALLOWED_HOST,
    BAD_IMAGE_PATHS,
    COMPOSE_TOPIC,
    DISALLOWED_LOCATIONS,
    HOSTILE_URLS,
    LOCATION,
    PING_TOPIC,
    RESULT_TOPIC,
    TASKOTRON_TOPIC,
    TEST_TOPIC,
    VALID,
    BadMessage,
    message_corpus,
)
from tests.engine_support import make_engine

CORPUS = message_corpus()
TOPICS = Topics("org.fedoraproject", "dev")


class Touched(BaseException):
    """Something reached a seam a refused message must never reach."""


class NoTouch:
    """Any attribute use is a failure: AWS clients, HTTP sessions, ResultsDB."""

    def __init__(self, what: str) -> None:
        self._what = what

    def __getattr__(self, name: str) -> Any:
        raise Touched(f"{self._what}.{name} used for a refused message")


def cfg() -> FedimgConfig:
    return FedimgConfig.from_fedmsg(
        {
            "fedimg.resultsdb_url": "http://resultsdb.test/api/v2.0",
            "fedimg.aws.staging_region": "us-east-1",
            "fedimg.aws.regions": ["us-west-2"],
            "fedimg.compose.allowed_hosts": [ALLOWED_HOST],
        }
    )


def parse(topic: str, body: Any) -> Any:
    if topic == COMPOSE_TOPIC:
        return parse_compose_status(body)
    if topic == TEST_TOPIC:
        return parse_test_request(body)
    if topic == RESULT_TOPIC:
        return parse_result_notice(RESULT_NEW, body)
    if topic == TASKOTRON_TOPIC:
        return parse_result_notice(TASKOTRON_RESULT_NEW, body)
    mtype = TOPICS.which(f"{TOPICS.prefix}.{TOPICS.environment}.{topic}")
    assert mtype is not None
    return mtype.validate(body)


def hub_message(topic: str, body: Any) -> dict[str, Any]:
    full = f"{TOPICS.prefix}.{TOPICS.environment}.{topic}"
    return {"topic": full, "body": {"topic": full, "msg": body, "msg_id": "x"}}


@pytest.fixture
def recorder_emitter(recorder: Any) -> Emitter:
    return Emitter(recorder)


def untouchable_engine(emitter: Emitter) -> Engine:
    """An engine whose AWS, HTTP and ResultsDB seams fail the test if anything touches them."""
    return make_engine(
        cfg(),
        emitter,
        NoTouch("aws"),
        Path(tempfile.mkdtemp(prefix="fedimg-hostile-")),
        session=NoTouch("http session"),
        results=NoTouch("resultsdb"),
    )


def build_consumer(topic: str, emitter: Emitter, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The consumer the hub would hand ``topic`` to, around seams that must not be touched."""
    if topic == COMPOSE_TOPIC:
        c: Any = consumers.StageConsumer.__new__(consumers.StageConsumer)
        c.lifecycle = untouchable_engine(emitter)
    elif topic in (RESULT_TOPIC, TASKOTRON_TOPIC):
        c = consumers.PromoteConsumer.__new__(consumers.PromoteConsumer)
        c.lifecycle = untouchable_engine(emitter)
    elif topic == PING_TOPIC:
        c = consumers.HealthConsumer.__new__(consumers.HealthConsumer)
        c.hub_ref = SimpleNamespace(config={}, consumers=[], producers=[])
        c._reported = set()
    else:
        import autocloud_ami.job

        def no_test(*args: Any, **kw: Any) -> Any:
            raise Touched("autocloud_ami.job.test_ami called for a refused message")

        monkeypatch.setattr(autocloud_ami.job, "test_ami", no_test)
        c = ac_consumer.AmiTestConsumer.__new__(ac_consumer.AmiTestConsumer)
        c.deps = NoTouch("deps")
    c.topics = TOPICS
    c.emitter = emitter
    return c


# -- the corpus itself ---------------------------------------------------------------------


def test_the_valid_bodies_are_accepted() -> None:
    """Every refusal below is down to its mutation, not to a broken starting point."""
    for topic, body in VALID.items():
        parse(topic, json.loads(json.dumps(body)))
    assert check_http_url(LOCATION, (ALLOWED_HOST,)) == LOCATION


def test_the_corpus_covers_every_consumed_topic_and_kind() -> None:
    topics = {bad.topic for bad in CORPUS}
    assert topics == {COMPOSE_TOPIC, TEST_TOPIC, RESULT_TOPIC, TASKOTRON_TOPIC, PING_TOPIC}
    assert len({bad.id for bad in CORPUS}) == len(CORPUS)
    assert {bad.refused_at for bad in CORPUS} == {"parse", "validation"}
    assert len(CORPUS) >= 500


# -- parsers and validators ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [b for b in CORPUS if b.refused_at == "parse"], ids=lambda b: b.id)
def test_parser_refuses(bad: BadMessage) -> None:
    with pytest.raises(InvalidMessage):
        parse(bad.topic, bad.body)


@pytest.mark.parametrize(
    "bad",
    [b for b in CORPUS if b.refused_at == "validation" and b.topic == COMPOSE_TOPIC],
    ids=lambda b: b.id,
)
def test_compose_location_outside_the_allow_list_is_refused_before_any_request(
    bad: BadMessage,
) -> None:
    status = parse_compose_status(bad.body)
    assert status.location is not None
    with pytest.raises(ComposeError):
        read_compose(NoTouch("http session"), status.location, cfg(), status.compose_id)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [b for b in CORPUS if b.refused_at == "validation" and b.topic != COMPOSE_TOPIC],
    ids=lambda b: b.id,
)
def test_result_naming_something_that_is_not_an_ami_is_ignored_with_a_warning(
    bad: BadMessage, recorder: Any, caplog: pytest.LogCaptureFixture
) -> None:
    mtype = RESULT_NEW if bad.topic == RESULT_TOPIC else TASKOTRON_RESULT_NEW
    notice = parse_result_notice(mtype, bad.body)
    assert not AMI_ID_RE.match(notice.item)
    engine = untouchable_engine(Emitter(recorder))
    with caplog.at_level(logging.WARNING):
        assert engine.on_result(notice) is None
    assert any(r.levelno >= logging.WARNING for r in caplog.records)
    assert recorder.sent == []


@pytest.mark.parametrize(
    "url",
    [u for u in HOSTILE_URLS + DISALLOWED_LOCATIONS if len(u) <= 2048],  # longer: schema
)
def test_check_http_url_refuses_hostile_and_foreign_urls(url: str) -> None:
    with pytest.raises(InvalidMessage):
        check_http_url(url, (ALLOWED_HOST,))


@pytest.mark.parametrize("path", BAD_IMAGE_PATHS)
def test_images_json_paths_never_leave_the_compose(path: str) -> None:
    with pytest.raises(ComposeError):
        image_url(LOCATION, path)


# -- the consumers' entry points ---------------------------------------------------------------


@pytest.mark.parametrize("bad", CORPUS, ids=lambda b: b.id)
def test_consumer_refuses_with_a_log_record_and_no_side_effect(
    bad: BadMessage,
    recorder: Any,
    recorder_emitter: Emitter,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer = build_consumer(bad.topic, recorder_emitter, monkeypatch)
    with caplog.at_level(logging.WARNING):
        consumer.consume(hub_message(bad.topic, bad.body))
    assert any(r.levelno >= logging.WARNING for r in caplog.records), bad.id
    assert recorder.sent == []


@pytest.mark.parametrize("topic", [COMPOSE_TOPIC, TEST_TOPIC, RESULT_TOPIC, PING_TOPIC])
@pytest.mark.parametrize(
    "message",
    [
        {"topic": "x", "body": "not an envelope"},
        {"topic": "x", "body": ["a"]},
        {"topic": "x", "body": None},
        {"body": {"msg": {}}},
        {"topic": 7, "body": {"topic": 7, "msg": {}}},
    ],
    ids=["string", "list", "null", "no topic", "topic not a string"],
)
def test_consumers_refuse_envelopes_that_are_not_fedmsg(
    topic: str,
    message: dict[str, Any],
    recorder: Any,
    recorder_emitter: Emitter,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer = build_consumer(topic, recorder_emitter, monkeypatch)
    with caplog.at_level(logging.WARNING):
        consumer.consume(message)
    assert any(r.levelno >= logging.WARNING for r in caplog.records)
    assert recorder.sent == []


def test_a_ping_with_an_odd_token_is_echoed_verbatim_never_interpreted(
    recorder: Any, recorder_emitter: Emitter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token is opaque: a shell string is answered as data (nothing runs it)."""
    consumer = build_consumer(PING_TOPIC, recorder_emitter, monkeypatch)
    consumer.consume(hub_message(PING_TOPIC, {"token": "$(reboot);`id`"}))
    assert [b["token"] for b in recorder.bodies("fedimg.hub.pong")] == ["$(reboot);`id`"]


# -- property-based: identifiers that get through are always clean ---------------------------

_NASTY = st.sampled_from(["\n", "\r", "\x00", "\t", " ", "\u202e", "\u200b", "$", "`", ";", "/"])


@settings(max_examples=200, deadline=None)
@given(
    field=st.sampled_from(["compose", "image_name", "destination", "extra.id"]),
    prefix=st.text(max_size=20),
    nasty=_NASTY,
    suffix=st.text(max_size=20),
)
def test_no_identifier_with_a_control_or_shell_character_gets_through(
    field: str, prefix: str, nasty: str, suffix: str
) -> None:
    body = json.loads(json.dumps(VALID[TEST_TOPIC]))
    if field == "extra.id":
        body["extra"]["id"] = f"ami-0123456789abcdef0{prefix}{nasty}{suffix}"
    else:
        body[field] = f"{body[field]}{prefix}{nasty}{suffix}"
    with pytest.raises(InvalidMessage):
        parse_test_request(body)


@settings(max_examples=300, deadline=None)
@given(
    compose=st.text(max_size=60),
    name=st.text(max_size=60),
    region=st.text(max_size=20),
    ami=st.text(max_size=30),
    url=st.text(max_size=60),
)
def test_whatever_a_test_request_carries_is_checked_when_it_parses(
    compose: str, name: str, region: str, ami: str, url: str
) -> None:
    body = json.loads(json.dumps(VALID[TEST_TOPIC]))
    body.update(compose=compose, image_name=name, destination=region, image_url=url)
    body["extra"]["id"] = ami
    try:
        image = parse_test_request(body)
    except InvalidMessage:
        return
    for value, regex in (
        (image.compose_id, COMPOSE_ID_RE),
        (image.image_name, IMAGE_NAME_RE),
        (image.region, REGION_RE),
        (image.ami_id or "", AMI_ID_RE),
    ):
        assert regex.fullmatch(value), value
        assert value.isascii() and value.isprintable()
    assert image.image_url.isascii() and image.image_url.isprintable()
    assert " " not in image.image_url


@settings(max_examples=300, deadline=None)
@given(url=st.text(max_size=80), host=st.sampled_from([ALLOWED_HOST, "127.0.0.1"]))
def test_an_accepted_url_is_http_on_an_allowed_host_without_credentials(
    url: str, host: str
) -> None:
    from urllib.parse import urlsplit

    for candidate in (url, f"http://{url}", f"https://{host}{url}", f"http://{url}@{host}/"):
        try:
            check_http_url(candidate, (host,))
        except InvalidMessage:
            continue
        parts = urlsplit(candidate)
        assert parts.scheme in ("http", "https")
        assert parts.hostname == host
        assert parts.username is None and parts.password is None
        assert candidate.isprintable() and not any(ch.isspace() for ch in candidate)


@settings(max_examples=300, deadline=None)
@given(path=st.text(alphabet=st.sampled_from(list("ab./\\:%~ \n\x00\u202e")), max_size=30))
def test_an_accepted_image_path_stays_under_the_compose(path: str) -> None:
    try:
        url = image_url(LOCATION, path)
    except ComposeError:
        return
    assert url.startswith(LOCATION + "/")
    segments = path.split("/")
    assert ".." not in segments and "." not in segments and "" not in segments
    assert url.isascii() and url.isprintable() and " " not in url
