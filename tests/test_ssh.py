"""ParamikoSession against the real SSH stand-in (devel.sshhost) on loopback."""

from __future__ import annotations

import io
import logging
import math
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest

from autocloud_ami import ssh as ssh_module
from autocloud_ami.ssh import (
    CommandResult,
    HostKeyMismatch,
    ParamikoSession,
    SshError,
    SshTimeout,
    host_key_fingerprint,
)
from devel.bus import free_port, wait_until
from devel.sshhost import SshTestHost

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def key() -> paramiko.PKey:
    return paramiko.ECDSAKey.generate()


@pytest.fixture
def host(key: paramiko.PKey) -> Iterator[SshTestHost]:
    with SshTestHost("Base", authorized=[key], reboot_delay=0.2) as running:
        yield running


def session_for(h: SshTestHost, key: paramiko.PKey, **kwargs: Any) -> ParamikoSession:
    kwargs.setdefault("expected_fingerprints", frozenset({h.fingerprint}))
    kwargs.setdefault("connect_timeout", 2.0)
    return ParamikoSession("127.0.0.1", h.port, "fedora", key, **kwargs)


@pytest.fixture
def session(host: SshTestHost, key: paramiko.PKey) -> Iterator[ParamikoSession]:
    with session_for(host, key) as s:
        s.connect(10)
        yield s


# -- fingerprints ------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [paramiko.ECDSAKey.generate, lambda: paramiko.RSAKey.generate(1024)],
    ids=["ecdsa", "rsa"],
)
def test_fingerprint_is_what_ssh_keygen_prints(make: Any, tmp_path: Path) -> None:
    key = make()
    fingerprint = host_key_fingerprint(key)
    assert fingerprint.startswith("SHA256:") and not fingerprint.endswith("=")
    assert fingerprint == key.fingerprint  # paramiko's own implementation agrees
    pub = tmp_path / "key.pub"
    pub.write_text(f"{key.get_name()} {key.get_base64()} test\n")
    out = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(pub)], capture_output=True, text=True, check=True, timeout=30
    )
    assert out.stdout.split()[1] == fingerprint


# -- running commands -----------------------------------------------------------------
def test_run_reports_exit_code_and_both_streams(session: ParamikoSession) -> None:
    good = session.run("getenforce", 10)
    assert good.ok and good.exit_code == 0
    assert good.stdout == "Enforcing\n" and good.stderr == ""
    assert good.command == "getenforce" and good.duration >= 0
    bad = session.run("ls /nope", 10)
    assert not bad.ok and bad.exit_code == 2
    assert "No such file" in bad.stderr and bad.stdout == ""
    missing = session.run("frobnicate --now", 10)
    assert missing.exit_code == 127 and "command not found" in missing.stderr


def test_run_before_connect_is_reported_not_raised(host: SshTestHost, key: paramiko.PKey) -> None:
    result = session_for(host, key).run("true", 5)
    assert result.error is not None and not result.ok and result.exit_code is None


def test_a_command_past_its_timeout_is_reported_and_the_session_stays_usable(
    key: paramiko.PKey,
) -> None:
    # The command never ends on its own: only the deadline can end run().
    with (
        SshTestHost("Base", authorized=[key], hang_on=r"^sleep ") as h,
        session_for(h, key) as session,
    ):
        session.connect(10)
        slow = session.run("sleep 30", 0.3)
        assert slow.timed_out and slow.exit_code is None and slow.error is None
        assert slow.duration >= 0.3
        assert session.run("echo still here", 5).stdout == "still here\n"
        assert h.commands == ["sleep 30", "echo still here"]


def test_large_outputs_on_both_streams_do_not_deadlock(session: ParamikoSession) -> None:
    expected = "".join(f"{n}\n" for n in range(1, 150_001))  # ~0.9 MB
    out = session.run("seq 1 150000", 20)
    assert out.ok and out.stdout == expected
    err = session.run("seq 1 150000 >&2", 20)
    assert err.ok and err.stderr == expected and err.stdout == ""


def test_output_beyond_the_cap_is_drained_but_not_kept(
    host: SshTestHost, key: paramiko.PKey
) -> None:
    with session_for(host, key, max_output=1000) as small:
        small.connect(10)
        result = small.run("seq 1 100000", 20)
        assert result.ok
        assert result.stdout.startswith("1\n2\n3\n")
        assert "more bytes not kept" in result.stdout
        assert len(result.stdout) < 1200
        assert small.run("echo after", 5).stdout == "after\n"


