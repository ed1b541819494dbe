"""A STAND-IN for a booted Fedora cloud instance, reachable over real SSH.

This is not Fedora and runs nothing: it is a paramiko SSH *server* (host key
generated at start, public-key auth, exec requests) in front of a small
emulation of what Fedora Cloud Base or Fedora Atomic Host answer to the
Autocloud suite's commands (``autocloud_ami.suite``): a tiny shell (``&&``,
``||``, ``;``, ``|``, ``>``, ``>>``, ``<``, ``sudo``, ``cd``) over an in-memory
file system, systemd units whose enabled state survives reboots, a journal,
dnf/rpm, bzip2/cpio/cmp that really compress and archive, docker and atomic
on Atomic, and the EC2 side: ``curl`` to the instance metadata service
(IMDSv2 tokens, 401 without one when the launch required them) answering from
``InstanceMetadata``, ``findmnt`` (the root on NVMe or Xen's xvda),
``cloud-init status``, ``hostname`` and an ``authorized_keys`` holding the
metadata's key. Unknown commands exit 127 with ``command not found``.

``sudo reboot`` drops every connection and the host refuses SSH for
``reboot_delay`` seconds, then comes back with a new boot id. Misbehaviours
are constructor flags (see ``FAULTS`` for the names the command line takes):
SELinux permissive, a failed unit, dnf broken, a wrong /tmp mode, service
state lost at reboot, an empty journal, docker down, never accepting SSH
(``never_accept="refuse"`` resets every connection, ``"hang"`` accepts TCP
and never sends a banner), hanging on commands matching ``hang_on``, dying
after ``die_after`` commands (drops every connection and stays down), and
``boot_delay``/``key_delay`` (refuse SSH, then refuse the key, for a while:
booting, and cloud-init not done yet). A delay of ``math.inf`` lasts until the
test ends it with ``come_up()`` (boot, reboot) or ``install_keys()`` (key), so
a test waits on what the client did (``refused``, ``key_refusals``), not on a
clock.

In process::

    with SshTestHost(family="Base", authorized=[client_key]) as host:
        ParamikoSession("127.0.0.1", host.port, "fedora", client_key, ...)

As a process::

    python -m devel.sshhost --host 127.0.0.1 --port 0 --family Atomic \\
        --authorized-keys ~/.ssh/id_ed25519.pub --reboot-delay 2

prints ``host key SHA256:...`` then ``listening on HOST:PORT`` when ready.
``accept_any_key=True`` / ``--accept-any-key`` lets any public key in: only
for a throw-away demo on loopback, never the default.
"""

# ruff: noqa: S108, PLR0912
# S108: every /tmp below is a path inside the emulated instance, never a local file.
# PLR0912: an emulated program has one branch per option it understands.
from __future__ import annotations

import argparse
import base64
import bz2
import dataclasses
import json
import logging
import math
import posixpath
import re
import secrets
import select
import shlex
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import paramiko
from paramiko.common import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_SUCCEEDED,
)

log = logging.getLogger(__name__)

USER = "fedora"
HOME = "/home/fedora"
HOSTNAME = "ip-172-31-20-5.ec2.internal"

# name on the command line -> (constructor keyword, value, what it does)
FAULTS: dict[str, tuple[str, Any, str]] = {
    "selinux": ("selinux_permissive", True, "SELinux is permissive"),
    "failed-unit": ("failed_unit", "cloud-init.service", "cloud-init.service failed"),
    "dnf": ("broken_dnf", True, "dnf cannot reach its repositories"),
    "tmp-mode": ("tmp_mode", 0o755, "/tmp has mode 755"),
    "services-reset": ("services_reset", True, "enable/disable is forgotten at reboot"),
    "journal": ("empty_journal", True, "the journal is empty"),
    "docker": ("docker_down", True, "the docker daemon does not start (Atomic)"),
    "imds-v1": ("imds_v1", True, "instance metadata answers GETs without an IMDSv2 token"),
    "xen-root": ("xen_root", True, "the root file system is on /dev/xvda even on Nitro"),
    "cloud-init": ("cloud_init_errors", True, "cloud-init finished with an error"),
    "hostname": ("wrong_hostname", True, "the hostname is not the metadata's"),
    "baked-key": ("baked_key", True, "the image ships an SSH key of its own"),
}

IMDS_HOST = "169.254.169.254"
BAKED_KEY = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC7bakedKEYfromTHEimageBUILDER imagefactory"


@dataclass(frozen=True)
class InstanceMetadata:
    """What the instance metadata service (IMDS) tells this emulated instance."""

    instance_id: str = "i-0123456789abcdef0"
    instance_type: str = "t3.small"
    local_hostname: str = HOSTNAME
    # OpenSSH public key lines of the launch key pair; cloud-init writes them to
    # ~/.ssh/authorized_keys. Empty: the key that first logs in (SshTestHost's
    # authorizer checked it) is taken as the key pair's.
    public_keys: tuple[str, ...] = ()
    key_name: str = "autocloud-key"
    tokens_required: bool = True  # the launch's MetadataOptions.HttpTokens == "required"
    nvme: bool = True  # a Nitro type: EBS volumes, the root too, are NVMe devices


def fault_options(names: Iterable[str]) -> dict[str, Any]:
    """Constructor keywords for the named ``FAULTS``; unknown names raise ValueError."""
    options: dict[str, Any] = {}
    for name in names:
        if name not in FAULTS:
            raise ValueError(f"unknown fault {name!r}; known: {', '.join(sorted(FAULTS))}")
        key, value, _ = FAULTS[name]
        options[key] = value
    return options


# =============================================================================
# The emulated operating system
# =============================================================================
@dataclass
class Exec:
    """What one command (or command line) did."""

    code: int
    stdout: bytes = b""
    stderr: bytes = b""
    reboot: bool = False


def _fail(code: int, message: str) -> Exec:
    return Exec(code, b"", (message.rstrip("\n") + "\n").encode())


def _ok(text: str | bytes = b"") -> Exec:
    return Exec(0, text.encode() if isinstance(text, str) else text)


class _FsError(Exception):
    """A file system error; the message is strerror-like."""


class _Syntax(Exception):
    pass


@dataclass
class _Node:
    kind: Literal["file", "dir"]
    mode: int
    owner: str
    data: bytes = b""
    mtime: float = field(default_factory=time.time)
    label: str = ""


@dataclass
class _Unit:
    description: str
    enabled: bool
    state: Literal["active", "inactive", "failed"]
    default_enabled: bool
    kind: Literal["simple", "oneshot"] = "simple"


@dataclass
class _Simple:
    argv: list[str] = field(default_factory=list)
    stdin_path: str | None = None
    stdout_path: str | None = None
    append: bool = False
    to_stderr: bool = False


@dataclass
class _Shell:
    cwd: str
    stopped: Callable[[], bool]


@dataclass
class _Ctx:
    sh: _Shell
    user: str
    stdin: bytes


_OPERATORS = {"&&", "||", ";"}
_LINKS = {"/bin": "/usr/bin", "/sbin": "/usr/sbin", "/lib": "/usr/lib", "/lib64": "/usr/lib64"}


def parse_command_line(command: str) -> list[tuple[str, list[_Simple]]]:
    """``a | b > f && c`` -> [(";", [a, b>f]), ("&&", [c])]; raises _Syntax."""
    lex = shlex.shlex(command, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    try:
        tokens = list(lex)
    except ValueError as exc:
        raise _Syntax(f"syntax error: {exc}") from exc
    items: list[tuple[str, list[_Simple]]] = []
    op = ";"
    pipeline: list[_Simple] = []
    cur = _Simple()

    def close_simple(token: str) -> None:
        if not cur.argv:
            raise _Syntax(f"syntax error near unexpected token `{token}'")
        pipeline.append(cur)

    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in _OPERATORS:
            close_simple(tok)
            items.append((op, pipeline))
            op, pipeline, cur = tok, [], _Simple()
        elif tok == "|":
            close_simple(tok)
            cur = _Simple()
        elif tok in (">", ">>", "<", ">&"):
            if i + 1 >= len(tokens) or tokens[i + 1] in _OPERATORS | {"|", ">", "<"}:
                raise _Syntax("syntax error near unexpected token `newline'")
            target = tokens[i + 1]
            if tok == "<":
                cur.stdin_path = target
            elif tok == ">&":
                if target != "2":
                    raise _Syntax(f"unsupported redirection >&{target}")
                cur.to_stderr = True
            else:
                cur.stdout_path, cur.append = target, tok == ">>"
            i += 1
        elif tok and set(tok) <= set("();<>|&"):
            raise _Syntax(f"syntax error near unexpected token `{tok}'")
        else:
            cur.argv.append(tok)
        i += 1
    if cur.argv:
        pipeline.append(cur)
    elif pipeline or op != ";":
        raise _Syntax("syntax error: unexpected end of file")
    if pipeline:
        items.append((op, pipeline))
    return items


def _mode_string(node: _Node) -> str:
    chars = "d" if node.kind == "dir" else "-"
    for shift in (6, 3, 0):
        bits = (node.mode >> shift) & 7
        chars += (
            ("r" if bits & 4 else "-") + ("w" if bits & 2 else "-") + ("x" if bits & 1 else "-")
        )
    if node.mode & 0o1000:
        chars = chars[:-1] + ("t" if chars[-1] == "x" else "T")
    return chars + "."


def _bre_to_python(pattern: str) -> str:
    """GNU grep basic regex -> Python: ``+?|(){}`` are literal unless escaped."""
    out = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            out.append(nxt if nxt in "+?|(){}" else "\\" + nxt)
            i += 2
            continue
        out.append("\\" + ch if ch in "+?|(){}" else ch)
        i += 1
    return "".join(out)


def _printf(fmt: str, args: list[str]) -> str:
    escapes = {"n": "\n", "t": "\t", "\\": "\\", "a": "\a", "r": "\r", '"': '"'}
    out: list[str] = []
    pending = list(args)
    while True:
        i = 0
        used = False
        while i < len(fmt):
            ch = fmt[i]
            if ch == "\\" and i + 1 < len(fmt) and fmt[i + 1] in escapes:
                out.append(escapes[fmt[i + 1]])
                i += 2
            elif ch == "%" and i + 1 < len(fmt):
                spec = fmt[i + 1]
                if spec == "%":
                    out.append("%")
                elif spec in "sdb":
                    used = True
                    out.append(pending.pop(0) if pending else "")
                i += 2
            else:
                out.append(ch)
                i += 1
        if not pending or not used:
            return "".join(out)


def _newc(entries: Sequence[tuple[str, int, bytes]], mtime: int) -> bytes:
    """A cpio archive in the SVR4 "newc" format cpio -o writes."""
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, mtime, len(data), 0, 0, 0, 0, len(raw), 0)
        out += b"070701" + "".join(f"{v:08X}" for v in fields).encode() + raw
        pad()
        out += data
        pad()
    out.extend(b"\0" * (-len(out) % 512))
    return bytes(out)


