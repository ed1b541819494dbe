"""``fedimg status``: every staged AMI, its state, its test outcomes and its copies.

``fedimg status --stream``: what ``fedimg prune`` would keep and remove, by stream.

Read-only. AWS (the staging region's fedimg tags, and the copies in every
target region found by their ``fedimg:source-ami`` tag), ResultsDB and
WaiverDB are the only sources; a ResultsDB or WaiverDB outage shows as ``?``
instead of failing. Outcomes are shown per scenario (``testcase[scenario]``
for results that name one); below the table, every AMI's waivers and its
state history (``fedimg:history``: who or what moved it, when), then one line
per region it is in (the staging region first): the AMI there, its EC2 state,
whether it is public and when it is (or was) deprecated.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from botocore.exceptions import BotoCoreError, ClientError

from fedimg import tags
from fedimg.aws import AwsClients
from fedimg.config import FedimgConfig
from fedimg.copies import Ec2Factory, describe_error
from fedimg.facts import parse_when
from fedimg.intents import IntentError, IntentStore
from fedimg.messages import RESULTSDB_ITEM_TYPE
from fedimg.observe import staged_amis
from fedimg.plan import compose_progress
from fedimg.prune import PolicyRefused, PrunePlan
from fedimg.regions import target_regions
from fedimg.results import ResultsSource, ResultsUnavailable
from fedimg.waivers import (
    NoWaivers,
    WaiverSource,
    WaiversUnavailable,
    waived_testcases,
    waiver_source,
)

log = logging.getLogger(__name__)

COLUMNS = ("AMI", "NAME", "COMPOSE", "ARCH", "STATE", "TESTS", "COPIES")
_FILTER_CHUNK = 100  # ids per describe_images filter value list


@dataclass(frozen=True)
class Copy:
    """The AMI in one region (a copy, or the staging AMI itself)."""

    region: str
    ami_id: str
    state: str
    public: bool
    deprecation: str = ""  # EC2's DeprecationTime; "" when the AMI has none


def copy_of(region: str, image: Mapping[str, Any]) -> Copy:
    """A described image as a ``Copy`` line."""
    return Copy(
        region,
        str(image["ImageId"]),
        str(image.get("State", "?")),
        bool(image.get("Public")),
        deprecation_cell(image.get("DeprecationTime")),
    )


def deprecation_cell(value: Any) -> str:
    """``2028-11-24T17:00Z`` from EC2's DeprecationTime, "" when there is none."""
    when = parse_when(value)
    return when.strftime("%Y-%m-%dT%H:%MZ") if when is not None else ""


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
    waivers: tuple[str, ...] | None = ()  # None: WaiverDB could not be asked
    history: tuple[tuple[str, str, str], ...] = ()  # (state, when, who)
    staging: Copy | None = None  # the staging AMI, as a line of its own


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
        if row.waivers is None:
            lines += ["", f"{row.ami_id} waivers: ? (WaiverDB unavailable)"]
        elif row.waivers:
            lines += ["", f"{row.ami_id} waivers:"] + [f"  {w}" for w in row.waivers]
        if row.history:
            lines += ["", f"{row.ami_id} history:"]
            lines += [f"  {when}  {state:<10} {who}" for state, when, who in row.history]
        if row.copies or (
            row.staging is not None and (row.staging.public or row.staging.deprecation)
        ):
            lines.append("")
            lines.append(f"{row.ami_id} by region (staging first):")
            for copy in ([row.staging] if row.staging else []) + list(row.copies):
                public = "public" if copy.public else "private"
                deprecation = f"  deprecated {copy.deprecation}" if copy.deprecation else ""
                lines.append(
                    f"  {copy.region:<16} {copy.ami_id}  {copy.state}  {public}{deprecation}"
                )
    return "\n".join(lines)


def collect(
    cfg: FedimgConfig,
    aws: Ec2Factory,
    results: ResultsSource,
    compose_id: str | None = None,
    *,
    waivers: WaiverSource | None = None,
    ami_id: str | None = None,
) -> list[Row]:
    """The rows of ``fedimg status`` (AWS errors propagate; ResultsDB errors show as ``?``)."""
    ec2 = aws.ec2(cfg.staging_region)
    images = staged_amis(ec2)
    if compose_id:
        images = [
            i for i in images if tags.as_dict(i.get("Tags")).get(tags.COMPOSE_ID) == compose_id
        ]
    if ami_id:
        images = [i for i in images if i["ImageId"] == ami_id]
    ids = [i["ImageId"] for i in images]
    regions = target_regions(cfg, ec2)
    copies_by_source: dict[str, list[Copy]] = {ami: [] for ami in ids}
    for source, copy in _copies(aws, regions, ids):
        copies_by_source.setdefault(source, []).append(copy)
    rows = []
    for image in images:
        ami = image["ImageId"]
        t = tags.as_dict(image.get("Tags"))
        rows.append(
            Row(
                ami_id=ami,
                name=str(image.get("Name", "")),
                compose_id=t.get(tags.COMPOSE_ID, "?"),
                arch=t.get(tags.ARCH, "?"),
                state=t.get(tags.STATE, "?"),
                tests=tests_cell(_outcomes(results, ami, t)),
                copies=tuple(sorted(copies_by_source.get(ami, []), key=lambda c: c.region)),
                targets=len(regions),
                waivers=_waivers(waivers or NoWaivers(), ami, t),
                history=tuple(tags.history_of(t.get(tags.HISTORY, ""))),
                staging=copy_of(cfg.staging_region, image),
            )
        )
    return rows


def _outcomes(results: ResultsSource, ami: str, t: Mapping[str, str]) -> dict[str, str] | None:
    """``testcase`` or ``testcase[scenario]`` -> the newest outcome; None if ResultsDB is down."""
    try:
        latest = results.latest_by_scenario(ami, item_type=RESULTSDB_ITEM_TYPE)
    except ResultsUnavailable as exc:
        log.warning("%s %s: ResultsDB unavailable: %s", t.get(tags.COMPOSE_ID), ami, exc)
        return None
    return {
        (f"{tc}[{scenario}]" if scenario else tc): r.outcome for (tc, scenario), r in latest.items()
    }


def _waivers(source: WaiverSource, ami: str, t: Mapping[str, str]) -> tuple[str, ...] | None:
    try:
        return tuple(waived_testcases(source.waivers(ami)))
    except WaiversUnavailable as exc:
        log.warning("%s %s: WaiverDB unavailable: %s", t.get(tags.COMPOSE_ID), ami, exc)
        return None


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
                found.append((source, copy_of(region, image)))
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
    waivers: WaiverSource | None = None,
    ami_id: str | None = None,
    now: datetime | None = None,
) -> int:
    """``fedimg status [--compose ID] [AMI] [--stream]``: print the table; 1 if AWS could
    not be read.

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
    if waivers is None:
        waivers = waiver_source(cfg)
    try:
        rows = collect(cfg, aws, results, compose_id, waivers=waivers, ami_id=ami_id)
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
