"""fedimg's settings, read once from the fedmsg config and validated.

Every key lives in the fedmsg config (``fedmsg.d/fedimg.py`` documents each);
``FedimgConfig.from_fedmsg(hub.config)`` is called once at start-up.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any
from urllib.parse import urlsplit

from fedimg.aws import check_extra_tags
from fedimg.messages import FAILED, NEEDS_INSPECTION, SUMMARY_TESTCASE
from fedimg.policy import GatePolicy, default_policy, load_policy
from fedimg.settings import ConfigError, load, load_consumer_config, setting
from fedimg.xzblocks import BLOCKS_IN_FLIGHT

REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
# EBS's largest gp2/gp3/io1/standard volume: no image can be bigger.
MAX_VOLUME_GIB = 16384
VOLUME_TYPES = frozenset({"gp2", "gp3", "io1", "io2", "standard", "st1", "sc1"})
ARCHES = frozenset({"x86_64", "aarch64"})
# productmd's compose types (the compose id's suffix: none, .t, .n, .ci).
COMPOSE_TYPES = frozenset({"production", "test", "nightly", "ci"})
DEFAULT_DEPRECATION_DAYS = {"production": 730, "test": 30, "nightly": 14, "ci": 7}
# Time-based copies (CopyImage SnapshotCopyCompletionDurationMinutes): 15 minutes to
# 48 hours, in steps of 15 minutes.
COPY_COMPLETION_STEP = 15
COPY_COMPLETION_MAX = 48 * 60


def check_region(name: str) -> str:
    """Return ``name`` if it looks like an AWS region name, else raise ValueError."""
    if not isinstance(name, str) or not REGION_RE.match(name):
        raise ValueError(f"not an AWS region name: {name!r}")
    return name


@dataclass(frozen=True)
class FedimgConfig:
    """Every ``fedimg.*`` setting, typed."""

    resultsdb_url: str = setting("fedimg.resultsdb_url", doc="ResultsDB API v2.0 base URL")
    stage_enabled: bool = setting("fedimg.stage.enabled", False)
    promote_enabled: bool = setting("fedimg.promote.enabled", False)
    health_enabled: bool = setting("fedimg.health.enabled", False)
    staging_region: str = setting("fedimg.aws.staging_region", "us-east-1")
    regions: list[str] = setting("fedimg.aws.regions", [])
    volume_types: list[str] = setting("fedimg.aws.volume_types", ["gp3"])
    upload_workers: int = setting("fedimg.aws.upload_workers", 16)
    aws_max_attempts: int = setting("fedimg.aws.max_attempts", 10)
    variants: list[str] = setting("fedimg.compose.variants", ["Cloud", "AtomicHost", "CloudImages"])
    arches: list[str] = setting("fedimg.compose.arches", ["x86_64", "aarch64"])
    allowed_hosts: list[str] = setting("fedimg.compose.allowed_hosts", [])
    max_images: int = setting("fedimg.compose.max_images", 50)
    stage_workers: int = setting("fedimg.stage.workers", 2)
    max_volume_gib: int = setting("fedimg.stage.max_volume_gib", 32)
    http_timeout: float = setting("fedimg.http.timeout", 60.0)
    http_retries: int = setting("fedimg.http.retries", 5)
    xz_blocks_in_flight: int = setting("fedimg.download.xz_blocks_in_flight", BLOCKS_IN_FLIGHT)
    required_testcases: list[str] = setting("fedimg.gate.required_testcases", [SUMMARY_TESTCASE])
    reject_outcomes: list[str] = setting("fedimg.gate.reject_outcomes", [FAILED, NEEDS_INSPECTION])
    gate_deadline: float = setting("fedimg.gate.deadline", 6 * 3600.0)
    policy_file: str = setting(
        "fedimg.gate.policy_file",
        "",
        doc="YAML gate policy (fedimg.policy); empty: required_testcases for every image",
    )
    waiverdb_url: str = setting(
        "fedimg.waiverdb_url", "", doc="WaiverDB API v1.0 base URL; empty: no waivers"
    )
    delete_rejected: bool = setting("fedimg.gate.delete_rejected", False)
    copy_concurrency: int = setting("fedimg.promote.max_concurrent_copies", 25)
    copy_timeout: float = setting("fedimg.promote.copy_timeout", 3 * 3600.0)
    publish_retry_timeout: float = setting("fedimg.promote.publish_retry_timeout", 1800.0)
    fedora_image_uploader_message: bool = setting(
        "fedimg.promote.fedora_image_uploader_message",
        True,
        doc="also announce a release as fedora_image_uploader.published.v1.aws.*",
    )
    reconcile_interval: float = setting("fedimg.reconcile.interval", 300.0)
    retest_after: float = setting("fedimg.gate.retest_after", 3 * 3600.0)
    orphan_grace: float = setting("fedimg.reconcile.orphan_grace", 2 * 3600.0)
    state_dir: str = setting("fedimg.state_dir", "/var/lib/fedimg")
    stage_max_attempts: int = setting("fedimg.stage.max_attempts", 3)
    extra_tags: dict[str, str] = setting(
        "fedimg.aws.extra_tags", {}, doc="tags on every resource fedimg creates"
    )
    deprecation_days: dict[str, int] = setting(
        "fedimg.promote.deprecation_days", DEFAULT_DEPRECATION_DAYS
    )
    skip_regions: list[str] = setting("fedimg.promote.skip_regions", [])
    best_effort_regions: list[str] = setting("fedimg.promote.best_effort_regions", [])
    copy_completion_minutes: int = setting("fedimg.promote.copy_completion_minutes", 0)
    prune_interval: float = setting("fedimg.prune.interval", 0.0, doc="0: no periodic prune")
    prune_keep: int = setting("fedimg.prune.keep", 3)
    prune_nightly_days: float = setting("fedimg.prune.nightly_days", 14.0)
    prune_eol: dict[str, str] = setting("fedimg.prune.eol", {}, doc="release -> EOL date")
    audit_interval: float = setting("fedimg.audit.interval", 0.0, doc="0: no periodic audit")
    audit_fix: bool = setting("fedimg.audit.fix", False)

    def __post_init__(self) -> None:
        check_region(self.staging_region)
        for region in self.regions:
            check_region(region)
        if not self.volume_types:
            raise ValueError("fedimg.aws.volume_types: at least one volume type is needed")
        bad = sorted(set(self.volume_types) - VOLUME_TYPES)
        if bad:
            raise ValueError(f"fedimg.aws.volume_types: unknown volume types {bad}")
        bad = sorted(set(self.arches) - ARCHES)
        if bad:
            raise ValueError(f"fedimg.compose.arches: unsupported arches {bad}")
        if urlsplit(self.resultsdb_url).scheme not in ("http", "https"):
            raise ValueError(f"fedimg.resultsdb_url: not an http(s) URL: {self.resultsdb_url!r}")
        if not self.state_dir:
            raise ValueError("fedimg.state_dir: a directory is needed for durable intents")
        for name in (
            "upload_workers",
            "stage_workers",
            "copy_concurrency",
            "aws_max_attempts",
            "max_images",
            "max_volume_gib",
            "stage_max_attempts",
            "xz_blocks_in_flight",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_volume_gib > MAX_VOLUME_GIB:
            raise ValueError(
                f"fedimg.stage.max_volume_gib: {self.max_volume_gib} is more than EBS's "
                f"largest volume ({MAX_VOLUME_GIB} GiB)"
            )
        if not self.required_testcases:
            raise ValueError("fedimg.gate.required_testcases: at least one testcase is needed")
        if self.waiverdb_url and urlsplit(self.waiverdb_url).scheme not in ("http", "https"):
            raise ValueError(f"fedimg.waiverdb_url: not an http(s) URL: {self.waiverdb_url!r}")
        self.gate_policy  # noqa: B018 - read and validated once, at start-up
        self._check_publishing()
        self._check_after_release()

    def _check_publishing(self) -> None:
        check_extra_tags("fedimg.aws.extra_tags", self.extra_tags)
        bad = sorted(set(self.deprecation_days) - COMPOSE_TYPES)
        if bad:
            raise ValueError(
                f"fedimg.promote.deprecation_days: unknown compose types {bad} "
                f"(known: {sorted(COMPOSE_TYPES)})"
            )
        for kind, days in self.deprecation_days.items():
            if days < 1:
                raise ValueError(f"fedimg.promote.deprecation_days[{kind!r}]: {days} is not >= 1")
        # A compose type left out keeps its default: the mapping is always complete.
        object.__setattr__(
            self, "deprecation_days", {**DEFAULT_DEPRECATION_DAYS, **self.deprecation_days}
        )
        for key, regions in (
            ("fedimg.promote.skip_regions", self.skip_regions),
            ("fedimg.promote.best_effort_regions", self.best_effort_regions),
        ):
            for region in regions:
                try:
                    check_region(region)
                except ValueError as exc:
                    raise ValueError(f"{key}: {exc}") from exc
        both = sorted(set(self.skip_regions) & set(self.best_effort_regions))
        if both:
            raise ValueError(
                f"fedimg.promote.skip_regions and best_effort_regions both name {both}"
            )
        if self.staging_region in self.skip_regions:
            raise ValueError(
                f"fedimg.promote.skip_regions: {self.staging_region} is the staging region"
            )
        minutes = self.copy_completion_minutes
        if minutes and not (
            COPY_COMPLETION_STEP <= minutes <= COPY_COMPLETION_MAX
            and minutes % COPY_COMPLETION_STEP == 0
        ):
            raise ValueError(
                f"fedimg.promote.copy_completion_minutes: {minutes} is not 0 (off) or a "
                f"multiple of {COPY_COMPLETION_STEP} from {COPY_COMPLETION_STEP} to "
                f"{COPY_COMPLETION_MAX}"
            )

    @functools.cached_property
    def gate_policy(self) -> GatePolicy:
        """The gate policy: ``fedimg.gate.policy_file`` (read once), else the default."""
        if self.policy_file:
            return load_policy(self.policy_file)
        return default_policy(self.required_testcases)

    def _check_after_release(self) -> None:
        """The prune and audit settings (a policy removing the newest image is refused)."""
        if self.prune_keep < 1:
            raise ValueError(
                f"fedimg.prune.keep: {self.prune_keep} would remove the newest image of "
                "every stream; at least 1"
            )
        for key, value in (
            ("fedimg.prune.interval", self.prune_interval),
            ("fedimg.prune.nightly_days", self.prune_nightly_days),
            ("fedimg.audit.interval", self.audit_interval),
        ):
            if value < 0:
                raise ValueError(f"{key}: {value} is negative")
        self.eol_dates()

    def eol_dates(self) -> dict[str, date]:
        """``fedimg.prune.eol`` as dates; ValueError naming the key for one that is not."""
        dates = {}
        for release, when in self.prune_eol.items():
            try:
                dates[release] = date.fromisoformat(when)
            except ValueError:
                raise ValueError(
                    f"fedimg.prune.eol[{release!r}]: {when!r} is not a YYYY-MM-DD date"
                ) from None
        return dates

    @classmethod
    def from_fedmsg(cls, raw: Mapping[str, Any]) -> FedimgConfig:
        """Validate and return the ``fedimg.*`` part of a fedmsg config."""
        return load(cls, raw, "fedimg")

    @classmethod
    def from_consumer_config(cls, consumer_config: Mapping[str, Any]) -> FedimgConfig:
        """Validate and return a fedora-messaging ``[consumer_config]`` (same keys)."""
        return load_consumer_config(cls, consumer_config, "fedimg")


__all__ = ["ConfigError", "FedimgConfig", "check_extra_tags", "check_region"]
