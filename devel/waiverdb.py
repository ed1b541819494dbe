"""A local WaiverDB (API v1.0) stand-in: the real server's JSON, over stdlib HTTP and SQLite.

The real WaiverDB (release-engineering/waiverdb) does not run here: the
``waiverdb`` distribution on PyPI declares no dependencies and its code needs
Flask < 2.3 and flask-restful (this project runs Flask 3), plus gssapi and
python-ldap built against Kerberos and LDAP headers; its current source needs
Python >= 3.12. This stand-in answers the subset fedimg uses, with the shapes
of the real server (``waiverdb/api_v1.py``, ``fields.py``,
``models/requests.py``, ``utils.json_collection``):

* ``GET /api/v1.0/waivers/`` filtered by ``subject_type``,
  ``subject_identifier``, ``testcase``, ``scenario``, ``product_version``,
  ``username``, ``proxied_by``; newest first; obsolete waivers (an older one
  with the same subject, testcase, scenario, user and product version) left
  out unless ``include_obsolete``; paginated (``page`` from 1, ``limit``
  default 10) as ``{"data", "prev", "next", "first", "last"}``;
* ``GET /api/v1.0/waivers/<id>`` (404 ``Waiver not found``);
* ``POST /api/v1.0/waivers/`` of one waiver or a list: ``product_version``
  and ``comment`` must be non-empty, ``testcase`` and the subject
  (``subject_type`` + ``subject_identifier``, or the old ``subject`` dict
  ``{"type", "item"}``) given, ``waived`` defaults to true; the user comes from
  HTTP basic authentication (WaiverDB's ``dummy`` method; 401 without it);
  201 with the waiver(s); each stored waiver is published as
  ``waiverdb.waiver.new`` with the waiver as the body (WaiverDB's fedmsg
  publisher sends ``marshal(waiver, waiver_fields)``);
* ``GET /api/v1.0/about``.

Deliberate differences: ``result_id`` (waiving by ResultsDB result, "WaiverDB
< 0.6") is refused with 400, and errors are ``{"message": ...}`` only.

    python -m devel.waiverdb --port 5004 [--no-bus]

Test switches (from the ResultsDB stand-in): ``set_down``, ``fail_next``,
``reject_next``, ``garble_next``, ``request_count``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import signal
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from devel.resultsdb import (
    Request,
    Response,
    ResultsDBServer,
    _Handler,
    fedmsg_bus,
    fedmsg_config_found,
)
from fedimg.messages import WAIVER_NEW, InvalidMessage, Publisher

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1.0"
VERSION = "1.4.0-standin"
FILTERS = (
    "subject_type",
    "subject_identifier",
    "testcase",
    "scenario",
    "product_version",
    "username",
    "proxied_by",
)
_COLUMNS = (
    "id, subject_type, subject_identifier, testcase, username, proxied_by,"
    " product_version, waived, scenario, comment, timestamp"
)
_CREATE_KEYS = frozenset(
    {"subject_type", "subject_identifier", "testcase", "subject", "result_id", "waived"}
    | {"product_version", "comment", "username", "scenario"}
)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def waiver_json(row: Sequence[Any]) -> dict[str, Any]:
    """A stored waiver as the real ``waiver_fields`` marshal it."""
    (wid, stype, ident, testcase, user, proxied, version, waived, scenario, comment, stamp) = row
    return {
        "id": wid,
        "subject_type": stype,
        "subject_identifier": ident,
        "subject": {"type": stype, "item": ident},
        "testcase": testcase,
        "username": user,
        "proxied_by": proxied,
        "product_version": version,
        "waived": bool(waived),
        "scenario": scenario,
        "comment": comment,
        "timestamp": stamp,
    }


def _text(body: Mapping[str, Any], key: str, *, required: bool) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        raise ApiError(400, f"{key}: expected a non-empty string")
    return value


def parse_new_waiver(body: Any) -> dict[str, Any]:
    """The fields of one waiver to create, checked as ``CreateWaiver`` does."""
    if not isinstance(body, Mapping):
        raise ApiError(400, "a waiver must be a JSON object")
    unknown = sorted(set(body) - _CREATE_KEYS)
    if unknown:
        raise ApiError(400, f"unknown fields: {unknown}")
    if body.get("result_id") is not None:
        raise ApiError(400, "result_id is not supported by the WaiverDB stand-in")
    subject = body.get("subject")
    if subject is not None:
        if body.get("subject_type") is not None or body.get("subject_identifier") is not None:
            raise ApiError(400, "subject argument should not be used together with subject_type")
        if not isinstance(subject, Mapping):
            raise ApiError(400, "subject: expected an object")
        stype, ident = _text(subject, "type", required=True), _text(subject, "item", required=True)
    else:
        stype = _text(body, "subject_type", required=True)
        ident = _text(body, "subject_identifier", required=True)
    if body.get("testcase") is None:
        raise ApiError(400, "Argument testcase is missing")
    waived = body.get("waived", True)
    if not isinstance(waived, bool):
        raise ApiError(400, "waived: expected a boolean")
    return {
        "subject_type": "koji_build" if stype == "brew-build" else stype,
        "subject_identifier": ident,
        "testcase": _text(body, "testcase", required=True),
        "product_version": _text(body, "product_version", required=True),
        "comment": _text(body, "comment", required=True),
        "scenario": _text(body, "scenario", required=False),
        "username": _text(body, "username", required=False),
        "waived": waived,
    }


def basic_user(headers: Mapping[str, str]) -> str | None:
    """The user of an HTTP basic ``Authorization`` header (WaiverDB's dummy auth)."""
    value = headers.get("authorization", "")
    scheme, _, encoded = value.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        user = base64.b64decode(encoded, validate=True).decode().partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user or None


class Store:
    """Waivers in SQLite (one connection, one lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute(
            "CREATE TABLE waiver (id INTEGER PRIMARY KEY AUTOINCREMENT, subject_type TEXT,"
            " subject_identifier TEXT, testcase TEXT, username TEXT, proxied_by TEXT,"
            " product_version TEXT, waived INTEGER, scenario TEXT, comment TEXT, timestamp TEXT)"
        )

    def close(self) -> None:
        self._db.close()

    def add(self, fields: Mapping[str, Any], user: str, proxied_by: str | None) -> dict[str, Any]:
        stamp = datetime.now(UTC).replace(tzinfo=None).isoformat()
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO waiver (subject_type, subject_identifier, testcase, username,"
                " proxied_by, product_version, waived, scenario, comment, timestamp)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    fields["subject_type"],
                    fields["subject_identifier"],
                    fields["testcase"],
                    user,
                    proxied_by,
                    fields["product_version"],
                    int(fields["waived"]),
                    fields["scenario"],
                    fields["comment"],
                    stamp,
                ),
            )
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM waiver WHERE id = ?",  # noqa: S608
                (cursor.lastrowid,),
            ).fetchone()
        return waiver_json(row)

    def get(self, waiver_id: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM waiver WHERE id = ?",  # noqa: S608
                (waiver_id,),
            ).fetchone()
        return waiver_json(row) if row else None

    def query(self, filters: Mapping[str, str], include_obsolete: bool) -> list[dict[str, Any]]:
        where = [f"{key} = ?" for key in filters]
        args: list[Any] = list(filters.values())
        if not include_obsolete:
            where.append(
                "id IN (SELECT MAX(id) FROM waiver GROUP BY subject_type, subject_identifier,"
                " testcase, scenario, username, product_version)"
            )
        sql = f"SELECT {_COLUMNS} FROM waiver"  # noqa: S608
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY timestamp DESC, id DESC", args).fetchall()
        return [waiver_json(r) for r in rows]


class Api:
    """The v1.0 endpoints over a Store; publishes ``waiverdb.waiver.new``."""

    def __init__(self, store: Store, publisher: Publisher | None = None) -> None:
        self.store = store
        self.publisher = publisher
        self.superusers: frozenset[str] = frozenset()

    def handle(self, req: Request, headers: Mapping[str, str]) -> Response:
        try:
            return self._route(req, headers)
        except ApiError as exc:
            return Response.json(exc.status, {"message": exc.message})

    def _route(self, req: Request, headers: Mapping[str, str]) -> Response:
        if not req.path.startswith(API_PREFIX + "/"):
            raise ApiError(404, "Not Found")
        rest = req.path[len(API_PREFIX) :]
        if rest in ("/about", "/about/") and req.method == "GET":
            return Response.json(200, {"version": VERSION, "auth_method": "dummy"})
        if rest == "/waivers/":
            if req.method == "GET":
                return self._list(req)
            if req.method == "POST":
                return self._create(req, headers)
            raise ApiError(405, "Method Not Allowed")
        if rest.startswith("/waivers/") and req.method == "GET":
            try:
                waiver_id = int(rest[len("/waivers/") :])
            except ValueError:
                raise ApiError(404, "Not Found") from None
            found = self.store.get(waiver_id)
            if found is None:
                raise ApiError(404, "Waiver not found")
            return Response.json(200, found)
        raise ApiError(404, "Not Found")

    def _list(self, req: Request) -> Response:
        params = dict(reversed(req.query))  # the first value wins, as request.args.get
        try:
            page = int(params.get("page", "1"))
            limit = int(params.get("limit", "10"))
        except ValueError:
            raise ApiError(400, "page and limit must be integers") from None
        if page < 1 or limit < 1:
            raise ApiError(404 if page < 1 else 400, "Not Found" if page < 1 else "bad limit")
        include = params.get("include_obsolete", "false").lower() in ("1", "true", "yes")
        filters = {k: params[k] for k in FILTERS if params.get(k)}
        found = self.store.query(filters, include)
        pages = max(1, -(-len(found) // limit))
        start = (page - 1) * limit
        if page > pages:
            return Response.json(
                200, {"data": [], "prev": None, "next": None, "first": None, "last": None}
            )
        kept = [(k, v) for k, v in req.query if k != "page"]
        base = req.origin + req.path

        def link(number: int) -> str:
            return f"{base}?{urlencode([*kept, ('page', str(number))])}"

        return Response.json(
            200,
            {
                "data": found[start : start + limit],
                "prev": link(page - 1) if page > 1 else None,
                "next": link(page + 1) if page < pages else None,
                "first": link(1),
                "last": link(pages),
            },
        )

    def _create(self, req: Request, headers: Mapping[str, str]) -> Response:
        user = basic_user(headers)
        if user is None:
            raise ApiError(401, "Unauthorized: no user (dummy authentication: HTTP basic)")
        try:
            body = json.loads(req.body or b"null")
        except ValueError:
            raise ApiError(400, "the body is not JSON") from None
        many = isinstance(body, list)
        parsed = [parse_new_waiver(b) for b in (body if many else [body])]
        if many and not parsed:
            raise ApiError(400, "an empty list of waivers")
        created = []
        for fields in parsed:
            on_behalf = fields["username"]
            if on_behalf and user not in self.superusers:
                raise ApiError(403, f"user {user} does not have the proxyuser ability")
            created.append(self.store.add(fields, on_behalf or user, user if on_behalf else None))
        for waiver in created:
            self._announce(waiver)
        return Response.json(201, created if many else created[0])

    def _announce(self, waiver: dict[str, Any]) -> None:
        if self.publisher is None:
            return
        body = {k: v for k, v in waiver.items() if k != "subject"}
        try:
            WAIVER_NEW.validate(body)
            self.publisher(WAIVER_NEW.modname, WAIVER_NEW.name, body)
        except InvalidMessage:
            log.exception("waiver %s: not announced", waiver["id"])
        except Exception:  # the waiver is stored: a lost message is the reconcile pass's
            log.exception("waiver %s: publishing %s failed", waiver["id"], WAIVER_NEW)


class _WaiverHandler(_Handler):
    server_version = "WaiverDB-standin/1.0"

    def _dispatch(self, method: str) -> None:
        owner = self.server.owner
        assert isinstance(owner, WaiverDBServer)
        owner.headers_of[threading.get_ident()] = {k.lower(): v for k, v in self.headers.items()}
        super()._dispatch(method)


class WaiverDBServer(ResultsDBServer):
    """The stand-in in this process: ``with WaiverDBServer() as wdb: wdb.url``."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, publisher: Publisher | None = None
    ) -> None:
        super().__init__(None, host, port, publisher)
        self.waivers: Store | None = None
        self.waiver_api: Api | None = None
        self.headers_of: dict[int, dict[str, str]] = {}

    @property
    def url(self) -> str:
        """The API base URL, ending in ``/api/v1.0``."""
        if self._http is None:
            raise RuntimeError("the WaiverDB stand-in is not started")
        return f"http://{self.host}:{self.port}{API_PREFIX}"

    handler = _WaiverHandler
    name = "waiverdb-standin"

    def _build(self) -> None:
        self.waivers = Store()
        self.waiver_api = Api(self.waivers, self.publisher)

    def stop(self) -> None:
        super().stop()
        if self.waivers is not None:
            self.waivers.close()
            self.waivers = None

    def respond(self, req: Request) -> Response:
        with self._count_lock:
            self.requests.append((req.method, req.path))
        headers = self.headers_of.pop(threading.get_ident(), {})
        planned = self.faults.take()
        if planned is not None:
            return planned
        assert self.waiver_api is not None
        return self.waiver_api.handle(req, headers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5004)
    parser.add_argument("--no-bus", action="store_true", help="do not publish waiverdb.waiver.new")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    bus = None if args.no_bus or not fedmsg_config_found() else fedmsg_bus()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with WaiverDBServer(args.host, args.port, bus):
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    if bus is not None:
        bus.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
