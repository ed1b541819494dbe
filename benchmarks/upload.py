"""Benchmark: stream a sparse .raw.xz over HTTP into an EBS snapshot on a real moto_server.

    .venv/bin/python benchmarks/upload.py [--size-gib 4] [--workers 16] [--data-mib 256]

Builds a sparse disk image (mostly zeros; runs of incompressible and of
text-like blocks, ``--data-mib`` of data in all: moto_server keeps every
block in memory), compresses it with ``xz -T0``, serves it from a loopback
HTTP server, starts ``moto_server`` on a free port and runs the production
path: probe_raw_size + stream_raw + upload_snapshot through AwsClients with
AWS_ENDPOINT_URL. Then reads every block back from moto to check it, and
times ``xz -dc FILE > /dev/null`` on the same file for comparison.

Targets: upload rate >= 0.9 x the xz -dc rate, peak RSS < 300 MiB, blocks
sent == non-zero blocks. Exit status 0 when all are met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from devel.images import BLOCK, ImageFacts, ImageServer, Route, build_raw_xz, sparse_layout
from devel.motoserver import MotoServer
from fedimg.aws import AwsClients
from fedimg.download import probe_raw_size, stream_raw
from fedimg.http import make_session
from fedimg.snapshot import SnapshotUpload, upload_snapshot

MIB = 1 << 20
REGION = "us-east-1"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mib() -> float:
    return float(psutil.Process().memory_info().rss) / MIB


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_xz_dc(path: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of ``xz -dc FILE > /dev/null``."""
    cpu, started = children_cpu(), time.perf_counter()
    subprocess.run(["xz", "-dc", str(path)], stdout=subprocess.DEVNULL, check=True, timeout=3600)
    return time.perf_counter() - started, children_cpu() - cpu


def moto_cpu() -> float:
    """CPU seconds used so far by the moto_server child (the AWS stand-in)."""
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            if "moto" in " ".join(child.cmdline()):
                times = child.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            continue
    return total


def cached_image(directory: Path, size_gib: float, data_mib: int, preset: int) -> ImageFacts:
    """The image for these parameters from ``directory``, built and saved there if missing."""
    stem = f"bench-{size_gib:g}g-{data_mib}m-xz{preset}"
    path, meta = directory / f"{stem}.raw.xz", directory / f"{stem}.json"
    if path.exists() and meta.exists():
        saved = json.loads(meta.read_text())
        print(f"image: reusing {path}")
        return ImageFacts(
            path=path,
            raw_size=saved["raw_size"],
            sha256=saved["sha256"],
            compressed_size=saved["compressed_size"],
            nonzero_blocks=tuple(saved["nonzero_blocks"]),
            block_digests={int(k): v for k, v in saved["block_digests"].items()},
        )
    facts = build_image(directory, size_gib, data_mib, preset, name=path.name)
    saved = {
        "raw_size": facts.raw_size,
        "sha256": facts.sha256,
        "compressed_size": facts.compressed_size,
        "nonzero_blocks": list(facts.nonzero_blocks),
        "block_digests": facts.block_digests,
    }
    meta.write_text(json.dumps(saved))
    return facts


def build_image(
    directory: Path, size_gib: float, data_mib: int, preset: int, name: str = "bench.raw.xz"
) -> ImageFacts:
    raw_size = int(size_gib * (1 << 30))
    layout = sparse_layout(raw_size, data_mib * MIB / raw_size, 0.5, seed=42)
    started = time.perf_counter()
    facts = build_raw_xz(directory / name, raw_size, layout, preset=preset, xz_threads=0)
    print(
        f"image: {raw_size / MIB:.0f} MiB raw, {len(facts.nonzero_blocks)} non-zero blocks "
        f"({len(facts.nonzero_blocks) * BLOCK / MIB:.0f} MiB: "
        f"{len(layout.random_indices)} random, {len(layout.compressible_indices)} text), "
        f"{facts.compressed_size / MIB:.1f} MiB xz -{preset} "
        f"(built in {time.perf_counter() - started:.1f} s)"
    )
    return facts


def verify(ebs: Any, snapshot_id: str, facts: ImageFacts) -> list[str]:
    """Every block moto stored, against the image: a list of problems (empty: all good)."""
    listed: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"SnapshotId": snapshot_id}
    while True:
        page = ebs.list_snapshot_blocks(**kwargs)
        listed += page["Blocks"]
        if not page.get("NextToken"):
            break
        kwargs["NextToken"] = page["NextToken"]
    problems = []
    indices = sorted(b["BlockIndex"] for b in listed)
    if indices != list(facts.nonzero_blocks):
        problems.append(f"stored blocks {len(indices)} != non-zero blocks")
    for block in listed:
        data = ebs.get_snapshot_block(
            SnapshotId=snapshot_id, BlockIndex=block["BlockIndex"], BlockToken=block["BlockToken"]
        )["BlockData"].read()
        if hashlib.sha256(data).hexdigest() != facts.block_digests.get(block["BlockIndex"]):
            problems.append(f"block {block['BlockIndex']} differs")
    return problems


