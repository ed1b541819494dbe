"""A fedora-messaging callback for the integration tests (not part of fedimg).

Run as ``fedora-messaging --conf FILE consume`` with
``callback = "tests.fm_recorder:Record"`` (and this repository on
``PYTHONPATH``): every message received is appended to the file named by
``$FM_RECORD_TO``, serialized by fedora-messaging itself (``message.dumps``),
one flushed line per message, before the message is acknowledged.
"""

from __future__ import annotations

import os

from fedora_messaging import message


class Record:
    def __init__(self) -> None:
        self.path = os.environ["FM_RECORD_TO"]

    def __call__(self, msg: message.Message) -> None:
        line = message.dumps(msg)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
