"""TestInstance on moto (in process): what is SENT to EC2, and cleanup on every path."""

from __future__ import annotations

import base64
import dataclasses
import subprocess
import types
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import paramiko
import pytest
import yaml
from moto import mock_aws

from autocloud_ami.instance import (
    TAG_DEADLINE,
    TAG_JOB,
    TAG_TEST,
    AmiUnavailable,
    BootTimeout,
    HostKeyUnavailable,
    InstanceFailed,
    LaunchRefused,
    LaunchSpec,
    TestInstance,
    Timeouts,
    TypeUnavailable,
    generate_key,
    launch_spec,
    parse_deadline,
    parse_host_key_fingerprints,
    self_destruct_user_data,
    type_facts,
)
from autocloud_ami.suite import NITRO

REGION = "us-east-1"
CIDR = "203.0.113.7/32"
# One session for every test: boto3.client() would rebuild the EC2 model each time.
SESSION = boto3.session.Session()
FAST = Timeouts(boot=2.0, host_key_wait=0.0, cleanup=5.0, launch_retry=0.0, poll=0.05)


# -- helpers shared with test_job.py / test_sweeper.py (no test_ prefix) ---------------


def moto_backend(region: str = REGION) -> Any:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    return ec2_backends[DEFAULT_ACCOUNT_ID][region]


def register_ami(ec2: Any, name: str = "Fedora-Cloud-Base-41-20261124.0.x86_64") -> str:
    return str(ec2.register_image(Name=name, RootDeviceName="/dev/sda1")["ImageId"])


def record_params(ec2: Any, operation: str) -> list[dict[str, Any]]:
    """Every parameter dict the client SENDS for ``operation``."""
    sent: list[dict[str, Any]] = []

    def hook(params: dict[str, Any], **_: Any) -> None:
        sent.append(dict(params))

    ec2.meta.events.register(f"provide-client-params.ec2.{operation}", hook)
    return sent


def fail_calls(ec2: Any, operation: str, code: str, times: int = 10**6) -> list[int]:
    """Answer the next ``times`` calls of ``operation`` with AWS error ``code``."""
    count = [0]

    def hook(**_: Any) -> Any:
        if count[0] >= times:
            return None
        count[0] += 1
        http = types.SimpleNamespace(status_code=400, headers={})
        return http, {"Error": {"Code": code, "Message": f"injected {code}"}}

    ec2.meta.events.register(f"before-call.ec2.{operation}", hook)
    return count


def after_run_instances(ec2: Any, action: Callable[[Any], None]) -> None:
    """Call ``action(moto_instance)`` right after moto launched an instance."""

    def hook(parsed: dict[str, Any], **_: Any) -> None:
        for inst in parsed.get("Instances", []):
            action(moto_backend().get_instance(inst["InstanceId"]))

    ec2.meta.events.register("after-call.ec2.RunInstances", hook)


def set_state(name: str, code: int) -> Callable[[Any], None]:
    from moto.ec2.models.instances import InstanceState

    def action(inst: Any) -> None:
        inst._state = InstanceState(name, code)

    return action


def console_says(ec2: Any, text: str) -> None:
    """GetConsoleOutput answers ``text`` (base64, as EC2 sends it)."""

    def hook(params: dict[str, Any], **_: Any) -> Any:
        http = types.SimpleNamespace(status_code=200, headers={})
        encoded = base64.b64encode(text.encode()).decode()
        return http, {"InstanceId": params.get("InstanceId"), "Output": encoded}

    ec2.meta.events.register("before-call.ec2.GetConsoleOutput", hook)


