"""The Autocloud test suite as data: adding a test is adding a ``Check`` to ``SUITE``.

The list is the one Autocloud ran on every Fedora cloud image with tunir
(Fedora infra ``roles/autocloud/backend/files/fedora.txt`` and tunirtests):
gating checks decide whether an image is released, non-gating ones are
reported only. Every command runs over SSH as the image's default user;
strings are for the remote shell, nothing here is run locally.

Each check runs one command, or a sequence of steps that stops at the first
failing step. ``expect`` is one ``Expect`` (applied to every step) or a tuple:
for a single command all of them apply; for a sequence, one per step.
Expectations are judged here, on the runner side, by ``evaluate``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Literal, get_args

from fedimg.messages import TESTCASE_PREFIX

if TYPE_CHECKING:
    from autocloud_ami.ssh import CommandResult

CHECK_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,99}$")


class Family(StrEnum):
    BASE = "Base"
    ATOMIC = "Atomic"


_FAMILY_OF: dict[str, Family] = {
    "cloud_base": Family.BASE,
    "cloud": Family.BASE,
    "base": Family.BASE,
    "atomichost": Family.ATOMIC,
    "atomic": Family.ATOMIC,
}


def family_for(subvariant: str) -> Family:
    """The test family of a productmd image subvariant (Cloud_Base, AtomicHost, ...)."""
    family = _FAMILY_OF.get(subvariant.strip().lower())
    if family is None:
        raise ValueError(f"no test family for image subvariant {subvariant!r}")
    return family


ExpectKind = Literal[
    "exit0", "exit_nonzero", "equals", "contains", "regex", "not_contains", "no_stderr", "any"
]
_KINDS: frozenset[str] = frozenset(get_args(ExpectKind))
_NEEDS_VALUE: frozenset[str] = frozenset({"equals", "contains", "regex", "not_contains"})
_NOT_RUN_CODES = {126: "not executable", 127: "command not found"}


@dataclass(frozen=True)
class Expect:
    """One expectation on a command's result; text kinds look at stdout only."""

    kind: ExpectKind
    value: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown expectation kind {self.kind!r}")
        if self.kind in _NEEDS_VALUE and not self.value:
            raise ValueError(f"expectation {self.kind} needs a value")
        if self.kind not in _NEEDS_VALUE and self.value:
            raise ValueError(f"expectation {self.kind} takes no value")
        if self.kind == "regex":
            re.compile(self.value)


# Scenario traits: facts about the instance type a check may need (``Check.needs``).
# NITRO: the type runs on the Nitro system, its EBS volumes are NVMe devices
# (DescribeInstanceTypes: EbsInfo.NvmeSupport "required").
NITRO = "nitro"
TRAITS: frozenset[str] = frozenset({NITRO})

ALL_FAMILIES: frozenset[Family] = frozenset({Family.BASE, Family.ATOMIC})
BASE_ONLY: frozenset[Family] = frozenset({Family.BASE})
ATOMIC_ONLY: frozenset[Family] = frozenset({Family.ATOMIC})


@dataclass(frozen=True)
class Check:
    id: str  # the ResultsDB testcase is autocloud.ami.<id>
    command: str | tuple[str, ...]
    expect: Expect | tuple[Expect, ...]
    gating: bool = True
    families: frozenset[Family] = ALL_FAMILIES
    reboot_before: bool = False  # reboot, wait for a new boot, then run this check
    timeout: float = 600.0  # per command
    only_if: str | None = None  # remote condition; exit != 0 -> SKIPPED
    description: str = ""
    needs: str | None = None  # a scenario trait (NITRO); a scenario without it -> SKIPPED

    def __post_init__(self) -> None:
        if not CHECK_ID_RE.match(self.id):
            raise ValueError(f"check id {self.id!r} is not a valid testcase name part")
        commands = self.commands
        if not commands or any(not c.strip() for c in commands):
            raise ValueError(f"check {self.id}: empty command")
        if isinstance(self.command, tuple) and isinstance(self.expect, tuple):
            if len(self.expect) != len(self.command):
                raise ValueError(
                    f"check {self.id}: {len(self.command)} steps but {len(self.expect)} "
                    "expectations (give one per step, or a single Expect for all)"
                )
        if isinstance(self.expect, tuple) and not self.expect:
            raise ValueError(f"check {self.id}: no expectation")
        if not self.families:
            raise ValueError(f"check {self.id}: no family")
        if self.timeout <= 0:
            raise ValueError(f"check {self.id}: timeout must be positive")
        if self.only_if is not None and not self.only_if.strip():
            raise ValueError(f"check {self.id}: empty only_if")
        if self.needs is not None and self.needs not in TRAITS:
            raise ValueError(f"check {self.id}: unknown scenario trait {self.needs!r}")

    @property
    def testcase(self) -> str:
        return TESTCASE_PREFIX + self.id

    @property
    def commands(self) -> tuple[str, ...]:
        return self.command if isinstance(self.command, tuple) else (self.command,)

    def steps(self) -> list[tuple[str, tuple[Expect, ...]]]:
        """(command, expectations) pairs in the order they run."""
        if isinstance(self.command, str):
            expects = self.expect if isinstance(self.expect, tuple) else (self.expect,)
            return [(self.command, expects)]
        if isinstance(self.expect, Expect):
            return [(c, (self.expect,)) for c in self.command]
        return [(c, (e,)) for c, e in zip(self.command, self.expect, strict=True)]


