"""The SSH stand-in: the emulated Fedora (pure) and the whole suite over real SSH (integration)."""

from __future__ import annotations

import bz2
import dataclasses
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paramiko
import pytest

from autocloud_ami.runner import FAILED, PASSED, SKIPPED, SuiteReport, run_suite
from autocloud_ami.ssh import ParamikoSession, SshTimeout
from autocloud_ami.suite import NITRO, SUITE, Family
from devel.bus import wait_until
from devel.sshhost import (
    FAULTS,
    FakeFedora,
    InstanceMetadata,
    SshTestHost,
    fault_options,
    load_authorized_keys,
    parse_command_line,
)

ROOT = Path(__file__).resolve().parent.parent
GATING_BOTH = {
    "selinux",
    "logging",
    "services",
    "cloud_tmp",
    "tmp_mount",
    "net_name",
    "service_stop_disable",
    "service_manipulation",
    "service_after",
}


def sh(os_: FakeFedora, command: str) -> tuple[int, str, str]:
    result = os_.execute(command)
    return result.code, result.stdout.decode(), result.stderr.decode()


# =============================================================================
# The emulated instance, no network
# =============================================================================
def test_unknown_commands_exit_127_with_stderr() -> None:
    fedora = FakeFedora("Base")
    code, out, err = sh(fedora, "frobnicate --all")
    assert (code, out) == (127, "") and "command not found" in err
    code, _, err = sh(fedora, "sudo frobnicate")
    assert code == 1 and "command not found" in err
    assert sh(fedora, "docker version")[0] == 127  # Cloud Base has no docker


@pytest.mark.parametrize("command", ["a &&", "&& b", "a | | b", "echo 'open", "a > ", "x & y"])
def test_shell_syntax_errors_exit_2(command: str) -> None:
    code, _, err = sh(FakeFedora("Base"), command)
    assert code == 2 and "syntax" in err


def test_shell_lists_pipes_and_redirections() -> None:
    fedora = FakeFedora("Base")
    assert sh(fedora, "false && echo no || echo yes; echo end")[1] == "yes\nend\n"
    assert sh(fedora, "seq 1 5 | head -2")[1] == "1\n2\n"
    assert sh(fedora, "cd /tmp && echo hi > f && cat < /tmp/f && cat f")[1] == "hi\nhi\n"
    assert sh(fedora, "echo a >> /tmp/g && echo b >> /tmp/g && cat /tmp/g")[1] == "a\nb\n"
    assert sh(fedora, "echo oops >&2") == (0, "", "oops\n")
    items = parse_command_line("a x | b > f && c < g")
    assert [op for op, _ in items] == [";", "&&"]
    assert [s.argv for s in items[0][1]] == [["a", "x"], ["b"]]
    assert items[0][1][1].stdout_path == "f" and items[1][1][0].stdin_path == "g"


def test_redirection_happens_as_the_login_user_not_under_sudo() -> None:
    fedora = FakeFedora("Base")
    code, _, err = sh(fedora, "sudo echo x > /root/file")
    assert code == 1 and "Permission denied" in err
    assert sh(fedora, "cat /var/log/audit/audit.log")[0] == 1  # root-only
    assert sh(fedora, "sudo cat /var/log/audit/audit.log")[0] == 0


def test_usr_is_read_only_on_atomic_only() -> None:
    atomic, base = FakeFedora("Atomic"), FakeFedora("Base")
    code, _, err = sh(atomic, "sudo touch /bin/probe")
    assert code == 1 and "Read-only file system" in err
    assert sh(base, "sudo touch /bin/probe")[0] == 0
    assert sh(base, "touch /bin/probe")[0] == 1  # not root
    assert sh(atomic, "test -e /run/ostree-booted")[0] == 0
    assert sh(base, "test -e /run/ostree-booted")[0] == 1


