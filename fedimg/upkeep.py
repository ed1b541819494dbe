"""After release, the actuator: carry out a prune plan, re-publish what AWS made private.

``fedimg.engine.Engine.prune`` and ``Engine.audit`` observe (``fedimg.observe``)
and decide (``fedimg.prune``); ``Upkeep`` only acts on what they decided
(``prune_plan`` is the observe-then-plan step both ``Engine.prune`` and
``fedimg status --stream`` use).

One removal, in one region, is always in this order::

    tag the AMI and its snapshots fedimg:pruning=<AMI>   (IAM lets only marked ones go)
    deregister the AMI                                    (already gone: fine)
    announce fedimg.image.delete
    delete the snapshots no other AMI uses                (already gone: fine)

so a snapshot is never deleted while its image is registered. The first AWS
error (throttling botocore's own retries did not absorb, an outage) stops the
run: the next one plans again from what remains and finishes it (marked
snapshots whose AMI is gone are the plan's ``leftovers``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from botocore.exceptions import BotoCoreError, ClientError

from fedimg import tags
from fedimg.aws import error_code
from fedimg.config import FedimgConfig
from fedimg.copies import Copier, CopyError, Ec2Factory, describe_error
from fedimg.messages import IMAGE_DELETE, Emitter, InvalidMessage, delete_event
from fedimg.observe import observe_fleet
from fedimg.prune import (
    PRUNING,
    Exposure,
    Leftover,
    PrunePlan,
    PrunePolicy,
    Removal,
    plan_prune,
)
from fedimg.regions import target_regions

log = logging.getLogger(__name__)

_GONE_IMAGE: Final = frozenset({"InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"})
_GONE_SNAPSHOT: Final = frozenset({"InvalidSnapshot.NotFound"})


def fleet_regions(cfg: FedimgConfig, aws: Ec2Factory) -> list[str]:
    """Every region fedimg has AMIs in: the staging region, then the targets."""
    return [cfg.staging_region, *target_regions(cfg, aws.ec2(cfg.staging_region))]


def prune_plan(
    cfg: FedimgConfig, aws: Ec2Factory, now: datetime, policy: PrunePolicy | None = None
) -> PrunePlan:
    """Observe every region and plan the prune (``Engine.prune``, ``fedimg status --stream``).

    AWS errors propagate; PolicyRefused if the plan would remove a stream's newest.
    """
    fleet = observe_fleet(aws, fleet_regions(cfg, aws))
    return plan_prune(fleet, policy or prune_policy_of(cfg), now)


def prune_policy_of(cfg: FedimgConfig) -> PrunePolicy:
    return PrunePolicy(
        keep=cfg.prune_keep,
        nightly_age=timedelta(days=cfg.prune_nightly_days),
        eol=cfg.eol_dates(),
        delete_rejected=cfg.delete_rejected,
    )


@dataclass(frozen=True)
class PruneRun:
    """One prune: its plan, what was removed, and why it stopped early (``error``)."""

    plan: PrunePlan | None = None
    removed: tuple[tuple[str, str], ...] = ()  # (region, AMI id)
    deleted_snapshots: tuple[tuple[str, str], ...] = ()  # (region, snapshot id)
    error: str = ""
    busy: bool = False  # another process was pruning: nothing done

    @property
    def complete(self) -> bool:
        """Everything the plan asked for was done (or there was nothing to do)."""
        return not self.error and not self.busy


@dataclass(frozen=True)
class AuditRun:
    """One public-access audit: what was found private, and what was made public again."""

    exposures: tuple[Exposure, ...] = ()
    fixed: tuple[tuple[str, str], ...] = ()  # (region, AMI id)
    errors: dict[tuple[str, str], str] = field(default_factory=dict)
    error: str = ""  # AWS could not be read: nothing was audited
    busy: bool = False

    @property
    def clean(self) -> bool:
        return (
            not self.busy
            and not self.error
            and not self.errors
            and (len(self.fixed) == len(self.exposures))
        )


class Upkeep:
    """Removes and re-publishes AMIs as told (thread-safe: no state of its own)."""

    def __init__(self, aws: Ec2Factory, emitter: Emitter, copier: Copier) -> None:
        self.aws = aws
        self.emitter = emitter
        self.copier = copier

    def apply(self, plan: PrunePlan) -> PruneRun:
        """Leftovers first, then every removal in the plan's order; stop at the first error."""
        removed: list[tuple[str, str]] = []
        deleted: list[tuple[str, str]] = []
        try:
            for leftover in plan.leftovers:
                if self._leftover(leftover):
                    deleted.append((leftover.region, leftover.snapshot_id))
            for removal in plan.removals:
                deleted.extend((removal.region, s) for s in self._remove(removal))
                removed.append((removal.region, removal.ami_id))
        except (ClientError, BotoCoreError) as exc:
            reason = describe_error(exc)
            log.error(
                "prune: stopped after %d removal(s): %s; the next run finishes it",
                len(removed),
                reason,
            )
            return PruneRun(plan, tuple(removed), tuple(deleted), reason)
        return PruneRun(plan, tuple(removed), tuple(deleted))

    def _remove(self, removal: Removal) -> list[str]:
        ec2 = self.aws.ec2(removal.region)
        label = f"{removal.compose_id} {removal.ami_id} in {removal.region}"
        ec2.create_tags(
            Resources=[removal.ami_id, *removal.marks],
            Tags=tags.as_list({PRUNING: removal.ami_id}),
        )
        try:
            ec2.deregister_image(ImageId=removal.ami_id)
        except ClientError as exc:
            if error_code(exc) not in _GONE_IMAGE:
                raise
        log.info("%s: deregistered (prune: %s)", label, removal.reason)
        # Announced once the image is gone, before its snapshots go: a run stopped
        # now leaves marked snapshots, which the next run deletes as leftovers.
        body = delete_event(
            compose_id=removal.compose_id,
            image_name=removal.image_name,
            architecture=removal.arch,
            region=removal.region,
            ami_id=removal.ami_id,
            vol_type=removal.vol_type,
            reason=removal.reason,
            snapshots=removal.snapshots,
        )
        try:
            self.emitter.emit(IMAGE_DELETE, body)
        except InvalidMessage as exc:  # tags fedimg did not write: removed, not announced
            log.error("%s: removal not announced: %s", label, exc)
        return [s for s in removal.snapshots if self._delete_snapshot(ec2, s, label)]

    def _leftover(self, leftover: Leftover) -> bool:
        ec2 = self.aws.ec2(leftover.region)
        label = f"{leftover.ami_id} in {leftover.region}"
        return self._delete_snapshot(ec2, leftover.snapshot_id, f"{label} (pruned before)")

    @staticmethod
    def _delete_snapshot(ec2: Any, snapshot_id: str, label: str) -> bool:
        """True if deleted; a snapshot already gone is fine, one still in use is kept."""
        try:
            ec2.delete_snapshot(SnapshotId=snapshot_id)
        except ClientError as exc:
            code = error_code(exc)
            if code in _GONE_SNAPSHOT:
                return False
            if code == "InvalidSnapshot.InUse":  # an image fedimg does not know uses it
                log.warning("%s: snapshot %s kept: %s", label, snapshot_id, describe_error(exc))
                return False
            raise
        log.info("%s: deleted snapshot %s", label, snapshot_id)
        return True

    def republish(self, found: Exposure) -> str:
        """Launch permission and createVolumePermission ``all`` again; '' or why not."""
        what = f"{found.compose_id} {found.ami_id} in {found.region}"
        try:
            self.copier.make_public(found.region, found.ami_id, list(found.snapshots), what)
        except (ClientError, BotoCoreError, CopyError) as exc:
            reason = describe_error(exc)
            log.error("%s: not made public again: %s", what, reason)
            return reason
        log.warning("%s: made public again (fedimg.audit.fix)", what)
        return ""
