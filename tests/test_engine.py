"""The engine's executor against moto in process: durable intents, give-ups, two engines at once.

A generated compose is served over loopback (``devel.compose``) and AWS is
moto in process, as in ``tests/test_stage.py``. "The hub dies" is a
``BaseException`` raised from a botocore hook at a chosen call, after which
every AWS call raises too (the world stops, as when the process is killed:
nothing the dead engine would have done afterwards happens). A NEW engine on
the same state directory then runs ``reconcile()`` -- no message is replayed
-- and must finish the compose. The engines' clock is a number moved by the
test ("three hours later"), never a sleep.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from moto import mock_aws

from devel.compose import (
    BuiltImage,
    ComposeServer,
    ComposeTree,
    ImageSpec,
    build_compose,
    compose_message,
)
from fedimg import tags
from fedimg.aws import AwsClients
from fedimg.engine import Engine
from fedimg.intents import Intent, IntentStore
from fedimg.messages import Emitter, parse_compose_status
from fedimg.stage import StageOutcome
from tests.engine_support import make_engine
from tests.test_ami import capture
from tests.test_stage import Crash, Env, config

HOUR = timedelta(hours=1)
# Later than the grace period (2 h: leftovers are fair game) and earlier than retest_after
# (3 h: the AMIs staged meanwhile are not asked to test again, whatever the real clock did).
PAST_GRACE = timedelta(hours=2, minutes=30)
DEADLINE = 60.0  # seconds any wait in these tests may take; never reached when things work
COMPOSE = "Fedora-40-20240601.0"
SPECS = (
    ImageSpec("Cloud", "x86_64", "Cloud_Base", raw_mib=2, data_blocks=(0, 2), seed=21),
    ImageSpec("Cloud", "aarch64", "Cloud_Base", raw_mib=2, data_blocks=(1,), seed=22),
    ImageSpec("AtomicHost", "x86_64", "AtomicHost", raw_mib=2, data_blocks=(3,), seed=23),
)
VOLS = ("gp3", "gp2")


@dataclass
class World(Env):
    """test_stage's Env with a clock the test moves: engines see ``now``, moto sees real time."""

    now: datetime = datetime.min
    sent: dict[str, list[dict[str, Any]]] | None = None

    def watch(self) -> None:
        """Record what every engine SENDS for the calls that create or destroy."""
        self.sent = {
            "StartSnapshot": capture(self.ebs, "StartSnapshot"),
            "PutSnapshotBlock": capture(self.ebs, "PutSnapshotBlock"),
            "RegisterImage": capture(self.ec2, "RegisterImage"),
            "DeleteSnapshot": capture(self.ec2, "DeleteSnapshot"),
            "DeregisterImage": capture(self.ec2, "DeregisterImage"),
        }

    def calls(self, operation: str) -> list[dict[str, Any]]:
        assert self.sent is not None
        return self.sent[operation]

    def counts(self) -> dict[str, int]:
        assert self.sent is not None
        return {op: len(calls) for op, calls in self.sent.items()}

    def later(self, delta: timedelta) -> None:
        self.now += delta

    def clock(self) -> datetime:
        return self.now

    def engine(self, publish: Any = None, available_timeout: float = 5.0, **kw: Any) -> Engine:
        """A new engine (a restarted hub: nothing shared but AWS and the state directory)."""
        settings = {"volume_types": list(VOLS), "stage_workers": 1, **kw}
        built = make_engine(
            config(state_dir=str(self.state_dir), **settings),
            Emitter(publish or self.recorder),
            self.aws,
            self.state_dir,
            now=self.clock,
            available_timeout=available_timeout,
            poll_interval=0.05,
        )
        self.engines.append(built)
        return built

    @property
    def intents(self) -> IntentStore:
        return IntentStore(self.state_dir)

    def staging_amis(self) -> Counter[tuple[str, str]]:
        """(image name, volume type) -> how many AMIs of ours carry them."""
        found: Counter[tuple[str, str]] = Counter()
        for image in self.images():
            values = tags.as_dict(image.get("Tags"))
            found[(values.get(tags.IMAGE_NAME, "?"), values.get(tags.VOL_TYPE, "?"))] += 1
        return found

    def every_image_staged_once(self) -> None:
        expected = {(b.image_name, vol): 1 for b in self.tree.raw_images() for vol in VOLS}
        assert dict(self.staging_amis()) == expected
        for image in self.images():
            assert tags.state_of(image) is tags.State.TESTING
        asked = {b["extra"]["id"] for b in self.recorder.bodies("fedimg.image.test")}
        assert {i["ImageId"] for i in self.images()} <= asked  # every AMI's test requested

    def half_written(self, built: BuiltImage) -> str:
        """What a hub killed mid-upload of ``built`` left: a snapshot started, never finished."""
        started = self.ebs.start_snapshot(
            VolumeSize=1,
            Timeout=60,
            Tags=tags.as_list(
                {
                    tags.COMPOSE_ID: COMPOSE,
                    tags.IMAGE_NAME: built.image_name,
                    tags.IMAGE_URL: self.server.url_of(built.path),
                    tags.SHA256: built.sha256,
                    tags.ARCH: built.spec.arch,
                    tags.SUBVARIANT: built.spec.subvariant,
                    tags.STATE: "testing",
                }
            ),
        )
        return str(started["SnapshotId"])

    def snapshot_ids(self) -> set[str]:
        return {s["SnapshotId"] for b in self.tree.raw_images() for s in self.snapshots(b.sha256)}

    def snapshot_count(self) -> dict[str, int]:
        return {b.image_name: len(self.snapshots(b.sha256)) for b in self.tree.raw_images()}

    def uploads(self, image_name: str, status: str) -> int:
        return sum(
            1
            for b in self.recorder.bodies("fedimg.image.upload")
            if b["image_name"] == image_name and b["status"] == status
        )

    def reconcile(self, engine: Engine | None = None) -> list[str]:
        """One pass of a new engine, waiting for its stages; every outcome as text."""
        report = (engine or self.engine()).reconcile()
        done = report.wait(timeout=DEADLINE)
        return [f"{o.resource}\t{o.text}" for o in [*report.outcomes, *done]]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> ComposeTree:
    return build_compose(tmp_path_factory.mktemp("compose"), COMPOSE, SPECS)


