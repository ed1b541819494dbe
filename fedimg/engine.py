"""The lifecycle engine: observe, plan, act -- for one image, one AMI, one compose or everything.

Every way into fedimg asks the engine to converge a scope and nothing else:

    compose message / ``fedimg stage``  -> accept_compose / stage_location (Scope.MESSAGE)
    ResultsDB message / ``fedimg promote`` -> on_result / converge_ami (Scope.MESSAGE)
    reconcile producer / ``fedimg reconcile`` -> reconcile (Scope.RECONCILE)

Each convergence takes the scope's lock (``fedimg.locks.Guard``: threads and
processes sharing ``fedimg.state_dir``), observes the world afresh
(``fedimg.observe``), asks the pure ``fedimg.plan`` what to do, and carries
the actions out through the actuators (``fedimg.stage.Stager``,
``fedimg.promote.Promoter``). A compose is remembered as a durable intent
(``fedimg.intents``) before any of its work starts, and forgotten only when
every image is staged or given up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from botocore.exceptions import BotoCoreError, ClientError

from fedimg import tags
from fedimg.aws import AwsClients
from fedimg.compose import CloudImage, ComposeError, read_compose
from fedimg.config import FedimgConfig
from fedimg.facts import AmiFacts, AmiLife, ImageFacts
from fedimg.gate import Decision
from fedimg.http import make_session
from fedimg.intents import Intent, IntentError, IntentStore
from fedimg.locks import Guard
from fedimg.messages import (
    AMI_ID_RE,
    RESULTSDB_ITEM_TYPE,
    ComposeStatus,
    Emitter,
    InvalidMessage,
    ResultNotice,
    check_http_url,
)
from fedimg.observe import (
    ami_results,
    describe_staging_ami,
    image_from_tags,
    observe_ami,
    observe_fleet,
    observe_image,
    snapshot_permissions,
    staged_amis,
    testing_snapshots,
)
from fedimg.plan import (
    Adopt,
    Announce,
    DeleteSnapshot,
    Deregister,
    GiveUp,
    ImagePlan,
    MarkResumed,
    Policy,
    Promote,
    Refuse,
    Reject,
    Release,
    RequestTest,
    Scope,
    Stage,
    Wait,
    compose_progress,
    gate_decision,
    plan_ami,
    plan_image,
    plan_retest,
)
from fedimg.promote import NotEligible, Promoter
from fedimg.prune import PolicyRefused, audited, exposure
from fedimg.results import ResultsDBSource, ResultsSource
from fedimg.stage import (
    EXPECTED_FAILURES,
    ProgressFactory,
    StageOutcome,
    Stager,
    TerminalBoard,
    failure_reason,
)
from fedimg.tags import State
from fedimg.upkeep import (
    AuditRun,
    PruneRun,
    Upkeep,
    fleet_regions,
    prune_plan,
    prune_policy_of,
)
from fedimg.waivers import (
    BearerAuth,
    NoWaivers,
    WaiverDBSource,
    WaiverRefused,
    WaiverSource,
    WaiversUnavailable,
    new_waiver_body,
    waiver_source,
)

log = logging.getLogger(__name__)

COMPOSE_LABEL = "metadata/images.json"


def policy_of(cfg: FedimgConfig) -> Policy:
    return Policy(
        volume_types=tuple(cfg.volume_types),
        required=tuple(cfg.required_testcases),
        reject_outcomes=tuple(cfg.reject_outcomes),
        deadline=timedelta(seconds=cfg.gate_deadline),
        retest_after=timedelta(seconds=cfg.retest_after),
        grace=timedelta(seconds=cfg.orphan_grace),
        max_attempts=cfg.stage_max_attempts,
        gate=cfg.gate_policy,
        deprecation_days=dict(cfg.deprecation_days),
    )


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Outcome:
    """What one convergence did about one AMI, image or compose (a line of a report)."""

    resource: str  # an AMI id, an image name or a compose id
    action: str  # release | reject | wait | retest | released | promoting | staged | ...
    detail: str = ""
    # Nothing was decided for a passing reason (ResultsDB could not be asked): looking
    # again later may decide (fedora-messaging retries the message).
    transient: bool = False

    @property
    def text(self) -> str:
        return f"{self.action}: {self.detail}" if self.detail else self.action

    @property
    def failed(self) -> bool:
        """A step raised, a release is incomplete, or an image was given up."""
        return self.action in ("error", "promoting", "gave-up")


@dataclass
class Report:
    """One reconcile pass: an outcome per AMI, image and compose, and the stages it started."""

    outcomes: list[Outcome] = field(default_factory=list)
    stages: dict[str, Future[list[StageOutcome]]] = field(default_factory=dict)

    def pairs(self) -> list[tuple[str, str]]:
        return [(o.resource, o.text) for o in self.outcomes]

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        """Wait for the stages this pass started; one outcome per image (``fedimg reconcile``)."""
        done: list[Outcome] = []
        for name, future in self.stages.items():
            try:
                staged = future.result(timeout=timeout)
            except Exception as exc:
                log.exception("%s: the resumed stage raised", name)
                done.append(Outcome(name, "error", f"stage: {type(exc).__name__}: {exc}"[:300]))
                continue
            bad = [o for o in staged if not o.ok]
            idle = [o for o in staged if o.status in ("busy", "waiting")]
            if bad:
                done.append(Outcome(name, "error", f"stage failed: {bad[0].reason}"[:300]))
            elif idle:
                done.append(Outcome(name, idle[0].status, idle[0].reason or "left alone"))
            else:
                amis = ", ".join(f"{o.vol_type} {o.ami_id}" for o in staged)
                done.append(Outcome(name, "staged", amis))
        return done


@dataclass(frozen=True)
class ImageResult:
    """One image's convergence: its outcomes, and what the compose's intent learns from it."""

    outcomes: list[StageOutcome]
    staged: bool = False  # every volume type has its adopted AMI
    tried: bool = False  # a stage ran (and counts as an attempt)
    gave_up: str = ""


class Engine:
    """One per process: converges composes, images and AMIs; safe from any number of threads."""

    def __init__(
        self,
        cfg: FedimgConfig,
        *,
        stager: Stager,
        promoter: Promoter,
        results: ResultsSource,
        intents: IntentStore,
        guard: Guard,
        now: Callable[[], datetime] = _utcnow,
        waivers: WaiverSource | None = None,
        upkeep: Upkeep | None = None,
    ) -> None:
        self.cfg = cfg
        self.waivers: WaiverSource = waivers if waivers is not None else NoWaivers()
        self.policy = policy_of(cfg)
        self.prune_policy = prune_policy_of(cfg)
        self.upkeep = upkeep or Upkeep(promoter.aws, promoter.emitter, promoter.copier)
        self.stager = stager
        self.promoter = promoter
        self.results = results
        self.intents = intents
        self.guard = guard
        self.now = now
        self._pool = ThreadPoolExecutor(cfg.stage_workers, thread_name_prefix="fedimg-stage")

    @classmethod
    def from_config(
        cls,
        cfg: FedimgConfig,
        emitter: Emitter,
        *,
        aws: AwsClients | None = None,
        session: requests.Session | None = None,
        results: ResultsSource | None = None,
        progress: ProgressFactory | None = None,
        waivers: WaiverSource | None = None,
    ) -> Engine:
        """Build the engine and its seams; IntentError if the state directory is unusable."""
        aws = aws or AwsClients(max_attempts=cfg.aws_max_attempts)
        session = session or make_session(
            cfg.http_retries, cfg.http_timeout, allowed_hosts=cfg.allowed_hosts
        )
        intents = IntentStore(cfg.state_dir)
        intents.check()
        return cls(
            cfg,
            stager=Stager.from_config(cfg, emitter, aws, session, progress=progress),
            promoter=Promoter.from_config(cfg, emitter, aws),
            results=results or ResultsDBSource.from_config(cfg),
            intents=intents,
            guard=Guard(cfg.state_dir),
            waivers=waivers or waiver_source(cfg),
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # -- composes --------------------------------------------------------------------
    def accept_compose(self, status: ComposeStatus, *, wait: bool = True) -> list[StageOutcome]:
        """A compose message: remember the compose durably, then stage every image of it.

        ``wait=False`` returns once the intent is recorded and the images are
        handed to the engine's pool (only a failed metadata read is returned):
        the intent, finished by the reconcile pass, is what makes that durable.
        """
        if not status.finished or not status.location:
            log.info("compose %s: status %s, nothing to stage", status.compose_id, status.status)
            return []
        wanted = Intent(
            compose_id=status.compose_id,
            location=status.location,
            release_version=status.release_version,
            accepted_at=self.now().isoformat(),
        )
        found = self.intents.record(wanted)
        if found.images is None and found.location != wanted.location:
            # An earlier message named a location whose metadata could not be read
            # (a wrong or forged one): this message's location gets its chance.
            log.warning(
                "compose %s: location %s replaces %s, never read",
                status.compose_id,
                status.location,
                found.location,
            )
            self.intents.update(
                status.compose_id,
                lambda i: dataclasses.replace(
                    i,
                    location=wanted.location,
                    release_version=wanted.release_version,
                    read_attempts=0,
                    last_error="",
                ),
            )
        log.info("compose %s: accepted (intent recorded)", status.compose_id)
        if not wait:
            return self._start_compose(status.compose_id, Scope.MESSAGE)[1]
        return self.converge_compose(status.compose_id, Scope.MESSAGE)

    def stage_location(
        self, location: str, compose_id: str | None = None, release_version: str | None = None
    ) -> list[StageOutcome]:
        """``fedimg stage``: a compose message by hand (the compose id from its metadata)."""
        if compose_id is not None:
            status = ComposeStatus(compose_id, "FINISHED", location, release_version)
            return self.accept_compose(status)
        try:
            found = read_compose(self.stager.session, location, self.cfg, None, release_version)
        except ComposeError as exc:
            log.error("compose %s: cannot read the compose: %s", location, exc)
            return [StageOutcome(COMPOSE_LABEL, "", None, "failed", failure_reason(exc))]
        self.intents.record(
            Intent(
                compose_id=found.compose_id,
                location=location,
                release_version=found.release_version or release_version,
                accepted_at=self.now().isoformat(),
                images=tuple(found.images),
            )
        )
        return self._rejected(found.rejected) + self.converge_compose(
            found.compose_id, Scope.MESSAGE
        )

    def _rejected(self, rejected: Iterable[Any]) -> list[StageOutcome]:
        return [
            StageOutcome(bad.image_name, vol, None, "failed", bad.reason)
            for bad in rejected
            for vol in self.cfg.volume_types
        ]

    def _read(self, intent: Intent) -> tuple[Intent | None, list[StageOutcome]]:
        """Read the compose metadata into the intent (counted; given up after a few tries)."""
        cid = intent.compose_id
        try:
            found = read_compose(
                self.stager.session, intent.location, self.cfg, cid, intent.release_version
            )
        except ComposeError as exc:
            reason = failure_reason(exc)
            tries = intent.read_attempts + 1
            log.error("compose %s: cannot read the compose (try %d): %s", cid, tries, reason)
            failed = [StageOutcome(COMPOSE_LABEL, "", None, "failed", reason)]
            if tries >= self.policy.max_read_attempts:
                log.error("compose %s: metadata unreadable %d times; given up", cid, tries)
                self.intents.drop(cid)
                return None, failed
            updated = self.intents.update(
                cid, lambda i: dataclasses.replace(i, read_attempts=tries, last_error=reason)
            )
            return updated, failed
        if not found.images:
            log.info("compose %s: no cloud raw.xz image to stage, skipped", cid)
        updated = self.intents.update(
            cid,
            lambda i: dataclasses.replace(
                i, images=tuple(found.images), release_version=found.release_version
            ),
        )
        return updated, self._rejected(found.rejected)

    def converge_compose(self, compose_id: str, scope: Scope) -> list[StageOutcome]:
        """Stage what the compose's intent still needs; wait for it; drop the intent when done."""
        futures, outcomes = self._start_compose(compose_id, scope)
        wait(futures)
        for future in futures:
            outcomes.extend(future.result())
        if futures:
            ok = sum(o.ok for o in outcomes)
            log.info(
                "compose %s: %d of %d AMI(s) staged or found in %s",
                compose_id,
                ok,
                len(outcomes),
                self.cfg.staging_region,
            )
        return outcomes

    def _start_compose(
        self, compose_id: str, scope: Scope
    ) -> tuple[list[Future[list[StageOutcome]]], list[StageOutcome]]:
        intent = self.intents.get(compose_id)
        outcomes: list[StageOutcome] = []
        if intent is not None and intent.images is None:
            intent, outcomes = self._read(intent)
        if intent is None or intent.images is None:
            return [], outcomes
        every = scope is Scope.MESSAGE  # a replay announces the staged ones again
        todo = [
            i
            for i in intent.images
            if i.sha256 not in intent.given_up and (every or i.sha256 not in intent.staged)
        ]
        futures = [self._pool.submit(self._compose_image, compose_id, i, scope) for i in todo]
        if not futures:
            self._settle(compose_id)
        return futures, outcomes

    def _compose_image(
        self, compose_id: str, image: CloudImage, scope: Scope
    ) -> list[StageOutcome]:
        intent = self.intents.get(compose_id)
        attempts = intent.attempts.get(image.sha256, 0) if intent else 0
        result = self.converge_image(image, scope, attempts)
        sha = image.sha256

        def learn(i: Intent) -> Intent:
            if result.staged:
                return dataclasses.replace(i, staged=(*[s for s in i.staged if s != sha], sha))
            tries = i.attempts.get(sha, 0) + (1 if result.tried else 0)
            given_up = dict(i.given_up)
            if result.gave_up:
                given_up[sha] = result.gave_up
            return dataclasses.replace(i, attempts={**i.attempts, sha: tries}, given_up=given_up)

        try:
            self.intents.update(compose_id, learn)
            self._settle(compose_id)
        except (IntentError, OSError):
            log.exception(
                "compose %s: cannot record the progress of %s", compose_id, image.image_name
            )
        return result.outcomes

    def _settle(self, compose_id: str) -> None:
        intent = self.intents.get(compose_id)
        if intent is None or intent.images is None:
            return
        progress = compose_progress(
            [i.sha256 for i in intent.images], dict.fromkeys(intent.staged, True), intent.given_up
        )
        if progress.done:
            self.intents.drop(compose_id)
            log.info(
                "compose %s: %d image(s) staged, %d given up; intent done",
                compose_id,
                len(progress.staged),
                len(progress.given_up),
            )

    # -- images ----------------------------------------------------------------------
    def converge_image(self, image: CloudImage, scope: Scope, attempts: int = 0) -> ImageResult:
        """Bring one image to "every volume type has its adopted AMI", or say why not."""
        ctx = f"compose {image.compose_id} image {image.image_name}"
        vols = self.policy.volume_types
        with self.guard.hold(f"image-{image.sha256}") as got:
            if not got:
                log.info("%s: another worker is staging it; leaving it to that one", ctx)
                return ImageResult([StageOutcome(image.image_name, v, None, "busy") for v in vols])
            try:
                facts = observe_image(self.stager.ec2, image, vols, self.now())
                plan = plan_image(facts, self.policy, self.now(), scope=scope, attempts=attempts)
                return self._act_image(image, facts, plan, ctx)
            except EXPECTED_FAILURES as exc:
                reason = failure_reason(exc)
                log.error("%s: cannot converge: %s", ctx, reason)
            except Exception as exc:
                reason = failure_reason(exc)
                log.exception("%s: cannot converge (unexpected)", ctx)
            return ImageResult(list(self.stager.fail(image, vols, reason, ctx).values()))

    def _act_image(
        self, image: CloudImage, facts: ImageFacts, plan: ImagePlan, ctx: str
    ) -> ImageResult:
        present = {
            vol: a.ami_id
            for vol, a in facts.amis.items()
            if a is not None and a.tagged and not a.broken
        }
        outcomes: dict[str, StageOutcome] = {
            vol: StageOutcome(image.image_name, vol, ami_id, "existing")
            for vol, ami_id in present.items()
        }
        tried, gave_up = False, ""
        if any(isinstance(a, Stage) and a.resume_from is None for a in plan.actions):
            # A new upload downloads from the image's URL: only from an allowed
            # host. Refused, nothing of the plan is done (a human looks).
            try:
                check_http_url(image.url, tuple(self.cfg.allowed_hosts))
            except InvalidMessage as exc:
                log.error("%s: not staging it again: %s", ctx, exc)
                reason = f"not downloading: {exc}"[:300]
                return ImageResult(
                    [
                        StageOutcome(image.image_name, v, None, "failed", reason)
                        for v in self.policy.volume_types
                    ]
                )
        for action in plan.actions:
            if isinstance(action, Wait):
                log.info("%s: waiting: %s", ctx, action.reason)
                for vol in self.policy.volume_types:
                    outcomes.setdefault(
                        vol, StageOutcome(image.image_name, vol, None, "waiting", action.reason)
                    )
            elif isinstance(action, Deregister):
                self.stager.deregister(action.ami_id, action.reason, ctx)
            elif isinstance(action, DeleteSnapshot):
                self.stager.delete_snapshot(action.snapshot_id, action.reason, ctx)
            elif isinstance(action, Adopt):
                self.stager.adopt(image, action.vol_type, action.ami_id, ctx)
                present[action.vol_type] = action.ami_id
            elif isinstance(action, Announce):
                outcomes[action.vol_type] = self.stager.announce(
                    image, action.vol_type, action.ami_id, action.request_test, ctx
                )
            elif isinstance(action, MarkResumed):
                self.stager.mark_resumed(action.snapshot_id, action.count, ctx)
            elif isinstance(action, Stage):
                log.info("%s: staging: %s", ctx, action.reason)
                tried = True
                outcomes.update(
                    self.stager.stage(
                        image, action.vol_types, action.resume_from, ctx, has_ami=bool(present)
                    )
                )
            elif isinstance(action, GiveUp):
                log.error("%s: given up: %s", ctx, action.reason)
                gave_up = action.reason
                missing = [v for v in self.policy.volume_types if v not in present]
                outcomes.update(self.stager.fail(image, missing, action.reason, ctx))
        ordered = [outcomes[v] for v in self.policy.volume_types if v in outcomes]
        staged = all(
            v in present or (v in outcomes and outcomes[v].ok and outcomes[v].ami_id)
            for v in self.policy.volume_types
        )
        return ImageResult(ordered, staged=staged, tried=tried and not staged, gave_up=gave_up)

    # -- AMIs ------------------------------------------------------------------------
    def on_result(
        self, notice: ResultNotice, *, decided: Callable[[Outcome], None] | None = None
    ) -> Outcome | None:
        """A ResultsDB message: a hint to look at the AMI it names again, never a verdict.

        ``decided`` is called once a release or a promotion is decided, before
        the copies (minutes) start: the AMI is then the reconcile pass's too.
        """
        if notice.item_type != RESULTSDB_ITEM_TYPE:
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
        outcome = self.converge_ami(notice.item, Scope.MESSAGE, decided=decided)
        log.info(
            "%s: result %s (%s %s): %s",
            notice.item,
            notice.result_id,
            notice.testcase,
            notice.outcome,
            outcome.text,
        )
        return outcome

    def converge_ami(
        self, ami_id: str, scope: Scope, *, decided: Callable[[Outcome], None] | None = None
    ) -> Outcome:
        """The gate for a testing AMI, the promotion of a promoting one (one worker per AMI).

        A worker (thread or process) that finds the AMI held leaves a mark and
        tries once more; the holder, once it lets go, looks again if it found
        only a reason to wait and a mark is there. Either the second try gets
        the AMI or the holder sees the mark: a result is never left unlooked at.
        """
        key = f"ami-{ami_id}"
        marked = False
        while True:
            with self.guard.hold(key) as got:
                if got:
                    self.guard.unmark(key)
                    outcome = self._converge_ami_once(ami_id, scope, decided)
            if not got:
                if marked:
                    return Outcome(ami_id, "busy", "another worker is on it; it will look again")
                self.guard.mark(key)
                marked = True
                continue
            if outcome.action == "wait" and self.guard.marked(key):
                log.info("%s: new results arrived while evaluating; looking again", ami_id)
                marked = False
                continue
            return outcome

    def _converge_ami_once(
        self, ami_id: str, scope: Scope, decided: Callable[[Outcome], None] | None = None
    ) -> Outcome:
        described = describe_staging_ami(self.promoter.ec2, ami_id)
        if described is None:
            return Outcome(
                ami_id, "ignored", f"no AMI {ami_id} of ours in {self.cfg.staging_region}"
            )
        try:
            staged = self.promoter.staging_ami(described)
        except NotEligible as exc:
            return Outcome(ami_id, "ignored", str(exc))
        life = observe_ami(described, self.results, self.policy.testcases, self.waivers)
        actions = plan_ami(life, self.policy, self.now(), scope=scope)
        if not actions:
            return Outcome(ami_id, "ignored", f"state is {staged.state}")
        action = actions[0]
        if isinstance(action, Release):
            log.info("%s: gate says release: %s", staged.label, action.decision.reason)
            if decided is not None:
                decided(Outcome(ami_id, "release", action.decision.reason))
            self.promoter.release(staged, action.decision, action.deprecate_at)
            return Outcome(ami_id, "release", action.decision.reason)
        if isinstance(action, Reject):
            log.info("%s: gate says reject: %s", staged.label, action.decision.reason)
            self.promoter.reject(staged, action.decision)
            return Outcome(ami_id, "reject", action.decision.reason)
        if isinstance(action, Promote):
            log.info("%s: resuming promotion", staged.label)
            if decided is not None:
                decided(Outcome(ami_id, "promoting", "resumed"))
            promotion = self.promoter.promote(staged, action.deprecate_at)
            if promotion.complete:
                return Outcome(ami_id, "released")
            failed = ", ".join(sorted(promotion.blocking))
            return Outcome(ami_id, "promoting", f"failed in {failed}")
        if isinstance(action, RequestTest):
            self.promoter.request_test(staged, action.count, action.reason)
            return Outcome(ami_id, "retest", f"{action.reason}; test requested again")
        log.info("%s: %s", staged.label, action.reason)
        return Outcome(ami_id, "wait", action.reason, transient=not life.results.known)

    def retest(self, ami_id: str, scenario: str | None, who: str) -> Outcome:
        """``fedimg retest``: a rejected (or testing) AMI back to testing, a new run requested.

        Decided by ``plan_retest`` under the AMI's lock, from what AWS says now.
        """
        with self.guard.hold(f"ami-{ami_id}") as got:
            if not got:
                return Outcome(ami_id, "busy", "another worker holds the AMI; try again")
            described = describe_staging_ami(self.promoter.ec2, ami_id)
            facts = AmiFacts.from_aws(described) if described is not None else None
            action = plan_retest(facts, ami_id, scenario)
            if isinstance(action, Refuse):
                log.error("%s: retest refused: %s", ami_id, action.reason)
                return Outcome(ami_id, "refused", action.reason)
            assert described is not None
            try:
                staged = self.promoter.staging_ami(described)
            except NotEligible as exc:
                return Outcome(ami_id, "refused", str(exc))
            self.promoter.retest(staged, action, who)
            return Outcome(ami_id, "retest", action.reason)

    def explain(self, ami_id: str) -> tuple[AmiFacts, Decision] | str:
        """``fedimg policy explain``: the AMI's facts and the gate's decision now, or why not."""
        described = describe_staging_ami(self.promoter.ec2, ami_id)
        if described is None:
            return f"no AMI {ami_id} of ours in {self.cfg.staging_region}"
        facts = AmiFacts.from_aws(described)
        found = ami_results(self.results, ami_id, self.policy.testcases, self.waivers)
        if not found.known:
            return f"cannot decide now: {found.unavailable}"
        life = AmiLife(facts, facts.tags.get(tags.COMPOSE_ID, "?"), found)
        return facts, gate_decision(life, self.policy, self.now())

    # -- everything ------------------------------------------------------------------
    def reconcile(self, *, stage: bool = True) -> Report:
        """One pass: every intent, unfinished AMI and (with ``stage``) stage leftover."""
        report = Report()
        covered: set[str] = set()
        if stage:
            for compose_id in self.intents.compose_ids():
                try:
                    futures, outcomes = self._start_compose(compose_id, Scope.RECONCILE)
                    intent = self.intents.get(compose_id)  # its images are known now
                    if intent is not None:
                        covered.update(i.sha256 for i in intent.images or ())
                except Exception as exc:  # one compose must not stop the pass
                    log.exception("compose %s: reconcile failed", compose_id)
                    report.outcomes.append(Outcome(compose_id, "error", f"{exc}"[:300]))
                    continue
                report.outcomes.extend(
                    Outcome(compose_id, "error", o.reason) for o in outcomes if not o.ok
                )
                for n, future in enumerate(futures):
                    report.stages[f"{compose_id}#{n}"] = future
                if futures:
                    report.outcomes.append(
                        Outcome(compose_id, "resumed", f"{len(futures)} image(s) to stage")
                    )
        try:
            for described in staged_amis(self.promoter.ec2, (State.TESTING, State.PROMOTING)):
                ami_id = str(described["ImageId"])
                outcome = self._safely(ami_id)
                log.info("%s: reconcile: %s", ami_id, outcome.text)
                report.outcomes.append(outcome)
        except (ClientError, BotoCoreError) as exc:
            log.error("reconcile: cannot list the staging AMIs: %s", exc)
            report.outcomes.append(Outcome("amis", "error", str(exc)[:300]))
        if stage:
            try:
                self._leftovers(report, covered)
            except (ClientError, BotoCoreError) as exc:
                log.error("reconcile: cannot list fedimg snapshots: %s", exc)
                report.outcomes.append(Outcome("snapshots", "error", str(exc)[:300]))
        counts: dict[str, int] = {}
        for outcome in report.outcomes:
            counts[outcome.action] = counts.get(outcome.action, 0) + 1
        log.info(
            "reconcile pass: %s",
            ", ".join(f"{n} {a}" for a, n in sorted(counts.items())) or "nothing to do",
        )
        return report

    def _safely(self, ami_id: str) -> Outcome:
        try:
            return self.converge_ami(ami_id, Scope.RECONCILE)
        except Exception as exc:  # one AMI must not stop the pass
            log.exception("%s: reconcile failed", ami_id)
            return Outcome(ami_id, "error", f"{type(exc).__name__}: {exc}"[:300])

    def _leftovers(self, report: Report, covered: set[str]) -> None:
        """Images a stage left traces of (snapshots tagged testing) that no intent covers."""
        for sha, snaps in sorted(testing_snapshots(self.stager.ec2).items()):
            if sha in covered:
                continue
            newest = max(snaps, key=lambda s: str(s.get("StartTime", "")))
            values = {t["Key"]: t["Value"] for t in newest.get("Tags", [])}
            try:
                image = image_from_tags(values)  # any host: enough to find its AMIs
            except ValueError as exc:
                ids = ", ".join(str(s.get("SnapshotId")) for s in snaps)
                log.error("snapshots %s: cannot resume: %s", ids, exc)
                report.outcomes.append(Outcome(ids, "error", f"unusable tags: {exc}"[:300]))
                continue
            report.stages[image.image_name] = self._pool.submit(self._leftover, image)

    def _leftover(self, image: CloudImage) -> list[StageOutcome]:
        return self.converge_image(image, Scope.RECONCILE).outcomes

    # -- after release -----------------------------------------------------------------
    def regions(self) -> list[str]:
        return fleet_regions(self.cfg, self.promoter.aws)

    def prune(self, *, apply: bool) -> PruneRun:
        """Plan the prune of every region (and, with ``apply``, carry it out); one at a time.

        A dry run and an applied run plan alike: both observe afresh and plan
        with the same policy. Another process pruning: nothing is done (busy).
        """
        with self.guard.hold("prune") as got:
            if not got:
                log.info("prune: another worker is pruning; this run skipped")
                return PruneRun(busy=True)
            try:
                plan = prune_plan(self.cfg, self.promoter.aws, self.now(), self.prune_policy)
            except (ClientError, BotoCoreError) as exc:
                log.error("prune: cannot read the AMIs: %s", exc)
                return PruneRun(error=f"{exc}"[:300])
            except PolicyRefused as exc:
                log.error("prune: refused: %s", exc)
                return PruneRun(error=f"refused: {exc}"[:300])
            removing = sum(v.remove for v in plan.verdicts)
            log.info(
                "prune%s: %d lineage(s) kept, %d removed (%d AMI(s)), %d leftover snapshot(s)",
                "" if apply else " (dry run)",
                len(plan.verdicts) - removing,
                removing,
                len(plan.removals),
                len(plan.leftovers),
            )
            return self.upkeep.apply(plan) if apply else PruneRun(plan)

    def audit(self, *, fix: bool) -> AuditRun:
        """Every released, non-deprecated AMI public in every region? ``fix``: make it so."""
        with self.guard.hold("audit") as got:
            if not got:
                log.info("audit: another worker is auditing; this run skipped")
                return AuditRun(busy=True)
            try:
                fleet = observe_fleet(self.promoter.aws, self.regions())
                targets = audited(fleet, self.now())
                perms = snapshot_permissions(self.promoter.aws, targets)
            except (ClientError, BotoCoreError) as exc:
                log.error("audit: cannot read the AMIs: %s", exc)
                return AuditRun(error=f"{exc}"[:300])
            found = [e for e in (exposure(t, perms) for t in targets) if e is not None]
            fixed: list[tuple[str, str]] = []
            errors: dict[tuple[str, str], str] = {}
            for item in found:
                log.error(
                    "%s %s in %s: released but %s",
                    item.compose_id,
                    item.ami_id,
                    item.region,
                    item.text,
                )
                if fix:
                    why = self.upkeep.republish(item)
                    if why:
                        errors[item.region, item.ami_id] = why
                    else:
                        fixed.append((item.region, item.ami_id))
            log.info(
                "audit: %d released AMI(s) checked, %d not public, %d made public again",
                len(targets),
                len(found),
                len(fixed),
            )
            return AuditRun(tuple(found), tuple(fixed), errors)


