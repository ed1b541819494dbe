"""Staging through the real processes: fedmsg-relay + fedmsg-hub, moto_server, a compose server.

The hub loads StageConsumer from its moksha.consumer entry point; boto3 in
the hub and in the ``fedimg`` CLI reaches moto_server through
AWS_ENDPOINT_URL. Everything listens on loopback.
"""

from __future__ import annotations

import os
import pty
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest

from devel.bus import BIN, LocalBus, ManagedProcess, Seen, WaitTimeout, wait_until
from devel.compose import ComposeServer, ComposeTree, build_compose, compose_message
from devel.motoserver import MotoServer
from fedimg.messages import IMAGE_UPLOAD, parse_test_request

pytestmark = pytest.mark.integration

REGION = "us-east-1"
X86 = "Fedora-Cloud-Base-40-20240501.0.x86_64.raw.xz"
ARM = "Fedora-Cloud-Base-40-20240501.0.aarch64.raw.xz"
ATOMIC = "Fedora-AtomicHost-40-20240501.0.x86_64.raw.xz"
ALL = {X86, ARM, ATOMIC}
SETTINGS = {
    "fedimg.stage.enabled": True,
    "fedimg.resultsdb_url": "http://127.0.0.1:9/api/v2.0",
    "fedimg.aws.staging_region": REGION,
    "fedimg.aws.regions": ["us-west-2", "eu-west-1"],
    "fedimg.aws.upload_workers": 4,
    "fedimg.stage.workers": 3,
    "fedimg.http.retries": 0,
    "fedimg.http.timeout": 20.0,
    # The tests reset moto between them: a reconcile pass of the hub would find the
    # intents of earlier tests and stage them again beside the CLI's own run.
    "fedimg.reconcile.interval": 24 * 3600.0,
}


