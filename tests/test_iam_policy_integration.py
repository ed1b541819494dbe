"""The IAM policies in ``docs/iam/`` fit the code, both ways.

One real pipeline run (``tests/audited_run.py``, shared with the secrets audit:
moto_server recording every request, relay, one hub with every consumer,
ResultsDB and SSH stand-ins) of the demo's mixed compose: two images
released, one rejected and - with ``fedimg.gate.delete_rejected`` on -
deregistered. Every AWS call the hub made goes through a recording proxy in
this process (so that the ids of what a call created are known from its
answer) and is also in moto's own recording.
Then:

- every (component, action) in moto's recording is an Action the component's
  policy allows (the missing ones are listed);
- every call is authorised with the policy's resources AND conditions, by a
  small evaluator of the policy language (Allow/Deny, wildcards, ``Null``,
  ``String*``, ``Bool``, ``ForAllValues``) fed with the tags each request
  carried and the tags each resource had at that moment (tag-on-create,
  ``CreateTags``, and what the hub's own describe calls showed);
- least privilege the other way: every action a policy grants is one the code
  calls (an AST scan of ``fedimg/`` and ``autocloud_ami/``), and those the run
  did not call are exactly the short ``NOT_EXERCISED`` list, each with the
  reason the run does not reach it.

The evaluator and the policies' refusals (a ``testing`` AMI can not be made
public, an untagged instance can not be terminated, ...) are unit-tested
without any process.
"""

from __future__ import annotations

import ast
import base64
import fnmatch
import itertools
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree

import botocore.session
import pytest
from botocore import xform_name

from devel.awscalls import AwsCall, call_of
from devel.awsproxy import Exchange
from devel.stack import REPO, Stack
from fedimg import tags
from tests.audited_run import AuditedRun

POLICY_DIR: Final = REPO / "docs" / "iam"
POLICY_FILES: Final = {"fedimg": "fedimg-policy.json", "autocloud_ami": "autocloud-ami-policy.json"}
PACKAGES: Final = {"fedimg": REPO / "fedimg", "autocloud_ami": REPO / "autocloud_ami"}
ACCOUNT: Final = "123456789012"  # moto's default account
PIPELINE_TIMEOUT: Final = 180.0

#: Granted by a policy, called by the code, but not on the e2e run's path (docs/security.md).
NOT_EXERCISED: Final[Mapping[str, Mapping[str, str]]] = {
    "fedimg": {
        "ec2:DescribeRegions": (
            "fedimg/regions.py target_regions(): only when fedimg.aws.regions is empty "
            "(copy to every region of the partition); the stack names its regions"
        ),
        "ec2:DescribeSnapshotAttribute": (
            "fedimg/copies.py Copier.is_public(): only for an image EC2 already reports "
            "public (a release resumed after it was published)"
        ),
    },
    "autocloud_ami": {
        "ec2:DescribeSubnets": (
            "autocloud_ami/instance.py TestInstance._vpc_of_subnet(): only with "
            "autocloud_ami.subnet_id set; the stack launches into the default VPC"
        ),
    },
}


# -- the policy language (the part these policies use) --------------------------------------------

_OPERATORS: Final = frozenset({"StringEquals", "StringNotEquals", "StringLike", "Bool", "Null"})
_QUALIFIERS: Final = frozenset({"", "ForAllValues", "ForAnyValue"})


@dataclass(frozen=True)
class Condition:
    operator: str  # e.g. "ForAllValues:StringLike"
    key: str  # lower case, e.g. "aws:requesttag/fedimg:state"
    values: tuple[str, ...]


@dataclass(frozen=True)
class Statement:
    sid: str
    effect: str  # "Allow" | "Deny"
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    conditions: tuple[Condition, ...] = ()


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str | bool) for v in value):
        return tuple(str(v).lower() if isinstance(v, bool) else v for v in value)
    if isinstance(value, bool):
        return (str(value).lower(),)
    raise ValueError(f"not a string or a list of strings: {value!r}")


def parse_policy(doc: Mapping[str, Any]) -> tuple[Statement, ...]:
    """The statements of an identity policy; ValueError for anything this evaluator cannot judge."""
    if doc.get("Version") != "2012-10-17":
        raise ValueError("Version must be 2012-10-17")
    statements = []
    for raw in doc["Statement"]:
        unsupported = set(raw) - {"Sid", "Effect", "Action", "Resource", "Condition"}
        if unsupported:
            raise ValueError(f"{raw.get('Sid')}: unsupported elements {sorted(unsupported)}")
        if raw["Effect"] not in ("Allow", "Deny"):
            raise ValueError(f"{raw.get('Sid')}: Effect {raw['Effect']!r}")
        conditions = []
        for operator, block in raw.get("Condition", {}).items():
            qualifier, _, base = operator.rpartition(":")
            if base not in _OPERATORS or qualifier not in _QUALIFIERS:
                raise ValueError(f"{raw.get('Sid')}: unsupported condition operator {operator}")
            for key, values in block.items():
                conditions.append(Condition(operator, key.lower(), _strings(values)))
        statements.append(
            Statement(
                sid=str(raw.get("Sid", "")),
                effect=raw["Effect"],
                actions=_strings(raw["Action"]),
                resources=_strings(raw["Resource"]),
                conditions=tuple(conditions),
            )
        )
    return tuple(statements)


def load_policy(component: str) -> tuple[Statement, ...]:
    return parse_policy(json.loads((POLICY_DIR / POLICY_FILES[component]).read_text()))


