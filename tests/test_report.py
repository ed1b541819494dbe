"""ResultsDB reporting through the real resultsdb_api client against the stand-in."""

from __future__ import annotations

import dataclasses
import json
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from resultsdb_api import ResultsDBapi

from autocloud_ami import report as report_mod
from autocloud_ami.report import (
    SUMMARY_TESTCASE,
    OutputStore,
    Result,
    ResultsReporter,
    Spool,
    SpoolLockTimeout,
    build_results,
    compose_group_uuid,
    compose_location,
    make_api,
    one_line,
    summary_of,
    summary_posted,
)
from devel.bus import free_port
from devel.resultsdb import ResultsDBServer
from fedimg.messages import InvalidMessage, StagedImage, retest_since

AMI = "ami-0123456789abcdef0"
IMAGE = StagedImage(
    compose_id="Fedora-41-20261124.0",
    image_name="Fedora-Cloud-Base-41-20261124.0.x86_64",
    image_url="https://kojipkgs.fedoraproject.org/compose/41/Fedora-41-20261124.0/compose/"
    "Cloud/x86_64/images/Fedora-Cloud-Base-41-20261124.0.x86_64.raw.xz",
    architecture="x86_64",
    region="us-east-1",
    ami_id=AMI,
    subvariant="Cloud_Base",
    release="41",
)


@dataclass(frozen=True)
class Out:
    test_id: str
    outcome: str
    gating: bool
    note: str = ""
    output: str = ""
    duration: float = 0.0


HEALTHY = [
    Out("selinux", "PASSED", True, "stdout is 'Enforcing'"),
    Out("logging", "PASSED", True),
    Out("docker_installed", "SKIPPED", True, "only for Atomic images"),
    Out("bash_version", "FAILED", False, "no -redhat-linux-gnu\nin output"),
]
BROKEN = [
    Out("selinux", "FAILED", True, "stdout is 'Permissive', expected 'Enforcing'"),
    Out("logging", "PASSED", True),
]


SCENARIO = "x86_64:t3.small"


def results_for(outcomes: list[Out], job_id: str = "job1") -> list[Result]:
    return build_results(IMAGE, outcomes, job_id=job_id, family="Base", scenario=SCENARIO)


@pytest.fixture
def rdb() -> Iterator[ResultsDBServer]:
    with ResultsDBServer() as server:
        yield server


@pytest.fixture
def reporter(rdb: ResultsDBServer, tmp_path: Path) -> ResultsReporter:
    return ResultsReporter(make_api(rdb.url, retries=2, backoff=0.01, timeout=10), Spool(tmp_path))


def posted(rdb: ResultsDBServer, **filters: str) -> list[dict[str, Any]]:
    """Every result for the AMI, oldest first, read back with the real client."""
    api = ResultsDBapi(rdb.url)
    found = api.get_results(item=AMI, type="ami", limit=100, **filters)["data"]
    return sorted(found, key=lambda r: r["id"])


# -- the pure conventions ---------------------------------------------------------------


