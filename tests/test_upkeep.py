"""Prune and public-access audit against moto in process, 5 regions: what remains, what is sent.

The synthetic history of ``tests/test_prune.py`` (6 composes x 3 images x 5
regions) is registered in moto; ``Engine.prune`` observes it, plans, and with
``apply`` removes. Every EC2 request the engine sends is recorded (botocore's
``provide-client-params`` hook) and a guard on ``DeleteSnapshot`` checks, at
the moment of every deletion, that no registered image uses the snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from fedimg import tags
from fedimg.aws import AwsClients
from fedimg.config import ConfigError, FedimgConfig
from fedimg.engine import Engine
from fedimg.messages import IMAGE_DELETE, Emitter
from fedimg.prune import PRUNING
from fedimg.tags import State
from tests.conftest import Recorder
from tests.engine_support import make_engine
from tests.faults import THROTTLED, inject, quick_retries
from tests.test_prune import COMPOSES, KEPT_COMPOSES, NOW, REGIONS, STAGING, Spec, history

SESSION = boto3.session.Session()
FOREIGN = "ForeignImage"


def settings(state_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "fedimg.resultsdb_url": "http://resultsdb.test/api/v2.0",
        "fedimg.aws.staging_region": STAGING,
        "fedimg.aws.regions": [r for r in REGIONS if r != STAGING],
        "fedimg.state_dir": str(state_dir),
        "fedimg.prune.keep": 1,
        "fedimg.prune.nightly_days": 14,
        "fedimg.prune.eol": {"40": "2024-11-12"},
        **extra,
    }


@dataclass
class World:
    engine: Engine
    aws: AwsClients
    recorder: Recorder
    compose_of: dict[tuple[str, str], str] = field(default_factory=dict)  # (region, ami)
    snapshot_of: dict[tuple[str, str], str] = field(default_factory=dict)  # (region, ami)
    foreign: set[tuple[str, str]] = field(default_factory=set)  # tag-less AMIs and snapshots
    ours: set[tuple[str, str]] = field(default_factory=set)  # snapshots built (not moto's own)
    clients: dict[str, Any] = field(default_factory=dict)
    sent: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def client(self, region: str) -> Any:
        """The test's own client (not recorded)."""
        if region not in self.clients:
            self.clients[region] = SESSION.client("ec2", region_name=region)
        return self.clients[region]

    def calls(self, op: str) -> list[tuple[str, dict[str, Any]]]:
        return [(r, p) for r, o, p in self.sent if o == op]

    def images(self) -> set[tuple[str, str]]:
        """Every AMI registered, as moto holds them."""
        return {(region, ami) for region in REGIONS for ami in _backend(region).amis}

    def snapshots(self) -> set[tuple[str, str]]:
        """The snapshots the test built that still exist (moto's own for each AMI left out)."""
        return {
            (region, snap) for region in REGIONS for snap in _backend(region).snapshots
        } & self.ours


def _backend(region: str) -> Any:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    return ec2_backends[DEFAULT_ACCOUNT_ID][region]


def _snapshot(region: str, values: dict[str, str]) -> str:
    backend = _backend(region)
    volume = backend.create_volume(size=1, zone_name=f"{region}a")
    snap = str(backend.create_snapshot(volume.id, "").id)
    backend.delete_volume(volume.id)
    if values:
        backend.create_tags([snap], values)
    return snap


def _register(region: str, name: str, values: dict[str, str]) -> str:
    """moto's RegisterImage ignores the block device mappings (it makes its own
    snapshot): the AMI's own snapshot is found by its tags, as ``fedimg.observe`` does."""
    ami = str(_backend(region).register_image(name, "").id)
    if values:
        _backend(region).create_tags([ami], values)
    return ami


def build(world: World, specs: list[Spec], *, public: bool = False) -> None:
    """Register ``specs`` (staging AMIs first), and a tag-less AMI in two regions.

    Built in moto's backend directly (the API is for the code under test: ~40x faster).
    """
    sources: dict[str, str] = {}
    for n, spec in enumerate(specs):
        values = spec.tags(sources.get(spec.key, ""))
        snap = _snapshot(spec.region, values)
        ami = _register(spec.region, f"{spec.key}-{n}", values)
        if not spec.is_copy:
            sources[spec.key] = ami
        world.compose_of[spec.region, ami] = spec.compose_id
        world.snapshot_of[spec.region, ami] = snap
        world.ours.add((spec.region, snap))
        if public:
            ec2 = world.client(spec.region)
            ec2.modify_image_attribute(ImageId=ami, LaunchPermission={"Add": [{"Group": "all"}]})
            ec2.modify_snapshot_attribute(
                SnapshotId=snap,
                Attribute="createVolumePermission",
                OperationType="add",
                GroupNames=["all"],
            )
    for region in (STAGING, "eu-west-1"):
        snap = _snapshot(region, {})
        ami = _register(region, f"{FOREIGN}-{region}", {})
        world.foreign |= {(region, ami), (region, snap)}
        world.ours.add((region, snap))


