"""One throwaway EC2 instance booted from the AMI under test, always cleaned up.

``TestInstance`` is a context manager in the pycloudlib style::

    with TestInstance(ec2, spec, timeouts) as inst:
        session = factory(SshTarget(inst.host, inst.port, user, inst.key, inst.fingerprints))
        ...

Entering it checks the AMI is ``available`` in the region, generates an
ed25519 key pair locally (only the public half is sent to AWS, the private key
never leaves this process's memory and is never logged), creates a security
group of its own allowing tcp/22 from one CIDR only, launches ONE instance
(terminate on instance-initiated shutdown, tags ``autocloud:ami-test``,
``autocloud:job`` and ``autocloud:deadline`` on everything, optionally a
cloud-init boot command that powers it off at the deadline), waits for
``running`` with a deadline and reads its address and the SSH host key
fingerprints cloud-init prints on the console. Leaving it - after success,
failure, an exception or a timeout, and also when entering fails half way -
terminates the instance, waits until it is gone, then deletes the key pair
and the security group. Whatever cannot be deleted is left tagged for the
sweeper and reported in ``cleanup_errors``.

The pure parts (``launch_spec``, ``run_instances_params``,
``ingress_params``, ``parse_host_key_fingerprints``) are separate functions.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

import paramiko
from botocore.exceptions import ClientError, WaiterError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from autocloud_ami.suite import NITRO
from fedimg.aws import error_code, tag_specs, with_extra

log = logging.getLogger(__name__)

TAG_TEST = "autocloud:ami-test"
TAG_JOB = "autocloud:job"
TAG_DEADLINE = "autocloud:deadline"
TAG_NAME = "Name"
SSH_PORT = 22

# run_instances errors that mean "not now": retried until launch_retry_timeout.
CAPACITY_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientHostCapacity",
        "InsufficientCapacity",
        "InstanceLimitExceeded",
        "VcpuLimitExceeded",
        "InsufficientFreeAddressesInSubnet",
        "MaxSpotInstanceCountExceeded",
    }
)
NOT_FOUND_CODES = frozenset(
    {
        "InvalidInstanceID.NotFound",
        "InvalidKeyPair.NotFound",
        "InvalidGroup.NotFound",
        "InvalidGroupId.NotFound",
    }
)
LIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")
# run_instances errors that mean "this instance type cannot run here" (not the image's
# fault): the type is unknown or not supported in the zone, or capacity stayed short
# past launch_retry_timeout.
# (Account quotas - InstanceLimitExceeded, VcpuLimitExceeded - stay plain LaunchRefused.)
UNAVAILABLE_CODES = frozenset(
    {
        "Unsupported",
        "InvalidParameterValue",
        "InsufficientInstanceCapacity",
        "InsufficientHostCapacity",
        "InsufficientCapacity",
    }
)
AWS_ARCH = {"x86_64": "x86_64", "aarch64": "arm64"}


# -- errors ------------------------------------------------------------------


class InstanceError(Exception):
    """The test instance could not be provided; the text is a one-line reason."""


class AmiUnavailable(InstanceError):
    """The AMI does not exist in the region or is not ``available``."""


class LaunchRefused(InstanceError):
    """``run_instances`` was refused (quota, capacity, bad parameters)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class TypeUnavailable(InstanceError):
    """The scenario's instance type cannot run in the region (not the image's fault)."""


class TypeRefused(LaunchRefused, TypeUnavailable):
    """``run_instances`` refused the instance type itself, or capacity stayed short."""


class InstanceFailed(InstanceError):
    """The instance reached a terminal state instead of ``running``."""


class BootTimeout(InstanceError, TimeoutError):
    """The instance was not ``running`` before the boot deadline."""


class HostKeyUnavailable(InstanceError):
    """``require_host_key`` is set and the console never showed the fingerprints."""


# -- pure parts -----------------------------------------------------------------


