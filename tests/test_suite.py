"""The suite as data: completeness against Autocloud's list, validation, selection, judging."""

from __future__ import annotations

import re

import pytest

from autocloud_ami.ssh import CommandResult
from autocloud_ami.suite import (
    SUITE,
    TESTCASE_PREFIX,
    Check,
    Expect,
    Family,
    evaluate,
    evaluate_all,
    family_for,
    select,
)
from fedimg.messages import TESTCASE_RE

BOTH = frozenset({Family.BASE, Family.ATOMIC})
BASE = frozenset({Family.BASE})
ATOMIC = frozenset({Family.ATOMIC})

# Every row of test-suite.md: id -> (gating, families)
EXPECTED = {
    "selinux": (True, BOTH),
    "logging": (True, BOTH),
    "services": (True, BOTH),
    "packageinstall": (True, BASE),
    "cloud_tmp": (True, BOTH),
    "tmp_mount": (True, BOTH),
    "net_name": (True, BOTH),
    # EC2 checks (issue 11): IMDSv2, the NVMe root on Nitro, cloud-init, metadata use
    "imds_v2": (True, BASE),
    "root_nvme": (True, BASE),
    "cloud_init": (True, BASE),
    "hostname_metadata": (True, BOTH),
    "ssh_key_metadata": (True, BOTH),
    "service_stop_disable": (True, BOTH),
    "service_manipulation": (True, BOTH),
    "service_after": (True, BOTH),
    "docker_installed": (True, ATOMIC),
    "docker_storage_setup": (True, ATOMIC),
    "first_boot_run": (True, ATOMIC),
    "atomic_command": (True, ATOMIC),
    "docker_image": (True, ATOMIC),
    "root_mount": (True, ATOMIC),
    "read_only_mounts": (True, ATOMIC),
    "docker_daemon": (True, ATOMIC),
    "bash_version": (False, BOTH),
    "bzip2": (False, BOTH),
    "cpio": (False, BOTH),
    "cmp": (False, BOTH),
    "audit": (False, BOTH),
    "selinux_restorecon": (False, BOTH),
    "ssh_keygen": (False, BOTH),
    "umount_root": (False, BOTH),
    "last_reboot": (False, BOTH),
}


def by_id(check_id: str) -> Check:
    return next(c for c in SUITE if c.id == check_id)


def result(
    stdout: str = "",
    exit_code: int | None = 0,
    stderr: str = "",
    *,
    timed_out: bool = False,
    error: str | None = None,
) -> CommandResult:
    return CommandResult("cmd", exit_code, stdout, stderr, 0.5, timed_out, error)


# -- the suite is complete and well-formed -------------------------------------
def test_every_test_of_the_autocloud_suite_is_present_with_its_gating_and_family() -> None:
    assert {c.id: (c.gating, c.families) for c in SUITE} == EXPECTED


def test_ids_are_unique_and_valid_resultsdb_testcases() -> None:
    ids = [c.id for c in SUITE]
    assert len(ids) == len(set(ids))
    for check in SUITE:
        assert check.testcase == TESTCASE_PREFIX + check.id
        assert TESTCASE_RE.match(check.testcase), check.testcase
        assert re.fullmatch(r"[a-z0-9_.-]+", check.id)


def test_every_check_has_a_description_and_a_positive_timeout() -> None:
    for check in SUITE:
        assert check.description, check.id
        assert check.timeout > 0


def test_reboots_come_after_the_service_is_disabled_and_before_the_checks_that_need_them() -> None:
    order = [c.id for c in SUITE]
    rebooting = [c.id for c in SUITE if c.reboot_before]
    assert rebooting == ["service_manipulation", "service_after"]
    assert order.index("service_stop_disable") < order.index("service_manipulation")
    assert order.index("service_manipulation") < order.index("service_after")


def test_only_the_nvme_root_check_needs_a_nitro_type() -> None:
    assert [(c.id, c.needs) for c in SUITE if c.needs] == [("root_nvme", "nitro")]


@pytest.mark.parametrize(
    ("source", "passes"),
    [
        ("/dev/nvme0n1p4\n", True),
        ("/dev/nvme1n1\n", True),
        ("/dev/xvda4\n", False),
        ("/dev/sda1\n", False),
        ("/dev/nvme0n1p4[/root]\n", False),  # without -v: not a device name
        ("", False),
    ],
)
def test_root_nvme_wants_an_nvme_device(source: str, passes: bool) -> None:
    check = by_id("root_nvme")
    assert evaluate_all(check.steps()[0][1], result(source))[0] is passes


@pytest.mark.parametrize(
    ("stdout", "exit_code", "passes"),
    [
        ('{\n  "errors": [],\n  "status": "done"\n}\n', 0, True),
        ('{\n  "errors": [\n    "boom"\n  ],\n  "status": "error"\n}\n', 1, False),
        ('{\n  "errors": [\n    "boom"\n  ],\n  "status": "done"\n}\n', 0, False),
        ('{\n  "errors": [],\n  "status": "running"\n}\n', 0, False),
    ],
)
def test_cloud_init_must_be_done_without_errors(stdout: str, exit_code: int, passes: bool) -> None:
    check = by_id("cloud_init")
    assert evaluate_all(check.steps()[0][1], result(stdout, exit_code))[0] is passes


