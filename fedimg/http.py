"""The HTTP seam: one requests session with retries, timeouts and host checks, declared once.

Every request the session sends -- the first one and each redirect hop --
is checked before it is sent: http(s), no credentials in the URL and, when
``allowed_hosts`` is given, a host in that list (``fedimg.compose.allowed_hosts``).
A redirect to any other host raises ``HostNotAllowed`` without that host
ever being contacted. ``RetryPolicy`` is the one declaration of how often and
how patiently a request is tried again: urllib3 applies it to connection
errors, 429 and 5xx (never to 404), ``fedimg.download`` to a download cut
short (it resumes from the last byte received).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from fedimg.messages import InvalidMessage, check_http_url

USER_AGENT: Final = "fedimg/3"
MAX_REDIRECTS: Final = 5
RETRY_STATUSES: Final = (429, 500, 502, 503, 504)


class HostNotAllowed(requests.exceptions.InvalidURL):
    """A request (or a redirect hop) to a URL outside the allowed hosts; never sent."""


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` more tries after the first, waiting ``delay(n)`` before the n-th."""

    retries: int = 5
    backoff: float = 1.0
    max_delay: float = Retry.DEFAULT_BACKOFF_MAX

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0 or self.max_delay < 0:
            raise ValueError(f"retry policy values must not be negative: {self}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based): exponential, capped."""
        return min(self.max_delay, self.backoff * 2 ** max(attempt - 1, 0))


NO_RETRY: Final = RetryPolicy(retries=0, backoff=0.0)


class TimeoutSession(requests.Session):
    """A session with (connect, read) timeouts on every request and a host check on every hop."""

    def __init__(
        self,
        timeout: float,
        allowed_hosts: Iterable[str] = (),
        retry_policy: RetryPolicy = NO_RETRY,
    ) -> None:
        super().__init__()
        self.timeout = timeout
        self.allowed_hosts = tuple(allowed_hosts)
        self.retry_policy = retry_policy
        self.max_redirects = MAX_REDIRECTS

    def request(self, method, url, **kwargs):  # type: ignore[no-untyped-def, override]
        kwargs.setdefault("timeout", (min(10.0, self.timeout), self.timeout))
        return super().request(method, url, **kwargs)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        """Send ``request`` (a first request or a redirect hop) only if its URL is allowed."""
        try:
            check_http_url(str(request.url), self.allowed_hosts)
        except InvalidMessage as exc:
            raise HostNotAllowed(f"not requesting {str(request.url)[:200]}: {exc}") from exc
        return super().send(request, **kwargs)


def retry_policy(session: requests.Session) -> RetryPolicy:
    """The session's retry policy (``NO_RETRY`` for a session not made by ``make_session``)."""
    policy = getattr(session, "retry_policy", NO_RETRY)
    return policy if isinstance(policy, RetryPolicy) else NO_RETRY


def make_session(
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 1.0,
    allowed_hosts: Iterable[str] = (),
) -> requests.Session:
    """A session retrying connection errors and 429/5xx with exponential backoff.

    ``allowed_hosts`` (empty: any http(s) host) bounds every request and redirect hop.
    """
    policy = RetryPolicy(retries=retries, backoff=backoff)
    session = TimeoutSession(timeout, allowed_hosts, policy)
    retry = Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        backoff_factor=backoff,
        backoff_max=policy.max_delay,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"GET", "HEAD"}),
        raise_on_status=False,
    )
    adapter = HTTPAdapter(max_retries=retry, pool_maxsize=16)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = USER_AGENT
    return session
