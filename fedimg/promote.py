"""fedimg promote's actuator: release (copy and publish everywhere), or reject.

Flow for one staging AMI (its record is the ``fedimg:state`` tag, see
``fedimg.tags``); ``fedimg.plan`` decides, ``fedimg.engine`` calls::

    testing --Release--> promoting --every region public--> released
       |                    '--some region failed: stays promoting (Promote retries)
       '----Reject-----> rejected

Copies are found before they are created (see ``fedimg.copies``), so a
resume, a replay or a second process never makes a second copy. Nothing is
made public before the gate said release.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from fedimg import preflight, tags
from fedimg.aws import AwsClients
from fedimg.config import FedimgConfig
from fedimg.copies import Clock, Copier, Ec2Factory, RegionResult, Slots, Timing, describe_error
from fedimg.facts import SnapshotFacts, parse_when
from fedimg.gate import Decision
from fedimg.messages import (
    IMAGE_COPY,
    IMAGE_PUBLISH,
    IMAGE_RELEASE,
    IMAGE_TEST,
    Emitter,
    StagedImage,
    announce_aws_published,
    copy_event,
    image_event,
    publish_event,
    release_event,
)
from fedimg.observe import describe_staging_ami, region_publish_facts
from fedimg.plan import Retest
from fedimg.regions import target_regions
from fedimg.tags import State

log = logging.getLogger(__name__)


class NotEligible(Exception):
    """The AMI is not one this step may act on (unknown, not fedimg's, wrong state)."""


@dataclass(frozen=True)
class StagingAmi:
    """A fedimg AMI in the staging region, as read from AWS (never from a message)."""

    image: StagedImage
    described: Mapping[str, Any]
    state: State | None
    staged_at: datetime

    @property
    def ami_id(self) -> str:
        assert self.image.ami_id is not None
        return self.image.ami_id

    @property
    def name(self) -> str:
        return str(self.described.get("Name") or self.image.image_name)

    @property
    def label(self) -> str:
        """``<compose> <ami>``: the prefix of every log line about this AMI."""
        return f"{self.image.compose_id} {self.ami_id}"


@dataclass(frozen=True)
class Promotion:
    """Where an AMI ended up public, and where it did not (with reasons)."""

    ami_id: str
    regions: Mapping[str, str] = field(default_factory=dict)
    failed: Mapping[str, str] = field(default_factory=dict)
    best_effort: frozenset[str] = frozenset()  # fedimg.promote.best_effort_regions

    @property
    def blocking(self) -> dict[str, str]:
        """The failures that keep the image ``promoting`` (not a best-effort region's)."""
        return preflight.blocking(self.failed, self.best_effort)

    @property
    def complete(self) -> bool:
        return not self.blocking and bool(self.regions)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def waivers_of(decision: Decision) -> list[dict[str, Any]]:
    """The waivers a decision used, as ``fedimg.image.release`` names them."""
    return [
        {
            "id": w.waiver_id,
            "testcase": w.testcase,
            "scenario": w.scenario or None,
            "username": w.username,
            "comment": w.comment,
        }
        for w in decision.waived
    ]


def waivers_by(decision: Decision) -> str:
    """Who moved an AMI on: the gate, and the authors of the waivers it used."""
    authors = sorted({w.username for w in decision.waived})
    return "gate" + (f"+waivers:{','.join(authors)}" if authors else "")


class Promoter:
    """Release, promote, reject and re-test staging AMIs (``fedimg.engine`` decides when)."""

    def __init__(
        self,
        cfg: FedimgConfig,
        emitter: Emitter,
        aws: Ec2Factory,
        *,
        now: Callable[[], datetime] = _utcnow,
        clock: Clock | None = None,
        timing: Timing | None = None,
    ) -> None:
        self.cfg = cfg
        self.emitter = emitter
        self.aws = aws
        self.now = now
        self.copier = Copier(
            aws,
            cfg.staging_region,
            timing
            or Timing(copy_timeout=cfg.copy_timeout, retry_timeout=cfg.publish_retry_timeout),
            clock or Clock(),
            extra_tags=cfg.extra_tags,
            completion_minutes=cfg.copy_completion_minutes,
        )
        self.slots = Slots(cfg.copy_concurrency)
        # The history tag last written per AMI: a promotion writes several states in a
        # row from one description of the AMI.
        self._history: dict[str, str] = {}
        self._history_lock = threading.Lock()

    @classmethod
    def from_config(
        cls,
        cfg: FedimgConfig,
        emitter: Emitter,
        aws: Ec2Factory | None = None,
    ) -> Promoter:
        return cls(cfg, emitter, aws or AwsClients(max_attempts=cfg.aws_max_attempts))

    @property
    def ec2(self) -> Any:
        """The EC2 client of the staging region."""
        return self.aws.ec2(self.cfg.staging_region)

    # -- the record -------------------------------------------------------------
    def lookup(self, ami_id: str) -> StagingAmi:
        """The staging AMI as AWS describes it; NotEligible if it is not a fedimg AMI."""
        described = describe_staging_ami(self.ec2, ami_id)
        if described is None:
            raise NotEligible(f"no AMI {ami_id} of ours in {self.cfg.staging_region}")
        return self.staging_ami(described)

    def staging_ami(self, described: Mapping[str, Any]) -> StagingAmi:
        """A described AMI as a StagingAmi; NotEligible if it carries no fedimg tags."""
        image = tags.staged_image(described, self.cfg.staging_region)
        if image is None:
            raise NotEligible("not a fedimg AMI (no fedimg tags)")
        values = tags.as_dict(described.get("Tags"))
        staged_at = (
            parse_when(values.get(tags.STAGED_AT))
            or parse_when(described.get("CreationDate"))
            or self.now()
        )
        return StagingAmi(image, described, tags.state_of(described), staged_at)

    # -- acting on it -------------------------------------------------------------
    def release(
        self, staged: StagingAmi, decision: Decision, deprecate_at: datetime | None = None
    ) -> Promotion:
        """Mark promoting, announce the pass, then copy and publish everywhere.

        The release message names every waiver the decision used.
        """
        self._set_state(staged, State.PROMOTING, waivers_by(decision))
        self.emitter.emit(IMAGE_TEST, image_event(staged.image, "completed", decision.reason))
        return self.promote(staged, deprecate_at, waivers_of(decision))

    def retest(self, staged: StagingAmi, action: Retest, who: str) -> None:
        """Back to testing: the deadline counts from now, older results of the retested
        scenarios stop counting (tags first, so a crash cannot lose it), then the request."""
        since = self.now().astimezone(UTC).isoformat()
        extra = {
            tags.TESTING_SINCE: since,
            tags.RETESTED: ",".join(action.scenarios)[:256],
            tags.TEST_REQUESTED: "0",
        }
        self._set_state(staged, State.TESTING, f"retest by {who}", extra)
        request = image_event(staged.image, "started")
        request["extra"].update(retest_since=since, scenarios=list(action.scenarios))
        self.emitter.emit(IMAGE_TEST, request)
        log.warning("%s: %s by %s; test requested", staged.label, action.reason, who)

    def request_test(self, staged: StagingAmi, count: int, reason: str) -> None:
        """Ask for the test again: ``fedimg:test-requested`` first, so a crash cannot make two."""
        self.copier.tag(
            self.cfg.staging_region,
            [staged.ami_id],
            {tags.TEST_REQUESTED: str(count)},
            f"{staged.label}: test re-request",
        )
        self.emitter.emit(IMAGE_TEST, image_event(staged.image, "started"))
        log.warning(
            "%s: no complete results %.0fs after staging (%s); test requested again (%d)",
            staged.label,
            (self.now() - staged.staged_at).total_seconds(),
            reason,
            count,
        )

    def reject(self, staged: StagingAmi, decision: Decision) -> None:
        """Announce the failure, mark rejected; copy nothing, publish nothing."""
        self.emitter.emit(
            IMAGE_TEST, image_event(staged.image, "failed", f"rejected: {decision.reason}")
        )
        self._set_state(staged, State.REJECTED)
        log.warning("%s: rejected: %s", staged.label, decision.reason)
        if self.cfg.delete_rejected:
            self._delete(staged)

    def promote(
        self,
        staged: StagingAmi,
        deprecate_at: datetime | None = None,
        waivers: Sequence[Mapping[str, Any]] = (),
    ) -> Promotion:
        """Copy to and publish in every target region; the staging AMI public too.

        Every image made public is first deprecated at ``deprecate_at`` (the plan's
        ``deprecation_time``; None: not deprecated). The release message names
        ``waivers`` (those the gate's decision used).
        """
        try:
            regions = preflight.targets(target_regions(self.cfg, self.ec2), self.cfg.skip_regions)
        except (ClientError, BotoCoreError) as exc:
            reason = describe_error(exc)
            log.error(
                "%s: cannot list target regions, promotion stays pending: %s", staged.label, reason
            )
            return Promotion(staged.ami_id, {}, {"describe_regions": reason})
        log.info(
            "%s: copying %s to %d region(s): %s",
            staged.label,
            staged.name,
            len(regions),
            ", ".join(regions),
        )
        results = self._fan_out(staged, regions, deprecate_at)
        results.append(self._publish_staging(staged, deprecate_at))
        done = {r.region: r.ami_id for r in results if r.ok and r.ami_id}
        failed = {r.region: r.error or "unknown error" for r in results if not r.ok}
        promotion = Promotion(staged.ami_id, done, failed, frozenset(self.cfg.best_effort_regions))
        if done:
            self.emitter.emit(IMAGE_RELEASE, release_event(staged.image, done, failed, waivers))
            announce_aws_published(
                self.emitter,
                staged.image,
                staged.name,
                done,
                self.cfg.fedora_image_uploader_message,
            )
        if promotion.blocking or not done:
            log.error(
                "%s: released in %d region(s); FAILED in %s; state stays promoting, "
                "a resume will retry them",
                staged.label,
                len(done),
                "; ".join(f"{r}: {why}" for r, why in sorted(promotion.blocking.items())),
            )
            return promotion
        for region, why in sorted(failed.items()):
            log.warning(
                "%s: not released in best-effort region %s (not retried): %s",
                staged.label,
                region,
                why,
            )
        self._set_state(staged, State.RELEASED)
        log.info("%s: released in %d region(s)", staged.label, len(done))
        return promotion

    def _fan_out(
        self, staged: StagingAmi, regions: list[str], deprecate_at: datetime | None
    ) -> list[RegionResult]:
        """Copy to every region concurrently; emit copy/publish events from this thread."""
        if not regions:
            return []
        events: queue.Queue[tuple[str, str, Any]] = queue.Queue()

        def work(region: str) -> None:
            result = RegionResult(region, None, "internal error")
            try:
                checked = self._preflight(staged, region)
                if not checked.go:
                    result = RegionResult(region, None, checked.reason)
                    return
                with self.slots:
                    result = self.copier.copy_and_publish(
                        region,
                        staged.image,
                        staged.name,
                        lambda ami: events.put(("copy", region, ami)),
                        deprecate_at,
                    )
            except Exception as exc:  # one region's bug must not lose the rest
                log.exception("%s -> %s: unexpected error", staged.label, region)
                result = RegionResult(region, None, f"internal error: {exc}"[:300])
            finally:
                events.put(("done", region, result))

        results: list[RegionResult] = []
        workers = max(1, min(self.cfg.copy_concurrency, len(regions)))
        with ThreadPoolExecutor(workers, thread_name_prefix=f"copy-{staged.ami_id}") as pool:
            for region in regions:
                pool.submit(work, region)
            while len(results) < len(regions):
                kind, region, payload = events.get()
                if kind == "copy":
                    self.emitter.emit(IMAGE_COPY, copy_event(staged.image, region, payload))
                    continue
                results.append(payload)
                if payload.ok and payload.published:
                    self.emitter.emit(
                        IMAGE_PUBLISH, publish_event(staged.image, region, payload.ami_id)
                    )
        return sorted(results, key=lambda r: r.region)

    def _publish_staging(self, staged: StagingAmi, deprecate_at: datetime | None) -> RegionResult:
        region = self.cfg.staging_region
        checked = self._preflight(staged, region)
        if not checked.go:
            return RegionResult(region, staged.ami_id, checked.reason)
        try:
            snapshots = self._staging_snapshots(staged)
        except (ClientError, BotoCoreError) as exc:
            log.error("%s: cannot find the staging snapshot: %s", staged.label, describe_error(exc))
            return RegionResult(region, staged.ami_id, describe_error(exc))
        result = self.copier.publish_in_place(
            staged.image, staged.described, snapshots, deprecate_at
        )
        if result.ok and result.published:
            self.emitter.emit(IMAGE_PUBLISH, publish_event(staged.image, region, staged.ami_id))
        return result

    def _preflight(self, staged: StagingAmi, region: str) -> preflight.Verdict:
        """May ``region`` take this image public now? (read by observe, decided by preflight)"""
        facts = region_publish_facts(
            self.aws.ec2(region), self.aws.client("service-quotas", region), region, staged.ami_id
        )
        checked = preflight.verdict(facts, self.cfg.best_effort_regions)
        if not checked.go:
            log.warning(
                "%s -> %s: not copied or published there: %s", staged.label, region, checked.reason
            )
        return checked

    # -- the record ---------------------------------------------------------------
    def _staging_snapshots(self, staged: StagingAmi, everything: bool = False) -> list[str]:
        """The staging AMI's snapshots: its block device mappings plus the tagged one.

        An untrusted (half-written) snapshot beside a trusted one is what a killed
        upload left (the reconcile pass deletes it): it is neither published nor
        re-tagged, unless ``everything`` (deleting a rejected AMI).
        """
        wanted = {
            tags.COMPOSE_ID: staged.image.compose_id,
            tags.IMAGE_NAME: staged.image.image_name,
        }
        if staged.image.sha256:
            wanted[tags.SHA256] = staged.image.sha256
        found = self.copier.snapshots_of(self.cfg.staging_region, staged.described, wanted)
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in wanted.items()]
        tagged = self.ec2.describe_snapshots(OwnerIds=["self"], Filters=filters)["Snapshots"]
        trusted = [s for s in tagged if SnapshotFacts.from_aws(s, self.now()).trusted]
        if trusted and not everything:
            tagged = trusted
        return list(dict.fromkeys([*found, *sorted(s["SnapshotId"] for s in tagged)]))

    def _set_state(
        self,
        staged: StagingAmi,
        state: State,
        who: str = "gate",
        extra: Mapping[str, str] | None = None,
    ) -> None:
        """Record ``state`` on the staging AMI (authoritative, with its history entry and
        ``extra`` tags) and, best effort, its snapshots."""
        what = f"{staged.label}: state {state.value}"
        with self._history_lock:
            old = self._history.get(staged.ami_id)
            if old is None:
                old = tags.as_dict(staged.described.get("Tags")).get(tags.HISTORY, "")
            history = tags.add_history(old, state.value, self.now(), who)
            values = {tags.STATE: state.value, tags.HISTORY: history, **(extra or {})}
            self.copier.tag(self.cfg.staging_region, [staged.ami_id], values, what)
            self._history[staged.ami_id] = history
        log.info("%s: fedimg:state=%s (%s)", staged.label, state.value, who)
        try:
            snapshots = self._staging_snapshots(staged)
            self.copier.tag(self.cfg.staging_region, snapshots, {tags.STATE: state.value}, what)
        except (ClientError, BotoCoreError) as exc:
            log.warning("%s: snapshot state tag not updated: %s", staged.label, describe_error(exc))

    def _delete(self, staged: StagingAmi) -> None:
        """``fedimg.gate.delete_rejected``: deregister the AMI and delete its snapshot(s)."""
        snapshots = self._staging_snapshots(staged, everything=True)
        self.ec2.deregister_image(ImageId=staged.ami_id)
        log.info("%s: deregistered (fedimg.gate.delete_rejected)", staged.label)
        for snap in snapshots:
            try:
                self.ec2.delete_snapshot(SnapshotId=snap)
                log.info("%s: deleted snapshot %s", staged.label, snap)
            except ClientError as exc:
                # InvalidSnapshot.InUse: another volume type's AMI still uses it.
                log.warning("%s: snapshot %s kept: %s", staged.label, snap, describe_error(exc))