@pytest.mark.parametrize(
    ("stdout", "passes"), [("401", True), ("200", False), ("", False), ("4010", False)]
)
def test_imds_v2_wants_a_get_without_token_refused(stdout: str, passes: bool) -> None:
    _, expects = by_id("imds_v2").steps()[-1]
    assert evaluate_all(expects, result(stdout))[0] is passes


def test_net_name_runs_only_with_net_ifnames_0() -> None:
    check = by_id("net_name")
    assert check.only_if is not None and "net.ifnames=0" in check.only_if
    assert [c.id for c in SUITE if c.only_if] == ["net_name"]


def test_no_command_is_meant_for_a_local_shell() -> None:
    # Commands are remote shell strings; none reaches for local paths or tools.
    for check in SUITE:
        for command in check.commands:
            assert command.strip() == command and command
            assert "\n" not in command


# -- judging the real outputs of the suite's commands ------------------------
def test_services_does_not_pass_ten_failed_units() -> None:
    expect = by_id("services").expect
    assert isinstance(expect, Expect)
    ok, _ = evaluate(
        expect, result("  UNIT LOAD ACTIVE SUB DESCRIPTION\n\n0 loaded units listed.\n")
    )
    assert ok
    bad = "● a.service loaded failed failed A\n\n10 loaded units listed.\n"
    assert not evaluate(expect, result(bad))[0]
    assert not evaluate(expect, result("1 loaded units listed.\n"))[0]


@pytest.mark.parametrize(
    ("stdout", "passes"),
    [
        (
            "Mar 05 10:12:01 ip-10-0-0-5 sshd[812]: Accepted publickey for fedora from 10.0.0.1\n",
            True,
        ),
        ("", False),
        ("-- No entries --\n", False),
        ("only three words\n", False),
    ],
)
def test_logging_needs_a_real_journal_line(stdout: str, passes: bool) -> None:
    check = by_id("logging")
    assert isinstance(check.expect, tuple)
    assert evaluate_all(check.expect, result(stdout))[0] is passes


def test_docker_storage_setup_matches_the_atomic_root_lv_on_sysroot() -> None:
    lsblk_step = by_id("docker_storage_setup").steps()[1]
    atomic = "xvda2 202:2 0 5.7G 0 part \n  └─atomicos-root 253:0 0 3G 0 lvm  /sysroot\n"
    base = "└─xvda4 202:4 0 3.9G 0 part /home\n                          /\n"
    assert evaluate_all(lsblk_step[1], result(atomic))[0]
    assert not evaluate_all(lsblk_step[1], result(base))[0]
    assert not evaluate_all(lsblk_step[1], result("  └─atomicos-root 253:0 0 3G 0 lvm /var\n"))[0]


def test_cmp_b_matches_gnu_cmp_output() -> None:
    step = by_id("cmp").steps()[1]
    gnu = "/tmp/ac-cmp-a /tmp/ac-cmp-c differ: byte 10, line 1 is  12 ^J  41 !\n"
    assert evaluate_all(step[1], result(gnu, exit_code=1))[0]
    assert not evaluate_all(step[1], result("", exit_code=0))[0]


def test_service_manipulation_expects_the_state_left_by_the_reboot() -> None:
    steps = by_id("service_manipulation").steps()
    is_active, is_enabled = steps[0], steps[1]
    # systemctl exits 3 / 1 for inactive / disabled: only the word is judged.
    assert evaluate_all(is_active[1], result("inactive\n", exit_code=3))[0]
    assert not evaluate_all(is_active[1], result("active\n", exit_code=0))[0]
    assert evaluate_all(is_enabled[1], result("disabled\n", exit_code=1))[0]
    assert not evaluate_all(is_enabled[1], result("enabled\n", exit_code=0))[0]


def test_read_only_mounts_do_not_pass_when_touch_is_missing() -> None:
    check = by_id("read_only_mounts")
    for _, expects in check.steps():
        assert evaluate_all(expects, result("", 1, "touch: Read-only file system"))[0]
        assert not evaluate_all(expects, result("", 0))[0]
        assert not evaluate_all(expects, result("", 127, "sudo: touch: command not found"))[0]


# -- validation -----------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"id": "Bad-Upper"},
        {"id": "has space"},
        {"id": ""},
        {"id": "-leading"},
        {"command": ""},
        {"command": ("a", " ")},
        {"command": ("a", "b"), "expect": (Expect("exit0"),)},
        {"expect": ()},
        {"families": frozenset()},
        {"timeout": 0},
        {"only_if": "  "},
    ],
)
def test_check_rejects_bad_definitions(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"id": "ok", "command": "true", "expect": Expect("exit0")}
    base.update(kwargs)
    with pytest.raises(ValueError):
        Check(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("nope", ""),
        ("equals", ""),
        ("contains", ""),
        ("regex", ""),
        ("not_contains", ""),
        ("exit0", "0"),
        ("any", "x"),
        ("regex", "(unclosed"),
    ],
)
def test_expect_rejects_bad_definitions(kind: str, value: str) -> None:
    with pytest.raises((ValueError, re.error)):
        Expect(kind, value)  # type: ignore[arg-type]


