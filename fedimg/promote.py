"""Promote a tested AMI: the gate's verdict, then copy/publish everywhere, or reject.

Flow for one staging AMI (its record is the ``fedimg:state`` tag, see
``fedimg.tags``)::

    testing --gate: release--> promoting --every region public--> released
       |                          '--some region failed: stays promoting (resume retries)
       '----gate: reject-----> rejected

A ResultsDB message is only a hint to look again: ``on_result`` never trusts
its body. The AMI is looked up in the staging region (it must be ours and in
``testing``), ResultsDB is asked for the latest result of every required
testcase, and the pure ``fedimg.gate.decide`` gives the verdict. ResultsDB
being unavailable means "wait", never a decision.

Concurrency: one evaluation per AMI at a time in this process (a second one
returns at once, asking the running one to look again if it ends up
waiting), and the state tag is re-read under that lock, so any number of
messages (per-test results, summaries, replays) lead to one promotion. Copies
are found before they are created (see ``fedimg.copies``), so a resume or a
second process never makes a second copy either.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from fedimg import tags
from fedimg.aws import AwsClients, error_code
from fedimg.config import FedimgConfig
from fedimg.copies import Clock, Copier, Ec2Factory, RegionResult, Slots, Timing, describe_error
from fedimg.gate import Decision, decide
from fedimg.messages import (
    AMI_ID_RE,
    IMAGE_COPY,
    IMAGE_PUBLISH,
    IMAGE_RELEASE,
    IMAGE_TEST,
    Emitter,
    ResultNotice,
    StagedImage,
    copy_event,
    image_event,
    publish_event,
    release_event,
)
from fedimg.regions import target_regions
from fedimg.results import ResultsSource, ResultsUnavailable
from fedimg.tags import State

log = logging.getLogger(__name__)

ITEM_TYPE = "ami"


class NotEligible(Exception):
    """The AMI is not one this step may act on (unknown, not fedimg's, wrong state)."""


class Busy(Exception):
    """Another evaluation of the same AMI is running in this process."""


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

    @property
    def complete(self) -> bool:
        return not self.failed and bool(self.regions)


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Promoter:
    """The gate and the promotion of staging AMIs; one per process (consumer or CLI)."""

    def __init__(
        self,
        cfg: FedimgConfig,
        emitter: Emitter,
        aws: Ec2Factory,
        results: ResultsSource,
        *,
        now: Callable[[], datetime] = _utcnow,
        clock: Clock | None = None,
        timing: Timing | None = None,
    ) -> None:
        self.cfg = cfg
        self.emitter = emitter
        self.aws = aws
        self.results = results
        self.now = now
        self.copier = Copier(
            aws,
            cfg.staging_region,
            timing
            or Timing(copy_timeout=cfg.copy_timeout, retry_timeout=cfg.publish_retry_timeout),
            clock or Clock(),
        )
        self.slots = Slots(cfg.copy_concurrency)
        self._guard = threading.Lock()
        self._busy: set[str] = set()
        self._recheck: set[str] = set()

    @classmethod
    def from_config(
        cls,
        cfg: FedimgConfig,
        emitter: Emitter,
        aws: Ec2Factory | None = None,
        results: ResultsSource | None = None,
    ) -> Promoter:
        if aws is None:
            aws = AwsClients(max_attempts=cfg.aws_max_attempts)
        if results is None:
            from fedimg.results import ResultsDBSource

            results = ResultsDBSource(
                cfg.resultsdb_url, max_retries=cfg.http_retries, timeout=cfg.http_timeout
            )
        return cls(cfg, emitter, aws, results)

    @property
    def ec2(self) -> Any:
        """The EC2 client of the staging region."""
        return self.aws.ec2(self.cfg.staging_region)

    # -- entry points ---------------------------------------------------------
    def on_result(self, notice: ResultNotice) -> Decision | None:
        """A ResultsDB message arrived: re-evaluate the AMI it names, if it is one of ours."""
        if notice.item_type != ITEM_TYPE:
            log.debug(
                "result %s for %s %r: not an AMI, ignored",
                notice.result_id,
                notice.item_type,
                notice.item[:100],
            )
            return None
        if not AMI_ID_RE.match(notice.item):
            log.warning(
                "result %s of type ami names %r, not an AMI id: ignored",
                notice.result_id,
                notice.item[:100],
            )
            return None
        if notice.testcase not in self.cfg.required_testcases:
            log.debug(
                "%s: result %s for testcase %s (not required): evaluating anyway",
                notice.item,
                notice.result_id,
                notice.testcase,
            )
        try:
            return self.evaluate(notice.item)
        except NotEligible as exc:
            log.info(
                "%s: result %s (%s %s) ignored: %s",
                notice.item,
                notice.result_id,
                notice.testcase,
                notice.outcome,
                exc,
            )
        except Busy:
            log.info(
                "%s: result %s: an evaluation is running, it will look again",
                notice.item,
                notice.result_id,
            )
        return None

    def evaluate(self, ami_id: str) -> Decision:
        """Run the gate for a ``testing`` AMI and act on the verdict.

        Raises NotEligible (unknown AMI, not fedimg's, not in testing) or Busy.
        """
        with self._exclusive(ami_id):
            while True:
                with self._guard:
                    self._recheck.discard(ami_id)
                decision = self._evaluate_locked(ami_id)
                with self._guard:
                    again = ami_id in self._recheck
                if not (decision.wait and again):
                    return decision
                log.info("%s: new results arrived while evaluating; looking again", ami_id)

    def resume(self, ami_id: str) -> Promotion:
        """Finish a ``promoting`` AMI: copy to and publish in the regions still missing."""
        with self._exclusive(ami_id):
            staged = self.lookup(ami_id)
            if staged.state is not State.PROMOTING:
                raise NotEligible(f"state is {staged.state}, not promoting")
            log.info("%s: resuming promotion", staged.label)
            return self._promote(staged)

    # -- the decision -----------------------------------------------------------
    def lookup(self, ami_id: str) -> StagingAmi:
        """The staging AMI as AWS describes it; NotEligible if it is not a fedimg AMI."""
        try:
            images = self.ec2.describe_images(ImageIds=[ami_id], Owners=["self"])["Images"]
        except ClientError as exc:
            if error_code(exc) in ("InvalidAMIID.NotFound", "InvalidAMIID.Malformed"):
                raise NotEligible(
                    f"no AMI {ami_id} in {self.cfg.staging_region} ({error_code(exc)})"
                ) from exc
            raise
        if not images:
            raise NotEligible(f"no AMI {ami_id} of ours in {self.cfg.staging_region}")
        described = images[0]
        image = tags.staged_image(described, self.cfg.staging_region)
        if image is None:
            raise NotEligible("not a fedimg AMI (no fedimg tags)")
        staged_at = (
            _parse_time(tags.as_dict(described.get("Tags")).get(tags.STAGED_AT))
            or _parse_time(described.get("CreationDate"))
            or self.now()
        )
        return StagingAmi(image, described, tags.state_of(described), staged_at)

    def _evaluate_locked(self, ami_id: str) -> Decision:
        staged = self.lookup(ami_id)
        if staged.state is not State.TESTING:
            raise NotEligible(f"state is {staged.state}, not testing")
        required = list(self.cfg.required_testcases)
        try:
            results = self.results.latest(ami_id, item_type=ITEM_TYPE, testcases=required)
        except ResultsUnavailable as exc:
            log.warning(
                "%s: ResultsDB unavailable, no decision (will look again): %s", staged.label, exc
            )
            return Decision("wait", f"ResultsDB unavailable: {exc}"[:300])
        decision = decide(
            results,
            required,
            self.cfg.reject_outcomes,
            staged_at=staged.staged_at,
            now=self.now(),
            deadline=timedelta(seconds=self.cfg.gate_deadline),
        )
        log.info("%s: gate says %s: %s", staged.label, decision.verdict, decision.reason)
        if decision.release:
            self.release(staged, decision)
        elif decision.reject:
            self.reject(staged, decision)
        return decision

    # -- acting on it -------------------------------------------------------------
    def release(self, staged: StagingAmi, decision: Decision) -> Promotion:
        """Mark promoting, announce the pass, then copy and publish everywhere."""
        self._set_state(staged, State.PROMOTING)
        self.emitter.emit(IMAGE_TEST, image_event(staged.image, "completed", decision.reason))
        return self._promote(staged)

    def reject(self, staged: StagingAmi, decision: Decision) -> None:
        """Announce the failure, mark rejected; copy nothing, publish nothing."""
        self.emitter.emit(
            IMAGE_TEST, image_event(staged.image, "failed", f"rejected: {decision.reason}")
        )
        self._set_state(staged, State.REJECTED)
        log.warning("%s: rejected: %s", staged.label, decision.reason)
        if self.cfg.delete_rejected:
            self._delete(staged)

    def _promote(self, staged: StagingAmi) -> Promotion:
        try:
            regions = target_regions(self.cfg, self.ec2)
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
        results = self._fan_out(staged, regions)
        results.append(self._publish_staging(staged))
        done = {r.region: r.ami_id for r in results if r.ok and r.ami_id}
        failed = {r.region: r.error or "unknown error" for r in results if not r.ok}
        if done:
            self.emitter.emit(IMAGE_RELEASE, release_event(staged.image, done, failed))
        if failed:
            log.error(
                "%s: released in %d region(s); FAILED in %s; state stays promoting, "
                "a resume will retry them",
                staged.label,
                len(done),
                "; ".join(f"{r}: {why}" for r, why in sorted(failed.items())),
            )
        else:
            self._set_state(staged, State.RELEASED)
            log.info("%s: released in %d region(s)", staged.label, len(done))
        return Promotion(staged.ami_id, done, failed)

    def _fan_out(self, staged: StagingAmi, regions: list[str]) -> list[RegionResult]:
        """Copy to every region concurrently; emit copy/publish events from this thread."""
        if not regions:
            return []
        events: queue.Queue[tuple[str, str, Any]] = queue.Queue()

        def work(region: str) -> None:
            result = RegionResult(region, None, "internal error")
            try:
                with self.slots:
                    result = self.copier.copy_and_publish(
                        region,
                        staged.image,
                        staged.name,
                        lambda ami: events.put(("copy", region, ami)),
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

    def _publish_staging(self, staged: StagingAmi) -> RegionResult:
        region = self.cfg.staging_region
        try:
            snapshots = self._staging_snapshots(staged)
        except (ClientError, BotoCoreError) as exc:
            log.error("%s: cannot find the staging snapshot: %s", staged.label, describe_error(exc))
            return RegionResult(region, staged.ami_id, describe_error(exc))
        result = self.copier.publish_in_place(staged.image, staged.described, snapshots)
        if result.ok and result.published:
            self.emitter.emit(IMAGE_PUBLISH, publish_event(staged.image, region, staged.ami_id))
        return result

    # -- the record ---------------------------------------------------------------
    def _staging_snapshots(self, staged: StagingAmi, everything: bool = False) -> list[str]:
        """The staging AMI's snapshots: its block device mappings plus the tagged one.

        A tagged snapshot without ``fedimg:uploaded`` beside one with it is what a
        killed upload left (``fedimg.reconcile`` deletes it): it is neither
        published nor re-tagged, unless ``everything`` (deleting a rejected AMI).
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
        uploaded = [s for s in tagged if tags.UPLOADED in tags.as_dict(s.get("Tags"))]
        if uploaded and not everything:
            tagged = uploaded
        return list(dict.fromkeys([*found, *sorted(s["SnapshotId"] for s in tagged)]))

    def _set_state(self, staged: StagingAmi, state: State) -> None:
        """Record ``state`` on the staging AMI (authoritative) and, best effort, its snapshots."""
        what = f"{staged.label}: state {state.value}"
        self.copier.tag(self.cfg.staging_region, [staged.ami_id], {tags.STATE: state.value}, what)
        log.info("%s: fedimg:state=%s", staged.label, state.value)
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

    # -- per-AMI exclusion ----------------------------------------------------------
    @contextmanager
    def _exclusive(self, ami_id: str) -> Iterator[None]:
        with self._guard:
            if ami_id in self._busy:
                self._recheck.add(ami_id)
                raise Busy(ami_id)
            self._busy.add(ami_id)
        try:
            yield
        finally:
            with self._guard:
                self._busy.discard(ami_id)


# -- reconcile ---------------------------------------------------------------------


def staged_amis(ec2: Any, states: tuple[State, ...] | None = None) -> list[dict[str, Any]]:
    """Every fedimg AMI we own in a region, optionally only in ``states``."""
    if states:
        filters = [{"Name": f"tag:{tags.STATE}", "Values": [s.value for s in states]}]
    else:
        filters = [{"Name": "tag-key", "Values": [tags.STATE]}]
    images: list[dict[str, Any]] = []
    for page in ec2.get_paginator("describe_images").paginate(Owners=["self"], Filters=filters):
        images.extend(page.get("Images", []))
    return sorted(images, key=lambda i: (i.get("CreationDate", ""), i["ImageId"]))


def reconcile(promoter: Promoter) -> list[tuple[str, str]]:
    """One pass over the staging AMIs only: testing -> gate (or re-request), promoting -> resume.

    ``(ami_id, outcome)`` per AMI; an outcome starting with ``error`` means the
    step raised (and was logged with its traceback). The whole pass, a stage's
    leftovers included, is ``fedimg.reconcile.Reconciler``.
    """
    from fedimg.reconcile import Reconciler

    return Reconciler(promoter).run().pairs()


# -- CLI -------------------------------------------------------------------------------


def cli_promote(cfg: FedimgConfig, emitter: Emitter, ami_id: str) -> int:
    """``fedimg promote AMI_ID``: 0 only if the AMI ends up released."""
    if not AMI_ID_RE.match(ami_id):
        log.error("%r is not an AMI id", ami_id)
        return 2
    return promote_by_hand(Promoter.from_config(cfg, emitter), ami_id)


def promote_by_hand(promoter: Promoter, ami_id: str) -> int:
    """The gate by hand: evaluate a testing AMI, resume a promoting one."""
    try:
        staged = promoter.lookup(ami_id)
        if staged.state is State.RELEASED:
            log.info("%s: already released", staged.label)
            return 0
        if staged.state is State.REJECTED:
            log.error("%s: rejected by the gate; refusing to release it", staged.label)
            return 1
        if staged.state is State.PROMOTING:
            promotion = promoter.resume(ami_id)
            if not promotion.complete:
                log.error("%s: not released in %s", staged.label, ", ".join(promotion.failed))
        elif staged.state is State.TESTING:
            decision = promoter.evaluate(ami_id)
            if not decision.release:
                log.error(
                    "%s: not released: %s %s", staged.label, decision.verdict, decision.reason
                )
        else:
            log.error("%s: unknown state %r; refusing to act", staged.label, staged.state)
            return 1
        final = promoter.lookup(ami_id).state
    except (NotEligible, Busy) as exc:
        log.error("%s: %s", ami_id, exc)
        return 1
    if final is not State.RELEASED:
        log.error("%s: state is %s, not released", ami_id, final)
        return 1
    return 0


def cli_reconcile(cfg: FedimgConfig, emitter: Emitter) -> int:
    """``fedimg reconcile``: one pass; non-zero if a step raised or a release is incomplete."""
    from fedimg.reconcile import run_by_hand
    from fedimg.stage import Stager

    stager = Stager.from_config(cfg, emitter)
    try:
        return run_by_hand(Promoter.from_config(cfg, emitter), stager, print)
    finally:
        stager.close()