class FakeAws:
    """An EBS + EC2 stand-in costing no CPU: each put waits ``latency`` and keeps a digest.

    ``--aws fake`` measures fedimg's own pipeline (download, decompression,
    re-blocking, the writer pool) without moto_server and botocore competing
    for the same cores.
    """

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.digests: dict[int, str] = {}

    def start_snapshot(self, **_: Any) -> dict[str, Any]:
        self.digests = {}
        return {"SnapshotId": "snap-0fa4e0000000000000", "Status": "pending"}

    def put_snapshot_block(self, BlockIndex: int, BlockData: bytes, **_: Any) -> dict[str, Any]:
        time.sleep(self.latency)
        self.digests[BlockIndex] = hashlib.sha256(BlockData).hexdigest()
        return {}

    def complete_snapshot(self, **_: Any) -> dict[str, Any]:
        return {"Status": "completed"}

    def describe_snapshots(self, SnapshotIds: list[str]) -> dict[str, Any]:
        return {"Snapshots": [{"SnapshotId": SnapshotIds[0], "State": "completed"}]}

    def delete_snapshot(self, **_: Any) -> None:
        self.digests = {}

    def verify(self, facts: ImageFacts) -> list[str]:
        if self.digests != facts.block_digests:
            return ["stored blocks differ from the image's non-zero blocks"]
        return []


def aws_clients(workers: int, fake: FakeAws | None) -> tuple[Any, Any]:
    if fake is not None:
        return fake, fake
    clients = AwsClients(max_pool_connections=max(64, workers))
    ebs, ec2 = clients.ebs(REGION), clients.ec2(REGION)
    # moto_server imports its EC2/EBS backends on first use (about a second): not timed.
    ec2.delete_snapshot(SnapshotId=ebs.start_snapshot(VolumeSize=1)["SnapshotId"])
    return ebs, ec2


def run_upload(
    url: str,
    facts: ImageFacts,
    workers: int,
    chunk_size: int = 256 * 1024,
    fake: FakeAws | None = None,
) -> tuple[SnapshotUpload, float, float]:
    """(result, wall seconds, CPU seconds of the reading thread)."""
    ebs, ec2 = aws_clients(workers, fake)
    session = make_session(retries=3, timeout=60)
    started, thread_cpu = time.perf_counter(), time.thread_time()
    raw_size = probe_raw_size(session, url, log_context="bench")
    result = upload_snapshot(
        ebs,
        ec2,
        stream_raw(session, url, facts.sha256, raw_size, chunk_size, log_context="bench"),
        raw_size,
        workers=workers,
        description="fedimg upload benchmark",
        tags={"fedimg:benchmark": "upload"},
        client_token=f"bench-{os.getpid()}-{time.time_ns()}",
        log_context="bench",
    )
    return result, time.perf_counter() - started, time.thread_time() - thread_cpu


@dataclass
class Rounds:
    """Times of every round; the best of each is compared (the machine may be shared)."""

    uploads: list[float] = field(default_factory=list)
    upload_cpu: list[float] = field(default_factory=list)  # the reading (main) thread
    process_cpu: list[float] = field(default_factory=list)  # every thread of this process
    moto_cpu: list[float] = field(default_factory=list)
    xz: list[float] = field(default_factory=list)
    xz_cpu: list[float] = field(default_factory=list)
    results: list[SnapshotUpload] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def run_rounds(facts: ImageFacts, args: argparse.Namespace) -> tuple[Rounds, float, str]:
    """xz -dc, then the upload, ``--repeat`` times; (rounds, RSS before, profile text)."""
    rounds = Rounds()
    profile = ""
    fake = FakeAws(args.fake_latency / 1000) if args.aws == "fake" else None
    with ImageServer() as server, MotoServer() as moto:
        os.environ.update(moto.env())
        url = server.add("bench.raw.xz", Route(facts.path))
        rss_before = rss_mib()
        for n in range(args.repeat):
            wall, cpu = time_xz_dc(facts.path)  # also warms the page cache for both
            rounds.xz.append(wall)
            rounds.xz_cpu.append(cpu)
            profiler = cProfile.Profile() if args.profile and n == 0 else None
            if profiler:
                profiler.enable()
            moto_before, times_before = moto_cpu(), os.times()
            result, elapsed, main_cpu = run_upload(
                url, facts, args.workers, args.chunk_kib * 1024, fake
            )
            times_after = os.times()
            rounds.moto_cpu.append(moto_cpu() - moto_before)
            rounds.upload_cpu.append(main_cpu)
            rounds.process_cpu.append(
                times_after.user + times_after.system - times_before.user - times_before.system
            )
            if profiler:
                profiler.disable()
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(20)
                profile = out.getvalue()
            rounds.uploads.append(elapsed)
            rounds.results.append(result)
            if fake is not None:
                rounds.problems += fake.verify(facts)
            else:
                rounds.problems += verify(AwsClients().ebs(REGION), result.snapshot_id, facts)
            print(
                f"round {n + 1}: xz -dc {wall:.2f} s ({cpu:.2f} s CPU), upload {elapsed:.2f} s "
                f"({main_cpu:.2f} s CPU reading thread, {rounds.process_cpu[-1]:.2f} s process, "
                f"moto_server {rounds.moto_cpu[-1]:.2f} s)"
            )
            moto.reset()  # moto_server holds every block in memory
    return rounds, rss_before, profile