def test_steps_pair_commands_with_expectations() -> None:
    single = Check("a", "cmd", (Expect("exit0"), Expect("contains", "x")))
    assert single.steps() == [("cmd", (Expect("exit0"), Expect("contains", "x")))]
    shared = Check("b", ("one", "two"), Expect("exit0"))
    assert shared.steps() == [("one", (Expect("exit0"),)), ("two", (Expect("exit0"),))]
    paired = Check("c", ("one", "two"), (Expect("any"), Expect("equals", "y")))
    assert paired.steps() == [("one", (Expect("any"),)), ("two", (Expect("equals", "y"),))]


# -- families --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("subvariant", "family"),
    [
        ("Cloud_Base", Family.BASE),
        ("Cloud", Family.BASE),
        ("Base", Family.BASE),
        ("cloud_base", Family.BASE),
        ("AtomicHost", Family.ATOMIC),
        ("Atomic", Family.ATOMIC),
    ],
)
def test_family_for_known_subvariants(subvariant: str, family: Family) -> None:
    assert family_for(subvariant) is family


@pytest.mark.parametrize("subvariant", ["", "Workstation", "Server", "Cloud Base", "CoreOS", "KDE"])
def test_family_for_unknown_subvariants_raises(subvariant: str) -> None:
    with pytest.raises(ValueError):
        family_for(subvariant)


def test_select_keeps_order_and_drops_the_other_family() -> None:
    base = select(SUITE, Family.BASE)
    atomic = select(SUITE, Family.ATOMIC)
    assert [c.id for c in base] == [c.id for c in SUITE if Family.BASE in c.families]
    assert "packageinstall" in {c.id for c in base}
    assert "docker_daemon" not in {c.id for c in base}
    assert "packageinstall" not in {c.id for c in atomic}
    assert {"docker_installed", "read_only_mounts"} <= {c.id for c in atomic}
    assert len(base) + len(atomic) == len(SUITE) + sum(1 for c in SUITE if c.families == BOTH)
    assert select([], Family.BASE) == []


# -- evaluate(), every kind, good and bad --------------------------------------------
@pytest.mark.parametrize(
    ("expect", "good", "bad"),
    [
        (Expect("exit0"), result(exit_code=0), result(exit_code=1, stderr="boom\nmore")),
        (Expect("exit_nonzero"), result(exit_code=32), result(exit_code=0)),
        (Expect("exit_nonzero"), result(exit_code=1), result(exit_code=127)),
        (Expect("exit_nonzero"), result(exit_code=2), result(exit_code=126)),
        (Expect("equals", "Enforcing"), result("Enforcing\n"), result("Permissive\n")),
        (Expect("equals", "Enforcing"), result("  Enforcing  "), result("Enforcing extra")),
        (Expect("contains", "PASS"), result("a\nPASS\n"), result("pass\n")),
        (Expect("regex", r"^Server:"), result("Client:\nServer:\n"), result("Client: Server:")),
        (Expect("not_contains", "No entries"), result("x y z w"), result("-- No entries --")),
        (Expect("no_stderr"), result("out", stderr=" \n"), result("out", stderr="warning")),
    ],
)
def test_evaluate_each_kind(expect: Expect, good: CommandResult, bad: CommandResult) -> None:
    ok, why = evaluate(expect, good)
    assert ok, why
    assert why and "\n" not in why
    ok, why = evaluate(expect, bad)
    assert not ok
    assert why and "\n" not in why


def test_evaluate_any_accepts_every_exit_code() -> None:
    for code in (0, 1, 127):
        assert evaluate(Expect("any"), result(exit_code=code))[0]


@pytest.mark.parametrize("kind", ["exit0", "exit_nonzero", "no_stderr", "any"])
def test_timeouts_and_connection_errors_meet_no_expectation(kind: str) -> None:
    expect = Expect(kind)  # type: ignore[arg-type]
    timed_out = result(exit_code=None, timed_out=True)
    lost = result(exit_code=None, error="connection lost")
    ok, why = evaluate(expect, timed_out)
    assert not ok and "timed out" in why
    ok, why = evaluate(expect, lost)
    assert not ok and "connection lost" in why


def test_evaluate_shortens_long_outputs_to_one_line() -> None:
    ok, why = evaluate(Expect("equals", "x"), result("y" * 5000 + "\n" * 50))
    assert not ok
    assert len(why) < 200 and "\n" not in why


def test_evaluate_all_reports_the_first_failure() -> None:
    expects = (Expect("exit0"), Expect("equals", "Enforcing"))
    ok, why = evaluate_all(expects, result("Permissive", exit_code=0))
    assert not ok and "Permissive" in why
    ok, why = evaluate_all(expects, result("Enforcing", exit_code=1))
    assert not ok and "exit 1" in why
    assert evaluate_all(expects, result("Enforcing"))[0]
