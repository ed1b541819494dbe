"""The SSH seam: run one command at a time on a test instance and report, never raise.

``SshSession`` is what the suite runner talks to; ``ParamikoSession`` is the
production implementation over a paramiko ``Transport`` (no ``SSHClient``, no
known_hosts file: the host key is checked against the fingerprints cloud-init
printed on the instance's console, or pinned on first use). Tests replace the
session with a scripted fake, or point a ``ParamikoSession`` at
``devel.sshhost.SshTestHost``.

A failing, hanging or disconnected command is a *result* (``CommandResult``),
not an exception: only ``connect``/``reconnect`` raise, and only ``SshError``.
The private key is never logged.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import select
import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import Protocol

import paramiko

log = logging.getLogger(__name__)

# Bytes kept per stream and command; the rest is read (so the remote never
# blocks on a full window) and counted, not stored.
DEFAULT_MAX_OUTPUT = 1 << 20
_READ_CHUNK = 32768
_POLL = 0.1  # longest sleep in the read loop: a closed transport is noticed this fast
_MAX_BACKOFF = 10.0
# paramiko logs each failed handshake (sshd not up yet, a reset while the
# instance reboots) as an ERROR with a traceback from its own thread. connect()
# retries those and reports the last one, so paramiko's records go to DEBUG.
_PARAMIKO_LOG = "autocloud_ami.ssh.paramiko"


class _Demote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(_PARAMIKO_LOG).isEnabledFor(logging.DEBUG)


logging.getLogger(_PARAMIKO_LOG).addFilter(_Demote())


class SshError(Exception):
    """Logging in to the instance failed."""


class SshTimeout(SshError):
    """No login worked before the deadline."""


class HostKeyMismatch(SshError):
    """The server's host key is not one the instance announced: never retried."""


@dataclass(frozen=True)
class CommandResult:
    """What one remote command did. ``exit_code`` is None when it never exited."""

    command: str
    exit_code: int | None
    stdout: str
    stderr: str
    duration: float
    timed_out: bool = False
    error: str | None = None  # the connection failed: lost, never open, channel refused

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.error is None


class SshSession(Protocol):
    """One login to one instance, as the suite runner needs it."""

    def run(self, command: str, timeout: float) -> CommandResult:
        """Run ``command``; a failure, a timeout or a dropped connection is reported."""
        ...

    def reconnect(self, timeout: float) -> None:
        """Drop the current connection and poll until a login works; else ``SshTimeout``."""
        ...

    def close(self) -> None: ...


def host_key_fingerprint(key: paramiko.PKey) -> str:
    """``SHA256:<base64 without padding>``, exactly as ``ssh-keygen -l`` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


class _Capped:
    """A byte sink that keeps the first ``limit`` bytes and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.kept = 0
        self.dropped = 0

    def add(self, data: bytes) -> None:
        room = self.limit - self.kept
        if room > 0:
            self.parts.append(data[:room])
            self.kept += min(room, len(data))
        self.dropped += max(0, len(data) - max(room, 0))

    def text(self) -> str:
        out = b"".join(self.parts).decode("utf-8", errors="replace")
        if self.dropped:
            out += f"\n[... {self.dropped} more bytes not kept ...]\n"
        return out


