"""Hostile and malformed input (tests/corpus.py) through every parser and consumer entry point.

Each bad message must be refused - by the contract's parser, or by the
validator right after it (compose-host allow-list, AMI-id check) - with a
WARNING or ERROR record, without a domain call, an AWS call, an HTTP request
or a published message. The consumers are built without a hub (their
``consume`` is what moksha calls) around fakes that raise ``Touched`` (a
BaseException the consumers' ``except Exception`` cannot swallow) if anything
reaches them. The hostile compose servers and files (redirects to hosts not
allowed, forged sizes, cut downloads, metadata from the future, a compose of
5,000 images) are staged on moto, as the hub stages them.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from moto import mock_aws

from autocloud_ami import consumer as ac_consumer
from devel.compose import ComposeServer, ComposeTree, build_compose
from fedimg import consumers, download, tags
from fedimg.aws import AwsClients
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
from fedimg.stage import StageOutcome
from tests.corpus import (
    ALLOWED_HOST,
    BAD_IMAGE_PATHS,
    CLAIMS_100_TIB,
    COMPOSE_TOPIC,
    DISALLOWED_LOCATIONS,
    HOSTILE_URLS,
    HUGE_COMPOSE_ENTRIES,
    IMAGE_FAULTS,
    LOCATION,
    NOT_ALLOWED_HOST,
    PING_TOPIC,
    REDIRECT_AWAY,
    RESULT_TOPIC,
    TASKOTRON_TOPIC,
    TEST_TOPIC,
    VALID,
    BadMessage,
    future_metadata,
    huge_images_json,
    junk_name,
    message_corpus,
    serve_fault,
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


# -- hostile compose servers and files, staged in process (moto, loopback servers) ---------------
#
# Two compose servers serve the same generated compose: "home" on 127.0.0.1 (the
# allowed host) and "away" on 127.0.0.2 (not allowed); each counts every request.
# The engine is built by Engine.from_config, as the hub builds it, so its HTTP
# session is the one production uses.


@dataclass
class Hostile:
    tree: ComposeTree
    home: ComposeServer
    away: ComposeServer
    aws: AwsClients
    recorder: Any
    written: list[str]  # AWS operations that create or change something, in order
    waited: list[float]  # backoff delays between download resumes

    state_dir: Path

    def stage(self, **settings: Any) -> list[StageOutcome]:
        """``fedimg stage`` by hand: the engine built from the settings, as the hub builds it."""
        raw = {
            "fedimg.resultsdb_url": "http://127.0.0.1:9/api/v2.0",
            "fedimg.compose.allowed_hosts": ["127.0.0.1"],
            "fedimg.aws.upload_workers": 2,
            "fedimg.stage.workers": 3,
            "fedimg.http.retries": 2,
            "fedimg.http.timeout": 5.0,
            "fedimg.state_dir": str(self.state_dir),
            **settings,
        }
        engine = Engine.from_config(
            FedimgConfig.from_fedmsg(raw), Emitter(self.recorder), aws=self.aws
        )
        engine.stager.available_timeout, engine.stager.poll_interval = 10.0, 0.05
        try:
            return engine.stage_location(self.home.url, self.tree.compose_id)
        finally:
            engine.close()

    def requests_away(self) -> int:
        with self.away._lock:
            return sum(self.away.hits.values())

    def left_in_aws(self, image_name: str) -> list[str]:
        """AMIs and snapshots this image left in the staging region."""
        ec2 = self.aws.ec2("us-east-1")
        stem = image_name[: -len(".raw.xz")]
        amis = [i["ImageId"] for i in ec2.describe_images(Owners=["self"])["Images"]]
        amis = [
            i["ImageId"]
            for i in ec2.describe_images(Owners=["self"])["Images"]
            if str(i.get("Name", "")).startswith(stem)
        ]
        snaps = ec2.describe_snapshots(
            OwnerIds=["self"],
            Filters=[{"Name": f"tag:{tags.IMAGE_NAME}", "Values": [image_name]}],
        )["Snapshots"]
        return amis + [s["SnapshotId"] for s in snaps]


WRITES = frozenset(
    {"StartSnapshot", "RegisterImage", "CreateTags", "CopyImage", "ModifyImageAttribute"}
)


@pytest.fixture(scope="module")
def hostile_tree(tmp_path_factory: pytest.TempPathFactory) -> ComposeTree:
    return build_compose(tmp_path_factory.mktemp("hostile-compose"))


@pytest.fixture
def hostile(
    hostile_tree: ComposeTree, recorder: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Hostile]:
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    written: list[str] = []
    waited: list[float] = []
    monkeypatch.setattr(download, "_sleep", waited.append)

    def hook(model: Any, **_: Any) -> None:
        if model.name in WRITES:
            written.append(model.name)

    session = boto3.session.Session()
    session.events.register("provide-client-params", hook)
    with (
        mock_aws(),
        ComposeServer(hostile_tree.root) as home,
        ComposeServer(hostile_tree.root, host=NOT_ALLOWED_HOST) as away,
    ):
        aws = AwsClients(max_attempts=2, session=session)
        yield Hostile(hostile_tree, home, away, aws, recorder, written, waited, tmp_path)


@pytest.mark.parametrize(("fault", "staged"), IMAGE_FAULTS, ids=[f for f, _ in IMAGE_FAULTS])
def test_a_hostile_image_file_fails_that_image_only_and_leaves_nothing(
    hostile: Hostile, fault: str, staged: bool
) -> None:
    target = next(i for i in hostile.tree.raw_images() if i.spec.variant == "Cloud")
    serve_fault(fault, hostile.home, target.path, hostile.away)
    outcomes = {o.image_name: o for o in hostile.stage()}
    assert hostile.requests_away() == 0, "a host outside allowed_hosts was contacted"
    others = [i.image_name for i in hostile.tree.raw_images() if i is not target]
    assert [outcomes[name].status for name in others] == ["staged", "staged"]
    mine = outcomes[target.image_name]
    if staged:
        assert mine.status == "staged", mine.reason
        assert hostile.waited  # resumed after a backoff
        return
    assert mine.status == "failed" and mine.reason
    assert hostile.left_in_aws(target.image_name) == []
    failed = [
        b
        for b in hostile.recorder.bodies("fedimg.image.upload")
        if b["image_name"] == target.image_name and b["status"] == "failed"
    ]
    assert len(failed) == 1
    assert target.image_name not in {
        b["image_name"] for b in hostile.recorder.bodies("fedimg.image.test")
    }
    if fault in (REDIRECT_AWAY, CLAIMS_100_TIB):  # refused before anything was created
        assert hostile.written.count("StartSnapshot") == len(others)
    else:  # cut beyond the resumes: the snapshot it was going into is deleted
        assert hostile.written.count("StartSnapshot") == len(others) + 1
        assert hostile.waited == [1.0, 2.0]


@pytest.mark.parametrize("fault", ["future header", "metadata redirected away"])
def test_hostile_compose_metadata_refuses_the_compose_at_no_cost(
    hostile: Hostile, fault: str
) -> None:
    rel = "metadata/images.json"
    if fault == "future header":
        hostile.home.replace(rel, future_metadata(hostile.tree.images_json.read_text()))
    else:
        hostile.home.redirect(rel, hostile.away.url_of(rel))
    (outcome,) = hostile.stage()
    assert outcome.status == "failed" and outcome.ami_id is None
    assert hostile.requests_away() == 0
    assert hostile.written == []
    assert hostile.recorder.sent == []


def test_a_huge_compose_stages_a_bounded_number_of_images_and_404s_fail_once(
    hostile: Hostile, caplog: pytest.LogCaptureFixture
) -> None:
    """5,000 entries, all answering 404: 20 taken (the compose's own 3 first), each
    404 asked once (retries are allowed, a 404 is not retried), the rest said once."""
    tree = hostile.tree
    hostile.home.replace("metadata/images.json", huge_images_json(tree.images_json.read_text()))
    with caplog.at_level(logging.ERROR, logger="fedimg.compose"):
        outcomes = hostile.stage(**{"fedimg.compose.max_images": 20})
    by_name = {o.image_name: o for o in outcomes}
    assert [by_name[i.image_name].status for i in tree.raw_images()] == ["staged"] * 3
    taken = [junk_name(n) for n in range(17)]
    assert all(by_name[name].status == "failed" for name in taken)
    summary = [o for o in outcomes if o.image_name == "images.json"]
    assert len(summary) == 1 and str(HUGE_COMPOSE_ENTRIES - 17) in summary[0].reason
    assert len(outcomes) == 3 + 17 + 1
    for name in taken:
        assert hostile.home.hits_of(f"Cloud/x86_64/images/{name}") == 1
    assert hostile.home.hits_of(f"Cloud/x86_64/images/{junk_name(17)}") == 0
    assert hostile.written.count("StartSnapshot") == 3
    assert len([r for r in caplog.records if r.name == "fedimg.compose"]) == 1
