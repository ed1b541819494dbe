"""autocloud_ami settings: defaults, every refusal names its key, nothing unsafe by default."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest

from autocloud_ami.config import AutocloudConfig, check_cidr, parse_host_port
from fedimg.settings import ConfigError

BASE: dict[str, Any] = {
    "autocloud_ami.resultsdb_url": "http://127.0.0.1:5001/api/v2.0",
    "autocloud_ami.ssh_cidr": "203.0.113.7/32",
}


def load(**extra: Any) -> AutocloudConfig:
    raw = dict(BASE)
    raw.update({f"autocloud_ami.{k}": v for k, v in extra.items()})
    return AutocloudConfig.from_fedmsg(raw)


def test_defaults() -> None:
    cfg = load()
    assert cfg.enabled is False
    assert cfg.instance_types is None  # not set: today's one scenario per architecture
    assert cfg.matrix == {"x86_64": ("t3.small",), "aarch64": ("t4g.small",)}
    assert cfg.ssh_user == "fedora"
    assert cfg.ssh_override is None and cfg.ssh_override_address is None
    assert cfg.subnet_id is None
    assert cfg.max_concurrent >= 1
    assert cfg.deadline >= cfg.boot_timeout
    assert cfg.output_dir is None and cfg.output_url is None


def test_unrelated_keys_are_ignored_and_typed_values_accepted() -> None:
    cfg = AutocloudConfig.from_fedmsg(
        {
            **BASE,
            "fedimg.stage.enabled": True,
            "topic_prefix": "org.fedoraproject",
            "autocloud_ami.deadline": 1200,  # int for a float setting
            "autocloud_ami.ssh_override": "127.0.0.1:2222",
            "autocloud_ami.regions": ["us-east-1", "eu-west-1"],
        }
    )
    assert cfg.deadline == 1200.0 and isinstance(cfg.deadline, float)
    assert cfg.ssh_override_address == ("127.0.0.1", 2222)
    assert cfg.regions == ["us-east-1", "eu-west-1"]


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"autocloud_ami.ssh_cidr": "203.0.113.7/32"}, "autocloud_ami.resultsdb_url"),
        ({"autocloud_ami.resultsdb_url": "http://x/api/v2.0"}, "autocloud_ami.ssh_cidr"),
        ({**BASE, "autocloud_ami.bogus": 1}, "autocloud_ami.bogus"),
        ({**BASE, "autocloud_ami.max_concurrent": "4"}, "autocloud_ami.max_concurrent"),
        ({**BASE, "autocloud_ami.enabled": "yes"}, "autocloud_ami.enabled"),
        ({**BASE, "autocloud_ami.regions": "us-east-1"}, "autocloud_ami.regions"),
        ({**BASE, "autocloud_ami.instance_types": ["t3.small"]}, "autocloud_ami.instance_types"),
        ({**BASE, "autocloud_ami.extra_tags": ["FedoraGroup"]}, "autocloud_ami.extra_tags"),
        ({**BASE, "autocloud_ami.extra_tags": {"FedoraGroup": 1}}, "autocloud_ami.extra_tags"),
        # The records the sweeper and the IAM policy rely on are never overridden.
        ({**BASE, "autocloud_ami.extra_tags": {"autocloud:job": "x"}}, "autocloud_ami.extra_tags"),
        ({**BASE, "autocloud_ami.extra_tags": {"Name": "x"}}, "autocloud_ami.extra_tags"),
        ({**BASE, "autocloud_ami.extra_tags": {"aws:x": "y"}}, "autocloud_ami.extra_tags"),
        ({**BASE, "autocloud_ami.extra_tags": {"": "y"}}, "autocloud_ami.extra_tags"),
        (
            {**BASE, "autocloud_ami.extra_tags": {f"k{i}": "v" for i in range(11)}},
            "autocloud_ami.extra_tags",
        ),
    ],
)
def test_missing_unknown_and_mistyped_keys_are_named(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        AutocloudConfig.from_fedmsg(raw)


@pytest.mark.parametrize(
    "cidr", ["0.0.0.0/0", "::/0", "10.0.0.0/8", "203.0.113.0/24", "2001:db8::/64"]
)
def test_ssh_cidr_must_be_one_host_by_default(cidr: str) -> None:
    with pytest.raises(ConfigError, match="ssh_cidr"):
        load(ssh_cidr=cidr)


def test_ssh_cidr_can_be_widened_explicitly_but_never_to_everything() -> None:
    assert load(ssh_cidr="203.0.113.0/24", ssh_cidr_allow_wide=True).ssh_cidr == "203.0.113.0/24"
    with pytest.raises(ConfigError, match="whole internet"):
        load(ssh_cidr="0.0.0.0/0", ssh_cidr_allow_wide=True)


@pytest.mark.parametrize("cidr", ["203.0.113.7", "not-a-cidr", "203.0.113.7/33", "10.0.0.1/8"])
def test_malformed_cidrs(cidr: str) -> None:
    if "/" not in cidr and cidr[0].isdigit():
        # A bare address is one host: accepted and normalised.
        assert check_cidr(cidr, False) == "203.0.113.7/32"
        return
    with pytest.raises(ValueError, match="ssh_cidr"):
        check_cidr(cidr, True)


def test_ipv6_single_host_is_fine() -> None:
    assert load(ssh_cidr="2001:db8::7/128").ssh_cidr == "2001:db8::7/128"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"resultsdb_url": "ftp://x/api"}, "resultsdb_url"),
        ({"regions": []}, "regions"),
        ({"regions": ["US-EAST-1"]}, "regions"),
        ({"instance_types": {"ppc64le": "x.large"}}, "instance_types"),
        ({"instance_types": {"x86_64": "small"}}, "instance_types"),
        ({"instance_types": {}}, "instance_types"),
        ({"scenarios": {}}, "scenarios"),
        ({"scenarios": {"x86_64": []}}, "scenarios"),
        ({"scenarios": {"ppc64le": ["x.large"]}}, "scenarios"),
        ({"scenarios": {"x86_64": ["t3.small", "t3.small"]}}, "listed twice"),
        ({"scenarios": {"x86_64": ["t3.small; rm"]}}, "scenarios"),
        ({"scenarios": {"x86_64": [f"t3.x{i}" for i in range(9)]}}, "more than 8"),
        ({"scenarios": {"x86_64": "t3.small"}}, "scenarios"),
        ({"ssh_override": "localhost"}, "host:port"),
        ({"ssh_override": "localhost:99999"}, "port"),
        ({"ssh_user": "fe dora"}, "ssh_user"),
        ({"output_url": "https://x/out"}, "output_dir"),
        ({"output_dir": "/tmp/o", "output_url": "file:///x"}, "output_url"),
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"deadline": 0}, "deadline"),
        ({"deadline": 100.0, "boot_timeout": 600.0}, "deadline"),
        ({"sweep_interval": -1}, "sweep_interval"),
        ({"host_key_wait": -1}, "host_key_wait"),
    ],
)
def test_invalid_values_are_refused(extra: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load(**extra)


@pytest.mark.parametrize(
    ("extra", "matrix"),
    [
        ({}, {"x86_64": ("t3.small",), "aarch64": ("t4g.small",)}),
        ({"instance_types": {"x86_64": "c5.large"}}, {"x86_64": ("c5.large",)}),
        (
            {"scenarios": {"x86_64": ["t3.small", "t2.small"], "aarch64": ["t4g.small"]}},
            {"x86_64": ("t3.small", "t2.small"), "aarch64": ("t4g.small",)},
        ),
        # Both set and saying the same thing: fine.
        (
            {"instance_types": {"x86_64": "t3.small"}, "scenarios": {"x86_64": ["t3.small"]}},
            {"x86_64": ("t3.small",)},
        ),
    ],
)
def test_the_scenario_matrix(extra: dict[str, Any], matrix: dict[str, tuple[str, ...]]) -> None:
    assert load(**extra).matrix == matrix


@pytest.mark.parametrize(
    "extra",
    [
        {"instance_types": {"x86_64": "t3.small"}, "scenarios": {"x86_64": ["t2.small"]}},
        {
            "instance_types": {"x86_64": "t3.small"},
            "scenarios": {"x86_64": ["t3.small", "t2.small"]},
        },
        {
            "instance_types": {"x86_64": "t3.small"},
            "scenarios": {"x86_64": ["t3.small"], "aarch64": ["t4g.small"]},
        },
    ],
)
def test_instance_types_and_scenarios_that_disagree_stop_the_start(extra: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as caught:
        load(**extra)
    assert "autocloud_ami.instance_types" in str(caught.value)
    assert "autocloud_ami.scenarios" in str(caught.value)


def test_parse_host_port() -> None:
    assert parse_host_port("127.0.0.1:22") == ("127.0.0.1", 22)
    assert parse_host_port("[::1]:2222") == ("::1", 2222)
    for bad in ("", ":22", "host:", "host:abc", "host:0"):
        with pytest.raises(ValueError):
            parse_host_port(bad)


def test_shipped_fedmsg_d_file_is_valid_and_documents_every_key() -> None:
    path = Path(__file__).resolve().parents[1] / "fedmsg.d" / "autocloud_ami.py"
    config = runpy.run_path(str(path))["config"]
    cfg = AutocloudConfig.from_fedmsg(config)
    assert cfg.enabled is False  # opt-in
    text = path.read_text()
    from fedimg.settings import keys_of

    for key in keys_of(AutocloudConfig):
        assert key in text, f"{key} is not documented in fedmsg.d/autocloud_ami.py"