def report(facts: ImageFacts, rounds: Rounds, rss_before: float, args: argparse.Namespace) -> bool:
    peak = peak_rss_mib()
    elapsed, xz_time = min(rounds.uploads), min(rounds.xz)
    result = rounds.results[rounds.uploads.index(elapsed)]
    raw_mb = facts.raw_size / 1e6
    sent_mb = result.blocks_sent * BLOCK / 1e6
    upload_rate, xz_rate = raw_mb / elapsed, raw_mb / xz_time
    ratio = upload_rate / xz_rate
    blocks_ok = (
        all(r.blocks_sent == len(facts.nonzero_blocks) for r in rounds.results)
        and not rounds.problems
    )
    every = ", ".join(f"{t:.2f}" for t in rounds.uploads)
    every_xz = ", ".join(f"{t:.2f}" for t in rounds.xz)
    aws = "moto_server" if args.aws == "moto" else f"fake AWS, {args.fake_latency:g} ms per block"
    print(f"workers: {args.workers}, chunks: {args.chunk_kib} KiB, AWS: {aws}")
    print(f"upload: {elapsed:.2f} s, {upload_rate:.0f} MB/s raw, {sent_mb / elapsed:.0f} MB/s sent")
    print(f"        every round: {every} s")
    print(f"xz -dc: {xz_time:.2f} s, {xz_rate:.0f} MB/s raw; every round: {every_xz} s")
    print(f"ratio upload/xz (best of each): {ratio:.2f} (target >= 0.90)")
    cpu_ratio = min(rounds.xz_cpu) / min(rounds.upload_cpu)
    print(
        f"CPU: xz -dc {min(rounds.xz_cpu):.2f} s, upload reading thread "
        f"{min(rounds.upload_cpu):.2f} s: ratio {cpu_ratio:.2f}; whole process "
        f"{min(rounds.process_cpu):.2f} s, moto_server {min(rounds.moto_cpu):.2f} s; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(f"peak RSS: {peak:.0f} MiB (before the uploads {rss_before:.0f} MiB; target < 300)")
    print(
        f"blocks: {result.blocks_sent} sent, {len(facts.nonzero_blocks)} non-zero, "
        f"{result.blocks_total} in all; stored blocks checked: "
        f"{'all match' if not rounds.problems else '; '.join(rounds.problems[:5])}"
    )
    met = ratio >= 0.9 and peak < 300 and blocks_ok
    print("targets:", "met" if met else "MISSED")
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size-gib", type=float, default=4.0, help="raw image size (4)")
    parser.add_argument("--workers", type=int, default=16, help="block writer threads (16)")
    parser.add_argument("--data-mib", type=int, default=256, help="non-zero data (256)")
    parser.add_argument("--preset", type=int, default=6, help="xz preset (6, xz's default)")
    parser.add_argument("--chunk-kib", type=int, default=256, help="stream_raw chunk size (256)")
    parser.add_argument(
        "--aws",
        choices=("moto", "fake"),
        default="moto",
        help="moto: a real moto_server (default); fake: a no-CPU stand-in (see FakeAws)",
    )
    parser.add_argument(
        "--fake-latency", type=float, default=20.0, help="ms per block with --aws fake (20)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds; best of each counts (3)")
    parser.add_argument("--profile", action="store_true", help="cProfile the first upload")
    parser.add_argument(
        "--cache-dir", type=Path, help="keep the built image here and reuse it on later runs"
    )
    args = parser.parse_args(argv)
    if shutil.which("xz") is None:
        print("needs the xz binary", file=sys.stderr)
        return 2

    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}")
    workdir = Path(tempfile.mkdtemp(prefix="fedimg-bench-"))
    try:
        if args.cache_dir:
            args.cache_dir.mkdir(parents=True, exist_ok=True)
            facts = cached_image(args.cache_dir, args.size_gib, args.data_mib, args.preset)
        else:
            facts = build_image(workdir, args.size_gib, args.data_mib, args.preset)
        rounds, rss_before, profile = run_rounds(facts, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    met = report(facts, rounds, rss_before, args)
    if profile:
        print(profile)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
