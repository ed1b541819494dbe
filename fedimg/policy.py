"""The gate policy as data: which testcases must pass, in which scenarios, for which images.

A policy file (YAML, setting ``fedimg.gate.policy_file``) is read and
validated ONCE at start-up into frozen dataclasses; without one, the policy
is ``default_policy(fedimg.gate.required_testcases)``, which gates exactly
as fedimg always did. Example::

    rules:
      - name: cloud-base
        match:                      # every key optional; absent = anything
          release: ["41", "42"]     # the AMI's fedimg:release tag
          subvariant: [Cloud_Base]
          arch: [x86_64, aarch64]
          compose_type: [production, nightly]
        testcases: [autocloud.ami.all]
        scenarios:                  # optional; absent = every scenario results exist for
          x86_64: [t3.small, t2.small]
          aarch64: [t4g.small]
        if_skipped: pass            # a required test that does not apply: pass | reject

``scenarios`` may also be a list of scenario names (``x86_64:t3.small``).
Every rule that matches an image applies (their requirements add up); an
image no rule matches is rejected, never released unchecked. Loading fails
with ``PolicyError`` naming the file, the rule and the key for: unknown keys,
wrong types, duplicate names, a rule that can never match (an unknown
architecture or compose type, an empty list) or never be satisfied
(scenarios of none of the architectures it matches), and two rules that
contradict each other (they can match the same image and require the same
testcase with different ``if_skipped``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from fedimg.messages import ARCHES, TESTCASE_RE, scenario_name
from fedimg.settings import ConfigError

COMPOSE_TYPES: Final = ("production", "nightly", "test", "ci")
IF_SKIPPED: Final = ("pass", "reject")
MATCH_KEYS: Final = ("release", "subvariant", "arch", "compose_type")
RULE_KEYS: Final = frozenset({"name", "match", "testcases", "scenarios", "if_skipped"})
TOP_KEYS: Final = frozenset({"rules"})
DEFAULT_RULE: Final = "default"
_RELEASE_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_INSTANCE_TYPE_RE: Final = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+\Z")
_RULE_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
# pungi compose ids: <short>-<version>-<date>[.<type letter>].<respin>
_COMPOSE_TYPE_RE: Final = re.compile(r"-\d{8}\.(n|t|ci)\.\d+\Z")
_TYPE_OF: Final = {"n": "nightly", "t": "test", "ci": "ci"}


class PolicyError(ConfigError):
    """A policy file that cannot gate anything safely; the text names file, rule and key."""


def compose_type(compose_id: str) -> str:
    """``Fedora-41-20241020.0`` is production, ``...20241020.n.0`` nightly (pungi's letters)."""
    found = _COMPOSE_TYPE_RE.search(compose_id)
    return _TYPE_OF[found.group(1)] if found else "production"


@dataclass(frozen=True)
class Subject:
    """What rules match on: the image an AMI was staged from."""

    release: str
    subvariant: str
    arch: str
    compose_type: str

    def describe(self) -> str:
        return (
            f"release {self.release or '?'}, subvariant {self.subvariant or '?'},"
            f" arch {self.arch or '?'}, {self.compose_type} compose"
        )


@dataclass(frozen=True)
class Match:
    """Each field: the values it accepts; None accepts anything."""

    release: frozenset[str] | None = None
    subvariant: frozenset[str] | None = None
    arch: frozenset[str] | None = None
    compose_type: frozenset[str] | None = None

    def matches(self, subject: Subject) -> bool:
        return all(
            accepted is None or getattr(subject, key) in accepted
            for key, accepted in self._fields()
        )

    def overlaps(self, other: Match) -> bool:
        """Whether some image matches both."""
        mine = dict(self._fields())
        return all(
            mine[key] is None or theirs is None or bool(mine[key] & theirs)  # type: ignore[operator]
            for key, theirs in other._fields()
        )

    def _fields(self) -> list[tuple[str, frozenset[str] | None]]:
        return [(key, getattr(self, key)) for key in MATCH_KEYS]


@dataclass(frozen=True)
class Rule:
    """One rule: for the images ``match`` accepts, ``testcases`` must pass in ``scenarios``.

    ``scenarios`` None: in every scenario a result exists for (at least one);
    otherwise the scenario names, of which those of the image's architecture apply.
    """

    name: str
    match: Match
    testcases: tuple[str, ...]
    scenarios: frozenset[str] | None = None
    if_skipped: Literal["pass", "reject"] = "pass"

    def scenarios_for(self, arch: str) -> tuple[str, ...] | None:
        if self.scenarios is None:
            return None
        return tuple(sorted(s for s in self.scenarios if s.split(":", 1)[0] == arch))


@dataclass(frozen=True)
class GatePolicy:
    """Every rule, and where they came from (a file, or the default)."""

    rules: tuple[Rule, ...]
    source: str = "fedimg.gate.required_testcases"

    def applicable(self, subject: Subject) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.match.matches(subject))

    @property
    def testcases(self) -> tuple[str, ...]:
        """Every testcase any rule requires (what to ask ResultsDB and WaiverDB about)."""
        return tuple(dict.fromkeys(t for r in self.rules for t in r.testcases))


