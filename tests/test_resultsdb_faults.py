"""ResultsDB down for a while, during testing and during the gate, end to end.

Everything between the test run and the release is real except AWS (moto in
process) and the instance (the SSH stand-in): autocloud_ami's job reports
through the real ``resultsdb_api`` client and its spool, the ResultsDB
stand-in (``devel.resultsdb.ResultsDBServer``) stores the results and
"publishes" ``resultsdb.result.new`` for each (kept here, in order), and
fedimg's ``Promoter`` reads the stand-in through ``ResultsDBSource``. The
stand-in's fault switches take ResultsDB away (503 to everything), garble its
answers or fail a number of requests, at chosen moments.

What must hold: autocloud keeps every result and posts them later, in order
(the summary last); the gate never decides on missing information (it waits,
even past its deadline) and releases -- once -- when ResultsDB is back.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from moto import mock_aws
from resultsdb_api import ResultsDBapi

from autocloud_ami.job import test_ami as run_job
from autocloud_ami.report import SUMMARY_TESTCASE, ResultsReporter
from devel.resultsdb import ResultsDBServer
from fedimg import tags
from fedimg.aws import AwsClients
from fedimg.engine import Engine
from fedimg.messages import RESULT_NEW, Emitter, ResultNotice, StagedImage, parse_result_notice
from fedimg.promote import Promoter
from fedimg.results import ResultsDBSource
from tests.conftest import Recorder
from tests.engine_support import make_engine
from tests.test_instance import SESSION
from tests.test_job import TINY_SUITE, World, host
from tests.test_promote import (
    NOW,
    STAGING,
    TARGETS,
    FakeClock,
    acted,
    copies_in,
    describe,
    launch_public,
    make_cfg,
    stage_ami,
    state,
    validate_all,
)

PAST_DEADLINE = NOW + timedelta(hours=12)  # stage_ami stages 1 h before NOW; deadline 6 h


class Bus:
    """What the ResultsDB stand-in published, in order; ``on_publish`` runs inside the POST."""

    def __init__(self) -> None:
        self.notices: list[dict[str, Any]] = []
        self.on_publish: list[Any] = []

    def __call__(self, modname: str, topic: str, body: dict[str, Any]) -> None:
        assert (modname, topic) == (RESULT_NEW.modname, RESULT_NEW.name)
        RESULT_NEW.validate(body)
        self.notices.append(body)
        for hook in list(self.on_publish):
            hook(body)

    def parsed(self) -> list[ResultNotice]:
        return [parse_result_notice(RESULT_NEW, body) for body in self.notices]

    def testcases(self) -> list[str]:
        return [body["testcase"]["name"] for body in self.notices]


@dataclass
class Chain:
    """autocloud's job and reporter, the ResultsDB stand-in and fedimg's gate, on one moto."""

    world: World
    rdb: ResultsDBServer
    bus: Bus
    recorder: Recorder  # fedimg's messages
    now: list[datetime]

    def promoter(self) -> Engine:
        cfg = dataclasses.replace(make_cfg(), resultsdb_url=self.rdb.url)
        source = ResultsDBSource(self.rdb.url, max_retries=1, backoff_factor=0.0, timeout=5.0)
        aws = AwsClients(max_attempts=2, session=SESSION)
        actuator = Promoter(
            cfg, Emitter(self.recorder), aws, now=lambda: self.now[0], clock=FakeClock().clock()
        )
        return make_engine(
            cfg,
            Emitter(self.recorder),
            aws,
            Path(tempfile.mkdtemp(prefix="fedimg-rdb-faults-")),
            results=source,
            promoter=actuator,
            now=lambda: self.now[0],
        )

    def request(self, ami: str) -> StagedImage:
        """The test request fedimg's stage sends for a staged AMI (read from its tags)."""
        image = tags.staged_image(describe(ami), STAGING)
        assert image is not None
        return image

    def stored(self, ami: str) -> list[dict[str, Any]]:
        """What ResultsDB holds for ``ami``, in submission order (asked with faults off)."""
        found = ResultsDBapi(self.rdb.url).get_results(item=ami, type="ami", limit=100)["data"]
        return sorted(found, key=lambda r: r["id"])

    def releases(self) -> list[dict[str, Any]]:
        return self.recorder.bodies("fedimg.image.release")


