"""Run the suite over one ``SshSession`` and give every check an outcome.

tunir's semantics, minus its sharp edges: gating checks decide the report,
non-gating ones are only reported; the run does not stop at the first gating
failure (every check gets a result); a check with ``reboot_before`` reboots
the instance and waits for a *new* boot (the boot id changes) before it runs;
an SSH failure on a command is retried once after a backoff and a reconnect;
a connection that cannot be re-established fails the current check and every
later one, with the reason in the note.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from autocloud_ami.ssh import CommandResult, SshError, SshSession
from autocloud_ami.suite import Check, Family, evaluate, evaluate_all
from fedimg.messages import FAILED, PASSED

log = logging.getLogger(__name__)

__all__ = [
    "FAILED",
    "PASSED",
    "SKIPPED",
    "SuiteReport",
    "TestOutcome",
    "detect_family",
    "evaluate",
    "evaluate_all",
    "format_output",
    "not_run",
    "run_suite",
]

SKIPPED = "SKIPPED"

OSTREE_PROBE = "test -e /run/ostree-booted"
BOOT_ID = "cat /proc/sys/kernel/random/boot_id"
REBOOT = "sudo reboot"
PROBE_TIMEOUT = 60.0  # a condition, the family probe, reading the boot id
MAX_OUTPUT_CHARS = 64 * 1024  # per stream in a test's kept output


@dataclass(frozen=True)
class TestOutcome:
    __test__ = False  # not a pytest class

    test_id: str
    outcome: str  # PASSED | FAILED | SKIPPED | NEEDS_INSPECTION (could not run, not the image)
    gating: bool
    note: str  # one line: why
    output: str  # every command run for this test: command, exit code, stdout, stderr
    duration: float


@dataclass(frozen=True)
class SuiteReport:
    family: Family
    outcomes: tuple[TestOutcome, ...]

    @property
    def passed(self) -> bool:
        """Every gating check PASSED or was SKIPPED, and at least one gating check PASSED."""
        gating = [o for o in self.outcomes if o.gating]
        return any(o.outcome == PASSED for o in gating) and all(
            o.outcome in (PASSED, SKIPPED) for o in gating
        )

    def counts(self) -> tuple[int, int]:
        """(passed, failed) over every check, gating or not."""
        passed = sum(1 for o in self.outcomes if o.outcome == PASSED)
        failed = sum(1 for o in self.outcomes if o.outcome == FAILED)
        return passed, failed

    def gating_failures(self) -> list[TestOutcome]:
        return [o for o in self.outcomes if o.gating and o.outcome == FAILED]

    def summary(self) -> str:
        """One line for logs and the aggregate result's note."""
        passed, failed = self.counts()
        skipped = len(self.outcomes) - passed - failed
        verdict = "PASSED" if self.passed else "FAILED"
        text = f"{verdict}: {passed} passed, {failed} failed, {skipped} skipped ({self.family})"
        bad = self.gating_failures()
        if bad:
            text += "; gating failures: " + ", ".join(o.test_id for o in bad)
        elif not any(o.outcome == PASSED for o in self.outcomes if o.gating):
            text += "; no gating check passed"
        return text


class _ConnectionLost(Exception):
    """The instance cannot be reached any more: the rest of the suite cannot run."""


def format_output(result: CommandResult) -> str:
    """A command's record, as kept with its test's result."""
    if result.error is not None:
        status = f"connection error: {result.error}"
    elif result.timed_out:
        status = f"timed out after {result.duration:.1f}s"
    else:
        status = f"exit {result.exit_code}"
    lines = [f"$ {result.command}", f"[{status}; {result.duration:.2f}s]"]
    for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        if text:
            kept = text[:MAX_OUTPUT_CHARS]
            if len(text) > MAX_OUTPUT_CHARS:
                kept += f"\n[... {len(text) - MAX_OUTPUT_CHARS} more chars]"
            lines.append(f"--- {name} ---")
            lines.append(kept.rstrip("\n"))
    return "\n".join(lines) + "\n"


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _short(command: str, limit: int = 60) -> str:
    return command if len(command) <= limit else command[: limit - 3] + "..."


def _probe_family(session: SshSession) -> Family | None:
    result = session.run(OSTREE_PROBE, PROBE_TIMEOUT)
    if result.error is None and not result.timed_out:
        if result.exit_code == 0:
            return Family.ATOMIC
        if result.exit_code == 1:
            return Family.BASE
    return None


def detect_family(session: SshSession, declared: Family, *, log_context: str = "") -> Family:
    """The family the instance says it is (``/run/ostree-booted``); it wins over ``declared``."""
    ctx = log_context or "suite"
    found = _probe_family(session)
    if found is None:
        log.warning("%s: could not probe the image family; using the declared %s", ctx, declared)
        return declared
    if found != declared:
        log.warning(
            "%s: image declared %s but boots as %s; testing it as %s", ctx, declared, found, found
        )
    return found


