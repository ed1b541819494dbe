"""fedora-messaging callbacks for the integration tests (not part of fedimg).

Run as ``fedora-messaging --conf FILE consume`` with
``callback = "tests.fm_recorder:Record"`` (and this repository on
``PYTHONPATH``): every message received is appended to the file named by
``$FM_RECORD_TO``, serialized by fedora-messaging itself (``message.dumps``),
one flushed line per message, before the message is acknowledged.
``Forward`` republishes each body under ``$FM_FORWARD_TO`` with fedimg's
``amqp_publisher``: publishing from inside a consumer, as fedimg's will.
"""

from __future__ import annotations

import os

from fedora_messaging import message

from fedimg.messages import amqp_publisher


class Record:
    def __init__(self) -> None:
        self.path = os.environ["FM_RECORD_TO"]

    def __call__(self, msg: message.Message) -> None:
        line = message.dumps(msg)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)


class Forward:
    def __init__(self) -> None:
        self.modname, self.topic = os.environ["FM_FORWARD_TO"].split(".", 1)
        self.publish = amqp_publisher(timeout=60)

    def __call__(self, msg: message.Message) -> None:
        self.publish(self.modname, self.topic, dict(msg.body))
