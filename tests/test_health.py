"""The health decision as a pure function: every enabled component of ours must be running."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from fedimg.health import assess, declared_components


class Stage:
    config_key: ClassVar[str] = "stage.enabled"
    start_error: ClassVar[str] = ""


class Broken:
    config_key: ClassVar[str] = "broken.enabled"
    start_error: ClassVar[str] = "ConfigError: deadline shorter than boot_timeout"


class Always:
    """No config_key: always expected."""


def running(*classes: type) -> list[Any]:
    return [cls() for cls in classes]


@pytest.mark.parametrize(
    ("config", "alive", "healthy", "summary"),
    [
        ({"stage.enabled": True}, (Stage, Always), True, {"stage": "running", "always": "running"}),
        ({"stage.enabled": False}, (Always,), True, {"stage": "disabled", "always": "running"}),
        (
            {"stage.enabled": True},
            (Always,),
            False,
            {"stage": "not running: failed to start (see the hub log)", "always": "running"},
        ),
        (
            {},
            (),
            False,
            {"stage": "disabled", "always": "not running: failed to start (see the hub log)"},
        ),
    ],
)
def test_every_enabled_component_must_run(
    config: dict[str, Any], alive: tuple[type, ...], healthy: bool, summary: dict[str, str]
) -> None:
    health = assess([("stage", Stage, ""), ("always", Always, "")], config, running(*alive))
    assert health.healthy is healthy
    assert health.summary == summary
    assert bool(health.problems) is not healthy


def test_the_reason_a_component_did_not_start_is_reported() -> None:
    health = assess([("broken", Broken, "")], {"broken.enabled": True}, [])
    assert not health.healthy
    assert health.problems == ["broken: not running: " + Broken.start_error]


def test_a_component_that_cannot_be_imported_is_unhealthy_whatever_the_config() -> None:
    health = assess([("ghost", None, "ImportError: no module named x")], {}, [])
    assert not health.healthy
    assert "ImportError" in health.summary["ghost"]


def test_an_uninitialized_instance_does_not_count_as_running() -> None:
    idle = Stage()
    idle._initialized = False  # type: ignore[attr-defined]
    health = assess([("stage", Stage, "")], {"stage.enabled": True}, [idle])
    assert not health.healthy


def test_this_distribution_declares_its_consumers_and_producers() -> None:
    names = {name for name, cls, error in declared_components() if cls is not None and not error}
    assert {"fedimg_stage", "fedimg_promote", "fedimg_health", "fedimg_reconcile"} <= names
    assert {"autocloud_ami", "autocloud_ami_sweep"} <= names
