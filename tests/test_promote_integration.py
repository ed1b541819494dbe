"""The real fedmsg-hub with PromoteConsumer, a real moto_server and the ResultsDB stand-in.

A result posted to the stand-in (a separate process on the same bus, which
publishes ``resultsdb.result.new`` like the real server) makes the hub's
promote consumer look the AMI up in moto, read ResultsDB and copy/publish (or
reject) exactly as in production; every process talks over loopback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import resultsdb_api

from devel.bus import LocalBus, free_port, wait_for_port, wait_until
from devel.motoserver import MotoServer
from fedimg import tags
from fedimg.messages import IMAGE_PUBLISH, IMAGE_RELEASE, IMAGE_TEST
from tests.e2e_support import ami_in_testing

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
STAGING = "us-east-1"
TARGETS = ["eu-west-1", "us-west-2"]
TESTCASE = "autocloud.ami.all"


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, Any]]:
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")  # read by moto_server at start
    port = free_port()
    rdb_url = f"http://127.0.0.1:{port}/api/v2.0"
    with MotoServer() as moto:
        settings = {
            "fedimg.promote.enabled": True,
            "fedimg.resultsdb_url": rdb_url,
            "fedimg.aws.staging_region": STAGING,
            "fedimg.aws.regions": TARGETS,
        }
        env = {**moto.env(), "PYTHONPATH": str(REPO)}
        with LocalBus(settings=settings, extra_env=env) as bus:
            rdb = bus.spawn(
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
            )
            wait_for_port("127.0.0.1", port, 30, "the ResultsDB stand-in")
            hub = bus.start_hub()
            yield {"bus": bus, "moto": moto, "rdb_url": rdb_url, "hub": hub, "rdb": rdb}


def ec2(moto: MotoServer, region: str) -> Any:
    return boto3.client(
        "ec2",
        region_name=region,
        endpoint_url=moto.url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def stage(moto: MotoServer, n: int) -> str:
    """A staged AMI in moto_server, tagged as fedimg's stage tags it."""
    return ami_in_testing(ec2(moto, STAGING), n)


def copies(moto: MotoServer, region: str, ami: str) -> list[dict[str, Any]]:
    return ec2(moto, region).describe_images(
        Owners=["self"], Filters=[{"Name": f"tag:{tags.SOURCE_AMI}", "Values": [ami]}]
    )["Images"]


def state(moto: MotoServer, ami: str) -> str | None:
    image = ec2(moto, STAGING).describe_images(ImageIds=[ami])["Images"][0]
    return tags.as_dict(image.get("Tags")).get(tags.STATE)


def test_passed_result_in_resultsdb_releases_and_failed_rejects(stack: dict[str, Any]) -> None:
    bus, moto = stack["bus"], stack["moto"]
    client = resultsdb_api.ResultsDBapi(stack["rdb_url"])
    good, bad = stage(moto, 1), stage(moto, 2)

    client.create_result(
        outcome="PASSED", testcase=TESTCASE, item=good, type="ami", note="21 passed"
    )
    client.create_result(
        outcome="FAILED", testcase=TESTCASE, item=bad, type="ami", note="selinux: Permissive"
    )

    # The stand-in announced both results on the bus, in the modern shape.
    notes = bus.tap.wait_for("resultsdb.result.new", lambda b: b["data"]["item"] == [bad], 30)
    assert notes.body["outcome"] == "FAILED"

    release = bus.tap.wait_for(
        "fedimg.image.release", lambda b: b["regions"].get(STAGING) == good, timeout=90
    )
    IMAGE_RELEASE.validate(release.body)
    assert set(release.body["regions"]) == {*TARGETS, STAGING}
    assert "failed_regions" not in release.body
    for region in TARGETS:
        (copy,) = copies(moto, region, good)
        assert release.body["regions"][region] == copy["ImageId"]
        perms = ec2(moto, region).describe_image_attribute(
            ImageId=copy["ImageId"], Attribute="launchPermission"
        )["LaunchPermissions"]
        assert {"Group": "all"} in perms
    published = {
        m.body["destination"]: m.body
        for m in bus.tap.messages("fedimg.image.publish")
        if m.body["extra"]["id"] in release.body["regions"].values()
    }
    assert set(published) == {*TARGETS, STAGING}
    for body in published.values():
        IMAGE_PUBLISH.validate(body)
    assert len(bus.tap.messages("fedimg.image.copy")) == len(TARGETS)
    # The release is announced (here and as fedora_image_uploader's message) before
    # the state tag is written: the tag follows, it is not there with the message.
    wait_until(lambda: state(moto, good) == "released", 30, "the released state tag")

    failed = bus.tap.wait_for(
        "fedimg.image.test",
        lambda b: b["status"] == "failed" and b["extra"].get("id") == bad,
        timeout=60,
    )
    IMAGE_TEST.validate(failed.body)
    assert TESTCASE in failed.body["reason"] and "Permissive" in failed.body["reason"]
    wait_until(lambda: state(moto, bad) == "rejected", 30, f"{bad} tagged rejected")
    for region in TARGETS:
        assert copies(moto, region, bad) == []
    perms = ec2(moto, STAGING).describe_image_attribute(ImageId=bad, Attribute="launchPermission")[
        "LaunchPermissions"
    ]
    assert perms == []
    assert stack["hub"].alive and stack["rdb"].alive
