"""The release gate: a pure decision from a policy, the latest results and the waivers of one AMI.

Greenwave-style: ``evaluate`` looks only at its arguments (the gate policy,
the image the AMI was staged from, the latest result per testcase and
scenario as ResultsDB reports it, the AMI's waivers, the AMI's time in
testing and the current time) and returns a frozen ``Decision`` naming every
requirement not satisfied and every waiver used. No I/O, no clock, no
logging: everything that acts on a decision lives in ``fedimg.promote``.

Each rule of the policy that applies to the image requires its testcases in
its scenarios (``fedimg.policy``); a requirement is

    satisfied    the latest outcome is PASSED; or the test did not apply to the
                 image (INFO with data ``skipped``) and the rule says
                 ``if_skipped: pass``; or a waiver covers it
    failed       the latest outcome is a reject outcome (FAILED,
                 NEEDS_INSPECTION by default), or a skipped test under
                 ``if_skipped: reject``, and no waiver covers it
    missing      no result, or a non-final outcome (INFO...), and no waiver

and the verdict is

    release  every requirement satisfied
    reject   any requirement failed, no rule applies to the image, or the
             deadline passed while some requirement was still missing
    wait     otherwise

A waiver covers a requirement when it is for this AMI, its testcase and
(if it names one) its scenario, says ``waived`` and carries a comment.
Outcomes are compared case-insensitively; results of testcases no rule
requires never change the verdict. ``decide`` is the gate of a single list of
required testcases and no waivers (the default policy), kept for callers
that have no policy.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Literal, Protocol

from fedimg.messages import INFO, PASSED, RESULTSDB_ITEM_TYPE, RUN_SCENARIOS_KEY, SKIPPED_KEY
from fedimg.policy import GatePolicy, Rule, Subject, default_policy

RELEASE: Literal["release"] = "release"
REJECT: Literal["reject"] = "reject"
WAIT: Literal["wait"] = "wait"
Verdict = Literal["release", "reject", "wait"]
_NOTE_CHARS = 200
_ANY_SUBJECT = Subject("", "", "", "production")


class ResultLike(Protocol):
    """What the gate reads of a ResultsDB result (``fedimg.results.Result``)."""

    @property
    def outcome(self) -> str: ...

    @property
    def note(self) -> str: ...

    @property
    def data(self) -> Mapping[str, tuple[str, ...]]: ...


class WaiverLike(Protocol):
    """What the gate reads of a WaiverDB waiver (``fedimg.waivers.Waiver``)."""

    @property
    def waiver_id(self) -> int: ...

    @property
    def subject_type(self) -> str: ...

    @property
    def subject_identifier(self) -> str: ...

    @property
    def testcase(self) -> str: ...

    @property
    def scenario(self) -> str | None: ...

    @property
    def username(self) -> str: ...

    @property
    def comment(self) -> str: ...

    @property
    def waived(self) -> bool: ...


def label(testcase: str, scenario: str | None) -> str:
    """``testcase`` alone for results without a scenario, else ``testcase [scenario]``."""
    return f"{testcase} [{scenario}]" if scenario else testcase


@dataclass(frozen=True)
class WaiverUse:
    """A waiver that made an unsatisfied requirement count as satisfied."""

    testcase: str
    scenario: str  # "" when the requirement has no scenario
    waiver_id: int
    username: str
    comment: str
    waived_outcome: str  # the outcome waived, or "missing"

    @property
    def label(self) -> str:
        return label(self.testcase, self.scenario)


@dataclass(frozen=True)
class Unsatisfied:
    """One requirement of one rule that is not satisfied (and not waived)."""

    rule: str
    testcase: str
    scenario: str
    state: Literal["failed", "missing"]
    detail: str  # the outcome (and note), or why it is missing

    @property
    def label(self) -> str:
        return label(self.testcase, self.scenario)


@dataclass(frozen=True)
class Decision:
    """The gate's verdict on one AMI and the one-line reason for it.

    ``failed`` holds ``(label, outcome, note)`` for every failed requirement,
    ``missing`` the labels of the missing ones (a label is the testcase, with
    `` [scenario]`` when the result has one). ``unsatisfied`` says which rule
    needs what; ``waived`` every waiver used; ``inapplicable`` the skipped
    tests that counted as satisfied, with why they did not apply.
    """

    verdict: Verdict
    reason: str
    failed: tuple[tuple[str, str, str], ...] = ()
    missing: tuple[str, ...] = ()
    waived: tuple[WaiverUse, ...] = ()
    unsatisfied: tuple[Unsatisfied, ...] = ()
    inapplicable: tuple[tuple[str, str], ...] = ()
    rules: tuple[str, ...] = ()

    @property
    def release(self) -> bool:
        return self.verdict == RELEASE

    @property
    def reject(self) -> bool:
        return self.verdict == REJECT

    @property
    def wait(self) -> bool:
        return self.verdict == WAIT


def _aware(moment: datetime) -> datetime:
    """Naive datetimes are taken as UTC (ResultsDB and AWS tags both use UTC)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _one_line(text: str) -> str:
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= _NOTE_CHARS else flat[: _NOTE_CHARS - 3] + "..."


