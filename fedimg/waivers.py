"""How fedimg reads and writes WaiverDB (API v1.0): the waivers of one AMI.

A waiver is the human override of the gate: "this failure of TESTCASE (in
SCENARIO) on this AMI is known and acceptable", recorded with who and why.
fedimg's waivers have ``subject_type`` ``ami`` (ResultsDB's item type) and
``subject_identifier`` the staging AMI id, as its ResultsDB results do.

``WaiverDBSource`` reads ``GET /waivers/?subject_type=ami&subject_identifier=AMI``
(WaiverDB already leaves out obsolete waivers: the same subject, testcase,
scenario, user and product version waived again) following ``next`` links,
and creates one with ``POST /waivers/``; ``DummyWaivers`` is the in-memory
fake for tests. Anything that stops us from knowing the waivers for sure
(WaiverDB down, a 5xx after retries, a timeout, an answer that does not
parse or names another subject) raises ``WaiversUnavailable``: the gate then
waits and looks again, it never releases on missing information.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import requests
import requests.auth

from fedimg.http import make_session
from fedimg.messages import AMI_ID_RE, RESULTSDB_ITEM_TYPE, TESTCASE_RE

if TYPE_CHECKING:
    from fedimg.config import FedimgConfig

log = logging.getLogger(__name__)

_TEXT_CHARS = 300
PAGE_SIZE = 100
MAX_PAGES = 20


class WaiversUnavailable(Exception):
    """WaiverDB could not tell us (down, 5xx, timeout, unusable answer): wait, never decide."""


class WaiverRefused(Exception):
    """WaiverDB (or fedimg before asking it) refused to create a waiver; the text says why."""


@dataclass(frozen=True)
class Waiver:
    """One WaiverDB waiver, as much of it as fedimg reads."""

    waiver_id: int
    subject_type: str
    subject_identifier: str
    testcase: str
    scenario: str | None
    username: str
    comment: str
    waived: bool
    product_version: str = ""
    timestamp: str = ""
    proxied_by: str | None = None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _TEXT_CHARS else text[: _TEXT_CHARS - 3] + "..."


def _text(raw: Mapping[str, Any], key: str, *, optional: bool = False) -> str | None:
    value = raw.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise WaiversUnavailable(
            f"waiver {raw.get('id')!r}: {key} is not a string: {_short(value)}"
        )
    return value


def parse_waiver(raw: Any) -> Waiver:
    """A ``Waiver`` from one API v1.0 waiver object; WaiversUnavailable if it is not one."""
    if not isinstance(raw, Mapping):
        raise WaiversUnavailable(f"a waiver is not an object: {_short(raw)}")
    waiver_id = raw.get("id")
    if not isinstance(waiver_id, int) or isinstance(waiver_id, bool):
        raise WaiversUnavailable(f"waiver without an integer id: {_short(raw)}")
    waived = raw.get("waived")
    if not isinstance(waived, bool):
        raise WaiversUnavailable(f"waiver {waiver_id}: waived is not a boolean")
    return Waiver(
        waiver_id=waiver_id,
        subject_type=_text(raw, "subject_type") or "",
        subject_identifier=_text(raw, "subject_identifier") or "",
        testcase=_text(raw, "testcase") or "",
        scenario=_text(raw, "scenario", optional=True) or None,
        username=_text(raw, "username") or "",
        comment=_text(raw, "comment", optional=True) or "",
        waived=waived,
        product_version=_text(raw, "product_version", optional=True) or "",
        timestamp=_text(raw, "timestamp", optional=True) or "",
        proxied_by=_text(raw, "proxied_by", optional=True),
    )


def parse_waiver_page(payload: Any, ami_id: str) -> tuple[list[Waiver], str | None]:
    """The waivers of one ``GET /waivers/`` page and its ``next`` link.

    A waiver for another subject means the filter was lost on the way (a
    proxy, a server bug): nothing can be decided from such an answer.
    """
    if not isinstance(payload, Mapping) or not isinstance(payload.get("data"), list):
        raise WaiversUnavailable(f"not a WaiverDB waiver list: {_short(payload)}")
    waivers = [parse_waiver(raw) for raw in payload["data"]]
    for waiver in waivers:
        if (waiver.subject_type, waiver.subject_identifier) != (RESULTSDB_ITEM_TYPE, ami_id):
            raise WaiversUnavailable(
                f"asked for the waivers of {ami_id}, got waiver {waiver.waiver_id} for"
                f" {waiver.subject_type} {waiver.subject_identifier[:80]}"
            )
    nxt = payload.get("next")
    if nxt is not None and not isinstance(nxt, str):
        raise WaiversUnavailable(f"'next' is not a URL: {_short(nxt)}")
    return waivers, nxt


def product_version(release: str) -> str:
    """WaiverDB's required ``product_version`` for a Fedora release: ``fedora-41``."""
    return f"fedora-{(release or 'unknown').lower()}"


