"""The fedora-messaging callbacks: settings at start-up, ack / Nack / Drop, the periodic jobs.

``fedimg.amqp.FedimgConsumer`` and ``autocloud_ami.amqp.AmiTestConsumer`` are
called as ``fedora-messaging consume`` calls them (one ``Message`` at a time;
returning acks, ``Nack`` requeues, ``Drop`` discards) with fakes behind the
engine and the test job, a Recorder as the publisher and a sleep that only
records. The real engine is used where the point is what is on disk when the
callback returns. The processes over a real RabbitMQ: test_amqp_integration.py.
"""

from __future__ import annotations

import re
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from fedora_messaging.exceptions import Drop, HaltConsumer, Nack
from fedora_messaging.message import Message

from autocloud_ami.amqp import AmiTestConsumer
from fedimg.amqp import FedimgConsumer
from fedimg.engine import Outcome
from fedimg.fmcallback import Backoff, Periodic
from fedimg.intents import IntentError, IntentStore
from fedimg.settings import ConfigError
from tests.conftest import Recorder

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "org.fedoraproject.dev"
AMI = "ami-0123456789abcdef0"
COMPOSE = {
    "status": "FINISHED",
    "compose_id": "Fedora-40-20240501.0",
    "location": "http://127.0.0.1:9/compose/Fedora-40-20240501.0/compose",
    "release_version": "40",
}
RESULT = {
    "id": 7,
    "testcase": {"name": "autocloud.ami.all"},
    "outcome": "PASSED",
    "data": {"item": [AMI], "type": ["ami"]},
}
TEST_REQUEST = {
    "image_name": "Fedora-Cloud-Base-40-20240501.0.x86_64.raw.xz",
    "image_url": "https://kojipkgs.fedoraproject.org/x.raw.xz",
    "destination": "us-east-1",
    "service": "EC2",
    "status": "started",
    "compose": "Fedora-40-20240501.0",
    "architecture": "x86_64",
    "extra": {"id": AMI, "virt_type": "hvm", "vol_type": "gp3"},
}


def sample_settings(name: str) -> dict[str, Any]:
    with (ROOT / "fedora-messaging" / name).open("rb") as fh:
        return dict(tomllib.load(fh)["consumer_config"])


def msg(topic: str, body: Any) -> Message:
    return Message(topic=f"{PREFIX}.{topic}", body=body)


