"""``make demo``: a Fedora compose through the whole pipeline, on this machine, in a few minutes.

Brings up ``devel.stack.Stack``, replays the recorded production compose
message with the real ``fedmsg-dg-replay`` (with ``--bus amqp``: over a
private RabbitMQ with two ``fedora-messaging consume`` processes per app,
replayed by ``devel.replay``), prints every message on the bus
as it passes (time, topic, what it says), waits until every image reached
its end state, then prints per image the staging AMI, its tests (from
ResultsDB: over its scenarios, then per scenario), its state and its AMI in
every region, and checks the outcome:

- each image the instance host lets pass is ``released``: public in the
  staging region and copied, available and public in every target region,
  announced by ``fedimg.image.release``;
- the image it breaks (SELinux off on the aarch64 Cloud Base) is
  ``rejected``: copied nowhere, public nowhere, ``fedimg.image.test failed``;
- every AMI was tested in every scenario of its architecture (two x86_64
  instance types, one aarch64);
- no test instance, key pair or security group is left.

Exit 0 when all of that holds, 1 with the reasons when not, 2 when the stack
did not come up. Needs no TTY and no stdin; every process it started is
stopped before it returns.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

from devel.bus import Seen
from devel.compose import ComposeTree
from devel.stack import Stack, StackError, StackOptions, Stopped, stop_on_signals
from fedimg import tags
from fedimg.status import deprecation_cell

log = logging.getLogger(__name__)

END_STATES: Final = ("released", "rejected")
TEST_TAG: Final = "autocloud:ami-test"
SUMMARY_TESTCASE: Final = "autocloud.ami.all"
LIVE_INSTANCE_STATES: Final = ["pending", "running", "stopping", "stopped", "shutting-down"]


# -- what the pipeline did: read from AWS (moto) and ResultsDB ----------------------------------


@dataclass(frozen=True)
class RegionAmi:
    """One region's AMI of an image: the staging AMI or a copy."""

    region: str
    ami_id: str
    state: str
    public: bool
    deprecation: str = ""  # EC2's DeprecationTime as fedimg status shows it; "" if none


# How bad an outcome is, when one testcase has results in several scenarios.
_RANK: Final = {"INFO": 0, "PASSED": 1, "NEEDS_INSPECTION": 2, "FAILED": 3}


def worst(outcomes: Iterable[str]) -> str:
    """The outcome that decides over several scenarios (an unknown one counts as FAILED)."""
    return max(outcomes, key=lambda o: _RANK.get(o, 3), default="")


@dataclass(frozen=True)
class Outcomes:
    """The latest ResultsDB result per testcase of one AMI, over its scenarios and per scenario."""

    outcomes: Mapping[str, str]  # testcase -> its worst latest outcome over every scenario
    scenarios: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @classmethod
    def of(cls, scenarios: Mapping[str, Mapping[str, str]]) -> Outcomes:
        names = {tc for per in scenarios.values() for tc in per}
        merged = {tc: worst(per[tc] for per in scenarios.values() if tc in per) for tc in names}
        return cls(merged, scenarios)

    @property
    def summary(self) -> str | None:
        return self.outcomes.get(SUMMARY_TESTCASE)

    @property
    def failed(self) -> list[str]:
        return failed_of(self.outcomes)

    @property
    def passed(self) -> int:
        return count_of(self.outcomes, "PASSED")

    def cell(self) -> str:
        if not self.outcomes:
            return "no results"
        return outcome_cell(self.outcomes)


def failed_of(outcomes: Mapping[str, str]) -> list[str]:
    """The tests (not the summary) that FAILED or could not run."""
    return sorted(
        tc
        for tc, o in outcomes.items()
        if o in ("FAILED", "NEEDS_INSPECTION") and tc != SUMMARY_TESTCASE
    )


def count_of(outcomes: Mapping[str, str], outcome: str) -> int:
    return sum(1 for tc, o in outcomes.items() if o == outcome and tc != SUMMARY_TESTCASE)