@dataclass(frozen=True)
class Timeouts:
    """Every wait of one instance's life, in seconds."""

    boot: float = 600.0
    host_key_wait: float = 180.0
    cleanup: float = 900.0
    launch_retry: float = 300.0
    poll: float = 5.0


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to launch one test instance (no AWS calls)."""

    region: str
    ami_id: str
    job_id: str
    instance_type: str
    ssh_cidr: str
    deadline: datetime
    subnet_id: str | None = None
    self_destruct: bool = True
    # IMDSv2 only (HttpTokens "required"); False for images whose cloud-init predates it.
    imds_tokens_required: bool = True
    extra_tags: Mapping[str, str] = field(default_factory=dict)  # autocloud_ami.extra_tags

    @property
    def name(self) -> str:
        """Name of the key pair and the security group of this run."""
        return f"autocloud-{self.job_id}"

    def tags(self) -> dict[str, str]:
        """The tags of every resource of this run: autocloud's own and the extra ones."""
        own = {
            TAG_TEST: self.ami_id,
            TAG_JOB: self.job_id,
            TAG_DEADLINE: format_deadline(self.deadline),
            TAG_NAME: f"autocloud test of {self.ami_id}",
        }
        return with_extra(own, self.extra_tags)


def format_deadline(when: datetime) -> str:
    """The ``autocloud:deadline`` tag value: ISO 8601 UTC to the second."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_deadline(value: str) -> datetime | None:
    """Inverse of ``format_deadline``; None for anything unparsable."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def new_job_id() -> str:
    return uuid.uuid4().hex


def launch_spec(
    *,
    region: str,
    ami_id: str,
    job_id: str,
    instance_type: str,
    ssh_cidr: str,
    lifetime: float,
    now: datetime | None = None,
    subnet_id: str | None = None,
    self_destruct: bool = True,
    imds_tokens_required: bool = True,
    extra_tags: Mapping[str, str] | None = None,
) -> LaunchSpec:
    """A LaunchSpec whose deadline is ``lifetime`` seconds from ``now``."""
    start = now or datetime.now(UTC)
    return LaunchSpec(
        region=region,
        ami_id=ami_id,
        job_id=job_id,
        instance_type=instance_type,
        ssh_cidr=ssh_cidr,
        deadline=start + timedelta(seconds=lifetime),
        subnet_id=subnet_id,
        self_destruct=self_destruct,
        imds_tokens_required=imds_tokens_required,
        extra_tags=dict(extra_tags or {}),
    )


@dataclass(frozen=True)
class TypeFacts:
    """What EC2 says about a scenario's instance type (DescribeInstanceTypes)."""

    instance_type: str
    hypervisor: str  # "nitro", "xen" or "" (bare metal)
    nvme_ebs: bool  # EbsInfo.NvmeSupport "required": EBS volumes, the root too, are NVMe

    @property
    def traits(self) -> frozenset[str]:
        """The suite's scenario traits (``autocloud_ami.suite.NITRO``) of this type."""
        return frozenset({NITRO}) if self.nvme_ebs else frozenset()


def type_facts(
    described: Mapping[str, Any], offered: bool, instance_type: str, region: str, arch: str
) -> TypeFacts:
    """The facts of ``instance_type`` from its DescribeInstanceTypes entry, or TypeUnavailable.

    ``offered``: DescribeInstanceTypeOfferings lists it in ``region``.
    """
    if not offered:
        raise TypeUnavailable(f"{region} does not offer instance type {instance_type}")
    supported = described.get("ProcessorInfo", {}).get("SupportedArchitectures", [])
    if AWS_ARCH.get(arch, arch) not in supported:
        raise TypeUnavailable(
            f"instance type {instance_type} runs {', '.join(supported) or 'nothing'}, not {arch}"
        )
    return TypeFacts(
        instance_type=instance_type,
        hypervisor=str(described.get("Hypervisor", "")),
        nvme_ebs=described.get("EbsInfo", {}).get("NvmeSupport") == "required",
    )


def describe_type(ec2: Any, instance_type: str, region: str, arch: str) -> TypeFacts:
    """Ask EC2 about ``instance_type`` in ``region``; TypeUnavailable when it cannot run there."""
    try:
        found = ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"]
    except ClientError as exc:
        if error_code(exc) != "InvalidInstanceType":
            raise
        raise TypeUnavailable(
            f"{instance_type} is not an EC2 instance type (InvalidInstanceType)"
        ) from exc
    offerings = ec2.describe_instance_type_offerings(
        LocationType="region", Filters=[{"Name": "instance-type", "Values": [instance_type]}]
    )["InstanceTypeOfferings"]
    offered = any(o.get("InstanceType") == instance_type for o in offerings)
    return type_facts(found[0] if found else {}, offered, instance_type, region, arch)


