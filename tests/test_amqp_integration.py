"""The whole pipeline over a real RabbitMQ: two fedora-messaging consumer processes per app.

One ``devel.stack.Stack`` with ``bus="amqp"`` on the session's RabbitMQ node
(moto_server, the ResultsDB stand-in publishing ``resultsdb.result.new`` over
AMQP, the instance host failing SELinux on the aarch64 Cloud Base image, and
``fedora-messaging --conf FILE consume`` twice per app, FILE being the
repository's sample with the local URL and settings) serves every test here,
in order:

1. the demo's compose, replayed from the datagrepper stand-in, ends released
   and rejected exactly as over fedmsg (``devel.demo.problems``), with nothing
   done twice and work taken by every process;
2. every body published validates against the class it was sent as;
3. three fedimg processes receiving result messages for one AMI at the same
   moment make one promotion (the others find it busy and ack: the holder
   looks again);
4. a second compose survives a fedimg process SIGKILLed while staging, an
   autocloud_ami process SIGKILLed mid-test (replaced, as systemd would) and a
   RabbitMQ restart: every image finished once.

Reconcile passes run when a fedimg process starts (and, in the replacement
started in 4., every few seconds): a pass at an arbitrary moment would take
the decision of test 3 away from the messages.
"""

from __future__ import annotations

import io
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fedora_image_uploader_messages.publish import AwsPublishedV1
from fedora_messaging import message as fm
from resultsdb_api import ResultsDBapi

from devel.amqpbus import AmqpBus
from devel.bus import ManagedProcess, Seen, WaitTimeout, wait_until
from devel.compose import ComposeServer, ComposeTree, ImageSpec, build_compose, compose_message
from devel.demo import (
    SUMMARY_TESTCASE,
    Follower,
    Leftovers,
    copies_of,
    leftovers,
    problems,
    read_state,
    staging_amis,
    wait_settled,
)
from devel.rabbitmq import RabbitMQ
from devel.stack import PRODUCTION_TOPIC, Stack, StackOptions
from fedimg import tags
from fedimg.messages import message_class
from tests.amqp_support import fm_publish, queue_state
from tests.e2e_support import ami_in_testing, contract_errors, count, short

# One stack for the module: the first test's timeout covers starting it.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

PIPELINE_TIMEOUT = 240.0
WAIT = 120.0
STAGING = "us-east-1"
SETTINGS = {
    "fedimg.reconcile.interval": 3600.0,  # passes at start-up only (see the docstring)
    "fedimg.reconcile.orphan_grace": 2.0,  # what a killed stage left is handled at once
}
OURS = ("fedimg.", "autocloud.", "fedora_image_uploader.")


