"""Reusable AWS fault injectors for in-process tests (moto behind botocore's event hooks).

Faults are injected where the network would fail them, inside botocore's
retry loop (``before-send``), so the production retry policy of
``fedimg.aws.AwsClients`` (adaptive mode, ``max_attempts``) and the code's
own retries both see them exactly as they would see AWS failing::

    fault = inject(aws.ec2("eu-west-1"), "CopyImage", THROTTLED, times=2)
    ...
    assert fault.hits == 2 and fault.sends == 3

    burst = inject(aws.ebs(region), "PutSnapshotBlock", TRANSIENT, times=len(TRANSIENT))

A sequence of kinds is injected in turn (one attempt each, cycling), so one
call can meet every transient fault in a row.

Kinds of fault (``Kind``):

* an AWS error answer: ``THROTTLED`` (the service's throttling code),
  ``SERVER_ERROR`` (500), ``UNAVAILABLE`` (503), or any ``aws_error(code)``
  such as ``InvalidRegion`` / ``OptInRequired`` / ``InvalidAMIID.Unavailable``;
  the attempt never reaches moto, so nothing is carried out;
* ``READ_TIMEOUT`` / ``CONNECTION_ERROR``: botocore's own exceptions raised
  instead of sending (the request was lost on the way);
* ``RESPONSE_LOST``: moto CARRIES OUT the call, then the answer is lost (a
  read timeout): the retry repeats a call that already happened.

moto is not AWS: it ignores ``ClientToken`` and accepts duplicate AMI names,
so a lost response would make duplicates in moto that AWS would refuse or
dedupe. ``aws_rules(client)`` adds those two AWS behaviours to a client so
that lost-response tests check the code against what AWS really does.

``quick_retries(monkeypatch)`` keeps botocore's retry DECISIONS (which errors,
how many attempts) but skips its SLEEPS (backoff, adaptive rate limiting),
recording the delays it asked for, so fault tests stay fast.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import BotoCoreError, EndpointConnectionError, ReadTimeoutError
from moto.core.botocore_stubber import MockRawResponse

# -- kinds of fault ------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """What happens to a faulted attempt."""

    name: str
    code: str = ""  # AWS error code; "" with a status: the service's default for it
    status: int = 0  # HTTP status of an error answer
    raises: type[BotoCoreError] | None = None  # raised instead of sending
    lost: bool = False  # carried out by moto, then the answer is lost

    def __str__(self) -> str:
        return self.name


THROTTLED = Kind("throttled", status=-1)  # -1: the service's throttling code and status
SERVER_ERROR = Kind("server-error", status=500)
UNAVAILABLE = Kind("unavailable", status=503)
READ_TIMEOUT = Kind("read-timeout", raises=ReadTimeoutError)
CONNECTION_ERROR = Kind("connection-error", raises=EndpointConnectionError)
RESPONSE_LOST = Kind("response-lost", raises=ReadTimeoutError, lost=True)

#: Faults botocore's retry policy treats as transient (retried inside one API call).
TRANSIENT = (THROTTLED, SERVER_ERROR, UNAVAILABLE, READ_TIMEOUT, CONNECTION_ERROR)


def aws_error(code: str, status: int = 400) -> Kind:
    """An error answer with a given AWS code (400: not retried by botocore)."""
    return Kind(code, code=code, status=status)


@dataclass(frozen=True)
class _Codes:
    """A protocol's throttling answer and the codes of its 5xx answers."""

    throttled: tuple[str, int]
    by_status: dict[int, str]


_DEFAULTS = {
    "ec2": _Codes(("RequestLimitExceeded", 503), {500: "InternalError", 503: "Unavailable"}),
    "rest-json": _Codes(
        ("RequestThrottledException", 400),
        {500: "InternalServerException", 503: "ServiceUnavailableException"},
    ),
}


def _error_answer(protocol: str, url: str, code: str, status: int) -> AWSResponse:
    message = f"injected {code}"
    if protocol == "ec2":
        body = (
            '<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
            f"<Code>{code}</Code><Message>{message}</Message>"
            "</Error></Errors><RequestID>injected-fault</RequestID></Response>"
        )
        headers = {"Content-Type": "text/xml"}
    else:
        body = json.dumps({"message": message})
        headers = {"x-amzn-ErrorType": code, "Content-Type": "application/json"}
    return AWSResponse(url, status, headers, MockRawResponse(body))


