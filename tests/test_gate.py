"""The gate is a pure function: every rule, its edges, and properties over random inputs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedimg.gate import Decision, decide

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