def _describe_failed(failed: Sequence[tuple[str, str, str]]) -> str:
    parts = []
    for name, outcome, note in failed:
        parts.append(f"{name} {outcome}" + (f" ({note})" if note else ""))
    return "; ".join(parts)


def usable_waivers(
    waivers: Sequence[WaiverLike], ami_id: str
) -> dict[tuple[str, str | None], WaiverLike]:
    """(testcase, scenario or None) -> the newest usable waiver for this AMI.

    Waivers for another item or item type, revoked ones (``waived`` false) and
    ones without a comment never count.
    """
    found: dict[tuple[str, str | None], WaiverLike] = {}
    for waiver in sorted(waivers, key=lambda w: w.waiver_id):
        if waiver.subject_type != RESULTSDB_ITEM_TYPE or waiver.subject_identifier != ami_id:
            continue
        key = (waiver.testcase, waiver.scenario or None)
        if waiver.waived and waiver.comment.strip():
            found[key] = waiver
        else:
            found.pop(key, None)  # a newer revocation (or an empty one) undoes it
    return found


@dataclass(frozen=True)
class _Check:
    """One requirement's state before waivers."""

    testcase: str
    scenario: str
    state: Literal["passed", "failed", "missing", "inapplicable"]
    outcome: str
    note: str


def _check(
    rule: Rule,
    testcase: str,
    scenario: str,
    result: ResultLike | None,
    rejecting: frozenset[str],
) -> _Check:
    if result is None:
        return _Check(testcase, scenario, "missing", "missing", "no result")
    outcome = str(result.outcome).upper()
    skipped = result.data.get(SKIPPED_KEY, ())
    if skipped and outcome in (INFO, PASSED):
        why = _one_line(skipped[0]) or "does not apply"
        if rule.if_skipped == "pass":
            return _Check(testcase, scenario, "inapplicable", outcome, why)
        return _Check(
            testcase,
            scenario,
            "failed",
            "SKIPPED",
            f"does not apply ({why}); rule {rule.name} requires it",
        )
    if outcome == PASSED:
        return _Check(testcase, scenario, "passed", outcome, "")
    if outcome in rejecting:
        return _Check(testcase, scenario, "failed", outcome, _one_line(result.note))
    return _Check(testcase, scenario, "missing", outcome, f"latest outcome {outcome}")


def announced_scenarios(results: Iterable[ResultLike]) -> frozenset[str]:
    """Every scenario the summaries of a run list (``RUN_SCENARIOS_KEY``)."""
    return frozenset(
        name.strip()
        for result in results
        for listed in result.data.get(RUN_SCENARIOS_KEY, ())
        for name in listed.split(",")
        if name.strip()
    )


def _requirements(
    rule: Rule, arch: str, present: Collection[tuple[str, str]]
) -> list[tuple[str, str]]:
    """(testcase, scenario) pairs the rule requires, given the results that exist."""
    pairs: list[tuple[str, str]] = []
    wanted = rule.scenarios_for(arch)
    for testcase in rule.testcases:
        if wanted is not None:
            pairs.extend((testcase, s) for s in wanted)
            continue
        seen = sorted({s for (t, s) in present if t == testcase})
        pairs.extend((testcase, s) for s in seen or [""])
    return pairs


