"""fedimg's ResultsDB reader: the real source against the stand-in, and the fake."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from resultsdb_api import ResultsDBapi

from devel.bus import free_port
from devel.resultsdb import ResultsDBServer
from fedimg.results import (
    DummyResults,
    MalformedResults,
    Result,
    ResultsDBSource,
    ResultsSource,
    ResultsUnavailable,
    check_matches,
    newest_per_testcase,
    parse_result,
    parse_result_list,
)

AMI = "ami-0123456789abcdef0"
OTHER_AMI = "ami-0fedcba9876543210"
BOOT, SSH, ALL = "autocloud.ami.boot", "autocloud.ami.ssh", "autocloud.ami.all"

integration = pytest.mark.integration


def api_result(**overrides: Any) -> dict[str, Any]:
    """A result as ResultsDB API v2.0 returns it."""
    body: dict[str, Any] = {
        "id": 7,
        "groups": ["41e6c327-0000-0000-0000-000000000000"],
        "testcase": {"name": ALL, "ref_url": None, "href": "http://r/api/v2.0/testcases/x"},
        "submit_time": "2026-11-24T18:41:41.194357",
        "outcome": "PASSED",
        "note": "12 passed",
        "ref_url": "https://autocloud/jobs/7",
        "data": {"item": [AMI], "type": ["ami"], "region": ["us-east-1"]},
        "href": "http://r/api/v2.0/results/7",
    }
    body.update(overrides)
    return body


# -- the functional core ----------------------------------------------------------------


def test_parse_result_reads_the_api_shape() -> None:
    result = parse_result(api_result())
    assert result == Result(
        testcase=ALL,
        outcome="PASSED",
        result_id=7,
        submit_time="2026-11-24T18:41:41.194357",
        note="12 passed",
        ref_url="https://autocloud/jobs/7",
        data={"item": (AMI,), "type": ("ami",), "region": ("us-east-1",)},
    )
    assert result.submitted == datetime(2026, 11, 24, 18, 41, 41, 194357, tzinfo=UTC)
    assert hash(result)  # usable in sets despite the mapping field
    with pytest.raises(TypeError):
        result.data["item"] = ("x",)  # type: ignore[index]


def test_parse_result_tolerates_null_note_and_string_data() -> None:
    result = parse_result(api_result(note=None, ref_url=None, data={"item": AMI}))
    assert result.note == ""
    assert result.ref_url is None
    assert result.data == {"item": (AMI,)}


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [],
        "PASSED",
        api_result(testcase="autocloud.ami.all"),
        api_result(testcase={"name": ""}),
        api_result(id="7"),
        api_result(id=True),
        api_result(outcome=None),
        api_result(outcome=""),
        api_result(submit_time=None),
        api_result(submit_time="yesterday"),
        api_result(note=5),
        api_result(ref_url=["x"]),
        api_result(data=["item", AMI]),
        api_result(data={"item": [AMI, 5]}),
        api_result(data={"item": {"id": AMI}}),
    ],
)
def test_malformed_result_is_refused(raw: Any) -> None:
    with pytest.raises(MalformedResults):
        parse_result(raw)


@pytest.mark.parametrize("payload", [None, [], {"data": None}, {"data": {}}, {"results": []}])
def test_malformed_result_list_is_refused(payload: Any) -> None:
    with pytest.raises(MalformedResults):
        parse_result_list(payload)


def test_malformed_is_a_kind_of_unavailable() -> None:
    # The gate catches ResultsUnavailable and waits: a bad answer must land there too.
    assert issubclass(MalformedResults, ResultsUnavailable)


def test_newest_per_testcase_breaks_ties_by_id() -> None:
    def result(testcase: str, rid: int, when: str) -> Result:
        return Result(testcase, "PASSED", rid, when)

    newest = newest_per_testcase(
        [
            result(BOOT, 1, "2026-01-01T00:00:02"),
            result(BOOT, 2, "2026-01-01T00:00:01.999999"),
            result(SSH, 4, "2026-01-01T00:00:05"),
            result(SSH, 3, "2026-01-01T00:00:05"),
        ]
    )
    assert {name: r.result_id for name, r in newest.items()} == {BOOT: 1, SSH: 4}


def test_check_matches_refuses_results_for_something_else() -> None:
    good = parse_result(api_result())
    assert check_matches(good, AMI, "ami", [ALL]) is good
    with pytest.raises(MalformedResults):
        check_matches(good, OTHER_AMI, "ami", None)
    with pytest.raises(MalformedResults):
        check_matches(good, AMI, "aws_ami", None)
    with pytest.raises(MalformedResults):
        check_matches(good, AMI, "ami", [BOOT])
    untyped = parse_result(api_result(data={"item": [AMI]}))
    with pytest.raises(MalformedResults):
        check_matches(untyped, AMI, "ami", None)


# -- the fake -------------------------------------------------------------------------------


def test_dummy_results_latest_per_testcase() -> None:
    dummy = DummyResults()
    dummy.add(AMI, BOOT, "FAILED", note="no ssh")
    boot = dummy.add(AMI, BOOT, "passed")
    ssh = dummy.add(AMI, SSH, "NEEDS_INSPECTION", note="flaky")
    dummy.add(OTHER_AMI, BOOT, "FAILED")
    dummy.add(AMI, SSH, "PASSED", item_type="aws_ami")

    latest = dummy.latest(AMI)
    assert latest == {BOOT: boot, SSH: ssh}
    assert boot.outcome == "PASSED"
    assert ssh.note == "flaky"
    assert dummy.latest(AMI, testcases=[BOOT]) == {BOOT: boot}
    assert dummy.latest("ami-00000000") == {}
    assert set(dummy.latest(AMI, item_type="aws_ami")) == {SSH}
    assert dummy.queries[0] == (AMI, "ami", ())
    assert dummy.queries[1] == (AMI, "ami", (BOOT,))
    # Later additions are newer, so "latest" means "last added" in tests too.
    assert boot.submitted < ssh.submitted
    assert boot.result_id < ssh.result_id


def test_dummy_results_refuses_what_resultsdb_refuses() -> None:
    dummy = DummyResults()
    with pytest.raises(ValueError):
        dummy.add(AMI, BOOT, "GREAT")
    with pytest.raises(ValueError):
        dummy.add(AMI, "", "PASSED")
    with pytest.raises(ValueError):
        dummy.latest(f"{AMI},{OTHER_AMI}")
    with pytest.raises(ValueError):
        dummy.latest(AMI, testcases=[f"{BOOT},{SSH}"])


def test_dummy_results_down() -> None:
    dummy = DummyResults()
    dummy.add(AMI, BOOT, "PASSED")
    dummy.set_down(True)
    with pytest.raises(ResultsUnavailable):
        dummy.latest(AMI)
    dummy.set_down(False)
    assert set(dummy.latest(AMI)) == {BOOT}


def test_source_from_config() -> None:
    from fedimg.config import FedimgConfig

    cfg = FedimgConfig.from_fedmsg(
        {
            "fedimg.resultsdb_url": "https://resultsdb.example/api/v2.0/",
            "fedimg.http.timeout": 12.5,
            "fedimg.http.retries": 4,
        }
    )
    source = ResultsDBSource.from_config(cfg)
    assert source.url == "https://resultsdb.example/api/v2.0"
    assert source.timeout == 12.5
    assert source.client._retry.total == 4


# -- the real source against the stand-in ----------------------------------------------


@pytest.fixture
def rdb() -> Iterator[ResultsDBServer]:
    with ResultsDBServer() as server:
        yield server


@pytest.fixture
def source(rdb: ResultsDBServer) -> ResultsDBSource:
    return ResultsDBSource(rdb.url, max_retries=2, backoff_factor=0, timeout=5)


def post(rdb: ResultsDBServer, testcase: str, outcome: str, item: str = AMI, **data: Any) -> int:
    data.setdefault("type", "ami")
    created = ResultsDBapi(rdb.url, max_retries=0).create_result(
        outcome, testcase, note=f"{testcase} {outcome}", item=item, **data
    )
    return int(created["id"])


@integration
def test_latest_reads_the_newest_result_per_testcase(
    rdb: ResultsDBServer, source: ResultsDBSource
) -> None:
    post(rdb, BOOT, "FAILED")
    boot = post(rdb, BOOT, "PASSED")
    ssh = post(rdb, SSH, "FAILED", region="us-east-1")
    post(rdb, SSH, "PASSED", item=OTHER_AMI)
    post(rdb, SSH, "PASSED", type="aws_ami")

    latest = source.latest(AMI)
    assert {name: (r.outcome, r.result_id) for name, r in latest.items()} == {
        BOOT: ("PASSED", boot),
        SSH: ("FAILED", ssh),
    }
    assert latest[SSH].note == f"{SSH} FAILED"
    assert latest[SSH].data["region"] == ("us-east-1",)
    assert set(source.latest(AMI, testcases=[SSH])) == {SSH}
    assert set(source.latest(AMI, testcases=[ALL])) == set()
    assert set(source.latest(AMI, item_type="aws_ami")) == {SSH}
    assert source.latest("ami-00000000") == {}


@integration
def test_source_and_fake_agree(rdb: ResultsDBServer, source: ResultsDBSource) -> None:
    dummy = DummyResults()
    steps = [
        (AMI, BOOT, "FAILED"),
        (AMI, BOOT, "PASSED"),
        (AMI, SSH, "INFO"),
        (OTHER_AMI, SSH, "FAILED"),
        (AMI, ALL, "NEEDS_INSPECTION"),
        (AMI, ALL, "PASSED"),
    ]
    for item, testcase, outcome in steps:
        post(rdb, testcase, outcome, item=item)
        dummy.add(item, testcase, outcome)
    sources: list[ResultsSource] = [source, dummy]
    for testcases in (None, [BOOT, ALL]):
        views = [
            {name: r.outcome for name, r in s.latest(AMI, testcases=testcases).items()}
            for s in sources
        ]
        assert views[0] == views[1]
    assert views[0] == {BOOT: "PASSED", ALL: "PASSED"}
    assert {n: r.outcome for n, r in source.latest(AMI).items()} == {
        BOOT: "PASSED",
        SSH: "INFO",
        ALL: "PASSED",
    }


@integration
def test_down_is_unavailable_after_the_retries(
    rdb: ResultsDBServer, source: ResultsDBSource, caplog: Any
) -> None:
    post(rdb, BOOT, "PASSED")
    rdb.set_down(True)
    with pytest.raises(ResultsUnavailable) as info:
        source.latest(AMI)
    assert not isinstance(info.value, MalformedResults)
    assert rdb.request_count("GET", "/results/latest") == 3
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    rdb.set_down(False)
    assert set(source.latest(AMI)) == {BOOT}


@integration
def test_5xx_is_retried_then_unavailable(rdb: ResultsDBServer, source: ResultsDBSource) -> None:
    post(rdb, BOOT, "PASSED")
    rdb.fail_next(2)
    assert set(source.latest(AMI)) == {BOOT}  # two 500s, then the answer
    rdb.fail_next(3, status=504)
    with pytest.raises(ResultsUnavailable):
        source.latest(AMI)


@integration
def test_4xx_is_unavailable_without_retry(rdb: ResultsDBServer, source: ResultsDBSource) -> None:
    rdb.reject_next(1)
    with pytest.raises(ResultsUnavailable):
        source.latest(AMI)
    assert rdb.request_count("GET") == 1
    wrong = ResultsDBSource(rdb.url + "/nowhere", max_retries=0)
    with pytest.raises(ResultsUnavailable):
        wrong.latest(AMI)


@integration
@pytest.mark.parametrize(
    "body",
    [
        b"<html>maintenance</html>",
        b'{"data": "nope"}',
        b'{"data": [{"id": 1}]}',
        json.dumps({"data": [api_result(data={"item": [OTHER_AMI], "type": ["ami"]})]}).encode(),
        json.dumps({"data": [api_result(testcase={"name": BOOT})]}).encode(),
    ],
)
def test_malformed_answers_are_unavailable(
    rdb: ResultsDBServer, source: ResultsDBSource, body: bytes
) -> None:
    rdb.garble_next(1, body)
    with pytest.raises(MalformedResults):
        source.latest(AMI, testcases=[ALL])


@integration
def test_nothing_listening_is_unavailable() -> None:
    port = free_port()
    source = ResultsDBSource(f"http://127.0.0.1:{port}/api/v2.0", max_retries=1, backoff_factor=0)
    with pytest.raises(ResultsUnavailable):
        source.latest(AMI)


@integration
def test_a_server_that_never_answers_times_out() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts connections (backlog), never answers
        port = silent.getsockname()[1]
        source = ResultsDBSource(
            f"http://127.0.0.1:{port}/api/v2.0", max_retries=0, backoff_factor=0, timeout=0.3
        )
        with pytest.raises(ResultsUnavailable):
            source.latest(AMI)


@integration
def test_query_values_with_commas_are_refused(source: ResultsDBSource) -> None:
    with pytest.raises(ValueError):
        source.latest(f"{AMI},{OTHER_AMI}")
    with pytest.raises(ValueError):
        source.latest(AMI, item_type="")
    with pytest.raises(ValueError):
        source.latest(AMI, testcases=[f"{BOOT},{SSH}"])


@integration
def test_history_follows_pagination(rdb: ResultsDBServer, source: ResultsDBSource) -> None:
    ids = [post(rdb, BOOT if n % 2 else SSH, "PASSED") for n in range(7)]
    post(rdb, BOOT, "FAILED", item=OTHER_AMI)
    history = source.history(AMI, page_size=3)
    assert [r.result_id for r in history] == list(reversed(ids))
    assert rdb.request_count("GET", "/results") == 3
    assert [r.result_id for r in source.history(AMI, page_size=2, max_results=3)] == [
        ids[6],
        ids[5],
        ids[4],
    ]
    assert {r.testcase for r in source.history(AMI, testcases=[BOOT])} == {BOOT}


@integration
def test_history_refuses_a_next_link_outside_the_api(
    rdb: ResultsDBServer, source: ResultsDBSource
) -> None:
    page: dict[str, Any] = {
        "data": [],
        "prev": None,
        "next": "http://elsewhere.example/steal?page=1",
    }
    rdb.garble_next(1, json.dumps(page).encode())
    with pytest.raises(MalformedResults):
        source.history(AMI)
