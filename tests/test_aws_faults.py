"""AWS faults on every AWS-touching step, injected in botocore's send path (tests/faults.py).

For each step of the pipeline that calls AWS -- staging (EBS direct APIs,
RegisterImage, tags), the test instance (launch, wait, cleanup) and the
promotion (CopyImage, publishing) -- and each kind of fault:

* transient (throttling, 500, 503, read timeout, connection error) for a
  while: retried by botocore's adaptive policy (the production
  ``AwsClients``) or by the code's own backoff, and the work completes as if
  nothing happened: one AMI, one copy per region, nothing left behind;
* lasting or not retryable (an outage longer than the retries, a region
  refusing copies): reported (a failed message, a failed region, a cleanup
  error), never a wrong release, nothing leaked -- and the work completes
  once AWS is back (a replay, a resume, the reconcile pass, the sweeper);
* a lost response (the call WAS carried out, its answer never came): the
  retry finds what the first call made instead of making a second one.

Tests already in the per-module files are not repeated here (see
docs/reliability.md for the list); these use the production retry
policy end to end, with botocore's sleeps skipped (``quick_retries``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import BotoCoreError, ClientError
from moto import mock_aws

from autocloud_ami.instance import TestInstance, Timeouts
from autocloud_ami.job import test_ami as run_job
from autocloud_ami.sweeper import sweep_region
from devel.compose import DEFAULT_IMAGES, ComposeServer, ComposeTree, build_compose
from devel.compose import compose_message as pungi_body
from devel.resultsdb import ResultsDBServer
from fedimg import tags
from fedimg.aws import AwsClients, error_code
from fedimg.config import FedimgConfig
from fedimg.copies import CopyError, Timing
from fedimg.engine import Engine
from fedimg.http import make_session
from fedimg.messages import Emitter, parse_compose_status
from fedimg.promote import Promoter
from fedimg.results import DummyResults
from fedimg.stage import StageOutcome
from tests.conftest import Recorder
from tests.engine_support import make_engine
from tests.faults import (
    CONNECTION_ERROR,
    READ_TIMEOUT,
    RESPONSE_LOST,
    SERVER_ERROR,
    THROTTLED,
    TRANSIENT,
    UNAVAILABLE,
    BotocoreWaits,
    Kind,
    aws_error,
    aws_rules,
    inject,
    quick_retries,
)
from tests.test_instance import NOTHING_LEFT, SESSION, leftovers, make_spec, register_ami
from tests.test_job import TINY_SUITE, World, host
from tests.test_promote import (
    NOW,
    STAGING,
    TARGETS,
    TESTCASE,
    FakeClock,
    copies_in,
    launch_public,
    make_cfg,
    notice,
    stage_ami,
    state,
    validate_all,
)
from tests.test_promote import ec2 as plain_ec2  # a client no fault is injected into

# botocore's ``max_attempts`` counts RETRIES: one call is sent up to MAX_RETRIES + 1 times.
MAX_RETRIES = 5
ATTEMPTS = MAX_RETRIES + 1
BURST = TRANSIENT  # every transient fault in turn, one per attempt: len(BURST) < ATTEMPTS
ARM_SPEC = next(s for s in DEFAULT_IMAGES if s.arch == "aarch64")


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> BotocoreWaits:
    return quick_retries(monkeypatch)


@pytest.fixture
def aws_mock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")  # not ours, and slow
    with mock_aws():
        yield


def ids(kinds: tuple[Kind, ...]) -> list[str]:
    return [k.name for k in kinds]


def aws_clients(component: str = "fedimg") -> AwsClients:
    """The production client factory and retry policy (one shared boto3 session: fast)."""
    return AwsClients(max_attempts=MAX_RETRIES, session=SESSION, component=component)


# ==========================================================================================
# Staging: one image, EBS direct APIs, RegisterImage, tags
# ==========================================================================================


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> ComposeTree:
    return build_compose(tmp_path_factory.mktemp("compose"), images=(ARM_SPEC,))


@dataclass
class StageWorld:
    tree: ComposeTree
    server: ComposeServer
    aws: AwsClients
    recorder: Recorder
    caplog: pytest.LogCaptureFixture
    engine: Engine

    @property
    def ec2(self) -> Any:
        return self.aws.ec2(STAGING)

    @property
    def ebs(self) -> Any:
        return self.aws.ebs(STAGING)

    def client(self, service: str) -> Any:
        return self.aws.client(service, STAGING)

    def stage(self) -> StageOutcome:
        (outcome,) = self.engine.accept_compose(
            parse_compose_status(pungi_body(self.tree, self.server.url))
        )
        return outcome

    def amis(self) -> list[dict[str, Any]]:
        return list(plain_ec2(STAGING).describe_images(Owners=["self"])["Images"])

    def snapshots(self) -> list[dict[str, Any]]:
        """The snapshots the stage uploaded (not the ones moto makes for RegisterImage)."""
        found = plain_ec2(STAGING).describe_snapshots(OwnerIds=["self"])["Snapshots"]
        return [s for s in found if str(s.get("Description", "")).startswith("fedimg ")]

    def statuses(self, topic: str) -> list[str]:
        return [b["status"] for b in self.recorder.bodies(topic)]


@pytest.fixture
def staging(
    tree: ComposeTree,
    aws_mock: None,
    waits: BotocoreWaits,
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> Iterator[StageWorld]:
    cfg = FedimgConfig(
        resultsdb_url="http://127.0.0.1:9/api/v2.0",
        regions=list(TARGETS),
        arches=["aarch64"],
        upload_workers=2,
        stage_workers=1,
        http_retries=0,
        http_timeout=5.0,
        aws_max_attempts=MAX_RETRIES,
        state_dir=str(tmp_path / "state"),
    )
    aws = aws_clients()
    with ComposeServer(tree.root, stall_seconds=5) as server:
        engine = make_engine(
            cfg,
            Emitter(recorder),
            aws,
            tmp_path / "state",
            session=make_session(cfg.http_retries, cfg.http_timeout),
            available_timeout=5.0,
            poll_interval=0.05,
        )
        try:
            yield StageWorld(tree, server, aws, recorder, caplog, engine)
        finally:
            engine.close()


STAGE_CALLS = [
    ("ebs", "StartSnapshot"),
    ("ebs", "PutSnapshotBlock"),
    ("ebs", "CompleteSnapshot"),
    ("ec2", "DescribeImages"),
    ("ec2", "DescribeSnapshots"),
    ("ec2", "RegisterImage"),
    ("ec2", "CreateTags"),
]


@pytest.mark.parametrize(("service", "operation"), STAGE_CALLS, ids=[op for _, op in STAGE_CALLS])
def test_staging_rides_out_a_burst_of_every_transient_fault_on_each_call(
    staging: StageWorld, waits: BotocoreWaits, service: str, operation: str
) -> None:
    fault = inject(staging.client(service), operation, BURST, times=len(BURST))
    outcome = staging.stage()
    assert outcome.status == "staged", outcome.reason
    assert fault.injected == ids(BURST), "the faults did not all hit: the call was not made"
    assert waits.retries >= fault.hits  # every fault was retried by botocore, with a backoff
    (image,) = staging.amis()
    assert image["ImageId"] == outcome.ami_id
    (snapshot,) = staging.snapshots()
    assert snapshot["State"] == "completed"
    assert tags.state_of(image) is tags.State.TESTING
    assert staging.statuses("fedimg.image.upload") == ["started", "completed"]
    assert staging.statuses("fedimg.image.test") == ["started"]


LASTING = [
    ("ebs", "StartSnapshot", SERVER_ERROR),
    ("ebs", "PutSnapshotBlock", READ_TIMEOUT),
    ("ebs", "CompleteSnapshot", UNAVAILABLE),
    ("ec2", "DescribeImages", CONNECTION_ERROR),
    ("ec2", "DescribeSnapshots", THROTTLED),
    ("ec2", "RegisterImage", SERVER_ERROR),
    ("ec2", "CreateTags", READ_TIMEOUT),
]


@pytest.mark.parametrize(
    ("service", "operation", "kind"), LASTING, ids=[f"{op}-{k}" for _, op, k in LASTING]
)
def test_an_outage_longer_than_the_retries_fails_the_image_cleanly_and_a_replay_stages_it(
    staging: StageWorld, service: str, operation: str, kind: Kind
) -> None:
    fault = inject(staging.client(service), operation, kind, times=None)
    outcome = staging.stage()

    assert outcome.status == "failed" and outcome.ami_id is None
    assert fault.hits >= ATTEMPTS  # botocore tried as often as configured, then gave up
    uploads = staging.statuses("fedimg.image.upload")
    assert uploads[-1] == "failed" and "completed" not in uploads
    (failed,) = [
        b for b in staging.recorder.bodies("fedimg.image.upload") if b["status"] == "failed"
    ]
    assert failed["reason"]
    assert staging.recorder.bodies("fedimg.image.test") == []  # nothing to test
    assert staging.amis() == [] and staging.snapshots() == []  # nothing half-made is left
    assert any(r.levelno >= logging.ERROR for r in staging.caplog.records)

    # AWS is back: the replayed compose message stages the image.
    fault.heal()
    again = staging.stage()
    assert again.status == "staged", again.reason
    assert [i["ImageId"] for i in staging.amis()] == [again.ami_id]
    assert len(staging.snapshots()) == 1


@pytest.mark.parametrize(
    ("service", "operation"),
    [
        ("ec2", "RegisterImage"),
        ("ec2", "CreateTags"),
        ("ebs", "PutSnapshotBlock"),
        ("ebs", "CompleteSnapshot"),
    ],
)
def test_a_lost_answer_is_not_a_second_ami(
    staging: StageWorld, service: str, operation: str
) -> None:
    rules = aws_rules(staging.ec2)  # AWS refuses a second AMI of the same name; moto does not
    fault = inject(staging.client(service), operation, RESPONSE_LOST, times=1)
    outcome = staging.stage()
    assert outcome.status == "staged", outcome.reason
    assert fault.hits == 1
    (image,) = staging.amis()
    assert image["ImageId"] == outcome.ami_id
    assert len(staging.snapshots()) == 1
    if operation == "RegisterImage":
        assert rules.duplicates_refused == 1  # the retry met AWS's duplicate-name refusal
    assert staging.statuses("fedimg.image.test") == ["started"]


# ==========================================================================================
# The test instance: launch, wait, cleanup
# ==========================================================================================

FAST = Timeouts(boot=5.0, host_key_wait=0.0, cleanup=5.0, launch_retry=0.0, poll=0.01)
INSTANCE_CALLS = [
    "DescribeImages",
    "ImportKeyPair",
    "DescribeSecurityGroups",
    "CreateSecurityGroup",
    "AuthorizeSecurityGroupIngress",
    "RunInstances",
    "DescribeInstances",
    "TerminateInstances",
    "DeleteKeyPair",
    "DeleteSecurityGroup",
]


@pytest.fixture
def test_aws(aws_mock: None, waits: BotocoreWaits) -> AwsClients:
    return aws_clients("autocloud_ami")


def left_in_aws() -> dict[str, list[str]]:
    """Tagged test resources still alive, read with a client no fault is injected into."""
    return leftovers(plain_ec2(STAGING))


@pytest.mark.parametrize("operation", INSTANCE_CALLS)
def test_test_instance_rides_out_a_burst_of_every_transient_fault_and_leaves_nothing(
    test_aws: AwsClients, operation: str
) -> None:
    ec2 = test_aws.ec2(STAGING)
    ami = register_ami(ec2)
    fault = inject(ec2, operation, BURST, times=len(BURST))
    with TestInstance(ec2, make_spec(ami, region=STAGING), FAST) as inst:
        assert inst.instance_id and inst.host
    assert fault.injected == ids(BURST), "the faults did not all hit: the call was not made"
    assert inst.cleanup_errors == []
    assert left_in_aws() == NOTHING_LEFT


@pytest.mark.parametrize(
    "operation",
    [
        "RunInstances",
        "ImportKeyPair",
        "CreateSecurityGroup",
        "AuthorizeSecurityGroupIngress",
        "TerminateInstances",
        "DeleteKeyPair",
        "DeleteSecurityGroup",
    ],
)
def test_test_instance_survives_lost_answers_and_leaves_nothing(
    test_aws: AwsClients, operation: str
) -> None:
    """The call happened, its answer was lost, botocore sent it again."""
    ec2 = test_aws.ec2(STAGING)
    ami = register_ami(ec2)
    fault = inject(ec2, operation, RESPONSE_LOST, times=1)
    with TestInstance(ec2, make_spec(ami, region=STAGING), FAST) as inst:
        assert inst.instance_id
    assert fault.hits == 1
    assert inst.cleanup_errors == []
    assert left_in_aws() == NOTHING_LEFT


@pytest.mark.parametrize(
    ("operation", "kind"),
    [
        ("TerminateInstances", SERVER_ERROR),
        ("DescribeInstances", READ_TIMEOUT),
        ("DeleteKeyPair", UNAVAILABLE),
        ("DeleteSecurityGroup", CONNECTION_ERROR),
        ("TerminateInstances", aws_error("UnauthorizedOperation", 403)),
    ],
    ids=["terminate-500", "describe-timeout", "keypair-503", "group-unreachable", "terminate-403"],
)
def test_cleanup_outage_is_reported_and_the_sweeper_removes_what_is_left(
    test_aws: AwsClients, caplog: pytest.LogCaptureFixture, operation: str, kind: Kind
) -> None:
    ec2 = test_aws.ec2(STAGING)
    ami = register_ami(ec2)
    spec = make_spec(ami, region=STAGING)
    with TestInstance(ec2, spec, FAST) as inst:
        fault = inject(ec2, operation, kind, times=None)  # AWS fails during the cleanup
    assert fault.hits >= 1
    assert inst.cleanup_errors, "a failed cleanup must be reported"
    assert any(r.levelno >= logging.ERROR for r in caplog.records)
    left = left_in_aws()
    assert left != NOTHING_LEFT  # something really was left: the sweeper's job now

    fault.heal()
    report = sweep_region(
        ec2,
        STAGING,
        lifetime=3600,
        now=spec.deadline + timedelta(seconds=1),
        wait=5.0,
        poll=0.01,
    )
    if left["security_groups"] and not report.security_groups:
        # A group still held by a terminating instance goes at the next sweep.
        report = sweep_region(
            ec2, STAGING, lifetime=3600, now=spec.deadline + timedelta(seconds=1), poll=0.01
        )
    assert report.errors == []
    assert left_in_aws() == NOTHING_LEFT


def test_a_whole_test_run_through_bursts_of_aws_faults_passes_and_leaves_nothing(
    tmp_path: Path, recorder: Recorder, aws_mock: None, waits: BotocoreWaits
) -> None:
    """autocloud_ami's job end to end (SSH stand-in, ResultsDB stand-in) on a flaky EC2."""
    with ResultsDBServer() as rdb:
        world = World(tmp_path, rdb, recorder)
        aws = aws_clients("autocloud_ami")
        ec2 = aws.ec2(STAGING)

        def keep(params: dict[str, Any], **_: Any) -> None:  # the key the SSH host lets in
            material = params["PublicKeyMaterial"]
            text = material.decode() if isinstance(material, bytes) else material
            world.imported.append(text.split()[1])

        ec2.meta.events.register("provide-client-params.ec2.ImportKeyPair", keep)
        faults = [
            inject(ec2, op, BURST, times=len(BURST))
            for op in INSTANCE_CALLS
            if op not in ("DescribeSecurityGroups", "CreateSecurityGroup")
        ]
        image = world.image()
        with host(world) as ssh:
            result = run_job(image, world.deps(world.cfg(ssh.port), suite=TINY_SUITE, aws=aws))
    assert result.passed, result.reason
    assert result.cleanup_errors == ()
    for fault in faults:
        assert fault.injected == ids(BURST), fault.operation
    assert [r.outcome for r in result.results][-1] == "PASSED"
    assert result.delivery is not None and result.delivery.complete
    assert left_in_aws() == NOTHING_LEFT