def _record(world: World) -> None:
    """Record every EC2 request of the engine; check every DeleteSnapshot as it is sent."""
    for region in REGIONS:

        def hook(params: dict[str, Any], model: Any, region: str = region, **_: Any) -> None:
            world.sent.append((region, model.name, dict(params)))
            if model.name == "DeleteSnapshot":
                snap = params["SnapshotId"]
                registered = _backend(region).amis  # moto's state at this very moment
                for (where, ami), its_snap in world.snapshot_of.items():
                    if its_snap == snap and where == region and ami in registered:
                        world.violations.append(f"{snap} of registered {ami} in {region}")

        world.aws.ec2(region).meta.events.register("provide-client-params.ec2.*", hook)


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[World]:
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    with mock_aws():
        quick_retries(monkeypatch)
        cfg = FedimgConfig.from_fedmsg(settings(tmp_path))
        aws = AwsClients(max_attempts=2, session=SESSION)
        recorder = Recorder()
        engine = make_engine(cfg, Emitter(recorder), aws, tmp_path, now=lambda: NOW)
        found = World(engine, aws, recorder)
        _record(found)
        try:
            yield found
        finally:
            engine.close()


def _composes(world: World, pairs: set[tuple[str, str]]) -> set[str]:
    return {world.compose_of[p] for p in pairs if p in world.compose_of}


def test_the_synthetic_history_pruned_keeps_exactly_the_policy_and_dry_run_equals_apply(
    world: World,
) -> None:
    build(world, history())
    before_images, before_snaps = world.images(), world.snapshots()
    assert len(before_images) == 6 * 3 * 5 + 2

    dry = world.engine.prune(apply=False)
    assert dry.plan is not None and dry.complete
    assert world.images() == before_images and world.snapshots() == before_snaps
    mutating = {"CreateTags", "DeregisterImage", "DeleteSnapshot", "ModifyImageAttribute"}
    assert not [o for _, o, _ in world.sent if o in mutating]
    assert _composes(world, dry.plan.kept()) == KEPT_COMPOSES

    applied = world.engine.prune(apply=True)
    assert applied.plan == dry.plan  # the same plan, from the same world
    assert applied.complete and set(applied.removed) == dry.plan.removed()

    kept = dry.plan.kept()
    assert world.images() == kept | {p for p in world.foreign if p[1].startswith("ami-")}
    assert _composes(world, world.images()) == KEPT_COMPOSES
    kept_snaps = {(r, world.snapshot_of[r, a]) for r, a in kept}
    assert world.snapshots() == kept_snaps | {p for p in world.foreign if p[1].startswith("snap")}
    # What was sent: exactly the planned AMIs deregistered and their snapshots deleted.
    deregistered = {(r, p["ImageId"]) for r, p in world.calls("DeregisterImage")}
    assert deregistered == dry.plan.removed()
    deleted = {(r, p["SnapshotId"]) for r, p in world.calls("DeleteSnapshot")}
    assert deleted == {(r, world.snapshot_of[r, a]) for r, a in dry.plan.removed()}
    for region, params in world.calls("CreateTags"):
        assert {t["Key"] for t in params["Tags"]} == {PRUNING}
        assert (region, params["Resources"][0]) in dry.plan.removed()
    assert not world.violations
    # Each removal announced, in the contract.
    bodies = world.recorder.bodies("fedimg.image.delete")
    assert {(b["destination"], b["extra"]["id"]) for b in bodies} == dry.plan.removed()
    assert len(bodies) == len(dry.plan.removals)
    for body in bodies:
        IMAGE_DELETE.validate(body)
        assert body["snapshots"] == [world.snapshot_of[body["destination"], body["extra"]["id"]]]
    # (A run after this plans nothing: the throttling test ends with one.)


