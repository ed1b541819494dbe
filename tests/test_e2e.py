"""End to end through the real relay and hub: a compose replayed from datagrepper, to releases.

One ``devel.stack.Stack`` (moto_server, fedmsg-relay, one fedmsg-hub with all
three consumers, the ResultsDB stand-in, the instance host failing SELinux on
the aarch64 Cloud Base image) runs the demo's mixed compose once; the tests
read what that run left on the bus, in moto and in ResultsDB. The instance
host itself, the demo as a subprocess and ``python -m devel.stack up`` are
tested on their own.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import paramiko
import pytest
import requests
from moto import mock_aws
from resultsdb_api import ResultsDBapi

from autocloud_ami.instance import generate_key
from autocloud_ami.ssh import ParamikoSession, SshTimeout
from autocloud_ami.suite import SUITE, Family
from devel.bus import LocalBus, Seen, wait_until
from devel.demo import (
    Follower,
    ImageRow,
    Leftovers,
    Outcomes,
    PipelineState,
    RegionAmi,
    problems,
    read_state,
    render,
    summarize,
    tail_line,
    wait_settled,
)
from devel.instancehost import (
    AwsDirectory,
    FailRule,
    InstanceHost,
    boot_ready_at,
    profile_for,
    same_key,
)
from devel.stack import REPO, Stack, expected_state
from fedimg import tags
from tests.e2e_support import (
    ProcessWatcher,
    about,
    any_body,
    aws_counts,
    contract_errors,
    count,
    first,
    short,
)

# A whole stack, or the demo, per test or module: more than the default timeout.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

X86 = "Fedora-Cloud-Base-40-20240501.0.x86_64.raw.xz"
ARM = "Fedora-Cloud-Base-40-20240501.0.aarch64.raw.xz"
ATOMIC = "Fedora-AtomicHost-40-20240501.0.x86_64.raw.xz"
PIPELINE_TIMEOUT = 180.0


# -- the demo as a subprocess, and `make stack` (run first: no other stack is up) -------------


def _private_tmp(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A TMPDIR of its own for a subprocess (other work on the machine uses /tmp too)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["TMPDIR"] = str(tmp)
    return tmp, env


def test_demo_exits_0_prints_the_table_and_leaves_no_process(tmp_path: Path) -> None:
    tmp, env = _private_tmp(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "devel.demo", "--timeout", str(PIPELINE_TIMEOUT)],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with ProcessWatcher(proc.pid) as watcher:
        out, err = proc.communicate(timeout=PIPELINE_TIMEOUT + 120)
    assert proc.returncode == 0, out[-6000:] + err[-3000:]
    assert len(watcher.seen) >= 5, "the demo started fewer processes than the stack has"
    assert watcher.alive() == [], "processes left behind by the demo"
    assert list(tmp.iterdir()) == [], "temp files left behind by the demo"
    assert "STAGING AMI" in out and "REGION" in out
    table = out[out.index("IMAGE ") :]
    for name, state in ((X86, "released"), (ARM, "rejected"), (ATOMIC, "released")):
        line = next(x for x in table.splitlines() if x.startswith(name))
        assert line.split()[-2:] == [state, state], line
    assert "public, deprecated 20" in table  # the released images' deprecation times
    assert "org.fedoraproject.dev.fedimg.image.release" in out  # the live follow
    assert "test resources left in AWS: none" in out
    assert "OK:" in out and "wall time" in out


def test_stack_up_prints_working_commands_and_tears_down_on_sigterm(tmp_path: Path) -> None:
    tmp, env = _private_tmp(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "devel.stack", "up"],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        with ProcessWatcher(proc.pid) as watcher:
            assert proc.stdout is not None
            deadline = time.monotonic() + 120
            while not any(x.startswith("# results in ResultsDB") for x in lines):
                assert time.monotonic() < deadline, "".join(lines)
                line = proc.stdout.readline()
                assert line, f"stack exited early:\n{''.join(lines)}"
                lines.append(line)
            heading = next(i for i, x in enumerate(lines) if x.startswith("# staged AMIs"))
            status = lines[heading + 1]
            workdir = next(x.split()[2] for x in lines if x.strip().startswith("fedmsg config"))
            result = subprocess.run(
                ["sh", "-c", status.strip()],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                stdin=subprocess.DEVNULL,
            )
            assert result.returncode == 0, result.stderr
            assert "no staged AMIs in us-east-1" in result.stdout
            proc.send_signal(signal.SIGTERM)
            rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, rest
    assert "torn down" in rest
    assert watcher.alive() == []
    assert Path(workdir).is_relative_to(tmp)
    assert list(tmp.iterdir()) == [], "temp files left behind by the stack"


# -- one pipeline run, shared ------------------------------------------------------------------


@dataclass
class Run:
    stack: Stack
    messages: list[Seen]  # from the replay until every image settled
    state: PipelineState
    amis: dict[str, str]  # image name -> staging AMI


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    with Stack() as stack:
        follower = Follower(stack, io.StringIO())
        replay = stack.replay()
        assert replay.returncode == 0, replay.stdout + replay.stderr
        settled = wait_settled(stack, follower, PIPELINE_TIMEOUT)
        state = read_state(stack)
        assert settled, f"pipeline did not settle: {problems(state, follower.messages())}"
        amis = {r.image_name: r.staging.ami_id for r in state.rows if r.staging is not None}
        yield Run(stack, list(follower.messages()), state, amis)
        processes = stack.processes()
    assert all(not p.alive for p in processes), "a stack process survived stop()"


def _is_public(ec2: Any, ami_id: str) -> bool:
    perms = ec2.describe_image_attribute(ImageId=ami_id, Attribute="launchPermission")
    return {"Group": "all"} in perms["LaunchPermissions"]


def test_every_message_on_the_bus_satisfies_the_contract(run: Run) -> None:
    assert contract_errors(run.messages) == []
    seen = {short(m.topic) for m in run.messages}
    for topic in (
        "pungi.compose.status.change",
        "fedimg.image.upload",
        "fedimg.image.test",
        "autocloud.ami.queued",
        "autocloud.ami.running",
        "autocloud.ami.success",
        "autocloud.ami.failed",
        "resultsdb.result.new",
        "fedimg.image.copy",
        "fedimg.image.publish",
        "fedimg.image.release",
    ):
        assert topic in seen, f"no {topic} on the bus"


def test_replayed_message_arrives_under_the_local_environment(run: Run) -> None:
    compose = [m for m in run.messages if short(m.topic) == "pungi.compose.status.change"]
    assert [m.topic for m in compose] == ["org.fedoraproject.dev.pungi.compose.status.change"]
    assert compose[0].body == run.stack.compose_message()
    # fedmsg-dg-replay fetched it from the datagrepper stand-in, where it is a prod message.
    assert run.stack.datagrepper is not None
    recorded = requests.get(
        f"{run.stack.datagrepper.url}/id", params={"id": run.stack.msg_id}, timeout=10
    ).json()
    assert recorded["topic"] == "org.fedoraproject.prod.pungi.compose.status.change"
    assert recorded["msg"] == compose[0].body


@pytest.mark.parametrize("name", [X86, ATOMIC])
def test_happy_path_messages_in_causal_order(run: Run, name: str) -> None:
    ami = run.amis[name]
    mine = about(run.messages, name, ami)
    staging = run.stack.options.staging_region
    targets = set(run.stack.options.regions)

    def at(topic: str, **want: Any) -> int:
        index = first(mine, topic, lambda b: all(b.get(k) == v for k, v in want.items()))
        assert index >= 0, f"{name}: no {topic} {want}: {[short(m.topic) for m in mine]}"
        return index

    upload_started = at("fedimg.image.upload", status="started")
    upload_done = at("fedimg.image.upload", status="completed")
    test_started = at("fedimg.image.test", status="started")
    queued = at("autocloud.ami.queued", ami_id=ami)
    running = at("autocloud.ami.running", ami_id=ami)
    success = at("autocloud.ami.success", ami_id=ami)
    first_result = at("resultsdb.result.new")
    summary = first(
        mine,
        "resultsdb.result.new",
        lambda b: b["testcase"]["name"] == "autocloud.ami.all" and b["outcome"] == "PASSED",
    )
    verdict = at("fedimg.image.test", status="completed")
    copies = {
        m.body["destination"]: i
        for i, m in enumerate(mine)
        if short(m.topic) == "fedimg.image.copy"
    }
    publishes = {
        m.body["destination"]: i
        for i, m in enumerate(mine)
        if short(m.topic) == "fedimg.image.publish"
    }
    release = at("fedimg.image.release")
    # Only causal pairs are ordered: the same thread emitted both, or the later one
    # reacts to the earlier one arriving through the relay.
    assert upload_started < upload_done < test_started < queued < running < success
    assert summary >= 0, "no PASSED autocloud.ami.all result on the bus"
    assert first_result < verdict < min(copies.values())
    assert all(copies[region] < publishes[region] for region in copies)
    assert max([*copies.values(), *publishes.values()]) < release
    assert set(copies) == targets
    assert set(publishes) == targets | {staging}
    # The upload and the test happen in the staging region only.
    for m in mine[: verdict + 1]:
        if short(m.topic) in ("fedimg.image.upload", "fedimg.image.test"):
            assert m.body["destination"] == staging
    body = mine[release].body
    copy_ids = {region: mine[i].body["extra"]["id"] for region, i in copies.items()}
    assert body["regions"] == {staging: ami, **copy_ids}
    assert "failed_regions" not in body
    assert body["compose_id"] == run.stack.options.compose_id


@pytest.mark.parametrize("name", [X86, ATOMIC])
def test_happy_path_public_in_every_region(run: Run, name: str) -> None:
    stack = run.stack
    staging = stack.options.staging_region
    ami = run.amis[name]
    ec2 = stack.ec2(staging)
    described = ec2.describe_images(ImageIds=[ami])["Images"][0]
    assert tags.as_dict(described["Tags"])[tags.STATE] == "released"
    assert _is_public(ec2, ami)
    deprecation = described["DeprecationTime"]  # by policy, the same in every region
    for region in stack.options.regions:
        client = stack.ec2(region)
        copies = client.describe_images(
            Owners=["self"], Filters=[{"Name": f"tag:{tags.SOURCE_AMI}", "Values": [ami]}]
        )["Images"]
        assert len(copies) == 1, f"{region}: {copies}"
        assert copies[0]["State"] == "available"
        assert _is_public(client, copies[0]["ImageId"])
        assert copies[0]["DeprecationTime"] == deprecation
        # Nothing was uploaded there: every AMI of ours in a target region is a copy.
        for image in client.describe_images(Owners=["self"])["Images"]:
            assert tags.SOURCE_AMI in tags.as_dict(image.get("Tags")), image["ImageId"]


def test_no_test_instance_key_pair_or_security_group_left(run: Run) -> None:
    ec2 = run.stack.ec2(run.stack.options.staging_region)
    tagged = [{"Name": "tag-key", "Values": ["autocloud:ami-test"]}]
    live = [
        i
        for r in ec2.describe_instances(Filters=tagged)["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] != "terminated"
    ]
    assert live == []
    # The instances existed: one per AMI and scenario (instance type of its arch), each
    # launched from it and terminated; IMDSv2 tokens required except for Atomic Host.
    launched = [
        i for r in ec2.describe_instances(Filters=tagged)["Reservations"] for i in r["Instances"]
    ]
    assert sorted((i["ImageId"], i["InstanceType"]) for i in launched) == sorted(
        (run.amis[row.image_name], itype)
        for row in run.state.rows
        for itype in run.stack.options.scenarios[row.arch]
    )
    atomic = run.amis[ATOMIC]
    assert sorted(
        (i["ImageId"] == atomic, i["MetadataOptions"]["HttpTokens"]) for i in launched
    ) == ([(False, "required")] * (len(launched) - 2) + [(True, "optional")] * 2)
    assert ec2.describe_key_pairs(Filters=tagged)["KeyPairs"] == []
    assert ec2.describe_security_groups(Filters=tagged)["SecurityGroups"] == []


@pytest.mark.parametrize(("name", "family"), [(X86, Family.BASE), (ATOMIC, Family.ATOMIC)])
def test_results_in_resultsdb_per_test_and_summary(run: Run, name: str, family: Family) -> None:
    api = ResultsDBapi(run.stack.resultsdb_url)
    ami = run.amis[name]
    summary = api.get_results(item=ami, type="ami", testcases="autocloud.ami.all")["data"]
    # One summary per scenario: the Nitro and the Xen type of x86_64.
    scenarios = run.stack.scenarios_of("x86_64")
    assert sorted(r["data"]["scenario"][0] for r in summary) == sorted(scenarios)
    assert [r["outcome"] for r in summary] == ["PASSED"] * len(scenarios)
    assert summary[0]["data"]["productmd.compose.id"] == [run.stack.options.compose_id]
    assert summary[0]["data"]["productmd.image.type"] == ["raw-xz"]
    assert summary[0]["data"]["productmd.image.format"] == ["raw.xz"]
    assert summary[0]["data"]["productmd.compose.type"] == ["production"]
    every = api.get_results(item=ami, type="ami", limit=100)["data"]
    of_family = {c.testcase for c in SUITE if family in c.families}
    for scenario in scenarios:
        mine = {r["testcase"]["name"]: r for r in every if r["data"]["scenario"] == [scenario]}
        assert mine.pop("autocloud.ami.all")["outcome"] == "PASSED"
        # Every check has a result: PASSED, or INFO with the reason it does not apply.
        assert set(mine) == {c.testcase for c in SUITE}
        passed = {tc for tc, r in mine.items() if r["outcome"] == "PASSED"}
        info = [r for r in mine.values() if r["outcome"] == "INFO"]
        assert len(passed) + len(info) == len(mine)
        assert all(r["data"]["skipped"][0] for r in info)
        nitro = scenario == "x86_64:t3.small"
        applicable = {
            c.testcase
            for c in SUITE
            if family in c.families and c.only_if is None and (c.needs is None or nitro)
        }
        assert applicable <= passed <= of_family
    # Every stored result was announced on the bus.
    announced = count(run.messages, "resultsdb.result.new", lambda b: b["data"]["item"] == [ami])
    assert announced == len(every)


def test_rejection_path_copies_nothing_and_publishes_nothing(run: Run) -> None:
    stack = run.stack
    ami = run.amis[ARM]
    mine = about(run.messages, ARM, ami)
    failed = first(mine, "autocloud.ami.failed", lambda b: b["ami_id"] == ami)
    verdict = first(mine, "fedimg.image.test", lambda b: b["status"] == "failed")
    assert failed >= 0 and verdict >= 0
    assert "rejected" in mine[verdict].body["reason"]
    assert mine[failed].body["failed"] >= 1
    for topic in ("fedimg.image.copy", "fedimg.image.publish", "fedimg.image.release"):
        assert count(mine, topic, any_body) == 0, topic
    assert first(mine, "fedimg.image.test", lambda b: b["status"] == "completed") == -1
    ec2 = stack.ec2(stack.options.staging_region)
    described = ec2.describe_images(ImageIds=[ami])["Images"][0]
    assert tags.as_dict(described["Tags"])[tags.STATE] == "rejected"
    assert not _is_public(ec2, ami)
    for region in stack.options.regions:
        found = stack.ec2(region).describe_images(
            Owners=["self"], Filters=[{"Name": f"tag:{tags.SOURCE_AMI}", "Values": [ami]}]
        )["Images"]
        assert found == [], region
    api = ResultsDBapi(stack.resultsdb_url)
    results = api.get_results(item=ami, type="ami", limit=100)["data"]
    outcomes = {r["testcase"]["name"]: r["outcome"] for r in results}
    assert outcomes["autocloud.ami.selinux"] == "FAILED"
    assert outcomes["autocloud.ami.all"] == "FAILED"
    failed_tests = sorted(tc for tc, o in outcomes.items() if o == "FAILED")
    assert failed_tests == ["autocloud.ami.all", "autocloud.ami.selinux"]


def test_mixed_compose_each_image_in_its_own_state(run: Run) -> None:
    states = {r.image_name: r.state for r in run.state.rows}
    assert states == {X86: "released", ARM: "rejected", ATOMIC: "released"}
    assert states == run.stack.expected()
    assert problems(run.state, run.messages) == []
    # The qcow2 of the compose is not staged; exactly one AMI per raw.xz image.
    ec2 = run.stack.ec2(run.stack.options.staging_region)
    staged = ec2.describe_images(
        Owners=["self"],
        Filters=[{"Name": f"tag:{tags.COMPOSE_ID}", "Values": [run.stack.options.compose_id]}],
    )["Images"]
    assert sorted(i["ImageId"] for i in staged) == sorted(run.amis.values())


def test_replaying_the_compose_again_uploads_tests_and_copies_nothing(run: Run) -> None:
    stack = run.stack
    assert stack.bus is not None and stack.bus.tap is not None
    tap = stack.bus.tap
    regions = [stack.options.staging_region, *stack.options.regions]
    before = aws_counts(stack.ec2, regions)
    start = len(tap.messages())
    replay = stack.replay()
    assert replay.returncode == 0, replay.stderr

    def reannounced() -> bool:
        later = tap.messages()[start:]
        return count(later, "fedimg.image.upload", lambda b: b["status"] == "completed") >= 3

    wait_until(reannounced, 60, "the stager to re-announce the three existing AMIs")
    # A round trip through the hub after the re-announcements: anything they caused is out.
    assert stack.hub is not None
    assert isinstance(stack.bus, LocalBus)  # this test runs the fedmsg stack
    stack.bus.wait_hub(stack.hub, timeout=30)
    later = tap.messages()[start:]
    completed = [m.body for m in later if short(m.topic) == "fedimg.image.upload"]
    assert sorted(b["extra"]["id"] for b in completed) == sorted(run.amis.values())
    assert {b["status"] for b in completed} == {"completed"}
    for topic in ("fedimg.image.test", "autocloud.ami.queued", "fedimg.image.copy"):
        assert count(later, topic, any_body) == 0, f"a second {topic}"
    assert aws_counts(stack.ec2, regions) == before
    assert count(later, "pungi.compose.status.change", any_body) == 1


# -- the instance host on its own (moto in process, real SSH on loopback) -------------------------


def test_fail_rules_parse_and_refuse_bad_input() -> None:
    rule = FailRule.parse("Fedora-Cloud-Base-*aarch64*=selinux")
    assert rule == FailRule("Fedora-Cloud-Base-*aarch64*", "selinux")
    assert rule.matches(ARM) and not rule.matches(X86)
    for bad in ("selinux", "=selinux", "Fedora-*=", "Fedora-*=no-such-fault", ""):
        with pytest.raises(ValueError):
            FailRule.parse(bad)


def test_profile_family_and_faults_from_the_ami_tags() -> None:
    rules = [FailRule("*aarch64*", "selinux"), FailRule("*AtomicHost*", "docker")]
    atomic = profile_for(
        "ami-0123456789abcdef0", {tags.IMAGE_NAME: ATOMIC, tags.SUBVARIANT: "AtomicHost"}, "", rules
    )
    assert (atomic.family, atomic.faults) == ("Atomic", ("docker",))
    arm = profile_for(
        "ami-0123456789abcdef0", {tags.IMAGE_NAME: ARM, tags.SUBVARIANT: "Cloud_Base"}, "", rules
    )
    assert (arm.family, arm.faults) == ("Base", ("selinux",))
    untagged = profile_for("ami-0123456789abcdef0", {}, "some-name", rules)
    assert (untagged.image_name, untagged.family, untagged.faults) == ("some-name", "Base", ())
    assert expected_state(ARM, "Cloud_Base", [FailRule("*", "docker")]) == "released"
    assert expected_state(ATOMIC, "AtomicHost", [FailRule("*", "docker")]) == "rejected"
    assert expected_state(X86, "Cloud_Base", [FailRule("*aarch64*", "selinux")]) == "released"


def test_same_key_compares_type_and_blob() -> None:
    one, two = generate_key(), generate_key()
    assert same_key(one.public_openssh, one.private)
    assert not same_key(two.public_openssh, one.private)
    assert not same_key("", one.private)
    assert not same_key("ssh-rsa " + one.public_openssh.split()[1], one.private)


def test_boot_delay_counts_from_the_launch_time() -> None:
    now = datetime(2026, 1, 1, 12, 0, 10, tzinfo=UTC)
    launched = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)

    def clock() -> float:
        return 1000.0

    assert boot_ready_at(launched, 4.0, now, clock) == 1000.0  # booted 6 s ago
    assert boot_ready_at(launched, 10.0, now, clock) == 1000.0  # booted just now
    assert boot_ready_at(launched, 30.0, now, clock) == 1020.0
    assert boot_ready_at(None, 5.0, now, clock) == 1005.0  # launch time unknown: from now
    later = datetime(2026, 1, 1, 12, 0, 20, tzinfo=UTC)  # clocks disagree: launched "later"
    assert boot_ready_at(later, 5.0, now, clock) == 1005.0


@pytest.fixture
def moto_ec2() -> Iterator[Any]:
    with mock_aws():
        yield boto3.client("ec2", region_name="us-east-1")


def _staged_ami(ec2: Any, image_name: str, subvariant: str) -> str:
    ami = ec2.register_image(Name=image_name[:100], RootDeviceName="/dev/sda1")["ImageId"]
    ec2.create_tags(
        Resources=[ami],
        Tags=[
            {"Key": tags.IMAGE_NAME, "Value": image_name},
            {"Key": tags.SUBVARIANT, "Value": subvariant},
        ],
    )
    return str(ami)


def _instance(ec2: Any, ami: str, name: str) -> tuple[paramiko.PKey, str]:
    """What autocloud_ami does: import a tagged key pair, launch an instance with it."""
    pair = generate_key()
    ec2.import_key_pair(
        KeyName=name,
        PublicKeyMaterial=pair.public_openssh.encode(),
        TagSpecifications=[
            {"ResourceType": "key-pair", "Tags": [{"Key": "autocloud:ami-test", "Value": ami}]}
        ],
    )
    inst = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1, KeyName=name)["Instances"][0]
    return pair.private, str(inst["InstanceId"])


@pytest.fixture
def host(moto_ec2: Any) -> Iterator[InstanceHost]:
    directory = AwsDirectory(
        lambda region: boto3.client("ec2", region_name=region),
        ["us-east-1"],
        [FailRule("*aarch64*", "selinux")],
    )
    with InstanceHost(directory, reboot_delay=0.3) as server:
        yield server


def _login(server: InstanceHost, key: paramiko.PKey, timeout: float = 10.0) -> ParamikoSession:
    session = ParamikoSession("127.0.0.1", server.port, "fedora", key, connect_timeout=5)
    session.connect(timeout)
    return session


def test_instance_host_behaves_like_the_image_the_instance_booted(
    moto_ec2: Any, host: InstanceHost
) -> None:
    arm_key, _ = _instance(moto_ec2, _staged_ami(moto_ec2, ARM, "Cloud_Base"), "k-arm")
    atomic_key, _ = _instance(moto_ec2, _staged_ami(moto_ec2, ATOMIC, "AtomicHost"), "k-atomic")
    x86_key, _ = _instance(moto_ec2, _staged_ami(moto_ec2, X86, "Cloud_Base"), "k-x86")
    with (
        _login(host, arm_key) as arm,
        _login(host, atomic_key) as atomic,
        _login(host, x86_key) as x86,
    ):
        assert arm.run("getenforce", 10).stdout.strip() == "Permissive"
        assert x86.run("getenforce", 10).stdout.strip() == "Enforcing"
        assert atomic.run("getenforce", 10).stdout.strip() == "Enforcing"
        assert atomic.run("test -e /run/ostree-booted", 10).exit_code == 0
        assert x86.run("test -e /run/ostree-booted", 10).exit_code == 1
        assert atomic.run("rpm -q docker", 10).exit_code == 0
    assert len(host.instances()) == 3


def test_instance_host_refuses_unknown_keys_and_dead_instances(
    moto_ec2: Any, host: InstanceHost
) -> None:
    ami = _staged_ami(moto_ec2, X86, "Cloud_Base")
    key, instance_id = _instance(moto_ec2, ami, "k-live")
    stranger = generate_key().private
    with pytest.raises(SshTimeout):
        _login(host, stranger, timeout=1.5)
    # A key pair imported without the autocloud tag is not a test instance's key.
    untagged = generate_key()
    moto_ec2.import_key_pair(KeyName="k-plain", PublicKeyMaterial=untagged.public_openssh.encode())
    moto_ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1, KeyName="k-plain")
    with pytest.raises(SshTimeout):
        _login(host, untagged.private, timeout=1.5)
    with _login(host, key) as session:
        assert session.run("true", 10).ok
    moto_ec2.terminate_instances(InstanceIds=[instance_id])
    with pytest.raises(SshTimeout):
        _login(host, key, timeout=1.5)
    assert host.refused >= 3


def test_instance_state_survives_reboot_and_is_per_instance(
    moto_ec2: Any, host: InstanceHost
) -> None:
    ami = _staged_ami(moto_ec2, X86, "Cloud_Base")
    key_a, _ = _instance(moto_ec2, ami, "k-a")
    key_b, _ = _instance(moto_ec2, ami, "k-b")
    with _login(host, key_a) as a, _login(host, key_b) as b:
        boot_a = a.run("cat /proc/sys/kernel/random/boot_id", 10).stdout
        boot_b = b.run("cat /proc/sys/kernel/random/boot_id", 10).stdout
        assert a.run("sudo systemctl disable chronyd", 10).ok
        rebooted = a.run("sudo reboot", 10)
        assert rebooted.exit_code is None  # the connection drops: no exit status
        assert not a.connected
        a.reconnect(15)
        assert a.run("cat /proc/sys/kernel/random/boot_id", 10).stdout != boot_a
        assert a.run("systemctl is-enabled chronyd", 10).stdout.strip() == "disabled"
        # The other instance neither rebooted nor lost its connection or its state.
        assert b.connected
        assert b.run("cat /proc/sys/kernel/random/boot_id", 10).stdout == boot_b
        assert b.run("systemctl is-enabled chronyd", 10).stdout.strip() == "enabled"


def test_instance_host_refuses_logins_while_booting(moto_ec2: Any) -> None:
    key, instance_id = _instance(moto_ec2, _staged_ami(moto_ec2, X86, "Cloud_Base"), "k-boot")
    [reservation] = moto_ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    launched = reservation["Instances"][0]["LaunchTime"]
    directory = AwsDirectory(lambda r: boto3.client("ec2", region_name=r), ["us-east-1"])
    # Its clock stands at the launch: however slow this machine, the boot is still on.
    with InstanceHost(directory, boot_delay=2.0, clock=lambda: launched) as server:
        started = time.monotonic()
        with pytest.raises(SshTimeout):
            _login(server, key, timeout=0.5)
        with _login(server, key, timeout=15) as session:
            assert time.monotonic() - started >= 1.0
            assert session.run("true", 10).ok


# -- the demo's judging and rendering (pure) -------------------------------------------------------

STAGING, TARGETS = "us-east-1", ("us-east-2", "eu-west-1")
DEPRECATED = "2028-11-24T17:00Z"
AMI_A, AMI_B, AMI_C, AMI_D = (f"ami-{n:017x}" for n in range(1, 5))


def _seen(topic: str, body: dict[str, Any]) -> Seen:
    return Seen(f"org.fedoraproject.dev.{topic}", body, {"msg": body}, 0.0)


def _good_state() -> tuple[PipelineState, list[Seen]]:
    released = ImageRow(
        X86,
        "x86_64",
        "Cloud_Base",
        "released",
        RegionAmi(STAGING, AMI_A, "available", True, DEPRECATED),
        "released",
        {
            TARGETS[0]: RegionAmi(TARGETS[0], AMI_C, "available", True, DEPRECATED),
            TARGETS[1]: RegionAmi(TARGETS[1], AMI_D, "available", True, DEPRECATED),
        },
        Outcomes({"autocloud.ami.all": "PASSED", "autocloud.ami.selinux": "PASSED"}),
    )
    rejected = ImageRow(
        ARM,
        "aarch64",
        "Cloud_Base",
        "rejected",
        RegionAmi(STAGING, AMI_B, "available", False),
        "rejected",
        {},
        Outcomes({"autocloud.ami.all": "FAILED", "autocloud.ami.selinux": "FAILED"}),
    )
    messages = [
        _seen(
            "fedimg.image.release",
            {"image_name": X86, "regions": {STAGING: AMI_A, TARGETS[0]: AMI_C, TARGETS[1]: AMI_D}},
        ),
        _seen("fedimg.image.test", {"status": "failed", "extra": {"id": AMI_B}}),
    ]
    return PipelineState(STAGING, TARGETS, (released, rejected), Leftovers()), messages


SCENARIOS = ("x86_64:t3.small", "x86_64:t2.small")


def test_problems_is_empty_for_the_expected_end_state() -> None:
    state, messages = _good_state()
    assert problems(state, messages) == []
    # Per scenario: every scenario tested, each on its row of the scenario table.
    per = {"autocloud.ami.all": "PASSED", "autocloud.ami.root_nvme": "PASSED"}
    xen = {"autocloud.ami.all": "PASSED", "autocloud.ami.root_nvme": "INFO"}
    tests = Outcomes.of({SCENARIOS[0]: per, SCENARIOS[1]: xen})
    two = replace(state, rows=(replace(state.rows[0], tests=tests, scenarios=SCENARIOS),))
    assert problems(two, messages[:1]) == []
    lines = render(two).splitlines()
    assert any(SCENARIOS[0] in line and "PASSED: 1 passed, 0 failed" in line for line in lines)
    assert any(SCENARIOS[1] in line and "0 failed, 1 not applicable" in line for line in lines)
    failing = Outcomes.of({SCENARIOS[0]: per, SCENARIOS[1]: {**xen, "autocloud.ami.all": "FAILED"}})
    assert failing.summary == "FAILED"
    text = render(state)
    assert "not copied (rejected)" in text and AMI_D in text
    assert f"{AMI_D} public, deprecated {DEPRECATED}" in text
    assert "FAILED: 0 passed, 1 failed (selinux)" in text
    assert "PASSED: 1 passed, 0 failed" in text


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (
            lambda s, m: (replace(s, rows=(replace(s.rows[0], state="promoting"), s.rows[1])), m),
            "state promoting",
        ),
        (
            lambda s, m: (replace(s, rows=(replace(s.rows[0], copies={}), s.rows[1])), m),
            "no copy in us-east-2",
        ),
        (
            lambda s, m: (
                replace(
                    s,
                    rows=(
                        s.rows[0],
                        replace(s.rows[1], staging=RegionAmi(STAGING, AMI_B, "available", True)),
                    ),
                ),
                m,
            ),
            "rejected but public",
        ),
        (
            lambda s, m: (replace(s, leftovers=Leftovers(key_pairs=("autocloud-x",))), m),
            "autocloud-x",
        ),
        (
            lambda s, m: (
                replace(
                    s,
                    rows=(
                        replace(
                            s.rows[0],
                            copies={
                                **s.rows[0].copies,
                                TARGETS[1]: RegionAmi(TARGETS[1], AMI_D, "available", True),
                            },
                        ),
                        s.rows[1],
                    ),
                ),
                m,
            ),
            f"{AMI_D} in eu-west-1 is deprecated at no time",
        ),
        (lambda s, m: (s, m[1:]), "no fedimg.image.release"),
        (lambda s, m: (s, m[:1]), "no fedimg.image.test failed"),
        (
            lambda s, m: (replace(s, rows=(replace(s.rows[0], staging=None), s.rows[1])), m),
            "no AMI in the staging",
        ),
        (
            lambda s, m: (replace(s, rows=(replace(s.rows[0], tests=Outcomes({})), s.rows[1])), m),
            "autocloud.ami.all is None",
        ),
        (
            lambda s, m: (
                replace(s, rows=(replace(s.rows[0], scenarios=SCENARIOS), s.rows[1])),
                m,
            ),
            "not ['x86_64:t3.small', 'x86_64:t2.small']",
        ),
    ],
)
def test_problems_names_what_is_wrong(change: Any, fragment: str) -> None:
    state, messages = change(*_good_state())
    found = problems(state, messages)
    assert any(fragment in p for p in found), found


def test_summarize_reads_each_topic_and_survives_odd_bodies() -> None:
    assert (
        summarize(
            "org.fedoraproject.dev.fedimg.image.copy",
            {
                "image_name": X86,
                "destination": "eu-west-1",
                "extra": {"id": AMI_C, "source_image_id": AMI_A},
            },
        )
        == f"{X86} {AMI_A} -> eu-west-1 {AMI_C}"
    )
    line = summarize(
        "org.fedoraproject.dev.resultsdb.result.new",
        {"testcase": {"name": "autocloud.ami.all"}, "outcome": "PASSED", "data": {"item": [AMI_A]}},
    )
    assert line == f"autocloud.ami.all PASSED for {AMI_A}"
    assert "failed" in summarize(
        "org.fedoraproject.dev.autocloud.ami.failed",
        {"status": "failed", "ami_id": AMI_A, "job_id": "abc", "passed": 3, "failed": 1},
    )
    published = "org.fedoraproject.dev.fedora_image_uploader.published.v1.aws.Cloud_Base.40.x86_64"
    line = summarize(published, {"image_name": "F-40-hvm-gp3", "regions": {"us-east-1": AMI_A}})
    assert line == "F-40-hvm-gp3 public in 1 region(s) (AwsPublishedV1)"
    assert summarize(published, {"regions": 3})
    # Unknown topics and malformed bodies still give one line, never an exception.
    assert summarize("org.example.other", {"x": 1}) == '{"x": 1}'
    assert summarize("org.fedoraproject.dev.fedimg.image.upload", {"extra": "not a dict"})
    assert "\n" not in tail_line(_seen("fedimg.image.release", {"image_name": X86, "regions": {}}))