def leftovers(ec2: Any) -> dict[str, list[str]]:
    """Every live instance, key pair and security group tagged by autocloud_ami."""
    live = ["pending", "running", "stopping", "stopped", "shutting-down"]
    instances = [
        i["InstanceId"]
        for r in ec2.describe_instances(
            Filters=[
                {"Name": "tag-key", "Values": [TAG_TEST]},
                {"Name": "instance-state-name", "Values": live},
            ]
        )["Reservations"]
        for i in r["Instances"]
    ]
    keys = [k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"]]
    groups = [
        g["GroupId"]
        for g in ec2.describe_security_groups()["SecurityGroups"]
        if g["GroupName"] != "default"
    ]
    return {"instances": instances, "key_pairs": keys, "security_groups": groups}


NOTHING_LEFT: dict[str, list[str]] = {"instances": [], "key_pairs": [], "security_groups": []}


def make_spec(ami_id: str, **kw: Any) -> LaunchSpec:
    args: dict[str, Any] = {
        "region": REGION,
        "ami_id": ami_id,
        "job_id": "0123456789abcdef0123456789abcdef",
        "instance_type": "t3.small",
        "ssh_cidr": CIDR,
        "lifetime": 3600.0,
    }
    args.update(kw)
    return launch_spec(**args)


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture
def ec2() -> Iterator[Any]:
    with mock_aws():
        yield SESSION.client("ec2", region_name=REGION)


@pytest.fixture
def ami(ec2: Any) -> str:
    return register_ami(ec2)


# -- the happy path and what is sent -----------------------------------------------------


def test_launch_sends_exactly_what_the_spec_says_and_cleans_up(ec2: Any, ami: str) -> None:
    run = record_params(ec2, "RunInstances")
    ingress = record_params(ec2, "AuthorizeSecurityGroupIngress")
    imported = record_params(ec2, "ImportKeyPair")
    groups = record_params(ec2, "CreateSecurityGroup")
    extra = {"FedoraGroup": "cloud"}
    spec = make_spec(ami, extra_tags=extra)

    with TestInstance(ec2, spec, FAST) as inst:
        assert inst.instance_id and inst.host and inst.port == 22
        assert isinstance(inst.key, paramiko.PKey)
        assert inst.fingerprints is None  # moto's console has no cloud-init block
        during = leftovers(ec2)
        assert during["instances"] == [inst.instance_id]
        assert during["key_pairs"] == [spec.name]
        assert during["security_groups"] == [inst.group_id]
        described = ec2.describe_instances(InstanceIds=[inst.instance_id])
        assert inst.host == described["Reservations"][0]["Instances"][0]["PublicIpAddress"]

    assert leftovers(ec2) == NOTHING_LEFT
    assert inst.cleanup_errors == []

    (params,) = run
    assert params["ImageId"] == ami
    assert params["InstanceType"] == "t3.small"
    assert params["MinCount"] == params["MaxCount"] == 1
    assert params["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert params["KeyName"] == spec.name
    assert params["ClientToken"] == spec.job_id
    assert "SubnetId" not in params
    kinds = {
        ts["ResourceType"]: {t["Key"]: t["Value"] for t in ts["Tags"]}
        for ts in params["TagSpecifications"]
    }
    assert set(kinds) == {"instance", "volume"}
    for tags in kinds.values():
        assert tags[TAG_TEST] == ami
        assert tags[TAG_JOB] == spec.job_id
        assert tags["FedoraGroup"] == "cloud"  # autocloud_ami.extra_tags, at creation
        assert parse_deadline(tags[TAG_DEADLINE]) == spec.deadline.replace(microsecond=0)
    assert params["UserData"] == self_destruct_user_data(spec.deadline)  # as run below

    (rule_call,) = ingress
    (rule,) = rule_call["IpPermissions"]
    assert rule == {
        "IpProtocol": "tcp",
        "FromPort": 22,
        "ToPort": 22,
        "IpRanges": [{"CidrIp": CIDR, "Description": rule["IpRanges"][0]["Description"]}],
    }
    (key_call,) = imported
    material = key_call["PublicKeyMaterial"]
    material = material if isinstance(material, bytes) else material.encode()
    assert material.startswith(b"ssh-ed25519 ")
    assert b"PRIVATE" not in material
    key_tags = {t["Key"]: t["Value"] for t in key_call["TagSpecifications"][0]["Tags"]}
    assert key_tags[TAG_TEST] == ami and key_tags["FedoraGroup"] == "cloud"
    (group_call,) = groups
    assert {t["Key"] for t in group_call["TagSpecifications"][0]["Tags"]} >= {
        TAG_TEST,
        TAG_JOB,
        TAG_DEADLINE,
        "FedoraGroup",
    }


def test_extra_tags_never_replace_autocloud_own_tags() -> None:
    spec = make_spec("ami-0123456789abcdef0", extra_tags={"FedoraGroup": "cloud"})
    own = make_spec("ami-0123456789abcdef0").tags()
    assert spec.tags() == {**own, "FedoraGroup": "cloud"}
    clash = dataclasses.replace(spec, extra_tags={TAG_JOB: "forged", "FedoraGroup": "cloud"})
    assert clash.tags()[TAG_JOB] == spec.job_id


def test_subnet_is_used_with_its_vpc_and_ipv6_cidr_goes_to_ipv6_ranges(ec2: Any, ami: str) -> None:
    vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.1.1.0/24")["Subnet"]["SubnetId"]
    run = record_params(ec2, "RunInstances")
    groups = record_params(ec2, "CreateSecurityGroup")
    ingress = record_params(ec2, "AuthorizeSecurityGroupIngress")
    spec = make_spec(ami, subnet_id=subnet, ssh_cidr="2001:db8::7/128", self_destruct=False)
    with TestInstance(ec2, spec, FAST) as inst:
        assert inst.host  # public or, in a private subnet, the private address
    assert run[0]["SubnetId"] == subnet
    assert "UserData" not in run[0]
    assert groups[0]["VpcId"] == vpc
    rule = ingress[0]["IpPermissions"][0]
    assert rule["Ipv6Ranges"][0]["CidrIpv6"] == "2001:db8::7/128" and "IpRanges" not in rule
    assert leftovers(ec2) == NOTHING_LEFT


def test_ssh_override_replaces_the_address(ec2: Any, ami: str) -> None:
    with TestInstance(ec2, make_spec(ami), FAST, ssh_override=("127.0.0.1", 2222)) as inst:
        assert (inst.host, inst.port) == ("127.0.0.1", 2222)
    assert leftovers(ec2) == NOTHING_LEFT


# -- cleanup on every path ----------------------------------------------------------------


def test_exception_inside_the_block_still_cleans_up(ec2: Any, ami: str) -> None:
    with pytest.raises(RuntimeError, match="boom"), TestInstance(ec2, make_spec(ami), FAST):
        assert leftovers(ec2)["instances"]
        raise RuntimeError("boom")
    assert leftovers(ec2) == NOTHING_LEFT


def test_instance_that_never_runs_times_out_and_is_cleaned_up(ec2: Any, ami: str) -> None:
    after_run_instances(ec2, set_state("pending", 0))
    timeouts = Timeouts(boot=0.3, host_key_wait=0.0, cleanup=5.0, launch_retry=0.0, poll=0.05)
    with (
        pytest.raises(BootTimeout, match="not running after"),
        TestInstance(ec2, make_spec(ami), timeouts),
    ):
        pytest.fail("the block must not run")
    assert isinstance(BootTimeout("x"), TimeoutError)
    assert leftovers(ec2) == NOTHING_LEFT


def test_instance_that_dies_while_booting_fails_fast(ec2: Any, ami: str) -> None:
    after_run_instances(ec2, set_state("terminated", 48))
    with pytest.raises(InstanceFailed, match="terminated"), TestInstance(ec2, make_spec(ami), FAST):
        pytest.fail("the block must not run")
    assert leftovers(ec2) == NOTHING_LEFT


def test_missing_ami_fails_before_creating_anything(ec2: Any) -> None:
    created = record_params(ec2, "ImportKeyPair") + record_params(ec2, "RunInstances")
    inst = TestInstance(ec2, make_spec("ami-0123456789abcdef0"), FAST)
    with pytest.raises(AmiUnavailable, match="not found"), inst:
        pytest.fail("the block must not run")
    assert created == []
    assert leftovers(ec2) == NOTHING_LEFT


def test_ami_not_available_is_refused(ec2: Any, ami: str) -> None:
    moto_backend().amis[ami].state = "pending"
    with (
        pytest.raises(AmiUnavailable, match="pending, not available"),
        TestInstance(ec2, make_spec(ami), FAST),
    ):
        pytest.fail("the block must not run")
    assert leftovers(ec2) == NOTHING_LEFT


@pytest.mark.parametrize(
    ("code", "type_unavailable"),
    [
        ("InstanceLimitExceeded", False),  # the account's quota: not about the type
        ("VcpuLimitExceeded", False),
        ("InsufficientInstanceCapacity", True),  # the type cannot run here (now)
        ("Unsupported", True),
        ("InvalidParameterValue", True),
    ],
)
def test_quota_errors_are_refusals_by_code_and_nothing_leaks(
    ec2: Any, ami: str, code: str, type_unavailable: bool
) -> None:
    fail_calls(ec2, "RunInstances", code)
    with pytest.raises(LaunchRefused) as info, TestInstance(ec2, make_spec(ami), FAST):
        pytest.fail("the block must not run")
    assert info.value.code == code
    assert isinstance(info.value, TypeUnavailable) is type_unavailable
    assert leftovers(ec2) == NOTHING_LEFT


@pytest.mark.parametrize(
    ("described", "offered", "arch", "facts"),
    [
        ({"Hypervisor": "nitro", "EbsInfo": {"NvmeSupport": "required"}}, True, "x86_64", True),
        ({"Hypervisor": "xen", "EbsInfo": {"NvmeSupport": "unsupported"}}, True, "x86_64", False),
        ({"Hypervisor": "nitro", "EbsInfo": {"NvmeSupport": "required"}}, True, "aarch64", None),
        ({"Hypervisor": "nitro", "EbsInfo": {"NvmeSupport": "required"}}, False, "x86_64", None),
        ({}, True, "x86_64", None),  # nothing known of it: not for this architecture
    ],
)
def test_type_facts_from_describe_instance_types(
    described: dict[str, Any], offered: bool, arch: str, facts: bool | None
) -> None:
    entry = {**described, "ProcessorInfo": {"SupportedArchitectures": ["x86_64"]}}
    if not described:
        entry = {}
    if facts is None:
        with pytest.raises(TypeUnavailable):
            type_facts(entry, offered, "t3.small", REGION, arch)
        return
    found = type_facts(entry, offered, "t3.small", REGION, arch)
    assert found.nvme_ebs is facts and (found.traits == {NITRO}) is facts


def test_capacity_errors_are_retried_until_launch_retry_timeout(ec2: Any, ami: str) -> None:
    calls = fail_calls(ec2, "RunInstances", "InsufficientInstanceCapacity", times=2)
    slept: list[float] = []
    timeouts = Timeouts(boot=2.0, host_key_wait=0.0, cleanup=5.0, launch_retry=60.0, poll=0.05)
    with TestInstance(ec2, make_spec(ami), timeouts, sleep=slept.append) as inst:
        assert inst.instance_id
    assert calls[0] == 2 and len(slept) == 2 and slept[1] > slept[0]
    assert leftovers(ec2) == NOTHING_LEFT


def test_other_run_instances_errors_are_not_retried(ec2: Any, ami: str) -> None:
    calls = fail_calls(ec2, "RunInstances", "InvalidParameterValue")
    timeouts = Timeouts(boot=2.0, host_key_wait=0.0, cleanup=5.0, launch_retry=60.0, poll=0.05)
    with (
        pytest.raises(LaunchRefused, match="InvalidParameterValue"),
        TestInstance(ec2, make_spec(ami), timeouts),
    ):
        pytest.fail("the block must not run")
    assert calls[0] == 1
    assert leftovers(ec2) == NOTHING_LEFT


def test_group_in_use_is_retried_until_the_instance_is_gone(ec2: Any, ami: str) -> None:
    calls = fail_calls(ec2, "DeleteSecurityGroup", "DependencyViolation", times=3)
    with TestInstance(ec2, make_spec(ami), FAST):
        pass
    assert calls[0] == 3
    assert leftovers(ec2) == NOTHING_LEFT


def test_cleanup_failure_is_reported_not_raised(
    ec2: Any, ami: str, caplog: pytest.LogCaptureFixture
) -> None:
    fail_calls(ec2, "DeleteSecurityGroup", "DependencyViolation")
    timeouts = Timeouts(boot=2.0, host_key_wait=0.0, cleanup=0.3, launch_retry=0.0, poll=0.05)
    with TestInstance(ec2, make_spec(ami), timeouts) as inst:
        pass
    assert any("security group" in e for e in inst.cleanup_errors)
    assert any(r.levelname == "ERROR" for r in caplog.records)
    left = leftovers(ec2)
    assert left["instances"] == [] and left["key_pairs"] == []
    assert len(left["security_groups"]) == 1  # tagged: the sweeper's


# -- host keys -------------------------------------------------------------------------------

CONSOLE = """\
[   10.1] cloud-init[812]: Cloud-init v. 24.1 finished
ec2: #############################################################
ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----
ec2: 256 SHA256:n4Gz8ZL3CmFqv2N4qz2ndwQp0pQHnJ2QX+5bq2vNvVw root@ip-10-0-0-5 (ECDSA)
ec2: 256 SHA256:AbCdEfGhIjKlMnOpQrStUvWxYz0123456789+/abcde root@ip-10-0-0-5 (ED25519)
ec2: 3072 SHA256:ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ root@ip-10-0-0-5 (RSA)
ec2: -----END SSH HOST KEY FINGERPRINTS-----
ec2: #############################################################
"""


def test_fingerprint_parser_reads_cloud_init_block() -> None:
    assert parse_host_key_fingerprints(CONSOLE) == (
        "SHA256:n4Gz8ZL3CmFqv2N4qz2ndwQp0pQHnJ2QX+5bq2vNvVw",
        "SHA256:AbCdEfGhIjKlMnOpQrStUvWxYz0123456789+/abcde",
        "SHA256:ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ",
    )


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "Linux version 6.11 ...\nlogin:\n",
        CONSOLE.split("ec2: -----END", maxsplit=1)[0],  # truncated: no END line
        "-----BEGIN SSH HOST KEY FINGERPRINTS-----\n-----END SSH HOST KEY FINGERPRINTS-----\n",
        "-----BEGIN SSH HOST KEY FINGERPRINTS-----\n256 MD5:aa:bb root@x (ECDSA)\n"
        "-----END SSH HOST KEY FINGERPRINTS-----\n",
        "-----BEGIN SSH HOST KEY FINGERPRINTS-----\n256 SHA256:short root@x (ECDSA)\n"
        "-----END SSH HOST KEY FINGERPRINTS-----\n",
    ],
)
def test_fingerprint_parser_returns_none_without_a_complete_block(text: str | None) -> None:
    assert parse_host_key_fingerprints(text) is None


