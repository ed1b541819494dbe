"""Staging multi-block xz images through a real moto_server, every block read back.

The production path end to end: ``Engine.stage_location`` (fedimg.engine)
reads a generated compose from a loopback HTTP server, probes the image's xz
index, decodes its blocks in parallel (fedimg.xzparallel) and writes the
snapshot through boto3 to ``moto_server`` (AWS_ENDPOINT_URL). Then every
block of the snapshot is listed and read back over the EBS direct API and
compared with the image's own record of its non-zero blocks.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devel.compose import ComposeServer, ComposeTree, ImageSpec, build_compose
from devel.images import BLOCK, ImageFacts
from devel.motoserver import MotoServer, snapshot_blocks
from fedimg.aws import AwsClients
from fedimg.config import FedimgConfig
from fedimg.engine import Engine
from fedimg.http import make_session
from fedimg.messages import Emitter
from fedimg.stage import StageOutcome
from tests.conftest import Recorder
from tests.engine_support import make_engine

pytestmark = pytest.mark.integration

REGION = "us-east-1"
# 20 MiB raw in xz blocks of 700000 bytes (block and EBS boundaries apart):
# 3 parts decoded in parallel; data on both sides of several xz block ends.
IMAGE = ImageSpec(
    "Cloud",
    "x86_64",
    "Cloud_Base",
    raw_mib=20,
    data_blocks=(0, 1, 2, 13, 14, 15, 16, 26, 27, 39),
    seed=31,
    xz_block_size=700_000,
)


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")  # read by moto_server at start
        server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> ComposeTree:
    return build_compose(tmp_path_factory.mktemp("compose"), images=[IMAGE])


@dataclass
class World:
    moto: MotoServer
    tree: ComposeTree
    aws: AwsClients
    engine: Engine
    puts: list[int]

    @property
    def facts(self) -> ImageFacts:
        (image,) = self.tree.raw_images()
        assert image.facts is not None
        return image.facts

    def stage(self, location: str) -> StageOutcome:
        (outcome,) = self.engine.stage_location(location, self.tree.compose_id)
        return outcome

    def stored_blocks(self, snapshot_id: str) -> dict[int, str]:
        """sha256 of every block moto_server holds for the snapshot, read back one by one."""
        blocks = snapshot_blocks(self.aws.ebs(REGION), snapshot_id)
        return {index: hashlib.sha256(data).hexdigest() for index, data in blocks}

    def uploaded_snapshots(self) -> list[dict[str, Any]]:
        found = self.aws.ec2(REGION).describe_snapshots(OwnerIds=["self"])["Snapshots"]
        return [s for s in found if str(s.get("Description", "")).startswith("fedimg ")]


@pytest.fixture
def world(
    moto: MotoServer,
    tree: ComposeTree,
    monkeypatch: pytest.MonkeyPatch,
    recorder: Recorder,
    tmp_path: Path,
) -> Iterator[World]:
    moto.reset()
    for key, value in moto.env().items():
        monkeypatch.setenv(key, value)
    cfg = FedimgConfig(
        resultsdb_url="http://127.0.0.1:9/api/v2.0",
        arches=["x86_64"],
        upload_workers=4,
        stage_workers=1,
        http_retries=0,
        http_timeout=10.0,
        state_dir=str(tmp_path / "state"),
    )
    aws = AwsClients(max_attempts=3)
    puts: list[int] = []
    aws.ebs(REGION).meta.events.register(
        "provide-client-params.ebs.PutSnapshotBlock",
        lambda params, **_: puts.append(params["BlockIndex"]),
    )
    engine = make_engine(
        cfg,
        Emitter(recorder),
        aws,
        tmp_path / "state",
        session=make_session(cfg.http_retries, cfg.http_timeout),
        available_timeout=30.0,
        poll_interval=0.1,
    )
    try:
        yield World(moto, tree, aws, engine, puts)
    finally:
        engine.close()


def assert_every_block_read_back(world: World, outcome: StageOutcome) -> None:
    assert outcome.status == "staged", outcome.reason
    assert outcome.ami_id is not None
    facts = world.facts
    assert facts.raw_size % BLOCK == 0 and len(facts.nonzero_blocks) == 10
    assert sorted(world.puts) == list(facts.nonzero_blocks), "each non-zero block sent once"
    # The snapshot uploaded (moto makes another one of its own for RegisterImage).
    (snapshot,) = world.uploaded_snapshots()
    assert snapshot["State"] == "completed"
    assert world.stored_blocks(snapshot["SnapshotId"]) == facts.block_digests


def test_a_multi_block_image_is_staged_block_for_block(world: World) -> None:
    with ComposeServer(world.tree.root) as server:
        outcome = world.stage(server.url)
        (image,) = world.tree.raw_images()
        hits = server.hits[f"compose/{image.path}"]
    assert_every_block_read_back(world, outcome)
    assert hits >= 4, "the probe, then one Range request per part (3)"


def test_from_a_server_that_ignores_range(world: World) -> None:
    """Python's own http.server: no Range support at all; staged from one download."""
    requests: list[str] = []
    handler = functools.partial(_CountingHandler, directory=str(world.tree.root), requests=requests)
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            outcome = world.stage(f"http://127.0.0.1:{httpd.server_address[1]}/compose")
        finally:
            httpd.shutdown()
            thread.join(timeout=10)
    assert_every_block_read_back(world, outcome)
    (image,) = world.tree.raw_images()
    assert requests.count(f"/compose/{image.path}") == 1, "the image downloaded once"


def test_a_wrong_checksum_leaves_no_snapshot(world: World, tmp_path: Path) -> None:
    images = world.tree.load_images()
    original = world.tree.images_json.read_bytes()
    for per_arch in images.images.values():
        for entries in per_arch.values():
            for entry in entries:
                entry.checksums = {"sha256": hashlib.sha256(b"another image").hexdigest()}
    world.tree.write_images(images)
    try:
        with ComposeServer(world.tree.root) as server:
            outcome = world.stage(server.url)
    finally:
        world.tree.images_json.write_bytes(original)
    assert outcome.status == "failed"
    assert "sha256" in outcome.reason
    assert world.puts, "blocks were written before the checksum was known"
    assert world.uploaded_snapshots() == [], "the snapshot was deleted"
    assert world.aws.ec2(REGION).describe_images(Owners=["self"])["Images"] == []


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    """The stdlib file server (it ignores Range), recording each path asked for."""

    def __init__(self, *args: Any, requests: list[str], **kwargs: Any) -> None:
        self.requests = requests
        super().__init__(*args, **kwargs)

    def send_head(self) -> Any:
        self.requests.append(self.path)
        return super().send_head()

    def log_message(self, format: str, *args: Any) -> None:
        pass
