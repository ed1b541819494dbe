"""test_ami end to end on moto + the SSH stand-in + the ResultsDB stand-in.

moto launches (its instances never boot), ``autocloud_ami.ssh_override``
sends SSH to ``devel.sshhost.SshTestHost`` (which lets in only the key the job
imported into EC2), results go through the real ``resultsdb_api`` client to
``devel.resultsdb.ResultsDBServer``. Fast fakes stand in for SSH where the
test is about the job's own logic (requests, slots, seams).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paramiko
import pytest
from moto import mock_aws
from resultsdb_api import ResultsDBapi

from autocloud_ami import ssh as ssh_module
from autocloud_ami.config import AutocloudConfig
from autocloud_ami.instance import wait_for_ssh_port
from autocloud_ami.job import (
    Deps,
    InvalidRequest,
    JobResult,
    QueueTimeout,
    ScenarioResult,
    SshTarget,
    check_request,
    paramiko_session,
    posting_order,
)
from autocloud_ami.job import test_ami as run_job
from autocloud_ami.report import OutputStore, ResultsReporter, Spool, build_results, make_api
from autocloud_ami.runner import SuiteReport, TestOutcome
from autocloud_ami.ssh import CommandResult, SshTimeout
from autocloud_ami.suite import SUITE, Check, Expect, Family
from devel.bus import wait_until
from devel.instancehost import AwsDirectory, InstanceHost
from devel.resultsdb import ResultsDBServer
from devel.sshhost import SshTestHost
from fedimg.aws import AwsClients
from fedimg.messages import AMI_FAILED, AMI_QUEUED, AMI_RUNNING, AMI_SUCCESS, Emitter, StagedImage
from tests.conftest import Recorder
from tests.test_instance import (
    NOTHING_LEFT,
    REGION,
    SESSION,
    after_run_instances,
    console_says,
    fail_calls,
    leftovers,
    register_ami,
    set_state,
)

# The real suite, each command bounded by 2 s so a hang costs 2 s, not 10 min.
QUICK_SUITE = tuple(dataclasses.replace(c, timeout=2.0) for c in SUITE)
COMPOSE_URL = "https://kojipkgs.fedoraproject.org/compose/41/Fedora-41-20261124.0/compose"
TINY_SUITE = (
    Check("selinux", "getenforce", Expect("equals", "Enforcing")),
    Check("bash_version", "bash --version", Expect("contains", "-redhat-linux-gnu"), gating=False),
)


class World:
    """moto + ResultsDB stand-in + a recorder + a Deps for one test."""

    def __init__(self, tmp_path: Path, rdb: ResultsDBServer, recorder: Recorder) -> None:
        self.tmp_path = tmp_path
        self.rdb = rdb
        self.recorder = recorder
        self.aws = AwsClients(max_attempts=2, session=SESSION)
        self.ec2 = self.aws.ec2(REGION)
        self.imported: list[str] = []

        def keep(params: dict[str, Any], **_: Any) -> None:
            material = params["PublicKeyMaterial"]
            text = material.decode() if isinstance(material, bytes) else material
            self.imported.append(text.split()[1])

        self.ec2.meta.events.register("provide-client-params.ec2.ImportKeyPair", keep)

    def authorized(self, key: paramiko.PKey) -> bool:
        """The SSH stand-in lets in only a key this job imported into EC2."""
        return key.get_base64() in self.imported

    def image(self, subvariant: str = "Cloud_Base", arch: str = "x86_64", **kw: Any) -> StagedImage:
        name = f"Fedora-{'AtomicHost' if subvariant == 'AtomicHost' else 'Cloud-Base'}-41.{arch}"
        args = {
            "compose_id": "Fedora-41-20261124.0",
            "image_name": name,
            "image_url": f"{COMPOSE_URL}/Cloud/{arch}/images/{name}.raw.xz",
            "architecture": arch,
            "region": REGION,
            "ami_id": register_ami(self.ec2, name),
            "subvariant": subvariant,
            "release": "41",
        }
        args.update(kw)
        return StagedImage(**args)

    def cfg(self, port: int = 22, **extra: Any) -> AutocloudConfig:
        raw = {
            "autocloud_ami.resultsdb_url": self.rdb.url,
            "autocloud_ami.ssh_cidr": "203.0.113.7/32",
            "autocloud_ami.ssh_override": f"127.0.0.1:{port}",
            "autocloud_ami.regions": [REGION],
            "autocloud_ami.host_key_wait": 0.0,
            "autocloud_ami.poll_interval": 0.05,
            "autocloud_ami.boot_timeout": 2.0,
            "autocloud_ami.ssh_timeout": 3.0,
            "autocloud_ami.reboot_timeout": 10.0,
            "autocloud_ami.cleanup_timeout": 10.0,
            "autocloud_ami.launch_retry_timeout": 0.0,
            "autocloud_ami.deadline": 300.0,
            "autocloud_ami.queue_timeout": 30.0,
            "autocloud_ami.resultsdb_spool": str(self.tmp_path / "spool"),
            "autocloud_ami.output_dir": str(self.tmp_path / "out"),
            "autocloud_ami.output_url": "https://autocloud.example/out",
        }
        raw.update({f"autocloud_ami.{k}": v for k, v in extra.items()})
        return AutocloudConfig.from_fedmsg(raw)

    def deps(self, cfg: AutocloudConfig, **kw: Any) -> Deps:
        args: dict[str, Any] = {
            "cfg": cfg,
            "aws": self.aws,
            "reporter": ResultsReporter(
                make_api(cfg.resultsdb_url, retries=1, backoff=0.01, timeout=10),
                Spool(cfg.resultsdb_spool),
            ),
            "emitter": Emitter(self.recorder),
            "output": OutputStore(Path(cfg.output_dir or ""), cfg.output_url),
            "suite": QUICK_SUITE,
            "slots": threading.BoundedSemaphore(cfg.max_concurrent),
            "retry_backoff": 0.05,
        }
        args.update(kw)
        return Deps(**args)

    def posted(self, ami: str) -> list[dict[str, Any]]:
        found = ResultsDBapi(self.rdb.url).get_results(item=ami, type="ami", limit=100)["data"]
        return sorted(found, key=lambda r: r["id"])


@pytest.fixture
def world(tmp_path: Path, recorder: Recorder) -> Iterator[World]:
    with mock_aws(), ResultsDBServer() as rdb:
        yield World(tmp_path, rdb, recorder)


def host(world: World, **kw: Any) -> SshTestHost:
    kw.setdefault("reboot_delay", 0.2)
    return SshTestHost(authorized=world.authorized, **kw)


def outcomes(result: JobResult) -> dict[str, tuple[str, str]]:
    return {o.test_id: (o.outcome, o.note) for o in result.report.outcomes}


def assert_messages(world: World, result: JobResult, final: str) -> None:
    topics = world.recorder.topics()
    assert topics == ["autocloud.ami.queued", "autocloud.ami.running", f"autocloud.ami.{final}"]
    for mtype, (_, _, body) in zip(
        (AMI_QUEUED, AMI_RUNNING, AMI_SUCCESS if final == "success" else AMI_FAILED),
        world.recorder.sent,
        strict=True,
    ):
        mtype.validate(body)
        assert body["ami_id"] == result.image.ami_id and body["job_id"] == result.job_id
        assert body["compose_id"] == result.image.compose_id and body["region"] == REGION
        assert body["results_url"] == result.results_url
    last = world.recorder.sent[-1][2]
    assert (last["passed"], last["failed"]) == result.counts()


def assert_reported(world: World, result: JobResult) -> None:
    """ResultsDB holds exactly what the job built, summary last, queryable by item."""
    found = world.posted(result.image.ami_id or "")
    assert [r["testcase"]["name"] for r in found] == [r.testcase for r in result.results]
    assert [r["outcome"] for r in found] == [r.outcome for r in result.results]
    assert found[-1]["testcase"]["name"] == "autocloud.ami.all"
    assert found[-1]["data"]["job_id"] == [result.job_id]


# -- healthy images --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "subvariant"), [("Base", "Cloud_Base"), ("Atomic", "AtomicHost")]
)
def test_healthy_image_passes(world: World, family: str, subvariant: str) -> None:
    image = world.image(subvariant)
    with host(world, family=family) as ssh:
        result = run_job(image, world.deps(world.cfg(ssh.port)))
        assert ssh.boots >= 3  # first boot and the suite's two reboots
    got = outcomes(result)
    gating = [o for o in result.report.outcomes if o.gating and o.outcome != "SKIPPED"]
    assert gating and all(o.outcome == "PASSED" for o in gating), got
    assert str(result.report.family) == family
    assert result.passed and result.reason is None
    skipped = {o.test_id for o in result.report.outcomes if o.outcome == "SKIPPED"}
    assert ("docker_installed" in skipped) is (family == "Base")
    assert ("packageinstall" in skipped) is (family == "Atomic")
    assert_messages(world, result, "success")
    assert_reported(world, result)
    assert leftovers(world.ec2) == NOTHING_LEFT and result.cleanup_errors == ()
    # Output is kept and linked from every result.
    assert all(
        r.ref_url and r.ref_url.startswith("https://autocloud.example/out/") for r in result.results
    )
    kept = world.tmp_path / "out" / (image.ami_id or "") / result.job_id
    assert "Enforcing" in (kept / "selinux.txt").read_text()
    assert "selinux" in (kept / "index.txt").read_text()
    assert len(world.imported) == 1  # the one key the job generated got in


# -- misbehaving images --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "failed", "why"),
    [
        ({"selinux_permissive": True}, ("selinux",), "Permissive"),
        ({"failed_unit": "cloud-init.service"}, ("services",), "loaded units"),
        ({"broken_dnf": True}, ("packageinstall",), "dnf"),
        ({"tmp_mode": 0o755}, ("cloud_tmp", "tmp_mount"), ""),
        ({"hang_on": "^getenforce"}, ("selinux",), "timed out"),
        # Across the suite's reboots: enable/disable forgotten at boot.
        ({"services_reset": True}, ("service_manipulation",), ""),
    ],
)
def test_misbehaving_image_fails_the_right_tests(
    world: World, fault: dict[str, Any], failed: tuple[str, ...], why: str
) -> None:
    image = world.image()
    with host(world, **fault) as ssh:
        result = run_job(image, world.deps(world.cfg(ssh.port)))
    got = outcomes(result)
    for test_id in failed:
        assert got[test_id][0] == "FAILED", got[test_id]
    assert why in got[failed[0]][1], got[failed[0]]
    # The other gating tests still ran and passed: only the fault's tests fail.
    others = [o for o in result.report.outcomes if o.gating and o.test_id not in failed]
    assert all(o.outcome in ("PASSED", "SKIPPED") for o in others), got
    assert not result.passed
    summary = result.results[-1]
    assert summary.outcome == "FAILED" and all(t in summary.note for t in failed)
    assert_messages(world, result, "failed")
    assert_reported(world, result)
    assert leftovers(world.ec2) == NOTHING_LEFT


@pytest.mark.parametrize("mode", ["refuse", "hang"])
def test_ssh_never_answering_fails_every_test_with_the_reason(world: World, mode: str) -> None:
    image = world.image()
    with host(world, never_accept=mode) as ssh:
        result = run_job(image, world.deps(world.cfg(ssh.port, ssh_timeout=1.0)))
    ran = [o for o in result.report.outcomes if o.outcome != "SKIPPED"]
    assert ran and all(o.outcome == "FAILED" and "SshPortTimeout" in o.note for o in ran)
    assert "SshPortTimeout" in (result.reason or "")
    assert result.results[-1].outcome == "FAILED"
    assert_messages(world, result, "failed")
    assert "SshPortTimeout" in world.recorder.sent[-1][2]["reason"]
    assert_reported(world, result)
    assert leftovers(world.ec2) == NOTHING_LEFT


class Sleeps:
    """A ``sleep`` that really sleeps and records how long it was asked to."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        time.sleep(seconds)


