"""The reconcile pass (``Engine.reconcile``, ``cli_reconcile``) against moto in process.

A stage killed mid-way is reproduced by leaving in moto exactly what the
process would have left at that instant (a snapshot started and never
finished, a completed one without an AMI, an AMI registered but never
tagged); what the pass SENDS is recorded with botocore hooks
(``tests.test_promote.RecordingAws``), as well as moto's end state. The
engine's clock is the world's: "three hours later" is a number, not a sleep.
The pure decisions behind the pass are tested in ``tests/test_plan.py``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from moto import mock_aws

from devel.compose import ComposeServer, ComposeTree, ImageSpec, build_compose
from fedimg import ami, tags
from fedimg.config import FedimgConfig
from fedimg.copies import Timing
from fedimg.engine import Engine, Outcome, cli_reconcile
from fedimg.http import make_session
from fedimg.intents import Intent
from fedimg.locks import Guard
from fedimg.messages import Emitter
from fedimg.observe import image_from_tags
from fedimg.promote import Promoter
from fedimg.results import DummyResults
from tests.conftest import Recorder
from tests.engine_support import make_engine
from tests.test_promote import STAGING, TARGETS, TESTCASE, FakeClock, RecordingAws

HOUR = timedelta(hours=1)
# Later than the grace period (2 h: leftovers are fair game) and earlier than retest_after
# (3 h: the AMIs staged meanwhile are not asked to test again, whatever the real clock did).
PAST_GRACE = timedelta(hours=2, minutes=30)
COMPOSE = "Fedora-40-20240601.0"
MUTATIONS = ("StartSnapshot", "RegisterImage", "DeleteSnapshot", "DeregisterImage", "CopyImage")


@dataclass
class World:
    """moto, a generated compose on loopback, and engines sharing one clock and state dir."""

    aws: RecordingAws
    tree: ComposeTree
    server: ComposeServer
    recorder: Recorder
    results: DummyResults
    cfg: FedimgConfig
    now: datetime
    state_dir: Path
    engines: list[Engine] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.start = self.now

    @property
    def staged_at(self) -> datetime:
        """When the images in this world were staged (whole seconds, as the tag)."""
        return self.start.replace(microsecond=0)

    def clock(self) -> datetime:
        return self.now

    def later(self, delta: timedelta) -> None:
        self.now += delta

    @property
    def ec2(self) -> Any:
        return self.aws.ec2(STAGING)

    def engine(self) -> Engine:
        """A new engine, as a restarted hub: nothing shared but AWS and the state directory."""
        emitter = Emitter(self.recorder)
        timing = Timing(copy_timeout=60, retry_timeout=10, poll_interval=1)
        promoter = Promoter(
            self.cfg, emitter, self.aws, now=self.clock, clock=FakeClock().clock(), timing=timing
        )
        built = make_engine(
            self.cfg,
            emitter,
            self.aws,
            self.state_dir,
            session=make_session(0, 5.0),
            results=self.results,
            promoter=promoter,
            now=self.clock,
            available_timeout=5.0,
            poll_interval=0.05,
        )
        self.engines.append(built)
        return built

    def image(self, arch: str = "x86_64") -> Any:
        return next(b for b in self.tree.raw_images() if b.spec.arch == arch)

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

    def snapshot_ids(self, arch: str = "x86_64") -> list[str]:
        return sorted(s["SnapshotId"] for s in self.snapshots(arch))

    def amis(self) -> list[dict[str, Any]]:
        return list(self.ec2.describe_images(Owners=["self"])["Images"])

    def half_written(self, arch: str = "x86_64", **overrides: str) -> str:
        """What a stage killed mid-upload leaves: a started snapshot, one block in it."""
        ebs = self.aws.ebs(STAGING)
        found = {**self.image_tags(arch), **overrides}
        started = ebs.start_snapshot(VolumeSize=1, Timeout=60, Tags=tags.as_list(found))
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
        sid = self.half_written(arch, **{k: v for k, v in extra.items() if k != tags.RESUMED})
        marks = {tags.UPLOADED: "2026-06-01T08:01:00Z", **extra}
        self.ec2.create_tags(Resources=[sid], Tags=tags.as_list(marks))
        return sid

    def untagged_ami(self, arch: str = "x86_64", vol: str = "gp3") -> str:
        """register_image went through; the process died before tagging it."""
        image = image_from_tags(self.image_tags(arch))
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

    def mutations(self) -> dict[str, int]:
        """How many calls of each kind that changes AWS the engines sent (in staging)."""
        return {op: len(self.aws.calls(op, STAGING)) for op in MUTATIONS}


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingAws]:
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    with mock_aws():
        yield RecordingAws()


X86_SPEC = ImageSpec("Cloud", "x86_64", "Cloud_Base", raw_mib=2, data_blocks=(0, 2), seed=11)
ARM_SPEC = ImageSpec("Cloud", "aarch64", "Cloud_Base", raw_mib=2, data_blocks=(1,), seed=12)


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ComposeTree]:
    """The composes, built once for the module (the tests never change the files)."""
    return {
        "two": build_compose(tmp_path_factory.mktemp("two"), COMPOSE, (X86_SPEC, ARM_SPEC)),
        "solo": build_compose(tmp_path_factory.mktemp("solo"), COMPOSE, (X86_SPEC,)),
    }


def _world(
    aws: RecordingAws, tmp_path: Path, recorder: Recorder, tree: ComposeTree
) -> Iterator[World]:
    state_dir = tmp_path / "state"
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
            "fedimg.state_dir": str(state_dir),
        }
    )
    with ComposeServer(tree.root) as server:
        w = World(aws, tree, server, recorder, DummyResults(), cfg, datetime.now(UTC), state_dir)
        yield w
        for built in w.engines:
            built.close()


@pytest.fixture
def world(
    aws: RecordingAws, tmp_path: Path, recorder: Recorder, trees: dict[str, ComposeTree]
) -> Iterator[World]:
    """A compose of two images (Cloud Base x86_64 and aarch64)."""
    yield from _world(aws, tmp_path, recorder, trees["two"])


@pytest.fixture
def solo(
    aws: RecordingAws, tmp_path: Path, recorder: Recorder, trees: dict[str, ComposeTree]
) -> Iterator[World]:
    """A compose of one image."""
    yield from _world(aws, tmp_path, recorder, trees["solo"])


def _tests_requested(recorder: Recorder) -> list[str]:
    return [
        b["extra"]["id"] for b in recorder.bodies("fedimg.image.test") if b["status"] == "started"
    ]


def _run(world: World, engine: Engine | None = None) -> tuple[dict[str, str], list[Outcome]]:
    """One pass of a new engine; (resource -> text, the outcomes of the stages it started)."""
    report = (engine or world.engine()).reconcile()
    restaged = report.wait(timeout=60)
    return {o.resource: o.text for o in report.outcomes}, restaged


# -- AMIs: the gate and the retest ---------------------------------------------------------


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
    (request,) = world.recorder.bodies("fedimg.image.test")
    assert request["compose_id"] == COMPOSE and request["destination"] == STAGING
    # The count went to AWS (what was SENT), before the message.
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
    assert world.aws.calls("CopyImage") == []


def test_no_retest_while_resultsdb_is_down_or_results_are_in(world: World) -> None:
    down, passed = world.tagged_ami("x86_64"), world.tagged_ami("aarch64")
    world.results.add(passed, "autocloud.ami.selinux", "PASSED")  # not the required one
    world.now = world.staged_at + timedelta(hours=7)  # past the deadline, too
    world.results.set_down(True)
    outcomes, _ = _run(world)
    assert outcomes[down].startswith("wait") and outcomes[passed].startswith("wait")
    assert _tests_requested(world.recorder) == []
    assert tags.TEST_REQUESTED not in world.tags_of(down)
    assert world.tags_of(down)[tags.STATE] == "testing"  # never rejected without ResultsDB

    world.results.set_down(False)
    world.results.add(down, TESTCASE, "PASSED")
    world.now = world.staged_at + timedelta(hours=4)
    outcomes, _ = _run(world)
    assert outcomes[down].startswith("release")
    assert outcomes[passed].startswith("retest")  # only a non-required result came
    assert _tests_requested(world.recorder) == [passed]


# -- what a killed stage left -----------------------------------------------------------------


def test_a_half_written_snapshot_is_kept_until_its_replacement_exists(solo: World) -> None:
    partial = solo.half_written()
    solo.later(PAST_GRACE)
    outcomes, restaged = _run(solo)
    name = solo.image().image_name
    assert outcomes == {}  # no AMI to gate, no intent: only the leftover's stage
    assert [o.action for o in restaged] == ["staged"] and restaged[0].resource == name
    (image,) = solo.amis()
    assert solo.tags_of(image["ImageId"])[tags.STATE] == "testing"
    assert _tests_requested(solo.recorder) == [image["ImageId"]]
    assert len(solo.aws.calls("StartSnapshot", STAGING)) == 2  # ours, then the new upload
    # The only trace of the unfinished upload outlived the pass that replaced it.
    assert solo.aws.calls("DeleteSnapshot", STAGING) == []
    fresh = [s for s in solo.snapshots() if s["SnapshotId"] != partial]
    assert len(fresh) == 1 and tags.UPLOADED in tags.as_dict(fresh[0]["Tags"])
    assert partial in solo.snapshot_ids()

    # The next pass finds the replacement in place and removes the leftover.
    before = solo.mutations()
    _run(solo)
    assert [c["SnapshotId"] for c in solo.aws.calls("DeleteSnapshot", STAGING)] == [partial]
    assert solo.snapshot_ids() == [fresh[0]["SnapshotId"]]
    assert {k: v for k, v in solo.mutations().items() if k != "DeleteSnapshot"} == {
        k: v for k, v in before.items() if k != "DeleteSnapshot"
    }
    # And the one after that does nothing at all.
    before = solo.mutations()
    _run(solo)
    assert solo.mutations() == before
    assert len(solo.amis()) == 1 and _tests_requested(solo.recorder) == [image["ImageId"]]


def test_completed_snapshot_without_ami_resumes_without_uploading(solo: World) -> None:
    sid = solo.completed()
    solo.later(PAST_GRACE)
    starts_before = len(solo.aws.calls("StartSnapshot", STAGING))
    _, restaged = _run(solo)
    assert [o.action for o in restaged] == ["staged"]
    assert len(solo.aws.calls("StartSnapshot", STAGING)) == starts_before
    assert solo.server.hits_of(solo.image().path) == 0  # not even downloaded
    (register,) = solo.aws.calls("RegisterImage", STAGING)
    assert register["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"] == sid
    snap_tags = tags.as_dict(solo.snapshots()[0]["Tags"])
    assert snap_tags[tags.RESUMED] == "1"
    # The resume was counted (CreateTags) before the AMI was registered.
    sent = [(op, p) for _, op, p in solo.aws.sent if op in ("CreateTags", "RegisterImage")]
    counted = [
        n
        for n, (op, p) in enumerate(sent)
        if op == "CreateTags" and {"Key": tags.RESUMED, "Value": "1"} in p["Tags"]
    ]
    registered = [n for n, (op, _) in enumerate(sent) if op == "RegisterImage"]
    assert len(counted) == 1 and counted[0] < registered[0]
    assert len(_tests_requested(solo.recorder)) == 1


def test_an_image_url_no_longer_served_still_resumes_from_its_snapshot(world: World) -> None:
    moved = {tags.IMAGE_URL: f"{world.server.base_url}/elsewhere/{world.image().image_name}"}
    world.completed(**moved)
    world.later(PAST_GRACE)
    outcomes, restaged = _run(world)
    assert [o.action for o in restaged] == ["staged"]  # from the snapshot: no download
    assert not world.server.hits
    assert world.image("aarch64").image_name not in outcomes
    assert len(world.amis()) == 1


def test_untagged_ami_is_adopted_not_registered_again(solo: World) -> None:
    solo.completed()
    orphan = solo.untagged_ami()
    solo.later(PAST_GRACE)
    registered = len(solo.aws.calls("RegisterImage", STAGING))
    _, restaged = _run(solo)
    assert [o.action for o in restaged] == ["staged"]
    assert orphan in restaged[0].detail
    assert len(solo.aws.calls("RegisterImage", STAGING)) == registered
    assert [i["ImageId"] for i in solo.amis()] == [orphan]
    found = solo.tags_of(orphan)
    assert found[tags.STATE] == "testing" and found[tags.SHA256] == solo.image().sha256
    assert _tests_requested(solo.recorder) == [orphan]
    uploads = [b["status"] for b in solo.recorder.bodies("fedimg.image.upload")]
    assert uploads == ["completed"]
    assert solo.aws.calls("DeleteSnapshot", STAGING) == []  # the AMI's snapshot stays


def test_leftovers_within_the_grace_period_or_being_staged_are_left_alone(world: World) -> None:
    partial = world.half_written()
    world.completed("aarch64")
    orphan = world.untagged_ami("aarch64")
    before = world.mutations()
    _, restaged = _run(world)
    assert len(restaged) == 2 and not any(o.failed for o in restaged)
    assert world.mutations() == before
    assert world.tags_of(orphan) == {}  # not adopted yet either: its hub may be alive

    world.later(PAST_GRACE)
    busy_sha = world.image().sha256
    with Guard(world.state_dir).hold(f"image-{busy_sha}") as got:  # another process has it
        assert got
        _, restaged = _run(world)
    assert not any(o.failed for o in restaged)
    assert world.snapshot_ids() == [partial]
    assert world.mutations() == before
    # The lock is per image: the other one was adopted meanwhile.
    assert world.tags_of(orphan)[tags.STATE] == "testing"


def test_a_leftover_left_alone_is_not_reported_as_staged(world: World) -> None:
    world.half_written()
    _, restaged = _run(world)
    assert [o.action for o in restaged] != ["staged"]


def test_gives_up_after_max_resumes(solo: World) -> None:
    sid = solo.completed(**{tags.RESUMED: "3"})
    solo.later(PAST_GRACE)
    _, restaged = _run(solo)
    assert [o.action for o in restaged] == ["error"]
    assert restaged[0].failed
    assert solo.snapshots() == [] and solo.amis() == []
    assert [c["SnapshotId"] for c in solo.aws.calls("DeleteSnapshot", STAGING)] == [sid]
    assert solo.aws.calls("RegisterImage", STAGING) == []
    failed = [b for b in solo.recorder.bodies("fedimg.image.upload") if b["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["image_name"] == solo.image().image_name
    # Nothing left: the next pass has nothing to give up on again.
    before = solo.mutations()
    _, restaged = _run(solo)
    assert restaged == [] and solo.mutations() == before


def test_an_untagged_ami_is_adopted_even_after_max_resumes(solo: World) -> None:
    solo.completed(**{tags.RESUMED: "3"})
    orphan = solo.untagged_ami()
    solo.later(PAST_GRACE)
    _, restaged = _run(solo)
    assert [o.action for o in restaged] == ["staged"]
    assert solo.tags_of(orphan)[tags.STATE] == "testing"
    assert solo.aws.calls("DeregisterImage", STAGING) == []


def test_leftover_beside_a_promoted_image_is_deleted_and_never_published(world: World) -> None:
    sid = world.completed()
    ami_id = world.tagged_ami()
    partial = world.half_written()
    world.results.add(ami_id, TESTCASE, "PASSED")
    world.later(PAST_GRACE)
    registered = len(world.aws.calls("RegisterImage", STAGING))
    outcomes, _ = _run(world)
    assert outcomes[ami_id].startswith("release")
    assert world.tags_of(ami_id)[tags.STATE] == "released"
    published = [c["SnapshotId"] for c in world.aws.calls("ModifySnapshotAttribute", STAGING)]
    assert sid in published and partial not in published  # (moto adds a made-up one too)
    assert world.snapshot_ids() == [sid]
    assert [c["SnapshotId"] for c in world.aws.calls("DeleteSnapshot", STAGING)] == [partial]
    assert len(world.amis()) == 1
    assert len(world.aws.calls("RegisterImage", STAGING)) == registered


def test_unusable_tags_are_reported_and_nothing_is_deleted(world: World) -> None:
    bad = world.half_written(**{tags.IMAGE_URL: "https://elsewhere.example/x.raw.xz"})
    world.later(PAST_GRACE)
    before = world.mutations()
    outcomes, restaged = _run(world)
    # Its image is found (any host), but a new upload would download from a
    # host no longer allowed: an error every pass, and nothing is done.
    assert [o.action for o in restaged] == ["error"] and "not downloading" in restaged[0].detail
    assert world.mutations() == before
    assert world.aws.calls("DeleteSnapshot", STAGING) == []
    assert bad in world.snapshot_ids()
    # Tags that do not even name an image: an error too, nothing touched.
    garbage = world.half_written("aarch64", **{tags.ARCH: "sparc"})
    before = world.mutations()
    outcomes, restaged = _run(world)
    assert outcomes[garbage].startswith("error: unusable tags")
    assert [o.action for o in restaged] == ["error"]  # reported every pass
    assert world.mutations() == before


def test_a_host_no_longer_allowed_does_not_matter_while_nothing_needs_staging(
    world: World,
) -> None:
    world.completed(**{tags.IMAGE_URL: "https://elsewhere.example/x.raw.xz"})
    ami_id = world.tagged_ami()
    world.later(PAST_GRACE)
    outcomes, restaged = _run(world)
    assert set(outcomes) == {ami_id} and outcomes[ami_id].startswith(("wait", "retest"))
    assert not any(o.failed for o in restaged)


def test_with_stage_disabled_only_amis_are_reconciled(world: World) -> None:
    world.half_written()
    ami_id = world.tagged_ami("aarch64")
    engine = world.engine()
    engine.intents.record(Intent(COMPOSE, world.server.url, "40"))
    world.later(PAST_GRACE)
    before = world.mutations()
    report = engine.reconcile(stage=False)
    assert [o.resource for o in report.outcomes] == [ami_id] and report.stages == {}
    assert world.mutations() == before
    assert engine.intents.compose_ids() == [COMPOSE]  # kept for a pass that stages
    assert not world.server.hits  # the compose was not even read


def test_aws_refusing_the_listings_is_an_error_outcome_not_a_crash(world: World) -> None:
    world.aws.faults[(STAGING, "DescribeImages")] = ["*UnauthorizedOperation"]
    world.aws.faults[(STAGING, "DescribeSnapshots")] = ["*UnauthorizedOperation"]
    report = world.engine().reconcile()
    assert [(o.resource, o.action) for o in report.outcomes] == [
        ("amis", "error"),
        ("snapshots", "error"),
    ]


# -- the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def cli(world: World, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``cli_reconcile`` builds its engine on the world; returns the printed lines."""
    monkeypatch.setattr(Engine, "from_config", classmethod(lambda cls, *a, **k: world.engine()))
    return []


