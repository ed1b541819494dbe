"""Settings are read once from the fedmsg config and fail loudly."""

from __future__ import annotations

from typing import Any

import pytest

from fedimg.config import FedimgConfig
from fedimg.settings import ConfigError

BASE = {"fedimg.resultsdb_url": "http://127.0.0.1:5001/api/v2.0", "topic_prefix": "org.x"}


def test_defaults() -> None:
    cfg = FedimgConfig.from_fedmsg(BASE)
    assert cfg.staging_region == "us-east-1"
    assert cfg.regions == []
    assert cfg.volume_types == ["gp3"]
    assert cfg.required_testcases == ["autocloud.ami.all"]
    assert cfg.delete_rejected is False
    assert cfg.copy_concurrency == 25
    assert cfg.max_images == 50
    assert cfg.max_volume_gib == 32
    assert cfg.xz_blocks_in_flight == 4


def test_defaults_are_not_shared_between_instances() -> None:
    one = FedimgConfig.from_fedmsg(BASE)
    one.regions.append("eu-west-1")
    assert FedimgConfig.from_fedmsg(BASE).regions == []


def test_values_are_read_and_typed() -> None:
    cfg = FedimgConfig.from_fedmsg(
        {
            **BASE,
            "fedimg.aws.staging_region": "eu-west-1",
            "fedimg.aws.regions": ["us-west-2", "ap-south-1"],
            "fedimg.aws.volume_types": ["gp3", "gp2"],
            "fedimg.http.timeout": 5,
        }
    )
    assert cfg.staging_region == "eu-west-1"
    assert cfg.regions == ["us-west-2", "ap-south-1"]
    assert cfg.http_timeout == 5.0
    assert isinstance(cfg.http_timeout, float)


@pytest.mark.parametrize(
    "extra",
    [
        {"fedimg.aws.staging_regoin": "us-east-1"},  # typo: unknown key
        {"fedimg.aws.regions": "us-east-1"},  # not a list
        {"fedimg.aws.regions": ["us-east-1", 5]},
        {"fedimg.aws.staging_region": "moon-1"},
        {"fedimg.aws.volume_types": []},
        {"fedimg.aws.volume_types": ["ssd"]},
        {"fedimg.compose.arches": ["ppc64le"]},
        {"fedimg.stage.workers": 0},
        {"fedimg.stage.workers": True},
        {"fedimg.download.xz_blocks_in_flight": 0},
        {"fedimg.download.xz_blocks_in_flight": "4"},
        {"fedimg.gate.delete_rejected": "yes"},
        {"fedimg.resultsdb_url": "file:///tmp/db"},
        {"fedimg.gate.required_testcases": []},
        {"fedimg.compose.max_images": 0},
        {"fedimg.compose.max_images": "50"},
        {"fedimg.stage.max_volume_gib": 0},
        {"fedimg.stage.max_volume_gib": 16385},  # more than EBS's largest volume
        {"fedimg.stage.max_volume_gib": 32.5},
    ],
)
def test_bad_settings_fail_loudly(extra: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        FedimgConfig.from_fedmsg({**BASE, **extra})


def test_missing_required_setting() -> None:
    with pytest.raises(ConfigError, match=r"fedimg\.resultsdb_url"):
        FedimgConfig.from_fedmsg({"topic_prefix": "org.x"})


def test_other_namespaces_are_not_fedimgs_business() -> None:
    cfg = FedimgConfig.from_fedmsg({**BASE, "autocloud_ami.whatever": 1, "fedimgx": 2})
    assert cfg.resultsdb_url == BASE["fedimg.resultsdb_url"]
