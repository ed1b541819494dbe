"""The pure core of fedimg: from facts (and a policy and a time) to the actions that converge.

No I/O, no clock, no logging. ``plan_image`` decides what stage must do for
one compose image, ``plan_ami`` what the gate and the promotion must do for
one staging AMI, ``compose_done`` when a compose's intent may be dropped.
``fedimg.engine`` observes the world, calls these, and hands the actions to
``fedimg.execute``.

Two scopes plan an image differently:

* ``Scope.MESSAGE``: a compose message (or ``fedimg stage``) says "go now".
  Existing AMIs are announced again (a replay re-requests their test);
  half-written snapshots are ignored, never deleted (another worker may be
  writing them).
* ``Scope.RECONCILE``: the periodic pass finishes what a crash left. Nothing
  younger than the grace period is touched (another host may be on it);
  left-over snapshots are deleted only when a trusted replacement (a trusted
  snapshot or the AMIs) exists, or when a newer half-written one remains: no
  step destroys the only trace of unfinished work.

A snapshot any AMI names in its block device mappings is never deleted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, Final

from productmd.composeinfo import get_date_type_respin

from fedimg.config import DEFAULT_DEPRECATION_DAYS
from fedimg.facts import RESUMED_MAX, RETESTS_MAX, AmiFacts, AmiLife, ImageFacts, aware
from fedimg.gate import Decision, evaluate
from fedimg.messages import FAILED, NEEDS_INSPECTION, SUMMARY_TESTCASE
from fedimg.policy import GatePolicy, default_policy
from fedimg.tags import ALL_SCENARIOS, State


class Scope(Enum):
    MESSAGE = "message"  # a bus message: act on what it names, now
    RECONCILE = "reconcile"  # the periodic pass: finish what was left
    BY_HAND = "by-hand"  # a release engineer's command: as a message, and resume promotions


@dataclass(frozen=True)
class Policy:
    """The knobs of every decision, from ``FedimgConfig`` (``Policy.from_config``)."""

    volume_types: tuple[str, ...] = ("gp3",)
    required: tuple[str, ...] = (SUMMARY_TESTCASE,)
    reject_outcomes: tuple[str, ...] = (FAILED, NEEDS_INSPECTION)
    deadline: timedelta = timedelta(hours=6)
    retest_after: timedelta = timedelta(hours=3)
    grace: timedelta = timedelta(hours=2)
    max_attempts: int = 3
    max_read_attempts: int = 5
    gate: GatePolicy | None = None  # from fedimg.gate.policy_file; None: ``required`` for all

    @property
    def gate_policy(self) -> GatePolicy:
        return self.gate if self.gate is not None else default_policy(self.required)

    @property
    def testcases(self) -> tuple[str, ...]:
        """Every testcase the gate may need (what to ask ResultsDB about)."""
        return self.gate_policy.testcases

    # Days from staging to deprecation, per compose type (fedimg.promote.deprecation_days).
    deprecation_days: Mapping[str, int] = field(
        default_factory=lambda: dict(DEFAULT_DEPRECATION_DAYS)
    )


# -- actions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Wait:
    """Nothing to do now; look again later."""

    reason: str


@dataclass(frozen=True)
class Deregister:
    """Deregister a broken AMI, or an untagged one given up."""

    ami_id: str
    reason: str


@dataclass(frozen=True)
class DeleteSnapshot:
    snapshot_id: str
    reason: str


@dataclass(frozen=True)
class Adopt:
    """Tag an AMI a crash left untagged as ``testing``; it then counts as staged."""

    vol_type: str
    ami_id: str


@dataclass(frozen=True)
class Announce:
    """Say again that the AMI exists (upload completed), and request its test if testing."""

    vol_type: str
    ami_id: str
    request_test: bool


@dataclass(frozen=True)
class MarkResumed:
    """Count a restage from a trusted snapshot (``fedimg:resumed``) before doing it."""

    snapshot_id: str
    count: int


@dataclass(frozen=True)
class Stage:
    """Register the missing volume types: from ``resume_from``, else from a new upload."""

    vol_types: tuple[str, ...]
    resume_from: str | None
    reason: str


@dataclass(frozen=True)
class GiveUp:
    """This image will not be staged: too many attempts, or nothing left to stage from."""

    reason: str


@dataclass(frozen=True)
class RequestTest:
    """Ask autocloud_ami for the test again (``fedimg:test-requested`` first)."""

    count: int
    reason: str


@dataclass(frozen=True)
class Release:
    """Mark promoting, announce the pass, copy and publish everywhere (deprecated at a time)."""

    decision: Decision
    deprecate_at: datetime | None = None


@dataclass(frozen=True)
class Promote:
    """Copy to and publish in the regions still missing (a promotion already decided)."""

    reason: str
    deprecate_at: datetime | None = None


@dataclass(frozen=True)
class Reject:
    """Announce the failure, mark rejected; nothing is copied or made public."""

    decision: Decision


@dataclass(frozen=True)
class Retest:
    """Move the AMI (back) to testing, its deadline from now, and request a new test run.

    Results of ``scenarios`` (``*``: all) older than this moment no longer count.
    """

    scenarios: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Refuse:
    """A request by hand that must not be carried out; the reason says why."""

    reason: str


ImageAction = Wait | Deregister | DeleteSnapshot | Adopt | Announce | MarkResumed | Stage | GiveUp
AmiAction = Wait | RequestTest | Release | Promote | Reject


# -- an image --------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePlan:
    actions: tuple[ImageAction, ...] = ()
    reason: str = ""

    @property
    def stages(self) -> bool:
        return any(isinstance(a, Stage) for a in self.actions)

    @property
    def gives_up(self) -> bool:
        return any(isinstance(a, GiveUp) for a in self.actions)

    @property
    def idle(self) -> bool:
        return all(isinstance(a, Wait) for a in self.actions)

    def of(self, kind: type) -> list[ImageAction]:
        return [a for a in self.actions if isinstance(a, kind)]


def plan_image(
    facts: ImageFacts,
    policy: Policy,
    now: datetime,
    *,
    scope: Scope,
    attempts: int = 0,
) -> ImagePlan:
    """What to do so that every volume type of this image has its adopted AMI."""
    plan = _plan_image(facts, policy, now, scope=scope, attempts=attempts)
    used = facts.used_snapshots()
    kept = tuple(
        a for a in plan.actions if not (isinstance(a, DeleteSnapshot) and a.snapshot_id in used)
    )
    return ImagePlan(kept, plan.reason)


def _young(moment: datetime | None, now: datetime, grace: timedelta) -> bool:
    return moment is not None and aware(now) - aware(moment) < grace


def _plan_image(
    facts: ImageFacts, policy: Policy, now: datetime, *, scope: Scope, attempts: int
) -> ImagePlan:
    reconcile = scope is Scope.RECONCILE
    if facts.busy:
        return ImagePlan((Wait("another worker is staging it"),), "busy")
    if reconcile:
        young = [s.snapshot_id for s in facts.snapshots if _young(s.started, now, policy.grace)]
        young += [
            a.ami_id
            for a in facts.amis.values()
            if a is not None and not a.tagged and _young(a.created, now, policy.grace)
        ]
        if young:
            why = f"younger than the grace period: {', '.join(sorted(young))}"
            return ImagePlan((Wait(why),), why)

    actions, missing, untagged = _by_volume(facts, policy, announce=not reconcile)
    trusted = facts.trusted()
    untrusted = facts.untrusted()
    if not missing:
        if reconcile:
            actions.extend(_unused_snapshots(facts))
        what = "adopting untagged AMIs" if untagged else "staged"
        return ImagePlan(tuple(actions), what)

    listed = ", ".join(missing)
    if attempts >= policy.max_attempts:
        if reconcile:  # (past the grace period:) no later pass may take them for work
            actions.extend(DeleteSnapshot(s.snapshot_id, "given up") for s in facts.snapshots)
        return ImagePlan(
            (*actions, GiveUp(f"{listed}: not staged after {attempts} attempts")), "give up"
        )
    if not trusted:
        why = f"{listed}: upload " + ("never finished" if untrusted else "not started")
        if reconcile and untrusted:
            # Keep the newest half-written snapshot until a new upload replaces it,
            # and count the restages it caused: a leftover with no intent (its
            # compose done or forgotten) is retried RESUMED_MAX times, no more.
            keep = untrusted[-1]
            actions.extend(
                DeleteSnapshot(s.snapshot_id, "half-written, a newer one remains")
                for s in untrusted[:-1]
            )
            if keep.resumed >= RESUMED_MAX:
                actions.append(DeleteSnapshot(keep.snapshot_id, "given up"))
                why = f"{listed}: gave up after {keep.resumed} uploads beside {keep.snapshot_id}"
                return ImagePlan((*actions, GiveUp(why)), why)
            actions.append(MarkResumed(keep.snapshot_id, keep.resumed + 1))
        return ImagePlan((*actions, Stage(tuple(missing), None, why)), why)

    keep = trusted[-1]
    if reconcile:
        actions.extend(
            DeleteSnapshot(s.snapshot_id, f"superseded by {keep.snapshot_id}")
            for s in [*untrusted, *trusted[:-1]]
        )
        if keep.resumed >= RESUMED_MAX:
            # Given up for good: the snapshot goes too (unless an AMI uses it).
            actions.append(DeleteSnapshot(keep.snapshot_id, "given up"))
            why = f"{listed}: gave up after {keep.resumed} resumes from {keep.snapshot_id}"
            return ImagePlan((*actions, GiveUp(why)), why)
        actions.append(MarkResumed(keep.snapshot_id, keep.resumed + 1))
    why = f"{listed}: registering from snapshot {keep.snapshot_id}"
    return ImagePlan((*actions, Stage(tuple(missing), keep.snapshot_id, why)), why)


def _by_volume(
    facts: ImageFacts, policy: Policy, *, announce: bool
) -> tuple[list[ImageAction], list[str], list[str]]:
    """(actions, volume types without a usable AMI, untagged AMIs adopted) per volume type."""
    actions: list[ImageAction] = []
    missing: list[str] = []
    untagged: list[str] = []
    for vol in policy.volume_types:
        ami = facts.amis.get(vol)
        if ami is None:
            missing.append(vol)
        elif ami.broken:
            actions.append(Deregister(ami.ami_id, f"{vol} AMI is {ami.aws_state}"))
            missing.append(vol)
        elif not ami.tagged:
            untagged.append(ami.ami_id)
            actions.append(Adopt(vol, ami.ami_id))
            actions.append(Announce(vol, ami.ami_id, request_test=True))
        elif announce:
            actions.append(Announce(vol, ami.ami_id, request_test=ami.state is State.TESTING))
    return actions, missing, untagged


def _unused_snapshots(facts: ImageFacts) -> list[ImageAction]:
    """Every volume type has its AMI: the snapshots none of them uses may go."""
    known = {s.snapshot_id for s in facts.snapshots}
    used = facts.used_snapshots()
    amis = [a for a in facts.amis.values() if a is not None]
    if used and used <= known and all(a.snapshots for a in amis):
        unused = sorted(known - used)  # the AMIs name their snapshots, all ours
    else:
        # Cannot tell which snapshot backs them (moto lists made-up ones): only
        # the half-written ones, which no AMI was registered from, may go.
        unused = [s.snapshot_id for s in facts.untrusted()]
    return [DeleteSnapshot(s, "no AMI uses it") for s in unused]


# -- deprecation ---------------------------------------------------------------------------

#: AWS refuses a DeprecateAt more than 2 years after a public AMI's creation.
PUBLIC_DEPRECATION_MAX: Final = timedelta(days=730)
#: AWS refuses a DeprecateAt in the past: an image past its policy goes out this soon.
DEPRECATION_LEAD: Final = timedelta(minutes=10)


def compose_type(compose_id: str) -> str | None:
    """productmd's compose type of a compose id (``.n.`` nightly, ``.t.`` test, none:
    production, ``.ci.``), or None when the id says none."""
    try:
        _date, kind, _respin = get_date_type_respin(compose_id)
    except ValueError:  # a suffix productmd does not know
        return None
    return kind if isinstance(kind, str) else None


def deprecation_time(
    compose_id: str, staged_at: datetime, now: datetime, days: Mapping[str, int]
) -> datetime:
    """When a released AMI (the staging AMI and every copy) is deprecated.

    ``days[compose type]`` after staging -- the shortest period when the compose
    id names no known type -- but never more than AWS's 2 years for a public
    AMI, and never earlier than ``DEPRECATION_LEAD`` from ``now`` (AWS refuses a
    time in the past). Counted from staging, not from now, so every region and
    every resumed pass sends the same time. Whole minutes (AWS rounds to them).
    """
    kind = compose_type(compose_id)
    period = timedelta(days=days[kind] if kind is not None and kind in days else min(days.values()))
    at = aware(staged_at) + min(period, PUBLIC_DEPRECATION_MAX)
    at = max(at, aware(now) + DEPRECATION_LEAD)
    whole = at.replace(second=0, microsecond=0)
    return whole if whole == at else whole + timedelta(minutes=1)


# -- an AMI ------------------------------------------------------------------------------


def retest_due(
    decision: Decision,
    *,
    staged_at: datetime,
    now: datetime,
    retest_after: timedelta,
    requested: int,
    max_retests: int = RETESTS_MAX,
) -> bool:
    """Whether a ``testing`` AMI's test should be requested again now.

    Only when the gate waits for a MISSING required result (never because
    ResultsDB was unreachable: that is not a decision at all), nothing
    failed, the AMI waited ``retest_after`` since staging, and the test was
    not re-requested ``max_retests`` times already.
    """
    return (
        decision.wait
        and bool(decision.missing)
        and not decision.failed
        and requested < max_retests
        and aware(now) - aware(staged_at) >= retest_after
    )


def plan_ami(
    life: AmiLife, policy: Policy, now: datetime, *, scope: Scope
) -> tuple[AmiAction, ...]:
    """The gate for a ``testing`` AMI, the promotion for a ``promoting`` one, waivers for a
    ``rejected`` one, else nothing."""
    ami = life.ami
    if ami.broken:
        return (Wait(f"AMI is {ami.aws_state}; stage replaces it"),)
    staged_at = ami.staged_at or now
    deprecate_at = deprecation_time(life.compose_id, staged_at, now, policy.deprecation_days)
    if ami.state is State.PROMOTING:
        # A result message says nothing new about a decided AMI: the pass resumes it.
        if scope is Scope.MESSAGE:
            return ()
        return (Promote("promotion unfinished", deprecate_at),)
    if ami.state is State.REJECTED:
        return _reconsider(life, policy, now, deprecate_at)
    if ami.state is not State.TESTING:
        return ()
    if not life.results.known:
        return (Wait(f"ResultsDB unavailable: {life.results.unavailable}"[:300]),)
    testing_since = ami.testing_since or now
    decision = gate_decision(life, policy, now)
    if decision.release:
        return (Release(decision, deprecate_at),)
    if decision.reject:
        return (Reject(decision),)
    if scope is Scope.RECONCILE and retest_due(
        decision,
        staged_at=testing_since,
        now=now,
        retest_after=policy.retest_after,
        requested=ami.test_requests,
    ):
        return (RequestTest(ami.test_requests + 1, decision.reason),)
    return (Wait(decision.reason),)


def _reconsider(
    life: AmiLife, policy: Policy, now: datetime, deprecate_at: datetime | None
) -> tuple[AmiAction, ...]:
    """A rejected AMI is released only when waivers now cover what rejected it.

    A late PASSED alone never undoes a rejection (``fedimg retest`` asks for a
    new run); WaiverDB or ResultsDB unreachable is a reason to look again later.
    """
    if not life.results.known:
        return (Wait(f"rejected; cannot look for waivers: {life.results.unavailable}"[:300]),)
    decision = gate_decision(life, policy, now)
    if decision.release and decision.waived:
        return (Release(decision, deprecate_at),)
    return ()


def current_results(
    latest: Mapping[tuple[str, str], Any], ami: AmiFacts
) -> tuple[dict[tuple[str, str], Any], tuple[tuple[str, str], ...]]:
    """The results of the current test run, and the (testcase, scenario) pairs set aside.

    After a retest, older results of the retested scenarios (all with ``*``)
    are history, not evidence: the gate awaits their new results.
    """
    since = ami.retested_at
    retested = ami.retested
    if since is None or not retested:
        return dict(latest), ()
    kept: dict[tuple[str, str], Any] = {}
    dropped: list[tuple[str, str]] = []
    for (testcase, scenario), result in latest.items():
        again = ALL_SCENARIOS in retested or scenario in retested
        if again and aware(result.submitted) < aware(since):
            dropped.append((testcase, scenario))
        else:
            kept[(testcase, scenario)] = result
    return kept, tuple(dropped)


def gate_decision(life: AmiLife, policy: Policy, now: datetime) -> Decision:
    """The gate's decision for a testing AMI whose results and waivers are known."""
    ami = life.ami
    latest, retracted = current_results(life.results.latest, ami)
    return evaluate(
        policy.gate_policy,
        ami.subject,
        ami.ami_id,
        latest,
        life.results.waivers,
        reject_outcomes=policy.reject_outcomes,
        staged_at=ami.testing_since or now,
        now=now,
        deadline=policy.deadline,
        retracted=retracted,
    )


