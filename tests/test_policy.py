"""The policy file: every bad input is a PolicyError naming the file, the rule and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedimg.policy import (
    GatePolicy,
    PolicyError,
    Subject,
    compose_type,
    default_policy,
    load_policy,
    parse_policy,
)

GOOD = """
rules:
  - name: cloud
    match:
      release: [41, "42"]
      subvariant: [Cloud_Base]
      compose_type: [production, nightly]
    testcases: [autocloud.ami.all]
    scenarios:
      x86_64: [t3.small, t2.small]
      aarch64: [t4g.small]
  - name: selinux
    match: {arch: [x86_64]}
    testcases: [autocloud.ami.selinux]
    scenarios: ["x86_64:t3.small"]
    if_skipped: reject
"""


def rule(**overrides: Any) -> dict[str, Any]:
    return {"name": "r", "testcases": ["autocloud.ami.all"], **overrides}


def test_a_good_file_loads_into_frozen_rules(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    policy = load_policy(path)
    assert isinstance(policy, GatePolicy) and policy.source == str(path)
    cloud, selinux = policy.rules
    assert cloud.match.release == {"41", "42"}  # numbers are releases too
    assert cloud.scenarios_for("x86_64") == ("x86_64:t2.small", "x86_64:t3.small")
    assert cloud.scenarios_for("aarch64") == ("aarch64:t4g.small",)
    assert selinux.if_skipped == "reject" and cloud.if_skipped == "pass"
    assert policy.testcases == ("autocloud.ami.all", "autocloud.ami.selinux")
    x86 = Subject("41", "Cloud_Base", "x86_64", "nightly")
    assert policy.applicable(x86) == (cloud, selinux)
    assert policy.applicable(Subject("40", "Cloud_Base", "aarch64", "nightly")) == ()


def test_default_policy_is_the_required_list_for_every_image() -> None:
    policy = default_policy(["a", "b", "a"])
    (only,) = policy.rules
    assert only.testcases == ("a", "b") and only.scenarios is None
    assert policy.applicable(Subject("", "", "aarch64", "ci")) == (only,)
    with pytest.raises(ValueError):
        default_policy([])


@pytest.mark.parametrize(
    ("compose_id", "kind"),
    [
        ("Fedora-41-20241020.0", "production"),
        ("Fedora-Rawhide-20241020.n.0", "nightly"),
        ("Fedora-41-20241020.t.2", "test"),
        ("Fedora-41-20241020.ci.0", "ci"),
        ("Fedora-Cloud-41-20241020.n.1", "nightly"),
        ("not-a-compose", "production"),
    ],
)
def test_compose_type_from_the_compose_id(compose_id: str, kind: str) -> None:
    assert compose_type(compose_id) == kind


BAD: list[tuple[str, Any, list[str]]] = [
    ("not a mapping", ["rules"], ["p.yaml", "mapping"]),
    ("no rules", {}, ["p.yaml", "rules"]),
    ("empty rules", {"rules": []}, ["rules", "non-empty"]),
    ("unknown top key", {"rules": [rule()], "rule": []}, ["unknown", "rule"]),
    ("rule not a mapping", {"rules": ["r"]}, ["rule 1", "mapping"]),
    ("rule without name", {"rules": [{"testcases": ["a"]}]}, ["rule 1", "name"]),
    ("bad rule name", {"rules": [rule(name="has space")]}, ["rule 1", "name"]),
    ("unknown rule key", {"rules": [rule(testcase=["a"])]}, ["rule 'r'", "testcase"]),
    ("no testcases", {"rules": [{"name": "r"}]}, ["rule 'r'", "testcases"]),
    ("testcases not a list", {"rules": [rule(testcases="a")]}, ["rule 'r'", "testcases"]),
    ("empty testcases", {"rules": [rule(testcases=[])]}, ["rule 'r'", "testcases"]),
    ("bad testcase", {"rules": [rule(testcases=["a b"])]}, ["rule 'r'", "testcases"]),
    ("duplicate names", {"rules": [rule(), rule()]}, ["rule 'r'", "twice"]),
    ("match not a mapping", {"rules": [rule(match=["x86_64"])]}, ["rule 'r'", "match"]),
    ("unknown match key", {"rules": [rule(match={"arches": ["x86_64"]})]}, ["match", "arches"]),
    ("unknown arch", {"rules": [rule(match={"arch": ["ppc64le"]})]}, ["match.arch", "never"]),
    (
        "unknown compose type",
        {"rules": [rule(match={"compose_type": ["weekly"]})]},
        ["match.compose_type", "never"],
    ),
    ("empty match list", {"rules": [rule(match={"release": []})]}, ["match.release", "non-empty"]),
    ("match value a bool", {"rules": [rule(match={"release": [True]})]}, ["match.release"]),
    ("match value a string", {"rules": [rule(match={"subvariant": "Cloud"})]}, ["subvariant"]),
    ("scenarios a string", {"rules": [rule(scenarios="x86_64:t3.small")]}, ["scenarios"]),
    ("scenarios empty list", {"rules": [rule(scenarios=[])]}, ["scenarios"]),
    ("scenarios empty mapping", {"rules": [rule(scenarios={})]}, ["scenarios", "never"]),
    ("scenario without arch", {"rules": [rule(scenarios=["t3.small"])]}, ["scenarios", "t3.small"]),
    ("scenario of unknown arch", {"rules": [rule(scenarios={"s390x": ["t3.small"]})]}, ["s390x"]),
    ("bad instance type", {"rules": [rule(scenarios={"x86_64": ["T3 small"]})]}, ["x86_64"]),
    (
        "scenarios of no matched arch",
        {"rules": [rule(match={"arch": ["aarch64"]}, scenarios={"x86_64": ["t3.small"]})]},
        ["rule 'r'", "never be satisfied"],
    ),
    ("bad if_skipped", {"rules": [rule(if_skipped="maybe")]}, ["rule 'r'", "if_skipped"]),
    (
        "contradicting rules",
        {
            "rules": [
                rule(name="a", match={"arch": ["x86_64"]}),
                rule(name="b", match={"release": ["41"]}, if_skipped="reject"),
            ]
        },
        ["'a'", "'b'", "contradict", "autocloud.ami.all"],
    ),
]


@pytest.mark.parametrize(("data", "words"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_policies_fail_loudly_naming_where(data: Any, words: list[str]) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(data, "p.yaml")
    text = str(caught.value)
    assert text.startswith("p.yaml")
    for word in words:
        assert word in text


def test_rules_that_cannot_meet_are_no_contradiction() -> None:
    policy = parse_policy(
        {
            "rules": [
                rule(name="a", match={"arch": ["x86_64"]}),
                rule(name="b", match={"arch": ["aarch64"]}, if_skipped="reject"),
            ]
        },
        "p.yaml",
    )
    assert [r.name for r in policy.rules] == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("rules: [\n", ["not YAML"]),
        (b"\xff\xfe rules", ["cannot read"]),
        ("just text", ["mapping"]),
    ],
)
def test_unreadable_files_name_the_file(tmp_path: Path, content: Any, words: list[str]) -> None:
    path = tmp_path / "p.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert str(path) in str(caught.value)
    for word in words:
        assert word in str(caught.value)


def test_a_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "absent.yaml")


# -- the setting and the command ------------------------------------------------------------


def test_the_policy_file_is_read_and_checked_once_at_start_up(tmp_path: Path) -> None:
    from fedimg.config import FedimgConfig
    from fedimg.settings import ConfigError

    raw = {"fedimg.resultsdb_url": "http://r.test/api/v2.0"}
    assert FedimgConfig.from_fedmsg(raw).gate_policy.rules[0].name == "default"
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    cfg = FedimgConfig.from_fedmsg({**raw, "fedimg.gate.policy_file": str(good)})
    good.write_text("rules: []")  # read once: a later edit does not change this process
    assert [r.name for r in cfg.gate_policy.rules] == ["cloud", "selinux"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - name: r\n    testcases: [a]\n    match: {arch: [s390x]}\n")
    with pytest.raises(ConfigError) as caught:
        FedimgConfig.from_fedmsg({**raw, "fedimg.gate.policy_file": str(bad)})
    assert str(bad) in str(caught.value) and "rule 'r'" in str(caught.value)
    with pytest.raises(ConfigError, match=r"fedimg\.gate\.policy_file"):
        FedimgConfig.from_fedmsg({**raw, "fedimg.gate.policy_file": ["a.yaml"]})
    with pytest.raises(ConfigError, match=r"fedimg\.waiverdb_url"):
        FedimgConfig.from_fedmsg({**raw, "fedimg.waiverdb_url": "ftp://w.test"})


def test_policy_check_says_ok_or_why_not(tmp_path: Path, capsys: Any) -> None:
    from fedimg.cli import main

    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    assert main(["policy", "check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "rule cloud" in out and "x86_64:t3.small" in out and "2 rule(s), OK" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [{name: r, testcases: [a], if_skipped: sometimes}]")
    assert main(["policy", "check", str(bad)]) == 2
    assert main(["policy", "check", str(tmp_path / "absent.yaml")]) == 2