def test_results_follow_the_conventions_and_the_summary_is_last() -> None:
    results = results_for(HEALTHY)
    assert [r.testcase for r in results] == [
        "autocloud.ami.selinux",
        "autocloud.ami.logging",
        "autocloud.ami.docker_installed",
        "autocloud.ami.bash_version",
        SUMMARY_TESTCASE,
    ]
    # A test that does not apply is posted as INFO, the reason in data "skipped".
    assert [r.outcome for r in results] == ["PASSED", "PASSED", "INFO", "FAILED", "PASSED"]
    assert [r.data.get("skipped") for r in results] == [
        None,
        None,
        "only for Atomic images",
        None,
        None,
    ]
    for r in results:
        assert r.data["item"] == AMI and r.data["type"] == "ami"
        assert r.data["region"] == "us-east-1"
        assert r.data["productmd.compose.id"] == IMAGE.compose_id
        assert r.data["image_name"] == IMAGE.image_name
        assert r.data["arch"] == "x86_64" and r.data["subvariant"] == "Cloud_Base"
        assert r.data["source"] == "autocloud" and r.data["job_id"] == "job1"
        assert r.data["scenario"] == SCENARIO
        # resultsdb_conventions' keys for a compose image
        assert r.data["productmd.image.arch"] == "x86_64"
        assert r.data["productmd.image.subvariant"] == "Cloud_Base"
        assert r.data["productmd.image.type"] == "raw-xz"
        assert r.data["productmd.image.format"] == "raw.xz"
        assert r.data["productmd.compose.type"] == "production"
        assert r.data["productmd.compose.version"] == "41"
        assert r.data["meta.conventions"] == "result productmd.compose productmd.image"
        assert "\n" not in r.note and r.note
        compose_group = r.groups[0]
        assert compose_group["uuid"] == compose_group_uuid(IMAGE.compose_id)
        assert compose_group["description"] == f"compose.{IMAGE.compose_id}"
        assert compose_group["ref_url"].endswith("/Fedora-41-20261124.0/compose")
    assert [r.data["gating"] for r in results] == ["true", "true", "true", "false", "true"]
    assert "1 skipped" in results[-1].note and results[-1].note.startswith(SCENARIO + ": ")
    descriptions = [g["description"] for g in results[0].groups]
    assert descriptions == [
        f"compose.{IMAGE.compose_id}",
        "source.autocloud",
        f"autocloud.{IMAGE.compose_id}",
        "image.cloud_base.raw-xz.raw.xz.x86_64.1",
        "autocloud.cloud_base.raw-xz.raw.xz.x86_64.1",
    ]


@pytest.mark.parametrize(
    ("compose_id", "release", "expected"),
    [
        ("Fedora-41-20261124.0", "41", ("Fedora", "41", "20261124", "production", "0")),
        ("Fedora-41-20261124.n.2", "", ("Fedora", "41", "20261124", "nightly", "2")),
        ("Fedora-Rawhide-20261124.n.0", "", ("Fedora", "Rawhide", "20261124", "nightly", "0")),
        ("Fedora-Cloud-41-20261124.0", "41", ("Fedora-Cloud", "41", "20261124", "production", "0")),
        # Nothing productmd can parse: those keys are left out, the rest is still posted.
        ("Fedora-41-nodate", "41", ("", "41", None, None, None)),
    ],
)
def test_compose_keys_come_from_the_compose_id(
    compose_id: str, release: str, expected: tuple[str | None, ...]
) -> None:
    image = dataclasses.replace(IMAGE, compose_id=compose_id, release=release)
    [result] = build_results(image, [], job_id="j", family="Base", scenario=SCENARIO)
    keys = ("short", "version", "date", "type", "respin")
    got = tuple(result.data.get(f"productmd.compose.{k}") for k in keys)
    assert got == tuple(None if v == "" else v for v in expected)
    assert result.data["productmd.compose.id"] == compose_id
    assert result.data["item"] == AMI and result.data["type"] == "ami"


def test_a_scenario_that_could_not_run_needs_inspection() -> None:
    not_run = [
        Out("selinux", "NEEDS_INSPECTION", True, "not run: us-east-1 does not offer t2.small"),
        Out("docker_installed", "SKIPPED", True, "only for Atomic images"),
        Out(
            "bash_version", "NEEDS_INSPECTION", False, "not run: us-east-1 does not offer t2.small"
        ),
    ]
    results = results_for(not_run)
    expected = ["NEEDS_INSPECTION", "INFO", "NEEDS_INSPECTION", "NEEDS_INSPECTION"]
    assert [r.outcome for r in results] == expected
    assert "does not offer t2.small" in results[-1].note
    # One gating test that really failed makes the summary FAILED.
    mixed = [*not_run, Out("logging", "FAILED", True, "empty journal")]
    assert summary_of(mixed)[0] == "FAILED"