def new_waiver_body(
    ami_id: str, testcase: str, scenario: str | None, comment: str, release: str
) -> dict[str, Any]:
    """The ``POST /waivers/`` body; WaiverRefused for what WaiverDB would refuse anyway."""
    if not AMI_ID_RE.match(ami_id):
        raise WaiverRefused(f"{ami_id[:80]!r} is not an AMI id")
    if not TESTCASE_RE.match(testcase):
        raise WaiverRefused(f"{testcase[:80]!r} is not a testcase name")
    if not comment.strip():
        raise WaiverRefused("a waiver needs a comment saying why the failure is acceptable")
    body: dict[str, Any] = {
        "subject_type": RESULTSDB_ITEM_TYPE,
        "subject_identifier": ami_id,
        "testcase": testcase,
        "waived": True,
        "product_version": product_version(release),
        "comment": comment.strip()[:2000],
    }
    if scenario:
        body["scenario"] = scenario
    return body


class WaiverSource(Protocol):
    """Where the gate reads waivers from."""

    def waivers(self, ami_id: str) -> list[Waiver]:
        """Every current waiver for the AMI; raises WaiversUnavailable."""
        ...


class WaiverDBSource:
    """Reads (and for ``fedimg waive`` writes) a WaiverDB API v1.0 server."""

    def __init__(self, api_url: str, session: requests.Session) -> None:
        self.url = api_url.rstrip("/")
        self.session = session

    def _get(self, url: str, params: Mapping[str, str] | None) -> Any:
        try:
            response = self.session.get(url, params=params)
        except (requests.RequestException, ValueError) as exc:
            raise WaiversUnavailable(f"WaiverDB {url}: {type(exc).__name__}: {exc}"[:400]) from exc
        if response.status_code != 200:
            raise WaiversUnavailable(
                f"WaiverDB {url}: HTTP {response.status_code}: {_short(response.text)}"
            )
        try:
            return response.json()
        except ValueError:
            raise WaiversUnavailable(
                f"WaiverDB {url}: the answer is not JSON: {_short(response.text)}"
            ) from None

    def waivers(self, ami_id: str) -> list[Waiver]:
        params: dict[str, str] | None = {
            "subject_type": RESULTSDB_ITEM_TYPE,
            "subject_identifier": ami_id,
            "limit": str(PAGE_SIZE),
        }
        url: str | None = f"{self.url}/waivers/"
        found: list[Waiver] = []
        pages = 0
        try:
            while url is not None:
                pages += 1
                if pages > MAX_PAGES:
                    raise WaiversUnavailable(f"more than {MAX_PAGES * PAGE_SIZE} waivers")
                page, nxt = parse_waiver_page(self._get(url, params), ami_id)
                found.extend(page)
                url = None if nxt is None else self._follow(nxt)
                params = None  # the next link carries the query
        except WaiversUnavailable as exc:
            log.warning("%s: cannot read waivers from %s: %s", ami_id, self.url, exc)
            raise
        log.debug("%s: waivers %s", ami_id, [(w.waiver_id, w.testcase) for w in found])
        return found

    def _follow(self, nxt: str) -> str:
        """Follow ``next`` only under our own API (a proxy may rewrite the host, never the path)."""
        ours, theirs = urlsplit(self.url), urlsplit(nxt)
        if not theirs.path.startswith(ours.path + "/waivers"):
            raise WaiversUnavailable(f"'next' leaves the waivers API: {_short(nxt)}")
        return f"{ours.scheme}://{ours.netloc}{theirs.path}?{theirs.query}"

    def create(self, body: Mapping[str, Any], auth: Any = None) -> Waiver:
        """``POST /waivers/``; WaiverRefused with WaiverDB's message when it says no."""
        url = f"{self.url}/waivers/"
        try:
            response = self.session.post(url, json=dict(body), auth=auth)
        except requests.RequestException as exc:
            raise WaiversUnavailable(f"WaiverDB {url}: {type(exc).__name__}: {exc}"[:400]) from exc
        if response.status_code >= 500:
            raise WaiversUnavailable(f"WaiverDB {url}: HTTP {response.status_code}")
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.status_code != 201:
            message = payload.get("message") if isinstance(payload, Mapping) else response.text
            raise WaiverRefused(f"WaiverDB said HTTP {response.status_code}: {_short(message)}")
        return parse_waiver(payload)