def request_params(request: Any) -> dict[str, Any]:
    """The parameters readable from a prepared request (query or JSON body, URL path)."""
    body = request.body
    if isinstance(body, bytes):
        try:
            body = body.decode()
        except UnicodeDecodeError:
            body = ""  # a snapshot block
    params: dict[str, Any] = {"_path": urlsplit(request.url).path}
    if isinstance(body, str) and body:
        if body.lstrip().startswith("{"):
            try:
                params.update(json.loads(body))
            except ValueError:
                pass
        else:
            params.update({k: v[0] for k, v in parse_qs(body).items()})
    return params


# -- one injected fault ----------------------------------------------------------------

#: Every fault injected in this process: (service, operation, kind) -> count (for the figures).
LEDGER: Counter[tuple[str, str, str]] = Counter()
_LEDGER_LOCK = threading.Lock()


@dataclass
class Fault:
    """A fault on one client's calls of one operation; counts what it did.

    ``times`` faults are injected (None: until ``heal()``), on attempts whose
    ``request_params`` satisfy ``when``, the ``kinds`` in turn. ``sends``
    counts every attempt that reached the hook, faulted or not; ``injected``
    names the kind of every fault injected, in order.
    """

    client: Any
    operation: str
    kinds: tuple[Kind, ...]
    times: int | None = 1
    when: Callable[[dict[str, Any]], bool] = lambda params: True
    hits: int = 0
    sends: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)
    injected: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def service(self) -> str:
        return str(self.client.meta.service_model.service_id.hyphenize())

    @property
    def protocol(self) -> str:
        proto = str(self.client.meta.service_model.protocol)
        return "ec2" if proto in ("ec2", "query") else "rest-json"

    def heal(self) -> None:
        """Inject no more faults from now on (the outage is over)."""
        with self._lock:
            self.times = self.hits

    def _take(self, request: Any) -> Kind | None:
        """Count this attempt; the kind of fault to inject into it, if any."""
        params = request_params(request)
        with self._lock:
            self.sends += 1
            self.seen.append(params)
            if self.times is not None and self.hits >= self.times:
                return None
            if not self.when(params):
                return None
            kind = self.kinds[self.hits % len(self.kinds)]
            self.hits += 1
            self.injected.append(kind.name)
        with _LEDGER_LOCK:
            LEDGER[(self.service, self.operation, kind.name)] += 1
        return kind

    def _answer(self, request: Any, kind: Kind) -> AWSResponse:
        defaults = _DEFAULTS[self.protocol]
        if kind.status == -1:
            code, status = defaults.throttled
        else:
            code, status = (
                kind.code or defaults.by_status.get(kind.status, "InternalError"),
                kind.status,
            )
        # botocore calls every before-send handler, moto's too: send this attempt
        # where moto does not answer, so that it does not carry the call out.
        url, request.url = request.url, "http://injected-fault.invalid/"
        return _error_answer(self.protocol, url, code, status)

    @staticmethod
    def _raise(request: Any, kind: Kind) -> None:
        assert kind.raises is not None
        raise kind.raises(endpoint_url=request.url)

    # the hooks ---------------------------------------------------------------
    def before_moto(self, request: Any, **_: Any) -> AWSResponse | None:
        kind = self._take(request)
        if kind is None:
            return None
        if kind.raises is not None:
            self._raise(request, kind)
        return self._answer(request, kind)

    def after_moto(self, request: Any, event_name: str, **_: Any) -> None:
        if event_name != f"before-send.{self.service}.{self.operation}":
            return
        kind = self._take(request)
        if kind is not None:
            self._raise(request, kind)


def inject(
    client: Any,
    operation: str,
    kind: Kind | Sequence[Kind],
    times: int | None = 1,
    when: Callable[[dict[str, Any]], bool] = lambda params: True,
) -> Fault:
    """Inject ``kind`` (or each of several in turn) into the next ``times`` attempts.

    ``client`` is the very client the code uses (``AwsClients`` caches one
    per service and region: pass ``aws.ec2(region)``), so one region can fail
    while the others work. ``RESPONSE_LOST`` cannot be mixed with other kinds.
    """
    kinds = (kind,) if isinstance(kind, Kind) else tuple(kind)
    lost = [k.lost for k in kinds]
    if not kinds or (any(lost) and len(kinds) > 1):
        raise ValueError("one or more kinds; a lost response only on its own")
    fault = Fault(client, operation, kinds, times, when)
    events = client.meta.events
    if lost[0]:
        # After moto's own handler, registered for every "before-send" (handlers of
        # more specific event names run first): the call is carried out.
        events.register_last("before-send", fault.after_moto)
    else:
        events.register_first(f"before-send.{fault.service}.{operation}", fault.before_moto)
    return fault