# -- the CLI's entry points ----------------------------------------------------------------


def cli_stage(
    cfg: FedimgConfig, emitter: Emitter, location: str, compose_id: str | None = None
) -> int:
    """``fedimg stage --compose-location URL``: 0 if every image was staged or found."""
    board = TerminalBoard() if sys.stderr.isatty() else None
    engine = Engine.from_config(cfg, emitter, progress=board)
    try:
        with board.attached() if board is not None else contextlib.nullcontext():
            outcomes = engine.stage_location(location, compose_id)
    finally:
        engine.close()
    who = compose_id or location
    for o in outcomes:
        log.info(
            "compose %s: %s %s %s: %s%s",
            who,
            o.image_name,
            o.vol_type or "-",
            o.ami_id or "-",
            o.status,
            f" ({o.reason})" if o.reason else "",
        )
    failed = [o for o in outcomes if not o.ok]
    if failed:
        log.error("compose %s: %d of %d AMI(s) failed", who, len(failed), len(outcomes))
        return 1
    return 0


def cli_promote(cfg: FedimgConfig, emitter: Emitter, ami_id: str) -> int:
    """``fedimg promote AMI_ID``: 0 only if the AMI ends up released."""
    if not _is_ami_id(ami_id):
        return 2
    engine = Engine.from_config(cfg, emitter)
    try:
        return promote_by_hand(engine, ami_id)
    finally:
        engine.close()


