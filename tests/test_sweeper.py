"""The leak sweeper on moto: only expired autocloud-tagged resources go."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from moto import mock_aws

from autocloud_ami.instance import TAG_DEADLINE, TAG_JOB, TAG_TEST, format_deadline, tag_specs
from autocloud_ami.sweeper import Tagged, expired, sweep, sweep_region
from tests.test_instance import REGION, SESSION, fail_calls, leftovers, register_ami

NOW = datetime.now(UTC)
PAST = format_deadline(NOW - timedelta(minutes=5))
FUTURE = format_deadline(NOW + timedelta(hours=1))
HOUR = 3600.0


@pytest.fixture
def ec2() -> Iterator[Any]:
    with mock_aws():
        yield SESSION.client("ec2", region_name=REGION)


def leak(ec2: Any, job: str, deadline: str | None, ami: str) -> dict[str, str]:
    """A key pair, a group and an instance as a crashed run would leave them."""
    tags = {TAG_TEST: ami, TAG_JOB: job}
    if deadline is not None:
        tags[TAG_DEADLINE] = deadline
    name = f"autocloud-{job}"
    ec2.create_key_pair(KeyName=name, TagSpecifications=tag_specs(("key-pair",), tags))
    group = ec2.create_security_group(
        GroupName=name, Description="leak", TagSpecifications=tag_specs(("security-group",), tags)
    )["GroupId"]
    instance = ec2.run_instances(
        ImageId=ami,
        MinCount=1,
        MaxCount=1,
        InstanceType="t3.small",
        KeyName=name,
        SecurityGroupIds=[group],
        TagSpecifications=tag_specs(("instance",), tags),
    )["Instances"][0]["InstanceId"]
    return {"key": name, "group": group, "instance": instance}


def test_sweeps_only_expired_tagged_resources(ec2: Any) -> None:
    ami = register_ami(ec2)
    old = leak(ec2, "old", PAST, ami)
    fresh = leak(ec2, "fresh", FUTURE, ami)
    # Someone else's resources, untagged: never touched.
    ec2.create_key_pair(KeyName="release-engineering")
    other = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]

    report = sweep(lambda region: ec2, [REGION], lifetime=HOUR, poll=0.05)

    assert report.terminated == [old["instance"]]
    assert report.key_pairs == [old["key"]]
    assert report.security_groups == [old["group"]]
    assert report.kept == 3 and report.errors == []
    left = leftovers(ec2)
    assert left["instances"] == [fresh["instance"]]
    assert sorted(left["key_pairs"]) == sorted([fresh["key"], "release-engineering"])
    assert left["security_groups"] == [fresh["group"]]
    state = ec2.describe_instances(InstanceIds=[other])["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] == "running"

    # A second sweep has nothing left to do.
    again = sweep_region(ec2, REGION, lifetime=HOUR, poll=0.05)
    assert again.removed == 0 and again.kept == 3


def test_missing_deadline_falls_back_to_age_and_groups_without_age_stay(ec2: Any) -> None:
    ami = register_ami(ec2)
    leaked = leak(ec2, "nodeadline", None, ami)
    young = sweep_region(ec2, REGION, lifetime=HOUR, poll=0.05)
    assert young.removed == 0

    later = datetime.now(UTC) + timedelta(hours=2)
    report = sweep_region(ec2, REGION, lifetime=HOUR, now=later, poll=0.05)
    assert report.terminated == [leaked["instance"]]
    assert report.key_pairs == [leaked["key"]]
    # A group has no creation time: with no readable deadline nothing says it is over.
    assert report.security_groups == []
    assert leftovers(ec2)["security_groups"] == [leaked["group"]]


def test_group_still_in_use_goes_at_the_next_sweep(ec2: Any) -> None:
    ami = register_ami(ec2)
    leaked = leak(ec2, "busy", PAST, ami)
    fail_calls(ec2, "DeleteSecurityGroup", "DependencyViolation", times=1)
    first = sweep_region(ec2, REGION, lifetime=HOUR, poll=0.05)
    assert first.terminated == [leaked["instance"]]
    assert first.security_groups == [] and first.errors == []
    second = sweep_region(ec2, REGION, lifetime=HOUR, poll=0.05)
    assert second.security_groups == [leaked["group"]]
    assert leftovers(ec2) == {"instances": [], "key_pairs": [], "security_groups": []}


def test_aws_errors_are_reported_not_raised(ec2: Any, caplog: pytest.LogCaptureFixture) -> None:
    ami = register_ami(ec2)
    leak(ec2, "stuck", PAST, ami)
    fail_calls(ec2, "TerminateInstances", "UnauthorizedOperation")
    fail_calls(ec2, "DeleteKeyPair", "UnauthorizedOperation")
    report = sweep_region(ec2, REGION, lifetime=HOUR, poll=0.05)
    assert len(report.errors) == 2
    assert all("UnauthorizedOperation" in e for e in report.errors)
    assert any(r.levelname == "ERROR" for r in caplog.records)

    fail_calls(ec2, "DescribeInstances", "RequestLimitExceeded")
    listing = sweep_region(ec2, REGION, lifetime=HOUR, poll=0.05)
    assert listing.removed == 0 and "listing" in listing.errors[0]


def test_every_configured_region_is_swept(ec2: Any) -> None:
    west = SESSION.client("ec2", region_name="eu-west-1")
    ami_west = register_ami(west)
    leaked = leak(west, "west", PAST, ami_west)
    clients = {REGION: ec2, "eu-west-1": west}
    report = sweep(clients.__getitem__, [REGION, "eu-west-1"], lifetime=HOUR, poll=0.05)
    assert report.terminated == [leaked["instance"]]


@pytest.mark.parametrize(
    ("tags", "created", "expected"),
    [
        ({TAG_TEST: "ami-1", TAG_DEADLINE: PAST}, None, True),
        ({TAG_TEST: "ami-1", TAG_DEADLINE: FUTURE}, None, False),
        ({TAG_TEST: "ami-1", TAG_DEADLINE: FUTURE}, NOW - timedelta(days=9), False),
        ({TAG_TEST: "ami-1", TAG_DEADLINE: "garbage"}, NOW - timedelta(hours=2), True),
        ({TAG_TEST: "ami-1", TAG_DEADLINE: "garbage"}, NOW - timedelta(minutes=2), False),
        ({TAG_TEST: "ami-1"}, None, False),
        ({TAG_TEST: "ami-1"}, (NOW - timedelta(hours=2)).replace(tzinfo=None), True),
        ({TAG_DEADLINE: PAST}, NOW - timedelta(days=9), False),  # not ours
    ],
)
def test_expired(tags: dict[str, str], created: datetime | None, expected: bool) -> None:
    item = Tagged("instance", "i-1", tags, created)
    assert expired(item, NOW, timedelta(hours=1)) is expected


# -- the moksha producer ------------------------------------------------------------------


class FakeHub:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config


def test_sweep_producer_is_off_unless_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    import moksha.hub.reactor

    from autocloud_ami.consumer import SweepProducer

    started: list[Any] = []
    monkeypatch.setattr(moksha.hub.reactor.reactor, "callInThread", started.append)
    producer = SweepProducer(FakeHub({"autocloud_ami.enabled": False}))
    assert not getattr(producer, "_initialized", False) and started == []


def test_sweep_producer_sweeps_and_flushes_and_never_raises(
    ec2: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moksha.hub.reactor

    from autocloud_ami.consumer import SweepProducer
    from autocloud_ami.report import Spool, build_results
    from devel.resultsdb import ResultsDBServer
    from fedimg.messages import StagedImage

    started: list[Any] = []
    monkeypatch.setattr(moksha.hub.reactor.reactor, "callInThread", started.append)
    ami = register_ami(ec2)
    leaked = leak(ec2, "crashed", PAST, ami)
    with ResultsDBServer() as rdb:
        config = {
            "autocloud_ami.enabled": True,
            "autocloud_ami.resultsdb_url": rdb.url,
            "autocloud_ami.resultsdb_spool": str(tmp_path),
            "autocloud_ami.ssh_cidr": "203.0.113.7/32",
            "autocloud_ami.sweep_interval": 42.0,
            "autocloud_ami.poll_interval": 0.05,
        }
        image = StagedImage("Fedora-41-1", "Fedora-Cloud-Base-41", "", "x86_64", REGION, ami)
        for result in build_results(
            image, [], job_id="j", family="Base", scenario="x86_64:t3.small"
        ):
            Spool(tmp_path).add(result)
        producer = SweepProducer(FakeHub(config))
        assert producer.frequency == 42.0 and producer.now is True
        assert started == [producer._work]  # polled in a thread: the hub is not held up
        producer.poll()
        from resultsdb_api import ResultsDBapi

        posted = ResultsDBapi(rdb.url).get_results(item=ami, type="ami")["data"]
        assert [r["testcase"]["name"] for r in posted] == ["autocloud.ami.all"]
    assert leftovers(ec2)["instances"] == []
    assert leaked["key"] not in leftovers(ec2)["key_pairs"]
    assert Spool(tmp_path).pending() == []

    def broken(region: str) -> Any:
        raise RuntimeError("no AWS today")

    producer.aws.ec2 = broken  # type: ignore[method-assign]
    producer.poll()  # logged, not raised: moksha's poll thread would die
