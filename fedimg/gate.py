"""The release gate: a pure decision from the latest test results of one AMI.

Greenwave-style: ``decide`` looks only at its arguments (the latest result per
testcase as ResultsDB reports it, the policy, the AMI's staging time and the
current time) and returns a frozen ``Decision``. No I/O, no clock, no logging:
everything that acts on a decision lives in ``fedimg.promote``.

    release  every required testcase's latest outcome is PASSED
    reject   any required testcase's latest outcome is a reject outcome
             (FAILED, NEEDS_INSPECTION by default), or the deadline passed
             while some required testcase still had no PASSED result
    wait     otherwise (missing results, INFO, anything else)

Outcomes are compared case-insensitively; results of testcases outside the
required list never change the verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol

from fedimg.messages import PASSED

RELEASE: Literal["release"] = "release"
REJECT: Literal["reject"] = "reject"
WAIT: Literal["wait"] = "wait"
Verdict = Literal["release", "reject", "wait"]
_NOTE_CHARS = 200


class ResultLike(Protocol):
    """What the gate reads of a ResultsDB result (``fedimg.results.Result``)."""

    @property
    def outcome(self) -> str: ...

    @property
    def note(self) -> str: ...


@dataclass(frozen=True)
class Decision:
    """The gate's verdict on one AMI and the one-line reason for it.

    ``failed`` holds ``(testcase, outcome, note)`` for every required testcase
    whose latest outcome is a reject outcome; ``missing`` the required
    testcases without a PASSED or reject outcome yet (no result, or a
    non-final outcome such as INFO).
    """

    verdict: Verdict
    reason: str
    failed: tuple[tuple[str, str, str], ...] = ()
    missing: tuple[str, ...] = ()

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
    for testcase, outcome, note in failed:
        parts.append(f"{testcase} {outcome}" + (f" ({note})" if note else ""))
    return "; ".join(parts)


def decide(
    results: Mapping[str, ResultLike],
    required: Sequence[str],
    reject_outcomes: Sequence[str],
    *,
    staged_at: datetime,
    now: datetime,
    deadline: timedelta,
) -> Decision:
    """The verdict for one AMI; see the module docstring for the rules."""
    wanted = list(dict.fromkeys(required))
    if not wanted:
        raise ValueError("the gate needs at least one required testcase")
    rejecting = {o.upper() for o in reject_outcomes}
    failed: list[tuple[str, str, str]] = []
    missing: list[str] = []
    for testcase in wanted:
        result = results.get(testcase)
        if result is None:
            missing.append(testcase)
            continue
        outcome = str(result.outcome).upper()
        if outcome in rejecting:
            failed.append((testcase, outcome, _one_line(result.note)))
        elif outcome != PASSED:
            missing.append(testcase)
    if failed:
        return Decision(
            REJECT, f"failed: {_describe_failed(failed)}", tuple(failed), tuple(missing)
        )
    if not missing:
        return Decision(RELEASE, f"passed: {', '.join(wanted)}")
    waited = _aware(now) - _aware(staged_at)
    listed = ", ".join(missing)
    if waited >= deadline:
        return Decision(
            REJECT,
            f"no results: nothing PASSED for {listed} within {_hours(deadline)} of staging",
            (),
            tuple(missing),
        )
    return Decision(WAIT, f"waiting for {listed}", (), tuple(missing))


def _hours(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds >= 3600:
        return f"{seconds / 3600:g}h"
    return f"{seconds:g}s"
