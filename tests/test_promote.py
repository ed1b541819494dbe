"""Promotion: the gate's verdict acted on, against moto in process and DummyResults.

moto is not AWS (see aws.md): it drops TagSpecifications, ignores ClientToken
and never answers InvalidAMIID.Unavailable. So every test asserts on what the
code SENDS (a ``provide-client-params`` hook on every client records the
parameters and can inject AWS errors per region and operation) as well as on
moto's state.
"""

from __future__ import annotations

import io
import logging
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends

from fedimg import tags
from fedimg.aws import AwsClients
from fedimg.config import FedimgConfig
from fedimg.copies import Clock, Timing, copy_token
from fedimg.engine import Engine, Outcome, cli_promote, promote_by_hand
from fedimg.facts import parse_when
from fedimg.messages import (
    ALL_TYPES,
    RESULT_NEW,
    TASKOTRON_RESULT_NEW,
    Emitter,
    ResultNotice,
    StagedImage,
    message_class,
    parse_result_notice,
)
from fedimg.plan import Scope
from fedimg.promote import Promoter
from fedimg.regions import commercial
from fedimg.results import DummyResults
from fedimg.status import cli_status
from tests.engine_support import make_engine

STAGING = "us-east-1"
TARGETS = ["ap-southeast-2", "eu-west-1", "us-west-2"]
TESTCASE = "autocloud.ami.all"
NOW = datetime(2026, 11, 24, 18, 0, tzinfo=UTC)
CONTRACT = {f"{t.modname}.{t.name}": t for t in ALL_TYPES}


# -- fakes at the seams ------------------------------------------------------------


class FakeClock:
    """Monotonic time that only moves when the code sleeps; records every sleep.

    Each thread's sleeps move only that thread's time, as threads sleep in
    parallel for real: a region retrying its quota error until its deadline
    must not use up the deadline of another region's retries.
    """

    def __init__(self) -> None:
        self.now = 0.0  # the time every thread starts from
        self.sleeps: list[float] = []
        self._lock = threading.Lock()
        self._slept = threading.local()

    def monotonic(self) -> float:
        return self.now + getattr(self._slept, "seconds", 0.0)

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        with self._lock:
            self.sleeps.append(seconds)
        self._slept.seconds = getattr(self._slept, "seconds", 0.0) + seconds

    def clock(self) -> Clock:
        return Clock(self.monotonic, self.sleep)


class RecordingAws(AwsClients):
    """AwsClients whose clients record what they send and fail on demand.

    ``faults[(region, Operation)]`` is a list of error codes raised by the next
    calls, in order; the string ``"*CODE"`` raises CODE forever.
    """

    def __init__(self) -> None:
        super().__init__(max_attempts=1, session=SESSION)
        self.sent: list[tuple[str, str, dict[str, Any]]] = []
        self.faults: dict[tuple[str, str], list[str]] = {}
        self.hooks: list[Any] = []  # extra callables (region, op, params)
        self._hooked: set[tuple[str, str]] = set()
        self._rec_lock = threading.Lock()

    def client(self, service: str, region: str) -> Any:
        client = super().client(service, region)
        with self._rec_lock:
            if (service, region) not in self._hooked:
                self._hooked.add((service, region))
                client.meta.events.register(
                    f"provide-client-params.{service}.*", self._hook(region)
                )
        return client

    def _hook(self, region: str) -> Any:
        def hook(params: dict[str, Any], model: Any, **_: Any) -> None:
            op = model.name
            with self._rec_lock:
                self.sent.append((region, op, dict(params)))
                plan = self.faults.get((region, op))
                code = None
                if plan:
                    code = plan[0][1:] if plan[0].startswith("*") else plan.pop(0)
            for extra in list(self.hooks):
                extra(region, op, params)
            if code:
                raise ClientError({"Error": {"Code": code, "Message": "injected"}}, op)

        return hook

    def calls(self, op: str, region: str | None = None) -> list[dict[str, Any]]:
        with self._rec_lock:
            return [p for r, o, p in self.sent if o == op and region in (None, r)]

    def regions_of(self, op: str) -> Counter[str]:
        with self._rec_lock:
            return Counter(r for r, o, _ in self.sent if o == op)


@pytest.fixture
def aws_mock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # moto loads hundreds of public AMIs per region by default: slow, and not ours.
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    with mock_aws():
        yield


# One session for every test: each new session parses the EC2 model again (~0.2 s).
SESSION = boto3.session.Session()
_clients: dict[str, Any] = {}


def ec2(region: str = STAGING) -> Any:
    """The test's own EC2 client for ``region`` (not hooked: its calls are not recorded)."""
    if region not in _clients:
        _clients[region] = SESSION.client("ec2", region_name=region)
    return _clients[region]


@pytest.fixture
def aws(aws_mock: None) -> RecordingAws:
    return RecordingAws()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def results() -> DummyResults:
    return DummyResults()


def make_cfg(**settings: Any) -> FedimgConfig:
    raw = {
        "fedimg.resultsdb_url": "http://resultsdb.test/api/v2.0",
        "fedimg.aws.staging_region": STAGING,
        "fedimg.aws.regions": TARGETS,
        "fedimg.gate.deadline": 6 * 3600,
        **settings,
    }
    return FedimgConfig.from_fedmsg(raw)


@pytest.fixture
def cfg() -> FedimgConfig:
    return make_cfg()


_states = iter(range(10**6))


def acted(outcome: Outcome | None) -> bool:
    """Whether the engine acted on a notice (not: not an AMI of ours, wrong state, busy)."""
    return outcome is not None and outcome.action not in ("ignored", "busy")


def make_promoter(
    cfg: FedimgConfig,
    recorder: Any,
    aws: RecordingAws,
    results: DummyResults,
    clock: FakeClock,
    *,
    now: datetime = NOW,
    state_dir: Path | None = None,
    timing: Timing | None = None,
) -> Engine:
    """An engine whose promoter copies on fake time (``state_dir``: a fresh one by default)."""
    timing = timing or Timing(
        copy_timeout=600, retry_timeout=120, poll_interval=10, backoff_initial=5, backoff_max=20
    )
    emitter = Emitter(recorder)
    actuator = Promoter(cfg, emitter, aws, now=lambda: now, clock=clock.clock(), timing=timing)
    where = state_dir or Path(tempfile.mkdtemp(prefix=f"fedimg-promote-{next(_states)}-"))
    return make_engine(
        cfg, emitter, aws, where, results=results, promoter=actuator, now=lambda: now
    )


@pytest.fixture
def promoter(
    cfg: FedimgConfig,
    recorder: Any,
    aws: RecordingAws,
    results: DummyResults,
    clock: FakeClock,
    tmp_path: Path,
) -> Iterator[Engine]:
    built = make_promoter(cfg, recorder, aws, results, clock, state_dir=tmp_path)
    yield built
    built.close()


_serial = iter(range(10**6))


def stage_ami(
    state: tags.State = tags.State.TESTING,
    staged_at: datetime = NOW - timedelta(hours=1),
    arch: str = "x86_64",
    fedimg_tags: bool = True,
) -> str:
    """A staged AMI as fedimg's stage leaves it: tagged AMI and tagged snapshot."""
    n = next(_serial)
    client = ec2(STAGING)
    name = f"Fedora-Cloud-Base-Generic-41-20261124.{n}.{arch}-hvm-gp3"
    image = StagedImage(
        compose_id=f"Fedora-Cloud-41-20261124.{n}",
        image_name=f"Fedora-Cloud-Base-Generic-41-20261124.{n}.{arch}",
        image_url=f"https://kojipkgs.test/compose/Cloud/{arch}/images/f41-{n}.raw.xz",
        architecture=arch,
        region=STAGING,
        vol_type="gp3",
        subvariant="Cloud_Base",
        release="41",
        sha256=f"{n:064x}",
    )
    vol = client.create_volume(Size=5, AvailabilityZone=f"{STAGING}a")
    snap = client.create_snapshot(VolumeId=vol["VolumeId"])["SnapshotId"]
    ami = client.register_image(
        Name=name,
        RootDeviceName="/dev/sda1",
        BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": snap}}],
        VirtualizationType="hvm",
        Architecture="x86_64" if arch == "x86_64" else "arm64",
    )["ImageId"]
    if fedimg_tags:
        values = tags.image_tags(image, state, staged_at.isoformat())
        client.create_tags(Resources=[ami], Tags=tags.as_list(values))
        snap_tags = {k: v for k, v in values.items() if k != tags.VOL_TYPE}
        client.create_tags(Resources=[snap], Tags=tags.as_list(snap_tags))
    return ami