def promote_by_hand(engine: Engine, ami_id: str) -> int:
    """The gate by hand: evaluate a testing AMI, resume a promoting one, release a
    rejected one only if waivers now cover what rejected it (``fedimg retest`` for a new run)."""
    try:
        staged = engine.promoter.lookup(ami_id)
    except NotEligible as exc:
        log.error("%s: %s", ami_id, exc)
        return 1
    if staged.state is State.RELEASED:
        log.info("%s: already released", staged.label)
        return 0
    if staged.state not in (State.TESTING, State.PROMOTING, State.REJECTED):
        log.error("%s: unknown state %r; refusing to act", staged.label, staged.state)
        return 1
    outcome = engine.converge_ami(ami_id, Scope.BY_HAND)
    if outcome.action not in ("release", "released"):
        log.error("%s: not released: %s", staged.label, outcome.text)
    final = engine.promoter.lookup(ami_id).state
    if final is not State.RELEASED:
        log.error("%s: state is %s, not released", ami_id, final)
        return 1
    return 0


def cli_reconcile(cfg: FedimgConfig, emitter: Emitter, print_line: Callable[[str], None]) -> int:
    """``fedimg reconcile``: one pass, waiting for the stages it started; 0 if all is well."""
    engine = Engine.from_config(cfg, emitter)
    try:
        report = engine.reconcile(stage=True)
        outcomes = [*report.outcomes, *report.wait()]
    finally:
        engine.close()
    for outcome in outcomes:
        print_line(f"{outcome.resource}\t{outcome.text}")
    return 1 if any(o.failed for o in outcomes) else 0


