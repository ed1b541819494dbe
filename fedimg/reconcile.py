"""The reconcile pass: rebuild the truth from AWS tags and ResultsDB, then finish the work.

fedmsg is fire-and-forget and hubs die. Nothing fedimg must finish depends on
a message arriving: the pass runs in the hub at start-up and every
``fedimg.reconcile.interval`` seconds (``consumers.ReconcileProducer``) and by
hand as ``fedimg reconcile``. Every step is idempotent, so a pass racing a
message handler, another pass or a second process does no harm.

Staging AMIs (tag ``fedimg:state``):

    testing    results complete         -> the gate (release or reject)
               a required result still missing ``fedimg.gate.retest_after``
               seconds after staging    -> ask for the test ONCE more
                                           (``fedimg.image.test`` started;
                                           ``fedimg:test-requested=1`` first,
                                           so a crash cannot make it twice)
               no result by ``fedimg.gate.deadline`` -> rejected (the gate)
    promoting                           -> copy to and publish in the regions missing
                                           (copies are found before they are made)

What a stage killed mid-way leaves in the staging region, found from the
fedimg snapshots still tagged ``testing`` and only once they (and any AMI
of theirs) are older than ``fedimg.reconcile.orphan_grace`` and this process
is not staging that image:

    snapshot half-written (no ``fedimg:uploaded`` tag: the upload died)
                -> deleted; the image is staged again from its tags (a new upload)
    snapshot complete, an AMI of a volume type missing or without fedimg tags
                -> the image is staged again from the tags: stage registers
                   the missing AMI from this snapshot (no upload), adopts
                   (tags) an untagged one, and asks for its test. At most
                   ``MAX_RESUMES`` times per snapshot (``fedimg:resumed``); then
                   the snapshot is deleted and any untagged AMI deregistered.
    snapshot beside complete, tagged AMIs that provably do not use it
                -> deleted (a duplicate upload)

When an image is staged again, its compose is found from the image's URL
(``location_candidates``) and every other image of it that left no trace at
all (no AMI, no snapshot: the crash came before its upload started) is staged
too. A compose killed before its first upload started left nothing in AWS:
fedmsg's backlog replays its message, or it is replayed by hand.

``plan_image`` and ``retest_due`` are the pure decisions; ``Reconciler`` is
the shell reading AWS and acting. An AMI registered without tags AND without
a tagged snapshot is not looked for: stage tags the snapshot when the upload
starts, before any AMI exists.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from botocore.exceptions import BotoCoreError, ClientError

from fedimg import ami, tags
from fedimg.aws import error_code
from fedimg.compose import CloudImage, ComposeError, read_compose
from fedimg.gate import Decision
from fedimg.messages import (
    ARCHES,
    IMAGE_TEST,
    SHA256_RE,
    InvalidMessage,
    check_http_url,
    image_event,
)
from fedimg.promote import Busy, NotEligible, Promoter, StagingAmi, staged_amis
from fedimg.tags import State

if TYPE_CHECKING:
    from fedimg.stage import StageOutcome, Stager

log = logging.getLogger(__name__)

MAX_RETESTS: Final = 1  # "re-request the test once"
MAX_RESUMES: Final = 3  # restages from one snapshot before it is given up
MAX_LOCATION_TRIES: Final = 6  # folders above an image file tried as the compose location
RAW_XZ: Final = "raw.xz"


# -- the pure core -------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What the pass did about one AMI or one image's leftovers."""

    resource: str  # an AMI id, or the image name for a stage's leftovers
    action: str  # release | reject | wait | retest | released | promoting | resumed | ...
    detail: str = ""

    @property
    def text(self) -> str:
        return f"{self.action}: {self.detail}" if self.detail else self.action

    @property
    def failed(self) -> bool:
        """A step raised, a release is incomplete, or a resumed stage failed."""
        return self.action in ("error", "promoting", "gave-up")


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def requested_count(image_tags: Mapping[str, str], key: str = tags.TEST_REQUESTED) -> int:
    """How often the pass already acted (``fedimg:test-requested`` / ``fedimg:resumed``).

    An unreadable value counts as "too often": never loop on a tag we cannot read.
    """
    raw = image_tags.get(key)
    if raw is None:
        return 0
    try:
        value = int(raw)
    except ValueError:
        return 1_000_000
    return max(value, 0)


