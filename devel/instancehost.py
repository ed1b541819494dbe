"""A STAND-IN for every test instance at once: one SSH address, one emulated Fedora per instance.

moto's instances never boot. autocloud_ami, with ``autocloud_ami.ssh_override``
set to this host's address, sends every test instance's SSH connection here.
On public-key authentication the host asks the AWS endpoint (moto_server)
which key pair holds the offered key (``describe_key_pairs(IncludePublicKey=True)``,
only key pairs tagged ``autocloud:ami-test``), which live instance was
launched with it (``describe_instances``), and what that instance booted
(``describe_images``: the ``fedimg:image-name`` and ``fedimg:subvariant``
tags), and what its instance metadata says (``devel.sshhost.InstanceMetadata``:
the instance's id, type and private DNS name, the key pair's public key,
whether the launch required IMDSv2 tokens, whether ``describe_instance_types``
says the type's EBS volumes are NVMe). Only a key registered there gets in;
the key's signature is checked by paramiko, so it is real key
authentication, never accept-any.

The connection then talks to that instance's own emulated Fedora
(``devel.sshhost.SshTestHost``, not listening: this host accepts the
connections and hands it the exec requests): Atomic for an AtomicHost
subvariant, Base otherwise, with the misbehaviours the ``--fail`` rules give
its image name (``'Fedora-Cloud-Base-*aarch64*=selinux'``: an fnmatch glob on
the image name, then a ``devel.sshhost.FAULTS`` name). Everything that must
survive a reboot (enabled units, the boot id, the journal) lives in that
per-instance emulation. ``sudo reboot`` drops the instance's connections and
refuses its logins for ``reboot_delay`` seconds; a new instance refuses
logins until ``boot_delay`` seconds after its LaunchTime. One address cannot
refuse TCP for one instance only, so "down" is a refused login, which an SSH
client retries exactly like a refused connection.

    python -m devel.instancehost --port 2222 --moto http://127.0.0.1:5000 \\
        --fail 'Fedora-Cloud-Base-*aarch64*=selinux' --reboot-delay 1 --boot-delay 1

prints ``host key SHA256:...`` then ``listening on HOST:PORT`` when ready.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import paramiko
from botocore.exceptions import BotoCoreError, ClientError
from paramiko.common import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_SUCCEEDED,
)

from devel.sshhost import FAULTS, USER, InstanceMetadata, SshTestHost, fault_options
from fedimg import tags

log = logging.getLogger(__name__)

TAG_TEST = "autocloud:ami-test"  # autocloud_ami.instance.TAG_TEST: the AMI under test
LIVE_STATES = ("pending", "running")
FORGET_AFTER = 3600.0  # seconds an instance nobody logged into is kept in memory


class DirectoryError(Exception):
    """The AWS endpoint could not be asked (not: the key is unknown)."""


# -- the functional core --------------------------------------------------------------


@dataclass(frozen=True)
class FailRule:
    """``GLOB=FAULT``: instances of an image whose name matches GLOB misbehave with FAULT."""

    pattern: str
    fault: str

    @classmethod
    def parse(cls, text: str) -> FailRule:
        pattern, sep, fault = text.rpartition("=")
        if not sep or not pattern.strip() or not fault.strip():
            raise ValueError(f"not GLOB=FAULT: {text!r}")
        fault = fault.strip()
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r} in {text!r}; known: {', '.join(FAULTS)}")
        return cls(pattern.strip(), fault)

    def matches(self, image_name: str) -> bool:
        return fnmatch.fnmatchcase(image_name, self.pattern)

    def __str__(self) -> str:
        return f"{self.pattern}={self.fault}"


@dataclass(frozen=True)
class Profile:
    """How one instance behaves: what it booted and how it misbehaves."""

    ami_id: str
    image_name: str
    family: str  # "Base" | "Atomic"
    faults: tuple[str, ...] = ()


@dataclass(frozen=True)
class Registration:
    """A key pair that holds the offered key, and the live instance launched with it."""

    region: str
    key_name: str
    instance_id: str
    launched: datetime | None
    profile: Profile
    metadata: InstanceMetadata = field(default_factory=InstanceMetadata)

    @property
    def ident(self) -> tuple[str, str]:
        return (self.region, self.instance_id)


def family_of(subvariant: str) -> str:
    """The suite family of a productmd subvariant: Atomic for AtomicHost, else Base."""
    return "Atomic" if "atomic" in subvariant.lower() else "Base"


def profile_for(
    ami_id: str, image_tags: Mapping[str, str], name: str, rules: Sequence[FailRule]
) -> Profile:
    """The profile of an instance of ``ami_id``, from the AMI's fedimg tags and the rules."""
    image_name = image_tags.get(tags.IMAGE_NAME) or name or ami_id
    faults = tuple(dict.fromkeys(r.fault for r in rules if r.matches(image_name)))
    return Profile(ami_id, image_name, family_of(image_tags.get(tags.SUBVARIANT, "")), faults)