def default_policy(required: Sequence[str]) -> GatePolicy:
    """Today's gate: ``required`` must pass in every scenario with results, for every image."""
    wanted = tuple(dict.fromkeys(required))
    if not wanted:
        raise ValueError("the gate needs at least one required testcase")
    return GatePolicy((Rule(DEFAULT_RULE, Match(), wanted),))


# -- reading a policy file ------------------------------------------------------------


def load_policy(path: str | Path) -> GatePolicy:
    """Read and validate a policy file; PolicyError (naming the file) if it is unusable."""
    import yaml

    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{where}: cannot read the policy file: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{where}: not YAML: {str(exc)[:300]}") from exc
    return parse_policy(data, where)


def parse_policy(data: Any, source: str) -> GatePolicy:
    """A GatePolicy from the parsed YAML ``data``; PolicyError says what is wrong and where."""
    if not isinstance(data, Mapping):
        raise PolicyError(f"{source}: expected a mapping with 'rules', got {_kind(data)}")
    unknown = sorted(str(k) for k in data if k not in TOP_KEYS)
    if unknown:
        raise PolicyError(f"{source}: unknown keys {unknown} (allowed: {sorted(TOP_KEYS)})")
    raw_rules = data.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise PolicyError(f"{source}: 'rules' must be a non-empty list, got {_kind(raw_rules)}")
    rules: list[Rule] = []
    for index, raw in enumerate(raw_rules):
        rule = _rule(raw, f"{source}: rule {index + 1}")
        if any(r.name == rule.name for r in rules):
            raise PolicyError(f"{source}: rule {rule.name!r}: name used twice")
        rules.append(rule)
    _check_contradictions(rules, source)
    return GatePolicy(tuple(rules), source)


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {str(value)[:60]!r}"


