"""After release: which fedimg AMIs to keep and which to remove, and which are no longer public.

Pure, as ``fedimg.plan``: frozen facts about every fedimg AMI in every region
(``Fleet``, read by ``fedimg.observe.observe_fleet``), a ``PrunePolicy`` and a
time in; a frozen ``PrunePlan`` out, with a reason for every AMI in every
region. ``fedimg.upkeep`` carries a plan out; ``fedimg prune`` prints it (and
with ``--apply`` carries it out), ``fedimg status --stream`` prints it by stream.

The unit of a decision is a **lineage**: a staging AMI and its copies (found
by their ``fedimg:source-ami`` tag), kept or removed together. Lineages are
grouped in **streams** (release, subvariant, arch, compose type, volume type);
within a stream the released lineages are ranked newest first by
``fedimg:staged-at``. The rules, in order:

* only AMIs carrying fedimg's tags are ever seen (a tag-less image is never
  observed, so never touched);
* ``testing`` and ``promoting`` lineages are work in progress: kept;
* a ``rejected`` one is kept for inspection, unless ``delete_rejected``;
* the ``keep`` newest released of a stream are kept (``keep`` is at least 1:
  a policy that would remove the newest image is refused, ``PolicyRefused``);
* an older nightly (or test, or ci) compose is removed once it is
  ``nightly_age`` old; an older production one once its release reached its
  EOL date (``eol``); a compose id fedimg cannot read the type of is kept.

Removal is ordered so that a prune stopped anywhere (throttled, killed) is
finished by the next run, which plans again from what remains: copies before
their staging AMI (the staging AMI is what ranks the lineage), and a snapshot
only after every AMI that uses it is gone. Each removed AMI and its snapshots
are first tagged ``fedimg:pruning=<AMI id>``: a snapshot so marked whose AMI
is no longer registered is what a stopped run left, and is deleted.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Final

from fedimg import tags
from fedimg.facts import AmiFacts, aware
from fedimg.tags import State

PRUNING: Final = "fedimg:pruning"  # on an AMI being removed and its snapshots: the AMI id

# Pungi's compose ids: <short>-<version>-<YYYYMMDD>[.<type>].<respin>; no type is production.
_COMPOSE_TYPE_RE: Final = re.compile(r"-\d{8}(?:\.(n|t|ci))?\.\d+\Z")


class ComposeType(StrEnum):
    PRODUCTION = "production"
    NIGHTLY = "nightly"
    TEST = "test"
    CI = "ci"
    UNKNOWN = "unknown"


_BY_SUFFIX: Final = {
    None: ComposeType.PRODUCTION,
    "n": ComposeType.NIGHTLY,
    "t": ComposeType.TEST,
    "ci": ComposeType.CI,
}
AGEING: Final = frozenset({ComposeType.NIGHTLY, ComposeType.TEST, ComposeType.CI})


def compose_type(compose_id: str) -> ComposeType:
    """The type pungi wrote into a compose id (``Fedora-41-20241024.0`` is production)."""
    found = _COMPOSE_TYPE_RE.search(compose_id)
    return ComposeType.UNKNOWN if found is None else _BY_SUFFIX[found.group(1)]


class PolicyRefused(ValueError):
    """A prune policy or plan that would remove the newest image of a stream."""


@dataclass(frozen=True)
class PrunePolicy:
    """The knobs of pruning, from ``FedimgConfig`` (``fedimg.upkeep.prune_policy``)."""

    keep: int = 3  # released lineages always kept per stream, newest first
    nightly_age: timedelta = timedelta(days=14)
    eol: Mapping[str, date] = field(default_factory=dict)  # release -> its EOL date (UTC)
    delete_rejected: bool = False

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise PolicyRefused(
                f"keep={self.keep} would remove the newest image of every stream; at least 1"
            )
        if self.nightly_age < timedelta(0):
            raise PolicyRefused(f"nightly age {self.nightly_age} is negative")


# -- facts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionalAmi:
    """A fedimg AMI (staging AMI or copy) in one region, with the snapshots that back it."""

    region: str
    ami: AmiFacts

    @property
    def ami_id(self) -> str:
        return self.ami.ami_id

    @property
    def source(self) -> str:
        """The staging AMI of its lineage (itself, for a staging AMI)."""
        return self.ami.tags.get(tags.SOURCE_AMI) or self.ami.ami_id

    @property
    def is_copy(self) -> bool:
        return tags.SOURCE_AMI in self.ami.tags


@dataclass(frozen=True)
class MarkedSnapshot:
    """A snapshot tagged ``fedimg:pruning``: its AMI's removal started."""

    region: str
    snapshot_id: str
    ami_id: str  # the tag's value


