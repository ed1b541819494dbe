"""No credential, key or token in any log line or message of a full pipeline run.

The run is the one the IAM audit reads too (``tests/audited_run.py``): the
demo's compose with unmistakable AWS credentials, every throwaway private key
captured as the hub creates it, and logging at DEBUG for everything but
botocore and boto3 (their DEBUG output is the signed request, which is why
production must never run them at DEBUG: docs/security.md).

Then every file the stack wrote (hub, relay, ResultsDB, instance host, status
files, test outputs, spool) plus moto_server's log, and every message seen on
the bus, are searched for the secret key, the session token, each private key
(PEM text, each base64 line of it, the raw key in base64 and hex), PEM
``PRIVATE KEY`` headers, the OpenSSH key magic, Authorization/SigV4/bearer
headers and ResultsDB ``_auth_token``. Zero hits, and positive controls show
the secrets were live (the hub signed its AWS calls with them; the captured
keys are exactly the ones imported to AWS).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from devel.bus import Seen
from tests.audited_run import AuditedRun

# -- what a leak looks like ------------------------------------------------------------------------


@dataclass(frozen=True)
class Needle:
    """One thing that must not appear: a literal or a regular expression, with a name."""

    name: str
    pattern: re.Pattern[bytes]

    @classmethod
    def literal(cls, name: str, text: str | bytes) -> Needle:
        raw = text.encode() if isinstance(text, str) else text
        return cls(name, re.compile(re.escape(raw)))


#: Shapes of secrets, whoever they belong to.
GENERIC: Final = (
    Needle("PEM private key header", re.compile(rb"PRIVATE KEY-----")),
    Needle("OpenSSH private key magic", re.compile(rb"b3BlbnNzaC1rZXktdjE|openssh-key-v1\x00")),
    Needle("Authorization header", re.compile(rb"(?i)['\"]?authorization['\"]?\s*[:=]")),
    Needle("SigV4 signature", re.compile(rb"AWS4-HMAC-SHA256")),
    Needle("AWS session token header", re.compile(rb"(?i)x-amz-security-token")),
    Needle("bearer token", re.compile(rb"(?i)bearer\s+[a-z0-9._~+/-]{8,}")),
    Needle("ResultsDB auth token", re.compile(rb"_auth_token")),
    Needle("AWS secret key assignment", re.compile(rb"(?i)aws_secret_access_key\s*[:=]\s*\S")),
)


def key_needles(name: str, pem: str) -> list[Needle]:
    """A private key in every form it could leak: PEM, its base64 lines, the raw key."""
    key = serialization.load_ssh_private_key(pem.encode(), password=None)
    needles = [Needle.literal(f"{name} (PEM)", pem.strip())]
    body = _body(pem)
    # The first line(s) of every unencrypted key of a type are the same (format magic,
    # cipher "none", key type): only the lines that belong to this key are needles.
    generic = set(_body(_fresh_pem_like(key)))
    needles += [
        Needle.literal(f"{name} (PEM line {i})", ln)
        for i, ln in enumerate(body)
        if ln not in generic
    ]
    needles.append(Needle.literal(f"{name} (PEM base64, joined)", "".join(body)))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        needles += [
            Needle.literal(f"{name} (raw, base64)", base64.b64encode(raw)),
            Needle.literal(f"{name} (raw, urlsafe base64)", base64.urlsafe_b64encode(raw)),
            Needle.literal(f"{name} (raw, hex)", raw.hex()),
        ]
    return needles


def _body(pem: str) -> list[str]:
    return [ln for ln in pem.strip().splitlines() if ln and not ln.startswith("-----")]


def _fresh_pem_like(key: Any) -> str:
    """Another private key of the same type, as an unencrypted OpenSSH PEM."""
    other = (
        ed25519.Ed25519PrivateKey.generate() if isinstance(key, ed25519.Ed25519PrivateKey) else key
    )
    return other.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()


def public_openssh(pem: str) -> str:
    key = serialization.load_ssh_private_key(pem.encode(), password=None)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return public.decode()


def find_leaks(sources: Iterable[tuple[str, bytes]], needles: Iterable[Needle]) -> list[str]:
    """``"<needle> in <source> at <offset>"`` for every hit (the secret itself is not repeated)."""
    needles = list(needles)
    hits = []
    for where, data in sources:
        for needle in needles:
            for match in needle.pattern.finditer(data):
                hits.append(f"{needle.name} in {where} at byte {match.start()}")
    return hits


def files_under(root: Path, skip: Iterable[Path] = ()) -> Iterator[tuple[str, bytes]]:
    skipped = {p.resolve() for p in skip}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.resolve() not in skipped:
            yield str(path.relative_to(root.parent)), path.read_bytes()


def message_sources(messages: Iterable[Seen]) -> Iterator[tuple[str, bytes]]:
    for i, m in enumerate(messages):
        yield f"bus message {i} ({m.topic})", json.dumps(m.envelope, sort_keys=True).encode()


# -- unit tests: the scanner finds what it looks for ----------------------------------------------


def _pem() -> str:
    """A fresh ed25519 private key in OpenSSH PEM, as autocloud_ami.instance.generate_key makes."""
    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()


def test_every_form_of_a_private_key_is_found_and_a_clean_text_is_not() -> None:
    pem = _pem()
    needles = key_needles("key", pem)
    body = [ln for ln in pem.splitlines() if ln and not ln.startswith("-----")]
    key = serialization.load_ssh_private_key(pem.encode(), password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    leaks = {
        "pem": f"loaded key:\n{pem}",
        "line": f"DEBUG something {body[1]} else",
        "b64": f"seed={base64.b64encode(raw).decode()}",
        "hex": f"seed={raw.hex()}",
    }
    for name, text in leaks.items():
        assert find_leaks([(name, text.encode())], needles), name
    other = _pem()
    assert find_leaks([("other key", other.encode())], needles) == []
    clean = "2026-01-01 INFO Fedora-40 ami-0123456789abcdef0: state testing -> promoting"
    assert find_leaks([("clean", clean.encode())], [*needles, *GENERIC]) == []


@pytest.mark.parametrize(
    "line",
    [
        b"-----BEGIN OPENSSH PRIVATE KEY-----",
        b"-----BEGIN RSA PRIVATE KEY-----",
        b"data b3BlbnNzaC1rZXktdjEAAAAA",
        b"headers={'Authorization': b'AWS4-HMAC-SHA256 Credential=x/2026/us-east-1/ec2'}",
        b"X-Amz-Security-Token: FwoGZXIvYXdzE",
        b"Authorization: Bearer eyJhbGciOiJIUzI1NiJ9",
        b'{"outcome": "PASSED", "_auth_token": "s3cr3t"}',
        b"aws_secret_access_key = wJalrXUtnFEMI",
    ],
)
def test_generic_shapes_of_secrets_are_found(line: bytes) -> None:
    assert find_leaks([("log", b"prefix " + line + b" suffix")], GENERIC)


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Run:
    sources: list[tuple[str, bytes]]  # every file the stack wrote, every bus message
    needles: list[Needle]
    captured_pems: list[str]
    imported_public_keys: set[str]  # ImportKeyPair's PublicKeyMaterial, decoded
    token_headers: int  # hub AWS requests that carried our session token
    hub_log: str


def _imported_keys_and_token_uses(recording: Path, token: str) -> tuple[set[str], int]:
    """From moto's recording: the public keys imported, and requests signed with ``token``."""
    keys, uses = set(), 0
    decoder = json.JSONDecoder()
    for line in recording.read_text().splitlines():
        at = 0
        while at < len(line.strip()):
            entry, end = decoder.raw_decode(line.strip(), at)
            at = end
            headers = {str(k).lower(): str(v) for k, v in entry.get("headers", {}).items()}
            if headers.get("x-amz-security-token") == token and re.search(
                r"\b(fedimg|autocloud_ami)/3\b", headers.get("user-agent", "")
            ):
                uses += 1
            body = entry.get("body") or ""
            if entry.get("body_encoded"):
                body = base64.b64decode(body).decode("utf-8", "replace")
            params = parse_qs(body)
            if params.get("Action") == ["ImportKeyPair"]:
                material = base64.b64decode(params["PublicKeyMaterial"][0]).decode()
                keys.add(" ".join(material.split()[:2]))
    return keys, uses