def _infer_family(checks: Sequence[Check]) -> Family:
    if checks and all(Family.ATOMIC in c.families for c in checks):
        if not all(Family.BASE in c.families for c in checks):
            return Family.ATOMIC
    return Family.BASE


def _skip_note(check: Check, family: Family) -> str:
    others = " and ".join(sorted(str(f) for f in check.families))
    return f"only for {others} images; this one is {family}"


def _skip_reason(check: Check, family: Family, traits: frozenset[str]) -> str | None:
    """Why ``check`` does not apply here (the image's family, the scenario's traits), or None."""
    if family not in check.families:
        return _skip_note(check, family)
    if check.needs is not None and check.needs not in traits:
        return f"only on {check.needs} instance types; this scenario's is not"
    return None


def not_run(
    checks: Sequence[Check],
    reason: str,
    *,
    family: Family | None = None,
    traits: frozenset[str] = frozenset(),
    outcome: str = FAILED,
) -> SuiteReport:
    """A report in which every check got ``outcome`` with ``reason`` (the instance never came up).

    With ``family``, checks for the other family are SKIPPED as ``run_suite``
    would, and so are checks needing a trait the scenario lacks.
    """
    fam = family or _infer_family(checks)
    outcomes = []
    for c in checks:
        skip = _skip_reason(c, fam, traits) if family is not None else None
        if skip is not None:
            outcomes.append(TestOutcome(c.id, SKIPPED, c.gating, skip, "", 0.0))
        else:
            note = f"not run: {_one_line(reason)}"
            outcomes.append(TestOutcome(c.id, outcome, c.gating, note, "", 0.0))
    return SuiteReport(fam, tuple(outcomes))


class _Run:
    """One pass over the checks; holds the session and the knobs."""

    def __init__(
        self,
        session: SshSession,
        *,
        reboot_timeout: float,
        reconnect_timeout: float,
        retry_backoff: float,
        reboot_poll: float,
        log_context: str,
        sleep: Callable[[float], None],
        clock: Callable[[], float],
    ) -> None:
        self.session = session
        self.reboot_timeout = reboot_timeout
        self.reconnect_timeout = reconnect_timeout
        self.retry_backoff = retry_backoff
        self.reboot_poll = reboot_poll
        self.ctx = log_context or "suite"
        self.sleep = sleep
        self.clock = clock
        self.output: list[str] = []

    def _call(self, command: str, timeout: float) -> CommandResult:
        try:
            return self.session.run(command, timeout)
        except (SshError, OSError, EOFError) as exc:  # the protocol says report; be safe
            return CommandResult(command, None, "", "", 0.0, error=f"{type(exc).__name__}: {exc}")

    def step(self, command: str, timeout: float) -> CommandResult:
        """Run a command; on an SSH failure back off, reconnect and run it once more."""
        result = self._call(command, timeout)
        self.output.append(format_output(result))
        if result.error is None:
            return result
        log.warning(
            "%s: SSH failed on %r (%s); retrying once in %.0fs",
            self.ctx,
            command,
            result.error,
            self.retry_backoff,
        )
        self.sleep(self.retry_backoff)
        try:
            self.session.reconnect(self.reconnect_timeout)
        except SshError as exc:
            raise _ConnectionLost(f"{result.error}; reconnect failed: {exc}") from exc
        result = self._call(command, timeout)
        self.output.append(format_output(result))
        if result.error is not None:
            log.error("%s: SSH failed again on %r: %s", self.ctx, command, result.error)
        return result

    def reboot(self) -> str | None:
        """Reboot and wait for a new boot; a reason if it did not reboot (session still usable).

        Raises ``_ConnectionLost`` when the instance does not come back.
        """
        before = self.step(BOOT_ID, PROBE_TIMEOUT)
        old_boot = before.stdout.strip() if before.ok else ""
        if not old_boot:
            log.warning("%s: cannot read the boot id; reboot detection is best effort", self.ctx)
        log.info("%s: rebooting the instance", self.ctx)
        started = self.clock()
        result = self._call(REBOOT, 60.0)
        self.output.append(format_output(result))
        if result.error is None and not result.timed_out and result.exit_code not in (0, None):
            return f"reboot refused: exit {result.exit_code} {_one_line(result.stderr)[:120]}"
        deadline = started + self.reboot_timeout
        if not old_boot:
            self.sleep(min(self.reboot_poll, self.reboot_timeout))
        while True:
            left = deadline - self.clock()
            if left <= 0:
                return f"instance did not reboot within {self.reboot_timeout:.0f}s"
            try:
                self.session.reconnect(left)
            except SshError as exc:
                raise _ConnectionLost(
                    f"instance did not come back within {self.reboot_timeout:.0f}s "
                    f"after reboot: {exc}"
                ) from exc
            now = self._call(BOOT_ID, max(1.0, min(PROBE_TIMEOUT, deadline - self.clock())))
            new_boot = now.stdout.strip() if now.ok else ""
            if new_boot and new_boot != old_boot:
                log.info(
                    "%s: back up after %.1fs (boot %s)",
                    self.ctx,
                    self.clock() - started,
                    new_boot,
                )
                self.output.append(format_output(now))
                return None
            if not old_boot and now.error is None:
                log.info("%s: back up after %.1fs", self.ctx, self.clock() - started)
                self.output.append(format_output(now))
                return None
            # Still the old boot (sshd not gone yet) or a flaky login: look again.
            self.sleep(min(self.reboot_poll, max(0.0, deadline - self.clock())))

    def check(self, check: Check) -> TestOutcome:
        self.output = []
        start = time.monotonic()

        def outcome(result: str, note: str) -> TestOutcome:
            return TestOutcome(
                check.id,
                result,
                check.gating,
                note,
                "".join(self.output),
                time.monotonic() - start,
            )

        if check.reboot_before:
            why = self.reboot()
            if why is not None:
                return outcome(FAILED, why)
        if check.only_if is not None:
            cond = self.step(check.only_if, min(PROBE_TIMEOUT, check.timeout))
            if cond.error is not None or cond.timed_out or cond.exit_code is None:
                state = f"connection error: {cond.error}" if cond.error else "timed out"
                return outcome(FAILED, f"condition ({_short(check.only_if)}): {state}")
            if cond.exit_code != 0:
                return outcome(
                    SKIPPED, f"condition not met: {_short(check.only_if)} exited {cond.exit_code}"
                )
        steps = check.steps()
        reason = ""
        for index, (command, expects) in enumerate(steps, start=1):
            result = self.step(command, check.timeout)
            ok, reason = evaluate_all(expects, result)
            if not ok:
                if len(steps) > 1:
                    reason = f"step {index}/{len(steps)} ({_short(command)}): {reason}"
                return outcome(FAILED, reason)
        if len(steps) > 1:
            reason = f"all {len(steps)} steps passed"
        return outcome(PASSED, reason)


