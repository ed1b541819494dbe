"""fedimg.stage end to end in process: a generated compose over loopback HTTP, moto for AWS."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import runpy
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ebs.models import ebs_backends
from moto.ec2.models import ec2_backends

from devel.compose import (
    BuiltImage,
    ComposeServer,
    ComposeTree,
    build_compose,
    compose_message,
    corrupt_copy,
)
from devel.images import file_sha256
from fedimg import ami, engine, tags
from fedimg.aws import AwsClients
from fedimg.compose import CloudImage
from fedimg.config import FedimgConfig
from fedimg.engine import Engine, ImageResult, cli_stage
from fedimg.messages import (
    IMAGE_UPLOAD,
    Emitter,
    InvalidMessage,
    parse_compose_status,
    parse_test_request,
)
from fedimg.settings import keys_of
from fedimg.stage import LogProgress, StageOutcome, TerminalBoard
from tests.engine_support import make_engine
from tests.test_ami import capture, fail_calls, throttle

REGION = "us-east-1"
OTHER_REGIONS = ("us-east-2", "us-west-2", "eu-west-1")
ROOT = Path(__file__).resolve().parent.parent
X86 = "Fedora-Cloud-Base-40-20240501.0.x86_64.raw.xz"
ARM = "Fedora-Cloud-Base-40-20240501.0.aarch64.raw.xz"
ATOMIC = "Fedora-AtomicHost-40-20240501.0.x86_64.raw.xz"
ALL = {X86, ARM, ATOMIC}


class Crash(BaseException):
    """Stands for the process dying at a given call (nothing after it runs)."""


def config(**kw: Any) -> FedimgConfig:
    base = FedimgConfig(
        resultsdb_url="http://127.0.0.1:9/api/v2.0",
        regions=list(OTHER_REGIONS),
        upload_workers=4,
        stage_workers=3,
        http_retries=0,
        http_timeout=2.0,
    )
    return dataclasses.replace(base, **kw)


def by_name(outcomes: list[StageOutcome]) -> dict[str, list[StageOutcome]]:
    grouped: dict[str, list[StageOutcome]] = {}
    for o in outcomes:
        grouped.setdefault(o.image_name, []).append(o)
    return grouped


def cloud_image(built: BuiltImage, compose_id: str) -> CloudImage:
    return CloudImage(
        compose_id=compose_id,
        variant=built.spec.variant,
        arch=built.spec.arch,
        subvariant=built.spec.subvariant,
        format="raw.xz",
        path=built.path,
        url="",
        size=built.size,
        sha256=built.sha256,
        image_name=built.image_name,
        type="raw-xz",
    )


@dataclass
class Env:
    """One test's world: the compose and its server, moto, the bus recorder, the logs."""

    tree: ComposeTree
    server: ComposeServer
    aws: AwsClients
    recorder: Any
    caplog: pytest.LogCaptureFixture
    state_dir: Path
    engines: list[Engine] = field(default_factory=list)

    def config(self, **kw: Any) -> FedimgConfig:
        return config(state_dir=str(self.state_dir), **kw)

    def engine(self, publish: Any = None, available_timeout: float = 5.0, **kw: Any) -> Engine:
        """A new engine (as a restarted hub: nothing cached but the state directory)."""
        built = make_engine(
            self.config(**kw),
            Emitter(publish or self.recorder),
            self.aws,
            self.state_dir,
            available_timeout=available_timeout,
            poll_interval=0.05,
        )
        self.engines.append(built)
        return built

    def run(self, engine: Engine | None = None, **kw: Any) -> list[StageOutcome]:
        """Stage the compose as the consumer does for its pungi message."""
        body = compose_message(self.tree, self.server.url)
        return (engine or self.engine(**kw)).accept_compose(parse_compose_status(body))

    @property
    def ec2(self) -> Any:
        return self.aws.ec2(REGION)

    @property
    def ebs(self) -> Any:
        return self.aws.ebs(REGION)

    def path(self, name: str) -> str:
        return self.tree.image(name).path

    def images(self, region: str = REGION) -> list[dict[str, Any]]:
        """The AMIs this account owns in ``region``."""
        return list(self.aws.ec2(region).describe_images(Owners=["self"])["Images"])

    def snapshots(self, sha256: str) -> list[dict[str, Any]]:
        """The snapshots tagged as holding the image with ``sha256``."""
        found = self.ec2.describe_snapshots(
            Filters=[{"Name": f"tag:{tags.SHA256}", "Values": [sha256]}]
        )
        return list(found["Snapshots"])

    def events(self) -> list[tuple[str, str, str, str, str | None]]:
        """(topic, status, image_name, vol_type, AMI id) of every message sent."""
        return [
            (f"{m}.{t}", b["status"], b["image_name"], b["extra"]["vol_type"], b["extra"].get("id"))
            for m, t, b in self.recorder.sent
        ]

    def errors(self) -> list[logging.LogRecord]:
        return [r for r in self.caplog.records if r.levelno >= logging.ERROR]

    def rewrite_images(self, change: Callable[[Any], None]) -> None:
        """Serve an images.json where ``change(entry)`` was applied to every image entry."""
        images = self.tree.load_images()
        for arches in images.images.values():
            for entries in arches.values():
                for entry in entries:
                    change(entry)
        self.server.replace("metadata/images.json", json.dumps(images.serialize({})).encode())

    def assert_image_failed(
        self, name: str, outcomes: list[StageOutcome], sha256: str | None = None
    ) -> None:
        """``name`` failed cleanly (message, no AMI, no snapshot, ERROR log); the others staged."""
        grouped = by_name(outcomes)
        assert [o.status for o in grouped[name]] == ["failed"]
        assert grouped[name][0].reason
        for other in ALL - {name}:
            assert [o.status for o in grouped[other]] == ["staged"]
        uploads = [
            (b["status"], b.get("reason"))
            for b in self.recorder.bodies("fedimg.image.upload")
            if b["image_name"] == name
        ]
        assert [s for s, _ in uploads] == ["started", "failed"] and uploads[1][1]
        assert name not in {b["image_name"] for b in self.recorder.bodies("fedimg.image.test")}
        stem = name[: -len(".raw.xz")]
        assert not [i for i in self.images() if i["Name"].startswith(stem)]
        assert len(self.images()) == len(ALL) - 1
        assert self.snapshots(sha256 or self.tree.image(name).sha256) == []
        assert self.errors()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> ComposeTree:
    return build_compose(tmp_path_factory.mktemp("compose"))