def test_compose_group_uuid_is_resultsdb_conventions() -> None:
    namespace = uuid.uuid5(uuid.NAMESPACE_DNS, "compose")
    assert compose_group_uuid("Fedora-41-20261124.0") == str(
        uuid.uuid5(namespace, "Fedora-41-20261124.0")
    )


@pytest.mark.parametrize(
    ("outcomes", "verdict"),
    [
        (HEALTHY, "PASSED"),
        (BROKEN, "FAILED"),
        ([Out("bash_version", "FAILED", False)], "FAILED"),  # no gating test ran
        ([Out("docker", "SKIPPED", True), Out("selinux", "PASSED", True)], "PASSED"),
        ([Out("selinux", "SKIPPED", True)], "FAILED"),
        ([], "FAILED"),
    ],
)
def test_summary_passes_only_when_every_gating_test_passed(
    outcomes: list[Out], verdict: str
) -> None:
    assert summary_of(outcomes)[0] == verdict


def test_summary_note_names_the_failed_gating_tests() -> None:
    outcome, note = summary_of(BROKEN)
    assert outcome == "FAILED" and "selinux" in note


def test_helpers() -> None:
    assert report_mod.testcase_name("service after") == "autocloud.ami.service_after"
    assert one_line("a\n  b\tc") == "a b c"
    assert len(one_line("x" * 500)) == 200
    assert compose_location(IMAGE.image_url) == (
        "https://kojipkgs.fedoraproject.org/compose/41/Fedora-41-20261124.0/compose"
    )
    assert compose_location("https://example.org/image.raw.xz") is None


def test_result_json_round_trip_and_bad_records() -> None:
    result = results_for(HEALTHY)[0]
    assert Result.from_json(json.loads(json.dumps(result.to_json()))) == result
    for bad in ({}, {"testcase": "x", "outcome": "PASSED", "data": []}):
        with pytest.raises((KeyError, ValueError)):
            Result.from_json(bad)


def test_build_results_needs_an_ami() -> None:
    image = StagedImage(
        compose_id="Fedora-41-20261124.0",
        image_name="Fedora-Cloud-Base-41",
        image_url="",
        architecture="x86_64",
        region="us-east-1",
    )
    with pytest.raises(ValueError, match="no AMI id"):
        build_results(image, HEALTHY, job_id="j", family="Base", scenario=SCENARIO)


# -- through the real client ------------------------------------------------------------------


def test_every_result_is_queryable_by_item_and_type(
    rdb: ResultsDBServer, reporter: ResultsReporter
) -> None:
    delivery = reporter.report(results_for(HEALTHY))
    assert (delivery.posted, delivery.spooled, delivery.rejected) == (5, 0, 0)
    assert delivery.complete
    found = posted(rdb)
    assert [r["testcase"]["name"] for r in found][-1] == SUMMARY_TESTCASE
    assert len(found) == 5
    summary = found[-1]
    assert summary["outcome"] == "PASSED"
    for key in (
        "region",
        "productmd.compose.id",
        "image_name",
        "arch",
        "subvariant",
        "source",
        "gating",
        "job_id",
    ):
        assert key in summary["data"], key
    assert summary["data"]["source"] == ["autocloud"]
    assert compose_group_uuid(IMAGE.compose_id) in summary["groups"]
    latest = (
        ResultsDBapi(rdb.url)
        .session.get(
            f"{rdb.url}/results/latest",
            params={"item": AMI, "type": "ami", "testcases": SUMMARY_TESTCASE},
        )
        .json()["data"]
    )
    assert [r["outcome"] for r in latest] == ["PASSED"]
    # Queryable by the data keys too.
    assert len(posted(rdb, **{"productmd.compose.id": IMAGE.compose_id})) == 5
    assert len(posted(rdb, scenario=SCENARIO)) == 5