def plan_retest(ami: AmiFacts | None, ami_id: str, scenario: str | None) -> Retest | Refuse:
    """``fedimg retest AMI [--scenario S]``: what may be done about it.

    A rejected or testing AMI goes (back) to testing with a new run requested;
    a promoting or released one was already decided for (its copies may be
    public), an unknown or broken one cannot be tested.
    """
    if ami is None:
        return Refuse(f"no AMI {ami_id} of ours in the staging region (deregistered?)")
    if ami.broken:
        return Refuse(f"{ami_id} is {ami.aws_state}; it cannot be tested")
    if ami.state in (State.PROMOTING, State.RELEASED):
        return Refuse(f"{ami_id} is already {ami.state.value}; a retest cannot change that")
    if ami.state not in (State.TESTING, State.REJECTED):
        return Refuse(f"{ami_id} is not a fedimg staging AMI in a known state")
    scenarios = (scenario,) if scenario else (ALL_SCENARIOS,)
    what = f"scenario {scenario}" if scenario else "every scenario"
    return Retest(scenarios, f"retest of {what} requested while {ami.state.value}")


# -- a compose -------------------------------------------------------------------------


@dataclass(frozen=True)
class ComposeProgress:
    """Where every image of an intent stands."""

    staged: tuple[str, ...] = ()  # sha256
    given_up: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()
    notes: Mapping[str, str] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return not self.pending


def compose_progress(
    shas: Sequence[str], staged: Mapping[str, bool], given_up: Mapping[str, str]
) -> ComposeProgress:
    """Sort a compose's images into staged, given up and pending (pure)."""
    done = tuple(s for s in shas if staged.get(s) and s not in given_up)
    gone = tuple(s for s in shas if s in given_up)
    pending = tuple(s for s in shas if s not in done and s not in gone)
    return ComposeProgress(done, gone, pending, dict(given_up))
