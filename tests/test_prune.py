"""The pure prune plan and public-access verdicts of ``fedimg.prune``: tables, no AWS.

The synthetic history (6 composes x 3 images x 5 regions) is shared with
``tests/test_upkeep.py``, which builds it in moto and applies the plan.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Final

import pytest

from fedimg import tags
from fedimg.facts import AmiFacts
from fedimg.prune import (
    PRUNING,
    ComposeType,
    Fleet,
    MarkedSnapshot,
    PolicyRefused,
    PrunePolicy,
    RegionalAmi,
    audited,
    compose_type,
    exposure,
    judge,
    lineages,
    plan_prune,
)
from fedimg.tags import State

NOW: Final = datetime(2024, 11, 30, 12, 0, tzinfo=UTC)
STAGING: Final = "us-east-1"
REGIONS: Final = ("us-east-1", "us-east-2", "us-west-2", "eu-west-1", "ap-south-1")
IMAGES: Final = (  # (subvariant, arch) of the 3 images of every compose
    ("Cloud_Base", "x86_64"),
    ("Cloud_Base", "aarch64"),
    ("Cloud_Base_UKI", "x86_64"),
)
# 6 composes: four nightlies of 41 and two production composes of 40 (EOL 2024-11-12).
COMPOSES: Final = (
    ("Fedora-Cloud-41-20241101.n.0", "41", datetime(2024, 11, 1, tzinfo=UTC)),
    ("Fedora-Cloud-41-20241110.n.0", "41", datetime(2024, 11, 10, tzinfo=UTC)),
    ("Fedora-Cloud-41-20241120.n.0", "41", datetime(2024, 11, 20, tzinfo=UTC)),
    ("Fedora-Cloud-41-20241125.n.1", "41", datetime(2024, 11, 25, tzinfo=UTC)),
    ("Fedora-Cloud-40-20240401.0", "40", datetime(2024, 4, 1, tzinfo=UTC)),
    ("Fedora-Cloud-40-20240501.0", "40", datetime(2024, 5, 1, tzinfo=UTC)),
)
POLICY: Final = PrunePolicy(
    keep=1, nightly_age=timedelta(days=14), eol={"40": date(2024, 11, 12)}, delete_rejected=False
)
# What the policy keeps, by hand: the newest nightly (rank 1), the 10-day-old one (younger
# than 14 days), and the newest production compose of the EOL release (never the newest).
KEPT_COMPOSES: Final = frozenset(
    {"Fedora-Cloud-41-20241125.n.1", "Fedora-Cloud-41-20241120.n.0", "Fedora-Cloud-40-20240501.0"}
)


@dataclass(frozen=True)
class Spec:
    """One AMI of the synthetic history (the same spec builds facts here and AWS in moto)."""

    region: str
    compose_id: str
    release: str
    subvariant: str
    arch: str
    staged_at: datetime
    key: str  # unique per staging image: "<compose>#<n>"
    state: State = State.RELEASED

    @property
    def is_copy(self) -> bool:
        return self.region != STAGING

    def tags(self, source_ami: str) -> dict[str, str]:
        values = {
            tags.COMPOSE_ID: self.compose_id,
            tags.IMAGE_NAME: f"{self.compose_id}-{self.subvariant}.{self.arch}",
            tags.ARCH: self.arch,
            tags.SUBVARIANT: self.subvariant,
            tags.RELEASE: self.release,
            tags.VOL_TYPE: "gp3",
            tags.SHA256: hashlib.sha256(self.key.encode()).hexdigest(),
        }
        if self.is_copy:
            values[tags.SOURCE_AMI] = source_ami
        else:
            values[tags.STATE] = self.state.value
            values[tags.STAGED_AT] = self.staged_at.isoformat()
        return values


def history() -> list[Spec]:
    """Staging AMIs first (a copy names its source), then the copies."""
    specs = []
    for compose_id, release, when in COMPOSES:
        for n, (subvariant, arch) in enumerate(IMAGES):
            for region in REGIONS:
                specs.append(
                    Spec(region, compose_id, release, subvariant, arch, when, f"{compose_id}#{n}")
                )
    return sorted(specs, key=lambda s: s.is_copy)


def ami_id(n: int) -> str:
    return f"ami-{n:017x}"


def snap_id(n: int) -> str:
    return f"snap-{n:017x}"


def fleet_of(specs: list[Spec], *, public: bool = True) -> tuple[Fleet, dict[str, str]]:
    """Facts for ``specs``; also AMI id -> its spec key and region (for the expectations)."""
    sources: dict[str, str] = {}
    amis = []
    labels = {}
    for n, spec in enumerate(specs):
        ami = ami_id(n + 1)
        if not spec.is_copy:
            sources[spec.key] = ami
        facts = AmiFacts(
            ami_id=ami,
            aws_state="available",
            state=None if spec.is_copy else spec.state,
            created=spec.staged_at,
            snapshots=(snap_id(n + 1),),
            tags=spec.tags(sources[spec.key]),
            public=public,
        )
        amis.append(RegionalAmi(spec.region, facts))
        labels[ami] = spec.compose_id
    return Fleet(tuple(amis), (), REGIONS), labels


def test_the_synthetic_history_keeps_exactly_what_the_policy_says() -> None:
    specs = history()
    assert len(specs) == 6 * 3 * 5
    fleet, compose_of = fleet_of(specs)
    plan = plan_prune(fleet, POLICY, NOW)
    kept = {compose_of[a] for _, a in plan.kept()}
    removed = {compose_of[a] for _, a in plan.removed()}
    assert kept == KEPT_COMPOSES
    assert removed == {c for c, _, _ in COMPOSES} - KEPT_COMPOSES
    assert len(plan.kept()) == 3 * 3 * 5 and len(plan.removed()) == 3 * 3 * 5
    assert plan.kept().isdisjoint(plan.removed())
    assert len(plan.verdicts) == 6 * 3  # one per lineage
    # Copies go before their staging AMI; every removed AMI's snapshot is deleted after it.
    for verdict in plan.verdicts:
        assert [r for r, _ in verdict.amis][-1] == STAGING
    order = [(r.region, r.ami_id) for r in plan.removals]
    for verdict in (v for v in plan.verdicts if v.remove):
        positions = [order.index(pair) for pair in verdict.amis]
        assert positions == sorted(positions)
    assert all(len(r.snapshots) == 1 for r in plan.removals)
    firsts = [v.compose_id for v in plan.verdicts if v.stream.subvariant == "Cloud_Base_UKI"]
    assert firsts == [  # by stream, newest first
        "Fedora-Cloud-40-20240501.0",
        "Fedora-Cloud-40-20240401.0",
        "Fedora-Cloud-41-20241125.n.1",
        "Fedora-Cloud-41-20241120.n.0",
        "Fedora-Cloud-41-20241110.n.0",
        "Fedora-Cloud-41-20241101.n.0",
    ]
    reasons = {v.compose_id: v.reason for v in plan.verdicts}
    assert "EOL" in reasons["Fedora-Cloud-40-20240401.0"]
    # Deciding again from the same facts gives the same plan (dry run == apply).
    assert plan_prune(fleet, POLICY, NOW) == plan


def test_what_remains_after_the_removals_plans_nothing_more() -> None:
    fleet, _ = fleet_of(history())
    plan = plan_prune(fleet, POLICY, NOW)
    gone = plan.removed()
    rest = Fleet(tuple(a for a in fleet.amis if (a.region, a.ami_id) not in gone), (), REGIONS)
    again = plan_prune(rest, POLICY, NOW)
    assert again.idle and again.kept() == plan.kept()


def test_a_prune_stopped_halfway_is_finished_by_the_next_plan() -> None:
    """Any prefix of the removals done (a throttled or killed run): the rest is planned."""
    fleet, _ = fleet_of(history())
    plan = plan_prune(fleet, POLICY, NOW)
    for done in (1, 4, 5, 17, len(plan.removals) - 1):
        gone = {(r.region, r.ami_id) for r in plan.removals[:done]}
        rest = Fleet(tuple(a for a in fleet.amis if (a.region, a.ami_id) not in gone), (), REGIONS)
        again = plan_prune(rest, POLICY, NOW)
        assert again.removals == plan.removals[done:]


@pytest.mark.parametrize(
    ("compose_id", "kind"),
    [
        ("Fedora-41-20241024.0", ComposeType.PRODUCTION),
        ("Fedora-Cloud-41-20241101.n.0", ComposeType.NIGHTLY),
        ("Fedora-Rawhide-20241127.n.2", ComposeType.NIGHTLY),
        ("Fedora-41-20241001.t.0", ComposeType.TEST),
        ("Fedora-41-20241001.ci.3", ComposeType.CI),
        ("Fedora-41-20241001", ComposeType.UNKNOWN),
        ("Fedora-41-2024101.0", ComposeType.UNKNOWN),
        ("Fedora-41-20241001.x.0", ComposeType.UNKNOWN),
        ("", ComposeType.UNKNOWN),
        ("20241001.0\n", ComposeType.UNKNOWN),
    ],
)
def test_compose_type_from_the_compose_id(compose_id: str, kind: ComposeType) -> None:
    assert compose_type(compose_id) is kind


def _lineage(
    compose_id: str,
    *,
    state: State | None = State.RELEASED,
    staged_at: datetime | None = NOW - timedelta(days=30),
    release: str = "41",
) -> Fleet:
    values = {tags.COMPOSE_ID: compose_id, tags.RELEASE: release, tags.ARCH: "x86_64"}
    if state is not None:
        values[tags.STATE] = state.value
    if staged_at is not None:
        values[tags.STAGED_AT] = staged_at.isoformat()
    facts = AmiFacts("ami-0000000000000000a", "available", state, None, ("snap-a",), values)
    return Fleet((RegionalAmi(STAGING, facts),))


@pytest.mark.parametrize(
    ("compose_id", "state", "staged_days", "rank", "policy", "removed"),
    [
        # released, older than keep: nightly by age, production by EOL
        ("Fedora-41-20241001.n.0", State.RELEASED, 30, 1, POLICY, True),
        ("Fedora-41-20241001.n.0", State.RELEASED, 13, 1, POLICY, False),
        ("Fedora-41-20241001.n.0", State.RELEASED, 14, 1, POLICY, True),
        ("Fedora-41-20241001.t.0", State.RELEASED, 30, 1, POLICY, True),
        ("Fedora-41-20241001.n.0", State.RELEASED, None, 1, POLICY, False),  # age unknown
        ("Fedora-40-20240401.0", State.RELEASED, 300, 1, POLICY, True),  # 40 is EOL
        ("Fedora-41-20241001.0", State.RELEASED, 300, 1, POLICY, False),  # 41 has no EOL set
        ("Fedora-41-20241001", State.RELEASED, 300, 1, POLICY, False),  # type unknown
        # within keep: kept whatever its age
        ("Fedora-41-20241001.n.0", State.RELEASED, 300, 0, POLICY, False),
        ("Fedora-41-20241001.n.0", State.RELEASED, 300, 2, replace(POLICY, keep=3), False),
        # not released: never ranked, never aged
        ("Fedora-41-20241001.n.0", State.TESTING, 300, None, POLICY, False),
        ("Fedora-41-20241001.n.0", State.PROMOTING, 300, None, POLICY, False),
        ("Fedora-41-20241001.n.0", State.REJECTED, 300, None, POLICY, False),
        (
            "Fedora-41-20241001.n.0",
            State.REJECTED,
            0,
            None,
            replace(POLICY, delete_rejected=True),
            True,
        ),
    ],
)
def test_judge_one_lineage(
    compose_id: str,
    state: State | None,
    staged_days: int | None,
    rank: int | None,
    policy: PrunePolicy,
    removed: bool,
) -> None:
    staged_at = None if staged_days is None else NOW - timedelta(days=staged_days)
    release = compose_id.split("-")[1]
    (lineage,) = lineages(_lineage(compose_id, state=state, staged_at=staged_at, release=release))
    remove, reason = judge(lineage, rank, policy, NOW)
    assert remove is removed
    assert reason


def test_an_image_with_compose_tags_but_no_state_is_in_no_lineage() -> None:
    """Not adopted by stage (or not fedimg's): never judged, never removed."""
    fleet = _lineage("Fedora-41-20241001.n.0", state=None)
    assert lineages(fleet) == []
    assert plan_prune(fleet, POLICY, NOW) == plan_prune(Fleet(), POLICY, NOW)


def test_eol_is_reached_on_its_date_not_before() -> None:
    (lineage,) = lineages(_lineage("Fedora-40-20240401.0", release="40"))
    policy = replace(POLICY, eol={"40": NOW.date()})
    assert judge(lineage, 1, policy, NOW)[0] is True
    assert judge(lineage, 1, policy, NOW - timedelta(days=1))[0] is False


@pytest.mark.parametrize("keep", [0, -1])
def test_a_policy_that_would_remove_the_newest_is_refused(keep: int) -> None:
    with pytest.raises(PolicyRefused, match="newest"):
        PrunePolicy(keep=keep)


def test_a_plan_never_removes_the_newest_released_of_a_stream() -> None:
    """Even a lone, ancient nightly of an EOL release: the newest of its stream stays."""
    fleet = _lineage("Fedora-40-20240401.n.0", release="40", staged_at=NOW - timedelta(days=999))
    plan = plan_prune(fleet, replace(POLICY, nightly_age=timedelta(0)), NOW)
    assert plan.idle and plan.kept() == {(STAGING, "ami-0000000000000000a")}


def test_a_negative_nightly_age_is_refused() -> None:
    with pytest.raises(PolicyRefused):
        PrunePolicy(nightly_age=timedelta(days=-1))


def test_streams_are_ranked_apart() -> None:
    """Two streams of one release: each keeps its own newest."""
    specs = [s for s in history() if s.compose_id.startswith("Fedora-Cloud-41")]
    fleet, compose_of = fleet_of(specs)
    plan = plan_prune(fleet, replace(POLICY, nightly_age=timedelta(0)), NOW)
    kept = {(compose_of[a]) for _, a in plan.kept()}
    assert kept == {"Fedora-Cloud-41-20241125.n.1"}
    assert {v.stream.label for v in plan.verdicts if not v.remove} == {
        "41/Cloud_Base/x86_64/nightly/gp3",
        "41/Cloud_Base/aarch64/nightly/gp3",
        "41/Cloud_Base_UKI/x86_64/nightly/gp3",
    }


def _ami(
    ami: str,
    snapshots: tuple[str, ...],
    values: Mapping[str, str],
    region: str = STAGING,
    *,
    public: bool = True,
    state: State | None = State.RELEASED,
    deprecation: datetime | None = None,
    aws_state: str = "available",
) -> RegionalAmi:
    facts = AmiFacts(
        ami,
        aws_state,
        state,
        NOW - timedelta(days=60),
        snapshots,
        dict(values),
        public=public,
        deprecation=deprecation,
    )
    return RegionalAmi(region, facts)


def _values(compose_id: str, vol: str, days: int, state: State = State.RELEASED) -> dict[str, str]:
    return {
        tags.COMPOSE_ID: compose_id,
        tags.RELEASE: "41",
        tags.ARCH: "x86_64",
        tags.VOL_TYPE: vol,
        tags.STATE: state.value,
        tags.STAGED_AT: (NOW - timedelta(days=days)).isoformat(),
    }


def test_a_snapshot_two_removed_amis_share_goes_after_the_last_of_them() -> None:
    """gp2 and gp3 AMIs of one image share one snapshot: deleted once, after both."""
    old, new = "Fedora-41-20241001.n.0", "Fedora-41-20241120.n.0"
    amis = (
        _ami("ami-00000000000000001", ("snap-old",), _values(old, "gp2", 60)),
        _ami("ami-00000000000000002", ("snap-old",), _values(old, "gp3", 60)),
        _ami("ami-00000000000000003", ("snap-new",), _values(new, "gp2", 10)),
        _ami("ami-00000000000000004", ("snap-new",), _values(new, "gp3", 10)),
    )
    plan = plan_prune(Fleet(amis), POLICY, NOW)
    assert [r.ami_id for r in plan.removals] == ["ami-00000000000000001", "ami-00000000000000002"]
    assert [r.snapshots for r in plan.removals] == [(), ("snap-old",)]
    assert [r.marks for r in plan.removals] == [("snap-old",), ("snap-old",)]


def test_a_snapshot_a_kept_ami_uses_is_never_deleted() -> None:
    old, new = "Fedora-41-20241001.n.0", "Fedora-41-20241120.n.0"
    amis = (
        _ami("ami-00000000000000001", ("snap-shared",), _values(old, "gp3", 60)),
        _ami("ami-00000000000000002", ("snap-shared",), _values(new, "gp3", 10)),
    )
    plan = plan_prune(Fleet(amis), POLICY, NOW)
    (removal,) = plan.removals
    assert removal.ami_id == "ami-00000000000000001" and removal.snapshots == ()


def test_marked_snapshots_of_gone_images_are_leftovers_and_only_those() -> None:
    values = _values("Fedora-41-20241120.n.0", "gp3", 1)
    amis = (_ami("ami-00000000000000002", ("snap-used",), values),)
    marked = (
        MarkedSnapshot(STAGING, "snap-gone", "ami-00000000000000001"),  # its AMI is gone
        MarkedSnapshot(STAGING, "snap-used", "ami-00000000000000001"),  # another AMI uses it
        MarkedSnapshot(STAGING, "snap-reg", "ami-00000000000000002"),  # its AMI is registered
        MarkedSnapshot("eu-west-1", "snap-eu", "ami-00000000000000002"),  # not there
    )
    plan = plan_prune(Fleet(amis, marked), POLICY, NOW)
    assert [(x.region, x.snapshot_id) for x in plan.leftovers] == [
        ("eu-west-1", "snap-eu"),
        (STAGING, "snap-gone"),
    ]
    assert PRUNING.startswith("fedimg:")


def test_orphan_copies_are_judged_as_their_lineage() -> None:
    """Copies whose staging AMI is already gone (a stopped prune) still go."""
    fleet, compose_of = fleet_of(history())
    plan = plan_prune(fleet, POLICY, NOW)
    staging_gone = {(r.region, r.ami_id) for r in plan.removals if r.region == STAGING}
    orphans = Fleet(tuple(a for a in fleet.amis if (a.region, a.ami_id) not in staging_gone))
    again = plan_prune(orphans, POLICY, NOW)
    assert again.removed() == plan.removed() - staging_gone
    assert {compose_of[a] for _, a in again.kept()} == KEPT_COMPOSES


# -- the public-access audit -------------------------------------------------------------


def test_only_released_available_undeprecated_amis_are_audited() -> None:
    rel = _values("Fedora-41-20241120.n.0", "gp3", 1)
    testing = _values("Fedora-41-20241121.n.0", "gp3", 1, State.TESTING)
    copy = {**rel, tags.SOURCE_AMI: "ami-00000000000000001"}
    del copy[tags.STATE]
    amis = (
        _ami("ami-00000000000000001", ("s1",), rel),
        _ami("ami-00000000000000002", ("s2",), copy, "eu-west-1", state=None),
        _ami("ami-00000000000000003", ("s3",), testing, state=State.TESTING),
        _ami("ami-00000000000000004", ("s4",), copy, "us-west-2", state=None, aws_state="pending"),
        _ami(
            "ami-00000000000000005",
            ("s5",),
            copy,
            "ap-south-1",
            state=None,
            deprecation=NOW - timedelta(seconds=1),
        ),
        _ami(
            "ami-00000000000000006",
            ("s6",),
            copy,
            "us-east-2",
            state=None,
            deprecation=NOW + timedelta(days=1),
        ),
    )
    found = {a.ami_id for a in audited(Fleet(amis), NOW)}
    assert found == {"ami-00000000000000001", "ami-00000000000000002", "ami-00000000000000006"}


@pytest.mark.parametrize(
    ("public", "snapshots", "perms", "image_private", "private"),
    [
        (True, ("s1",), {"s1": True}, None, None),  # all public: no exposure
        (False, ("s1",), {"s1": True}, True, ()),
        (True, ("s1", "s2"), {"s1": True, "s2": False}, False, ("s2",)),
        (True, ("s1",), {}, False, ("s1",)),  # permissions unknown: private
        (False, ("s1",), {"s1": False}, True, ("s1",)),
        (True, (), {}, False, ()),  # no snapshot found: reported (and not fixable)
    ],
)
def test_exposure_verdicts(
    public: bool,
    snapshots: tuple[str, ...],
    perms: dict[str, bool],
    image_private: bool | None,
    private: tuple[str, ...] | None,
) -> None:
    placed = _ami("ami-00000000000000001", snapshots, _values("F-41-20241120.n.0", "gp3", 1))
    placed = replace(placed, ami=replace(placed.ami, public=public))
    found = exposure(placed, perms)
    if image_private is None:
        assert found is None
        return
    assert found is not None
    assert found.image_private is image_private
    assert found.private_snapshots == private
    assert found.snapshots == snapshots
    assert found.text.startswith("private")


@pytest.mark.parametrize(
    ("described", "deprecated"),
    [
        ({}, False),
        ({"DeprecationTime": "2024-11-30T11:59:59.000Z"}, True),
        ({"DeprecationTime": "2024-11-30T12:00:00Z"}, True),
        ({"DeprecationTime": "2024-12-30T12:00:00.000Z"}, False),
        ({"DeprecationTime": "not a time"}, False),
        ({"DeprecationTime": ""}, False),
    ],
)
def test_deprecation_is_read_as_a_fact(described: dict[str, str], deprecated: bool) -> None:
    facts = AmiFacts.from_aws({"ImageId": "ami-00000000000000001", **described})
    assert facts.deprecated(NOW) is deprecated


def test_the_plan_itself_refuses_to_remove_a_stream_s_newest() -> None:
    """The last line of defence, should a policy ever slip past its own check."""
    fleet, _ = fleet_of(history())
    policy = PrunePolicy(keep=1, nightly_age=timedelta(0))
    object.__setattr__(policy, "keep", 0)  # what __post_init__ refuses
    with pytest.raises(PolicyRefused, match="newest of"):
        plan_prune(fleet, policy, NOW)


def test_the_prune_plan_is_pure() -> None:
    from tests.test_imports import module_imports

    io_modules = {"fedimg.aws", "fedimg.observe", "fedimg.engine", "fedimg.upkeep", "fedimg.copies"}
    assert not module_imports()["fedimg.prune"] & io_modules
