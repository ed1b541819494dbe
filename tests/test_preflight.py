"""The preflight verdicts (pure): which regions may take one more public AMI, and why not."""

from __future__ import annotations

import pytest

from fedimg.preflight import (
    DEFAULT_PUBLIC_AMI_QUOTA,
    RegionFacts,
    Verdict,
    blocking,
    targets,
    verdict,
    verdicts,
)

R = "eu-west-1"


@pytest.mark.parametrize(
    ("facts", "go", "words"),
    [
        (RegionFacts(R), True, ()),
        (RegionFacts(R, public_images=4), True, ()),  # one slot left of AWS's default 5
        # A region that disabled public sharing.
        (RegionFacts(R, block_state="block-new-sharing"), False, ("block-new-sharing",)),
        # A state AWS may add later is not "unblocked": refused, named.
        (RegionFacts(R, block_state="block-all-sharing"), False, ("block-all-sharing",)),
        # A quota at its limit, and past it (lowered after images went public).
        (RegionFacts(R, public_images=5), False, ("quota", "5 public of 5")),
        (RegionFacts(R, public_quota=20, public_images=25), False, ("25 public of 20",)),
        (RegionFacts(R, public_quota=0), False, ("0 public of 0",)),
        # The image is public there already (a resumed promotion): it needs no new slot.
        (RegionFacts(R, public_images=5, already_public=True), True, ()),
        # Blocked wins over "already public": nothing more may be shared there.
        (
            RegionFacts(R, block_state="block-new-sharing", already_public=True),
            False,
            ("block-new-sharing",),
        ),
        # Facts that could not be read are no licence to copy.
        (RegionFacts(R, error="AccessDeniedException"), False, ("AccessDeniedException",)),
    ],
)
def test_verdict(facts: RegionFacts, go: bool, words: tuple[str, ...]) -> None:
    checked = verdict(facts)
    assert checked.region == R and checked.go is go and not checked.best_effort
    assert bool(checked.reason) is not go
    for word in words:
        assert word in checked.reason


def test_the_default_quota_is_awss() -> None:
    assert RegionFacts(R).public_quota == DEFAULT_PUBLIC_AMI_QUOTA == 5


def test_best_effort_regions_are_marked_whatever_the_verdict() -> None:
    facts = [
        RegionFacts("us-west-2"),
        RegionFacts(R, block_state="block-new-sharing"),
        RegionFacts("ap-south-2", public_images=9),
    ]
    got = verdicts(facts, best_effort=[R, "us-west-2"])
    assert got == {
        "us-west-2": Verdict("us-west-2", True, "", True),
        R: Verdict(R, False, got[R].reason, True),
        "ap-south-2": Verdict("ap-south-2", False, got["ap-south-2"].reason, False),
    }


def test_skipped_regions_are_no_targets() -> None:
    assert targets(["us-east-2", R, "us-west-2"], skip=[R, "ap-south-2"]) == [
        "us-east-2",
        "us-west-2",
    ]
    assert targets([R], skip=[]) == [R]
    assert targets([], skip=[R]) == []


@pytest.mark.parametrize(
    ("failed", "best_effort", "left"),
    [
        ({}, [], {}),
        ({R: "x"}, [], {R: "x"}),
        ({R: "x"}, [R], {}),  # a best-effort failure does not keep the image promoting
        ({R: "x", "us-west-2": "y"}, [R], {"us-west-2": "y"}),
    ],
)
def test_blocking_failures(
    failed: dict[str, str], best_effort: list[str], left: dict[str, str]
) -> None:
    assert blocking(failed, best_effort) == left