@pytest.fixture
def env(
    tree: ComposeTree,
    recorder: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Iterator[Env]:
    # moto's thousands of public AMIs cost a second per test and matter to no test here.
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    with mock_aws(), ComposeServer(tree.root, stall_seconds=10) as server:
        world = Env(tree, server, AwsClients(max_attempts=4), recorder, caplog, tmp_path / "state")
        yield world
        for built in world.engines:
            built.close()


# -- the good path ------------------------------------------------------------------


def test_one_ami_per_image_and_volume_type_in_the_staging_region_only(env: Env) -> None:
    sent = capture(env.ec2, "RegisterImage")
    started = capture(env.ebs, "StartSnapshot")
    extra = {"FedoraGroup": "cloud", "CostCenter": "releng"}
    outcomes = env.run(volume_types=["gp3", "gp2"], extra_tags=extra)
    assert {(o.image_name, o.vol_type, o.status) for o in outcomes} == {
        (name, vol, "staged") for name in ALL for vol in ("gp3", "gp2")
    }
    assert sorted(i["ImageId"] for i in env.images()) == sorted(str(o.ami_id) for o in outcomes)
    for region in OTHER_REGIONS:
        assert env.images(region) == []
    # What was SENT (moto keeps only Name and Description).
    assert len(sent) == 6
    snapshots: dict[str, set[str]] = {}
    built_by_sha = {b.sha256: b for b in env.tree.raw_images()}
    for params in sent:
        (spec,) = params["TagSpecifications"]
        tagged = tags.as_dict(spec["Tags"])
        built = built_by_sha[tagged[tags.SHA256]]
        arch = built.spec.arch
        assert params["Architecture"] == {"x86_64": "x86_64", "aarch64": "arm64"}[arch]
        assert params["BootMode"] == {"x86_64": "uefi-preferred", "aarch64": "uefi"}[arch]
        assert params["ImdsSupport"] == "v2.0"
        # NitroTPM only where the boot mode is uefi (uefi-preferred may boot BIOS).
        assert params.get("TpmSupport") == {"x86_64": None, "aarch64": "v2.0"}[arch]
        assert params["VirtualizationType"] == "hvm"
        assert params["EnaSupport"] is True
        assert params["SriovNetSupport"] == "simple"
        assert params["RootDeviceName"] == "/dev/sda1"
        (mapping,) = params["BlockDeviceMappings"]
        assert mapping["DeviceName"] == "/dev/sda1"
        ebs = mapping["Ebs"]
        assert ebs["DeleteOnTermination"] is True
        assert ebs["VolumeSize"] == 1  # a few MiB, rounded up to whole GiB
        image = cloud_image(built, env.tree.compose_id)
        assert params["Name"] == ami.ami_name(image, ebs["VolumeType"])
        assert env.tree.compose_id in params["Description"] and arch in params["Description"]
        assert spec["ResourceType"] == "image"
        assert tagged[tags.STATE] == "testing"
        assert tagged[tags.COMPOSE_ID] == env.tree.compose_id
        assert tagged[tags.IMAGE_NAME] == built.image_name
        assert tagged[tags.VOL_TYPE] == ebs["VolumeType"]
        assert extra.items() <= tagged.items()
        snapshots.setdefault(built.image_name, set()).add(ebs["SnapshotId"])
    # Both volume types of an image come from one snapshot.
    assert all(len(s) == 1 for s in snapshots.values()) and len(snapshots) == 3
    # The snapshots carry the extra tags from their creation (StartSnapshot) on.
    assert len(started) == 3
    for params in started:
        assert extra.items() <= tags.as_dict(params["Tags"]).items()
    for described in env.images():
        assert extra.items() <= tags.as_dict(described["Tags"]).items()


def test_snapshot_blocks_are_the_image_non_zero_blocks_and_tagged(env: Env) -> None:
    outcomes = env.run()
    assert {o.status for o in outcomes} == {"staged"}
    backend = ebs_backends[DEFAULT_ACCOUNT_ID][REGION]
    for built in env.tree.raw_images():
        assert built.facts is not None
        (snap,) = env.snapshots(built.sha256)
        blocks = backend.snapshots[snap["SnapshotId"]].blocks
        got = {i: hashlib.sha256(b.block_data).hexdigest() for i, b in blocks.items()}
        assert got == built.facts.block_digests
        assert sorted(got) == list(built.facts.nonzero_blocks)
        snap_tags = tags.as_dict(snap["Tags"])
        assert snap_tags[tags.STATE] == "testing"
        assert snap_tags[tags.IMAGE_NAME] == built.image_name
        assert snap_tags[tags.COMPOSE_ID] == env.tree.compose_id
        assert tags.VOL_TYPE not in snap_tags


def test_ami_tags(env: Env) -> None:
    for outcome in env.run():
        described = env.ec2.describe_images(ImageIds=[outcome.ami_id])["Images"][0]
        built = env.tree.image(outcome.image_name)
        got = tags.as_dict(described["Tags"])
        assert got[tags.COMPOSE_ID] == env.tree.compose_id
        assert got[tags.IMAGE_NAME] == built.image_name
        assert got[tags.IMAGE_URL] == env.server.url_of(built.path)
        assert got[tags.SHA256] == built.sha256
        assert got[tags.ARCH] == built.spec.arch
        assert got[tags.SUBVARIANT] == built.spec.subvariant
        assert got[tags.STATE] == "testing"
        assert got[tags.RELEASE] == "40"
        assert got[tags.VOL_TYPE] == "gp3"
        staged = tags.staged_image(described, REGION)
        assert staged is not None and staged.ami_id == outcome.ami_id


def test_messages_in_order_with_valid_bodies(env: Env) -> None:
    outcomes = env.run(volume_types=["gp3", "io1"])
    seen = env.events()
    assert len(seen) == 3 * 6
    for o in outcomes:
        mine = [e for e in seen if e[2] == o.image_name and e[3] == o.vol_type]
        assert [(e[0], e[1]) for e in mine] == [
            ("fedimg.image.upload", "started"),
            ("fedimg.image.upload", "completed"),
            ("fedimg.image.test", "started"),
        ]
        assert mine[0][4] is None and mine[1][4] == mine[2][4] == o.ami_id
    for body in env.recorder.bodies("fedimg.image.upload"):
        IMAGE_UPLOAD.validate(body)
        assert body["destination"] == REGION and body["compose"] == env.tree.compose_id
    for body in env.recorder.bodies("fedimg.image.test"):
        request = parse_test_request(body)
        built = env.tree.image(request.image_name)
        assert request.region == REGION
        assert request.architecture == built.spec.arch
        assert request.subvariant == built.spec.subvariant
        assert request.sha256 == built.sha256
        assert request.release == "40"
        assert request.image_url == env.server.url_of(built.path)


# -- idempotence ----------------------------------------------------------------------


def test_replay_re_announces_without_uploading(env: Env) -> None:
    first = env.run()
    downloads = {b.path: env.server.hits_of(b.path) for b in env.tree.raw_images()}
    starts = capture(env.ebs, "StartSnapshot")
    puts = capture(env.ebs, "PutSnapshotBlock")
    registers = capture(env.ec2, "RegisterImage")
    env.recorder.sent.clear()
    again = env.run()  # a new Stager, as a restarted hub: nothing cached
    assert (starts, puts, registers) == ([], [], [])
    assert {b.path: env.server.hits_of(b.path) for b in env.tree.raw_images()} == downloads
    assert {(o.image_name, o.ami_id) for o in again} == {(o.image_name, o.ami_id) for o in first}
    assert {o.status for o in again} == {"existing"}
    assert sorted((e[0], e[1], e[2]) for e in env.events()) == sorted(
        [("fedimg.image.upload", "completed", n) for n in ALL]
        + [("fedimg.image.test", "started", n) for n in ALL]
    )
    assert len(env.images()) == 3


def test_replay_does_not_ask_to_test_an_ami_past_testing(env: Env) -> None:
    first = {o.image_name: o.ami_id for o in env.run()}
    env.ec2.create_tags(Resources=[first[X86]], Tags=[{"Key": tags.STATE, "Value": "released"}])
    env.ec2.create_tags(Resources=[first[ARM]], Tags=[{"Key": tags.STATE, "Value": "rejected"}])
    env.recorder.sent.clear()
    again = env.run()
    assert {o.status for o in again} == {"existing"}
    assert {b["image_name"] for b in env.recorder.bodies("fedimg.image.test")} == {ATOMIC}


def test_concurrent_replay_of_the_same_compose_uploads_once(env: Env) -> None:
    stager = env.engine(stage_workers=6)
    starts = capture(env.ebs, "StartSnapshot")
    results: list[list[StageOutcome]] = []
    threads = [threading.Thread(target=lambda: results.append(env.run(stager))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(starts) == 3
    assert len(env.images()) == 3
    statuses = sorted(o.status for r in results for o in r)
    # The second run either found the first one's AMIs or left the images to it.
    assert statuses.count("staged") == 3
    assert set(statuses) - {"staged"} <= {"existing", "busy"}


def test_crash_between_snapshot_and_register_resumes_from_the_snapshot(env: Env) -> None:
    def crash(**_: Any) -> None:
        raise Crash

    env.ec2.meta.events.register("provide-client-params.ec2.RegisterImage", crash)
    with pytest.raises(Crash):
        env.run()
    env.ec2.meta.events.unregister("provide-client-params.ec2.RegisterImage", crash)
    assert env.images() == []
    left = {b.image_name: env.snapshots(b.sha256) for b in env.tree.raw_images()}
    assert all(len(s) == 1 and s[0]["State"] == "completed" for s in left.values())

    starts = capture(env.ebs, "StartSnapshot")
    sent = capture(env.ec2, "RegisterImage")
    outcomes = env.run()
    assert starts == []
    assert {o.status for o in outcomes} == {"staged"}
    used = {p["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"] for p in sent}
    assert used == {s[0]["SnapshotId"] for s in left.values()}


def test_resumed_snapshot_is_kept_when_register_fails_again(env: Env) -> None:
    def crash(**_: Any) -> None:
        raise Crash

    env.ec2.meta.events.register("provide-client-params.ec2.RegisterImage", crash)
    with pytest.raises(Crash):
        env.run(arches=["aarch64"])
    env.ec2.meta.events.unregister("provide-client-params.ec2.RegisterImage", crash)
    sha = env.tree.image(ARM).sha256
    (left,) = env.snapshots(sha)
    fail_calls(env.ec2, "RegisterImage", "UnauthorizedOperation")
    outcomes = env.run(arches=["aarch64"])
    assert [(o.status, o.ami_id) for o in outcomes] == [("failed", None)]
    assert [s["SnapshotId"] for s in env.snapshots(sha)] == [left["SnapshotId"]]
    assert env.images() == []


def test_ami_still_pending_at_the_deadline_is_kept_and_found_by_a_replay(env: Env) -> None:
    backend = ec2_backends[DEFAULT_ACCOUNT_ID][REGION]

    def stay_pending(parsed: dict[str, Any], **_: Any) -> None:
        backend.amis[parsed["ImageId"]].state = "pending"

    env.ec2.meta.events.register("after-call.ec2.RegisterImage", stay_pending)
    (outcome,) = env.run(arches=["aarch64"], available_timeout=0.3)
    assert outcome.status == "failed" and outcome.ami_id
    assert [i["ImageId"] for i in env.images()] == [outcome.ami_id]  # not deregistered
    assert env.snapshots(env.tree.image(ARM).sha256)
    assert [b["status"] for b in env.recorder.bodies("fedimg.image.upload")] == [
        "started",
        "failed",
    ]
    assert env.recorder.bodies("fedimg.image.test") == []
    assert env.errors()

    backend.amis[outcome.ami_id].state = "available"  # AWS finished after all
    env.recorder.sent.clear()
    (again,) = env.run(arches=["aarch64"])
    assert (again.status, again.ami_id) == ("existing", outcome.ami_id)
    assert [b["extra"]["id"] for b in env.recorder.bodies("fedimg.image.test")] == [outcome.ami_id]


def test_registered_but_untagged_ami_is_adopted(env: Env) -> None:
    # A run that died between register_image and tagging left a bare AMI.
    name = ami.ami_name(cloud_image(env.tree.image(X86), env.tree.compose_id), "gp3")
    bare = env.ec2.register_image(Name=name, RootDeviceName="/dev/sda1")["ImageId"]
    outcomes = {o.image_name: o for o in env.run()}
    assert outcomes[X86].status == "existing" and outcomes[X86].ami_id == bare
    described = env.ec2.describe_images(ImageIds=[bare])["Images"][0]
    assert tags.state_of(described) is tags.State.TESTING
    assert bare in {b["extra"].get("id") for b in env.recorder.bodies("fedimg.image.test")}


# -- bad input ----------------------------------------------------------------------------


def test_image_404_fails_that_image_only(env: Env) -> None:
    env.server.missing(env.path(ARM))
    env.assert_image_failed(ARM, env.run())


def test_image_stall_fails_that_image_only(env: Env) -> None:
    env.server.stall(env.path(ATOMIC))
    env.assert_image_failed(ATOMIC, env.run(http_timeout=0.5))


def test_checksum_mismatch_fails_that_image_and_deletes_its_snapshot(env: Env) -> None:
    wrong = "0" * 64

    def change(entry: Any) -> None:
        if entry.path == env.path(X86):
            entry.checksums = {"sha256": wrong}

    env.rewrite_images(change)
    starts = capture(env.ebs, "StartSnapshot")
    env.assert_image_failed(X86, env.run(), sha256=wrong)
    assert len(starts) == 3  # it was streamed into a snapshot, then abandoned


def test_corrupt_xz_fails_that_image_and_deletes_its_snapshot(env: Env) -> None:
    built = env.tree.image(ARM)
    corrupt = built.file.with_name("corrupt-" + built.image_name)
    corrupt_copy(built.file, corrupt, offset=built.size // 2)
    sha, size = file_sha256(corrupt)
    rel = str(Path(built.path).with_name(corrupt.name))

    def change(entry: Any) -> None:
        if entry.path == built.path:
            entry.path, entry.size, entry.checksums = rel, size, {"sha256": sha}

    env.rewrite_images(change)
    grouped = by_name(env.run())
    assert [o.status for o in grouped[corrupt.name]] == ["failed"]
    assert {o.status for n in ALL - {ARM} for o in grouped[n]} == {"staged"}
    assert env.snapshots(sha) == []
    assert len(env.images()) == 2
    uploads = [b for b in env.recorder.bodies("fedimg.image.upload") if b["status"] == "failed"]
    assert [b["image_name"] for b in uploads] == [corrupt.name]
    assert env.errors()


def test_image_path_escaping_the_compose_is_not_fetched(env: Env) -> None:
    def change(entry: Any) -> None:
        if entry.path == env.path(ATOMIC):
            entry.path = "../../secret/" + ATOMIC

    env.rewrite_images(change)
    grouped = by_name(env.run())
    assert [o.status for o in grouped[ATOMIC]] == ["failed"]
    assert {o.status for n in (X86, ARM) for o in grouped[n]} == {"staged"}
    assert not [p for p in env.server.hits if "secret" in p]
    assert ATOMIC not in {b["image_name"] for _, _, b in env.recorder.sent}
    assert env.errors()


@pytest.mark.parametrize("fault", ["missing", "html", "invalid json", "not productmd"])
def test_unreadable_compose_is_one_failure_and_no_messages(env: Env, fault: str) -> None:
    rel = "metadata/images.json"
    if fault == "missing":
        env.server.missing(rel)
    elif fault == "html":
        env.server.html(rel)
    elif fault == "invalid json":
        env.server.replace(rel, b'{"header": {"type": ')
    else:
        env.server.replace(rel, b'{"header": {"type": "productmd.rpms", "version": "1.2"}}')
    outcomes = env.run()
    assert [(o.status, o.ami_id) for o in outcomes] == [("failed", None)]
    assert outcomes[0].reason
    assert env.recorder.sent == []
    assert env.images() == []
    assert len(env.errors()) == 1
    assert env.tree.compose_id in env.errors()[0].getMessage()


def test_compose_without_cloud_images_is_skipped(env: Env) -> None:
    assert env.run(variants=["CloudImages"]) == []
    assert env.recorder.sent == []
    assert not env.errors()


@pytest.mark.parametrize("status", ["STARTED", "DOOMED", "TERMINATED", "SOMETHING_NEW"])
def test_unfinished_or_unknown_status_is_ignored(env: Env, status: str) -> None:
    body = compose_message(env.tree, env.server.url, status=status)
    built = env.engine()
    assert built.accept_compose(parse_compose_status(body)) == []
    assert built.intents.compose_ids() == []  # nothing accepted, nothing remembered
    assert env.recorder.sent == [] and not env.server.hits


@pytest.mark.parametrize(
    "change",
    [
        {"compose_id": None},
        {"status": None},
        {"status": 1},
        {"location": "ftp://127.0.0.1/compose"},
        {"location": "file:///compose"},
        {"location": None},
        {"compose_id": "../../etc"},
    ],
)
def test_malformed_compose_message_never_reaches_the_stager(
    env: Env, change: dict[str, Any]
) -> None:
    body = compose_message(env.tree, env.server.url)
    for key, value in change.items():
        if value is None:
            del body[key]
        else:
            body[key] = value
    with pytest.raises(InvalidMessage):
        parse_compose_status(body)
    assert not env.server.hits


# -- AWS errors ---------------------------------------------------------------------------


def test_throttled_register_is_retried(env: Env) -> None:
    count = throttle(env.ec2, "RegisterImage", 1)
    # One image: after a throttle, adaptive retries slow every later call of the client.
    outcomes = env.run(arches=["aarch64"])
    assert count[0] == 1
    assert [(o.image_name, o.status) for o in outcomes] == [(ARM, "staged")]
    assert [i["ImageId"] for i in env.images()] == [outcomes[0].ami_id]


def test_unauthorized_register_fails_that_image_and_removes_its_snapshot(env: Env) -> None:
    fail_calls(
        env.ec2,
        "RegisterImage",
        "UnauthorizedOperation",
        when=lambda p: p["Architecture"] == "arm64",
    )
    env.assert_image_failed(ARM, env.run())


def test_access_denied_snapshot_fails_every_image_cleanly(env: Env) -> None:
    fail_calls(env.ebs, "StartSnapshot", "AccessDeniedException")
    outcomes = env.run()
    assert {(o.status, o.ami_id) for o in outcomes} == {("failed", None)}
    assert all("AccessDenied" in o.reason for o in outcomes)
    failed = [b for b in env.recorder.bodies("fedimg.image.upload") if b["status"] == "failed"]
    assert {b["image_name"] for b in failed} == ALL
    assert env.images() == []
    assert len(env.errors()) >= 3


def test_snapshot_block_error_fails_that_image_only(env: Env) -> None:
    arm_snapshots: set[str] = set()

    def note(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        context["fedimg_arm"] = "aarch64" in params.get("Description", "")

    def remember(parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        if context.get("fedimg_arm"):
            arm_snapshots.add(parsed["SnapshotId"])

    env.ebs.meta.events.register("provide-client-params.ebs.StartSnapshot", note)
    env.ebs.meta.events.register("after-call.ebs.StartSnapshot", remember)
    fail_calls(
        env.ebs,
        "PutSnapshotBlock",
        "ValidationException",
        when=lambda p: p["SnapshotId"] in arm_snapshots,
    )
    outcomes = env.run()
    assert arm_snapshots
    env.assert_image_failed(ARM, outcomes)


def test_ami_that_fails_to_become_available_is_deregistered(env: Env) -> None:
    backend = ec2_backends[DEFAULT_ACCOUNT_ID][REGION]

    def fail_arm(parsed: dict[str, Any], **_: Any) -> None:
        image = backend.amis[parsed["ImageId"]]
        if "aarch64" in str(image.name):
            image.state = "failed"

    env.ec2.meta.events.register("after-call.ec2.RegisterImage", fail_arm)
    env.assert_image_failed(ARM, env.run())


def test_unexpected_error_in_one_image_does_not_stop_the_others(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ami.register_params

    def broken(image: Any, *args: Any, **kw: Any) -> dict[str, Any]:
        if image.arch == "aarch64":
            raise RuntimeError("a bug")
        return real(image, *args, **kw)

    monkeypatch.setattr(ami, "register_params", broken)
    env.assert_image_failed(ARM, env.run())
    assert any(r.exc_info for r in env.errors())


def test_bus_failure_does_not_stop_staging(env: Env) -> None:
    def broken_bus(modname: str, topic: str, body: dict[str, Any]) -> None:
        raise ConnectionError("relay down")

    outcomes = env.run(publish=broken_bus)
    assert {o.status for o in outcomes} == {"staged"}
    assert len(env.images()) == 3
    assert env.errors()


# -- concurrency --------------------------------------------------------------------------


def test_images_are_staged_concurrently_within_the_bound(env: Env) -> None:
    active, peak = [0], [0]
    lock = threading.Lock()
    two_running = threading.Event()

    class Probe(Engine):
        def converge_image(self, image: CloudImage, scope: Any, attempts: int = 0) -> Any:
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
                if active[0] >= 2:
                    two_running.set()
            try:
                two_running.wait(timeout=10)
                return ImageResult([StageOutcome(image.image_name, "gp3", None, "staged")])
            finally:
                with lock:
                    active[0] -= 1

    base = make_engine(env.config(stage_workers=2), Emitter(env.recorder), env.aws, env.state_dir)
    probe = Probe(
        base.cfg,
        stager=base.stager,
        promoter=base.promoter,
        results=base.results,
        intents=base.intents,
        guard=base.guard,
    )
    env.engines += [base, probe]
    assert len(env.run(probe)) == 3
    assert two_running.is_set() and peak[0] == 2


# -- progress and the CLI --------------------------------------------------------------------


def test_log_progress_reports_each_step(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedimg.stage")
    progress = LogProgress("compose C image I", 1000, step=25)
    for done in range(0, 1001, 50):
        progress.update(done)
    progress.close("done")
    assert len([r for r in caplog.records if r.levelno == logging.INFO]) == 4


def test_terminal_board_draws_one_line_per_image_and_keeps_logs_above() -> None:
    out = io.StringIO()
    board = TerminalBoard(out, min_interval=0)
    one, two = board("image-one", 100 << 20), board("image-two", 50 << 20)
    one.update(50 << 20)
    two.update(50 << 20)
    two.close("done")
    board.write_above("a log line\n")
    one.close("failed")
    text = out.getvalue()
    last = text.rsplit("\x1b[2A", 1)[-1]  # the last redraw of the two bars
    lines = [line for line in last.split("\n") if line]
    assert len(lines) == 2
    assert "image-one" in lines[0] and "50.0%" in lines[0] and "failed" in lines[0]
    assert "image-two" in lines[1] and "100.0%" in lines[1] and "done" in lines[1]
    assert text.index("a log line") > text.index("image-two")
    assert "\r" in text


def test_terminal_board_routes_log_records_above_the_bars() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    root = logging.getLogger()
    root.addHandler(handler)
    board = TerminalBoard(out, min_interval=0)
    try:
        with board.attached():
            bar = board("image-one", 10)
            logging.getLogger("fedimg.test").warning("between bars")
            bar.close("done")
        assert handler.stream is out
    finally:
        root.removeHandler(handler)
    text = out.getvalue()
    assert "between bars" in text
    # The bar was erased before the record and drawn again after it.
    assert text.index("\x1b[J") < text.index("between bars") < text.rindex("image-one")


def test_cli_stage_exit_codes(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "AwsClients", lambda **kw: env.aws)
    cfg = env.config()
    emitter = Emitter(env.recorder)
    url = env.server.url
    env.server.missing(env.path(ARM))
    assert cli_stage(cfg, emitter, url, env.tree.compose_id) == 1
    assert len(env.images()) == 2
    env.server.reset()
    assert cli_stage(cfg, emitter, url, env.tree.compose_id) == 0
    assert len(env.images()) == 3
    assert cli_stage(cfg, emitter, url) == 0  # a replay; the compose id from the metadata
    assert cli_stage(cfg, emitter, url, "Fedora-41-20240601.0") == 1
    assert cli_stage(cfg, emitter, "ftp://127.0.0.1/compose") == 1


def test_dev_config_declares_every_setting() -> None:
    raw = runpy.run_path(str(ROOT / "fedmsg.d" / "fedimg.py"))["config"]
    cfg = FedimgConfig.from_fedmsg(raw)
    assert {k for k in raw if k.startswith("fedimg.")} == set(keys_of(FedimgConfig))
    assert cfg.stage_enabled and cfg.promote_enabled and cfg.health_enabled
    assert cfg.staging_region == REGION and cfg.regions
    assert cfg.resultsdb_url == "http://127.0.0.1:5001/api/v2.0"