@dataclass
class _Tally:
    """What ``evaluate`` learns, requirement by requirement (labels keep their first order)."""

    failed: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    missing: dict[str, None] = field(default_factory=dict)
    passed: dict[str, None] = field(default_factory=dict)
    used: dict[str, WaiverUse] = field(default_factory=dict)
    unsatisfied: list[Unsatisfied] = field(default_factory=list)
    inapplicable: dict[str, str] = field(default_factory=dict)

    def add(
        self, rule: Rule, check: _Check, usable: Mapping[tuple[str, str | None], WaiverLike]
    ) -> None:
        name = label(check.testcase, check.scenario)
        if check.state == "passed":
            self.passed[name] = None
            return
        if check.state == "inapplicable":
            self.inapplicable[name] = check.note
            return
        waiver = usable.get((check.testcase, check.scenario or None)) or usable.get(
            (check.testcase, None)
        )
        if waiver is not None:
            self.used[name] = WaiverUse(
                check.testcase,
                check.scenario,
                waiver.waiver_id,
                waiver.username,
                waiver.comment,
                check.outcome,
            )
            return
        self.unsatisfied.append(
            Unsatisfied(rule.name, check.testcase, check.scenario, check.state, check.note)
        )
        if check.state == "failed":
            self.failed[name] = (name, check.outcome, check.note)
        else:
            self.missing[name] = None

    def release_reason(self) -> str:
        reason = f"passed: {', '.join(self.passed) or 'nothing'}"
        if self.used:
            reason += "; waived: " + ", ".join(
                f"{w.label} {w.waived_outcome} (waiver {w.waiver_id} by {w.username})"
                for w in self.used.values()
            )
        if self.inapplicable:
            reason += "; not applicable: " + ", ".join(self.inapplicable)
        return reason


def evaluate(
    policy: GatePolicy,
    subject: Subject,
    ami_id: str,
    latest: Mapping[tuple[str, str], ResultLike],
    waivers: Sequence[WaiverLike],
    *,
    reject_outcomes: Sequence[str],
    staged_at: datetime,
    now: datetime,
    deadline: timedelta,
    retracted: Collection[tuple[str, str]] = (),
) -> Decision:
    """The verdict for one AMI; see the module docstring for the rules.

    ``latest`` maps (testcase, scenario) to the newest result (scenario ``""``
    for results without one); ``staged_at`` is when its testing began.
    ``retracted``: (testcase, scenario) pairs whose results were set aside by
    a retest: their scenarios still count as present (their new results are
    awaited), never as gone.
    """
    rules = policy.applicable(subject)
    names = tuple(r.name for r in rules)
    if not rules:
        return Decision(
            REJECT, f"no rule of {policy.source} applies to {subject.describe()}", rules=names
        )
    rejecting = frozenset(o.upper() for o in reject_outcomes)
    usable = usable_waivers(waivers, ami_id)
    tally = _Tally()
    announced = announced_scenarios(latest.values())
    for rule in rules:
        # A scenario counts as present once any result names it, or a summary
        # lists it among its run's: the gate then waits for its results too.
        present = {*latest, *retracted, *((t, s) for t in rule.testcases for s in announced)}
        for testcase, scenario in _requirements(rule, subject.arch, present):
            result = latest.get((testcase, scenario))
            tally.add(rule, _check(rule, testcase, scenario, result, rejecting), usable)

    def made(
        verdict: Verdict, reason: str, failed: tuple[tuple[str, str, str], ...] = ()
    ) -> Decision:
        return Decision(
            verdict,
            reason,
            failed,
            tuple(tally.missing),
            waived=tuple(tally.used.values()),
            unsatisfied=tuple(tally.unsatisfied),
            inapplicable=tuple(tally.inapplicable.items()),
            rules=names,
        )

    if tally.failed:
        failures = tuple(tally.failed.values())
        return made(REJECT, f"failed: {_describe_failed(failures)}", failures)
    if not tally.missing:
        return made(RELEASE, tally.release_reason())
    listed = ", ".join(tally.missing)
    if _aware(now) - _aware(staged_at) >= deadline:
        return made(
            REJECT, f"no results: nothing PASSED for {listed} within {_hours(deadline)} of staging"
        )
    return made(WAIT, f"waiting for {listed}")


@dataclass(frozen=True)
class _Plain:
    outcome: str
    note: str
    data: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))


def decide(
    results: Mapping[str, object],
    required: Sequence[str],
    reject_outcomes: Sequence[str],
    *,
    staged_at: datetime,
    now: datetime,
    deadline: timedelta,
) -> Decision:
    """The gate of one list of required testcases, results without scenarios, no waivers."""
    latest: dict[tuple[str, str], ResultLike] = {
        (testcase, ""): _Plain(str(getattr(r, "outcome", "")), str(getattr(r, "note", "") or ""))
        for testcase, r in results.items()
    }
    return evaluate(
        default_policy(required),
        _ANY_SUBJECT,
        "",
        latest,
        (),
        reject_outcomes=reject_outcomes,
        staged_at=staged_at,
        now=now,
        deadline=deadline,
    )


def _hours(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds >= 3600:
        return f"{seconds / 3600:g}h"
    return f"{seconds:g}s"