def self_destruct_user_data(deadline: datetime) -> str:
    """cloud-config that powers the instance off at ``deadline`` (re-armed on every boot).

    With shutdown behaviour ``terminate`` this bounds the instance's life even
    when the runner dies and no sweeper runs. The timer is a transient systemd
    unit, so it neither fails nor shows up in the suite's checks.
    """
    epoch = int(deadline.timestamp())
    script = (
        f"left=$(( {epoch} - $(date +%s) )); [ $left -gt 60 ] || left=60; "
        "systemd-run --unit=autocloud-deadline --on-active=${left}s "
        "/usr/bin/systemctl poweroff --force"
    )
    return "#cloud-config\nbootcmd:\n  - [sh, -c, " + _yaml_quote(script) + "]\n"


def _yaml_quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def run_instances_params(spec: LaunchSpec, key_name: str, group_id: str) -> dict[str, Any]:
    """The exact ``run_instances`` arguments for ``spec``."""
    params: dict[str, Any] = {
        "ImageId": spec.ami_id,
        "InstanceType": spec.instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "KeyName": key_name,
        "SecurityGroupIds": [group_id],
        "InstanceInitiatedShutdownBehavior": "terminate",
        "ClientToken": spec.job_id,
        "TagSpecifications": tag_specs(("instance", "volume"), spec.tags()),
        "MetadataOptions": {
            "HttpEndpoint": "enabled",
            "HttpTokens": "required" if spec.imds_tokens_required else "optional",
        },
    }
    if spec.subnet_id:
        params["SubnetId"] = spec.subnet_id
    if spec.self_destruct:
        params["UserData"] = self_destruct_user_data(spec.deadline)
    return params


def ingress_params(group_id: str, cidr: str) -> dict[str, Any]:
    """``authorize_security_group_ingress`` arguments: tcp/22 from ``cidr`` only."""
    rule: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": SSH_PORT, "ToPort": SSH_PORT}
    description = "autocloud_ami SSH from the test runner"
    if ":" in cidr:
        rule["Ipv6Ranges"] = [{"CidrIpv6": cidr, "Description": description}]
    else:
        rule["IpRanges"] = [{"CidrIp": cidr, "Description": description}]
    return {"GroupId": group_id, "IpPermissions": [rule]}


_BEGIN = "-----BEGIN SSH HOST KEY FINGERPRINTS-----"
_END = "-----END SSH HOST KEY FINGERPRINTS-----"
_FP_LINE = re.compile(r"\b\d{3,5}\s+(SHA256:[A-Za-z0-9+/]{43})=?\s")


def parse_host_key_fingerprints(console: str | None) -> tuple[str, ...] | None:
    """The ``SHA256:...`` fingerprints cloud-init printed on the console.

    cloud-init writes a block between ``-----BEGIN SSH HOST KEY
    FINGERPRINTS-----`` and ``-----END ...-----`` (lines may carry an
    ``ec2:`` or timestamp prefix). Returns None when no complete block is
    present or it holds no SHA256 fingerprint; the LAST complete block wins
    (a re-run of cloud-init prints a fresh one).
    """
    if not console:
        return None
    found: tuple[str, ...] | None = None
    lines = console.splitlines()
    i = 0
    while i < len(lines):
        if _BEGIN in lines[i]:
            block: list[str] = []
            j = i + 1
            while j < len(lines) and _END not in lines[j] and _BEGIN not in lines[j]:
                match = _FP_LINE.search(lines[j] + " ")
                if match:
                    block.append(match.group(1))
                j += 1
            if j < len(lines) and _END in lines[j] and block:
                found = tuple(dict.fromkeys(block))
            i = j
            continue
        i += 1
    return found


@dataclass(frozen=True)
class KeyPair:
    """A locally generated key: the private half stays in this object."""

    private: paramiko.PKey = field(repr=False)
    public_openssh: str

    def __repr__(self) -> str:
        return f"KeyPair({self.public_openssh[:24]}...)"


