"""botocore's per-session work, done once per test process instead of once per test.

Production makes one boto3 session per process (``fedimg.aws.AwsClients``) and
a client per service and region of it. The unit tests make a new session for
every test (a fresh ``mock_aws``, fresh clients, hooks of its own), and each
new session parsed the service models' JSON again and built each client class
again: on moto in process that was about 40 % of the CPU of the AWS-heavy test
modules (tests/test_promote.py, test_stage.py, test_engine.py: 80 -> 49
CPU-seconds; docs/performance.md).

``install()`` shares, between every botocore session of the test process,
only what botocore already treats as immutable and shares between the
clients of one session:

- the data loader (its ``instance_cache`` holds the parsed service models);
- the client class per (service, API version): its methods only name an
  operation and call ``_make_api_call`` on the instance.

Everything a test changes stays per client: the event hooks (each client
copies its session's emitter), the endpoint, the credentials, the config, the
retry handler. tests/test_botocache.py checks that.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import botocore.client
import botocore.session
from botocore.loaders import create_loader

_lock = threading.Lock()
_classes: dict[tuple[str, str], type] = {}
_installed: list[bool] = []


@functools.cache
def _shared_loader(data_path: str | None) -> Any:
    return create_loader(data_path)


def install() -> None:
    """Share the loader and the client classes between sessions (idempotent)."""
    with _lock:
        if _installed:
            return
        _installed.append(True)
    build_class = botocore.client.ClientCreator._create_client_class

    def register_data_loader(self: Any) -> None:
        self._components.lazy_register_component(
            "data_loader", lambda: _shared_loader(self.get_config_variable("data_path"))
        )

    def create_client_class(self: Any, service_name: str, service_model: Any) -> type:
        key = (service_name, service_model.api_version)
        with _lock:
            found = _classes.get(key)
        if found is None:
            found = build_class(self, service_name, service_model)
            with _lock:
                found = _classes.setdefault(key, found)
        return found

    botocore.session.Session._register_data_loader = register_data_loader
    botocore.client.ClientCreator._create_client_class = create_client_class
