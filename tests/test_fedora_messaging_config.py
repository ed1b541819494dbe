"""The fedora-messaging sample configs and the ``[consumer_config]`` loader.

The samples are what fedora-messaging itself accepts, bind exactly the topics
each app needs, and carry the same settings as ``fedmsg.d/`` (same keys, same
values); ``load_consumer_config`` refuses unknown, missing and mistyped keys
naming the key, as the fedmsg path does.
"""

from __future__ import annotations

import dataclasses
import re
import runpy
import tomllib
from pathlib import Path
from typing import Any

import pytest
from fedora_messaging.config import LazyConfig

from autocloud_ami.config import AutocloudConfig
from fedimg.config import FedimgConfig
from fedimg.settings import ConfigError, flatten_keys, keys_of, load_consumer_config

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "fedora-messaging"
PREFIX = "org.fedoraproject.dev"


def sample(name: str) -> dict[str, Any]:
    with (SAMPLES / name).open("rb") as fh:
        return tomllib.load(fh)


def fedmsg_d(name: str) -> dict[str, Any]:
    return dict(runpy.run_path(str(ROOT / "fedmsg.d" / name))["config"])


FEDIMG = {"fedimg.resultsdb_url": "http://127.0.0.1:5001/api/v2.0"}


# -- the samples ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "queue", "topics"),
    [
        (
            "fedimg.toml",
            "fedimg",
            [
                "pungi.compose.status.change",
                "resultsdb.result.new",
                "taskotron.result.new",
                "waiverdb.waiver.new",
                "fedimg.hub.ping",
            ],
        ),
        ("autocloud_ami.toml", "autocloud_ami", ["fedimg.image.test"]),
    ],
)
def test_sample_is_a_valid_fedora_messaging_config_with_one_durable_queue(
    name: str, queue: str, topics: list[str]
) -> None:
    conf = LazyConfig().load_config(str(SAMPLES / name))  # fedora-messaging's own checks
    assert conf["queues"] == {
        queue: {"durable": True, "auto_delete": False, "exclusive": False, "arguments": {}}
    }
    assert conf["bindings"] == [
        {
            "queue": queue,
            "exchange": "amq.topic",
            "routing_keys": [f"{PREFIX}.{t}" for t in topics],
        }
    ]
    assert conf["topic_prefix"] == PREFIX
    assert conf["qos"]["prefetch_count"] == 1
    assert conf["passive_declares"] is False
    assert conf["client_properties"]["app"] == queue
    assert re.fullmatch(r"[a-z_]+(\.[a-z_]+)*:[A-Za-z]+", conf["callback"])
    assert conf["monitoring"]["port"] > 0
    assert conf["amqp_url"].startswith("amqp://")


def test_samples_monitor_on_different_ports() -> None:
    ports = {sample(n)["monitoring"]["port"] for n in ("fedimg.toml", "autocloud_ami.toml")}
    assert len(ports) == 2


def test_fedimg_sample_holds_the_same_settings_as_fedmsg_d() -> None:
    consumer_config = sample("fedimg.toml")["consumer_config"]
    dev = fedmsg_d("fedimg.py")
    assert set(consumer_config) == {k for k in dev if k.startswith("fedimg.")}
    assert set(consumer_config) == set(keys_of(FedimgConfig))
    assert FedimgConfig.from_consumer_config(consumer_config) == FedimgConfig.from_fedmsg(dev)


def test_autocloud_sample_holds_the_same_settings_as_fedmsg_d() -> None:
    consumer_config = sample("autocloud_ami.toml")["consumer_config"]
    dev = fedmsg_d("autocloud_ami.py")
    # TOML has no null: exactly the settings whose value is None are left out.
    assert {k for k, v in dev.items() if k.startswith("autocloud_ami.") and v is not None} == set(
        consumer_config
    )
    from_fedmsg = AutocloudConfig.from_fedmsg(dev)
    # The consumer config runs autocloud_ami; the shared fedmsg.d leaves the choice to the hub.
    assert AutocloudConfig.from_consumer_config(consumer_config) == dataclasses.replace(
        from_fedmsg, enabled=True
    )


# -- the loader ------------------------------------------------------------------------------