def retest_due(
    decision: Decision,
    *,
    staged_at: datetime,
    now: datetime,
    retest_after: timedelta,
    requested: int,
    max_retests: int = MAX_RETESTS,
) -> bool:
    """Whether a ``testing`` AMI's test should be requested again now.

    Only when the gate waits for a MISSING required result (never because
    ResultsDB was unreachable: that decision lists nothing missing), nothing
    failed, the AMI has waited ``retest_after`` since staging, and the test
    was not re-requested ``max_retests`` times already.
    """
    return (
        decision.wait
        and bool(decision.missing)
        and not decision.failed
        and requested < max_retests
        and _aware(now) - _aware(staged_at) >= retest_after
    )


@dataclass(frozen=True)
class SnapshotFacts:
    """One fedimg snapshot of an image in the staging region, as described by EC2."""

    snapshot_id: str
    aws_state: str  # pending | completed | error
    started: datetime
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def uploaded(self) -> bool:
        """Every block written: completed by EC2 AND marked by stage after completing it."""
        return self.aws_state == "completed" and tags.UPLOADED in self.tags


@dataclass(frozen=True)
class AmiFacts:
    """The staging AMI of one volume type of an image (found by name or tags)."""

    ami_id: str
    state: State | None  # None: registered, never tagged (a crash before tagging)
    created: datetime | None = None
    snapshots: tuple[str, ...] = ()  # from its block device mappings


@dataclass(frozen=True)
class ImagePlan:
    """What to do about one image's leftovers; empty when nothing is to be done."""

    delete: tuple[str, ...] = ()  # snapshot ids
    deregister: tuple[str, ...] = ()  # untagged AMI ids
    restage: bool = False
    resume_from: str | None = None  # the complete snapshot stage will register from
    gave_up: bool = False  # resumed MAX_RESUMES times already: everything goes
    reason: str = ""

    @property
    def empty(self) -> bool:
        return not (self.delete or self.deregister or self.restage)


def plan_image(
    snapshots: Sequence[SnapshotFacts],
    amis: Mapping[str, AmiFacts | None],
    *,
    now: datetime,
    grace: timedelta,
    busy: bool = False,
    max_resumes: int = MAX_RESUMES,
) -> ImagePlan:
    """The plan for one image (one sha256): its snapshots tagged ``testing`` and its AMIs.

    ``amis`` maps every configured volume type to its AMI (None: none found).
    A snapshot an AMI names in its block device mappings is never deleted.
    """
    plan = _plan_image(snapshots, amis, now=now, grace=grace, busy=busy, max_resumes=max_resumes)
    used = {snap for a in amis.values() if a is not None for snap in a.snapshots}
    if used & set(plan.delete):
        kept = tuple(s for s in plan.delete if s not in used)
        plan = replace(plan, delete=kept)
    return plan


def _plan_image(
    snapshots: Sequence[SnapshotFacts],
    amis: Mapping[str, AmiFacts | None],
    *,
    now: datetime,
    grace: timedelta,
    busy: bool,
    max_resumes: int,
) -> ImagePlan:
    if not snapshots:
        return ImagePlan(reason="no snapshot")
    if busy:
        return ImagePlan(reason="being staged by this process")
    untagged = [a for a in amis.values() if a is not None and a.state is None]
    young = [s.snapshot_id for s in snapshots if _aware(now) - _aware(s.started) < grace]
    young += [
        a.ami_id
        for a in untagged
        if a.created is not None and _aware(now) - _aware(a.created) < grace
    ]
    if young:
        return ImagePlan(reason=f"younger than the grace period: {', '.join(sorted(young))}")
    missing = sorted(vol for vol, a in amis.items() if a is None or a.state is None)
    complete = sorted(
        (s for s in snapshots if s.uploaded), key=lambda s: (_aware(s.started), s.snapshot_id)
    )
    partial = tuple(s.snapshot_id for s in snapshots if not s.uploaded)
    if missing:
        what = ", ".join(
            f"{vol} {'untagged ' + a.ami_id if a is not None else 'missing'}"
            for vol in missing
            for a in [amis[vol]]
        )
        if not complete:
            return ImagePlan(
                delete=partial,
                restage=True,
                reason=f"upload never finished ({what}): staging it again",
            )
        keep = complete[-1]
        resumes = requested_count(keep.tags, tags.RESUMED)
        extra = tuple(s.snapshot_id for s in complete[:-1])
        if resumes >= max_resumes:
            return ImagePlan(
                delete=partial + extra + (keep.snapshot_id,),
                deregister=tuple(a.ami_id for a in untagged),
                gave_up=True,
                reason=f"{what}: gave up after {resumes} resumes from {keep.snapshot_id}",
            )
        return ImagePlan(
            delete=partial + extra,
            restage=True,
            resume_from=keep.snapshot_id,
            reason=f"{what}: resuming from snapshot {keep.snapshot_id}",
        )
    # Every volume type has its tagged AMI: only unused snapshots may go.
    known = {s.snapshot_id for s in snapshots}
    used = {snap for a in amis.values() if a is not None for snap in a.snapshots}
    if used and used <= known and all(a is not None and a.snapshots for a in amis.values()):
        # The AMIs name their snapshots, all of them ours: the rest are unused.
        unused = tuple(sorted(known - used))
    else:
        # Cannot tell which snapshot backs them (moto lists made-up ones): only the
        # half-written ones, which no AMI was ever registered from, may go.
        unused = partial
    if unused:
        return ImagePlan(delete=unused, reason="snapshots no AMI uses")
    return ImagePlan(reason="nothing left over")


