"""Which AWS API calls a run made, read from moto's request recording.

``moto_server`` started with ``MOTO_ENABLE_RECORDING`` appends every request
it answers to a JSON-lines file. This turns each line into
``AwsCall(component, service, operation)``: the component from the
``fedimg/3`` or ``autocloud_ami/3`` User-Agent suffix (fedimg.aws.AwsClients),
the service from the SigV4 credential scope, the operation from the query
``Action`` (EC2) or the REST route (EBS direct APIs).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

_SCOPE = re.compile(r"Credential=[^/]+/\d{8}/[^/]+/([a-z0-9-]+)/aws4_request")
_COMPONENT = re.compile(r"\b(fedimg|autocloud_ami)/3\b")
_EBS_ROUTES = (
    ("POST", re.compile(r"^/snapshots/?$"), "StartSnapshot"),
    ("PUT", re.compile(r"^/snapshots/[^/]+/blocks/\d+/?$"), "PutSnapshotBlock"),
    ("POST", re.compile(r"^/snapshots/completion/[^/]+/?$"), "CompleteSnapshot"),
    ("GET", re.compile(r"^/snapshots/[^/]+/blocks/?$"), "ListSnapshotBlocks"),
    ("GET", re.compile(r"^/snapshots/[^/]+/blocks/\d+/?$"), "GetSnapshotBlock"),
    ("GET", re.compile(r"^/snapshots/[^/]+/changedblocks/?$"), "ListChangedBlocks"),
)


@dataclass(frozen=True, order=True)
class AwsCall:
    component: str  # "fedimg", "autocloud_ami" or "other"
    service: str  # "ec2", "ebs", ...
    operation: str  # "RunInstances", "PutSnapshotBlock", ...

    @property
    def action(self) -> str:
        """The IAM action name, e.g. ``ec2:RunInstances``."""
        return f"{self.service}:{self.operation}"


def _body_text(entry: dict[str, object]) -> str:
    body = entry.get("body") or ""
    if not isinstance(body, str):
        return ""
    if entry.get("body_encoded"):
        try:
            return base64.b64decode(body).decode("utf-8", "replace")
        except ValueError:
            return ""
    return body


def call_of(entry: dict[str, object]) -> AwsCall | None:
    """The AwsCall one recorded request made, or None if it was not an AWS API call."""
    raw_headers = entry.get("headers")
    if not isinstance(raw_headers, dict):
        return None
    headers = {str(k).lower(): str(v) for k, v in raw_headers.items()}
    scope = _SCOPE.search(headers.get("authorization", ""))
    if scope is None:
        return None
    service = scope.group(1)
    found = _COMPONENT.search(headers.get("user-agent", ""))
    component = found.group(1) if found else "other"
    url = urlsplit(str(entry.get("url", "")))
    method = str(entry.get("method", "GET")).upper()
    if service == "ebs":
        for route_method, pattern, operation in _EBS_ROUTES:
            if method == route_method and pattern.match(url.path):
                return AwsCall(component, service, operation)
        return AwsCall(component, service, f"{method} {url.path}")
    if "x-amz-target" in headers:
        return AwsCall(component, service, headers["x-amz-target"].rsplit(".", 1)[-1])
    params = parse_qs(url.query) or parse_qs(_body_text(entry))
    action = params.get("Action", ["?"])[0]
    return AwsCall(component, service, action)


def parse_recording(lines: Iterable[str]) -> list[AwsCall]:
    """Every AWS call in a moto recording, in order.

    moto's recorder appends each entry and its newline in two writes without a
    lock, so concurrent requests can leave two entries on one line: decode
    every JSON object of a line, not just one. A last line without its newline
    may still be being written by a request in progress: its entries that are
    whole count, and a cut one is left for a later read. Anywhere else, an
    entry that does not decode is an error.
    """
    decoder = json.JSONDecoder()
    calls = []
    for line in lines:
        text, at = line.strip(), 0
        being_written = not line.endswith("\n")
        while at < len(text):
            try:
                entry, end = decoder.raw_decode(text, at)
            except json.JSONDecodeError:
                if being_written:
                    break
                raise
            at = end + len(text[end:]) - len(text[end:].lstrip())
            call = call_of(entry)
            if call is not None:
                calls.append(call)
    return calls