def policy_actions(statements: Sequence[Statement]) -> set[str]:
    """Every action some Allow statement names (wildcards are refused: least privilege)."""
    found = set()
    for st in statements:
        if st.effect != "Allow":
            continue
        for action in st.actions:
            if "*" in action or "?" in action:
                raise ValueError(f"{st.sid}: wildcard action {action}")
            found.add(action)
    return found


@dataclass(frozen=True)
class Context:
    """The condition keys of one authorisation: what the request carries, what the resource has.

    ``resource_tags`` None means "not known here" (conditions on them are undecided);
    ``{}`` is a resource without tags (one being created, or not ours).
    """

    request_tags: Mapping[str, str] = field(default_factory=dict)
    resource_tags: Mapping[str, str] | None = field(default_factory=dict)
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def lookup(self, key: str) -> tuple[bool, tuple[str, ...] | None]:
        """(present, values); values None when the key's value is unknown."""
        for prefix in ("aws:requesttag/",):
            if key.startswith(prefix):
                return _tag(self.request_tags, key[len(prefix) :])
        if key == "aws:tagkeys":
            return (bool(self.request_tags), tuple(self.request_tags))
        for prefix in ("ec2:resourcetag/", "aws:resourcetag/"):
            if key.startswith(prefix):
                if self.resource_tags is None:
                    return True, None
                return _tag(self.resource_tags, key[len(prefix) :])
        if key == "ec2:public":
            if self.resource_tags is None:
                return True, None
            return True, (self.resource_tags.get(PUBLIC, "false"),)
        if key in self.extra:
            return True, self.extra[key]
        return False, ()


PUBLIC: Final = "__public"  # the book's pseudo-tag for "launch permission all"


def _tag(tagset: Mapping[str, str], name: str) -> tuple[bool, tuple[str, ...] | None]:
    for key, value in tagset.items():
        if key.lower() == name and key != PUBLIC:
            return True, (value,)
    return False, ()


def _value_matches(base: str, wanted: tuple[str, ...], actual: str) -> bool:
    if base == "StringLike":
        return any(fnmatch.fnmatchcase(actual, w) for w in wanted)
    if base == "Bool":
        return actual.lower() in {w.lower() for w in wanted}
    return actual in wanted  # StringEquals (StringNotEquals negates the result)


def condition_holds(cond: Condition, ctx: Context) -> bool | None:
    """True, False, or None when the context cannot tell."""
    present, actual = ctx.lookup(cond.key)
    if present and actual is None:
        return None
    qualifier, _, base = cond.operator.rpartition(":")
    if base == "Null":
        return (not present) == (cond.values == ("true",))
    if not present or actual is None:
        # A missing key: ForAllValues holds on the empty set; everything else fails.
        return qualifier == "ForAllValues"
    negate = base == "StringNotEquals"
    matches = [_value_matches("StringEquals" if negate else base, cond.values, a) for a in actual]
    if negate:
        matches = [not m for m in matches]
    if qualifier == "ForAllValues":
        return all(matches)
    return any(matches)


def statement_applies(st: Statement, action: str, arn: str, ctx: Context) -> bool | None:
    if not any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in st.actions):
        return False
    if not any(r == "*" or (arn != "*" and fnmatch.fnmatchcase(arn, r)) for r in st.resources):
        return False
    results = [condition_holds(c, ctx) for c in st.conditions]
    if any(r is False for r in results):
        return False
    return None if any(r is None for r in results) else True


@dataclass(frozen=True)
class Check:
    """One authorisation IAM makes for one API call."""

    component: str
    action: str
    arn: str
    context: Context
    request: str  # "<region> <operation> <short params>" for messages

    def __str__(self) -> str:
        return f"{self.component} {self.action} on {self.arn} ({self.request})"


ALLOWED, DENIED, NOT_ALLOWED, UNDECIDED = "allowed", "explicitly denied", "not allowed", "undecided"


def verdict(statements: Sequence[Statement], check: Check) -> str:
    """IAM's answer: an explicit Deny wins, then an Allow; undecided when tags are unknown."""
    applies = [
        (st, statement_applies(st, check.action, check.arn, check.context)) for st in statements
    ]
    if any(st.effect == "Deny" and a is True for st, a in applies):
        return DENIED
    if any(st.effect == "Deny" and a is None for st, a in applies):
        return UNDECIDED
    if any(st.effect == "Allow" and a is True for st, a in applies):
        return ALLOWED
    if any(st.effect == "Allow" and a is None for st, a in applies):
        return UNDECIDED
    return NOT_ALLOWED


# -- what the code can call: an AST scan of the packages ------------------------------------------


def code_actions(package: Path) -> dict[str, set[str]]:
    """IAM action -> the files calling it: boto3 method calls, paginators and waiters."""
    session = botocore.session.get_session()
    operations: dict[str, str] = {}
    for service in ("ec2", "ebs", "service-quotas"):
        model = session.get_service_model(service)
        for name in model.operation_names:
            snake = xform_name(name)
            assert snake not in operations, f"{snake} is an operation of two services"
            operations[snake] = f"{model.signing_name}:{name}"
    waiters = session.get_waiter_model("ec2")
    found: dict[str, set[str]] = {}
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            attr, action = node.func.attr, None
            if attr in operations:
                action = operations[attr]
            elif attr in ("get_paginator", "get_waiter") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    if attr == "get_paginator":
                        action = operations[arg.value]
                    else:
                        camel = "".join(part.capitalize() for part in arg.value.split("_"))
                        action = f"ec2:{waiters.get_waiter(camel).operation}"
            if action is not None:
                found.setdefault(action, set()).add(path.name)
    return found


# -- from recorded exchanges to IAM checks --------------------------------------------------------

_REGION: Final = re.compile(r"Credential=[^/]+/\d{8}/([a-z0-9-]+)/")