def test_5xx_is_retried_by_the_client(rdb: ResultsDBServer, reporter: ResultsReporter) -> None:
    rdb.fail_next(2, status=500)
    delivery = reporter.report(results_for(BROKEN))
    assert delivery.posted == 3 and delivery.complete
    assert [r["outcome"] for r in posted(rdb)] == ["FAILED", "PASSED", "FAILED"]


def test_down_then_back_nothing_lost_order_kept(
    rdb: ResultsDBServer, reporter: ResultsReporter, tmp_path: Path
) -> None:
    rdb.set_down(True)
    first = reporter.report(results_for(BROKEN, "job-a"))
    second = reporter.report(results_for(HEALTHY, "job-b"))
    assert first.spooled == 3 and second.spooled == 5 and second.pending == 8
    assert not first.complete
    spooled = [json.loads(p.read_text()) for p in reporter.spool.pending()]
    assert [s["data"]["job_id"] for s in spooled] == ["job-a"] * 3 + ["job-b"] * 5
    assert not list(tmp_path.rglob(".tmp-*"))

    # Still down: a flush keeps everything, in place.
    assert reporter.flush().pending == 8

    rdb.set_down(False)
    done = reporter.flush()
    assert (done.posted, done.pending) == (8, 0)
    found = posted(rdb)
    assert [r["data"]["job_id"][0] for r in found] == ["job-a"] * 3 + ["job-b"] * 5
    assert [r["testcase"]["name"] for r in found][2] == SUMMARY_TESTCASE
    assert [r["testcase"]["name"] for r in found][7] == SUMMARY_TESTCASE
    assert reporter.spool.pending() == []


def test_new_results_queue_behind_spooled_ones(
    rdb: ResultsDBServer, reporter: ResultsReporter
) -> None:
    rdb.set_down(True)
    reporter.report(results_for(BROKEN, "job-a"))
    rdb.set_down(False)
    delivery = reporter.report(results_for(HEALTHY, "job-b"))
    assert delivery.posted == 8 and delivery.complete
    assert [r["data"]["job_id"][0] for r in posted(rdb)] == ["job-a"] * 3 + ["job-b"] * 5