# ==========================================================================================
# Promotion: the gate's AWS reads and writes, copies, publishing
# ==========================================================================================


@dataclass
class PromoteWorld:
    promoter: Engine
    aws: AwsClients
    results: DummyResults
    recorder: Recorder
    clock: FakeClock

    def ec2(self, region: str) -> Any:
        return self.aws.ec2(region)

    def passed(self) -> str:
        ami = stage_ami()
        self.results.add(ami, TESTCASE, "PASSED", "all gating tests passed")
        return ami

    def regions_released(self, ami: str) -> dict[str, str]:
        bodies = self.recorder.bodies("fedimg.image.release")
        return dict(bodies[-1]["regions"]) if bodies else {}


@pytest.fixture
def promoting(
    aws_mock: None, waits: BotocoreWaits, recorder: Recorder, tmp_path: Path
) -> PromoteWorld:
    aws = aws_clients()
    results = DummyResults()
    clock = FakeClock()
    timing = Timing(
        copy_timeout=600, retry_timeout=120, poll_interval=10, backoff_initial=5, backoff_max=20
    )
    cfg = make_cfg()
    actuator = Promoter(
        cfg, Emitter(recorder), aws, now=lambda: NOW, clock=clock.clock(), timing=timing
    )
    engine = make_engine(
        cfg,
        Emitter(recorder),
        aws,
        tmp_path / "state",
        results=results,
        promoter=actuator,
        now=lambda: NOW,
    )
    return PromoteWorld(engine, aws, results, recorder, clock)


