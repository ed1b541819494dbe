"""fedora-messaging over a real RabbitMQ node (Debian's rabbitmq-server, started by the project).

One node serves the whole session (``rabbitmq`` fixture: a start costs tens
of seconds here); one test restarts it. Messages go through the real
``fedora_messaging`` API in separate processes, as in production: fedimg's
``amqp_publisher`` and the ``fedora-messaging`` CLI publish, ``fedora-messaging
--conf FILE consume`` runs a recording callback (``tests/fm_recorder.py``).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import requests
from fedimg_messages.messages import HubPingV1, ImageReleaseV1, ImageTestV1, ImageUploadV1
from fedora_image_uploader_messages.publish import AwsPublishedV1
from fedora_messaging import message as fm
from resultsdb_api import ResultsDBapi

from devel.bus import ManagedProcess, free_port, wait_until
from devel.rabbitmq import SERVER, RabbitMQ, RabbitMQError, RabbitMQTimeout, write_client_config
from fedimg.messages import RESULT_NEW, parse_result_notice
from tests.amqp_support import FM, ROOT, WAIT, child_env, fm_publish, queue_state

pytestmark = pytest.mark.integration

PREFIX = "org.fedoraproject.dev"
AMI = "ami-0123456789abcdef0"
COPY = "ami-0fedcba9876543210"


# -- helpers ------------------------------------------------------------------------------------


def client_config(node: RabbitMQ, path: Path, queue: str, keys: list[str], **extra: Any) -> Path:
    base: dict[str, Any] = {
        "topic_prefix": PREFIX,
        "callback": "tests.fm_recorder:Record",
        "client_properties": {"app": "fedimg-tests"},
        "queues": {
            queue: {"durable": True, "auto_delete": False, "exclusive": False, "arguments": {}}
        },
        "bindings": [{"queue": queue, "exchange": "amq.topic", "routing_keys": keys}],
        "qos": {"prefetch_count": 1, "prefetch_size": 0},
        **extra,
    }
    return write_client_config(path, node.url, base)


def start_consumer(conf: Path, record_to: Path, tmp_path: Path) -> ManagedProcess:
    """``fedora-messaging --conf FILE consume``: the production command line."""
    return ManagedProcess(
        name="fm-consume",
        argv=[FM, "--conf", str(conf), "consume"],
        cwd=tmp_path,
        env=child_env(FM_RECORD_TO=str(record_to)),
        log_path=tmp_path / f"{conf.stem}.consume.log",
    ).start()


def wait_consuming(node: RabbitMQ, queue: str, consumer: ManagedProcess) -> None:
    def consuming() -> bool:
        assert consumer.alive, consumer.output()[-3000:]
        state = queue_state(node, queue)
        return state is not None and state[1] >= 1

    wait_until(consuming, WAIT, f"a consumer on {queue}", interval=0.2)


def recorded(path: Path) -> list[fm.Message]:
    return fm.loads(path.read_text(encoding="utf-8")) if path.exists() else []


def wait_recorded(path: Path, count: int, consumer: ManagedProcess) -> list[fm.Message]:
    def enough() -> list[fm.Message] | None:
        assert consumer.alive, consumer.output()[-3000:]
        found = recorded(path)
        return found if len(found) >= count else None

    result: list[fm.Message] = wait_until(enough, WAIT, f"{count} message(s) in {path}", 0.2)
    return result


def take(node: RabbitMQ, queue: str) -> tuple[fm.Message, bytes]:
    """The next message of ``queue`` (acked), decoded by fedora-messaging, and its raw body."""
    with node.connection() as conn:
        method, properties, body = conn.channel().basic_get(queue, auto_ack=True)
    assert method is not None, f"{queue} is empty"
    return fm.get_message(method.routing_key, properties, body), body


def base_message(topic: str, body: dict[str, Any]) -> fm.Message:
    return fm.Message(topic=topic, body=body)


# -- the node ------------------------------------------------------------------------------------


def test_the_node_is_private_and_ready(rabbitmq: RabbitMQ) -> None:
    env = rabbitmq.env()
    assert rabbitmq.workdir is not None
    for key in (
        "HOME",
        "RABBITMQ_MNESIA_BASE",
        "RABBITMQ_LOG_BASE",
        "RABBITMQ_ENABLED_PLUGINS_FILE",
        "RABBITMQ_CONFIG_FILE",
        "RABBITMQ_CONF_ENV_FILE",
    ):
        assert Path(env[key]).is_relative_to(rabbitmq.workdir), key
    ports = {rabbitmq.amqp_port, rabbitmq.dist_port, rabbitmq.epmd_port}
    assert len(ports) == 3
    assert env["RABBITMQ_NODE_PORT"] == str(rabbitmq.amqp_port)
    assert env["ERL_EPMD_PORT"] == str(rabbitmq.epmd_port)
    assert set(rabbitmq.pids) == {"rabbitmq-server", "epmd"}
    assert (rabbitmq.workdir / "mnesia" / rabbitmq.nodename).is_dir()
    with rabbitmq.connection() as conn:
        assert conn.is_open
    with socket.create_connection(("127.0.0.1", rabbitmq.epmd_port), timeout=5):
        pass


def test_a_node_that_is_not_ready_in_time_raises_and_leaves_nothing(tmp_path: Path) -> None:
    node = RabbitMQ(workdir=tmp_path / "slow")
    with pytest.raises(RabbitMQTimeout):
        node.start(timeout=0.5)
    assert node.pids == {}
    assert not node.alive
    assert (tmp_path / "slow" / "node.log").exists()  # a directory we gave is kept


def test_a_missing_server_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("devel.rabbitmq.SERVER", SERVER.with_name("no-such-rabbitmq-server"))
    with pytest.raises(RabbitMQError, match="rabbitmq-server"):
        RabbitMQ().start()


# -- publish and consume through fedora_messaging ------------------------------------------------

PUBLISH_WITH_FEDIMG = """
from fedimg import messages as m
image = m.StagedImage(
    compose_id="Fedora-Cloud-40-20240501.0",
    image_name="Fedora-Cloud-Base-40-20240501.0.x86_64.raw.xz",
    image_url="https://kojipkgs.fedoraproject.org/compose/x/Fedora-Cloud-Base.raw.xz",
    architecture="x86_64", region="us-east-1", ami_id="{ami}",
    subvariant="Cloud_Base", release="40",
)
regions = {{"us-east-1": "{ami}", "eu-west-1": "{copy}"}}
emitter = m.Emitter(m.amqp_publisher(timeout=60))
emitter.emit(m.IMAGE_UPLOAD, m.image_event(image, "completed"))
emitter.emit(m.IMAGE_RELEASE, m.release_event(image, regions))
assert m.announce_aws_published(emitter, image, "Fedora-Cloud-Base-40-hvm-gp3", regions, True)
"""


def test_fedimg_publishes_through_fedora_messaging_and_a_consumer_decodes_each_class(
    rabbitmq: RabbitMQ, tmp_path: Path
) -> None:
    queue = "it-roundtrip"
    keys = [f"{PREFIX}.fedimg.#", f"{PREFIX}.fedora_image_uploader.#"]
    conf = client_config(rabbitmq, tmp_path / "roundtrip.toml", queue, keys)
    out = tmp_path / "roundtrip.jsonl"
    consumer = start_consumer(conf, out, tmp_path)
    try:
        wait_consuming(rabbitmq, queue, consumer)
        code = PUBLISH_WITH_FEDIMG.format(ami=AMI, copy=COPY)
        subprocess.run(
            [sys.executable, "-c", code],
            env=child_env(FEDORA_MESSAGING_CONF=str(conf)),
            check=True,
            timeout=WAIT,
        )
        got = wait_recorded(out, 3, consumer)
    finally:
        consumer.stop()
    assert [type(msg) for msg in got] == [ImageUploadV1, ImageReleaseV1, AwsPublishedV1]
    assert [msg.topic for msg in got] == [
        f"{PREFIX}.fedimg.image.upload",
        f"{PREFIX}.fedimg.image.release",
        f"{PREFIX}.fedora_image_uploader.published.v1.aws.Cloud_Base.40.x86_64",
    ]
    assert got[0].body["status"] == "completed"
    assert got[1].body["regions"] == {"eu-west-1": COPY, "us-east-1": AMI}
    assert got[2].body["release"] == 40
    assert got[2].body["image_name"] == "Fedora-Cloud-Base-40-hvm-gp3"
    for msg in got:
        msg.validate()
        assert msg.queue == queue


def test_amqp_publisher_works_inside_a_fedora_messaging_consumer(
    rabbitmq: RabbitMQ, tmp_path: Path
) -> None:
    forwarded = f"{PREFIX}.fedimg_tests.forwarded"
    rabbitmq.declare_queue("it-forwarded", [forwarded])
    conf = client_config(
        rabbitmq,
        tmp_path / "forward.toml",
        "it-forward",
        [f"{PREFIX}.fedimg.hub.ping"],
        callback="tests.fm_recorder:Forward",
    )
    consumer = ManagedProcess(
        name="fm-forward",
        argv=[FM, "--conf", str(conf), "consume"],
        cwd=tmp_path,
        env=child_env(FM_FORWARD_TO="fedimg_tests.forwarded"),
        log_path=tmp_path / "forward.log",
    ).start()
    try:
        wait_consuming(rabbitmq, "it-forward", consumer)
        fm_publish(conf, [HubPingV1(body={"token": "one"}), HubPingV1(body={"token": "two"})])
        wait_until(
            lambda: (queue_state(rabbitmq, "it-forwarded") or (0, 0))[0] == 2,
            WAIT,
            "two forwarded messages",
            interval=0.2,
        )
        assert queue_state(rabbitmq, "it-forward") == (0, 1)  # both acked: callbacks returned
    finally:
        consumer.stop()
    got = [take(rabbitmq, "it-forwarded")[0] for _ in range(2)]
    assert [msg.topic for msg in got] == [forwarded, forwarded]
    assert [msg.body["token"] for msg in got] == ["one", "two"]


SAMPLE_TOPICS = {
    # sample: (its queue, the topics bound to it, topics that must not reach it)
    "fedimg.toml": (
        "fedimg",
        [
            "pungi.compose.status.change",
            "resultsdb.result.new",
            "taskotron.result.new",
            "waiverdb.waiver.new",
            "fedimg.hub.ping",
        ],
        ["fedimg.image.upload", "fedimg.image.test", "autocloud.ami.success"],
    ),
    "autocloud_ami.toml": (
        "autocloud_ami",
        ["fedimg.image.test"],
        ["fedimg.image.upload", "fedimg.hub.ping", "resultsdb.result.new"],
    ),
}


@pytest.mark.parametrize("sample", sorted(SAMPLE_TOPICS))
def test_a_sample_config_binds_exactly_its_topics_and_serves_liveness(
    rabbitmq: RabbitMQ, tmp_path: Path, sample: str
) -> None:
    queue, bound, unbound = SAMPLE_TOPICS[sample]
    with (ROOT / "fedora-messaging" / sample).open("rb") as fh:
        config = tomllib.load(fh)
    health = free_port()
    config.update(
        callback="tests.fm_recorder:Record",  # records what the bindings route (real ones below)
        monitoring={"address": "127.0.0.1", "port": health},
    )
    conf = write_client_config(tmp_path / sample, rabbitmq.url, config)
    out = tmp_path / f"{queue}.jsonl"
    consumer = start_consumer(conf, out, tmp_path)
    try:
        wait_consuming(rabbitmq, queue, consumer)
        assert requests.get(f"http://127.0.0.1:{health}/live", timeout=10).ok
        ready = requests.get(f"http://127.0.0.1:{health}/ready", timeout=10)
        assert ready.ok, ready.text
        # Unbound first: if any of them were routed to the queue, it would be
        # recorded among the first len(bound) messages.
        publisher = write_client_config(
            tmp_path / "publisher.toml", rabbitmq.url, {"topic_prefix": ""}
        )
        strays = [f"{PREFIX}.{t}" for t in unbound]
        strays += [f"org.fedoraproject.prod.{t}" for t in bound]  # another environment
        fm_publish(publisher, [base_message(t, {"stray": True}) for t in strays])
        fm_publish(
            publisher, [base_message(f"{PREFIX}.{t}", {"n": i}) for i, t in enumerate(bound)]
        )
        got = wait_recorded(out, len(bound), consumer)
    finally:
        consumer.stop()
    assert [msg.topic for msg in got] == [f"{PREFIX}.{t}" for t in bound]
    assert queue_state(rabbitmq, queue) == (0, 0)


def test_passive_declares_stop_a_consumer_whose_queue_infra_did_not_create(
    rabbitmq: RabbitMQ, tmp_path: Path
) -> None:
    with (ROOT / "fedora-messaging" / "fedimg.toml").open("rb") as fh:
        config = tomllib.load(fh)
    config.update(
        passive_declares=True,
        callback="tests.fm_recorder:Record",
        queues={"it-not-created": config["queues"]["fedimg"]},
        bindings=[{**config["bindings"][0], "queue": "it-not-created"}],
        monitoring={},
    )
    conf = write_client_config(tmp_path / "passive.toml", rabbitmq.url, config)
    done = subprocess.run(
        [FM, "--conf", str(conf), "consume"],
        check=False,
        env=child_env(FM_RECORD_TO=str(tmp_path / "never.jsonl")),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode != 0
    assert queue_state(rabbitmq, "it-not-created") is None  # checked, never created
    # Once infrastructure has created it, the same config consumes.
    rabbitmq.declare_queue("it-not-created", config["bindings"][0]["routing_keys"])
    consumer = start_consumer(conf, tmp_path / "passive.jsonl", tmp_path)
    try:
        wait_consuming(rabbitmq, "it-not-created", consumer)
    finally:
        consumer.stop()


# -- a broker restart ---------------------------------------------------------------------------


def test_a_restart_keeps_durable_queues_and_persistent_messages_and_consumers_come_back(
    rabbitmq: RabbitMQ, tmp_path: Path
) -> None:
    live_key = f"{PREFIX}.fedimg.hub.ping"
    parked_key = f"{PREFIX}.fedimg.image.test"
    rabbitmq.declare_queue("it-parked", [parked_key])  # nobody consumes it across the restart
    conf = client_config(rabbitmq, tmp_path / "live.toml", "it-live", [live_key])
    out = tmp_path / "live.jsonl"
    consumer = start_consumer(conf, out, tmp_path)
    parked = ImageTestV1(
        topic="fedimg.image.test",
        body={
            "image_name": "Fedora-Cloud-Base-40-20240501.0.x86_64.raw.xz",
            "destination": "us-east-1",
            "service": "EC2",
            "status": "started",
            "compose": "Fedora-Cloud-40-20240501.0",
            "architecture": "x86_64",
            "extra": {"id": AMI, "virt_type": "hvm", "vol_type": "gp3"},
        },
    )
    try:
        wait_consuming(rabbitmq, "it-live", consumer)
        fm_publish(conf, [HubPingV1(body={"token": "before"}), parked])
        wait_recorded(out, 1, consumer)
        assert queue_state(rabbitmq, "it-parked") == (1, 0)

        rabbitmq.restart()

        assert queue_state(rabbitmq, "it-parked") == (1, 0)  # durable queue, persistent message
        fm_publish(conf, [HubPingV1(body={"token": "after"})])
        got = wait_recorded(out, 2, consumer)  # the consumer reconnected by itself
    finally:
        consumer.stop()
    assert [msg.body["token"] for msg in got] == ["before", "after"]
    # The parked message is the one published before the restart, intact.
    again = take(rabbitmq, "it-parked")[0]
    assert type(again) is ImageTestV1
    assert (again.id, again.body, again.topic) == (parked.id, parked.body, parked_key)
    assert len(rabbitmq.starts) >= 2


# -- the ResultsDB stand-in over AMQP ------------------------------------------------------------


def test_resultsdb_standin_publishes_result_new_over_amqp_like_the_real_server(
    rabbitmq: RabbitMQ, tmp_path: Path
) -> None:
    key = f"{PREFIX}.resultsdb.result.new"
    rabbitmq.declare_queue("it-resultsdb", [key])
    conf = write_client_config(
        tmp_path / "resultsdb.toml",
        rabbitmq.url,
        {"topic_prefix": PREFIX, "client_properties": {"app": "resultsdb-standin"}},
    )
    port = free_port()
    standin = ManagedProcess(
        name="resultsdb",
        argv=[
            sys.executable,
            "-m",
            "devel.resultsdb",
            "--port",
            str(port),
            "--no-bus",
            "--amqp-conf",
            str(conf),
        ],
        cwd=ROOT,
        env=child_env(),
        log_path=tmp_path / "resultsdb.log",
    ).start()
    url = f"http://127.0.0.1:{port}/api/v2.0"
    try:

        def healthy() -> bool:
            assert standin.alive, standin.output()[-3000:]
            try:
                return requests.get(f"{url}/healthcheck", timeout=2).ok
            except requests.RequestException:
                return False

        wait_until(healthy, WAIT, "the ResultsDB stand-in", interval=0.2)
        api = ResultsDBapi(url, max_retries=2, backoff_factor=0)
        created = api.create_result(
            "PASSED", "autocloud.ami.all", item=AMI, type="ami", region="us-east-1"
        )
        wait_until(
            lambda: (queue_state(rabbitmq, "it-resultsdb") or (0, 0))[0] == 1,
            WAIT,
            "resultsdb.result.new in it-resultsdb",
            interval=0.2,
        )
    finally:
        standin.stop()
    got, body = take(rabbitmq, "it-resultsdb")
    assert type(got) is fm.Message  # the real server sends the base class
    assert got._headers["fedora_messaging_schema"] == "base.message"
    assert got.topic == key
    assert got.body == created == json.loads(body)
    notice = parse_result_notice(RESULT_NEW, got.body)
    assert (notice.item, notice.testcase, notice.outcome) == (AMI, "autocloud.ami.all", "PASSED")


# -- the samples, as shipped, with the real callbacks ----------------------------------------------


def sample_consumer(
    rabbitmq: RabbitMQ, tmp_path: Path, sample: str, **change: Any
) -> tuple[ManagedProcess, int]:
    """``fedora-messaging --conf <sample> consume`` with only the broker URL (and credentials)
    changed, and a free monitoring port (the sample's is fixed; one per process on a host)."""
    with (ROOT / "fedora-messaging" / sample).open("rb") as fh:
        shipped = tomllib.load(fh)
    # Earlier tests on this node may have left messages in the sample's durable queue.
    for queue in shipped["queues"]:
        if queue_state(rabbitmq, queue) is not None:
            with rabbitmq.connection() as conn:
                conn.channel().queue_purge(queue)
    port = free_port()
    config = {**shipped, "monitoring": {**shipped["monitoring"], "port": port}, **change}
    conf = write_client_config(tmp_path / sample, rabbitmq.url, config)
    with conf.open("rb") as fh:
        written = tomllib.load(fh)
    differs = {k for k in {*written, *shipped} if written.get(k) != shipped.get(k)}
    assert differs == {"amqp_url", "monitoring", *change}
    consumer = ManagedProcess(
        name=sample,
        argv=[FM, "--conf", str(conf), "consume"],
        cwd=tmp_path,
        # No AWS beyond loopback: the start-up passes find nothing listening there.
        env=child_env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}"),
        log_path=tmp_path / f"{sample}.log",
    ).start()
    return consumer, port


