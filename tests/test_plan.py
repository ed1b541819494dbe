"""The pure core: the trust rules of ``fedimg.facts`` and every decision of ``fedimg.plan``.

No AWS, no clock, no threads: frozen facts in, actions out. The tables below
are the partial states a crash leaves (every kill point of the old crash
sweep, ``tests/test_crash_integration.py``, and partial composes), each with
the plan expected when a message replays it, when the reconcile pass finds it
within the grace period, and when the pass finds it later.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedimg import ami, tags
from fedimg.compose import CloudImage
from fedimg.engine import Outcome
from fedimg.facts import (
    RESUMED_MAX,
    AmiFacts,
    AmiLife,
    ImageFacts,
    Results,
    SnapshotFacts,
    aware,
    counter,
    images_by_sha,
    parse_when,
)
from fedimg.gate import Decision
from fedimg.messages import SUMMARY_TESTCASE
from fedimg.observe import image_from_tags
from fedimg.plan import (
    DEPRECATION_LEAD,
    PUBLIC_DEPRECATION_MAX,
    Adopt,
    AmiAction,
    Announce,
    DeleteSnapshot,
    Deregister,
    GiveUp,
    ImageAction,
    ImagePlan,
    MarkResumed,
    Policy,
    Promote,
    Reject,
    Release,
    RequestTest,
    Scope,
    Stage,
    Wait,
    compose_progress,
    compose_type,
    deprecation_time,
    plan_ami,
    plan_image,
    retest_due,
)
from fedimg.results import Result
from fedimg.tags import State

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)  # the moment of the kill
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)
YOUNG = T0 + 30 * MINUTE  # a restart within the grace period
LATE = T0 + 3 * HOUR  # a restart after it (and after retest_after)
POLICY = Policy(
    volume_types=("gp3",),
    required=(SUMMARY_TESTCASE,),
    deadline=6 * HOUR,
    retest_after=3 * HOUR,
    grace=2 * HOUR,
    max_attempts=3,
)
TWO_VOLS = Policy(volume_types=("gp3", "gp2"), grace=2 * HOUR, retest_after=3 * HOUR)
COMPOSE = "Fedora-40-20240601.0"
SHA = "a" * 64


# -- building facts -----------------------------------------------------------------


def cloud(arch: str = "x86_64", sha: str = SHA, subvariant: str = "Cloud_Base") -> CloudImage:
    name = f"Fedora-{subvariant.replace('_', '-')}-40-20240601.0.{arch}.raw.xz"
    return CloudImage(
        compose_id=COMPOSE,
        variant="Cloud",
        arch=arch,
        subvariant=subvariant,
        format="raw.xz",
        path=f"Cloud/{arch}/images/{name}",
        url=f"https://kojipkgs.example/compose/Cloud/{arch}/images/{name}",
        size=1 << 20,
        sha256=sha,
        image_name=name,
        type="raw-xz",
        release="40",
    )


X86 = cloud("x86_64", "1" * 64)
ARM = cloud("aarch64", "2" * 64)
ATOMIC = cloud("x86_64", "3" * 64, "AtomicHost")


def snap(
    sid: str,
    *,
    trusted: bool = True,
    aws_state: str = "completed",
    started: datetime = T0 - 20 * MINUTE,
    resumed: int | str | None = None,
) -> SnapshotFacts:
    found = {tags.SHA256: SHA, tags.STATE: "testing"}
    if trusted:
        found[tags.UPLOADED] = "2026-06-01T11:50:00Z"
    if resumed is not None:
        found[tags.RESUMED] = str(resumed)
    return SnapshotFacts(sid, aws_state, started, found)


def half(
    sid: str,
    *,
    started: datetime = T0 - 5 * MINUTE,
    aws_state: str = "pending",
    resumed: int | None = None,
) -> SnapshotFacts:
    """What a killed upload leaves: started, never marked uploaded."""
    return snap(sid, trusted=False, aws_state=aws_state, started=started, resumed=resumed)


def an_ami(
    ami_id: str,
    state: State | None = State.TESTING,
    *,
    aws_state: str = "available",
    created: datetime = T0 - 10 * MINUTE,
    snapshots: tuple[str, ...] = (),
    requested: int | None = None,
    staged_at: datetime | None = None,
) -> AmiFacts:
    found: dict[str, str] = {}
    if state is not None:
        found[tags.STATE] = state.value
        found[tags.STAGED_AT] = (staged_at or created).strftime("%Y-%m-%dT%H:%M:%SZ")
    if requested is not None:
        found[tags.TEST_REQUESTED] = str(requested)
    return AmiFacts(ami_id, aws_state, state, created, snapshots, found)


def facts(
    snaps: Sequence[SnapshotFacts] = (),
    amis: Mapping[str, AmiFacts | None] | None = None,
    *,
    image: CloudImage = X86,
    busy: bool = False,
) -> ImageFacts:
    return ImageFacts(image, tuple(snaps), dict(amis if amis is not None else {"gp3": None}), busy)


def result(outcome: str, note: str = "") -> Result:
    return Result(SUMMARY_TESTCASE, outcome, 1, "2026-06-01T12:00:00", note)


def life(found: AmiFacts, latest: Mapping[str, Any] | None = None, down: str = "") -> AmiLife:
    keyed = {(testcase, ""): r for testcase, r in (latest or {}).items()}
    return AmiLife(found, COMPOSE, Results(keyed, unavailable=down))


# -- comparing plans --------------------------------------------------------------------
# An action's shape is the action without its reason: reasons are prose for logs.

Shape = tuple[Any, ...]
A = TypeVar("A")


def shape(action: ImageAction | AmiAction) -> Shape:
    if isinstance(action, Wait):
        return ("wait",)
    if isinstance(action, Deregister):
        return ("deregister", action.ami_id)
    if isinstance(action, DeleteSnapshot):
        return ("delete", action.snapshot_id)
    if isinstance(action, Adopt):
        return ("adopt", action.vol_type, action.ami_id)
    if isinstance(action, Announce):
        return ("announce", action.vol_type, action.ami_id, action.request_test)
    if isinstance(action, MarkResumed):
        return ("mark", action.snapshot_id, action.count)
    if isinstance(action, Stage):
        return ("stage", action.vol_types, action.resume_from)
    if isinstance(action, GiveUp):
        return ("giveup",)
    if isinstance(action, RequestTest):
        return ("retest", action.count)
    if isinstance(action, Release):
        return ("release",)
    if isinstance(action, Promote):
        return ("promote",)
    if isinstance(action, Reject):
        return ("reject",)
    raise AssertionError(f"unknown action {action!r}")


def shapes(actions: Sequence[ImageAction | AmiAction]) -> list[Shape]:
    return [shape(a) for a in actions]


def only(actions: Sequence[ImageAction | AmiAction], kind: type[A]) -> list[A]:
    """The actions of one kind, typed as that kind."""
    return [a for a in actions if isinstance(a, kind)]


def image_plan(
    found: ImageFacts,
    scope: Scope = Scope.RECONCILE,
    now: datetime = LATE,
    attempts: int = 0,
    policy: Policy = POLICY,
) -> list[Shape]:
    return shapes(plan_image(found, policy, now, scope=scope, attempts=attempts).actions)


def ami_plan(found: AmiLife, scope: Scope = Scope.RECONCILE, now: datetime = LATE) -> list[Shape]:
    return shapes(plan_ami(found, POLICY, now, scope=scope))


def stage(resume_from: str | None = None, vols: tuple[str, ...] = ("gp3",)) -> Shape:
    return ("stage", vols, resume_from)


WAIT: Shape = ("wait",)
GIVEUP: Shape = ("giveup",)


# -- the trust rules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("aws_state", "uploaded", "trusted"),
    [
        ("completed", True, True),
        ("completed", False, False),  # moto, or a kill after the last block: blocks may miss
        ("pending", True, False),
        ("pending", False, False),
        ("error", True, False),
        ("", True, False),
    ],
)
def test_a_snapshot_is_trusted_only_completed_and_marked_uploaded(
    aws_state: str, uploaded: bool, trusted: bool
) -> None:
    assert snap("snap-1", trusted=uploaded, aws_state=aws_state).trusted is trusted


@pytest.mark.parametrize(
    ("aws_state", "broken"),
    [
        ("available", False),
        ("pending", False),
        ("failed", True),
        ("error", True),
        ("invalid", True),
    ],
)
def test_an_ami_is_broken_in_the_states_ec2_gives_up_on(aws_state: str, broken: bool) -> None:
    assert an_ami("ami-1", aws_state=aws_state).broken is broken


def test_an_ami_is_adopted_once_it_carries_a_state_tag() -> None:
    assert an_ami("ami-1").tagged and not an_ami("ami-1", None).tagged
    described = {
        "ImageId": "ami-1",
        "State": "available",
        "CreationDate": "2026-06-01T11:50:00.000Z",
        "BlockDeviceMappings": [
            {"DeviceName": "/dev/sda1", "Ebs": {"SnapshotId": "snap-1"}},
            {"DeviceName": "/dev/sdb", "VirtualName": "ephemeral0"},
        ],
        "Tags": [{"Key": tags.STATE, "Value": "promoting"}],
        "Name": "n",
    }
    found = AmiFacts.from_aws(described)
    assert (found.state, found.snapshots, found.created) == (
        State.PROMOTING,
        ("snap-1",),
        datetime(2026, 6, 1, 11, 50, tzinfo=UTC),
    )
    assert found.staged_at == found.created  # no staged-at tag: the creation date
    bare = AmiFacts.from_aws({"ImageId": "ami-2", "Tags": [{"Key": tags.STATE, "Value": "odd"}]})
    assert bare.state is None and not bare.tagged and bare.snapshots == () and bare.created is None


def test_snapshot_facts_from_aws_and_their_order() -> None:
    described = {"SnapshotId": "snap-1", "State": "completed", "StartTime": T0.replace(tzinfo=None)}
    found = SnapshotFacts.from_aws(described, now=LATE)
    assert found.started == T0 and not found.trusted and found.resumed == 0
    assert SnapshotFacts.from_aws({"SnapshotId": "snap-2"}, now=LATE).started == LATE
    earlier = T0 - HOUR
    image = facts(
        [snap("s-new", started=T0), half("s-h2", started=T0), snap("s-old", started=earlier)]
    )
    image = facts([*image.snapshots, half("s-h1", started=earlier)])
    assert [s.snapshot_id for s in image.trusted()] == ["s-old", "s-new"]
    assert [s.snapshot_id for s in image.untrusted()] == ["s-h1", "s-h2"]
    assert images_by_sha([X86, ARM]) == {X86.sha256: X86, ARM.sha256: ARM}


def test_an_image_is_staged_when_every_volume_type_has_its_adopted_usable_ami() -> None:
    assert facts([], {"gp3": an_ami("ami-1")}).staged
    assert not facts([], {"gp3": an_ami("ami-1"), "gp2": None}).staged
    assert not facts([], {"gp3": an_ami("ami-1", None)}).staged
    assert not facts([], {"gp3": an_ami("ami-1", aws_state="failed")}).staged
    with_snaps = {"gp3": an_ami("a", snapshots=("s1",)), "gp2": an_ami("b", snapshots=("s2", "s1"))}
    assert facts([], with_snaps).used_snapshots() == {"s1", "s2"}


@pytest.mark.parametrize(
    ("value", "count"),
    [(None, 0), ("0", 0), ("1", 1), ("7", 7), ("-3", 0), ("one", 1_000_000), ("", 1_000_000)],
)
def test_counters_read_the_tag_and_never_loop_on_garbage(value: str | None, count: int) -> None:
    found = {} if value is None else {tags.TEST_REQUESTED: value, tags.RESUMED: value}
    assert counter(found, tags.TEST_REQUESTED) == count
    assert SnapshotFacts("s", "completed", T0, found).resumed == count
    assert AmiFacts("a", "available", State.TESTING, T0, (), found).test_requests == count


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (T0, T0),
        (T0.replace(tzinfo=None), T0),  # naive is UTC
        ("2026-06-01T12:00:00Z", T0),
        ("2026-06-01T12:00:00+00:00", T0),
        ("2026-06-01T12:00:00", T0),
        ("yesterday", None),
        ("", None),
        (None, None),
        (12, None),
    ],
)
def test_parse_when(value: Any, expected: datetime | None) -> None:
    assert parse_when(value) == expected
    assert aware(T0.replace(tzinfo=None)) == T0


# -- plan_image: one rule at a time -------------------------------------------------------


def test_no_trace_at_all_is_staged_from_a_new_upload_in_every_scope() -> None:
    for scope in Scope:
        assert image_plan(facts(), scope, now=T0) == [stage()]


def test_a_half_written_snapshot_is_never_resumed_from_nor_deleted_while_it_is_the_only_trace() -> (
    None
):
    for found in (half("s-p"), half("s-c", aws_state="completed"), half("s-e", aws_state="error")):
        for scope in Scope:
            # The reconcile pass counts the uploads it starts beside it (bounded).
            counted = [("mark", found.snapshot_id, 1)] if scope is Scope.RECONCILE else []
            assert image_plan(facts([found]), scope) == [*counted, stage()], (found, scope)


def test_only_the_newest_half_written_snapshot_is_kept_until_a_new_upload_replaces_it() -> None:
    three = [half("s-1", started=T0 - 4 * HOUR), half("s-3"), half("s-2", started=T0 - 3 * HOUR)]
    assert image_plan(facts(three)) == [
        ("delete", "s-1"),
        ("delete", "s-2"),
        ("mark", "s-3", 1),
        stage(),
    ]
    assert image_plan(facts(three), Scope.MESSAGE) == [stage()]  # another worker may write them


def test_uploads_beside_a_half_written_snapshot_are_bounded_in_the_reconcile_scope() -> None:
    # A leftover with no intent (its compose done or forgotten) is not retried forever.
    tired = facts([half("s-p", resumed=RESUMED_MAX)])
    assert image_plan(tired) == [("delete", "s-p"), GIVEUP]
    assert image_plan(tired, Scope.MESSAGE) == [stage()]


def test_a_trusted_snapshot_is_resumed_from_and_counted_first_in_the_reconcile_scope() -> None:
    found = facts([snap("s-1", resumed=1)])
    assert image_plan(found) == [("mark", "s-1", 2), stage("s-1")]
    assert image_plan(found, Scope.MESSAGE) == [stage("s-1")]
    assert image_plan(found, Scope.BY_HAND) == [stage("s-1")]


def test_the_newest_trusted_snapshot_supersedes_every_other_one() -> None:
    snaps = [
        snap("s-old", started=T0 - 5 * HOUR),
        snap("s-new"),
        half("s-p", started=T0 - 4 * HOUR),
        half("s-later", started=T0 - 3 * HOUR),
    ]
    assert image_plan(facts(snaps)) == [
        ("delete", "s-p"),
        ("delete", "s-later"),
        ("delete", "s-old"),
        ("mark", "s-new", 1),
        stage("s-new"),
    ]
    assert image_plan(facts(snaps), Scope.MESSAGE) == [stage("s-new")]


def test_after_resumed_max_resumes_the_image_is_given_up_and_its_snapshots_go() -> None:
    given_up = facts([snap("s-1", resumed=RESUMED_MAX), half("s-p", started=T0 - 3 * HOUR)])
    assert image_plan(given_up) == [("delete", "s-p"), ("delete", "s-1"), GIVEUP]
    assert image_plan(facts([snap("s-1", resumed=RESUMED_MAX - 1)])) == [
        ("mark", "s-1", RESUMED_MAX),
        stage("s-1"),
    ]
    # An unreadable count is "too often": given up, never looped on.
    assert image_plan(facts([snap("s-1", resumed="lots")])) == [("delete", "s-1"), GIVEUP]
    # A message (a release engineer's replay) does not count resumes: attempts bound it.
    assert image_plan(given_up, Scope.MESSAGE) == [stage("s-1")]


def test_a_snapshot_given_up_on_is_kept_while_an_ami_of_another_volume_type_uses_it() -> None:
    found = facts(
        [snap("s-1", resumed=RESUMED_MAX)],
        {"gp3": an_ami("ami-1", snapshots=("s-1",)), "gp2": None},
    )
    assert image_plan(found, policy=TWO_VOLS) == [GIVEUP]


def test_given_up_after_max_attempts_in_every_scope() -> None:
    for scope in Scope:
        for snaps in ([], [half("s-p")], [snap("s-1")]):
            # The pass (past the grace period) removes what it gives up on, so that
            # no later pass takes it for unfinished work; a message touches nothing.
            gone = [("delete", s.snapshot_id) for s in snaps] if scope is Scope.RECONCILE else []
            assert image_plan(facts(snaps), scope, attempts=3) == [*gone, GIVEUP], (scope, snaps)
            assert GIVEUP not in image_plan(facts(snaps), scope, attempts=2)
    # A broken AMI is still removed when the image is given up.
    broken = facts([], {"gp3": an_ami("ami-b", aws_state="failed")})
    assert image_plan(broken, attempts=5) == [("deregister", "ami-b"), GIVEUP]


def test_a_broken_ami_is_deregistered_and_the_image_staged_again() -> None:
    broken = an_ami("ami-b", aws_state="failed", snapshots=("s-1",))
    found = facts([snap("s-1")], {"gp3": broken})
    assert image_plan(found) == [("deregister", "ami-b"), ("mark", "s-1", 1), stage("s-1")]
    assert image_plan(found, Scope.MESSAGE) == [("deregister", "ami-b"), stage("s-1")]
    # Never tested, never announced: an untagged broken AMI too.
    untagged = facts([], {"gp3": an_ami("ami-b", None, aws_state="error")})
    assert image_plan(untagged, Scope.MESSAGE) == [("deregister", "ami-b"), stage()]


def test_an_untagged_ami_is_adopted_and_announced_never_registered_again() -> None:
    orphan = an_ami("ami-o", None, snapshots=("s-1",))
    found = facts([snap("s-1")], {"gp3": orphan})
    expected = [("adopt", "gp3", "ami-o"), ("announce", "gp3", "ami-o", True)]
    for scope in Scope:
        assert image_plan(found, scope) == expected
    # Even with the resumes used up: a usable AMI is never thrown away.
    used_up = facts([snap("s-1", resumed=RESUMED_MAX)], {"gp3": orphan})
    assert image_plan(used_up) == expected
    # One volume type adopted, the other staged from the same snapshot.
    mixed = facts([snap("s-1")], {"gp3": orphan, "gp2": None})
    assert image_plan(mixed, policy=TWO_VOLS) == [
        *expected,
        ("mark", "s-1", 1),
        stage("s-1", ("gp2",)),
    ]


def test_a_message_announces_existing_amis_and_asks_to_test_only_those_testing() -> None:
    amis = {
        "gp3": an_ami("ami-t", State.TESTING),
        "gp2": an_ami("ami-r", State.RELEASED),
    }
    expected = [("announce", "gp3", "ami-t", True), ("announce", "gp2", "ami-r", False)]
    assert image_plan(facts([], amis), Scope.MESSAGE, policy=TWO_VOLS) == expected
    assert image_plan(facts([], amis), Scope.BY_HAND, policy=TWO_VOLS) == expected
    for state in (State.PROMOTING, State.REJECTED):
        assert image_plan(facts([], {"gp3": an_ami("a", state)}), Scope.MESSAGE) == [
            ("announce", "gp3", "a", False)
        ]
    # The pass does not announce again: the AMI already had its messages.
    assert image_plan(facts([], amis), policy=TWO_VOLS) == []


def test_only_the_volume_types_without_a_usable_ami_are_staged() -> None:
    found = facts([snap("s-1")], {"gp3": an_ami("ami-1", snapshots=("s-1",)), "gp2": None})
    assert image_plan(found, policy=TWO_VOLS) == [("mark", "s-1", 1), stage("s-1", ("gp2",))]
    assert image_plan(found, Scope.MESSAGE, policy=TWO_VOLS) == [
        ("announce", "gp3", "ami-1", True),
        stage("s-1", ("gp2",)),
    ]
    # A volume type no longer configured is not looked at.
    assert image_plan(found) == []


def test_nothing_younger_than_the_grace_period_is_touched_by_the_pass() -> None:
    cases = [
        facts([half("s-p", started=T0)]),
        facts([snap("s-1", started=T0)]),
        facts([half("s-old", started=T0 - 5 * HOUR), half("s-young", started=T0)]),
        facts([snap("s-1", started=T0 - 5 * HOUR)], {"gp3": an_ami("ami-o", None, created=T0)}),
        facts([], {"gp3": an_ami("ami-o", None, created=T0)}),
    ]
    for found in cases:
        assert image_plan(found, now=T0 + HOUR) == [WAIT], found
        assert image_plan(found, now=T0 + 2 * HOUR) != [WAIT], found  # the grace is over
        assert image_plan(found, Scope.MESSAGE, now=T0 + HOUR) != [WAIT], found
    # A tagged AMI is done, however young: it holds nothing back.
    assert image_plan(facts([], {"gp3": an_ami("a", created=T0)}), now=T0 + MINUTE) == []
    # A snapshot started "in the future" (clock skew) is young too.
    assert image_plan(facts([half("s-p", started=T0 + HOUR)]), now=T0) == [WAIT]


def test_busy_is_wait_in_every_scope_whatever_the_facts() -> None:
    for scope in Scope:
        cases: list[tuple[list[SnapshotFacts], dict[str, AmiFacts | None]]] = [
            ([], {"gp3": None}),
            ([half("s-p", started=T0 - 5 * HOUR)], {"gp3": None}),
            ([snap("s-1", resumed=RESUMED_MAX)], {"gp3": an_ami("ami-b", aws_state="failed")}),
        ]
        for snaps, amis in cases:
            assert image_plan(facts(snaps, amis, busy=True), scope, attempts=9) == [WAIT]


def test_with_every_ami_in_place_the_pass_deletes_only_unused_snapshots() -> None:
    done = {"gp3": an_ami("ami-1")}  # moto: no snapshot named
    assert image_plan(facts([snap("s-1")], done)) == []
    old = T0 - 5 * HOUR
    assert image_plan(facts([snap("s-1"), half("s-p", started=old)], done)) == [("delete", "s-p")]
    # AMIs that name their snapshots (AWS does): a duplicate complete upload goes too.
    named = {"gp3": an_ami("ami-1", State.RELEASED, snapshots=("s-1",))}
    assert image_plan(facts([snap("s-1"), snap("s-2", started=old)], named)) == [("delete", "s-2")]
    # Made-up mappings are not trusted: complete snapshots stay.
    made_up = {"gp3": an_ami("ami-1", snapshots=("snap-nobody",))}
    assert image_plan(facts([snap("s-1"), snap("s-2")], made_up)) == []
    # An AMI registered from an unmarked snapshot (before the mark existed) keeps it.
    legacy = {"gp3": an_ami("ami-1", snapshots=("s-1", "snap-elsewhere"))}
    assert image_plan(facts([half("s-1", started=old)], legacy)) == []
    legacy_known = {"gp3": an_ami("ami-1", snapshots=("s-1",))}
    assert image_plan(facts([half("s-1", started=old)], legacy_known)) == []
    # A message never deletes.
    assert image_plan(facts([half("s-p", started=old)], done), Scope.MESSAGE) == [
        ("announce", "gp3", "ami-1", True)
    ]


def test_a_snapshot_an_ami_uses_is_never_deleted_even_when_superseded() -> None:
    # A broken gp3 AMI still names s-old: the pass restages from s-new and keeps s-old.
    found = facts(
        [snap("s-old", started=T0 - 5 * HOUR), snap("s-new")],
        {"gp3": an_ami("ami-b", aws_state="failed", snapshots=("s-old",))},
    )
    assert image_plan(found) == [("deregister", "ami-b"), ("mark", "s-new", 1), stage("s-new")]


def test_image_plan_helpers() -> None:
    staged = plan_image(facts([snap("s-1")]), POLICY, LATE, scope=Scope.RECONCILE)
    assert staged.stages and not staged.gives_up and not staged.idle
    assert [a.snapshot_id for a in only(staged.actions, MarkResumed)] == ["s-1"]
    assert staged.of(MarkResumed) == only(staged.actions, MarkResumed)
    gave_up = plan_image(facts(), POLICY, LATE, scope=Scope.RECONCILE, attempts=3)
    assert gave_up.gives_up and not gave_up.stages
    idle = plan_image(facts(busy=True), POLICY, LATE, scope=Scope.RECONCILE)
    assert idle.idle and ImagePlan().idle


# -- deprecation --------------------------------------------------------------------------

DAYS = {"production": 730, "test": 30, "nightly": 14, "ci": 7}
DAY = timedelta(days=1)


@pytest.mark.parametrize(
    ("compose_id", "kind"),
    [
        ("Fedora-41-20241027.0", "production"),
        ("Fedora-Cloud-41-20241027.0", "production"),
        ("Fedora-Rawhide-20241027.n.0", "nightly"),
        ("Fedora-Cloud-41-20241027.n.1", "nightly"),
        ("Fedora-41-20241027.t.2", "test"),
        ("Fedora-41-20241027.ci.0", "ci"),
        ("Fedora-41-20241027.x.0", None),  # a suffix productmd does not know
        ("no-date-here", None),
    ],
)
def test_compose_type_from_the_compose_id(compose_id: str, kind: str | None) -> None:
    assert compose_type(compose_id) == kind


@pytest.mark.parametrize(
    ("compose_id", "days", "now", "expected"),
    [
        # Nightlies short, production long: counted from staging, not from now.
        ("Fedora-Rawhide-20260601.n.0", DAYS, T0 + HOUR, T0 + 14 * DAY),
        ("Fedora-41-20260601.t.0", DAYS, T0 + 2 * DAY, T0 + 30 * DAY),
        ("Fedora-41-20260601.ci.0", DAYS, T0, T0 + 7 * DAY),
        ("Fedora-41-20260601.0", DAYS, T0 + HOUR, T0 + 730 * DAY),
        # A longer policy is capped at AWS's 2 years for a public AMI.
        ("Fedora-41-20260601.0", {**DAYS, "production": 3650}, T0, T0 + PUBLIC_DEPRECATION_MAX),
        # An unknown compose type gets the shortest period configured.
        ("Fedora-41-20260601.x.0", DAYS, T0, T0 + 7 * DAY),
        ("odd", {"production": 400, "nightly": 20}, T0, T0 + 20 * DAY),
        # A promotion resumed after the policy's time: as soon as AWS allows, not the past.
        ("Fedora-Rawhide-20260601.n.0", DAYS, T0 + 20 * DAY, T0 + 20 * DAY + DEPRECATION_LEAD),
    ],
)
def test_deprecation_time(
    compose_id: str, days: dict[str, int], now: datetime, expected: datetime
) -> None:
    assert deprecation_time(compose_id, T0, now, days) == expected


def test_deprecation_time_is_whole_minutes_and_never_in_the_past() -> None:
    staged = T0 + timedelta(seconds=7, microseconds=5)
    at = deprecation_time("Fedora-41-20260601.n.0", staged, T0, DAYS)
    assert at == T0 + 14 * DAY + MINUTE and at.second == at.microsecond == 0
    now = T0 + 30 * DAY + timedelta(seconds=30)
    late = deprecation_time("Fedora-41-20260601.n.0", staged, now, DAYS)
    assert now + DEPRECATION_LEAD <= late < now + DEPRECATION_LEAD + MINUTE


def test_release_and_promote_carry_the_deprecation_time_of_the_compose() -> None:
    policy = dataclasses.replace(POLICY, deprecation_days={**DAYS, "production": 100})
    passed = life(an_ami("ami-1", staged_at=T0), {SUMMARY_TESTCASE: result("PASSED")})
    (release,) = plan_ami(passed, policy, LATE, scope=Scope.MESSAGE)
    assert isinstance(release, Release) and release.deprecate_at == T0 + 100 * DAY  # COMPOSE: .0
    promoting = life(an_ami("ami-1", State.PROMOTING, staged_at=T0))
    (resume,) = plan_ami(promoting, policy, LATE + 5 * DAY, scope=Scope.RECONCILE)
    assert isinstance(resume, Promote) and resume.deprecate_at == T0 + 100 * DAY


# -- plan_ami -------------------------------------------------------------------------------


def test_a_passed_ami_is_released_in_every_scope() -> None:
    passed = life(an_ami("ami-1"), {SUMMARY_TESTCASE: result("PASSED")})
    for scope in Scope:
        (action,) = plan_ami(passed, POLICY, LATE, scope=scope)
        assert isinstance(action, Release) and action.decision.release


@pytest.mark.parametrize("outcome", ["FAILED", "NEEDS_INSPECTION", "failed"])
def test_a_failed_ami_is_rejected_in_every_scope(outcome: str) -> None:
    failed = life(an_ami("ami-1"), {SUMMARY_TESTCASE: result(outcome, "selinux denials")})
    for scope in Scope:
        (action,) = plan_ami(failed, POLICY, LATE, scope=scope)
        assert isinstance(action, Reject)
        assert action.decision.failed == ((SUMMARY_TESTCASE, outcome.upper(), "selinux denials"),)


def test_no_results_by_the_deadline_rejects() -> None:
    nothing = life(an_ami("ami-1", staged_at=T0))
    for scope in Scope:
        (action,) = plan_ami(nothing, POLICY, T0 + 6 * HOUR, scope=scope)
        assert isinstance(action, Reject) and action.decision.missing == (SUMMARY_TESTCASE,)
        assert ami_plan(nothing, scope, T0 + 6 * HOUR - MINUTE) in ([WAIT], [("retest", 1)])


def test_missing_results_are_requested_again_once_and_only_by_the_pass() -> None:
    staged = an_ami("ami-1", staged_at=T0)
    assert ami_plan(life(staged), now=T0 + 3 * HOUR - MINUTE) == [WAIT]
    assert ami_plan(life(staged), now=T0 + 3 * HOUR) == [("retest", 1)]
    assert ami_plan(life(staged), Scope.MESSAGE, T0 + 3 * HOUR) == [WAIT]
    assert ami_plan(life(staged), Scope.BY_HAND, T0 + 3 * HOUR) == [WAIT]
    asked = an_ami("ami-1", staged_at=T0, requested=1)
    assert ami_plan(life(asked), now=T0 + 5 * HOUR) == [WAIT]  # once, not twice
    garbage = AmiFacts("ami-1", "available", State.TESTING, T0, (), {tags.TEST_REQUESTED: "x"})
    assert ami_plan(life(garbage), now=T0 + 5 * HOUR) == [WAIT]
    # An INFO result is not final: still missing, still re-requested.
    info = life(staged, {SUMMARY_TESTCASE: result("INFO")})
    assert ami_plan(info, now=T0 + 3 * HOUR) == [("retest", 1)]
    # Only a non-required result came: the required one is missing.
    other = life(staged, {"autocloud.ami.selinux": result("PASSED")})
    assert ami_plan(other, now=T0 + 3 * HOUR) == [("retest", 1)]


def test_resultsdb_unavailable_is_wait_never_a_decision() -> None:
    for staged_at in (T0, T0 - 30 * HOUR):  # even long past the deadline
        down = life(an_ami("ami-1", staged_at=staged_at), down="connection refused")
        for scope in Scope:
            assert ami_plan(down, scope, LATE) == [WAIT], (staged_at, scope)


def test_a_promoting_ami_is_resumed_only_outside_the_message_scope() -> None:
    promoting = life(an_ami("ami-1", State.PROMOTING))
    assert ami_plan(promoting, Scope.MESSAGE) == []
    assert ami_plan(promoting, Scope.RECONCILE) == [("promote",)]
    assert ami_plan(promoting, Scope.BY_HAND) == [("promote",)]


def test_amis_past_testing_or_untagged_or_broken_are_not_decided_on() -> None:
    for state in (State.RELEASED, State.REJECTED, None):
        passed = life(an_ami("ami-1", state), {SUMMARY_TESTCASE: result("PASSED")})
        for scope in Scope:
            assert ami_plan(passed, scope) == []
    broken = life(an_ami("ami-1", aws_state="failed"), {SUMMARY_TESTCASE: result("PASSED")})
    broken_promoting = life(an_ami("ami-1", State.PROMOTING, aws_state="error"))
    for scope in Scope:
        assert ami_plan(broken, scope) == [WAIT]  # stage replaces it; never released
        assert ami_plan(broken_promoting, scope) == [WAIT]


def test_a_missing_staged_at_tag_falls_back_to_the_creation_date() -> None:
    untimed = AmiFacts("ami-1", "available", State.TESTING, T0, (), {tags.STATE: "testing"})
    assert ami_plan(life(untimed), now=T0 + 6 * HOUR) == [("reject",)]
    assert ami_plan(life(untimed), now=T0 + 3 * HOUR) == [("retest", 1)]


# -- retest_due ----------------------------------------------------------------------------


def _waiting(missing: tuple[str, ...] = (SUMMARY_TESTCASE,)) -> Decision:
    return Decision("wait", f"waiting for {', '.join(missing)}", (), missing)


def test_retest_due_only_for_missing_results_after_the_delay_and_once() -> None:
    later = T0 + 5 * HOUR
    assert retest_due(
        _waiting(), staged_at=T0, now=T0 + 3 * HOUR, retest_after=3 * HOUR, requested=0
    )
    assert not retest_due(
        _waiting(),
        staged_at=T0,
        now=T0 + 3 * HOUR - timedelta(seconds=1),
        retest_after=3 * HOUR,
        requested=0,
    )
    assert not retest_due(_waiting(), staged_at=T0, now=later, retest_after=3 * HOUR, requested=1)
    assert retest_due(
        _waiting(), staged_at=T0, now=later, retest_after=HOUR, requested=1, max_retests=2
    )
    # ResultsDB down: the gate waits with nothing listed missing -> never a retest.
    unavailable = Decision("wait", "ResultsDB unavailable: boom")
    assert not retest_due(unavailable, staged_at=T0, now=later, retest_after=HOUR, requested=0)
    for verdict in (
        Decision("release", "passed"),
        Decision("reject", "failed: x", ((SUMMARY_TESTCASE, "FAILED", ""),)),
        Decision("wait", "x", ((SUMMARY_TESTCASE, "FAILED", ""),), ("other",)),
    ):
        assert not retest_due(verdict, staged_at=T0, now=later, retest_after=HOUR, requested=0)
    # A naive staging time is UTC, as the gate reads it.
    naive = T0.replace(tzinfo=None)
    assert retest_due(_waiting(), staged_at=naive, now=later, retest_after=HOUR, requested=0)


# -- compose_progress -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("staged", "given_up", "expected"),
    [
        ({}, {}, ((), (), ("x", "a", "o"))),
        ({"x": True}, {}, (("x",), (), ("a", "o"))),
        ({"x": True, "a": False}, {"o": "404"}, (("x",), ("o",), ("a",))),
        ({"x": True, "a": True, "o": True}, {}, (("x", "a", "o"), (), ())),
        ({"x": True}, {"a": "gave up", "o": "gave up"}, (("x",), ("a", "o"), ())),
        ({"x": True, "a": True}, {"a": "both"}, (("x",), ("a",), ("o",))),  # given up wins
        ({"elsewhere": True}, {"nowhere": "x"}, ((), (), ("x", "a", "o"))),
    ],
)
def test_compose_progress(
    staged: dict[str, bool],
    given_up: dict[str, str],
    expected: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]],
) -> None:
    progress = compose_progress(["x", "a", "o"], staged, given_up)
    assert (progress.staged, progress.given_up, progress.pending) == expected
    assert progress.done is (expected[2] == ())
    assert dict(progress.notes) == given_up
    assert compose_progress([], {}, {}).done  # a compose without images is done at once


# -- the partial states every kill point of the crash sweep leaves --------------------------
# One compose of two images (x86_64 passes its tests, aarch64 fails them), one volume
# type; the hub was killed at T0 with the compose's intent recorded. "young" is the
# pass within the grace period, "late" the pass after it (3 h: also retest_after).


@dataclass(frozen=True)
class KillState:
    name: str
    images: Mapping[str, ImageFacts]
    amis: Mapping[str, AmiLife] = field(default_factory=dict)
    expect: Mapping[str, Mapping[str, list[Shape]]] = field(default_factory=dict)
    """moment ("message", "young", "late") -> image or AMI id -> expected plan"""


def _staged(
    image: CloudImage, ami_id: str, snap_id: str, state: State = State.TESTING
) -> ImageFacts:
    return facts([snap(snap_id)], {"gp3": an_ami(ami_id, state, snapshots=(snap_id,))}, image=image)


def _testing(ami_id: str, latest: Mapping[str, Any] | None = None) -> AmiLife:
    return life(an_ami(ami_id, snapshots=("s",)), latest)


PASS = {SUMMARY_TESTCASE: result("PASSED")}
FAIL = {SUMMARY_TESTCASE: result("FAILED", "selinux")}
NONE_: dict[str, Any] = {}

KILL_STATES = [
    KillState(
        "mid-upload",
        {
            "x86": facts([half("s-x")], image=X86),
            "arm": facts([half("s-a", aws_state="completed")], image=ARM),  # moto says completed
        },
        expect={
            "message": {"x86": [stage()], "arm": [stage()]},
            "young": {"x86": [WAIT], "arm": [WAIT]},
            "late": {
                "x86": [("mark", "s-x", 1), stage()],
                "arm": [("mark", "s-a", 1), stage()],
            },
        },
    ),
    KillState(
        "mid-upload-of-a-restage",  # killed again while the pass re-uploaded
        {"x86": facts([half("s-x1", started=T0 - 4 * HOUR), half("s-x2")], image=X86)},
        expect={
            "message": {"x86": [stage()]},
            "young": {"x86": [WAIT]},
            "late": {"x86": [("delete", "s-x1"), ("mark", "s-x2", 1), stage()]},
        },
    ),
    KillState(
        "upload-done-before-register",
        {"x86": facts([snap("s-x")], image=X86), "arm": facts([snap("s-a")], image=ARM)},
        expect={
            "message": {"x86": [stage("s-x")], "arm": [stage("s-a")]},
            "young": {"x86": [WAIT], "arm": [WAIT]},
            "late": {
                "x86": [("mark", "s-x", 1), stage("s-x")],
                "arm": [("mark", "s-a", 1), stage("s-a")],
            },
        },
    ),
    KillState(
        "after-register-before-tagging-no-backlog",
        {
            "x86": facts(
                [snap("s-x")], {"gp3": an_ami("ami-x", None, snapshots=("s-x",))}, image=X86
            ),
            "arm": facts([snap("s-a")], image=ARM),
        },
        expect={
            "message": {
                "x86": [("adopt", "gp3", "ami-x"), ("announce", "gp3", "ami-x", True)],
                "arm": [stage("s-a")],
            },
            "young": {"x86": [WAIT], "arm": [WAIT]},
            "late": {
                "x86": [("adopt", "gp3", "ami-x"), ("announce", "gp3", "ami-x", True)],
                "arm": [("mark", "s-a", 1), stage("s-a")],
            },
        },
    ),
    KillState(
        "test-instance-launch",
        {"x86": _staged(X86, "ami-x", "s-x"), "arm": _staged(ARM, "ami-a", "s-a")},
        {"ami-x": _testing("ami-x"), "ami-a": _testing("ami-a")},
        expect={
            "message": {
                "x86": [("announce", "gp3", "ami-x", True)],
                "arm": [("announce", "gp3", "ami-a", True)],
                "ami-x": [WAIT],
                "ami-a": [WAIT],
            },
            "young": {"x86": [WAIT], "arm": [WAIT], "ami-x": [WAIT], "ami-a": [WAIT]},
            "late": {"x86": [], "arm": [], "ami-x": [("retest", 1)], "ami-a": [("retest", 1)]},
        },
    ),
    KillState(
        "mid-suite",  # checks posted, the summary (posted last) not yet
        {"x86": _staged(X86, "ami-x", "s-x"), "arm": _staged(ARM, "ami-a", "s-a")},
        {
            "ami-x": _testing("ami-x", {"autocloud.ami.boot": result("PASSED")}),
            "ami-a": _testing("ami-a", {SUMMARY_TESTCASE: result("INFO")}),
        },
        expect={
            "message": {"ami-x": [WAIT], "ami-a": [WAIT]},
            "young": {"ami-x": [WAIT], "ami-a": [WAIT]},
            "late": {"ami-x": [("retest", 1)], "ami-a": [("retest", 1)]},
        },
    ),
    KillState(
        "suite-done-before-cleanup-no-backlog",  # the aarch64 image had not started
        {"x86": _staged(X86, "ami-x", "s-x"), "arm": facts([], image=ARM)},
        {"ami-x": _testing("ami-x", PASS)},
        expect={
            "message": {
                "x86": [("announce", "gp3", "ami-x", True)],
                "arm": [stage()],
                "ami-x": [("release",)],
            },
            "young": {"x86": [WAIT], "arm": [stage()], "ami-x": [("release",)]},
            "late": {"x86": [], "arm": [stage()], "ami-x": [("release",)]},
        },
    ),
    KillState(
        "after-results-before-the-gate",
        {"x86": _staged(X86, "ami-x", "s-x"), "arm": _staged(ARM, "ami-a", "s-a")},
        {"ami-x": _testing("ami-x", PASS), "ami-a": _testing("ami-a", FAIL)},
        expect={
            moment: {"ami-x": [("release",)], "ami-a": [("reject",)]}
            for moment in ("message", "young", "late")
        },
    ),
    *[
        KillState(
            name,  # the state is promoting; the copies are in some regions, or all
            {
                "x86": _staged(X86, "ami-x", "s-x", State.PROMOTING),
                "arm": _staged(ARM, "ami-a", "s-a", State.REJECTED),
            },
            {
                "ami-x": life(an_ami("ami-x", State.PROMOTING)),
                "ami-a": life(an_ami("ami-a", State.REJECTED)),
            },
            expect={
                "message": {
                    "x86": [("announce", "gp3", "ami-x", False)],
                    "arm": [("announce", "gp3", "ami-a", False)],
                    "ami-x": [],
                    "ami-a": [],
                },
                "young": {"x86": [WAIT], "ami-x": [("promote",)], "ami-a": []},
                "late": {"x86": [], "arm": [], "ami-x": [("promote",)], "ami-a": []},
            },
        )
        for name in (
            "mid-copy-some-regions-done",
            "copy-started-before-tagging",
            "before-the-released-tag",
        )
    ],
    KillState(
        "sigterm-mid-upload-no-backlog",
        {"x86": facts([half("s-x")], image=X86), "arm": facts([], image=ARM)},
        expect={
            "message": {"x86": [stage()], "arm": [stage()]},
            "young": {"x86": [WAIT], "arm": [stage()]},
            "late": {"x86": [("mark", "s-x", 1), stage()], "arm": [stage()]},
        },
    ),
    KillState(
        "resultsdb-down-at-the-restart",
        {"x86": _staged(X86, "ami-x", "s-x")},
        {"ami-x": life(an_ami("ami-x", staged_at=T0 - 30 * HOUR), down="503")},
        expect={moment: {"ami-x": [WAIT]} for moment in ("message", "young", "late")},
    ),
]

MOMENTS = {
    "message": (Scope.MESSAGE, LATE),
    "young": (Scope.RECONCILE, YOUNG),
    "late": (Scope.RECONCILE, LATE),
}


@pytest.mark.parametrize("state", KILL_STATES, ids=lambda s: s.name)
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_the_plan_for_what_each_kill_point_leaves(state: KillState, moment: str) -> None:
    scope, now = MOMENTS[moment]
    expected = state.expect[moment]
    assert expected, "every kill point states what it expects"
    for key, want in expected.items():
        if key in state.images:
            got = image_plan(state.images[key], scope, now)
        else:
            got = ami_plan(state.amis[key], scope, now)
        assert got == want, f"{state.name} {moment} {key}"


def test_every_kill_point_of_the_crash_sweep_has_a_row() -> None:
    # The names of tests/test_crash_integration.py's KILL_POINTS (read, not imported:
    # that module starts a whole stack).
    swept = {
        "mid-upload",
        "upload-done-before-register",
        "after-register-before-tagging-no-backlog",
        "test-instance-launch",
        "mid-suite",
        "suite-done-before-cleanup-no-backlog",
        "after-results-before-the-gate",
        "mid-copy-some-regions-done",
        "copy-started-before-tagging",
        "before-the-released-tag",
        "sigterm-mid-upload-no-backlog",
    }
    assert swept <= {s.name for s in KILL_STATES}


def test_whatever_a_kill_left_the_late_pass_never_leaves_an_image_without_a_way_forward() -> None:
    """Every unstaged image of every kill state is staged (from a trusted snapshot if any)."""
    for state in KILL_STATES:
        for key, found in state.images.items():
            planned = plan_image(found, POLICY, LATE, scope=Scope.RECONCILE)
            if found.staged:
                assert not planned.stages, (state.name, key)
                continue
            assert planned.stages or planned.of(Adopt), (state.name, key)
            for action in only(planned.actions, Stage):
                trusted = [s.snapshot_id for s in found.trusted()]
                assert action.resume_from == (trusted[-1] if trusted else None)


# -- partial composes ---------------------------------------------------------------------


@dataclass(frozen=True)
class ComposeState:
    name: str
    images: Mapping[CloudImage, tuple[ImageFacts, int]]  # image -> (facts, attempts so far)
    late: Mapping[CloudImage, list[Shape]]
    staged: tuple[CloudImage, ...] = ()  # as the intent records it
    given_up: tuple[CloudImage, ...] = ()


COMPOSE_STATES = [
    ComposeState(
        "some uploaded, some registered, some not started",
        {
            X86: (_staged(X86, "ami-x", "s-x"), 0),
            ARM: (facts([snap("s-a")], image=ARM), 0),
            ATOMIC: (facts([], image=ATOMIC), 0),
        },
        {X86: [], ARM: [("mark", "s-a", 1), stage("s-a")], ATOMIC: [stage()]},
        staged=(X86,),
    ),
    ComposeState(
        "one failing image near its last attempt, one given up",
        {
            X86: (_staged(X86, "ami-x", "s-x"), 0),
            ARM: (facts([], image=ARM), 2),
            ATOMIC: (facts([half("s-o", started=T0 - 5 * HOUR)], image=ATOMIC), 3),
        },
        {X86: [], ARM: [stage()], ATOMIC: [("delete", "s-o"), GIVEUP]},
        staged=(X86,),
        given_up=(ATOMIC,),
    ),
    ComposeState(
        "one of two volume types registered, one broken",
        {
            X86: (
                facts([snap("s-x")], {"gp3": an_ami("ami-x", snapshots=("s-x",)), "gp2": None}),
                0,
            ),
            ARM: (
                facts(
                    [snap("s-a")],
                    {
                        "gp3": an_ami("ami-a", snapshots=("s-a",)),
                        "gp2": an_ami("ami-b", aws_state="failed"),
                    },
                    image=ARM,
                ),
                0,
            ),
            ATOMIC: (
                facts(
                    [],
                    {"gp3": an_ami("ami-o3"), "gp2": an_ami("ami-o2", State.RELEASED)},
                    image=ATOMIC,
                ),
                0,
            ),
        },
        {
            X86: [("mark", "s-x", 1), stage("s-x", ("gp2",))],
            ARM: [("deregister", "ami-b"), ("mark", "s-a", 1), stage("s-a", ("gp2",))],
            ATOMIC: [],
        },
        staged=(ATOMIC,),
    ),
    ComposeState(
        "everything staged",
        {
            image: (_staged(image, f"ami-{n}", f"s-{n}"), 0)
            for n, image in enumerate((X86, ARM, ATOMIC))
        },
        {X86: [], ARM: [], ATOMIC: []},
        staged=(X86, ARM, ATOMIC),
    ),
]


@pytest.mark.parametrize("state", COMPOSE_STATES, ids=lambda s: s.name)
def test_the_plan_for_each_image_of_a_partial_compose(state: ComposeState) -> None:
    policy = TWO_VOLS if any(len(f.amis) == 2 for f, _ in state.images.values()) else POLICY
    for image, (found, attempts) in state.images.items():
        got = image_plan(found, Scope.RECONCILE, LATE, attempts, policy)
        assert got == state.late[image], (state.name, image.image_name)
    shas = [i.sha256 for i in state.images]
    progress = compose_progress(
        shas, {i.sha256: True for i in state.staged}, {i.sha256: "x" for i in state.given_up}
    )
    still = [i for i in state.images if i not in state.staged and i not in state.given_up]
    assert progress.pending == tuple(i.sha256 for i in still)
    assert progress.done is (not still)
    # What the intent records agrees with the facts: a recorded image is staged in AWS.
    for image in state.staged:
        assert state.images[image][0].staged


def test_partial_compose_amis_copies_in_some_regions_and_results_missing() -> None:
    """The AMIs of one compose, each at another step: every step gets its own action."""
    lives = {
        "promoting (copies in some regions)": (life(an_ami("a1", State.PROMOTING)), [("promote",)]),
        "passed": (life(an_ami("a2"), PASS), [("release",)]),
        "failed": (life(an_ami("a3"), FAIL), [("reject",)]),
        "results missing": (life(an_ami("a4", staged_at=T0)), [("retest", 1)]),
        "results missing, asked again": (life(an_ami("a5", staged_at=T0, requested=1)), [WAIT]),
        "results missing past the deadline": (
            life(an_ami("a6", staged_at=T0 - 4 * HOUR, requested=1)),
            [("reject",)],
        ),
        "released": (life(an_ami("a7", State.RELEASED)), []),
        "rejected": (life(an_ami("a8", State.REJECTED)), []),
    }
    for what, (found, want) in lives.items():
        assert ami_plan(found) == want, what


# -- properties ----------------------------------------------------------------------------

SNAP_IDS = [f"s-{i}" for i in range(5)]
AGES = [timedelta(0), 30 * MINUTE, 3 * HOUR, 30 * HOUR]


@st.composite
def snapshot_facts(draw: st.DrawFn) -> list[SnapshotFacts]:
    ids = draw(st.lists(st.sampled_from(SNAP_IDS), unique=True, max_size=4))
    return [
        snap(
            sid,
            trusted=draw(st.booleans()),
            aws_state=draw(st.sampled_from(["completed", "pending", "error"])),
            started=LATE - draw(st.sampled_from(AGES)),
            resumed=draw(st.none() | st.integers(0, 4)),
        )
        for sid in ids
    ]


@st.composite
def ami_facts(draw: st.DrawFn, vols: tuple[str, ...]) -> dict[str, AmiFacts | None]:
    found: dict[str, AmiFacts | None] = {}
    for n, vol in enumerate(vols):
        if draw(st.booleans()):
            found[vol] = None
            continue
        found[vol] = an_ami(
            f"ami-{n}",
            draw(st.none() | st.sampled_from(list(State))),
            aws_state=draw(st.sampled_from(["available", "pending", "failed", "error"])),
            created=LATE - draw(st.sampled_from(AGES)),
            snapshots=tuple(
                draw(st.lists(st.sampled_from([*SNAP_IDS, "s-elsewhere"]), unique=True, max_size=2))
            ),
        )
    return found


@st.composite
def situations(draw: st.DrawFn) -> tuple[ImageFacts, Policy, Scope, int]:
    vols = draw(st.sampled_from([("gp3",), ("gp3", "gp2"), ("io2", "gp3", "gp2")]))
    found = ImageFacts(
        X86, tuple(draw(snapshot_facts())), draw(ami_facts(vols)), draw(st.booleans())
    )
    policy = Policy(volume_types=vols, grace=2 * HOUR, max_attempts=3)
    return found, policy, draw(st.sampled_from(list(Scope))), draw(st.integers(0, 4))


@settings(max_examples=200, deadline=None)
@given(situations())
def test_plan_image_invariants(situation: tuple[ImageFacts, Policy, Scope, int]) -> None:
    found, policy, scope, attempts = situation
    planned = plan_image(found, policy, LATE, scope=scope, attempts=attempts)
    actions = planned.actions
    known = {s.snapshot_id: s for s in found.snapshots}
    deleted = {a.snapshot_id for a in only(actions, DeleteSnapshot)}
    stages = only(actions, Stage)
    amis = {v: a for v, a in found.amis.items() if a is not None}
    missing = [v for v in policy.volume_types if amis.get(v) is None or amis[v].broken]
    young = any(LATE - s.started < policy.grace for s in found.snapshots) or any(
        not a.tagged and a.created is not None and LATE - a.created < policy.grace
        for a in amis.values()
    )

    # Never deletes what it does not know, nor a snapshot any AMI uses.
    assert deleted <= set(known)
    assert not deleted & found.used_snapshots()
    # Busy: waits, in every scope.
    if found.busy:
        assert shapes(actions) == [WAIT]
    # Only the pass deletes and counts resumes; within the grace period it waits.
    if scope is not Scope.RECONCILE:
        assert not deleted and not only(actions, MarkResumed)
    elif young and not found.busy:
        assert shapes(actions) == [WAIT]
    # Stages only what is missing, once; never with a give-up.
    assert len(stages) <= 1
    if stages:
        assert list(stages[0].vol_types) == missing
        assert not planned.gives_up
        resume = stages[0].resume_from
        if resume is not None:
            assert known[resume].trusted and resume not in deleted
            assert resume == found.trusted()[-1].snapshot_id
            marks = only(actions, MarkResumed)
            if scope is Scope.RECONCILE:
                assert [shape(m) for m in marks] == [("mark", resume, known[resume].resumed + 1)]
                assert actions.index(marks[0]) < actions.index(stages[0])
        else:
            assert not found.trusted()
    if not missing:
        assert not stages and not planned.gives_up
    elif not found.busy and not (young and scope is Scope.RECONCILE):
        # Something missing always gets a way forward: staged, or given up.
        assert stages or planned.gives_up
        if attempts >= policy.max_attempts:
            assert planned.gives_up
    # No step destroys the only trace of unfinished work (unless the image is given up).
    if missing and not planned.gives_up:
        left = [s for s in found.snapshots if s.snapshot_id not in deleted]
        if found.trusted():
            assert any(s.trusted for s in left)
        if found.snapshots:
            assert left
            if not found.trusted():
                assert found.untrusted()[-1] in left
    # Deregisters only broken AMIs; adopts only untagged usable ones.
    for dereg in only(actions, Deregister):
        assert any(a.ami_id == dereg.ami_id and a.broken for a in amis.values())
    for adopt in only(actions, Adopt):
        adopted = amis[adopt.vol_type]
        assert adopt.ami_id == adopted.ami_id and not adopted.tagged and not adopted.broken
    # Announces only existing usable AMIs, and asks to test only testing ones.
    for announce in only(actions, Announce):
        announced = amis[announce.vol_type]
        assert announce.ami_id == announced.ami_id and not announced.broken
        assert announce.request_test is (announced.state in (State.TESTING, None))


@settings(max_examples=300, deadline=None)
@given(
    st.none() | st.sampled_from(list(State)),
    st.sampled_from(["available", "pending", "failed"]),
    st.sampled_from([None, "PASSED", "FAILED", "NEEDS_INSPECTION", "INFO"]),
    st.booleans(),
    st.sampled_from([timedelta(0), HOUR, 3 * HOUR, 6 * HOUR, 30 * HOUR]),
    st.integers(0, 3),
    st.sampled_from(list(Scope)),
)
def test_plan_ami_invariants(
    state: State | None,
    aws_state: str,
    outcome: str | None,
    down: bool,
    waited: timedelta,
    requested: int,
    scope: Scope,
) -> None:
    found = an_ami(
        "ami-1", state, aws_state=aws_state, staged_at=LATE - waited, requested=requested
    )
    latest = {} if outcome is None else {SUMMARY_TESTCASE: result(outcome)}
    actions = plan_ami(life(found, latest, "down" if down else ""), POLICY, LATE, scope=scope)
    assert len(actions) <= 1
    kinds = {type(a) for a in actions}
    if found.broken:
        assert kinds <= {Wait}  # never tested, copied or published
    if down:
        assert not kinds & {Release, Reject, RequestTest}  # no decision without ResultsDB
    if kinds & {Release, Reject, RequestTest}:
        assert state is State.TESTING and not found.broken and not down
    if Release in kinds:
        assert outcome == "PASSED"
    if Promote in kinds:
        assert state is State.PROMOTING and scope is not Scope.MESSAGE
    if RequestTest in kinds:
        assert scope is Scope.RECONCILE and requested < 1 and waited >= POLICY.retest_after
    if state in (State.RELEASED, State.REJECTED, None):
        assert kinds <= {Wait}


# -- the image behind a snapshot, and a report's lines ------------------------------------------

GOOD_TAGS = {
    tags.COMPOSE_ID: COMPOSE,
    tags.IMAGE_NAME: "Fedora-Cloud-Base-40-20240601.0.x86_64.raw.xz",
    tags.IMAGE_URL: "https://kojipkgs.fedoraproject.org/compose/x.raw.xz",
    tags.SHA256: SHA,
    tags.ARCH: "x86_64",
    tags.SUBVARIANT: "Cloud_Base",
    tags.RELEASE: "40",
}


def test_image_from_tags_rebuilds_the_compose_image() -> None:
    image = image_from_tags(GOOD_TAGS, ["kojipkgs.fedoraproject.org"])
    assert (image.compose_id, image.image_name, image.arch, image.sha256) == (
        COMPOSE,
        GOOD_TAGS[tags.IMAGE_NAME],
        "x86_64",
        SHA,
    )
    assert image.url == GOOD_TAGS[tags.IMAGE_URL] and image.release == "40"
    assert image.subvariant == "Cloud_Base" and image.size == 0
    assert ami.ami_name(image, "gp3").endswith(f"-hvm-gp3-{SHA[:16]}")
    upper = image_from_tags({**GOOD_TAGS, tags.SHA256: SHA.upper()}, ["kojipkgs.fedoraproject.org"])
    assert upper.sha256 == SHA


@pytest.mark.parametrize(
    "change",
    [
        {tags.COMPOSE_ID: ""},
        {tags.IMAGE_NAME: ""},
        {tags.IMAGE_URL: ""},
        {tags.SHA256: "not-a-sha"},
        {tags.SHA256: "a" * 63},
        {tags.ARCH: "ppc64le"},
        {tags.ARCH: ""},
        {tags.IMAGE_URL: "file:///etc/passwd"},
        {tags.IMAGE_URL: "https://evil.example/x.raw.xz"},
        {tags.IMAGE_URL: "https://user:pw@kojipkgs.fedoraproject.org/x.raw.xz"},
    ],
)
def test_image_from_tags_refuses_unusable_tags(change: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        image_from_tags({**GOOD_TAGS, **change}, ["kojipkgs.fedoraproject.org"])


def test_image_from_tags_without_a_tag_at_all() -> None:
    for key in (tags.COMPOSE_ID, tags.IMAGE_NAME, tags.IMAGE_URL, tags.SHA256, tags.ARCH):
        with pytest.raises(ValueError):
            image_from_tags(
                {k: v for k, v in GOOD_TAGS.items() if k != key}, ["kojipkgs.fedoraproject.org"]
            )


def test_outcome_text_and_failure() -> None:
    assert Outcome("ami-1", "wait", "waiting").text == "wait: waiting"
    assert Outcome("ami-1", "released").text == "released"
    failed = ("error", "promoting", "gave-up")
    fine = ("resumed", "staged", "wait", "release", "reject", "retest", "ignored", "busy")
    assert [Outcome("x", a).failed for a in failed] == [True] * len(failed)
    assert [Outcome("x", a).failed for a in fine] == [False] * len(fine)
