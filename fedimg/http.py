"""The HTTP seam: one requests session with retries and timeouts, declared once."""

from __future__ import annotations

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

USER_AGENT = "fedimg/3"


class TimeoutSession(requests.Session):
    """A session whose every request gets (connect, read) timeouts unless given."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def request(self, method, url, **kwargs):  # type: ignore[no-untyped-def, override]
        kwargs.setdefault("timeout", (min(10.0, self.timeout), self.timeout))
        return super().request(method, url, **kwargs)


def make_session(retries: int = 5, timeout: float = 60.0, backoff: float = 1.0) -> requests.Session:
    """A session retrying connection errors and 429/5xx with exponential backoff."""
    session = TimeoutSession(timeout)
    retry = Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        backoff_factor=backoff,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=frozenset({"GET", "HEAD"}),
        raise_on_status=False,
    )
    adapter = HTTPAdapter(max_retries=retry, pool_maxsize=16)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = USER_AGENT
    return session