def pass_outcome(world: PromoteWorld, ami: str) -> str:
    """What one reconcile pass did to ``ami`` (``error: ...`` if the pass could not list it)."""
    try:
        outcomes = dict(world.promoter.reconcile(stage=False).pairs())
    except (BotoCoreError, ClientError) as exc:  # the hub's producer logs it and polls again
        return f"error: the pass failed: {error_code(exc) or type(exc).__name__}"
    if ami in outcomes:
        return outcomes[ami]
    errors = [o for o in outcomes.values() if o.startswith("error")]
    assert errors, f"{ami} was not looked at, and the pass reports no error: {outcomes}"
    return errors[0]


def assert_released_once_everywhere(world: PromoteWorld, ami: str) -> None:
    assert state(ami) == "released"
    for region in TARGETS:
        (copy,) = copies_in(region, ami)
        assert launch_public(copy["ImageId"], region)
    assert launch_public(ami, STAGING)
    final = world.recorder.bodies("fedimg.image.release")[-1]
    assert set(final["regions"]) == {*TARGETS, STAGING} and "failed_regions" not in final
    published = [b["destination"] for b in world.recorder.bodies("fedimg.image.publish")]
    assert sorted(published) == sorted([*TARGETS, STAGING])  # each region announced once
    validate_all(world.recorder)