def test_fingerprint_parser_takes_the_last_block() -> None:
    second = CONSOLE.replace("n4Gz8ZL3CmFqv2N4qz2ndwQp0pQHnJ2QX+5bq2vNvVw", "Q" * 43)
    found = parse_host_key_fingerprints(CONSOLE + "reboot\n" + second)
    assert found is not None and found[0] == "SHA256:" + "Q" * 43


def test_console_fingerprints_reach_the_instance(ec2: Any, ami: str) -> None:
    console_says(ec2, CONSOLE)
    with TestInstance(ec2, make_spec(ami), FAST) as inst:
        assert inst.fingerprints is not None and len(inst.fingerprints) == 3
    assert leftovers(ec2) == NOTHING_LEFT


def test_required_host_key_missing_fails_and_cleans_up(ec2: Any, ami: str) -> None:
    timeouts = Timeouts(boot=2.0, host_key_wait=0.2, cleanup=5.0, launch_retry=0.0, poll=0.05)
    inst = TestInstance(ec2, make_spec(ami), timeouts, require_host_key=True)
    with pytest.raises(HostKeyUnavailable), inst:
        pytest.fail("the block must not run")
    assert leftovers(ec2) == NOTHING_LEFT


# -- pure parts ------------------------------------------------------------------------------