@pytest.mark.parametrize(
    ("operation", "after"),
    [("DeleteSnapshot", 1), ("DeregisterImage", 1)],
)
def test_throttling_mid_prune_stops_it_and_the_next_run_finishes_it(
    world: World, operation: str, after: int
) -> None:
    """Throttled past botocore's retries on the Nth call in one region; then not."""
    build(world, [s for s in history() if s.key.endswith("#0")])  # one image per compose
    plan = world.engine.prune(apply=False).plan
    assert plan is not None
    region = "us-west-2"
    count = {"n": 0}

    def nth(_: dict[str, Any]) -> bool:
        count["n"] += 1
        return count["n"] > after

    fault = inject(world.aws.ec2(region), operation, THROTTLED, times=None, when=nth)
    stopped = world.engine.prune(apply=True)
    assert not stopped.complete and stopped.error.startswith("RequestLimitExceeded")
    assert fault.hits >= 2  # botocore's own attempts were throttled too
    assert 0 < len(stopped.removed) < len(plan.removals)
    assert not world.violations
    fault.times = fault.hits  # the throttling ends

    finished = world.engine.prune(apply=True)
    assert finished.complete, finished.error
    assert world.images() == plan.kept() | {p for p in world.foreign if p[1].startswith("ami")}
    kept_snaps = {(r, world.snapshot_of[r, a]) for r, a in plan.kept()}
    assert world.snapshots() == kept_snaps | {p for p in world.foreign if p[1].startswith("snap")}
    assert not world.violations
    announced = {
        (b["destination"], b["extra"]["id"]) for b in world.recorder.bodies("fedimg.image.delete")
    }
    assert announced == plan.removed()
    idle = world.engine.prune(apply=False).plan
    assert idle is not None and idle.idle


def test_tag_less_images_are_never_seen_nor_touched(world: World) -> None:
    """Only tag-less AMIs in the account (and fedimg's rejected, kept for inspection)."""
    build(world, [])
    spec = Spec(STAGING, "Fedora-41-20240101.n.0", "41", "Cloud_Base", "x86_64", NOW, "r#0")
    rejected = Spec(**{**spec.__dict__, "state": State.REJECTED})
    build(world, [rejected])
    before = world.images() | world.snapshots()
    run = world.engine.prune(apply=True)
    assert run.complete and run.plan is not None and run.plan.idle
    assert world.images() | world.snapshots() == before
    seen = {a for v in run.plan.verdicts for _, a in v.amis}
    assert not seen & {ami for _, ami in world.foreign}
    mutating = {"CreateTags", "DeregisterImage", "DeleteSnapshot"}
    assert not [o for _, o, _ in world.sent if o in mutating]


def test_a_second_pruner_is_turned_away_while_one_prunes(world: World) -> None:
    build(world, history()[:10])
    with world.engine.guard.hold("prune") as got:
        assert got
        run = world.engine.prune(apply=True)
    assert run.busy and run.plan is None
    assert not world.sent


# -- the public-access audit ---------------------------------------------------------------


def test_the_audit_reports_what_aws_made_private_and_fixes_it_by_setting(world: World) -> None:
    from fedimg.engine import cli_audit

    specs = [s for s in history() if s.compose_id == "Fedora-Cloud-41-20241125.n.1"]
    build(world, specs, public=True)
    testing = Spec(**{**specs[0].__dict__, "key": "t#0", "state": State.TESTING})
    build(world, [testing])  # private, and rightly: never audited
    by_region = {r: a for (r, a), c in world.compose_of.items() if c == specs[0].compose_id}
    image_gone = ("eu-west-1", sorted(a for (r, a) in world.compose_of if r == "eu-west-1")[0])
    snap_gone = ("ap-south-1", sorted(a for (r, a) in world.compose_of if r == "ap-south-1")[0])
    assert by_region
    world.client(image_gone[0]).modify_image_attribute(
        ImageId=image_gone[1], LaunchPermission={"Remove": [{"Group": "all"}]}
    )
    world.client(snap_gone[0]).modify_snapshot_attribute(
        SnapshotId=world.snapshot_of[snap_gone],
        Attribute="createVolumePermission",
        OperationType="remove",
        GroupNames=["all"],
    )

    report = world.engine.audit(fix=False)
    assert {(e.region, e.ami_id) for e in report.exposures} == {image_gone, snap_gone}
    found = {(e.region, e.ami_id): e for e in report.exposures}
    assert found[image_gone].image_private and not found[image_gone].private_snapshots
    assert not found[snap_gone].image_private
    assert found[snap_gone].private_snapshots == (world.snapshot_of[snap_gone],)
    assert not report.fixed and not report.clean
    assert not world.calls("ModifyImageAttribute") and not world.calls("ModifySnapshotAttribute")

    fixed = world.engine.audit(fix=True)
    assert set(fixed.fixed) == {image_gone, snap_gone} and fixed.clean
    launch = {(r, p["ImageId"]) for r, p in world.calls("ModifyImageAttribute")}
    assert launch == {image_gone, snap_gone}
    for _, params in world.calls("ModifyImageAttribute"):
        assert params["LaunchPermission"] == {"Add": [{"Group": "all"}]}
    shared = {(r, p["SnapshotId"]) for r, p in world.calls("ModifySnapshotAttribute")}
    assert shared == {(r, world.snapshot_of[r, a]) for r, a in (image_gone, snap_gone)}
    for _, params in world.calls("ModifySnapshotAttribute"):
        assert params["GroupNames"] == ["all"] and params["OperationType"] == "add"

    printed: list[str] = []
    assert cli_audit(world.engine.cfg, Emitter(Recorder()), False, printed.append) == 0
    assert printed == ["every released AMI is public in every region"]


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("fedimg.prune.keep", 0),
        ("fedimg.prune.keep", "3"),
        ("fedimg.prune.nightly_days", -1),
        ("fedimg.prune.eol", {"40": "12 November 2024"}),
        ("fedimg.prune.eol", {"40": 20241112}),
        ("fedimg.prune.eol", ["40"]),
        ("fedimg.prune.interval", -5),
        ("fedimg.audit.interval", "hourly"),
        ("fedimg.audit.fix", "yes"),
    ],
)
def test_bad_prune_and_audit_settings_fail_naming_the_key(
    tmp_path: Path, key: str, value: Any
) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        FedimgConfig.from_fedmsg({**settings(tmp_path), key: value})