PROMOTE_CALLS = [
    "DescribeImages",
    "CopyImage",
    "CreateTags",
    "DescribeSnapshots",
    "ModifyImageAttribute",
    "ModifySnapshotAttribute",
]


@pytest.mark.parametrize("operation", PROMOTE_CALLS)
def test_promotion_rides_out_a_burst_of_every_transient_fault_in_a_region(
    promoting: PromoteWorld, operation: str
) -> None:
    fault = inject(promoting.ec2("eu-west-1"), operation, BURST, times=len(BURST))
    ami = promoting.passed()
    decision = promoting.promoter.on_result(notice(ami))
    assert decision is not None and decision.action == "release"
    assert fault.injected == ids(BURST), "the faults did not all hit: the call was not made"
    assert_released_once_everywhere(promoting, ami)


@pytest.mark.parametrize(
    "operation",
    [
        "DescribeImages",
        "CreateTags",
        "DescribeSnapshots",
        "ModifyImageAttribute",
        "ModifySnapshotAttribute",
    ],
)
def test_gate_on_a_flaky_staging_region_releases_once(
    promoting: PromoteWorld, operation: str
) -> None:
    fault = inject(promoting.ec2(STAGING), operation, BURST, times=len(BURST))
    ami = promoting.passed()
    promoting.promoter.on_result(notice(ami))
    assert fault.injected == ids(BURST)
    assert_released_once_everywhere(promoting, ami)


