"""The loopback bus and a real fedmsg-hub loading fedimg's consumers by entry point."""

from __future__ import annotations

import pytest

from devel.bus import LocalBus

pytestmark = pytest.mark.integration


def test_hub_answers_ping_through_relay(local_bus: LocalBus) -> None:
    hub = local_bus.start_hub()
    assert hub.alive and local_bus.tap is not None
    pongs = local_bus.tap.messages("fedimg.hub.pong")
    assert pongs, "the hub answered no ping"
    assert pongs[0].topic == "org.fedoraproject.dev.fedimg.hub.pong"
    assert pongs[0].body["host"]


def test_malformed_ping_is_logged_and_hub_survives(local_bus: LocalBus) -> None:
    hub = local_bus.start_hub()
    local_bus.publish("fedimg", "hub.ping", {"token": ["not", "a", "string"]})
    local_bus.publish("fedimg", "hub.ping", {"nothing": 1})
    # The hub still answers a good ping after the bad ones.
    local_bus.wait_hub(hub, timeout=30)
    assert "rejected malformed message" in hub.output()
