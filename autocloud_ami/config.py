"""autocloud_ami's settings, read once from the fedmsg config and validated.

Every ``autocloud_ami.*`` key is declared here and documented in
``fedmsg.d/autocloud_ami.py``. ``AutocloudConfig.from_fedmsg(hub.config)``
raises ``ConfigError`` naming the key for anything unknown, missing, mistyped
or unsafe (an SSH CIDR wider than one host unless explicitly widened).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fedimg.aws import check_extra_tags
from fedimg.messages import ARCHES, REGION_RE
from fedimg.settings import ConfigError, load, load_consumer_config, setting

NAMESPACE = "autocloud_ami"
# Today's default matrix: one scenario per architecture.
DEFAULT_SCENARIOS: dict[str, list[str]] = {"x86_64": ["t3.small"], "aarch64": ["t4g.small"]}
MAX_TYPES_PER_ARCH = 8
INSTANCE_TYPE_RE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")


def parse_host_port(value: str) -> tuple[str, int]:
    """``"host:port"`` (``"[v6]:port"`` for IPv6) as a tuple, else ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"not host:port: {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError(f"port out of range in {value!r}")
    return host, number


def check_cidr(value: str, allow_wide: bool) -> str:
    """Return ``value`` normalised if it is a CIDR SSH may be opened to.

    A single host (/32 or /128) always; a wider network only with
    ``allow_wide``; never the whole internet (prefix length 0).
    """
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"autocloud_ami.ssh_cidr: not a CIDR: {value!r} ({exc})") from exc
    if net.prefixlen == 0:
        raise ValueError(f"autocloud_ami.ssh_cidr: {value} opens SSH to the whole internet")
    if net.prefixlen != net.max_prefixlen and not allow_wide:
        raise ValueError(
            f"autocloud_ami.ssh_cidr: {value} is wider than one host; set "
            "autocloud_ami.ssh_cidr_allow_wide to True if that is intended"
        )
    return str(net)