# -- AWS behaviours moto lacks ------------------------------------------------------------


def _backend(client: Any) -> Any:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    return ec2_backends[DEFAULT_ACCOUNT_ID][client.meta.region_name]


@dataclass
class AwsRules:
    """Make one in-process EC2 client behave like AWS where moto does not:

    * ``RegisterImage``/``CopyImage`` with a name one of our images already has
      is refused with ``InvalidAMIName.Duplicate``;
    * ``CopyImage`` repeated with the same ``ClientToken`` returns the image of
      the first call instead of copying again.
    """

    client: Any
    tokens: dict[str, str] = field(default_factory=dict)
    duplicates_refused: int = 0
    tokens_honoured: int = 0
    _pending: dict[int, tuple[str, set[str]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _names(self) -> set[str]:
        from moto.core import DEFAULT_ACCOUNT_ID

        amis = _backend(self.client).amis.values()
        return {str(a.name) for a in amis if a.owner_id == DEFAULT_ACCOUNT_ID}

    def _ids(self) -> set[str]:
        return set(_backend(self.client).amis)

    def before(self, request: Any, event_name: str, **_: Any) -> AWSResponse | None:
        operation = event_name.rsplit(".", 1)[-1]
        params = request_params(request)
        token = str(params.get("ClientToken") or "")
        url = request.url
        with self._lock:
            if operation == "CopyImage" and token in self.tokens:
                self.tokens_honoured += 1
                request.url = "http://aws-rules.invalid/"
                body = (
                    '<?xml version="1.0" encoding="UTF-8"?>'
                    '<CopyImageResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
                    f"<requestId>aws-rules</requestId><imageId>{self.tokens[token]}</imageId>"
                    "</CopyImageResponse>"
                )
                return AWSResponse(url, 200, {}, MockRawResponse(body))
            if params.get("Name") in self._names():
                self.duplicates_refused += 1
                request.url = "http://aws-rules.invalid/"
                return _error_answer("ec2", url, "InvalidAMIName.Duplicate", 400)
            if operation == "CopyImage" and token:
                self._pending[id(request)] = (token, self._ids())
        return None

    def after(self, request: Any, event_name: str, **_: Any) -> None:
        if event_name != "before-send.ec2.CopyImage":
            return
        with self._lock:
            pending = self._pending.pop(id(request), None)
            if pending is None:
                return
            token, before = pending
            new = sorted(self._ids() - before)
            if new:
                self.tokens[token] = new[0]


def aws_rules(client: Any) -> AwsRules:
    """Add AWS's AMI-name uniqueness and CopyImage idempotency to an in-process EC2 client."""
    rules = AwsRules(client)
    events = client.meta.events
    for operation in ("RegisterImage", "CopyImage"):
        events.register_first(f"before-send.ec2.{operation}", rules.before)
    events.register_last("before-send", rules.after)  # after moto's handler
    return rules


# -- botocore's waits, skipped -----------------------------------------------------------


@dataclass
class BotocoreWaits:
    """The waits botocore asked for while ``quick_retries`` was on."""

    backoffs: list[float] = field(default_factory=list)  # retry delays, in seconds
    rate_limited: int = 0  # sends the adaptive token bucket would have held back

    @property
    def retries(self) -> int:
        return len(self.backoffs)


def quick_retries(monkeypatch: pytest.MonkeyPatch) -> BotocoreWaits:
    """Keep botocore's retry decisions, skip its sleeps; return what it asked for."""
    from botocore.retries import adaptive, standard

    waits = BotocoreWaits()
    lock = threading.Lock()
    real_delay = standard.ExponentialBackoff.delay_amount

    def delay_amount(self: Any, context: Any) -> float:
        with lock:
            waits.backoffs.append(float(real_delay(self, context)))
        return 0.0

    def on_sending_request(self: Any, request: Any, **_: Any) -> None:
        if self._enabled:
            with lock:
                waits.rate_limited += 1

    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", delay_amount)
    monkeypatch.setattr(adaptive.ClientRateLimiter, "on_sending_request", on_sending_request)
    return waits