def test_cli_reconcile_prints_every_outcome_and_fails_on_errors(
    world: World, cli: list[str]
) -> None:
    world.completed()
    ami_id = world.tagged_ami("aarch64")
    world.results.add(ami_id, TESTCASE, "PASSED")
    world.later(PAST_GRACE)
    assert cli_reconcile(world.cfg, Emitter(world.recorder), cli.append) == 0
    by_resource = dict(line.split("\t", 1) for line in cli)
    name = world.image().image_name
    assert set(by_resource) == {ami_id, name}
    assert by_resource[ami_id].startswith("release")
    assert by_resource[name].startswith("staged: gp3 ami-")  # it waited for the restage

    # A restage that fails makes the run fail, and keeps the snapshot to resume from.
    bad = world.completed("aarch64")
    world.aws.faults[(STAGING, "RegisterImage")] = ["*UnauthorizedOperation"]
    for image in world.amis():
        world.ec2.deregister_image(ImageId=image["ImageId"])
    cli.clear()
    assert cli_reconcile(world.cfg, Emitter(world.recorder), cli.append) == 1
    assert any(line.split("\t")[1].startswith("error") for line in cli), cli
    assert bad in world.snapshot_ids("aarch64")


def test_cli_reconcile_gates_and_prints(world: World, cli: list[str]) -> None:
    ami_id = world.tagged_ami()
    world.results.add(ami_id, TESTCASE, "FAILED")
    assert cli_reconcile(world.cfg, Emitter(world.recorder), cli.append) == 0
    assert len(cli) == 1 and cli[0].startswith(f"{ami_id}\treject")
    assert world.tags_of(ami_id)[tags.STATE] == "rejected"


def test_cli_reconcile_fails_when_aws_refuses_the_listings(world: World, cli: list[str]) -> None:
    world.aws.faults[(STAGING, "DescribeImages")] = ["*UnauthorizedOperation"]
    world.aws.faults[(STAGING, "DescribeSnapshots")] = ["*UnauthorizedOperation"]
    assert cli_reconcile(world.cfg, Emitter(world.recorder), cli.append) == 1
    assert [line.split("\t")[0] for line in cli] == ["amis", "snapshots"]


def test_cli_reconcile_with_nothing_to_do(world: World, cli: list[str]) -> None:
    assert cli_reconcile(world.cfg, Emitter(world.recorder), cli.append) == 0
    assert cli == [] and world.recorder.sent == []