def consumed(port: int) -> dict[str, int]:
    answer = requests.get(f"http://127.0.0.1:{port}/ready", timeout=10)
    return dict(answer.json()["consumed"]) if answer.ok else {}


def test_the_fedimg_sample_runs_fedimg_with_only_the_url_changed(
    rabbitmq: RabbitMQ, tmp_path: Path
) -> None:
    rabbitmq.declare_queue("it-pongs", [f"{PREFIX}.fedimg.hub.pong"])
    consumer, port = sample_consumer(rabbitmq, tmp_path, "fedimg.toml")
    try:
        wait_consuming(rabbitmq, "fedimg", consumer)
        assert (tmp_path / ".fedimg-state").is_dir()  # the sample's state_dir, checked at start
        publisher = write_client_config(tmp_path / "pub.toml", rabbitmq.url, {"topic_prefix": ""})
        malformed = base_message(f"{PREFIX}.pungi.compose.status.change", {"compose_id": 3})
        fm_publish(
            publisher,
            [malformed, HubPingV1(topic=f"{PREFIX}.fedimg.hub.ping", body={"token": "t1"})],
        )
        wait_until(
            lambda: (queue_state(rabbitmq, "it-pongs") or (0, 0))[0] == 1,
            WAIT,
            "fedimg's pong",
            interval=0.2,
        )
        counts = consumed(port)
    finally:
        consumer.stop()
    pong = take(rabbitmq, "it-pongs")[0]
    assert pong.body["token"] == "t1"
    assert set(pong.body["components"]) >= {"fedimg_stage", "fedimg_promote", "fedimg_reconcile"}
    assert (counts["received"], counts["dropped"], counts["processed"]) == (2, 1, 1)


