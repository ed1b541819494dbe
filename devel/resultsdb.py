"""A local ResultsDB (API v2.0) stand-in: the real server's JSON, over stdlib HTTP and SQLite.

The real ResultsDB (release-engineering/resultsdb, Flask + SQLAlchemy) is not
installable here. This stand-in answers the v2.0 subset that ``resultsdb_api``
and fedimg use, with the real server's shapes, filters, ordering, pagination
and error bodies (``resultsdb/controllers/api_v2.py``,
``serializers/api_v2.py``, ``parsers/api_v2.py``), and publishes
``resultsdb.result.new`` with the API JSON of every new result, as the real
server's fedmsg plugin does.

    python -m devel.resultsdb --host 127.0.0.1 --port 5001 --db /tmp/resultsdb.sqlite [--no-bus]
        [--amqp-conf fedora-messaging.toml]

``--amqp-conf`` also publishes every new result over AMQP the way today's real
server does (``fedora_messaging.api.publish`` of a base ``Message`` with topic
``resultsdb.result.new``), beside (or, with ``--no-bus``, instead of) fedmsg.

Deliberate differences, all stricter than the real server and invisible to a
well-behaved client: unknown fields in a POST body are rejected (the real one
ignores them); ``data`` values must be strings or lists of strings (the real
one ``str()``-s anything); a validation error body carries ``message`` next to
the real ``validation_error`` list, so ``resultsdb_api`` reports it readably;
``_distinct_on`` on ``/results/latest`` is refused with 400 (not implemented);
results submitted in the same microsecond are ordered by id.

Test switches: ``set_down(True)`` (503 to everything), ``fail_next(n, status)``,
``reject_next(n)`` (400) and ``garble_next(n, body)`` (200 with a raw body).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import re
import signal
import sqlite3
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from fedimg.messages import OUTCOMES, RESULT_NEW, InvalidMessage, Publisher

log = logging.getLogger(__name__)

API_PREFIX = "/api/v2.0"
QUERY_LIMIT = 20
MAX_BODY_BYTES = 10 * 1024 * 1024
GROUP_UUID_MAX = 36  # the real server's column is String(36)
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"  # stored form: fixed width, sorts as text
RESERVED_RESULT_ARGS = frozenset(
    {"_sort", "limit", "page", "testcases", "testcases:like", "groups", "_distinct_on"}
    | {"outcome", "since"}
)
RE_PAGE = re.compile(r"([?&])page=([0-9]+)")
RE_CALLBACK = re.compile(r"([?&])callback=[^&]*&?")
RE_CLEAN_AMPERSANDS = re.compile(r"&+")
_PLACEHOLDER = "[!@#$%^&*PLACEHOLDER*&^%$#@!]"
_URL_SAFE = "!$&'()*+,/:;=@"  # what werkzeug leaves unquoted in a path segment


# -- errors ------------------------------------------------------------------


class ApiError(Exception):
    """An HTTP error answer: status and JSON body."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"message": message, **extra}


def _invalid(errors: list[dict[str, Any]]) -> ApiError:
    """A 400 shaped like the real server's pydantic error, with a readable ``message``."""
    text = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
    return ApiError(400, f"Validation error: {text}", validation_error=errors)


def _error(loc: Sequence[str | int], msg: str, kind: str = "value_error") -> dict[str, Any]:
    return {"loc": list(loc), "msg": msg, "type": kind}


# -- parsing (pure) ------------------------------------------------------------


def utc_naive(moment: datetime) -> datetime:
    """ResultsDB stores naive UTC datetimes."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment


def _from_milliseconds(value: int) -> datetime:
    seconds, millis = divmod(value, 1000)
    moment = datetime.fromtimestamp(seconds, tz=UTC).replace(microsecond=millis * 1000)
    return utc_naive(moment)


def parse_submit_time(value: Any) -> datetime | None:
    """``submit_time`` as the real parser takes it: None, epoch milliseconds, or
    ``%Y-%m-%dT%H:%M:%S.%f`` (optionally with ``Z``, ``+00`` or an offset)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return _from_milliseconds(value)
    if isinstance(value, str):
        for suffix in ("Z", "", "%z", "+00"):
            try:
                return utc_naive(datetime.strptime(value, f"{TIME_FORMAT}{suffix}"))
            except ValueError:
                pass
        try:
            return _from_milliseconds(int(value))
        except ValueError:
            pass
    raise ValueError(
        "Expected timestamp in milliseconds or datetime"
        f" (in format YYYY-MM-DDTHH:MM:SS.ffffff), got {value!r}"
    )


def parse_since(value: str) -> tuple[datetime | None, datetime | None]:
    """``since=START[,END]`` in ISO 8601; the real server drops the timezone (not converts)."""
    parts = value.split(",")
    try:
        start = datetime.fromisoformat(parts[0].strip()).replace(tzinfo=None)
        end = None
        if len(parts) > 1:
            end = datetime.fromisoformat(parts[1].strip()).replace(tzinfo=None)
    except ValueError as exc:
        raise ValueError("must be in ISO8601 format") from exc
    return start, end


def _split(values: Iterable[str]) -> tuple[str, ...]:
    """Comma lists as the real QueryList: split, strip, drop empties."""
    return tuple(x.strip() for v in values for x in v.split(",") if x.strip())


def _int_param(raw: str | None, name: str, default: int, errors: list[dict[str, Any]]) -> int:
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        errors.append(_error(["query", name], "value is not a valid integer", "type_error"))
        return default


@dataclass(frozen=True)
class NewResult:
    """A validated POST /results body."""

    outcome: str
    testcase: str
    testcase_fields: dict[str, Any]  # keys present in a testcase object (ref_url)
    groups: tuple[dict[str, Any], ...]
    note: str | None
    ref_url: str | None
    data: tuple[tuple[str, str], ...]
    submit_time: datetime | None