def test_tables_and_quoted_keys_read_the_same() -> None:
    quoted = tomllib.loads(
        '"fedimg.resultsdb_url" = "http://rdb.example.org/api/v2.0"\n'
        '"fedimg.aws.regions" = ["eu-west-1"]\n'
        '"fedimg.stage.enabled" = true\n'
    )
    tables = tomllib.loads(
        'fedimg.resultsdb_url = "http://rdb.example.org/api/v2.0"\n'
        "[fedimg.aws]\n"
        'regions = ["eu-west-1"]\n'
        "[fedimg.stage]\n"
        "enabled = true\n"
    )
    assert FedimgConfig.from_consumer_config(quoted) == FedimgConfig.from_consumer_config(tables)
    assert FedimgConfig.from_consumer_config(tables).regions == ["eu-west-1"]


def test_a_mapping_setting_keeps_its_table() -> None:
    raw = tomllib.loads(
        '"autocloud_ami.resultsdb_url" = "http://rdb/api/v2.0"\n'
        '"autocloud_ami.ssh_cidr" = "192.0.2.1/32"\n'
        "[autocloud_ami.instance_types]\n"
        'x86_64 = "t3.large"\n'
    )
    cfg = AutocloudConfig.from_consumer_config(raw)
    assert cfg.instance_types == {"x86_64": "t3.large"}


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        # unknown (misspelt) keys, quoted or as tables
        ('"fedimg.stage.enabeld" = true', "fedimg.stage.enabeld"),
        ("[fedimg.stage]\nenabeld = true", "fedimg.stage.enabeld"),
        ("[fedimg.stages]", "fedimg.stages"),
        # keys of another namespace, or none: this table is fedimg's alone
        ('"fedmig.stage.enabled" = true', "fedmig.stage.enabled"),
        ('"autocloud_ami.enabled" = true', "autocloud_ami.enabled"),
        ("print_messages = true", "print_messages"),
        # mistyped
        ('"fedimg.stage.enabled" = "yes"', "fedimg.stage.enabled"),
        ('"fedimg.aws.upload_workers" = 16.5', "fedimg.aws.upload_workers"),
        ('"fedimg.aws.upload_workers" = true', "fedimg.aws.upload_workers"),
        ('"fedimg.aws.regions" = "eu-west-1"', "fedimg.aws.regions"),
        ('"fedimg.aws.regions" = [1]', "fedimg.aws.regions[0]"),
        ('"fedimg.http.timeout" = "60"', "fedimg.http.timeout"),
        # well typed, but not a runnable setup
        ('"fedimg.aws.staging_region" = "mars"', "mars"),
        # one key given twice
        ('"fedimg.stage.enabled" = true\n[fedimg.stage]\nenabled = false', "fedimg.stage.enabled"),
    ],
)
def test_bad_consumer_config_stops_naming_the_key(toml: str, key: str) -> None:
    raw = {**FEDIMG, **tomllib.loads(toml)}
    with pytest.raises(ConfigError, match=re.escape(key)):
        FedimgConfig.from_consumer_config(raw)


def test_a_missing_required_key_is_named() -> None:
    with pytest.raises(ConfigError, match=re.escape("fedimg.resultsdb_url")):
        FedimgConfig.from_consumer_config({"fedimg.stage.enabled": True})
    with pytest.raises(ConfigError, match=re.escape("autocloud_ami.ssh_cidr")):
        AutocloudConfig.from_consumer_config({"autocloud_ami.resultsdb_url": "http://r/api"})


@pytest.mark.parametrize("raw", [None, [], "fedimg.stage.enabled = true", 3])
def test_a_consumer_config_that_is_not_a_table_is_refused(raw: Any) -> None:
    with pytest.raises(ConfigError, match="consumer_config"):
        load_consumer_config(FedimgConfig, raw, "fedimg")


def test_an_empty_consumer_config_needs_the_required_keys() -> None:
    with pytest.raises(ConfigError, match=re.escape("fedimg.resultsdb_url")):
        FedimgConfig.from_consumer_config({})
    assert FedimgConfig.from_consumer_config(FEDIMG).stage_enabled is False


def test_flatten_keys_stops_at_known_keys_and_names_duplicates() -> None:
    known = {"a.b", "a.map"}
    assert flatten_keys({"a": {"b": 1, "map": {"x": {"y": 2}}, "c": {"d": 3}}}, known) == {
        "a.b": 1,
        "a.map": {"x": {"y": 2}},
        "a.c.d": 3,
    }
    assert flatten_keys({"a": {}}, known) == {"a": {}}
    with pytest.raises(ConfigError, match=re.escape("a.b")):
        flatten_keys({"a.b": 1, "a": {"b": 2}}, known)
