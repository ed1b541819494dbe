"""Is this hub doing its job? Every enabled consumer and producer of ours must be running.

moksha logs a consumer whose ``__init__`` raised ("Failed to init ...") and
carries on without it; a hub answering pings while its stage or test consumer
is dead would look healthy while nothing gets staged or tested. So
``check`` compares what this distribution declares (its ``moksha.consumer``
and ``moksha.producer`` entry points, each class naming the setting that
enables it in ``config_key``) with what the hub actually runs.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

DISTRIBUTION: Final = "fedimg"
GROUPS: Final = ("moksha.consumer", "moksha.producer")


@dataclass(frozen=True)
class Component:
    """One consumer or producer this distribution declares, as this hub sees it."""

    name: str  # the entry point's name
    enabled: bool
    running: bool
    error: str = ""  # why it could not be loaded or started

    @property
    def status(self) -> str:
        if not self.enabled:
            return "disabled"
        if self.running:
            return "running"
        why = self.error or "failed to start (see the hub log)"
        return f"not running: {why}"[:255]


@dataclass(frozen=True)
class Health:
    components: tuple[Component, ...]

    @property
    def healthy(self) -> bool:
        return all(c.running for c in self.components if c.enabled)

    @property
    def summary(self) -> dict[str, str]:
        return {c.name: c.status for c in self.components}

    @property
    def problems(self) -> list[str]:
        return [f"{c.name}: {c.status}" for c in self.components if c.enabled and not c.running]


def assess(
    declared: Iterable[tuple[str, type | None, str]],
    config: Mapping[str, Any],
    running: Iterable[object],
) -> Health:
    """Pure: ``declared`` is ``(name, class or None, load error)`` per entry point."""
    alive = {type(obj) for obj in running if getattr(obj, "_initialized", True)}
    components = []
    for name, cls, error in declared:
        if cls is None:  # could not even be imported: count it as enabled
            components.append(Component(name, True, False, error))
            continue
        key = getattr(cls, "config_key", None)
        enabled = bool(config.get(key)) if key else True
        started_error = str(getattr(cls, "start_error", "") or "")
        components.append(Component(name, enabled, cls in alive, started_error))
    return Health(tuple(sorted(components, key=lambda c: c.name)))


def declared_components() -> list[tuple[str, type | None, str]]:
    """This distribution's consumers and producers, loaded (or why not)."""
    found: list[tuple[str, type | None, str]] = []
    for group in GROUPS:
        for ep in importlib.metadata.entry_points(group=group):
            if ep.dist is None or ep.dist.name != DISTRIBUTION:
                continue
            try:
                found.append((ep.name, ep.load(), ""))
            except Exception as exc:  # noqa: BLE001 -- an import error is what we report
                found.append((ep.name, None, f"{type(exc).__name__}: {exc}"[:300]))
    return found


def check_hub(hub: Any) -> Health:
    running = [*getattr(hub, "consumers", ()), *getattr(hub, "producers", ())]
    return assess(declared_components(), hub.config, running)
