"""The CLIs refuse a fedmsg config they could not publish with, before doing any work.

fedmsg 1.1 fails late and from its own insides: no ``endpoints`` is a
``ValueError`` at config loading; ``active: False`` with no endpoint for
this host leaves its context without a publisher, an ``AttributeError`` at
the first message, after the work was done. ``fedmsg_publish_problem`` says
why up front; it is checked here against real fedmsg publishing, and the
``fedimg`` and ``autocloud-ami`` commands are run in process: the compose
server counts every request, autocloud-ami's first AWS call is watched.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fedmsg
import fedmsg.config
import pytest
from moto import mock_aws

from autocloud_ami import cli as ac_cli
from devel.bus import free_port, write_fedmsg_config
from devel.compose import ComposeServer, ComposeTree, build_compose
from fedimg import cli
from fedimg.messages import cli_publisher, fedmsg_publish_problem, fedmsg_publisher
from fedimg.settings import ConfigError, load_fedmsg_config

HOST = socket.gethostname().split(".", 1)[0]
BUS_OK = {
    "topic_prefix": "org.fedoraproject",
    "environment": "dev",
    "active": True,
    "relay_inbound": ["tcp://127.0.0.1:9"],
    "endpoints": {"relay_outbound": ["tcp://127.0.0.1:9"]},
    "sign_messages": False,
    "validate_signatures": False,
    "post_init_sleep": 0.0,
}
SETTINGS = {
    "fedimg.resultsdb_url": "http://127.0.0.1:9/api/v2.0",
    "fedimg.compose.allowed_hosts": ["127.0.0.1"],
    "fedimg.http.retries": 0,
    "autocloud_ami.resultsdb_url": "http://127.0.0.1:9/api/v2.0",
    "autocloud_ami.ssh_cidr": "127.0.0.1/32",
}
NO_ENDPOINT_FOR_THIS_HOST = {**BUS_OK, "active": False}


def _without(config: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != key}


@pytest.fixture(autouse=True)
def fedmsg_config_cache() -> Iterator[None]:
    """fedmsg caches the config it loaded for the whole process: put back what was there."""
    cache = vars(fedmsg.config).get("__cache")
    yield
    vars(fedmsg.config)["__cache"] = cache


# -- the check, pure ------------------------------------------------------------------------

CASES: list[tuple[str, dict[str, Any], bool]] = [
    ("through the relay", BUS_OK, True),
    ("active without relay_inbound", _without(BUS_OK, "relay_inbound"), False),
    ("active with an empty relay_inbound", {**BUS_OK, "relay_inbound": []}, False),
    ("active, named endpoint missing", {**BUS_OK, "name": "fedimg.elsewhere"}, False),
    ("active, named endpoint set", {**BUS_OK, "name": "mine", "mine": "tcp://127.0.0.1:9"}, True),
    ("active False, no endpoint for this host", NO_ENDPOINT_FOR_THIS_HOST, False),
    ("active False, no endpoints at all", _without(NO_ENDPOINT_FOR_THIS_HOST, "endpoints"), False),
    (
        "active False, endpoint for this host",
        {**NO_ENDPOINT_FOR_THIS_HOST, "endpoints": {f"fedimg.{HOST}": ["tcp://127.0.0.1:9"]}},
        True,
    ),
    (
        "active False, endpoint for its name",
        {**NO_ENDPOINT_FOR_THIS_HOST, "name": "x", "endpoints": {"x": ["tcp://127.0.0.1:9"]}},
        True,
    ),
    ("muted", {**BUS_OK, "mute": True}, False),
    ("zmq disabled", {**BUS_OK, "zmq_enabled": False}, False),
    ("signing without a cert", {**BUS_OK, "sign_messages": True, "certnames": {}}, False),
    (
        "signing as the shell user",
        {**BUS_OK, "sign_messages": True, "certnames": {f"shell.{HOST}": "shell"}},
        True,
    ),
    (
        "signing with a cert prefix",
        {
            **BUS_OK,
            "sign_messages": True,
            "cert_prefix": "fedimg",
            "certnames": {f"fedimg.{HOST}": "c"},
        },
        True,
    ),
    (
        "signing with gpg, no key",
        {**BUS_OK, "sign_messages": True, "crypto_backend": "gpg", "gpg_keys": {}},
        False,
    ),
    (
        "signing with gpg",
        {**BUS_OK, "sign_messages": True, "crypto_backend": "gpg", "gpg_keys": {HOST: "k"}},
        True,
    ),
]


@pytest.mark.parametrize(("name", "config", "ok"), CASES, ids=[c[0] for c in CASES])
def test_publish_problem(name: str, config: dict[str, Any], ok: bool) -> None:
    problem = fedmsg_publish_problem(config, HOST)
    assert (problem is None) == ok, problem
    if not ok:
        with pytest.raises(ConfigError):
            cli_publisher(True, config)
    else:
        cli_publisher(True, config)
    cli_publisher(False, config)  # --no-publish: never refused


# -- ... and what fedmsg really does with the same configs -------------------------------


def _fedmsg_publishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: Any) -> bool:
    """Whether fedmsg.publish, called as the CLIs call it, sends with ``config``."""
    monkeypatch.setenv("FEDMSG_CONFIG", str(write_fedmsg_config(tmp_path, config)))
    load_fedmsg_config()  # fedmsg's cache: what fedmsg.publish will read
    outcome: list[BaseException | None] = []

    def run() -> None:  # fedmsg keeps one context per thread: a fresh thread, a fresh one
        try:
            fedmsg_publisher()("fedimg", "hub.ping", {"token": "t"})
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - what fedmsg raises is the point
            outcome.append(exc)
        finally:
            context = getattr(getattr(fedmsg, "__local"), "__context", None)
            if context is not None:
                context.destroy()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive() and len(outcome) == 1
    return outcome[0] is None


# Not signing (no certificates here); not binding (fedmsg would listen on every interface).
REAL = [
    c
    for c in CASES
    if not c[1].get("sign_messages") and (c[1].get("active") or c[1] is NO_ENDPOINT_FOR_THIS_HOST)
]


@pytest.mark.parametrize(("name", "config", "ok"), REAL, ids=[c[0] for c in REAL])
def test_the_check_agrees_with_fedmsg(
    name: str, config: dict[str, Any], ok: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = f"tcp://127.0.0.1:{free_port()}"
    config = {
        k: ([relay] if k == "relay_inbound" and v else v) for k, v in config.items()
    }  # a free port: fedmsg connects there (nothing listens, a PUB socket does not mind)
    assert (fedmsg_publish_problem(config, HOST) is None) == ok
    assert _fedmsg_publishes(tmp_path, monkeypatch, config) == ok


# -- the commands ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> ComposeTree:
    return build_compose(tmp_path_factory.mktemp("cli"), images=())


@pytest.fixture
def compose(tree: ComposeTree) -> Iterator[ComposeServer]:
    with ComposeServer(tree.root) as server:
        server.missing("metadata/images.json")  # a stage that got that far ends quickly
        yield server


def use_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bus: dict[str, Any]) -> None:
    """The CLI's fedmsg config: ``bus``, SETTINGS, and a state directory of the test's own."""
    state = {"fedimg.state_dir": str(tmp_path / "state")}  # not the default /var/lib/fedimg
    config = write_fedmsg_config(tmp_path, {**bus, **SETTINGS, **state})
    monkeypatch.setenv("FEDMSG_CONFIG", str(config))


def requested(server: ComposeServer) -> int:
    with server._lock:
        return sum(server.hits.values())


@pytest.mark.parametrize(
    "bus",
    [_without(BUS_OK, "endpoints"), NO_ENDPOINT_FOR_THIS_HOST],
    ids=["no endpoints", "active False without an endpoint for this host"],
)
def test_fedimg_stage_stops_before_any_work(
    bus: dict[str, Any],
    compose: ComposeServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    use_config(tmp_path, monkeypatch, bus)
    with caplog.at_level(logging.ERROR):
        rc = cli.main(["stage", "--compose-location", compose.url])
    assert rc == 2
    assert requested(compose) == 0
    assert [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_fedimg_stage_with_no_publish_goes_ahead(
    compose: ComposeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_config(tmp_path, monkeypatch, NO_ENDPOINT_FOR_THIS_HOST)
    rc = cli.main(["--no-publish", "stage", "--compose-location", compose.url])
    assert rc == 1  # images.json is missing on this server
    assert compose.hits_of("metadata/images.json") == 1


def test_a_command_that_publishes_nothing_is_not_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_config(tmp_path, monkeypatch, NO_ENDPOINT_FOR_THIS_HOST)
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    with mock_aws():
        assert cli.main(["status"]) == 0


@pytest.mark.parametrize(
    ("bus", "argv", "goes_ahead"),
    [
        (_without(BUS_OK, "endpoints"), [], False),
        (NO_ENDPOINT_FOR_THIS_HOST, [], False),
        (NO_ENDPOINT_FOR_THIS_HOST, ["--no-publish"], True),
    ],
    ids=["no endpoints", "no endpoint for this host", "--no-publish"],
)
def test_autocloud_ami_test_stops_before_any_aws_call(
    bus: dict[str, Any],
    argv: list[str],
    goes_ahead: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_config(tmp_path, monkeypatch, bus)
    described: list[str] = []
    real = ac_cli.describe_ami

    def first_aws_call(ec2: Any, ami_id: str, region: str) -> dict[str, Any]:
        described.append(ami_id)
        return real(ec2, ami_id, region)

    monkeypatch.setattr(ac_cli, "describe_ami", first_aws_call)
    with mock_aws():
        rc = ac_cli.main([*argv, "test", "ami-0123456789abcdef0", "--region", "us-east-1"])
    assert rc == ac_cli.EXIT_ERROR  # refused config, or (going ahead) no such AMI on moto
    assert bool(described) == goes_ahead


@pytest.mark.parametrize(
    "text",
    ["config = {'active': True}\n", "config = {\n", "not_config = {}\n"],
    ids=["no endpoints", "not Python", "no config"],
)
def test_a_fedmsg_config_fedmsg_refuses_is_a_config_error(
    text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    confd = tmp_path / "fedmsg.d"
    confd.mkdir()
    (confd / "base.py").write_text(text)
    monkeypatch.setenv("FEDMSG_CONFIG", str(confd))
    with pytest.raises(ConfigError):
        load_fedmsg_config()