@dataclass
class Stack:
    tree: ComposeTree
    moto: MotoServer
    server: ComposeServer
    bus: LocalBus
    hub: ManagedProcess

    def ec2(self, region: str = REGION) -> Any:
        return boto3.client(
            "ec2",
            region_name=region,
            endpoint_url=self.moto.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def images(self, region: str = REGION) -> list[dict[str, Any]]:
        return list(self.ec2(region).describe_images(Owners=["self"])["Images"])

    def since(self, t0: float, suffix: str, status: str) -> list[Seen]:
        assert self.bus.tap is not None
        return [
            m
            for m in self.bus.tap.messages(suffix)
            if m.at >= t0 and m.body.get("status") == status
        ]

    def wait(self, t0: float, suffix: str, status: str, name: str, timeout: float = 180) -> Seen:
        """The first ``suffix`` message with ``status`` for image ``name`` seen since ``t0``.

        The deadline is generous (a hub on a machine running four test workers is
        slow, not stuck); when it passes, the hub's last lines say why.
        """

        def found() -> Seen | None:
            for m in self.since(t0, suffix, status):
                if m.body.get("image_name") == name:
                    return m
            return None

        try:
            seen: Seen = wait_until(found, timeout, f"{suffix} {status} for {name}")
        except WaitTimeout as exc:
            tail = "\n".join(self.hub.output().splitlines()[-40:])
            raise WaitTimeout(f"{exc}; the hub's last lines:\n{tail}") from None
        return seen

    def argv(self, *args: str, location: str | None = None) -> list[str]:
        return [
            str(BIN / "fedimg"),
            "stage",
            "--compose-location",
            location or self.server.url,
            *args,
        ]

    def cli(self, *args: str, location: str | None = None) -> subprocess.CompletedProcess[str]:
        assert self.bus.workdir is not None
        return subprocess.run(
            self.argv(*args, location=location),
            cwd=self.bus.workdir,
            env=self.bus.env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tree = build_compose(tmp_path_factory.mktemp("compose"))
    with pytest.MonkeyPatch.context() as mp:
        # moto_server reads this at start: no public AMIs, faster describes.
        mp.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
        moto = MotoServer().start()
    try:
        with (
            ComposeServer(tree.root, stall_seconds=30) as server,
            LocalBus(settings=dict(SETTINGS), extra_env=moto.env()) as bus,
        ):
            yield Stack(tree, moto, server, bus, bus.start_hub())
    finally:
        moto.stop()


def test_hub_stages_a_finished_compose_and_survives_bad_messages(stack: Stack) -> None:
    stack.moto.reset()
    hub = stack.hub
    t0 = time.time()
    stack.bus.publish("pungi", "compose.status.change", {"status": "FINISHED"})
    stack.bus.publish(
        "pungi",
        "compose.status.change",
        compose_message(stack.tree, "ftp://127.0.0.1/compose"),
    )
    stack.bus.publish(
        "pungi", "compose.status.change", compose_message(stack.tree, stack.server.url, "DOOMED")
    )
    stack.bus.publish(
        "pungi", "compose.status.change", compose_message(stack.tree, stack.server.url)
    )

    tests = {name: stack.wait(t0, "fedimg.image.test", "started", name) for name in ALL}
    assert stack.bus.tap is not None
    for name, test in tests.items():
        request = parse_test_request(test.body)
        assert request.region == REGION and request.compose_id == stack.tree.compose_id
        uploads = [
            m
            for m in stack.bus.tap.messages("fedimg.image.upload")
            if m.at >= t0 and m.body["image_name"] == name
        ]
        assert [m.body["status"] for m in uploads] == ["started", "completed"]
        for m in uploads:
            IMAGE_UPLOAD.validate(m.body)
        assert uploads[1].body["extra"]["id"] == request.ami_id
        assert uploads[0].at <= uploads[1].at <= test.at
    images = stack.images()
    assert sorted(i["ImageId"] for i in images) == sorted(
        str(parse_test_request(t.body).ami_id) for t in tests.values()
    )
    assert stack.images("us-west-2") == [] and stack.images("eu-west-1") == []
    # Only the good message was acted on, and the hub still answers.
    assert len(stack.since(t0, "fedimg.image.upload", "started")) == 3
    assert hub.alive
    stack.bus.wait_hub(hub, timeout=30)


def test_hub_keeps_answering_while_an_image_stalls(stack: Stack) -> None:
    stack.moto.reset()
    stack.server.stall(stack.tree.image(ATOMIC).path)
    hub = stack.hub
    t0 = time.time()
    stack.bus.publish(
        "pungi", "compose.status.change", compose_message(stack.tree, stack.server.url)
    )
    stack.wait(t0, "fedimg.image.test", "started", X86)
    stack.wait(t0, "fedimg.image.test", "started", ARM)
    stack.bus.wait_hub(hub, timeout=10)  # answered while ATOMIC's download hangs
    assert not stack.since(t0, "fedimg.image.upload", "failed")
    stack.server.reset()  # the stalled answer now ends without a response
    failed = stack.wait(t0, "fedimg.image.upload", "failed", ATOMIC)
    assert failed.body["reason"]
    assert len(stack.images()) == 2


def test_cli_stages_and_exits_zero(stack: Stack) -> None:
    stack.moto.reset()
    t0 = time.time()
    result = stack.cli()
    assert result.returncode == 0, result.stderr[-4000:]
    for name in ALL:
        stack.wait(t0, "fedimg.image.test", "started", name)
    assert len(stack.images()) == 3
    assert stack.images("us-west-2") == []


def test_cli_exits_non_zero_when_an_image_fails(stack: Stack) -> None:
    stack.moto.reset()
    stack.server.missing(stack.tree.image(ARM).path)
    try:
        t0 = time.time()
        result = stack.cli("--compose-id", stack.tree.compose_id)
    finally:
        stack.server.reset()
    assert result.returncode != 0
    stack.wait(t0, "fedimg.image.upload", "failed", ARM)
    assert len(stack.images()) == 2


def test_cli_refuses_a_location_that_is_not_a_compose(stack: Stack) -> None:
    t0 = time.time()
    result = stack.cli(location=stack.server.base_url + "/nothing")
    assert result.returncode != 0
    assert not stack.since(t0, "fedimg.image.upload", "started")


def test_cli_draws_progress_bars_on_a_terminal(stack: Stack) -> None:
    stack.moto.reset()
    master, slave = pty.openpty()
    assert stack.bus.workdir is not None
    proc = subprocess.Popen(
        stack.argv(),
        cwd=stack.bus.workdir,
        env={**stack.bus.env(), "COLUMNS": "120"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
    )
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO once the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert proc.wait(timeout=120) == 0
        reader.join(timeout=10)
    finally:
        os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    for name in ALL:
        bars = [line for line in text.split("\r") if name in line and "MiB/s" in line]
        assert bars, text[-2000:]
        assert any("100.0%" in bar and "done" in bar for bar in bars)
    assert "\x1b[" in text  # redrawn in place