def test_connection_refused_spools(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/api/v2.0"
    reporter = ResultsReporter(make_api(url, retries=1, backoff=0.01, timeout=2), Spool(tmp_path))
    delivery = reporter.report(results_for(BROKEN))
    assert delivery.spooled == 3 and delivery.posted == 0


def test_a_server_that_never_answers_times_out_and_spools(tmp_path: Path) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts connections, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/api/v2.0"
        reporter = ResultsReporter(
            make_api(url, retries=0, backoff=0, timeout=0.3), Spool(tmp_path)
        )
        delivery = reporter.report(results_for(BROKEN)[:1])
    assert delivery.spooled == 1


def test_400_goes_to_rejected_and_the_rest_is_posted(
    rdb: ResultsDBServer, reporter: ResultsReporter, caplog: pytest.LogCaptureFixture
) -> None:
    rdb.reject_next(1)
    delivery = reporter.report(results_for(BROKEN))
    assert (delivery.posted, delivery.rejected, delivery.spooled) == (2, 1, 0)
    (kept,) = reporter.spool.rejected()
    record = json.loads(kept.read_text())
    assert "400" in record["error"]
    assert record["result"]["testcase"] == "autocloud.ami.selinux"
    assert any(r.levelname == "ERROR" for r in caplog.records)
    # Never retried: a flush leaves it alone.
    assert reporter.flush().posted == 0
    assert [r["testcase"]["name"] for r in posted(rdb)] == [
        "autocloud.ami.logging",
        SUMMARY_TESTCASE,
    ]


def test_spooled_result_refused_later_moves_to_rejected(
    rdb: ResultsDBServer, reporter: ResultsReporter
) -> None:
    rdb.set_down(True)
    reporter.report(results_for(BROKEN))
    rdb.set_down(False)
    rdb.reject_next(1)
    done = reporter.flush()
    assert (done.posted, done.rejected, done.pending) == (2, 1, 0)
    assert len(reporter.spool.rejected()) == 1


def test_garbled_2xx_counts_as_posted(rdb: ResultsDBServer, reporter: ResultsReporter) -> None:
    rdb.garble_next(1)
    delivery = reporter.report(results_for(BROKEN)[:1])
    assert delivery.posted == 1 and delivery.spooled == 0


def test_unreadable_spool_file_is_set_aside(
    reporter: ResultsReporter, rdb: ResultsDBServer
) -> None:
    reporter.spool.pending_dir.mkdir(parents=True, exist_ok=True)
    (reporter.spool.pending_dir / "00000000000000000001-00000000-x.json").write_text("{not json")
    reporter.spool.add(results_for(BROKEN)[0])
    done = reporter.flush()
    assert (done.posted, done.rejected) == (1, 1)
    assert "raw" in json.loads(reporter.spool.rejected()[0].read_text())


def test_spool_lock_has_a_deadline(tmp_path: Path) -> None:
    holder, other = Spool(tmp_path), Spool(tmp_path)
    with holder.locked(), pytest.raises(SpoolLockTimeout):
        with other.locked(timeout=0.2):
            pytest.fail("two holders at once")
    with other.locked(timeout=0.2):
        pass  # free again


def test_output_store_keeps_output_and_builds_urls(tmp_path: Path) -> None:
    store = OutputStore(tmp_path, "https://autocloud.example/out/")
    url = store.write(AMI, "job1", "service after", "$ systemctl is-active chronyd\nactive\n")
    assert url == f"https://autocloud.example/out/{AMI}/job1/service_after.txt"
    assert (tmp_path / AMI / "job1" / "service_after.txt").read_text().endswith("active\n")
    assert (
        store.write_index(AMI, "job1", ["a", "b"])
        == f"https://autocloud.example/out/{AMI}/job1/index.txt"
    )
    assert OutputStore(tmp_path).write(AMI, "job1", "x", "y") is None
    # Ids cannot escape the store.
    store.write("../../etc", "..", "../passwd", "no")
    assert all(tmp_path in p.parents for p in tmp_path.rglob("*"))


def test_a_summary_counts_as_done_only_when_posted_after_a_retest(
    rdb: ResultsDBServer, reporter: ResultsReporter
) -> None:
    api = ResultsDBapi(rdb.url)
    before = datetime.now(UTC)
    assert not summary_posted(api, AMI)
    reporter.report(results_for(HEALTHY))
    assert summary_posted(api, AMI)
    assert summary_posted(api, AMI, since=before - timedelta(minutes=1))
    # fedimg retest moved the AMI back to testing after that run: it answers no retest.
    assert not summary_posted(api, AMI, since=datetime.now(UTC) + timedelta(seconds=1))


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, None),
        ({"retest_since": "2026-11-27T10:00:00+00:00"}, datetime(2026, 11, 27, 10, tzinfo=UTC)),
        ({"retest_since": "2026-11-27T11:00:00+01:00"}, datetime(2026, 11, 27, 10, tzinfo=UTC)),
        ({"retest_since": "2026-11-27T10:00:00"}, datetime(2026, 11, 27, 10, tzinfo=UTC)),
    ],
)
def test_retest_since_is_read_from_a_request(extra: dict[str, str], expected: Any) -> None:
    assert retest_since({"extra": extra}) == expected


@pytest.mark.parametrize("value", ["yesterday", "", "2026-13-01T00:00:00", 7])
def test_a_bad_retest_since_is_an_invalid_message(value: Any) -> None:
    with pytest.raises(InvalidMessage, match="retest_since"):
        retest_since({"extra": {"retest_since": value}})