@dataclass(frozen=True)
class Fleet:
    """Every fedimg AMI and every marked snapshot, in every region fedimg uses."""

    amis: tuple[RegionalAmi, ...] = ()
    marked: tuple[MarkedSnapshot, ...] = ()
    regions: tuple[str, ...] = ()


@dataclass(frozen=True, order=True)
class Stream:
    release: str
    subvariant: str
    arch: str
    compose_type: str
    vol_type: str

    @property
    def label(self) -> str:
        parts = (self.release, self.subvariant, self.arch, self.compose_type, self.vol_type)
        return "/".join(p or "-" for p in parts)


def stream_of(values: Mapping[str, str]) -> Stream:
    return Stream(
        release=values.get(tags.RELEASE, ""),
        subvariant=values.get(tags.SUBVARIANT, ""),
        arch=values.get(tags.ARCH, ""),
        compose_type=compose_type(values.get(tags.COMPOSE_ID, "")).value,
        vol_type=values.get(tags.VOL_TYPE, ""),
    )


@dataclass(frozen=True)
class Lineage:
    """A staging AMI and its copies (the staging AMI is missing once a removal went past it)."""

    source: str
    staging: RegionalAmi | None
    copies: tuple[RegionalAmi, ...]

    @property
    def head(self) -> RegionalAmi:
        return self.staging if self.staging is not None else self.copies[0]

    @property
    def compose_id(self) -> str:
        return self.head.ami.tags.get(tags.COMPOSE_ID, "")

    @property
    def state(self) -> State | None:
        """The staging AMI's state; copies are only ever made of a release."""
        return self.staging.ami.state if self.staging is not None else State.RELEASED

    @property
    def when(self) -> datetime | None:
        if self.staging is not None:
            return self.staging.ami.staged_at
        created = [c.ami.created for c in self.copies if c.ami.created is not None]
        return min(created) if created else None

    @property
    def stream(self) -> Stream:
        return stream_of(self.head.ami.tags)

    @property
    def members(self) -> tuple[RegionalAmi, ...]:
        """Removal order: copies (by region), then the staging AMI."""
        ordered = sorted(self.copies, key=lambda c: (c.region, c.ami_id))
        return (*ordered, *([self.staging] if self.staging is not None else []))


def lineages(fleet: Fleet) -> list[Lineage]:
    staging: dict[str, RegionalAmi] = {}
    copies: dict[str, list[RegionalAmi]] = defaultdict(list)
    for placed in fleet.amis:
        if placed.is_copy:
            copies[placed.source].append(placed)
        elif placed.ami.tagged:
            staging[placed.ami_id] = placed
    found = [
        Lineage(source, staging.get(source), tuple(copies.get(source, ())))
        for source in sorted(set(staging) | set(copies))
    ]
    return found


# -- the plan --------------------------------------------------------------------------


@dataclass(frozen=True)
class LineageVerdict:
    """Keep or remove one lineage, and why (``fedimg status --stream`` shows these).

    A plan lists them by stream, newest released first, then the unranked ones.
    """

    stream: Stream
    compose_id: str
    source: str
    state: str
    when: datetime | None
    remove: bool
    reason: str
    amis: tuple[tuple[str, str], ...]  # (region, AMI id), in removal order


@dataclass(frozen=True)
class Removal:
    """Deregister one AMI in one region, then delete ``snapshots`` (none another AMI uses)."""

    region: str
    ami_id: str
    compose_id: str
    image_name: str
    arch: str
    vol_type: str
    reason: str
    marks: tuple[str, ...]  # every snapshot backing it: tagged fedimg:pruning first
    snapshots: tuple[str, ...]  # deleted once it is deregistered


