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
        {"fedimg.aws.extra_tags": {"FedoraGroup": 7}},
        {"fedimg.aws.extra_tags": {"fedimg:state": "released"}},  # fedimg's own record
        {"fedimg.aws.extra_tags": {"Name": "x"}},
        {"fedimg.aws.extra_tags": {"aws:cloudformation": "x"}},
        {"fedimg.aws.extra_tags": {"k": "v" * 257}},
        {"fedimg.aws.extra_tags": {f"k{i}": "v" for i in range(11)}},
        {"fedimg.promote.deprecation_days": {"weekly": 3}},
        {"fedimg.promote.deprecation_days": {"nightly": 0}},
        {"fedimg.promote.deprecation_days": {"nightly": "14"}},
        {"fedimg.promote.deprecation_days": [14]},
        {"fedimg.promote.skip_regions": ["moon-1"]},
        {"fedimg.promote.skip_regions": ["us-east-1"]},  # the staging region
        {"fedimg.promote.best_effort_regions": ["eu_west_1"]},
        # A contradiction: skipped and best effort.
        {
            "fedimg.promote.skip_regions": ["eu-west-1"],
            "fedimg.promote.best_effort_regions": ["eu-west-1"],
        },
        {"fedimg.promote.copy_completion_minutes": 10},  # below AWS's 15
        {"fedimg.promote.copy_completion_minutes": 20},  # not a step of 15
        {"fedimg.promote.copy_completion_minutes": 2895},  # above AWS's 48 hours
        {"fedimg.promote.copy_completion_minutes": -15},
    ],
)
def test_bad_settings_fail_loudly(extra: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        FedimgConfig.from_fedmsg({**BASE, **extra})


def test_publishing_settings_are_read_and_completed() -> None:
    cfg = FedimgConfig.from_fedmsg(
        {
            **BASE,
            "fedimg.aws.extra_tags": {"FedoraGroup": "cloud"},
            "fedimg.promote.deprecation_days": {"nightly": 3},
            "fedimg.promote.best_effort_regions": ["ap-south-2"],
            "fedimg.promote.copy_completion_minutes": 2880,
        }
    )
    assert cfg.extra_tags == {"FedoraGroup": "cloud"}
    # A compose type left out keeps its default.
    assert cfg.deprecation_days == {"production": 730, "test": 30, "nightly": 3, "ci": 7}
    assert cfg.best_effort_regions == ["ap-south-2"]
    assert cfg.copy_completion_minutes == 2880


def test_missing_required_setting() -> None:
    with pytest.raises(ConfigError, match=r"fedimg\.resultsdb_url"):
        FedimgConfig.from_fedmsg({"topic_prefix": "org.x"})


def test_other_namespaces_are_not_fedimgs_business() -> None:
    cfg = FedimgConfig.from_fedmsg({**BASE, "autocloud_ami.whatever": 1, "fedimgx": 2})
    assert cfg.resultsdb_url == BASE["fedimg.resultsdb_url"]