def test_reboot_drops_the_connection_and_reconnect_logs_in_again(key: paramiko.PKey) -> None:
    # The reboot lasts until come_up(): reconnect must keep trying until then.
    with (
        SshTestHost("Base", authorized=[key], reboot_delay=math.inf) as host,
        session_for(host, key) as session,
    ):
        session.connect(10)
        boot = session.run("cat /proc/sys/kernel/random/boot_id", 5).stdout
        dropped = session.run("sudo reboot", 5)
        assert dropped.error is not None and dropped.exit_code is None
        assert session.run("true", 5).error is not None  # reported, not raised
        failed: list[SshError] = []

        def reconnect() -> None:
            try:
                session.reconnect(120)
            except SshError as exc:
                failed.append(exc)

        reconnecting = threading.Thread(target=reconnect)
        reconnecting.start()
        try:
            wait_until(lambda: host.refused >= 2, 60, "reconnect to be refused while rebooting")
            assert reconnecting.is_alive() and not failed  # still trying
        finally:
            host.come_up()
            reconnecting.join(60)
        assert not reconnecting.is_alive() and not failed
        assert session.run("cat /proc/sys/kernel/random/boot_id", 5).stdout != boot
        assert host.boots == 2


class StuckSshd(SshTestHost):
    """An sshd whose exec requests are never answered (a wedged daemon)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()

    def on_exec(self, channel: paramiko.Channel, command: str) -> bool:
        self.release.wait(10)
        return False


def test_an_exec_request_that_is_never_answered_times_out(key: paramiko.PKey) -> None:
    with StuckSshd("Base", authorized=[key]) as h:
        try:
            with session_for(h, key) as s:
                s.connect(10)
                result = s.run("getenforce", 0.5)
                assert result.timed_out and result.exit_code is None
                assert result.duration >= 0.5
                assert not h.release.is_set()  # the server never answered: the deadline did
        finally:
            h.release.set()


def test_a_connection_dropped_mid_command_is_reported(
    host: SshTestHost, key: paramiko.PKey
) -> None:
    with session_for(host, key) as waiting, session_for(host, key) as rebooter:
        waiting.connect(10)
        rebooter.connect(10)
        outcome: list[CommandResult] = []
        runner = threading.Thread(target=lambda: outcome.append(waiting.run("sleep 30", 20)))
        runner.start()
        wait_until(lambda: "sleep 30" in host.commands, 10, "the sleep to start")
        rebooter.run("sudo reboot", 5)
        runner.join(60)
        assert not runner.is_alive()
        [result] = outcome  # ended by the lost connection: no exit status, no timeout
        assert result.error is not None and not result.timed_out and result.exit_code is None


def test_log_lines_carry_the_context(
    host: SshTestHost, key: paramiko.PKey, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="autocloud_ami.ssh"):
        with session_for(host, key, log_context="Fedora-Cloud-40-1.0 ami-0123abcd") as s:
            s.connect(10)
            s.run("true", 5)
    ours = [r for r in caplog.records if r.name == "autocloud_ami.ssh"]
    assert ours and all("ami-0123abcd" in r.getMessage() for r in ours)


# -- connecting -------------------------------------------------------------------------
def test_connect_waits_through_the_boot_delay(key: paramiko.PKey) -> None:
    with SshTestHost("Base", authorized=[key], boot_delay=0.8) as h:
        start = time.monotonic()
        with session_for(h, key) as s:
            s.connect(10)
            assert time.monotonic() - start >= 0.7
            assert s.run("true", 5).ok
        assert h.refused >= 1


def test_connect_waits_while_the_key_is_not_installed_yet(key: paramiko.PKey) -> None:
    with SshTestHost("Base", authorized=[key], key_delay=0.8) as h:
        start = time.monotonic()
        with session_for(h, key) as s:
            s.connect(10)
            assert time.monotonic() - start >= 0.7
            assert s.run("true", 5).ok


@pytest.mark.parametrize("mode", ["refuse", "hang"])
def test_never_accepting_host_times_out(key: paramiko.PKey, mode: Any) -> None:
    with SshTestHost("Base", authorized=[key], never_accept=mode) as h:
        s = session_for(h, key, connect_timeout=0.5)
        start = time.monotonic()
        with pytest.raises(SshTimeout) as info:
            s.connect(1.5)
        assert time.monotonic() - start >= 1.5  # it tried until the deadline
        assert "last error" in str(info.value)
        assert h.logins == 0


def test_closed_port_times_out(key: paramiko.PKey) -> None:
    s = ParamikoSession("127.0.0.1", free_port(), "fedora", key, connect_timeout=0.5)
    with pytest.raises(SshTimeout) as info:
        s.connect(1.0)
    assert "ConnectionRefusedError" in str(info.value)


class FakeTime:
    """``time`` as autocloud_ami.ssh sees it: moves only when the code sleeps or an attempt
    takes time; records every sleep."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.mark.parametrize("mode", ["refuse", "hang"])
