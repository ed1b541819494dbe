"""ResultsDB reporting: every test's result, then ONE summary, and nothing ever lost.

Conventions (fixed: fedimg's gate depends on them)
    testcase   ``autocloud.ami.<test_id>`` per test, ``autocloud.ami.all`` for
               the summary of one scenario, always posted LAST of its scenario
    item/type  the AMI id / ``ami``
    data       ``region``, ``productmd.compose.id``, ``image_name``, ``arch``,
               ``subvariant``, ``source`` = ``autocloud``, ``gating``
               (``true``/``false``), ``job_id``, ``family``, ``scenario``
               (``x86_64:t3.small``: architecture and instance type), on the
               summaries ``scenarios`` (every scenario of the run, comma
               separated: what a gate must have a summary of), and what
               resultsdb_conventions' ``ProductmdImageResult`` adds for a
               compose image: ``productmd.compose.name|short|version|date|
               type|respin``, ``productmd.image.arch|subvariant|type|format|
               disc_number`` and ``meta.conventions``
    outcome    PASSED / FAILED; INFO with data ``skipped`` = the reason for a
               test that does not apply (another family's test, a Nitro-only
               check on a Xen type, a condition not met); NEEDS_INSPECTION
               for tests that could not run for a reason that is not the
               image's (the scenario's instance type is not offered or has no
               capacity). A test that could not run otherwise is FAILED with a
               note saying why. The summary is PASSED only if at least one
               gating test ran and every gating test passed; NEEDS_INSPECTION
               if the gating tests that did not pass could not run.
    note       one line (the summary's starts with its scenario); ``ref_url``
               the kept output when an output store is configured
    groups     resultsdb_conventions' ``compose.<compose_id>`` (with the
               compose URL), ``source.autocloud``, ``autocloud.<compose_id>``,
               ``image.<image id>`` and ``autocloud.<image id>``

Delivery: the real ``resultsdb_api`` client retries connection errors and 5xx
with backoff. What still fails is written to the spool directory (one JSON file
per result, atomic writes, names that sort in submission order) and re-sent in
order by the next ``report``/``flush``; while anything is pending, new results
queue behind it so the summary stays last. A 400/413/422 means the result
itself is bad: it is logged at ERROR and moved to ``rejected/`` for people,
never retried.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import requests
from productmd.composeinfo import get_date_type_respin
from requests.adapters import HTTPAdapter
from resultsdb_api import ResultsDBapi, ResultsDBapiException
from resultsdb_conventions.helpers import uuid_namespace
from resultsdb_conventions.prodmd import ProductmdImageResult

from fedimg.messages import (
    FAILED,
    INFO,
    NEEDS_INSPECTION,
    PASSED,
    RESULTSDB_ITEM_TYPE,
    RESULTSDB_SOURCE,
    RUN_SCENARIOS_KEY,
    SCENARIO_KEY,
    SKIPPED_KEY,
    SUMMARY_TESTCASE,
    TESTCASE_PREFIX,
    StagedImage,
)

log = logging.getLogger(__name__)

ITEM_TYPE = RESULTSDB_ITEM_TYPE
SOURCE = RESULTSDB_SOURCE
SKIPPED = "SKIPPED"
IMAGE_TYPE = "raw-xz"  # the productmd type of the raw.xz disk images fedimg stages
RAW_XZ = "raw.xz"
REJECTED_STATUSES = frozenset({400, 413, 422})
NOTE_MAX = 200
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


# -- the pure core --------------------------------------------------------------


class Outcome(Protocol):
    """What the runner reports per test (``autocloud_ami.runner.TestOutcome``)."""

    @property
    def test_id(self) -> str: ...
    @property
    def outcome(self) -> Any: ...
    @property
    def gating(self) -> bool: ...
    @property
    def note(self) -> str: ...


@dataclass(frozen=True)
class Result:
    """One ResultsDB result to post; also the spool's JSON record."""

    testcase: str
    outcome: str
    note: str
    data: dict[str, str]
    groups: tuple[dict[str, str], ...] = ()
    ref_url: str | None = None
    key: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def item(self) -> str:
        return self.data.get("item", "")

    @property
    def where(self) -> str:
        """``<compose id> <AMI id>`` for log lines."""
        return f"{self.data.get('productmd.compose.id', '?')} {self.item}"

    def to_json(self) -> dict[str, Any]:
        return {
            "testcase": self.testcase,
            "outcome": self.outcome,
            "note": self.note,
            "data": dict(self.data),
            "groups": [dict(g) for g in self.groups],
            "ref_url": self.ref_url,
            "key": self.key,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Result:
        data = raw["data"]
        groups = raw.get("groups", [])
        if not isinstance(data, dict) or not isinstance(groups, list):
            raise ValueError("spooled result has no data/groups")
        return cls(
            testcase=str(raw["testcase"]),
            outcome=str(raw["outcome"]),
            note=str(raw.get("note", "")),
            data={str(k): str(v) for k, v in data.items()},
            groups=tuple({str(k): str(v) for k, v in g.items()} for g in groups),
            ref_url=raw.get("ref_url"),
            key=str(raw.get("key") or uuid.uuid4().hex),
        )


def outcome_name(value: Any) -> str:
    """``PASSED``/``FAILED``/``SKIPPED`` from a string or an enum member."""
    return str(getattr(value, "value", value)).upper()


def testcase_name(test_id: str) -> str:
    return TESTCASE_PREFIX + _SAFE.sub("_", test_id).strip("._-")


def one_line(text: str | None, limit: int = NOTE_MAX) -> str:
    line = " ".join((text or "").split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def compose_location(image_url: str) -> str | None:
    """The compose's ``compose/`` URL, cut from an image URL inside it."""
    marker = "/compose/"
    index = image_url.rfind(marker)
    return image_url[: index + len(marker) - 1] if index > 0 else None


def compose_group_uuid(compose_id: str) -> str:
    """The uuid of a compose's ResultsDB group (shared with openQA's results)."""
    return str(uuid_namespace(compose_id, uuid_namespace("compose")))


def composeinfo_of(image: StagedImage) -> dict[str, Any]:
    """The part of a productmd composeinfo the conventions read, from the compose id.

    ``Fedora-41-20261124.n.0``: release ``Fedora`` ``41`` (the image's
    ``release`` when the request has one), date, type (production, nightly,
    ...) and respin as productmd parses them. What cannot be parsed is empty.
    """
    cid = image.compose_id
    try:
        date, ctype, respin = get_date_type_respin(cid)
    except ValueError:  # an unknown compose type suffix
        date, ctype, respin = None, None, None
    prefix = cid[: cid.find(date)].rstrip("-") if date else ""
    short, _, version = prefix.rpartition("-")
    return {
        "header": {"version": "1.2"},
        "payload": {
            "compose": {"id": cid, "date": date or "", "type": ctype or "", "respin": respin},
            "release": {"name": short, "short": short, "version": image.release or version},
        },
    }


def imgdict_of(image: StagedImage) -> dict[str, Any]:
    """The productmd image entry of the staged image (fedimg stages raw.xz disk images)."""
    location = compose_location(image.image_url)
    path = image.image_url[len(location) + 1 :] if location else image.image_url
    return {
        "path": path,
        "arch": image.architecture,
        "subvariant": image.subvariant,
        "type": IMAGE_TYPE,
        "format": RAW_XZ if image.image_url.endswith("." + RAW_XZ) else "",
        "disc_number": 1,
    }


def conventions(
    image: StagedImage, base: Mapping[str, str]
) -> tuple[dict[str, str], tuple[dict[str, str], ...]]:
    """The data and groups of every result about ``image``, by resultsdb_conventions.

    Its ``ProductmdImageResult`` gives the ``productmd.compose.*`` and
    ``productmd.image.*`` keys, ``meta.conventions`` and the groups (the
    compose, with the compose URL; the source; the image); ``base`` (item =
    the AMI id, type = ``ami``, ...) wins over its item and type, which name a
    compose file. Keys it could not fill are left out.
    """
    result = ProductmdImageResult(
        imgdict_of(image), composeinfo_of(image), PASSED, SUMMARY_TESTCASE, source=SOURCE
    )
    location = compose_location(image.image_url)
    if location:
        result.add_group("compose", image.compose_id, ref_url=location)
    result.extradata.update(base)
    result.default_extradata()
    result.default_groups()
    data = {str(k): str(v) for k, v in result.extradata.items() if v is not None and v != ""}
    groups = tuple({str(k): str(v) for k, v in g.items()} for g in result.groups)
    return data, groups


def base_data(image: StagedImage, job_id: str, family: str, scenario: str) -> dict[str, str]:
    if not image.ami_id:
        raise ValueError(f"{image.compose_id}: no AMI id to report on")
    return {
        "item": image.ami_id,
        "type": ITEM_TYPE,
        "region": image.region,
        "productmd.compose.id": image.compose_id,
        "image_name": image.image_name,
        "arch": image.architecture,
        "subvariant": image.subvariant,
        "productmd.image.arch": image.architecture,
        "productmd.image.subvariant": image.subvariant,
        "source": SOURCE,
        "job_id": job_id,
        "family": family,
        SCENARIO_KEY: scenario,
    }


def summary_of(outcomes: Sequence[Outcome]) -> tuple[str, str]:
    """The summary's outcome and one-line note.

    PASSED: at least one gating test ran and every gating test passed.
    NEEDS_INSPECTION: the gating tests that did not pass could not run for a
    reason that is not the image's (the scenario's instance type unavailable).
    FAILED otherwise.
    """
    gating = [o for o in outcomes if o.gating and outcome_name(o.outcome) != SKIPPED]
    bad = [o for o in gating if outcome_name(o.outcome) != PASSED]
    counts = {name: 0 for name in (PASSED, FAILED, SKIPPED, NEEDS_INSPECTION)}
    for o in outcomes:
        name = outcome_name(o.outcome)
        counts[name] = counts.get(name, 0) + 1
    tally = f"{counts[PASSED]} passed, {counts[FAILED]} failed, {counts[SKIPPED]} skipped"
    if counts[NEEDS_INSPECTION]:
        tally += f", {counts[NEEDS_INSPECTION]} not run"
    if not gating:
        return FAILED, one_line(f"no gating test ran ({tally})")
    if bad and all(outcome_name(o.outcome) == NEEDS_INSPECTION for o in bad):
        return NEEDS_INSPECTION, one_line(f"{one_line(bad[0].note, 140)} ({tally})")
    if bad:
        names = ", ".join(o.test_id for o in bad)
        return FAILED, one_line(f"gating failed: {names} ({tally})")
    return PASSED, one_line(f"all {len(gating)} gating tests passed ({tally})")


def posted_outcome(name: str) -> str:
    """The ResultsDB outcome of a runner outcome: SKIPPED is INFO (with the reason)."""
    if name == SKIPPED:
        return INFO
    return name if name in (PASSED, NEEDS_INSPECTION) else FAILED


def build_results(
    image: StagedImage,
    outcomes: Sequence[Outcome],
    *,
    job_id: str,
    family: str,
    scenario: str,
    run_scenarios: Sequence[str] = (),
    ref_urls: Mapping[str, str] | None = None,
    summary_url: str | None = None,
) -> list[Result]:
    """Every posted result for one scenario's run, its summary last.

    A test that does not apply (SKIPPED) is posted as INFO with the reason
    in data ``skipped``, so a rule requiring it sees it is inapplicable. The
    summary lists every scenario of the run in data ``scenarios`` (comma
    separated): what a gate must have a summary of before it decides.
    """
    ref_urls = ref_urls or {}
    data, groups = conventions(image, base_data(image, job_id, family, scenario))
    results = []
    for o in outcomes:
        name = outcome_name(o.outcome)
        extra = {"gating": "true" if o.gating else "false"}
        note = one_line(o.note) or name.lower()
        if name == SKIPPED:
            extra[SKIPPED_KEY] = note
        results.append(
            Result(
                testcase=testcase_name(o.test_id),
                outcome=posted_outcome(name),
                note=note,
                data={**data, **extra},
                groups=groups,
                ref_url=ref_urls.get(o.test_id),
            )
        )
    outcome, note = summary_of(outcomes)
    results.append(
        Result(
            testcase=SUMMARY_TESTCASE,
            outcome=outcome,
            note=one_line(f"{scenario}: {note}"),
            data={
                **data,
                "gating": "true",
                RUN_SCENARIOS_KEY: ",".join(run_scenarios or [scenario]),
            },
            groups=groups,
            ref_url=summary_url,
        )
    )
    return results


# -- per-test output (ref_url) ---------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class OutputStore:
    """Keeps each test's output under ``root/<ami>/<job>/`` served from ``base_url``."""

    root: Path
    base_url: str | None = None

    def _dir(self, ami_id: str, job_id: str) -> Path:
        return self.root / _SAFE.sub("_", ami_id) / _SAFE.sub("_", job_id)

    def url(self, ami_id: str, job_id: str, name: str = "") -> str | None:
        if not self.base_url:
            return None
        return (
            f"{self.base_url.rstrip('/')}/{_SAFE.sub('_', ami_id)}/{_SAFE.sub('_', job_id)}/{name}"
        )

    def write(self, ami_id: str, job_id: str, test_id: str, text: str) -> str | None:
        """Keep one test's output; return its URL (None without ``base_url``)."""
        name = _SAFE.sub("_", test_id) + ".txt"
        _atomic_write(self._dir(ami_id, job_id) / name, text)
        return self.url(ami_id, job_id, name)

    def write_index(self, ami_id: str, job_id: str, lines: Sequence[str]) -> str | None:
        _atomic_write(self._dir(ami_id, job_id) / "index.txt", "\n".join(lines) + "\n")
        return self.url(ami_id, job_id, "index.txt")


# -- the spool ------------------------------------------------------------------------


class SpoolLockTimeout(TimeoutError):
    """Another process held the spool lock past the deadline."""


class Spool:
    """Results not yet accepted (``pending/``) and refused ones (``rejected/``)."""

    _seq = itertools.count()

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.pending_dir = self.root / "pending"
        self.rejected_dir = self.root / "rejected"
        self._thread_lock = threading.Lock()

    def _ensure(self) -> None:
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        self.rejected_dir.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self, timeout: float = 60.0) -> Iterator[None]:
        """Exclusive use across threads and processes (the hub and the CLI)."""
        deadline = time.monotonic() + timeout
        if not self._thread_lock.acquire(timeout=timeout):
            raise SpoolLockTimeout(f"spool {self.root} busy for {timeout:.0f}s")
        try:
            self._ensure()
            with open(self.root / ".lock", "a+b") as handle:
                while True:
                    try:
                        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise SpoolLockTimeout(
                                f"spool {self.root} locked by another process for {timeout:.0f}s"
                            ) from None
                        time.sleep(0.05)
                try:
                    yield
                finally:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def add(self, result: Result) -> Path:
        self._ensure()
        name = f"{time.time_ns():020d}-{next(self._seq):08d}-{result.key[:12]}.json"
        path = self.pending_dir / name
        _atomic_write(path, json.dumps(result.to_json(), sort_keys=True))
        return path

    def pending(self) -> list[Path]:
        if not self.pending_dir.is_dir():
            return []
        return sorted(p for p in self.pending_dir.glob("*.json") if not p.name.startswith("."))

    def rejected(self) -> list[Path]:
        if not self.rejected_dir.is_dir():
            return []
        return sorted(p for p in self.rejected_dir.glob("*.json") if not p.name.startswith("."))

    def load(self, path: Path) -> Result:
        return Result.from_json(json.loads(path.read_text(encoding="utf-8")))

    def reject(self, result: Result | None, error: str, source: Path | None = None) -> Path:
        """Keep a refused result in ``rejected/`` with the reason; drop it from pending."""
        self._ensure()
        name = (
            source.name
            if source is not None
            else f"{time.time_ns():020d}-{next(self._seq):08d}.json"
        )
        record: dict[str, Any] = {"error": error[:2000]}
        if result is not None:
            record["result"] = result.to_json()
        elif source is not None:
            record["raw"] = source.read_text(encoding="utf-8", errors="replace")[:100000]
        path = self.rejected_dir / name
        _atomic_write(path, json.dumps(record, sort_keys=True))
        if source is not None:
            source.unlink(missing_ok=True)
        return path


# -- delivery -------------------------------------------------------------------------


class _TimeoutAdapter(HTTPAdapter):
    """The client's retrying adapter, plus a timeout on every request."""

    def __init__(self, timeout: float, **kwargs: Any) -> None:
        self.timeout = timeout
        super().__init__(**kwargs)

    def send(self, request: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        return super().send(request, **kwargs)


def make_api(url: str, retries: int = 3, backoff: float = 1.0, timeout: float = 30.0) -> Any:
    """The real ``ResultsDBapi`` for ``url``, its requests bounded by ``timeout``."""
    api = ResultsDBapi(url, max_retries=retries, backoff_factor=backoff)
    adapter = _TimeoutAdapter(timeout, max_retries=api._retry)
    api.session.mount("http://", adapter)
    api.session.mount("https://", adapter)
    return api


def summary_posted(api: Any, ami_id: str, since: datetime | None = None) -> bool:
    """Whether ResultsDB already holds a summary (``autocloud.ami.all``) for ``ami_id``,
    submitted after ``since`` when given (a retest: older runs do not count).

    Raises what the client raises when ResultsDB cannot be asked.
    """
    query: dict[str, Any] = {"item": ami_id, "type": ITEM_TYPE, "testcases": SUMMARY_TESTCASE}
    if since is not None:
        # ResultsDB compares naive UTC times (it drops a zone instead of converting).
        query["since"] = since.astimezone(UTC).replace(tzinfo=None).isoformat()
    found = api.get_results(limit=1, **query)
    return bool(found.get("data")) if isinstance(found, dict) else False


@dataclass
class Delivery:
    """What one ``report``/``flush`` did."""

    posted: int = 0
    spooled: int = 0
    rejected: int = 0
    pending: int = 0

    @property
    def complete(self) -> bool:
        return self.spooled == 0 and self.pending == 0


class _Transient(Exception):
    pass


class _Refused(Exception):
    pass


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ResultsDBapiException):
        status = getattr(exc.response, "status_code", None)
        return f"HTTP {status}: {exc.message}" if status else str(exc.message)
    return f"{type(exc).__name__}: {exc}"


class ResultsReporter:
    """Posts results with a ``ResultsDBapi``; spools what cannot be posted yet."""

    def __init__(self, api: Any, spool: Spool, lock_timeout: float = 120.0) -> None:
        self.api = api
        self.spool = spool
        self.lock_timeout = lock_timeout

    def _post(self, result: Result) -> None:
        try:
            self.api.create_result(
                outcome=result.outcome,
                testcase={"name": result.testcase},
                groups=[dict(g) for g in result.groups],
                note=result.note,
                ref_url=result.ref_url,
                **result.data,
            )
        except requests.exceptions.JSONDecodeError as exc:
            # resultsdb_api decodes the body of a 2xx answer only (other bodies
            # are caught inside it): ResultsDB stored the result.
            log.warning(
                "%s %s: ResultsDB accepted the result but answered garbage: %s",
                result.testcase,
                result.where,
                exc,
            )
        except ResultsDBapiException as exc:
            status = getattr(exc.response, "status_code", None)
            if status in REJECTED_STATUSES:
                raise _Refused(_describe(exc)) from exc
            raise _Transient(_describe(exc)) from exc
        except requests.RequestException as exc:
            raise _Transient(_describe(exc)) from exc

    def _refused(self, result: Result, error: str, source: Path | None) -> None:
        path = self.spool.reject(result, error, source)
        log.error(
            "ResultsDB refused %s for %s (%s): %s; kept in %s",
            result.testcase,
            result.where,
            result.outcome,
            error,
            path,
        )

    def _flush_locked(self, done: Delivery) -> bool:
        """Send pending results in order; True when the spool is empty."""
        for path in self.spool.pending():
            try:
                result = self.spool.load(path)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.spool.reject(None, f"unreadable spool file: {exc}", path)
                log.error("unreadable spooled result %s moved to rejected/: %s", path.name, exc)
                done.rejected += 1
                continue
            try:
                self._post(result)
            except _Refused as exc:
                self._refused(result, str(exc), path)
                done.rejected += 1
                continue
            except _Transient as exc:
                done.pending = len(self.spool.pending())
                log.warning(
                    "ResultsDB still unavailable (%s); %d results stay spooled in %s",
                    exc,
                    done.pending,
                    self.spool.pending_dir,
                )
                return False
            path.unlink(missing_ok=True)
            done.posted += 1
            log.info("posted spooled %s for %s: %s", result.testcase, result.where, result.outcome)
        return True

    def flush(self) -> Delivery:
        """Re-send every spooled result, oldest first, stopping at the first failure."""
        done = Delivery()
        with self.spool.locked(self.lock_timeout):
            self._flush_locked(done)
        return done

    def report(self, results: Sequence[Result]) -> Delivery:
        """Post ``results`` in order behind anything already spooled."""
        done = Delivery()
        with self.spool.locked(self.lock_timeout):
            clear = self._flush_locked(done)
            for index, result in enumerate(results):
                if clear:
                    try:
                        self._post(result)
                        done.posted += 1
                        log.info(
                            "posted %s for %s: %s (%s)",
                            result.testcase,
                            result.where,
                            result.outcome,
                            result.data.get("job_id", "?"),
                        )
                        continue
                    except _Refused as exc:
                        self._refused(result, str(exc), None)
                        done.rejected += 1
                        continue
                    except _Transient as exc:
                        clear = False
                        log.warning(
                            "ResultsDB unavailable (%s): spooling %d results for %s",
                            exc,
                            len(results) - index,
                            result.where,
                        )
                self.spool.add(result)
                done.spooled += 1
            done.pending = len(self.spool.pending())
        return done


def make_reporter(
    url: str, spool_dir: str, retries: int = 3, backoff: float = 1.0, timeout: float = 30.0
) -> ResultsReporter:
    return ResultsReporter(make_api(url, retries, backoff, timeout), Spool(spool_dir))
