"""The AWS seam: boto3 clients per service and region, retries declared once.

Credentials and the endpoint come from boto3's normal chain, so
``AWS_ENDPOINT_URL`` pointing at a ``moto_server`` just works. Tests replace
an ``AwsClients`` with one built on moto (in process) or point it elsewhere.
"""

from __future__ import annotations

import threading
from typing import Any

import boto3
import botocore.config
from botocore.exceptions import ClientError


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