def image_from_tags(
    snapshot_tags: Mapping[str, str], allowed_hosts: Iterable[str] = ()
) -> CloudImage:
    """The compose image a fedimg snapshot was uploaded from, rebuilt from its tags.

    ValueError when a tag is missing or unusable; the URL must still be an
    allowed http(s) compose host. ``size`` is unknown (0): stage reads the
    raw size from the file itself and checks the sha256 while streaming.
    """
    compose_id = snapshot_tags.get(tags.COMPOSE_ID, "")
    image_name = snapshot_tags.get(tags.IMAGE_NAME, "")
    url = snapshot_tags.get(tags.IMAGE_URL, "")
    sha256 = snapshot_tags.get(tags.SHA256, "").lower()
    arch = snapshot_tags.get(tags.ARCH, "")
    if not (compose_id and image_name and url):
        raise ValueError("compose id, image name or image URL tag missing")
    if not SHA256_RE.match(sha256):
        raise ValueError(f"sha256 tag {sha256[:80]!r} is not a sha256")
    if arch not in ARCHES:
        raise ValueError(f"arch tag {arch[:40]!r} is not one fedimg stages")
    try:
        check_http_url(url, tuple(allowed_hosts))
    except InvalidMessage as exc:
        raise ValueError(f"image URL tag refused: {exc}") from exc
    return CloudImage(
        compose_id=compose_id,
        variant="",
        arch=arch,
        subvariant=snapshot_tags.get(tags.SUBVARIANT, ""),
        format=RAW_XZ,
        path=image_name,
        url=url,
        size=0,
        sha256=sha256,
        image_name=image_name,
        type="raw-xz",
        release=snapshot_tags.get(tags.RELEASE, ""),
    )


def location_candidates(image_url: str, limit: int = MAX_LOCATION_TRIES) -> list[str]:
    """Folders above an image's URL, nearest first: where its compose's ``metadata/`` may be.

    Pungi's layout is ``<location>/<Variant>/<arch>/images/<file>``; the
    folders are tried in turn and the one whose images.json lists the image wins.
    """
    base, _, _ = image_url.partition("?")
    scheme, sep, rest = base.partition("://")
    if not sep or "/" not in rest:
        return []
    host, _, path = rest.partition("/")
    parts = [p for p in path.split("/") if p]
    return [f"{scheme}://{host}/" + "/".join(parts[:end]) for end in range(len(parts) - 1, 0, -1)][
        :limit
    ]