@dataclass(frozen=True)
class ApiRequest:
    exchange: Exchange
    call: AwsCall
    region: str
    params: Mapping[str, str]  # an EC2 query, flattened
    json: Mapping[str, Any]  # an EBS JSON body
    path: str

    @property
    def ok(self) -> bool:
        return 200 <= self.exchange.status < 300

    def label(self) -> str:
        interesting = {
            k: v
            for k, v in self.params.items()
            if k.endswith(("Id", "Id.1", "KeyName", "GroupName", "Name"))
        }
        return f"{self.region} {self.call.operation} {interesting or self.path}"


def api_request(exchange: Exchange) -> ApiRequest | None:
    entry = {
        "headers": dict(exchange.headers),
        "method": exchange.method,
        "url": f"http://proxy{exchange.target}",
        "body": base64.b64encode(exchange.body).decode(),
        "body_encoded": True,
    }
    call = call_of(entry)
    if call is None:
        return None
    found = _REGION.search(exchange.headers.get("Authorization", ""))
    region = found.group(1) if found else "?"
    params: dict[str, str] = {}
    payload: dict[str, Any] = {}
    if call.service == "ec2":
        text = exchange.body.decode("utf-8", "replace") or urlsplit(exchange.target).query
        params = {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}
    elif call.operation == "StartSnapshot" or call.service == "servicequotas":
        payload = json.loads(exchange.body or b"{}")
    return ApiRequest(exchange, call, region, params, payload, urlsplit(exchange.target).path)


def indexed(params: Mapping[str, str], prefix: str) -> list[str]:
    """``Prefix.1``, ``Prefix.2``, ... in order."""
    out: list[str] = []
    for n in itertools.count(1):
        if f"{prefix}.{n}" not in params:
            return out
        out.append(params[f"{prefix}.{n}"])
    return out


def tag_pairs(params: Mapping[str, str], prefix: str) -> dict[str, str]:
    """``Prefix.N.Key``/``Prefix.N.Value`` as a dict."""
    found: dict[str, str] = {}
    for n in itertools.count(1):
        key = params.get(f"{prefix}.{n}.Key")
        if key is None:
            return found
        found[key] = params.get(f"{prefix}.{n}.Value", "")
    return found