def _set_state_tag(ami: str, value: str) -> None:
    ec2(STAGING).create_tags(Resources=[ami], Tags=[{"Key": tags.STATE, "Value": value}])


def describe(ami: str, region: str = STAGING) -> dict[str, Any]:
    return ec2(region).describe_images(ImageIds=[ami])["Images"][0]


def state(ami: str) -> str | None:
    return tags.as_dict(describe(ami).get("Tags")).get(tags.STATE)


def copies_in(region: str, source: str) -> list[dict[str, Any]]:
    client = ec2(region)
    return client.describe_images(
        Owners=["self"], Filters=[{"Name": f"tag:{tags.SOURCE_AMI}", "Values": [source]}]
    )["Images"]


def launch_public(ami: str, region: str) -> bool:
    client = ec2(region)
    perms = client.describe_image_attribute(ImageId=ami, Attribute="launchPermission")
    return {"Group": "all"} in perms["LaunchPermissions"]


def notice(
    ami: str, outcome: str = "PASSED", testcase: str = TESTCASE, item_type: str = "ami"
) -> ResultNotice:
    return ResultNotice(
        item=ami, item_type=item_type, testcase=testcase, outcome=outcome, result_id=1
    )


def validate_all(recorder: Any) -> None:
    """Every emitted body satisfies the contract of its topic."""
    for modname, topic, body in recorder.sent:
        full = f"{modname}.{topic}"
        if full in CONTRACT:
            CONTRACT[full].validate(body)
        else:  # the release as fedora-image-uploader announces it: its own class validates
            message_class(full)(topic=full, body=body).validate()
            assert message_class(full).__name__ == "AwsPublishedV1"


def backend(region: str) -> Any:
    return ec2_backends[DEFAULT_ACCOUNT_ID][region]


# -- release ---------------------------------------------------------------------------


def test_passing_ami_is_copied_once_to_every_region_and_made_public(
    promoter: Engine, aws: RecordingAws, results: DummyResults, recorder: Any
) -> None:
    ami = stage_ami()
    results.add(ami, TESTCASE, "PASSED")

    decision = promoter.on_result(notice(ami))

    assert decision is not None and decision.action == "release"
    assert state(ami) == "released"
    # Exactly one CopyImage per target region, sent IN that region, deterministic.
    assert aws.regions_of("CopyImage") == Counter(TARGETS)
    staged_name = describe(ami)["Name"]
    for region in TARGETS:
        (params,) = aws.calls("CopyImage", region)
        assert params["SourceRegion"] == STAGING
        assert params["SourceImageId"] == ami
        assert params["Name"] == staged_name
        assert params["ClientToken"] == copy_token(ami, region)
        assert len(params["ClientToken"]) <= 64
        specs = {s["ResourceType"]: tags.as_dict(s["Tags"]) for s in params["TagSpecifications"]}
        assert set(specs) == {"image", "snapshot"}
        for values in specs.values():
            assert values[tags.SOURCE_AMI] == ami
            assert values[tags.COMPOSE_ID].startswith("Fedora-Cloud-41")
            assert tags.STATE not in values
        assert "SnapshotCopyCompletionDurationMinutes" not in params  # best effort by default
        # moto's state: one copy, tagged (create_tags after moto dropped the specs), public.
        (copy,) = copies_in(region, ami)
        assert copy["State"] == "available"
        assert launch_public(copy["ImageId"], region)
        # The snapshot permission as SENT, for the copy's snapshot in that region.
        snaps = [s["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"] for s in [copy]]
        sent = aws.calls("ModifySnapshotAttribute", region)
        assert [p["SnapshotId"] for p in sent] == snaps
        assert all(
            p["Attribute"] == "createVolumePermission"
            and p["OperationType"] == "add"
            and p["GroupNames"] == ["all"]
            for p in sent
        )
    # The staging AMI and its (tagged) snapshot are public too.
    assert launch_public(ami, STAGING)
    staging_snaps = {p["SnapshotId"] for p in aws.calls("ModifySnapshotAttribute", STAGING)}
    tagged = ec2(STAGING).describe_snapshots(
        OwnerIds=["self"],
        Filters=[
            {
                "Name": f"tag:{tags.IMAGE_NAME}",
                "Values": [tags.as_dict(describe(ami)["Tags"])[tags.IMAGE_NAME]],
            }
        ],
    )["Snapshots"]
    assert {s["SnapshotId"] for s in tagged} <= staging_snaps
    validate_all(recorder)


def release_with(
    settings: dict[str, Any],
    recorder: Any,
    aws: RecordingAws,
    results: DummyResults,
    clock: FakeClock,
    state_dir: Path,
    staged_at: datetime = NOW - timedelta(hours=1),
) -> str:
    """Stage an AMI, pass it and let an engine with these ``settings`` release it."""
    engine = make_promoter(make_cfg(**settings), recorder, aws, results, clock, state_dir=state_dir)
    ami = stage_ami(staged_at=staged_at)
    results.add(ami, TESTCASE, "PASSED")
    try:
        assert acted(engine.on_result(notice(ami)))
    finally:
        engine.close()
    return ami


