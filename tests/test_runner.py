"""The suite runner against a scripted fake SshSession: pure and fast."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from autocloud_ami.runner import (
    BOOT_ID,
    FAILED,
    OSTREE_PROBE,
    PASSED,
    REBOOT,
    SKIPPED,
    SuiteReport,
    TestOutcome,
    detect_family,
    format_output,
    not_run,
    run_suite,
)
from autocloud_ami.ssh import CommandResult, SshError, SshTimeout
from autocloud_ami.suite import ATOMIC_ONLY, BASE_ONLY, SUITE, Check, Expect, Family

EXIT0 = Expect("exit0")
Answer = tuple[int, str, str] | CommandResult | Callable[[], "Answer"]


@dataclass
class FakeSession:
    """A scripted instance: answers by command, reboots, drops, and records every call."""

    answers: dict[str, list[Answer]] = field(default_factory=dict)
    atomic: bool = False
    boot: int = 1
    connected: bool = True
    reboots_after_polls: int = 0  # reconnects that still see the old boot
    reconnect_error: SshError | None = None
    calls: list[str] = field(default_factory=list)
    reconnects: list[float] = field(default_factory=list)
    _pending_boot: bool = False
    _stale_polls: int = 0

    def answer(self, command: str, *answers: Answer) -> None:
        """Answer ``command`` with these, in turn; the last one repeats."""
        self.answers[command] = list(answers)

    def run(self, command: str, timeout: float) -> CommandResult:
        self.calls.append(command)
        if not self.connected:
            return CommandResult(command, None, "", "", 0.0, error="not connected")
        if command == BOOT_ID:
            return CommandResult(command, 0, f"boot-{self.boot}\n", "", 0.01)
        if command == REBOOT and command not in self.answers:
            self.connected = False
            self._pending_boot = True
            self._stale_polls = self.reboots_after_polls
            return CommandResult(command, None, "", "", 0.01, error="connection lost")
        if command == OSTREE_PROBE and command not in self.answers:
            return CommandResult(command, 0 if self.atomic else 1, "", "", 0.01)
        queue = self.answers.get(command)
        if not queue:
            return CommandResult(command, 0, "", "", 0.01)
        item: Answer = queue.pop(0) if len(queue) > 1 else queue[0]
        while callable(item):
            item = item()
        if isinstance(item, CommandResult):
            if item.error is not None:
                self.connected = False
            return item
        code, out, err = item
        return CommandResult(command, code, out, err, 0.01)

    def reconnect(self, timeout: float) -> None:
        self.reconnects.append(timeout)
        if self.reconnect_error is not None:
            raise self.reconnect_error
        self.connected = True
        if self._pending_boot:
            if self._stale_polls > 0:
                self._stale_polls -= 1  # sshd still up on the old boot
            else:
                self.boot += 1
                self._pending_boot = False

    def close(self) -> None:
        self.connected = False


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def run(session: FakeSession, checks: list[Check], **kwargs: object) -> SuiteReport:
    options: dict[str, object] = {
        "family": Family.BASE,
        "reboot_timeout": 60.0,
        "retry_backoff": 0.0,
        "reboot_poll": 0.0,
        "sleep": Sleeps(),
    }
    options.update(kwargs)
    return run_suite(session, checks, **options)  # type: ignore[arg-type]


def outcome_of(report: SuiteReport, test_id: str) -> TestOutcome:
    return next(o for o in report.outcomes if o.test_id == test_id)


MINI = [
    Check("one", "getenforce", Expect("equals", "Enforcing")),
    Check("two", "systemctl is-active sshd", Expect("equals", "active")),
    Check("three", "echo hi", (EXIT0, Expect("contains", "hi")), gating=False),
]


def healthy() -> FakeSession:
    session = FakeSession()
    session.answer("getenforce", (0, "Enforcing\n", ""))
    session.answer("systemctl is-active sshd", (0, "active\n", ""))
    session.answer("echo hi", (0, "hi\n", ""))
    return session


# -- the plain cases -----------------------------------------------------------------
def test_all_pass() -> None:
    session = healthy()
    report = run(session, MINI)
    assert report.passed
    assert [o.outcome for o in report.outcomes] == [PASSED, PASSED, PASSED]
    assert report.counts() == (3, 0)
    assert [o.gating for o in report.outcomes] == [True, True, False]
    assert session.calls == ["getenforce", "systemctl is-active sshd", "echo hi"]
    out = outcome_of(report, "one").output
    assert "$ getenforce" in out and "exit 0" in out and "Enforcing" in out
    assert all(o.note and "\n" not in o.note for o in report.outcomes)


def test_a_gating_failure_fails_the_report_but_every_check_still_runs() -> None:
    session = healthy()
    session.answer("getenforce", (0, "Permissive\n", ""))
    report = run(session, MINI)
    assert not report.passed
    assert [o.outcome for o in report.outcomes] == [FAILED, PASSED, PASSED]
    assert "Permissive" in outcome_of(report, "one").note
    assert "echo hi" in session.calls  # not stopped at the first gating failure
    assert report.counts() == (2, 1)
    assert [o.test_id for o in report.gating_failures()] == ["one"]


def test_a_non_gating_failure_does_not_fail_the_report() -> None:
    session = healthy()
    session.answer("echo hi", (1, "", "echo: broken"))
    report = run(session, MINI)
    assert report.passed
    assert outcome_of(report, "three").outcome == FAILED
    assert "exit 1" in outcome_of(report, "three").note
    assert report.counts() == (2, 1)


def test_multi_step_check_stops_at_the_first_failing_step() -> None:
    check = Check("svc", ("step-a", "step-b", "step-c"), EXIT0)
    session = FakeSession()
    session.answer("step-b", (5, "", "Unit not found"))
    report = run(session, [check])
    result = outcome_of(report, "svc")
    assert result.outcome == FAILED
    assert "step 2/3" in result.note and "exit 5" in result.note
    assert "step-c" not in session.calls
    assert "$ step-a" in result.output and "$ step-b" in result.output


def test_command_timeout_fails_that_check_and_the_suite_goes_on() -> None:
    session = healthy()
    session.answer("getenforce", CommandResult("getenforce", None, "", "", 600.0, timed_out=True))
    report = run(session, MINI)
    assert outcome_of(report, "one").outcome == FAILED
    assert "timed out" in outcome_of(report, "one").note
    assert outcome_of(report, "two").outcome == PASSED
    assert session.reconnects == []  # a timeout is not an SSH failure


def test_the_per_check_timeout_is_passed_to_the_session() -> None:
    seen: list[float] = []
    session = FakeSession()
    original = session.run

    def spy(command: str, timeout: float) -> CommandResult:
        seen.append(timeout)
        return original(command, timeout)

    session.run = spy  # type: ignore[method-assign]
    run(session, [Check("quick", "true", EXIT0, timeout=7.5)])
    assert seen == [7.5]


# -- SSH failures ----------------------------------------------------------------------
def test_an_ssh_failure_is_retried_once_after_a_backoff_and_reconnect() -> None:
    session = healthy()
    lost = CommandResult("getenforce", None, "", "", 0.0, error="connection reset")
    session.answer("getenforce", lost, (0, "Enforcing\n", ""))
    sleeps = Sleeps()
    report = run(session, MINI, retry_backoff=3.0, reconnect_timeout=42.0, sleep=sleeps)
    assert report.passed
    assert session.calls.count("getenforce") == 2
    assert sleeps == [3.0]
    assert session.reconnects == [42.0]
    assert "connection reset" in outcome_of(report, "one").output


def test_a_second_ssh_failure_fails_the_check_and_the_suite_goes_on() -> None:
    session = healthy()
    lost = CommandResult("getenforce", None, "", "", 0.0, error="channel refused")
    session.answer("getenforce", lost)
    report = run(session, MINI)
    assert session.calls.count("getenforce") == 2  # once, and one retry: no more
    one = outcome_of(report, "one")
    assert one.outcome == FAILED and "channel refused" in one.note
    assert outcome_of(report, "two").outcome == PASSED


def test_an_exception_from_the_session_is_treated_as_an_ssh_failure() -> None:
    session = healthy()
    calls = iter([True, False])

    def flaky() -> tuple[int, str, str]:
        if next(calls):
            raise SshError("socket closed")
        return (0, "Enforcing\n", "")

    session.answer("getenforce", flaky)
    report = run(session, MINI)
    assert outcome_of(report, "one").outcome == PASSED
    assert len(session.reconnects) == 1


def test_connection_lost_for_good_fails_this_and_every_later_check() -> None:
    session = healthy()
    lost = CommandResult("systemctl is-active sshd", None, "", "", 0.0, error="broken pipe")
    session.answer("systemctl is-active sshd", lost)
    session.reconnect_error = SshTimeout("no SSH login within 5s;\nlast error: reset")
    checks = [*MINI, Check("atomic-only", "rpm -q docker", EXIT0, families=ATOMIC_ONLY)]
    report = run(session, checks, reconnect_timeout=5.0)
    assert [o.outcome for o in report.outcomes] == [PASSED, FAILED, FAILED, SKIPPED]
    two, three = outcome_of(report, "two"), outcome_of(report, "three")
    assert "broken pipe" in two.note and "no SSH login" in two.note
    assert "not run" in three.note and "two" in three.note
    assert all("\n" not in o.note for o in report.outcomes)
    assert "echo hi" not in session.calls
    assert session.reconnects == [5.0]  # tried once, not once per remaining check
    assert not report.passed


# -- reboots --------------------------------------------------------------------------
def test_reboot_before_a_check_waits_for_a_new_boot() -> None:
    session = FakeSession()
    check = Check("after", "systemctl is-active chronyd", EXIT0, reboot_before=True)
    report = run(session, [check], reboot_timeout=120.0)
    assert outcome_of(report, "after").outcome == PASSED
    assert session.boot == 2
    assert session.calls[:2] == [BOOT_ID, REBOOT]
    assert session.calls[-1] == "systemctl is-active chronyd"
    assert len(session.reconnects) == 1 and 0 < session.reconnects[0] <= 120.0
    assert "boot-2" in outcome_of(report, "after").output


def test_reboot_keeps_polling_while_the_old_boot_still_answers() -> None:
    session = FakeSession(reboots_after_polls=2)
    sleeps = Sleeps()
    check = Check("after", "true", EXIT0, reboot_before=True)
    report = run(session, [check], reboot_poll=1.5, sleep=sleeps)
    assert outcome_of(report, "after").outcome == PASSED
    assert len(session.reconnects) == 3
    assert sleeps == [1.5, 1.5]
    assert session.boot == 2


def test_reboot_that_never_comes_back_fails_the_rest() -> None:
    session = FakeSession(reconnect_error=SshTimeout("no SSH login within 3s"))
    checks = [
        Check("after", "true", EXIT0, reboot_before=True),
        Check("later", "true", EXIT0),
    ]
    report = run(session, checks, reboot_timeout=3.0)
    after, later = outcome_of(report, "after"), outcome_of(report, "later")
    assert after.outcome == FAILED and "did not come back" in after.note
    assert later.outcome == FAILED and "not run" in later.note
    assert session.calls == [BOOT_ID, REBOOT]


def test_reboot_refused_fails_the_check_and_the_session_goes_on() -> None:
    session = FakeSession()
    session.answer(REBOOT, (1, "", "Call to Reboot failed: Interactive authentication required."))
    checks = [
        Check("after", "true", EXIT0, reboot_before=True),
        Check("later", "later-cmd", EXIT0),
    ]
    report = run(session, checks)
    assert outcome_of(report, "after").outcome == FAILED
    assert "reboot refused" in outcome_of(report, "after").note
    assert outcome_of(report, "later").outcome == PASSED
    assert "true" not in session.calls and "later-cmd" in session.calls


def test_an_instance_that_never_reboots_fails_after_the_reboot_timeout() -> None:
    session = FakeSession()
    session.answer(REBOOT, (0, "", ""))  # accepted, but the boot id never changes
    now = [1000.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    report = run(
        session,
        [Check("after", "true", EXIT0, reboot_before=True), Check("later", "x", EXIT0)],
        reboot_timeout=30.0,
        reboot_poll=5.0,
        sleep=sleep,
        clock=lambda: now[0],
    )
    after = outcome_of(report, "after")
    assert after.outcome == FAILED and "did not reboot" in after.note
    assert len(session.reconnects) == 6  # polled every 5 s for 30 s
    assert outcome_of(report, "later").outcome == PASSED


# -- conditions and families ------------------------------------------------------------
def test_only_if_false_skips_without_running_the_check() -> None:
    session = FakeSession()
    session.answer("grep -qw net.ifnames=0 /proc/cmdline", (1, "", ""))
    check = Check(
        "net", "test -e /sys/class/net/eth0", EXIT0, only_if="grep -qw net.ifnames=0 /proc/cmdline"
    )
    report = run(session, [check])
    net = outcome_of(report, "net")
    assert net.outcome == SKIPPED and "condition not met" in net.note
    assert "test -e /sys/class/net/eth0" not in session.calls
    assert report.passed is False  # nothing gating passed: a skip alone is no pass


def test_only_if_true_runs_the_check() -> None:
    session = FakeSession()
    session.answer("cond", (0, "", ""))
    session.answer("the-check", (1, "", "nope"))
    report = run(session, [Check("c", "the-check", EXIT0, only_if="cond")])
    assert outcome_of(report, "c").outcome == FAILED
    assert session.calls == ["cond", "the-check"]


def test_only_if_that_hangs_fails_the_check() -> None:
    session = FakeSession()
    session.answer("cond", CommandResult("cond", None, "", "", 60.0, timed_out=True))
    report = run(session, [Check("c", "the-check", EXIT0, only_if="cond")])
    assert outcome_of(report, "c").outcome == FAILED
    assert "the-check" not in session.calls


def test_checks_of_the_other_family_are_skipped_and_never_run() -> None:
    session = FakeSession()
    checks = [
        Check("base-only", "dnf-thing", EXIT0, families=BASE_ONLY),
        Check("atomic-only", "docker-thing", EXIT0, families=ATOMIC_ONLY),
    ]
    report = run(session, checks, family=Family.ATOMIC)
    assert outcome_of(report, "base-only").outcome == SKIPPED
    assert "Base" in outcome_of(report, "base-only").note
    assert outcome_of(report, "atomic-only").outcome == PASSED
    assert "dnf-thing" not in session.calls
    assert report.family is Family.ATOMIC


def test_the_family_is_probed_on_the_instance_when_not_given() -> None:
    session = FakeSession(atomic=True)
    report = run(
        session, [Check("atomic-only", "docker-thing", EXIT0, families=ATOMIC_ONLY)], family=None
    )
    assert report.family is Family.ATOMIC
    assert session.calls[0] == OSTREE_PROBE
    assert outcome_of(report, "atomic-only").outcome == PASSED


def test_detect_family_the_instance_wins(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="autocloud_ami.runner"):
        assert detect_family(FakeSession(atomic=True), Family.BASE) is Family.ATOMIC
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="autocloud_ami.runner"):
        assert detect_family(FakeSession(atomic=False), Family.BASE) is Family.BASE
    assert not caplog.records


def test_detect_family_falls_back_to_the_declared_one_when_the_probe_fails() -> None:
    session = FakeSession()
    session.answer(OSTREE_PROBE, CommandResult(OSTREE_PROBE, None, "", "", 0.0, error="lost"))
    assert detect_family(session, Family.ATOMIC) is Family.ATOMIC
    weird = FakeSession()
    weird.answer(OSTREE_PROBE, (127, "", "test: command not found"))
    assert detect_family(weird, Family.BASE) is Family.BASE


def test_whole_suite_on_a_fake_that_answers_nothing_right() -> None:
    # Every command "succeeds" with no output: text expectations fail, nothing crashes,
    # and every check of the suite gets exactly one outcome.
    report = run(FakeSession(), list(SUITE))
    assert [o.test_id for o in report.outcomes] == [c.id for c in SUITE]
    assert not report.passed
    assert outcome_of(report, "selinux").outcome == FAILED
    assert outcome_of(report, "docker_daemon").outcome == SKIPPED


# -- reports -------------------------------------------------------------------------
def test_not_run_fails_every_check_with_the_reason() -> None:
    report = not_run(SUITE, "instance never reached running within 600s")
    assert len(report.outcomes) == len(SUITE)
    assert all(o.outcome == FAILED for o in report.outcomes)
    assert all("never reached running" in o.note for o in report.outcomes)
    assert [o.gating for o in report.outcomes] == [c.gating for c in SUITE]
    assert not report.passed
    assert report.counts() == (0, len(SUITE))


def test_not_run_infers_or_takes_the_family() -> None:
    from autocloud_ami.suite import select

    assert not_run(select(SUITE, Family.ATOMIC), "x").family is Family.ATOMIC
    assert not_run(select(SUITE, Family.BASE), "x").family is Family.BASE
    report = not_run(SUITE, "ssh failed", family=Family.BASE)
    skipped = {o.test_id for o in report.outcomes if o.outcome == SKIPPED}
    assert "docker_daemon" in skipped and "selinux" not in skipped
    assert not_run([], "x").outcomes == ()


def test_passed_needs_a_passing_gating_check_and_no_gating_failure() -> None:
    def report(*outcomes: tuple[str, bool]) -> SuiteReport:
        return SuiteReport(
            Family.BASE,
            tuple(TestOutcome(f"t{i}", o, g, "n", "", 0.0) for i, (o, g) in enumerate(outcomes)),
        )

    assert report((PASSED, True), (SKIPPED, True), (FAILED, False)).passed
    assert not report().passed
    assert not report((SKIPPED, True)).passed
    assert not report((PASSED, False)).passed
    assert not report((PASSED, True), (FAILED, True)).passed
    summary = report((PASSED, True), (FAILED, True)).summary()
    assert "t1" in summary and "FAILED" in summary


def test_format_output_keeps_command_status_and_both_streams() -> None:
    text = format_output(CommandResult("ls /nope", 2, "", "ls: cannot access\n", 0.25))
    assert "$ ls /nope" in text and "exit 2" in text and "ls: cannot access" in text
    assert "timed out" in format_output(CommandResult("x", None, "a", "", 3.0, timed_out=True))
    assert "connection error: gone" in format_output(
        CommandResult("x", None, "", "", 0.0, error="gone")
    )
    huge = format_output(CommandResult("x", 0, "y" * 200_000, "", 0.0))
    assert len(huge) < 100_000 and "more chars" in huge
