"""Benchmark: one AMI test and several at once, on moto + the SSH and ResultsDB stand-ins.

    .venv/bin/python benchmarks/autocloud.py [--boot 5] [--reboot 2] [--concurrent 4]
                                             [--latency-ms 50]

Runs the production path (``autocloud_ami.job.test_ami``: TestInstance on
moto in process, the SSH-banner wait, a paramiko login, the whole SUITE over
SSH, cleanup, every result through ``resultsdb_api`` to the ResultsDB
stand-in) against ``devel.sshhost.SshTestHost`` through ``ssh_override``.
The stand-in is started right before the job and refuses SSH for ``--boot``
seconds (the simulated boot, counted from the job's start, so the launch's
API calls are inside the overhead) and reboots in ``--reboot`` seconds; every EC2 call first sleeps
``--latency-ms`` (a ``before-call`` hook), as a real API call is a round trip.

Prints, for one AMI: the time from the job's start to the first SSH command
and the overhead above the simulated boot (target < 2 s; tunir/gotun slept
60-90 s), the suite's wall time, the whole job; then ``--concurrent`` AMIs at
once (each on its own stand-in, ``max_concurrent`` = that many) against the
same number one after the other. Exit status 0 when the overhead target is met.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

for key, value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}.items():
    os.environ.setdefault(key, value)
os.environ.pop("AWS_ENDPOINT_URL", None)

import boto3  # noqa: E402
from moto import mock_aws  # noqa: E402

from autocloud_ami.config import AutocloudConfig  # noqa: E402
from autocloud_ami.job import Deps, JobResult, test_ami  # noqa: E402
from autocloud_ami.report import OutputStore, ResultsReporter, Spool, make_api  # noqa: E402
from devel.resultsdb import ResultsDBServer  # noqa: E402
from devel.sshhost import SshTestHost  # noqa: E402
from fedimg.aws import AwsClients  # noqa: E402
from fedimg.messages import Emitter, StagedImage  # noqa: E402

REGION = "us-east-1"
COMPOSE = "Fedora-41-20261124.0"


class Lab:
    """moto in process, a ResultsDB stand-in, and one SshTestHost per AMI."""

    def __init__(self, args: argparse.Namespace, workdir: Path, rdb: ResultsDBServer) -> None:
        self.args = args
        self.workdir = workdir
        self.rdb = rdb
        self.aws = AwsClients(max_attempts=2, session=boto3.session.Session())
        self.ec2 = self.aws.ec2(REGION)
        self.hosts: dict[str, SshTestHost] = {}  # ami -> its stand-in
        delay = args.latency_ms / 1000.0
        if delay:
            self.ec2.meta.events.register("before-call.ec2", lambda **_: time.sleep(delay))

    def image(self, n: int) -> StagedImage:
        name = f"Fedora-Cloud-Base-41-20261124.0.x86_64.{n}"
        ami = self.ec2.register_image(Name=name, RootDeviceName="/dev/sda1")["ImageId"]
        self.hosts[ami] = SshTestHost(
            family="Base",
            accept_any_key=True,
            boot_delay=self.args.boot,
            reboot_delay=self.args.reboot,
        )
        return StagedImage(
            compose_id=COMPOSE,
            image_name=name,
            image_url=f"https://kojipkgs.fedoraproject.org/compose/41/{COMPOSE}/compose/"
            f"Cloud/x86_64/images/{name}.raw.xz",
            architecture="x86_64",
            region=REGION,
            ami_id=ami,
            subvariant="Cloud_Base",
            release="41",
        )

    def deps(self, port: int, max_concurrent: int) -> Deps:
        cfg = AutocloudConfig.from_fedmsg(
            {
                "autocloud_ami.resultsdb_url": self.rdb.url,
                "autocloud_ami.ssh_cidr": "203.0.113.7/32",
                "autocloud_ami.ssh_override": f"127.0.0.1:{port}",
                "autocloud_ami.regions": [REGION],
                "autocloud_ami.host_key_wait": 0.0,
                "autocloud_ami.poll_interval": 0.5,
                "autocloud_ami.launch_retry_timeout": 0.0,
                "autocloud_ami.max_concurrent": max_concurrent,
                "autocloud_ami.resultsdb_spool": str(self.workdir / "spool"),
                "autocloud_ami.output_dir": str(self.workdir / "out"),
            }
        )
        return Deps(
            cfg=cfg,
            aws=self.aws,
            reporter=ResultsReporter(make_api(self.rdb.url), Spool(cfg.resultsdb_spool)),
            emitter=Emitter(lambda modname, topic, body: None),
            output=OutputStore(self.workdir / "out"),
            slots=threading.BoundedSemaphore(max_concurrent),
            retry_backoff=1.0,
        )

    def close(self) -> None:
        for host in self.hosts.values():
            host.stop()


def one(
    lab: Lab, n: int, slots: threading.BoundedSemaphore | None = None
) -> tuple[JobResult, float]:
    image = lab.image(n)
    assert image.ami_id is not None
    host = lab.hosts[image.ami_id]
    start = time.monotonic()
    host.start()  # the instance starts booting now
    deps = lab.deps(host.port, 1)
    if slots is not None:
        deps.slots = slots
    result = test_ami(image, deps)
    return result, start


def report_one(result: JobResult, boot: float) -> float:
    t = result.timings
    first_ssh = t["ssh_connected"]
    overhead = first_ssh - boot
    print(f"  verdict                          {'PASSED' if result.passed else 'FAILED'}")
    print(f"  instance running at              {t['instance_running']:6.2f} s")
    print(f"  SSH banner at                    {t['ssh_port']:6.2f} s")
    print(f"  first SSH command at             {first_ssh:6.2f} s")
    print(f"  overhead above the {boot:.0f} s boot      {overhead:6.2f} s   (target < 2 s)")
    print(f"  suite wall time                  {t['suite_done'] - first_ssh:6.2f} s")
    print(f"  cleanup done at                  {t['cleaned_up']:6.2f} s")
    print(f"  results posted at                {t['reported']:6.2f} s  ({len(result.results)})")
    return overhead


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boot", type=float, default=5.0, help="simulated boot, seconds")
    parser.add_argument("--reboot", type=float, default=2.0, help="simulated reboot, seconds")
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")

    with (
        tempfile.TemporaryDirectory(prefix="autocloud-bench-") as tmp,
        mock_aws(),
        ResultsDBServer() as rdb,
    ):
        lab = Lab(args, Path(tmp), rdb)
        try:
            print(
                f"one AMI (boot {args.boot} s, reboot {args.reboot} s, "
                f"EC2 latency {args.latency_ms} ms)"
            )
            result, _ = one(lab, 0)
            overhead = report_one(result, args.boot)

            n = args.concurrent
            shared = threading.BoundedSemaphore(n)
            results: list[JobResult] = []
            threads = [
                threading.Thread(target=lambda i=i: results.append(one(lab, i, shared)[0]))
                for i in range(1, n + 1)
            ]
            t0 = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            concurrent_wall = time.monotonic() - t0

            t0 = time.monotonic()
            serial = [one(lab, i)[0] for i in range(n + 1, 2 * n + 1)]
            serial_wall = time.monotonic() - t0
            passed = sum(r.passed for r in results + serial)
            print(f"\n{n} AMIs at once (max_concurrent={n})      {concurrent_wall:6.2f} s")
            print(f"{n} AMIs one after the other           {serial_wall:6.2f} s")
            print(f"speed-up                               {serial_wall / concurrent_wall:6.2f} x")
            print(f"jobs PASSED                            {passed} / {2 * n}")
        finally:
            lab.close()
    ok = overhead < 2.0
    print(f"\noverhead target {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