def tag_specs(params: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """resource type -> tags of a request's ``TagSpecification`` list."""
    specs: dict[str, dict[str, str]] = {}
    for n in itertools.count(1):
        kind = params.get(f"TagSpecification.{n}.ResourceType")
        if kind is None:
            return specs
        specs[kind] = tag_pairs(params, f"TagSpecification.{n}.Tag")
    return specs


def arn(kind: str, region: str, resource_id: str) -> str:
    if kind in ("image", "snapshot"):
        return f"arn:aws:ec2:{region}::{kind}/{resource_id}"
    return f"arn:aws:ec2:{region}:{ACCOUNT}:{kind}/{resource_id}"


_KIND_OF_PREFIX: Final = {
    "ami-": "image",
    "snap-": "snapshot",
    "i-": "instance",
    "sg-": "security-group",
    "vol-": "volume",
    "key-": "key-pair",
}


class TagBook:
    """The tags of every resource the run touched, as they were at each point of the run."""

    def __init__(self) -> None:
        self._tags: dict[str, dict[str, str]] = {}
        self.copy_snapshot_tags: dict[str, dict[str, str]] = {}  # copy's AMI -> its snapshots' tags
        self.registered_snapshot: dict[str, str] = {}  # AMI -> the snapshot it was registered from

    def get(self, kind: str, resource_id: str) -> dict[str, str] | None:
        found = self._tags.get(f"{kind}/{resource_id}")
        return dict(found) if found is not None else None

    def learn(self, kind: str, resource_id: str, values: Mapping[str, str]) -> None:
        self._tags.setdefault(f"{kind}/{resource_id}", {}).update(values)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(el: ElementTree.Element, name: str) -> ElementTree.Element | None:
    return next((c for c in el if _local(c.tag) == name), None)


def _text(el: ElementTree.Element, name: str) -> str | None:
    found = _child(el, name)
    return found.text if found is not None else None


def _items(el: ElementTree.Element | None, name: str) -> list[ElementTree.Element]:
    holder = _child(el, name) if el is not None else None
    return [c for c in holder if _local(c.tag) == "item"] if holder is not None else []


def _tagset(el: ElementTree.Element) -> dict[str, str]:
    return {_text(t, "key") or "": _text(t, "value") or "" for t in _items(el, "tagSet")}


def _xml(data: bytes) -> ElementTree.Element | None:
    try:
        return ElementTree.fromstring(data)
    except ElementTree.ParseError:
        return None


def apply_effects(req: ApiRequest, book: TagBook) -> None:
    """What a successful call created, tagged or revealed."""
    if not req.ok:
        return
    op, p = req.call.operation, req.params
    specs = tag_specs(p)
    if op == "StartSnapshot":
        answer = json.loads(req.exchange.response or b"{}")
        book.learn(
            "snapshot",
            answer["SnapshotId"],
            {t["Key"]: t["Value"] for t in req.json.get("Tags", [])},
        )
        return
    root = _xml(req.exchange.response)
    if root is None:
        return
    if op in ("RegisterImage", "CopyImage"):
        ami = _text(root, "imageId")
        assert ami, req.label()
        book.learn("image", ami, {**specs.get("image", {}), PUBLIC: "false"})
        if op == "CopyImage":
            book.copy_snapshot_tags[ami] = specs.get("snapshot", {})
        elif p.get("BlockDeviceMapping.1.Ebs.SnapshotId"):
            book.registered_snapshot[ami] = p["BlockDeviceMapping.1.Ebs.SnapshotId"]
    elif op == "RunInstances":
        for item in _items(root, "instancesSet"):
            book.learn("instance", _text(item, "instanceId") or "?", specs.get("instance", {}))
    elif op == "ImportKeyPair":
        book.learn("key-pair", p["KeyName"], specs.get("key-pair", {}))
    elif op == "CreateSecurityGroup":
        book.learn("security-group", _text(root, "groupId") or "?", specs.get("security-group", {}))
    elif op == "CreateTags":
        for resource in indexed(p, "ResourceId"):
            kind = next((k for pre, k in _KIND_OF_PREFIX.items() if resource.startswith(pre)), "?")
            book.learn(kind, resource, tag_pairs(p, "Tag"))
    elif op == "ModifyImageAttribute" and "all" in indexed(p, "LaunchPermission.Add"):
        book.learn("image", p["ImageId"], {PUBLIC: "true"})
    elif op == "ModifyImageAttribute" and p.get("LaunchPermission.Add.1.Group") == "all":
        book.learn("image", p["ImageId"], {PUBLIC: "true"})
    elif op == "DescribeImages":
        for item in _items(root, "imagesSet"):
            ami = _text(item, "imageId") or "?"
            book.learn("image", ami, {**_tagset(item), PUBLIC: _text(item, "isPublic") or "false"})
            for mapping in _items(item, "blockDeviceMapping"):
                ebs = _child(mapping, "ebs")
                snap = _text(ebs, "snapshotId") if ebs is not None else None
                if not snap:
                    continue
                if book.get("snapshot", snap) is None and ami in book.copy_snapshot_tags:
                    # Created by that CopyImage, tagged by its snapshot TagSpecification.
                    book.learn("snapshot", snap, book.copy_snapshot_tags[ami])
                registered = book.registered_snapshot.get(ami)
                if registered and registered != snap:
                    # moto maps a registered AMI to a snapshot of its own making; in AWS
                    # the mapping names the snapshot given to RegisterImage: same tags.
                    book.learn("snapshot", snap, book.get("snapshot", registered) or {})
    elif op == "DescribeSnapshots":
        for item in _items(root, "snapshotSet"):
            book.learn("snapshot", _text(item, "snapshotId") or "?", _tagset(item))
    elif op == "DescribeInstances":
        for reservation in _items(root, "reservationSet"):
            for item in _items(reservation, "instancesSet"):
                book.learn("instance", _text(item, "instanceId") or "?", _tagset(item))
    elif op == "DescribeSecurityGroups":
        for item in _items(root, "securityGroupInfo"):
            book.learn("security-group", _text(item, "groupId") or "?", _tagset(item))
    elif op == "DescribeKeyPairs":
        for item in _items(root, "keySet"):
            book.learn("key-pair", _text(item, "keyName") or "?", _tagset(item))


def checks_for(req: ApiRequest, book: TagBook) -> list[Check]:
    """The authorisations IAM makes for one request, with what is known at that moment."""
    op, p, region, comp = req.call.operation, req.params, req.region, req.call.component
    action, label = req.call.action, req.label()
    specs = tag_specs(p)
    checks: list[Check] = []

    def existing(
        kind: str,
        resource_id: str,
        where: str = region,
        extra: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        ctx = Context(resource_tags=book.get(kind, resource_id), extra=extra or {})
        checks.append(Check(comp, action, arn(kind, where, resource_id), ctx, label))

    def new(kind: str, request_tags: Mapping[str, str]) -> None:
        ctx = Context(request_tags=request_tags, resource_tags={})
        checks.append(Check(comp, action, arn(kind, region, "NEW"), ctx, label))
        if request_tags:  # tag-on-create is also authorised as ec2:CreateTags
            create = Context(
                request_tags=request_tags, resource_tags={}, extra={"ec2:createaction": (op,)}
            )
            checks.append(Check(comp, "ec2:CreateTags", arn(kind, region, "NEW"), create, label))

    if op.startswith(("Describe", "List")):
        checks.append(Check(comp, action, "*", Context(), label))
    elif op == "StartSnapshot":
        new("snapshot", {t["Key"]: t["Value"] for t in req.json.get("Tags", [])})
    elif op in ("PutSnapshotBlock", "CompleteSnapshot"):
        existing("snapshot", next(s for s in req.path.split("/") if s.startswith("snap-")))
    elif op == "RegisterImage":
        new("image", specs.get("image", {}))
        for n in itertools.count(1):
            snap = p.get(f"BlockDeviceMapping.{n}.Ebs.SnapshotId")
            if snap is None and f"BlockDeviceMapping.{n}.DeviceName" not in p:
                break
            if snap:
                existing("snapshot", snap)
    elif op == "CopyImage":
        existing("image", p["SourceImageId"], p["SourceRegion"])
        new("image", specs.get("image", {}))
        new("snapshot", specs.get("snapshot", {}))
    elif op == "CreateTags":
        for resource in indexed(p, "ResourceId"):
            kind = next((k for pre, k in _KIND_OF_PREFIX.items() if resource.startswith(pre)), "?")
            ctx = Context(request_tags=tag_pairs(p, "Tag"), resource_tags=book.get(kind, resource))
            checks.append(Check(comp, action, arn(kind, region, resource), ctx, label))
    elif op in ("ModifyImageAttribute", "DeregisterImage"):
        existing("image", p["ImageId"])
    elif op == "ModifySnapshotAttribute":
        added = indexed(p, "UserGroup") if p.get("OperationType") == "add" else []
        added += [
            v for k, v in p.items() if re.fullmatch(r"CreateVolumePermission\.Add\.\d+\.Group", k)
        ]
        extra = {"ec2:add/group": tuple(added)} if added else {}
        existing("snapshot", p["SnapshotId"], extra=extra)
    elif op in ("DescribeSnapshotAttribute", "DeleteSnapshot"):
        existing("snapshot", p["SnapshotId"])
    elif op == "EnableImageDeprecation":
        existing("image", p["ImageId"])
    elif op == "GetServiceQuota":
        quota = f"{req.json.get('ServiceCode')}/{req.json.get('QuotaCode')}"
        where = f"arn:aws:servicequotas:{region}:{ACCOUNT}:{quota}"
        checks.append(Check(comp, action, where, Context(), label))
    elif op == "RunInstances":
        existing("image", p["ImageId"])
        if "KeyName" in p:
            existing("key-pair", p["KeyName"])
        for group in indexed(p, "SecurityGroupId"):
            existing("security-group", group)
        subnet = p.get("SubnetId", "default")
        checks.append(Check(comp, action, arn("subnet", region, subnet), Context(), label))
        new("network-interface", {})
        new("instance", specs.get("instance", {}))
        new("volume", specs.get("volume", {}))
    elif op in ("TerminateInstances",):
        for instance in indexed(p, "InstanceId"):
            existing("instance", instance)
    elif op == "GetConsoleOutput":
        existing("instance", p["InstanceId"])
    elif op == "ImportKeyPair":
        new("key-pair", specs.get("key-pair", {}))
    elif op == "DeleteKeyPair":
        existing("key-pair", p["KeyName"])
    elif op == "CreateSecurityGroup":
        new("security-group", specs.get("security-group", {}))
        vpc = p.get("VpcId", "default")
        checks.append(Check(comp, action, arn("vpc", region, vpc), Context(), label))
    elif op in ("AuthorizeSecurityGroupIngress", "DeleteSecurityGroup"):
        existing("security-group", p["GroupId"])
    else:  # not modelled: only a statement on "*" can allow it, which the policies do not have
        checks.append(Check(comp, action, "*", Context(), label))
    return checks


def authorise_run(
    requests: Sequence[ApiRequest], policies: Mapping[str, Sequence[Statement]]
) -> dict[str, list[Check]]:
    """Every check of every request, in the order IAM would have made them, by verdict."""
    book = TagBook()
    events = sorted(
        [(r.exchange.start, 0, i) for i, r in enumerate(requests)]
        + [(r.exchange.end, 1, i) for i, r in enumerate(requests)]
    )
    out: dict[str, list[Check]] = {ALLOWED: [], DENIED: [], NOT_ALLOWED: [], UNDECIDED: []}
    for _, kind, i in events:
        req = requests[i]
        if kind == 1:
            apply_effects(req, book)
            continue
        for check in checks_for(req, book):
            out[verdict(policies[check.component], check)].append(check)
    return out


# -- unit tests: the evaluator and what the policies refuse ---------------------------------------


def test_both_policies_parse_grant_no_wildcard_action_and_name_every_statement() -> None:
    for component in POLICY_FILES:
        statements = load_policy(component)
        assert statements, component
        assert all(st.sid for st in statements), "every statement needs a Sid (docs/security.md)"
        assert len({st.sid for st in statements}) == len(statements), "duplicate Sid"
        actions = policy_actions(statements)
        assert actions and all(a.startswith(("ec2:", "ebs:", "servicequotas:")) for a in actions), (
            actions
        )
        # Only read-only actions on "*": every write is scoped to a resource type.
        for st in statements:
            if "*" in st.resources and st.effect == "Allow":
                reads = ("Describe", "Get")
                assert all(a.split(":")[1].startswith(reads) for a in st.actions), st.sid


def test_the_evaluator_refuses_what_it_cannot_judge() -> None:
    base = {"Sid": "s", "Effect": "Allow", "Action": "ec2:DescribeImages", "Resource": "*"}
    for bad in (
        {"Version": "2008-10-17", "Statement": [base]},
        {"Version": "2012-10-17", "Statement": [{**base, "NotAction": "ec2:RunInstances"}]},
        {"Version": "2012-10-17", "Statement": [{**base, "Effect": "Maybe"}]},
        {
            "Version": "2012-10-17",
            "Statement": [{**base, "Condition": {"IpAddress": {"aws:SourceIp": "1.2.3.4"}}}],
        },
    ):
        with pytest.raises(ValueError):
            parse_policy(bad)
    with pytest.raises(ValueError):
        policy_actions(
            parse_policy({"Version": "2012-10-17", "Statement": [{**base, "Action": "ec2:*"}]})
        )


@pytest.mark.parametrize(
    ("operator", "key", "values", "ctx", "expected"),
    [
        ("Null", "aws:RequestTag/k", "false", Context(request_tags={"k": "v"}), True),
        ("Null", "aws:RequestTag/k", "false", Context(), False),
        ("Null", "aws:RequestTag/k", "true", Context(), True),
        ("StringEquals", "ec2:ResourceTag/k", "v", Context(resource_tags={"k": "v"}), True),
        ("StringEquals", "ec2:ResourceTag/k", "v", Context(resource_tags={"k": "w"}), False),
        ("StringEquals", "ec2:ResourceTag/k", "v", Context(resource_tags=None), None),
        ("StringEquals", "ec2:ResourceTag/k", "v", Context(resource_tags={}), False),
        ("StringNotEquals", "ec2:ResourceTag/k", "v", Context(resource_tags={"k": "w"}), True),
        ("StringLike", "aws:RequestTag/k", "fed*", Context(request_tags={"k": "fedimg"}), True),
        (
            "ForAllValues:StringLike",
            "aws:TagKeys",
            "fedimg:*",
            Context(request_tags={"fedimg:a": "1"}),
            True,
        ),
        (
            "ForAllValues:StringLike",
            "aws:TagKeys",
            "fedimg:*",
            Context(request_tags={"fedimg:a": "1", "Name": "x"}),
            False,
        ),
        ("ForAllValues:StringLike", "aws:TagKeys", "fedimg:*", Context(), True),
        (
            "ForAnyValue:StringEquals",
            "aws:TagKeys",
            "Name",
            Context(request_tags={"Name": "x"}),
            True,
        ),
        ("Bool", "ec2:Public", "true", Context(resource_tags={PUBLIC: "true"}), True),
        ("Bool", "ec2:Public", "true", Context(resource_tags={}), False),
        (
            "StringEquals",
            "ec2:CreateAction",
            "RunInstances",
            Context(extra={"ec2:createaction": ("RunInstances",)}),
            True,
        ),
        ("StringEquals", "ec2:CreateAction", "RunInstances", Context(), False),
    ],
)
def test_condition_operators(
    operator: str, key: str, values: str, ctx: Context, expected: bool | None
) -> None:
    assert condition_holds(Condition(operator, key.lower(), (values,)), ctx) is expected


def _check(component: str, action: str, kind: str, **ctx: Any) -> str:
    check = Check(component, action, arn(kind, "us-east-1", "x-1"), Context(**ctx), "synthetic")
    return verdict(load_policy(component), check)


STAGED = {tags.COMPOSE_ID: "Fedora-40-20240501.0", tags.IMAGE_NAME: "n", tags.STATE: "testing"}


def test_fedimg_policy_lets_only_a_promoting_or_released_staging_ami_or_a_copy_go_public() -> None:
    publish = "ec2:ModifyImageAttribute"
    assert _check("fedimg", publish, "image", resource_tags=STAGED) == NOT_ALLOWED
    rejected = {**STAGED, tags.STATE: "rejected"}
    assert _check("fedimg", publish, "image", resource_tags=rejected) == NOT_ALLOWED
    released = {**STAGED, tags.STATE: "released"}  # re-published by the audit (fedimg.audit.fix)
    assert _check("fedimg", publish, "image", resource_tags=released) == ALLOWED
    promoting = {**STAGED, tags.STATE: "promoting"}
    assert _check("fedimg", publish, "image", resource_tags=promoting) == ALLOWED
    assert _check("fedimg", publish, "image", resource_tags={tags.SOURCE_AMI: "ami-1"}) == ALLOWED
    assert _check("fedimg", publish, "image", resource_tags={}) == NOT_ALLOWED  # not ours
    own_snapshot = {tags.COMPOSE_ID: "c"}
    share = "ec2:ModifySnapshotAttribute"
    assert (
        _check(
            "fedimg",
            share,
            "snapshot",
            resource_tags=own_snapshot,
            extra={"ec2:add/group": ("all",)},
        )
        == ALLOWED
    )
    assert (
        _check("fedimg", share, "snapshot", resource_tags=own_snapshot) == NOT_ALLOWED
    )  # a user id
    assert (
        _check("fedimg", share, "snapshot", resource_tags={}, extra={"ec2:add/group": ("all",)})
        == NOT_ALLOWED
    )


def test_fedimg_policy_never_removes_a_public_or_released_image() -> None:
    rejected = {**STAGED, tags.STATE: "rejected", PUBLIC: "false"}
    assert _check("fedimg", "ec2:DeregisterImage", "image", resource_tags=rejected) == ALLOWED
    assert (
        _check("fedimg", "ec2:DeregisterImage", "image", resource_tags={**rejected, PUBLIC: "true"})
        == DENIED
    )
    released = {**STAGED, tags.STATE: "released"}
    assert _check("fedimg", "ec2:DeregisterImage", "image", resource_tags=released) == DENIED
    assert _check("fedimg", "ec2:DeleteSnapshot", "snapshot", resource_tags=released) == DENIED
    assert _check("fedimg", "ec2:DeleteSnapshot", "snapshot", resource_tags={}) == NOT_ALLOWED
    assert _check("fedimg", "ec2:DeregisterImage", "image", resource_tags=None) == UNDECIDED


def test_fedimg_policy_registers_only_testing_images_and_tags_only_fedimg_keys() -> None:
    register = "ec2:RegisterImage"
    assert _check("fedimg", register, "image", request_tags=STAGED) == ALLOWED
    assert (
        _check("fedimg", register, "image", request_tags={**STAGED, tags.STATE: "released"})
        == NOT_ALLOWED
    )
    assert _check("fedimg", register, "image", request_tags={**STAGED, "Name": "x"}) == NOT_ALLOWED
    assert _check("fedimg", register, "image") == NOT_ALLOWED
    assert (
        _check(
            "fedimg",
            "ec2:CreateTags",
            "image",
            resource_tags=STAGED,
            request_tags={tags.STATE: "promoting"},
        )
        == ALLOWED
    )
    assert (
        _check(
            "fedimg", "ec2:CreateTags", "image", resource_tags=STAGED, request_tags={"Owner": "me"}
        )
        == NOT_ALLOWED
    )
    assert (
        _check(
            "fedimg", "ec2:CreateTags", "image", resource_tags={}, request_tags={tags.STATE: "x"}
        )
        == NOT_ALLOWED
    )
    assert _check("fedimg", "ebs:PutSnapshotBlock", "snapshot", resource_tags={}) == NOT_ALLOWED
    assert (
        _check("fedimg", "ec2:RunInstances", "instance", request_tags={"autocloud:ami-test": "a"})
        == NOT_ALLOWED
    )


def test_autocloud_policy_launches_tagged_instances_of_fedimg_images_ends_own() -> None:
    test_tags = {"autocloud:ami-test": "ami-1", "autocloud:job": "j", "autocloud:deadline": "d"}
    run = "ec2:RunInstances"
    assert _check("autocloud_ami", run, "instance", request_tags=test_tags) == ALLOWED
    assert (
        _check("autocloud_ami", run, "instance", request_tags={"autocloud:job": "j"}) == NOT_ALLOWED
    )
    assert _check("autocloud_ami", run, "image", resource_tags=STAGED) == ALLOWED
    assert _check("autocloud_ami", run, "image", resource_tags={}) == NOT_ALLOWED
    assert _check("autocloud_ami", run, "security-group", resource_tags={}) == NOT_ALLOWED
    for action in ("ec2:TerminateInstances", "ec2:GetConsoleOutput"):
        assert _check("autocloud_ami", action, "instance", resource_tags=test_tags) == ALLOWED
        assert (
            _check("autocloud_ami", action, "instance", resource_tags={"Name": "prod"})
            == NOT_ALLOWED
        )
    for kind in ("key-pair", "security-group"):
        assert (
            _check(
                "autocloud_ami",
                "ec2:CreateTags",
                kind,
                resource_tags=test_tags,
                request_tags=test_tags,
            )
            == NOT_ALLOWED
        )
    create = {"ec2:createaction": ("RunInstances",)}
    assert (
        _check("autocloud_ami", "ec2:CreateTags", "instance", request_tags=test_tags, extra=create)
        == ALLOWED
    )
    assert (
        _check(
            "autocloud_ami", "ec2:CreateTags", "instance", request_tags={"Owner": "x"}, extra=create
        )
        == NOT_ALLOWED
    )
    assert (
        _check("autocloud_ami", "ec2:ModifyImageAttribute", "image", resource_tags=STAGED)
        == NOT_ALLOWED
    )


def test_the_code_scan_finds_calls_paginators_and_waiters() -> None:
    fedimg_calls = code_actions(PACKAGES["fedimg"])
    assert {"ebs:PutSnapshotBlock", "ec2:CopyImage", "ec2:RegisterImage"} <= set(fedimg_calls)
    assert "snapshot.py" in fedimg_calls["ebs:StartSnapshot"]
    autocloud_calls = code_actions(PACKAGES["autocloud_ami"])
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:DescribeInstances"} <= set(
        autocloud_calls
    )
    assert "ec2:CopyImage" not in autocloud_calls


# -- the run --------------------------------------------------------------------------------------


@dataclass
class Run:
    stack: Stack
    recorded: list[AwsCall]  # moto's recording
    requests: list[ApiRequest]  # the proxy's, with answers
    states: dict[str, str]  # image name -> final state ("deleted" for the deregistered reject)


@pytest.fixture(scope="module")
def run(audited_run: AuditedRun) -> Run:
    requests = [r for r in map(api_request, audited_run.exchanges) if r is not None]
    return Run(audited_run.stack, audited_run.recorded, requests, audited_run.states)


def _by_component(calls: Sequence[AwsCall]) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = {}
    for call in calls:
        out.setdefault(call.component, Counter())[call.action] += 1
    return out


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)  # the first test of the session to ask starts the run
def test_the_run_released_and_rejected_so_both_paths_were_exercised(run: Run) -> None:
    assert sorted(run.states.values()) == ["deleted", "released", "released"], run.states
    made = _by_component(run.recorded)
    assert set(made) >= {"fedimg", "autocloud_ami"}, set(made)
    # The reject path ran: the rejected AMI and its snapshot were removed by fedimg.
    assert made["fedimg"]["ec2:DeregisterImage"] >= 1
    assert made["fedimg"]["ec2:DeleteSnapshot"] >= 1


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)  # the first test of the session to ask starts the run
def test_every_call_of_the_run_is_an_action_its_component_is_allowed(run: Run) -> None:
    made = _by_component(run.recorded)
    missing = {
        component: sorted(set(made.get(component, {})) - policy_actions(load_policy(component)))
        for component in POLICY_FILES
    }
    assert missing == {c: [] for c in POLICY_FILES}, f"actions the policies do not allow: {missing}"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)  # the first test of the session to ask starts the run