def metadata_for(inst: Mapping[str, Any], pair: Mapping[str, Any], nvme: bool) -> InstanceMetadata:
    """What IMDS tells the instance: from its DescribeInstances entry and its key pair."""
    options = inst.get("MetadataOptions") or {}
    key_line = str(pair.get("PublicKey", "")).strip()
    return InstanceMetadata(
        instance_id=str(inst["InstanceId"]),
        instance_type=str(inst.get("InstanceType", "")),
        local_hostname=str(inst.get("PrivateDnsName") or f"{inst['InstanceId']}.ec2.internal"),
        public_keys=(key_line,) if key_line else (),
        key_name=str(pair.get("KeyName", "")),
        tokens_required=options.get("HttpTokens") == "required",
        nvme=nvme,
    )


def same_key(openssh_public: str, key: paramiko.PKey) -> bool:
    """Whether an OpenSSH public key line (``type base64 [comment]``) is ``key``."""
    fields = openssh_public.split()
    if len(fields) < 2:
        return False
    return fields[0] == key.get_name() and fields[1] == key.get_base64()


def pick_instance(
    reservations: Iterable[Mapping[str, Any]],
) -> Mapping[str, Any] | None:
    """The newest live instance among ``describe_instances`` reservations, if any."""
    live = [
        inst
        for res in reservations
        for inst in res.get("Instances", [])
        if inst.get("State", {}).get("Name") in LIVE_STATES
    ]
    if not live:
        return None
    return max(live, key=lambda i: str(i.get("LaunchTime", "")))


# -- the AWS seam -------------------------------------------------------------------------


class Directory(Protocol):
    """Who an offered key belongs to; None if no live instance was launched with it."""

    def find(self, key: paramiko.PKey) -> Registration | None: ...