def outcome_cell(outcomes: Mapping[str, str]) -> str:
    failed = failed_of(outcomes)
    summary = outcomes.get(SUMMARY_TESTCASE) or "no summary"
    text = f"{summary}: {count_of(outcomes, 'PASSED')} passed, {len(failed)} failed"
    if failed:
        text += " (" + ", ".join(tc.rsplit(".", 1)[-1] for tc in failed) + ")"
    skipped = count_of(outcomes, "INFO")
    return text + (f", {skipped} not applicable" if skipped else "")


@dataclass(frozen=True)
class ImageRow:
    """One image of the compose and what became of it."""

    image_name: str
    arch: str
    subvariant: str
    expected: str
    staging: RegionAmi | None = None
    state: str | None = None
    copies: Mapping[str, RegionAmi] = field(default_factory=dict)
    tests: Outcomes | None = None
    scenarios: tuple[str, ...] = ()  # the scenarios its AMI must be tested in

    @property
    def label(self) -> str:
        return f"{self.subvariant} {self.arch}"

    @property
    def settled(self) -> bool:
        return self.staging is not None and self.state in END_STATES


@dataclass(frozen=True)
class Leftovers:
    """autocloud test resources still in AWS (there must be none once a test is over)."""

    instances: tuple[str, ...] = ()
    key_pairs: tuple[str, ...] = ()
    security_groups: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.instances or self.key_pairs or self.security_groups)

    def describe(self) -> str:
        parts = [
            f"{what}: {', '.join(ids)}"
            for what, ids in (
                ("instances", self.instances),
                ("key pairs", self.key_pairs),
                ("security groups", self.security_groups),
            )
            if ids
        ]
        return "; ".join(parts) or "none"


@dataclass(frozen=True)
class PipelineState:
    staging_region: str
    regions: tuple[str, ...]
    rows: tuple[ImageRow, ...]
    leftovers: Leftovers

    @property
    def settled(self) -> bool:
        return all(row.settled for row in self.rows)


def is_public(ec2: Any, ami_id: str) -> bool:
    """Whether the AMI's launch permissions include the group ``all``."""
    attr = ec2.describe_image_attribute(ImageId=ami_id, Attribute="launchPermission")
    return any(p.get("Group") == "all" for p in attr.get("LaunchPermissions", []))


def staging_amis(ec2: Any, compose_id: str) -> list[dict[str, Any]]:
    """The compose's fedimg AMIs in one region (the staging region)."""
    found = ec2.describe_images(
        Owners=["self"], Filters=[{"Name": f"tag:{tags.COMPOSE_ID}", "Values": [compose_id]}]
    )["Images"]
    return [i for i in found if tags.SOURCE_AMI not in tags.as_dict(i.get("Tags"))]


def copies_of(ec2: Any, region: str, source: str) -> list[RegionAmi]:
    images = ec2.describe_images(
        Owners=["self"], Filters=[{"Name": f"tag:{tags.SOURCE_AMI}", "Values": [source]}]
    )["Images"]
    return [
        RegionAmi(
            region,
            i["ImageId"],
            str(i.get("State", "?")),
            is_public(ec2, i["ImageId"]),
            deprecation_cell(i.get("DeprecationTime")),
        )
        for i in images
    ]