def _unnewc(blob: bytes) -> list[tuple[str, int, bytes]]:
    entries: list[tuple[str, int, bytes]] = []
    pos = 0
    while True:
        head = blob[pos : pos + 110]
        if len(head) < 110 or head[:6] != b"070701":
            raise ValueError("premature end of archive")
        fields = [int(head[6 + 8 * k : 14 + 8 * k], 16) for k in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        pos += 110
        name = blob[pos : pos + namesize - 1].decode()
        pos += namesize
        pos += -pos % 4
        data = blob[pos : pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return entries
        entries.append((name, mode, data))


def _blocks(n: int) -> str:
    count = max(1, -(-n // 512))
    return f"{count} block" + ("" if count == 1 else "s")


_PACKAGES: dict[str, dict[str, str]] = {
    "Base": {
        "bash": "bash-5.2.26-1.fc39.x86_64",
        "audit": "audit-3.1.2-8.fc39.x86_64",
        "chrony": "chrony-4.5-1.fc39.x86_64",
        "openssh-server": "openssh-server-9.3p1-10.fc39.x86_64",
        "dnf": "dnf-4.18.2-1.fc39.noarch",
        "bzip2": "bzip2-1.0.8-16.fc39.x86_64",
        "cpio": "cpio-2.14-4.fc39.x86_64",
        "diffutils": "diffutils-3.10-3.fc39.x86_64",
        "systemd": "systemd-254.9-1.fc39.x86_64",
        "kernel-core": "kernel-core-6.7.5-200.fc39.x86_64",
        "cloud-init": "cloud-init-23.4.4-1.fc39.noarch",
        "selinux-policy-targeted": "selinux-policy-targeted-39.4-1.fc39.noarch",
    },
    "Atomic": {
        "bash": "bash-4.4.23-6.fc29.x86_64",
        "audit": "audit-3.0-0.5.20181218gitbdb72c0.fc29.x86_64",
        "chrony": "chrony-3.4-2.fc29.x86_64",
        "openssh-server": "openssh-server-7.9p1-5.fc29.x86_64",
        "bzip2": "bzip2-1.0.6-28.fc29.x86_64",
        "cpio": "cpio-2.12-9.fc29.x86_64",
        "diffutils": "diffutils-3.6-5.fc29.x86_64",
        "systemd": "systemd-239-12.git8bca462.fc29.x86_64",
        "kernel-core": "kernel-core-5.0.16-200.fc29.x86_64",
        "cloud-init": "cloud-init-17.1-11.fc29.noarch",
        "docker": "docker-1.13.1-68.git47e2230.fc29.x86_64",
        "atomic": "atomic-1.22.1-27.gitb507039.fc29.x86_64",
        "selinux-policy-targeted": "selinux-policy-targeted-3.14.2-57.fc29.noarch",
    },
}
_INSTALLABLE = {"Base": {"pss": "pss-1.43-5.fc39.noarch"}, "Atomic": {}}
_KERNEL = {"Base": "6.7.5-200.fc39.x86_64", "Atomic": "5.0.16-200.fc29.x86_64"}
_BASH = {"Base": "5.2.26(1)-release", "Atomic": "4.4.23(1)-release"}
_CMDLINE = (
    "BOOT_IMAGE=(hd0,gpt3)/vmlinuz-{kernel} root=UUID=2d5d0d4b-7d33-4bbb-9b0e-1f8c4a8d4f7e"
    " ro rootflags=subvol=root no_timer_check console=tty1 console=ttyS0,115200n8{ifnames}\n"
)
_LSBLK = {
    "Base": (
        "NAME    MAJ:MIN RM  SIZE RO TYPE MOUNTPOINTS\n"
        "xvda    202:0    0    5G  0 disk \n"
        "├─xvda1 202:1    0    1M  0 part \n"
        "├─xvda2 202:2    0    1G  0 part /boot\n"
        "├─xvda3 202:3    0  100M  0 part /boot/efi\n"
        "└─xvda4 202:4    0  3.9G  0 part /home\n"
        "                                 /\n"
    ),
    "Atomic": (
        "NAME              MAJ:MIN RM  SIZE RO TYPE MOUNTPOINT\n"
        "xvda              202:0    0    6G  0 disk \n"
        "├─xvda1           202:1    0  300M  0 part /boot\n"
        "└─xvda2           202:2    0  5.7G  0 part \n"
        "  └─atomicos-root 253:0    0    3G  0 lvm  /sysroot\n"
    ),
}
_DOCKER_VERSION = (
    "{role}:\n Version:         1.13.1\n API version:     1.26{minimum}\n"
    " Package version: docker-1.13.1-68.git47e2230.fc29.x86_64\n Go version:      go1.11.5\n"
    " Git commit:      47e2230/1.13.1\n Built:           Wed Feb 20 10:02:44 2019\n"
    " OS/Arch:         linux/amd64\n"
)
_DOCKER_DOWN = (
    "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
    "Is the docker daemon running?"
)
_DOCKER_DENIED = (
    "Got permission denied while trying to connect to the Docker daemon socket at "
    "unix:///var/run/docker.sock: dial unix /var/run/docker.sock: connect: permission denied"
)
_AUTH_REQUIRED = "Interactive authentication required."
_CHRONYD_EXTRA = (
    "       Docs: man:chronyd(8)\n             man:chrony.conf(5)\n"
    "   Main PID: 645 (chronyd)\n      Tasks: 1 (limit: 4652)\n     Memory: 1.2M\n"
)

Program = Callable[[_Ctx, list[str]], Exec]


class FakeFedora:
    """The state of one emulated instance and its command interpreter (thread-safe)."""

    def __init__(
        self,
        family: str = "Base",
        *,
        user: str = USER,
        selinux_permissive: bool = False,
        failed_unit: str | None = None,
        broken_dnf: bool = False,
        tmp_mode: int = 0o1777,
        services_reset: bool = False,
        empty_journal: bool = False,
        docker_down: bool = False,
        net_ifnames: bool = True,
        metadata: InstanceMetadata | None = None,
        imds_v1: bool = False,
        xen_root: bool = False,
        cloud_init_errors: bool = False,
        wrong_hostname: bool = False,
        baked_key: bool = False,
    ) -> None:
        if family not in ("Base", "Atomic"):
            raise ValueError(f"family must be Base or Atomic, not {family!r}")
        self.family = family
        self.metadata = metadata or InstanceMetadata()
        self.imds_v1 = imds_v1
        self.xen_root = xen_root
        self.cloud_init_errors = cloud_init_errors
        self.wrong_hostname = wrong_hostname
        self.baked_key = baked_key
        self._tokens: set[str] = set()
        self.user = user
        self.home = f"/home/{user}"
        self.selinux_permissive = selinux_permissive
        self.failed_unit = _unit_name(failed_unit) if failed_unit else None
        self.broken_dnf = broken_dnf
        self.services_reset = services_reset
        self.empty_journal = empty_journal
        self.docker_down = docker_down
        self.net_ifnames = net_ifnames
        self._lock = threading.RLock()
        self.boot_id = ""
        self.boots: list[float] = []
        self.packages = dict(_PACKAGES[family])
        self.users: set[str] = {"root", user}
        self.images: set[str] = set()
        self._journal: list[tuple[float, str, str, str]] = []  # time, ident, unit, message
        self._audit_serial = 100
        self._pid = 1000
        self.nodes: dict[str, _Node] = {}
        self._init_fs(tmp_mode)
        self._write_authorized_keys()
        self.units = self._init_units()
        self._programs = self._program_table()
        for name in self._programs:
            if name not in ("cd", "["):
                self.nodes[f"/usr/bin/{name}"] = _Node("file", 0o755, "root", b"\x7fELF")
        self.boot()

    # -- boot -------------------------------------------------------------
    def _init_fs(self, tmp_mode: int) -> None:
        for path, mode, owner in (
            ("/", 0o555, "root"),
            ("/etc", 0o755, "root"),
            ("/home", 0o755, "root"),
            (self.home, 0o700, self.user),
            ("/root", 0o550, "root"),
            ("/tmp", tmp_mode, "root"),
            ("/var", 0o755, "root"),
            ("/var/tmp", 0o1777, "root"),
            ("/var/log", 0o755, "root"),
            ("/var/log/audit", 0o700, "root"),
            ("/usr", 0o755, "root"),
            ("/usr/bin", 0o755, "root"),
            ("/usr/sbin", 0o755, "root"),
            ("/usr/lib", 0o755, "root"),
            ("/usr/lib64", 0o755, "root"),
            ("/run", 0o755, "root"),
            ("/proc", 0o555, "root"),
            ("/sys", 0o555, "root"),
            ("/dev", 0o755, "root"),
        ):
            self.nodes[path] = _Node("dir", mode, owner)
        if self.family == "Atomic":
            self.nodes["/sysroot"] = _Node("dir", 0o755, "root")
        self.nodes["/etc/machine-id"] = _Node(
            "file", 0o444, "root", uuid.uuid4().hex.encode() + b"\n", label="machineid_t"
        )
        release = "39 (Cloud Edition)" if self.family == "Base" else "29 (Atomic Host)"
        self.nodes["/etc/os-release"] = _Node(
            "file", 0o644, "root", f'NAME="Fedora Linux"\nVERSION="{release}"\n'.encode()
        )
        self.nodes["/var/log/audit/audit.log"] = _Node(
            "file", 0o600, "root", b"type=DAEMON_START msg=audit(0.000:1): op=start res=success\n"
        )

    def _init_units(self) -> dict[str, _Unit]:
        units = {
            "sshd.service": _Unit("OpenSSH server daemon", True, "active", True),
            "chronyd.service": _Unit("NTP client/server", True, "active", True),
            "auditd.service": _Unit("Security Auditing Service", True, "active", True),
            "cloud-init.service": _Unit(
                "Initial cloud-init job (metadata service crawler)", True, "active", True, "oneshot"
            ),
        }
        if self.family == "Atomic":
            units["docker.service"] = _Unit(
                "Docker Application Container Engine", True, "active", True
            )
            units["docker-storage-setup.service"] = _Unit(
                "Docker Storage Setup", True, "active", True, "oneshot"
            )
        if self.failed_unit and self.failed_unit not in units:
            units[self.failed_unit] = _Unit(self.failed_unit, True, "active", True)
        return units

    def boot(self) -> None:
        """(Re)boot: new boot id, units started from their enabled state, /tmp emptied."""
        with self._lock:
            now = time.time()
            self.boot_id = str(uuid.uuid4())
            self.boots.append(now)
            for path in [p for p in self.nodes if p.startswith("/tmp/")]:
                del self.nodes[path]
            self._log("kernel", "", f"Linux version {_KERNEL[self.family]} (mockbuild@fedora)")
            for name, unit in self.units.items():
                if self.services_reset:
                    unit.enabled = unit.default_enabled
                failing = name == self.failed_unit or (
                    self.docker_down and name == "docker.service"
                )
                if failing:
                    unit.state = "failed"
                    self._log("systemd[1]", name, f"Failed to start {name} - {unit.description}.")
                elif unit.enabled:
                    unit.state = "active"
                    if unit.kind == "oneshot" and name.startswith("docker-storage"):
                        self._log("systemd[1]", name, "Starting Docker Storage Setup...")
                        self._log("systemd[1]", name, "Started Docker Storage Setup.")
                    else:
                        self._log("systemd[1]", name, f"Started {name} - {unit.description}.")
                else:
                    unit.state = "inactive"

    def note_login(self, user: str, address: str, fingerprint: str) -> None:
        with self._lock:
            self._log(
                f"sshd[{self._next_pid()}]",
                "sshd.service",
                f"Accepted publickey for {user} from {address} ssh2: {fingerprint}",
            )

    # -- what cloud-init did with the metadata ------------------------------
    def _write_authorized_keys(self) -> None:
        keys = list(self.metadata.public_keys) + ([BAKED_KEY] if self.baked_key else [])
        ssh_dir = f"{self.home}/.ssh"
        self.nodes[ssh_dir] = _Node("dir", 0o700, self.user)
        text = "".join(k.strip() + "\n" for k in keys)
        self.nodes[f"{ssh_dir}/authorized_keys"] = _Node("file", 0o600, self.user, text.encode())

    def take_login_key(self, public_line: str) -> None:
        """No key pair in the metadata: the first key let in is the key pair's."""
        with self._lock:
            if self.metadata.public_keys:
                return
            self.metadata = dataclasses.replace(self.metadata, public_keys=(public_line,))
            self._write_authorized_keys()

    @property
    def hostname(self) -> str:
        return "localhost.localdomain" if self.wrong_hostname else self.metadata.local_hostname

    def _log(self, ident: str, unit: str, message: str) -> None:
        if not self.empty_journal:
            self._journal.append((time.time(), ident, unit, message))

    def _next_pid(self) -> int:
        self._pid += 1
        return self._pid

    # -- the shell --------------------------------------------------------
    def execute(self, command: str, stopped: Callable[[], bool] = lambda: False) -> Exec:
        """Run a command line like bash -c would, as the login user."""
        try:
            items = parse_command_line(command)
        except _Syntax as exc:
            return _fail(2, f"bash: -c: {exc}")
        sh = _Shell(self.home, stopped)
        out, err = bytearray(), bytearray()
        status = 0
        for op, pipeline in items:
            if (op == "&&" and status != 0) or (op == "||" and status == 0):
                continue
            result = self._pipeline(sh, pipeline)
            out += result.stdout
            err += result.stderr
            status = result.code
            if result.reboot:
                return Exec(status, bytes(out), bytes(err), reboot=True)
        return Exec(status, bytes(out), bytes(err))

    def _pipeline(self, sh: _Shell, pipeline: list[_Simple]) -> Exec:
        data = b""
        err = bytearray()
        result = Exec(0)
        for simple in pipeline:
            result = self._simple(sh, simple, data)
            err += result.stderr
            data = result.stdout
            if result.reboot:
                break
        return Exec(result.code, data, bytes(err), result.reboot)

    def _simple(self, sh: _Shell, simple: _Simple, stdin: bytes) -> Exec:
        argv = list(simple.argv)
        user = self.user
        if argv[0] == "sudo":
            argv = argv[1:]
            while argv and argv[0].startswith("-"):
                argv = argv[1:]
            if not argv:
                return _fail(1, "usage: sudo -h | -K | -k | -V")
            user = "root"
            with self._lock:
                self._log(
                    f"sudo[{self._next_pid()}]",
                    "",
                    f"{self.user} : PWD={sh.cwd} ; USER=root ; COMMAND={' '.join(argv)}",
                )
        ctx = _Ctx(sh, user, stdin)
        if simple.stdin_path is not None:
            try:
                ctx.stdin = self._read(sh, simple.stdin_path, self.user)
            except _FsError as exc:
                return _fail(1, f"bash: {simple.stdin_path}: {exc}")
        if simple.stdout_path is not None:
            try:  # bash opens the file as the login user, before sudo runs
                self._write(sh, simple.stdout_path, b"", self.user, append=True)
            except _FsError as exc:
                return _fail(1, f"bash: {simple.stdout_path}: {exc}")
        name = argv[0]
        if "/" in name:
            node = self._lookup(self._abs(sh, name))
            if node is None or node.kind != "file" or not node.mode & 0o111:
                return _fail(127, f"bash: {name}: No such file or directory")
            name = posixpath.basename(name)
        program = self._programs.get(name)
        if program is None:
            if user == "root":  # sudo looked it up
                return _fail(1, f"sudo: {name}: command not found")
            return _fail(127, f"bash: {name}: command not found")
        if name == "sleep":
            result = program(ctx, argv[1:])
        else:
            with self._lock:
                result = program(ctx, argv[1:])
        if simple.stdout_path is not None and not result.reboot:
            try:
                self._write(sh, simple.stdout_path, result.stdout, self.user, append=simple.append)
            except _FsError as exc:
                return _fail(1, f"bash: {simple.stdout_path}: {exc}")
            result = Exec(result.code, b"", result.stderr)
        if simple.to_stderr:
            result = Exec(result.code, b"", result.stderr + result.stdout, result.reboot)
        return result

    # -- the file system --------------------------------------------------
    def _abs(self, sh: _Shell, path: str) -> str:
        full = posixpath.normpath(posixpath.join(sh.cwd, path))
        full = "/" + full.lstrip("/")
        for link, target in _LINKS.items():
            if full == link or full.startswith(link + "/"):
                full = target + full[len(link) :]
        return full

    def _virtual(self, path: str) -> bytes | None:
        if path == "/proc/cmdline":
            ifnames = " net.ifnames=0" if self.net_ifnames else ""
            return _CMDLINE.format(kernel=_KERNEL[self.family], ifnames=ifnames).encode()
        if path == "/proc/sys/kernel/random/boot_id":
            return (self.boot_id + "\n").encode()
        iface = "eth0" if self.net_ifnames else "ens5"
        if path in (f"/sys/class/net/{iface}/operstate", "/sys/class/net/lo/operstate"):
            return b"up\n"
        if path == "/run/ostree-booted" and self.family == "Atomic":
            return b""
        if path == "/dev/null":
            return b""
        return None

    def _lookup(self, path: str) -> _Node | None:
        data = self._virtual(path)
        if data is not None:
            return _Node("file", 0o444, "root", data)
        node = self.nodes.get(path)
        if node is None and any(path.startswith(p) for p in ("/proc/", "/sys/")):
            if any(k.startswith(path + "/") for k in ("/sys/class/net/eth0/operstate",)):
                return _Node("dir", 0o555, "root")
        return node

    def _readonly(self, path: str) -> bool:
        if path.startswith(("/proc", "/sys")):
            return True
        return self.family == "Atomic" and (path == "/usr" or path.startswith("/usr/"))

    @staticmethod
    def _allowed(node: _Node, user: str, bit: int) -> bool:
        if user == "root":
            return True
        shift = 6 if node.owner == user else 0
        return bool(node.mode & (bit << shift))

    def _read(self, sh: _Shell, path: str, user: str) -> bytes:
        full = self._abs(sh, path)
        node = self._lookup(full)
        if node is None:
            raise _FsError("No such file or directory")
        if node.kind == "dir":
            raise _FsError("Is a directory")
        if not self._allowed(node, user, 4):
            raise _FsError("Permission denied")
        return node.data

    def _parent_writable(self, full: str, user: str) -> None:
        parent = self.nodes.get(posixpath.dirname(full))
        if parent is None or parent.kind != "dir":
            raise _FsError("No such file or directory")
        if self._readonly(full):
            raise _FsError("Read-only file system")
        if not self._allowed(parent, user, 2):
            raise _FsError("Permission denied")

    def _write(self, sh: _Shell, path: str, data: bytes, user: str, append: bool = False) -> str:
        full = self._abs(sh, path)
        if full == "/dev/null":
            return full
        node = self._lookup(full)
        if node is not None and node.kind == "dir":
            raise _FsError("Is a directory")
        if node is None:
            self._parent_writable(full, user)
            self.nodes[full] = _Node("file", 0o644 if user == "root" else 0o664, user, data)
            return full
        if self._readonly(full) or full not in self.nodes:
            raise _FsError("Read-only file system" if self._readonly(full) else "Permission denied")
        if not self._allowed(node, user, 2):
            raise _FsError("Permission denied")
        node.data = node.data + data if append else data
        node.mtime = time.time()
        return full

    def _mkdir(self, full: str, user: str) -> None:
        self._parent_writable(full, user)
        self.nodes[full] = _Node("dir", 0o755 if user == "root" else 0o775, user)

    def _remove(self, full: str, user: str, recursive: bool) -> None:
        node = self.nodes.get(full)
        if node is None:
            raise _FsError("No such file or directory")
        self._parent_writable(full, user)
        children = [p for p in self.nodes if p.startswith(full.rstrip("/") + "/")]
        if node.kind == "dir" and not recursive:
            raise _FsError("Is a directory")
        for child in children:
            del self.nodes[child]
        del self.nodes[full]

    def _children(self, full: str) -> list[str]:
        prefix = full.rstrip("/") + "/"
        return sorted(
            p[len(prefix) :]
            for p in self.nodes
            if p.startswith(prefix) and "/" not in p[len(prefix) :]
        )

    # -- programs ---------------------------------------------------------
    def _program_table(self) -> dict[str, Program]:
        table: dict[str, Program] = {
            "true": lambda c, a: Exec(0),
            "false": lambda c, a: Exec(1),
            "echo": self._echo,
            "printf": lambda c, a: _ok(_printf(a[0], a[1:])) if a else _fail(2, "printf: usage"),
            "cat": self._cat,
            "rm": self._rm,
            "mkdir": self._mkdir_cmd,
            "touch": self._touch,
            "cd": self._cd,
            "ls": self._ls,
            "stat": self._stat,
            "test": self._test,
            "[": self._test,
            "cmp": self._cmp,
            "bzip2": self._bzip2,
            "bunzip2": lambda c, a: self._bzip2(c, ["-d", *a]),
            "bzcat": lambda c, a: self._bzip2(c, ["-dc", *a]),
            "cpio": self._cpio,
            "grep": self._grep,
            "head": self._head,
            "wc": self._wc,
            "seq": self._seq,
            "sleep": self._sleep,
            "id": lambda c, a: (
                _ok("0\n" if c.user == "root" else "1000\n")
                if a == ["-u"]
                else _ok(f"uid={0 if c.user == 'root' else 1000}({c.user})\n")
            ),
            "whoami": lambda c, a: _ok(c.user + "\n"),
            "hostname": lambda c, a: _ok(
                (self.hostname.split(".")[0] if "-s" in a else self.hostname) + "\n"
            ),
            "curl": self._curl,
            "cut": self._cut,
            "findmnt": self._findmnt,
            "cloud-init": self._cloud_init,
            "uname": self._uname,
            "bash": self._bash,
            "getenforce": lambda c, a: _ok(
                "Permissive\n" if self.selinux_permissive else "Enforcing\n"
            ),
            "journalctl": self._journalctl,
            "systemctl": self._systemctl,
            "reboot": self._reboot,
            "shutdown": self._reboot,
            "rpm": self._rpm,
            "useradd": self._useradd,
            "userdel": self._userdel,
            "restorecon": self._restorecon,
            "ssh-keygen": self._ssh_keygen,
            "umount": self._umount,
            "last": self._last,
            "lsblk": lambda c, a: _ok(_LSBLK[self.family]),
        }
        if self.family == "Base":
            table["dnf"] = self._dnf
        else:
            table["docker"] = self._docker
            table["atomic"] = self._atomic
        return table

    def _echo(self, c: _Ctx, args: list[str]) -> Exec:
        newline = True
        if args and args[0] == "-n":
            newline, args = False, args[1:]
        return _ok(" ".join(args) + ("\n" if newline else ""))

    def _cat(self, c: _Ctx, args: list[str]) -> Exec:
        if not args:
            return _ok(c.stdin)
        out, code, err = bytearray(), 0, []
        for path in args:
            try:
                out += c.stdin if path == "-" else self._read(c.sh, path, c.user)
            except _FsError as exc:
                code = 1
                err.append(f"cat: {path}: {exc}")
        return Exec(code, bytes(out), "".join(e + "\n" for e in err).encode())

    def _rm(self, c: _Ctx, args: list[str]) -> Exec:
        flags = "".join(a[1:] for a in args if a.startswith("-"))
        force, recursive = "f" in flags, "r" in flags or "R" in flags
        code, err = 0, []
        for path in (a for a in args if not a.startswith("-")):
            full = self._abs(c.sh, path)
            try:
                self._remove(full, c.user, recursive)
            except _FsError as exc:
                if force and str(exc) == "No such file or directory":
                    continue
                code = 1
                err.append(f"rm: cannot remove '{path}': {exc}")
        return Exec(code, b"", "".join(e + "\n" for e in err).encode())

    def _mkdir_cmd(self, c: _Ctx, args: list[str]) -> Exec:
        parents = "-p" in args
        for path in (a for a in args if not a.startswith("-")):
            full = self._abs(c.sh, path)
            todo = [full]
            if parents:
                todo = []
                probe = full
                while probe != "/" and probe not in self.nodes:
                    todo.insert(0, probe)
                    probe = posixpath.dirname(probe)
            for one in todo:
                if one in self.nodes:
                    return _fail(1, f"mkdir: cannot create directory '{path}': File exists")
                try:
                    self._mkdir(one, c.user)
                except _FsError as exc:
                    return _fail(1, f"mkdir: cannot create directory '{path}': {exc}")
        return Exec(0)

    def _touch(self, c: _Ctx, args: list[str]) -> Exec:
        for path in args:
            full = self._abs(c.sh, path)
            node = self._lookup(full)
            try:
                if node is None or self._readonly(full):
                    self._write(c.sh, path, b"", c.user, append=True)
                elif not self._allowed(node, c.user, 2):
                    raise _FsError("Permission denied")
                else:
                    node.mtime = time.time()
            except _FsError as exc:
                return _fail(1, f"touch: cannot touch '{path}': {exc}")
        return Exec(0)

    def _cd(self, c: _Ctx, args: list[str]) -> Exec:
        target = self._abs(c.sh, args[0] if args else self.home)
        node = self._lookup(target)
        if node is None or node.kind != "dir":
            return _fail(1, f"bash: cd: {args[0] if args else '~'}: No such file or directory")
        c.sh.cwd = target
        return Exec(0)

    def _label(self, full: str, node: _Node) -> str:
        if node.label:
            kind = node.label
        elif full.startswith("/tmp"):
            kind = "user_tmp_t"
        elif full.startswith("/home"):
            kind = "user_home_t"
        elif full.startswith("/usr/bin"):
            kind = "bin_t"
        else:
            kind = "etc_t"
        return f"system_u:object_r:{kind}:s0"

    def _ls(self, c: _Ctx, args: list[str]) -> Exec:
        flags = "".join(a[1:] for a in args if a.startswith("-") and a != "-")
        paths = [a for a in args if not a.startswith("-")] or ["."]
        out, err, code = [], [], 0
        for path in paths:
            full = self._abs(c.sh, path)
            node = self._lookup(full)
            if node is None:
                code = 2
                err.append(f"ls: cannot access '{path}': No such file or directory")
                continue
            if node.kind == "dir" and "d" not in flags:
                if not self._allowed(node, c.user, 4):
                    code = 2
                    err.append(f"ls: cannot open directory '{path}': Permission denied")
                    continue
                entries = [(name, posixpath.join(full, name)) for name in self._children(full)]
            else:
                entries = [(path, full)]
            for shown, where in entries:
                child = self._lookup(where)
                if child is None:
                    continue
                if "l" not in flags:
                    out.append(shown)
                    continue
                stamp = time.strftime("%b %e %H:%M", time.localtime(child.mtime))
                label = f" {self._label(where, child)}" if "Z" in flags else ""
                size = len(child.data) if child.kind == "file" else 4096
                out.append(
                    f"{_mode_string(child)} 1 {child.owner} {child.owner}{label} "
                    f"{size} {stamp} {shown}"
                )
        text = "".join(line + "\n" for line in out)
        return Exec(code, text.encode(), "".join(e + "\n" for e in err).encode())

    def _stat(self, c: _Ctx, args: list[str]) -> Exec:
        fmt: str | None = None
        paths: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg in ("-c", "--format"):
                fmt = args[i + 1] if i + 1 < len(args) else ""
                i += 1
            elif arg.startswith("--format="):
                fmt = arg.split("=", 1)[1]
            elif arg.startswith("-"):
                pass  # -L: links are already followed
            else:
                paths.append(arg)
            i += 1
        out = []
        for path in paths:
            full = self._abs(c.sh, path)
            node = self._lookup(full)
            if node is None:
                return _fail(1, f"stat: cannot statx '{path}': No such file or directory")
            size = len(node.data) if node.kind == "file" else 4096
            if fmt is None:
                out.append(f"  File: {path}\n  Size: {size}\tAccess: ({node.mode:04o})")
                continue
            values = {
                "a": f"{node.mode:o}",
                "A": _mode_string(node)[:-1],
                "U": node.owner,
                "G": node.owner,
                "s": str(size),
                "n": path,
                "F": "directory" if node.kind == "dir" else "regular file",
            }
            out.append(
                re.sub(r"%(.)", lambda m, v=values: v.get(m.group(1), m.group(0)), fmt)  # type: ignore[misc]
            )
        return _ok("".join(line + "\n" for line in out))

    def _test(self, c: _Ctx, args: list[str]) -> Exec:
        if args and args[-1] == "]":
            args = args[:-1]
        if len(args) == 2 and args[0] in ("-e", "-f", "-d", "-x", "-w", "-r", "-s"):
            full = self._abs(c.sh, args[1])
            node = self._lookup(full)
            if node is None:
                return Exec(1)
            checks = {
                "-e": True,
                "-f": node.kind == "file",
                "-d": node.kind == "dir",
                "-x": self._allowed(node, c.user, 1) and bool(node.mode & 0o111),
                "-w": self._allowed(node, c.user, 2) and not self._readonly(full),
                "-r": self._allowed(node, c.user, 4),
                "-s": bool(node.data),
            }
            return Exec(0 if checks[args[0]] else 1)
        if len(args) == 2 and args[0] in ("-n", "-z"):
            return Exec(0 if bool(args[1]) == (args[0] == "-n") else 1)
        if len(args) == 3 and args[1] in ("=", "==", "!="):
            return Exec(0 if (args[0] == args[2]) == (args[1] != "!=") else 1)
        if len(args) == 1:
            return Exec(0 if args[0] else 1)
        return _fail(2, "test: unsupported expression (stand-in)")

    def _cmp(self, c: _Ctx, args: list[str]) -> Exec:
        silent = verbose = printbytes = False
        limit: int | None = None
        files: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "-n":
                limit = int(args[i + 1])
                i += 1
            elif arg.startswith("-n") and arg[2:].isdigit():
                limit = int(arg[2:])
            elif arg.startswith("-") and arg != "-":
                silent |= "s" in arg
                verbose |= "l" in arg
                printbytes |= "b" in arg
            else:
                files.append(arg)
            i += 1
        if len(files) != 2:
            return _fail(2, "cmp: missing operand")
        blobs = []
        for name in files:
            try:
                blobs.append(c.stdin if name == "-" else self._read(c.sh, name, c.user))
            except _FsError as exc:
                return _fail(2, f"cmp: {name}: {exc}")
        a, b = blobs
        if limit is not None:
            a, b = a[:limit], b[:limit]
        diffs = [k for k in range(min(len(a), len(b))) if a[k] != b[k]]
        if not diffs and len(a) == len(b):
            return Exec(0)
        if silent:
            return Exec(1)
        if verbose:
            lines = "".join(f"{k + 1} {a[k]:3o} {b[k]:3o}\n" for k in diffs)
            return Exec(1, lines.encode())
        if diffs:
            k = diffs[0]
            line = a[:k].count(b"\n") + 1
            text = f"{files[0]} {files[1]} differ: byte {k + 1}, line {line}"
            if printbytes:
                text += f" is {a[k]:3o} {_visible(a[k])} {b[k]:3o} {_visible(b[k])}"
            return Exec(1, (text + "\n").encode())
        short = files[0] if len(a) < len(b) else files[1]
        n = min(len(a), len(b))
        line = a[:n].count(b"\n")
        return _fail(1, f"cmp: EOF on {short} after byte {n}, line {line}")

    def _bzip2(self, c: _Ctx, args: list[str]) -> Exec:
        flags = "".join(a[1:] for a in args if a.startswith("-") and not a.startswith("--"))
        files = [a for a in args if not a.startswith("-")]
        decompress, keep = "d" in flags, "k" in flags or "c" in flags
        force, to_stdout = "f" in flags, "c" in flags
        if not files:
            try:
                return _ok(bz2.decompress(c.stdin) if decompress else bz2.compress(c.stdin))
            except (OSError, ValueError):
                return _fail(2, "bzip2: (stdin) is not a bzip2 file.")
        out = bytearray()
        for name in files:
            try:
                data = self._read(c.sh, name, c.user)
            except _FsError as exc:
                return _fail(1, f"bzip2: Can't open input file {name}: {exc}.")
            try:
                result = bz2.decompress(data) if decompress else bz2.compress(data)
            except (OSError, ValueError):
                return _fail(2, f"bzip2: {name} is not a bzip2 file.")
            if to_stdout:
                out += result
                continue
            if decompress:
                target = name[:-4] if name.endswith(".bz2") else name + ".out"
            else:
                target = name + ".bz2"
            if self._lookup(self._abs(c.sh, target)) is not None and not force:
                return _fail(1, f"bzip2: Output file {target} already exists.")
            try:
                self._write(c.sh, target, result, c.user)
                if not keep:
                    self._remove(self._abs(c.sh, name), c.user, recursive=False)
            except _FsError as exc:
                return _fail(1, f"bzip2: Can't create output file {target}: {exc}.")
        return _ok(bytes(out))

    def _cpio(self, c: _Ctx, args: list[str]) -> Exec:
        flags = "".join(a[1:] for a in args if a.startswith("-"))
        operands = [a for a in args if not a.startswith("-")]
        names = [n for n in c.stdin.decode().splitlines() if n]
        try:
            if "o" in flags:
                entries = []
                for name in names:
                    node = self._lookup(self._abs(c.sh, name))
                    if node is None:
                        return _fail(2, f"cpio: {name}: Cannot stat: No such file or directory")
                    entries.append((name, 0o100000 | node.mode, self._read(c.sh, name, c.user)))
                archive = _newc(entries, int(time.time()))
                return Exec(0, archive, f"{_blocks(len(archive))}\n".encode())
            if "i" in flags:
                try:
                    entries = _unnewc(c.stdin)
                except (ValueError, UnicodeDecodeError):
                    return _fail(2, "cpio: premature end of archive")
                for name, _mode, data in entries:
                    self._write(c.sh, name, data, c.user)
                return Exec(0, b"", f"{_blocks(len(c.stdin))}\n".encode())
            if "p" in flags and operands:
                total = 0
                for name in names:
                    data = self._read(c.sh, name, c.user)
                    total += len(data)
                    self._write(c.sh, posixpath.join(operands[0], name), data, c.user)
                return Exec(0, b"", f"{_blocks(total)}\n".encode())
        except _FsError as exc:
            return _fail(2, f"cpio: {exc}")
        return _fail(2, "cpio: You must specify one of -oipt options.")

    def _grep(self, c: _Ctx, args: list[str]) -> Exec:
        flags = ""
        rest: list[str] = []
        for arg in args:
            if arg.startswith("-") and len(arg) > 1 and not rest:
                flags += arg[1:]
            else:
                rest.append(arg)
        if not rest:
            return _fail(2, "Usage: grep [OPTION]... PATTERNS [FILE]...")
        pattern, files = rest[0], rest[1:]
        if "F" in flags:
            regex = re.escape(pattern)
        elif "E" in flags:
            regex = pattern
        else:
            regex = _bre_to_python(pattern)
        if "w" in flags:
            regex = rf"(?<!\w)(?:{regex})(?!\w)"
        try:
            compiled = re.compile(regex, re.IGNORECASE if "i" in flags else 0)
        except re.error as exc:
            return _fail(2, f"grep: {exc}")
        sources: list[tuple[str, bytes]] = []
        for name in files or ["-"]:
            try:
                sources.append((name, c.stdin if name == "-" else self._read(c.sh, name, c.user)))
            except _FsError as exc:
                return _fail(2, f"grep: {name}: {exc}")
        out, count = [], 0
        for name, data in sources:
            for line in data.decode(errors="replace").splitlines():
                if bool(compiled.search(line)) != ("v" in flags):
                    count += 1
                    out.append(f"{name}:{line}" if len(sources) > 1 else line)
        if "q" in flags:
            return Exec(0 if count else 1)
        text = f"{count}\n" if "c" in flags else "".join(line + "\n" for line in out)
        return Exec(0 if count else 1, text.encode())

    def _head(self, c: _Ctx, args: list[str]) -> Exec:
        lines, nbytes, files = 10, None, []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg in ("-n", "-c"):
                value = int(args[i + 1])
                lines, nbytes = (value, nbytes) if arg == "-n" else (lines, value)
                i += 1
            elif re.fullmatch(r"-n?\d+", arg):
                lines = int(arg.lstrip("-n"))
            elif arg.startswith("-c") and arg[2:].isdigit():
                nbytes = int(arg[2:])
            else:
                files.append(arg)
            i += 1
        data = c.stdin
        if files:
            try:
                data = self._read(c.sh, files[0], c.user)
            except _FsError as exc:
                return _fail(1, f"head: cannot open '{files[0]}' for reading: {exc}")
        if nbytes is not None:
            return _ok(data[:nbytes])
        return _ok(b"".join(data.splitlines(keepends=True)[:lines]))

    def _wc(self, c: _Ctx, args: list[str]) -> Exec:
        data = c.stdin
        if "-l" in args:
            return _ok(str(data.count(b"\n")) + "\n")
        if "-c" in args:
            return _ok(f"{len(data)}\n")
        return _ok(f"{len(data.split())}\n")

    def _seq(self, c: _Ctx, args: list[str]) -> Exec:
        try:
            first, last = (1, int(args[0])) if len(args) == 1 else (int(args[0]), int(args[1]))
        except (IndexError, ValueError):
            return _fail(1, "seq: invalid argument")
        return _ok("".join(f"{n}\n" for n in range(first, last + 1)))

    def _sleep(self, c: _Ctx, args: list[str]) -> Exec:
        try:
            seconds = float(args[0])
        except (IndexError, ValueError):
            return _fail(1, "sleep: invalid time interval")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if c.sh.stopped():
                return Exec(143)
            time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))
        return Exec(0)

    def _cut(self, c: _Ctx, args: list[str]) -> Exec:
        delimiter, fields, files = "\t", "", []
        i = 0
        while i < len(args):
            if args[i] in ("-d", "-f") and i + 1 < len(args):
                if args[i] == "-d":
                    delimiter = args[i + 1]
                else:
                    fields = args[i + 1]
                i += 2
                continue
            files.append(args[i])
            i += 1
        if len(delimiter) != 1 or not re.fullmatch(r"\d+(?:,\d+)*", fields):
            return _fail(1, "cut: you must specify a list of fields (and a one-character -d)")
        wanted = [int(n) for n in fields.split(",")]
        data = c.stdin
        if files:
            try:
                data = self._read(c.sh, files[0], c.user)
            except _FsError as exc:
                return _fail(1, f"cut: {files[0]}: {exc}")
        out = []
        for line in data.decode(errors="replace").splitlines():
            parts = line.split(delimiter)
            if len(parts) == 1:
                out.append(line)  # no delimiter: the whole line, as GNU cut without -s
                continue
            out.append(delimiter.join(parts[n - 1] for n in sorted(set(wanted)) if n <= len(parts)))
        return _ok("".join(line + "\n" for line in out))

    def _findmnt(self, c: _Ctx, args: list[str]) -> Exec:
        if args[-1:] != ["/"] or "SOURCE" not in args:
            return _fail(1, "findmnt: only `findmnt -n -v -o SOURCE /` is emulated (stand-in)")
        if self.family == "Atomic":
            return _ok("/dev/mapper/atomicos-root\n")
        nvme = self.metadata.nvme and not self.xen_root
        return _ok("/dev/nvme0n1p4\n" if nvme else "/dev/xvda4\n")

    def _cloud_init(self, c: _Ctx, args: list[str]) -> Exec:
        if self.family == "Atomic" or args[:1] != ["status"]:
            return _fail(2, "usage: cloud-init [-h] {init,modules,single,query,clean,status} ...")
        status = "error" if self.cloud_init_errors else "done"
        errors = (
            ["('scripts_user', RuntimeError('Runparts: 1 failures (part-001) in 1 attempted'))"]
            if self.cloud_init_errors
            else []
        )
        code = 1 if self.cloud_init_errors else 0
        if "json" in args:
            report = {
                "boot_status_code": "enabled-by-generator",
                "datasource": "ec2",
                "detail": "DataSourceEc2Local",
                "errors": errors,
                "extended_status": status,
                "recoverable_errors": {},
                "status": status,
            }
            return Exec(code, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
        text = f"status: {status}\n"
        if "--long" in args:
            text += f"extended_status: {status}\ndetail: DataSourceEc2Local\nerrors: {errors}\n"
        return Exec(code, text.encode())

    def _curl(self, c: _Ctx, args: list[str]) -> Exec:
        """curl against the instance metadata service only (no other network here)."""
        method, headers, out_file, write_out = "GET", [], None, ""
        fail = silent = show_errors = False
        url = ""
        i = 0
        while i < len(args):
            arg = args[i]
            value = args[i + 1] if i + 1 < len(args) else None
            if arg in ("-X", "-H", "-o", "-w", "-m") and value is None:
                return _fail(2, f"curl: option {arg}: requires parameter")
            if arg == "-X":
                method = str(value)
            elif arg == "-H":
                if str(value).startswith("@"):
                    try:
                        raw = self._read(c.sh, str(value)[1:], c.user)
                    except _FsError as exc:
                        return _fail(26, f"curl: (26) Failed to open/read local data: {exc}")
                    headers += raw.decode(errors="replace").splitlines()
                else:
                    headers.append(str(value))
            elif arg == "-o":
                out_file = str(value)
            elif arg == "-w":
                write_out = str(value)
            elif arg == "-m":
                pass  # the emulated service answers at once
            elif arg.startswith("-") and not arg.startswith("--"):
                flags = arg[1:]
                fail = fail or "f" in flags
                silent = silent or "s" in flags
                show_errors = show_errors or "S" in flags
                i += 1
                continue
            else:
                url = arg
                i += 1
                continue
            i += 2
        status, body = self._imds(method, url, headers)
        if status == 0:
            return _fail(7, f"curl: (7) Failed to connect to {url[:60]}: Connection refused")
        stdout = b""
        if fail and status >= 400:
            shown = show_errors or not silent
            err = f"curl: (22) The requested URL returned error: {status}" if shown else ""
            return Exec(22, write_out.replace("%{http_code}", str(status)).encode(), err.encode())
        if out_file is not None:
            try:
                self._write(c.sh, out_file, body, c.user)
            except _FsError as exc:
                return _fail(23, f"curl: (23) Failure writing output to destination: {exc}")
        else:
            stdout = body
        return Exec(0, stdout + write_out.replace("%{http_code}", str(status)).encode())

    def _imds(self, method: str, url: str, headers: Sequence[str]) -> tuple[int, bytes]:
        """(HTTP status, body) of the emulated IMDS; status 0: nothing listens there."""
        prefix = f"http://{IMDS_HOST}/latest/"
        if not url.startswith(prefix):
            return 0, b""
        path = url[len(prefix) :]
        given = {
            name.strip().lower(): value.strip()
            for name, sep, value in (h.partition(":") for h in headers)
            if sep
        }
        if path == "api/token":
            if method != "PUT":
                return 405, b""
            ttl = given.get("x-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return 400, b""
            issued = secrets.token_urlsafe(32)
            self._tokens.add(issued)
            return 200, issued.encode()
        if method != "GET":
            return 405, b""
        token = given.get("x-aws-ec2-metadata-token")
        if token is not None and token not in self._tokens:
            return 401, b""
        if token is None and self.metadata.tokens_required and not self.imds_v1:
            return 401, b""
        md = self.metadata
        answers = {
            "meta-data/instance-id": md.instance_id,
            "meta-data/instance-type": md.instance_type,
            "meta-data/local-hostname": md.local_hostname,
            "meta-data/hostname": md.local_hostname,
            "meta-data/public-keys/": f"0={md.key_name}",
        }
        if md.public_keys:
            answers["meta-data/public-keys/0/openssh-key"] = md.public_keys[0]
        answer = answers.get(path)
        return (404, b"") if answer is None else (200, answer.encode())

    def _uname(self, c: _Ctx, args: list[str]) -> Exec:
        if "-r" in args:
            return _ok(_KERNEL[self.family] + "\n")
        if "-m" in args:
            return _ok("x86_64\n")
        return _ok(f"Linux {self.hostname} {_KERNEL[self.family]} #1 SMP x86_64 GNU/Linux\n")

    def _bash(self, c: _Ctx, args: list[str]) -> Exec:
        if args[:1] == ["--version"]:
            return _ok(
                f"GNU bash, version {_BASH[self.family]} (x86_64-redhat-linux-gnu)\n"
                "Copyright (C) 2022 Free Software Foundation, Inc.\n"
                "License GPLv3+: GNU GPL version 3 or later <http://gnu.org/licenses/gpl.html>\n"
            )
        if args[:1] == ["-c"] and len(args) > 1:
            result = self.execute(args[1], c.sh.stopped)
            return result
        return _fail(2, "bash: interactive shells are not emulated (stand-in)")

    def _journalctl(self, c: _Ctx, args: list[str]) -> Exec:
        quiet = reverse = False
        count: int | None = None
        unit: str | None = None
        output = "short"
        since: float | None = None
        i = 0
        while i < len(args):
            arg = args[i]
            value: str | None = None
            if "=" in arg and arg.startswith("--"):
                arg, value = arg.split("=", 1)
            if arg in ("-a", "--all", "--no-pager", "-b", "--boot", "--no-hostname"):
                pass
            elif arg in ("-q", "--quiet"):
                quiet = True
            elif arg in ("-r", "--reverse"):
                reverse = True
            elif arg in ("-n", "--lines", "-u", "--unit", "-o", "--output", "--since"):
                if value is None:
                    if i + 1 >= len(args):
                        return _fail(1, f"journalctl: option '{arg}' requires an argument")
                    value = args[i + 1]
                    i += 1
                if arg in ("-n", "--lines"):
                    count = int(value)
                elif arg in ("-u", "--unit"):
                    unit = _unit_name(value)
                elif arg in ("-o", "--output"):
                    output = value
                elif value == "today":
                    since = time.mktime((*time.localtime()[:3], 0, 0, 0, 0, 0, -1))
            elif arg.startswith("-n") and arg[2:].isdigit():
                count = int(arg[2:])
            else:
                return _fail(1, f"journalctl: unrecognized option '{arg}'")
            i += 1
        entries = [
            e
            for e in self._journal
            if (unit is None or e[2] == unit) and (since is None or e[0] >= since)
        ]
        if count is not None:
            entries = entries[-count:] if count else []
        if reverse:
            entries = entries[::-1]
        if output == "cat":
            lines = [e[3] for e in entries]
        else:
            lines = [
                f"{time.strftime('%b %d %H:%M:%S', time.localtime(e[0]))} {HOSTNAME} {e[1]}: {e[3]}"
                for e in entries
            ]
        if not lines and not quiet:
            lines = ["-- No entries --"]
        return _ok("".join(line + "\n" for line in lines))

    def _systemctl(self, c: _Ctx, args: list[str]) -> Exec:
        options = [a for a in args if a.startswith("-")]
        words = [a for a in args if not a.startswith("-")]
        verb = words[0] if words else "list-units"
        names = [_unit_name(w) for w in words[1:]]
        if verb == "list-units" and "--failed" in options:
            return self._list_failed()
        if verb in ("reboot", "poweroff"):
            return self._reboot(c, [])
        if not names:
            return _fail(1, f"Too few arguments for systemctl {verb} (stand-in)")
        name = names[0]
        unit = self.units.get(name)
        if verb == "is-active":
            state = unit.state if unit else "inactive"
            return Exec(0 if state == "active" else 3, f"{state}\n".encode())
        if verb == "is-enabled":
            if unit is None:
                return _fail(
                    1, f"Failed to get unit file state for {name}: No such file or directory"
                )
            return Exec(0 if unit.enabled else 1, b"enabled\n" if unit.enabled else b"disabled\n")
        if verb == "status":
            return self._status(name, unit)
        if verb not in ("start", "stop", "restart", "enable", "disable"):
            return _fail(1, f"Unknown command verb {verb} (stand-in).")
        if c.user != "root":
            what = "manage unit files" if verb in ("enable", "disable") else f"{verb} {name}"
            return _fail(1, f"Failed to {what}: {_AUTH_REQUIRED}")
        if unit is None:
            return _fail(5, f"Failed to {verb} {name}: Unit {name} not found.")
        link = f"/etc/systemd/system/multi-user.target.wants/{name}"
        if verb == "enable":
            message = (
                "" if unit.enabled else f"Created symlink {link} → /usr/lib/systemd/system/{name}."
            )
            unit.enabled = True
            return Exec(0, b"", (message + "\n").encode() if message else b"")
        if verb == "disable":
            message = f'Removed "{link}".' if unit.enabled else ""
            unit.enabled = False
            return Exec(0, b"", (message + "\n").encode() if message else b"")
        if verb == "stop":
            unit.state = "inactive"
            self._log("systemd[1]", name, f"Stopped {name} - {unit.description}.")
            return Exec(0)
        if name == self.failed_unit or (self.docker_down and name == "docker.service"):
            unit.state = "failed"
            return _fail(
                1,
                f"Job for {name} failed because the control process exited with error code.\n"
                f'See "systemctl status {name}" and "journalctl -xeu {name}" for details.',
            )
        unit.state = "active"
        self._log("systemd[1]", name, f"Started {name} - {unit.description}.")
        return Exec(0)

    def _list_failed(self) -> Exec:
        failed = [(n, u) for n, u in self.units.items() if u.state == "failed"]
        if not failed:
            return _ok("  UNIT LOAD ACTIVE SUB DESCRIPTION\n\n0 loaded units listed.\n")
        width = max(len(n) for n, _ in failed)
        rows = "".join(f"● {n:<{width}} loaded failed failed {u.description}\n" for n, u in failed)
        return _ok(
            f"  {'UNIT':<{width}} LOAD   ACTIVE SUB    DESCRIPTION\n{rows}\n"
            "LOAD   = Reflects whether the unit definition was properly loaded.\n"
            "ACTIVE = The high-level unit activation state, i.e. generalization of SUB.\n"
            "SUB    = The low-level unit activation state, values depend on unit type.\n\n"
            f"{len(failed)} loaded units listed.\n"
        )

    def _status(self, name: str, unit: _Unit | None) -> Exec:
        if unit is None:
            return _fail(4, f"Unit {name} could not be found.")
        enabled = "enabled" if unit.enabled else "disabled"
        since = time.strftime("%a %Y-%m-%d %H:%M:%S UTC", time.gmtime(self.boots[-1]))
        active = {
            "active": f"active (running) since {since}; 5s ago"
            if unit.kind == "simple"
            else f"active (exited) since {since}; 5s ago",
            "inactive": "inactive (dead)",
            "failed": f"failed (Result: exit-code) since {since}; 5s ago",
        }[unit.state]
        text = (
            f"● {name} - {unit.description}\n"
            f"     Loaded: loaded (/usr/lib/systemd/system/{name}; {enabled}; preset: enabled)\n"
            f"     Active: {active}\n"
        )
        if name == "chronyd.service" and unit.state == "active":
            text += _CHRONYD_EXTRA
        return Exec(0 if unit.state == "active" else 3, text.encode())

    def _reboot(self, c: _Ctx, args: list[str]) -> Exec:
        if c.user != "root":
            return _fail(1, f"Call to Reboot failed: {_AUTH_REQUIRED}")
        return Exec(0, reboot=True)

    def _dnf(self, c: _Ctx, args: list[str]) -> Exec:
        words = [a for a in args if not a.startswith("-")]
        if not words or words[0] != "install":
            return _fail(1, "dnf: only 'install' is emulated (stand-in)")
        if c.user != "root":
            return _fail(
                1,
                "Error: This command has to be run with superuser privileges "
                "(under the root user on most systems).",
            )
        if self.broken_dnf:
            return _fail(
                1,
                "Errors during downloading metadata for repository 'fedora':\n"
                "Error: Failed to download metadata for repo 'fedora': "
                "Cannot download repomd.xml: Cannot download repodata/repomd.xml: "
                "All mirrors were tried",
            )
        out = ["Last metadata expiration check: 0:00:12 ago.", "Dependencies resolved."]
        for name in words[1:]:
            if name in self.packages:
                out.append(f"Package {self.packages[name]} is already installed.")
                continue
            nevra = _INSTALLABLE[self.family].get(name)
            if nevra is None:
                return _fail(
                    1, f"No match for argument: {name}\nError: Unable to find a match: {name}"
                )
            self.packages[name] = nevra
            self.nodes[f"/usr/bin/{name}"] = _Node("file", 0o755, "root", b"#!/usr/bin/python3\n")
            out += [f"  Installing       : {nevra}  1/1", "Installed:", f"  {nevra}"]
        out.append("Complete!")
        return _ok("".join(line + "\n" for line in out))

    def _rpm(self, c: _Ctx, args: list[str]) -> Exec:
        if "-q" not in args:
            return _fail(1, "rpm: only -q is emulated (stand-in)")
        out, code = [], 0
        for name in (a for a in args if not a.startswith("-")):
            if name in self.packages:
                out.append(self.packages[name])
            else:
                out.append(f"package {name} is not installed")
                code = 1
        return Exec(code, "".join(line + "\n" for line in out).encode())

    def _audit(self, kind: str, op: str, name: str, exe: str) -> None:
        if self.units["auditd.service"].state != "active":
            return
        self._audit_serial += 1
        record = (
            f"type={kind} msg=audit({time.time():.3f}:{self._audit_serial}): pid={self._next_pid()}"
            f" uid=0 auid=1000 ses=2 subj=unconfined_u:unconfined_r:useradd_t:s0-s0:c0.c1023"
            f' msg=\'op={op} acct="{name}" exe="{exe}" hostname={HOSTNAME} addr=? '
            "terminal=ssh res=success'\n"
        )
        node = self.nodes["/var/log/audit/audit.log"]
        node.data += record.encode()

    def _useradd(self, c: _Ctx, args: list[str]) -> Exec:
        names = [a for a in args if not a.startswith("-")]
        if c.user != "root":
            return _fail(1, "useradd: Permission denied.\nuseradd: cannot lock /etc/passwd")
        if not names:
            return _fail(2, "Usage: useradd [options] LOGIN")
        name = names[-1]
        if name in self.users:
            return _fail(9, f"useradd: user '{name}' already exists")
        self.users.add(name)
        self.nodes[f"/home/{name}"] = _Node("dir", 0o700, name)
        self._audit("ADD_USER", "add-user", name, "/usr/sbin/useradd")
        return Exec(0)

    def _userdel(self, c: _Ctx, args: list[str]) -> Exec:
        names = [a for a in args if not a.startswith("-")]
        if c.user != "root":
            return _fail(1, "userdel: Permission denied.\nuserdel: cannot lock /etc/passwd")
        if not names or names[-1] not in self.users:
            return _fail(6, f"userdel: user '{names[-1] if names else ''}' does not exist")
        name = names[-1]
        self.users.discard(name)
        if "-r" in args:
            for path in [
                p for p in self.nodes if p == f"/home/{name}" or p.startswith(f"/home/{name}/")
            ]:
                del self.nodes[path]
        self._audit("DEL_USER", "delete-user", name, "/usr/sbin/userdel")
        return Exec(0)

    def _restorecon(self, c: _Ctx, args: list[str]) -> Exec:
        for path in (a for a in args if not a.startswith("-")):
            full = self._abs(c.sh, path)
            if self._lookup(full) is None:
                return _fail(255, f"restorecon: lstat({path}) failed: No such file or directory")
            if c.user != "root":
                return _fail(
                    255, f"restorecon: Could not set context for {path}: Permission denied"
                )
        return Exec(0)

    def _ssh_keygen(self, c: _Ctx, args: list[str]) -> Exec:
        opts: dict[str, str] = {}
        i = 0
        while i < len(args):
            if args[i] in ("-t", "-N", "-f", "-C", "-b") and i + 1 < len(args):
                opts[args[i]] = args[i + 1]
                i += 1
            i += 1
        path = opts.get("-f")
        if path is None:
            return _fail(1, "ssh-keygen: -f is required here (stand-in: no prompts)")
        if self._lookup(self._abs(c.sh, path)) is not None:
            return _fail(1, f"{path} already exists.\nOverwrite (y/n)? ")
        kind = opts.get("-t", "rsa")
        algo = {"rsa": "ssh-rsa", "ed25519": "ssh-ed25519", "ecdsa": "ecdsa-sha2-nistp256"}.get(
            kind
        )
        if algo is None:
            return _fail(1, f"unknown key type {kind}")
        blob = struct.pack(">I", len(algo)) + algo.encode() + secrets.token_bytes(64)
        public = f"{algo} {base64.b64encode(blob).decode()} {c.user}@{HOSTNAME}\n"
        private = (
            "-----BEGIN OPENSSH PRIVATE KEY-----\n(stand-in)\n-----END OPENSSH PRIVATE KEY-----\n"
        )
        try:
            self._write(c.sh, path, private.encode(), c.user)
            self.nodes[self._abs(c.sh, path)].mode = 0o600
            self._write(c.sh, path + ".pub", public.encode(), c.user)
        except _FsError as exc:
            return _fail(1, f'Saving key "{path}" failed: {exc}')
        return Exec(0)

    def _umount(self, c: _Ctx, args: list[str]) -> Exec:
        target = next((a for a in args if not a.startswith("-")), "")
        if c.user != "root":
            return _fail(32, f"umount: {target}: must be superuser to unmount.")
        if target == "/":
            return _fail(32, "umount: /: target is busy.")
        return _fail(32, f"umount: {target}: not mounted.")

    def _last(self, c: _Ctx, args: list[str]) -> Exec:
        kernel = _KERNEL[self.family][:16]
        lines = []
        boots = self.boots
        for k in range(len(boots) - 1, -1, -1):
            start = time.strftime("%a %b %e %H:%M", time.localtime(boots[k]))
            if k == len(boots) - 1:
                tail = "  still running"
            else:
                end = time.strftime("%H:%M", time.localtime(boots[k + 1]))
                minutes = int((boots[k + 1] - boots[k]) // 60)
                tail = f" - {end}  ({minutes // 60:02d}:{minutes % 60:02d})"
            lines.append(f"reboot   system boot  {kernel:<16} {start}{tail}")
        begins = time.strftime("%a %b %e %H:%M:%S %Y", time.localtime(boots[0]))
        return _ok("".join(line + "\n" for line in lines) + f"\nwtmp begins {begins}\n")

    # -- docker and atomic (Atomic Host) ------------------------------------
    def _docker(self, c: _Ctx, args: list[str]) -> Exec:
        verb = args[0] if args else ""
        if verb == "version":
            client = _DOCKER_VERSION.format(role="Client", minimum="")
            if c.user != "root":
                return Exec(1, client.encode(), (_DOCKER_DENIED + "\n").encode())
            if self.docker_down:
                return Exec(1, client.encode(), (_DOCKER_DOWN + "\n").encode())
            server = _DOCKER_VERSION.format(role="Server", minimum=" (minimum version 1.12)")
            return _ok(client + "\n" + server + " Experimental:    false\n")
        if c.user != "root":
            return _fail(1, _DOCKER_DENIED)
        if self.docker_down:
            return _fail(1, _DOCKER_DOWN)
        if verb == "pull" and len(args) > 1:
            return _ok(self._pull(_image_name(args[1])))
        if verb == "run":
            return self._docker_run(c, args[1:])
        if verb in ("images", "ps"):
            return _ok("REPOSITORY   TAG   IMAGE ID   CREATED   SIZE\n")
        return _fail(1, f"docker: '{verb}' is not emulated (stand-in)")

    def _pull(self, image: str) -> str:
        repo = image.rsplit(":", 1)[0]
        registry = "registry.fedoraproject.org" if repo == "fedora" else "docker.io/library"
        self.images.add(image)
        digest = secrets.token_hex(32)
        return (
            f"Trying to pull repository {registry}/{repo} ... \n"
            f"{image.rsplit(':', 1)[1]}: Pulling from {registry}/{repo}\n"
            f"{digest[:12]}: Pull complete \nDigest: sha256:{digest}\n"
            f"Status: Downloaded newer image for {registry}/{image}\n"
        )

    def _docker_run(self, c: _Ctx, args: list[str]) -> Exec:
        mounts: list[str] = []
        privileged = False
        i = 0
        while i < len(args) and args[i].startswith("-"):
            arg = args[i]
            if arg in ("-v", "--volume", "--name", "-e", "--env", "--net", "--network"):
                if arg in ("-v", "--volume") and i + 1 < len(args):
                    mounts.append(args[i + 1])
                i += 1
            elif arg.startswith(("-v=", "--volume=")):
                mounts.append(arg.split("=", 1)[1])
            elif arg == "--privileged":
                privileged = True
            i += 1
        if i >= len(args):
            return _fail(125, '"docker run" requires at least 1 argument(s).')
        image, command = _image_name(args[i]), args[i + 1 :]
        pulled = b""
        if image not in self.images:
            pulled = f"Unable to find image '{image}' locally\n{self._pull(image)}".encode()
        result = self._in_container(c, command, mounts, privileged)
        return Exec(result.code, result.stdout, pulled + result.stderr)

    def _in_container(
        self, c: _Ctx, command: list[str], mounts: list[str], privileged: bool
    ) -> Exec:
        if not command or command[0] in ("true", "/bin/true", "sh", "/bin/sh", "/bin/bash"):
            return Exec(0)
        if command[0] in ("echo", "/bin/echo"):
            return _ok(" ".join(command[1:]) + "\n")
        if command[0] == "chroot" and len(command) > 2:
            root = command[1]
            if not any(m.split(":")[:2] == ["/", root] for m in mounts):
                return _fail(1, f"chroot: can't change root directory to '{root}': No such file")
            inner = command[2:]
            if inner[:2] == ["docker", "version"] and not privileged:
                client = _DOCKER_VERSION.format(role="Client", minimum="")
                return Exec(1, client.encode(), (_DOCKER_DENIED + "\n").encode())
            program = self._programs.get(inner[0])
            if program is None:
                return _fail(127, f"chroot: can't execute '{inner[0]}': No such file or directory")
            return program(_Ctx(c.sh, "root", b""), inner[1:])
        return _fail(
            127,
            "container_linux.go:235: starting container process caused "
            f'"exec: \\"{command[0]}\\": executable file not found in $PATH"',
        )

    def _atomic(self, c: _Ctx, args: list[str]) -> Exec:
        if args[:2] == ["host", "status"]:
            return _ok(
                "State: idle\nDeployments:\n● ostree://fedora-atomic:fedora/29/x86_64/atomic-host\n"
                "                   Version: 29.20190521.0 (2019-05-21T00:46:50Z)\n"
            )
        if not args or args[0] != "run" or len(args) < 2:
            return _fail(1, "atomic: only 'run IMAGE' and 'host status' are emulated (stand-in)")
        if c.user != "root":
            return _fail(1, "Atomic must be run as root.")
        shown = f"docker run --rm {' '.join(args[1:])}\n".encode()
        result = self._docker(c, ["run", "--rm", *args[1:]])
        return Exec(result.code, shown + result.stdout, result.stderr)


def _unit_name(name: str) -> str:
    return name if "." in name else name + ".service"


def _image_name(name: str) -> str:
    for prefix in ("docker.io/library/", "docker.io/", "registry.fedoraproject.org/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name if ":" in name else name + ":latest"


def _visible(byte: int) -> str:
    if byte < 32:
        return "^" + chr(byte + 64)
    if byte == 127:
        return "^?"
    if byte > 127:
        return "M-" + _visible(byte - 128)
    return chr(byte)


# =============================================================================
# The SSH server
# =============================================================================
Authorizer = Callable[[paramiko.PKey], bool]
_CLOSE_GRACE = 2.0
_PARAMIKO_LOG = "devel.sshhost.paramiko"


class _Demote(logging.Filter):
    """paramiko logs every reset or aborted handshake as an ERROR with a traceback:
    for a host that refuses connections on purpose, that is DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(_PARAMIKO_LOG).isEnabledFor(logging.DEBUG)


logging.getLogger(_PARAMIKO_LOG).addFilter(_Demote())


def _authorizer(
    authorized: Authorizer | Iterable[paramiko.PKey] | None, accept_any_key: bool
) -> Authorizer:
    if accept_any_key:
        if authorized is not None:
            raise ValueError("give authorized keys or accept_any_key=True, not both")
        return lambda key: True
    if authorized is None:
        raise ValueError("no key authorised: pass authorized=... (or accept_any_key=True)")
    if callable(authorized):
        return authorized
    allowed = {(k.get_name(), k.asbytes()) for k in authorized}
    return lambda key: (key.get_name(), key.asbytes()) in allowed


def load_authorized_keys(path: Path) -> list[paramiko.PKey]:
    """Public keys from an OpenSSH authorized_keys (or .pub) file; options are ignored."""
    keys: list[paramiko.PKey] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        for k in range(len(fields) - 1):
            if fields[k].startswith(("ssh-", "ecdsa-", "sk-")):
                blob = base64.b64decode(fields[k + 1])
                keys.append(paramiko.PKey.from_type_string(fields[k], blob))
                break
        else:
            raise ValueError(f"{path}:{number}: no public key on this line")
    if not keys:
        raise ValueError(f"{path}: no public keys")
    return keys


class _Server(paramiko.ServerInterface):
    def __init__(self, host: SshTestHost, address: str) -> None:
        self.host = host
        self.address = address

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if username != self.host.user:
            return AUTH_FAILED
        if not self.host.keys_ready():
            self.host.key_refusals += 1
            return AUTH_FAILED
        if not self.host.authorized(key):
            return AUTH_FAILED
        # Counted here, not by watching the transport: a short session may be gone
        # before a watcher looks.
        self.host.os.take_login_key(f"{key.get_name()} {key.get_base64()} {self.host.user}-login")
        self.host.count_login(self.address)
        return AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return OPEN_SUCCEEDED
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        return self.host.on_exec(channel, command.decode(errors="replace"))


class SshTestHost:
    """A loopback SSH server that answers like a booted Fedora instance (a stand-in)."""

    def __init__(
        self,
        family: str = "Base",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        user: str = USER,
        authorized: Authorizer | Iterable[paramiko.PKey] | None = None,
        accept_any_key: bool = False,
        boot_delay: float = 0.0,
        key_delay: float = 0.0,
        reboot_delay: float = 1.0,
        never_accept: Literal["hang", "refuse"] | None = None,
        hang_on: str | None = None,
        die_after: int | None = None,
        host_key: paramiko.PKey | None = None,
        selinux_permissive: bool = False,
        failed_unit: str | None = None,
        broken_dnf: bool = False,
        tmp_mode: int = 0o1777,
        services_reset: bool = False,
        empty_journal: bool = False,
        docker_down: bool = False,
        net_ifnames: bool = True,
        metadata: InstanceMetadata | None = None,
        imds_v1: bool = False,
        xen_root: bool = False,
        cloud_init_errors: bool = False,
        wrong_hostname: bool = False,
        baked_key: bool = False,
    ) -> None:
        if never_accept not in (None, "hang", "refuse"):
            raise ValueError(f"never_accept must be 'hang' or 'refuse', not {never_accept!r}")
        self.authorized = _authorizer(authorized, accept_any_key)
        self.accept_any_key = accept_any_key
        self.bind_host = host
        self.port = port
        self.user = user
        self.boot_delay = boot_delay
        self.key_delay = key_delay
        self.reboot_delay = reboot_delay
        self.never_accept = never_accept
        self.hang_on = re.compile(hang_on) if hang_on else None
        self.die_after = die_after
        self.host_key: paramiko.PKey = host_key or paramiko.ECDSAKey.generate()
        self.os = FakeFedora(
            family,
            user=user,
            selinux_permissive=selinux_permissive,
            failed_unit=failed_unit,
            broken_dnf=broken_dnf,
            tmp_mode=tmp_mode,
            services_reset=services_reset,
            empty_journal=empty_journal,
            docker_down=docker_down,
            net_ifnames=net_ifnames,
            metadata=metadata,
            imds_v1=imds_v1,
            xen_root=xen_root,
            cloud_init_errors=cloud_init_errors,
            wrong_hostname=wrong_hostname,
            baked_key=baked_key,
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._transports: list[paramiko.Transport] = []
        self._held: list[socket.socket] = []
        self._commands: list[str] = []
        self._received = 0
        self._down_until = 0.0
        self._keys_at = 0.0
        self._dead = False
        self.logins = 0
        self.refused = 0  # connections reset while down (booting, rebooting)
        self.key_refusals = 0  # logins refused before the key was in place

    # -- facts for tests ----------------------------------------------------
    @property
    def family(self) -> str:
        return self.os.family

    @property
    def fingerprint(self) -> str:
        from autocloud_ami.ssh import host_key_fingerprint

        return host_key_fingerprint(self.host_key)

    @property
    def commands(self) -> list[str]:
        """Every command run (answered or hung on), in order."""
        with self._lock:
            return list(self._commands)

    @property
    def boots(self) -> int:
        return len(self.os.boots)

    @property
    def up(self) -> bool:
        with self._lock:
            return self._up_locked()

    def _up_locked(self) -> bool:
        return not self._dead and self.never_accept is None and time.monotonic() >= self._down_until

    def count_login(self, peer: str) -> None:
        with self._lock:
            self.logins += 1
        self.os.note_login(self.user, peer, "publickey")

    def keys_ready(self) -> bool:
        return time.monotonic() >= self._keys_at

    def come_up(self) -> None:
        """End the boot or reboot delay now (one of ``math.inf`` waits for this)."""
        now = time.monotonic()
        with self._lock:
            self._down_until = now
            if math.isinf(self._keys_at) and not math.isinf(self.key_delay):
                self._keys_at = now + self.key_delay  # the key delay counts from the boot

    def install_keys(self) -> None:
        """End the key delay now: cloud-init has put the authorised keys in place."""
        with self._lock:
            self._keys_at = time.monotonic()

    # -- lifecycle ----------------------------------------------------------
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Self:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.bind_host, self.port))
        listener.listen(64)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        now = time.monotonic()
        self._down_until = now + self.boot_delay
        self._keys_at = self._down_until + self.key_delay
        if self.accept_any_key:
            log.warning("sshhost %s: accepting ANY public key (stand-in option)", self.address)
        self._spawn(self._accept_loop, "sshhost-accept")
        log.info("sshhost %s: %s stand-in listening", self.address, self.family)
        return self

    @property
    def address(self) -> str:
        return f"{self.bind_host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        """Close everything and join every thread this host started."""
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        self._drop_all()
        with self._lock:
            held, self._held = self._held, []
        for sock in held:
            sock.close()
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = [t for t in self._threads if t.is_alive()]
            if not threads:
                break
            if time.monotonic() >= deadline:
                log.error("sshhost %s: threads still running: %s", self.address, threads)
                break
            threads[0].join(max(0.0, min(0.5, deadline - time.monotonic())))

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _drop_all(self) -> None:
        with self._lock:
            transports, self._transports = self._transports, []
        for transport in transports:
            transport.close()

    # -- connections --------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        listener = self._listener
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([listener], [], [], 0.1)
                if not ready:
                    continue
                sock, peer = listener.accept()
            except (OSError, ValueError):
                return  # listener closed by stop()
            if self.never_accept == "hang":
                with self._lock:
                    self._held.append(sock)  # TCP accepted; no banner, ever
                continue
            with self._lock:
                up = self._up_locked()
            if not up:
                self.refused += 1
                _reset(sock)
                continue
            self._spawn(self._serve_connection, "sshhost-conn", sock, f"{peer[0]} port {peer[1]}")

    def _serve_connection(self, sock: socket.socket, peer: str) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(sock)
        transport.set_log_channel(_PARAMIKO_LOG)
        transport.add_server_key(self.host_key)
        with self._lock:
            if self._stop.is_set():
                transport.close()
                return
            self._transports = [t for t in self._transports if t.is_active()]
            self._transports.append(transport)
        try:
            transport.start_server(server=_Server(self, peer))
        except (paramiko.SSHException, EOFError, OSError):
            transport.close()

    def on_exec(self, channel: paramiko.Channel, command: str) -> bool:
        with self._lock:
            self._received += 1
            dying = self.die_after is not None and self._received > self.die_after
            if dying:
                self._dead = True
            else:
                self._commands.append(command)
        if dying:
            log.info("sshhost %s: dying (die_after=%s)", self.address, self.die_after)
            self._spawn(self._drop_all, "sshhost-die")
            return True
        self._spawn(self._run_command, "sshhost-exec", channel, command)
        return True

    def _run_command(self, channel: paramiko.Channel, command: str) -> None:
        def gone() -> bool:
            return self._stop.is_set() or channel.closed

        try:
            if self.hang_on is not None and self.hang_on.search(command):
                while not gone():
                    self._stop.wait(0.05)
                return
            result = self.os.execute(command, gone)
            if result.reboot:
                self._reboot()
                return
            channel.sendall(result.stdout)
            channel.sendall_stderr(result.stderr)
            channel.send_exit_status(result.code)
            channel.shutdown_write()  # EOF
            # paramiko answers the exec request only after check_channel_exec_request
            # returns, from its own thread, so a CLOSE sent now could overtake that
            # answer and fail the client's exec_command. A client sends its EOF after
            # the answer (ParamikoSession, ssh -n): close once it has, or after a grace.
            grace = time.monotonic() + _CLOSE_GRACE
            while not gone() and not channel.eof_received and time.monotonic() < grace:
                self._stop.wait(0.005)
        except (OSError, EOFError, paramiko.SSHException):
            pass  # the client went away
        finally:
            _close_quietly(channel)

    def _reboot(self) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self.reboot_delay
        log.info("sshhost %s: rebooting, down for %.1fs", self.address, self.reboot_delay)
        self.os.boot()
        self._drop_all()


def _close_quietly(channel: paramiko.Channel) -> None:
    try:
        channel.close()
    except (OSError, EOFError, paramiko.SSHException):
        pass  # the connection is already gone


def _reset(sock: socket.socket) -> None:
    """Close with RST, like a port nothing listens on (as near as a listener can get)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


# =============================================================================
# Command line
# =============================================================================
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devel.sshhost",
        description="A loopback SSH stand-in for a booted Fedora cloud instance (NOT Fedora).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--family", choices=("Base", "Atomic"), default="Base")
    parser.add_argument("--user", default=USER)
    keys = parser.add_mutually_exclusive_group(required=True)
    keys.add_argument("--authorized-keys", type=Path, help="OpenSSH public keys to let in")
    keys.add_argument(
        "--accept-any-key", action="store_true", help="let any key in (throw-away demos only)"
    )
    parser.add_argument(
        "--fail", action="append", default=[], choices=sorted(FAULTS), help="misbehave"
    )
    parser.add_argument("--never-accept", choices=("hang", "refuse"))
    parser.add_argument("--hang-on", metavar="REGEX", help="never answer matching commands")
    parser.add_argument("--die-after", type=int, metavar="N", help="drop and stay down after N")
    parser.add_argument("--boot-delay", type=float, default=0.0)
    parser.add_argument("--key-delay", type=float, default=0.0)
    parser.add_argument("--reboot-delay", type=float, default=1.0)
    parser.add_argument("--no-net-ifnames", action="store_true", help="no net.ifnames=0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    authorized = load_authorized_keys(args.authorized_keys) if args.authorized_keys else None
    host = SshTestHost(
        args.family,
        host=args.host,
        port=args.port,
        user=args.user,
        authorized=authorized,
        accept_any_key=args.accept_any_key,
        boot_delay=args.boot_delay,
        key_delay=args.key_delay,
        reboot_delay=args.reboot_delay,
        never_accept=args.never_accept,
        hang_on=args.hang_on,
        die_after=args.die_after,
        net_ifnames=not args.no_net_ifnames,
        **fault_options(args.fail),
    )
    done = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with host:
        print(f"host key {host.fingerprint}", flush=True)
        print(f"listening on {host.bind_host}:{host.port}", flush=True)
        while not done.wait(1.0):
            pass
    print(f"stopped after {len(host.commands)} commands", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = [
    "FAULTS",
    "Exec",
    "FakeFedora",
    "InstanceMetadata",
    "SshTestHost",
    "fault_options",
    "load_authorized_keys",
    "main",
    "parse_command_line",
]