def test_slow_boot_and_late_key_are_waited_for_without_fixed_sleeps(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host boots, then takes the key, only when the test says so: the job polls
    through both and goes on at its first try after each, not after a fixed sleep."""
    image = world.image()
    probe_sleeps, login_sleeps = Sleeps(), Sleeps()
    monkeypatch.setattr(
        ssh_module, "time", SimpleNamespace(monotonic=time.monotonic, sleep=login_sleeps)
    )
    probe = functools.partial(wait_for_ssh_port, sleep=probe_sleeps)
    results: list[JobResult] = []
    with host(world, boot_delay=math.inf, key_delay=math.inf) as ssh:
        cfg = world.cfg(ssh.port, ssh_timeout=120.0)
        deps = world.deps(cfg, suite=TINY_SUITE, port_probe=probe)
        job = threading.Thread(target=lambda: results.append(run_job(image, deps)))
        job.start()
        try:
            wait_until(lambda: ssh.refused >= 2, 60, "the job to probe sshd while it boots")
            probed = len(probe_sleeps.asked)
            ssh.come_up()
            wait_until(lambda: ssh.key_refusals >= 2, 60, "the job to retry the missing key")
            tried = len(login_sleeps.asked)
            ssh.install_keys()
        finally:
            ssh.come_up()
            ssh.install_keys()
            job.join(120)
    assert not job.is_alive()
    [result] = results
    assert result.passed, outcomes(result)
    assert ssh.logins == 1
    # Each wait ended at the first look after what it waited for: at most the sleep
    # already under way when it happened, no fixed sleep after it.
    assert len(probe_sleeps.asked) - probed <= 1
    assert len(login_sleeps.asked) - tried <= 1


def test_login_that_never_works_fails_with_ssh_timeout(world: World) -> None:
    image = world.image()
    with SshTestHost(authorized=lambda key: False, reboot_delay=0.2) as ssh:
        # Long enough for the banner (the wait for it shares ssh_timeout) on a busy machine.
        result = run_job(image, world.deps(world.cfg(ssh.port, ssh_timeout=4.0), suite=TINY_SUITE))
    assert all("SshTimeout" in o.note for o in result.report.outcomes)
    assert leftovers(world.ec2) == NOTHING_LEFT


def test_instance_dying_mid_suite(world: World) -> None:
    image = world.image()
    with host(world, die_after=4) as ssh:
        result = run_job(
            image, world.deps(world.cfg(ssh.port, ssh_timeout=1.0, reboot_timeout=2.0))
        )
    got = result.report.outcomes
    passed = [o.test_id for o in got if o.outcome == "PASSED"]
    lost = [o for o in got if o.outcome == "FAILED"]
    assert passed and lost, outcomes(result)
    assert all("connection" in o.note for o in lost)
    assert not result.passed
    assert_messages(world, result, "failed")
    assert leftovers(world.ec2) == NOTHING_LEFT


def test_host_key_announced_on_the_console_is_verified(world: World) -> None:
    image = world.image()
    with host(world) as ssh:
        console_says(world.ec2, fingerprint_block(ssh.fingerprint))
        result = run_job(image, world.deps(world.cfg(ssh.port), suite=TINY_SUITE))
    assert result.passed


def test_wrong_host_key_fails_every_test(world: World) -> None:
    image = world.image()
    console_says(world.ec2, fingerprint_block("SHA256:" + "A" * 43))
    with host(world) as ssh:
        result = run_job(image, world.deps(world.cfg(ssh.port), suite=TINY_SUITE))
        assert ssh.logins == 0
    assert all(
        o.outcome == "FAILED" and "HostKeyMismatch" in o.note for o in result.report.outcomes
    )
    assert not result.passed
    assert_messages(world, result, "failed")
    assert leftovers(world.ec2) == NOTHING_LEFT


def fingerprint_block(fingerprint: str) -> str:
    return (
        "ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----\n"
        f"ec2: 256 {fingerprint} root@ip-172-31-20-5 (ECDSA)\n"
        "ec2: -----END SSH HOST KEY FINGERPRINTS-----\n"
    )


# -- AWS failures ---------------------------------------------------------------------------


class NoSsh:
    """A session factory that must never be called."""

    def __call__(self, target: SshTarget) -> Any:
        raise AssertionError(f"SSH attempted to {target.host}")


def test_instance_never_running(world: World) -> None:
    image = world.image()
    after_run_instances(world.ec2, set_state("pending", 0))
    cfg = world.cfg(boot_timeout=0.3)
    result = run_job(image, world.deps(cfg, suite=TINY_SUITE, session_factory=NoSsh()))
    assert all("BootTimeout" in o.note for o in result.report.outcomes)
    assert [r.outcome for r in result.results] == ["FAILED", "FAILED", "FAILED"]
    assert_messages(world, result, "failed")
    assert_reported(world, result)
    assert leftovers(world.ec2) == NOTHING_LEFT


def test_missing_ami_is_reported_failed(world: World) -> None:
    image = world.image(ami_id="ami-0123456789abcdef0")
    result = run_job(image, world.deps(world.cfg(), suite=TINY_SUITE, session_factory=NoSsh()))
    assert "AmiUnavailable" in (result.reason or "")
    assert result.results[-1].outcome == "FAILED"
    assert_reported(world, result)
    assert leftovers(world.ec2) == NOTHING_LEFT


def test_quota_error_is_reported_failed(world: World) -> None:
    image = world.image()
    fail_calls(world.ec2, "RunInstances", "VcpuLimitExceeded")
    result = run_job(image, world.deps(world.cfg(), suite=TINY_SUITE, session_factory=NoSsh()))
    assert "VcpuLimitExceeded" in (result.reason or "")
    assert all(o.outcome == "FAILED" for o in result.report.outcomes)
    assert_messages(world, result, "failed")
    assert leftovers(world.ec2) == NOTHING_LEFT


def test_bug_in_a_seam_still_reports_and_cleans_up(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(target: SshTarget) -> Any:
        raise RuntimeError("factory bug")

    image = world.image()
    result = run_job(image, world.deps(world.cfg(), suite=TINY_SUITE, session_factory=broken))
    assert "internal error" in (result.reason or "")
    assert result.results[-1].outcome == "FAILED"
    assert any(r.levelname == "ERROR" for r in caplog.records)
    assert leftovers(world.ec2) == NOTHING_LEFT


def test_resultsdb_down_spools_and_the_job_still_finishes(world: World) -> None:
    image = world.image()
    world.rdb.set_down(True)
    with host(world) as ssh:
        cfg = world.cfg(ssh.port)
        deps = world.deps(cfg, suite=TINY_SUITE)
        result = run_job(image, deps)
    assert result.passed and result.delivery is not None
    assert result.delivery.spooled == 3 and not result.delivery.complete
    assert_messages(world, result, "success")
    world.rdb.set_down(False)
    assert world.posted(image.ami_id or "") == []
    done = deps.reporter.flush()  # type: ignore[attr-defined]
    assert done.posted == 3
    assert_reported(world, result)


def test_publishing_failure_does_not_stop_the_job(world: World) -> None:
    def broken(modname: str, topic: str, body: dict[str, Any]) -> None:
        raise OSError("bus down")

    image = world.image()
    with host(world) as ssh:
        result = run_job(
            image, world.deps(world.cfg(ssh.port), suite=TINY_SUITE, emitter=Emitter(broken))
        )
    assert result.passed
    assert_reported(world, result)


# -- requests refused before any AWS call -----------------------------------------------------


def count_ec2_calls(ec2: Any) -> list[str]:
    calls: list[str] = []

    def hook(model: Any, **_: Any) -> None:
        calls.append(model.name)

    ec2.meta.events.register("before-call.ec2", hook)
    return calls


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"ami_id": None}, "no AMI id"),
        ({"region": "eu-west-1"}, "region"),
        ({"architecture": "aarch64"}, "architecture"),
    ],
)
def test_bad_requests_are_refused_without_touching_aws(
    world: World, change: dict[str, Any], match: str
) -> None:
    image = dataclasses.replace(world.image(), **change)
    calls = count_ec2_calls(world.ec2)
    cfg = world.cfg(instance_types={"x86_64": "t3.small"})
    with pytest.raises(InvalidRequest, match=match):
        run_job(image, world.deps(cfg, session_factory=NoSsh()))
    assert calls == [] and world.recorder.sent == []
    assert world.posted(world.image().ami_id or "") == []


def test_malformed_ami_id_is_refused_even_if_it_got_past_parsing(world: World) -> None:
    image = world.image()
    object.__setattr__(image, "ami_id", "ami-XYZ; rm -rf /")
    with pytest.raises(InvalidRequest, match="not an AMI id"):
        check_request(image, world.cfg())


def test_instance_type_follows_the_architecture(world: World) -> None:
    sent: list[str] = []
    world.ec2.meta.events.register(
        "provide-client-params.ec2.RunInstances",
        lambda params, **_: sent.append(params["InstanceType"]),
    )
    cfg = world.cfg()
    for arch in ("x86_64", "aarch64"):
        deps = world.deps(cfg, suite=TINY_SUITE, session_factory=refusing, port_probe=no_probe)
        run_job(world.image(arch=arch), deps)
    assert sent == ["t3.small", "t4g.small"]


def no_probe(host: str, port: int, timeout: float) -> None:
    """Fake sessions need no port."""


def refusing(target: SshTarget) -> Any:
    return FakeSession(connect_error=SshTimeout("nothing listens"))


# -- slots --------------------------------------------------------------------------------------


class FakeSession:
    """A scripted session: every command succeeds with ``answer``; counts who is logged in."""

    active = 0
    most = 0
    lock = threading.Lock()

    def __init__(
        self, connect_error: Exception | None = None, gate: threading.Event | None = None
    ) -> None:
        self.connect_error = connect_error
        self.gate = gate

    def connect(self, timeout: float) -> None:
        if self.connect_error:
            raise self.connect_error
        with FakeSession.lock:
            FakeSession.active += 1
            FakeSession.most = max(FakeSession.most, FakeSession.active)

    def run(self, command: str, timeout: float) -> CommandResult:
        if self.gate is not None:
            self.gate.wait(timeout)
        if command.startswith("test -e /run/ostree-booted"):
            return CommandResult(command, 1, "", "", 0.0)
        return CommandResult(command, 0, "Enforcing\n", "", 0.0)

    def reconnect(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        with FakeSession.lock:
            FakeSession.active = max(0, FakeSession.active - 1)


def test_concurrent_jobs_are_bounded_by_max_concurrent(world: World) -> None:
    FakeSession.active = FakeSession.most = 0
    gate = threading.Event()
    cfg = world.cfg(max_concurrent=2)
    deps = world.deps(
        cfg,
        suite=TINY_SUITE[:1],
        session_factory=lambda t: FakeSession(gate=gate),
        port_probe=no_probe,
    )
    images = [world.image(image_name=f"Fedora-Cloud-Base-41.{n}") for n in range(4)]
    results: list[JobResult] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(run_job(i, deps))) for i in images
    ]
    for t in threads:
        t.start()
    wait_until(lambda: FakeSession.active == 2, 20, "two jobs logged in")
    queued = world.recorder.topics().count("autocloud.ami.queued")
    running = world.recorder.topics().count("autocloud.ami.running")
    assert (queued, running) == (4, 2)
    gate.set()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 4 and all(r.passed for r in results)
    assert FakeSession.most == 2
    assert leftovers(world.ec2) == NOTHING_LEFT


def test_no_free_slot_before_queue_timeout(world: World) -> None:
    cfg = world.cfg(max_concurrent=1, queue_timeout=0.2)
    deps = world.deps(cfg, session_factory=NoSsh())
    assert deps.slots.acquire(timeout=1)  # somebody else holds the only slot
    try:
        with pytest.raises(QueueTimeout):
            run_job(world.image(), deps)
    finally:
        deps.slots.release()
    assert world.recorder.topics() == ["autocloud.ami.queued", "autocloud.ami.failed"]
    AMI_FAILED.validate(world.recorder.sent[-1][2])


def test_production_session_factory_checks_the_announced_key() -> None:
    key = paramiko.Ed25519Key.from_private_key_file  # noqa: F841 - presence only
    target = SshTarget("127.0.0.1", 22, "fedora", paramiko.ECDSAKey.generate(), ("SHA256:x",))
    session = paramiko_session(target)
    assert session.expected_fingerprints == frozenset({"SHA256:x"})  # type: ignore[attr-defined]
    assert "PRIVATE" not in repr(target) and "key=" not in repr(target)


# -- the consumer, without a hub -------------------------------------------------------------


def consumer_with(calls: list[StagedImage], monkeypatch: pytest.MonkeyPatch) -> Any:
    """An AmiTestConsumer whose job is recorded (the hub-level test runs the real one)."""
    import autocloud_ami.job
    from autocloud_ami.consumer import AmiTestConsumer
    from fedimg.messages import Topics

    def fake_test_ami(image: StagedImage, deps: Any) -> Any:
        calls.append(image)
        if image.region == "eu-west-1":
            raise InvalidRequest("region eu-west-1 is not one this runner tests")
        return dataclasses.make_dataclass("R", [("job_id", str), ("passed", bool)])("j", True)

    monkeypatch.setattr(autocloud_ami.job, "test_ami", fake_test_ami)
    consumer = AmiTestConsumer.__new__(AmiTestConsumer)
    consumer.topics = Topics("org.fedoraproject", "prod")
    consumer.__dict__["deps"] = None  # never used: test_ami is replaced
    return consumer


def envelope(topic: str, body: Any) -> dict[str, Any]:
    return {"topic": topic, "body": {"topic": topic, "msg": body}}


def test_consumer_acts_on_started_requests_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from fedimg.messages import image_event

    calls: list[StagedImage] = []
    consumer = consumer_with(calls, monkeypatch)
    topic = "org.fedoraproject.prod.fedimg.image.test"
    image = StagedImage(
        "Fedora-41-1",
        "Fedora-Cloud-Base-41",
        COMPOSE_URL,
        "x86_64",
        REGION,
        "ami-0123456789abcdef0",
    )
    consumer.consume(envelope(topic, image_event(image, "started")))
    assert calls == [image]
    consumer.consume(envelope(topic, image_event(image, "completed")))
    consumer.consume(
        envelope("org.fedoraproject.dev.fedimg.image.test", image_event(image, "started"))
    )
    assert len(calls) == 1  # other statuses and other environments are not requests
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize(
    "body",
    [
        {"status": "started"},
        "not an object",
        {
            "image_name": "x",
            "destination": "us-east-1",
            "service": "EC2",
            "status": "started",
            "compose": "Fedora-41-1",
            "architecture": "x86_64",
            "extra": {"id": "ami-XYZ"},
        },
        {
            "image_name": "Fedora-41",
            "destination": "us-east-1",
            "service": "EC2",
            "status": "started",
            "compose": "Fedora-41-1",
            "architecture": "x86_64",
            "extra": {},
        },
        {
            "image_name": "Fedora-41",
            "destination": "us-east-1",
            "service": "EC2",
            "status": "started",
            "compose": "Fedora-41-1",
            "architecture": "ppc64le",
            "extra": {"id": "ami-0123456789abcdef0"},
        },
    ],
)
def test_consumer_logs_malformed_requests_and_survives(
    body: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[StagedImage] = []
    consumer = consumer_with(calls, monkeypatch)
    consumer.consume(envelope("org.fedoraproject.prod.fedimg.image.test", body))
    assert calls == []
    assert any(r.levelname == "ERROR" for r in caplog.records)


def test_consumer_logs_refused_requests(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from fedimg.messages import image_event

    calls: list[StagedImage] = []
    consumer = consumer_with(calls, monkeypatch)
    image = StagedImage(
        "Fedora-41-1",
        "Fedora-Cloud-Base-41",
        COMPOSE_URL,
        "x86_64",
        "eu-west-1",
        "ami-0123456789abcdef0",
    )
    consumer.consume(
        envelope("org.fedoraproject.prod.fedimg.image.test", image_event(image, "started"))
    )
    assert len(calls) == 1
    assert any(r.levelname == "ERROR" for r in caplog.records)


# -- the CLI's pure parts (the subprocess runs are in test_autocloud_integration.py) -------------


FEDIMG_TAGS = [
    {"Key": "fedimg:compose-id", "Value": "Fedora-41-20261124.0"},
    {"Key": "fedimg:image-name", "Value": "Fedora-Cloud-Base-41"},
    {"Key": "fedimg:arch", "Value": "aarch64"},
    {"Key": "fedimg:subvariant", "Value": "Cloud_Base"},
    {"Key": "fedimg:release", "Value": "41"},
    {"Key": "fedimg:image-url", "Value": f"{COMPOSE_URL}/Cloud/aarch64/images/x.raw.xz"},
]


def test_cli_reads_the_request_from_fedimg_tags() -> None:
    from autocloud_ami.cli import request_from_tags

    ami = {"ImageId": "ami-0123456789abcdef0", "Tags": FEDIMG_TAGS}
    request = request_from_tags(ami, REGION, {})
    assert (request.compose_id, request.architecture, request.subvariant, request.release) == (
        "Fedora-41-20261124.0",
        "aarch64",
        "Cloud_Base",
        "41",
    )
    assert request.ami_id == "ami-0123456789abcdef0" and request.region == REGION
    overridden = request_from_tags(ami, REGION, {"arch": "x86_64", "compose-id": None})
    assert overridden.architecture == "x86_64" and overridden.compose_id == "Fedora-41-20261124.0"


@pytest.mark.parametrize(
    ("tags", "match"),
    [
        ([t for t in FEDIMG_TAGS if t["Key"] != "fedimg:compose-id"], "fedimg:compose-id"),
        ([t for t in FEDIMG_TAGS if t["Key"] != "fedimg:arch"], "fedimg:arch"),
        ([*FEDIMG_TAGS[:2], {"Key": "fedimg:arch", "Value": "s390x"}], "bad fedimg tags"),
        ([], "not staged by fedimg"),
    ],
)
def test_cli_refuses_amis_without_usable_tags(tags: list[dict[str, str]], match: str) -> None:
    from autocloud_ami.cli import CliError, request_from_tags

    with pytest.raises(CliError, match=match):
        request_from_tags({"ImageId": "ami-0123456789abcdef0", "Tags": tags}, REGION, {})


def test_cli_table_lists_every_test_and_the_summary(world: World) -> None:
    import io

    from autocloud_ami.cli import print_table

    image = world.image()
    with host(world, selinux_permissive=True) as ssh:
        result = run_job(image, world.deps(world.cfg(ssh.port), suite=TINY_SUITE))
    out = io.StringIO()
    print_table(result, out)
    lines = out.getvalue().splitlines()
    assert lines[0] == f"scenario x86_64:t3.small (job {result.job_id})"
    assert lines[1].split() == ["TEST", "GATING", "OUTCOME", "NOTE"]
    assert lines[2].split()[:3] == ["selinux", "yes", "FAILED"]
    assert lines[3].split()[:3] == ["bash_version", "no", "PASSED"]
    assert any(line.startswith("autocloud.ami.all: FAILED") for line in lines)
    assert any(result.job_id in line for line in lines)


# -- scenarios: a matrix of instance types -----------------------------------------------------

EC2_SUITE = tuple(
    c
    for c in QUICK_SUITE
    if c.id
    in {"selinux", "imds_v2", "root_nvme", "cloud_init", "hostname_metadata"}
    | {"ssh_key_metadata", "docker_installed"}
)


def launches(world: World) -> list[dict[str, Any]]:
    """What the job SENT to run_instances (moto keeps less than AWS would)."""
    sent: list[dict[str, Any]] = []
    world.ec2.meta.events.register(
        "provide-client-params.ec2.RunInstances", lambda params, **_: sent.append(dict(params))
    )
    return sent


def test_every_scenario_runs_on_its_own_instance_and_reports_on_its_own(world: World) -> None:
    """t3.small (Nitro) and t2.small (Xen) at once; the region lacks the third type."""
    image = world.image()
    sent = launches(world)
    directory = AwsDirectory(lambda region: world.ec2, [REGION])
    with InstanceHost(directory, reboot_delay=0.2) as instances:
        cfg = world.cfg(
            instances.port,
            scenarios={"x86_64": ["t3.small", "t2.small", "hpc7a.12xlarge"]},
            ssh_timeout=20.0,
        )
        result = run_job(image, world.deps(cfg, suite=EC2_SUITE))
        seen = {i.os.metadata.instance_type: i.os.metadata for i in instances.instances()}
    by_name = {s.scenario: s for s in result.scenarios}
    assert list(by_name) == ["x86_64:t3.small", "x86_64:t2.small", "x86_64:hpc7a.12xlarge"]
    assert [s.outcome for s in result.scenarios] == ["PASSED", "PASSED", "NEEDS_INSPECTION"]
    assert not result.passed  # one scenario could not run: not released on missing results
    # Each scenario had its own instance, key pair and job id; the Nitro check ran on
    # the Nitro type only and does not apply on the Xen one.
    assert sorted(seen) == ["t2.small", "t3.small"]
    assert seen["t3.small"].nvme and not seen["t2.small"].nvme
    assert sorted(p["InstanceType"] for p in sent) == ["t2.small", "t3.small"]
    assert all(p["MetadataOptions"]["HttpTokens"] == "required" for p in sent)
    assert len({p["KeyName"] for p in sent}) == 2
    assert [s.job_id for s in result.scenarios] == [
        f"{result.job_id}-t3.small",
        f"{result.job_id}-t2.small",
        f"{result.job_id}-hpc7a.12xlarge",
    ]
    nvme = {s.instance_type: dict(outcomes_of(s))["root_nvme"] for s in result.scenarios}
    assert nvme["t3.small"] == "PASSED" and nvme["t2.small"] == "SKIPPED"
    unavailable = by_name["x86_64:hpc7a.12xlarge"]
    assert "us-east-1 does not offer instance type hpc7a.12xlarge" in (unavailable.reason or "")
    assert "does not offer" in unavailable.results[-1].note
    # ResultsDB: every result names its scenario; each scenario's summary is its last.
    found = world.posted(image.ami_id or "")
    assert [r["testcase"]["name"] for r in found] == [r.testcase for r in result.results]
    names = [r["testcase"]["name"] for r in found]
    # Every test first, then the summaries, those that did not pass last.
    assert names[-3:] == ["autocloud.ami.all"] * 3 and "autocloud.ami.all" not in names[:-3]
    assert [r["outcome"] for r in found[-3:]] == ["PASSED", "PASSED", "NEEDS_INSPECTION"]
    run = "x86_64:t3.small,x86_64:t2.small,x86_64:hpc7a.12xlarge"
    assert all(r["data"]["scenarios"] == [run] for r in found[-3:])
    for scenario in by_name:
        mine = [r for r in found if r["data"]["scenario"] == [scenario]]
        assert mine[-1]["testcase"]["name"] == "autocloud.ami.all"
        assert sum(r["testcase"]["name"] == "autocloud.ami.all" for r in mine) == 1
    skipped = [r for r in found if r["outcome"] == "INFO"]
    assert {r["testcase"]["name"] for r in skipped} == {
        "autocloud.ami.docker_installed",
        "autocloud.ami.root_nvme",
    }
    assert all(r["data"]["skipped"][0] for r in skipped)
    assert_messages(world, result, "failed")
    assert leftovers(world.ec2) == NOTHING_LEFT and result.cleanup_errors == ()


def outcomes_of(scenario: Any) -> list[tuple[str, str]]:
    return [(o.test_id, o.outcome) for o in scenario.report.outcomes]


@pytest.mark.parametrize(
    ("itype", "inject", "why"),
    [
        ("x9.nope", None, "not an EC2 instance type (InvalidInstanceType)"),
        ("hpc7a.12xlarge", None, "us-east-1 does not offer instance type hpc7a.12xlarge"),
        ("t4g.small", None, "runs arm64, not x86_64"),
        # Unsupported and InvalidParameterValue alike: test_instance.py
        ("t3.small", "InsufficientInstanceCapacity", "InsufficientInstanceCapacity"),
    ],
)
def test_an_instance_type_that_cannot_run_needs_inspection(
    world: World, itype: str, inject: str | None, why: str
) -> None:
    image = world.image()
    sent = launches(world)
    if inject:
        fail_calls(world.ec2, "RunInstances", inject)
    cfg = world.cfg(scenarios={"x86_64": [itype]})
    result = run_job(image, world.deps(cfg, suite=TINY_SUITE, session_factory=NoSsh()))
    [scenario] = result.scenarios
    assert scenario.outcome == "NEEDS_INSPECTION" and why in scenario.results[-1].note
    assert why in (result.reason or "")
    assert [r.outcome for r in result.results] == ["NEEDS_INSPECTION"] * 3
    assert bool(sent) is bool(inject)  # described first: launched only when it can run
    assert_messages(world, result, "failed")
    assert_reported(world, result)
    assert leftovers(world.ec2) == NOTHING_LEFT


def test_an_atomic_image_is_launched_without_requiring_imds_tokens(world: World) -> None:
    """Atomic Host's cloud-init (17.1) predates IMDSv2: tokens only for the Base family."""
    sent = launches(world)
    fail_calls(world.ec2, "RunInstances", "Unsupported")
    for subvariant in ("AtomicHost", "Cloud_Base"):
        run_job(world.image(subvariant), world.deps(world.cfg(), session_factory=NoSsh()))
    assert [p["MetadataOptions"]["HttpTokens"] for p in sent] == ["optional", "required"]


def _scenario(name: str, outcome: str) -> ScenarioResult:
    image = StagedImage(
        compose_id="Fedora-41-20261124.0",
        image_name="Fedora-Cloud-Base-41.x86_64",
        image_url=f"{COMPOSE_URL}/Cloud/x86_64/images/Fedora-Cloud-Base-41.x86_64.raw.xz",
        architecture="x86_64",
        region=REGION,
        ami_id="ami-0123456789abcdef0",
        subvariant="Cloud_Base",
    )
    report = SuiteReport(Family.BASE, (TestOutcome("selinux", outcome, True, "", "", 0.0),))
    results = build_results(image, report.outcomes, job_id="j", family="Base", scenario=name)
    return ScenarioResult(name, name.split(":")[1], "j", report, tuple(results))


@pytest.mark.parametrize(
    ("outcomes", "last"),
    [
        (("PASSED", "PASSED"), "PASSED"),
        (("FAILED", "PASSED"), "FAILED"),
        (("PASSED", "FAILED"), "FAILED"),
        (("NEEDS_INSPECTION", "PASSED", "PASSED"), "NEEDS_INSPECTION"),
    ],
)
def test_summaries_come_after_every_test_and_a_failing_one_comes_last(
    outcomes: tuple[str, ...], last: str
) -> None:
    scenarios = [_scenario(f"x86_64:t{n}.small", o) for n, o in enumerate(outcomes)]
    posted = posting_order(scenarios)
    kinds = [r.testcase == "autocloud.ami.all" for r in posted]
    assert kinds == [False] * len(outcomes) + [True] * len(outcomes)
    assert posted[-1].outcome == last
    assert sorted(r.data["scenario"] for r in posted if r.testcase == "autocloud.ami.all") == [
        s.scenario for s in scenarios
    ]