def select(suite: Sequence[Check], family: Family) -> list[Check]:
    """The checks that apply to ``family``, in suite order."""
    return [c for c in suite if family in c.families]


# -- judging results ---------------------------------------------------------
def _first_line(text: str, limit: int = 120) -> str:
    for raw in text.splitlines():
        line = raw.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return ""


def _shown(text: str, limit: int = 80) -> str:
    text = text.strip()
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return repr(text)


def _judge_exit0(expect: Expect, result: CommandResult, hint: str) -> tuple[bool, str]:
    if result.exit_code == 0:
        return True, "exit 0"
    return False, f"exit {result.exit_code}, expected 0{hint}"


def _judge_exit_nonzero(expect: Expect, result: CommandResult, hint: str) -> tuple[bool, str]:
    code = result.exit_code
    if code in _NOT_RUN_CODES:
        return False, f"exit {code} ({_NOT_RUN_CODES[code]}), expected the command to fail"
    if code is None or code == 0:
        return False, f"exit {code}, expected a failure"
    return True, f"exit {code}, failed as expected"


def _judge_equals(expect: Expect, result: CommandResult, hint: str) -> tuple[bool, str]:
    if result.stdout.strip() == expect.value:
        return True, f"printed {expect.value!r}"
    return False, f"printed {_shown(result.stdout)}, expected {expect.value!r}{hint}"


def _judge_contains(expect: Expect, result: CommandResult, hint: str) -> tuple[bool, str]:
    if expect.value in result.stdout:
        return True, f"output contains {expect.value!r}"
    return False, f"output lacks {expect.value!r}: {_shown(result.stdout)}{hint}"


def _judge_regex(expect: Expect, result: CommandResult, hint: str) -> tuple[bool, str]:
    if re.search(expect.value, result.stdout, re.MULTILINE):
        return True, f"output matches /{expect.value}/"
    return False, f"output does not match /{expect.value}/: {_shown(result.stdout)}{hint}"


def _judge_not_contains(expect: Expect, result: CommandResult, hint: str) -> tuple[bool, str]:
    if expect.value not in result.stdout:
        return True, f"output free of {expect.value!r}"
    return False, f"output contains {expect.value!r}"


def _judge_no_stderr(expect: Expect, result: CommandResult, hint: str) -> tuple[bool, str]:
    if not result.stderr.strip():
        return True, "nothing on stderr"
    return False, f"wrote to stderr: {_shown(result.stderr)}"


def _judge_any(expect: Expect, result: CommandResult, hint: str) -> tuple[bool, str]:
    return True, f"exit {result.exit_code} (not judged)"


_JUDGES: dict[str, Callable[[Expect, CommandResult, str], tuple[bool, str]]] = {
    "exit0": _judge_exit0,
    "exit_nonzero": _judge_exit_nonzero,
    "equals": _judge_equals,
    "contains": _judge_contains,
    "regex": _judge_regex,
    "not_contains": _judge_not_contains,
    "no_stderr": _judge_no_stderr,
    "any": _judge_any,
}
if set(_JUDGES) != _KINDS:  # pragma: no cover - a kind added without a judge
    raise RuntimeError("every expectation kind needs a judge")