def generate_key() -> KeyPair:
    """A fresh ed25519 key pair, generated in memory."""
    import io

    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    private = paramiko.Ed25519Key.from_private_key(io.StringIO(pem))
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return KeyPair(private=private, public_openssh=public.decode() + " autocloud_ami")


# -- the shell -------------------------------------------------------------------


class TestInstance:
    """One instance of ``spec.ami_id`` for one test run; see the module docstring."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        ec2: Any,
        spec: LaunchSpec,
        timeouts: Timeouts | None = None,
        *,
        ssh_override: tuple[str, int] | None = None,
        require_host_key: bool = False,
        key_factory: Callable[[], KeyPair] = generate_key,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.ec2 = ec2
        self.spec = spec
        self.timeouts = timeouts or Timeouts()
        self.ssh_override = ssh_override
        self.require_host_key = require_host_key
        self._key_factory = key_factory
        self._clock = clock
        self._sleep = sleep
        self.key: paramiko.PKey | None = None
        self.key_name: str | None = None
        self.key_pair_id: str | None = None
        self.group_id: str | None = None
        self.instance_id: str | None = None
        self.host: str = ""
        self.port: int = SSH_PORT
        self.fingerprints: tuple[str, ...] | None = None
        self.cleanup_errors: list[str] = []
        self.cleaned = False

    # -- context manager ---------------------------------------------------
    def __enter__(self) -> TestInstance:
        try:
            self.launch()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    @property
    def _ctx(self) -> str:
        return f"{self.spec.ami_id} in {self.spec.region} (job {self.spec.job_id})"

    # -- launching ---------------------------------------------------------
    def launch(self) -> None:
        self.check_ami()
        self._create_key_pair()
        self._create_security_group()
        self._run_instance()
        self.wait_running()
        self._read_address()
        self.fingerprints = self.read_fingerprints()

    def check_ami(self) -> dict[str, Any]:
        """The AMI's description, if it exists here and is ``available``."""
        try:
            images = self.ec2.describe_images(ImageIds=[self.spec.ami_id])["Images"]
        except ClientError as exc:
            code = error_code(exc)
            if code in (
                "InvalidAMIID.NotFound",
                "InvalidAMIID.Malformed",
                "InvalidAMIID.Unavailable",
            ):
                raise AmiUnavailable(
                    f"AMI {self.spec.ami_id} not found in {self.spec.region} ({code})"
                ) from exc
            raise
        if not images:
            raise AmiUnavailable(f"AMI {self.spec.ami_id} not found in {self.spec.region}")
        state = images[0].get("State", "")
        if state != "available":
            raise AmiUnavailable(
                f"AMI {self.spec.ami_id} in {self.spec.region} is {state or 'in no state'}, "
                "not available"
            )
        return dict(images[0])

    def _create_key_pair(self) -> None:
        pair = self._key_factory()
        name = self.spec.name
        params = {
            "KeyName": name,
            "PublicKeyMaterial": pair.public_openssh.encode(),
            "TagSpecifications": tag_specs(("key-pair",), self.spec.tags()),
        }
        try:
            resp = self.ec2.import_key_pair(**params)
        except ClientError as exc:
            if error_code(exc) != "InvalidKeyPair.Duplicate":
                raise
            # A retried job id: the old private key is gone, replace the public half.
            log.warning("%s: key pair %s exists, replacing it", self._ctx, name)
            self.ec2.delete_key_pair(KeyName=name)
            resp = self.ec2.import_key_pair(**params)
        self.key = pair.private
        self.key_name = name
        self.key_pair_id = resp.get("KeyPairId")
        log.info("%s: imported key pair %s (%s)", self._ctx, name, self.key_pair_id)

    def _find_group(self) -> str | None:
        resp = self.ec2.describe_security_groups(
            Filters=[{"Name": f"tag:{TAG_JOB}", "Values": [self.spec.job_id]}]
        )
        groups = resp.get("SecurityGroups", [])
        return str(groups[0]["GroupId"]) if groups else None

    def _group_named(self, name: str) -> str | None:
        resp = self.ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [name]}])
        groups = resp.get("SecurityGroups", [])
        return str(groups[0]["GroupId"]) if groups else None

    def _vpc_of_subnet(self) -> str | None:
        if not self.spec.subnet_id:
            return None
        subnets = self.ec2.describe_subnets(SubnetIds=[self.spec.subnet_id])["Subnets"]
        return str(subnets[0]["VpcId"]) if subnets else None

    def _create_security_group(self) -> None:
        group_id = self._find_group()
        if group_id is None:
            params: dict[str, Any] = {
                "GroupName": self.spec.name,
                "Description": f"autocloud_ami test of {self.spec.ami_id}: SSH from the runner",
                "TagSpecifications": tag_specs(("security-group",), self.spec.tags()),
            }
            vpc = self._vpc_of_subnet()
            if vpc:
                params["VpcId"] = vpc
            try:
                group_id = str(self.ec2.create_security_group(**params)["GroupId"])
            except ClientError as exc:
                # The first answer was lost and botocore sent the call again: the
                # group named after this job is the one that first call made.
                if error_code(exc) != "InvalidGroup.Duplicate":
                    raise
                found = self._find_group() or self._group_named(self.spec.name)
                if found is None:
                    raise
                group_id = found
            self.group_id = group_id
            try:
                self.ec2.authorize_security_group_ingress(
                    **ingress_params(group_id, self.spec.ssh_cidr)
                )
            except ClientError as exc:
                # Same rule already there (a retried call whose first answer was lost).
                if error_code(exc) != "InvalidPermission.Duplicate":
                    raise
            log.info(
                "%s: security group %s allows tcp/22 from %s only",
                self._ctx,
                group_id,
                self.spec.ssh_cidr,
            )
        else:
            self.group_id = group_id
            log.info("%s: reusing security group %s", self._ctx, group_id)

    def _run_instance(self) -> None:
        assert self.key_name is not None and self.group_id is not None
        params = run_instances_params(self.spec, self.key_name, self.group_id)
        deadline = self._clock() + self.timeouts.launch_retry
        delay = max(self.timeouts.poll, 1.0)
        while True:
            try:
                resp = self.ec2.run_instances(**params)
                break
            except ClientError as exc:
                code = error_code(exc)
                if code in CAPACITY_CODES and self._clock() + delay < deadline:
                    log.warning(
                        "%s: run_instances refused (%s), retrying in %.0fs",
                        self._ctx,
                        code,
                        delay,
                    )
                    self._sleep(delay)
                    delay = min(delay * 2, 60.0)
                    continue
                refused = TypeRefused if code in UNAVAILABLE_CODES else LaunchRefused
                raise refused(
                    f"run_instances refused for {self.spec.instance_type} in "
                    f"{self.spec.region}: {code or type(exc).__name__}",
                    code,
                ) from exc
        self.instance_id = str(resp["Instances"][0]["InstanceId"])
        log.info(
            "%s: launched %s (%s), deadline %s",
            self._ctx,
            self.instance_id,
            self.spec.instance_type,
            format_deadline(self.spec.deadline),
        )

    def wait_running(self) -> None:
        """Wait for ``running`` (botocore waiter, our deadline); typed errors."""
        assert self.instance_id is not None
        delay = self.timeouts.poll
        attempts = max(1, math.ceil(self.timeouts.boot / delay) + 1)
        waiter = self.ec2.get_waiter("instance_running")
        started = self._clock()
        try:
            waiter.wait(
                InstanceIds=[self.instance_id],
                WaiterConfig={"Delay": delay, "MaxAttempts": attempts},
            )
        except WaiterError as exc:
            state, reason = _state_of(exc.last_response, self.instance_id)
            if state in ("shutting-down", "terminated", "stopping", "stopped"):
                raise InstanceFailed(
                    f"instance {self.instance_id} went {state} instead of running"
                    + (f": {reason}" if reason else "")
                ) from exc
            raise BootTimeout(
                f"instance {self.instance_id} not running after {self.timeouts.boot:.0f}s "
                f"(state {state or 'unknown'})"
            ) from exc
        log.info(
            "%s: %s running after %.1fs",
            self._ctx,
            self.instance_id,
            self._clock() - started,
        )

    def _describe(self) -> dict[str, Any]:
        resp = self.ec2.describe_instances(InstanceIds=[self.instance_id])
        for reservation in resp.get("Reservations", []):
            for inst in reservation.get("Instances", []):
                return dict(inst)
        raise InstanceError(f"instance {self.instance_id} disappeared")

    def _read_address(self) -> None:
        if self.ssh_override is not None:
            self.host, self.port = self.ssh_override
            log.info("%s: SSH overridden to %s:%s", self._ctx, self.host, self.port)
            return
        inst = self._describe()
        address = inst.get("PublicIpAddress") or inst.get("Ipv6Address")
        if not address and inst.get("PrivateIpAddress"):
            # A subnet without public addresses: the runner must be in the VPC.
            address = inst["PrivateIpAddress"]
            log.warning("%s: no public address, using private %s", self._ctx, address)
        if not address:
            raise InstanceError(f"instance {self.instance_id} has no address")
        self.host, self.port = str(address), SSH_PORT
        log.info("%s: %s is at %s", self._ctx, self.instance_id, self.host)

    def console_output(self) -> str:
        try:
            resp = self.ec2.get_console_output(InstanceId=self.instance_id, Latest=True)
        except ClientError as exc:
            if error_code(exc) not in ("UnsupportedOperation", "InvalidParameterValue"):
                raise
            resp = self.ec2.get_console_output(InstanceId=self.instance_id)
        return str(resp.get("Output") or "")

    def read_fingerprints(self) -> tuple[str, ...] | None:
        """Poll the console for cloud-init's fingerprint block, up to ``host_key_wait``."""
        deadline = self._clock() + self.timeouts.host_key_wait
        while True:
            try:
                found = parse_host_key_fingerprints(self.console_output())
            except ClientError as exc:
                log.warning("%s: console output unreadable: %s", self._ctx, error_code(exc))
                found = None
            if found:
                log.info("%s: %d host key fingerprints from the console", self._ctx, len(found))
                return found
            if self._clock() + self.timeouts.poll > deadline:
                break
            self._sleep(self.timeouts.poll)
        if self.require_host_key:
            raise HostKeyUnavailable(
                f"no SSH host key fingerprints on the console of {self.instance_id} "
                f"within {self.timeouts.host_key_wait:.0f}s"
            )
        log.warning("%s: no host key fingerprints on the console; key not verified", self._ctx)
        return None

    # -- cleaning up -------------------------------------------------------
    def cleanup(self) -> None:
        """Terminate, wait, delete key pair and group. Never raises; errors are kept."""
        if self.cleaned:
            return
        self.cleaned = True
        deadline = self._clock() + self.timeouts.cleanup
        self._cleanup_step("terminate instances", lambda: self._terminate(deadline))
        self._cleanup_step("delete key pair", self._delete_key_pair)
        self._cleanup_step("delete security group", lambda: self._delete_group(deadline))
        if self.cleanup_errors:
            log.error(
                "%s: cleanup incomplete (left for the sweeper): %s",
                self._ctx,
                "; ".join(self.cleanup_errors),
            )
        else:
            log.info("%s: cleaned up", self._ctx)

    def _cleanup_step(self, what: str, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - cleanup must go on; the sweeper retries
            detail = error_code(exc) or f"{type(exc).__name__}: {exc}"
            self.cleanup_errors.append(f"{what}: {detail}"[:300])

    def _live_instances(self) -> set[str]:
        ids = set()
        resp = self.ec2.describe_instances(
            Filters=[
                {"Name": f"tag:{TAG_JOB}", "Values": [self.spec.job_id]},
                {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
            ]
        )
        for reservation in resp.get("Reservations", []):
            for inst in reservation.get("Instances", []):
                ids.add(str(inst["InstanceId"]))
        return ids

    def _terminate(self, deadline: float) -> None:
        ids = self._live_instances()
        if self.instance_id:
            ids.add(self.instance_id)
        if not ids:
            return
        try:
            self.ec2.terminate_instances(InstanceIds=sorted(ids))
        except ClientError as exc:
            if error_code(exc) != "InvalidInstanceID.NotFound":
                raise
        log.info("%s: terminating %s", self._ctx, ", ".join(sorted(ids)))
        wait_terminated(
            self.ec2, ids, deadline, self.timeouts.poll, clock=self._clock, sleep=self._sleep
        )

    def _delete_key_pair(self) -> None:
        # By name: ours, unique in the region, and known even if the import's
        # answer was lost.
        try:
            self.ec2.delete_key_pair(KeyName=self.key_name or self.spec.name)
        except ClientError as exc:
            if error_code(exc) not in NOT_FOUND_CODES:
                raise
        self.key = None

    def _delete_group(self, deadline: float) -> None:
        group_id = self.group_id or self._find_group()
        if group_id is None:
            return
        delete_security_group(
            self.ec2, group_id, deadline, self.timeouts.poll, clock=self._clock, sleep=self._sleep
        )
        self.group_id = None


# -- shared with the sweeper ---------------------------------------------------------


def _state_of(response: Mapping[str, Any] | None, instance_id: str) -> tuple[str, str]:
    for reservation in (response or {}).get("Reservations", []):
        for inst in reservation.get("Instances", []):
            if inst.get("InstanceId") == instance_id:
                reason = inst.get("StateReason", {}).get("Message", "")
                return str(inst.get("State", {}).get("Name", "")), str(reason)
    return "", ""


def wait_terminated(
    ec2: Any,
    instance_ids: Iterable[str],
    deadline: float,
    poll: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Poll until every instance is ``terminated`` (or unknown); TimeoutError at deadline."""
    pending = set(instance_ids)
    while pending:
        try:
            resp = ec2.describe_instances(InstanceIds=sorted(pending))
        except ClientError as exc:
            if error_code(exc) != "InvalidInstanceID.NotFound":
                raise
            return
        states = {
            str(inst["InstanceId"]): inst["State"]["Name"]
            for reservation in resp.get("Reservations", [])
            for inst in reservation.get("Instances", [])
        }
        pending = {i for i in pending if states.get(i, "terminated") != "terminated"}
        if not pending:
            return
        if clock() >= deadline:
            raise CleanupTimeout(f"instances not terminated in time: {', '.join(sorted(pending))}")
        sleep(poll)


class CleanupTimeout(TimeoutError):
    """A resource could not be removed before the cleanup deadline."""


def delete_security_group(
    ec2: Any,
    group_id: str,
    deadline: float,
    poll: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Delete a group, retrying DependencyViolation (its instance is going away)."""
    delay = poll
    while True:
        try:
            ec2.delete_security_group(GroupId=group_id)
            return
        except ClientError as exc:
            code = error_code(exc)
            if code in NOT_FOUND_CODES:
                return
            if code != "DependencyViolation":
                raise
            if clock() + delay > deadline:
                raise CleanupTimeout(f"security group {group_id} still in use") from exc
            sleep(delay)
            delay = min(delay * 1.5, 30.0)


class SshPortTimeout(InstanceError, TimeoutError):
    """Nothing answered with an SSH banner on the instance's port before the deadline."""


def ssh_banner(host: str, port: int, timeout: float) -> bool:
    """True when ``host:port`` accepts a connection and sends an SSH banner line."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            data = b""
            while len(data) < 256 and b"\n" not in data:
                chunk = sock.recv(256)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return False
    return any(line.startswith(b"SSH-") for line in data.splitlines())


def wait_for_ssh_port(
    host: str,
    port: int,
    timeout: float,
    interval: float = 0.5,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Poll until sshd answers (its banner, not just a TCP accept); seconds waited.

    A short fixed interval, not a backoff: the login right after should find
    cloud-init's key in place, and the overhead above the boot stays below
    ``interval``. Raises ``SshPortTimeout`` at the deadline.
    """
    start = clock()
    deadline = start + timeout
    attempts = 0
    while True:
        attempts += 1
        left = deadline - clock()
        if ssh_banner(host, port, max(0.1, min(2.0, left))):
            return clock() - start
        if clock() + interval > deadline:
            raise SshPortTimeout(
                f"no SSH banner from {host}:{port} within {timeout:.0f}s ({attempts} probes)"
            )
        sleep(interval)
