"""The reconcile pass: its pure decisions, and the pass itself against moto in process.

A stage killed mid-way is reproduced by leaving in moto exactly what the
process would have left at that instant (a snapshot started and never
finished, a completed one without an AMI, an AMI registered but never
tagged); what the pass SENDS is recorded with botocore hooks
(``tests.test_promote.RecordingAws``), as well as moto's end state.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from moto import mock_aws

from devel.compose import ComposeServer, ComposeTree, ImageSpec, build_compose
from fedimg import ami, tags
from fedimg.config import FedimgConfig
from fedimg.copies import Timing
from fedimg.gate import Decision
from fedimg.http import make_session
from fedimg.messages import Emitter
from fedimg.promote import Promoter, cli_reconcile
from fedimg.promote import reconcile as promote_reconcile
from fedimg.reconcile import (
    AmiFacts,
    Outcome,
    Reconciler,
    SnapshotFacts,
    image_from_tags,
    location_candidates,
    plan_image,
    reconcile,
    requested_count,
    retest_due,
    run_by_hand,
)
from fedimg.results import DummyResults
from fedimg.stage import Stager
from tests.conftest import Recorder
from tests.test_promote import STAGING, TARGETS, TESTCASE, FakeClock, RecordingAws

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
GRACE = timedelta(hours=2)
SHA = "a" * 64
COMPOSE = "Fedora-40-20240601.0"


# -- pure: the retest decision ---------------------------------------------------------------


def _waiting(missing: tuple[str, ...] = (TESTCASE,)) -> Decision:
    return Decision("wait", f"waiting for {', '.join(missing)}", (), missing)


def test_retest_due_only_for_missing_results_after_the_delay_and_once() -> None:
    due = {"staged_at": T0, "retest_after": 3 * HOUR, "requested": 0}
    assert retest_due(_waiting(), now=T0 + 3 * HOUR, **due)  # type: ignore[arg-type]
    assert not retest_due(_waiting(), now=T0 + 3 * HOUR - timedelta(seconds=1), **due)  # type: ignore[arg-type]
    later = T0 + 5 * HOUR
    assert not retest_due(_waiting(), staged_at=T0, now=later, retest_after=3 * HOUR, requested=1)
    # ResultsDB down: the gate waits with nothing listed missing -> never a retest.
    unavailable = Decision("wait", "ResultsDB unavailable: boom")
    assert not retest_due(unavailable, staged_at=T0, now=later, retest_after=HOUR, requested=0)
    for verdict in (
        Decision("release", "passed"),
        Decision("reject", "failed: x", ((TESTCASE, "FAILED", ""),)),
    ):
        assert not retest_due(verdict, staged_at=T0, now=later, retest_after=HOUR, requested=0)
    # A naive staging time is UTC, as the gate reads it.
    naive = T0.replace(tzinfo=None)
    assert retest_due(_waiting(), staged_at=naive, now=later, retest_after=HOUR, requested=0)


@pytest.mark.parametrize(
    ("value", "count"),
    [(None, 0), ("0", 0), ("1", 1), ("7", 7), ("-3", 0), ("one", 1_000_000), ("", 1_000_000)],
)
def test_requested_count_reads_the_tag_and_never_loops_on_garbage(
    value: str | None, count: int
) -> None:
    found = {} if value is None else {tags.TEST_REQUESTED: value}
    assert requested_count(found) == count


# -- pure: the plan for a stage's leftovers ----------------------------------------------------


def snap(
    sid: str,
    *,
    uploaded: bool = True,
    aws_state: str = "completed",
    age: timedelta = 3 * HOUR,
    resumed: int | None = None,
) -> SnapshotFacts:
    found = {tags.SHA256: SHA, tags.STATE: "testing"}
    if uploaded:
        found[tags.UPLOADED] = "2026-06-01T09:00:00Z"
    if resumed is not None:
        found[tags.RESUMED] = str(resumed)
    return SnapshotFacts(sid, aws_state, T0 - age, found)


def an_ami(
    ami_id: str,
    state: tags.State | None = tags.State.TESTING,
    *,
    age: timedelta = 3 * HOUR,
    snapshots: tuple[str, ...] = (),
) -> AmiFacts:
    return AmiFacts(ami_id, state, T0 - age, snapshots)


def plan(snaps: list[SnapshotFacts], amis: Mapping[str, AmiFacts | None], **kw: Any) -> Any:
    return plan_image(snaps, amis, now=T0, grace=GRACE, **kw)


def test_plan_half_written_upload_is_deleted_and_the_image_staged_again() -> None:
    result = plan([snap("snap-p", uploaded=False, aws_state="pending")], {"gp3": None})
    assert result.delete == ("snap-p",) and result.restage and result.resume_from is None
    # moto reports a half-written snapshot as completed: the missing mark decides.
    result = plan([snap("snap-p", uploaded=False)], {"gp3": None})
    assert result.delete == ("snap-p",) and result.restage


def test_plan_complete_snapshot_without_ami_resumes_from_it() -> None:
    snaps = [snap("snap-old", age=5 * HOUR), snap("snap-new"), snap("snap-p", uploaded=False)]
    result = plan(snaps, {"gp3": None})
    assert result.restage and result.resume_from == "snap-new"
    assert set(result.delete) == {"snap-old", "snap-p"}
    assert result.deregister == ()


def test_plan_untagged_ami_is_adopted_by_staging_again() -> None:
    result = plan([snap("snap-1")], {"gp3": an_ami("ami-1", None)})
    assert result.restage and result.resume_from == "snap-1" and result.delete == ()
    # One volume type tagged, another untagged: still resumed.
    result = plan([snap("snap-1")], {"gp3": an_ami("ami-1"), "gp2": an_ami("ami-2", None)})
    assert result.restage


def test_plan_gives_up_after_max_resumes_and_removes_everything() -> None:
    result = plan(
        [snap("snap-1", resumed=3), snap("snap-p", uploaded=False)],
        {"gp3": an_ami("ami-1", None)},
    )
    assert not result.restage and result.gave_up
    assert set(result.delete) == {"snap-1", "snap-p"}
    assert result.deregister == ("ami-1",)
    assert not plan([snap("snap-1", resumed=2)], {"gp3": None}).delete


def test_plan_touches_nothing_young_or_busy() -> None:
    young = plan([snap("snap-p", uploaded=False, age=HOUR)], {"gp3": None})
    assert young.empty and "younger" in young.reason
    young_ami = plan([snap("snap-1")], {"gp3": an_ami("ami-1", None, age=timedelta(minutes=5))})
    assert young_ami.empty
    busy = plan([snap("snap-p", uploaded=False)], {"gp3": None}, busy=True)
    assert busy.empty
    assert plan([], {"gp3": None}).empty


def test_plan_with_every_ami_tagged_deletes_only_unused_snapshots() -> None:
    done = {"gp3": an_ami("ami-1")}
    assert plan([snap("snap-1")], done).empty
    result = plan([snap("snap-1"), snap("snap-p", uploaded=False)], done)
    assert result.delete == ("snap-p",) and not result.restage
    # AMIs that name their snapshots (AWS does): a duplicate complete upload goes too.
    named = {"gp3": an_ami("ami-1", tags.State.RELEASED, snapshots=("snap-1",))}
    result = plan([snap("snap-1"), snap("snap-2")], named)
    assert result.delete == ("snap-2",)
    # Made-up mappings (moto) are not trusted: complete snapshots stay.
    made_up = {"gp3": an_ami("ami-1", snapshots=("snap-nobody",))}
    assert plan([snap("snap-1"), snap("snap-2")], made_up).empty
    # An AMI registered (before fedimg:uploaded existed) from an unmarked snapshot keeps it.
    legacy = {"gp3": an_ami("ami-1", snapshots=("snap-1", "snap-elsewhere"))}
    assert plan([snap("snap-1", uploaded=False)], legacy).empty


_snapshots = st.lists(
    st.builds(
        snap,
        st.sampled_from([f"snap-{i}" for i in range(6)]),
        uploaded=st.booleans(),
        aws_state=st.sampled_from(["completed", "pending", "error"]),
        age=st.sampled_from([timedelta(0), HOUR, 3 * HOUR, 30 * HOUR]),
        resumed=st.none() | st.integers(0, 5),
    ),
    max_size=5,
    unique_by=lambda s: s.snapshot_id,
)
_amis = st.dictionaries(
    st.sampled_from(["gp2", "gp3", "io2"]),
    st.none()
    | st.builds(
        an_ami,
        st.sampled_from(["ami-1", "ami-2", "ami-3"]),
        st.none() | st.sampled_from(list(tags.State)),
        age=st.sampled_from([timedelta(0), 3 * HOUR]),
        snapshots=st.lists(st.sampled_from(["snap-0", "snap-1", "snap-x"]), max_size=2).map(tuple),
    ),
    min_size=1,
)


@settings(max_examples=300, deadline=None)
@given(_snapshots, _amis, st.booleans())
def test_plan_invariants(snaps: list[SnapshotFacts], amis: dict[str, Any], busy: bool) -> None:
    result = plan(snaps, amis, busy=busy)
    ids = {s.snapshot_id for s in snaps}
    young = any(T0 - s.started < GRACE for s in snaps) or any(
        a is not None and a.state is None and T0 - a.created < GRACE for a in amis.values()
    )
    assert set(result.delete) <= ids
    named = {x for a in amis.values() if a is not None for x in a.snapshots}
    assert not named & set(result.delete)  # an AMI's own snapshot never goes
    if busy or young:
        assert result.empty
    missing = [v for v, a in amis.items() if a is None or a.state is None]
    if result.restage:
        assert missing
        assert result.resume_from is None or result.resume_from not in result.delete
    if result.resume_from is not None:
        assert next(s for s in snaps if s.snapshot_id == result.resume_from).uploaded
    if result.deregister:
        untagged = {a.ami_id for a in amis.values() if a is not None and a.state is None}
        assert set(result.deregister) <= untagged and not result.restage
    if not missing:
        # With every AMI tagged, a complete upload goes only when the AMIs name theirs.
        trusted = named and named <= ids and all(a.snapshots for a in amis.values())
        for sid in result.delete:
            gone = next(s for s in snaps if s.snapshot_id == sid)
            assert trusted or not gone.uploaded


# -- pure: the image behind a snapshot -----------------------------------------------------------

GOOD_TAGS = {
    tags.COMPOSE_ID: COMPOSE,
    tags.IMAGE_NAME: "Fedora-Cloud-Base-40-20240601.0.x86_64.raw.xz",
    tags.IMAGE_URL: "https://kojipkgs.fedoraproject.org/compose/x.raw.xz",
    tags.SHA256: SHA,
    tags.ARCH: "x86_64",
    tags.SUBVARIANT: "Cloud_Base",
    tags.RELEASE: "40",
}


def test_image_from_tags_rebuilds_the_compose_image() -> None:
    image = image_from_tags(GOOD_TAGS, ["kojipkgs.fedoraproject.org"])
    assert (image.compose_id, image.image_name, image.arch, image.sha256) == (
        COMPOSE,
        GOOD_TAGS[tags.IMAGE_NAME],
        "x86_64",
        SHA,
    )
    assert image.url == GOOD_TAGS[tags.IMAGE_URL] and image.release == "40"
    assert ami.ami_name(image, "gp3").endswith(f"-hvm-gp3-{SHA[:16]}")


@pytest.mark.parametrize(
    "change",
    [
        {tags.COMPOSE_ID: ""},
        {tags.IMAGE_URL: ""},
        {tags.SHA256: "not-a-sha"},
        {tags.ARCH: "ppc64le"},
        {tags.IMAGE_URL: "file:///etc/passwd"},
        {tags.IMAGE_URL: "https://evil.example/x.raw.xz"},
        {tags.IMAGE_URL: "https://user:pw@kojipkgs.fedoraproject.org/x.raw.xz"},
    ],
)
def test_image_from_tags_refuses_unusable_tags(change: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        image_from_tags({**GOOD_TAGS, **change}, ["kojipkgs.fedoraproject.org"])


def test_outcome_text_and_failure() -> None:
    assert Outcome("ami-1", "wait", "waiting").text == "wait: waiting"
    assert Outcome("ami-1", "released").text == "released"
    assert [Outcome("x", a).failed for a in ("error", "promoting", "gave-up", "resumed")] == [
        True,
        True,
        True,
        False,
    ]


# -- the pass against moto ------------------------------------------------------------------


@dataclass
class World:
    """moto, a generated compose on loopback, a Stager and a Promoter sharing one clock."""

    aws: RecordingAws
    tree: ComposeTree
    server: ComposeServer
    recorder: Recorder
    results: DummyResults
    cfg: FedimgConfig
    now: datetime
    stagers: list[Stager] = field(default_factory=list)

    @property
    def staged_at(self) -> datetime:
        """When the images in this world were staged (whole seconds, as the tag)."""
        return self.start.replace(microsecond=0)

    def __post_init__(self) -> None:
        self.start = self.now

    def clock(self) -> datetime:
        return self.now

    def later(self, delta: timedelta) -> None:
        self.now += delta

    @property
    def ec2(self) -> Any:
        return self.aws.ec2(STAGING)

    def stager(self) -> Stager:
        stager = Stager(
            self.cfg,
            Emitter(self.recorder),
            self.aws,
            make_session(0, 5.0),
            available_timeout=5.0,
            poll_interval=0.05,
        )
        self.stagers.append(stager)
        return stager

    def promoter(self) -> Promoter:
        timing = Timing(copy_timeout=60, retry_timeout=10, poll_interval=1)
        return Promoter(
            self.cfg,
            Emitter(self.recorder),
            self.aws,
            self.results,
            now=self.clock,
            clock=FakeClock().clock(),
            timing=timing,
        )

    def reconciler(self, stager: Stager | None = None) -> Reconciler:
        return Reconciler(self.promoter(), stager or self.stager(), now=self.clock)

    def image(self, arch: str = "x86_64") -> Any:
        built = next(b for b in self.tree.raw_images() if b.spec.arch == arch)
        return built

    def image_tags(self, arch: str = "x86_64", state: str = "testing") -> dict[str, str]:
        built = self.image(arch)
        return {
            tags.COMPOSE_ID: self.tree.compose_id,
            tags.IMAGE_NAME: built.image_name,
            tags.IMAGE_URL: self.server.url_of(built.path),
            tags.SHA256: built.sha256,
            tags.ARCH: arch,
            tags.SUBVARIANT: built.spec.subvariant,
            tags.RELEASE: "40",
            tags.STATE: state,
            tags.STAGED_AT: self.staged_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def snapshots(self, arch: str = "x86_64") -> list[dict[str, Any]]:
        sha = self.image(arch).sha256
        return list(
            self.ec2.describe_snapshots(
                OwnerIds=["self"], Filters=[{"Name": f"tag:{tags.SHA256}", "Values": [sha]}]
            )["Snapshots"]
        )

    def amis(self) -> list[dict[str, Any]]:
        return list(self.ec2.describe_images(Owners=["self"])["Images"])

    def half_written(self, arch: str = "x86_64") -> str:
        """What a stage killed mid-upload leaves: a started snapshot, one block in it."""
        ebs = self.aws.ebs(STAGING)
        started = ebs.start_snapshot(
            VolumeSize=1,
            Timeout=60,
            Tags=tags.as_list(self.image_tags(arch)),
        )
        block = b"\x01" * 524288
        ebs.put_snapshot_block(
            SnapshotId=started["SnapshotId"],
            BlockIndex=0,
            BlockData=block,
            DataLength=len(block),
            Checksum=base64.b64encode(hashlib.sha256(block).digest()).decode(),
            ChecksumAlgorithm="SHA256",
        )
        return str(started["SnapshotId"])

    def completed(self, arch: str = "x86_64", **extra: str) -> str:
        """A snapshot stage finished (marked uploaded), its AMI never registered."""
        sid = self.half_written(arch)
        marks = {tags.UPLOADED: "2026-06-01T08:01:00Z", **extra}
        self.ec2.create_tags(Resources=[sid], Tags=tags.as_list(marks))
        return sid

    def untagged_ami(self, arch: str = "x86_64", vol: str = "gp3") -> str:
        """register_image went through; the process died before tagging it."""
        built = self.image(arch)
        image = image_from_tags(self.image_tags(arch))
        assert image.sha256 == built.sha256
        return str(
            self.ec2.register_image(
                Name=ami.ami_name(image, vol),
                Description=ami.ami_description(image, vol),
                RootDeviceName="/dev/sda1",
            )["ImageId"]
        )

    def tagged_ami(self, arch: str = "x86_64", state: str = "testing") -> str:
        ami_id = self.untagged_ami(arch)
        found = {**self.image_tags(arch, state), tags.VOL_TYPE: "gp3"}
        self.ec2.create_tags(Resources=[ami_id], Tags=tags.as_list(found))
        return ami_id

    def tags_of(self, ami_id: str) -> dict[str, str]:
        return tags.as_dict(self.ec2.describe_images(ImageIds=[ami_id])["Images"][0].get("Tags"))


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingAws]:
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    with mock_aws():
        yield RecordingAws()


@pytest.fixture
def world(aws: RecordingAws, tmp_path: Path, recorder: Recorder) -> Iterator[World]:
    """A compose of two images (Cloud Base x86_64 and aarch64)."""
    yield from _world(aws, tmp_path, recorder, (X86_SPEC, ARM_SPEC))


@pytest.fixture
def solo(aws: RecordingAws, tmp_path: Path, recorder: Recorder) -> Iterator[World]:
    """A compose of one image (nothing else to find when it is staged again)."""
    yield from _world(aws, tmp_path, recorder, (X86_SPEC,))


X86_SPEC = ImageSpec("Cloud", "x86_64", "Cloud_Base", raw_mib=2, data_blocks=(0, 2), seed=11)
ARM_SPEC = ImageSpec("Cloud", "aarch64", "Cloud_Base", raw_mib=2, data_blocks=(1,), seed=12)


def _world(
    aws: RecordingAws, tmp_path: Path, recorder: Recorder, specs: tuple[ImageSpec, ...]
) -> Iterator[World]:
    results = DummyResults()
    tree = build_compose(tmp_path / "compose", COMPOSE, specs)
    cfg = FedimgConfig.from_fedmsg(
        {
            "fedimg.resultsdb_url": "http://resultsdb.test/api/v2.0",
            "fedimg.aws.staging_region": STAGING,
            "fedimg.aws.regions": TARGETS,
            "fedimg.aws.upload_workers": 2,
            "fedimg.compose.allowed_hosts": ["127.0.0.1"],
            "fedimg.gate.deadline": 6 * 3600.0,
            "fedimg.gate.retest_after": 3 * 3600.0,
            "fedimg.reconcile.orphan_grace": 2 * 3600.0,
        }
    )
    with ComposeServer(tree.root) as server:
        w = World(aws, tree, server, recorder, results, cfg, datetime.now(UTC))
        yield w
        for stager in w.stagers:
            stager.close()


def _tests_requested(recorder: Recorder) -> list[str]:
    return [
        b["extra"]["id"] for b in recorder.bodies("fedimg.image.test") if b["status"] == "started"
    ]


def _run(world: World, stager: Stager | None = None) -> tuple[dict[str, str], list[Outcome]]:
    report = world.reconciler(stager).run()
    restaged = report.wait(timeout=60)
    return {o.resource: o.text for o in report.outcomes}, restaged


def test_testing_ami_without_results_gets_its_test_requested_once_then_rejected(
    world: World,
) -> None:
    ami_id = world.tagged_ami()
    staged_at = world.staged_at
    world.now = staged_at + timedelta(hours=2)
    outcomes, _ = _run(world)
    assert outcomes[ami_id].startswith("wait")
    assert _tests_requested(world.recorder) == []

    world.now = staged_at + timedelta(hours=3, seconds=1)
    outcomes, _ = _run(world)
    assert outcomes[ami_id].startswith("retest")
    assert _tests_requested(world.recorder) == [ami_id]
    assert world.tags_of(ami_id)[tags.TEST_REQUESTED] == "1"
    (request,) = [b for b in world.recorder.bodies("fedimg.image.test")]
    assert request["compose_id"] == COMPOSE and request["destination"] == STAGING
    # The tag went out before the message: AWS saw create_tags first.
    tagged = world.aws.calls("CreateTags", STAGING)
    assert any({"Key": tags.TEST_REQUESTED, "Value": "1"} in c["Tags"] for c in tagged), tagged

    world.now = staged_at + timedelta(hours=5)
    outcomes, _ = _run(world)
    assert outcomes[ami_id].startswith("wait")
    assert _tests_requested(world.recorder) == [ami_id]  # once, not twice

    world.now = staged_at + timedelta(hours=6)
    outcomes, _ = _run(world)
    assert outcomes[ami_id].startswith("reject: no results")
    assert world.tags_of(ami_id)[tags.STATE] == "rejected"
    assert _tests_requested(world.recorder) == [ami_id]


def test_no_retest_while_resultsdb_is_down_or_results_are_in(world: World) -> None:
    down, passed = world.tagged_ami("x86_64"), world.tagged_ami("aarch64")
    world.results.add(passed, "autocloud.ami.selinux", "PASSED")  # not the required one
    world.now = world.staged_at + timedelta(hours=4)
    world.results.set_down(True)
    outcomes, _ = _run(world)
    assert outcomes[down].startswith("wait") and outcomes[passed].startswith("wait")
    assert _tests_requested(world.recorder) == []
    assert tags.TEST_REQUESTED not in world.tags_of(down)

    world.results.set_down(False)
    world.results.add(down, TESTCASE, "PASSED")
    outcomes, _ = _run(world)
    assert outcomes[down].startswith("release")
    assert outcomes[passed].startswith("retest")  # only a non-required result came
    assert _tests_requested(world.recorder) == [passed]


def test_half_written_snapshot_is_deleted_and_the_image_staged_again(solo: World) -> None:
    partial = solo.half_written()
    solo.later(3 * HOUR)
    outcomes, restaged = _run(solo)
    name = solo.image().image_name
    assert outcomes[name].startswith("resumed: upload never finished")
    assert [o.action for o in restaged] == ["staged"]
    snaps = solo.snapshots()
    assert partial not in [s["SnapshotId"] for s in snaps]
    (fresh,) = snaps
    assert tags.UPLOADED in tags.as_dict(fresh["Tags"])
    (image,) = solo.amis()
    assert solo.tags_of(image["ImageId"])[tags.STATE] == "testing"
    assert _tests_requested(solo.recorder) == [image["ImageId"]]
    assert len(solo.aws.calls("StartSnapshot", STAGING)) == 2  # ours, then the new upload
    # The next pass finds nothing left to do.
    outcomes, restaged = _run(solo)
    assert name not in outcomes and restaged == []


def test_completed_snapshot_without_ami_resumes_without_uploading(solo: World) -> None:
    sid = solo.completed()
    solo.later(3 * HOUR)
    starts_before = len(solo.aws.calls("StartSnapshot", STAGING))
    outcomes, restaged = _run(solo)
    assert outcomes[solo.image().image_name].startswith("resumed")
    assert [o.action for o in restaged] == ["staged"]
    assert len(solo.aws.calls("StartSnapshot", STAGING)) == starts_before
    (register,) = solo.aws.calls("RegisterImage", STAGING)
    assert register["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"] == sid
    snap_tags = tags.as_dict(solo.snapshots()[0]["Tags"])
    assert snap_tags[tags.RESUMED] == "1"
    assert len(_tests_requested(solo.recorder)) == 1


def test_untagged_ami_is_adopted_not_registered_again(solo: World) -> None:
    solo.completed()
    orphan = solo.untagged_ami()
    solo.later(3 * HOUR)
    registered = len(solo.aws.calls("RegisterImage", STAGING))
    outcomes, restaged = _run(solo)
    assert outcomes[solo.image().image_name].startswith("resumed")
    assert [o.action for o in restaged] == ["staged"]
    assert len(solo.aws.calls("RegisterImage", STAGING)) == registered
    assert [i["ImageId"] for i in solo.amis()] == [orphan]
    found = solo.tags_of(orphan)
    assert found[tags.STATE] == "testing" and found[tags.SHA256] == solo.image().sha256
    assert _tests_requested(solo.recorder) == [orphan]
    uploads = [b["status"] for b in solo.recorder.bodies("fedimg.image.upload")]
    assert uploads == ["completed"]


def test_leftovers_within_the_grace_period_or_being_staged_are_left_alone(world: World) -> None:
    partial = world.half_written()
    outcomes, restaged = _run(world)
    assert outcomes == {} and restaged == []
    world.later(3 * HOUR)
    stager = world.stager()
    busy_sha = world.image().sha256
    with stager._image_lock(busy_sha):  # this process is staging that image right now
        assert stager.busy(busy_sha)
        outcomes, restaged = _run(world, stager)
    assert outcomes == {} and restaged == []
    assert [s["SnapshotId"] for s in world.snapshots()] == [partial]
    assert world.aws.calls("DeleteSnapshot", STAGING) == []


def test_gives_up_after_max_resumes(world: World, caplog: pytest.LogCaptureFixture) -> None:
    sid = world.completed(**{tags.RESUMED: "3"})
    orphan = world.untagged_ami()
    world.later(3 * HOUR)
    with caplog.at_level(logging.WARNING, logger="fedimg.reconcile"):
        outcomes, restaged = _run(world)
    assert outcomes[world.image().image_name].startswith("gave-up")
    assert restaged == []
    assert world.snapshots() == [] and world.amis() == []
    assert [c["SnapshotId"] for c in world.aws.calls("DeleteSnapshot", STAGING)] == [sid]
    assert [c["ImageId"] for c in world.aws.calls("DeregisterImage", STAGING)] == [orphan]
    assert any(r.levelno >= logging.WARNING for r in caplog.records)


def test_leftover_beside_a_promoted_image_is_deleted_and_never_published(world: World) -> None:
    sid = world.completed()
    ami_id = world.tagged_ami()
    partial = world.half_written()
    world.results.add(ami_id, TESTCASE, "PASSED")
    world.later(3 * HOUR)
    outcomes, restaged = _run(world)
    assert outcomes[ami_id] == "release: passed: autocloud.ami.all"
    assert restaged == []
    assert world.tags_of(ami_id)[tags.STATE] == "released"
    published = [c["SnapshotId"] for c in world.aws.calls("ModifySnapshotAttribute", STAGING)]
    assert sid in published and partial not in published  # (moto adds a made-up one too)
    assert [s["SnapshotId"] for s in world.snapshots()] == [sid]
    assert [c["SnapshotId"] for c in world.aws.calls("DeleteSnapshot", STAGING)] == [partial]
    assert ami_id in outcomes and len(world.amis()) == 1


def test_unusable_tags_are_reported_and_nothing_is_deleted(world: World) -> None:
    ebs = world.aws.ebs(STAGING)
    bad = {**world.image_tags(), tags.IMAGE_URL: "https://elsewhere.example/x.raw.xz"}
    sid = ebs.start_snapshot(VolumeSize=1, Timeout=60, Tags=tags.as_list(bad))["SnapshotId"]
    world.later(3 * HOUR)
    outcomes, restaged = _run(world)
    text = outcomes[world.image().image_name]
    assert text.startswith("error") and "not in the allowed" in text
    assert restaged == []
    assert world.aws.calls("DeleteSnapshot", STAGING) == []
    assert sid in [s["SnapshotId"] for s in world.snapshots()]
    # Tags that do not even name an image: an error too, nothing touched.
    garbage = {**world.image_tags("aarch64"), tags.ARCH: "sparc"}
    ebs.start_snapshot(VolumeSize=1, Timeout=60, Tags=tags.as_list(garbage))
    outcomes, _ = _run(world)
    assert outcomes[world.image("aarch64").image_name].startswith("error: unusable tags")
    assert world.aws.calls("DeleteSnapshot", STAGING) == []


def test_a_host_no_longer_allowed_does_not_matter_while_nothing_needs_staging(
    world: World,
) -> None:
    moved = {tags.IMAGE_URL: "https://elsewhere.example/x.raw.xz"}
    world.completed(**moved)
    ami_id = world.tagged_ami()
    world.later(3 * HOUR)
    outcomes, restaged = _run(world)
    assert world.image().image_name not in outcomes and restaged == []
    assert outcomes[ami_id].startswith(("wait", "retest"))


def test_without_a_stager_only_amis_are_reconciled(world: World) -> None:
    world.half_written()
    ami_id = world.tagged_ami("aarch64")
    world.later(3 * HOUR)
    report = Reconciler(world.promoter(), None, now=world.clock).run()
    assert [o.resource for o in report.outcomes] == [ami_id]
    assert world.aws.calls("DeleteSnapshot", STAGING) == []
    # The promote module's entry point is the same AMI pass.
    assert [a for a, _ in promote_reconcile(world.promoter())] == [ami_id]


def test_run_by_hand_prints_every_outcome_and_fails_on_errors(world: World) -> None:
    world.completed()
    ami_id = world.tagged_ami("aarch64")
    world.results.add(ami_id, TESTCASE, "PASSED")
    world.later(3 * HOUR)
    lines: list[str] = []
    assert run_by_hand(world.promoter(), world.stager(), lines.append) == 0
    by_resource = dict(line.split("\t", 1) for line in lines)
    name = world.image().image_name
    assert by_resource[ami_id].startswith("release")
    assert by_resource[name].startswith("staged: gp3 ami-")  # the wait for the restage

    # A restage that fails makes the run fail.
    bad = world.completed("aarch64")
    world.aws.faults[(STAGING, "RegisterImage")] = ["*UnauthorizedOperation"]
    for image in world.amis():
        world.ec2.deregister_image(ImageId=image["ImageId"])
    lines.clear()
    assert run_by_hand(world.promoter(), world.stager(), lines.append) == 1
    assert any(line.split("\t")[1].startswith("error") for line in lines), lines
    assert bad in [s["SnapshotId"] for s in world.snapshots("aarch64")]  # kept to resume


def test_cli_reconcile_builds_the_pass_from_the_config(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ami_id = world.tagged_ami()
    world.results.add(ami_id, TESTCASE, "FAILED")
    monkeypatch.setattr(Promoter, "from_config", classmethod(lambda cls, *a, **k: world.promoter()))
    monkeypatch.setattr(Stager, "from_config", classmethod(lambda cls, *a, **k: world.stager()))
    assert cli_reconcile(world.cfg, Emitter(world.recorder)) == 0
    assert f"{ami_id}\treject: failed" in capsys.readouterr().out
    assert world.tags_of(ami_id)[tags.STATE] == "rejected"


def test_reconcile_entry_point_logs_a_summary(world: World) -> None:
    ami_id = world.tagged_ami()
    report = reconcile(world.promoter(), world.stager())
    assert [(o.resource, o.action) for o in report.outcomes] == [(ami_id, "wait")]
    assert report.restages == {}


def test_aws_refusing_the_listings_is_an_error_outcome_not_a_crash(world: World) -> None:
    world.aws.faults[(STAGING, "DescribeImages")] = ["*UnauthorizedOperation"]
    world.aws.faults[(STAGING, "DescribeSnapshots")] = ["*UnauthorizedOperation"]
    report = world.reconciler().run()
    assert [(o.resource, o.action) for o in report.outcomes] == [
        ("amis", "error"),
        ("snapshots", "error"),
    ]
    lines: list[str] = []
    assert run_by_hand(world.promoter(), world.stager(), lines.append) == 1
    assert len(lines) == 2


def test_stager_submits_an_image_once_while_it_is_queued_or_running(world: World) -> None:
    stager = world.stager()
    image = image_from_tags(world.image_tags(), ["127.0.0.1"])
    assert not stager.busy(image.sha256)
    with stager._image_lock(image.sha256):  # the worker waits here, the image stays busy
        first = stager.submit_image(image)
        assert first is not None
        assert stager.submit_image(image) is None
        assert stager.busy(image.sha256)
    (outcome,) = first.result(timeout=60)
    assert outcome.status == "staged" and outcome.ami_id
    assert not stager.busy(image.sha256)
    again = stager.submit_image(image)
    assert again is not None
    assert [o.status for o in again.result(timeout=60)] == ["existing"]


def test_location_candidates_walk_up_from_the_image_file() -> None:
    url = "https://kojipkgs.example/compose/40/F-40/compose/Cloud/x86_64/images/f.raw.xz"
    assert location_candidates(url) == [
        "https://kojipkgs.example/compose/40/F-40/compose/Cloud/x86_64/images",
        "https://kojipkgs.example/compose/40/F-40/compose/Cloud/x86_64",
        "https://kojipkgs.example/compose/40/F-40/compose/Cloud",
        "https://kojipkgs.example/compose/40/F-40/compose",
        "https://kojipkgs.example/compose/40/F-40",
        "https://kojipkgs.example/compose/40",
    ]
    assert location_candidates(url, limit=2) == location_candidates(url)[:2]
    assert location_candidates("https://h/f.raw.xz?x=1") == []
    for bad in ("", "not a url", "https://host-only"):
        assert location_candidates(bad) == []


def test_images_of_the_compose_that_never_started_are_staged_too(world: World) -> None:
    world.half_written("x86_64")  # the crash came while the aarch64 image waited its turn
    world.later(3 * HOUR)
    outcomes, restaged = _run(world)
    arm = world.image("aarch64").image_name
    assert outcomes[world.image().image_name].startswith("resumed: upload never finished")
    assert outcomes[arm] == "resumed: never started: staging it now"
    assert sorted(o.action for o in restaged) == ["staged", "staged"]
    assert len(world.amis()) == 2
    assert len(_tests_requested(world.recorder)) == 2
    # Everything is there now: the next pass stages nothing.
    outcomes, restaged = _run(world)
    assert restaged == [] and arm not in outcomes


def test_a_compose_not_found_again_resumes_only_the_image_with_a_trace(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    moved = {tags.IMAGE_URL: f"{world.server.base_url}/elsewhere/{world.image().image_name}"}
    world.completed(**moved)
    world.later(3 * HOUR)
    with caplog.at_level(logging.WARNING, logger="fedimg.reconcile"):
        outcomes, restaged = _run(world)
    assert [o.action for o in restaged] == ["staged"]  # from the snapshot: no download
    assert world.image("aarch64").image_name not in outcomes
    assert len(world.amis()) == 1
    assert any(r.levelno == logging.WARNING for r in caplog.records)
