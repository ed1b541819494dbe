"""How fedimg reads ResultsDB: the newest result per testcase for one item.

The gate (``fedimg.gate``) decides from ``ResultsSource.latest(ami_id)``; this
module only fetches and checks. ``ResultsDBSource`` asks a real ResultsDB
(API v2.0) through ``resultsdb_api``; ``DummyResults`` is the in-memory fake
for tests (greenwave's ``DummyResultsRetriever`` idea).

Anything that stops us from knowing the answer for sure (ResultsDB down, a 5xx
after the client's retries, a timeout, an answer that does not parse or does
not match the query) raises ``ResultsUnavailable``: the gate must then wait and
ask again, never decide on a partial view.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import requests
import resultsdb_api

from fedimg.messages import OUTCOMES, RESULTSDB_ITEM_TYPE, SCENARIO_KEY

if TYPE_CHECKING:
    from fedimg.config import FedimgConfig

log = logging.getLogger(__name__)

DEFAULT_ITEM_TYPE = RESULTSDB_ITEM_TYPE
HISTORY_MAX = 1000  # results of one AMI read to find the newest per testcase and scenario
HISTORY_PAGE = 100
_REASON_CHARS = 300


def _no_data() -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Result:
    """One ResultsDB result, as much of it as fedimg reads."""

    testcase: str
    outcome: str
    result_id: int
    submit_time: str
    note: str = ""
    ref_url: str | None = None
    data: Mapping[str, tuple[str, ...]] = field(default_factory=_no_data, hash=False)

    @property
    def submitted(self) -> datetime:
        """``submit_time`` as an aware UTC datetime (ResultsDB stores naive UTC)."""
        moment = datetime.fromisoformat(self.submit_time)
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class ResultsUnavailable(Exception):
    """ResultsDB could not tell us (down, 5xx, timeout, unusable answer): wait, never decide."""


class MalformedResults(ResultsUnavailable):
    """ResultsDB answered, but not with what the v2.0 API promises for our query."""


class ResultsSource(Protocol):
    """Where the gate reads results from."""

    def latest(
        self, item: str, item_type: str = DEFAULT_ITEM_TYPE, testcases: Sequence[str] | None = None
    ) -> dict[str, Result]:
        """testcase -> the newest result for ``item``; raises ResultsUnavailable."""
        ...

    def latest_by_scenario(
        self, item: str, item_type: str = DEFAULT_ITEM_TYPE, testcases: Sequence[str] | None = None
    ) -> dict[tuple[str, str], Result]:
        """(testcase, scenario) -> the newest result; scenario ``""`` for results without one."""
        ...


# -- the functional core: parse and check what ResultsDB returned ------------------


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def _data_values(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise MalformedResults(f"result data {key!r} is not a list of strings: {_short(value)}")


def parse_result(raw: Any) -> Result:
    """A ``Result`` from one API v2.0 result object; MalformedResults if it is not one."""
    if not isinstance(raw, Mapping):
        raise MalformedResults(f"a result is not an object: {_short(raw)}")
    testcase = raw.get("testcase")
    name = testcase.get("name") if isinstance(testcase, Mapping) else None
    result_id = raw.get("id")
    outcome = raw.get("outcome")
    submit_time = raw.get("submit_time")
    note = raw.get("note")
    ref_url = raw.get("ref_url")
    data = raw.get("data", {})
    if not isinstance(name, str) or not name:
        raise MalformedResults(f"result without a testcase name: {_short(raw)}")
    if not isinstance(result_id, int) or isinstance(result_id, bool):
        raise MalformedResults(f"result of {name} without an integer id: {_short(result_id)}")
    if not isinstance(outcome, str) or not outcome:
        raise MalformedResults(f"result {result_id} without an outcome")
    if not isinstance(submit_time, str):
        raise MalformedResults(f"result {result_id} without a submit_time")
    try:
        datetime.fromisoformat(submit_time)
    except ValueError:
        raise MalformedResults(
            f"result {result_id}: submit_time {_short(submit_time)} is not ISO 8601"
        ) from None
    if note is not None and not isinstance(note, str):
        raise MalformedResults(f"result {result_id}: note is not a string")
    if ref_url is not None and not isinstance(ref_url, str):
        raise MalformedResults(f"result {result_id}: ref_url is not a string")
    if not isinstance(data, Mapping):
        raise MalformedResults(f"result {result_id}: data is not an object")
    return Result(
        testcase=name,
        outcome=outcome,
        result_id=result_id,
        submit_time=submit_time,
        note=note or "",
        ref_url=ref_url,
        data=MappingProxyType({str(k): _data_values(str(k), v) for k, v in data.items()}),
    )


def parse_result_list(payload: Any) -> list[Result]:
    """The results of a ``{"data": [...]}`` answer (``/results``, ``/results/latest``)."""
    if not isinstance(payload, Mapping) or not isinstance(payload.get("data"), list):
        raise MalformedResults(f"not a ResultsDB result list: {_short(payload)}")
    return [parse_result(raw) for raw in payload["data"]]


def check_matches(
    result: Result, item: str, item_type: str, testcases: Sequence[str] | None
) -> Result:
    """Return ``result`` if it answers the query; a result for anything else means
    the filter was lost on the way (a proxy, a server bug): nothing can be decided."""
    if item not in result.data.get("item", ()) or item_type not in result.data.get("type", ()):
        raise MalformedResults(
            f"asked for {item_type} {item}, got result {result.result_id} for"
            f" {result.data.get('type', ())} {result.data.get('item', ())}"
        )
    if testcases and result.testcase not in testcases:
        raise MalformedResults(
            f"asked for testcases {list(testcases)}, got result {result.result_id}"
            f" of {result.testcase}"
        )
    return result


def newest_per_testcase(results: Iterable[Result]) -> dict[str, Result]:
    """testcase -> its newest result (submit time, then id: the later submission wins ties)."""
    newest: dict[str, Result] = {}
    for result in results:
        seen = newest.get(result.testcase)
        if seen is None or (result.submitted, result.result_id) > (
            seen.submitted,
            seen.result_id,
        ):
            newest[result.testcase] = result
    return newest


def scenario_of(result: Result) -> str:
    """The scenario a result ran in (data ``scenario``); ``""`` for results posted without one."""
    values = result.data.get(SCENARIO_KEY, ())
    return values[0] if values else ""


def newest_per_scenario(results: Iterable[Result]) -> dict[tuple[str, str], Result]:
    """(testcase, scenario) -> its newest result (submit time, then id)."""
    newest: dict[tuple[str, str], Result] = {}
    for result in results:
        key = (result.testcase, scenario_of(result))
        seen = newest.get(key)
        if seen is None or (result.submitted, result.result_id) > (seen.submitted, seen.result_id):
            newest[key] = result
    return newest


def _check_query(item: str, item_type: str, testcases: Sequence[str] | None) -> tuple[str, ...]:
    """ResultsDB splits filter values on commas: refuse values that would widen the query."""
    wanted = tuple(testcases or ())
    for what, value in [("item", item), ("item type", item_type)] + [
        ("testcase", t) for t in wanted
    ]:
        if not isinstance(value, str) or not value.strip() or "," in value:
            raise ValueError(f"invalid {what} for a ResultsDB query: {value!r}")
    return wanted


# -- the real source ---------------------------------------------------------------


class ResultsDBSource:
    """Reads a ResultsDB API v2.0 server through ``resultsdb_api``."""

    def __init__(
        self,
        api_url: str,
        *,
        max_retries: int = 3,
        backoff_factor: float = 0.5,
        timeout: float = 30.0,
    ) -> None:
        self.client = resultsdb_api.ResultsDBapi(
            api_url, max_retries=max_retries, backoff_factor=backoff_factor
        )
        self.timeout = timeout

    @classmethod
    def from_config(cls, cfg: FedimgConfig) -> ResultsDBSource:
        """The source for ``fedimg.resultsdb_url``, with the configured HTTP retries/timeout."""
        return cls(cfg.resultsdb_url, max_retries=cfg.http_retries, timeout=cfg.http_timeout)

    @property
    def url(self) -> str:
        return str(self.client.url)

    def _get(self, url: str, params: Mapping[str, str] | None = None) -> Any:
        """GET and decode JSON; every failure becomes ResultsUnavailable."""
        try:
            response = self.client.session.get(url, params=params, timeout=self.timeout)
        except resultsdb_api.ResultsDBapiException as exc:
            status = getattr(exc.response, "status_code", None)
            where = f"HTTP {status}" if status else "no answer"
            raise ResultsUnavailable(f"ResultsDB {url}: {where}: {exc.message}") from exc
        except (requests.RequestException, ValueError, TypeError) as exc:
            # Connection errors after retries; ValueError/TypeError when the
            # client cannot read an error body it expected to be JSON.
            raise ResultsUnavailable(
                f"ResultsDB {url}: {type(exc).__name__}: {_short(str(exc))}"
            ) from exc
        try:
            return response.json()
        except ValueError:
            raise MalformedResults(
                f"ResultsDB {url}: HTTP {response.status_code} answer is not JSON:"
                f" {_short(response.text)}"
            ) from None

    def latest(
        self, item: str, item_type: str = DEFAULT_ITEM_TYPE, testcases: Sequence[str] | None = None
    ) -> dict[str, Result]:
        """testcase -> the newest result for ``item`` (``GET /results/latest``)."""
        wanted = _check_query(item, item_type, testcases)
        params = {"item": item, "type": item_type}
        if wanted:
            params["testcases"] = ",".join(wanted)
        try:
            results = parse_result_list(self._get(f"{self.url}/results/latest", params))
            latest = newest_per_testcase(check_matches(r, item, item_type, wanted) for r in results)
        except ResultsUnavailable as exc:
            log.warning("%s: cannot read results from %s: %s", item, self.url, exc)
            raise
        log.debug(
            "%s: latest results %s",
            item,
            {name: (r.outcome, r.result_id) for name, r in sorted(latest.items())},
        )
        return latest

    def latest_by_scenario(
        self, item: str, item_type: str = DEFAULT_ITEM_TYPE, testcases: Sequence[str] | None = None
    ) -> dict[tuple[str, str], Result]:
        """(testcase, scenario) -> the newest result, from the item's history (``GET /results``).

        ``/results/latest`` keeps one result per testcase, so one scenario would
        hide the others; the history, newest first, holds them all. Results
        older than the ``HISTORY_MAX`` newest are not looked at.
        """
        try:
            found = self.history(
                item, item_type, testcases, max_results=HISTORY_MAX, page_size=HISTORY_PAGE
            )
        except ResultsUnavailable as exc:
            log.warning("%s: cannot read results from %s: %s", item, self.url, exc)
            raise
        latest = newest_per_scenario(found)
        log.debug(
            "%s: latest results %s",
            item,
            {f"{t} {s}".strip(): (r.outcome, r.result_id) for (t, s), r in sorted(latest.items())},
        )
        return latest

    def history(
        self,
        item: str,
        item_type: str = DEFAULT_ITEM_TYPE,
        testcases: Sequence[str] | None = None,
        *,
        max_results: int = 100,
        page_size: int = 50,
    ) -> list[Result]:
        """Results for ``item``, newest first, following ``next`` up to ``max_results``."""
        wanted = _check_query(item, item_type, testcases)
        query = {"item": item, "type": item_type, "limit": str(page_size)}
        if wanted:
            query["testcases"] = ",".join(wanted)
        params: dict[str, str] | None = query
        url: str | None = f"{self.url}/results"
        found: list[Result] = []
        while url is not None and len(found) < max_results:
            payload = self._get(url, params)
            found.extend(
                check_matches(r, item, item_type, wanted) for r in parse_result_list(payload)
            )
            url = _next_page(payload, self.url)
            params = None  # the next link carries the query
        return found[:max_results]


def _next_page(payload: Mapping[str, Any], base: str) -> str | None:
    nxt = payload.get("next")
    if nxt is None:
        return None
    if not isinstance(nxt, str):
        raise MalformedResults(f"'next' is not a URL: {_short(nxt)}")
    # Links are built from the Host header the server saw; follow only paths
    # under our own API (a proxy may rewrite the host, never the path).
    ours, theirs = urlsplit(base), urlsplit(nxt)
    if not theirs.path.startswith(ours.path + "/results"):
        raise MalformedResults(f"'next' leaves the results API: {_short(nxt)}")
    return f"{ours.scheme}://{ours.netloc}{theirs.path}?{theirs.query}"


# -- the in-memory fake --------------------------------------------------------------


class DummyResults:
    """An in-memory ResultsSource for tests: ``add`` results, ``set_down`` to fail."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._results: list[tuple[str, str, Result]] = []  # (item, item_type, result)
        self._down = False
        self._clock = datetime(2026, 1, 1)
        self.queries: list[tuple[str, str, tuple[str, ...]]] = []

    def add(
        self,
        item: str,
        testcase: str,
        outcome: str,
        note: str = "",
        item_type: str = DEFAULT_ITEM_TYPE,
        *,
        ref_url: str | None = None,
        data: Mapping[str, str] | None = None,
    ) -> Result:
        """Record a result (outcomes checked as ResultsDB does) and return it."""
        _check_query(item, item_type, [testcase])
        outcome = outcome.strip().upper()
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome!r} is not one of {OUTCOMES}")
        with self._lock:
            self._clock += timedelta(seconds=1)
            result = Result(
                testcase=testcase,
                outcome=outcome,
                result_id=len(self._results) + 1,
                submit_time=self._clock.isoformat(),
                note=note,
                ref_url=ref_url,
                data=MappingProxyType(
                    {
                        **{k: (v,) for k, v in (data or {}).items()},
                        "item": (item,),
                        "type": (item_type,),
                    }
                ),
            )
            self._results.append((item, item_type, result))
        return result

    def set_down(self, down: bool = True) -> None:
        """While down, ``latest`` raises ResultsUnavailable."""
        with self._lock:
            self._down = down

    def _matching(self, item: str, item_type: str, testcases: Sequence[str] | None) -> list[Result]:
        wanted = _check_query(item, item_type, testcases)
        with self._lock:
            self.queries.append((item, item_type, wanted))
            if self._down:
                raise ResultsUnavailable("DummyResults is down")
            return [
                r
                for i, t, r in self._results
                if i == item and t == item_type and (not wanted or r.testcase in wanted)
            ]

    def latest(
        self, item: str, item_type: str = DEFAULT_ITEM_TYPE, testcases: Sequence[str] | None = None
    ) -> dict[str, Result]:
        return newest_per_testcase(self._matching(item, item_type, testcases))

    def latest_by_scenario(
        self, item: str, item_type: str = DEFAULT_ITEM_TYPE, testcases: Sequence[str] | None = None
    ) -> dict[tuple[str, str], Result]:
        return newest_per_scenario(self._matching(item, item_type, testcases))
