"""Target regions: configured, or every usable commercial region, never the staging one."""

from __future__ import annotations

import logging

import boto3
import pytest
from moto import mock_aws

from fedimg.config import FedimgConfig
from fedimg.regions import commercial, in_commercial_partition, target_regions


def cfg(**settings: object) -> FedimgConfig:
    return FedimgConfig.from_fedmsg(
        {"fedimg.resultsdb_url": "http://rdb.test/api/v2.0", **settings}
    )


def test_commercial_drops_other_partitions_and_regions_not_opted_in() -> None:
    answer = [
        {"RegionName": "us-east-1", "OptInStatus": "opt-in-not-required"},
        {"RegionName": "af-south-1", "OptInStatus": "opted-in"},
        {"RegionName": "ap-east-1", "OptInStatus": "not-opted-in"},
        {"RegionName": "cn-north-1", "OptInStatus": "opt-in-not-required"},
        {"RegionName": "us-gov-west-1", "OptInStatus": "opt-in-not-required"},
        {"RegionName": "us-iso-east-1"},
        {"RegionName": "eu-west-1"},  # older answers carry no OptInStatus
        {"RegionName": "eu-west-1"},
        {"RegionName": "not a region"},
        {},
    ]
    assert commercial(answer) == ["af-south-1", "eu-west-1", "us-east-1"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("eu-central-2", True),
        ("cn-northwest-1", False),
        ("us-gov-east-1", False),
        ("us-isob-east-1", False),
        ("EU-WEST-1", False),
        ("", False),
    ],
)
def test_in_commercial_partition(name: str, expected: bool) -> None:
    assert in_commercial_partition(name) is expected


@mock_aws
def test_discovered_regions_exclude_staging_china_govcloud_and_not_opted_in() -> None:
    ec2 = boto3.client("ec2", region_name="us-east-1")
    regions = target_regions(cfg(), ec2)
    everything = {r["RegionName"]: r for r in ec2.describe_regions(AllRegions=True)["Regions"]}
    assert "us-east-1" not in regions
    assert regions == sorted(regions)
    assert "us-west-2" in regions and "eu-west-1" in regions
    for name in regions:
        assert not name.startswith(("cn-", "us-gov-"))
        assert everything[name]["OptInStatus"] in ("opt-in-not-required", "opted-in")
    not_opted = [n for n, r in everything.items() if r["OptInStatus"] == "not-opted-in"]
    assert not_opted and not set(not_opted) & set(regions)


def test_describe_regions_is_asked_for_enabled_regions_only() -> None:
    calls = []

    class Ec2:
        def describe_regions(self, **kwargs: object) -> dict:
            calls.append(kwargs)
            return {"Regions": [{"RegionName": "eu-west-1", "OptInStatus": "opted-in"}]}

    assert target_regions(cfg(), Ec2()) == ["eu-west-1"]
    assert calls == [{"AllRegions": False}]


def test_configured_regions_win_minus_staging_without_asking_aws(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class NoCalls:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"unexpected AWS call {name}")

    config = cfg(
        **{
            "fedimg.aws.regions": ["eu-west-1", "us-east-1", "eu-west-1", "cn-north-1"],
            "fedimg.aws.staging_region": "us-east-1",
        }
    )
    with caplog.at_level(logging.WARNING, logger="fedimg.regions"):
        assert target_regions(config, NoCalls()) == ["eu-west-1"]
    assert any(r.levelno == logging.WARNING for r in caplog.records)


@mock_aws
def test_staging_region_elsewhere_is_removed_from_the_discovered_list() -> None:
    ec2 = boto3.client("ec2", region_name="eu-west-1")
    regions = target_regions(cfg(**{"fedimg.aws.staging_region": "eu-west-1"}), ec2)
    assert "eu-west-1" not in regions and "us-east-1" in regions
