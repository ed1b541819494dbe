"""Benchmark: promote one AMI to N = 1, 8 and every commercial region (moto in process).

    .venv/bin/python benchmarks/promote.py [--copy-seconds 5] [--latency-ms 50] [--poll 0.5]

Runs the production path (``Promoter.evaluate`` -> gate -> fan-out of
find/copy/wait/publish per region -> staging publish -> release message)
against moto in process, with two things moto does not do by itself:

* every copy is held ``pending`` for ``--copy-seconds`` (an ``after-call``
  hook on CopyImage sets the new image's state on moto's backend, and a timer
  flips it to ``available``), as a real cross-region copy takes minutes;
* every EC2 call first sleeps ``--latency-ms`` (a ``before-call`` hook), as
  a real API call is a round trip to a region's endpoint.

Prints the wall time per N, its ratio to N = 1, the EC2 calls made and the
peak number of copies in flight; then a serial reference run (one copy at a
time, as upstream fedimg did) for N = 8. Target: wall(all) <= 1.3 x wall(1).
Exit status 0 when the target is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
import requests
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.models import ec2_backends

from fedimg import tags
from fedimg.aws import AwsClients
from fedimg.config import FedimgConfig
from fedimg.copies import Timing
from fedimg.engine import Engine
from fedimg.intents import IntentStore
from fedimg.locks import Guard
from fedimg.messages import Emitter, StagedImage
from fedimg.plan import Scope
from fedimg.promote import Promoter
from fedimg.regions import commercial
from fedimg.results import DummyResults
from fedimg.stage import Stager

STAGING = "us-east-1"
TARGET_RATIO = 1.3
FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": STAGING,
    "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",  # moto reads it when a region's backend starts
}


class SimulatedAws(AwsClients):
    """AwsClients whose EC2 calls take ``latency`` and whose copies take ``copy_seconds``."""

    def __init__(self, session: Any, latency: float, copy_seconds: float) -> None:
        super().__init__(max_attempts=3, session=session)
        self.latency = latency
        self.copy_seconds = copy_seconds
        self.calls: Counter[str] = Counter()
        self.timers: list[threading.Timer] = []
        self._hooked: set[str] = set()
        self._bench_lock = threading.Lock()

    def client(self, service: str, region: str) -> Any:
        client = super().client(service, region)
        with self._bench_lock:
            if f"{service}:{region}" not in self._hooked:
                self._hooked.add(f"{service}:{region}")
                client.meta.events.register(f"before-call.{service}.*", self._slow)
                client.meta.events.register(
                    f"after-call.{service}.CopyImage", self._pending(region)
                )
        return client

    def _slow(self, model: Any, **_: Any) -> None:
        with self._bench_lock:
            self.calls[model.name] += 1
        time.sleep(self.latency)  # a benchmark may sleep: this is the simulated round trip

    def _pending(self, region: str) -> Any:
        def hold(parsed: dict[str, Any], **_: Any) -> None:
            image = ec2_backends[DEFAULT_ACCOUNT_ID][region].amis[parsed["ImageId"]]
            image.state = "pending"

            def done() -> None:
                image.state = "available"

            timer = threading.Timer(self.copy_seconds, done)
            timer.daemon = True
            with self._bench_lock:
                self.timers.append(timer)
            timer.start()

        return hold


@dataclass(frozen=True)
class Run:
    label: str
    regions: int
    wall: float
    calls: int
    copies: int
    peak: int
    released: bool


def stage_ami(session: Any) -> str:
    ec2 = session.client("ec2", region_name=STAGING)
    image = StagedImage(
        compose_id="Fedora-Cloud-41-20261124.0",
        image_name="Fedora-Cloud-Base-Generic-41-20261124.0.x86_64",
        image_url="https://kojipkgs.test/f41.raw.xz",
        architecture="x86_64",
        region=STAGING,
        subvariant="Cloud_Base",
        release="41",
    )
    vol = ec2.create_volume(Size=5, AvailabilityZone=f"{STAGING}a")
    snap = ec2.create_snapshot(VolumeId=vol["VolumeId"])["SnapshotId"]
    ami = ec2.register_image(
        Name="Fedora-Cloud-Base-Generic-41-20261124.0.x86_64-hvm-gp3",
        RootDeviceName="/dev/sda1",
        VirtualizationType="hvm",
        BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": snap}}],
    )["ImageId"]
    values = tags.image_tags(image, tags.State.TESTING, datetime.now(UTC).isoformat())
    ec2.create_tags(Resources=[ami], Tags=tags.as_list(values))
    ec2.create_tags(Resources=[snap], Tags=tags.as_list(values))
    return ami


def promote_once(
    label: str, regions: list[str], args: argparse.Namespace, session: Any, concurrency: int = 25
) -> Run:
    with mock_aws():
        ami = stage_ami(session)
        cfg = FedimgConfig.from_fedmsg(
            {
                "fedimg.resultsdb_url": "http://resultsdb.test/api/v2.0",
                "fedimg.aws.staging_region": STAGING,
                "fedimg.aws.regions": regions,
                "fedimg.promote.max_concurrent_copies": concurrency,
            }
        )
        results = DummyResults()
        results.add(ami, "autocloud.ami.all", "PASSED")
        aws = SimulatedAws(session, args.latency_ms / 1000, args.copy_seconds)
        # Warm the clients (model load, moto's region backends) outside the timing.
        for region in [STAGING, *regions]:
            aws.ec2(region).describe_regions(RegionNames=[region])
        aws.calls.clear()
        sent: list[str] = []
        emitter = Emitter(lambda m, t, b: sent.append(f"{m}.{t}"))
        promoter = Promoter(
            cfg,
            emitter,
            aws,
            timing=Timing(
                copy_timeout=args.copy_seconds * 20 + 60,
                retry_timeout=60,
                poll_interval=args.poll,
                backoff_initial=args.poll,
                backoff_max=args.poll * 4,
            ),
        )
        state_dir = Path(tempfile.mkdtemp(prefix="fedimg-bench-"))
        engine = Engine(
            cfg,
            stager=Stager(cfg, emitter, aws, requests.Session()),
            promoter=promoter,
            results=results,
            intents=IntentStore(state_dir),
            guard=Guard(state_dir),
        )
        started = time.perf_counter()
        decision = engine.converge_ami(ami, Scope.MESSAGE)
        wall = time.perf_counter() - started
        for timer in aws.timers:
            timer.cancel()
        state = tags.state_of(
            boto3.client("ec2", region_name=STAGING).describe_images(ImageIds=[ami])["Images"][0]
        )
        return Run(
            label,
            len(regions),
            wall,
            sum(aws.calls.values()),
            aws.calls["CopyImage"],
            promoter.slots.peak,
            decision.action == "release" and state is tags.State.RELEASED,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copy-seconds", type=float, default=5.0, help="simulated copy time")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="added per EC2 call")
    parser.add_argument("--poll", type=float, default=0.5, help="copy state poll interval (s)")
    parser.add_argument("--no-serial", action="store_true", help="skip the serial reference")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.update(FAKE_ENV)  # never a real account, never a moto_server
    for key in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        os.environ.pop(key, None)

    session = boto3.session.Session()
    with mock_aws():
        listed = session.client("ec2", region_name=STAGING).describe_regions()["Regions"]
    everywhere = [r for r in commercial(listed) if r != STAGING]
    eight = [
        "eu-west-1",
        "us-west-2",
        "ap-southeast-2",
        "eu-central-1",
        "ap-northeast-1",
        "sa-east-1",
        "ca-central-1",
        "us-east-2",
    ]
    plan = [("N=1", ["eu-west-1"]), ("N=8", eight), (f"N=all ({len(everywhere)})", everywhere)]

    print(
        f"copy time {args.copy_seconds:g}s, latency {args.latency_ms:g} ms/call, "
        f"poll {args.poll:g}s, moto in process, python {sys.version.split()[0]}"
    )
    runs = [promote_once(label, regions, args, session) for label, regions in plan]
    if not args.no_serial:
        runs.append(promote_once("N=8 serial (1 copy at a time)", eight, args, session, 1))
    base = runs[0].wall
    print(
        f"{'run':<32} {'regions':>7} {'wall s':>8} {'x N=1':>7} {'calls':>6} "
        f"{'copies':>6} {'peak':>5} released"
    )
    for run in runs:
        print(
            f"{run.label:<32} {run.regions:>7} {run.wall:>8.2f} {run.wall / base:>7.2f} "
            f"{run.calls:>6} {run.copies:>6} {run.peak:>5} {run.released}"
        )
    ratio = runs[2].wall / base
    ok = ratio <= TARGET_RATIO and all(r.released for r in runs)
    print(
        f"wall(all)/wall(1) = {ratio:.2f} (target <= {TARGET_RATIO}): {'met' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
