"""The AWS seam: boto3 clients per service and region, retries declared once.

Credentials and the endpoint come from boto3's normal chain, so
``AWS_ENDPOINT_URL`` pointing at a ``moto_server`` just works. Tests replace
an ``AwsClients`` with one built on moto (in process) or point it elsewhere.

``tag_list`` and ``tag_specs`` are the ONE way tags are written, by fedimg and
autocloud_ami on every resource: within AWS's limits, keys of 128 and values
of 256 characters, at most 50 tags. A longer value (the image URL of a long
image name) is cut to 256 characters; the full value stays in the messages.
A key AWS would refuse is a bug and raises ValueError before any call.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any, Final

import boto3
import botocore.config
from botocore.exceptions import ClientError

TAG_KEY_MAX: Final = 128
TAG_VALUE_MAX: Final = 256
TAGS_MAX: Final = 50
# Tag keys of fedimg's and autocloud_ami's own records: never an extra tag.
RESERVED_TAG_PREFIXES: Final = ("fedimg:", "autocloud:")
RESERVED_TAG_KEYS: Final = frozenset({"Name"})
EXTRA_TAGS_MAX: Final = 10  # leaves room for fedimg's own tags within AWS's 50


def tag_list(values: Mapping[str, str]) -> list[dict[str, str]]:
    """``{k: v}`` as AWS's ``[{"Key": k, "Value": v}]``, within AWS's limits (see above)."""
    if len(values) > TAGS_MAX:
        raise ValueError(f"{len(values)} tags; AWS allows {TAGS_MAX} per resource")
    for key in values:
        if not 1 <= len(key) <= TAG_KEY_MAX or key.lower().startswith("aws:"):
            raise ValueError(f"tag key {key[: TAG_KEY_MAX + 8]!r} is not one AWS takes")
    return [{"Key": k, "Value": str(v)[:TAG_VALUE_MAX]} for k, v in values.items()]


def tag_specs(resource_types: Iterable[str], values: Mapping[str, str]) -> list[dict[str, Any]]:
    """``TagSpecifications``: the same ``tag_list`` for each of ``resource_types``."""
    listed = tag_list(values)
    return [{"ResourceType": rt, "Tags": [dict(t) for t in listed]} for rt in resource_types]


def check_extra_tags(key: str, values: Mapping[str, str]) -> None:
    """Extra tags must be ones AWS takes, and never fedimg's or autocloud's own keys."""
    if len(values) > EXTRA_TAGS_MAX:
        raise ValueError(f"{key}: {len(values)} tags; at most {EXTRA_TAGS_MAX} extra tags")
    try:
        tag_list(values)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from exc
    for name, value in values.items():
        if name.startswith(RESERVED_TAG_PREFIXES) or name in RESERVED_TAG_KEYS:
            raise ValueError(f"{key}: {name!r} is a key fedimg or autocloud_ami sets itself")
        if len(value) > TAG_VALUE_MAX:
            raise ValueError(f"{key}: the value of {name!r} is longer than {TAG_VALUE_MAX}")


def with_extra(values: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """``values`` plus the deployment's extra tags (``values`` win a clash)."""
    return {**extra, **values}


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ``ClientError`` (never match on message text)."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


class AwsClients:
    """Thread-safe factory and cache of boto3 clients, one per (service, region)."""

    def __init__(
        self,
        max_attempts: int = 10,
        *,
        max_pool_connections: int = 64,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        session: boto3.session.Session | None = None,
        component: str = "fedimg",
    ) -> None:
        # The component shows in the User-Agent, so CloudTrail (and the IAM
        # policy test, through moto's recorder) can tell fedimg from autocloud_ami.
        self._config = botocore.config.Config(
            user_agent_extra=f"{component}/3",
            retries={"mode": "adaptive", "max_attempts": max_attempts},
            max_pool_connections=max_pool_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        self._session = session or boto3.session.Session()
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str], Any] = {}

    def client(self, service: str, region: str) -> Any:
        key = (service, region)
        with self._lock:  # boto3 sessions are not thread-safe; clients are
            if key not in self._clients:
                self._clients[key] = self._session.client(
                    service, region_name=region, config=self._config
                )
            return self._clients[key]

    def ec2(self, region: str) -> Any:
        return self.client("ec2", region)

    def ebs(self, region: str) -> Any:
        return self.client("ebs", region)