def test_generated_key_is_fresh_and_its_repr_hides_the_private_half() -> None:
    a, b = generate_key(), generate_key()
    assert a.public_openssh != b.public_openssh
    assert a.public_openssh.split()[1] == a.private.get_base64()
    assert "PRIVATE" not in repr(a) and a.private.get_base64() not in repr(a)


# -- the self-destruct cloud-config, parsed and run as cloud-init would ----------------------------

# Programs the boot command may call, as stubs that record how they were called.
# ``date +%s`` answers the test's "now"; nothing else is on PATH.
STUBS = {
    "date": '[ "$*" = "+%s" ] || exit 64\necho "$FAKE_NOW"',
    "systemd-run": "",
    "systemctl": "",
    "poweroff": "",
}
DEADLINE = datetime(2026, 11, 25, 12, 0, 0, 750_000, tzinfo=UTC)
EPOCH = int(DEADLINE.timestamp())  # whole seconds, as the script computes


def boot_command(user_data: str) -> list[str]:
    """The one command the cloud-config runs at every boot (bootcmd, not runcmd)."""
    assert user_data.startswith("#cloud-config\n")  # cloud-init's marker, first line
    config = yaml.safe_load(user_data)
    assert config == {"bootcmd": [config["bootcmd"][0]]}
    command = config["bootcmd"][0]
    assert isinstance(command, list) and all(isinstance(arg, str) for arg in command)
    return command


