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
    assert pongs[0].body["healthy"] is True  # every enabled consumer of ours runs


def test_malformed_ping_is_logged_and_hub_survives(local_bus: LocalBus) -> None:
    hub = local_bus.start_hub()
    local_bus.publish("fedimg", "hub.ping", {"token": ["not", "a", "string"]})
    local_bus.publish("fedimg", "hub.ping", {"nothing": 1})
    # The hub still answers a good ping after the bad ones.
    local_bus.wait_hub(hub, timeout=30)
    assert "rejected malformed message" in hub.output()


def test_a_consumer_that_failed_to_start_makes_the_hub_unhealthy() -> None:
    from devel.bus import LocalBus

    settings = {
        "autocloud_ami.enabled": True,
        "autocloud_ami.resultsdb_url": "http://127.0.0.1:9/api/v2.0",
        "autocloud_ami.deadline": 10.0,  # shorter than the boot timeout: refused at start-up
        "autocloud_ami.boot_timeout": 60.0,
    }
    with LocalBus(settings=settings) as bus:
        hub = bus.start_hub()
        assert bus.tap is not None
        (pong, *_) = bus.tap.messages("fedimg.hub.pong")
        assert pong.body["healthy"] is False
        status = pong.body["components"]["autocloud_ami"]
        assert status.startswith("not running") and "ConfigError" in status
        assert pong.body["components"]["fedimg_health"] == "running"
        assert hub.alive
        # ERROR once in the hub's log, however often it is asked.
        bus.wait_hub(hub, timeout=30)
        assert hub.output().count("health: autocloud_ami: not running") == 1
