"""Waivers: WaiverDB's v1.0 API (the stand-in over loopback) and what the engine does with them.

The reader and writer (``fedimg.waivers.WaiverDBSource``) run against
``devel.waiverdb`` on a free loopback port; the engine against moto in
process with ``DummyResults`` and ``DummyWaivers`` (the fakes at the seams),
asserting on what it SENDS (tags, messages) as well as on moto's state.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from moto import mock_aws

from devel.waiverdb import WaiverDBServer
from fedimg import tags
from fedimg.engine import Engine, cli_explain, cli_retest, cli_waive
from fedimg.http import make_session
from fedimg.messages import WAIVER_NEW, Emitter, InvalidMessage, parse_result_notice
from fedimg.promote import Promoter
from fedimg.results import DummyResults
from fedimg.status import cli_status
from fedimg.waivers import (
    DummyWaivers,
    WaiverDBSource,
    WaiverRefused,
    WaiversUnavailable,
    new_waiver_body,
    parse_waiver,
)
from tests.engine_support import make_engine
from tests.test_promote import (
    TESTCASE,
    FakeClock,
    RecordingAws,
    describe,
    make_cfg,
    stage_ami,
    state,
    validate_all,
)

AMI = "ami-0123456789abcdef0"
OTHER = "ami-0fedcba9876543210"
NITRO = "x86_64:t3.small"
STAGING_REGION = "us-east-1"


@pytest.fixture
def wdb(recorder: Any) -> Iterator[WaiverDBServer]:
    with WaiverDBServer(publisher=recorder) as server:
        yield server


def source(wdb: WaiverDBServer) -> WaiverDBSource:
    return WaiverDBSource(wdb.url, make_session(retries=1, timeout=10, backoff=0.01))


def post(wdb: WaiverDBServer, body: Any, user: str | None = "alice") -> requests.Response:
    return requests.post(
        f"{wdb.url}/waivers/", json=body, auth=(user, "") if user else None, timeout=10
    )


# -- the stand-in keeps WaiverDB's documented behaviour -----------------------------------


def test_a_posted_waiver_is_listed_announced_and_read_back(wdb: WaiverDBServer, recorder) -> None:
    created = source(wdb).create(new_waiver_body(AMI, TESTCASE, NITRO, "flaky", "41"), ("bob", ""))
    assert (created.username, created.scenario, created.waived) == ("bob", NITRO, True)
    assert created.product_version == "fedora-41"
    (found,) = source(wdb).waivers(AMI)
    assert found == created
    assert source(wdb).waivers(OTHER) == []
    ((modname, topic, body),) = recorder.sent
    assert f"{modname}.{topic}" == "waiverdb.waiver.new"
    notice = parse_result_notice(WAIVER_NEW, body)
    assert (notice.item, notice.item_type, notice.outcome) == (AMI, "ami", "WAIVED")


def test_newer_waivers_make_older_ones_obsolete_and_pages_are_followed(wdb) -> None:
    for n in range(3):
        assert post(wdb, new_waiver_body(AMI, TESTCASE, None, f"try {n}", "41")).status_code == 201
    for n in range(25):
        body = new_waiver_body(AMI, f"autocloud.ami.t{n}", None, "ok", "41")
        assert post(wdb, body).status_code == 201
    found = source(wdb).waivers(AMI)  # limit 100 per page: one page
    assert len(found) == 26
    assert [w.comment for w in found if w.testcase == TESTCASE] == ["try 2"]
    every = requests.get(
        f"{wdb.url}/waivers/",
        params={"subject_identifier": AMI, "include_obsolete": "true", "limit": "10"},
        timeout=10,
    ).json()
    assert len(every["data"]) == 10 and every["next"] and every["prev"] is None
    reader = source(wdb)
    from fedimg import waivers as module

    old = module.PAGE_SIZE
    module.PAGE_SIZE = 7  # several pages through ``next``
    try:
        assert len(reader.waivers(AMI)) == 26
    finally:
        module.PAGE_SIZE = old
    assert wdb.request_count("GET", "/waivers/") >= 5


@pytest.mark.parametrize(
    ("body", "user", "status"),
    [
        ({"testcase": TESTCASE, "product_version": "f", "comment": "c"}, "a", 400),  # no subject
        (
            {
                "subject_type": "ami",
                "subject_identifier": AMI,
                "product_version": "f",
                "comment": "c",
            },
            "a",
            400,
        ),  # no testcase
        (
            {
                "subject_type": "ami",
                "subject_identifier": AMI,
                "testcase": TESTCASE,
                "comment": "c",
            },
            "a",
            400,
        ),  # no product_version
        (
            {
                "subject_type": "ami",
                "subject_identifier": AMI,
                "testcase": TESTCASE,
                "product_version": "f",
                "comment": "",
            },
            "a",
            400,
        ),  # empty comment
        ({"result_id": 7, "product_version": "f", "comment": "c"}, "a", 400),
        (new_waiver_body(AMI, TESTCASE, None, "c", "41"), None, 401),
        ({**new_waiver_body(AMI, TESTCASE, None, "c", "41"), "username": "eve"}, "a", 403),
        ("not an object", "a", 400),
    ],
)
def test_the_stand_in_refuses_what_waiverdb_refuses(wdb, recorder, body, user, status) -> None:
    assert post(wdb, body, user).status_code == status
    assert recorder.sent == [] and source(wdb).waivers(AMI) == []


def test_fedimg_refuses_waivers_without_a_comment_or_for_non_amis() -> None:
    with pytest.raises(WaiverRefused, match="comment"):
        new_waiver_body(AMI, TESTCASE, None, "   ", "41")
    with pytest.raises(WaiverRefused, match="AMI id"):
        new_waiver_body("koji-1.0-1", TESTCASE, None, "c", "41")
    with pytest.raises(WaiverRefused, match="testcase"):
        new_waiver_body(AMI, "no spaces allowed", None, "c", "41")


def test_waiverdb_refusing_is_reported_with_its_message(wdb) -> None:
    wdb.reject_next(1)
    with pytest.raises(WaiverRefused, match="400"):
        source(wdb).create(new_waiver_body(AMI, TESTCASE, None, "c", "41"), ("a", ""))


@pytest.mark.parametrize("fault", ["down", "garbled", "500"])
def test_waiverdb_unreachable_or_garbled_is_unavailable_never_empty(wdb, fault: str) -> None:
    post(wdb, new_waiver_body(AMI, TESTCASE, None, "c", "41"))
    if fault == "down":
        wdb.set_down(True)
    elif fault == "garbled":
        wdb.garble_next(5)
    else:
        wdb.fail_next(5, 500)
    with pytest.raises(WaiversUnavailable):
        source(wdb).waivers(AMI)


def test_a_connection_refused_is_unavailable() -> None:
    reader = WaiverDBSource(
        "http://127.0.0.1:9/api/v1.0", make_session(retries=0, timeout=5, backoff=0.01)
    )
    with pytest.raises(WaiversUnavailable):
        reader.waivers(AMI)


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [],
        {"id": "1"},
        {"id": True, "waived": True},
        {"id": 1, "waived": "yes"},
        {"id": 1, "waived": True, "subject_type": 3},
        {"id": 1, "waived": True, "subject_type": "ami", "subject_identifier": AMI},  # no testcase
    ],
)
def test_malformed_waivers_are_unavailable(raw: Any) -> None:
    with pytest.raises(WaiversUnavailable):
        parse_waiver(raw)


def test_an_answer_about_another_subject_is_unavailable(wdb) -> None:
    post(wdb, new_waiver_body(OTHER, TESTCASE, None, "c", "41"))
    wdb.garble_next(
        1,
        requests.get(
            f"{wdb.url}/waivers/", params={"subject_identifier": OTHER}, timeout=10
        ).content,
    )
    with pytest.raises(WaiversUnavailable, match="asked for the waivers of"):
        source(wdb).waivers(AMI)


@pytest.mark.parametrize(
    "body",
    [
        {"id": 1},
        {"id": 1, "subject_type": "ami", "subject_identifier": AMI, "testcase": TESTCASE},
        {"topic": "x", "body": {"id": 1, "waived": True}},
    ],
)
def test_malformed_waiver_messages_are_refused(body: Any) -> None:
    with pytest.raises(InvalidMessage):
        parse_result_notice(WAIVER_NEW, body)


def test_the_wrapped_waiverdb_messages_form_is_read_too() -> None:
    waiver = {
        "id": 4,
        "subject_type": "ami",
        "subject_identifier": AMI,
        "testcase": TESTCASE,
        "waived": True,
        "scenario": None,
        "username": "a",
        "product_version": "fedora-41",
    }
    wrapped = {"id": "m", "topic": "waiverdb.waiver.new", "headers": {}, "body": waiver}
    assert parse_result_notice(WAIVER_NEW, wrapped).item == AMI


# -- the engine: waivers release, WaiverDB down waits, retests --------------------------


class Clock:
    """The engine's and promoter's time, moved by the test (DummyResults' clock is its own)."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingAws]:
    """moto in process; the engine's clients record what they send (test_promote's)."""
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    with mock_aws():
        yield RecordingAws()


@pytest.fixture
def world(
    recording: RecordingAws, recorder: Any, tmp_path: Path
) -> Iterator[tuple[Engine, DummyResults, DummyWaivers, Clock]]:
    # DummyResults stamps results 2026-01-01T00:00:01, :02, ... (one second each).
    moment = Clock(datetime(2026, 1, 1, 0, 0, tzinfo=UTC))
    cfg = make_cfg()
    emitter = Emitter(recorder)
    results, waived = DummyResults(), DummyWaivers()
    actuator = Promoter(cfg, emitter, recording, now=moment, clock=FakeClock().clock())
    engine = make_engine(cfg, emitter, recording, tmp_path, results=results, promoter=actuator)
    engine.now = moment
    engine.waivers = waived
    yield engine, results, waived, moment
    engine.close()


def staged(moment: Clock) -> str:
    return stage_ami(staged_at=moment.now - timedelta(minutes=30))


def test_a_failed_ami_waived_is_released_naming_the_waiver(world, recorder) -> None:
    engine, results, waived, moment = world
    ami = staged(moment)
    results.add(ami, TESTCASE, "FAILED", "boot took 301 s")
    waived.add(ami, TESTCASE, "slow mirror, known", username="carol")
    outcome = engine.converge_ami(ami, engine_scope())
    assert outcome.action == "release" and "waiver 1 by carol" in outcome.detail
    assert state(ami) == "released"
    (release,) = recorder.bodies("fedimg.image.release")
    assert release["waivers"] == [
        {
            "id": 1,
            "testcase": TESTCASE,
            "scenario": None,
            "username": "carol",
            "comment": "slow mirror, known",
        }
    ]
    validate_all(recorder)
    history = tags.history_of(tags.as_dict(describe(ami)["Tags"])[tags.HISTORY])
    assert [h[0] for h in history] == ["promoting", "released"]
    assert history[0][2] == "gate+waivers:carol"


def engine_scope() -> Any:
    from fedimg.plan import Scope

    return Scope.MESSAGE


def test_waiverdb_down_never_releases_and_is_transient(world, recorder, recording) -> None:
    engine, results, waived, moment = world
    ami = staged(moment)
    results.add(ami, TESTCASE, "PASSED")
    waived.set_down(True)
    outcome = engine.converge_ami(ami, engine_scope())
    assert outcome.action == "wait" and outcome.transient and "WaiverDB" in outcome.detail
    assert state(ami) == "testing" and recorder.sent == []
    assert recording.calls("CreateTags") == []
    waived.set_down(False)
    assert engine.converge_ami(ami, engine_scope()).action == "release"


def test_a_waiver_for_another_ami_or_revoked_does_not_release(world) -> None:
    engine, results, waived, moment = world
    ami = staged(moment)
    results.add(ami, TESTCASE, "FAILED")
    waived.add(OTHER, TESTCASE)
    waived.add(ami, TESTCASE, waived=False)
    assert engine.converge_ami(ami, engine_scope()).action == "reject"
    assert state(ami) == "rejected"


def test_retest_of_a_rejected_ami_releases_it_after_a_passing_run(
    world, recorder, recording
) -> None:
    engine, results, _, moment = world
    ami = staged(moment)
    results.add(ami, TESTCASE, "FAILED", data={"scenario": NITRO})  # stamped 00:00:01
    assert engine.converge_ami(ami, engine_scope()).action == "reject"
    moment.now = datetime(2026, 1, 1, 0, 0, 1, 500000, tzinfo=UTC)
    assert (
        cli_retest(engine.cfg, engine.promoter.emitter, ami, None, who="dave", engine=engine) == 0
    )
    values = tags.as_dict(describe(ami)["Tags"])
    assert values[tags.STATE] == "testing" and values[tags.RETESTED] == "*"
    assert values[tags.TEST_REQUESTED] == "0"
    sent = [p for p in recording.calls("CreateTags") if ami in p["Resources"]][-1]
    assert {t["Key"] for t in sent["Tags"]} >= {tags.STATE, tags.TESTING_SINCE, tags.HISTORY}
    request = recorder.bodies("fedimg.image.test")[-1]
    assert request["status"] == "started" and request["extra"]["retest_since"]
    # The old FAILED no longer counts: the gate waits for the new run.
    assert engine.converge_ami(ami, engine_scope()).action == "wait"
    results.add(ami, TESTCASE, "PASSED", data={"scenario": NITRO})  # stamped 00:00:02
    assert engine.converge_ami(ami, engine_scope()).action == "release"
    assert state(ami) == "released"
    states = [h[0] for h in tags.history_of(tags.as_dict(describe(ami)["Tags"])[tags.HISTORY])]
    assert states == ["rejected", "testing", "promoting", "released"]
    validate_all(recorder)


def test_retest_of_one_scenario_keeps_the_others_results(world) -> None:
    engine, results, _, moment = world
    ami = staged(moment)
    xen = "x86_64:t2.small"
    results.add(ami, TESTCASE, "PASSED", data={"scenario": NITRO})
    results.add(ami, TESTCASE, "FAILED", data={"scenario": xen})
    assert engine.converge_ami(ami, engine_scope()).action == "reject"
    moment.now = datetime(2026, 1, 1, 0, 0, 2, 500000, tzinfo=UTC)
    assert engine.retest(ami, xen, "erin").action == "retest"
    assert tags.as_dict(describe(ami)["Tags"])[tags.RETESTED] == xen
    decision = engine.explain(ami)
    assert not isinstance(decision, str)
    assert decision[1].missing == (f"{TESTCASE} [{xen}]",)  # NITRO's PASSED still counts


@pytest.mark.parametrize("start", ["released", "promoting", "absent", "not ours"])
def test_retest_refuses_released_promoting_and_unknown_amis(world, recorder, start) -> None:
    engine = world[0]
    if start == "absent":
        ami = OTHER
    elif start == "not ours":
        ami = stage_ami(fedimg_tags=False)
    else:
        ami = stage_ami(tags.State(start))
    before = tags.as_dict(describe(ami)["Tags"]) if start != "absent" else None
    assert engine.retest(ami, None, "frank").action == "refused"
    if before is not None:
        assert tags.as_dict(describe(ami)["Tags"]) == before
    assert recorder.sent == []
    code = cli_retest(engine.cfg, engine.promoter.emitter, ami, None, who="f", engine=engine)
    assert code == 1
    assert cli_retest(engine.cfg, engine.promoter.emitter, "ami-nope", None, who="f") == 2


def test_status_and_explain_show_scenarios_waivers_and_history(world, recording) -> None:
    engine, results, waived, moment = world
    ami = staged(moment)
    results.add(ami, TESTCASE, "FAILED", "oops", data={"scenario": NITRO})
    waived.add(ami, TESTCASE, "accepted for F41 GA", scenario=NITRO, username="gina")
    assert engine.converge_ami(ami, engine_scope()).action == "release"
    out = io.StringIO()
    code = cli_status(
        engine.cfg, out=out, aws=recording, results=results, waivers=waived, ami_id=ami
    )
    text = out.getvalue()
    assert code == 0
    assert f"{TESTCASE}[{NITRO}]=FAILED" in text
    assert f"{TESTCASE} [{NITRO}] by gina: accepted for F41 GA" in text
    assert "promoting" in text and "released" in text and "gate+waivers:gina" in text
    waived.set_down(True)
    down = io.StringIO()
    cli_status(engine.cfg, out=down, aws=recording, results=results, waivers=waived, ami_id=ami)
    assert "waivers: ? (WaiverDB unavailable)" in down.getvalue()

    other = staged(moment)
    results.add(other, TESTCASE, "FAILED", "no network", data={"scenario": NITRO})
    lines: list[str] = []
    assert cli_explain(engine.cfg, other, lines.append, engine=engine) == 1  # WaiverDB down
    waived.set_down(False)
    assert cli_explain(engine.cfg, other, lines.append, engine=engine) == 0
    text = "\n".join(lines)
    assert "rule default: 1 unsatisfied" in text and "no network" in text
    assert cli_explain(engine.cfg, OTHER, lines.append, engine=engine) == 1


def test_a_rejected_ami_is_released_by_a_waiver_never_by_a_late_pass(world, recorder) -> None:
    engine, results, waived, moment = world
    ami = staged(moment)
    results.add(ami, TESTCASE, "FAILED")
    assert engine.converge_ami(ami, engine_scope()).action == "reject"
    results.add(ami, TESTCASE, "INFO")  # anything but a waiver leaves it rejected
    assert engine.converge_ami(ami, engine_scope()).action == "ignored"
    assert state(ami) == "rejected"
    waived.set_down(True)
    down = engine.converge_ami(ami, engine_scope())
    assert (down.action, down.transient) == ("wait", True) and state(ami) == "rejected"
    waived.set_down(False)
    waived.add(ami, TESTCASE, "INFO is fine here", username="hank")
    assert engine.converge_ami(ami, engine_scope()).action == "release"
    assert recorder.bodies("fedimg.image.release")[0]["waivers"][0]["username"] == "hank"


# -- fedimg waive, and the release message's schema ---------------------------------------


def test_fedimg_waive_refuses_what_it_must_not_ask(world, wdb, recording) -> None:
    engine = world[0]
    cfg = dataclasses.replace(engine.cfg, waiverdb_url=wdb.url)
    released = stage_ami(tags.State.RELEASED)
    testing = stage_ami()

    def waive(ami: str, comment: str = "known", config: Any = cfg, user: Any = "ivy") -> int:
        return cli_waive(
            config, ami, TESTCASE, scenario=None, comment=comment, user=user, aws=recording
        )

    assert waive(testing, config=engine.cfg) == 2  # no fedimg.waiverdb_url
    assert waive(released) == 1
    assert waive(OTHER) == 1
    assert waive("not-an-ami") == 1
    assert waive(testing, comment=" ") == 1
    assert waive(testing, user=None) == 1  # WaiverDB: 401
    assert source(wdb).waivers(testing) == [] and wdb.request_count("POST") == 1
    assert waive(testing) == 0
    assert [w.username for w in source(wdb).waivers(testing)] == ["ivy"]


def test_the_release_schema_takes_waivers_and_shows_them() -> None:
    from fedimg_messages.messages import ImageReleaseV1

    from fedimg.messages import IMAGE_RELEASE, StagedImage, release_event

    image = StagedImage(
        "Fedora-41-20261124.0",
        "Fedora-Cloud-Base-41",
        "https://k.test/i.raw.xz",
        "x86_64",
        STAGING_REGION,
        AMI,
        release="41",
    )
    used = [{"id": 3, "testcase": TESTCASE, "scenario": NITRO, "username": "j", "comment": "ok"}]
    body = release_event(image, {STAGING_REGION: AMI}, None, used)
    IMAGE_RELEASE.validate(body)
    message = ImageReleaseV1(body=body)
    message.validate()
    assert f"WAIVED {TESTCASE} [{NITRO}] by j: ok" in str(message)
    assert "waivers" not in release_event(image, {STAGING_REGION: AMI})
    with pytest.raises(InvalidMessage):
        IMAGE_RELEASE.validate({**body, "waivers": [{"id": "3"}]})


def test_promote_by_hand_releases_a_rejected_ami_only_once_waived(world) -> None:
    from fedimg.engine import promote_by_hand

    engine, results, waived, moment = world
    ami = staged(moment)
    results.add(ami, TESTCASE, "FAILED")
    assert promote_by_hand(engine, ami) == 1 and state(ami) == "rejected"
    assert promote_by_hand(engine, ami) == 1 and state(ami) == "rejected"  # no waiver yet
    waived.add(ami, TESTCASE, "a lost waiver message: applied by hand")
    assert promote_by_hand(engine, ami) == 0 and state(ami) == "released"