def run_suite(
    session: SshSession,
    checks: Sequence[Check],
    *,
    reboot_timeout: float = 600.0,
    log_context: str = "",
    family: Family | None = None,
    reconnect_timeout: float = 120.0,
    retry_backoff: float = 10.0,
    reboot_poll: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    traits: frozenset[str] = frozenset(),
) -> SuiteReport:
    """Run every check on a connected session; every check gets an outcome.

    ``family`` None: probed on the instance. Checks not for the family are
    SKIPPED, so the whole ``SUITE`` can be passed as well as ``select()``'s;
    so are checks that need a scenario trait (``Check.needs``) not in ``traits``.
    """
    ctx = log_context or "suite"
    if family is None:
        family = _probe_family(session)
        if family is None:
            family = _infer_family(checks)
            log.warning("%s: could not probe the image family; assuming %s", ctx, family)
    run = _Run(
        session,
        reboot_timeout=reboot_timeout,
        reconnect_timeout=reconnect_timeout,
        retry_backoff=retry_backoff,
        reboot_poll=reboot_poll,
        log_context=ctx,
        sleep=sleep,
        clock=clock,
    )
    outcomes: list[TestOutcome] = []
    lost: str | None = None
    log.info("%s: running %d checks on a %s image", ctx, len(checks), family)
    for check in checks:
        skip = _skip_reason(check, family, traits)
        if skip is not None:
            outcomes.append(TestOutcome(check.id, SKIPPED, check.gating, skip, "", 0.0))
            continue
        if lost is not None:
            outcomes.append(TestOutcome(check.id, FAILED, check.gating, lost, "", 0.0))
            continue
        start = time.monotonic()
        try:
            result = run.check(check)
        except _ConnectionLost as exc:
            note = f"connection to the instance lost: {exc}"
            log.error("%s: %s FAILED: %s", ctx, check.id, note)
            result = TestOutcome(
                check.id,
                FAILED,
                check.gating,
                note,
                "".join(run.output),
                time.monotonic() - start,
            )
            lost = _one_line(f"not run: connection to the instance lost during {check.id}: {exc}")
        result = replace(result, note=_one_line(result.note))
        outcomes.append(result)
        level = logging.INFO if result.outcome != FAILED else logging.WARNING
        log.log(
            level,
            "%s: %s %s%s in %.1fs: %s",
            ctx,
            check.id,
            result.outcome,
            "" if check.gating else " (non-gating)",
            result.duration,
            result.note,
        )
    report = SuiteReport(family, tuple(outcomes))
    log.info("%s: %s", ctx, report.summary())
    return report