def _strings(value: Any, where: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
    """A non-empty list of strings each matching ``pattern`` (numbers allowed as releases)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise PolicyError(f"{where}: expected a non-empty list of strings, got {_kind(value)}")
    found: list[str] = []
    for raw in value:
        item = str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else raw
        if not isinstance(item, str) or not pattern.match(item):
            raise PolicyError(f"{where}: {_kind(item)} is not a valid value")
        found.append(item)
    return tuple(dict.fromkeys(found))


def _one_of(values: Iterable[str], allowed: Sequence[str], where: str) -> None:
    bad = sorted(set(values) - set(allowed))
    if bad:
        raise PolicyError(f"{where}: {bad} can never match (known: {list(allowed)})")


def _match(raw: Any, where: str) -> Match:
    if raw is None:
        return Match()
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: expected a mapping, got {_kind(raw)}")
    unknown = sorted(str(k) for k in raw if k not in MATCH_KEYS)
    if unknown:
        raise PolicyError(f"{where}: unknown keys {unknown} (allowed: {list(MATCH_KEYS)})")
    values: dict[str, frozenset[str]] = {}
    for key in MATCH_KEYS:
        if key in raw:
            pattern = _RELEASE_RE if key in ("release", "subvariant") else _RULE_NAME_RE
            values[key] = frozenset(_strings(raw[key], f"{where}.{key}", pattern))
    _one_of(values.get("arch", ()), ARCHES, f"{where}.arch")
    _one_of(values.get("compose_type", ()), COMPOSE_TYPES, f"{where}.compose_type")
    return Match(**values)


def _scenarios(raw: Any, where: str) -> frozenset[str]:
    names: list[str] = []
    if isinstance(raw, Mapping):
        if not raw:
            raise PolicyError(f"{where}: an empty mapping can never be satisfied")
        _one_of((str(a) for a in raw), ARCHES, where)
        for arch, types in raw.items():
            for itype in _strings(types, f"{where}.{arch}", _INSTANCE_TYPE_RE):
                names.append(scenario_name(str(arch), itype))
    elif isinstance(raw, list) and raw:
        for item in raw:
            arch, _, itype = str(item).partition(":") if isinstance(item, str) else ("", "", "")
            if arch not in ARCHES or not _INSTANCE_TYPE_RE.match(itype):
                raise PolicyError(
                    f"{where}: {_kind(item)} is not a scenario name such as"
                    f" {scenario_name('x86_64', 't3.small')!r}"
                )
            names.append(item)
    else:
        raise PolicyError(
            f"{where}: expected a list of scenario names or a mapping of architecture to"
            f" instance types, got {_kind(raw)}"
        )
    return frozenset(names)


def _rule(raw: Any, where: str) -> Rule:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: expected a mapping, got {_kind(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not _RULE_NAME_RE.match(name):
        raise PolicyError(f"{where}.name: expected a rule name, got {_kind(name)}")
    where = f"{where.rsplit(': ', 1)[0]}: rule {name!r}"
    unknown = sorted(str(k) for k in raw if k not in RULE_KEYS)
    if unknown:
        raise PolicyError(f"{where}: unknown keys {unknown} (allowed: {sorted(RULE_KEYS)})")
    if "testcases" not in raw:
        raise PolicyError(f"{where}: 'testcases' is missing")
    match = _match(raw.get("match"), f"{where}: match")
    testcases = _strings(raw["testcases"], f"{where}: testcases", TESTCASE_RE)
    scenarios = _scenarios(raw["scenarios"], f"{where}: scenarios") if "scenarios" in raw else None
    if_skipped = raw.get("if_skipped", "pass")
    if if_skipped not in IF_SKIPPED:
        raise PolicyError(
            f"{where}: if_skipped: expected one of {list(IF_SKIPPED)}, got {_kind(if_skipped)}"
        )
    if scenarios is not None:
        arches = match.arch if match.arch is not None else frozenset(ARCHES)
        if not any(s.split(":", 1)[0] in arches for s in scenarios):
            raise PolicyError(
                f"{where}: scenarios: none is of an architecture the rule matches"
                f" ({sorted(arches)}): the rule could never be satisfied"
            )
    return Rule(name, match, testcases, scenarios, if_skipped)


def _check_contradictions(rules: Sequence[Rule], source: str) -> None:
    for i, first in enumerate(rules):
        for second in rules[i + 1 :]:
            shared = sorted(set(first.testcases) & set(second.testcases))
            if (
                shared
                and first.if_skipped != second.if_skipped
                and first.match.overlaps(second.match)
            ):
                raise PolicyError(
                    f"{source}: rules {first.name!r} and {second.name!r} contradict each other:"
                    f" both can apply to one image and require {shared}, one with"
                    f" if_skipped: {first.if_skipped}, the other with"
                    f" if_skipped: {second.if_skipped}"
                )
