"""``fedimg status``: every staged AMI, its state, its test outcomes and its copies.

``fedimg status --stream``: what ``fedimg prune`` would keep and remove, by stream.

Read-only. AWS (the staging region's fedimg tags, and the copies in every
target region found by their ``fedimg:source-ami`` tag) and ResultsDB are
the only sources; a ResultsDB outage shows as ``?`` instead of failing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

from botocore.exceptions import BotoCoreError, ClientError

from fedimg import tags
from fedimg.aws import AwsClients
from fedimg.config import FedimgConfig
from fedimg.copies import Ec2Factory, describe_error
from fedimg.intents import IntentError, IntentStore
from fedimg.messages import RESULTSDB_ITEM_TYPE
from fedimg.observe import staged_amis
from fedimg.plan import compose_progress
from fedimg.prune import PolicyRefused, PrunePlan
from fedimg.regions import target_regions
from fedimg.results import ResultsSource, ResultsUnavailable

log = logging.getLogger(__name__)

COLUMNS = ("AMI", "NAME", "COMPOSE", "ARCH", "STATE", "TESTS", "COPIES")
_FILTER_CHUNK = 100  # ids per describe_images filter value list


@dataclass(frozen=True)
class Copy:
    region: str
    ami_id: str
    state: str
    public: bool


@dataclass(frozen=True)
class Row:
    """One staged AMI as ``fedimg status`` shows it."""

    ami_id: str
    name: str
    compose_id: str
    arch: str
    state: str
    tests: str
    copies: tuple[Copy, ...]
    targets: int


def tests_cell(outcomes: Mapping[str, str] | None) -> str:
    """``testcase=OUTCOME`` pairs, ``-`` when there are none, ``?`` if ResultsDB is down."""
    if outcomes is None:
        return "?"
    if not outcomes:
        return "-"
    return " ".join(f"{tc}={outcome}" for tc, outcome in sorted(outcomes.items()))


def copies_cell(row: Row) -> str:
    public = sum(1 for c in row.copies if c.public)
    return f"{len(row.copies)}/{row.targets} ({public} public)"


def render(rows: Sequence[Row]) -> str:
    """The table, then one line per copy, as plain text."""
    cells = [COLUMNS] + [
        (r.ami_id, r.name, r.compose_id, r.arch, r.state, r.tests, copies_cell(r)) for r in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
    ]
    for row in rows:
        if row.copies:
            lines.append("")
            lines.append(f"{row.ami_id} copies:")
            for copy in row.copies:
                public = "public" if copy.public else "private"
                lines.append(f"  {copy.region:<16} {copy.ami_id}  {copy.state}  {public}")
    return "\n".join(lines)


def collect(
    cfg: FedimgConfig, aws: Ec2Factory, results: ResultsSource, compose_id: str | None = None
) -> list[Row]:
    """The rows of ``fedimg status`` (AWS errors propagate; ResultsDB errors show as ``?``)."""
    ec2 = aws.ec2(cfg.staging_region)
    images = staged_amis(ec2)
    if compose_id:
        images = [
            i for i in images if tags.as_dict(i.get("Tags")).get(tags.COMPOSE_ID) == compose_id
        ]
    ids = [i["ImageId"] for i in images]
    regions = target_regions(cfg, ec2)
    copies_by_source: dict[str, list[Copy]] = {ami: [] for ami in ids}
    for source, copy in _copies(aws, regions, ids):
        copies_by_source.setdefault(source, []).append(copy)
    rows = []
    for image in images:
        ami_id = image["ImageId"]
        t = tags.as_dict(image.get("Tags"))
        try:
            latest = results.latest(ami_id, item_type=RESULTSDB_ITEM_TYPE)
            outcomes: dict[str, str] | None = {tc: r.outcome for tc, r in latest.items()}
        except ResultsUnavailable as exc:
            log.warning("%s %s: ResultsDB unavailable: %s", t.get(tags.COMPOSE_ID), ami_id, exc)
            outcomes = None
        rows.append(
            Row(
                ami_id=ami_id,
                name=str(image.get("Name", "")),
                compose_id=t.get(tags.COMPOSE_ID, "?"),
                arch=t.get(tags.ARCH, "?"),
                state=t.get(tags.STATE, "?"),
                tests=tests_cell(outcomes),
                copies=tuple(sorted(copies_by_source.get(ami_id, []), key=lambda c: c.region)),
                targets=len(regions),
            )
        )
    return rows


def _copies(
    aws: Ec2Factory, regions: Sequence[str], ami_ids: Sequence[str]
) -> list[tuple[str, Copy]]:
    """``(source ami, copy)`` for every copy of ``ami_ids`` in ``regions``, in parallel."""

    def in_region(region: str) -> list[tuple[str, Copy]]:
        found = []
        for start in range(0, len(ami_ids), _FILTER_CHUNK):
            chunk = list(ami_ids[start : start + _FILTER_CHUNK])
            images = aws.ec2(region).describe_images(
                Owners=["self"], Filters=[{"Name": f"tag:{tags.SOURCE_AMI}", "Values": chunk}]
            )["Images"]
            for image in images:
                source = tags.as_dict(image.get("Tags")).get(tags.SOURCE_AMI, "")
                copy = Copy(
                    region,
                    image["ImageId"],
                    str(image.get("State", "?")),
                    bool(image.get("Public")),
                )
                found.append((source, copy))
        return found

    if not regions or not ami_ids:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(regions))) as pool:
        return [pair for found in pool.map(in_region, regions) for pair in found]


def render_plan(plan: PrunePlan, *, removals: bool = False) -> str:
    """A prune plan by stream: every lineage kept or removed, newest first, and why.

    ``removals``: then every AMI to remove, region by region, in the order of removal.
    """
    lines: list[str] = []
    stream = None
    for v in plan.verdicts:
        if v.stream != stream:
            stream = v.stream
            lines.append(f"{'' if not lines else chr(10)}stream {stream.label}")
        verdict = "remove" if v.remove else "keep"
        lines.append(
            f"  {verdict:<6} {v.compose_id}  {v.source}  {v.state}  "
            f"{len(v.amis)} region(s)  {v.reason}"
        )
    if removals and plan.removals:
        lines += ["", "to remove, in this order:"]
        for r in plan.removals:
            snaps = " ".join(r.snapshots) or "-"
            lines.append(f"  {r.region:<16} {r.ami_id}  {r.compose_id}  snapshots: {snaps}")
    if plan.leftovers:
        lines += ["", "snapshots a stopped prune left:"]
        lines += [f"  {x.region:<16} {x.snapshot_id}  (of {x.ami_id})" for x in plan.leftovers]
    return "\n".join(lines) if lines else "no fedimg AMI in any region"


def cli_status(
    cfg: FedimgConfig,
    compose_id: str | None = None,
    *,
    by_stream: bool = False,
    out: TextIO | None = None,
    aws: Ec2Factory | None = None,
    results: ResultsSource | None = None,
    now: datetime | None = None,
) -> int:
    """``fedimg status [--compose ID] [--stream]``: print the table; 1 if AWS could not be read.

    ``by_stream``: what ``fedimg prune`` would keep and remove, stream by stream, instead.
    """
    import sys

    if aws is None:
        aws = AwsClients(max_attempts=cfg.aws_max_attempts)
    if by_stream:
        from fedimg.upkeep import prune_plan

        try:
            plan = prune_plan(cfg, aws, now or datetime.now(UTC))
        except (ClientError, BotoCoreError) as exc:
            log.error("cannot read AMIs from AWS: %s", describe_error(exc))
            return 1
        except PolicyRefused as exc:
            log.error("the prune policy is refused: %s", exc)
            return 1
        print(render_plan(plan), file=out or sys.stdout)
        return 0
    if results is None:
        from fedimg.results import ResultsDBSource

        results = ResultsDBSource(
            cfg.resultsdb_url, max_retries=cfg.http_retries, timeout=cfg.http_timeout
        )
    try:
        rows = collect(cfg, aws, results, compose_id)
    except (ClientError, BotoCoreError) as exc:
        log.error("cannot read AMIs from AWS: %s", describe_error(exc))
        return 1
    stream = out or sys.stdout
    if not rows:
        print(
            f"no staged AMIs{f' for {compose_id}' if compose_id else ''} in {cfg.staging_region}",
            file=stream,
        )
    else:
        print(render(rows), file=stream)
    pending = pending_composes(IntentStore(cfg.state_dir), compose_id)
    if pending:
        print("\ncomposes still being staged (fedimg.state_dir):", file=stream)
        for line in pending:
            print(f"  {line}", file=stream)
    return 0


def pending_composes(intents: IntentStore, compose_id: str | None = None) -> list[str]:
    """One line per recorded compose intent: what is staged, given up and still to do."""
    lines = []
    for cid in intents.compose_ids():
        if compose_id and cid != compose_id:
            continue
        try:
            intent = intents.get(cid)
        except IntentError as exc:
            lines.append(f"{cid}: unreadable intent: {exc}")
            continue
        if intent is None:
            continue
        if intent.images is None:
            why = f" ({intent.last_error})" if intent.last_error else ""
            lines.append(f"{cid}: metadata not read yet, {intent.read_attempts} tries{why}"[:300])
            continue
        shas = [i.sha256 for i in intent.images]
        progress = compose_progress(shas, dict.fromkeys(intent.staged, True), intent.given_up)
        lines.append(
            f"{cid}: {len(progress.staged)} staged, {len(progress.given_up)} given up, "
            f"{len(progress.pending)} to do, of {len(shas)} image(s)"
        )
    return lines


__all__ = [
    "Copy",
    "Row",
    "cli_status",
    "collect",
    "pending_composes",
    "render",
    "render_plan",
    "tests_cell",
]
