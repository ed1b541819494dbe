"""Fixtures shared by the test layers.

Unit tests use fakes at the seams and moto in process; integration tests
(marked ``integration``) start real processes on free loopback ports.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import settings as hypothesis_settings

if TYPE_CHECKING:
    from devel.bus import LocalBus
    from tests.audited_run import AuditedRun

# moto and boto3 must never reach a real AWS account from the tests.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_SECURITY_TOKEN", "testing")
os.environ.setdefault("AWS_SESSION_TOKEN", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
# moto registers hundreds of public AMIs in every region it creates (about a second of
# CPU each time, in process and in every moto_server the tests start); no test uses them,
# and a test that counts the images of an account must see only its own.
os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep what shares an expensive fixture in one pytest-xdist worker (``--dist loadgroup``).

    Tests using the session's RabbitMQ node run in one worker, and so do those of
    the shared pipeline run; every other integration module stays whole (its
    module-scoped stack starts once). Unit tests are spread one by one.
    """
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        names = getattr(item, "fixturenames", ())
        if "rabbitmq" in names:
            group = "rabbitmq"
        elif "audited_run" in names:
            group = "audited_run"
        elif item.get_closest_marker("integration"):
            group = item.nodeid.split("::", 1)[0]
        else:
            continue
        item.add_marker(pytest.mark.xdist_group(group))


class Recorder:
    """The bus seam in unit tests: a Publisher that keeps what it is given."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, modname: str, topic: str, body: dict[str, Any]) -> None:
        self.sent.append((modname, topic, body))

    def topics(self) -> list[str]:
        return [f"{m}.{t}" for m, t, _ in self.sent]

    def bodies(self, topic: str) -> list[dict[str, Any]]:
        return [b for m, t, b in self.sent if f"{m}.{t}" == topic]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def server() -> Iterator[Any]:
    """A devel.images.ImageServer (Range, faults) on a free loopback port."""
    from devel.images import ImageServer

    with ImageServer() as srv:
        yield srv


@pytest.fixture
def session() -> Any:
    """The HTTP seam as production builds it, without retries, with short timeouts."""
    from fedimg.http import make_session

    return make_session(retries=0, timeout=5.0)


@pytest.fixture
def local_bus() -> Iterator[LocalBus]:
    """A real fedmsg-relay on free loopback ports with a tap on its outbound socket."""
    from devel.bus import LocalBus

    with LocalBus() as bus:
        yield bus


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[Any]:
    """One private RabbitMQ node for the whole session (a start costs tens of seconds)."""
    from devel.rabbitmq import RabbitMQ

    node = RabbitMQ().start()
    try:
        yield node
    finally:
        node.stop()


# Hypothesis' per-example deadline is a wall-clock bound: on a loaded 2-core
# machine it fails tests for being slow, not wrong. No test fails on timing.
hypothesis_settings.register_profile("fedimg", deadline=None)
hypothesis_settings.load_profile("fedimg")


@pytest.fixture(scope="session")
def audited_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditedRun]:
    """One full pipeline run, read by the secrets and the IAM audits (tests/audited_run.py)."""
    from tests.audited_run import audited_run as run

    yield from run(tmp_path_factory.mktemp("audited-run"))