def evaluate(expect: Expect, result: CommandResult) -> tuple[bool, str]:
    """Whether ``result`` meets ``expect``, and a one-line reason either way.

    A command that timed out or lost its connection meets no expectation.
    """
    if result.error is not None:
        return False, f"connection error: {result.error}"
    if result.timed_out:
        return False, f"timed out after {result.duration:.0f}s"
    stderr_hint = _first_line(result.stderr)
    return _JUDGES[expect.kind](expect, result, f" ({stderr_hint})" if stderr_hint else "")


def evaluate_all(expects: Sequence[Expect], result: CommandResult) -> tuple[bool, str]:
    """All of ``expects`` on one result: the first failure's reason, or every reason."""
    reasons = []
    for expect in expects:
        ok, reason = evaluate(expect, result)
        if not ok:
            return False, reason
        reasons.append(reason)
    return True, "; ".join(reasons) or "no expectation"


# -- the suite ---------------------------------------------------------------
EXIT0 = Expect("exit0")
FAILS = Expect("exit_nonzero")

# EC2 checks: the instance metadata service with IMDSv2 (a PUT for a session token,
# then GETs carrying it; the launch requires tokens, see autocloud_ami.instance).
# Each check fetches its own token (a check never depends on another one's files);
# files go to the home directory, which a broken /tmp does not break.
IMDS = "http://169.254.169.254/latest"
IMDS_TOKEN = (
    "curl -sS -f -m 10 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300'"
    f" -o .ac-imds-token {IMDS}/api/token"
)
IMDS_HEADER = (
    "echo -n 'X-aws-ec2-metadata-token: ' > .ac-imds-header"
    " && cat .ac-imds-token >> .ac-imds-header"
)


def imds_get(path: str) -> str:
    """A GET of ``meta-data/<path>`` with the token header IMDS_HEADER wrote."""
    return f"curl -sS -f -m 10 -H @.ac-imds-header {IMDS}/meta-data/{path}"