@pytest.mark.parametrize(
    "kind",
    [
        aws_error("InvalidRegion"),
        aws_error("OptInRequired", 403),
        aws_error("UnauthorizedOperation", 403),
        READ_TIMEOUT,
    ],
    ids=["InvalidRegion", "OptInRequired", "UnauthorizedOperation", "lasting-timeouts"],
)
def test_one_region_refusing_copies_fails_only_that_region_until_it_is_back(
    promoting: PromoteWorld, kind: Kind
) -> None:
    refusing = "ap-southeast-2"
    fault = inject(promoting.ec2(refusing), "CopyImage", kind, times=None)
    ami = promoting.passed()
    promoting.promoter.on_result(notice(ami))

    # Not retried when AWS said no (one attempt), retried to the limit when it timed out.
    assert fault.hits == (ATTEMPTS if kind is READ_TIMEOUT else 1)
    assert state(ami) == "promoting"  # not released: a resume owes that region
    (release,) = promoting.recorder.bodies("fedimg.image.release")
    assert set(release["regions"]) == {*TARGETS, STAGING} - {refusing}
    assert set(release["failed_regions"]) == {refusing}
    assert (kind.code or "ReadTimeoutError") in release["failed_regions"][refusing]
    assert copies_in(refusing, ami) == []
    published = {b["destination"] for b in promoting.recorder.bodies("fedimg.image.publish")}
    assert refusing not in published
    for region in set(TARGETS) - {refusing}:
        assert len(copies_in(region, ami)) == 1

    # A reconcile pass while the region still refuses: still one copy elsewhere.
    assert pass_outcome(promoting, ami).startswith("promoting: failed in")
    for region in set(TARGETS) - {refusing}:
        assert len(copies_in(region, ami)) == 1

    fault.heal()
    assert pass_outcome(promoting, ami) == "released"
    assert_released_once_everywhere(promoting, ami)