class ParamikoSession:
    """An ``SshSession`` over paramiko, with deadlines on every wait.

    ``expected_fingerprints``: the host key fingerprints the instance printed
    (``SHA256:...``). ``None`` accepts any host key (logged as unverified) and
    pins the first one seen, so a host that changes key across a reboot is
    still refused.
    """

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        pkey: paramiko.PKey,
        *,
        expected_fingerprints: frozenset[str] | None = None,
        connect_timeout: float = 10.0,
        max_output: int = DEFAULT_MAX_OUTPUT,
        log_context: str = "",
    ) -> None:
        self.host = host
        self.port = port
        self.user = user
        self._pkey = pkey
        self.expected_fingerprints = expected_fingerprints
        self.connect_timeout = connect_timeout
        self.max_output = max_output
        self.log_context = log_context  # e.g. the compose and AMI ids, for every log line
        self._pinned: str | None = None
        self._transport: paramiko.Transport | None = None

    def __repr__(self) -> str:  # never show the key
        return f"ParamikoSession({self.user}@{self.host}:{self.port})"

    def __enter__(self) -> ParamikoSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def where(self) -> str:
        where = f"{self.user}@{self.host}:{self.port}"
        return f"{self.log_context} {where}" if self.log_context else where

    @property
    def connected(self) -> bool:
        return self._transport is not None and self._transport.is_active()

    # -- connecting -------------------------------------------------------
    def connect(self, timeout: float) -> None:
        """Log in, retrying with backoff until ``timeout``: the port may be closed,
        sshd not up yet, or cloud-init not done installing the key."""
        self.close()
        deadline = time.monotonic() + timeout
        delay = 0.2
        attempts = 0
        last = "no attempt made"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SshTimeout(
                    f"no SSH login to {self.where} within {timeout:.1f}s "
                    f"after {attempts} attempts; last error: {last}"
                )
            attempts += 1
            try:
                self._transport = self._open(min(self.connect_timeout, left))
                log.info("ssh %s: logged in (attempt %d)", self.where, attempts)
                return
            except HostKeyMismatch:
                raise
            except (OSError, EOFError, paramiko.SSHException) as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                log.debug("ssh %s: attempt %d failed: %s", self.where, attempts, last)
            left = deadline - time.monotonic()
            if left <= 0:
                continue
            time.sleep(min(delay, left))
            delay = min(delay * 2, _MAX_BACKOFF)

    def _open(self, timeout: float) -> paramiko.Transport:
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport: paramiko.Transport | None = None
        try:
            transport = paramiko.Transport(sock)
            transport.set_log_channel(_PARAMIKO_LOG)
            transport.banner_timeout = timeout
            transport.handshake_timeout = timeout
            transport.auth_timeout = timeout
            transport.start_client(timeout=timeout)
            self._check_host_key(transport.get_remote_server_key())
            transport.auth_publickey(self.user, self._pkey)
            if not transport.is_authenticated():
                raise paramiko.AuthenticationException("public key not accepted")
            transport.set_keepalive(15)
            return transport
        except BaseException:
            if transport is not None:
                transport.close()
            sock.close()
            raise

    def _check_host_key(self, key: paramiko.PKey) -> None:
        seen = host_key_fingerprint(key)
        if self.expected_fingerprints is not None:
            if seen not in self.expected_fingerprints:
                raise HostKeyMismatch(
                    f"{self.where} presented host key {key.get_name()} {seen}, "
                    f"not one of {sorted(self.expected_fingerprints)}"
                )
            return
        if self._pinned is None:
            log.warning(
                "ssh %s: host key %s %s NOT VERIFIED (no expected fingerprints); pinned",
                self.where,
                key.get_name(),
                seen,
            )
            self._pinned = seen
        elif seen != self._pinned:
            raise HostKeyMismatch(f"{self.where} changed host key from {self._pinned} to {seen}")

    def reconnect(self, timeout: float) -> None:
        self.close()
        self.connect(timeout)

    def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()

    # -- running ----------------------------------------------------------
    def run(self, command: str, timeout: float) -> CommandResult:
        start = time.monotonic()
        deadline = start + timeout
        transport = self._transport
        if transport is None or not transport.is_active():
            return CommandResult(command, None, "", "", 0.0, error="not connected")
        try:
            chan = transport.open_session(timeout=max(0.1, min(self.connect_timeout, timeout)))
        except (OSError, EOFError, paramiko.SSHException) as exc:
            why = f"could not open a channel: {type(exc).__name__}: {exc}"
            return CommandResult(command, None, "", "", time.monotonic() - start, error=why)
        try:
            failed = self._start(chan, command, deadline)
            if failed is not None:
                return replace(failed, duration=time.monotonic() - start)
            return self._collect(transport, chan, command, start, deadline)
        finally:
            _close_quietly(chan)

    def _start(self, chan: paramiko.Channel, command: str, deadline: float) -> CommandResult | None:
        """Send the exec request; a result only if the command could not start."""
        expired = threading.Event()

        def expire() -> None:  # paramiko waits for the exec answer with no deadline
            expired.set()
            _close_quietly(chan)

        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            chan.exec_command(command)
            chan.shutdown_write()  # no stdin
            return None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            if expired.is_set():
                log.warning(
                    "ssh %s: exec not answered before the deadline: %s", self.where, command
                )
                return CommandResult(command, None, "", "", 0.0, timed_out=True)
            why = f"could not start the command: {type(exc).__name__}: {exc}"
            return CommandResult(command, None, "", "", 0.0, error=why)
        finally:
            watchdog.cancel()

    def _collect(
        self,
        transport: paramiko.Transport,
        chan: paramiko.Channel,
        command: str,
        start: float,
        deadline: float,
    ) -> CommandResult:
        """Read both streams until exit, EOF, a lost connection or the deadline."""
        out, err = _Capped(self.max_output), _Capped(self.max_output)
        timed_out = False
        try:
            while True:
                _drain(chan, out, err)
                if chan.closed or (chan.eof_received and chan.exit_status_ready()):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                if not transport.is_active():
                    break
                select.select([chan], [], [], min(_POLL, left))
            _drain(chan, out, err)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            why = f"connection failed while reading: {type(exc).__name__}: {exc}"
            duration = time.monotonic() - start
            return CommandResult(command, None, out.text(), err.text(), duration, error=why)
        duration = time.monotonic() - start
        if timed_out:
            log.warning("ssh %s: command timed out after %.1fs: %s", self.where, duration, command)
            return CommandResult(command, None, out.text(), err.text(), duration, timed_out=True)
        status = chan.exit_status if chan.exit_status_ready() else -1
        if status == -1:  # paramiko's "no exit-status received"
            why = (
                "connection lost before the command exited"
                if not transport.is_active()
                else "channel closed without an exit status (killed by a signal?)"
            )
            return CommandResult(command, None, out.text(), err.text(), duration, error=why)
        log.debug("ssh %s: exit %d in %.2fs: %s", self.where, status, duration, command)
        return CommandResult(command, status, out.text(), err.text(), duration)


def _close_quietly(chan: paramiko.Channel) -> None:
    try:
        chan.close()
    except (OSError, EOFError, paramiko.SSHException):
        pass  # the connection is already gone


def _drain(chan: paramiko.Channel, out: _Capped, err: _Capped) -> None:
    while chan.recv_ready():
        data = chan.recv(_READ_CHUNK)
        if not data:
            break
        out.add(data)
    while chan.recv_stderr_ready():
        data = chan.recv_stderr(_READ_CHUNK)
        if not data:
            break
        err.add(data)
