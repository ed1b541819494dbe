"""Waivers and retests end to end over HTTP: the ResultsDB and WaiverDB stand-ins on loopback.

The engine is driven directly (no hub): AWS is moto in process, ResultsDB
(``devel.resultsdb``) and WaiverDB (``devel.waiverdb``) are real HTTP servers
on free loopback ports, read by the real sources. Each stand-in's published
message (``resultsdb.result.new``, ``waiverdb.waiver.new``) is parsed with the
contract and handed to the engine exactly as a consumer does.

One FAILED result blocks release; a waiver posted to WaiverDB (``fedimg waive``)
releases it, with the waiver in the release message; a rejected AMI retested
(``fedimg retest``) and passing its new run is released.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from moto import mock_aws
from resultsdb_api import ResultsDBapi

from devel.resultsdb import ResultsDBServer
from devel.waiverdb import WaiverDBServer
from fedimg.engine import Engine, cli_retest, cli_waive
from fedimg.messages import RESULT_NEW, WAIVER_NEW, Emitter, parse_result_notice
from fedimg.promote import Promoter
from fedimg.results import ResultsDBSource
from fedimg.waivers import waiver_source
from tests.conftest import Recorder
from tests.engine_support import make_engine
from tests.test_promote import (
    TARGETS,
    TESTCASE,
    FakeClock,
    RecordingAws,
    copies_in,
    make_cfg,
    stage_ami,
    state,
    validate_all,
)

pytestmark = pytest.mark.integration

NITRO = "x86_64:t3.small"


@dataclasses.dataclass
class Stack:
    engine: Engine
    rdb: ResultsDBServer
    wdb: WaiverDBServer
    results_bus: Recorder
    waivers_bus: Recorder
    fedimg_bus: Recorder
    aws: RecordingAws

    def result(self, ami: str, outcome: str) -> Any:
        """Post a summary to ResultsDB; the engine hears its result.new, as a consumer would."""
        ResultsDBapi(self.rdb.url).create_result(
            outcome=outcome, testcase=TESTCASE, item=ami, type="ami", scenario=NITRO
        )
        (modname, topic, body) = self.results_bus.sent[-1]
        assert f"{modname}.{topic}" == str(RESULT_NEW)
        return self.engine.on_result(parse_result_notice(RESULT_NEW, body))

    def heard_waiver(self) -> Any:
        (modname, topic, body) = self.waivers_bus.sent[-1]
        assert f"{modname}.{topic}" == str(WAIVER_NEW)
        return self.engine.on_result(parse_result_notice(WAIVER_NEW, body))


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Stack]:
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    buses = Recorder(), Recorder(), Recorder()
    with (
        mock_aws(),
        ResultsDBServer(publisher=buses[0]) as rdb,
        WaiverDBServer(publisher=buses[1]) as wdb,
    ):
        cfg = dataclasses.replace(make_cfg(), resultsdb_url=rdb.url, waiverdb_url=wdb.url)
        aws = RecordingAws()
        emitter = Emitter(buses[2])
        promoter = Promoter(cfg, emitter, aws, clock=FakeClock().clock())
        engine = make_engine(
            cfg,
            emitter,
            aws,
            tmp_path,
            results=ResultsDBSource(rdb.url, max_retries=1, backoff_factor=0.0, timeout=10.0),
            promoter=promoter,
        )
        engine.waivers = waiver_source(cfg)
        try:
            yield Stack(engine, rdb, wdb, *buses, aws)
        finally:
            engine.close()


def test_a_failure_blocks_a_waiver_releases_and_a_passing_retest_releases(stack: Stack) -> None:
    staged_at = datetime.now(UTC) - timedelta(minutes=30)
    waived, retested = stage_ami(staged_at=staged_at), stage_ami(staged_at=staged_at)
    cfg = stack.engine.cfg

    # A FAILED summary blocks both: rejected, nothing copied or public.
    for ami in (waived, retested):
        assert stack.result(ami, "FAILED").action == "reject"
        assert state(ami) == "rejected"
    assert stack.fedimg_bus.bodies("fedimg.image.release") == []
    assert stack.aws.calls("CopyImage") == []

    # `fedimg waive` stores a waiver in WaiverDB; its waiverdb.waiver.new releases the AMI.
    code = cli_waive(
        cfg,
        waived,
        TESTCASE,
        scenario=NITRO,
        comment="t3 capacity blip, known",
        user="rel-eng",
        aws=stack.aws,
    )
    assert code == 0
    assert stack.heard_waiver().action == "release"
    assert state(waived) == "released"
    (release,) = stack.fedimg_bus.bodies("fedimg.image.release")
    assert release["waivers"] == [
        {
            "id": 1,
            "testcase": TESTCASE,
            "scenario": NITRO,
            "username": "rel-eng",
            "comment": "t3 capacity blip, known",
        }
    ]
    assert {r: bool(copies_in(r, waived)) for r in TARGETS} == dict.fromkeys(TARGETS, True)
    assert state(retested) == "rejected"  # a waiver is for one AMI only

    # `fedimg retest` of the other: back to testing, a new run asked for; the old
    # FAILED no longer counts, the new PASSED releases it.
    emitter = stack.engine.promoter.emitter
    assert cli_retest(cfg, emitter, retested, None, who="rel-eng", engine=stack.engine) == 0
    assert state(retested) == "testing"
    request = stack.fedimg_bus.bodies("fedimg.image.test")[-1]
    assert request["status"] == "started" and request["extra"]["id"] == retested
    assert stack.engine.converge_ami(retested, scope_message()).action == "wait"
    assert stack.result(retested, "PASSED").action == "release"
    assert state(retested) == "released"
    second = stack.fedimg_bus.bodies("fedimg.image.release")[-1]
    assert second["image_name"] != release["image_name"] and "waivers" not in second
    validate_all(stack.fedimg_bus)
    # A retest of a released AMI is refused, and changes nothing.
    assert cli_retest(cfg, emitter, retested, None, who="rel-eng", engine=stack.engine) == 1


def scope_message() -> Any:
    from fedimg.plan import Scope

    return Scope.MESSAGE