def _http_url(key: str, value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{key}: not an http(s) URL: {value!r}")


def _check_matrix(key: str, matrix: Mapping[str, list[str]]) -> None:
    if not matrix:
        raise ValueError(f"{key}: at least one architecture is needed")
    for arch, types in matrix.items():
        if arch not in ARCHES:
            raise ValueError(f"{key}: unknown architecture {arch!r} (known: {sorted(ARCHES)})")
        if not types:
            raise ValueError(f"{key}: no instance type for {arch}")
        if len(types) > MAX_TYPES_PER_ARCH:
            raise ValueError(f"{key}: more than {MAX_TYPES_PER_ARCH} instance types for {arch}")
        for itype in types:
            if not INSTANCE_TYPE_RE.match(itype):
                raise ValueError(f"{key}: bad type {itype!r} for {arch}")
        if len(set(types)) != len(types):
            raise ValueError(f"{key}: an instance type is listed twice for {arch}: {types}")


def scenario_matrix(
    instance_types: Mapping[str, str] | None, scenarios: Mapping[str, list[str]] | None
) -> dict[str, list[str]]:
    """The matrix in use: ``scenarios``, else one scenario per ``instance_types`` entry.

    Both set must say the same (``instance_types`` is one scenario per
    architecture), else ValueError naming both keys.
    """
    old = None
    if instance_types is not None:
        old = {arch: [itype] for arch, itype in instance_types.items()}
        _check_matrix("autocloud_ami.instance_types", old)
    if scenarios is None:
        return old if old is not None else {a: list(t) for a, t in DEFAULT_SCENARIOS.items()}
    new = {arch: list(types) for arch, types in scenarios.items()}
    _check_matrix("autocloud_ami.scenarios", new)
    if old is not None and old != new:
        raise ValueError(
            f"autocloud_ami.instance_types {dict(instance_types or {})} and "
            f"autocloud_ami.scenarios {new} disagree: set only autocloud_ami.scenarios "
            "(instance_types means one scenario per architecture)"
        )
    return new


_POSITIVE = (
    "deadline",
    "boot_timeout",
    "ssh_timeout",
    "reboot_timeout",
    "cleanup_timeout",
    "poll_interval",
    "sweep_interval",
    "queue_timeout",
    "resultsdb_timeout",
)


@dataclass(frozen=True)
class AutocloudConfig:
    """Every ``autocloud_ami.*`` setting, typed."""

    resultsdb_url: str = setting("autocloud_ami.resultsdb_url", doc="ResultsDB API v2.0 base URL")
    ssh_cidr: str = setting("autocloud_ami.ssh_cidr", doc="the runner's own address, as a CIDR")
    enabled: bool = setting("autocloud_ami.enabled", False)
    resultsdb_spool: str = setting("autocloud_ami.resultsdb_spool", "/var/spool/autocloud_ami")
    resultsdb_retries: int = setting("autocloud_ami.resultsdb_retries", 3)
    resultsdb_backoff: float = setting("autocloud_ami.resultsdb_backoff", 1.0)
    resultsdb_timeout: float = setting("autocloud_ami.resultsdb_timeout", 30.0)
    # The older form of ``scenarios`` (one instance type per architecture); None: not set.
    instance_types: dict[str, str] | None = setting("autocloud_ami.instance_types", None)
    # Architecture -> instance types; None: from instance_types, else DEFAULT_SCENARIOS.
    # After validation it always holds the matrix in use (see ``matrix``).
    scenarios: dict[str, list[str]] | None = setting("autocloud_ami.scenarios", None)
    ssh_user: str = setting("autocloud_ami.ssh_user", "fedora")
    ssh_cidr_allow_wide: bool = setting("autocloud_ami.ssh_cidr_allow_wide", False)
    subnet_id: str | None = setting("autocloud_ami.subnet_id", None)
    ssh_override: str | None = setting("autocloud_ami.ssh_override", None)
    max_concurrent: int = setting("autocloud_ami.max_concurrent", 4)
    queue_timeout: float = setting("autocloud_ami.queue_timeout", 4 * 3600.0)
    deadline: float = setting("autocloud_ami.deadline", 3600.0)
    launch_retry_timeout: float = setting("autocloud_ami.launch_retry_timeout", 300.0)
    boot_timeout: float = setting("autocloud_ami.boot_timeout", 600.0)
    host_key_wait: float = setting("autocloud_ami.host_key_wait", 180.0)
    require_host_key: bool = setting("autocloud_ami.require_host_key", False)
    ssh_timeout: float = setting("autocloud_ami.ssh_timeout", 600.0)
    reboot_timeout: float = setting("autocloud_ami.reboot_timeout", 600.0)
    cleanup_timeout: float = setting("autocloud_ami.cleanup_timeout", 900.0)
    poll_interval: float = setting("autocloud_ami.poll_interval", 5.0)
    self_destruct: bool = setting("autocloud_ami.self_destruct", True)
    output_dir: str | None = setting("autocloud_ami.output_dir", None)
    output_url: str | None = setting("autocloud_ami.output_url", None)
    sweep_interval: float = setting("autocloud_ami.sweep_interval", 600.0)
    regions: list[str] = setting("autocloud_ami.regions", ["us-east-1"])
    aws_max_attempts: int = setting("autocloud_ami.aws_max_attempts", 10)
    extra_tags: dict[str, str] = setting(
        "autocloud_ami.extra_tags", {}, doc="tags on every resource autocloud_ami creates"
    )

    def __post_init__(self) -> None:
        _http_url("autocloud_ami.resultsdb_url", self.resultsdb_url)
        object.__setattr__(self, "ssh_cidr", check_cidr(self.ssh_cidr, self.ssh_cidr_allow_wide))
        self._check_targets()
        self._check_numbers()
        check_extra_tags("autocloud_ami.extra_tags", self.extra_tags)
        if self.ssh_override is not None:
            parse_host_port(self.ssh_override)
        if not self.ssh_user or not self.ssh_user.isascii() or " " in self.ssh_user:
            raise ValueError(f"autocloud_ami.ssh_user: bad user name {self.ssh_user!r}")
        if self.output_url is not None:
            if self.output_dir is None:
                raise ValueError("autocloud_ami.output_url needs autocloud_ami.output_dir")
            _http_url("autocloud_ami.output_url", self.output_url)

    def _check_targets(self) -> None:
        if not self.regions:
            raise ValueError("autocloud_ami.regions: at least one region is needed")
        for region in self.regions:
            if not REGION_RE.match(region):
                raise ValueError(f"autocloud_ami.regions: not an AWS region name: {region!r}")
        object.__setattr__(self, "scenarios", scenario_matrix(self.instance_types, self.scenarios))

    def _check_numbers(self) -> None:
        if self.max_concurrent < 1 or self.aws_max_attempts < 1:
            raise ValueError("autocloud_ami.max_concurrent and aws_max_attempts must be >= 1")
        if self.resultsdb_retries < 0:
            raise ValueError("autocloud_ami.resultsdb_retries must be >= 0")
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ValueError(f"autocloud_ami.{name} must be positive")
        for name in ("launch_retry_timeout", "host_key_wait", "resultsdb_backoff"):
            if getattr(self, name) < 0:
                raise ValueError(f"autocloud_ami.{name} must not be negative")
        if self.deadline < self.boot_timeout:
            raise ValueError("autocloud_ami.deadline is shorter than autocloud_ami.boot_timeout")

    @property
    def matrix(self) -> dict[str, tuple[str, ...]]:
        """Architecture -> the instance types (scenarios) an AMI of it is tested on."""
        assert self.scenarios is not None  # set by __post_init__
        return {arch: tuple(types) for arch, types in self.scenarios.items()}

    @property
    def ssh_override_address(self) -> tuple[str, int] | None:
        """``ssh_override`` as ``(host, port)``, or None in production."""
        return parse_host_port(self.ssh_override) if self.ssh_override else None

    @classmethod
    def from_fedmsg(cls, raw: Mapping[str, Any]) -> AutocloudConfig:
        """Validate and return the ``autocloud_ami.*`` part of a fedmsg config."""
        return load(cls, raw, NAMESPACE)

    @classmethod
    def from_consumer_config(cls, consumer_config: Mapping[str, Any]) -> AutocloudConfig:
        """Validate and return a fedora-messaging ``[consumer_config]`` (same keys)."""
        return load_consumer_config(cls, consumer_config, NAMESPACE)


__all__ = ["AutocloudConfig", "ConfigError", "check_cidr", "parse_host_port"]