def test_the_autocloud_sample_runs_autocloud_ami_with_only_the_url_changed(
    rabbitmq: RabbitMQ, tmp_path: Path
) -> None:
    consumer, port = sample_consumer(rabbitmq, tmp_path, "autocloud_ami.toml")
    try:
        wait_consuming(rabbitmq, "autocloud_ami", consumer)
        publisher = write_client_config(tmp_path / "pub.toml", rabbitmq.url, {"topic_prefix": ""})
        verdict = {  # the gate's verdict on the same topic: acked, no test
            "image_name": "Fedora-Cloud-Base-40-20240501.0.x86_64.raw.xz",
            "destination": "us-east-1",
            "service": "EC2",
            "status": "completed",
            "compose": "Fedora-Cloud-40-20240501.0",
            "architecture": "x86_64",
            "extra": {"id": AMI, "virt_type": "hvm", "vol_type": "gp3"},
        }
        topic = f"{PREFIX}.fedimg.image.test"
        fm_publish(
            publisher,
            [ImageTestV1(topic=topic, body=verdict), base_message(topic, {"status": "started"})],
        )
        wait_until(lambda: consumed(port).get("received") == 2, WAIT, "two deliveries", 0.2)
        wait_until(
            lambda: consumed(port)["processed"] + consumed(port)["dropped"] == 2,
            WAIT,
            "both handled",
            0.2,
        )
        counts = consumed(port)
    finally:
        consumer.stop()
    assert (counts["processed"], counts["dropped"]) == (1, 1)


def test_a_sample_with_a_misspelt_setting_stops_naming_it(
    rabbitmq: RabbitMQ, tmp_path: Path
) -> None:
    with (ROOT / "fedora-messaging" / "fedimg.toml").open("rb") as fh:
        settings = tomllib.load(fh)["consumer_config"]
    bad = {**settings, "fedimg.stage.enabeld": True}
    consumer, _ = sample_consumer(rabbitmq, tmp_path, "fedimg.toml", consumer_config=bad)
    assert consumer.proc is not None
    code = consumer.proc.wait(timeout=WAIT)
    consumer.stop()
    assert code != 0
    assert "fedimg.stage.enabeld" in consumer.output()