def cli_retest(
    cfg: FedimgConfig,
    emitter: Emitter,
    ami_id: str,
    scenario: str | None,
    *,
    who: str,
    engine: Engine | None = None,
) -> int:
    """``fedimg retest AMI [--scenario S]``: 0 once the new test run is requested."""
    if not _is_ami_id(ami_id):
        return 2
    with _cli_engine(cfg, emitter, engine) as used:
        outcome = used.retest(ami_id, scenario, who)
    if outcome.action != "retest":
        log.error("%s: not retested: %s", ami_id, outcome.text)
        return 1
    log.info("%s: %s", ami_id, outcome.text)
    return 0


def _is_ami_id(ami_id: str) -> bool:
    if AMI_ID_RE.match(ami_id):
        return True
    log.error("%r is not an AMI id", ami_id)
    return False


@contextlib.contextmanager
def _cli_engine(cfg: FedimgConfig, emitter: Emitter, engine: Engine | None) -> Iterator[Engine]:
    """The engine a command was given (tests), else one built for it and closed after."""
    if engine is not None:
        yield engine
        return
    built = Engine.from_config(cfg, emitter)
    try:
        yield built
    finally:
        built.close()


def explain_lines(facts: AmiFacts, decision: Decision, policy: Policy) -> list[str]:
    """What ``fedimg policy explain`` prints: the rules that apply and what each still needs."""
    lines = [
        f"{facts.ami_id}: state {facts.state.value if facts.state else '?'};"
        f" {facts.subject.describe()}",
        f"policy: {policy.gate_policy.source}",
        f"verdict now: {decision.verdict}: {decision.reason}",
    ]
    if not decision.rules:
        lines.append("no rule applies: the gate rejects it")
    for name in decision.rules:
        needs = [u for u in decision.unsatisfied if u.rule == name]
        lines.append(f"rule {name}: " + ("satisfied" if not needs else f"{len(needs)} unsatisfied"))
        lines += [f"  needs {u.label}: {u.state} ({u.detail})" for u in needs]
    lines += [
        f"waived {w.label} {w.waived_outcome}: waiver {w.waiver_id} by {w.username}: {w.comment}"
        for w in decision.waived
    ]
    lines += [f"not applicable {name}: {why}" for name, why in decision.inapplicable]
    return lines


