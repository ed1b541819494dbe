"""What fedimg knows about an image or an AMI: frozen facts, read from AWS, ResultsDB and intents.

``fedimg.observe`` builds these from the world; ``fedimg.plan`` decides from
them alone. Every trust rule has its home here, as a property of the fact it
judges:

* a snapshot is **trusted** only when EC2 says ``completed`` AND stage marked
  it ``fedimg:uploaded`` after writing every block (moto, and a killed upload,
  can leave a "completed" snapshot with blocks missing);
* an AMI is **broken** when EC2 reports it failed/error/invalid: it is never
  tested, copied or published, and is replaced;
* an AMI is **adopted** (``tagged``) once it carries ``fedimg:state``; one
  registered but never tagged is what a crash between RegisterImage and
  CreateTags leaves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from fedimg import tags
from fedimg.compose import CloudImage
from fedimg.messages import aware, parse_when
from fedimg.policy import Subject, compose_type
from fedimg.tags import State

BROKEN_STATES: Final = frozenset({"failed", "error", "invalid"})
RESUMED_MAX: Final = 3  # restages from one trusted snapshot before it is given up
RETESTS_MAX: Final = 1  # "re-request the test once"


def counter(values: Mapping[str, str], key: str) -> int:
    """A count kept in a tag (``fedimg:test-requested``, ``fedimg:resumed``).

    An unreadable value counts as "too often": never loop on a tag we cannot read.
    """
    raw = values.get(key)
    if raw is None:
        return 0
    try:
        return max(int(raw), 0)
    except ValueError:
        return 1_000_000


@dataclass(frozen=True)
class SnapshotFacts:
    """One fedimg snapshot of an image in the staging region."""

    snapshot_id: str
    aws_state: str  # pending | completed | error
    started: datetime
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def trusted(self) -> bool:
        """Every block written: completed by EC2 AND marked by stage after completing it."""
        return self.aws_state == "completed" and tags.UPLOADED in self.tags

    @property
    def resumed(self) -> int:
        return counter(self.tags, tags.RESUMED)

    @classmethod
    def from_aws(cls, described: Mapping[str, Any], now: datetime) -> SnapshotFacts:
        return cls(
            str(described["SnapshotId"]),
            str(described.get("State", "")),
            parse_when(described.get("StartTime")) or now,
            tags.as_dict(described.get("Tags")),
        )


@dataclass(frozen=True)
class AmiFacts:
    """A fedimg AMI in the staging region (one image, one volume type)."""

    ami_id: str
    aws_state: str  # available | pending | failed | ...
    state: State | None  # fedimg:state; None: registered, never tagged
    created: datetime | None = None
    snapshots: tuple[str, ...] = ()  # from its block device mappings
    tags: Mapping[str, str] = field(default_factory=dict)
    name: str = ""
    public: bool = False  # launch permission "all"
    deprecation: datetime | None = None  # EC2's DeprecationTime, when one is set

    @property
    def broken(self) -> bool:
        return self.aws_state in BROKEN_STATES

    @property
    def tagged(self) -> bool:
        return self.state is not None

    @property
    def test_requests(self) -> int:
        return counter(self.tags, tags.TEST_REQUESTED)

    @property
    def staged_at(self) -> datetime | None:
        return parse_when(self.tags.get(tags.STAGED_AT)) or self.created

    @property
    def retested_at(self) -> datetime | None:
        """When ``fedimg retest`` last moved it (back) to testing; None if never."""
        return parse_when(self.tags.get(tags.TESTING_SINCE))

    @property
    def testing_since(self) -> datetime | None:
        """When its current test run began: the deadline counts from here."""
        return self.retested_at or self.staged_at

    @property
    def retested(self) -> frozenset[str]:
        """The scenarios of the last retest (``*``: every one); empty if never retested."""
        return frozenset(self.tags.get(tags.RETESTED, "").split(",")) - {""}

    @property
    def subject(self) -> Subject:
        """What the gate policy's rules match on."""
        return Subject(
            release=self.tags.get(tags.RELEASE, ""),
            subvariant=self.tags.get(tags.SUBVARIANT, ""),
            arch=self.tags.get(tags.ARCH, ""),
            compose_type=compose_type(self.tags.get(tags.COMPOSE_ID, "")),
        )

    def deprecated(self, now: datetime) -> bool:
        """EC2 deprecates the image at ``DeprecationTime``: from then on it is not audited."""
        return self.deprecation is not None and self.deprecation <= aware(now)

    @classmethod
    def from_aws(cls, described: Mapping[str, Any]) -> AmiFacts:
        return cls(
            ami_id=str(described["ImageId"]),
            aws_state=str(described.get("State", "")),
            state=tags.state_of(described),
            created=parse_when(described.get("CreationDate")),
            snapshots=tuple(
                str(m["Ebs"]["SnapshotId"])
                for m in described.get("BlockDeviceMappings", [])
                if m.get("Ebs", {}).get("SnapshotId")
            ),
            tags=tags.as_dict(described.get("Tags")),
            name=str(described.get("Name") or ""),
            public=bool(described.get("Public")),
            deprecation=parse_when(described.get("DeprecationTime")),
        )


@dataclass(frozen=True)
class ImageFacts:
    """One compose image in the staging region: its snapshots and its AMI per volume type."""

    image: CloudImage
    snapshots: tuple[SnapshotFacts, ...]
    amis: Mapping[str, AmiFacts | None]  # every configured volume type
    busy: bool = False  # another worker (thread or process) holds this image

    @property
    def label(self) -> str:
        return f"compose {self.image.compose_id} image {self.image.image_name}"

    @property
    def staged(self) -> bool:
        """Every volume type has its adopted, usable AMI: stage's work is done."""
        return all(a is not None and a.tagged and not a.broken for a in self.amis.values())

    def trusted(self) -> list[SnapshotFacts]:
        """Trusted snapshots, oldest first."""
        return sorted(
            (s for s in self.snapshots if s.trusted), key=lambda s: (s.started, s.snapshot_id)
        )

    def untrusted(self) -> list[SnapshotFacts]:
        """Half-written snapshots, oldest first."""
        return sorted(
            (s for s in self.snapshots if not s.trusted), key=lambda s: (s.started, s.snapshot_id)
        )

    def used_snapshots(self) -> set[str]:
        return {snap for a in self.amis.values() if a is not None for snap in a.snapshots}


@dataclass(frozen=True)
class Results:
    """The latest result per required testcase and scenario and the waivers of one AMI,
    or why they are unknown."""

    # (testcase, scenario) -> fedimg.results.Result; scenario "" for results without one
    latest: Mapping[tuple[str, str], Any] = field(default_factory=dict)
    waivers: tuple[Any, ...] = ()  # fedimg.waivers.Waiver
    unavailable: str = ""  # non-empty: ResultsDB or WaiverDB could not be asked; never decide

    @property
    def known(self) -> bool:
        return not self.unavailable


@dataclass(frozen=True)
class AmiLife:
    """A staging AMI whose life is not over yet: its facts and its test results."""

    ami: AmiFacts
    compose_id: str
    results: Results = field(default_factory=Results)

    @property
    def label(self) -> str:
        return f"{self.compose_id} {self.ami.ami_id}"


def images_by_sha(images: Iterable[CloudImage]) -> dict[str, CloudImage]:
    return {i.sha256: i for i in images}