class Sleeps:
    """The sleep before a Nack: recorded, never slept."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@dataclass
class FakeEngine:
    """What FedimgConsumer asks of the engine, recorded; ``outcome``/``raises``: its answer."""

    outcome: Outcome | None = None
    raises: BaseException | None = None
    accepted: list[tuple[Any, bool]] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)
    passes: list[bool] = field(default_factory=list)
    block: threading.Event | None = None
    decide: Outcome | None = None
    closed: bool = False

    def accept_compose(self, status: Any, *, wait: bool = True) -> list[Any]:
        if self.raises is not None:
            raise self.raises
        self.accepted.append((status, wait))
        return []

    def on_result(self, notice: Any, *, decided: Any = None) -> Outcome | None:
        self.results.append(notice)
        if self.decide is not None:
            decided(self.decide)  # a release decided; the copies follow
        if self.block is not None:
            assert self.block.wait(30)
        if self.raises is not None:
            raise self.raises
        return self.outcome

    def reconcile(self, *, stage: bool = True) -> Any:
        self.passes.append(stage)

    def close(self) -> None:
        self.closed = True


def fedimg_consumer(
    tmp_path: Path,
    engine: FakeEngine | None = None,
    recorder: Recorder | None = None,
    **settings: Any,
) -> tuple[FedimgConsumer, Sleeps]:
    config = {
        **sample_settings("fedimg.toml"),
        "fedimg.state_dir": str(tmp_path / "state"),
        **settings,
    }
    sleeps = Sleeps()
    consumer = FedimgConsumer(
        {"topic_prefix": PREFIX, "consumer_config": config},
        publisher=recorder or Recorder(),
        engine=engine or FakeEngine(),  # type: ignore[arg-type]
        start=lambda run: None,  # the reconcile thread is tested on its own below
        sleep=sleeps,
    )
    return consumer, sleeps


# -- settings, read once at start-up -------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"fedimg.stage.enabeld": True}, "fedimg.stage.enabeld"),
        ({"fedimg.aws.regions": "eu-west-1"}, "fedimg.aws.regions"),
        ({"autocloud_ami.enabled": True}, "autocloud_ami.enabled"),
        (
            {"fedimg.stage.enabled": False, "fedimg.promote.enabled": False}
            | {"fedimg.health.enabled": False},
            "fedimg.stage.enabled",
        ),
    ],
)
def test_a_bad_fedimg_consumer_config_stops_it_naming_the_key(
    tmp_path: Path, change: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        fedimg_consumer(tmp_path, **change)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"autocloud_ami.ssh_cidr": "0.0.0.0/0"}, "autocloud_ami.ssh_cidr"),
        ({"autocloud_ami.enabled": False}, "autocloud_ami.enabled"),
        ({"fedimg.stage.enabled": True}, "fedimg.stage.enabled"),
    ],
)
def test_a_bad_autocloud_consumer_config_stops_it_naming_the_key(
    change: dict[str, Any], key: str
) -> None:
    config = {**sample_settings("autocloud_ami.toml"), **change}
    with pytest.raises(ConfigError, match=re.escape(key)):
        AmiTestConsumer(
            {"topic_prefix": PREFIX, "consumer_config": config},
            publisher=Recorder(),
            deps=object(),
            start=lambda run: None,
        )


def test_settings_come_from_fedora_messaging_s_own_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedora_messaging import config

    settings = {**sample_settings("fedimg.toml"), "fedimg.state_dir": str(tmp_path / "s")}
    monkeypatch.setitem(config.conf, "consumer_config", settings)
    monkeypatch.setitem(config.conf, "topic_prefix", "org.fedoraproject.stg")
    consumer = FedimgConsumer(publisher=Recorder(), engine=FakeEngine(), start=lambda run: None)  # type: ignore[arg-type]
    assert consumer.cfg.state_dir == str(tmp_path / "s")
    assert consumer.prefix == "org.fedoraproject.stg"


# -- what is dropped ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        msg("fedimg.image.upload", {"status": "completed"}),  # not a topic fedimg handles
        Message(topic=f"org.fedoraproject.prod.{'pungi.compose.status.change'}", body=COMPOSE),
        msg("pungi.compose.status.change", {"compose_id": "x"}),  # malformed
        msg("pungi.compose.status.change", {**COMPOSE, "location": "file:///etc/passwd"}),
        msg("resultsdb.result.new", {**RESULT, "data": {"item": AMI}}),  # not a list of strings
        msg("fedimg.hub.ping", {"token": 3}),
        msg("pungi.compose.status.change", [COMPOSE]),
    ],
)
def test_unknown_topics_other_environments_and_malformed_bodies_are_dropped(
    tmp_path: Path, message: Message
) -> None:
    engine = FakeEngine()
    recorder = Recorder()
    consumer, sleeps = fedimg_consumer(tmp_path, engine, recorder)
    with pytest.raises(Drop):
        consumer(message)
    assert engine.accepted == engine.results == []
    assert recorder.sent == [] and sleeps.delays == []


def test_a_bug_in_a_handler_drops_the_message_instead_of_stopping_the_consumer(
    tmp_path: Path,
) -> None:
    engine = FakeEngine(raises=KeyError("bug"))
    consumer, sleeps = fedimg_consumer(tmp_path, engine)
    with pytest.raises(Drop):
        consumer(msg("resultsdb.result.new", RESULT))
    assert sleeps.delays == []


# -- composes: acked once the intent is recorded ---------------------------------------------------


def test_a_compose_is_handed_to_the_engine_without_waiting_for_the_stage(tmp_path: Path) -> None:
    engine = FakeEngine()
    consumer, _ = fedimg_consumer(tmp_path, engine)
    consumer(msg("pungi.compose.status.change", COMPOSE))  # returns: acked
    [(status, wait)] = engine.accepted
    assert (status.compose_id, wait) == (COMPOSE["compose_id"], False)


def test_with_the_real_engine_the_intent_is_on_disk_when_the_callback_returns(
    tmp_path: Path,
) -> None:
    from fedimg.config import FedimgConfig
    from fedimg.engine import Engine
    from fedimg.messages import Emitter

    settings = {
        **sample_settings("fedimg.toml"),
        "fedimg.state_dir": str(tmp_path / "state"),
        "fedimg.http.retries": 0,
        "fedimg.http.timeout": 5.0,
    }
    recorder = Recorder()
    engine = Engine.from_config(FedimgConfig.from_consumer_config(settings), Emitter(recorder))
    consumer = FedimgConsumer(
        {"topic_prefix": PREFIX, "consumer_config": settings},
        publisher=recorder,
        engine=engine,
        start=lambda run: None,
    )
    try:
        # Nothing listens at the location: the metadata read fails, the intent stays.
        consumer(msg("pungi.compose.status.change", COMPOSE))
        intent = IntentStore(tmp_path / "state").get(str(COMPOSE["compose_id"]))
        assert intent is not None and intent.location == COMPOSE["location"]
        assert intent.read_attempts == 1  # left to the reconcile pass
    finally:
        consumer.close()


def test_an_intent_that_cannot_be_written_is_retried_then_stops_the_process(
    tmp_path: Path,
) -> None:
    engine = FakeEngine(raises=IntentError("disk full"))
    consumer, sleeps = fedimg_consumer(tmp_path, engine)
    message = msg("pungi.compose.status.change", COMPOSE)
    for _ in range(consumer.backoff.tries - 1):
        with pytest.raises(Nack):
            consumer(message)
    with pytest.raises(HaltConsumer) as halted:
        consumer(message)
    assert halted.value.requeue is True and halted.value.exit_code == 1
    assert sleeps.delays == [1.0, 2.0, 4.0, 8.0, 15.0]


# -- results -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome(AMI, "release", "every required test passed"),
        Outcome(AMI, "reject", "autocloud.ami.all FAILED"),
        Outcome(AMI, "wait", "waiting for autocloud.ami.all"),
        Outcome(AMI, "ignored", "state is released"),
        Outcome(AMI, "busy", "another worker is on it; it will look again"),
        None,  # not an AMI result
    ],
)
def test_a_decided_or_waiting_result_is_acked(tmp_path: Path, outcome: Outcome | None) -> None:
    engine = FakeEngine(outcome=outcome)
    consumer, sleeps = fedimg_consumer(tmp_path, engine)
    consumer(msg("resultsdb.result.new", RESULT))
    assert [n.item for n in engine.results] == [AMI]
    assert sleeps.delays == []


@pytest.mark.parametrize(
    ("outcome", "raises"),
    [
        (Outcome(AMI, "wait", "ResultsDB unavailable: 503", transient=True), None),
        (None, ClientError({"Error": {"Code": "RequestLimitExceeded"}}, "DescribeImages")),
    ],
)
def test_a_transient_result_is_nacked_with_a_growing_bounded_delay_then_acked(
    tmp_path: Path, outcome: Outcome | None, raises: BaseException | None
) -> None:
    engine = FakeEngine(outcome=outcome, raises=raises)
    consumer, sleeps = fedimg_consumer(tmp_path, engine)
    message = msg("resultsdb.result.new", RESULT)
    for _ in range(consumer.backoff.tries - 1):
        with pytest.raises(Nack):
            consumer(message)
    consumer(message)  # retries used up: acked, the reconcile pass looks again
    assert sleeps.delays == [1.0, 2.0, 4.0, 8.0, 15.0]
    # The next message starts again from the first delay.
    with pytest.raises(Nack):
        consumer(msg("resultsdb.result.new", RESULT))
    assert sleeps.delays[-1] == 1.0


def test_the_taskotron_topic_reaches_the_engine_too(tmp_path: Path) -> None:
    engine = FakeEngine(outcome=Outcome(AMI, "wait", "waiting"))
    consumer, _ = fedimg_consumer(tmp_path, engine)
    body = {
        "task": {"item": AMI, "type": "ami", "name": "autocloud.ami.all"},
        "result": {"id": 3, "outcome": "PASSED"},
    }
    consumer(msg("taskotron.result.new", body))
    assert [(n.item, n.testcase) for n in engine.results] == [(AMI, "autocloud.ami.all")]


def test_a_waiver_reaches_the_engine_and_a_transient_wait_is_retried(tmp_path: Path) -> None:
    engine = FakeEngine(outcome=Outcome(AMI, "wait", "WaiverDB down", transient=True))
    consumer, sleeps = fedimg_consumer(tmp_path, engine)
    waiver = {
        "id": 9,
        "subject_type": "ami",
        "subject_identifier": AMI,
        "testcase": "autocloud.ami.all",
        "scenario": None,
        "waived": True,
        "username": "alice",
        "comment": "known",
        "product_version": "fedora-41",
        "timestamp": "2026-11-27T18:00:00",
        "proxied_by": None,
    }
    with pytest.raises(Nack):
        consumer(msg("waiverdb.waiver.new", waiver))
    assert [(n.item, n.item_type, n.outcome) for n in engine.results] == [(AMI, "ami", "WAIVED")]
    assert sleeps.delays  # held before the Nack, never a tight loop
    engine.outcome = Outcome(AMI, "release", "waived")
    consumer(msg("waiverdb.waiver.new", waiver))  # acked
    assert len(engine.results) == 2


def test_a_decided_release_is_acked_while_its_promotion_goes_on(tmp_path: Path) -> None:
    block = threading.Event()
    decided = Outcome(AMI, "release", "every required test passed")
    engine = FakeEngine(outcome=Outcome(AMI, "released"), block=block, decide=decided)
    consumer, sleeps = fedimg_consumer(tmp_path, engine)
    assert consumer.ack_after == 600.0
    consumer(msg("resultsdb.result.new", RESULT))  # returned (acked) though still promoting
    assert len(engine.results) == 1 and sleeps.delays == []
    block.set()
    consumer.close()


def test_a_long_convergence_is_acked_after_ack_after_and_goes_on(tmp_path: Path) -> None:
    block = threading.Event()
    engine = FakeEngine(outcome=Outcome(AMI, "release"), block=block)
    consumer, _ = fedimg_consumer(tmp_path, engine)
    consumer.ack_after = 0.05
    consumer(msg("resultsdb.result.new", RESULT))  # returned: acked while still promoting
    assert len(engine.results) == 1
    block.set()
    consumer.close()


def test_disabled_parts_ignore_their_messages(tmp_path: Path) -> None:
    engine = FakeEngine()
    recorder = Recorder()
    consumer, _ = fedimg_consumer(
        tmp_path,
        engine,
        recorder,
        **{"fedimg.stage.enabled": False, "fedimg.health.enabled": False},
    )
    consumer(msg("pungi.compose.status.change", COMPOSE))
    consumer(msg("fedimg.hub.ping", {"token": "t"}))
    assert engine.accepted == [] and recorder.sent == []


# -- health ----------------------------------------------------------------------------------------


def test_a_ping_is_answered_with_what_runs_here(tmp_path: Path) -> None:
    recorder = Recorder()
    consumer, _ = fedimg_consumer(tmp_path, FakeEngine(), recorder)
    consumer(msg("fedimg.hub.ping", {"token": "t1"}))
    [pong] = recorder.bodies("fedimg.hub.pong")
    assert pong["token"] == "t1"
    assert pong["healthy"] is False  # the reconcile thread was never started (start is a no-op)
    assert pong["components"]["fedimg_reconcile"].startswith("not running")
    assert pong["components"]["fedimg_stage"] == "running"


# -- the reconcile pass in the consumer process ------------------------------------------------


def test_the_reconcile_pass_runs_once_the_consumer_runs_then_every_interval(
    tmp_path: Path,
) -> None:
    engine = FakeEngine()
    started: list[Any] = []
    consumer = FedimgConsumer(
        {
            "topic_prefix": PREFIX,
            "consumer_config": {
                **sample_settings("fedimg.toml"),
                "fedimg.state_dir": str(tmp_path),
                "fedimg.reconcile.interval": 0.01,
            },
        },
        publisher=Recorder(),
        engine=engine,  # type: ignore[arg-type]
        start=started.append,
    )
    try:
        assert consumer.reconcile is not None
        assert engine.passes == []  # nothing before the reactor runs
        [start] = started
        start()
        assert consumer.reconcile.wait_runs(3, timeout=30)
        assert set(engine.passes) == {True}  # stage enabled: intents are finished too
    finally:
        consumer.close()
    assert engine.closed


def test_without_promote_there_is_no_reconcile_thread(tmp_path: Path) -> None:
    disabled: dict[str, Any] = {"fedimg.promote.enabled": False}
    consumer, _ = fedimg_consumer(tmp_path, FakeEngine(), **disabled)
    assert consumer.reconcile is None


def test_a_periodic_job_that_raises_keeps_running() -> None:
    calls: list[int] = []

    def job() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first pass fails")

    timer = Periodic("test", job, 0.01)
    timer.start()
    try:
        assert timer.wait_runs(3, timeout=30)
    finally:
        timer.stop()
    assert not timer.alive


def test_backoff_doubles_up_to_its_cap_then_gives_up_and_forgets() -> None:
    backoff = Backoff(first=1.0, cap=5.0, tries=5, remember=2)
    assert [backoff.next_delay("a") for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, None]
    assert backoff.next_delay("a") == 1.0  # forgotten after giving up
    backoff.next_delay("b")
    backoff.next_delay("c")  # "a" is the oldest of three: forgotten
    assert backoff.next_delay("a") == 1.0


# -- autocloud_ami ------------------------------------------------------------------------------


@dataclass
class FakeJob:
    """autocloud_ami.job.test_ami, recorded; returns ``result`` or raises ``raises``."""

    result: Any = None
    raises: BaseException | None = None
    calls: list[Any] = field(default_factory=list)

    def __call__(self, image: Any, deps: Any) -> Any:
        self.calls.append(image)
        if self.raises is not None:
            raise self.raises
        return self.result


class FakeResultsApi:
    """``ResultsDBapi.get_results``: a summary for the AMIs in ``summaries``, or an error."""

    def __init__(self, summaries: tuple[str, ...] = (), error: Exception | None = None) -> None:
        self.summaries = summaries
        self.error = error
        self.asked: list[dict[str, Any]] = []

    def get_results(self, **query: Any) -> dict[str, Any]:
        self.asked.append(query)
        if self.error is not None:
            raise self.error
        return {"data": [{"id": 1}] if query["item"] in self.summaries else []}


def autocloud_consumer(
    monkeypatch: pytest.MonkeyPatch,
    job: FakeJob,
    api: FakeResultsApi | None = None,
    spool: Path | None = None,
) -> AmiTestConsumer:
    import autocloud_ami.job

    monkeypatch.setattr(autocloud_ami.job, "test_ami", job)
    settings = sample_settings("autocloud_ami.toml")
    if spool is not None:
        settings["autocloud_ami.resultsdb_spool"] = str(spool)
    consumer = AmiTestConsumer(
        {"topic_prefix": PREFIX, "consumer_config": settings},
        publisher=Recorder(),
        deps=object(),
        start=lambda run: None,
        sleep=Sleeps(),
    )
    consumer.reporter.api = api or FakeResultsApi()
    return consumer


def test_a_test_request_runs_the_job_and_is_acked_once_results_are_delivered(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from autocloud_ami.report import Delivery

    job = FakeJob(
        result=type("R", (), {"delivery": Delivery(posted=3), "passed": True, "job_id": "j"})
    )
    consumer = autocloud_consumer(monkeypatch, job, spool=tmp_path)
    consumer(msg("fedimg.image.test", TEST_REQUEST))
    assert [i.ami_id for i in job.calls] == [AMI]


def test_results_that_cannot_be_kept_stop_the_runner_and_requeue_the_request(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    job = FakeJob(result=type("R", (), {"delivery": None, "passed": False, "job_id": "j"}))
    consumer = autocloud_consumer(monkeypatch, job, spool=tmp_path)
    with pytest.raises(HaltConsumer) as halted:
        consumer(msg("fedimg.image.test", TEST_REQUEST))
    assert halted.value.requeue is True


@pytest.mark.parametrize(
    "body",
    [
        {**TEST_REQUEST, "status": "completed"},  # a verdict: acked, no test
        {**TEST_REQUEST, "status": "failed", "reason": "rejected"},
    ],
)
def test_a_verdict_on_the_test_topic_is_acked_without_a_test(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, body: dict[str, Any]
) -> None:
    job = FakeJob()
    consumer = autocloud_consumer(monkeypatch, job, spool=tmp_path)
    consumer(msg("fedimg.image.test", body))
    assert job.calls == []


def test_a_refused_or_malformed_request_is_dropped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from autocloud_ami.job import InvalidRequest

    job = FakeJob(raises=InvalidRequest("region eu-west-9 is not tested here"))
    consumer = autocloud_consumer(monkeypatch, job, spool=tmp_path)
    with pytest.raises(Drop):
        consumer(msg("fedimg.image.test", TEST_REQUEST))
    no_ami = {**TEST_REQUEST, "extra": {"virt_type": "hvm", "vol_type": "gp3"}}
    with pytest.raises(Drop):
        consumer(msg("fedimg.image.test", no_ami))
    with pytest.raises(Drop):
        consumer(msg("fedimg.image.upload", TEST_REQUEST))  # not its topic
    assert len(job.calls) == 1


def test_no_free_slot_is_retried(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from autocloud_ami.job import QueueTimeout

    consumer = autocloud_consumer(
        monkeypatch, FakeJob(raises=QueueTimeout("no slot")), spool=tmp_path
    )
    with pytest.raises(Nack):
        consumer(msg("fedimg.image.test", TEST_REQUEST))


def test_a_request_for_an_ami_whose_summary_is_posted_is_acked_without_a_test(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    job = FakeJob()
    api = FakeResultsApi(summaries=(AMI,))
    consumer = autocloud_consumer(monkeypatch, job, api, spool=tmp_path)
    consumer(msg("fedimg.image.test", TEST_REQUEST))  # a redelivery after the job finished
    assert job.calls == []
    assert api.asked == [{"item": AMI, "type": "ami", "testcases": "autocloud.ami.all", "limit": 1}]


def test_when_resultsdb_cannot_be_asked_the_ami_is_tested(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import requests

    from autocloud_ami.report import Delivery

    job = FakeJob(
        result=type("R", (), {"delivery": Delivery(spooled=3), "passed": True, "job_id": "j"})
    )
    api = FakeResultsApi(error=requests.ConnectionError("refused"))
    consumer = autocloud_consumer(monkeypatch, job, api, spool=tmp_path)
    consumer(msg("fedimg.image.test", TEST_REQUEST))
    assert [i.ami_id for i in job.calls] == [AMI]


def test_an_ami_tested_by_another_run_on_this_host_is_retried_not_tested_twice(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from fedimg.locks import Guard

    job = FakeJob()
    consumer = autocloud_consumer(monkeypatch, job, spool=tmp_path)
    with Guard(tmp_path).hold(f"ami-{AMI}") as got:  # another process's run, as flock sees it
        assert got
        with pytest.raises(Nack):
            consumer(msg("fedimg.image.test", TEST_REQUEST))
    assert job.calls == []


def test_the_engine_says_a_release_is_decided_before_any_copy(tmp_path: Path) -> None:
    import boto3
    from moto import mock_aws

    from fedimg.aws import AwsClients
    from fedimg.config import FedimgConfig
    from fedimg.messages import RESULT_NEW, Emitter, parse_result_notice
    from fedimg.results import DummyResults
    from tests.e2e_support import ami_in_testing
    from tests.engine_support import make_engine

    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        ami = ami_in_testing(ec2, 3)
        results = DummyResults()
        results.add(ami, "autocloud.ami.all", "PASSED")
        cfg = FedimgConfig(
            resultsdb_url="http://127.0.0.1:9/api/v2.0",
            promote_enabled=True,
            regions=["eu-west-1"],
            state_dir=str(tmp_path),
        )
        recorder = Recorder()
        engine = make_engine(cfg, Emitter(recorder), AwsClients(), tmp_path, results=results)
        seen: list[tuple[str, list[str]]] = []
        notice = parse_result_notice(
            RESULT_NEW, {**RESULT, "data": {"item": [ami], "type": ["ami"]}}
        )
        try:
            outcome = engine.on_result(
                notice, decided=lambda o: seen.append((o.action, recorder.topics()))
            )
        finally:
            engine.close()
    assert outcome is not None and outcome.action == "release"
    assert seen == [("release", [])]  # decided before anything was copied or announced
    assert "fedimg.image.copy" in recorder.topics()