def cli_explain(
    cfg: FedimgConfig,
    ami_id: str,
    print_line: Callable[[str], None],
    engine: Engine | None = None,
) -> int:
    """``fedimg policy explain AMI``: 0 if the gate could be evaluated."""
    if not _is_ami_id(ami_id):
        return 2
    with _cli_engine(cfg, Emitter(lambda *_: None), engine) as used:
        found = used.explain(ami_id)
        policy = used.policy
    if isinstance(found, str):
        log.error("%s: %s", ami_id, found)
        return 1
    for line in explain_lines(*found, policy):
        print_line(line)
    return 0


def cli_waive(
    cfg: FedimgConfig,
    ami_id: str,
    testcase: str,
    *,
    scenario: str | None,
    comment: str,
    user: str | None,
    aws: Any = None,
    token: str | None = None,
) -> int:
    """``fedimg waive AMI TESTCASE [--scenario S] --comment TEXT``: 0 once WaiverDB stored it.

    WaiverDB then announces it (``waiverdb.waiver.new``) and fedimg gates the AMI
    again; the reconcile pass would anyway. Authentication: a bearer token
    (``$FEDIMG_WAIVERDB_TOKEN``, OIDC deployments) or ``--user`` (HTTP basic,
    WaiverDB's ``dummy`` authentication of development set-ups).
    """
    if not cfg.waiverdb_url:
        log.error("fedimg.waiverdb_url is not set: there is no WaiverDB to write to")
        return 2
    ec2 = (aws or AwsClients(max_attempts=cfg.aws_max_attempts)).ec2(cfg.staging_region)
    try:
        described = describe_staging_ami(ec2, ami_id) if AMI_ID_RE.match(ami_id) else None
        if described is None:
            raise WaiverRefused(f"no AMI {ami_id[:80]!r} of ours in {cfg.staging_region}")
        values = tags.as_dict(described.get("Tags"))
        if tags.STATE not in values:
            raise WaiverRefused(f"{ami_id} is not a fedimg staging AMI")
        if values[tags.STATE] in (tags.State.PROMOTING, tags.State.RELEASED):
            raise WaiverRefused(f"{ami_id} is already {values[tags.STATE]}: nothing to waive")
        body = new_waiver_body(ami_id, testcase, scenario, comment, values.get(tags.RELEASE, ""))
        if testcase not in cfg.gate_policy.testcases:
            log.warning(
                "%s: no gate rule requires %s; the waiver changes nothing", ami_id, testcase
            )
        auth: Any = BearerAuth(token) if token else (user, "") if user else None
        source = waiver_source(cfg)
        assert isinstance(source, WaiverDBSource)
        waiver = source.create(body, auth=auth)
    except (WaiverRefused, WaiversUnavailable) as exc:
        log.error("%s: no waiver: %s", ami_id, exc)
        return 1
    log.info(
        "%s %s: waiver %d for %s stored by %s",
        values.get(tags.COMPOSE_ID, "?"),
        ami_id,
        waiver.waiver_id,
        testcase + (f" [{scenario}]" if scenario else ""),
        waiver.username,
    )
    return 0