def run_stubbed(argv: list[str], now: int, tmp_path: Path) -> tuple[list[list[str]], str]:
    """Run ``argv`` with only the stubs on PATH; the calls they recorded, and stderr."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "calls"
    for name, body in STUBS.items():
        stub = stubs / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "$CALLS"\n{body}\n')
        stub.chmod(0o755)
    done = subprocess.run(
        argv,
        env={"PATH": str(stubs), "CALLS": str(calls), "FAKE_NOW": str(now)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    recorded = calls.read_text().splitlines() if calls.exists() else []
    return [line.split() for line in recorded], done.stderr


@pytest.mark.parametrize("shell", ["/bin/bash", "/bin/sh"])
@pytest.mark.parametrize(
    ("now", "armed_for"),
    [
        pytest.param(EPOCH + 3600, 60, id="deadline-an-hour-past"),
        pytest.param(EPOCH + 1, 60, id="deadline-just-past"),
        pytest.param(EPOCH, 60, id="deadline-now"),
        pytest.param(EPOCH - 59, 60, id="59s-left"),
        pytest.param(EPOCH - 60, 60, id="60s-left-the-floor"),
        pytest.param(EPOCH - 61, 61, id="61s-left"),
        pytest.param(EPOCH - 7 * 86400, 7 * 86400, id="a-week-left"),
    ],
)
def test_self_destruct_user_data_powers_off_at_the_deadline(
    shell: str, now: int, armed_for: int, tmp_path: Path
) -> None:
    """Armed for the time left to the deadline, never for less than a minute; nothing
    is powered off on the spot: only a transient systemd timer is armed."""
    sh, dash_c, script = boot_command(self_destruct_user_data(DEADLINE))
    assert (sh, dash_c) == ("sh", "-c")  # Fedora's sh is bash; Debian's, dash: both run it
    calls, stderr = run_stubbed([shell, "-c", script], now, tmp_path)
    assert calls == [
        ["date", "+%s"],
        [
            "systemd-run",
            "--unit=autocloud-deadline",
            f"--on-active={armed_for}s",
            "/usr/bin/systemctl",
            "poweroff",
            "--force",
        ],
    ]
    assert stderr == ""


def test_deadline_round_trip_and_garbage() -> None:
    spec = make_spec("ami-0123456789abcdef0", now=datetime(2026, 1, 1, tzinfo=UTC), lifetime=90)
    assert spec.tags()[TAG_DEADLINE] == "2026-01-01T00:01:30Z"
    assert parse_deadline("2026-01-01T00:01:30Z") == datetime(2026, 1, 1, 0, 1, 30, tzinfo=UTC)
    assert parse_deadline("soon") is None
    assert parse_deadline("") is None