@pytest.fixture(scope="module")
def run(audited_run: AuditedRun) -> Run:
    stack = audited_run.stack
    assert stack.workdir is not None
    assert audited_run.key_log.exists(), "no private key was captured: sitecustomize not loaded?"
    captured = [json.loads(line)["pem"] for line in audited_run.key_log.read_text().splitlines()]
    needles = [
        *GENERIC,
        Needle.literal("AWS secret access key", audited_run.secret_key),
        Needle.literal("AWS session token", audited_run.token),
    ]
    for i, pem in enumerate(captured):
        needles += key_needles(f"private key {i}", pem)
    recording = audited_run.recording
    sources = [
        *files_under(stack.workdir),
        *files_under(recording.parent, skip=[recording]),  # the recording is the instrument
        *message_sources(audited_run.messages),
    ]
    imported, uses = _imported_keys_and_token_uses(recording, audited_run.token)
    return Run(sources, needles, captured, imported, uses, audited_run.hub_log)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)  # the first test of the session to ask starts the run
def test_the_secrets_were_live_during_the_run(run: Run) -> None:
    """Positive controls: otherwise finding nothing would prove nothing."""
    assert run.token_headers > 50, "the hub did not sign its AWS calls with our session token"
    captured_public = {" ".join(public_openssh(pem).split()[:2]) for pem in run.captured_pems}
    assert len(run.imported_public_keys) >= 3, "fewer key pairs than tested images"
    assert run.imported_public_keys <= captured_public, "a throwaway key was not captured"
    # The logs are verbose: our loggers, and paramiko's (autocloud_ami.ssh routes its
    # transport log under autocloud_ami.ssh.paramiko), wrote DEBUG records to the hub's log.
    records = re.findall(r"^\[[^]]*\]\[([\w.]+) (DEBUG|INFO|WARNING)\]", run.hub_log, flags=re.M)
    debug = {name.split(".")[0] for name, level in records if level == "DEBUG"}
    assert {"fedimg", "autocloud_ami"} <= debug, debug
    assert any(name.startswith("autocloud_ami.ssh.paramiko") for name, _ in records)
    names = {where.split("/")[-1] for where, _ in run.sources}
    assert any(n.startswith("hub-") for n in names) and "moto_server.log" in names, names
    assert sum(1 for where, _ in run.sources if where.startswith("bus message")) > 50


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)  # the first test of the session to ask starts the run
def test_no_secret_in_any_log_file_or_message(run: Run) -> None:
    leaks = find_leaks(run.sources, run.needles)
    assert leaks == [], "\n".join(leaks[:50])