def test_prune_settings_become_the_policy(tmp_path: Path) -> None:
    from datetime import date, timedelta

    from fedimg.upkeep import prune_policy_of

    cfg = FedimgConfig.from_fedmsg(
        {**settings(tmp_path), "fedimg.prune.keep": 2, "fedimg.gate.delete_rejected": True}
    )
    policy = prune_policy_of(cfg)
    assert policy.keep == 2 and policy.delete_rejected
    assert policy.nightly_age == timedelta(days=14)
    assert policy.eol == {"40": date(2024, 11, 12)}


# -- the command line -------------------------------------------------------------------------


def test_status_by_stream_and_the_prune_command_show_the_plan(
    world: World, tmp_path: Path, recorder: Recorder
) -> None:
    import io

    from fedimg.engine import cli_prune
    from fedimg.status import cli_status

    build(world, [s for s in history() if s.key.endswith("#0")])
    cfg = world.engine.cfg
    out = io.StringIO()
    assert cli_status(cfg, by_stream=True, out=out, aws=world.aws, now=NOW) == 0
    lines = out.getvalue().splitlines()
    assert [ln for ln in lines if ln.startswith("stream ")] == [
        "stream 40/Cloud_Base/x86_64/production/gp3",
        "stream 41/Cloud_Base/x86_64/nightly/gp3",
    ]
    verdicts = {ln.split()[1]: ln.split()[0] for ln in lines if ln.startswith("  ")}
    assert verdicts == {c: ("keep" if c in KEPT_COMPOSES else "remove") for c, _, _ in COMPOSES}
    before = world.images()

    printed: list[str] = []
    assert cli_prune(cfg, Emitter(recorder), False, printed.append) == 0
    assert world.images() == before and not recorder.sent
    assert "dry run" in printed[-1] and "to remove, in this order:" in printed[0]


# -- the periodic runs: fedora-messaging thread, moksha producer -------------------------------


@dataclass
class AfterReleaseEngine:
    """The engine as the periodic runs use it: what they asked, recorded."""

    pruned: list[bool] = field(default_factory=list)
    audited: list[bool] = field(default_factory=list)
    passes: list[bool] = field(default_factory=list)
    closed: bool = False

    def prune(self, *, apply: bool) -> None:
        self.pruned.append(apply)

    def audit(self, *, fix: bool) -> None:
        self.audited.append(fix)

    def reconcile(self, *, stage: bool = True) -> None:
        self.passes.append(stage)

    def close(self) -> None:
        self.closed = True


