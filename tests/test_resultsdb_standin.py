"""The ResultsDB stand-in, driven through the real ``resultsdb_api`` client.

Pure parsing is tested directly; everything else goes over HTTP to an
in-process server (integration-marked), and one test runs the stand-in as a
process on a loopback fedmsg bus.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import requests
from resultsdb_api import ResultsDBapi, ResultsDBapiException

from devel.bus import free_port, wait_until
from devel.resultsdb import (
    ApiError,
    PublishTimeout,
    ResultsDBServer,
    SerialPublisher,
    amqp_bus,
    fan_out,
    fedmsg_config_found,
    parse_new_result,
    parse_result_query,
    parse_submit_time,
    prev_next_urls,
)
from fedimg.messages import RESULT_NEW
from tests.conftest import Recorder

ROOT = Path(__file__).resolve().parents[1]
AMI = "ami-0123456789abcdef0"
OTHER_AMI = "ami-0fedcba9876543210"
SUBMIT_TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?$")
RESULT_KEYS = {"id", "groups", "testcase", "submit_time", "outcome", "note", "ref_url", "data"}
RESULT_KEYS |= {"href"}

integration = pytest.mark.integration


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture
def rdb(recorder: Any) -> Any:
    with ResultsDBServer(publisher=recorder) as server:
        yield server


@pytest.fixture
def client(rdb: ResultsDBServer) -> ResultsDBapi:
    return ResultsDBapi(rdb.url, max_retries=2, backoff_factor=0)


def post_raw(rdb: ResultsDBServer, body: dict[str, Any], what: str = "results") -> Any:
    return requests.post(f"{rdb.url}/{what}", json=body, timeout=10)


def api_error(call: Any) -> ResultsDBapiException:
    with pytest.raises(ResultsDBapiException) as info:
        call()
    return info.value


# -- parsing (pure) ---------------------------------------------------------------------


def test_new_result_is_normalised() -> None:
    new = parse_new_result(
        {
            "outcome": " passed ",
            "testcase": {"name": "autocloud.ami.all", "ref_url": "https://tc"},
            "groups": ["g-1", {"uuid": "g-1"}, {"description": "compose"}],
            "data": {"item": AMI, "region": ["us-east-1", "eu-west-1"]},
            "note": None,
            "_auth_token": None,
        }
    )
    assert new.outcome == "PASSED"
    assert new.testcase == "autocloud.ami.all"
    assert new.testcase_fields == {"ref_url": "https://tc"}
    assert new.groups[0]["uuid"] == "g-1"
    assert len(new.groups) == 2  # the duplicate uuid once, the uuid-less group gets one
    assert new.data == (("item", AMI), ("region", "us-east-1"), ("region", "eu-west-1"))
    assert new.submit_time is None


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"testcase": "t"}, "outcome"),
        ({"outcome": "GREAT", "testcase": "t"}, "outcome"),
        ({"outcome": 1, "testcase": "t"}, "outcome"),
        ({"outcome": "PASSED"}, "testcase"),
        ({"outcome": "PASSED", "testcase": ""}, "testcase"),
        ({"outcome": "PASSED", "testcase": None}, "testcase"),
        ({"outcome": "PASSED", "testcase": 7}, "testcase"),
        ({"outcome": "PASSED", "testcase": {"ref_url": "x"}}, "testcase.name"),
        ({"outcome": "PASSED", "testcase": {"name": "t", "href": "x"}}, "testcase"),
        ({"outcome": "PASSED", "testcase": "t", "data": {"item": 5}}, "data.item"),
        ({"outcome": "PASSED", "testcase": "t", "data": {"item": ["a", 5]}}, "data.item"),
        ({"outcome": "PASSED", "testcase": "t", "data": {"item": {"a": "b"}}}, "data.item"),
        ({"outcome": "PASSED", "testcase": "t", "data": ["item"]}, "data"),
        ({"outcome": "PASSED", "testcase": "t", "groups": "g"}, "groups"),
        ({"outcome": "PASSED", "testcase": "t", "groups": [3]}, "groups.0"),
        ({"outcome": "PASSED", "testcase": "t", "groups": ["x" * 37]}, "groups.0.uuid"),
        ({"outcome": "PASSED", "testcase": "t", "groups": [{"uuid": "g", "x": 1}]}, "groups.0"),
        ({"outcome": "PASSED", "testcase": "t", "note": 3}, "note"),
        ({"outcome": "PASSED", "testcase": "t", "ref_url": []}, "ref_url"),
        ({"outcome": "PASSED", "testcase": "t", "submit_time": "yesterday"}, "submit_time"),
        ({"outcome": "PASSED", "testcase": "t", "submit_time": 1.5}, "submit_time"),
        ({"outcome": "PASSED", "testcase": "t", "item": AMI}, "body"),
    ],
)
def test_bad_new_result_is_a_400_naming_the_field(body: dict[str, Any], where: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_new_result(body)
    assert info.value.status == 400
    locations = [".".join(str(p) for p in e["loc"]) for e in info.value.body["validation_error"]]
    assert where in locations
    assert info.value.body["message"]


def test_colon_in_a_data_key_is_refused_like_the_real_server() -> None:
    with pytest.raises(ApiError) as info:
        parse_new_result({"outcome": "PASSED", "testcase": "t", "data": {"a:like": "x"}})
    assert info.value.status == 400
    assert "validation_error" not in info.value.body


def test_body_that_is_not_an_object_is_refused() -> None:
    bodies: list[Any] = [None, [], "PASSED"]
    for body in bodies:
        with pytest.raises(ApiError):
            parse_new_result(body)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2026-11-24T18:41:41.194357", "2026-11-24T18:41:41.194357"),
        ("2026-11-24T18:41:41.194357Z", "2026-11-24T18:41:41.194357"),
        ("2026-11-24T18:41:41.194357+00", "2026-11-24T18:41:41.194357"),
        ("2026-11-24T20:41:41.000001+0200", "2026-11-24T18:41:41.000001"),
        (1764009701000, "2025-11-24T18:41:41"),
        ("1764009701123", "2025-11-24T18:41:41.123000"),
    ],
)
def test_submit_time_formats_of_the_real_parser(raw: Any, expected: str) -> None:
    parsed = parse_submit_time(raw)
    assert parsed is not None
    assert parsed.isoformat() == expected


def test_submit_time_without_fraction_is_refused_like_the_real_parser() -> None:
    with pytest.raises(ValueError):
        parse_submit_time("2026-11-24T18:41:41")
    with pytest.raises(ValueError):
        parse_submit_time(True)


def test_result_query_separates_reserved_args_from_data_filters() -> None:
    q = parse_result_query(
        [
            ("item", f"{AMI},{OTHER_AMI}"),
            ("item", "ami-00000000"),
            ("type", "ami"),
            ("testcases", " a, b ,,"),
            ("testcases:like", "autocloud.*"),
            ("outcome", "passed,failed"),
            ("since", "2026-01-01T00:00:00Z,2026-02-01"),
            ("page", "2"),
            ("limit", "5"),
        ]
    )
    assert dict(q.data) == {"item": (AMI, OTHER_AMI, "ami-00000000"), "type": ("ami",)}
    assert q.testcases == ("a", "b")
    assert q.testcases_like == ("autocloud.*",)
    assert q.outcomes == ("PASSED", "FAILED")
    assert (q.page, q.limit) == (2, 5)
    assert q.since_start is not None and q.since_start.isoformat() == "2026-01-01T00:00:00"
    assert q.since_end is not None and q.since_end.isoformat() == "2026-02-01T00:00:00"


@pytest.mark.parametrize(
    "pairs",
    [
        [("page", "one")],
        [("limit", "1.5")],
        [("limit", "-1")],
        [("outcome", "PASSED,GREAT")],
        [("since", "last tuesday")],
        [("since", "2026-01-01,soon")],
    ],
)
def test_bad_result_query_is_a_400(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(ApiError) as info:
        parse_result_query(pairs)
    assert info.value.status == 400


def test_prev_next_links_follow_the_real_server() -> None:
    rows = list(range(3))
    data, prev, nxt = prev_next_urls("http://h/api/v2.0/results?limit=2", rows, 2)
    assert data == [0, 1]
    assert prev is None
    assert nxt == "http://h/api/v2.0/results?limit=2&page=1"
    data, prev, nxt = prev_next_urls("http://h/api/v2.0/results?page=3&limit=2", rows[:2], 2)
    assert data == [0, 1]
    assert prev == "http://h/api/v2.0/results?page=2&limit=2"
    assert nxt is None
    _, _, nxt = prev_next_urls("http://h/api/v2.0/results", rows, 1)
    assert nxt == "http://h/api/v2.0/results?page=1"


def test_fedmsg_config_is_found_by_env_or_cwd(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("FEDMSG_CONFIG", raising=False)
    assert not fedmsg_config_found(tmp_path)
    (tmp_path / "fedmsg.d").mkdir()
    assert fedmsg_config_found(tmp_path)
    monkeypatch.setenv("FEDMSG_CONFIG", str(tmp_path / "fedmsg.d"))
    assert fedmsg_config_found(tmp_path / "elsewhere")
    monkeypatch.setenv("FEDMSG_CONFIG", str(tmp_path / "missing"))
    assert not fedmsg_config_found(tmp_path / "elsewhere")


# -- the serial publisher -------------------------------------------------------------


def test_serial_publisher_publishes_from_one_thread_and_reraises() -> None:
    threads: list[str] = []

    def publish(modname: str, topic: str, body: dict[str, Any]) -> None:
        threads.append(threading.current_thread().name)
        if body.get("boom"):
            raise OSError("bus gone")

    pub = SerialPublisher(publish).start()
    try:
        callers = [threading.Thread(target=pub, args=("m", "t", {"n": n})) for n in range(5)]
        for t in callers:
            t.start()
        for t in callers:
            t.join(10)
        with pytest.raises(OSError):
            pub("m", "t", {"boom": True})
    finally:
        pub.stop()
    assert len(threads) == 6
    assert set(threads) == {"resultsdb-publisher"}


def test_serial_publisher_setup_failure_and_timeout() -> None:
    def broken() -> None:
        raise KeyError("relay_inbound")

    with pytest.raises(RuntimeError):
        SerialPublisher(lambda *a: None, setup=broken).start()

    release = threading.Event()

    def stuck(modname: str, topic: str, body: dict[str, Any]) -> None:
        release.wait(10)

    pub = SerialPublisher(stuck, timeout=0.2).start()
    try:
        with pytest.raises(PublishTimeout):
            pub("m", "t", {})
    finally:
        release.set()
        pub.stop()


def test_fan_out_hands_every_message_to_each_bus_even_when_one_fails(recorder: Any) -> None:
    calls: list[str] = []

    def broken(modname: str, topic: str, body: dict[str, Any]) -> None:
        calls.append("broken")
        raise OSError("broker down")

    other = Recorder()
    publish = fan_out(broken, recorder, other)
    with pytest.raises(OSError, match="broker down"):
        publish("resultsdb", "result.new", {"id": 1})
    assert calls == ["broken"]
    assert recorder.sent == other.sent == [("resultsdb", "result.new", {"id": 1})]
    fan_out(recorder)("resultsdb", "result.new", {"id": 2})
    assert recorder.topics() == ["resultsdb.result.new"] * 2


def test_amqp_bus_needs_an_existing_config_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        amqp_bus(tmp_path / "missing.toml")
    with pytest.raises(FileNotFoundError):
        amqp_bus(tmp_path)  # a directory is not a config


# -- over HTTP, through the real client ----------------------------------------------


@integration
def test_create_and_get_result_with_the_real_shape(
    rdb: ResultsDBServer, client: ResultsDBapi, recorder: Any
) -> None:
    created = client.create_result(
        "PASSED",
        {"name": "autocloud.ami.all", "ref_url": "https://autocloud/tc"},
        groups=["4cd1e968-e868-11f1-b172-02fc00000001", {"description": "Fedora-Cloud-41"}],
        note="all 12 tests passed",
        ref_url="https://autocloud/jobs/1/output",
        item=AMI,
        type="ami",
        region="us-east-1",
        arch=["x86_64"],
    )
    assert set(created) == RESULT_KEYS
    assert created["outcome"] == "PASSED"
    assert created["testcase"] == {
        "name": "autocloud.ami.all",
        "ref_url": "https://autocloud/tc",
        "href": f"{rdb.url}/testcases/autocloud.ami.all",
    }
    assert created["data"] == {
        "item": [AMI],
        "type": ["ami"],
        "region": ["us-east-1"],
        "arch": ["x86_64"],
    }
    assert created["groups"][0] == "4cd1e968-e868-11f1-b172-02fc00000001"
    assert len(created["groups"]) == 2
    assert created["href"] == f"{rdb.url}/results/{created['id']}"
    assert SUBMIT_TIME_RE.match(created["submit_time"])
    assert client.get_result(created["id"]) == created

    # Groups and the testcase were created on first use.
    described = client.get_group(created["groups"][1])
    assert described["description"] == "Fedora-Cloud-41"
    assert described["results_count"] == 1
    assert client.get_testcase("autocloud.ami.all")["ref_url"] == "https://autocloud/tc"

    # Published once, with the API body, valid under the contract.
    assert recorder.sent == [("resultsdb", "result.new", created)]
    RESULT_NEW.validate(recorder.sent[0][2])


@integration
def test_result_filters(rdb: ResultsDBServer, client: ResultsDBapi) -> None:
    a = client.create_result("PASSED", "autocloud.ami.boot", item=AMI, type="ami")
    b = client.create_result("FAILED", "autocloud.ami.ssh", item=AMI, type="ami")
    c = client.create_result("PASSED", "autocloud.ami.boot", item=OTHER_AMI, type="ami")
    d = client.create_result("INFO", "compose.cloud.all", item=AMI, type="aws_ami")

    def ids(**kwargs: Any) -> list[int]:
        return [r["id"] for r in client.get_results(**kwargs)["data"]]

    assert ids() == [d["id"], c["id"], b["id"], a["id"]]  # newest first
    assert ids(item=AMI) == [d["id"], b["id"], a["id"]]
    assert ids(item=AMI, type="ami") == [b["id"], a["id"]]
    assert ids(item=[AMI, OTHER_AMI], type="ami") == [c["id"], b["id"], a["id"]]
    assert ids(testcases="autocloud.ami.boot") == [c["id"], a["id"]]
    assert ids(testcases=["autocloud.ami.ssh", "compose.cloud.all"]) == [d["id"], b["id"]]
    assert ids(testcases_like="autocloud.*") == [c["id"], b["id"], a["id"]]
    assert ids(testcases_like="AUTOCLOUD.*") == []  # LIKE is case-sensitive, as in PostgreSQL
    assert ids(outcome="failed,info") == [d["id"], b["id"]]
    assert ids(raw_params={"item:like": "ami-0f*"}) == [c["id"]]
    assert ids(item="ami-00000000") == []


@integration
def test_since_filters_on_submit_time(rdb: ResultsDBServer, client: ResultsDBapi) -> None:
    for day in (1, 2, 3):
        answer = post_raw(
            rdb,
            {
                "outcome": "PASSED",
                "testcase": "t",
                "data": {"item": AMI},
                "submit_time": f"2026-01-0{day}T12:00:00.000000Z",
            },
        )
        assert answer.status_code == 201
        assert answer.json()["submit_time"] == f"2026-01-0{day}T12:00:00"
    times = [r["submit_time"] for r in client.get_results(since="2026-01-02")["data"]]
    assert times == ["2026-01-03T12:00:00", "2026-01-02T12:00:00"]
    times = [r["submit_time"] for r in client.get_results(since="2026-01-01,2026-01-02")["data"]]
    assert times == ["2026-01-01T12:00:00"]
    asc = client.get_results(raw_params={"_sort": "asc:submit_time"})["data"]
    assert [r["submit_time"][:10] for r in asc] == ["2026-01-01", "2026-01-02", "2026-01-03"]
    error = api_error(lambda: client.get_results(since="not a date"))
    assert error.response is not None and error.response.status_code == 400


@integration
def test_pagination_walks_every_result_once(rdb: ResultsDBServer, client: ResultsDBapi) -> None:
    created = [client.create_result("PASSED", f"t{n % 3}", item=AMI)["id"] for n in range(7)]
    first = client.get_results(item=AMI, limit=3)
    assert first["prev"] is None
    seen: list[int] = []
    page = first
    pages = 0
    while True:
        pages += 1
        seen.extend(r["id"] for r in page["data"])
        if page["next"] is None:
            break
        page = client.session.get(page["next"]).json()
        assert page["prev"] is not None
    assert pages == 3
    assert seen == list(reversed(created))
    # The default page size is the real server's 20.
    default = client.get_results()
    assert len(default["data"]) == 7 and default["next"] is None


@integration
def test_latest_is_the_newest_result_per_testcase(
    rdb: ResultsDBServer, client: ResultsDBapi
) -> None:
    client.create_result("FAILED", "autocloud.ami.boot", item=AMI, type="ami")
    boot = client.create_result("PASSED", "autocloud.ami.boot", item=AMI, type="ami")
    ssh = client.create_result("FAILED", "autocloud.ami.ssh", item=AMI, type="ami")
    client.create_result("PASSED", "autocloud.ami.ssh", item=OTHER_AMI, type="ami")
    client.create_result("PASSED", "autocloud.ami.ssh", item=AMI, type="aws_ami")

    def latest(**params: str) -> list[tuple[str, int]]:
        answer = client.session.get(f"{rdb.url}/results/latest", params=params).json()
        assert set(answer) == {"data"}
        return [(r["testcase"]["name"], r["id"]) for r in answer["data"]]

    assert latest(item=AMI, type="ami") == [
        ("autocloud.ami.ssh", ssh["id"]),
        ("autocloud.ami.boot", boot["id"]),
    ]
    assert latest(item=AMI, type="ami", testcases="autocloud.ami.boot") == [
        ("autocloud.ami.boot", boot["id"])
    ]
    assert latest(item=AMI, type="ami", **{"testcases:like": "*.ssh"}) == [
        ("autocloud.ami.ssh", ssh["id"])
    ]
    # As on the real server, `outcome` does not filter /results/latest.
    assert latest(item=AMI, type="ami", outcome="PASSED") == latest(item=AMI, type="ami")
    assert latest(item="ami-00000000") == []


@integration
@pytest.mark.parametrize(
    "body",
    [
        {"outcome": "GREAT", "testcase": "t"},
        {"outcome": "PASSED"},
        {"outcome": "PASSED", "testcase": "t", "data": {"item": 1}},
        {"outcome": "PASSED", "testcase": "t", "datta": {"item": AMI}},
    ],
)
def test_bad_posts_are_400_and_store_nothing(
    rdb: ResultsDBServer, client: ResultsDBapi, recorder: Any, body: dict[str, Any]
) -> None:
    answer = post_raw(rdb, body)
    assert answer.status_code == 400
    assert answer.json()["message"]
    assert answer.json()["validation_error"]
    assert client.get_results()["data"] == []
    assert recorder.sent == []


@integration
def test_client_raises_on_bad_input(rdb: ResultsDBServer, client: ResultsDBapi) -> None:
    for call in (
        lambda: client.create_result("GREAT", "t"),
        lambda: client.create_result("PASSED", None),
        lambda: client.create_result("PASSED", "t", item=5),
        lambda: client.create_result("PASSED", "t", item=["a", None]),
        lambda: client.create_result("PASSED", "t", **{"bad:key": "x"}),
        lambda: client.create_testcase(""),
        lambda: client.create_group(uuid="x" * 40),
    ):
        error = api_error(call)
        assert error.response is not None and error.response.status_code == 400
    assert rdb.request_count("POST") == 7  # 400 is not retried
    assert client.get_results()["data"] == []


@integration
def test_unknown_ids_and_paths_are_404(rdb: ResultsDBServer, client: ResultsDBapi) -> None:
    for call in (
        lambda: client.get_result(999),
        lambda: client.get_result("abc"),
        lambda: client.get_group("no-such-group"),
        lambda: client.get_testcase("no.such.testcase"),
    ):
        error = api_error(call)
        assert error.response is not None and error.response.status_code == 404
    answer = requests.get(f"{rdb.url}/nothing-here", timeout=10)
    assert answer.status_code == 404 and answer.json() == {"message": "Not found"}
    answer = requests.delete(f"{rdb.url}/results", timeout=10)
    assert answer.status_code == 405


@integration
def test_down_answers_503_until_up_and_the_client_retries(
    rdb: ResultsDBServer, client: ResultsDBapi
) -> None:
    rdb.set_down(True)
    error = api_error(client.get_results)
    assert error.response is None  # the client gave up after its retries
    assert rdb.request_count("GET", "/results") == 3  # 1 + max_retries
    health = requests.get(f"{rdb.url}/healthcheck", timeout=10)
    assert health.status_code == 503
    rdb.set_down(False)
    assert client.get_results()["data"] == []


@integration
def test_fail_next_is_retried_through_and_reject_next_is_not(
    rdb: ResultsDBServer, client: ResultsDBapi, recorder: Any
) -> None:
    rdb.fail_next(2, status=502)
    created = client.create_result("PASSED", "t", item=AMI)  # the client retries POST too
    assert created["id"] == 1
    assert rdb.request_count("POST") == 3
    rdb.reject_next(1)
    error = api_error(lambda: client.get_result(1))
    assert error.response is not None and error.response.status_code == 400
    assert client.get_result(1)["id"] == 1
    assert len(recorder.sent) == 1


@integration
def test_groups_endpoints(rdb: ResultsDBServer, client: ResultsDBapi) -> None:
    group = client.create_group(uuid="compose-1", ref_url="https://kojipkgs/compose")
    assert group["uuid"] == "compose-1"
    assert group["href"] == f"{rdb.url}/groups/compose-1"
    assert group["results_count"] == 0
    updated = client.update_group("compose-1", description="Fedora-Cloud-41-20260101.0")
    assert updated["ref_url"] == "https://kojipkgs/compose"
    assert updated["description"] == "Fedora-Cloud-41-20260101.0"
    generated = client.create_group(description="kind x86_64")
    assert re.match(r"^[0-9a-f-]{36}$", generated["uuid"])
    client.create_result("PASSED", "t", groups=["compose-1"], item=AMI)
    assert client.get_group("compose-1")["results_count"] == 1
    listed = client.get_groups()
    assert [g["uuid"] for g in listed["data"]] == [generated["uuid"], "compose-1"]
    assert [g["uuid"] for g in client.get_groups(uuid="compose-1")["data"]] == ["compose-1"]
    liked = client.get_groups(description_like="Fedora-Cloud-*")["data"]
    assert [g["uuid"] for g in liked] == ["compose-1"]
    in_group = client.session.get(client.get_group("compose-1")["results"]).json()
    assert [r["groups"] for r in in_group["data"]] == [["compose-1"]]
    assert len(client.get_results(groups="compose-1")["data"]) == 1


@integration
def test_testcases_endpoints(rdb: ResultsDBServer, client: ResultsDBapi) -> None:
    made = client.create_testcase("autocloud.ami.all", ref_url="https://tc/all")
    assert made == {
        "name": "autocloud.ami.all",
        "ref_url": "https://tc/all",
        "href": f"{rdb.url}/testcases/autocloud.ami.all",
    }
    for name in ("compose.cloud.all", "autocloud.ami.boot"):
        client.create_testcase(name)
    names = [t["name"] for t in client.get_testcases()["data"]]
    assert names == ["autocloud.ami.all", "autocloud.ami.boot", "compose.cloud.all"]
    assert [t["name"] for t in client.get_testcases(name_like="autocloud.*")["data"]] == [
        "autocloud.ami.all",
        "autocloud.ami.boot",
    ]
    first = client.get_testcases(limit=2)
    assert first["next"] is not None
    assert [t["name"] for t in client.session.get(first["next"]).json()["data"]] == [
        "compose.cloud.all"
    ]
    assert client.update_testcase("autocloud.ami.all", url="https://tc/v2")["ref_url"] == (
        "https://tc/v2"
    )
    client.create_result("PASSED", "compose.cloud.all", item=AMI)
    results = client.session.get(f"{rdb.url}/testcases/compose.cloud.all/results").json()
    assert [r["testcase"]["name"] for r in results["data"]] == ["compose.cloud.all"]


@integration
def test_healthcheck_and_landing(rdb: ResultsDBServer) -> None:
    health = requests.get(f"{rdb.url}/healthcheck", timeout=10)
    assert health.status_code == 200
    assert health.json() == {"message": "Health check OK"}
    landing = requests.get(rdb.url, timeout=10, allow_redirects=False)
    assert landing.status_code == 300
    assert landing.json()["outcomes"] == ["PASSED", "INFO", "FAILED", "NEEDS_INSPECTION"]


@integration
def test_sqlite_file_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "resultsdb.sqlite"
    with ResultsDBServer(db_path=db) as first:
        created = ResultsDBapi(first.url).create_result("PASSED", "t", item=AMI)
    with ResultsDBServer(db_path=db) as second:
        again = ResultsDBapi(second.url).get_result(created["id"])
        nxt = ResultsDBapi(second.url).create_result("FAILED", "t", item=AMI)
    assert {k: again[k] for k in ("outcome", "data", "submit_time", "groups")} == {
        k: created[k] for k in ("outcome", "data", "submit_time", "groups")
    }
    assert nxt["id"] == created["id"] + 1


@integration
def test_a_failing_publisher_does_not_fail_the_post(caplog: Any) -> None:
    def publish(modname: str, topic: str, body: dict[str, Any]) -> None:
        raise OSError("relay unreachable")

    caplog.set_level(logging.ERROR, logger="devel.resultsdb")
    with ResultsDBServer(publisher=publish) as rdb:
        client = ResultsDBapi(rdb.url, max_retries=0)
        created = client.create_result("PASSED", "t", item=AMI)
        assert client.get_result(created["id"])["outcome"] == "PASSED"
    assert any(r.levelno == logging.ERROR for r in caplog.records)


@integration
def test_concurrent_posts_get_distinct_ids(rdb: ResultsDBServer, recorder: Any) -> None:
    errors: list[Exception] = []

    def post(worker: int) -> None:
        client = ResultsDBapi(rdb.url, max_retries=0)
        try:
            for n in range(10):
                client.create_result("PASSED", f"t{worker}", item=AMI, n=str(n))
        except (ResultsDBapiException, requests.RequestException) as exc:  # asserted below
            errors.append(exc)

    workers = [threading.Thread(target=post, args=(w,)) for w in range(6)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(30)
    assert errors == []
    ids = [b["id"] for b in recorder.bodies("resultsdb.result.new")]
    assert sorted(ids) == list(range(1, 61))
    stored = ResultsDBapi(rdb.url).get_results(limit=100)["data"]
    assert len(stored) == 60


# -- as a process on a real bus ---------------------------------------------------------


@integration
def test_process_publishes_result_new_on_the_bus(local_bus: Any, tmp_path: Path) -> None:
    port = free_port()
    env = local_bus.env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = local_bus.spawn(
        "resultsdb",
        [
            sys.executable,
            "-m",
            "devel.resultsdb",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--db",
            str(tmp_path / "resultsdb.sqlite"),
        ],
        env=env,
    )

    def listening() -> bool:
        if not proc.alive:
            raise RuntimeError(f"stand-in exited:\n{proc.output()[-4000:]}")
        return "ResultsDB stand-in listening on" in proc.output()

    wait_until(listening, 30, "the ResultsDB stand-in")
    url = f"http://127.0.0.1:{port}/api/v2.0"
    assert url in proc.output()
    created = ResultsDBapi(url).create_result(
        "FAILED",
        "autocloud.ami.all",
        note="2 of 12 tests failed",
        item=AMI,
        type="ami",
        region="us-east-1",
    )
    seen = local_bus.tap.wait_for(
        "resultsdb.result.new", lambda body: body.get("id") == created["id"], timeout=30
    )
    assert seen.topic == "org.fedoraproject.dev.resultsdb.result.new"
    assert seen.body == created
    assert seen.body["data"]["item"] == [AMI]
    RESULT_NEW.validate(seen.body)
    assert proc.stop() == 0  # SIGTERM stops it cleanly