def test_bzip2_and_cpio_produce_real_formats() -> None:
    fedora = FakeFedora("Base")
    assert sh(fedora, "cd /tmp && echo data > a && bzip2 a")[0] == 0
    assert bz2.decompress(fedora.nodes["/tmp/a.bz2"].data) == b"data\n"
    assert "/tmp/a" not in fedora.nodes  # no -k: the original is gone
    code, _, err = sh(fedora, "cd /tmp && echo x > a && bzip2 a")
    assert code == 1 and "already exists" in err
    archive = fedora.execute("cd /tmp && echo a.bz2 | cpio -o")
    assert archive.stdout.startswith(b"070701") and b"TRAILER!!!" in archive.stdout
    assert len(archive.stdout) % 512 == 0 and b"block" in archive.stderr
    assert sh(fedora, "cmp /tmp/a.bz2 /tmp/a")[0] == 1


def test_service_state_survives_reboots_unless_the_fault_says_otherwise() -> None:
    fedora = FakeFedora("Base")
    assert sh(fedora, "systemctl stop chronyd")[0] == 1  # needs root
    assert sh(fedora, "sudo systemctl stop chronyd && sudo systemctl disable chronyd")[0] == 0
    fedora.boot()
    assert sh(fedora, "systemctl is-active chronyd") == (3, "inactive\n", "")
    assert sh(fedora, "systemctl is-enabled chronyd") == (1, "disabled\n", "")
    forgetful = FakeFedora("Base", services_reset=True)
    sh(forgetful, "sudo systemctl disable chronyd")
    forgetful.boot()
    assert sh(forgetful, "systemctl is-enabled chronyd")[1] == "enabled\n"


def test_reboot_needs_root_and_changes_the_boot_id() -> None:
    fedora = FakeFedora("Base")
    assert not fedora.execute("reboot").reboot
    assert fedora.execute("sudo reboot").reboot
    before = sh(fedora, "cat /proc/sys/kernel/random/boot_id")[1]
    fedora.boot()
    assert sh(fedora, "cat /proc/sys/kernel/random/boot_id")[1] != before
    assert sh(fedora, "last reboot | head -1")[1].startswith("reboot   system boot")


def test_audit_records_useradd_and_userdel() -> None:
    fedora = FakeFedora("Base")
    assert sh(fedora, "sudo useradd tester && sudo userdel -r tester")[0] == 0
    log = fedora.nodes["/var/log/audit/audit.log"].data.decode()
    assert "type=ADD_USER" in log and 'acct="tester"' in log and "type=DEL_USER" in log
    assert sh(fedora, "sudo userdel tester")[0] == 6