def test_no_hub_call_escapes_attribution(run: Run) -> None:
    """Calls without a fedimg/autocloud_ami User-Agent are the test's and the stand-ins' reads."""
    other = _by_component(run.recorded).get("other", Counter())
    writes = sorted(a for a in other if not a.split(":")[1].startswith(("Describe", "Get", "List")))
    assert writes == [], f"unattributed AWS writes: {writes}"
    # The proxy (the hub's endpoint) saw exactly the attributed calls moto answered.
    through_proxy = _by_component([r.call for r in run.requests])
    recorded = _by_component(run.recorded)
    assert set(through_proxy) <= set(POLICY_FILES), set(through_proxy)
    for component in POLICY_FILES:
        assert through_proxy.get(component) == recorded.get(component), component


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)  # the first test of the session to ask starts the run
def test_every_call_is_authorised_with_resources_and_conditions(run: Run) -> None:
    policies = {c: load_policy(c) for c in POLICY_FILES}
    outcome = authorise_run(run.requests, policies)
    problems = [
        f"{kind}: {check}" for kind in (DENIED, NOT_ALLOWED, UNDECIDED) for check in outcome[kind]
    ]
    assert problems == [], "\n".join(problems[:40])
    assert len(outcome[ALLOWED]) >= len(run.requests)
    # The conditions were really evaluated: tag-on-create, resource tags, the public flag.
    judged = {(c.action, c.arn.split(":")[-1].split("/")[0]) for c in outcome[ALLOWED]}
    for wanted in (
        ("ec2:CreateTags", "instance"),
        ("ec2:RunInstances", "image"),
        ("ec2:ModifyImageAttribute", "image"),
        ("ec2:DeregisterImage", "image"),
        ("ebs:PutSnapshotBlock", "snapshot"),
    ):
        assert wanted in judged, wanted


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)  # the first test of the session to ask starts the run
def test_policies_grant_nothing_the_code_does_not_call(run: Run) -> None:
    """Least privilege both ways: granted == what the code calls (+ tag-on-create)."""
    policies = {c: load_policy(c) for c in POLICY_FILES}
    outcome = authorise_run(run.requests, policies)
    exercised: dict[str, set[str]] = {c: set() for c in POLICY_FILES}
    for checks in outcome.values():
        for check in checks:  # includes the ec2:CreateTags every tag-on-create implies
            exercised[check.component].add(check.action)
    for component, package in PACKAGES.items():
        granted = policy_actions(policies[component])
        needed = set(code_actions(package)) | exercised[component]
        assert granted == needed, (
            f"{component}: granted, never needed: {sorted(granted - needed)}; "
            f"needed, not granted: {sorted(needed - granted)}"
        )
        unexercised = granted - exercised[component]
        assert unexercised == set(NOT_EXERCISED[component]), (
            f"{component}: granted but not used by the run: {sorted(unexercised)}; "
            f"documented: {sorted(NOT_EXERCISED[component])}"
        )