def test_copy_quota_is_waited_out_with_backoff(promoting: PromoteWorld) -> None:
    """ResourceLimitExceeded (too many copies in flight) clears: the code's own backoff."""
    fault = inject(promoting.ec2("us-west-2"), "CopyImage", aws_error("ResourceLimitExceeded"), 3)
    ami = promoting.passed()
    promoting.promoter.on_result(notice(ami))
    assert fault.hits == 3
    assert promoting.clock.sleeps[:3] == [5, 10, 20]  # capped exponential backoff
    assert_released_once_everywhere(promoting, ami)


def test_publishing_a_copy_still_pending_is_retried(promoting: PromoteWorld) -> None:
    """InvalidAMIID.Unavailable on the wire (a 400 botocore does not retry): the code retries."""
    fault = inject(
        promoting.ec2("us-west-2"), "ModifyImageAttribute", aws_error("InvalidAMIID.Unavailable"), 2
    )
    ami = promoting.passed()
    promoting.promoter.on_result(notice(ami))
    assert fault.hits == 2
    assert_released_once_everywhere(promoting, ami)


def test_a_lost_copy_answer_is_not_a_second_copy(promoting: PromoteWorld) -> None:
    rules = aws_rules(promoting.ec2("eu-west-1"))  # ClientToken idempotency, as AWS has it
    fault = inject(promoting.ec2("eu-west-1"), "CopyImage", RESPONSE_LOST, times=1)
    ami = promoting.passed()
    promoting.promoter.on_result(notice(ami))
    assert fault.hits == 1 and rules.tokens_honoured == 1
    assert_released_once_everywhere(promoting, ami)


@pytest.mark.parametrize(
    ("operation", "kind"),
    [("DescribeImages", READ_TIMEOUT), ("CreateTags", SERVER_ERROR)],
    ids=["lookup-times-out", "state-tag-fails"],
)
def test_staging_region_outage_during_the_gate_decides_nothing_until_it_is_back(
    promoting: PromoteWorld, operation: str, kind: Kind
) -> None:
    fault = inject(promoting.ec2(STAGING), operation, kind, times=None)
    ami = promoting.passed()
    # The listener raises (the consumer logs it with its traceback) ...
    with pytest.raises((BotoCoreError, ClientError, CopyError)):
        promoting.promoter.on_result(notice(ami))
    # ... and so does the reconcile pass, as a whole or for this AMI.
    outcome = pass_outcome(promoting, ami)
    assert outcome.startswith("error"), outcome
    fault.heal()
    assert state(ami) == "testing"  # never half-promoted
    for region in TARGETS:
        assert copies_in(region, ami) == []
    assert not launch_public(ami, STAGING)
    assert promoting.recorder.bodies("fedimg.image.release") == []
    assert promoting.recorder.bodies("fedimg.image.test") == []

    assert pass_outcome(promoting, ami).startswith("release")
    assert_released_once_everywhere(promoting, ami)


@pytest.mark.parametrize(
    "kind",
    [THROTTLED, SERVER_ERROR, READ_TIMEOUT],
    ids=ids((THROTTLED, SERVER_ERROR, READ_TIMEOUT)),
)
def test_a_failed_image_is_never_released_whatever_aws_does(
    promoting: PromoteWorld, kind: Kind
) -> None:
    ami = stage_ami()
    promoting.results.add(ami, TESTCASE, "FAILED", "selinux: Permissive")
    faults = [
        inject(promoting.ec2(STAGING), op, kind, times=None)
        for op in ("CreateTags", "DescribeImages")
    ]
    for _ in range(2):
        assert pass_outcome(promoting, ami).startswith("error")
    for fault in faults:
        fault.heal()
    assert pass_outcome(promoting, ami).startswith("reject")
    assert state(ami) == "rejected"
    for region in TARGETS:
        assert copies_in(region, ami) == []
    assert not launch_public(ami, STAGING)
    assert promoting.recorder.bodies("fedimg.image.release") == []
    assert promoting.recorder.bodies("fedimg.image.publish") == []
    (verdict,) = promoting.recorder.bodies("fedimg.image.test")
    assert verdict["status"] == "failed"
