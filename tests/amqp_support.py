"""Helpers for the tests that drive fedora-messaging processes over a real RabbitMQ node."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pika.exceptions
from fedora_messaging import message as fm

from devel.bus import BIN
from devel.rabbitmq import RabbitMQ

ROOT = Path(__file__).resolve().parents[1]
FM = str(BIN / "fedora-messaging")
WAIT = 120.0  # processes start slowly on a loaded 2-core machine


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDORA_MESSAGING")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def queue_state(node: RabbitMQ, queue: str) -> tuple[int, int] | None:
    """``(ready messages, consumers)`` of ``queue``, or None while it does not exist."""
    try:
        with node.connection() as conn:
            frame: Any = conn.channel().queue_declare(queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return None
        raise
    return int(frame.method.message_count), int(frame.method.consumer_count)


def fm_publish(conf: Path, messages: list[fm.Message]) -> None:
    """Publish with the ``fedora-messaging publish`` CLI (``api.publish`` in its process)."""
    path = conf.with_suffix(f".{time.monotonic_ns()}.jsonl")
    path.write_text(fm.dumps(messages), encoding="utf-8")
    done = subprocess.run(
        [FM, "--conf", str(conf), "publish", str(path)],
        check=False,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