# -- the shell -----------------------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _when(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return _aware(value)
    if isinstance(value, str) and value:
        try:
            return _aware(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


@dataclass
class Report:
    """One pass: an outcome per AMI and per image with leftovers, and the stages it started."""

    outcomes: list[Outcome] = field(default_factory=list)
    restages: dict[str, Future[list[StageOutcome]]] = field(default_factory=dict)

    def pairs(self) -> list[tuple[str, str]]:
        return [(o.resource, o.text) for o in self.outcomes]

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        """Wait for the restages this pass started; one outcome each (``fedimg reconcile``)."""
        done: list[Outcome] = []
        for name, future in self.restages.items():
            try:
                staged = future.result(timeout=timeout)
            except Exception as exc:
                log.exception("%s: the resumed stage raised", name)
                done.append(Outcome(name, "error", f"restage: {type(exc).__name__}: {exc}"[:300]))
                continue
            bad = [o for o in staged if not o.ok]
            if bad:
                done.append(Outcome(name, "error", f"restage failed: {bad[0].reason}"[:300]))
            else:
                amis = ", ".join(f"{o.vol_type} {o.ami_id}" for o in staged)
                done.append(Outcome(name, "staged", amis))
        return done


class Reconciler:
    """One reconcile pass over the staging region (see the module docstring)."""

    def __init__(
        self,
        promoter: Promoter,
        stager: Stager | None = None,
        *,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.promoter = promoter
        self.stager = stager
        self.cfg = promoter.cfg
        self.now = now or promoter.now
        self._composes: set[str] = set()  # composes whose other images were looked at

    @property
    def ec2(self) -> Any:
        return self.promoter.ec2

    def run(self) -> Report:
        """AMIs first (the gate, re-requests, promotions), then a stage's leftovers."""
        report = Report()
        try:
            report.outcomes.extend(self.amis())
        except (ClientError, BotoCoreError) as exc:
            log.error("reconcile: cannot list the staging AMIs: %s", exc)
            report.outcomes.append(Outcome("amis", "error", str(exc)[:300]))
        if self.stager is not None:
            try:
                self.leftovers(report)
            except (ClientError, BotoCoreError) as exc:
                log.error("reconcile: cannot list fedimg snapshots: %s", exc)
                report.outcomes.append(Outcome("snapshots", "error", str(exc)[:300]))
        return report

    # -- AMIs ------------------------------------------------------------------------
    def amis(self) -> list[Outcome]:
        done = []
        for described in staged_amis(self.ec2, (State.TESTING, State.PROMOTING)):
            ami_id = str(described["ImageId"])
            compose = tags.as_dict(described.get("Tags")).get(tags.COMPOSE_ID, "?")
            outcome = self.ami(ami_id, tags.state_of(described))
            log.info("%s %s: reconcile: %s", compose, ami_id, outcome.text)
            done.append(outcome)
        return done

    def ami(self, ami_id: str, state: State | None) -> Outcome:
        try:
            if state is State.PROMOTING:
                promotion = self.promoter.resume(ami_id)
                if promotion.complete:
                    return Outcome(ami_id, "released")
                return Outcome(
                    ami_id, "promoting", f"failed in {', '.join(sorted(promotion.failed))}"
                )
            decision = self.promoter.evaluate(ami_id)
            if decision.wait:
                retest = self.maybe_retest(ami_id, decision)
                if retest is not None:
                    return retest
            return Outcome(ami_id, decision.verdict, decision.reason)
        except (NotEligible, Busy) as exc:
            return Outcome(ami_id, "skipped", f"{type(exc).__name__} {exc}")
        except Exception as exc:  # one AMI must not stop the pass
            log.exception("%s: reconcile failed", ami_id)
            return Outcome(ami_id, "error", f"{type(exc).__name__}: {exc}"[:300])

    def maybe_retest(self, ami_id: str, decision: Decision) -> Outcome | None:
        """Ask for the test once more if its results never came (a lost run or message)."""
        staged = self.promoter.lookup(ami_id)
        if staged.state is not State.TESTING:
            return None
        requested = requested_count(tags.as_dict(staged.described.get("Tags")))
        if not retest_due(
            decision,
            staged_at=staged.staged_at,
            now=self.now(),
            retest_after=timedelta(seconds=self.cfg.retest_after),
            requested=requested,
        ):
            return None
        return self.retest(staged, requested + 1, decision)

    def retest(self, staged: StagingAmi, count: int, decision: Decision) -> Outcome:
        # The tag first: a crash after it means no re-request rather than two.
        self.promoter.copier.tag(
            self.cfg.staging_region,
            [staged.ami_id],
            {tags.TEST_REQUESTED: str(count)},
            f"{staged.label}: test re-request",
        )
        self.promoter.emitter.emit(IMAGE_TEST, image_event(staged.image, "started"))
        waited = self.now() - _aware(staged.staged_at)
        log.warning(
            "%s: no complete results %.0fs after staging (%s); test requested again (%d of %d)",
            staged.label,
            waited.total_seconds(),
            decision.reason,
            count,
            MAX_RETESTS,
        )
        return Outcome(staged.ami_id, "retest", f"{decision.reason}; test requested again")

    # -- a stage's leftovers -----------------------------------------------------------
    def testing_snapshots(self) -> dict[str, list[dict[str, Any]]]:
        """sha256 -> the fedimg snapshots of that image still tagged ``testing``."""
        filters = [{"Name": f"tag:{tags.STATE}", "Values": [State.TESTING.value]}]
        found: dict[str, list[dict[str, Any]]] = {}
        pages = self.ec2.get_paginator("describe_snapshots").paginate(
            OwnerIds=["self"], Filters=filters
        )
        for page in pages:
            for snap in page.get("Snapshots", []):
                snap_tags = tags.as_dict(snap.get("Tags"))
                sha = snap_tags.get(tags.SHA256, "")
                if sha and tags.SOURCE_AMI not in snap_tags:
                    found.setdefault(sha, []).append(snap)
        return found

    def leftovers(self, report: Report) -> None:
        now = self.now()
        for sha, snaps in sorted(self.testing_snapshots().items()):
            newest = max(snaps, key=lambda s: str(s.get("StartTime", "")))
            snap_tags = tags.as_dict(newest.get("Tags"))
            name = snap_tags.get(tags.IMAGE_NAME, sha[:16])[:255]
            ctx = f"compose {snap_tags.get(tags.COMPOSE_ID, '?')} image {name}"
            try:
                outcome = self.image(
                    sha, snaps=snaps, snap_tags=snap_tags, now=now, ctx=ctx, report=report
                )
            except Exception as exc:  # one image must not stop the pass
                log.exception("%s: reconcile of its snapshots failed", ctx)
                outcome = Outcome(name, "error", f"{type(exc).__name__}: {exc}"[:300])
            if outcome is not None:
                log.info("%s: reconcile: %s", ctx, outcome.text)
                report.outcomes.append(outcome)

    def image(
        self,
        sha: str,
        *,
        snaps: list[dict[str, Any]],
        snap_tags: Mapping[str, str],
        now: datetime,
        ctx: str,
        report: Report,
    ) -> Outcome | None:
        assert self.stager is not None
        name = snap_tags.get(tags.IMAGE_NAME, sha[:16])[:255]
        try:
            image = image_from_tags(snap_tags)  # any host: enough to find its AMIs
        except ValueError as exc:
            log.error("%s: snapshots %s: cannot resume: %s", ctx, _ids(snaps), exc)
            return Outcome(name, "error", f"unusable tags on {_ids(snaps)}: {exc}"[:300])
        facts = [
            SnapshotFacts(
                str(s["SnapshotId"]),
                str(s.get("State", "")),
                _when(s.get("StartTime")) or now,
                tags.as_dict(s.get("Tags")),
            )
            for s in snaps
        ]
        plan = plan_image(
            facts,
            self.image_amis(image),
            now=now,
            grace=timedelta(seconds=self.cfg.orphan_grace),
            busy=self.stager.busy(sha),
        )
        if plan.empty:
            log.debug("%s: reconcile: %s", ctx, plan.reason)
            return None
        if plan.restage:
            try:  # staging it again downloads from there: only from an allowed host
                check_http_url(image.url, tuple(self.cfg.allowed_hosts))
            except InvalidMessage as exc:
                log.error("%s: snapshots %s: cannot resume: %s", ctx, _ids(snaps), exc)
                return Outcome(name, "error", f"{plan.reason}; not resumed: {exc}"[:300])
        log.warning("%s: reconcile: %s", ctx, plan.reason)
        for snapshot_id in plan.delete:
            self.delete_snapshot(snapshot_id, ctx)
        for ami_id in plan.deregister:
            ami.deregister_quietly(self.ec2, ami_id, ctx)
        if not plan.restage:
            action = "gave-up" if plan.gave_up else "cleaned"
            return Outcome(name, action, f"{plan.reason}; deleted {', '.join(plan.delete)}")
        if plan.resume_from is not None:
            resumed = next(f for f in facts if f.snapshot_id == plan.resume_from)
            count = requested_count(resumed.tags, tags.RESUMED) + 1
            self.ec2.create_tags(
                Resources=[plan.resume_from], Tags=tags.as_list({tags.RESUMED: str(count)})
            )
        future = self.stager.submit_image(image)
        if future is None:
            return Outcome(name, "skipped", "already being staged")
        report.restages[name] = future
        self.siblings(image, ctx, report)
        return Outcome(name, "resumed", plan.reason)

    def siblings(self, image: CloudImage, ctx: str, report: Report) -> None:
        """Stage the images of the same compose a crash stopped before they left any trace.

        A stage that died mid-compose may not have started every image (the pool
        is bounded). The compose is found again from the image's URL; an image of
        it with no AMI and no snapshot at all is staged now. Once per compose and pass.
        """
        assert self.stager is not None
        if image.compose_id in self._composes:
            return
        self._composes.add(image.compose_id)
        found = None
        for location in location_candidates(image.url):
            try:
                found = read_compose(self.stager.session, location, self.cfg, image.compose_id)
            except ComposeError as exc:
                log.debug("%s: no compose at %s: %s", ctx, location, exc)
                continue
            if any(i.sha256 == image.sha256 for i in found.images):
                break
            found = None
        if found is None:
            log.warning(
                "%s: compose %s not found above %s; its images without any trace in AWS "
                "are not resumed (replay the compose message)",
                ctx,
                image.compose_id,
                image.url,
            )
            return
        for other in found.images:
            if other.sha256 == image.sha256 or self.stager.busy(other.sha256):
                continue
            if any(self.image_amis(other).values()) or self.has_snapshot(other.sha256):
                continue  # it left a trace: the leftovers pass (or nothing) is due
            future = self.stager.submit_image(other)
            if future is None:
                continue
            log.warning(
                "compose %s image %s: never staged before the crash; staging it now",
                other.compose_id,
                other.image_name,
            )
            report.restages[other.image_name] = future
            report.outcomes.append(
                Outcome(other.image_name, "resumed", "never started: staging it now")
            )

    def image_amis(self, image: CloudImage) -> dict[str, AmiFacts | None]:
        """The staging AMI of every configured volume type (by name, then by tags)."""
        found: dict[str, AmiFacts | None] = {}
        for vol in self.cfg.volume_types:
            described = ami.find_ami(self.ec2, ami.ami_name(image, vol), image.sha256, vol)
            if described is None or str(described.get("State")) in ami.BROKEN_STATES:
                found[vol] = None  # stage deregisters a broken one and registers anew
                continue
            found[vol] = AmiFacts(
                str(described["ImageId"]),
                tags.state_of(described),
                _when(described.get("CreationDate")),
                tuple(
                    str(m["Ebs"]["SnapshotId"])
                    for m in described.get("BlockDeviceMappings", [])
                    if m.get("Ebs", {}).get("SnapshotId")
                ),
            )
        return found

    def has_snapshot(self, sha256: str) -> bool:
        """Whether any snapshot of ours (any state) was started for this image."""
        found = self.ec2.describe_snapshots(
            OwnerIds=["self"], Filters=[{"Name": f"tag:{tags.SHA256}", "Values": [sha256]}]
        )
        return bool(found.get("Snapshots"))

    def delete_snapshot(self, snapshot_id: str, ctx: str) -> None:
        try:
            self.ec2.delete_snapshot(SnapshotId=snapshot_id)
        except ClientError as exc:
            if error_code(exc) == "InvalidSnapshot.NotFound":
                return
            if error_code(exc) == "InvalidSnapshot.InUse":
                log.warning("%s: snapshot %s is in use; kept", ctx, snapshot_id)
                return
            raise
        log.warning("%s: deleted left-over snapshot %s", ctx, snapshot_id)


def _ids(snaps: Iterable[Mapping[str, Any]]) -> str:
    return ", ".join(str(s.get("SnapshotId")) for s in snaps)


# -- entry points ----------------------------------------------------------------------


def reconcile(promoter: Promoter, stager: Stager | None = None) -> Report:
    """One pass (the hub's ReconcileProducer); restages run on in the stager's pool."""
    report = Reconciler(promoter, stager).run()
    counts: dict[str, int] = {}
    for outcome in report.outcomes:
        counts[outcome.action] = counts.get(outcome.action, 0) + 1
    log.info(
        "reconcile pass: %s",
        ", ".join(f"{n} {a}" for a, n in sorted(counts.items())) or "nothing to do",
    )
    return report


def run_by_hand(promoter: Promoter, stager: Stager, print_line: Callable[[str], None]) -> int:
    """``fedimg reconcile``: one pass, waiting for the stages it resumed; 0 if all is well."""
    report = reconcile(promoter, stager)
    outcomes = [*report.outcomes, *report.wait()]
    for outcome in outcomes:
        print_line(f"{outcome.resource}\t{outcome.text}")
    return 1 if any(o.failed for o in outcomes) else 0