def waiver_source(cfg: FedimgConfig) -> WaiverSource:
    """WaiverDB at ``fedimg.waiverdb_url`` (HTTP retries and timeout as configured), or none."""
    if not cfg.waiverdb_url:
        return NoWaivers()
    return WaiverDBSource(cfg.waiverdb_url, make_session(cfg.http_retries, cfg.http_timeout))


class DummyWaivers:
    """An in-memory WaiverSource for tests: ``add`` waivers, ``set_down`` to fail."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waivers: list[Waiver] = []
        self._down = False
        self.queries: list[str] = []

    def add(
        self,
        ami_id: str,
        testcase: str,
        comment: str = "known and acceptable",
        *,
        scenario: str | None = None,
        username: str = "tester",
        waived: bool = True,
        subject_type: str = RESULTSDB_ITEM_TYPE,
    ) -> Waiver:
        with self._lock:
            waiver = Waiver(
                waiver_id=len(self._waivers) + 1,
                subject_type=subject_type,
                subject_identifier=ami_id,
                testcase=testcase,
                scenario=scenario,
                username=username,
                comment=comment,
                waived=waived,
                product_version="fedora-41",
                timestamp=datetime.now(UTC).replace(tzinfo=None).isoformat(),
            )
            self._waivers.append(waiver)
        return waiver

    def set_down(self, down: bool = True) -> None:
        with self._lock:
            self._down = down

    def waivers(self, ami_id: str) -> list[Waiver]:
        with self._lock:
            self.queries.append(ami_id)
            if self._down:
                raise WaiversUnavailable("DummyWaivers is down")
            return [
                w
                for w in self._waivers
                if (w.subject_type, w.subject_identifier) == (RESULTSDB_ITEM_TYPE, ami_id)
            ]


class NoWaivers:
    """The WaiverSource of a deployment without WaiverDB (``fedimg.waiverdb_url`` empty)."""

    def waivers(self, ami_id: str) -> list[Waiver]:
        return []


def waived_testcases(waivers: Sequence[Waiver]) -> list[str]:
    """``testcase [scenario] by user: comment`` lines, for ``fedimg status``."""
    return [
        f"{w.testcase}{f' [{w.scenario}]' if w.scenario else ''} by {w.username}: {w.comment}"
        for w in waivers
        if w.waived
    ]


class BearerAuth(requests.auth.AuthBase):
    """``Authorization: Bearer <token>`` (WaiverDB behind OIDC); the token is never logged."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.token}"
        return request
