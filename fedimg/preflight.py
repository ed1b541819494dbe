"""Preflight before a promotion: may this region take one more public AMI? (pure)

AWS refuses, or silently undoes, publishing in ways a copy would only find out
after it was made: an account's *image block public access* for a region
(``block-new-sharing``: nothing can be shared publicly there; on by default in
new accounts) and the *public AMIs* quota of a region (Service Quotas
``L-0E3CBAB9``, 5 unless raised) against the public images the account
already has there. ``fedimg.observe.region_publish_facts`` reads them per
region into ``RegionFacts``; ``verdicts`` decides, region by region, whether
to copy there. A region that would fail is not copied to and is reported with
its reason (``failed_regions`` of ``fedimg.image.release``).

Settings: ``fedimg.promote.skip_regions`` are never targets (nor checked);
a failure in one of ``fedimg.promote.best_effort_regions`` -- here or in the
copy itself -- is reported but does not keep the image ``promoting``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

UNBLOCKED: Final = "unblocked"
PUBLIC_AMI_QUOTA_CODE: Final = "L-0E3CBAB9"
#: AWS's default public-AMI quota: what applies when no applied value is available.
DEFAULT_PUBLIC_AMI_QUOTA: Final = 5.0


@dataclass(frozen=True)
class RegionFacts:
    """What AWS says about publishing in one region (``error``: it could not be read)."""

    region: str
    block_state: str = UNBLOCKED  # GetImageBlockPublicAccessState
    public_quota: float = DEFAULT_PUBLIC_AMI_QUOTA  # L-0E3CBAB9 in this region
    public_images: int = 0  # public images the account owns there
    already_public: bool = False  # this image is public there already: it needs no new slot
    error: str = ""


@dataclass(frozen=True)
class Verdict:
    """Whether to copy to (and publish in) a region, and why not."""

    region: str
    go: bool
    reason: str = ""
    best_effort: bool = False


def targets(regions: Iterable[str], skip: Collection[str]) -> list[str]:
    """The target regions minus ``fedimg.promote.skip_regions``, in order."""
    return [r for r in regions if r not in skip]


def verdict(facts: RegionFacts, best_effort: Collection[str] = ()) -> Verdict:
    """Go, or why this region would refuse one more public AMI now."""
    lenient = facts.region in best_effort
    if facts.error:
        reason = f"preflight: could not check the region: {facts.error}"
        return Verdict(facts.region, False, reason, lenient)
    if facts.block_state != UNBLOCKED:
        reason = (
            f"preflight: image block public access is {facts.block_state!r} "
            "(public sharing is disabled in this region)"
        )
        return Verdict(facts.region, False, reason, lenient)
    if not facts.already_public and facts.public_images >= facts.public_quota:
        reason = (
            f"preflight: public AMI quota ({PUBLIC_AMI_QUOTA_CODE}) is full: "
            f"{facts.public_images} public of {facts.public_quota:g} allowed"
        )
        return Verdict(facts.region, False, reason, lenient)
    return Verdict(facts.region, True, "", lenient)


def verdicts(facts: Iterable[RegionFacts], best_effort: Collection[str] = ()) -> dict[str, Verdict]:
    """``verdict`` for every region, by region."""
    return {f.region: verdict(f, best_effort) for f in facts}


def blocking(failed: Mapping[str, str], best_effort: Collection[str]) -> dict[str, str]:
    """The failures that keep an image ``promoting``: all but the best-effort regions'."""
    return {region: why for region, why in failed.items() if region not in best_effort}
