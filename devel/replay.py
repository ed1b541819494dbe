"""A recorded message replayed onto RabbitMQ under this bus's topic: fedmsg-dg-replay for AMQP.

    python -m devel.replay MSG_ID --datagrepper-url URL --conf FILE

fetches message ``MSG_ID`` from datagrepper (``/id?id=``, the API
``fedmsg-dg-replay`` reads), and publishes its body with
``fedora_messaging.api.publish`` through the broker of the fedora-messaging
config ``FILE`` under the LOCAL topic: the recorded topic without its
``org.fedoraproject.<env>.`` words, behind ``FILE``'s ``topic_prefix`` (a
production pungi message reaches a dev consumer as
``org.fedoraproject.dev.pungi.compose.status.change``), as the class the
topic is sent as (``fedimg.messages.message_class``).

Why not fedora-messaging's own commands: ``fedora-messaging replay`` publishes
the message under its recorded (production) topic, which a development
queue is not bound to; ``fedora-messaging reconsume`` takes only UUID message
ids (datagrepper's fedmsg-era ids are ``<year>-<uuid>``), reads
datagrepper's ``/v2`` fedora-messaging format, and calls a callback in its
own process instead of handing the message to the running consumers, whose
topic check then drops a production topic as another environment's.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Final

import requests

log = logging.getLogger(__name__)

ENVIRONMENTS: Final = ("prod", "stg", "dev")


def local_topic(topic: str) -> str:
    """``org.fedoraproject.prod.pungi.compose.status.change`` -> ``pungi.compose.status.change``."""
    words = topic.split(".")
    if len(words) > 4 and words[:2] == ["org", "fedoraproject"] and words[2] in ENVIRONMENTS:
        return ".".join(words[3:])
    return topic


def fetch(datagrepper_url: str, msg_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """The message as datagrepper's ``/id`` returns it (``topic``, ``msg``, ...)."""
    answer = requests.get(f"{datagrepper_url}/id", params={"id": msg_id}, timeout=timeout)
    answer.raise_for_status()
    found = answer.json()
    if not isinstance(found, dict) or not isinstance(found.get("topic"), str):
        raise ValueError(f"datagrepper returned no message for {msg_id}")
    if not isinstance(found.get("msg"), dict):
        raise ValueError(f"message {msg_id} has no body object")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devel.replay", description=__doc__)
    parser.add_argument("msg_id")
    parser.add_argument("--datagrepper-url", required=True)
    parser.add_argument("--conf", type=Path, required=True, help="a fedora-messaging config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from fedora_messaging import config

    from fedimg.messages import amqp_publisher

    try:
        found = fetch(args.datagrepper_url, args.msg_id)
    except (requests.RequestException, ValueError) as exc:
        print(f"cannot fetch {args.msg_id}: {exc}", file=sys.stderr)
        return 1
    config.conf.load_config(config_path=str(args.conf))
    topic = local_topic(found["topic"])
    modname, _, name = topic.partition(".")
    amqp_publisher()(modname, name, found["msg"])
    prefix = config.conf["topic_prefix"]
    print(f"replayed {args.msg_id} ({found['topic']}) as {f'{prefix}.' if prefix else ''}{topic}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