@dataclass(frozen=True)
class Leftover:
    """A marked snapshot whose AMI is gone: what a stopped prune left."""

    region: str
    snapshot_id: str
    ami_id: str


@dataclass(frozen=True)
class PrunePlan:
    verdicts: tuple[LineageVerdict, ...] = ()
    removals: tuple[Removal, ...] = ()
    leftovers: tuple[Leftover, ...] = ()

    @property
    def idle(self) -> bool:
        return not self.removals and not self.leftovers

    def kept(self) -> set[tuple[str, str]]:
        """(region, AMI id) of every AMI the plan keeps."""
        return {pair for v in self.verdicts if not v.remove for pair in v.amis}

    def removed(self) -> set[tuple[str, str]]:
        return {(r.region, r.ami_id) for r in self.removals}


def _ranked(found: Iterable[Lineage]) -> dict[str, int]:
    """Source AMI -> rank among the released lineages of its stream (0 is the newest)."""
    by_stream: dict[Stream, list[Lineage]] = defaultdict(list)
    for lineage in found:
        if lineage.state is State.RELEASED:
            by_stream[lineage.stream].append(lineage)
    ranks: dict[str, int] = {}
    for members in by_stream.values():
        members.sort(
            key=lambda li: (aware(li.when or datetime.min), li.compose_id, li.source),
            reverse=True,
        )
        ranks.update({li.source: n for n, li in enumerate(members)})
    return ranks


def judge(
    lineage: Lineage, rank: int | None, policy: PrunePolicy, now: datetime
) -> tuple[bool, str]:
    """(remove, reason) for one lineage; ``rank`` among its stream's released ones."""
    state = lineage.state
    if state is State.REJECTED:
        if policy.delete_rejected:
            return True, "rejected (fedimg.gate.delete_rejected)"
        return False, "rejected, kept for inspection"
    if state is not State.RELEASED or rank is None:
        return False, f"{state.value if state else 'not adopted'}: work in progress"
    if rank < policy.keep:
        return False, f"newest {policy.keep} released of its stream (#{rank + 1})"
    kind = compose_type(lineage.compose_id)
    if kind in AGEING:
        if lineage.when is None:
            return False, f"{kind.value} compose of unknown age"
        age = aware(now) - aware(lineage.when)
        if age >= policy.nightly_age:
            return (
                True,
                f"{kind.value} compose {age.days} days old (limit {policy.nightly_age.days})",
            )
        return False, f"{kind.value} compose {age.days} days old"
    if kind is ComposeType.PRODUCTION:
        release = lineage.stream.release
        eol = policy.eol.get(release)
        if eol is not None and aware(now).date() >= eol:
            return True, f"release {release} reached its EOL date {eol.isoformat()}"
        return False, f"release {release or '?'} not at its EOL date"
    return False, "compose type unknown"


def plan_prune(fleet: Fleet, policy: PrunePolicy, now: datetime) -> PrunePlan:
    """What to remove, in which order; PolicyRefused if it would remove a stream's newest."""
    found = lineages(fleet)
    ranks = _ranked(found)
    verdicts: list[LineageVerdict] = []
    doomed: list[RegionalAmi] = []
    reasons: dict[tuple[str, str], str] = {}
    unranked = len(found)  # after every released one: work in progress, rejected
    for lineage in sorted(
        found, key=lambda li: (li.stream, ranks.get(li.source, unranked), li.compose_id, li.source)
    ):
        remove, reason = judge(lineage, ranks.get(lineage.source), policy, now)
        if remove and ranks.get(lineage.source) == 0:
            raise PolicyRefused(f"{lineage.source}: the newest of {lineage.stream.label}: {reason}")
        members = lineage.members
        state = lineage.state
        verdicts.append(
            LineageVerdict(
                stream=lineage.stream,
                compose_id=lineage.compose_id,
                source=lineage.source,
                state=state.value if state else "-",
                when=lineage.when,
                remove=remove,
                reason=reason,
                amis=tuple((m.region, m.ami_id) for m in members),
            )
        )
        if remove:
            doomed.extend(members)
            reasons.update({(m.region, m.ami_id): reason for m in members})
    removals = _removals(fleet, doomed, reasons)
    return PrunePlan(tuple(verdicts), removals, _leftovers(fleet))