SUITE: tuple[Check, ...] = (
    # Gating, every image.
    Check(
        "selinux",
        "getenforce",
        (EXIT0, Expect("equals", "Enforcing")),
        description="SELinux is enforcing",
    ),
    Check(
        "logging",
        "journalctl -a --no-pager -q -r --since=today -n1",
        (
            EXIT0,
            Expect("regex", r"\S+(?:[ \t]+\S+){3,}"),  # more than 3 words
            Expect("not_contains", "No entries"),
        ),
        description="the journal has today's entries",
    ),
    Check(
        "services",
        "systemctl --all --failed --no-pager",
        Expect("regex", r"^0 loaded units listed"),  # "10 loaded units" must not pass
        description="no systemd unit failed",
    ),
    Check(
        "packageinstall",
        ("sudo dnf install -y pss", "test -x /usr/bin/pss"),
        EXIT0,
        families=BASE_ONLY,
        timeout=900.0,
        description="dnf installs a package from the Fedora repositories",
    ),
    Check(
        "cloud_tmp",
        "echo autocloud > /tmp/autocloud-ami-probe && cat /tmp/autocloud-ami-probe"
        " && rm -f /tmp/autocloud-ami-probe",
        (EXIT0, Expect("equals", "autocloud")),
        description="the default user can write to /tmp",
    ),
    Check(
        "tmp_mount",
        "stat -L -c '%a' /tmp",
        (EXIT0, Expect("equals", "1777")),
        description="mode of /tmp is 1777 (world-writable, sticky)",
    ),
    Check(
        "net_name",
        "test -e /sys/class/net/eth0/operstate",
        EXIT0,
        only_if="grep -qw net.ifnames=0 /proc/cmdline",
        description="with net.ifnames=0 the first interface is eth0",
    ),
    # Gating, EC2 specific: what Fedora must get right on EC2 (see the EC2 checks below).
    Check(
        "imds_v2",
        (
            IMDS_TOKEN,
            IMDS_HEADER,
            imds_get("instance-id"),
            f"curl -sS -m 10 -o /dev/null -w '%{{http_code}}' {IMDS}/meta-data/instance-id",
        ),
        (EXIT0, EXIT0, Expect("regex", r"^i-[0-9a-f]{8,17}$"), Expect("equals", "401")),
        families=BASE_ONLY,  # Atomic Host's cloud-init 17.1 predates IMDSv2
        description="instance metadata answers with an IMDSv2 token and refuses a GET without one",
    ),
    Check(
        "root_nvme",
        "findmnt -n -v -o SOURCE /",
        (EXIT0, Expect("regex", r"^/dev/nvme\d+n\d+(?:p\d+)?$")),
        needs=NITRO,
        families=BASE_ONLY,  # Atomic Host's root is an LV (/dev/mapper/atomicos-root)
        description="on a Nitro instance type the root file system is on an NVMe device",
    ),
    Check(
        "cloud_init",
        "cloud-init status --wait --format json",
        (
            EXIT0,
            Expect("regex", r'"status":\s*"done"'),
            Expect("regex", r'"errors":\s*\[\s*\]'),
        ),
        families=BASE_ONLY,  # `cloud-init status` came with cloud-init 18.2
        description="cloud-init finished without errors",
    ),
    Check(
        "hostname_metadata",
        (
            IMDS_TOKEN,
            IMDS_HEADER,
            imds_get("local-hostname") + " | cut -d . -f 1 > .ac-md-hostname",
            "hostname -s > .ac-os-hostname && cmp .ac-md-hostname .ac-os-hostname",
        ),
        EXIT0,
        description="the hostname is the metadata's local-hostname",
    ),
    Check(
        "ssh_key_metadata",
        (
            IMDS_TOKEN,
            IMDS_HEADER,
            imds_get("public-keys/0/openssh-key") + " > .ac-md-key",
            "cut -d ' ' -f 1,2 .ac-md-key > .ac-md-keys"
            " && cut -d ' ' -f 1,2 .ssh/authorized_keys > .ac-os-keys"
            " && cmp .ac-md-keys .ac-os-keys",
        ),
        EXIT0,
        description="the only authorized SSH key is the instance's key pair, from metadata",
    ),
    Check(
        "service_stop_disable",
        ("sudo systemctl stop chronyd", "sudo systemctl disable chronyd"),
        EXIT0,
        description="a service can be stopped and disabled",
    ),
    Check(
        "service_manipulation",
        (
            "systemctl is-active chronyd",
            "systemctl is-enabled chronyd",
            "sudo systemctl start chronyd",
            "sudo systemctl stop chronyd",
            "sudo systemctl enable chronyd",
        ),
        (Expect("equals", "inactive"), Expect("equals", "disabled"), EXIT0, EXIT0, EXIT0),
        reboot_before=True,
        description="after a reboot the disabled service stayed down; start, stop, enable it",
    ),
    Check(
        "service_after",
        "systemctl status chronyd --no-pager",
        (EXIT0, Expect("contains", "active (running)")),
        reboot_before=True,
        description="after another reboot the enabled service runs",
    ),
    # Gating, Atomic Host only.
    Check(
        "docker_installed",
        "rpm -q docker",
        EXIT0,
        families=ATOMIC_ONLY,
        description="docker is installed",
    ),
    Check(
        "docker_storage_setup",
        (
            "sudo journalctl -o cat --no-pager --unit docker-storage-setup.service",
            "lsblk",
        ),
        (
            Expect("regex", r"(?:Started|Finished) Docker Storage Setup\."),
            Expect("regex", r"atomicos-root\s.*\s/sysroot\s*$"),
        ),
        families=ATOMIC_ONLY,
        description="docker storage setup ran; the root LV is mounted on /sysroot",
    ),
    Check(
        "first_boot_run",
        "sudo docker run --rm busybox true && echo PASS",
        (EXIT0, Expect("contains", "PASS")),
        families=ATOMIC_ONLY,
        description="a container runs",
    ),
    Check(
        "atomic_command",
        "sudo atomic run docker.io/library/busybox true",
        EXIT0,
        families=ATOMIC_ONLY,
        description="the atomic command runs an image",
    ),
    Check(
        "docker_image",
        ("sudo docker pull fedora:latest", "sudo docker run --rm fedora:latest /bin/echo PASS"),
        (Expect("no_stderr"), Expect("contains", "PASS")),
        families=ATOMIC_ONLY,
        description="the fedora image pulls cleanly and runs",
    ),
    Check(
        "root_mount",
        "sudo docker run --rm -v /:/host busybox true",
        EXIT0,
        families=ATOMIC_ONLY,
        description="the host root can be mounted into a container",
    ),
    Check(
        "read_only_mounts",
        (
            "sudo touch /bin/autocloud-ami-probe",
            "sudo touch /sbin/autocloud-ami-probe",
            "sudo touch /usr/autocloud-ami-probe",
        ),
        FAILS,
        families=ATOMIC_ONLY,
        description="/bin, /sbin and /usr are read-only",
    ),
    Check(
        "docker_daemon",
        "sudo docker run --rm --privileged -v /:/host busybox chroot /host docker version",
        (EXIT0, Expect("regex", r"^Server:")),
        families=ATOMIC_ONLY,
        description="a privileged container reaches the host's docker daemon",
    ),
    # Non-gating: reported, never block a release.
    Check(
        "bash_version",
        "bash --version",
        Expect("contains", "-redhat-linux-gnu"),
        gating=False,
        description="bash is Fedora's build",
    ),
    Check(
        "bzip2",
        "rm -rf /tmp/autocloud-ami-bz && mkdir /tmp/autocloud-ami-bz && cd /tmp/autocloud-ami-bz"
        " && echo 'autocloud bzip2 round trip' > plain && bzip2 -k plain && bzcat plain.bz2"
        " && bunzip2 -c plain.bz2 > back && cmp plain back",
        (EXIT0, Expect("contains", "autocloud bzip2 round trip")),
        gating=False,
        description="bzip2, bzcat and bunzip2 round trip",
    ),
    Check(
        "cpio",
        "rm -rf /tmp/autocloud-ami-cpio && mkdir -p /tmp/autocloud-ami-cpio/in"
        " /tmp/autocloud-ami-cpio/out /tmp/autocloud-ami-cpio/pass"
        " && cd /tmp/autocloud-ami-cpio/in && echo 'autocloud cpio' > file"
        " && echo file | cpio -o > ../archive.cpio && cd ../out && cpio -i < ../archive.cpio"
        " && cmp ../in/file file && cd ../in && echo file | cpio -p ../pass"
        " && cmp file ../pass/file",
        EXIT0,
        gating=False,
        description="cpio copy-out, copy-in and pass-through",
    ),
    Check(
        "cmp",
        (
            "cd /tmp && printf 'autocloud\\n' > ac-cmp-a && printf 'autocloud\\n' > ac-cmp-b"
            " && printf 'autocloud!\\n' > ac-cmp-c && cmp -s ac-cmp-a ac-cmp-b"
            " && cmp -n 9 ac-cmp-a ac-cmp-c",
            "cmp -b /tmp/ac-cmp-a /tmp/ac-cmp-c",
        ),
        (EXIT0, Expect("regex", r"differ: byte 10, line 1 is +12 \^J +41 !")),
        gating=False,
        description="cmp -s, -n and -b",
    ),
    Check(
        "audit",
        (
            "rpm -q audit",
            "systemctl is-active auditd",
            "sudo useradd autocloud-ami-audit && sudo userdel -r autocloud-ami-audit"
            " && sudo grep -q 'type=ADD_USER.*acct=\"autocloud-ami-audit\"'"
            " /var/log/audit/audit.log"
            " && sudo grep -q 'type=DEL_USER.*acct=\"autocloud-ami-audit\"'"
            " /var/log/audit/audit.log",
        ),
        (EXIT0, Expect("equals", "active"), EXIT0),
        gating=False,
        description="auditd runs and records useradd/userdel",
    ),
    Check(
        "selinux_restorecon",
        "ls -lZ /etc/machine-id > /tmp/ac-z-before && sudo restorecon -v /etc/machine-id"
        " && ls -lZ /etc/machine-id > /tmp/ac-z-after && cmp /tmp/ac-z-before /tmp/ac-z-after",
        EXIT0,
        gating=False,
        description="restorecon leaves /etc/machine-id's label alone",
    ),
    Check(
        "ssh_keygen",
        "rm -f /tmp/ac-key /tmp/ac-key.pub && ssh-keygen -q -t rsa -N '' -f /tmp/ac-key"
        " && cat /tmp/ac-key.pub",
        (EXIT0, Expect("contains", "ssh-rsa")),
        gating=False,
        description="ssh-keygen makes an RSA key",
    ),
    Check(
        "umount_root",
        "sudo umount /",
        FAILS,
        gating=False,
        description="/ cannot be unmounted",
    ),
    Check(
        "last_reboot",
        "last reboot | head -1",
        Expect("contains", "system"),
        gating=False,
        description="the reboots are in wtmp",
    ),
)


def _validate(suite: Sequence[Check]) -> None:
    seen: set[str] = set()
    for check in suite:
        if check.id in seen:
            raise ValueError(f"duplicate check id {check.id}")
        seen.add(check.id)


_validate(SUITE)