class AwsDirectory:
    """Asks the AWS endpoint (moto_server) about key pairs, instances and AMIs."""

    def __init__(
        self,
        ec2: Callable[[str], Any],
        regions: Sequence[str],
        rules: Sequence[FailRule] = (),
    ) -> None:
        if not regions:
            raise ValueError("at least one region is needed")
        self._ec2 = ec2
        self.regions = tuple(regions)
        self.rules = tuple(rules)
        self._profiles: dict[tuple[str, str], Profile] = {}
        self._nvme: dict[tuple[str, str], bool] = {}
        self._lock = threading.Lock()

    def find(self, key: paramiko.PKey) -> Registration | None:
        try:
            for region in self.regions:
                found = self._find_in(region, key)
                if found is not None:
                    return found
        except (ClientError, BotoCoreError) as exc:
            raise DirectoryError(f"{type(exc).__name__}: {exc}") from exc
        return None

    def _find_in(self, region: str, key: paramiko.PKey) -> Registration | None:
        ec2 = self._ec2(region)
        pairs = ec2.describe_key_pairs(
            IncludePublicKey=True, Filters=[{"Name": "tag-key", "Values": [TAG_TEST]}]
        )["KeyPairs"]
        pair = next((p for p in pairs if same_key(str(p.get("PublicKey", "")), key)), None)
        if pair is None:
            return None
        key_name = str(pair["KeyName"])
        tagged_ami = tags.as_dict(pair.get("Tags")).get(TAG_TEST, "")
        reservations = ec2.describe_instances(
            Filters=[
                {"Name": "key-name", "Values": [key_name]},
                {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
            ]
        )["Reservations"]
        inst = pick_instance(reservations)
        if inst is None:
            log.info("%s key pair %s (AMI %s): no live instance", region, key_name, tagged_ami)
            return None
        ami_id = str(inst.get("ImageId") or tagged_ami)
        if tagged_ami and ami_id != tagged_ami:
            log.warning(
                "%s instance %s booted %s but its key pair %s is tagged %s; behaving as %s",
                region,
                inst["InstanceId"],
                ami_id,
                key_name,
                tagged_ami,
                ami_id,
            )
        launched = inst.get("LaunchTime")
        nvme = self._nvme_ebs(ec2, region, str(inst.get("InstanceType", "")))
        return Registration(
            region=region,
            key_name=key_name,
            instance_id=str(inst["InstanceId"]),
            launched=launched if isinstance(launched, datetime) else None,
            profile=self._profile(ec2, region, ami_id),
            metadata=metadata_for(inst, pair, nvme),
        )

    def _nvme_ebs(self, ec2: Any, region: str, instance_type: str) -> bool:
        """Whether EC2 says the type's EBS volumes are NVMe devices (a Nitro type)."""
        with self._lock:
            cached = self._nvme.get((region, instance_type))
        if cached is not None:
            return cached
        described = ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"]
        nvme = bool(described) and described[0].get("EbsInfo", {}).get("NvmeSupport") == "required"
        with self._lock:
            self._nvme[(region, instance_type)] = nvme
        return nvme

    def _profile(self, ec2: Any, region: str, ami_id: str) -> Profile:
        with self._lock:
            cached = self._profiles.get((region, ami_id))
        if cached is not None:
            return cached
        images = ec2.describe_images(ImageIds=[ami_id]).get("Images", [])
        described = images[0] if images else {}
        profile = profile_for(
            ami_id, tags.as_dict(described.get("Tags")), str(described.get("Name", "")), self.rules
        )
        with self._lock:
            self._profiles[(region, ami_id)] = profile
        return profile


def aws_directory(
    endpoint_url: str, regions: Sequence[str], rules: Sequence[FailRule] = ()
) -> AwsDirectory:
    """An AwsDirectory on boto3 clients for ``endpoint_url`` (one client per region)."""
    import boto3

    session = boto3.session.Session(
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        aws_session_token=os.environ.get("AWS_SESSION_TOKEN", "testing"),
    )
    clients: dict[str, Any] = {}
    lock = threading.Lock()

    def ec2(region: str) -> Any:
        with lock:
            if region not in clients:
                clients[region] = session.client(
                    "ec2", region_name=region, endpoint_url=endpoint_url
                )
            return clients[region]

    return AwsDirectory(ec2, regions, rules)


# -- one instance ---------------------------------------------------------------------------


class InstanceOs(SshTestHost):
    """One instance's emulated Fedora (``SshTestHost``), fed connections by ``InstanceHost``.

    It never listens: ``adopt`` hands it a connection the InstanceHost accepted
    and authenticated, so that its reboot drops that connection too.
    """

    def __init__(self, registration: Registration, boot_ready: float, **options: Any) -> None:
        super().__init__(registration.profile.family, **options)
        self.registration = registration
        self.boot_ready = boot_ready
        self.last_used = time.monotonic()

    def adopt(self, transport: paramiko.Transport) -> None:
        with self._lock:  # SshTestHost's own lock over its connection list
            self._transports = [t for t in self._transports if t.is_active()]
            if transport not in self._transports:
                self._transports.append(transport)
        self.last_used = time.monotonic()

    def accepting(self) -> bool:
        """Booted (boot delay over) and not rebooting."""
        return time.monotonic() >= self.boot_ready and self.up


def boot_ready_at(
    launched: datetime | None,
    boot_delay: float,
    now: datetime,
    monotonic: Callable[[], float] = time.monotonic,
) -> float:
    """The monotonic time logins start to work: ``boot_delay`` after the launch."""
    elapsed = (now - launched).total_seconds() if launched is not None else 0.0
    return monotonic() + max(0.0, boot_delay - max(0.0, elapsed))


# -- the server -----------------------------------------------------------------------------


class _Auth(paramiko.ServerInterface):
    def __init__(self, host: InstanceHost, transport: paramiko.Transport, peer: str) -> None:
        self.host = host
        self.transport = transport
        self.peer = peer
        self.instance: InstanceOs | None = None

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if username != self.host.user:
            log.info("%s: refused user %r", self.peer, username[:64])
            return AUTH_FAILED
        instance = self.host.instance_for(key, self.peer)
        if instance is None or not instance.accepting():
            return AUTH_FAILED
        self.instance = instance
        instance.adopt(self.transport)  # before any command: a reboot must drop it
        return AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session" and self.instance is not None:
            return OPEN_SUCCEEDED
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        if self.instance is None:
            return False
        self.instance.last_used = time.monotonic()
        return self.instance.on_exec(channel, command.decode(errors="replace"))


class InstanceHost:
    """One loopback SSH address in front of every test instance moto knows of."""

    def __init__(
        self,
        directory: Directory,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        user: str = USER,
        boot_delay: float = 0.0,
        reboot_delay: float = 1.0,
        host_key: paramiko.PKey | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.directory = directory
        self.bind_host = host
        self.port = port
        self.user = user
        self.boot_delay = boot_delay
        self.reboot_delay = reboot_delay
        self.host_key: paramiko.PKey = host_key or paramiko.ECDSAKey.generate()
        self._clock = clock or (lambda: datetime.now().astimezone())
        self._instances: dict[tuple[str, str], InstanceOs] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._transports: list[paramiko.Transport] = []
        self.refused = 0

    @property
    def address(self) -> str:
        return f"{self.bind_host}:{self.port}"

    @property
    def fingerprint(self) -> str:
        from autocloud_ami.ssh import host_key_fingerprint

        return host_key_fingerprint(self.host_key)

    def instances(self) -> list[InstanceOs]:
        """Every instance that has been logged into (or tried to), oldest first."""
        with self._lock:
            return list(self._instances.values())

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> InstanceHost:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.bind_host, self.port))
        listener.listen(64)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._spawn(self._accept_loop, "instancehost-accept")
        log.info("instancehost %s: listening", self.address)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            transports, self._transports = self._transports, []
            instances = list(self._instances.values())
        for transport in transports:
            transport.close()
        for instance in instances:
            instance.stop(timeout=timeout)
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> InstanceHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    # -- who is this key ----------------------------------------------------------
    def instance_for(self, key: paramiko.PKey, peer: str) -> InstanceOs | None:
        """The instance ``key`` may log into, created on first sight; None to refuse."""
        try:
            found = self.directory.find(key)
        except DirectoryError as exc:
            log.error("%s: cannot look the key up, refusing: %s", peer, exc)
            return None
        if found is None:
            self.refused += 1
            log.info("%s: refused %s key: no live instance holds it", peer, key.get_name())
            return None
        with self._lock:
            idle = self._take_idle()
            instance = self._instances.get(found.ident)
            if instance is None:
                instance = self._new_instance(found)
                self._instances[found.ident] = instance
        for gone in idle:
            gone.stop(timeout=1.0)
        return instance

    def _new_instance(self, found: Registration) -> InstanceOs:
        profile = found.profile
        ready = boot_ready_at(found.launched, self.boot_delay, self._clock())
        log.info(
            "%s %s (%s, %s, key pair %s): %s instance of %s%s",
            found.region,
            found.instance_id,
            profile.ami_id,
            found.metadata.instance_type,
            found.key_name,
            profile.family,
            profile.image_name,
            f", misbehaving: {', '.join(profile.faults)}" if profile.faults else "",
        )
        return InstanceOs(
            found,
            ready,
            host=found.instance_id,  # never bound: names the instance in SshTestHost's logs
            port=self.port,
            user=self.user,
            authorized=lambda key: False,  # logins are decided by InstanceHost
            reboot_delay=self.reboot_delay,
            host_key=self.host_key,
            metadata=found.metadata,
            **fault_options(profile.faults),
        )

    def _take_idle(self) -> list[InstanceOs]:
        """Forget instances nobody used for FORGET_AFTER seconds (caller holds the lock)."""
        cutoff = time.monotonic() - FORGET_AFTER
        idle = [i for i in self._instances.values() if i.last_used < cutoff]
        for instance in idle:
            del self._instances[instance.registration.ident]
        return idle

    # -- connections --------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        listener = self._listener
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([listener], [], [], 0.1)
                if not ready:
                    continue
                sock, peer = listener.accept()
            except (OSError, ValueError):
                return  # closed by stop()
            self._spawn(self._serve, "instancehost-conn", sock, f"{peer[0]} port {peer[1]}")

    def _serve(self, sock: socket.socket, peer: str) -> None:
        transport = paramiko.Transport(sock)
        transport.add_server_key(self.host_key)
        with self._lock:
            if self._stop.is_set():
                transport.close()
                return
            self._transports = [t for t in self._transports if t.is_active()]
            self._transports.append(transport)
        auth = _Auth(self, transport, peer)
        try:
            transport.start_server(server=auth)
        except (paramiko.SSHException, EOFError, OSError):
            transport.close()
            return
        deadline = time.monotonic() + 30  # paramiko's own auth timeout bounds this too
        while transport.is_active() and not self._stop.is_set() and time.monotonic() < deadline:
            if transport.is_authenticated() and auth.instance is not None:
                auth.instance.logins += 1
                auth.instance.os.note_login(self.user, peer, self.host_key.get_name())
                return
            self._stop.wait(0.01)