def _removals(
    fleet: Fleet, doomed: list[RegionalAmi], reasons: Mapping[tuple[str, str], str]
) -> tuple[Removal, ...]:
    """Each doomed AMI, with only the snapshots no AMI still registered after it uses."""
    gone = {(d.region, d.ami_id) for d in doomed}
    users: dict[tuple[str, str], int] = defaultdict(int)  # (region, snapshot) -> AMIs kept
    for placed in fleet.amis:
        if (placed.region, placed.ami_id) not in gone:
            for snap in placed.ami.snapshots:
                users[placed.region, snap] += 1
    last: dict[tuple[str, str], int] = {}  # (region, snapshot) -> the last removal using it
    for n, placed in enumerate(doomed):
        for snap in placed.ami.snapshots:
            last[placed.region, snap] = n
    removals = []
    for n, placed in enumerate(doomed):
        values = placed.ami.tags
        snaps = placed.ami.snapshots
        removals.append(
            Removal(
                region=placed.region,
                ami_id=placed.ami_id,
                compose_id=values.get(tags.COMPOSE_ID, ""),
                image_name=values.get(tags.IMAGE_NAME, "") or placed.ami.name,
                arch=values.get(tags.ARCH, ""),
                vol_type=values.get(tags.VOL_TYPE, ""),
                reason=reasons[placed.region, placed.ami_id],
                marks=snaps,
                snapshots=tuple(
                    s for s in snaps if not users[placed.region, s] and last[placed.region, s] == n
                ),
            )
        )
    return tuple(removals)


def _leftovers(fleet: Fleet) -> tuple[Leftover, ...]:
    """Marked snapshots no registered AMI uses, whose own AMI is gone."""
    registered = {(p.region, p.ami_id) for p in fleet.amis}
    used = {(p.region, s) for p in fleet.amis for s in p.ami.snapshots}
    return tuple(
        Leftover(m.region, m.snapshot_id, m.ami_id)
        for m in sorted(fleet.marked, key=lambda m: (m.region, m.snapshot_id))
        if (m.region, m.snapshot_id) not in used and (m.region, m.ami_id) not in registered
    )


# -- the public-access audit -----------------------------------------------------------


@dataclass(frozen=True)
class Exposure:
    """A released AMI in one region that is not (or no longer) public, and what is private."""

    region: str
    ami_id: str
    compose_id: str
    image_private: bool
    private_snapshots: tuple[str, ...]
    snapshots: tuple[str, ...]  # every snapshot backing it (re-published together)

    @property
    def text(self) -> str:
        what = ["image"] if self.image_private else []
        what += [f"snapshot {s}" for s in self.private_snapshots]
        if not self.snapshots:
            what.append("no snapshot found")
        return f"private: {', '.join(what)}"


def audited(fleet: Fleet, now: datetime) -> list[RegionalAmi]:
    """Every AMI that must be public: released lineages, available, not deprecated."""
    return [
        member
        for lineage in lineages(fleet)
        if lineage.state is State.RELEASED
        for member in lineage.members
        if member.ami.aws_state == "available" and not member.ami.deprecated(now)
    ]


def exposure(placed: RegionalAmi, public_snapshots: Mapping[str, bool]) -> Exposure | None:
    """None when the AMI and every snapshot are public; else what is private.

    A snapshot whose permissions are unknown counts as private (re-publishing is
    idempotent); an AMI with no snapshot found is reported (nothing to check).
    """
    snaps = placed.ami.snapshots
    private = tuple(s for s in snaps if not public_snapshots.get(s, False))
    if placed.ami.public and snaps and not private:
        return None
    return Exposure(
        region=placed.region,
        ami_id=placed.ami_id,
        compose_id=placed.ami.tags.get(tags.COMPOSE_ID, ""),
        image_private=not placed.ami.public,
        private_snapshots=private,
        snapshots=snaps,
    )