def latest_outcomes(results: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """scenario -> testcase -> outcome of its newest result (by submit_time, then id).

    A result without data ``scenario`` (an older autocloud_ami) is under "".
    """
    newest: dict[tuple[str, str], tuple[str, int, str]] = {}
    for r in results:
        scenario = (r.get("data", {}).get("scenario") or [""])[0]
        name = (scenario, r["testcase"]["name"])
        key = (str(r.get("submit_time", "")), int(r.get("id", 0)), str(r["outcome"]))
        if name not in newest or key > newest[name]:
            newest[name] = key
    found: dict[str, dict[str, str]] = {}
    for (scenario, testcase), value in sorted(newest.items()):
        found.setdefault(scenario, {})[testcase] = value[2]
    return found


def read_tests(resultsdb_url: str, ami_id: str) -> Outcomes:
    from resultsdb_api import ResultsDBapi

    api = ResultsDBapi(resultsdb_url)
    results: list[dict[str, Any]] = []
    page = 0
    while True:
        got = api.get_results(item=ami_id, type="ami", limit=100, page=page)
        results.extend(got.get("data", []))
        if not got.get("next"):
            return Outcomes.of(latest_outcomes(results))
        page += 1


def leftovers(ec2: Any) -> Leftovers:
    test_filter = [{"Name": "tag-key", "Values": [TEST_TAG]}]
    reservations = ec2.describe_instances(
        Filters=[
            *test_filter,
            {"Name": "instance-state-name", "Values": LIVE_INSTANCE_STATES},
        ]
    )["Reservations"]
    return Leftovers(
        instances=tuple(i["InstanceId"] for r in reservations for i in r["Instances"]),
        key_pairs=tuple(
            k["KeyName"] for k in ec2.describe_key_pairs(Filters=test_filter)["KeyPairs"]
        ),
        security_groups=tuple(
            g["GroupId"]
            for g in ec2.describe_security_groups(Filters=test_filter)["SecurityGroups"]
        ),
    )


def read_state(
    stack: Stack, *, deep: bool = True, tree: ComposeTree | None = None
) -> PipelineState:
    """What AWS and ResultsDB say now (of the stack's compose, or ``tree``); ``deep=False``
    reads only the staging AMIs' state."""
    tree = tree or stack.tree
    assert tree is not None
    opts = stack.options
    ec2 = stack.ec2(opts.staging_region)
    by_name = {
        tags.as_dict(i.get("Tags")).get(tags.IMAGE_NAME, ""): i
        for i in staging_amis(ec2, tree.compose_id)
    }
    expected = stack.expected(tree)
    rows = []
    for name, arch, subvariant in stack.raw_images(tree):
        scenarios = tuple(stack.scenarios_of(arch))
        row = ImageRow(name, arch, subvariant, expected[name], scenarios=scenarios)
        image = by_name.get(name)
        if image is not None:
            ami_id = image["ImageId"]
            state = tags.as_dict(image.get("Tags")).get(tags.STATE)
            staging = RegionAmi(
                opts.staging_region,
                ami_id,
                str(image.get("State", "?")),
                is_public(ec2, ami_id) if deep else False,
                deprecation_cell(image.get("DeprecationTime")),
            )
            copies: dict[str, RegionAmi] = {}
            tests = None
            if deep:
                for region in opts.regions:
                    found = copies_of(stack.ec2(region), region, ami_id)
                    if found:
                        copies[region] = found[0]
                tests = read_tests(stack.resultsdb_url, ami_id)
            row = ImageRow(
                name, arch, subvariant, expected[name], staging, state, copies, tests, scenarios
            )
        rows.append(row)
    return PipelineState(
        opts.staging_region,
        tuple(opts.regions),
        tuple(rows),
        leftovers(ec2) if deep else Leftovers(),
    )


# -- judging it (pure) ---------------------------------------------------------------------------


def _bodies(messages: Sequence[Seen], suffix: str) -> list[Mapping[str, Any]]:
    return [m.body for m in messages if m.topic.endswith(suffix)]


def problems(state: PipelineState, messages: Sequence[Seen]) -> list[str]:
    """Everything that differs from the expected end state; empty when all is right."""
    found: list[str] = []
    for row in state.rows:
        found.extend(_row_problems(row, state, messages))
    if state.leftovers:
        found.append(f"autocloud test resources left in AWS: {state.leftovers.describe()}")
    return found


def _row_problems(row: ImageRow, state: PipelineState, messages: Sequence[Seen]) -> list[str]:
    name = row.image_name
    if row.staging is None:
        return [f"{name}: no AMI in the staging region {state.staging_region}"]
    ami = row.staging.ami_id
    out: list[str] = []
    if row.state != row.expected:
        out.append(f"{name} {ami}: state {row.state or 'untagged'}, expected {row.expected}")
    summary = row.tests.summary if row.tests else None
    want_summary = "PASSED" if row.expected == "released" else "FAILED"
    if summary != want_summary:
        out.append(f"{name} {ami}: ResultsDB {SUMMARY_TESTCASE} is {summary}, not {want_summary}")
    tested = sorted(row.tests.scenarios) if row.tests else []
    if row.scenarios and tested != sorted(row.scenarios):
        out.append(f"{name} {ami}: tested in {tested or 'no scenario'}, not {list(row.scenarios)}")
    if row.expected == "released":
        out.extend(_released_problems(row, row.staging, state, messages))
    else:
        out.extend(_rejected_problems(row, row.staging, messages))
    return out


def _released_problems(
    row: ImageRow, staging: RegionAmi, state: PipelineState, messages: Sequence[Seen]
) -> list[str]:
    name, ami = row.image_name, staging.ami_id
    out: list[str] = []
    if not staging.public:
        out.append(f"{name} {ami}: not public in the staging region {state.staging_region}")
    if not staging.deprecation:
        out.append(f"{name} {ami}: no deprecation time in the staging region")
    for region in state.regions:
        copy = row.copies.get(region)
        if copy is None:
            out.append(f"{name} {ami}: no copy in {region}")
        elif copy.state != "available" or not copy.public:
            out.append(
                f"{name} {ami}: copy {copy.ami_id} in {region} is {copy.state}, "
                f"{'public' if copy.public else 'private'}"
            )
        elif copy.deprecation != staging.deprecation:
            out.append(
                f"{name} {ami}: copy {copy.ami_id} in {region} is deprecated at "
                f"{copy.deprecation or 'no time'}, the staging AMI at {staging.deprecation}"
            )
    releases = [
        b
        for b in _bodies(messages, "fedimg.image.release")
        if b.get("image_name") == name and b.get("regions", {}).get(state.staging_region) == ami
    ]
    if not releases:
        out.append(f"{name} {ami}: no fedimg.image.release on the bus")
    elif set(releases[-1].get("regions", {})) != {state.staging_region, *state.regions}:
        out.append(f"{name} {ami}: released in {sorted(releases[-1]['regions'])} only")
    return out


def _rejected_problems(row: ImageRow, staging: RegionAmi, messages: Sequence[Seen]) -> list[str]:
    name, ami = row.image_name, staging.ami_id
    out: list[str] = []
    if staging.public:
        out.append(f"{name} {ami}: rejected but public in {staging.region}")
    if row.copies:
        out.append(f"{name} {ami}: rejected but copied to {', '.join(sorted(row.copies))}")
    failed = [
        b
        for b in _bodies(messages, "fedimg.image.test")
        if b.get("status") == "failed" and b.get("extra", {}).get("id") == ami
    ]
    if not failed:
        out.append(f"{name} {ami}: no fedimg.image.test failed on the bus")
    return out


# -- showing it (pure) ---------------------------------------------------------------------------


def summarize(topic: str, body: Mapping[str, Any]) -> str:
    """A one-line reading of a message body, by topic."""
    extra = body.get("extra") if isinstance(body.get("extra"), Mapping) else {}
    assert isinstance(extra, Mapping)
    name = body.get("image_name", "")
    if topic.endswith("pungi.compose.status.change"):
        return f"{body.get('compose_id')} {body.get('status')} {body.get('location', '')}".strip()
    if topic.endswith(("fedimg.image.upload", "fedimg.image.test")):
        text = f"{body.get('status')} {name} {extra.get('id', '')} in {body.get('destination')}"
        return text + (f": {body['reason']}" if body.get("reason") else "")
    if topic.endswith("fedimg.image.copy"):
        return (
            f"{name} {extra.get('source_image_id')} -> {body.get('destination')} {extra.get('id')}"
        )
    if topic.endswith("fedimg.image.publish"):
        return f"{name} {extra.get('id')} public in {body.get('destination')}"
    if topic.endswith("fedimg.image.release"):
        regions = body.get("regions", {})
        text = f"{name} public in {len(regions)} region(s)"
        failed = body.get("failed_regions")
        return text + (f"; FAILED in {', '.join(sorted(failed))}" if failed else "")
    if ".fedora_image_uploader.published.v1.aws." in topic:
        regions = body.get("regions")
        count = len(regions) if isinstance(regions, Mapping) else 0
        return f"{body.get('image_name')} public in {count} region(s) (AwsPublishedV1)"
    if ".autocloud.ami." in topic:
        text = f"{body.get('status')} {body.get('ami_id')} {name} job {str(body.get('job_id'))[:8]}"
        if body.get("status") in ("success", "failed"):
            text += f": {body.get('passed', 0)} passed, {body.get('failed', 0)} failed"
        return text
    if topic.endswith("result.new"):
        item = (body.get("data", {}).get("item") or ["?"])[0]
        return f"{body.get('testcase', {}).get('name')} {body.get('outcome')} for {item}"
    if topic.endswith(("fedimg.hub.ping", "fedimg.hub.pong")):
        return f"token {body.get('token')}"
    return json.dumps(body, sort_keys=True)[:120]


def tail_line(seen: Seen) -> str:
    """A message as one line: wall time, topic, summary."""
    stamp = time.strftime("%H:%M:%S", time.localtime(seen.at)) + f".{int(seen.at % 1 * 1000):03d}"
    return f"{stamp} {seen.topic} {summarize(seen.topic, seen.body)}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]


def region_cell(row: ImageRow, region: str, staging_region: str) -> str:
    if row.staging is None:
        return "-"
    found = row.staging if region == staging_region else row.copies.get(region)
    if found is not None:
        text = f"{found.ami_id} {'public' if found.public else 'private'}"
        return text + (f", deprecated {found.deprecation}" if found.deprecation else "")
    if row.state == "rejected":
        return "not copied (rejected)"
    return "not copied"


def render(state: PipelineState) -> str:
    """The end-of-demo tables: per image, per image and scenario, then per region."""
    lines = _table(
        ("IMAGE", "ARCH", "STAGING AMI", "TESTS (ResultsDB)", "STATE", "EXPECTED"),
        [
            (
                r.image_name,
                r.arch,
                r.staging.ami_id if r.staging else "-",
                r.tests.cell() if r.tests else "-",
                r.state or "-",
                r.expected,
            )
            for r in state.rows
        ],
    )
    lines.append("")
    lines += _table(
        ("IMAGE", "SCENARIO", "TESTS (ResultsDB, per scenario)"),
        [
            (r.image_name, scenario or "(none)", outcome_cell(per))
            for r in state.rows
            if r.tests is not None
            for scenario, per in sorted(r.tests.scenarios.items())
        ],
    )
    regions = [state.staging_region, *state.regions]
    lines.append("")
    lines += _table(
        ("REGION", *[r.label for r in state.rows]),
        [
            (
                f"{region} (staging)" if region == state.staging_region else region,
                *[region_cell(r, region, state.staging_region) for r in state.rows],
            )
            for region in regions
        ],
    )
    lines.append("")
    lines.append(f"test resources left in AWS: {state.leftovers.describe()}")
    return "\n".join(lines)


# -- the run --------------------------------------------------------------------------------------


class Follower:
    """Prints every bus message once, in arrival order, from a starting point."""

    def __init__(self, stack: Stack, out: TextIO) -> None:
        assert stack.bus is not None and stack.bus.tap is not None
        self.tap = stack.bus.tap
        self.out = out
        self.start = len(self.tap.messages())
        self.printed = self.start

    def flush(self) -> None:
        seen = self.tap.messages()
        for message in seen[self.printed :]:
            print(tail_line(message), file=self.out, flush=True)
        self.printed = len(seen)

    def messages(self) -> list[Seen]:
        return self.tap.messages()[self.start :]


def wait_settled(
    stack: Stack, follower: Follower, timeout: float, tree: ComposeTree | None = None
) -> bool:
    """Follow the bus until every image is released or rejected and announced; False on timeout."""
    deadline = time.monotonic() + timeout
    next_look = 0.0
    while True:
        follower.flush()
        now = time.monotonic()
        if now >= next_look:
            next_look = now + 1.0
            state = read_state(stack, deep=False, tree=tree)
            if state.settled and _announced(state, follower.messages()):
                follower.flush()
                return True
        if now >= deadline:
            follower.flush()
            return False
        time.sleep(0.1)


def _announced(state: PipelineState, messages: Sequence[Seen]) -> bool:
    """The end message of every settled image has reached the bus."""
    for row in state.rows:
        assert row.staging is not None
        ami = row.staging.ami_id
        if row.state == "released":
            ok = any(
                b.get("regions", {}).get(state.staging_region) == ami
                for b in _bodies(messages, "fedimg.image.release")
            )
        else:
            ok = any(
                b.get("status") == "failed" and b.get("extra", {}).get("id") == ami
                for b in _bodies(messages, "fedimg.image.test")
            )
        if not ok:
            return False
    return True


def run_demo(options: StackOptions, out: TextIO, timeout: float) -> int:
    started = time.monotonic()
    bus = (
        f"RabbitMQ, {options.per_app} consumer processes per app"
        if options.bus == "amqp"
        else "relay, hub"
    )
    print(f"starting the local stack (moto, {bus}, ResultsDB, SSH stand-in) ...", file=out)
    with Stack(options) as stack:
        print(f"stack up in {time.monotonic() - started:.1f}s", file=out)
        follower = Follower(stack, out)
        tool = stack.replay_tool
        print(f"replaying {stack.msg_id} with {tool}", file=out, flush=True)
        replay = stack.replay()
        if replay.returncode != 0:
            print(
                f"FAILED: {tool} exited {replay.returncode}:\n{replay.stdout}{replay.stderr}",
                file=out,
            )
            return 1
        settled = wait_settled(stack, follower, timeout)
        state = read_state(stack)
        found = problems(state, follower.messages())
        if not settled:
            pending = [
                f"{r.image_name} ({r.state or 'not staged'})" for r in state.rows if not r.settled
            ]
            found.insert(
                0,
                f"not every image reached its end state within {timeout:.0f}s: "
                + (", ".join(pending) or "end messages missing"),
            )
        print("", file=out)
        print(render(state), file=out)
        elapsed = time.monotonic() - started
        print("", file=out)
        if found:
            print(f"FAILED after {elapsed:.1f}s:", file=out)
            for problem in found:
                print(f"  - {problem}", file=out)
            _show_logs(stack, out)
            return 1
        released = sum(1 for r in state.rows if r.state == "released")
        print(
            f"OK: {released} image(s) released in {1 + len(state.regions)} regions, "
            f"{len(state.rows) - released} rejected; wall time {elapsed:.1f}s",
            file=out,
            flush=True,
        )
        return 0


def _show_logs(stack: Stack, out: TextIO) -> None:
    for proc in stack.processes():
        text = proc.output()
        errors = [line for line in text.splitlines() if " ERROR " in line or "Traceback" in line]
        if errors:
            print(f"--- {proc.name}: {len(errors)} error line(s), last ones:", file=out)
            for line in errors[-5:]:
                print(f"    {line[:300]}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devel.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds for the pipeline")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the stack's own steps")
    parser.add_argument(
        "--bus",
        choices=["fedmsg", "amqp"],
        default="fedmsg",
        help="fedmsg (relay and one hub) or amqp (RabbitMQ, two consumer processes per app)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    out = sys.stdout
    try:
        with stop_on_signals():
            return run_demo(StackOptions(bus=args.bus), out, args.timeout)
    except StackError as exc:
        print(f"the stack did not come up: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Stopped):
        print("interrupted; everything torn down", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
