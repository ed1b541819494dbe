"""Messages that reach a fedmsg hub through the AMQP-to-ZeroMQ bridge keep working.

Today's ResultsDB and pungi publish only through fedora-messaging; a fedmsg
hub hears them only through fedmsg-migration-tools' ``amqp_to_zmq`` bridge
(``AmqpToZmq``, the fedora-messaging consumer Fedora ran during the
migration). It republishes each AMQP message on ZeroMQ wrapped in the
envelope fedmsg consumers expect, with its own marks: ``username:
"amqp-bridge"``, an INTEGER ``timestamp`` (``int(time.time())``), ``msg_id``
``"<year>-<AMQP message id>"``, a per-bridge counter ``i``, the AMQP topic
unchanged and no ``crypto`` field (unless the bridge signs). The consumers
are driven exactly as the hub drives them (``FedmsgConsumer._consume`` in
moksha's blocking mode, with fedmsg's status file on: the backlog's resume
point is written from the bridge's integer timestamp).
"""

from __future__ import annotations

import datetime
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from fedimg.backlog import stamp_of
from fedimg.consumers import PromoteConsumer, StageConsumer
from tests.test_signatures import ENV, PREFIX, FakeHub, hub_config

AMI = "ami-0123456789abcdef0"
COMPOSE_TOPIC = f"{PREFIX}.{ENV}.pungi.compose.status.change"
RESULT_TOPIC = f"{PREFIX}.{ENV}.resultsdb.result.new"
COMPOSE = {
    "status": "FINISHED",
    "compose_id": "Fedora-41-20261124.0",
    "location": "https://kojipkgs.fedoraproject.org/compose/41/Fedora-41-20261124.0/compose",
    "release_version": "41",
}
RESULT = {  # what the real ResultsDB publishes: the result as its API returns it
    "id": 4242,
    "testcase": {"name": "autocloud.ami.all", "ref_url": None, "href": "https://r/api/v2.0/x"},
    "outcome": "PASSED",
    "data": {"item": [AMI], "type": ["ami"], "region": ["us-east-1"]},
    "groups": [],
    "note": "19 passed",
    "ref_url": None,
    "submit_time": "2026-11-24T10:00:00.000000",
    "href": "https://resultsdb.fedoraproject.org/api/v2.0/results/4242",
}


def bridged(topic: str, body: dict[str, Any], counter: int = 1) -> dict[str, Any]:
    """A message as the bridge publishes it, as the hub hands it to a consumer."""
    envelope = {
        "topic": topic,
        "msg": body,
        "timestamp": 1764000000,  # int(time.time()) in the bridge
        "msg_id": f"{datetime.datetime.now(datetime.UTC).year}-{uuid.uuid4()}",
        "i": counter,
        "username": "amqp-bridge",
    }
    return {"topic": topic, "body": json.loads(json.dumps(envelope))}


class Recording:
    """The engine seam: what the consumers ask for, recorded."""

    def __init__(self) -> None:
        self.composes: list[Any] = []
        self.results: list[Any] = []

    def accept_compose(self, status: Any) -> list[Any]:
        self.composes.append(status)
        return []

    def on_result(self, notice: Any) -> None:
        self.results.append(notice)


def consumer(cls: type, tmp_path: Path, **settings: Any) -> Any:
    config = hub_config(
        False,
        # fedmsg's backlog: a status file per consumer (datagrepper is never asked: no file yet)
        status_directory=str(tmp_path / "status"),
        datagrepper_url="http://127.0.0.1:9/raw",
        **{"fedimg.promote.enabled": True, **settings},
    )
    made = cls(FakeHub(config))
    made.lifecycle.close()
    made.lifecycle = Recording()
    return made


def test_a_bridged_compose_message_is_staged(tmp_path: Path) -> None:
    stage = consumer(StageConsumer, tmp_path)
    message = bridged(COMPOSE_TOPIC, COMPOSE)
    assert stage._consume(message) is True  # handled (moksha's blocking mode)
    [status] = stage.lifecycle.composes
    assert (status.compose_id, status.location) == (COMPOSE["compose_id"], COMPOSE["location"])


def test_a_bridged_resultsdb_message_reaches_the_gate(tmp_path: Path) -> None:
    promote = consumer(PromoteConsumer, tmp_path)
    assert promote._consume(bridged(RESULT_TOPIC, RESULT)) is True
    [notice] = promote.lifecycle.results
    assert (notice.item, notice.testcase, notice.outcome) == (AMI, "autocloud.ami.all", "PASSED")


def test_the_backlog_resume_point_is_kept_from_the_bridge_s_integer_timestamp(
    tmp_path: Path,
) -> None:
    promote = consumer(PromoteConsumer, tmp_path)
    message = bridged(RESULT_TOPIC, RESULT, counter=7)
    stamp = stamp_of(message)
    assert stamp is not None and stamp.timestamp == 1764000000.0
    promote._consume(message)
    status = json.loads(Path(promote.status_filename).read_text())
    recorded = status["message"]["body"]
    assert (recorded["msg_id"], recorded["timestamp"]) == (message["body"]["msg_id"], 1764000000)


@pytest.mark.parametrize(
    "body",
    [
        {**RESULT, "data": {"item": AMI}},  # not the v2.0 shape
        {"task": {"item": AMI}},
    ],
)
def test_a_bridged_message_that_breaks_the_contract_is_refused(
    tmp_path: Path, body: dict[str, Any]
) -> None:
    promote = consumer(PromoteConsumer, tmp_path)
    promote._consume(bridged(RESULT_TOPIC, body))
    assert promote.lifecycle.results == []