_RESULT_FIELDS = frozenset(
    {"outcome", "testcase", "groups", "note", "ref_url", "data", "submit_time", "_auth_token"}
)
_GROUP_FIELDS = frozenset({"uuid", "description", "ref_url"})


def _optional_str(body: dict[str, Any], key: str, errors: list[dict[str, Any]]) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        errors.append(_error([key], "str type expected", "type_error.str"))
        return None
    return value


def _parse_testcase(value: Any, errors: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    if isinstance(value, str) and value.strip():
        return value, {}
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"name", "ref_url"})
        if unknown:
            errors.append(_error(["testcase"], f"unknown fields {unknown}"))
        name = value.get("name")
        ref_url = value.get("ref_url")
        if not isinstance(name, str) or not name.strip():
            errors.append(_error(["testcase", "name"], "testcase name must be non-empty"))
        if ref_url is not None and not isinstance(ref_url, str):
            errors.append(_error(["testcase", "ref_url"], "str type expected", "type_error.str"))
        fields = {"ref_url": ref_url} if "ref_url" in value else {}
        return (name if isinstance(name, str) else ""), fields
    errors.append(_error(["testcase"], "testcase name must be non-empty"))
    return "", {}


def _parse_groups(value: Any, errors: list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        errors.append(_error(["groups"], "value is not a valid list", "type_error.list"))
        return ()
    groups: list[dict[str, Any]] = []
    for i, raw in enumerate(value):
        if not isinstance(raw, str | dict):
            errors.append(_error(["groups", i], "a group is a uuid string or an object"))
            continue
        grp = {"uuid": raw} if isinstance(raw, str) else dict(raw)
        unknown = sorted(set(grp) - _GROUP_FIELDS)
        if unknown:
            errors.append(_error(["groups", i], f"unknown fields {unknown}"))
        for key in _GROUP_FIELDS & set(grp):
            if grp[key] is not None and not isinstance(grp[key], str):
                errors.append(_error(["groups", i, key], "str type expected", "type_error.str"))
        group_id = grp.get("uuid") or str(uuid.uuid1())
        if not isinstance(group_id, str) or len(group_id) > GROUP_UUID_MAX:
            errors.append(_error(["groups", i, "uuid"], f"at most {GROUP_UUID_MAX} characters"))
            continue
        grp["uuid"] = group_id
        if all(g["uuid"] != group_id for g in groups):
            groups.append(grp)
    return tuple(groups)


def _parse_data(value: Any, errors: list[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        errors.append(_error(["data"], "value is not a valid dict", "type_error.dict"))
        return ()
    pairs: list[tuple[str, str]] = []
    for key, item in value.items():
        values = item if isinstance(item, list) else [item]
        if not all(isinstance(v, str) for v in values):
            errors.append(_error(["data", key], "a string or a list of strings expected"))
            continue
        pairs.extend((key, v) for v in values)
    return tuple(pairs)


def parse_new_result(body: Any) -> NewResult:
    """Validate a POST /results body; raise ApiError(400) listing every problem."""
    if not isinstance(body, dict):
        raise ApiError(400, "Malformed Request: the body is not a JSON object")
    errors: list[dict[str, Any]] = []
    unknown = sorted(set(body) - _RESULT_FIELDS)
    if unknown:
        errors.append(_error(["body"], f"unknown fields {unknown}", "value_error.extra"))
    raw_outcome = body.get("outcome")
    outcome = raw_outcome.strip().upper() if isinstance(raw_outcome, str) else ""
    if "outcome" not in body:
        errors.append(_error(["outcome"], "field required", "value_error.missing"))
    elif outcome not in OUTCOMES:
        errors.append(_error(["outcome"], f"must be one of: {', '.join(OUTCOMES)}"))
    if "testcase" not in body:
        errors.append(_error(["testcase"], "field required", "value_error.missing"))
        name, tc_fields = "", dict[str, Any]()
    else:
        name, tc_fields = _parse_testcase(body["testcase"], errors)
    groups = _parse_groups(body.get("groups"), errors)
    note = _optional_str(body, "note", errors)
    ref_url = _optional_str(body, "ref_url", errors)
    data = _parse_data(body.get("data"), errors)
    try:
        submit_time = parse_submit_time(body.get("submit_time"))
    except ValueError as exc:
        errors.append(_error(["submit_time"], str(exc)))
        submit_time = None
    if errors:
        raise _invalid(errors)
    colons = sorted({key for key, _ in data if ":" in key})
    if colons:
        raise ApiError(400, f"Colon not allowed in key name: {colons!r}")
    return NewResult(outcome, name, tc_fields, groups, note, ref_url, data, submit_time)


def _parse_object(body: Any, allowed: frozenset[str]) -> dict[str, Any]:
    """A flat POST body of optional strings (groups, testcases)."""
    if not isinstance(body, dict):
        raise ApiError(400, "Malformed Request: the body is not a JSON object")
    errors: list[dict[str, Any]] = []
    unknown = sorted(set(body) - allowed - {"_auth_token"})
    if unknown:
        errors.append(_error(["body"], f"unknown fields {unknown}", "value_error.extra"))
    for key in allowed & set(body):
        if body[key] is not None and not isinstance(body[key], str):
            errors.append(_error([key], "str type expected", "type_error.str"))
    if errors:
        raise _invalid(errors)
    return {k: body.get(k) for k in allowed}


@dataclass(frozen=True)
class ResultQuery:
    """The filters of GET /results and /results/latest."""

    page: int = 0
    limit: int = QUERY_LIMIT
    since_start: datetime | None = None
    since_end: datetime | None = None
    outcomes: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    testcases: tuple[str, ...] = ()
    testcases_like: tuple[str, ...] = ()
    data: tuple[tuple[str, tuple[str, ...]], ...] = ()
    ascending: bool = False
    distinct_on: tuple[str, ...] = ()


def parse_result_query(pairs: Sequence[tuple[str, str]]) -> ResultQuery:
    """Query parameters -> ResultQuery; unknown keys are result-data filters."""
    multi: dict[str, list[str]] = {}
    for key, value in pairs:
        multi.setdefault(key, []).append(value)

    def first(key: str) -> str | None:
        return multi[key][0] if key in multi else None

    errors: list[dict[str, Any]] = []
    page = _int_param(first("page"), "page", 0, errors)
    limit = _int_param(first("limit"), "limit", QUERY_LIMIT, errors)
    if limit < 0:
        errors.append(_error(["query", "limit"], "must not be negative"))
    outcomes = tuple(o.upper() for o in _split(multi.get("outcome", [])))
    if any(o not in OUTCOMES for o in outcomes):
        errors.append(_error(["query", "outcome"], f"must be one of: {', '.join(OUTCOMES)}"))
    start = end = None
    if "since" in multi:
        try:
            start, end = parse_since(multi["since"][0])
        except ValueError as exc:
            errors.append(_error(["query", "since"], str(exc)))
    if errors:
        raise _invalid(errors)
    data = tuple(
        (key, tuple(x for v in values for x in v.split(",")))
        for key, values in multi.items()
        if key not in RESERVED_RESULT_ARGS
    )
    return ResultQuery(
        page=page,
        limit=limit,
        since_start=start,
        since_end=end,
        outcomes=outcomes,
        groups=_split(multi.get("groups", [])),
        testcases=_split(multi.get("testcases", [])),
        testcases_like=_split(multi.get("testcases:like", [])),
        data=data,
        ascending=first("_sort") == "asc:submit_time",
        distinct_on=_split(multi.get("_distinct_on", [])),
    )


def prev_next_urls(
    url: str, rows: list[Any], limit: int
) -> tuple[list[Any], str | None, str | None]:
    """The real server's prev/next links, built from the request URL."""
    match = RE_PAGE.findall(url)
    if match:
        flag, page = match[0][0], int(match[0][1])
        base = RE_PAGE.sub(f"{flag}page={_PLACEHOLDER}", url)
    else:
        page = 0
        base = f"{url}&page={_PLACEHOLDER}" if "?" in url else f"{url}?page={_PLACEHOLDER}"
    base = RE_CLEAN_AMPERSANDS.sub("&", RE_CALLBACK.sub(r"\1", base))
    prev = base.replace(_PLACEHOLDER, str(page - 1)) if page > 0 else None
    nxt = None
    if len(rows) > limit:
        nxt = base.replace(_PLACEHOLDER, str(page + 1))
        rows = rows[:limit]
    return rows, prev, nxt


# -- storage -------------------------------------------------------------------
# SQL text is assembled only from constant fragments and "?" placeholder lists
# (the S608 suppressions below); every value from a request is a bound parameter.

_SCHEMA = """
CREATE TABLE IF NOT EXISTS testcase (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, ref_url TEXT);
CREATE TABLE IF NOT EXISTS grp (
    id INTEGER PRIMARY KEY, uuid TEXT NOT NULL UNIQUE, description TEXT, ref_url TEXT);
CREATE TABLE IF NOT EXISTS result (
    id INTEGER PRIMARY KEY, testcase_name TEXT NOT NULL REFERENCES testcase(name),
    submit_time TEXT NOT NULL, outcome TEXT NOT NULL, note TEXT, ref_url TEXT);
CREATE INDEX IF NOT EXISTS result_submit_time ON result(submit_time);
CREATE INDEX IF NOT EXISTS result_testcase ON result(testcase_name);
CREATE TABLE IF NOT EXISTS groups_to_results (
    id INTEGER PRIMARY KEY, group_uuid TEXT NOT NULL REFERENCES grp(uuid),
    result_id INTEGER NOT NULL REFERENCES result(id));
CREATE INDEX IF NOT EXISTS gtr_result ON groups_to_results(result_id);
CREATE INDEX IF NOT EXISTS gtr_group ON groups_to_results(group_uuid);
CREATE TABLE IF NOT EXISTS result_data (
    id INTEGER PRIMARY KEY, result_id INTEGER NOT NULL REFERENCES result(id),
    key TEXT NOT NULL, value TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS result_data_key_value ON result_data(key, value);
CREATE INDEX IF NOT EXISTS result_data_result ON result_data(result_id);
"""


@dataclass(frozen=True)
class StoredResult:
    id: int
    testcase: str
    testcase_ref_url: str | None
    submit_time: datetime
    outcome: str
    note: str | None
    ref_url: str | None
    groups: tuple[str, ...]
    data: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class StoredGroup:
    uuid: str
    description: str | None
    ref_url: str | None
    results_count: int


def _like(pattern: str) -> str:
    return pattern.replace("*", "%")


def _marks(values: Sequence[Any]) -> str:
    return ",".join("?" * len(values))


def _result_filters(
    q: ResultQuery, *, testcases: bool = True, outcomes: bool = True
) -> tuple[list[str], list[Any]]:
    """SQL conditions on ``result r`` for a query (as ``select_results`` builds them)."""
    where: list[str] = []
    args: list[Any] = []
    if q.since_start is not None:
        where.append("r.submit_time >= ?")
        args.append(q.since_start.strftime(TIME_FORMAT))
    if q.since_end is not None:
        where.append("r.submit_time <= ?")
        args.append(q.since_end.strftime(TIME_FORMAT))
    if outcomes and q.outcomes:
        where.append(f"r.outcome IN ({_marks(q.outcomes)})")
        args.extend(q.outcomes)
    if q.groups:
        where.append(
            "EXISTS (SELECT 1 FROM groups_to_results g WHERE g.result_id = r.id"  # noqa: S608
            f" AND g.group_uuid IN ({_marks(q.groups)}))"
        )
        args.extend(q.groups)
    if testcases and (q.testcases or q.testcases_like):
        ors = []
        if q.testcases:
            ors.append(f"r.testcase_name IN ({_marks(q.testcases)})")
            args.extend(q.testcases)
        for pattern in q.testcases_like:
            ors.append("r.testcase_name LIKE ?")
            args.append(_like(pattern))
        where.append("(" + " OR ".join(ors) + ")")
    for raw_key, wanted in q.data:
        key, _, modifier = raw_key.partition(":")
        if raw_key.count(":") > 1:  # the real server cannot split it: a plain key
            key, modifier = raw_key, ""
        if modifier == "like":
            test = " OR ".join("d.value LIKE ?" for _ in wanted)
            values = tuple(_like(v) for v in wanted)
        else:
            test = f"d.value IN ({_marks(wanted)})"
            values = wanted
        where.append(
            "EXISTS (SELECT 1 FROM result_data d WHERE d.result_id = r.id"  # noqa: S608
            f" AND d.key = ? AND ({test}))"
        )
        args.append(key)
        args.extend(values)
    return where, args


def _where_sql(where: list[str]) -> str:
    return (" WHERE " + " AND ".join(where)) if where else ""


class Store:
    """ResultsDB's tables in SQLite; one connection, one lock (thread-safe)."""

    def __init__(self, path: str | os.PathLike[str] = ":memory:") -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA case_sensitive_like = ON")  # LIKE as in PostgreSQL
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.executescript(_SCHEMA)
        self._last_time: datetime | None = None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def ping(self) -> None:
        with self._lock:
            self._db.execute("SELECT 1 FROM result LIMIT 0").fetchall()

    # -- writes --
    def _now(self) -> datetime:
        now = datetime.now(UTC).replace(tzinfo=None)
        if self._last_time is not None and now <= self._last_time:
            now = self._last_time + timedelta(microseconds=1)
        self._last_time = now
        return now

    def _upsert_group(self, grp: dict[str, Any], *, truthy_only: bool = False) -> None:
        row = self._db.execute(
            "SELECT description, ref_url FROM grp WHERE uuid = ?", (grp["uuid"],)
        ).fetchone()
        description, ref_url = row if row else (None, None)
        for key in ("description", "ref_url"):
            if key in grp and (grp[key] or not truthy_only):
                if key == "description":
                    description = grp[key]
                else:
                    ref_url = grp[key]
        self._db.execute(
            "INSERT INTO grp(uuid, description, ref_url) VALUES (?, ?, ?)"
            " ON CONFLICT(uuid) DO UPDATE SET description = excluded.description,"
            " ref_url = excluded.ref_url",
            (grp["uuid"], description, ref_url),
        )

    def _upsert_testcase(self, name: str, fields: dict[str, Any]) -> None:
        self._db.execute("INSERT OR IGNORE INTO testcase(name) VALUES (?)", (name,))
        if "ref_url" in fields:
            self._db.execute(
                "UPDATE testcase SET ref_url = ? WHERE name = ?", (fields["ref_url"], name)
            )

    def add_result(self, new: NewResult) -> int:
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._upsert_testcase(new.testcase, new.testcase_fields)
            for grp in new.groups:
                self._upsert_group(grp)
            when = new.submit_time or self._now()
            cur = self._db.execute(
                "INSERT INTO result(testcase_name, submit_time, outcome, note, ref_url)"
                " VALUES (?, ?, ?, ?, ?)",
                (new.testcase, when.strftime(TIME_FORMAT), new.outcome, new.note, new.ref_url),
            )
            result_id = int(cur.lastrowid or 0)
            self._db.executemany(
                "INSERT INTO groups_to_results(group_uuid, result_id) VALUES (?, ?)",
                [(g["uuid"], result_id) for g in new.groups],
            )
            self._db.executemany(
                "INSERT INTO result_data(result_id, key, value) VALUES (?, ?, ?)",
                [(result_id, k, v) for k, v in new.data],
            )
            return result_id

    def save_group(self, fields: dict[str, Any]) -> str:
        """POST /groups: find by uuid, else create (uuid1); set truthy fields."""
        group_id = fields.get("uuid") or str(uuid.uuid1())
        if len(group_id) > GROUP_UUID_MAX:
            raise _invalid([_error(["uuid"], f"at most {GROUP_UUID_MAX} characters")])
        with self._lock, self._db:
            self._db.execute("BEGIN")
            grp = {k: v for k, v in fields.items() if k != "uuid"}
            self._upsert_group({"uuid": group_id, **grp}, truthy_only=True)
        return group_id

    def save_testcase(self, name: str, ref_url: str | None) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._upsert_testcase(name, {"ref_url": ref_url} if ref_url is not None else {})

    # -- reads --
    def _load(self, ids: Sequence[int]) -> list[StoredResult]:
        if not ids:
            return []
        marks = _marks(ids)
        rows = {
            row[0]: row
            for row in self._db.execute(
                "SELECT r.id, r.testcase_name, t.ref_url, r.submit_time, r.outcome, r.note,"  # noqa: S608
                f" r.ref_url FROM result r JOIN testcase t ON t.name = r.testcase_name"
                f" WHERE r.id IN ({marks})",
                list(ids),
            )
        }
        groups: dict[int, list[str]] = {}
        for rid, guuid in self._db.execute(
            f"SELECT result_id, group_uuid FROM groups_to_results WHERE result_id IN ({marks})"  # noqa: S608
            " ORDER BY id",
            list(ids),
        ):
            groups.setdefault(rid, []).append(guuid)
        data: dict[int, list[tuple[str, str]]] = {}
        for rid, key, value in self._db.execute(
            f"SELECT result_id, key, value FROM result_data WHERE result_id IN ({marks})"  # noqa: S608
            " ORDER BY id",
            list(ids),
        ):
            data.setdefault(rid, []).append((key, value))
        out = []
        for rid in ids:
            if rid not in rows:
                continue
            r = rows[rid]
            out.append(
                StoredResult(
                    id=r[0],
                    testcase=r[1],
                    testcase_ref_url=r[2],
                    submit_time=datetime.strptime(r[3], TIME_FORMAT),
                    outcome=r[4],
                    note=r[5],
                    ref_url=r[6],
                    groups=tuple(groups.get(rid, ())),
                    data=tuple(data.get(rid, ())),
                )
            )
        return out

    def result(self, result_id: int) -> StoredResult | None:
        with self._lock:
            found = self._load([result_id])
        return found[0] if found else None

    def results(self, q: ResultQuery) -> list[StoredResult]:
        """Matching results, newest first, one page plus one row (to know of a next page)."""
        where, args = _result_filters(q)
        order = "ASC" if q.ascending else "DESC"
        sql = (
            f"SELECT r.id FROM result r{_where_sql(where)}"  # noqa: S608
            f" ORDER BY r.submit_time {order}, r.id {order} LIMIT ? OFFSET ?"
        )
        args += [q.limit + 1, q.page * q.limit if q.page > 0 else 0]
        with self._lock:
            ids = [row[0] for row in self._db.execute(sql, args)]
            return self._load(ids)

    def latest(self, q: ResultQuery) -> list[StoredResult]:
        """The newest result per testcase (``/results/latest``; outcome is not a filter there)."""
        sub_where, sub_args = _result_filters(q, testcases=False, outcomes=False)
        where, args = _result_filters(q, outcomes=False)
        sql = (
            "SELECT r.id FROM result r JOIN (SELECT r.testcase_name AS name,"  # noqa: S608
            f" MAX(r.submit_time) AS newest FROM result r{_where_sql(sub_where)}"
            " GROUP BY r.testcase_name) sq"
            " ON r.testcase_name = sq.name AND r.submit_time = sq.newest"
            f"{_where_sql(where)} ORDER BY r.submit_time DESC, r.id DESC"
        )
        with self._lock:
            ids = [row[0] for row in self._db.execute(sql, sub_args + args)]
            return self._load(ids)

    def groups(
        self,
        uuids: Sequence[str],
        descriptions: Sequence[str],
        like: Sequence[str],
        page: int,
        limit: int,
    ) -> list[StoredGroup]:
        where: list[str] = []
        args: list[Any] = []
        if descriptions:
            where.append(f"g.description IN ({_marks(descriptions)})")
            args.extend(descriptions)
        elif like:
            where.append("(" + " OR ".join("g.description LIKE ?" for _ in like) + ")")
            args.extend(_like(p) for p in like)
        if uuids:
            where.append(f"g.uuid IN ({_marks(uuids)})")
            args.extend(uuids)
        sql = (
            "SELECT g.uuid, g.description, g.ref_url,"  # noqa: S608
            " (SELECT COUNT(*) FROM groups_to_results x WHERE x.group_uuid = g.uuid)"
            f" FROM grp g{_where_sql(where)} ORDER BY g.id DESC LIMIT ? OFFSET ?"
        )
        args += [limit + 1, page * limit if page > 0 else 0]
        with self._lock:
            return [StoredGroup(*row) for row in self._db.execute(sql, args)]

    def group(self, group_id: str) -> StoredGroup | None:
        found = self.groups([group_id], [], [], 0, 1)
        return found[0] if found else None

    def testcases(
        self, names: Sequence[str], like: Sequence[str], page: int, limit: int
    ) -> list[tuple[str, str | None]]:
        where: list[str] = []
        args: list[Any] = []
        if names:
            where.append(f"name IN ({_marks(names)})")
            args.extend(names)
        elif like:
            where.append("(" + " OR ".join("name LIKE ?" for _ in like) + ")")
            args.extend(_like(p) for p in like)
        sql = (
            f"SELECT name, ref_url FROM testcase{_where_sql(where)}"  # noqa: S608
            " ORDER BY name ASC LIMIT ? OFFSET ?"
        )
        args += [limit + 1, page * limit if page > 0 else 0]
        with self._lock:
            return [(row[0], row[1]) for row in self._db.execute(sql, args)]

    def testcase(self, name: str) -> tuple[str, str | None] | None:
        found = self.testcases([name], [], 0, 1)
        return found[0] if found else None


# -- serialisation (the real serializer's shapes) ------------------------------


def testcase_json(base: str, name: str, ref_url: str | None) -> dict[str, Any]:
    return {"name": name, "ref_url": ref_url, "href": f"{base}/testcases/{quote(name, _URL_SAFE)}"}


def result_json(base: str, r: StoredResult) -> dict[str, Any]:
    data: dict[str, list[str]] = {}
    for key, value in r.data:
        data.setdefault(key, []).append(value)
    return {
        "id": r.id,
        "groups": list(r.groups),
        "testcase": testcase_json(base, r.testcase, r.testcase_ref_url),
        "submit_time": r.submit_time.isoformat(),
        "outcome": r.outcome,
        "note": r.note,
        "ref_url": r.ref_url,
        "data": data,
        "href": f"{base}/results/{r.id}",
    }


def group_json(base: str, g: StoredGroup) -> dict[str, Any]:
    return {
        "uuid": g.uuid,
        "description": g.description,
        "ref_url": g.ref_url,
        "results": f"{base}/results?{urlencode({'groups': g.uuid})}",
        "results_count": g.results_count,
        "href": f"{base}/groups/{quote(g.uuid, _URL_SAFE)}",
    }


# -- the API (routing, no sockets) ---------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # decoded, under API_PREFIX or not
    query: tuple[tuple[str, str], ...]
    body: bytes
    origin: str  # scheme://host[:port] as the client addressed it
    url: str  # the full URL as requested (for prev/next links)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, status: int, payload: Any) -> Response:
        return cls(status, json.dumps(payload, sort_keys=True).encode())


def _page_args(query: Sequence[tuple[str, str]]) -> tuple[int, int, dict[str, str]]:
    params = dict(reversed(query))  # first value wins, as request.args.get
    errors: list[dict[str, Any]] = []
    page = _int_param(params.get("page"), "page", 0, errors)
    limit = _int_param(params.get("limit"), "limit", QUERY_LIMIT, errors)
    if limit < 0:
        errors.append(_error(["query", "limit"], "must not be negative"))
    if errors:
        raise _invalid(errors)
    return page, limit, params


class Api:
    """The v2.0 endpoints over a Store; publishes ``resultsdb.result.new``."""

    def __init__(self, store: Store, publisher: Publisher | None = None) -> None:
        self.store = store
        self.publisher = publisher

    def handle(self, req: Request) -> Response:
        try:
            return self._route(req)
        except ApiError as exc:
            return Response.json(exc.status, exc.body)

    def _route(self, req: Request) -> Response:
        if req.path != API_PREFIX and not req.path.startswith(API_PREFIX + "/"):
            raise ApiError(404, "Not found")
        path = req.path[len(API_PREFIX) :]
        base = req.origin + API_PREFIX
        parts = path.strip("/").split("/", 1)
        head, rest = parts[0], (parts[1] if len(parts) > 1 else "")
        routes: dict[tuple[str, bool], dict[str, Callable[[], Response]]] = {
            ("", False): {"GET": lambda: self._landing(base)},
            ("healthcheck", False): {"GET": self._healthcheck},
            ("results", False): {
                "GET": lambda: self._results(req, base, ResultQuery()),
                "POST": lambda: self._create_result(req, base),
            },
            ("results", True): {"GET": lambda: self._result_or_latest(req, base, rest)},
            ("groups", False): {
                "GET": lambda: self._groups(req, base),
                "POST": lambda: self._create_group(req, base),
            },
            ("groups", True): {"GET": lambda: self._group(req, base, rest)},
            ("testcases", False): {
                "GET": lambda: self._testcases(req, base),
                "POST": lambda: self._create_testcase(req, base),
            },
            ("testcases", True): {"GET": lambda: self._testcase(req, base, rest)},
        }
        handlers = routes.get((head, bool(rest)))
        if handlers is None:
            raise ApiError(404, "Not found")
        handler = handlers.get(req.method)
        if handler is None:
            raise ApiError(405, "The method is not allowed for the requested URL.")
        return handler()

    # -- endpoints --
    def _landing(self, base: str) -> Response:
        return Response.json(
            300,
            {
                "message": "ResultsDB API v2.0 (fedimg devel stand-in)",
                "groups": f"{base}/groups",
                "results": f"{base}/results",
                "testcases": f"{base}/testcases",
                "outcomes": list(OUTCOMES),
            },
        )

    def _healthcheck(self) -> Response:
        try:
            self.store.ping()
        except sqlite3.Error:
            log.exception("healthcheck failed on the database")
            return Response.json(503, {"message": "Unable to communicate with database"})
        return Response.json(200, {"message": "Health check OK"})

    def _json_body(self, req: Request) -> Any:
        try:
            return json.loads(req.body or b"null")
        except ValueError as exc:
            raise ApiError(400, f"Malformed Request: the body is not JSON: {exc}") from exc

    def _results(self, req: Request, base: str, extra: ResultQuery) -> Response:
        q = parse_result_query(req.query)
        if extra.groups:
            q = replace(q, groups=extra.groups)
        if extra.testcases:
            q = replace(q, testcases=extra.testcases)
        rows, prev, nxt = prev_next_urls(req.url, self.store.results(q), q.limit)
        return Response.json(
            200, {"prev": prev, "next": nxt, "data": [result_json(base, r) for r in rows]}
        )

    def _result_or_latest(self, req: Request, base: str, rest: str) -> Response:
        if rest == "latest":
            q = parse_result_query(req.query)
            if q.distinct_on:
                raise ApiError(400, "_distinct_on is not supported by the ResultsDB stand-in")
            return Response.json(
                200, {"data": [result_json(base, r) for r in self.store.latest(q)]}
            )
        try:
            result_id = int(rest)
        except ValueError:
            raise ApiError(404, "Result not found") from None
        found = self.store.result(result_id)
        if found is None:
            raise ApiError(404, "Result not found")
        return Response.json(200, result_json(base, found))

    def _create_result(self, req: Request, base: str) -> Response:
        new = parse_new_result(self._json_body(req))
        result_id = self.store.add_result(new)
        stored = self.store.result(result_id)
        assert stored is not None
        body = result_json(base, stored)
        log.info(
            "result %s: %s %s for %s",
            result_id,
            new.testcase,
            new.outcome,
            body["data"].get("item"),
        )
        self._publish(body)
        return Response.json(201, body)

    def _publish(self, body: dict[str, Any]) -> None:
        """Publish like the real fedmsg plugin: after the commit, failures only logged."""
        if self.publisher is None:
            return
        try:
            RESULT_NEW.validate(body)
        except InvalidMessage:
            log.exception("result %s: not publishing a body that breaks the contract", body["id"])
            return
        try:
            self.publisher(RESULT_NEW.modname, RESULT_NEW.name, body)
        except Exception:
            log.exception("result %s: publishing %s failed", body["id"], RESULT_NEW)

    def _groups(self, req: Request, base: str) -> Response:
        page, limit, params = _page_args(req.query)
        rows = self.store.groups(
            _split([params.get("uuid", "")]),
            _split([params.get("description", "")]),
            _split([params.get("description:like", "")]),
            page,
            limit,
        )
        rows, prev, nxt = prev_next_urls(req.url, rows, limit)
        return Response.json(
            200, {"prev": prev, "next": nxt, "data": [group_json(base, g) for g in rows]}
        )

    def _group(self, req: Request, base: str, rest: str) -> Response:
        group_id, _, tail = rest.partition("/")
        found = self.store.group(group_id)
        if tail == "results":
            if found is None:
                raise ApiError(404, f"Group not found: {group_id}")
            return self._results(req, base, ResultQuery(groups=(group_id,)))
        if tail or found is None:
            raise ApiError(404, "Group not found")
        return Response.json(200, group_json(base, found))

    def _create_group(self, req: Request, base: str) -> Response:
        fields = _parse_object(self._json_body(req), frozenset({"uuid", "description", "ref_url"}))
        group_id = self.store.save_group(fields)
        found = self.store.group(group_id)
        assert found is not None
        return Response.json(201, group_json(base, found))

    def _testcases(self, req: Request, base: str) -> Response:
        page, limit, params = _page_args(req.query)
        rows = self.store.testcases(
            _split([params.get("name", "")]), _split([params.get("name:like", "")]), page, limit
        )
        rows, prev, nxt = prev_next_urls(req.url, rows, limit)
        return Response.json(
            200, {"prev": prev, "next": nxt, "data": [testcase_json(base, *t) for t in rows]}
        )

    def _testcase(self, req: Request, base: str, rest: str) -> Response:
        if rest.endswith("/results"):
            name = rest[: -len("/results")]
            if self.store.testcase(name) is None:
                raise ApiError(404, "Testcase not found")
            return self._results(req, base, ResultQuery(testcases=(name,)))
        found = self.store.testcase(rest)
        if found is None:
            raise ApiError(404, "Testcase not found")
        return Response.json(200, testcase_json(base, *found))

    def _create_testcase(self, req: Request, base: str) -> Response:
        fields = _parse_object(self._json_body(req), frozenset({"name", "ref_url"}))
        name = fields["name"]
        if not name:
            raise _invalid([_error(["name"], "ensure this value has at least 1 characters")])
        self.store.save_testcase(name, fields["ref_url"])
        found = self.store.testcase(name)
        assert found is not None
        return Response.json(201, testcase_json(base, *found))


# -- faults for tests ------------------------------------------------------------


class Faults:
    """Planned failures, consumed one per request (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down = False
        self._planned: deque[Response] = deque()

    def set_down(self, down: bool) -> None:
        with self._lock:
            self._down = down

    def plan(self, n: int, response: Response) -> None:
        if n < 0:
            raise ValueError("n must not be negative")
        with self._lock:
            self._planned.extend([response] * n)

    def clear(self) -> None:
        with self._lock:
            self._down = False
            self._planned.clear()

    def take(self) -> Response | None:
        with self._lock:
            if self._down:
                return Response.json(503, {"message": "Service Unavailable"})
            return self._planned.popleft() if self._planned else None


# -- the HTTP shell ---------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: ResultsDBServer


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "ResultsDB-standin/2.0"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        owner = self.server.owner
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self._send(Response.json(413 if length > 0 else 400, {"message": "Bad request"}))
            return
        body = self.rfile.read(length) if length else b""
        host = self.headers.get("Host") or f"{owner.host}:{owner.port}"
        parts = urlsplit(self.path)
        req = Request(
            method=method,
            path=unquote(parts.path),
            query=tuple(parse_qsl(parts.query, keep_blank_values=True)),
            body=body,
            origin=f"http://{host}",
            url=f"http://{host}{self.path}",
        )
        try:
            response = owner.respond(req)
        except Exception:
            log.exception("%s %s failed", method, self.path)
            response = Response.json(500, {"message": "Internal Server Error"})
        self._send(response)

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class ResultsDBServer:
    """The stand-in in this process: ``with ResultsDBServer() as rdb: rdb.url``."""

    def __init__(
        self,
        db_path: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        publisher: Publisher | None = None,
    ) -> None:
        self.db_path = str(db_path) if db_path is not None else ":memory:"
        self.host = host
        self.port = port
        self.publisher = publisher
        self.faults = Faults()
        self.store: Store | None = None
        self.api: Api | None = None
        self._http: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._count_lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        """The API base URL, ending in ``/api/v2.0``."""
        if self._http is None:
            raise RuntimeError("the ResultsDB stand-in is not started")
        return f"http://{self.host}:{self.port}{API_PREFIX}"

    handler: type[_Handler] = _Handler
    name = "resultsdb-standin"

    def _build(self) -> None:
        """The store and the API behind the HTTP shell (a subclass builds its own)."""
        self.store = Store(self.db_path)
        self.api = Api(self.store, self.publisher)

    def start(self) -> Self:
        self._build()
        self._http = _HTTPServer((self.host, self.port), self.handler)
        self._http.owner = self
        self.port = int(self._http.server_address[1])
        self._thread = threading.Thread(
            target=self._http.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=self.name,
            daemon=True,
        )
        self._thread.start()
        log.info("%s on %s (db %s)", self.name, self.url, self.db_path)
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test switches --
    def set_down(self, down: bool = True) -> None:
        """Answer 503 to every request while down."""
        self.faults.set_down(down)

    def fail_next(self, n: int = 1, status: int = 500) -> None:
        """Answer the next ``n`` requests with ``status`` and the real 5xx body."""
        self.faults.plan(n, Response.json(status, {"message": "Internal Server Error"}))

    def reject_next(self, n: int = 1) -> None:
        """Answer the next ``n`` requests with 400."""
        self.faults.plan(n, Response.json(400, {"message": "Bad request"}))

    def garble_next(self, n: int = 1, body: bytes = b"<html>not json</html>") -> None:
        """Answer the next ``n`` requests with 200 and ``body`` as is."""
        self.faults.plan(n, Response(200, body, "text/html"))

    def request_count(self, method: str | None = None, path_suffix: str = "") -> int:
        """How many requests arrived (fault answers included)."""
        with self._count_lock:
            return sum(
                1
                for m, p in self.requests
                if (method is None or m == method) and p.endswith(path_suffix)
            )

    def respond(self, req: Request) -> Response:
        with self._count_lock:
            self.requests.append((req.method, req.path))
        planned = self.faults.take()
        if planned is not None:
            return planned
        assert self.api is not None
        return self.api.handle(req)


# -- a publisher on one thread (fedmsg keeps one context per thread) ----------------


class PublishTimeout(TimeoutError):
    """The publisher thread did not finish a publish before its deadline."""


@dataclass
class _Job:
    args: tuple[str, str, dict[str, Any]]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class SerialPublisher:
    """Runs ``publish`` in one dedicated thread; each call waits for its publish."""

    def __init__(
        self,
        publish: Publisher,
        setup: Callable[[], None] | None = None,
        teardown: Callable[[], None] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self._publish = publish
        self._setup = setup
        self._teardown = teardown
        self.timeout = timeout
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._ready = threading.Event()
        self._setup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="resultsdb-publisher", daemon=True)

    def start(self, timeout: float = 30.0) -> SerialPublisher:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise PublishTimeout(f"publisher setup took more than {timeout:.0f}s")
        if self._setup_error is not None:
            raise RuntimeError(
                f"publisher setup failed: {self._setup_error}"
            ) from self._setup_error
        return self

    def _run(self) -> None:
        try:
            if self._setup is not None:
                self._setup()
        except Exception as exc:  # noqa: BLE001 - start() raises it in the caller
            self._setup_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while (job := self._jobs.get()) is not None:
                try:
                    self._publish(*job.args)
                except Exception as exc:  # noqa: BLE001 - __call__ re-raises it
                    job.error = exc
                job.done.set()
        finally:
            if self._teardown is not None:
                self._teardown()

    def __call__(self, modname: str, topic: str, body: dict[str, Any]) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the publisher thread is not running")
        job = _Job((modname, topic, body))
        self._jobs.put(job)
        if not job.done.wait(self.timeout):
            raise PublishTimeout(f"publishing {modname}.{topic} took more than {self.timeout:.0f}s")
        if job.error is not None:
            raise job.error

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout)


def fedmsg_config_found(cwd: Path | None = None) -> bool:
    """Whether fedmsg would find a config: ``$FEDMSG_CONFIG`` or ``./fedmsg.d``."""
    env = os.environ.get("FEDMSG_CONFIG")
    if env and Path(env).exists():
        return True
    return ((cwd or Path.cwd()) / "fedmsg.d").is_dir()


def fedmsg_bus() -> SerialPublisher:
    """Publish through fedmsg to the configured relay (``active``: connect to relay_inbound)."""
    import fedmsg

    from fedimg.messages import fedmsg_publisher

    return SerialPublisher(
        fedmsg_publisher(), setup=lambda: fedmsg.init(active=True), teardown=fedmsg.destroy
    ).start()


def fan_out(*publishers: Publisher) -> Publisher:
    """One Publisher that hands every message to each of ``publishers`` (fedmsg and AMQP).

    A failing bus does not keep the message from the others; the first error
    is raised once all were tried.
    """

    def publish(modname: str, topic: str, body: dict[str, Any]) -> None:
        first: Exception | None = None
        for each in publishers:
            try:
                each(modname, topic, body)
            except Exception as exc:  # noqa: BLE001 - raised below, after the other buses
                first = first or exc
        if first is not None:
            raise first

    return publish


def amqp_bus(conf_path: Path) -> Publisher:
    """Publish through fedora-messaging, configured by the TOML at ``conf_path``.

    As the real ResultsDB does (its "fedmsg" plugin calls
    ``fedora_messaging.api.publish``): topic ``resultsdb.result.new`` under the
    config's ``topic_prefix``, body = the result as the API returns it.
    """
    from fedora_messaging import config

    from fedimg.messages import amqp_publisher

    if not conf_path.is_file():
        raise FileNotFoundError(f"fedora-messaging config {conf_path} is not a file")
    config.conf.load_config(str(conf_path))
    return amqp_publisher()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A local ResultsDB API v2.0 stand-in.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--db", default=":memory:", help="SQLite file (default: in memory)")
    parser.add_argument("--no-bus", action="store_true", help="do not publish through fedmsg")
    parser.add_argument(
        "--amqp-conf",
        type=Path,
        help="also publish result.new through fedora-messaging, with this TOML config",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    bus: SerialPublisher | None = None
    if not args.no_bus and fedmsg_config_found():
        bus = fedmsg_bus()
        log.info("publishing resultsdb.result.new through fedmsg")
    elif not args.no_bus:
        log.warning("no fedmsg config found ($FEDMSG_CONFIG or ./fedmsg.d): not publishing")
    buses: list[Publisher] = [bus] if bus is not None else []
    if args.amqp_conf is not None:
        buses.append(amqp_bus(args.amqp_conf))
        log.info("publishing resultsdb.result.new through fedora-messaging (%s)", args.amqp_conf)
    publisher = fan_out(*buses) if buses else None
    server = ResultsDBServer(args.db, args.host, args.port, publisher=publisher).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(f"ResultsDB stand-in listening on {server.url}", flush=True)
    done.wait()
    log.info("stopping")
    server.stop()
    if bus is not None:
        bus.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