def test_a_recording_with_interleaved_entries_is_read_whole() -> None:
    """moto's recorder writes an entry and its newline separately: two can share a line."""
    from devel.awscalls import parse_recording

    def entry(operation: str, agent: str) -> str:
        return json.dumps(
            {
                "headers": {
                    "Authorization": (
                        "AWS4-HMAC-SHA256 Credential=k/20260101/us-east-1/ec2/aws4_request"
                    ),
                    "User-Agent": f"Boto3/1 {agent}",
                },
                "method": "POST",
                "url": f"http://moto/?Action={operation}",
                "body": "",
            }
        )

    lines = [
        entry("RunInstances", "autocloud_ami/3") + entry("CopyImage", "fedimg/3") + "\n",
        "\n",
        entry("DescribeImages", "python-requests") + "\n",
    ]
    assert [(c.component, c.action) for c in parse_recording(lines)] == [
        ("autocloud_ami", "ec2:RunInstances"),
        ("fedimg", "ec2:CopyImage"),
        ("other", "ec2:DescribeImages"),
    ]


def test_a_recording_read_while_moto_writes_skips_only_the_entry_being_written() -> None:
    """A test reads the recording while moto answers an earlier test's calls: the last line
    can end mid-entry. Its whole entries count; a cut entry elsewhere is still an error."""
    from devel.awscalls import parse_recording

    whole = json.dumps(
        {
            "headers": {
                "Authorization": (
                    "AWS4-HMAC-SHA256 Credential=k/20260101/us-east-1/ec2/aws4_request"
                ),
                "User-Agent": "Boto3/1 fedimg/3",
            },
            "method": "POST",
            "url": "http://moto/?Action=CopyImage",
            "body": "",
        }
    )
    cut = whole[: len(whole) // 2]
    assert [c.action for c in parse_recording([whole + "\n", whole + cut])] == [
        "ec2:CopyImage",
        "ec2:CopyImage",
    ]
    with pytest.raises(json.JSONDecodeError):
        parse_recording([cut + "\n", whole + "\n"])


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)  # the first test of the session to ask starts the run
def test_test_instances_get_ssh_from_one_address_and_per_run_keys_all_removed(run: Run) -> None:
    """From what autocloud_ami sent: tcp/22 from the runner only; nothing it made is left."""
    mine = [r for r in run.requests if r.call.component == "autocloud_ami" and r.ok]

    def of(operation: str) -> list[ApiRequest]:
        return [r for r in mine if r.call.operation == operation]

    ingress = of("AuthorizeSecurityGroupIngress")
    assert len(ingress) >= 3
    for r in ingress:
        rules = {k: v for k, v in r.params.items() if k.startswith("IpPermissions.")}
        assert rules == {
            "IpPermissions.1.IpProtocol": "tcp",
            "IpPermissions.1.FromPort": "22",
            "IpPermissions.1.ToPort": "22",
            "IpPermissions.1.IpRanges.1.CidrIp": "127.0.0.1/32",  # autocloud_ami.ssh_cidr
            "IpPermissions.1.IpRanges.1.Description": rules.get(
                "IpPermissions.1.IpRanges.1.Description", ""
            ),
        }, rules
    imported = [r.params["KeyName"] for r in of("ImportKeyPair")]
    assert len(imported) == len(set(imported)) >= 3, "a key pair name was reused"
    assert set(imported) <= {r.params["KeyName"] for r in of("DeleteKeyPair")}

    def answer(r: ApiRequest) -> ElementTree.Element:
        root = _xml(r.exchange.response)
        assert root is not None, r.label()
        return root

    groups = {_text(answer(r), "groupId") for r in of("CreateSecurityGroup")}
    assert groups <= {r.params["GroupId"] for r in of("DeleteSecurityGroup")}
    launched = {
        _text(item, "instanceId")
        for r in of("RunInstances")
        for item in _items(answer(r), "instancesSet")
    }
    terminated = {i for r in of("TerminateInstances") for i in indexed(r.params, "InstanceId")}
    assert len(launched) >= 3 and launched <= terminated