def cli_prune(
    cfg: FedimgConfig,
    emitter: Emitter,
    apply: bool,
    print_line: Callable[[str], None],
    engine: Engine | None = None,
) -> int:
    """``fedimg prune [--apply]``: print the plan (and carry it out); 0 if all went to plan."""
    from fedimg.status import render_plan

    with _cli_engine(cfg, emitter, engine) as used:
        run = used.prune(apply=apply)
    if run.plan is not None:
        print_line(render_plan(run.plan, removals=True))
    if run.busy:
        print_line("another fedimg is pruning now; nothing done")
    elif run.error:
        print_line(f"prune stopped: {run.error}")
    elif apply and run.plan is not None:
        print_line(f"removed {len(run.removed)} AMI(s), {len(run.deleted_snapshots)} snapshot(s)")
    elif run.plan is not None and not run.plan.idle:
        print_line("dry run: nothing removed (fedimg prune --apply removes the above)")
    return 0 if run.complete else 1


def cli_audit(
    cfg: FedimgConfig,
    emitter: Emitter,
    fix: bool,
    print_line: Callable[[str], None],
    engine: Engine | None = None,
) -> int:
    """``fedimg audit [--fix]``: every released AMI public? 0 if so (or made so again)."""
    with _cli_engine(cfg, emitter, engine) as used:
        run = used.audit(fix=fix)
    if run.busy or run.error:
        print_line(f"audit not done: {run.error or 'another fedimg is auditing now'}")
        return 1
    fixed = set(run.fixed)
    for item in run.exposures:
        where = (item.region, item.ami_id)
        state = "made public again" if where in fixed else run.errors.get(where, "not fixed")
        print_line(f"{item.region}\t{item.ami_id}\t{item.compose_id}\t{item.text}\t{state}")
    if not run.exposures:
        print_line("every released AMI is public in every region")
    return 0 if run.clean else 1
