"""The gate is a pure function: every rule, its edges, and properties over random inputs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedimg.gate import Decision, announced_scenarios, decide, evaluate
from fedimg.policy import Subject, default_policy, parse_policy

REJECT_OUTCOMES = ("FAILED", "NEEDS_INSPECTION")
STAGED = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
DEADLINE = timedelta(hours=6)


@dataclass(frozen=True)
class R:
    """The part of ``fedimg.results.Result`` the gate reads."""

    outcome: str
    note: str = ""


def gate(
    results: dict[str, R],
    required=("autocloud.ami.all",),
    *,
    after=timedelta(hours=1),
    reject=REJECT_OUTCOMES,
) -> Decision:
    return decide(
        results,
        list(required),
        list(reject),
        staged_at=STAGED,
        now=STAGED + after,
        deadline=DEADLINE,
    )


def test_all_required_passed_releases() -> None:
    decision = gate({"a": R("PASSED"), "b": R("PASSED")}, ("a", "b"))
    assert decision.verdict == "release"
    assert decision.release and not decision.reject and not decision.wait
    assert decision.failed == () and decision.missing == ()
    assert "a" in decision.reason and "b" in decision.reason


def test_one_failed_rejects_and_names_it_with_its_note() -> None:
    decision = gate(
        {"a": R("PASSED"), "b": R("FAILED", "selinux: Permissive\nsecond line")}, ("a", "b")
    )
    assert decision.verdict == "reject"
    assert decision.failed == (("b", "FAILED", "selinux: Permissive second line"),)
    assert "b FAILED" in decision.reason and "selinux: Permissive" in decision.reason
    assert "\n" not in decision.reason


def test_needs_inspection_rejects_by_default_but_is_configurable() -> None:
    results = {"a": R("NEEDS_INSPECTION")}
    assert gate(results, ("a",)).verdict == "reject"
    assert gate(results, ("a",), reject=("FAILED",)).verdict == "wait"


def test_a_failure_wins_over_missing_results() -> None:
    decision = gate({"a": R("FAILED")}, ("a", "b"))
    assert decision.verdict == "reject"
    assert decision.missing == ("b",)


@pytest.mark.parametrize("outcome", ["INFO", "RUNNING", "QUEUED", "", "passed-ish"])
def test_non_final_outcomes_wait(outcome: str) -> None:
    decision = gate({"a": R(outcome)}, ("a",))
    assert decision.verdict == "wait"
    assert decision.missing == ("a",)


def test_outcomes_are_case_insensitive() -> None:
    assert gate({"a": R("passed")}, ("a",)).verdict == "release"
    assert gate({"a": R("failed")}, ("a",)).verdict == "reject"


def test_missing_results_wait_before_the_deadline() -> None:
    decision = gate({}, ("a", "b"), after=DEADLINE - timedelta(seconds=1))
    assert decision.verdict == "wait"
    assert decision.missing == ("a", "b")


@pytest.mark.parametrize("after", [DEADLINE, DEADLINE + timedelta(days=30)])
def test_missing_results_past_the_deadline_reject_with_no_results(after: timedelta) -> None:
    decision = gate({"a": R("PASSED"), "b": R("INFO")}, ("a", "b", "c"), after=after)
    assert decision.verdict == "reject"
    assert decision.reason.startswith("no results")
    assert decision.missing == ("b", "c")
    assert "b" in decision.reason and "c" in decision.reason
    assert decision.failed == ()


def test_passed_after_the_deadline_still_releases() -> None:
    # A result that arrived late is still a result: the deadline is for silence.
    assert gate({"a": R("PASSED")}, ("a",), after=DEADLINE * 3).verdict == "release"


def test_results_outside_the_required_list_are_ignored() -> None:
    results = {"a": R("PASSED"), "extra": R("FAILED", "not gating")}
    assert gate(results, ("a",)).verdict == "release"
    assert gate({"extra": R("PASSED")}, ("a",)).verdict == "wait"


def test_duplicate_required_testcases_count_once() -> None:
    decision = gate({}, ("a", "a", "b"))
    assert decision.missing == ("a", "b")


def test_no_required_testcase_is_an_error_not_a_release() -> None:
    with pytest.raises(ValueError):
        gate({"a": R("PASSED")}, ())


def test_naive_times_are_utc_and_offsets_are_honoured() -> None:
    naive_staged = datetime(2026, 11, 24, 12, 0)
    plus_two = timezone(timedelta(hours=2))
    # 17:59 at +02:00 is 15:59 UTC: under 6 hours after 12:00 UTC.
    early = decide(
        {},
        ["a"],
        [],
        staged_at=naive_staged,
        now=datetime(2026, 11, 24, 17, 59, tzinfo=plus_two),
        deadline=DEADLINE,
    )
    assert early.verdict == "wait"
    late = decide(
        {}, ["a"], [], staged_at=naive_staged, now=datetime(2026, 11, 24, 18, 0), deadline=DEADLINE
    )
    assert late.verdict == "reject"


def test_long_notes_are_cut_to_one_short_line() -> None:
    decision = gate({"a": R("FAILED", "x" * 5000)}, ("a",))
    assert len(decision.failed[0][2]) <= 200
    assert len(decision.reason) < 400


def test_decision_is_frozen() -> None:
    decision = gate({"a": R("PASSED")}, ("a",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.verdict = "reject"  # type: ignore[misc]


# -- properties ------------------------------------------------------------------

TESTCASES = st.sampled_from(["t1", "t2", "t3", "t4"])
OUTCOMES = st.sampled_from(["PASSED", "FAILED", "NEEDS_INSPECTION", "INFO", "passed", "xyz"])
RESULTS = st.dictionaries(TESTCASES, st.builds(R, OUTCOMES, st.text(max_size=30)), max_size=4)
REQUIRED = st.lists(TESTCASES, min_size=1, max_size=4)
REJECTS = st.lists(st.sampled_from(["FAILED", "NEEDS_INSPECTION", "INFO"]), max_size=3)
AFTER = st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=3))


@settings(max_examples=400, deadline=None)
@given(RESULTS, REQUIRED, REJECTS, AFTER)
def test_release_only_if_every_required_testcase_passed(results, required, rejects, after):
    decision = gate(results, required, after=after, reject=rejects)
    if decision.verdict == "release":
        assert all(t in results and results[t].outcome.upper() == "PASSED" for t in required)
        assert decision.failed == () and decision.missing == ()


@settings(max_examples=400, deadline=None)
@given(RESULTS, REQUIRED, REJECTS, AFTER)
def test_every_required_passed_always_releases(results, required, rejects, after):
    for t in required:
        results[t] = R("PASSED")
    assert gate(results, required, after=after, reject=rejects).verdict == "release"


@settings(max_examples=400, deadline=None)
@given(RESULTS, REQUIRED, REJECTS, AFTER)
def test_reject_outcome_in_a_required_testcase_always_rejects(results, required, rejects, after):
    decision = gate(results, required, after=after, reject=rejects)
    rejecting = {o.upper() for o in rejects}
    bad = [
        t
        for t in dict.fromkeys(required)
        if t in results and results[t].outcome.upper() in rejecting
    ]
    if bad:
        assert decision.verdict == "reject"
        assert [f[0] for f in decision.failed] == bad
    else:
        assert decision.failed == ()


@settings(max_examples=400, deadline=None)
@given(RESULTS, REQUIRED, REJECTS, AFTER)
def test_wait_only_before_the_deadline_and_reject_without_failures_means_no_results(
    results, required, rejects, after
):
    decision = gate(results, required, after=after, reject=rejects)
    if decision.verdict == "wait":
        assert after < DEADLINE
        assert decision.missing
    if decision.verdict == "reject" and not decision.failed:
        assert after >= DEADLINE
        assert decision.reason.startswith("no results")
    assert decision.reason and "\n" not in decision.reason


@settings(max_examples=200, deadline=None)
@given(RESULTS, REQUIRED, REJECTS, AFTER, RESULTS)
def test_results_of_other_testcases_never_change_the_verdict(
    results, required, rejects, after, noise
):
    extra = {f"other.{k}": v for k, v in noise.items()}
    plain = gate(results, required, after=after, reject=rejects)
    noisy = gate({**results, **extra}, required, after=after, reject=rejects)
    assert plain == noisy


# -- policy x results x waivers (table tests of ``evaluate``) ----------------------------

SUMMARY = "autocloud.ami.all"
AMI = "ami-0123456789abcdef0"
X86 = Subject("41", "Cloud_Base", "x86_64", "production")
ARM = Subject("41", "Cloud_Base", "aarch64", "nightly")
NITRO, XEN, GRAVITON = "x86_64:t3.small", "x86_64:t2.small", "aarch64:t4g.small"
MATRIX = parse_policy(
    {
        "rules": [
            {
                "name": "cloud",
                "match": {"subvariant": ["Cloud_Base"]},
                "testcases": [SUMMARY],
                "scenarios": {"x86_64": ["t3.small", "t2.small"], "aarch64": ["t4g.small"]},
            },
            {
                "name": "selinux-production",
                "match": {"compose_type": ["production"]},
                "testcases": ["autocloud.ami.selinux"],
                "if_skipped": "reject",
            },
        ]
    },
    "matrix.yaml",
)


@dataclass(frozen=True)
class SR:
    """A result with data (scenario, skipped)."""

    outcome: str
    note: str = ""
    data: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class W:
    testcase: str
    scenario: str | None = None
    waiver_id: int = 1
    subject_type: str = "ami"
    subject_identifier: str = AMI
    username: str = "alice"
    comment: str = "known flake, see #1"
    waived: bool = True


def res(outcome: str, scenario: str = "", skipped: str = "") -> SR:
    data: dict[str, tuple[str, ...]] = {}
    if scenario:
        data["scenario"] = (scenario,)
    if skipped:
        data["skipped"] = (skipped,)
    return SR(outcome, "a note" if outcome == "FAILED" else "", data)


PASS_ALL = {
    (SUMMARY, NITRO): res("PASSED", NITRO),
    (SUMMARY, XEN): res("PASSED", XEN),
    ("autocloud.ami.selinux", ""): res("PASSED"),
}


def judge(latest, waivers=(), *, policy=MATRIX, subject=X86, after=timedelta(hours=1)) -> Decision:
    return evaluate(
        policy,
        subject,
        AMI,
        latest,
        list(waivers),
        reject_outcomes=REJECT_OUTCOMES,
        staged_at=STAGED,
        now=STAGED + after,
        deadline=DEADLINE,
    )


TABLE = [
    # (case, latest, waivers, subject, verdict, failed labels, missing labels, waived labels)
    ("all scenarios pass", PASS_ALL, (), X86, "release", [], [], []),
    (
        "one scenario failed",
        {**PASS_ALL, (SUMMARY, XEN): res("FAILED", XEN)},
        (),
        X86,
        "reject",
        [f"{SUMMARY} [{XEN}]"],
        [],
        [],
    ),
    (
        "a failed scenario waived for that scenario",
        {**PASS_ALL, (SUMMARY, XEN): res("FAILED", XEN)},
        (W(SUMMARY, XEN),),
        X86,
        "release",
        [],
        [],
        [f"{SUMMARY} [{XEN}]"],
    ),
    (
        "a waiver without a scenario covers every scenario",
        {**PASS_ALL, (SUMMARY, XEN): res("FAILED", XEN), (SUMMARY, NITRO): res("FAILED", NITRO)},
        (W(SUMMARY),),
        X86,
        "release",
        [],
        [],
        [f"{SUMMARY} [{XEN}]", f"{SUMMARY} [{NITRO}]"],  # sorted by scenario name
    ),
    (
        "a waiver for another scenario does not count",
        {**PASS_ALL, (SUMMARY, XEN): res("FAILED", XEN)},
        (W(SUMMARY, NITRO),),
        X86,
        "reject",
        [f"{SUMMARY} [{XEN}]"],
        [],
        [],
    ),
    (
        "a waiver for another AMI does not count",
        {**PASS_ALL, (SUMMARY, XEN): res("FAILED", XEN)},
        (W(SUMMARY, XEN, subject_identifier="ami-0000000000000000f"),),
        X86,
        "reject",
        [f"{SUMMARY} [{XEN}]"],
        [],
        [],
    ),
    (
        "a waiver for another item type does not count",
        {**PASS_ALL, (SUMMARY, XEN): res("FAILED", XEN)},
        (W(SUMMARY, XEN, subject_type="koji_build"),),
        X86,
        "reject",
        [f"{SUMMARY} [{XEN}]"],
        [],
        [],
    ),
    (
        "a waiver without a comment does not count",
        {**PASS_ALL, (SUMMARY, XEN): res("FAILED", XEN)},
        (W(SUMMARY, XEN, comment="  "),),
        X86,
        "reject",
        [f"{SUMMARY} [{XEN}]"],
        [],
        [],
    ),
    (
        "a newer revocation undoes the waiver",
        {**PASS_ALL, (SUMMARY, XEN): res("FAILED", XEN)},
        (W(SUMMARY, XEN, waiver_id=1), W(SUMMARY, XEN, waiver_id=2, waived=False)),
        X86,
        "reject",
        [f"{SUMMARY} [{XEN}]"],
        [],
        [],
    ),
    (
        "a required scenario without results waits",
        {k: v for k, v in PASS_ALL.items() if k != (SUMMARY, XEN)},
        (),
        X86,
        "wait",
        [],
        [f"{SUMMARY} [{XEN}]"],
        [],
    ),
    (
        "a missing result can be waived",
        {k: v for k, v in PASS_ALL.items() if k != (SUMMARY, XEN)},
        (W(SUMMARY, XEN),),
        X86,
        "release",
        [],
        [],
        [f"{SUMMARY} [{XEN}]"],
    ),
    (
        "results of a scenario the rule does not name never count",
        {**PASS_ALL, (SUMMARY, "x86_64:m5.large"): res("FAILED", "x86_64:m5.large")},
        (),
        X86,
        "release",
        [],
        [],
        [],
    ),
    (
        "aarch64 needs only its own scenario; the production-only rule does not apply",
        {(SUMMARY, GRAVITON): res("PASSED", GRAVITON)},
        (),
        ARM,
        "release",
        [],
        [],
        [],
    ),
    (
        "a skipped test under if_skipped: reject rejects at once",
        {**PASS_ALL, ("autocloud.ami.selinux", ""): res("INFO", skipped="Atomic only")},
        (),
        X86,
        "reject",
        ["autocloud.ami.selinux"],
        [],
        [],
    ),
    (
        "INFO without 'skipped' is not final: it waits",
        {**PASS_ALL, ("autocloud.ami.selinux", ""): res("INFO")},
        (),
        X86,
        "wait",
        [],
        ["autocloud.ami.selinux"],
        [],
    ),
]


@pytest.mark.parametrize(
    ("latest", "waivers", "subject", "verdict", "failed", "missing", "waived"),
    [case[1:] for case in TABLE],
    ids=[case[0] for case in TABLE],
)
def test_policy_results_waivers_table(latest, waivers, subject, verdict, failed, missing, waived):
    decision = judge(latest, waivers, subject=subject)
    assert decision.verdict == verdict, decision.reason
    assert [f[0] for f in decision.failed] == failed
    assert list(decision.missing) == missing
    assert [w.label for w in decision.waived] == waived
    assert {u.label for u in decision.unsatisfied} == set(failed) | set(missing)


def test_a_used_waiver_is_named_with_author_and_comment() -> None:
    decision = judge({**PASS_ALL, (SUMMARY, XEN): res("FAILED", XEN)}, [W(SUMMARY, XEN, 7)])
    (use,) = decision.waived
    assert (use.waiver_id, use.username, use.comment, use.waived_outcome) == (
        7,
        "alice",
        "known flake, see #1",
        "FAILED",
    )
    assert decision.reason.startswith("passed: ") and "waiver 7 by alice" in decision.reason


def test_a_skipped_test_under_if_skipped_pass_is_satisfied_never_a_wait() -> None:
    policy = parse_policy(
        {"rules": [{"name": "r", "testcases": [SUMMARY, "autocloud.ami.atomic"]}]}, "p.yaml"
    )
    latest = {
        (SUMMARY, NITRO): res("PASSED", NITRO),
        ("autocloud.ami.atomic", NITRO): res("INFO", NITRO, skipped="AtomicHost only"),
    }
    decision = judge(latest, policy=policy)
    assert decision.verdict == "release"
    assert decision.inapplicable == ((f"autocloud.ami.atomic [{NITRO}]", "AtomicHost only"),)


def test_no_rule_applies_rejects_and_says_so() -> None:
    decision = judge(PASS_ALL, subject=Subject("41", "AtomicHost", "x86_64", "nightly"))
    assert decision.verdict == "reject"
    assert decision.rules == ()
    assert "matrix.yaml" in decision.reason and "AtomicHost" in decision.reason


def test_the_deadline_rejects_a_missing_scenario_unless_waived() -> None:
    latest = {k: v for k, v in PASS_ALL.items() if k != (SUMMARY, XEN)}
    assert judge(latest, after=DEADLINE).verdict == "reject"
    assert judge(latest, [W(SUMMARY, XEN)], after=DEADLINE).verdict == "release"


def test_default_policy_gates_every_present_scenario() -> None:
    """The default (no policy file): the summary must pass in each scenario that has results."""
    policy = default_policy([SUMMARY])
    both = {(SUMMARY, NITRO): res("PASSED", NITRO), (SUMMARY, XEN): res("FAILED", XEN)}
    assert judge(both, policy=policy).verdict == "reject"
    assert judge({(SUMMARY, NITRO): res("PASSED", NITRO)}, policy=policy).verdict == "release"
    # Results posted without a scenario (today's autocloud_ami) gate as always.
    assert judge({(SUMMARY, ""): res("PASSED")}, policy=policy).verdict == "release"
    assert judge({}, policy=policy).missing == (SUMMARY,)


def test_the_rules_that_apply_are_named() -> None:
    assert judge(PASS_ALL).rules == ("cloud", "selinux-production")
    assert judge({}, subject=ARM).rules == ("cloud",)


def test_a_retracted_scenario_stays_required_in_the_default_policy() -> None:
    """After a retest of one scenario its old result is set aside: the gate waits for it."""
    policy = default_policy([SUMMARY])
    kept = {(SUMMARY, NITRO): res("PASSED", NITRO)}
    decision = evaluate(
        policy,
        X86,
        AMI,
        kept,
        [],
        reject_outcomes=REJECT_OUTCOMES,
        staged_at=STAGED,
        now=STAGED + timedelta(hours=1),
        deadline=DEADLINE,
        retracted=[(SUMMARY, XEN)],
    )
    assert decision.verdict == "wait" and decision.missing == (f"{SUMMARY} [{XEN}]",)


def _summary(outcome: str, scenario: str, run: tuple[str, ...]) -> SR:
    return dataclasses.replace(
        res(outcome, scenario), data={"scenario": (scenario,), "scenarios": (",".join(run),)}
    )


@pytest.mark.parametrize(
    ("latest", "verdict"),
    [
        # The first summary of a two-scenario run is in, the other not yet: never a release.
        ({(SUMMARY, NITRO): _summary("PASSED", NITRO, (NITRO, XEN))}, "wait"),
        ({(SUMMARY, XEN): _summary("PASSED", XEN, (NITRO, XEN))}, "wait"),
        ({(SUMMARY, NITRO): _summary("FAILED", NITRO, (NITRO, XEN))}, "reject"),
        (
            {
                (SUMMARY, NITRO): _summary("PASSED", NITRO, (NITRO, XEN)),
                (SUMMARY, XEN): _summary("PASSED", XEN, (NITRO, XEN)),
            },
            "release",
        ),
        (
            {
                (SUMMARY, NITRO): _summary("PASSED", NITRO, (NITRO, XEN)),
                (SUMMARY, XEN): _summary("FAILED", XEN, (NITRO, XEN)),
            },
            "reject",
        ),
        # A run of one scenario lists only itself.
        ({(SUMMARY, NITRO): _summary("PASSED", NITRO, (NITRO,))}, "release"),
    ],
)
def test_the_default_policy_waits_for_every_scenario_a_run_announced(
    latest: dict[tuple[str, str], SR], verdict: str
) -> None:
    assert judge(latest, policy=default_policy([SUMMARY])).verdict == verdict


def test_announced_scenarios_are_read_from_every_summary() -> None:
    results = [
        _summary("PASSED", NITRO, (NITRO, XEN)),
        res("PASSED", XEN),
        SR("PASSED", data={"scenarios": (" x86_64:m5.large , ,",)}),
    ]
    assert announced_scenarios(results) == {NITRO, XEN, "x86_64:m5.large"}
