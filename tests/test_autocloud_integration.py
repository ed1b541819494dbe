"""The real fedmsg-hub running AmiTestConsumer from its entry point, end to end.

moto_server stands in for EC2 (AWS_ENDPOINT_URL), devel.sshhost for the
booted instance (autocloud_ami.ssh_override), and ``python -m devel.resultsdb``
for ResultsDB, publishing ``resultsdb.result.new`` on the same loopback bus.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from resultsdb_api import ResultsDBapi

from devel.bus import BIN, LocalBus, ManagedProcess, free_port, wait_for_port, write_fedmsg_config
from devel.motoserver import MotoServer
from devel.sshhost import SshTestHost
from fedimg.messages import (
    AMI_QUEUED,
    AMI_RUNNING,
    AMI_SUCCESS,
    RESULT_NEW,
    StagedImage,
    image_event,
)

pytestmark = pytest.mark.integration

REGION = "us-east-1"
COMPOSE = "Fedora-41-20261124.0"


def settings(rdb_port: int, ssh_port: int, spool: Path) -> dict[str, Any]:
    return {
        "autocloud_ami.enabled": True,
        "autocloud_ami.resultsdb_url": f"http://127.0.0.1:{rdb_port}/api/v2.0",
        "autocloud_ami.resultsdb_spool": str(spool),
        "autocloud_ami.resultsdb_backoff": 0.1,
        "autocloud_ami.ssh_cidr": "127.0.0.1/32",
        "autocloud_ami.ssh_override": f"127.0.0.1:{ssh_port}",
        "autocloud_ami.regions": [REGION],
        "autocloud_ami.host_key_wait": 0.0,
        "autocloud_ami.poll_interval": 0.1,
        "autocloud_ami.boot_timeout": 30.0,
        "autocloud_ami.ssh_timeout": 10.0,
        "autocloud_ami.reboot_timeout": 20.0,
        "autocloud_ami.launch_retry_timeout": 0.0,
        "autocloud_ami.deadline": 600.0,
    }


def staged_ami(moto: MotoServer, subvariant: str = "Cloud_Base") -> StagedImage:
    """An AMI in moto_server carrying fedimg's tags, as fedimg stage leaves it."""
    ec2 = boto3.client(
        "ec2",
        region_name=REGION,
        endpoint_url=moto.url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    name = f"Fedora-Cloud-Base-41-20261124.0.x86_64-{free_port()}"
    ami = ec2.register_image(Name=name, RootDeviceName="/dev/sda1")["ImageId"]
    image = StagedImage(
        compose_id=COMPOSE,
        image_name=name,
        image_url=f"https://kojipkgs.fedoraproject.org/compose/41/{COMPOSE}/compose/Cloud/"
        f"x86_64/images/{name}.raw.xz",
        architecture="x86_64",
        region=REGION,
        ami_id=ami,
        subvariant=subvariant,
        release="41",
    )
    tags = {
        "fedimg:compose-id": image.compose_id,
        "fedimg:image-name": image.image_name,
        "fedimg:image-url": image.image_url,
        "fedimg:arch": image.architecture,
        "fedimg:subvariant": image.subvariant,
        "fedimg:release": image.release,
        "fedimg:state": "testing",
    }
    # moto drops TagSpecifications on register_image: tag afterwards.
    ec2.create_tags(Resources=[ami], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
    return image


class Stack:
    def __init__(
        self, bus: LocalBus, moto: MotoServer, ssh: SshTestHost, rdb_port: int, hub: ManagedProcess
    ) -> None:
        self.bus = bus
        self.hub = hub
        self.moto = moto
        self.ssh = ssh
        self.rdb_port = rdb_port
        self.rdb_url = f"http://127.0.0.1:{rdb_port}/api/v2.0"

    def results(self, ami: str) -> list[dict[str, Any]]:
        found = ResultsDBapi(self.rdb_url).get_results(item=ami, type="ami", limit=100)["data"]
        return sorted(found, key=lambda r: r["id"])

    def cli(
        self, *args: str, config: dict[str, Any] | None = None, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        env = self.bus.env()
        assert self.bus.workdir is not None
        cwd = self.bus.workdir
        if config is not None:
            other = self.bus.workdir / f"cli-{free_port()}"
            env["FEDMSG_CONFIG"] = str(write_fedmsg_config(other, config))
            cwd = other
        return subprocess.run(
            [str(BIN / "autocloud-ami"), *args],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    spool = tmp_path_factory.mktemp("spool")
    rdb_port = free_port()
    with (
        MotoServer() as moto,
        SshTestHost(family="Base", accept_any_key=True, reboot_delay=0.2) as ssh,
        LocalBus(settings=settings(rdb_port, ssh.port, spool), extra_env=moto.env()) as bus,
    ):
        assert bus.workdir is not None
        bus.spawn(
            "resultsdb",
            [
                sys.executable,
                "-m",
                "devel.resultsdb",
                "--host",
                "127.0.0.1",
                "--port",
                str(rdb_port),
                "--db",
                str(bus.workdir / "resultsdb.sqlite"),
            ],
            env={**bus.env(), "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        wait_for_port("127.0.0.1", rdb_port, 30, "the ResultsDB stand-in")
        hub = bus.start_hub()
        yield Stack(bus, moto, ssh, rdb_port, hub)


def test_test_request_on_the_bus_produces_results_and_messages(stack: Stack) -> None:
    image = staged_ami(stack.moto)
    ami = image.ami_id
    stack.bus.publish("fedimg", "image.test", image_event(image, "started"))
    tap = stack.bus.tap
    assert tap is not None

    done = tap.wait_for("autocloud.ami.success", lambda b: b.get("ami_id") == ami, timeout=120)
    AMI_SUCCESS.validate(done.body)
    job_id = done.body["job_id"]
    mine = [
        m
        for m in tap.messages()
        if m.topic.split(".autocloud.ami.")[-1] in ("queued", "running", "success", "failed")
        and m.body.get("job_id") == job_id
    ]
    assert [m.topic.rsplit(".", 1)[-1] for m in mine] == ["queued", "running", "success"]
    AMI_QUEUED.validate(mine[0].body)
    AMI_RUNNING.validate(mine[1].body)
    assert done.topic == "org.fedoraproject.dev.autocloud.ami.success"

    summary = tap.wait_for(
        "resultsdb.result.new",
        lambda b: b["testcase"]["name"] == "autocloud.ami.all" and b["data"]["item"] == [ami],
        timeout=60,
    )
    RESULT_NEW.validate(summary.body)
    assert summary.body["outcome"] == "PASSED"
    assert summary.body["data"]["type"] == ["ami"]

    found = stack.results(ami or "")
    assert found[-1]["testcase"]["name"] == "autocloud.ami.all"
    assert {r["data"]["job_id"][0] for r in found} == {job_id}
    per_test = [r for r in found if r["testcase"]["name"] != "autocloud.ami.all"]
    assert len(per_test) >= 15
    # Tests that do not apply to Cloud Base (Atomic's) are INFO, the reason in "skipped".
    info = [r for r in per_test if r["outcome"] == "INFO"]
    assert "autocloud.ami.docker_installed" in {r["testcase"]["name"] for r in info}
    assert all(r["data"]["skipped"][0] for r in info)
    assert all(r["outcome"] in ("PASSED", "FAILED", "INFO") for r in per_test)
    # One scenario per architecture by default; Fedora's conventions on every result.
    assert {r["data"]["scenario"][0] for r in found} == {"x86_64:t3.small"}
    assert {r["data"]["productmd.image.subvariant"][0] for r in found} == {"Cloud_Base"}
    assert {r["data"]["meta.conventions"][0] for r in found} == {
        "result productmd.compose productmd.image"
    }
    new_messages = [
        m for m in tap.messages("resultsdb.result.new") if m.body["data"]["item"] == [ami]
    ]
    assert len(new_messages) == len(found)


def test_bad_requests_leave_the_hub_alive(stack: Stack) -> None:
    bus = stack.bus
    bus.publish("fedimg", "image.test", {"status": "started", "nonsense": True})
    image = staged_ami(stack.moto)
    body = image_event(image, "started")
    body["destination"] = "eu-west-1"  # a region this runner does not test
    bus.publish("fedimg", "image.test", body)
    bus.publish("fedimg", "image.test", image_event(image, "completed"))  # not a request
    bus.wait_hub(stack.hub, timeout=30)
    output = stack.hub.output()
    assert "rejected malformed message" in output
    assert "refused test request" in output
    assert stack.results(image.ami_id or "") == []


def test_cli_prints_the_table_and_exits_by_the_summary(stack: Stack) -> None:
    image = staged_ami(stack.moto)
    ok = stack.cli("test", image.ami_id or "", "--region", REGION)
    assert ok.returncode == 0, ok.stderr[-3000:]
    lines = ok.stdout.splitlines()
    assert lines[0].startswith("scenario x86_64:t3.small (job ")
    assert lines[1].split() == ["TEST", "GATING", "OUTCOME", "NOTE"]
    assert any(line.split()[:3] == ["selinux", "yes", "PASSED"] for line in lines[1:])
    assert any(line.startswith("autocloud.ami.all: PASSED") for line in lines)
    assert stack.results(image.ami_id or "")[-1]["outcome"] == "PASSED"
    assert stack.bus.tap is not None
    stack.bus.tap.wait_for(
        "autocloud.ami.success", lambda b: b["ami_id"] == image.ami_id, timeout=30
    )

    broken_image = staged_ami(stack.moto)
    with SshTestHost(
        family="Base", accept_any_key=True, reboot_delay=0.2, selinux_permissive=True
    ) as broken:
        config = stack.bus.config()
        config["autocloud_ami.ssh_override"] = f"127.0.0.1:{broken.port}"
        bad = stack.cli(
            "--no-publish", "test", broken_image.ami_id or "", "--region", REGION, config=config
        )
    assert bad.returncode == 1, bad.stderr[-3000:]
    assert any(line.split()[:3] == ["selinux", "yes", "FAILED"] for line in bad.stdout.splitlines())
    assert "autocloud.ami.all: FAILED" in bad.stdout
    assert stack.results(broken_image.ami_id or "")[-1]["outcome"] == "FAILED"
    assert not [
        m
        for m in stack.bus.tap.messages("autocloud.ami.failed")
        if m.body["ami_id"] == broken_image.ami_id
    ]


def test_cli_refuses_an_ami_without_fedimg_tags(stack: Stack) -> None:
    ec2 = boto3.client(
        "ec2",
        region_name=REGION,
        endpoint_url=stack.moto.url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    ami = ec2.register_image(Name=f"not-fedimg-{free_port()}", RootDeviceName="/dev/sda1")[
        "ImageId"
    ]
    result = stack.cli("--no-publish", "test", ami, "--region", REGION)
    assert result.returncode == 2
    assert "fedimg:compose-id" in result.stderr
    missing = stack.cli("--no-publish", "test", "ami-0123456789abcdef0", "--region", REGION)
    assert missing.returncode == 2


def test_cli_sweep(stack: Stack) -> None:
    result = stack.cli("sweep")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminated 0 instances" in result.stdout