def test_the_consumer_prunes_and_audits_every_interval_once_it_runs(tmp_path: Path) -> None:
    from fedimg.amqp import AUDIT, PRUNE, FedimgConsumer
    from tests.test_amqp_callbacks import PREFIX, msg, sample_settings

    engine = AfterReleaseEngine()
    started: list[Any] = []
    recorder = Recorder()
    config = {
        **sample_settings("fedimg.toml"),
        "fedimg.state_dir": str(tmp_path),
        "fedimg.prune.interval": 0.01,
        "fedimg.audit.interval": 0.01,
        "fedimg.audit.fix": True,
    }
    consumer = FedimgConsumer(
        {"topic_prefix": PREFIX, "consumer_config": config},
        publisher=recorder,
        engine=engine,  # type: ignore[arg-type]
        start=started.append,
    )
    try:
        assert engine.pruned == [] and engine.audited == []  # nothing before the reactor runs
        assert len(started) == 3  # reconcile, prune, audit
        for start in started:
            start()
        assert consumer.periodic[PRUNE].wait_runs(2, timeout=30)
        assert consumer.periodic[AUDIT].wait_runs(2, timeout=30)
        assert set(engine.pruned) == {True} and set(engine.audited) == {True}
        consumer(msg("fedimg.hub.ping", {"token": "t"}))
        [pong] = recorder.bodies("fedimg.hub.pong")
        assert pong["components"][PRUNE] == "running" and pong["components"][AUDIT] == "running"
    finally:
        consumer.close()


def test_without_intervals_the_consumer_neither_prunes_nor_audits(tmp_path: Path) -> None:
    from tests.test_amqp_callbacks import fedimg_consumer

    consumer, _ = fedimg_consumer(tmp_path, AfterReleaseEngine())  # type: ignore[arg-type]
    assert consumer.periodic == {}


class FakeHub:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config


@pytest.mark.parametrize("which", ["prune", "audit"])
def test_the_hub_producers_are_off_at_0_and_run_the_engine_when_set(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moksha.hub.reactor

    from fedimg.consumers import AuditProducer, PruneProducer

    started: list[Any] = []
    monkeypatch.setattr(moksha.hub.reactor.reactor, "callInThread", started.append)
    cls = PruneProducer if which == "prune" else AuditProducer
    key = f"fedimg.{which}.interval"
    off = cls(FakeHub({**settings(tmp_path), key: 0.0}))
    assert not getattr(off, "_initialized", False) and started == []

    on = cls(FakeHub({**settings(tmp_path), key: 3600.0, "fedimg.audit.fix": True}))
    assert on.frequency == 3600.0 and on.now is True
    engine = AfterReleaseEngine()
    on.lifecycle = engine
    on.poll()
    assert (engine.pruned, engine.audited) == (([True], []) if which == "prune" else ([], [True]))

    def broken(**_: Any) -> None:
        raise RuntimeError("AWS fell over")

    monkeypatch.setattr(engine, which, broken)
    on.poll()  # logged, never raised: the hub goes on


def test_a_bad_interval_stops_the_producer_naming_the_key(tmp_path: Path) -> None:
    from fedimg.consumers import PruneProducer

    with pytest.raises(ConfigError, match=r"fedimg\.prune\.keep"):
        PruneProducer(
            FakeHub({**settings(tmp_path), "fedimg.prune.interval": 60.0, "fedimg.prune.keep": 0})
        )
    assert "fedimg.prune.keep" in PruneProducer.start_error
    PruneProducer.start_error = ""


# -- IAM: what prune and the audit need, and nothing else ---------------------------------------


def test_the_policy_lets_prune_remove_only_what_it_marked_first() -> None:
    from tests.test_iam_policy_integration import ALLOWED, DENIED, PUBLIC, STAGED, _check

    released = {**STAGED, tags.STATE: "released", PUBLIC: "true"}
    copy = {tags.COMPOSE_ID: "c", tags.SOURCE_AMI: "ami-1", PUBLIC: "true"}
    for resource in (released, copy):
        assert _check("fedimg", "ec2:DeregisterImage", "image", resource_tags=resource) == DENIED
        marked = {**resource, PRUNING: "ami-1"}
        assert _check("fedimg", "ec2:DeregisterImage", "image", resource_tags=marked) == ALLOWED
    snapshot = {**STAGED, tags.STATE: "released"}
    assert _check("fedimg", "ec2:DeleteSnapshot", "snapshot", resource_tags=snapshot) == DENIED
    marked_snapshot = {**snapshot, PRUNING: "ami-1"}
    assert (
        _check("fedimg", "ec2:DeleteSnapshot", "snapshot", resource_tags=marked_snapshot) == ALLOWED
    )
    # The mark itself is a fedimg tag on a fedimg resource.
    assert (
        _check(
            "fedimg",
            "ec2:CreateTags",
            "image",
            resource_tags=released,
            extra={"aws:tagkeys": (PRUNING,)},
        )
        == ALLOWED
    )