@pytest.fixture(scope="module")
def stack(rabbitmq: RabbitMQ) -> Iterator[Stack]:
    options = StackOptions(
        bus="amqp",
        rabbitmq=rabbitmq,
        queue_suffix=f"-it-{uuid.uuid4().hex[:6]}",
        extra_settings=SETTINGS,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")  # read by moto_server at start
        started = Stack(options).start()
    try:
        yield started
    finally:
        started.stop()


def amqp(stack: Stack) -> AmqpBus:
    assert isinstance(stack.bus, AmqpBus)
    return stack.bus


def workers(stack: Stack, app: str) -> list[ManagedProcess]:
    return [p for p in amqp(stack).processes if p.name.startswith(f"{app}-") and p.alive]


def in_flight(counts: dict[str, int]) -> int:
    """Messages a consumer received and has not acked, requeued nor dropped yet."""
    done = counts["processed"] + counts["rejected"] + counts["dropped"] + counts["failed"]
    return counts["received"] - done


def logs(stack: Stack) -> str:
    return "\n".join(f"--- {p.name}\n{p.output()[-3000:]}" for p in amqp(stack).processes)


def runs_of(left: Leftovers) -> set[str]:
    """The test runs (``autocloud-<job id>``) that left key pairs behind: a run of several
    scenarios names each scenario's key pair ``autocloud-<job id>-<instance type>``."""
    return {m.group(0) for name in left.key_pairs if (m := re.match(r"autocloud-[0-9a-f]+", name))}


def summaries(stack: Stack, ami_id: str) -> int:
    """How many times the AMI was tested: its summaries per scenario (one per test run)."""
    found = ResultsDBapi(stack.resultsdb_url).get_results(
        item=ami_id, type="ami", testcases=SUMMARY_TESTCASE, limit=50
    )
    per_scenario = Counter(r["data"]["scenario"][0] for r in found["data"])
    return max(per_scenario.values(), default=0)


def done_twice(stack: Stack, tree: ComposeTree | None, messages: list[Seen]) -> list[str]:
    """Everything of the compose that exists or was announced more than once."""
    tree = tree or stack.tree
    assert tree is not None
    ec2 = stack.ec2(STAGING)
    amis = staging_amis(ec2, tree.compose_id)
    found: list[str] = []
    for name, _arch, _sub in stack.raw_images(tree):
        mine = [i for i in amis if tags.as_dict(i.get("Tags")).get(tags.IMAGE_NAME) == name]
        if len(mine) != 1:
            found.append(f"{name}: {len(mine)} staging AMIs")
            continue
        ami = mine[0]["ImageId"]
        if summaries(stack, ami) != 1:
            found.append(f"{name} {ami}: tested {summaries(stack, ami)} times")

        def verdict_of(b: dict[str, Any], ami: str = ami) -> bool:
            return b.get("status") != "started" and b["extra"].get("id") == ami

        def release_of(b: dict[str, Any], ami: str = ami) -> bool:
            return b["regions"].get(STAGING) == ami

        verdicts = count(messages, "fedimg.image.test", verdict_of)
        releases = count(messages, "fedimg.image.release", release_of)
        published = sum(
            1
            for m in messages
            if short(m.topic).startswith("fedora_image_uploader.published.v1.aws.")
            and m.body["regions"].get(STAGING) == ami
        )
        copies = {r: len(copies_of(stack.ec2(r), r, ami)) for r in stack.options.regions}
        released = stack.expected(tree)[name] == "released"
        want = 1 if released else 0
        if verdicts != 1 or releases != want or published != want:
            found.append(f"{name} {ami}: {verdicts} verdicts, {releases} releases, {published}")
        if set(copies.values()) != {want}:
            found.append(f"{name} {ami}: copies per region {copies}")
    return found


# -- 1. the demo's compose -----------------------------------------------------------------------


def test_a_compose_message_releases_and_rejects_as_over_fedmsg(stack: Stack) -> None:
    bus = amqp(stack)
    follower = Follower(stack, io.StringIO())
    replayed = stack.replay()  # devel.replay: from the datagrepper stand-in onto RabbitMQ
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert wait_settled(stack, follower, PIPELINE_TIMEOUT), logs(stack)
    state = read_state(stack)
    assert problems(state, follower.messages()) == [], logs(stack)
    assert {r.state for r in state.rows} == {"released", "rejected"}
    assert done_twice(stack, None, follower.messages()) == []
    # Two processes per app shared one durable queue per app, and each of them took work.
    for app in ("fedimg", "autocloud_ami"):
        assert len(workers(stack, app)) == 2
        assert all(bus.stats(w)["received"] >= 1 for w in workers(stack, app)), app
        assert queue_state(bus.node, bus.queue(app)) == (0, 2)


# -- 2. what was published -----------------------------------------------------------------------


def test_every_published_body_validates_against_the_class_it_was_sent_as(stack: Stack) -> None:
    tap = amqp(stack).tap
    assert tap is not None

    def announced() -> bool:  # the announcement follows the release message
        schemas = {m.envelope["headers"].get("fedora_messaging_schema") for m in tap.messages()}
        return any(fm.get_class(name) is AwsPublishedV1 for name in schemas if name)

    wait_until(announced, WAIT, "the AwsPublishedV1 announcement of the released images")
    ours = [m for m in tap.messages() if short(m.topic).startswith(OURS)]
    sent_as = set()
    for seen in ours:
        cls = fm.get_class(seen.envelope["headers"]["fedora_messaging_schema"])
        assert cls is message_class(short(seen.topic)), seen.topic
        cls(body=seen.body, topic=seen.topic).validate()  # raises ValidationError if not
        sent_as.add(cls.__name__)
    assert AwsPublishedV1.__name__ in sent_as
    assert {"ImageUploadV1", "ImageTestV1", "ImageReleaseV1", "AmiSuccessV1"} <= sent_as
    assert contract_errors(tap.messages()) == []  # result.new and the compose, too


# -- 3. three workers, one AMI -------------------------------------------------------------------


def test_three_workers_receiving_results_for_one_ami_at_once_make_one_promotion(
    stack: Stack,
) -> None:
    bus = amqp(stack)
    third, port = bus.start_consumer("fedimg")
    bus.wait_consuming(third, port, WAIT)
    three = workers(stack, "fedimg")
    assert len(three) == 3
    ami = ami_in_testing(stack.ec2(STAGING), 7)
    # The summary goes into ResultsDB while its own message cannot reach fedimg's queue...
    key = f"{bus.prefix}.resultsdb.result.new"
    with bus.node.connection() as conn:
        conn.channel().queue_unbind(bus.queue("fedimg"), "amq.topic", key)
    try:
        created = ResultsDBapi(stack.resultsdb_url).create_result(
            "PASSED", SUMMARY_TESTCASE, item=ami, type="ami"
        )
    finally:
        with bus.node.connection() as conn:
            conn.channel().queue_bind(bus.queue("fedimg"), "amq.topic", key)
    # ...then three result messages about it are published at once, one per idle worker.
    before = {w.name: bus.stats(w) for w in three}
    notices = [fm.Message(topic="resultsdb.result.new", body=created) for _ in range(3)]
    fm_publish(bus.publisher_config, notices)

    def acked() -> bool:
        done = sum(bus.stats(w)["processed"] - before[w.name]["processed"] for w in three)
        return done >= 3

    wait_until(acked, PIPELINE_TIMEOUT, "the three result messages acked", interval=0.5)
    after = {w.name: bus.stats(w) for w in three}
    # Each of the three idle workers took one of them (prefetch 1): they met. The ones
    # that found the AMI held acked at once (the holder looks again: the engine's mark).
    assert all(after[n]["received"] > before[n]["received"] for n in after), (before, after)

    def state() -> str | None:
        image = stack.ec2(STAGING).describe_images(ImageIds=[ami])["Images"][0]
        return tags.as_dict(image["Tags"]).get(tags.STATE)

    # The first message is acked once the release is decided; the copies go on after it.
    wait_until(lambda: state() == "released", PIPELINE_TIMEOUT, f"{ami} released", interval=0.5)
    tap = bus.tap
    assert tap is not None
    wait_until(
        lambda: any(
            short(m.topic).startswith("fedora_image_uploader.") and ami in str(m.body)
            for m in tap.messages()
        ),
        WAIT,
        "the release announcements on the bus",
        interval=0.2,
    )
    mine = [m for m in tap.messages() if ami in str(m.body)]
    assert sum(short(m.topic) == "fedimg.image.release" for m in mine) == 1
    assert sum(short(m.topic).startswith("fedora_image_uploader.") for m in mine) == 1
    copies = [m for m in mine if short(m.topic) == "fedimg.image.copy"]
    assert sorted(m.body["destination"] for m in copies) == sorted(stack.options.regions)
    for region in stack.options.regions:
        assert len(copies_of(stack.ec2(region), region, ami)) == 1
    third.stop()


# -- 4. killed workers and a broker restart ------------------------------------------------------


def fault_compose(tmp: Path) -> ComposeTree:
    """Two new images (new bytes: nothing of compose 1 matches them)."""
    return build_compose(
        tmp,
        "Fedora-40-20240601.0",
        (
            ImageSpec("Cloud", "x86_64", "Cloud_Base", raw_mib=3, data_blocks=(0, 1, 4), seed=21),
            ImageSpec("Cloud", "aarch64", "Cloud_Base", raw_mib=3, data_blocks=(0, 2), seed=22),
        ),
    )


def test_killed_workers_and_a_broker_restart_lose_and_duplicate_nothing(
    stack: Stack, rabbitmq: RabbitMQ, tmp_path: Path
) -> None:
    bus = amqp(stack)
    tree = fault_compose(tmp_path / "compose")
    follower = Follower(stack, io.StringIO())
    assert stack.datagrepper is not None
    with ComposeServer(tree.root) as server:
        msg_id = stack.datagrepper.store.add(
            PRODUCTION_TOPIC,
            compose_message(tree, server.url),
            msg_id=f"{time.strftime('%Y')}-{uuid.uuid4()}",
        )
        fedimg = workers(stack, "fedimg")
        received = {w.name: bus.stats(w)["received"] for w in fedimg}
        replayed = stack.replay(msg_id)
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr

        # The fedimg process that took the compose is staging it: SIGKILL, then a new one
        # (its start-up pass finishes the compose's intent; it passes every 5 s and asks
        # for a test again after 20 s without results: the request the killed one may
        # not have sent, between tagging an AMI and announcing it).
        staging: ManagedProcess = wait_until(
            lambda: next((w for w in fedimg if bus.stats(w)["received"] > received[w.name]), None),
            WAIT,
            "a fedimg process to take the compose",
            interval=0.05,
        )
        staging.kill()
        bus.settings.update({"fedimg.reconcile.interval": 5.0, "fedimg.gate.retest_after": 20.0})
        fresh, port = bus.start_consumer("fedimg")
        bus.wait_consuming(fresh, port, WAIT)

        # An autocloud_ami process mid-test (its request unacked): SIGKILL, then a new one.
        def testing() -> ManagedProcess | None:
            running = follower.messages()
            if not any(
                short(m.topic) == "autocloud.ami.running"
                and m.body.get("compose_id") == tree.compose_id
                for m in running
            ):
                return None
            return next(
                (w for w in workers(stack, "autocloud_ami") if in_flight(bus.stats(w))), None
            )

        tester: ManagedProcess = wait_until(testing, WAIT, "a test running", interval=0.05)
        tester.kill()
        fresh, port = bus.start_consumer("autocloud_ami")
        bus.wait_consuming(fresh, port, WAIT)

        rabbitmq.restart()  # consumers reconnect by themselves; queues and messages persist

        settled = wait_settled(stack, follower, PIPELINE_TIMEOUT, tree)
        assert settled, logs(stack)
        # The killed run's instances, key pairs and groups (one per scenario it had
        # launched) stay until the sweeper removes them at their deadline
        # (test_sweeper.py); nothing else may be left once every run still going has
        # cleaned up (a request whose ack the broker restart lost is delivered again:
        # that run may still be at work when the images settle).
        staging = stack.ec2(stack.options.staging_region)
        most = max(len(stack.scenarios_of(arch)) for _, arch, _ in stack.raw_images(tree))
        try:
            wait_until(
                lambda: len(runs_of(leftovers(staging))) <= 1,
                PIPELINE_TIMEOUT,
                "every test run still going to clean up",
                interval=0.5,
            )
        except WaitTimeout:
            pass  # judged below, with what is left
        state = read_state(stack, tree=tree)
        found = [p for p in problems(state, follower.messages()) if "left in AWS" not in p]
        assert found == [], logs(stack)
        assert len(runs_of(state.leftovers)) <= 1, state.leftovers
        assert len(state.leftovers.instances) <= most, state.leftovers
        assert {r.state for r in state.rows} == {"released", "rejected"}
        assert done_twice(stack, tree, follower.messages()) == [], logs(stack)