def test_copies_and_their_snapshots_carry_the_extra_tags_and_copy_on_time_when_set(
    recorder: Any, aws: RecordingAws, results: DummyResults, clock: FakeClock, tmp_path: Path
) -> None:
    extra = {"FedoraGroup": "cloud"}
    settings = {
        "fedimg.aws.regions": TARGETS[:2],
        "fedimg.aws.extra_tags": extra,
        "fedimg.promote.copy_completion_minutes": 45,
    }
    ami = release_with(settings, recorder, aws, results, clock, tmp_path)
    assert state(ami) == "released"
    for region in TARGETS[:2]:
        (params,) = aws.calls("CopyImage", region)
        assert params["SnapshotCopyCompletionDurationMinutes"] == 45
        for spec in params["TagSpecifications"]:  # image and snapshot, at creation
            assert extra.items() <= tags.as_dict(spec["Tags"]).items()
        # moto's state: the copy and its snapshot carry them (CreateTags after moto dropped them).
        (copy,) = copies_in(region, ami)
        assert extra.items() <= tags.as_dict(copy["Tags"]).items()
        snap = copy["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
        (described,) = ec2(region).describe_snapshots(SnapshotIds=[snap])["Snapshots"]
        assert extra.items() <= tags.as_dict(described.get("Tags")).items()


def test_every_released_image_is_deprecated_by_policy_before_it_goes_public(
    recorder: Any, aws: RecordingAws, results: DummyResults, clock: FakeClock, tmp_path: Path
) -> None:
    staged_at = NOW - timedelta(hours=2)
    # compose Fedora-Cloud-41-20261124.N: production
    settings = {
        "fedimg.aws.regions": TARGETS[:2],
        "fedimg.promote.deprecation_days": {"production": 400},
    }
    ami = release_with(settings, recorder, aws, results, clock, tmp_path, staged_at)
    assert state(ami) == "released"
    expected = staged_at + timedelta(days=400)
    for region in [*TARGETS[:2], STAGING]:
        (copy_id,) = [ami] if region == STAGING else [c["ImageId"] for c in copies_in(region, ami)]
        # SENT: one EnableImageDeprecation of that image, before it was made public.
        ops = [(op, p.get("ImageId")) for r, op, p in aws.sent if r == region]
        (sent,) = aws.calls("EnableImageDeprecation", region)
        assert sent == {"ImageId": copy_id, "DeprecateAt": expected}
        made_public = ops.index(("ModifyImageAttribute", copy_id))
        assert ops.index(("EnableImageDeprecation", copy_id)) < made_public
        # and what EC2 (moto, taught by devel.motoextra) now reports
        assert parse_when(describe(copy_id, region)["DeprecationTime"]) == expected


def test_a_resumed_promotion_does_not_deprecate_again_what_already_is(
    recorder: Any, aws: RecordingAws, results: DummyResults, clock: FakeClock, tmp_path: Path
) -> None:
    cfg = make_cfg(**{"fedimg.aws.regions": TARGETS[:1]})
    engine = make_promoter(cfg, recorder, aws, results, clock, state_dir=tmp_path)
    ami = stage_ami()
    results.add(ami, TESTCASE, "PASSED")
    try:
        assert acted(engine.on_result(notice(ami)))
        assert len(aws.calls("EnableImageDeprecation")) == 2
        _set_state_tag(ami, "promoting")  # as if a region had failed
        engine.reconcile(stage=False)
    finally:
        engine.close()
    assert state(ami) == "released"
    assert len(aws.calls("EnableImageDeprecation")) == 2


def test_release_messages_come_in_order_with_upstream_bodies(
    promoter: Engine, results: DummyResults, recorder: Any
) -> None:
    ami = stage_ami()
    results.add(ami, TESTCASE, "PASSED")
    promoter.on_result(notice(ami))

    topics = recorder.topics()
    assert topics[0] == "fedimg.image.test"
    assert recorder.sent[0][2]["status"] == "completed"
    assert recorder.sent[0][2]["extra"]["id"] == ami
    # fedimg's release, then the same release as fedora-image-uploader announces it.
    assert topics[-2] == "fedimg.image.release"
    assert topics[-1] == "fedora_image_uploader.published.v1.aws.Cloud_Base.41.x86_64"
    assert topics.count("fedimg.image.release") == 1
    copies = recorder.bodies("fedimg.image.copy")
    publishes = recorder.bodies("fedimg.image.publish")
    assert sorted(b["destination"] for b in copies) == TARGETS
    assert sorted(b["destination"] for b in publishes) == sorted([*TARGETS, STAGING])
    for body in copies:
        # A region's copy message comes before its publish message.
        region = body["destination"]
        i_copy = next(
            i
            for i, (_, t, b) in enumerate(recorder.sent)
            if t == "image.copy" and b["destination"] == region
        )
        i_pub = next(
            i
            for i, (_, t, b) in enumerate(recorder.sent)
            if t == "image.publish" and b["destination"] == region
        )
        assert i_copy < i_pub
        assert body["extra"]["source_image_id"] == ami
        assert body["extra"]["id"] != ami
        assert body["service"] == "EC2" and body["architecture"] == "x86_64"
    (release,) = recorder.bodies("fedimg.image.release")
    assert set(release["regions"]) == {*TARGETS, STAGING}
    assert release["regions"][STAGING] == ami
    assert release["release"] == 41 and release["subvariant"] == "Cloud_Base"
    assert "failed_regions" not in release
    for body in publishes:
        assert release["regions"][body["destination"]] == body["extra"]["id"]
        assert body["compose"] == release["compose_id"]
    validate_all(recorder)


def test_every_commercial_region_when_none_is_configured(
    recorder: Any, aws: RecordingAws, results: DummyResults, clock: FakeClock
) -> None:
    promoter = make_promoter(make_cfg(**{"fedimg.aws.regions": []}), recorder, aws, results, clock)
    ami = stage_ami()
    results.add(ami, TESTCASE, "PASSED")
    promoter.on_result(notice(ami))

    listed = ec2(STAGING).describe_regions()["Regions"]
    expected = [r for r in commercial(listed) if r != STAGING]
    assert len(expected) > 15
    assert aws.regions_of("CopyImage") == Counter(expected)
    assert not any(r.startswith(("cn-", "us-gov-")) for r in aws.regions_of("CopyImage"))
    assert state(ami) == "released"
    (release,) = recorder.bodies("fedimg.image.release")
    assert set(release["regions"]) == {*expected, STAGING}


def test_copies_run_in_parallel_bounded_by_the_concurrency_setting(
    recorder: Any, aws: RecordingAws, results: DummyResults
) -> None:
    config = make_cfg(**{"fedimg.aws.regions": [], "fedimg.promote.max_concurrent_copies": 3})
    timing = Timing(copy_timeout=10**6, retry_timeout=120, poll_interval=10)
    promoter = make_promoter(config, recorder, aws, results, FakeClock(), timing=timing)
    started: set[str] = set()
    public: set[str] = set()
    most_open = [0]
    gave_up = []
    real_deadline = time.monotonic() + 30
    lock = threading.Lock()

    def hold(region: str, op: str, params: dict[str, Any]) -> None:
        # Every copy stays pending until three copies are in flight at once: a
        # serial fan-out would never get there.
        with lock:
            if op == "CopyImage":
                started.add(region)
            if op == "ModifyImageAttribute":
                public.add(region)
            most_open[0] = max(most_open[0], len(started - public))
            if op != "DescribeImages" or region == STAGING or "ImageIds" not in params:
                return
            image = backend(region).amis.get(params["ImageIds"][0])
            if image is None:
                return
            if len(started) >= 3 or len(started - public) >= 3:
                image.state = "available"
            elif time.monotonic() > real_deadline:
                gave_up.append(region)
                image.state = "available"
            else:
                image.state = "pending"

    aws.hooks.append(hold)
    ami = stage_ami()
    results.add(ami, TESTCASE, "PASSED")
    promoter.on_result(notice(ami))
    assert gave_up == []
    assert state(ami) == "released"
    assert most_open[0] == 3
    assert promoter.promoter.slots.peak == 3


def test_copy_held_pending_is_waited_for_with_the_poll_interval(
    promoter: Engine, aws: RecordingAws, results: DummyResults, clock: FakeClock
) -> None:
    polls: Counter[str] = Counter()

    def hold(region: str, op: str, params: dict[str, Any]) -> None:
        if region == "eu-west-1" and op == "DescribeImages" and "ImageIds" in params:
            (ami_id,) = params["ImageIds"]
            image = backend(region).amis.get(ami_id)
            if image is None:
                return
            polls[ami_id] += 1
            image.state = "pending" if polls[ami_id] < 4 else "available"

    aws.hooks.append(hold)
    ami = stage_ami()
    results.add(ami, TESTCASE, "PASSED")
    promoter.on_result(notice(ami))
    assert state(ami) == "released"
    assert max(polls.values()) >= 4
    assert clock.sleeps.count(10) >= 3  # the poll interval, on the fake clock


def test_copy_that_never_becomes_available_times_out_and_fails_the_region(
    promoter: Engine, aws: RecordingAws, results: DummyResults, recorder: Any
) -> None:
    def hold(region: str, op: str, params: dict[str, Any]) -> None:
        if region == "eu-west-1" and op == "DescribeImages" and "ImageIds" in params:
            image = backend(region).amis.get(params["ImageIds"][0])
            if image is not None:
                image.state = "pending"

    aws.hooks.append(hold)
    ami = stage_ami()
    results.add(ami, TESTCASE, "PASSED")
    promoter.on_result(notice(ami))
    assert state(ami) == "promoting"
    (release,) = recorder.bodies("fedimg.image.release")
    assert "pending" in release["failed_regions"]["eu-west-1"]
    assert "eu-west-1" not in release["regions"]
    (copy,) = copies_in("eu-west-1", ami)
    assert not aws.calls("ModifyImageAttribute", "eu-west-1")
    assert not launch_public(copy["ImageId"], "eu-west-1")


# -- reject -----------------------------------------------------------------------------


def test_failing_ami_is_rejected_never_copied_nor_public(
    promoter: Engine, aws: RecordingAws, results: DummyResults, recorder: Any
) -> None:
    ami = stage_ami()
    results.add(ami, TESTCASE, "FAILED", note="selinux: getenforce printed Permissive")

    decision = promoter.on_result(notice(ami, "FAILED"))

    assert decision is not None and decision.action == "reject"
    assert state(ami) == "rejected"
    for op in ("CopyImage", "ModifyImageAttribute", "ModifySnapshotAttribute"):
        assert not aws.calls(op), op
    assert not launch_public(ami, STAGING)
    assert recorder.topics() == ["fedimg.image.test"]
    body = recorder.sent[0][2]
    assert body["status"] == "failed"
    assert TESTCASE in body["reason"] and "Permissive" in body["reason"]
    assert body["extra"]["id"] == ami
    validate_all(recorder)
    # Kept for inspection by default.
    assert describe(ami)["State"] == "available"


def test_spoofed_passed_notice_while_resultsdb_says_failed_releases_nothing(
    promoter: Engine, aws: RecordingAws, results: DummyResults, recorder: Any
) -> None:
    ami = stage_ami()
    results.add(ami, TESTCASE, "FAILED", note="services: 2 failed units")
    promoter.on_result(notice(ami, "PASSED"))
    assert state(ami) == "rejected"
    assert not aws.calls("CopyImage") and not aws.calls("ModifyImageAttribute")
    assert "fedimg.image.release" not in recorder.topics()


def test_spoofed_passed_notice_without_any_result_only_waits(
    promoter: Engine, aws: RecordingAws, results: DummyResults, recorder: Any
) -> None:
    ami = stage_ami()
    decision = promoter.on_result(notice(ami, "PASSED"))
    assert decision is not None and decision.action == "wait"
    assert TESTCASE in decision.detail
    assert state(ami) == "testing"
    assert recorder.sent == []
    assert not aws.calls("CopyImage") and not aws.calls("ModifyImageAttribute")


def test_needs_inspection_rejects(promoter: Engine, results: DummyResults) -> None:
    ami = stage_ami()
    results.add(ami, TESTCASE, "NEEDS_INSPECTION")
    decision = promoter.on_result(notice(ami, "NEEDS_INSPECTION"))
    assert decision is not None and decision.action == "reject"
    assert state(ami) == "rejected"


def test_rejected_ami_is_deleted_when_configured(
    recorder: Any, aws: RecordingAws, results: DummyResults, clock: FakeClock
) -> None:
    promoter = make_promoter(
        make_cfg(**{"fedimg.gate.delete_rejected": True}), recorder, aws, results, clock
    )
    ami = stage_ami()
    snapshot = describe(ami)["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    results.add(ami, TESTCASE, "FAILED")
    promoter.on_result(notice(ami))
    assert [p["ImageId"] for p in aws.calls("DeregisterImage")] == [ami]
    assert snapshot in [p["SnapshotId"] for p in aws.calls("DeleteSnapshot")]
    client = ec2(STAGING)
    assert client.describe_images(Owners=["self"], ImageIds=[ami])["Images"] == []
    assert not aws.calls("ModifyImageAttribute")


def test_no_result_by_the_deadline_rejects_with_no_results(
    promoter: Engine, aws: RecordingAws, recorder: Any
) -> None:
    ami = stage_ami(staged_at=NOW - timedelta(hours=7))
    decision = promoter.converge_ami(ami, Scope.MESSAGE)
    assert decision.action == "reject"
    assert decision.detail.startswith("no results")
    assert state(ami) == "rejected"
    (body,) = recorder.bodies("fedimg.image.test")
    assert body["status"] == "failed" and "no results" in body["reason"]
    assert TESTCASE in body["reason"]
    assert not aws.calls("CopyImage")


def test_staging_time_falls_back_to_the_creation_date(promoter: Engine, aws: RecordingAws) -> None:
    ami = stage_ami()
    ec2(STAGING).delete_tags(Resources=[ami], Tags=[{"Key": tags.STAGED_AT}])
    # moto's CreationDate is the real now; the promoter's now is months later.
    far = make_promoter(
        make_cfg(),
        lambda *a: None,
        aws,
        DummyResults(),
        FakeClock(),
        now=datetime.now(UTC) + timedelta(days=30),
    )
    assert far.converge_ami(ami, Scope.MESSAGE).action == "reject"
    assert promoter.promoter.lookup(stage_ami()).staged_at == NOW - timedelta(hours=1)


# -- idempotence and concurrency ------------------------------------------------------------


def test_duplicate_and_replayed_notices_make_no_second_copy(
    promoter: Engine, aws: RecordingAws, results: DummyResults, recorder: Any
) -> None:
    ami = stage_ami()
    results.add(ami, TESTCASE, "PASSED")
    results.add(ami, "autocloud.ami.selinux", "PASSED")
    assert acted(promoter.on_result(notice(ami)))
    sent_before = len(recorder.sent)
    for replay in (notice(ami), notice(ami, testcase="autocloud.ami.selinux"), notice(ami)):
        assert not acted(promoter.on_result(replay))
    assert aws.regions_of("CopyImage") == Counter(TARGETS)
    assert len(recorder.sent) == sent_before
    for region in TARGETS:
        assert len(copies_in(region, ami)) == 1


def test_a_crash_after_copying_resumes_without_copying_again(
    promoter: Engine, aws: RecordingAws, results: DummyResults, recorder: Any
) -> None:
    ami = stage_ami()
    results.add(ami, TESTCASE, "PASSED")
    promoter.on_result(notice(ami))
    # As if the process died before recording "released": resume must find the copies.
    ec2(STAGING).create_tags(Resources=[ami], Tags=[{"Key": tags.STATE, "Value": "promoting"}])
    promotion = promoter.converge_ami(ami, Scope.RECONCILE)
    assert promotion.action == "released"
    assert aws.regions_of("CopyImage") == Counter(TARGETS)
    assert state(ami) == "released"
    # Nothing new was made public, so no second publish per region.
    assert len(recorder.bodies("fedimg.image.publish")) == len(TARGETS) + 1
    assert len(recorder.bodies("fedimg.image.release")) == 2


def test_copy_without_its_tag_is_found_by_name_and_source(
    promoter: Engine, aws: RecordingAws, results: DummyResults
) -> None:
    ami = stage_ami()
    # An earlier run died between CopyImage and create_tags in us-west-2.
    west = ec2("us-west-2")
    from fedimg.copies import copy_description

    image = tags.staged_image(describe(ami), STAGING)
    assert image is not None
    earlier = west.copy_image(
        SourceRegion=STAGING,
        SourceImageId=ami,
        Name=describe(ami)["Name"],
        Description=copy_description(image, STAGING),
    )["ImageId"]
    results.add(ami, TESTCASE, "PASSED")
    promoter.on_result(notice(ami))
    assert aws.regions_of("CopyImage")["us-west-2"] == 0
    (copy,) = copies_in("us-west-2", ami)
    assert copy["ImageId"] == earlier
    assert launch_public(earlier, "us-west-2")


def test_a_foreign_image_holding_the_name_gets_a_suffixed_copy(
    promoter: Engine, aws: RecordingAws, results: DummyResults
) -> None:
    ami = stage_ami()
    name = describe(ami)["Name"]
    west = ec2("us-west-2")
    west.register_image(Name=name, RootDeviceName="/dev/sda1", VirtualizationType="hvm")
    results.add(ami, TESTCASE, "PASSED")
    promoter.on_result(notice(ami))
    (params,) = aws.calls("CopyImage", "us-west-2")
    assert params["Name"] == f"{name}-{ami}"
    assert state(ami) == "released"


def test_concurrent_notices_make_one_promotion(
    promoter: Engine, aws: RecordingAws, results: DummyResults, recorder: Any
) -> None:
    ami = stage_ami()
    results.add(ami, TESTCASE, "PASSED")
    barrier = threading.Barrier(6)
    answers: list[Any] = []

    def deliver() -> None:
        barrier.wait(timeout=10)
        answers.append(promoter.on_result(notice(ami)))

    threads = [threading.Thread(target=deliver) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert aws.regions_of("CopyImage") == Counter(TARGETS)
    assert recorder.topics().count("fedimg.image.release") == 1
    assert recorder.topics().count("fedimg.image.test") == 1
    assert sum(1 for a in answers if a is not None and a.action == "release") == 1
    assert state(ami) == "released"


def test_a_second_evaluation_while_one_runs_returns_at_once(
    promoter: Engine, aws: RecordingAws, results: DummyResults
) -> None:
    ami = stage_ami()
    results.add(ami, TESTCASE, "PASSED")
    inner: list[Any] = []

    def reenter(region: str, op: str, params: dict[str, Any]) -> None:
        if op == "CopyImage" and not inner:
            inner.append("started")
            worker = threading.Thread(target=lambda: inner.append(promoter.on_result(notice(ami))))
            worker.start()
            worker.join(timeout=30)
            assert not worker.is_alive()

    aws.hooks.append(reenter)
    assert acted(promoter.on_result(notice(ami)))
    assert inner[0] == "started" and inner[1].action == "busy"  # returned at once
    assert aws.regions_of("CopyImage") == Counter(TARGETS)


def test_a_result_arriving_during_a_waiting_evaluation_is_not_lost(
    promoter: Engine, aws: RecordingAws, results: DummyResults
) -> None:
    ami = stage_ami()
    seen: list[Any] = []
    original = results.latest_by_scenario

    def latest(item: str, item_type: str = "ami", testcases: Any = None) -> Any:
        answer = original(item, item_type, testcases)
        if not seen:
            # The test result lands (and its message arrives) while we read ResultsDB.
            results.add(ami, TESTCASE, "PASSED")
            worker = threading.Thread(target=lambda: seen.append(promoter.on_result(notice(ami))))
            worker.start()
            worker.join(timeout=30)
        return answer

    results.latest_by_scenario = latest  # type: ignore[method-assign]
    decision = promoter.on_result(notice(ami))
    assert [o.action for o in seen] == ["busy"]  # the second delivery was busy...
    assert decision is not None and decision.action == "release"  # ...but not lost
    assert state(ami) == "released"


# -- region failures ---------------------------------------------------------------------


def test_one_region_failing_leaves_the_others_released_and_state_promoting(
    promoter: Engine, aws: RecordingAws, results: DummyResults, recorder: Any, clock: FakeClock
) -> None:
    aws.faults[("eu-west-1", "CopyImage")] = ["*ResourceLimitExceeded"]
    aws.faults[("ap-southeast-2", "CopyImage")] = ["InvalidRegion"]
    aws.faults[("us-west-2", "CopyImage")] = ["Throttling", "RequestLimitExceeded"]
    ami = stage_ami()
    results.add(ami, TESTCASE, "PASSED")

    promoter.on_result(notice(ami))

    assert state(ami) == "promoting"
    (release,) = recorder.bodies("fedimg.image.release")
    assert set(release["regions"]) == {"us-west-2", STAGING}
    assert set(release["failed_regions"]) == {"eu-west-1", "ap-southeast-2"}
    assert "ResourceLimitExceeded" in release["failed_regions"]["eu-west-1"]
    assert "InvalidRegion" in release["failed_regions"]["ap-southeast-2"]
    # Throttling was retried until it worked; InvalidRegion was not retried at all;
    # the quota error was retried with backoff until its deadline.
    assert len(aws.calls("CopyImage", "us-west-2")) == 3
    assert len(aws.calls("CopyImage", "ap-southeast-2")) == 1
    assert len(aws.calls("CopyImage", "eu-west-1")) > 2
    assert launch_public(copies_in("us-west-2", ami)[0]["ImageId"], "us-west-2")
    assert copies_in("eu-west-1", ami) == [] and copies_in("ap-southeast-2", ami) == []
    assert launch_public(ami, STAGING)
    validate_all(recorder)

    # The next pass retries only the missing regions.
    aws.faults.clear()
    promotion = promoter.converge_ami(ami, Scope.RECONCILE)
    assert promotion.action == "released"
    assert state(ami) == "released"
    assert len(aws.calls("CopyImage", "us-west-2")) == 3  # not copied again
    assert aws.regions_of("CopyImage")["eu-west-1"] > 2
    assert len(copies_in("eu-west-1", ami)) == 1 and len(copies_in("ap-southeast-2", ami)) == 1
    final = recorder.bodies("fedimg.image.release")[-1]
    assert set(final["regions"]) == {*TARGETS, STAGING} and "failed_regions" not in final
    validate_all(recorder)


def test_pending_image_is_made_public_after_retrying_unavailable(
    promoter: Engine, aws: RecordingAws, results: DummyResults, clock: FakeClock
) -> None:
    aws.faults[("us-west-2", "ModifyImageAttribute")] = [
        "InvalidAMIID.Unavailable",
        "InvalidAMIID.Unavailable",
    ]
    ami = stage_ami()
    results.add(ami, TESTCASE, "PASSED")
    promoter.on_result(notice(ami))
    assert len(aws.calls("ModifyImageAttribute", "us-west-2")) == 3
    assert 5 in clock.sleeps and 10 in clock.sleeps  # exponential backoff
    assert state(ami) == "released"


def test_image_unavailable_for_too_long_fails_only_that_region(
    promoter: Engine, aws: RecordingAws, results: DummyResults, recorder: Any
) -> None:
    aws.faults[("us-west-2", "ModifyImageAttribute")] = ["*InvalidAMIID.Unavailable"]
    ami = stage_ami()
    results.add(ami, TESTCASE, "PASSED")
    promoter.on_result(notice(ami))
    assert state(ami) == "promoting"
    (release,) = recorder.bodies("fedimg.image.release")
    assert "InvalidAMIID.Unavailable" in release["failed_regions"]["us-west-2"]
    assert "us-west-2" not in [b["destination"] for b in recorder.bodies("fedimg.image.publish")]
    assert not aws.calls("ModifySnapshotAttribute", "us-west-2")


def test_a_region_public_but_with_a_private_snapshot_is_finished_and_announced_on_resume(
    promoter: Engine, aws: RecordingAws, results: DummyResults, recorder: Any
) -> None:
    aws.faults[("us-west-2", "ModifySnapshotAttribute")] = ["*UnauthorizedOperation"]
    ami = stage_ami()
    results.add(ami, TESTCASE, "PASSED")
    promoter.on_result(notice(ami))
    (release,) = recorder.bodies("fedimg.image.release")
    assert "UnauthorizedOperation" in release["failed_regions"]["us-west-2"]
    (copy,) = copies_in("us-west-2", ami)
    assert launch_public(copy["ImageId"], "us-west-2")  # the image went public, the snapshot not
    west_publishes = [
        b for b in recorder.bodies("fedimg.image.publish") if b["destination"] == "us-west-2"
    ]
    assert west_publishes == []

    aws.faults.clear()
    assert promoter.converge_ami(ami, Scope.RECONCILE).action == "released"
    west_publishes = [
        b for b in recorder.bodies("fedimg.image.publish") if b["destination"] == "us-west-2"
    ]
    assert [b["extra"]["id"] for b in west_publishes] == [copy["ImageId"]]
    # Regions finished in the first pass are not announced twice.
    assert len(recorder.bodies("fedimg.image.publish")) == len(TARGETS) + 1
    assert aws.regions_of("CopyImage")["us-west-2"] == 1


def test_region_disabled_in_the_account_fails_cleanly(
    promoter: Engine, aws: RecordingAws, results: DummyResults, recorder: Any
) -> None:
    aws.faults[("ap-southeast-2", "DescribeImages")] = ["*OptInRequired"]
    ami = stage_ami()
    results.add(ami, TESTCASE, "PASSED")
    promoter.on_result(notice(ami))
    (release,) = recorder.bodies("fedimg.image.release")
    assert "OptInRequired" in release["failed_regions"]["ap-southeast-2"]
    assert not aws.calls("CopyImage", "ap-southeast-2")
    assert state(ami) == "promoting"


def test_missing_bdm_snapshot_falls_back_to_the_tagged_snapshot(
    promoter: Engine, aws: RecordingAws, results: DummyResults
) -> None:
    ami = stage_ami()
    bdm_snap = describe(ami)["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    # moto may list a snapshot in the mappings that does not exist: make it so here.
    backend(STAGING).snapshots.pop(bdm_snap)
    results.add(ami, TESTCASE, "PASSED")
    promoter.on_result(notice(ami))
    sent = [p["SnapshotId"] for p in aws.calls("ModifySnapshotAttribute", STAGING)]
    assert bdm_snap not in sent
    assert sent, "the tagged staging snapshot was not made public"
    assert state(ami) == "released"


def test_a_failed_copy_is_replaced_with_a_new_token(
    promoter: Engine, aws: RecordingAws, results: DummyResults
) -> None:
    ami = stage_ami()
    west = ec2("us-west-2")
    failed = west.copy_image(SourceRegion=STAGING, SourceImageId=ami, Name="old-copy")["ImageId"]
    west.create_tags(Resources=[failed], Tags=[{"Key": tags.SOURCE_AMI, "Value": ami}])
    backend("us-west-2").amis[failed].state = "failed"
    results.add(ami, TESTCASE, "PASSED")
    promoter.on_result(notice(ami))
    assert [p["ImageId"] for p in aws.calls("DeregisterImage", "us-west-2")] == [failed]
    (params,) = aws.calls("CopyImage", "us-west-2")
    assert params["ClientToken"] == copy_token(ami, "us-west-2", failed)
    assert params["ClientToken"] != copy_token(ami, "us-west-2")
    assert state(ami) == "released"


# -- the listener's bad input -----------------------------------------------------------


def resultsdb_body(ami: str, outcome: str = "PASSED", item_type: str = "ami") -> dict[str, Any]:
    return {
        "id": 7,
        "groups": [],
        "testcase": {"name": TESTCASE},
        "outcome": outcome,
        "note": "",
        "ref_url": None,
        "submit_time": "2026-11-24T18:41:41.194357",
        "data": {"item": [ami], "type": [item_type]},
    }


def taskotron_body(ami: str, outcome: str = "PASSED") -> dict[str, Any]:
    return {
        "task": {"item": ami, "type": "ami", "name": TESTCASE},
        "result": {
            "id": 9,
            "submit_time": "2017-06-20 10:00:00 UTC",
            "prev_outcome": None,
            "outcome": outcome,
            "log_url": "http://x.test/log",
        },
    }


@pytest.mark.parametrize(
    ("mtype", "build"), [(RESULT_NEW, resultsdb_body), (TASKOTRON_RESULT_NEW, taskotron_body)]
)
def test_both_message_shapes_trigger_the_gate(
    promoter: Engine, results: DummyResults, mtype: Any, build: Any
) -> None:
    ami = stage_ami()
    results.add(ami, TESTCASE, "PASSED")
    decision = promoter.on_result(parse_result_notice(mtype, build(ami)))
    assert decision is not None and decision.action == "release"
    assert state(ami) == "released"


def test_results_for_other_item_types_are_ignored_without_any_lookup(
    promoter: Engine, aws: RecordingAws, results: DummyResults
) -> None:
    ami = stage_ami()
    n = parse_result_notice(RESULT_NEW, resultsdb_body(ami, item_type="koji_build"))
    assert not acted(promoter.on_result(n))
    assert aws.sent == [] and results.queries == []
    assert state(ami) == "testing"


@pytest.mark.parametrize(
    "item",
    [
        "ami-xyz",
        "Fedora-Cloud-41",
        "ami-0123",
        "",
        "ami-" + "0" * 40,
        "ami-0123456789abcdef0,ami-0123456789abcdef1",
    ],
)
def test_items_that_are_not_ami_ids_are_ignored(
    promoter: Engine, aws: RecordingAws, results: DummyResults, item: str
) -> None:
    assert not acted(promoter.on_result(notice(item)))
    assert aws.sent == [] and results.queries == []


def test_unknown_ami_is_ignored(
    promoter: Engine, results: DummyResults, recorder: Any, caplog: Any
) -> None:
    with caplog.at_level(logging.INFO, logger="fedimg"):
        assert not acted(promoter.on_result(notice("ami-0123456789abcdef0")))
    assert results.queries == [] and recorder.sent == []
    assert caplog.records  # a log line says why


def test_ami_without_fedimg_tags_is_ignored(promoter: Engine, results: DummyResults) -> None:
    ami = stage_ami(fedimg_tags=False)
    results.add(ami, TESTCASE, "PASSED")
    assert not acted(promoter.on_result(notice(ami)))
    assert results.queries == []
    assert not launch_public(ami, STAGING)


@pytest.mark.parametrize(
    "current", [tags.State.REJECTED, tags.State.RELEASED, tags.State.PROMOTING]
)
def test_ami_not_in_testing_is_ignored(
    promoter: Engine, aws: RecordingAws, results: DummyResults, recorder: Any, current: tags.State
) -> None:
    ami = stage_ami(state=current)
    results.add(ami, TESTCASE, "PASSED")
    assert not acted(promoter.on_result(notice(ami)))
    assert not aws.calls("CopyImage") and recorder.sent == []
    assert state(ami) == current.value


def test_resultsdb_down_waits_and_never_decides_even_past_the_deadline(
    promoter: Engine, aws: RecordingAws, results: DummyResults, recorder: Any
) -> None:
    ami = stage_ami(staged_at=NOW - timedelta(days=2))
    results.add(ami, TESTCASE, "PASSED")
    results.set_down(True)
    decision = promoter.on_result(notice(ami))
    assert decision is not None and decision.action == "wait"
    assert "unavailable" in decision.detail
    assert state(ami) == "testing"
    assert recorder.sent == [] and not aws.calls("ModifyImageAttribute")
    results.set_down(False)
    assert promoter.on_result(notice(ami)).action == "release"  # type: ignore[union-attr]


def test_resultsdb_answering_500_waits(
    cfg: FedimgConfig, recorder: Any, aws: RecordingAws, clock: FakeClock
) -> None:
    from devel.resultsdb import ResultsDBServer
    from fedimg.results import ResultsDBSource

    with ResultsDBServer() as rdb:
        source = ResultsDBSource(rdb.url, max_retries=0, timeout=10)
        promoter = make_promoter(cfg, recorder, aws, source, clock)  # type: ignore[arg-type]
        ami = stage_ami()
        import resultsdb_api

        resultsdb_api.ResultsDBapi(rdb.url).create_result(
            outcome="PASSED", testcase=TESTCASE, item=ami, type="ami"
        )
        rdb.fail_next(5, 500)
        decision = promoter.on_result(notice(ami))
        assert decision is not None and decision.action == "wait"
        assert state(ami) == "testing" and not aws.calls("CopyImage")
        rdb.garble_next(1)
        assert promoter.on_result(notice(ami)).action == "wait"  # type: ignore[union-attr]
        rdb.faults.clear()
        assert promoter.on_result(notice(ami)).action == "release"  # type: ignore[union-attr]
    assert state(ami) == "released"


def test_a_testcase_outside_the_required_list_still_triggers_an_evaluation(
    promoter: Engine, results: DummyResults
) -> None:
    ami = stage_ami()
    results.add(ami, TESTCASE, "PASSED")
    decision = promoter.on_result(notice(ami, testcase="autocloud.ami.selinux"))
    assert decision is not None and decision.action == "release"
    assert results.queries == [(ami, "ami", (TESTCASE,))]


# -- CLI and reconcile ----------------------------------------------------------------------


def test_promote_by_hand(promoter: Engine, results: DummyResults, aws: RecordingAws) -> None:
    passed, failed, waiting = stage_ami(), stage_ami(), stage_ami()
    results.add(passed, TESTCASE, "PASSED")
    results.add(failed, TESTCASE, "FAILED")
    assert promote_by_hand(promoter, passed) == 0
    assert promote_by_hand(promoter, passed) == 0  # already released
    assert promote_by_hand(promoter, failed) == 1
    assert promote_by_hand(promoter, failed) == 1  # refuses a rejected AMI
    assert promote_by_hand(promoter, waiting) == 1
    assert promote_by_hand(promoter, "ami-0123456789abcdef0") == 1
    assert state(failed) == "rejected" and state(waiting) == "testing"
    assert not launch_public(failed, STAGING) and not launch_public(waiting, STAGING)
    assert aws.regions_of("CopyImage") == Counter(TARGETS)


def test_promote_by_hand_resumes_and_fails_while_a_region_fails(
    promoter: Engine, results: DummyResults, aws: RecordingAws
) -> None:
    ami = stage_ami()
    results.add(ami, TESTCASE, "PASSED")
    aws.faults[("eu-west-1", "CopyImage")] = ["*InvalidRegion"]
    assert promote_by_hand(promoter, ami) == 1
    assert state(ami) == "promoting"
    assert promote_by_hand(promoter, ami) == 1
    aws.faults.clear()
    assert promote_by_hand(promoter, ami) == 0
    assert state(ami) == "released"
    assert aws.regions_of("CopyImage")["us-west-2"] == 1


def test_cli_promote(
    monkeypatch: Any, promoter: Engine, results: DummyResults, recorder: Any
) -> None:
    monkeypatch.setattr(Engine, "from_config", classmethod(lambda cls, *a, **k: promoter))
    monkeypatch.setattr(promoter, "close", lambda: None)
    ami = stage_ami()
    results.add(ami, TESTCASE, "PASSED")
    emitter = Emitter(recorder)
    assert cli_promote(promoter.cfg, emitter, "not-an-ami") == 2
    assert cli_promote(promoter.cfg, emitter, ami) == 0
    assert state(ami) == "released"


def test_reconcile_evaluates_testing_and_resumes_promoting(
    promoter: Engine, results: DummyResults, aws: RecordingAws
) -> None:
    passed = stage_ami()
    late = stage_ami(staged_at=NOW - timedelta(hours=12))
    waiting = stage_ami()
    released = stage_ami(state=tags.State.RELEASED)
    partial = stage_ami()
    results.add(passed, TESTCASE, "PASSED")
    results.add(partial, TESTCASE, "PASSED")
    aws.faults[("eu-west-1", "CopyImage")] = ["*InvalidRegion"]
    promoter.converge_ami(partial, Scope.MESSAGE)
    assert state(partial) == "promoting"
    aws.faults.clear()

    outcomes = dict(promoter.reconcile(stage=False).pairs())

    assert released not in outcomes
    assert outcomes[passed].startswith("release")
    assert outcomes[late].startswith("reject: no results")
    assert outcomes[waiting].startswith("wait")
    assert outcomes[partial] == "released"
    assert (state(passed), state(late), state(waiting), state(partial)) == (
        "released",
        "rejected",
        "testing",
        "released",
    )
    assert aws.regions_of("CopyImage")["eu-west-1"] >= 2


def test_status_shows_every_staged_ami_its_tests_and_copies(
    cfg: FedimgConfig, promoter: Engine, results: DummyResults, aws: RecordingAws
) -> None:
    released, rejected = stage_ami(), stage_ami()
    results.add(released, TESTCASE, "PASSED")
    results.add(rejected, TESTCASE, "FAILED")
    promoter.converge_ami(released, Scope.MESSAGE)
    promoter.converge_ami(rejected, Scope.MESSAGE)
    out = io.StringIO()
    assert cli_status(cfg, out=out, aws=aws, results=results) == 0
    text = out.getvalue()
    header = text.splitlines()[0].split()
    assert header == ["AMI", "NAME", "COMPOSE", "ARCH", "STATE", "TESTS", "COPIES"]
    row_ok = next(line for line in text.splitlines() if line.startswith(released))
    assert "released" in row_ok and f"{TESTCASE}=PASSED" in row_ok and "3/3 (3 public)" in row_ok
    row_bad = next(line for line in text.splitlines() if line.startswith(rejected))
    assert "rejected" in row_bad and f"{TESTCASE}=FAILED" in row_bad and "0/3" in row_bad
    for region in TARGETS:
        assert copies_in(region, released)[0]["ImageId"] in text
    # Per region, the staging AMI first: public state and deprecation time.
    at = (NOW - timedelta(hours=1) + timedelta(days=730)).strftime("%Y-%m-%dT%H:%MZ")
    section = text.split(f"{released} by region (staging first):\n")[1].split("\n\n")[0]
    lines = [line.split() for line in section.splitlines()]
    assert [line[0] for line in lines] == [STAGING, *sorted(TARGETS)]
    assert lines[0][1] == released
    for line in lines:
        assert line[2:] == ["available", "public", "deprecated", at]
    assert f"{rejected} by region" not in text  # private, never deprecated: nothing to show

    compose = tags.as_dict(describe(rejected)["Tags"])[tags.COMPOSE_ID]
    only = io.StringIO()
    assert cli_status(cfg, compose, out=only, aws=aws, results=results) == 0
    assert rejected in only.getvalue() and released not in only.getvalue()

    results.set_down(True)
    down = io.StringIO()
    assert cli_status(cfg, out=down, aws=aws, results=results) == 0
    assert "?" in next(line for line in down.getvalue().splitlines() if line.startswith(released))

    aws.faults[(STAGING, "DescribeImages")] = ["*UnauthorizedOperation"]
    assert cli_status(cfg, out=io.StringIO(), aws=aws, results=results) == 1


# -- preflight --------------------------------------------------------------------------


@pytest.fixture
def standin() -> Iterator[Any]:
    """devel.motoextra's block-public-access states and quotas, forgotten after the test."""
    from devel import motoextra

    yield motoextra
    motoextra.reset()


def make_public_images(region: str, count: int) -> None:
    """``count`` public images of ours in ``region`` that are not fedimg's."""
    client = ec2(region)
    for n in range(count):
        image = client.register_image(Name=f"someone-else-{region}-{n}", RootDeviceName="/dev/sda1")
        client.modify_image_attribute(
            ImageId=image["ImageId"], LaunchPermission={"Add": [{"Group": "all"}]}
        )


NARROW = ["eu-west-1", "us-west-2"]  # two target regions: the preflight tests need no more


@pytest.fixture
def narrow(
    recorder: Any, aws: RecordingAws, results: DummyResults, clock: FakeClock, tmp_path: Path
) -> Iterator[Engine]:
    cfg = make_cfg(**{"fedimg.aws.regions": NARROW})
    built = make_promoter(cfg, recorder, aws, results, clock, state_dir=tmp_path)
    yield built
    built.close()


def release_one(engine: Engine, results: DummyResults) -> str:
    ami = stage_ami()
    results.add(ami, TESTCASE, "PASSED")
    assert acted(engine.on_result(notice(ami)))
    return ami


def test_preflight_asks_each_region_before_copying_there(
    narrow: Engine, aws: RecordingAws, results: DummyResults
) -> None:
    ami = release_one(narrow, results)
    assert state(ami) == "released"
    for region in [*NARROW, STAGING]:
        # SENT: the three reads of the region, each once, and before any CopyImage there.
        assert aws.calls("GetImageBlockPublicAccessState", region) == [{}]
        assert aws.calls("GetServiceQuota", region) == [
            {"ServiceCode": "ec2", "QuotaCode": "L-0E3CBAB9"}
        ]
        ops = [op for r, op, _ in aws.sent if r == region]
        assert ops.index("GetServiceQuota") < ops.index("ModifyImageAttribute")
        if region != STAGING:
            assert ops.index("GetServiceQuota") < ops.index("CopyImage")
        public_reads = [
            p for p in aws.calls("DescribeImages", region) if "Filters" in p and "Owners" in p
        ]
        assert {"Name": "is-public", "Values": ["true"]} in public_reads[0]["Filters"]


def test_a_region_that_disabled_public_sharing_is_not_copied_to_and_is_reported(
    narrow: Engine, aws: RecordingAws, results: DummyResults, recorder: Any, standin: Any
) -> None:
    ec2("eu-west-1").enable_image_block_public_access(
        ImageBlockPublicAccessState="block-new-sharing"
    )
    ami = release_one(narrow, results)
    assert not aws.calls("CopyImage", "eu-west-1")
    assert not aws.calls("ModifyImageAttribute", "eu-west-1")
    assert copies_in("eu-west-1", ami) == []
    (release,) = recorder.bodies("fedimg.image.release")
    assert set(release["failed_regions"]) == {"eu-west-1"}
    assert "block-new-sharing" in release["failed_regions"]["eu-west-1"]
    assert set(release["regions"]) == {*NARROW, STAGING} - {"eu-west-1"}
    validate_all(recorder)
    assert state(ami) == "promoting"  # the pass tries again

    # Sharing allowed again: the next pass copies there, and only there.
    ec2("eu-west-1").disable_image_block_public_access()
    assert narrow.converge_ami(ami, Scope.RECONCILE).action == "released"
    assert aws.regions_of("CopyImage") == Counter(NARROW)
    assert state(ami) == "released"


def test_a_public_ami_quota_at_its_limit_keeps_the_region_out(
    narrow: Engine, aws: RecordingAws, results: DummyResults, recorder: Any, standin: Any
) -> None:
    make_public_images("us-west-2", 2)
    standin.set_public_ami_quota(DEFAULT_ACCOUNT_ID, "us-west-2", 2)
    ami = release_one(narrow, results)
    assert not aws.calls("CopyImage", "us-west-2")
    (release,) = recorder.bodies("fedimg.image.release")
    assert "2 public of 2" in release["failed_regions"]["us-west-2"]
    assert state(ami) == "promoting"
    # One slot more (a quota increase): the region is copied to on the next pass.
    standin.set_public_ami_quota(DEFAULT_ACCOUNT_ID, "us-west-2", 3)
    assert narrow.converge_ami(ami, Scope.RECONCILE).action == "released"
    assert len(copies_in("us-west-2", ami)) == 1


def test_an_image_already_public_needs_no_new_slot(
    narrow: Engine, aws: RecordingAws, results: DummyResults, standin: Any
) -> None:
    ami = release_one(narrow, results)
    assert state(ami) == "released"
    # Now every region is full, this image's copies included: a resumed pass still finishes.
    for region in [*NARROW, STAGING]:
        standin.set_public_ami_quota(DEFAULT_ACCOUNT_ID, region, 1)
    ec2(STAGING).create_tags(Resources=[ami], Tags=[{"Key": tags.STATE, "Value": "promoting"}])
    assert narrow.converge_ami(ami, Scope.RECONCILE).action == "released"
    assert aws.regions_of("CopyImage") == Counter(NARROW)


def test_a_best_effort_region_failing_does_not_keep_the_image_promoting(
    recorder: Any,
    aws: RecordingAws,
    results: DummyResults,
    clock: FakeClock,
    tmp_path: Path,
    standin: Any,
) -> None:
    cfg = make_cfg(
        **{"fedimg.aws.regions": NARROW, "fedimg.promote.best_effort_regions": ["eu-west-1"]}
    )
    engine = make_promoter(cfg, recorder, aws, results, clock, state_dir=tmp_path)
    ec2("eu-west-1").enable_image_block_public_access(
        ImageBlockPublicAccessState="block-new-sharing"
    )
    try:
        ami = release_one(engine, results)
        assert state(ami) == "released"
        (release,) = recorder.bodies("fedimg.image.release")
        assert "block-new-sharing" in release["failed_regions"]["eu-west-1"]
        assert not aws.calls("CopyImage", "eu-west-1")
        # Released: no later pass goes back to it.
        engine.reconcile(stage=False)
        assert len(aws.calls("GetImageBlockPublicAccessState", "eu-west-1")) == 1
    finally:
        engine.close()


def test_a_best_effort_region_whose_copy_fails_is_reported_and_released_too(
    recorder: Any, aws: RecordingAws, results: DummyResults, clock: FakeClock, tmp_path: Path
) -> None:
    aws.faults[("us-west-2", "CopyImage")] = ["*UnauthorizedOperation"]
    settings = {"fedimg.aws.regions": NARROW, "fedimg.promote.best_effort_regions": ["us-west-2"]}
    ami = release_with(settings, recorder, aws, results, clock, tmp_path)
    assert state(ami) == "released"
    (release,) = recorder.bodies("fedimg.image.release")
    assert "UnauthorizedOperation" in release["failed_regions"]["us-west-2"]


def test_an_image_public_nowhere_is_not_released_even_if_every_failure_is_best_effort(
    recorder: Any, aws: RecordingAws, results: DummyResults, clock: FakeClock, tmp_path: Path
) -> None:
    aws.faults[("eu-west-1", "GetImageBlockPublicAccessState")] = ["*UnauthorizedOperation"]
    aws.faults[(STAGING, "GetImageBlockPublicAccessState")] = ["*UnauthorizedOperation"]
    settings = {
        "fedimg.aws.regions": ["eu-west-1"],
        "fedimg.promote.best_effort_regions": ["eu-west-1", STAGING],
    }
    ami = release_with(settings, recorder, aws, results, clock, tmp_path)
    assert state(ami) == "promoting"
    assert recorder.bodies("fedimg.image.release") == []  # a release in no region is no release


def test_a_skipped_region_is_never_asked_or_copied_to(
    recorder: Any, aws: RecordingAws, results: DummyResults, clock: FakeClock, tmp_path: Path
) -> None:
    settings = {"fedimg.aws.regions": NARROW, "fedimg.promote.skip_regions": ["eu-west-1"]}
    ami = release_with(settings, recorder, aws, results, clock, tmp_path)
    assert state(ami) == "released"
    assert not [op for r, op, _ in aws.sent if r == "eu-west-1"]
    (release,) = recorder.bodies("fedimg.image.release")
    assert "failed_regions" not in release
    assert set(release["regions"]) == {*NARROW, STAGING} - {"eu-west-1"}


@pytest.mark.parametrize(
    ("code", "go"),
    [
        # No applied value in that region: AWS's default quota (5) applies.
        ("NoSuchResourceException", True),
        # Service Quotas refusing is no licence to copy: the region fails, named.
        ("AccessDeniedException", False),
    ],
)
def test_service_quotas_answers(
    narrow: Engine,
    aws: RecordingAws,
    results: DummyResults,
    recorder: Any,
    code: str,
    go: bool,
) -> None:
    aws.faults[("eu-west-1", "GetServiceQuota")] = [f"*{code}"]
    ami = release_one(narrow, results)
    (release,) = recorder.bodies("fedimg.image.release")
    if go:
        assert state(ami) == "released" and "eu-west-1" in release["regions"]
    else:
        assert state(ami) == "promoting"
        assert code in release["failed_regions"]["eu-west-1"]
        assert "preflight" in release["failed_regions"]["eu-west-1"]
        assert not aws.calls("CopyImage", "eu-west-1")


def test_the_staging_region_is_checked_too(
    narrow: Engine, aws: RecordingAws, results: DummyResults, recorder: Any, standin: Any
) -> None:
    ec2(STAGING).enable_image_block_public_access(ImageBlockPublicAccessState="block-new-sharing")
    ami = release_one(narrow, results)
    assert not launch_public(ami, STAGING)
    assert not aws.calls("ModifyImageAttribute", STAGING)
    (release,) = recorder.bodies("fedimg.image.release")
    assert "block-new-sharing" in release["failed_regions"][STAGING]
    assert set(release["regions"]) == set(NARROW)
    assert state(ami) == "promoting"