@pytest.fixture
def world(
    tree: ComposeTree,
    recorder: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Iterator[World]:
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    with mock_aws(), ComposeServer(tree.root, stall_seconds=10) as server:
        w = World(
            tree,
            server,
            AwsClients(max_attempts=4),
            recorder,
            caplog,
            tmp_path / "state",
            now=datetime.now(UTC),
        )
        w.watch()
        yield w
        for built in w.engines:
            built.close()


class KillSwitch:
    """Kills "the process" at the ``nth`` call of ``operation``; every later AWS call dies too."""

    def __init__(self, world: World, operation: str, nth: int) -> None:
        self.operation, self.nth = operation, nth
        self.seen = 0
        self.dead = threading.Event()
        self.calls_at_death: int | None = None
        self._lock = threading.Lock()
        self.clients = [
            (world.ec2, "provide-client-params.ec2"),
            (world.ebs, "provide-client-params.ebs"),
        ]
        for client, event in self.clients:
            client.meta.events.register(event, self.hook)

    def hook(self, model: Any, **_: Any) -> None:
        with self._lock:
            if self.dead.is_set():
                raise Crash
            if model.name == self.operation:
                self.seen += 1
                if self.seen == self.nth:
                    self.dead.set()
                    raise Crash

    def disarm(self) -> None:
        for client, event in self.clients:
            client.meta.events.unregister(event, self.hook)


def _accept(world: World, engine: Engine) -> list[StageOutcome]:
    return engine.accept_compose(
        parse_compose_status(compose_message(world.tree, world.server.url))
    )


# -- durable intent: a kill at any point, then a restart with no message --------------------


# (operation, nth call, StartSnapshot calls SENT in all: one per image, plus the one
# the kill cut short or stopped on its way out)
KILLS = [
    pytest.param("StartSnapshot", 2, len(SPECS) + 1, id="second-image-never-started"),
    pytest.param("PutSnapshotBlock", 2, len(SPECS) + 1, id="mid-upload-of-the-first-image"),
    pytest.param("RegisterImage", 1, len(SPECS), id="uploaded-before-register"),
    pytest.param("RegisterImage", 2, len(SPECS), id="one-volume-type-registered"),
]


@pytest.mark.parametrize(("operation", "nth", "uploads"), KILLS)
def test_a_compose_killed_part_way_is_finished_by_a_new_engine_with_no_message(
    world: World, operation: str, nth: int, uploads: int
) -> None:
    switch = KillSwitch(world, operation, nth)
    with pytest.raises(Crash):
        _accept(world, world.engine())
    switch.disarm()
    assert switch.dead.is_set()
    assert world.intents.compose_ids() == [COMPOSE]  # the promise outlived the process
    left = world.staging_amis()
    assert sum(left.values()) < len(VOLS) * len(SPECS)  # really part-way
    traces = world.snapshot_ids()

    world.later(PAST_GRACE)  # past the grace period: nothing of the dead hub is "in flight"
    lines = world.reconcile()
    assert not [line for line in lines if "\terror" in line], lines
    world.every_image_staged_once()
    assert world.intents.compose_ids() == []  # every image reached an end state
    assert traces <= world.snapshot_ids()  # the pass that replaced them destroyed no trace

    # What the dead hub left half-written goes on the next pass, never before.
    world.reconcile()
    assert set(world.snapshot_count().values()) == {1}  # one snapshot per image, none leaked
    world.every_image_staged_once()
    # Each image was uploaded once (a trusted snapshot is registered from, not re-sent).
    assert len(world.calls("StartSnapshot")) == uploads
    # And a third pass has nothing left to change.
    before = world.counts()
    assert [line for line in world.reconcile() if "\terror" in line] == []
    assert world.counts() == before


def test_the_intent_is_on_disk_before_the_first_call_to_aws(world: World) -> None:
    seen: list[list[str]] = []

    def look(**_: Any) -> None:
        seen.append(world.intents.compose_ids())

    world.ec2.meta.events.register("provide-client-params.ec2.DescribeSnapshots", look)
    world.ebs.meta.events.register("provide-client-params.ebs.StartSnapshot", look)
    outcomes = _accept(world, world.engine())
    assert {o.status for o in outcomes} == {"staged"}
    assert seen and all(ids == [COMPOSE] for ids in seen)
    assert world.intents.compose_ids() == []  # dropped once every image was staged
    world.every_image_staged_once()


def test_an_intent_recorded_before_any_image_started_is_finished_by_the_pass(
    world: World,
) -> None:
    """Killed right after accepting: only the intent exists (not even the metadata read)."""
    world.intents.record(Intent(COMPOSE, world.server.url, "40", datetime.now(UTC).isoformat()))
    lines = world.reconcile()
    assert [line.split("\t")[0] for line in lines if "\tresumed" in line] == [COMPOSE]
    world.every_image_staged_once()
    assert world.intents.compose_ids() == []
    assert len(world.calls("StartSnapshot")) == len(SPECS)
    # A replayed message afterwards finds everything and uploads nothing.
    world.recorder.sent.clear()
    again = _accept(world, world.engine())
    assert {o.status for o in again} == {"existing"}
    assert len(world.calls("StartSnapshot")) == len(SPECS)
    assert world.intents.compose_ids() == []


def test_an_image_whose_stage_keeps_failing_is_given_up_after_max_attempts(
    world: World,
) -> None:
    arm = world.tree.raw_images()[1]
    world.server.missing(arm.path)
    outcomes = _accept(world, world.engine(stage_max_attempts=2))
    assert {o.status for o in outcomes if o.image_name == arm.image_name} == {"failed"}
    intent = world.intents.get(COMPOSE)
    assert intent is not None and intent.attempts[arm.sha256] == 1
    assert arm.sha256 not in intent.staged and len(intent.staged) == 2

    lines = world.reconcile(world.engine(stage_max_attempts=2))
    assert any("\terror" in line for line in lines)
    intent = world.intents.get(COMPOSE)
    assert intent is not None and intent.attempts[arm.sha256] == 2

    lines = world.reconcile(world.engine(stage_max_attempts=2))  # gives up, drops the intent
    assert any("\terror" in line for line in lines)
    assert world.intents.compose_ids() == []
    assert world.uploads(arm.image_name, "started") == 2 * len(VOLS)  # two attempts, no third
    assert world.uploads(arm.image_name, "failed") == 3 * len(VOLS)  # and the give-up
    downloads = world.server.hits_of(arm.path)

    # Given up is an end state: later passes leave it alone.
    before = world.counts()
    lines = world.reconcile(world.engine(stage_max_attempts=2))
    assert not [line for line in lines if "\terror" in line or arm.image_name in line], lines
    assert world.server.hits_of(arm.path) == downloads and world.counts() == before
    others = {(b.image_name, v): 1 for b in world.tree.raw_images() if b is not arm for v in VOLS}
    assert dict(world.staging_amis()) == others


def test_a_given_up_image_with_a_half_written_snapshot_is_not_staged_again(
    world: World,
) -> None:
    arm = world.tree.raw_images()[1]
    engine = world.engine(stage_max_attempts=2)
    world.intents.record(Intent(COMPOSE, world.server.url, "40", datetime.now(UTC).isoformat()))
    world.half_written(arm)
    world.server.missing(arm.path)
    world.later(PAST_GRACE)
    for _ in range(3):  # two failed attempts, then the give-up
        world.reconcile(engine)
    assert world.intents.compose_ids() == []
    downloads = world.server.hits_of(arm.path)
    lines = world.reconcile(world.engine(stage_max_attempts=2))
    assert world.server.hits_of(arm.path) == downloads
    assert not [line for line in lines if "\terror" in line], lines


def test_an_image_of_an_intent_is_converged_once_per_pass(world: World) -> None:
    arm = world.tree.raw_images()[1]
    world.intents.record(Intent(COMPOSE, world.server.url, "40", datetime.now(UTC).isoformat()))
    world.half_written(arm)
    world.server.missing(arm.path)  # so that every stage attempt shows (and fails)
    world.later(PAST_GRACE)
    world.reconcile()
    intent = world.intents.get(COMPOSE)
    assert intent is not None and intent.attempts[arm.sha256] == 1
    assert world.uploads(arm.image_name, "started") == len(VOLS)  # one attempt, not two


def test_unreadable_metadata_is_retried_then_given_up(world: World) -> None:
    world.server.missing("metadata/images.json")
    outcomes = _accept(world, world.engine())
    assert [(o.status, o.ami_id) for o in outcomes] == [("failed", None)]
    for tries in range(2, 5):
        lines = world.reconcile()
        assert len(lines) == 1 and lines[0].startswith(f"{COMPOSE}\terror"), lines
        intent = world.intents.get(COMPOSE)
        assert intent is not None and intent.read_attempts == tries and intent.last_error
        assert intent.images is None
    lines = world.reconcile()  # the fifth failure: given up
    assert len(lines) == 1 and "\terror" in lines[0]
    assert world.intents.compose_ids() == []
    assert world.reconcile() == []  # nothing remembered, nothing tried
    assert world.counts() == dict.fromkeys(world.counts(), 0)
    assert world.recorder.sent == []


def test_metadata_readable_again_is_staged(world: World) -> None:
    world.server.missing("metadata/images.json")
    assert [o.status for o in _accept(world, world.engine())] == ["failed"]
    world.server.reset()
    lines = world.reconcile()
    assert not [line for line in lines if "\terror" in line], lines
    world.every_image_staged_once()
    assert world.intents.compose_ids() == []


def test_a_message_with_an_unreadable_location_does_not_hold_back_the_real_one(
    world: World,
) -> None:
    # A wrong (or forged) message for the compose comes first; its location has no metadata.
    body = compose_message(world.tree, world.server.url)
    wrong = {**body, "location": world.server.url + "/nowhere"}
    engine = world.engine()
    assert [o.status for o in engine.accept_compose(parse_compose_status(wrong))] == ["failed"]
    # The real message for the same compose: its location is read, every image staged.
    outcomes = engine.accept_compose(parse_compose_status(body))
    assert {o.status for o in outcomes} == {"staged"}
    world.every_image_staged_once()
    assert world.intents.compose_ids() == []


def test_two_engines_sharing_a_state_dir_upload_each_image_once(world: World) -> None:
    """Engine A holds every image (its uploads are held at StartSnapshot) while B converges."""
    first, second = world.engine(stage_workers=3), world.engine(stage_workers=3)
    held = threading.Semaphore(0)
    go = threading.Event()
    lock = threading.Lock()
    starts = [0]

    def hold(**_: Any) -> None:
        with lock:
            starts[0] += 1
            mine = starts[0] <= len(SPECS)
        if mine:  # A's uploads wait until B is done; any later one goes straight through
            held.release()
            assert go.wait(DEADLINE)

    world.ebs.meta.events.register("provide-client-params.ebs.StartSnapshot", hold)
    results: dict[str, list[StageOutcome]] = {}
    thread = threading.Thread(target=lambda: results.update(a=_accept(world, first)))
    thread.start()
    try:
        for _ in SPECS:  # A holds all three images and is uploading each of them
            assert held.acquire(timeout=DEADLINE)
        results["b"] = _accept(world, second)
    finally:
        go.set()
        thread.join(timeout=DEADLINE)
    assert not thread.is_alive()
    assert {o.status for o in results["b"]} == {"busy"}
    assert {o.status for o in results["a"]} == {"staged"}
    assert len(world.calls("StartSnapshot")) == len(SPECS)
    world.every_image_staged_once()
    assert world.intents.compose_ids() == []
    # The pass after them finds everything done.
    before = world.counts()
    world.reconcile()
    assert world.counts() == before
