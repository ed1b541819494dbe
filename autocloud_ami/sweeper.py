"""The leak sweeper: nothing tagged ``autocloud:ami-test`` outlives its deadline.

A runner that crashed, was killed or lost AWS during cleanup leaves tagged
instances, key pairs and security groups behind. ``sweep_region`` finds every
such resource whose ``autocloud:deadline`` has passed (or, when the tag is
missing or unreadable, whose creation is older than the configured lifetime)
and removes it: instances are terminated first, then key pairs, then security
groups (a group still held by a terminating instance is left for the next
sweep). Resources of runs still inside their deadline are never touched.

``sweep(aws, regions, ...)`` runs at hub start-up and every
``autocloud_ami.sweep_interval`` (``consumer.SweepProducer``), and by hand as
``autocloud-ami sweep``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from autocloud_ami.instance import (
    NOT_FOUND_CODES,
    TAG_DEADLINE,
    TAG_JOB,
    TAG_TEST,
    CleanupTimeout,
    delete_security_group,
    parse_deadline,
    wait_terminated,
)
from fedimg.aws import error_code

log = logging.getLogger(__name__)

LIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")


@dataclass(frozen=True)
class Tagged:
    """One tagged resource as the sweeper sees it."""

    kind: str  # "instance" | "key-pair" | "security-group"
    resource_id: str
    tags: Mapping[str, str]
    created: datetime | None = None

    @property
    def ami_id(self) -> str:
        return self.tags.get(TAG_TEST, "?")

    @property
    def job_id(self) -> str:
        return self.tags.get(TAG_JOB, "?")


def expired(item: Tagged, now: datetime, lifetime: timedelta) -> bool:
    """Past its ``autocloud:deadline``; without a readable one, older than ``lifetime``.

    A resource with neither a readable deadline nor a creation time (a
    security group) is kept: nothing says its run is over.
    """
    if TAG_TEST not in item.tags:
        return False
    deadline = parse_deadline(item.tags.get(TAG_DEADLINE, ""))
    if deadline is not None:
        return now >= deadline
    if item.created is not None:
        created = item.created if item.created.tzinfo else item.created.replace(tzinfo=UTC)
        return now >= created + lifetime
    return False


def _tags(raw: Iterable[Mapping[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in raw or ()}


@dataclass
class SweepReport:
    """What one sweep removed, per region, and what it could not."""

    terminated: list[str] = field(default_factory=list)
    key_pairs: list[str] = field(default_factory=list)
    security_groups: list[str] = field(default_factory=list)
    kept: int = 0
    errors: list[str] = field(default_factory=list)

    def merge(self, other: SweepReport) -> None:
        self.terminated += other.terminated
        self.key_pairs += other.key_pairs
        self.security_groups += other.security_groups
        self.kept += other.kept
        self.errors += other.errors

    @property
    def removed(self) -> int:
        return len(self.terminated) + len(self.key_pairs) + len(self.security_groups)


_TAG_FILTER = [{"Name": "tag-key", "Values": [TAG_TEST]}]


def tagged_instances(ec2: Any) -> list[Tagged]:
    found = []
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[*_TAG_FILTER, {"Name": "instance-state-name", "Values": list(LIVE_STATES)}]
    )
    for page in pages:
        for reservation in page.get("Reservations", []):
            for inst in reservation.get("Instances", []):
                found.append(
                    Tagged(
                        "instance",
                        str(inst["InstanceId"]),
                        _tags(inst.get("Tags")),
                        inst.get("LaunchTime"),
                    )
                )
    return found


def tagged_key_pairs(ec2: Any) -> list[Tagged]:
    pairs = ec2.describe_key_pairs(Filters=_TAG_FILTER).get("KeyPairs", [])
    return [
        Tagged(
            "key-pair",
            str(p["KeyName"]),
            _tags(p.get("Tags")),
            p.get("CreateTime"),
        )
        for p in pairs
    ]


def tagged_security_groups(ec2: Any) -> list[Tagged]:
    found = []
    for page in ec2.get_paginator("describe_security_groups").paginate(Filters=_TAG_FILTER):
        for group in page.get("SecurityGroups", []):
            found.append(Tagged("security-group", str(group["GroupId"]), _tags(group.get("Tags"))))
    return found


class _RegionSweep:
    """One sweep of one region; collects into a SweepReport, never raises for AWS errors."""

    def __init__(
        self,
        ec2: Any,
        region: str,
        *,
        now: datetime,
        lifetime: timedelta,
        wait: float,
        poll: float,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
    ) -> None:
        self.ec2 = ec2
        self.region = region
        self.now = now
        self.lifetime = lifetime
        self.wait = wait
        self.poll = poll
        self.clock = clock
        self.sleep = sleep
        self.report = SweepReport()

    def note(self, what: str, exc: BaseException) -> None:
        detail = error_code(exc) or f"{type(exc).__name__}: {exc}"
        self.report.errors.append(f"{self.region}: {what}: {detail}"[:300])
        log.error("sweep %s: %s failed: %s", self.region, what, detail)

    def doomed(self, items: list[Tagged]) -> list[Tagged]:
        out = [i for i in items if expired(i, self.now, self.lifetime)]
        self.report.kept += len(items) - len(out)
        return out

    def instances(self, items: list[Tagged]) -> None:
        if not items:
            return
        ids = [i.resource_id for i in items]
        for item in items:
            log.warning(
                "sweep %s: terminating leaked %s (AMI %s, job %s, deadline %s)",
                self.region,
                item.resource_id,
                item.ami_id,
                item.job_id,
                item.tags.get(TAG_DEADLINE, "none"),
            )
        try:
            self.ec2.terminate_instances(InstanceIds=ids)
            self.report.terminated += ids
            wait_terminated(
                self.ec2,
                ids,
                self.clock() + self.wait,
                self.poll,
                clock=self.clock,
                sleep=self.sleep,
            )
        except CleanupTimeout as exc:
            log.info("sweep %s: %s; their groups go at the next sweep", self.region, exc)
        except (ClientError, BotoCoreError) as exc:
            if error_code(exc) != "InvalidInstanceID.NotFound":
                self.note(f"terminating {', '.join(ids)}", exc)

    def key_pair(self, pair: Tagged) -> None:
        try:
            self.ec2.delete_key_pair(KeyName=pair.resource_id)
        except (ClientError, BotoCoreError) as exc:
            if error_code(exc) not in NOT_FOUND_CODES:
                self.note(f"deleting key pair {pair.resource_id}", exc)
            return
        self.report.key_pairs.append(pair.resource_id)
        log.warning(
            "sweep %s: deleted leaked key pair %s (AMI %s, job %s)",
            self.region,
            pair.resource_id,
            pair.ami_id,
            pair.job_id,
        )

    def security_group(self, group: Tagged) -> None:
        try:
            # One try now: a group still in use goes at the next sweep.
            delete_security_group(
                self.ec2,
                group.resource_id,
                self.clock(),
                self.poll,
                clock=self.clock,
                sleep=self.sleep,
            )
        except CleanupTimeout:
            log.info("sweep %s: group %s still in use, next sweep", self.region, group.resource_id)
            return
        except (ClientError, BotoCoreError) as exc:
            self.note(f"deleting security group {group.resource_id}", exc)
            return
        self.report.security_groups.append(group.resource_id)
        log.warning(
            "sweep %s: deleted leaked security group %s (AMI %s, job %s)",
            self.region,
            group.resource_id,
            group.ami_id,
            group.job_id,
        )

    def run(self) -> SweepReport:
        try:
            instances = tagged_instances(self.ec2)
            key_pairs = tagged_key_pairs(self.ec2)
            groups = tagged_security_groups(self.ec2)
        except (ClientError, BotoCoreError) as exc:
            self.note("listing tagged resources", exc)
            return self.report
        # Instances first: their security groups cannot go while they live.
        self.instances(self.doomed(instances))
        for pair in self.doomed(key_pairs):
            self.key_pair(pair)
        for group in self.doomed(groups):
            self.security_group(group)
        return self.report


def sweep_region(
    ec2: Any,
    region: str,
    *,
    lifetime: float,
    now: datetime | None = None,
    wait: float = 120.0,
    poll: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> SweepReport:
    """Remove every expired tagged resource in one region; never raises for AWS errors."""
    return _RegionSweep(
        ec2,
        region,
        now=now or datetime.now(UTC),
        lifetime=timedelta(seconds=lifetime),
        wait=wait,
        poll=poll,
        clock=clock,
        sleep=sleep,
    ).run()


def sweep(
    ec2_for: Callable[[str], Any],
    regions: Iterable[str],
    *,
    lifetime: float,
    now: datetime | None = None,
    wait: float = 120.0,
    poll: float = 5.0,
) -> SweepReport:
    """``sweep_region`` over every configured region; one summary log line."""
    total = SweepReport()
    for region in regions:
        try:
            ec2 = ec2_for(region)
        except (ClientError, BotoCoreError) as exc:
            total.errors.append(f"{region}: no client: {exc}")
            continue
        total.merge(sweep_region(ec2, region, lifetime=lifetime, now=now, wait=wait, poll=poll))
    level = logging.WARNING if total.removed or total.errors else logging.INFO
    log.log(
        level,
        "sweep: %d instances terminated, %d key pairs and %d security groups deleted, "
        "%d kept (in their deadline), %d errors",
        len(total.terminated),
        len(total.key_pairs),
        len(total.security_groups),
        total.kept,
        len(total.errors),
    )
    return total


class Flushable(Protocol):
    def flush(self) -> Any: ...


def housekeeping(
    ec2_for: Callable[[str], Any],
    regions: Iterable[str],
    reporter: Flushable,
    *,
    lifetime: float,
    poll: float,
) -> None:
    """The periodic job of a runner: sweep leaks, then re-send spooled results; never raises.

    Run by ``consumer.SweepProducer`` in a hub and by ``amqp.AmiTestConsumer``
    in a fedora-messaging consumer.
    """
    try:
        sweep(ec2_for, regions, lifetime=lifetime, poll=poll)
    except Exception:
        log.exception("sweep failed")
    try:
        done = reporter.flush()
        if done.posted or done.rejected or done.pending:
            log.info(
                "spool: %d posted, %d rejected, %d still pending",
                done.posted,
                done.rejected,
                done.pending,
            )
    except Exception:
        log.exception("spool flush failed")