@pytest.fixture
def chain(tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> Iterator[Chain]:
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    bus = Bus()
    with mock_aws(), ResultsDBServer(publisher=bus) as rdb:
        yield Chain(World(tmp_path, rdb, Recorder()), rdb, bus, recorder, [NOW])


def assert_released_once(chain: Chain, ami: str) -> None:
    assert state(ami) == "released"
    for region in TARGETS:
        (copy,) = copies_in(region, ami)
        assert launch_public(copy["ImageId"], region)
    assert launch_public(ami, STAGING)
    (release,) = chain.releases()
    assert set(release["regions"]) == {*TARGETS, STAGING}
    validate_all(chain.recorder)


def assert_untouched(chain: Chain, ami: str) -> None:
    """No decision was taken: still testing, nothing copied, nothing public, nothing said."""
    assert state(ami) == "testing"
    for region in TARGETS:
        assert copies_in(region, ami) == []
    assert not launch_public(ami, STAGING)
    assert chain.recorder.sent == []


# -- ResultsDB down while the test runs and reports -----------------------------------------


def test_results_of_a_run_during_an_outage_are_kept_posted_in_order_and_gated_once(
    chain: Chain,
) -> None:
    ami = stage_ami()
    promoter = chain.promoter()
    chain.rdb.set_down(True)
    with host(chain.world) as ssh:
        deps = chain.world.deps(chain.world.cfg(ssh.port), suite=TINY_SUITE)
        result = run_job(chain.request(ami), deps)
    reporter = deps.reporter
    assert isinstance(reporter, ResultsReporter)
    assert result.passed and result.delivery is not None
    assert (result.delivery.posted, result.delivery.spooled) == (0, 3)
    assert [r.testcase for r in result.results][-1] == SUMMARY_TESTCASE
    assert chain.world.recorder.topics()[-1] == "autocloud.ami.success"  # the run itself is done

    # The gate looks while ResultsDB is down: it waits.
    assert dict(promoter.reconcile(stage=False).pairs())[ami].startswith(
        "wait: ResultsDB unavailable"
    )
    assert_untouched(chain, ami)

    # ResultsDB comes back, and goes down again right after the first result is stored.
    chain.rdb.set_down(False)
    chain.bus.on_publish.append(lambda body: chain.rdb.set_down(True))
    first = reporter.flush()
    assert (first.posted, first.pending) == (1, 2)
    chain.bus.on_publish.clear()
    # The gate acts on the message of that first result: ResultsDB is down again, it waits.
    (notice,) = chain.bus.parsed()
    assert notice.testcase != SUMMARY_TESTCASE
    decision = promoter.on_result(notice)
    assert decision is not None and decision.action == "wait"
    # Back, with one per-test result and no summary yet: still nothing to decide on.
    chain.rdb.set_down(False)
    assert dict(promoter.reconcile(stage=False).pairs())[ami].startswith(
        "wait: waiting for autocloud.ami.all"
    )
    assert_untouched(chain, ami)

    # The next flush (the sweep producer's) posts the rest, in order, summary last; the
    # gate acts on each message as it is published, as the hub's listener would.
    decisions: list[Any] = []
    chain.bus.on_publish.append(
        lambda body: decisions.append(promoter.on_result(parse_result_notice(RESULT_NEW, body)))
    )
    rest = reporter.flush()
    chain.bus.on_publish.clear()
    assert (rest.posted, rest.pending) == (2, 0)
    assert [d.action if d is not None and acted(d) else None for d in decisions] == [
        "wait",
        "release",
    ]
    assert_released_once(chain, ami)

    stored = chain.stored(ami)
    assert [r["testcase"]["name"] for r in stored] == [r.testcase for r in result.results]
    assert [r["outcome"] for r in stored] == [r.outcome for r in result.results]
    assert {r["data"]["job_id"][0] for r in stored} == {result.job_id}
    assert chain.bus.testcases() == [r.testcase for r in result.results]  # one message each
    assert reporter.spool.pending() == [] and reporter.spool.rejected() == []

    # Late and replayed messages, and the next reconcile pass, change nothing.
    for n in chain.bus.parsed():
        assert not acted(promoter.on_result(n))
    assert ami not in dict(promoter.reconcile(stage=False).pairs())
    assert len(chain.releases()) == 1


def test_a_failing_run_reported_during_an_outage_is_rejected_never_released(
    chain: Chain,
) -> None:
    ami = stage_ami()
    promoter = chain.promoter()
    chain.rdb.set_down(True)
    with host(chain.world, selinux_permissive=True) as ssh:
        deps = chain.world.deps(chain.world.cfg(ssh.port), suite=TINY_SUITE)
        result = run_job(chain.request(ami), deps)
    assert not result.passed and result.delivery is not None and result.delivery.spooled == 3
    assert dict(promoter.reconcile(stage=False).pairs())[ami].startswith("wait")
    chain.now[0] = PAST_DEADLINE  # even past the deadline: no decision without ResultsDB
    assert dict(promoter.reconcile(stage=False).pairs())[ami].startswith(
        "wait: ResultsDB unavailable"
    )
    assert_untouched(chain, ami)

    chain.rdb.set_down(False)
    assert deps.reporter.flush().pending == 0  # type: ignore[attr-defined]
    assert [r["outcome"] for r in chain.stored(ami)][-1] == "FAILED"
    decisions = [promoter.on_result(n) for n in chain.bus.parsed()]
    assert [d.action for d in decisions if d is not None and acted(d)][-1] == "reject"
    assert state(ami) == "rejected"
    for region in TARGETS:
        assert copies_in(region, ami) == []
    assert not launch_public(ami, STAGING)
    assert chain.releases() == [] and chain.recorder.bodies("fedimg.image.publish") == []
    (verdict,) = chain.recorder.bodies("fedimg.image.test")
    assert verdict["status"] == "failed" and "selinux" in verdict["reason"]


# -- ResultsDB down (or broken) while the gate reads it ---------------------------------------


def post(chain: Chain, ami: str, outcome: str) -> ResultNotice:
    """A summary result in ResultsDB, and the notice its message carries."""
    ResultsDBapi(chain.rdb.url).create_result(
        outcome=outcome, testcase=SUMMARY_TESTCASE, item=ami, type="ami", note=outcome.lower()
    )
    return chain.bus.parsed()[-1]


@pytest.mark.parametrize(
    "outage",
    ["down", "garbled", "server-errors"],
)
def test_the_gate_waits_through_a_resultsdb_outage_even_past_its_deadline(
    chain: Chain, outage: str
) -> None:
    good, bad = stage_ami(), stage_ami()
    good_notice, bad_notice = post(chain, good, "PASSED"), post(chain, bad, "FAILED")
    promoter = chain.promoter()
    chain.now[0] = PAST_DEADLINE

    def break_resultsdb() -> None:
        if outage == "down":
            chain.rdb.set_down(True)
        elif outage == "garbled":
            chain.rdb.garble_next(100)
        else:
            chain.rdb.fail_next(100, status=502)

    break_resultsdb()
    asked = chain.rdb.request_count("GET")
    for notice in (good_notice, bad_notice, good_notice):
        decision = promoter.on_result(notice)
        assert decision is not None and decision.action == "wait", decision
        assert decision.detail.startswith("ResultsDB unavailable")
    outcomes = dict(promoter.reconcile(stage=False).pairs())
    assert set(outcomes) == {good, bad}
    assert all(o.startswith("wait: ResultsDB unavailable") for o in outcomes.values()), outcomes
    assert chain.rdb.request_count("GET") >= asked + 5  # it did ask, every time
    assert_untouched(chain, good)
    assert_untouched(chain, bad)

    chain.rdb.faults.clear()  # ResultsDB is back: the next pass decides both
    outcomes = dict(promoter.reconcile(stage=False).pairs())
    assert outcomes[good].startswith("release") and outcomes[bad].startswith("reject")
    assert_released_once(chain, good)
    assert state(bad) == "rejected"
    for region in TARGETS:
        assert copies_in(region, bad) == []
    assert not launch_public(bad, STAGING)
    # Once decided, the notices and further passes change nothing.
    assert not acted(promoter.on_result(good_notice)) and not acted(promoter.on_result(bad_notice))
    promoter.reconcile(stage=False)
    assert len(chain.releases()) == 1