def test_constructor_and_fault_validation() -> None:
    key = paramiko.ECDSAKey.generate()
    with pytest.raises(ValueError):
        SshTestHost("Base")  # no key authorised and no explicit accept_any_key
    with pytest.raises(ValueError):
        SshTestHost("Base", authorized=[key], accept_any_key=True)
    with pytest.raises(ValueError):
        SshTestHost("Workstation", authorized=[key])
    with pytest.raises(ValueError):
        SshTestHost("Base", authorized=[key], never_accept="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        fault_options(["selinux", "gremlins"])
    assert fault_options(["selinux", "tmp-mode"]) == {"selinux_permissive": True, "tmp_mode": 0o755}


def test_authorized_keys_file(tmp_path: Path) -> None:
    key = paramiko.ECDSAKey.generate()
    path = tmp_path / "authorized_keys"
    path.write_text(
        "# a comment\n\n"
        f'no-pty,from="127.0.0.1" {key.get_name()} {key.get_base64()} someone@example\n'
    )
    [loaded] = load_authorized_keys(path)
    assert loaded.asbytes() == key.asbytes()
    path.write_text("# nothing\n")
    with pytest.raises(ValueError):
        load_authorized_keys(path)
    path.write_text("not a key at all\n")
    with pytest.raises(ValueError):
        load_authorized_keys(path)


# =============================================================================
# Over real SSH
# =============================================================================
@pytest.fixture(scope="module")
def key() -> paramiko.PKey:
    return paramiko.ECDSAKey.generate()


def suite_over_ssh(
    host: SshTestHost, key: paramiko.PKey, checks: Any = SUITE, **kwargs: Any
) -> SuiteReport:
    session = ParamikoSession(
        "127.0.0.1",
        host.port,
        "fedora",
        key,
        expected_fingerprints=frozenset({host.fingerprint}),
        connect_timeout=1.0,
    )
    options: dict[str, Any] = {
        "reboot_timeout": 10.0,
        "reconnect_timeout": 1.0,
        "retry_backoff": 0.05,
        "reboot_poll": 0.05,
        "log_context": f"test {host.family}",
        "traits": frozenset({NITRO}),  # the stand-in's default metadata: a t3.small
    }
    options.update(kwargs)
    with session:
        session.connect(10)
        return run_suite(session, list(checks), **options)


def outcomes(report: SuiteReport, outcome: str) -> set[str]:
    return {o.test_id for o in report.outcomes if o.outcome == outcome}


@pytest.mark.integration
@pytest.mark.parametrize("family", ["Base", "Atomic"])
def test_a_healthy_host_passes_every_test(key: paramiko.PKey, family: str) -> None:
    with SshTestHost(family, authorized=[key], reboot_delay=0.2) as host:
        report = suite_over_ssh(host, key)
        assert report.family == Family(family)  # probed on the instance
        assert report.passed, report.summary()
        assert outcomes(report, FAILED) == set()
        skipped = outcomes(report, SKIPPED)
        assert skipped == {c.id for c in SUITE if Family(family) not in c.families}
        assert GATING_BOTH <= outcomes(report, PASSED)
        assert host.boots == 3  # booted, and rebooted twice
        assert "sudo reboot" in host.commands
        for o in report.outcomes:
            if o.outcome == PASSED:
                assert o.output.startswith("$ ")


# fault -> the one EC2 check it fails
EC2_FAULTS = {
    "imds-v1": "imds_v2",
    "xen-root": "root_nvme",
    "cloud-init": "cloud_init",
    "hostname": "hostname_metadata",
    "baked-key": "ssh_key_metadata",
}

FAULT_CASES = [
    ("selinux", "Base", {"selinux"}, set()),
    ("failed-unit", "Atomic", {"services"}, set()),
    ("dnf", "Base", {"packageinstall"}, set()),
    (
        "tmp-mode",
        "Base",
        {"cloud_tmp", "tmp_mount"},
        {"bzip2", "cpio", "cmp", "selinux_restorecon", "ssh_keygen"},
    ),
    ("services-reset", "Base", {"service_manipulation"}, set()),
    ("journal", "Atomic", {"logging", "docker_storage_setup"}, set()),
    (
        "docker",
        "Atomic",
        {"services", "first_boot_run", "atomic_command", "docker_image", "root_mount"}
        | {"docker_daemon"},
        set(),
    ),
]


@pytest.mark.integration
@pytest.mark.parametrize(("fault", "family", "gating", "others"), FAULT_CASES)
def test_each_misbehaviour_fails_the_right_tests(
    key: paramiko.PKey, fault: str, family: str, gating: set[str], others: set[str]
) -> None:
    assert fault in FAULTS
    with SshTestHost(family, authorized=[key], reboot_delay=0.1, **fault_options([fault])) as host:
        report = suite_over_ssh(host, key)
    assert not report.passed
    assert {o.test_id for o in report.gating_failures()} == gating
    assert outcomes(report, FAILED) == gating | others
    for o in report.outcomes:
        if o.outcome == FAILED:
            assert o.note and "\n" not in o.note and "$ " in o.output


EC2_CHECKS = [c for c in SUITE if c.id in EC2_FAULTS.values()]


@pytest.mark.integration
@pytest.mark.parametrize("fault", [None, *EC2_FAULTS])
def test_each_ec2_fault_fails_its_own_check(key: paramiko.PKey, fault: str | None) -> None:
    """The EC2 checks only (no reboots: fast); each fault fails exactly its check."""
    faults = fault_options([fault] if fault else [])
    with SshTestHost("Base", authorized=[key], reboot_delay=0.1, **faults) as host:
        report = suite_over_ssh(host, key, EC2_CHECKS)
    failed = outcomes(report, FAILED)
    assert failed == ({EC2_FAULTS[fault]} if fault else set()), report.summary()
    assert outcomes(report, PASSED) == {c.id for c in EC2_CHECKS} - failed


@pytest.mark.integration
def test_a_xen_instance_skips_the_nvme_check_and_gets_its_key_from_metadata(
    key: paramiko.PKey,
) -> None:
    line = f"{key.get_name()} {key.get_base64()} autocloud-job"
    metadata = InstanceMetadata(instance_type="t2.small", nvme=False, public_keys=(line,))
    with SshTestHost("Base", authorized=[key], metadata=metadata) as host:
        report = suite_over_ssh(host, key, EC2_CHECKS, traits=frozenset())
        nitro = suite_over_ssh(host, key, EC2_CHECKS)  # told it is Nitro: the root says not
    assert outcomes(report, SKIPPED) == {"root_nvme"}
    assert outcomes(report, FAILED) == set()
    assert outcomes(nitro, FAILED) == {"root_nvme"}
    assert "/dev/xvda4" in next(o.note for o in nitro.outcomes if o.test_id == "root_nvme")


@pytest.mark.integration
def test_net_name_is_skipped_without_net_ifnames_0(key: paramiko.PKey) -> None:
    with SshTestHost("Base", authorized=[key], reboot_delay=0.1, net_ifnames=False) as host:
        report = suite_over_ssh(host, key)
    assert report.passed
    assert "net_name" in outcomes(report, SKIPPED)


@pytest.mark.integration
def test_a_host_that_dies_mid_suite_fails_the_rest(key: paramiko.PKey) -> None:
    with SshTestHost("Base", authorized=[key], die_after=5) as host:
        report = suite_over_ssh(host, key, family=Family.BASE)
        assert len(host.commands) == 5
    ran = [o for o in report.outcomes if o.outcome != SKIPPED]
    failed = [o for o in ran if o.outcome == FAILED]
    assert ran[0].outcome == PASSED
    first_lost = failed[0]
    assert "connection to the instance lost" in first_lost.note
    later = ran[ran.index(first_lost) + 1 :]
    assert later and all(o.outcome == FAILED and "not run" in o.note for o in later)
    assert not report.passed


@pytest.mark.integration
def test_a_hanging_command_times_out_and_the_suite_goes_on(key: paramiko.PKey) -> None:
    checks = [
        dataclasses.replace(c, timeout=0.5) if c.id == "selinux" else c
        for c in SUITE
        if Family.BASE in c.families
    ]
    with SshTestHost("Base", authorized=[key], reboot_delay=0.1, hang_on=r"^getenforce$") as host:
        report = suite_over_ssh(host, key, checks, family=Family.BASE)
    selinux = next(o for o in report.outcomes if o.test_id == "selinux")
    assert selinux.outcome == FAILED and "timed out" in selinux.note
    assert outcomes(report, FAILED) == {"selinux"}
    assert {o.test_id for o in report.gating_failures()} == {"selinux"}


def pinned_session(host: SshTestHost, key: paramiko.PKey) -> ParamikoSession:
    pinned = frozenset({host.fingerprint})
    return ParamikoSession("127.0.0.1", host.port, "fedora", key, expected_fingerprints=pinned)


@contextmanager
def rebooting(
    key: paramiko.PKey, reboot_delay: float
) -> Iterator[tuple[SshTestHost, ParamikoSession]]:
    """A host, and a session that logged in and ran ``sudo reboot`` (so is disconnected)."""
    with (
        SshTestHost("Base", authorized=[key], reboot_delay=reboot_delay) as host,
        pinned_session(host, key) as session,
    ):
        session.connect(5)
        session.run("sudo reboot", 5)
        yield host, session
        # The test logged in again: a new boot, which kept the enabled services.
        assert host.boots == 2
        assert session.run("systemctl is-active chronyd", 5).stdout == "active\n"


@pytest.mark.integration
def test_reboot_keeps_ssh_down_for_the_reboot_delay(key: paramiko.PKey) -> None:
    before = time.monotonic()
    with rebooting(key, reboot_delay=0.6) as (host, session):
        session.reconnect(10)
        assert time.monotonic() - before >= 0.6  # no login before the delay was over
        assert host.up


@pytest.mark.integration
def test_a_reboot_lasts_until_the_host_comes_up(key: paramiko.PKey) -> None:
    with rebooting(key, reboot_delay=math.inf) as (host, session):
        assert not host.up
        with pytest.raises(SshTimeout):
            session.reconnect(0.5)
        assert not host.up and host.refused >= 1
        host.come_up()
        assert host.up
        session.reconnect(10)


@pytest.mark.integration
def test_the_key_is_refused_until_it_is_installed(key: paramiko.PKey) -> None:
    with (
        SshTestHost("Base", authorized=[key], key_delay=math.inf) as host,
        pinned_session(host, key) as session,
    ):
        with pytest.raises(SshTimeout):
            session.connect(0.5)
        assert host.up and host.refused == 0 and host.key_refusals >= 1 and host.logins == 0
        host.install_keys()
        session.connect(10)
        assert session.run("whoami", 5).stdout == "fedora\n"
        wait_until(lambda: host.logins == 1, 30, "the server to count the login")


@pytest.mark.integration
def test_the_host_stops_cleanly_without_leftover_threads(key: paramiko.PKey) -> None:
    before = set(threading.enumerate())
    with SshTestHost("Atomic", authorized=[key], hang_on="^sleep") as host:
        session = ParamikoSession("127.0.0.1", host.port, "fedora", key)
        session.connect(5)
        assert session.run("sleep 1", 0.2).timed_out
        assert session.run("rpm -q docker", 5).ok
        session.close()
        assert host.commands == ["sleep 1", "rpm -q docker"]
    wait_until(lambda: set(threading.enumerate()) <= before, 10, "threads to finish")
    assert set(threading.enumerate()) <= before


@pytest.mark.integration
def test_accept_any_key_is_an_explicit_stand_in_option(key: paramiko.PKey) -> None:
    stranger = paramiko.ECDSAKey.generate()
    with SshTestHost("Base", accept_any_key=True) as host:
        with ParamikoSession("127.0.0.1", host.port, "fedora", stranger) as session:
            session.connect(5)
            assert session.run("whoami", 5).stdout == "fedora\n"


@pytest.mark.integration
def test_openssh_client_talks_to_the_stand_in(key: paramiko.PKey, tmp_path: Path) -> None:
    identity = tmp_path / "id"
    key.write_private_key_file(str(identity))
    identity.chmod(0o600)
    with SshTestHost("Base", authorized=[key]) as host:
        argv = [
            "ssh",
            "-n",
            "-F",
            "/dev/null",
            "-i",
            str(identity),
            "-p",
            str(host.port),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "fedora@127.0.0.1",
            "getenforce && ls /nope",
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.stdout == "Enforcing\n"
    assert done.returncode == 2 and "No such file" in done.stderr


def read_until_listening(proc: subprocess.Popen[str], timeout: float) -> list[str]:
    """stdout lines up to and including "listening on HOST:PORT", with a deadline."""
    stdout = proc.stdout
    assert stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stdout:
            lines.put(line.strip())
        lines.put(None)  # EOF: the process exited

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while not seen or not seen[-1].startswith("listening on "):
        left = deadline - time.monotonic()
        assert left > 0, f"no 'listening on' line within {timeout}s: {seen}"
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            continue
        assert line is not None, f"sshhost exited: {seen}"
        seen.append(line)
    return seen


@pytest.mark.integration
def test_runs_as_a_process(key: paramiko.PKey, tmp_path: Path) -> None:
    keys = tmp_path / "authorized_keys"
    keys.write_text(f"{key.get_name()} {key.get_base64()} test\n")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "devel.sshhost", "--port", "0", "--family", "Atomic"),
            *("--authorized-keys", str(keys), "--fail", "selinux", "--reboot-delay", "0.1"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        seen = read_until_listening(proc, timeout=30)
        fingerprint = next(x for x in seen if x.startswith("host key ")).split()[-1]
        port = int(seen[-1].rsplit(":", 1)[1])
        with ParamikoSession(
            "127.0.0.1", port, "fedora", key, expected_fingerprints=frozenset({fingerprint})
        ) as session:
            session.connect(10)
            assert session.run("test -e /run/ostree-booted", 5).ok
            assert session.run("getenforce", 5).stdout == "Permissive\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
