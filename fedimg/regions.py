"""Which regions a released AMI is copied to.

``fedimg.aws.regions`` when set; otherwise every region ``describe_regions``
reports as usable by this account in the commercial partition. The cn-* and
us-gov-* (and isolated) partitions cannot be copied to from the commercial
one, and opt-in regions the account has not enabled refuse every call. The
staging region is never a target: the staging AMI is already there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from fedimg.config import FedimgConfig
from fedimg.messages import REGION_RE

log = logging.getLogger(__name__)

OTHER_PARTITIONS = ("cn-", "us-gov-", "us-iso", "eu-iso")
USABLE_OPT_IN = frozenset({"opt-in-not-required", "opted-in"})


def in_commercial_partition(name: str) -> bool:
    """True for a well-formed region name outside the China, GovCloud and ISO partitions."""
    return bool(REGION_RE.match(name)) and not name.startswith(OTHER_PARTITIONS)


def commercial(regions: Iterable[Mapping[str, Any]]) -> list[str]:
    """Names of the usable commercial regions in a ``describe_regions()["Regions"]`` list.

    A region without ``OptInStatus`` (older API answers) counts as usable.
    """
    names = set()
    for region in regions:
        name = str(region.get("RegionName", ""))
        status = region.get("OptInStatus", "opt-in-not-required")
        if in_commercial_partition(name) and status in USABLE_OPT_IN:
            names.add(name)
    return sorted(names)


def target_regions(cfg: FedimgConfig, ec2_in_staging: Any) -> list[str]:
    """The regions to copy to: configured or discovered, minus the staging region."""
    if cfg.regions:
        configured = sorted(set(cfg.regions))
        dropped = [r for r in configured if not in_commercial_partition(r)]
        if dropped:
            log.warning(
                "fedimg.aws.regions: %s are outside the commercial partition; not copying there",
                ", ".join(dropped),
            )
        names = [r for r in configured if r not in dropped]
    else:
        answer = ec2_in_staging.describe_regions(AllRegions=False)
        names = commercial(answer.get("Regions", []))
    return [r for r in names if r != cfg.staging_region]
