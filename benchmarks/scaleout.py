"""Benchmark: a compose of 12 images through the pipeline, 1, 2 and 4 consumer processes per app.

    .venv/bin/python benchmarks/scaleout.py [--latency-ms 50] [--processes 1 2 4] [--images 12]

For each N, a fresh ``devel.stack.Stack`` over RabbitMQ (one private node
for every run) with N ``fedora-messaging consume`` processes of fedimg and N
of autocloud_ami on their durable queues, moto_server as AWS behind a proxy
that holds every AWS request ``--latency-ms`` (``devel.awsproxy``), the
ResultsDB stand-in and the instance host (two reboots of 0.5 s per test).
The compose (12 raw.xz images of 2-3 MiB, every one passing its tests) is
replayed with ``devel.replay``; the wall time runs from the replay until
every image is released in every region and announced. Also printed: when
the last image was staged (``fedimg.image.upload completed``) and tested
(``autocloud.ami.success``), the AWS requests made, and the speed-up over N = 1.

``--stage-workers`` sets ``fedimg.stage.workers`` (default 3, as the stack);
``--variant threads`` runs N = 1 with ``fedimg.stage.workers`` multiplied by
the largest N instead: what staging gains from more threads in the one
process that took the compose, the alternative to spreading a compose's images
over processes (per-image work items on a queue of fedimg's own).
Exit status 0 when every run settled, 1 otherwise.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devel.awsproxy import RecordingProxy
from devel.bus import Seen
from devel.compose import ImageSpec
from devel.demo import Follower, problems, read_state, wait_settled
from devel.rabbitmq import RabbitMQ
from devel.stack import Stack, StackOptions, stop_on_signals

TIMEOUT = 900.0


def images(count: int) -> tuple[ImageSpec, ...]:
    """``count`` distinct small Base images (Cloud Base x86_64 and aarch64, in turn).

    productmd allows one image per (arch, subvariant, type, format, disc): each
    image of a kind has a disc of its own.
    """
    return tuple(
        ImageSpec(
            "Cloud",
            arch,
            "Cloud_Base",
            raw_mib=2 + n % 2,
            data_blocks=(0, 1 + n % 3),
            name=f"Fedora-Cloud-Base-{n:02d}-40-20240501.0.{arch}.raw.xz",
            seed=500 + n,
            disc_number=1 + n // 2,
        )
        for n, arch in ((n, ("x86_64", "aarch64")[n % 2]) for n in range(count))
    )


@dataclass(frozen=True)
class Run:
    label: str
    processes: int
    stage_workers: int
    wall: float | None  # None: did not settle
    staged_at: float | None
    tested_at: float | None
    aws_requests: int
    problems: tuple[str, ...]


def _last(messages: list[Seen], suffix: str, start: float, status: str | None = None) -> float:
    times = [
        m.at - start
        for m in messages
        if m.topic.endswith(suffix) and (status is None or m.body.get("status") == status)
    ]
    return max(times) if times else float("nan")


def run(
    node: RabbitMQ, label: str, *, processes: int, stage_workers: int, latency: float, count: int
) -> Run:
    proxy = RecordingProxy(delay=latency, keep=False)
    options = StackOptions(
        bus="amqp",
        per_app=processes,
        rabbitmq=node,
        queue_suffix=f"-bench-{uuid.uuid4().hex[:6]}",
        images=images(count),
        fail=(),
        aws_proxy=proxy.attach,
        extra_settings={
            "fedimg.stage.workers": stage_workers,
            "fedimg.reconcile.interval": 3600.0,
            "autocloud_ami.deadline": 900.0,
        },
    )
    with proxy, Stack(options) as stack:
        follower = Follower(stack, io.StringIO())
        before = proxy.count
        start = time.time()
        replayed = stack.replay()
        if replayed.returncode != 0:
            raise RuntimeError(f"devel.replay failed: {replayed.stdout}{replayed.stderr}")
        settled = wait_settled(stack, follower, TIMEOUT)
        wall = time.time() - start
        messages = follower.messages()
        found = problems(read_state(stack), messages)
        return Run(
            label,
            processes,
            stage_workers,
            wall if settled else None,
            _last(messages, "fedimg.image.upload", start, "completed"),
            _last(messages, "autocloud.ami.success", start),
            proxy.count - before,
            tuple(found),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--stage-workers", type=int, default=3)
    parser.add_argument("--variant", choices=["none", "threads"], default="threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # the tap's reconnect noise
    latency = args.latency_ms / 1000.0
    runs: list[Run] = []
    with stop_on_signals(), RabbitMQ() as node:  # SIGTERM unwinds: everything is stopped
        plan = [(f"N={n}", n, args.stage_workers) for n in args.processes]
        if args.variant == "threads":
            most = max(args.processes)
            plan.append((f"N=1, {most}x threads", 1, args.stage_workers * most))
        for label, processes, workers in plan:
            print(
                f"{label}: {args.images} images, {processes} process(es) per app, "
                f"fedimg.stage.workers={workers}, {args.latency_ms:.0f} ms per AWS call ...",
                flush=True,
            )
            runs.append(
                run(
                    node,
                    label,
                    processes=processes,
                    stage_workers=workers,
                    latency=latency,
                    count=args.images,
                )
            )
            last = runs[-1]
            print(
                f"  {last.wall or float('nan'):.1f} s; staged by {last.staged_at:.1f} s, "
                f"tested by {last.tested_at:.1f} s; {last.aws_requests} AWS requests",
                flush=True,
            )
    base = runs[0].wall
    print()
    print(
        f"{'run':<20} {'wall':>8} {'speed-up':>9} {'all staged':>11} {'all tested':>11} "
        f"{'AWS calls':>10}"
    )
    for r in runs:
        speed = f"{base / r.wall:.2f}x" if base and r.wall else "-"
        wall = f"{r.wall:.1f}s" if r.wall else "unsettled"
        print(
            f"{r.label:<20} {wall:>8} {speed:>9} {r.staged_at:>10.1f}s {r.tested_at:>10.1f}s "
            f"{r.aws_requests:>10}"
        )
    failed = [r for r in runs if r.wall is None or r.problems]
    for r in failed:
        print(f"{r.label}: {'; '.join(r.problems) or 'did not settle'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