# -- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devel.instancehost",
        description="One loopback SSH stand-in for every moto test instance (NOT Fedora).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--moto", required=True, metavar="URL", help="the moto_server endpoint")
    parser.add_argument(
        "--region",
        action="append",
        default=[],
        help="where to look for key pairs (repeatable; default us-east-1)",
    )
    parser.add_argument(
        "--fail",
        action="append",
        default=[],
        metavar="GLOB=FAULT",
        help=f"instances of images named like GLOB misbehave; FAULT in {', '.join(FAULTS)}",
    )
    parser.add_argument("--user", default=USER)
    parser.add_argument("--boot-delay", type=float, default=0.0)
    parser.add_argument("--reboot-delay", type=float, default=1.0)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # paramiko logs every client that hangs up without a goodbye (a reboot, a closed
    # session) as an ERROR "Socket exception"; for this stand-in that is normal.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    try:
        rules = [FailRule.parse(text) for text in args.fail]
    except ValueError as exc:
        parser.error(str(exc))
    directory = aws_directory(args.moto, args.region or ["us-east-1"], rules)
    host = InstanceHost(
        directory,
        host=args.host,
        port=args.port,
        user=args.user,
        boot_delay=args.boot_delay,
        reboot_delay=args.reboot_delay,
    )
    done = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with host:
        for rule in rules:
            log.info("rule: images named %s misbehave: %s", rule.pattern, rule.fault)
        print(f"host key {host.fingerprint}", flush=True)
        print(f"listening on {host.address}", flush=True)
        while not done.wait(1.0):
            pass
    print(f"stopped; {len(host.instances())} instance(s) seen", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