def test_connect_gives_up_at_its_deadline_and_no_attempt_runs_past_it(
    key: paramiko.PKey, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeTime()
    monkeypatch.setattr(ssh_module, "time", clock)
    attempts: list[tuple[float, float]] = []  # (when, the timeout it was given)

    def attempt(timeout: float) -> paramiko.Transport:
        attempts.append((clock.now, timeout))
        if mode == "hang":  # no banner: the attempt uses all the time it was given
            clock.now += timeout
            raise TimeoutError("timed out")
        raise ConnectionRefusedError(111, "Connection refused")

    s = ParamikoSession("127.0.0.1", 22, "fedora", key, connect_timeout=2.0)
    monkeypatch.setattr(s, "_open", attempt)
    with pytest.raises(SshTimeout) as info:
        s.connect(10.0)
    assert clock.now == pytest.approx(10.0)  # it gave up at the deadline, not later
    assert all(when + timeout <= 10.0 + 1e-9 for when, timeout in attempts)
    assert all(timeout == min(2.0, 10.0 - when) for when, timeout in attempts)
    assert f"after {len(attempts)} attempts" in str(info.value)
    # Backoff between attempts: doubling from 0.2 s, the last cut short by the deadline.
    *steps, last = clock.sleeps
    assert steps == [0.2 * 2**n for n in range(len(steps))]
    assert 0 < last <= 0.2 * 2 ** len(steps)
    if mode == "refuse":
        assert len(attempts) == 6  # at 0, 0.2, 0.6, 1.4, 3.0 and 6.2 s
    else:
        assert len(attempts) == 4  # each 2 s long, at 0, 2.2, 4.6 and 7.4 s


def test_wrong_host_key_is_refused_at_once(host: SshTestHost, key: paramiko.PKey) -> None:
    s = session_for(host, key, expected_fingerprints=frozenset({"SHA256:" + "A" * 43}))
    opened: list[float] = []
    real_open = s._open

    def counting_open(timeout: float) -> paramiko.Transport:
        opened.append(timeout)
        return real_open(timeout)

    s._open = counting_open  # type: ignore[method-assign]
    with pytest.raises(HostKeyMismatch) as info:
        s.connect(30)
    assert len(opened) == 1  # never retried: a wrong key does not get right by waiting
    assert host.fingerprint in str(info.value)
    assert host.logins == 0 and host.commands == []


def test_an_unknown_client_key_never_logs_in(host: SshTestHost) -> None:
    stranger = paramiko.ECDSAKey.generate()
    s = session_for(host, stranger, connect_timeout=0.5)
    with pytest.raises(SshTimeout) as info:
        s.connect(1.0)
    assert "Authentication" in str(info.value)
    assert host.logins == 0


def test_unverified_host_key_is_pinned_on_first_use(
    key: paramiko.PKey, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        SshTestHost("Base", authorized=[key]) as first,
        SshTestHost("Base", authorized=[key]) as second,
    ):
        s = session_for(first, key, expected_fingerprints=None)
        with caplog.at_level(logging.WARNING, logger="autocloud_ami.ssh"):
            s.connect(10)
        assert any(r.levelno == logging.WARNING for r in caplog.records)
        assert s.run("true", 5).ok
        s.reconnect(10)  # same host, same key: fine
        s.port = second.port  # another host answers at the "same" address
        with pytest.raises(HostKeyMismatch):
            s.reconnect(10)
        s.close()


def test_the_private_key_is_never_logged(
    host: SshTestHost, key: paramiko.PKey, caplog: pytest.LogCaptureFixture
) -> None:
    pem = io.StringIO()
    key.write_private_key(pem)
    secret_lines = [line for line in pem.getvalue().splitlines() if "-----" not in line]
    with caplog.at_level(logging.DEBUG):
        s = session_for(host, key)
        s.connect(10)
        s.run("sudo reboot", 5)
        s.reconnect(10)
        s.run("getenforce", 5)
        s.close()
        wrong = session_for(host, key, expected_fingerprints=frozenset({"SHA256:x"}))
        with pytest.raises(HostKeyMismatch):
            wrong.connect(5)
    text = caplog.text + repr(s)
    assert caplog.records  # there was logging to look at
    for line in secret_lines:
        assert line not in text


def test_command_result_ok_needs_exit_zero_and_no_timeout_or_error() -> None:
    assert CommandResult("x", 0, "", "", 0.0).ok
    assert not CommandResult("x", 1, "", "", 0.0).ok
    assert not CommandResult("x", 0, "", "", 0.0, timed_out=True).ok
    assert not CommandResult("x", 0, "", "", 0.0, error="lost").ok
    assert not CommandResult("x", None, "", "", 0.0).ok
